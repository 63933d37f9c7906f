//! The `crossdiff` binary end to end on the committed fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-gemma2").join(name)
}

fn crossdiff(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args).output().unwrap()
}

#[test]
fn inspect_writes_reference_blocks() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-inspect-{}.safetensors", std::process::id()));
    let base = fixture("base");
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "inspect",
        "--model",
        base.to_str().unwrap(),
        "--prompt",
        "The cat sat on the river bank at night.",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(stdout.starts_with("inspect: 16 tokens, 4 blocks"), "{stdout}");
    // block.3 of the written file equals transformers' output of the last block.
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let got: Vec<f32> = st
        .tensor("block.3")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let rbytes = std::fs::read(fixture("reference/base.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&rbytes).unwrap();
    let want: Vec<f32> = reference
        .tensor("p0.block.3")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * scale, "block.3 error {err} vs scale {scale}");
}

#[test]
fn generate_streams_the_greedy_continuation() {
    // transformers' greedy continuation of the first reference prompt, decoded.
    let rbytes = std::fs::read(fixture("reference/base.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&rbytes).unwrap();
    let greedy: Vec<u32> = reference
        .tensor("p0.greedy")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let tok = crossdiff::ChatTokenizer::from_dir(&fixture("base")).unwrap();
    let want = tok.decode(&greedy).unwrap();
    let base = fixture("base");
    let n = greedy.len().to_string();
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--prompt",
        "The cat sat on the river bank at night.",
        "--max-tokens",
        &n,
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), format!("{want}\n"));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains(&format!("generate: 16 prompt + {n} new tokens")), "{stderr}");
}

#[test]
fn bad_input_is_one_line_and_nonzero() {
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "inspect",
        "--model",
        "/no/such/model",
        "--prompt",
        "x",
        "--out",
        "/tmp/x.safetensors",
    ]);
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: /no/such/model: not a model snapshot directory"), "{stderr}");

    let r = crossdiff(&["--backend", "tpu", "inspect", "--model", "x", "--prompt", "x", "--out", "y"]);
    assert_ne!(r.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown backend \"tpu\""));

    // A misspelt flag keeps clap's suggestion, in the one line.
    let r = crossdiff(&["train", "--cache", "c", "--out", "o", "--dict-sise", "3"]);
    assert_eq!(r.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unexpected argument '--dict-sise'") && stderr.contains("'--dict-size'"), "{stderr}");
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn cache_killed_mid_run_resumes_to_identical_bytes() {
    let tmp = std::env::temp_dir().join(format!("crossdiff-cli-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    // Enough documents for many shards.
    let words = ["the", "cat", "model", "river", "night", "sparse", "latent", "chat", "base", "moon"];
    let text: String = (0..1500)
        .map(|i| (0..8 + i % 13).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" ") + ".\n\n")
        .collect();
    let data = tmp.join("web.txt");
    std::fs::write(&data, text).unwrap();
    let (base, chat) = (fixture("base"), fixture("chat"));
    let args = |out: &Path| -> Vec<String> {
        [
            "--backend",
            "cpu",
            "cache",
            "--base",
            base.to_str().unwrap(),
            "--chat",
            chat.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--layer",
            "2",
            "--tokens",
            "20000",
            "--context",
            "64",
            "--shard-tokens",
            "256",
            "--dtype",
            "f16",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = tmp.join("whole");
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args(&whole)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("cache: 20000 tokens"));

    // SIGKILL once two shards are on disk, while the run is still going.
    let killed = tmp.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let index = killed.join("cache.json");
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        if let Ok(text) = std::fs::read_to_string(&index) {
            if text.matches("acts-0").count() >= 2 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    assert_eq!(partial["complete"], false);

    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args(&killed)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(files(&whole), files(&killed));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn train_on_a_cache_writes_the_run_directory() {
    let tmp = std::env::temp_dir().join(format!("crossdiff-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data").join(f);
    let (cache, run) = (tmp.join("cache"), tmp.join("run"));
    let (base, chat) = (fixture("base").display().to_string(), fixture("chat").display().to_string());
    let (web, conversations) = (data("web.txt").display().to_string(), data("chat.jsonl").display().to_string());
    let cache_args = [
        "--backend",
        "cpu",
        "cache",
        "--base",
        base.as_str(),
        "--chat",
        chat.as_str(),
        "--data",
        web.as_str(),
        conversations.as_str(),
        "--mix",
        "--layer",
        "2",
        "--tokens",
        "1500",
        "--context",
        "64",
        "--shard-tokens",
        "512",
        "--out",
        cache.to_str().unwrap(),
    ];
    let r = crossdiff(&cache_args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The same command again: nothing to compute, and the line says so (not "0.0 tokens/s").
    let again = crossdiff(&cache_args);
    let line = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && line.contains("(already complete, nothing to do;"), "{line}");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let train = |steps: &str| {
        crossdiff(&[
            "--backend",
            "cpu",
            "train",
            "--cache",
            cache.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--dict-size",
            "64",
            "--k",
            "4",
            "--batch",
            "64",
            "--steps",
            steps,
            "--warmup-steps",
            "5",
            "--threshold-start",
            "10",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "10",
            "--val-tokens",
            "128",
            "--val-every",
            "10",
        ])
    };
    let r = train("40");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = String::from_utf8_lossy(&r.stdout);
    // 1372 training tokens (1500 minus the 128 held out): epochs end with a partial batch.
    assert!(out.starts_with("train: BatchTopK D=64 step 40 (2524 tokens)"), "{out}");

    let bytes = std::fs::read(run.join("crosscoder.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("encoder.weight").unwrap().shape(), &[2, 72, 64]);
    assert_eq!(st.tensor("decoder.weight").unwrap().shape(), &[2, 64, 72]);
    assert_eq!(st.tensor("decoder.bias").unwrap().shape(), &[2, 72]);
    let theta = f32::from_le_bytes(st.tensor("threshold").unwrap().data().try_into().unwrap());
    assert!(theta > 0.0, "threshold learned after step 10: {theta}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["kind"].as_str(), config["D"].as_u64(), config["layer"].as_u64()),
        (Some("batchtopk"), Some(64), Some(2))
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "logged every 10 steps");
    for key in
        ["step", "tokens", "loss", "recon", "aux", "l0", "fve_base", "fve_chat", "dead_frac", "lr", "val_fve_base"]
    {
        assert!(lines[3].get(key).is_some(), "metrics line lacks {key}");
    }
    assert!((lines[3]["l0"].as_f64().unwrap() - 4.0).abs() < 1e-9, "BatchTopK keeps k per token on average");
    assert!(lines[3]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap(), "loss falls");

    // More steps on the same run: resumes from step 40 instead of starting over.
    let r = train("60");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let n = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(n, 6);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn train_killed_mid_run_resumes_to_the_same_curve_and_weights() {
    let tmp = std::env::temp_dir().join(format!("crossdiff-cli-trainkill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data").join(f);
    let cache = tmp.join("cache");
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "cache",
        "--base",
        fixture("base").to_str().unwrap(),
        "--chat",
        fixture("chat").to_str().unwrap(),
        "--data",
        data("web.txt").to_str().unwrap(),
        data("chat.jsonl").to_str().unwrap(),
        "--mix",
        "--layer",
        "1",
        "--tokens",
        "2000",
        "--context",
        "64",
        "--shard-tokens",
        "512",
        "--dtype",
        "f32",
        "--out",
        cache.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let args = |out: &Path| -> Vec<String> {
        [
            "--backend",
            "cpu",
            "train",
            "--cache",
            cache.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--dict-size",
            "256",
            "--k",
            "8",
            "--batch",
            "32",
            "--steps",
            "3000",
            "--warmup-steps",
            "50",
            "--threshold-start",
            "100",
            "--lr",
            "1e-3",
            "--checkpoint-every",
            "100",
            "--dead-tokens",
            "3200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = tmp.join("whole");
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args(&whole)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // SIGKILL after a checkpoint past step 200, mid-run: no clean shutdown, metrics beyond the
    // checkpoint are on disk and must be replaced by the resumed run's.
    let killed = tmp.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = killed.join("checkpoint/state.json");
    loop {
        assert!(child.try_wait().unwrap().is_none(), "training finished before it could be killed");
        if let Ok(text) = std::fs::read_to_string(&state) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["step"].as_u64().unwrap_or(0) >= 200 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args(&killed)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let read = |p: &Path, f: &str| std::fs::read(p.join(f)).unwrap();
    assert_eq!(read(&whole, "metrics.jsonl"), read(&killed, "metrics.jsonl"));
    assert_eq!(read(&whole, "crosscoder.safetensors"), read(&killed, "crosscoder.safetensors"));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn train_on_the_fly_without_a_cache() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-otf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let data = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data").join(f);
    let (base, chat, web, chats) = (fixture("base"), fixture("chat"), data("web.txt"), data("chat.jsonl"));
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "train",
        "--base",
        base.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
        "--data",
        web.to_str().unwrap(),
        chats.to_str().unwrap(),
        "--mix",
        "--layer",
        "2",
        "--context",
        "48",
        "--dict-size",
        "64",
        "--k",
        "4",
        "--batch",
        "32",
        "--steps",
        "30",
        "--shuffle-tokens",
        "256",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("train: BatchTopK D=64 step 30 (960 tokens)"));
    let bytes = std::fs::read(out.join("crosscoder.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("encoder.weight").unwrap().shape(), &[2, 72, 64]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["layer"].as_u64(), Some(2));
    // Without a cache there is no held-out slice: asking for one is a clear error.
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "train",
        "--base",
        base.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
        "--data",
        web.to_str().unwrap(),
        "--layer",
        "2",
        "--steps",
        "5",
        "--val-tokens",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--val-tokens needs a cache"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn demo_rebuild_writes_a_loadable_model_pair() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let r = crossdiff(&["--backend", "cpu", "demo", "--rebuild", "--models", out.to_str().unwrap(), "--steps", "5"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("demo: base loss "));
    let device = crossdiff::Backend::Cpu.device().unwrap();
    let base = crossdiff::Model::load(out.join("base"), &device, crossdiff::LoadOptions::default()).unwrap();
    let chat = crossdiff::Model::load(out.join("chat"), &device, crossdiff::LoadOptions::default()).unwrap();
    crossdiff::model::check_models(&base, &chat).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn demo_pipeline_builds_a_project_from_the_committed_models() {
    let project = std::env::temp_dir().join(format!("crossdiff-cli-demo-project-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&project);
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo");
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "demo",
        "--models",
        models.to_str().unwrap(),
        "--project",
        project.to_str().unwrap(),
        "--no-app",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let p = crossdiff::workflow::project::Project::open(&project).unwrap();
    assert_eq!(p.run_dirs(), vec![project.join("runs/batchtopk"), project.join("runs/l1")]);
    for run in p.run_dirs() {
        for f in ["crosscoder.safetensors", "latents.csv", "summary.json", "kl.json", "examples.safetensors"] {
            assert!(run.join(f).exists(), "{} lacks {f}", run.display());
        }
        // Patching every latent into the base residual closes most of the base→chat KL gap.
        let kl: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(run.join("kl.json")).unwrap()).unwrap();
        let mean = |c: &str| kl.iter().find(|k| k["condition"] == c).unwrap()["mean_all"].as_f64().unwrap();
        assert!(mean("none") > 1.0, "the demo chat model differs from its base: {}", mean("none"));
        assert!(mean("all") < 0.5 * mean("none"), "{}: all {} vs none {}", run.display(), mean("all"), mean("none"));
    }
    std::fs::remove_dir_all(&project).unwrap();
}

/// `--backend auto` (the default) never takes a CPU posing as a GPU: here (no GPU; Mesa's lavapipe
/// is the only wgpu adapter in CI) it runs on the CPU path and the summary says so;
/// `CROSSDIFF_BACKEND` overrides it.
#[test]
fn the_default_backend_is_auto_and_names_its_device() {
    if crossdiff::backend::gpu_adapter().is_some() {
        eprintln!("skipping: this machine has a real GPU, so auto picks wgpu");
        return;
    }
    let out = std::env::temp_dir().join(format!("crossdiff-cli-auto-{}.safetensors", std::process::id()));
    let base = fixture("base");
    let args = ["inspect", "--model", base.to_str().unwrap(), "--prompt", "hi", "--out", out.to_str().unwrap()];
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args).env_remove("CROSSDIFF_BACKEND").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(stdout.trim_end().ends_with(", cpu (burn flex))"), "{stdout}");
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args).env("CROSSDIFF_BACKEND", "tpu").output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("CROSSDIFF_BACKEND"), "{}", String::from_utf8_lossy(&r.stderr));
    let _ = std::fs::remove_file(&out);
}

/// The workflow configs' checks, through the binary: each bad value exits 1 with one line naming
/// the flag, before anything is written.
#[test]
fn workflow_configs_refuse_bad_values_in_one_line() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-badvalues-{}", std::process::id()));
    let o = out.to_str().unwrap();
    let demo = |p: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo").join(p).display().to_string();
    let (base, chat, web) = (demo("base"), demo("chat"), demo("data/web.txt"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--cache", "/no/cache", "--out", o, "--dict-size", "0"], "--dict-size must be positive"),
        (vec!["train", "--cache", "/no/cache", "--out", o, "--k", "0"], "--k must be at least 1"),
        (vec!["train", "--cache", "/no/cache", "--out", o, "--lr", "NaN"], "--lr must be a positive finite number"),
        (vec!["train", "--cache", "/no/cache", "--out", o, "--mu=-1"], "--mu must be a finite number"),
        (
            vec![
                "train", "--base", &base, "--chat", &chat, "--data", &web, "--layer", "99", "--out", o, "--steps", "2",
            ],
            "--layer 99 is out of range: the models have 4 blocks",
        ),
        (vec!["analyze", "--run", o, "--cache", "/no/cache", "--tokens", "0"], "--tokens must be positive"),
        (
            vec!["steer", "--run", o, "--model", &chat, "--latent", "0", "--strength", "NaN", "--prompt", "hi"],
            "--strength for latent 0 must be a finite number",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["--backend", "cpu"];
        all.extend(&args);
        let r = crossdiff(&all);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} created {o}");
    }
}

/// No subcommand opens the desktop app with the global flags applied (not clap's "a subcommand is
/// required"); without a display, or when no window opens, the error is one plain line.
#[test]
fn no_subcommand_opens_the_app_and_without_a_display_says_so_in_one_line() {
    if !cfg!(all(unix, not(target_os = "macos"))) {
        eprintln!("skipping: the display variables are an X11/Wayland matter");
        return;
    }
    for (display, want) in [
        (None, "error: the desktop app needs a display (none found: DISPLAY and WAYLAND_DISPLAY are unset)"),
        // An X display nothing serves: the window system's own error, cleaned.
        (Some(":9473"), "error: the desktop app could not open a window ("),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crossdiff"));
        cmd.args(["--backend", "cpu"]).env_remove("WAYLAND_DISPLAY").env_remove("WAYLAND_SOCKET");
        match display {
            Some(d) => cmd.env("DISPLAY", d),
            None => cmd.env_remove("DISPLAY"),
        };
        let r = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{display:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{display:?}: {stderr}");
        assert!(stderr.starts_with(want), "{display:?}: {stderr}");
        assert!(stderr.contains("the CLI commands work without one, see `crossdiff --help`"), "{stderr}");
        for noise in ["winit", ".rs:", "subcommand", "Usage"] {
            assert!(!stderr.contains(noise), "{display:?}: {noise:?} in {stderr}");
        }
    }
}

/// Ctrl-C (SIGINT) stops training at a checkpoint; the summary names the step that checkpoint is
/// at (not the last logged step), and re-running resumes from it.
#[cfg(unix)]
#[test]
fn train_stopped_by_ctrl_c_names_the_checkpoint_step() {
    let tmp = std::env::temp_dir().join(format!("crossdiff-cli-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data").join(f);
    let (cache, run) = (tmp.join("cache"), tmp.join("run"));
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "cache",
        "--base",
        fixture("base").to_str().unwrap(),
        "--chat",
        fixture("chat").to_str().unwrap(),
        "--data",
        data("web.txt").to_str().unwrap(),
        "--layer",
        "1",
        "--tokens",
        "600",
        "--context",
        "64",
        "--shard-tokens",
        "256",
        "--out",
        cache.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    #[rustfmt::skip]
    let args = ["--backend", "cpu", "train", "--cache", cache.to_str().unwrap(), "--out", run.to_str().unwrap(),
        "--dict-size", "64", "--k", "4", "--batch", "16", "--steps", "10000000", "--checkpoint-every", "25"];
    let child = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let state = run.join("checkpoint/state.json");
    let step_on_disk = || -> u64 {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while step_on_disk() < 50 {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint at step 50 within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Ctrl-C, as the terminal sends it.
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let r = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert_eq!(r.status.code(), Some(130), "an interrupted job exits 130: {stderr}");
    let step = step_on_disk();
    assert!(step >= 50, "{stdout}");
    let want = format!(
        "train: stopped at step {step} of 10000000 (checkpoint saved; re-run the same command to resume); last logged step "
    );
    assert!(stdout.starts_with(&want), "want {want:?}, got {stdout:?}");
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_cache_whose_data_runs_out_says_so() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-ranout-{}", std::process::id()));
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data/web.txt");
    let (base, chat) = (fixture("base"), fixture("chat"));
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "cache",
        "--base",
        base.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
        "--data",
        web.to_str().unwrap(),
        "--layer",
        "1",
        "--tokens",
        "100000000",
        "--context",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout).to_string();
    let _ = std::fs::remove_dir_all(&out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        stdout.contains("complete; the data ran out at") && stdout.contains("of the 100000000 tokens asked for"),
        "{stdout}"
    );
}

#[test]
fn on_the_fly_training_whose_data_runs_out_is_finished_not_waiting() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-dataended-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data/web.txt");
    let (base, chat) = (fixture("base"), fixture("chat"));
    #[rustfmt::skip]
    let args = ["--backend", "cpu", "train", "--base", base.to_str().unwrap(), "--chat", chat.to_str().unwrap(),
        "--data", web.to_str().unwrap(), "--layer", "1", "--context", "64", "--out", out.to_str().unwrap(),
        "--dict-size", "64", "--k", "4", "--batch", "128", "--shuffle-tokens", "256", "--steps", "100000"];
    for _ in 0..2 {
        // The second run trains nothing more and says the same.
        let r = crossdiff(&args);
        let stdout = String::from_utf8_lossy(&r.stdout).to_string();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(stdout.contains("the data ran out at step") && stdout.contains("of 100000"), "{stdout}");
        assert!(!stdout.contains("resume"), "{stdout}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn adl_prints_the_lens_and_the_steered_answers_and_writes_its_files() {
    let out = std::env::temp_dir().join(format!("crossdiff-cli-adl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let prompts = out.with_extension("prompts.txt");
    std::fs::write(&prompts, "Hello!\n\nWho are you?\n").unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data/web.txt");
    let (base, chat) = (fixture("base"), fixture("chat"));
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "adl",
        "--base",
        base.to_str().unwrap(),
        "--chat",
        chat.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--layer",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "5",
        "--positions",
        "6",
        "--steer-prompts",
        prompts.to_str().unwrap(),
        "--strengths",
        "-1,0,3",
        "--max-new-tokens",
        "4",
    ]);
    std::fs::remove_file(&prompts).unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let want =
        format!("adl: 5 samples × 6 positions at layer 2 → {} (cpu (burn flex))", out.join("adl.json").display());
    assert_eq!(lines.last().copied(), Some(want.as_str()), "{stdout}");
    // One row per position (its top 5 tokens through the chat model), then one answer per prompt
    // and strength.
    let report = crossdiff::workflow::adl::read_report(&out).unwrap();
    for p in &report.per_position {
        let top: Vec<String> = p.chat.promoted.iter().take(5).map(|t| format!("{:?}", t.token)).collect();
        assert!(
            lines.iter().any(|l| l.trim_start().starts_with(&p.position.to_string()) && l.ends_with(&top.join(" ")))
        );
    }
    assert!(stdout.contains("--- \"Hello!\" ---") && stdout.contains("--- \"Who are you?\" ---"), "{stdout}");
    assert_eq!(report.steering.strengths, vec![-1.0, 0.0, 3.0]);
    assert_eq!(lines.iter().filter(|l| l.trim_start().starts_with("-1: ")).count(), 2, "{stdout}");
    assert!(out.join("adl.safetensors").is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bench_train_phases_prints_each_phase_from_its_measurement() {
    let r = crossdiff(&[
        "--backend",
        "cpu",
        "bench",
        "train",
        "--kind",
        "sae",
        "--d",
        "32",
        "--dict-size",
        "256",
        "--k",
        "4",
        "--batch",
        "64",
        "--steps",
        "3",
        "--phases",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let phases = json["phases"].as_array().expect("the phases in the JSON line");
    assert!(!phases.is_empty(), "{stdout}");
    // Every measured phase is a row of the table, at 1000 × seconds / steps ms.
    for p in phases {
        let name = p["name"].as_str().unwrap();
        let row = stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no row for {name}: {stdout}"));
        let ms: f64 = row[name.len()..].split_whitespace().next().unwrap().parse().unwrap();
        let want = 1000.0 * p["seconds"].as_f64().unwrap() / 3.0;
        assert!((ms - want).abs() <= 0.051, "{name}: printed {ms}, measured {want}");
    }
    assert!(stdout.contains("(rest: data, threshold, metrics, bookkeeping)"), "{stdout}");
}

/// `bench forward|analyze|cache --phases`: each measured phase is a row of the table at its measured
/// time per unit, and the phases a user looks for are there (the forward's attention and MLP, the
/// analysis's encoder and statistics, caching's model loading and documents).
#[test]
fn bench_forward_analyze_and_cache_phases_print_their_measurements() {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-gemma2");
    let (base, chat) = (assets.join("base"), assets.join("chat"));
    let (base, chat) = (base.to_str().unwrap(), chat.to_str().unwrap());
    let cases: [(&[&str], f64, &[&str]); 3] = [
        (
            &[
                "bench",
                "forward",
                "--model",
                base,
                "--batch",
                "2",
                "--context",
                "32",
                "--decode",
                "2",
                "--repeats",
                "2",
            ],
            2.0,
            &["attention (q/k/v, RoPE, scores, softmax, o)", "MLP (gate/up, activation, down)"],
        ),
        (
            &["bench", "analyze", "--d", "32", "--dict-size", "256", "--k", "4", "--tokens", "2048"],
            2.048,
            &["encoder and decoder (codes, reconstruction)", "per-batch statistics (reductions, one readback)"],
        ),
        (
            &["bench", "cache", "--base", base, "--chat", chat, "--layer", "1", "--tokens", "1000", "--context", "32"],
            1.0,
            &["load models", "read and tokenize documents", "attention (q/k/v, RoPE, scores, softmax, o)"],
        ),
    ];
    for (args, units, expected) in cases {
        let mut all = vec!["--backend", "cpu"];
        all.extend_from_slice(args);
        all.push("--phases");
        let r = crossdiff(&all);
        assert!(r.status.success(), "{args:?}: {}", String::from_utf8_lossy(&r.stderr));
        let stdout = String::from_utf8_lossy(&r.stdout);
        let json: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        let phases = json["phases"].as_array().expect("the phases in the JSON line");
        for p in phases {
            let name = p["name"].as_str().unwrap();
            let row =
                stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no row for {name}: {stdout}"));
            let ms: f64 = row[name.len()..].split_whitespace().next().unwrap().parse().unwrap();
            let want = 1000.0 * p["seconds"].as_f64().unwrap() / units;
            assert!((ms - want).abs() <= 0.0051, "{args:?} {name}: printed {ms}, measured {want}");
        }
        for name in expected {
            assert!(phases.iter().any(|p| p["name"] == *name), "{args:?}: no phase {name}: {stdout}");
        }
    }
}

/// `inspect --adapter` merges a PEFT LoRA adapter: transformers' logits of the merged model, not the
/// base's, and one more line naming it; a folder that is no adapter is one error line.
#[test]
fn inspect_merges_a_lora_adapter_and_names_a_bad_one() {
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-llama");
    let (base, lora) = (llama.join("base"), llama.join("lora"));
    let dir = std::env::temp_dir().join(format!("crossdiff-cli-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inspect = |adapter: Option<&Path>, out: &Path| {
        let mut args = vec!["--backend", "cpu", "inspect", "--model", base.to_str().unwrap()];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        args.extend(["--prompt", "The cat sat on the river bank at night.", "--out", out.to_str().unwrap()]);
        crossdiff(&args)
    };
    let logits = |path: &Path, name: &str| -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (plain_out, adapted_out) = (dir.join("plain.safetensors"), dir.join("adapted.safetensors"));
    let plain = inspect(None, &plain_out);
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let plain_text = String::from_utf8_lossy(&plain.stdout).to_string();
    assert_eq!(plain_text.lines().count(), 1, "{plain_text}");
    let adapted = inspect(Some(&lora), &adapted_out);
    assert!(adapted.status.success(), "{}", String::from_utf8_lossy(&adapted.stderr));
    let text = String::from_utf8_lossy(&adapted.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    // The first line as without an adapter (but for the file and the time).
    let head = |l: &str| l.split(" → ").next().unwrap().to_string();
    assert_eq!(head(lines[0]), head(plain_text.trim()));
    assert_eq!(
        lines[1],
        format!(
            "inspect: adapter {} merged (LoRA r=4 alpha=8 on down_proj, gate_proj, o_proj, q_proj, v_proj)",
            lora.display()
        )
    );
    // The merged model's logits are transformers' with the adapter merged, not the base's.
    let (a, p) = (logits(&adapted_out, "logits"), logits(&plain_out, "logits"));
    let want = logits(&llama.join("reference/lora.safetensors"), "p0.logits");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= 1e-3 * scale, "logits error {err} vs scale {scale}");
    let moved = a.iter().zip(&p).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(moved > 100.0 * err.max(1e-6), "the adapter changed the logits by only {moved}");
    // A folder without adapter_config.json: exit status 1, one line naming the file, nothing written.
    let bad_out = dir.join("bad.safetensors");
    let bad = inspect(Some(&base), &bad_out);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr).to_string();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("adapter_config.json"), "{stderr}");
    assert!(!bad_out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every command that loads a chat model takes --chat-adapter (steer: --adapter, inspect and
/// generate: --adapter for their one model).
#[test]
fn the_commands_that_load_a_chat_model_take_its_adapter() {
    for (command, flag) in [
        ("cache", "--chat-adapter <DIR>"),
        ("train", "--chat-adapter <DIR>"),
        ("analyze", "--chat-adapter <DIR>"),
        ("kl", "--chat-adapter <DIR>"),
        ("adl", "--chat-adapter <DIR>"),
        ("steer", "--adapter <DIR>"),
        ("inspect", "--adapter <DIR>"),
        ("generate", "--adapter <DIR>"),
    ] {
        let r = crossdiff(&[command, "--help"]);
        let help = String::from_utf8_lossy(&r.stdout);
        assert!(help.contains(flag), "crossdiff {command} --help has no {flag}:\n{help}");
        assert!(help.contains("PEFT LoRA adapter"), "{help}");
    }
}
