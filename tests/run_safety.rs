//! Nothing silent (issue 11), the second sweep: `train --out` trains only into a new or empty
//! folder or a run (never over a model snapshot, an imported crosscoder or a run whose checkpoint
//! is gone); one job per run folder; data that runs out ends the run, said as such; cache.json's
//! shards are files inside the cache, listed once, each checked before the total; state.json's
//! fields are checked on resume; an unfinished cache is said to be unfinished; a checkpoint that
//! cannot be written stops training, and the metrics logged past the checkpoint are trimmed on the
//! next resume. Every refusal is one line naming the flag or the file and field, and changes nothing.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;
use common::{
    TempDir, cache_outcome as cache, contents, data, fixture, has, one_line_err as err, small_cache_job as cache_job,
    small_train_job as train_job,
};
use crossdiff::activations::cache::CacheIndex;
use crossdiff::data::TokenizeOptions;
use crossdiff::workflow::cache::CacheJob;
use crossdiff::workflow::train::{TrainJob, TrainOutcome};
use crossdiff::workflow::{Event, Handle};

fn train(job: &TrainJob) -> anyhow::Result<TrainOutcome> {
    job.run(&Device::flex(), Handle::silent())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn checkpoint_step(run: &Path) -> u64 {
    read_json(&run.join("checkpoint/state.json"))["step"].as_u64().unwrap()
}

/// The steps of metrics.jsonl, in file order.
fn metric_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

// ── 1. --out: new, empty, or a run ──

#[test]
fn train_out_that_is_not_a_run_is_refused_and_left_alone() {
    let dir = TempDir::new("out-kinds");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    // A refusal names --out and what is there, and leaves every byte as it was.
    let refused = |out: &Path, parts: &[&str]| {
        let before = contents(out);
        let msg = err(train(&train_job(&c, out)));
        assert!(msg.starts_with(&format!("--out {}", out.display())), "{msg}");
        has(&msg, parts);
        assert_eq!(contents(out), before, "{msg}: changed {out:?}");
    };

    // A model snapshot (its config.json was replaced by the run's before).
    let snap = TempDir::copy_of("out-snapshot", "base");
    refused(
        snap.path(),
        &["holds a model snapshot (config.json, model-00001-of-00004.safetensors", "choose another folder"],
    );

    // A finished run whose checkpoint/state.json was deleted (it restarted at step 0 before).
    let run = dir.path().join("run");
    train(&train_job(&c, &run)).unwrap();
    std::fs::remove_file(run.join("checkpoint/state.json")).unwrap();
    refused(
        &run,
        &["holds a crosscoder without a checkpoint (imported, or its checkpoint was deleted): choose another folder"],
    );
    // The whole checkpoint folder gone: the same.
    std::fs::remove_dir_all(run.join("checkpoint")).unwrap();
    refused(&run, &["holds a crosscoder without a checkpoint"]);

    // Only an imported crosscoder.
    let imported = dir.path().join("imported");
    std::fs::create_dir_all(&imported).unwrap();
    std::fs::copy(run.join("crosscoder.safetensors"), imported.join("crosscoder.safetensors")).unwrap();
    refused(&imported, &["holds a crosscoder without a checkpoint"]);

    // Checkpoint weights nothing points at (state.json deleted before the first export).
    let orphan = dir.path().join("orphan");
    train(&TrainJob { checkpoint_every: 3, ..train_job(&c, &orphan) }).unwrap();
    std::fs::remove_file(orphan.join("checkpoint/state.json")).unwrap();
    std::fs::remove_file(orphan.join("crosscoder.safetensors")).unwrap();
    std::fs::remove_file(orphan.join("config.json")).unwrap();
    refused(
        &orphan,
        &[
            "holds a run whose checkpoint/state.json is missing (checkpoint/state-000000006.safetensors",
            "cannot be resumed",
        ],
    );

    // A `checkpoint` that is a file, not a folder.
    let odd = dir.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("checkpoint"), "not a folder").unwrap();
    refused(&odd, &["its `checkpoint` is a file, not the run's checkpoint folder"]);

    // Anything else.
    let notes = dir.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), "mine").unwrap();
    refused(&notes, &["is not empty and holds no training run (notes.txt): choose a new or empty folder"]);

    // --out a file.
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "mine").unwrap();
    let msg = err(train(&train_job(&c, &file)));
    has(&msg, &[&format!("--out {} is a file, not a folder", file.display())]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    // Accepted: an empty folder (hidden files aside), a run stopped before its first checkpoint
    // (metrics.jsonl, an empty checkpoint folder), and a run to resume.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join(".DS_Store"), "").unwrap();
    assert_eq!(train(&train_job(&c, &fresh)).unwrap().step, 6);
    assert!(fresh.join(".DS_Store").exists());
    let unstarted = dir.path().join("unstarted");
    std::fs::create_dir_all(unstarted.join("checkpoint")).unwrap();
    std::fs::write(unstarted.join("metrics.jsonl"), "").unwrap();
    assert_eq!(train(&train_job(&c, &unstarted)).unwrap().step, 6);
    assert_eq!(train(&TrainJob { steps: Some(9), ..train_job(&c, &fresh) }).unwrap().step, 9);
}

// ── 2. one job per run folder ──

#[test]
fn a_run_folder_held_by_another_job_is_refused() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let dir = TempDir::new("out-lock");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    train(&train_job(&c, &run)).unwrap();
    assert!(!run.join(".crossdiff.lock").exists(), "the lock goes with the job");
    // Another live job (pid 1 always runs) holds the run: refused, nothing written.
    std::fs::write(run.join(".crossdiff.lock"), "1").unwrap();
    let before = contents(&run);
    let msg = err(train(&TrainJob { steps: Some(9), ..train_job(&c, &run) }));
    has(&msg, &[&format!("--out {} is in use by another crossdiff job (process 1)", run.display())]);
    assert_eq!(contents(&run), before);
    // A new folder that another job has just taken: the same.
    let taken = dir.path().join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join(".crossdiff.lock"), "1").unwrap();
    has(&err(train(&train_job(&c, &taken))), &["is in use by another crossdiff job"]);
    assert_eq!(contents(&taken).len(), 1, "only the other job's lock");
    // A killed job's lock is taken over.
    std::fs::write(run.join(".crossdiff.lock"), "4294967").unwrap();
    assert_eq!(train(&TrainJob { steps: Some(9), ..train_job(&c, &run) }).unwrap().step, 9);
    assert!(!run.join(".crossdiff.lock").exists());
    // A refused run in a new folder leaves no folder (the lock is released before the cleanup).
    let gone = dir.path().join("gone");
    err(train(&TrainJob { k: 100, ..train_job(&c, &gone) }));
    assert!(!gone.exists());
}

// ── 3. data that runs out ends the run ──

#[test]
fn on_the_fly_data_that_runs_out_ends_the_run_and_says_so() {
    let dir = TempDir::new("fly-ends");
    // A few paragraphs: a few batches of 64 pairs.
    let text = std::fs::read_to_string(data("web.txt")).unwrap();
    let short: Vec<&str> = text.split("\n\n").take(8).collect();
    let file = dir.path().join("short.txt");
    std::fs::write(&file, short.join("\n\n")).unwrap();
    let run = dir.path().join("run");
    let job = TrainJob {
        cache: None,
        base: Some(fixture("base")),
        chat: Some(fixture("chat")),
        data: vec![file],
        layer: Some(1),
        tokenize: TokenizeOptions { context: 64, drop_bos: false, skip_first: Some(0) },
        steps: Some(200),
        threshold_start: Some(1),
        ..train_job(Path::new(""), &run)
    };
    let done = train(&job).unwrap();
    assert!(done.data_ended, "the data ran out");
    assert!(done.step >= 2 && done.step < 200, "step {}", done.step);
    assert_eq!((done.total_steps, checkpoint_step(&run)), (200, done.step));
    // The last batch held what was left: trained at its own size, and said so.
    let tokens = done.last.as_ref().unwrap().tokens;
    let last = tokens - (done.step - 1) * 64;
    assert!(last > 0 && last <= 64);
    assert_eq!(done.short_last_batch, (last < 64).then_some(last as usize));
    assert_eq!(read_json(&run.join("checkpoint/state.json"))["data_ended"], true);
    // Running the same command again trains nothing more, says the same, and changes nothing.
    let before = contents(&run);
    let again = train(&job).unwrap();
    assert!(again.data_ended && again.step == done.step && again.short_last_batch.is_none());
    assert_eq!(contents(&run), before);
    // A larger budget does not make more data.
    let more = train(&TrainJob { steps: Some(400), ..job.clone() }).unwrap();
    assert!(more.data_ended && more.step == done.step);

    // A cancel is not the data running out.
    let stopped = dir.path().join("stopped");
    let cancel = AtomicBool::new(false);
    let on_event = |e: Event| {
        if let Event::Progress { phase, done, .. } = e {
            if phase == "training" && done >= 1 {
                cancel.store(true, Ordering::SeqCst);
            }
        }
    };
    let out = TrainJob { out: stopped.clone(), ..job }.run(&Device::flex(), Handle::new(&on_event, &cancel)).unwrap();
    assert!(!out.data_ended && out.step < done.step);
    assert!(read_json(&stopped.join("checkpoint/state.json")).get("data_ended").is_none());
}

#[test]
fn a_cache_pass_ends_with_a_smaller_batch_and_says_so() {
    let dir = TempDir::new("cache-pass");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    // One pass over 600 tokens in batches of 64: 9 full batches and one of 24; the cache reader
    // goes on into the next pass, so the data does not run out.
    let done =
        train(&TrainJob { steps: None, threshold_start: Some(3), ..train_job(&c, &dir.path().join("r")) }).unwrap();
    assert_eq!((done.step, done.total_steps, done.short_last_batch, done.data_ended), (10, 10, Some(24), false));
    assert_eq!(done.last.unwrap().tokens, 600);
    let full = train(&train_job(&c, &dir.path().join("full"))).unwrap();
    assert_eq!((full.short_last_batch, full.data_ended), (None, false));
}

// ── 4. cache.json's shards ──

#[test]
fn cache_json_shards_are_files_inside_the_cache_listed_once_and_named_when_wrong() {
    let dir = TempDir::new("cache-shards");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let json = c.join("cache.json");
    let original = read_json(&json);
    assert_eq!(original["shards"].as_array().unwrap().len(), 3);
    let second = original["shards"][1]["tokens"].as_u64().unwrap();
    let out = dir.path().join("run");
    let refused = |edit: &dyn Fn(&mut serde_json::Value), parts: &[&str]| {
        let mut v = original.clone();
        edit(&mut v);
        write_json(&json, &v);
        let msg = err(CacheIndex::open(&c));
        has(&msg, parts);
        let via_train = err(train(&train_job(&c, &out)));
        assert_eq!(via_train, msg, "train says the same");
        assert!(!out.exists(), "nothing written");
    };
    refused(
        &|v| v["shards"][2] = v["shards"][0].clone(),
        &[
            "cache.json: shard acts-00000.safetensors is listed twice (`shards[0]` and `shards[2]`)",
            "each shard is listed once",
        ],
    );
    refused(
        &|v| v["shards"][1]["file"] = "/etc/hostname".into(),
        &["cache.json: field `shards[1].file` is \"/etc/hostname\": ", "not an absolute path"],
    );
    refused(
        &|v| v["shards"][0]["file"] = "../c/acts-00000.safetensors".into(),
        &["cache.json: field `shards[0].file` is \"../c/acts-00000.safetensors\": ", "without `..`"],
    );
    refused(&|v| v["shards"][0]["file"] = "".into(), &["field `shards[0].file` is \"\": a shard must name a file"]);
    refused(&|v| v["shards"][0]["file"] = "./".into(), &["field `shards[0].file` is \"./\": a shard must name a file"]);
    // The same file spelt another way is still listed twice.
    refused(
        &|v| v["shards"][2]["file"] = "./acts-00001.safetensors".into(),
        &["shard ./acts-00001.safetensors is listed twice (`shards[1]` and `shards[2]`)"],
    );
    refused(
        &|v| v["partial_shards"] = serde_json::json!([{"file": "../x.safetensors", "tokens": 3}]),
        &["field `partial_shards[0].file` is \"../x.safetensors\""],
    );
    // A shard's `tokens` that disagrees with its file names the shard, not `total_tokens`.
    refused(
        &|v| v["shards"][1]["tokens"] = 200.into(),
        &[
            &format!("acts-00001.safetensors: tensor `acts` has shape [{second}, 2, "),
            "lists this shard with 200 tokens",
        ],
    );
    let mut v = original.clone();
    v["shards"][1]["tokens"] = 200.into();
    write_json(&json, &v);
    assert!(!err(CacheIndex::open(&c)).contains("total_tokens"));
    // `total_tokens` alone wrong is named as such.
    refused(&|v| v["total_tokens"] = 700.into(), &["field `total_tokens` is 700 but the shards hold 600"]);
    write_json(&json, &original);
    train(&train_job(&c, &out)).unwrap();
}

// ── 5. state.json on resume ──

#[test]
fn checkpoint_state_json_fields_are_checked_on_resume() {
    let dir = TempDir::new("state-json");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    train(&train_job(&c, &run)).unwrap();
    let state = run.join("checkpoint/state.json");
    let original = read_json(&state);
    assert_eq!(original["weights"], "state-000000006.safetensors");
    let more = || TrainJob { steps: Some(9), ..train_job(&c, &run) };
    let refused = |edit: &dyn Fn(&mut serde_json::Value), job: TrainJob, parts: &[&str]| {
        let mut v = original.clone();
        edit(&mut v);
        write_json(&state, &v);
        let before = contents(&run);
        let msg = err(train(&job));
        assert!(msg.starts_with(&format!("{}: ", state.display())), "names state.json: {msg}");
        has(&msg, parts);
        assert_eq!(contents(&run), before, "{msg}: changed the run");
    };
    for (bad, why) in [
        ("", "must be the name of a file in the checkpoint folder"),
        (".", "must be the name of a file in the checkpoint folder"),
        ("../crosscoder.safetensors", "(a plain file name, not a path)"),
        ("/etc/hostname", "(a plain file name, not a path)"),
        ("sub/state-000000006.safetensors", "(a plain file name, not a path)"),
        ("crosscoder.safetensors", "not a checkpoint weights file name (state-<step>.safetensors)"),
    ] {
        refused(&|v| v["weights"] = bad.into(), more(), &[&format!("field `weights` is {bad:?}"), why]);
    }
    refused(
        &|v| v["step"] = 5.into(),
        more(),
        &["field `step` is 5, but `weights` is state-000000006.safetensors, the checkpoint of step 6"],
    );
    refused(
        &|_| {},
        TrainJob { steps: Some(4), ..train_job(&c, &run) },
        &["field `step` is 6, past this job's step budget (4): give --steps 6 or more"],
    );
    refused(
        &|v| v["d"] = 3.into(),
        more(),
        &["field `d` is 3, but the weights in state-000000006.safetensors have d = "],
    );
    refused(&|v| v["threshold"] = (-0.5).into(), more(), &["field `threshold` is -0.5, not a finite number ≥ 0"]);
    refused(&|v| v["threshold"] = 1e300.into(), more(), &["field `threshold` is"]);
    // Restored, it resumes.
    write_json(&state, &original);
    assert_eq!(train(&more()).unwrap().step, 9);

    // A `checkpoint` that became a file: the engine says so too (the job refuses it at --out).
    let ckpt = run.join("checkpoint");
    std::fs::remove_dir_all(&ckpt).unwrap();
    std::fs::write(&ckpt, "").unwrap();
    has(&err(train(&more())), &["its `checkpoint` is a file, not the run's checkpoint folder"]);
    let err_engine = crossdiff::crosscoder::train::check_checkpoint_dir(&ckpt).unwrap_err().to_string();
    has(&err_engine, &[&format!("{}: is a file, not a folder", ckpt.display())]);
}

// ── 6. an unfinished cache is said to be unfinished ──

#[test]
fn a_low_memory_cache_stopped_before_a_shard_finished_is_called_unfinished() {
    let dir = TempDir::new("low-memory-stopped");
    let c = dir.path().join("c");
    // Stopped in the base pass, once a base-only shard is written: no finished tokens yet.
    let cancel = AtomicBool::new(false);
    let on_event = |e: Event| {
        if let Event::Progress { done, .. } = e {
            if done > 0 {
                cancel.store(true, Ordering::SeqCst);
            }
        }
    };
    let job = CacheJob { low_memory: true, ..cache_job(&c) };
    let stopped = crossdiff::workflow::cache::run(&job, &Device::flex(), Handle::new(&on_event, &cancel)).unwrap();
    assert!(!stopped.index.complete && stopped.index.total_tokens == 0 && !stopped.index.partial_shards.is_empty());
    let base_only: u64 = stopped.index.partial_shards.iter().map(|s| s.tokens).sum();
    let out = dir.path().join("run");
    let msg = err(train(&train_job(&c, &out)));
    has(
        &msg,
        &[
            &format!("{}: the cache is incomplete (0 tokens finished so far, {base_only} more with only", c.display()),
            "re-run that command to finish it, or pass --allow-partial",
        ],
    );
    assert!(!msg.contains("holds no tokens") && !msg.contains("0 tokens:"), "{msg}");
    let msg = err(train(&TrainJob { allow_partial: true, ..train_job(&c, &out) }));
    has(&msg, &["the cache is incomplete and holds no finished tokens yet", "re-run that command to finish it"]);
    assert!(!out.exists(), "nothing written");
    // The reader says the same.
    let reader = crossdiff::activations::reader::CacheReader::open(&c, Default::default());
    has(&err(reader), &["the cache is incomplete and holds no finished tokens yet"]);
}

// ── 7. a checkpoint that cannot be written ──

#[test]
fn a_checkpoint_that_cannot_be_written_stops_training_and_the_metrics_are_trimmed_on_resume() {
    let dir = TempDir::new("ckpt-unwritable");
    let c = dir.path().join("c");
    cache(&cache_job(&c)).unwrap();
    let run = dir.path().join("run");
    let job = TrainJob { steps: Some(30), checkpoint_every: 10, threshold_start: Some(5), ..train_job(&c, &run) };
    // After the checkpoint at step 10 the next one cannot be written: a folder (even root cannot
    // rename a file over one; not empty, so no cleanup removes it) stands where the step-20
    // weights go.
    let blocker = run.join("checkpoint/state-000000020.safetensors");
    let on_event = |e: Event| {
        if let Event::Progress { phase, done, .. } = e {
            if phase == "training" && done == 11 {
                std::fs::create_dir_all(&blocker).unwrap();
                std::fs::write(blocker.join("in-the-way"), "").unwrap();
            }
        }
    };
    let never = AtomicBool::new(false);
    let msg = err(job.run(&Device::flex(), Handle::new(&on_event, &never)));
    has(&msg, &[&blocker.display().to_string(), "cannot rename into place"]);
    // Training stopped there: the checkpoint stays at 10, the metrics went on to 20, and no
    // crosscoder was exported past the checkpoint.
    assert_eq!(checkpoint_step(&run), 10);
    assert_eq!(metric_steps(&run), (1..=20).collect::<Vec<_>>());
    assert!(!run.join("crosscoder.safetensors").exists());
    // Still blocked: the same error, and the metrics are trimmed back before training again.
    let msg2 = err(train(&job));
    assert_eq!(msg2, msg);
    assert_eq!(metric_steps(&run), (1..=20).collect::<Vec<_>>());
    // The next resume (here: stopped at once) trims the metrics back to the checkpoint.
    std::fs::remove_dir_all(&blocker).unwrap();
    let stop = AtomicBool::new(true);
    let stopped = job.run(&Device::flex(), Handle::new(&|_: Event| {}, &stop)).unwrap();
    assert_eq!((stopped.step, checkpoint_step(&run)), (10, 10));
    assert_eq!(metric_steps(&run), (1..=10).collect::<Vec<_>>());
    // Resumed to the end: each step logged once, as in a run never interrupted.
    let done = train(&job).unwrap();
    assert_eq!((done.step, checkpoint_step(&run)), (30, 30));
    assert_eq!(metric_steps(&run), (1..=30).collect::<Vec<_>>());
    let whole = dir.path().join("whole");
    train(&TrainJob { out: whole.clone(), ..job }).unwrap();
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap(),
        "the resumed run's curve is the uninterrupted one"
    );
}
