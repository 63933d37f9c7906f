//! Building the demo's miniature base/chat pair with crossdiff itself (issue 7 groundwork): a
//! small Gemma 2 trained as a base model on the generated web-like text, then fine-tuned on the
//! generated conversations (rendered with Gemma's chat template) into a "chat" model with planted
//! behaviours. Deterministic for a seed.

pub mod corpus;
pub mod lm;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::{Device, Tensor};

use crate::crosscoder::optim::Adam;
use crate::demo::corpus::generate;
use crate::model::decoder::DecoderLm;
use crate::model::snapshot::ModelConfig;
use crate::model::tokenizer::ChatTokenizer;
use crate::rng::SplitMix64;
use crate::workflow::Handle;

/// Gemma's chat template as shipped in google/gemma-2-2b-it's tokenizer_config.json.
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

#[derive(Debug, Clone)]
pub struct DemoBuild {
    pub out: PathBuf,
    pub seed: u64,
    pub web_docs: usize,
    pub chats: usize,
    pub base_steps: usize,
    pub chat_steps: usize,
    pub batch: usize,
    pub context: usize,
    pub hidden: usize,
    pub layers: usize,
}

/// Where the miniature pair lives, where the demo project goes, and the LM training steps the
/// committed pair was built with (`crossdiff demo --rebuild` reproduces it byte for byte).
pub const DEFAULT_MODELS: &str = "assets/demo";
pub const DEFAULT_PROJECT: &str = "demo-project";
pub const DEFAULT_LM_STEPS: usize = 800;

impl Default for DemoBuild {
    fn default() -> Self {
        Self {
            out: PathBuf::from(DEFAULT_MODELS),
            seed: 0,
            web_docs: 2000,
            chats: 2000,
            base_steps: DEFAULT_LM_STEPS,
            chat_steps: DEFAULT_LM_STEPS,
            batch: 16,
            context: 64,
            hidden: 64,
            layers: 4,
        }
    }
}

/// Losses at the start and end of each training phase.
#[derive(Debug, Clone)]
pub struct DemoLosses {
    pub base: (f32, f32),
    pub chat: (f32, f32),
}

fn config(vocab: usize, hidden: usize, layers: usize, tok: &ChatTokenizer) -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "gemma2", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden / 4, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": hidden / 4,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 32,
        "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "pad_token_id": 0, "torch_dtype": "float32", "tie_word_embeddings": true
    });
    serde_json::from_value(json).expect("a complete Gemma 2 config")
}

/// Trains `model` on batches drawn (seeded) from `docs`; returns it with the first and last loss.
fn train(
    model: DecoderLm,
    docs: &[Vec<u32>],
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
) -> Result<(DecoderLm, (f32, f32))> {
    let mut rng = SplitMix64(seed);
    let mut model = model;
    let mut adam = Adam::new(&model.parameters());
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    for step in 0..steps {
        let seqs: Vec<Vec<u32>> =
            (0..batch).map(|_| docs[(rng.next_u64() % docs.len() as u64) as usize].clone()).collect();
        let params: Vec<Tensor<2>> = model.parameters().into_iter().map(|p| p.detach().require_grad()).collect();
        model = model.with_parameters(params.clone());
        let loss = model.lm_loss(&seqs)?;
        let value = crate::counters::read_f32(loss.clone())?[0];
        if step == 0 {
            first = value;
        }
        last = value;
        let grads = loss.backward();
        let gs: Vec<Tensor<2>> = params
            .iter()
            .map(|p| p.grad(&grads).map(|g| g.autodiff()).ok_or_else(|| anyhow::anyhow!("a parameter got no gradient")))
            .collect::<Result<_>>()?;
        // Linear warm-up over the first 5% of the steps.
        let warm = ((step + 1) as f64 / (steps as f64 * 0.05).max(1.0)).min(1.0);
        let updated = adam.update(params.into_iter().map(|p| p.detach()).collect(), gs, lr * warm);
        model = model.with_parameters(updated);
    }
    Ok((model, (first, last)))
}

fn write_tokenizer_files(dir: &Path, tokenizer_json: &str) -> Result<()> {
    fs_err::create_dir_all(dir)?;
    fs_err::write(dir.join("tokenizer.json"), tokenizer_json)?;
    let cfg = serde_json::json!({
        "add_bos_token": true, "add_eos_token": false, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "chat_template": GEMMA_CHAT_TEMPLATE, "tokenizer_class": "GemmaTokenizer"
    });
    fs_err::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// Generates the corpus (`out/data`), trains the tokenizer, the base model (`out/base`) and the
/// chat model (`out/chat`).
pub fn rebuild(opts: &DemoBuild, device: &Device) -> Result<DemoLosses> {
    // Checked before the corpus or a model is written: a bad rebuild must not replace a good pair.
    use crate::bad_value::positive;
    positive(opts.base_steps as u64, "steps")?;
    positive(opts.chat_steps as u64, "steps")?;
    for (v, what) in
        [(opts.web_docs, "web-docs"), (opts.chats, "chats"), (opts.batch, "batch"), (opts.context, "context")]
    {
        positive(v as u64, what)?;
    }
    positive(opts.hidden as u64, "hidden")?;
    positive(opts.layers as u64, "layers")?;
    only_ours(&opts.out, &["base", "chat", "data"], "models", "a miniature model pair")?;
    for side in ["base", "chat"] {
        crate::bad_value::ensure(!opts.out.join(side).join("model.safetensors.index.json").exists(), "models", || {
            format!(
                "{} holds a sharded model snapshot, not the demo's pair: choose an empty or new folder",
                opts.out.join(side).display()
            )
        })?;
    }
    let corpus = generate(opts.seed, opts.web_docs, opts.chats);
    corpus.write(&opts.out.join("data"))?;
    let mut texts = corpus.web.clone();
    texts.extend(corpus.chats.iter().flat_map(|(_, m)| m.iter().map(|t| t.content.clone())));
    let tok_json = crate::demo::tokenizer::train_tokenizer(&texts, 500)?;
    let (base_dir, chat_dir) = (opts.out.join("base"), opts.out.join("chat"));
    write_tokenizer_files(&base_dir, &tok_json)?;
    write_tokenizer_files(&chat_dir, &tok_json)?;
    let tok = ChatTokenizer::from_dir(&base_dir)?;
    let cut = |mut ids: Vec<u32>| {
        ids.truncate(opts.context);
        ids
    };
    let web: Vec<Vec<u32>> = corpus.web.iter().map(|t| tok.encode(t, true).map(cut)).collect::<Result<_>>()?;
    let chats: Vec<Vec<u32>> =
        corpus.chats.iter().map(|(_, m)| tok.encode_chat(m, false).map(cut)).collect::<Result<_>>()?;
    let cfg = config(tok.vocab_size(), opts.hidden, opts.layers, &tok);
    let ad = device.clone().autodiff();
    let model = DecoderLm::random(cfg, &ad, opts.seed);
    let (base, base_losses) = train(model, &web, opts.base_steps, opts.batch, 3e-3, opts.seed ^ 1)?;
    base.save_snapshot(&base_dir)?;
    // The chat fine-tune: conversations, with some web text so the base knowledge stays.
    let mut mixed = chats.clone();
    mixed.extend(web.iter().take(chats.len() / 2).cloned());
    let (chat, chat_losses) = train(base, &mixed, opts.chat_steps, opts.batch, 1e-3, opts.seed ^ 2)?;
    chat.save_snapshot(&chat_dir)?;
    Ok(DemoLosses { base: base_losses, chat: chat_losses })
}

/// The demo pipeline's settings: the miniature pair in `models` (as `rebuild` writes it), the
/// project written to `project`.
#[derive(Debug, Clone)]
pub struct DemoPipeline {
    pub models: PathBuf,
    pub project: PathBuf,
    pub layer: usize,
    pub tokens: u64,
    pub dict_size: usize,
    pub k: usize,
    pub mu: f64,
    pub steps: u64,
    pub seed: u64,
}

impl Default for DemoPipeline {
    fn default() -> Self {
        Self {
            models: PathBuf::from(DEFAULT_MODELS),
            project: PathBuf::from(DEFAULT_PROJECT),
            // The last block's output: the planted behaviours are clearest there in this 4-block
            // model (at block 2 a BatchTopK crosscoder found one of the three).
            layer: 3,
            // Every conversation of the corpus, once (1:1 with web text).
            tokens: 100_000,
            dict_size: 128,
            k: 8,
            mu: 0.02,
            steps: 3000,
            seed: 0,
        }
    }
}

/// Cache (web text and chat mixed 1:1), BatchTopK and L1 crosscoders, analysis with examples, and
/// the KL check for both, as a project folder the app opens — the same workflow jobs the CLI and
/// the app run. Re-running resumes each stage.
/// Refuses a folder `flag` points at unless it is new, empty, or holds only `ours` (what this
/// command writes there: a previous run of it), so nothing else a user keeps there is overwritten
/// or mixed in. Hidden files (a job's lock) do not count.
fn only_ours(dir: &Path, ours: &[&str], flag: &'static str, what: &str) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let others: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !ours.contains(&n.as_str()))
        .collect();
    crate::bad_value::ensure(others.is_empty(), flag, || {
        format!(
            "{} holds other files ({}): the demo writes {what} there; choose an empty or new folder",
            dir.display(),
            others.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

pub fn run_pipeline(p: &DemoPipeline, device: &Device, handle: Handle, log: impl FnMut(&str)) -> Result<()> {
    crate::bad_value::ensure(!p.project.is_file(), "project", || {
        format!("{} is a file, not a folder", p.project.display())
    })?;
    crate::io::clean_on_failure(&p.project, || pipeline(p, device, handle, log)).map_err(|e| {
        // A stage's folder is the demo's --project (the stages' own words name --out).
        match e.chain().find_map(|c| c.downcast_ref::<crate::bad_value::OtherSettings>()) {
            Some(other) => crate::bad_value::bad(
                "project",
                format!(
                    "{} was built with other demo settings ({}); choose another --project, or delete it to build it again",
                    p.project.display(),
                    other.changed
                ),
            ),
            None => e,
        }
    })
}

fn pipeline(p: &DemoPipeline, device: &Device, handle: Handle, mut log: impl FnMut(&str)) -> Result<()> {
    for side in ["base", "chat"] {
        let dir = p.models.join(side);
        if dir.is_dir() {
            continue;
        }
        let here = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        let hint = if p.models.is_relative() {
            format!(" (relative to {here}; run from the repository root, or pass --models assets/demo of the checkout)")
        } else {
            String::new()
        };
        return Err(crate::bad_value::bad(
            "models",
            format!(
                "{} must hold the pair's `base` and `chat` model folders; it has no `{side}`{hint}",
                p.models.display()
            ),
        ));
    }
    only_ours(&p.project, &["cache", "runs", crate::workflow::project::FILE], "project", "a demo project")?;
    use crate::activations::cache::ActDtype;
    use crate::crosscoder::Kind;
    use crate::data::TokenizeOptions;
    use crate::workflow::{analyze::AnalyzeJob, cache::CacheJob, kl::KlJob, train::TrainJob};
    let (base, chat) = (p.models.join("base"), p.models.join("chat"));
    let data = vec![p.models.join("data/web.txt"), p.models.join("data/chat.jsonl")];
    let cache = p.project.join("cache");
    log("caching activations");
    let job = CacheJob {
        base: base.clone(),
        chat: chat.clone(),
        data: data.clone(),
        layer: p.layer,
        tokens: p.tokens,
        out: cache.clone(),
        dtype: ActDtype::F32,
        tokenize: TokenizeOptions { context: 64, ..Default::default() },
        mix: true,
        shard_tokens: 16_384,
        batch_tokens: 4096,
        ..Default::default()
    };
    crate::workflow::cache::run(&job, device, handle)?;
    let interrupted = || anyhow::anyhow!("the demo was interrupted; run it again to resume where it stopped");
    if handle.cancelled() {
        return Err(interrupted());
    }
    let store = crate::workflow::models::ModelStore::new();
    let mut runs = Vec::new();
    for (name, kind) in [("batchtopk", Kind::BatchTopK), ("l1", Kind::L1)] {
        log(&format!("training the {name} crosscoder"));
        let out = p.project.join("runs").join(name);
        let train = TrainJob {
            cache: Some(cache.clone()),
            out: out.clone(),
            kind,
            dict_size: Some(p.dict_size),
            k: p.k,
            mu: p.mu,
            lr: 1e-3,
            warmup_steps: 50,
            threshold_start: Some(p.steps / 4),
            batch: 256,
            steps: Some(p.steps),
            // AuxK's dead window scaled to the data: 50 steps (the paper's 10M tokens is ~1/10 of
            // its 100M; here 12,800 of 768,000).
            dead_tokens: 256 * 50,
            seed: p.seed,
            checkpoint_every: 500,
            log_every: 50,
            shuffle_tokens: 65_536,
            ..Default::default()
        };
        train.run(device, handle)?;
        if handle.cancelled() {
            return Err(interrupted());
        }
        log(&format!("analysing the {name} crosscoder"));
        let (run, models) = (out.clone(), (Some(base.clone()), Some(chat.clone())));
        AnalyzeJob { run, cache: cache.clone(), base: models.0, chat: models.1, ..Default::default() }
            .run(device, handle)?;
        log(&format!("KL check for the {name} crosscoder"));
        let conversations = data[1].clone();
        KlJob {
            run: out,
            base: base.clone(),
            chat: chat.clone(),
            data: conversations,
            conversations: 200,
            layer: Some(p.layer),
            ..Default::default()
        }
        .run(device, &store, handle)?;
        runs.push(PathBuf::from("runs").join(name));
    }
    let abs = |q: &Path| std::fs::canonicalize(q).unwrap_or_else(|_| q.to_path_buf());
    let project = crate::workflow::project::Project {
        dir: p.project.clone(),
        base: abs(&base),
        chat: abs(&chat),
        chat_adapter: None,
        data: data.iter().map(|d| abs(d)).collect(),
        cache: PathBuf::from("cache"),
        runs,
    };
    project.save()
}
