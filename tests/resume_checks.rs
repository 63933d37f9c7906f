//! Nothing silent (issue 11), resuming and output folders: a resume refused for other settings or
//! other data names each difference by its flag, old → new; training on data that gives nothing is
//! an error; the train job's checks on sizes and on-the-fly options; output folders that belong to
//! another kind of job are refused; a cache says when the data ran out; a cancelled run's outcome
//! and checkpoint agree on the step. A refused job writes nothing and changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;
use clap::Args;
use common::{
    TempDir, cache_outcome as cache, contents, data, fixture, has, one_line_err as err, small_cache_job as cache_job,
    small_train_job as train_job,
};
use crossdiff::activations::cache::{ActDtype, CacheIndex};
use crossdiff::crosscoder::Kind;
use crossdiff::data::TokenizeOptions;
use crossdiff::workflow::cache::CacheJob;
use crossdiff::workflow::train::{TrainJob, TrainOutcome};
use crossdiff::workflow::{Event, Handle};

fn train(job: &TrainJob) -> anyhow::Result<TrainOutcome> {
    job.run(&Device::flex(), Handle::silent())
}

/// On the fly from the fixtures over `files`.
fn on_the_fly(files: Vec<PathBuf>, out: &Path) -> TrainJob {
    TrainJob {
        cache: None,
        base: Some(fixture("base")),
        chat: Some(fixture("chat")),
        data: files,
        layer: Some(1),
        tokenize: TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        ..train_job(Path::new(""), out)
    }
}

fn checkpoint_step(run: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap()).unwrap();
    v["step"].as_u64().unwrap()
}

// ── 1. refusals name what differs ──

#[test]
fn a_cache_resumed_with_other_settings_names_each_change() {
    let dir = TempDir::new("cache-settings");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let before = contents(&c);
    let other = CacheJob {
        layer: 2,
        dtype: ActDtype::F32,
        mix: true,
        data: vec![data("web.txt"), data("chat.jsonl")],
        tokenize: TokenizeOptions { context: 32, drop_bos: true, skip_first: Some(0) },
        ..cache_job(&c)
    };
    let msg = err(cache(&other));
    has(
        &msg,
        &[
            "cache.json: the cache there was made with other settings: ",
            "--context 64 --data ",
            "web.txt no --drop-bos --dtype bf16 --layer 1 no --mix, now --context 32 --data ",
            "chat.jsonl --drop-bos --dtype f32 --layer 2 --mix",
            "choose another --out",
        ],
    );
    assert!(!msg.contains("--tokens") && !msg.contains("--shard-tokens"), "only what differs: {msg}");
    // Sizes only.
    let msg = err(cache(&CacheJob { tokens: 900, shard_tokens: 300, ..cache_job(&c) }));
    has(&msg, &["--shard-tokens 256 --tokens 600, now --shard-tokens 300 --tokens 900"]);
    assert_eq!(contents(&c), before, "a refused resume changes nothing");
    // The same command resumes (here: finds the cache finished).
    assert_eq!(cache(&cache_job(&c)).unwrap().index.total_tokens, 600);
}

#[test]
fn a_run_resumed_with_other_settings_names_each_change() {
    let dir = TempDir::new("run-settings");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    train(&train_job(&c, &run)).unwrap();
    let before = contents(&run);
    let msg = err(train(&TrainJob { k: 4, lr: 1e-3, ..train_job(&c, &run) }));
    has(
        &msg,
        &[
            "checkpoint/state.json: the run there was started with other settings: --k 8 --lr 0.0001, now --k 4 --lr 0.001",
            "choose another --out",
        ],
    );
    let msg = err(train(&TrainJob { kind: Kind::L1, squared_recon: true, seed: 3, ..train_job(&c, &run) }));
    has(
        &msg,
        &[
            "--init-norm 1.0 --kind batchtopk --seed 0 no --squared-recon, now --init-norm 0.005 --kind l1 --seed 3 --squared-recon",
        ],
    );
    assert_eq!(contents(&run), before, "a refused resume changes nothing");
    // More steps with the same settings and data resume.
    assert_eq!(train(&TrainJob { steps: Some(9), ..train_job(&c, &run) }).unwrap().step, 9);
}

// ── 2. a resume on other data is refused ──

#[test]
fn a_resume_on_other_data_is_refused_naming_what_differs() {
    let dir = TempDir::new("other-data");
    let a = dir.path().join("a");
    cache(&cache_job(&a)).unwrap();
    let layer2 = dir.path().join("layer2");
    cache(&CacheJob { layer: 2, ..cache_job(&layer2) }).unwrap();
    let chats = dir.path().join("chats");
    cache(&CacheJob { data: vec![data("chat.jsonl")], ..cache_job(&chats) }).unwrap();
    let run = dir.path().join("run");
    train(&train_job(&a, &run)).unwrap();
    let before = contents(&run);
    let more = |cache: &Path| TrainJob { steps: Some(9), ..train_job(cache, &run) };

    let msg = err(train(&more(&layer2)));
    has(
        &msg,
        &["state.json: the run there trains on other data: ", "the cache's layer 1", "now ", "the cache's layer 2"],
    );
    assert!(msg.contains("the cache's shards") && msg.contains("choose another --out"), "{msg}");
    // Same layer, size and models; other documents.
    let msg = err(train(&more(&chats)));
    has(&msg, &["trains on other data: the cache's shards "]);
    assert!(!msg.contains("layer"), "{msg}");
    // The same cache drawn differently.
    let msg = err(train(&TrainJob { batch: 32, ..more(&a) }));
    has(&msg, &["trains on other data: --batch 64, now --batch 32"]);
    let msg = err(train(&TrainJob { shuffle_tokens: 512, ..more(&a) }));
    has(&msg, &["--shuffle-tokens 256, now --shuffle-tokens 512"]);
    let msg = err(train(&TrainJob { val_tokens: 100, ..more(&a) }));
    has(&msg, &["--val-tokens 0, now --val-tokens 100"]);
    // The cache grown (a partial cache finished since): other shards, more tokens.
    let grown = dir.path().join("grown");
    let n = cache(&CacheJob { tokens: 900, ..cache_job(&grown) }).unwrap().index.total_tokens;
    let msg = err(train(&more(&grown)));
    has(&msg, &["the cache's tokens 600", &format!("the cache's tokens {n}")]);
    assert_eq!(contents(&run), before, "a refused resume changes nothing");
    train(&more(&a)).unwrap();

    // On the fly: the data files and the tokenization are the source.
    let fly = dir.path().join("fly");
    let job = on_the_fly(vec![data("web.txt")], &fly);
    train(&job).unwrap();
    let msg = err(train(&TrainJob { data: vec![data("chat.jsonl")], steps: Some(9), ..job.clone() }));
    has(&msg, &["trains on other data: --data ", "web.txt, now --data ", "chat.jsonl"]);
    let msg = err(train(&TrainJob {
        tokenize: TokenizeOptions { context: 32, drop_bos: true, skip_first: Some(0) },
        layer: Some(2),
        steps: Some(9),
        ..job.clone()
    }));
    has(&msg, &["--context 64 no --drop-bos --layer 1, now --context 32 --drop-bos --layer 2"]);
    train(&TrainJob { steps: Some(9), ..job }).unwrap();
}

// ── 3. data that gives nothing is an error ──

#[test]
fn on_the_fly_training_on_empty_data_is_an_error_and_writes_nothing() {
    let dir = TempDir::new("empty-fly");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("new");
    let msg = err(train(&TrainJob { steps: Some(5), ..on_the_fly(vec![empty.clone()], &out) }));
    has(&msg, &["--data gave no training pairs (0 tokens)", "nothing was written"]);
    assert!(!out.exists(), "no folder left behind");
    // A folder the user made stays, empty.
    std::fs::create_dir_all(&out).unwrap();
    err(train(&TrainJob { steps: Some(5), ..on_the_fly(vec![empty], &out) }));
    assert!(contents(&out).is_empty() && std::fs::read_dir(&out).unwrap().next().is_none());
}

// ── 4. the train job's checks ──

#[test]
fn the_train_job_refuses_sizes_that_cannot_work() {
    let dir = TempDir::new("train-checks");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let out = dir.path().join("run");
    let refused = |job: TrainJob, parts: &[&str]| {
        let msg = err(train(&job));
        has(&msg, parts);
        assert!(!out.exists(), "{msg}: wrote {out:?}");
    };
    let job = || train_job(&c, &out);
    refused(
        TrainJob { batch: 1024, shuffle_tokens: 2048, ..job() },
        &["--batch 1024 is larger than the cache's training split (600 of its 600 tokens; --val-tokens 0)"],
    );
    refused(
        TrainJob { batch: 550, val_tokens: 100, shuffle_tokens: 1024, ..job() },
        &["--batch 550 is larger than the cache's training split (500 of its 600 tokens; --val-tokens 100)"],
    );
    refused(
        TrainJob { shuffle_tokens: 32, ..job() },
        &["--shuffle-tokens (32) must be at least --batch (64): the shuffle pool must hold a batch"],
    );
    refused(TrainJob { k_anneal_from: Some(16), ..job() }, &["--k-anneal-from needs --k-anneal-steps"]);
    refused(TrainJob { k_anneal_steps: 3, ..job() }, &["--k-anneal-steps needs --k-anneal-from"]);
    refused(
        TrainJob { k_anneal_from: Some(100), k_anneal_steps: 3, ..job() },
        &["--k-anneal-from 100 is larger than the dictionary (D = 64)"],
    );
    refused(
        TrainJob { threshold_start: Some(1000), steps: Some(50), ..job() },
        &["--threshold-start 1000 must be below the step budget (50) minus 1: BatchTopK's inference threshold \
             is estimated on the steps whose 0-based index exceeds it"],
    );
    // The authors' rule (0-based step > threshold_start): 49 leaves no step of 50 to update θ on.
    refused(TrainJob { threshold_start: Some(49), steps: Some(50), ..job() }, &["--threshold-start 49", "budget (50)"]);
    // One pass over the cache (600 / 64 → 10 steps) is the budget when no --steps is given.
    refused(TrainJob { threshold_start: Some(10), steps: None, ..job() }, &["--threshold-start 10", "budget (10)"]);
    // With --cache, the on-the-fly options are refused (the app and the demo fill the same config).
    for (job, flag) in [
        (TrainJob { layer: Some(1), ..job() }, "--layer"),
        (TrainJob { data: vec![data("web.txt")], ..job() }, "--data"),
        (TrainJob { mix: true, ..job() }, "--mix"),
        (TrainJob { tokenize: TokenizeOptions { context: 64, ..Default::default() }, ..job() }, "--context"),
        (TrainJob { tokenize: TokenizeOptions { drop_bos: true, ..Default::default() }, ..job() }, "--drop-bos"),
        (TrainJob { tokenize: TokenizeOptions { skip_first: Some(1), ..Default::default() }, ..job() }, "--skip-first"),
    ] {
        refused(job, &[&format!("{flag} is for training on the fly and cannot be used with --cache")]);
    }
    // L1 has no inference threshold to estimate: a short run is fine.
    train(&TrainJob { kind: Kind::L1, threshold_start: Some(1000), ..job() }).unwrap();
}

#[test]
fn clap_refuses_on_the_fly_flags_with_a_cache() {
    let cmd = || TrainJob::augment_args(clap::Command::new("train").no_binary_name(true));
    let parse = |extra: &[&str]| {
        let mut args = vec!["--cache", "c", "--out", "r"];
        args.extend(extra);
        cmd().try_get_matches_from(args)
    };
    assert!(parse(&[]).is_ok());
    for extra in [&["--layer", "1"][..], &["--data", "a.txt"], &["--mix"], &["--chat", "m"], &["--base", "m"]] {
        let e = parse(extra).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{extra:?}: {e}");
    }
    let help = cmd().render_long_help().to_string();
    assert!(help.contains("0: only at the end"), "--checkpoint-every documents 0: {help}");
}

#[test]
fn checkpoint_every_0_checkpoints_only_at_the_end() {
    let dir = TempDir::new("ckpt-0");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    let done = train(&TrainJob { checkpoint_every: 0, ..train_job(&c, &run) }).unwrap();
    assert_eq!((done.step, checkpoint_step(&run)), (6, 6));
}

#[test]
fn a_dictionary_that_does_not_fit_in_memory_is_refused_before_allocating() {
    let Some(total) = crossdiff::io::memory_total_bytes() else {
        eprintln!("skipping: this system does not report its memory");
        return;
    };
    let dir = TempDir::new("too-big");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let out = dir.path().join("run");
    let d = CacheIndex::open(&c).unwrap().d_model;
    // 16·d·D floats alone exceed the machine's memory.
    let expansion = (total / (64 * d as u64 * d as u64) + 1) as usize * 4;
    let msg = err(train(&TrainJob { dict_size: None, expansion: Some(expansion), ..train_job(&c, &out) }));
    let dict = expansion * d;
    has(&msg, &[&format!("--expansion {expansion} gives D = {dict}: training needs about "), "GiB", "memory"]);
    let msg = err(train(&TrainJob { dict_size: Some(dict), ..train_job(&c, &out) }));
    has(&msg, &[&format!("--dict-size {dict} gives D = {dict}")]);
    assert!(!out.exists());
}

// ── 5. output folders that belong to another job ──

#[test]
fn output_folders_of_another_kind_are_refused_and_left_alone() {
    let dir = TempDir::new("foreign-out");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    train(&train_job(&c, &run)).unwrap();
    let (cache_before, run_before) = (contents(&c), contents(&run));

    let msg = err(train(&train_job(&c, &c)));
    has(&msg, &["--out ", "holds an activation cache (cache.json), not a training run"]);
    let msg = err(cache(&cache_job(&run)));
    has(&msg, &["--out ", "holds a training run (checkpoint, config.json, crosscoder.safetensors"]);
    assert_eq!((contents(&c), contents(&run)), (cache_before, run_before));

    // Just a checkpoint (a run stopped before its first export) is a run too.
    let stopped = dir.path().join("stopped");
    std::fs::create_dir_all(stopped.join("checkpoint")).unwrap();
    has(&err(cache(&cache_job(&stopped))), &["holds a training run (checkpoint)"]);

    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), "mine").unwrap();
    let msg = err(cache(&cache_job(&notes)));
    has(&msg, &["--out ", "is not empty and holds no cache.json (notes.txt): choose a new or empty folder"]);
    assert_eq!(contents(&notes).len(), 1, "nothing written beside notes.txt");

    // An empty folder (and one with only hidden files) is fine.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join(".DS_Store"), "").unwrap();
    assert!(cache(&cache_job(&fresh)).unwrap().index.complete);
}

// ── 6. the data running out ──

#[test]
fn a_cache_says_when_the_data_ran_out() {
    let dir = TempDir::new("ran-out");
    let full = cache(&cache_job(&dir.path().join("full"))).unwrap();
    assert!(!full.exhausted && full.index.total_tokens == 600);
    let job = CacheJob { tokens: 1_000_000, ..cache_job(&dir.path().join("short")) };
    let short = cache(&job).unwrap();
    assert!(short.exhausted, "the data holds fewer than 1,000,000 tokens");
    assert!(short.index.complete && short.index.total_tokens >= 600 && short.index.total_tokens < job.tokens);
    // Resuming the finished cache says the same.
    assert!(cache(&job).unwrap().exhausted);
    // A cancelled cache did not run out: it stopped.
    let cancel = AtomicBool::new(true);
    let stopped = crossdiff::workflow::cache::run(
        &cache_job(&dir.path().join("stopped")),
        &Device::flex(),
        Handle::new(&|_: Event| {}, &cancel),
    )
    .unwrap();
    assert!(!stopped.exhausted && !stopped.index.complete);
}

// ── 7. a cancelled run's step is its checkpoint's ──

#[test]
fn a_cancelled_runs_step_is_the_checkpoints_step() {
    let dir = TempDir::new("cancel");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let job = |out: &Path| TrainJob { steps: Some(9), checkpoint_every: 4, log_every: 2, ..train_job(&c, out) };
    for stop_after in [1u64, 3, 5, 8] {
        let run = dir.path().join(format!("run{stop_after}"));
        let cancel = AtomicBool::new(false);
        let on_event = |e: Event| {
            if let Event::Progress { phase, done, .. } = e {
                if phase == "training" && done >= stop_after {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        };
        let stopped = job(&run).run(&Device::flex(), Handle::new(&on_event, &cancel)).unwrap();
        assert_eq!(stopped.step, checkpoint_step(&run), "stopped after step {stop_after}");
        assert!(stopped.step < 9, "{stop_after}: the cancel took effect");
        // Metrics are logged every 2 steps: the last logged step may be behind, never ahead.
        assert!(stopped.last.as_ref().is_none_or(|m| m.step <= stopped.step));
        let done = train(&job(&run)).unwrap();
        assert_eq!((done.step, checkpoint_step(&run)), (9, 9));
    }
    // Cancelled before the first step: step 0 on both sides.
    let run = dir.path().join("run0");
    let cancel = AtomicBool::new(true);
    let stopped = job(&run).run(&Device::flex(), Handle::new(&|_: Event| {}, &cancel)).unwrap();
    assert_eq!((stopped.step, checkpoint_step(&run)), (0, 0));
}

#[test]
fn an_on_the_fly_resume_accepts_the_same_files_spelled_otherwise() {
    let dir = TempDir::new("otf-spelling");
    let out = dir.path().join("run");
    let job = |data: PathBuf, steps: u64| TrainJob {
        cache: None,
        base: Some(fixture("base")),
        chat: Some(fixture("chat")),
        data: vec![data],
        layer: Some(1),
        tokenize: TokenizeOptions { context: 64, ..Default::default() },
        out: out.clone(),
        dict_size: Some(64),
        k: 8,
        batch: 64,
        shuffle_tokens: 256,
        steps: Some(steps),
        threshold_start: Some(1),
        checkpoint_every: 3,
        ..Default::default()
    };
    job(data("web.txt"), 3).run(&Device::flex(), Handle::silent()).unwrap();
    // Integration tests run in the package root: the same file, relative.
    let done = job(PathBuf::from("assets/data/web.txt"), 6).run(&Device::flex(), Handle::silent()).unwrap();
    assert_eq!(done.step, 6);
}

#[test]
fn continuing_a_run_takes_its_own_settings_and_resumes() {
    let dir = TempDir::new("continuing");
    let (c, run) = (dir.path().join("c"), dir.path().join("run"));
    cache(&cache_job(&c)).unwrap();
    let first = TrainJob { lr: 3e-4, seed: 7, ..train_job(&c, &run) };
    first.run(&Device::flex(), Handle::silent()).unwrap();
    let saved = crossdiff::crosscoder::train::saved_run(&run).unwrap().expect("a checkpoint");
    assert_eq!((saved.step, saved.config.lr, saved.config.seed, saved.batch()), (6, 3e-4, 7, Some(64)));
    // A job with the app's defaults (another lr, seed and batch) continued from the run's settings.
    let view = TrainJob { cache: Some(c.clone()), out: run.clone(), ..Default::default() };
    let done = view.continuing(&saved, 9).run(&Device::flex(), Handle::silent()).unwrap();
    assert_eq!(done.step, 9);
}
