//! Nothing silent (issue 11): which models made a cache or a run is recorded and checked where
//! artifacts meet; non-finite values stop caching and training with an error that names where;
//! checkpoints are verified; an unfinished or empty cache is refused; cache.json from another tool
//! is read by its four required keys; conversations use the chat model's template.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{TempDir, cache_index as cache, fixture, fixture_weights, one_line_err as err, write_single_file};
use crossdiff::activations::cache::{ActDtype, CacheIndex};
use crossdiff::activations::reader::PairBatch;
use crossdiff::activations::writer::CacheJob;
use crossdiff::crosscoder::Kind;
use crossdiff::crosscoder::train::{PairSource, TrainConfig, TrainRun};
use crossdiff::data::TokenizeOptions;
use crossdiff::rng::SplitMix64;
use crossdiff::workflow::Handle;
use crossdiff::workflow::analyze::AnalyzeJob;
use crossdiff::workflow::kl::KlJob;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::train::TrainJob;
use crossdiff::{ChatTokenizer, LoadOptions, Message, Snapshot};
use safetensors::{Dtype, SafeTensors};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data").join(name)
}

fn cache_job(base: &Path, chat: &Path, out: &Path, data_files: Vec<PathBuf>, dtype: ActDtype) -> CacheJob {
    CacheJob {
        base: base.to_path_buf(),
        chat: chat.to_path_buf(),
        chat_adapter: None,
        data: data_files,
        layer: 1,
        tokens: 600,
        out: out.to_path_buf(),
        dtype,
        tokenize: TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        mix: false,
        shard_tokens: 256,
        batch_tokens: 256,
        low_memory: false,
        load: LoadOptions::default(),
        devices: Vec::new(),
    }
}

fn train_job(cache: &Path, out: &Path) -> TrainJob {
    TrainJob {
        cache: Some(cache.to_path_buf()),
        out: out.to_path_buf(),
        dict_size: Some(64),
        k: 8,
        threshold_start: Some(2),
        batch: 64,
        steps: Some(6),
        checkpoint_every: 3,
        log_every: 1,
        shuffle_tokens: 256,
        ..Default::default()
    }
}

fn identity(dir: &Path) -> String {
    Snapshot::open(dir).unwrap().identity().unwrap()
}

#[test]
fn identities_tell_the_models_apart_and_follow_a_copy() {
    let (base, chat) = (identity(&fixture("base")), identity(&fixture("chat")));
    assert_eq!(base.len(), 16);
    assert_ne!(base, chat, "a fine-tune has the base's config and layout: the weights must decide");
    let copy = TempDir::copy_of("ident", "base");
    assert_eq!(identity(copy.path()), base, "a copy in another folder is the same model");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    assert_ne!(identity(&demo.join("base")), identity(&demo.join("chat")));
}

#[test]
fn caches_and_runs_record_their_models_and_refuse_others() {
    let dir = TempDir::new("made-from");
    let (base, chat) = (fixture("base"), fixture("chat"));
    let web = vec![data("web.txt")];
    let a = dir.path().join("a");
    let index = cache(&cache_job(&base, &chat, &a, web.clone(), ActDtype::Bf16)).unwrap();
    assert_eq!(index.model_ids, vec![identity(&base), identity(&chat)]);
    // Resuming a cache folder with the models swapped.
    let msg = err(cache(&cache_job(&chat, &base, &a, web.clone(), ActDtype::Bf16)));
    assert!(msg.contains("cache.json") && msg.contains("other models") && msg.contains("--out"), "{msg}");

    let run = dir.path().join("run");
    let device = Device::flex();
    let trained = train_job(&a, &run).run(&device, Handle::silent()).unwrap();
    assert_eq!(trained.crosscoder.config.model_ids, index.model_ids);

    // A cache of the swapped pair: analyse refuses it unless told.
    let b = dir.path().join("b");
    cache(&cache_job(&chat, &base, &b, web, ActDtype::Bf16)).unwrap();
    let analyze = AnalyzeJob { run: run.clone(), cache: b.clone(), examples: 2, ..Default::default() };
    let before = std::fs::read(run.join("config.json")).unwrap();
    let msg = err(analyze.run(&device, Handle::silent()));
    assert!(msg.contains("different models") && msg.contains("--allow-other-models"), "{msg}");
    assert!(!run.join("latents.csv").exists(), "a refused analysis writes nothing");
    AnalyzeJob { allow_other_models: true, ..analyze }.run(&device, Handle::silent()).unwrap();
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), before);

    // Resuming the run on the other cache (more steps, same settings).
    let msg = err(TrainJob { cache: Some(b), steps: Some(9), ..train_job(&a, &run) }.run(&device, Handle::silent()));
    assert!(msg.contains("other models") && msg.contains("state.json"), "{msg}");

    // The causal check with base and chat swapped.
    let kl = KlJob {
        run: run.clone(),
        base: chat.clone(),
        chat: base.clone(),
        data: data("chat.jsonl"),
        conversations: 2,
        ..Default::default()
    };
    let msg = err(kl.run(&device, &ModelStore::new(), Handle::silent()));
    assert!(msg.contains("swapped") && msg.contains("--allow-other-models"), "{msg}");
}

#[test]
fn conversations_are_rendered_with_the_chat_models_template() {
    let base = TempDir::copy_of("tmpl-base", "base");
    let chat = TempDir::copy_of("tmpl-chat", "chat");
    let edit = |dir: &Path, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let p = dir.join("tokenizer_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    };
    // Many base models ship without a template; the chat model's own one differs from the base's.
    edit(base.path(), &|m| {
        m.remove("chat_template");
    });
    edit(chat.path(), &|m| {
        let t = m["chat_template"].as_str().unwrap().replace("<end_of_turn>", "<end_of_turn><end_of_turn>");
        m.insert("chat_template".into(), t.into());
    });
    let out = TempDir::new("tmpl-cache");
    let job = CacheJob {
        tokenize: TokenizeOptions { context: 256, drop_bos: false, skip_first: Some(0) },
        ..cache_job(base.path(), chat.path(), &out.path().join("c"), vec![data("chat.jsonl")], ActDtype::F32)
    };
    let index = cache(&job).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(data("chat.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let messages: Vec<Message> = serde_json::from_value(first["messages"].clone()).unwrap();
    let want = ChatTokenizer::from_dir(chat.path()).unwrap().encode_chat(&messages, false).unwrap();
    let bytes = std::fs::read(out.path().join("c").join(&index.shards[0].file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("token_ids")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(&ids[..want.len()], &want[..], "the first conversation, as the chat template renders it");
}

/// A copy of the base fixture with one tensor changed.
fn edited_base(tag: &str, tensor: &str, f: impl Fn(f32) -> f32) -> TempDir {
    let dir = TempDir::copy_of(tag, "base");
    let mut weights = fixture_weights("base");
    let (dtype, _, bytes) = weights.get_mut(tensor).unwrap();
    assert_eq!(*dtype, Dtype::BF16, "the fixtures are stored in bf16");
    for (i, b) in bytes.chunks_exact_mut(2).enumerate() {
        let v = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let v = if i == 0 || tensor.contains("embed") { f(v) } else { v };
        b.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
    }
    write_single_file(dir.path(), &weights);
    dir
}

#[test]
fn non_finite_activations_are_never_cached() {
    let chat = fixture("chat");
    let nan = edited_base("nan-w", "model.layers.0.mlp.down_proj.weight", |_| f32::NAN);
    let out = TempDir::new("nan-cache");
    let msg = err(cache(&cache_job(nan.path(), &chat, &out.path().join("c"), vec![data("web.txt")], ActDtype::Bf16)));
    let named = nan.path().display().to_string();
    assert!(msg.contains(&named) && msg.contains("non-finite") && msg.contains("document 0"), "{msg}");
    assert!(msg.contains("first batch") && msg.contains("web.txt"), "{msg}");
    assert!(!out.path().join("c").join("acts-00000.safetensors").exists());

    // Finite in f32, too large for f16: the error says which dtype to use instead.
    let loud = edited_base("loud-w", "model.embed_tokens.weight", |v| v * 1e6);
    let msg = err(cache(&cache_job(loud.path(), &chat, &out.path().join("f16"), vec![data("web.txt")], ActDtype::F16)));
    assert!(msg.contains("overflows f16") && msg.contains("--dtype bf16 or f32"), "{msg}");
    cache(&cache_job(loud.path(), &chat, &out.path().join("bf16"), vec![data("web.txt")], ActDtype::Bf16)).unwrap();
}

#[test]
fn an_empty_source_is_an_error_and_leaves_no_folder() {
    let dir = TempDir::new("empty-src");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("c");
    let job = cache_job(&fixture("base"), &fixture("chat"), &out, vec![empty], ActDtype::Bf16);
    let msg = err(crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::silent()));
    assert!(msg.contains("--data") && msg.contains("0 tokens"), "{msg}");
    assert!(!out.exists(), "the job made the folder and leaves none");
    std::fs::create_dir_all(&out).unwrap();
    err(crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::silent()));
    assert!(out.exists(), "a folder the user made stays");
}

#[test]
fn unfinished_caches_need_allow_partial_and_foreign_ones_train() {
    let dir = TempDir::new("partial");
    let c = dir.path().join("c");
    cache(&cache_job(&fixture("base"), &fixture("chat"), &c, vec![data("web.txt")], ActDtype::Bf16)).unwrap();
    let json = c.join("cache.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    v["complete"] = false.into();
    std::fs::write(&json, v.to_string()).unwrap();
    let device = Device::flex();
    let run = dir.path().join("run");
    let msg = err(train_job(&c, &run).run(&device, Handle::silent()));
    assert!(msg.contains("incomplete") && msg.contains("--allow-partial"), "{msg}");
    assert!(!run.exists() || std::fs::read_dir(&run).unwrap().next().is_none(), "a refused run writes nothing");
    TrainJob { allow_partial: true, ..train_job(&c, &run) }.run(&device, Handle::silent()).unwrap();
    let msg =
        err(AnalyzeJob { run: run.clone(), cache: c.clone(), ..Default::default() }.run(&device, Handle::silent()));
    assert!(msg.contains("--allow-partial"), "{msg}");

    // Another tool's cache.json: the four required keys, odd shapes elsewhere.
    let shards: Vec<serde_json::Value> = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!({"file": s["file"], "tokens": s["tokens"]}))
        .collect();
    let foreign = serde_json::json!({
        "format": "crossdiff-cache/1", "d_model": v["d_model"], "dtype": "bf16", "shards": shards,
        "layer": "thirteen", "models": {"base": 1}, "settings": [1, 2], "written_by": {"tool": "elsewhere"}
    });
    std::fs::write(&json, foreign.to_string()).unwrap();
    let index = CacheIndex::open(&c).unwrap();
    assert!(index.complete && index.layer.is_none() && index.models.is_empty() && index.total_tokens == 600);
    TrainJob { steps: Some(4), ..train_job(&c, &dir.path().join("run2")) }.run(&device, Handle::silent()).unwrap();
    // A required key missing is named.
    let mut missing = foreign.clone();
    missing.as_object_mut().unwrap().remove("d_model");
    std::fs::write(&json, missing.to_string()).unwrap();
    let msg = err(CacheIndex::open(&c));
    assert!(msg.contains("cache.json") && msg.contains("`d_model`"), "{msg}");
}

/// Uniform pairs; from batch `blow_up_at` on, NaN (as a broken cache from elsewhere would give).
struct Synthetic {
    rng: SplitMix64,
    d: usize,
    batch: usize,
    served: u64,
    blow_up_at: u64,
}

impl PairSource for Synthetic {
    fn next_batch(&mut self) -> anyhow::Result<Option<PairBatch>> {
        self.served += 1;
        let poison = if self.served >= self.blow_up_at { f32::NAN } else { 0.0 };
        let acts = (0..self.batch * 2 * self.d).map(|_| poison + self.rng.next_f64() as f32 - 0.5).collect();
        Ok(Some(PairBatch { acts, batch: self.batch, d: self.d }))
    }
}

fn synthetic_run<'a>(out: &Path, source: &'a mut Synthetic, steps: u64) -> TrainRun<'a> {
    TrainRun {
        config: TrainConfig {
            k: 4,
            steps,
            checkpoint_every: 10,
            log_every: 1,
            ..TrainConfig::defaults(Kind::BatchTopK, 32)
        },
        out: out.to_path_buf(),
        device: Device::flex(),
        devices: vec![],
        source,
        validation: None,
        layer: None,
        models: vec![],
        model_ids: vec![],
        width: source_width(),
        source_fingerprint: serde_json::Value::Null,
    }
}

fn source_width() -> usize {
    8
}

fn synthetic(blow_up_at: u64) -> Synthetic {
    Synthetic { rng: SplitMix64(3), d: source_width(), batch: 64, served: 0, blow_up_at }
}

fn checkpoint_step(out: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    v["step"].as_u64().unwrap()
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let dir = TempDir::new("diverge");
    let mut src = synthetic(25);
    let msg = err(synthetic_run(dir.path(), &mut src, 40).run(|_| {}, || true).map(|t| t.step));
    assert!(
        msg.contains("diverged at step 25") && msg.contains("checkpoint at step 20") && msg.contains("--lr"),
        "{msg}"
    );
    assert_eq!(checkpoint_step(dir.path()), 20);
    assert!(!dir.path().join("crosscoder.safetensors").exists(), "no crosscoder exported from a diverged run");
    // The kept checkpoint resumes (on data that stays finite).
    let mut src = synthetic(u64::MAX);
    let done = synthetic_run(dir.path(), &mut src, 40).run(|_| {}, || true).unwrap();
    assert_eq!(done.step, 40);
}

#[test]
fn a_corrupt_checkpoint_is_caught_on_resume() {
    let dir = TempDir::new("ckpt-sum");
    let mut src = synthetic(u64::MAX);
    synthetic_run(dir.path(), &mut src, 10).run(|_| {}, || true).unwrap();
    let weights = std::fs::read_dir(dir.path().join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("state-"))
        .unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&weights, &bytes).unwrap();
    let mut src = synthetic(u64::MAX);
    let msg = err(synthetic_run(dir.path(), &mut src, 20).run(|_| {}, || true).map(|t| t.step));
    assert!(msg.contains("corrupt checkpoint") && msg.contains("checksum"), "{msg}");
}

#[test]
fn an_analysis_of_an_earlier_crosscoder_is_known_as_such() {
    let dir = TempDir::new("stale");
    let c = dir.path().join("c");
    cache(&cache_job(&fixture("base"), &fixture("chat"), &c, vec![data("web.txt")], ActDtype::Bf16)).unwrap();
    let run = dir.path().join("run");
    let device = Device::flex();
    train_job(&c, &run).run(&device, Handle::silent()).unwrap();
    AnalyzeJob { run: run.clone(), cache: c.clone(), examples: 2, ..Default::default() }
        .run(&device, Handle::silent())
        .unwrap();
    let dir_of = crossdiff::run_dir::RunDir::new(&run);
    assert_eq!(dir_of.stale_analysis(), None);
    let cc = crossdiff::crosscoder::Crosscoder::load(&run, &device).unwrap();
    assert_eq!(dir_of.read_latents_of(&cc).unwrap().len(), 64);
    // Trained further: the analysis describes the crosscoder before.
    TrainJob { steps: Some(9), ..train_job(&c, &run) }.run(&device, Handle::silent()).unwrap();
    let why = dir_of.stale_analysis().expect("out of date");
    assert!(why.contains("latents.csv is out of date") && why.contains("crossdiff analyze"), "{why}");
    let cc = crossdiff::crosscoder::Crosscoder::load(&run, &device).unwrap();
    let msg = err(dir_of.read_latents_of(&cc));
    assert!(msg.contains("computed from an earlier crosscoder"), "{msg}");
}

#[test]
fn a_demo_project_built_with_other_settings_is_named_by_its_flag() {
    let dir = TempDir::new("demo-other");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let p = crossdiff::demo::DemoPipeline {
        models,
        project: dir.path().join("p"),
        tokens: 4000,
        steps: 40,
        ..Default::default()
    };
    crossdiff::demo::run_pipeline(&p, &Device::flex(), Handle::silent(), |_| {}).unwrap();
    let before = common::contents(&p.project);
    let other = crossdiff::demo::DemoPipeline { seed: 5, ..p.clone() };
    let msg = err(crossdiff::demo::run_pipeline(&other, &Device::flex(), Handle::silent(), |_| {}));
    assert!(msg.contains("--project") && msg.contains("built with other demo settings"), "{msg}");
    assert!(msg.contains("--seed 0, now --seed 5") && !msg.contains("--out"), "{msg}");
    assert_eq!(common::contents(&p.project), before, "nothing of the project changed");
}
