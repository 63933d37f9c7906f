//! The bad-input matrix (issue 11): each case is a command a user might type, the fragment its one
//! error line must contain, and the promise that nothing a user made changes — every file of the
//! good cache, run and analysis is byte-identical afterwards, and a fresh output path stays absent.
//! Cases are grouped by class: values at the boundary, artifacts that do not belong together,
//! integrity, and files from elsewhere. New classes of bad input get a row here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn asset(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets").join(p).display().to_string()
}

fn crossdiff(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crossdiff")).arg("--backend").arg("cpu").args(args).output().unwrap()
}

fn ok(args: &[String]) {
    let r = crossdiff(args);
    assert!(r.status.success(), "{args:?}: {}", String::from_utf8_lossy(&r.stderr));
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `args` with each `--flag value…` of `overrides` replacing that flag's values (or appended).
fn with(mut args: Vec<String>, overrides: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < overrides.len() {
        let flag = overrides[i];
        let mut j = i + 1;
        while j < overrides.len() && !overrides[j].starts_with("--") {
            j += 1;
        }
        let group = strings(&overrides[i..j]);
        match args.iter().position(|a| a == flag) {
            Some(at) => {
                let mut end = at + 1;
                while end < args.len() && !args[end].starts_with("--") {
                    end += 1;
                }
                args.splice(at..end, group);
            }
            None => args.extend(group),
        }
        i = j;
    }
    args
}

/// Every file under `dir`, by relative path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A copy of snapshot `from` under `root/name` with its config.json edited.
fn variant(root: &Path, from: &str, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, v.to_string()).unwrap();
    dir.display().to_string()
}

/// A copy of a run directory (the copy may be changed by its cases; the original is watched).
fn copy_run(from: &str, to: &Path) -> String {
    std::fs::create_dir_all(to.join("checkpoint")).unwrap();
    for sub in ["", "checkpoint"] {
        for e in std::fs::read_dir(Path::new(from).join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, to.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    to.display().to_string()
}

/// The good artifacts every case runs against.
struct World {
    root: PathBuf,
    base: String,
    chat: String,
    web: String,
    chats: String,
    cache: String,
    cache_layer2: String,
    cache_swapped: String,
    cache_partial: String,
    cache_demo: String,
    run: String,
    empty: String,
    base_no_template: String,
}

impl World {
    /// Built under a folder of its own (`tag`): the tests run in parallel.
    fn build(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("crossdiff-bad-inputs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let at = |p: &str| root.join(p).display().to_string();
        let (base, chat) = (asset("tiny-gemma2/base"), asset("tiny-gemma2/chat"));
        let (web, chats) = (asset("data/web.txt"), asset("data/chat.jsonl"));
        let cache_cmd = |b: &str, c: &str, layer: &str, out: &str| {
            strings(&[
                "cache",
                "--base",
                b,
                "--chat",
                c,
                "--data",
                &web,
                &chats,
                "--mix",
                "--layer",
                layer,
                "--tokens",
                "1200",
                "--context",
                "64",
                "--shard-tokens",
                "400",
                "--out",
                out,
            ])
        };
        let w = World {
            cache: at("cache"),
            cache_layer2: at("cache-l2"),
            cache_swapped: at("cache-swapped"),
            cache_partial: at("cache-partial"),
            cache_demo: at("cache-demo"),
            run: at("run"),
            empty: at("empty.txt"),
            base_no_template: at("base-no-template"),
            base,
            chat,
            web: web.clone(),
            chats: chats.clone(),
            root: root.clone(),
        };
        ok(&cache_cmd(&w.base, &w.chat, "1", &w.cache));
        ok(&cache_cmd(&w.base, &w.chat, "2", &w.cache_layer2));
        ok(&cache_cmd(&w.chat, &w.base, "1", &w.cache_swapped));
        ok(&cache_cmd(&asset("demo/base"), &asset("demo/chat"), "1", &w.cache_demo));
        ok(&cache_cmd(&w.base, &w.chat, "1", &w.cache_partial));
        let json = Path::new(&w.cache_partial).join("cache.json");
        let text = std::fs::read_to_string(&json).unwrap().replace("\"complete\": true", "\"complete\": false");
        std::fs::write(&json, text).unwrap();
        ok(&strings(&[
            "train",
            "--cache",
            &w.cache,
            "--out",
            &w.run,
            "--dict-size",
            "64",
            "--k",
            "8",
            "--batch",
            "128",
            "--steps",
            "20",
            "--threshold-start",
            "5",
            "--warmup-steps",
            "5",
        ]));
        ok(&strings(&["analyze", "--run", &w.run, "--cache", &w.cache, "--examples", "2"]));
        std::fs::write(&w.empty, "").unwrap();
        std::fs::create_dir_all(&w.base_no_template).unwrap();
        for e in std::fs::read_dir(&w.base).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, Path::new(&w.base_no_template).join(p.file_name().unwrap())).unwrap();
        }
        let cfg = Path::new(&w.base_no_template).join("tokenizer_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("chat_template");
        std::fs::write(&cfg, v.to_string()).unwrap();
        w
    }

    /// A path under the root that no case may create.
    fn fresh(&self) -> String {
        self.root.join("fresh").display().to_string()
    }

    fn watched(&self) -> Vec<PathBuf> {
        [&self.cache, &self.cache_layer2, &self.cache_swapped, &self.cache_partial, &self.cache_demo, &self.run]
            .iter()
            .map(PathBuf::from)
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn every_bad_input_is_one_line_naming_it_and_changes_nothing() {
    let w = World::build("cli");
    let fresh = w.fresh();
    let (b, c, web, chats, cache, run) = (&w.base, &w.chat, &w.web, &w.chats, &w.cache, &w.run);
    let (demo_base, demo_chat) = (asset("demo/base"), asset("demo/chat"));
    let cache_new = |extra: &[&str]| {
        with(
            strings(&[
                "cache",
                "--base",
                b,
                "--chat",
                c,
                "--data",
                web,
                "--layer",
                "1",
                "--tokens",
                "500",
                "--context",
                "64",
                "--out",
                &fresh,
            ]),
            extra,
        )
    };
    let train_new = |extra: &[&str]| {
        with(
            strings(&[
                "train",
                "--cache",
                cache,
                "--out",
                &fresh,
                "--dict-size",
                "64",
                "--k",
                "8",
                "--steps",
                "5",
                "--batch",
                "128",
                "--threshold-start",
                "2",
            ]),
            extra,
        )
    };
    let analyze = |extra: &[&str]| with(strings(&["analyze", "--run", run]), extra);
    let kl = |extra: &[&str]| with(strings(&["kl", "--run", run, "--data", chats, "--conversations", "2"]), extra);
    let steer =
        |extra: &[&str]| with(strings(&["steer", "--run", run, "--prompt", "hello", "--max-tokens", "3"]), extra);
    let generate =
        |extra: &[&str]| with(strings(&["generate", "--model", c, "--prompt", "hello", "--max-tokens", "3"]), extra);
    let adl = |extra: &[&str]| {
        with(
            strings(&[
                "adl",
                "--base",
                b,
                "--chat",
                c,
                "--data",
                web,
                "--layer",
                "1",
                "--out",
                &fresh,
                "--samples",
                "2",
                "--positions",
                "4",
                "--max-new-tokens",
                "2",
            ]),
            extra,
        )
    };
    // Broken snapshots: one config.json field each.
    let root = &w.root;
    let cfg = |name: &str, field: &'static str, value: serde_json::Value| {
        variant(root, b, name, move |v| v[field] = value.clone())
    };
    let eps = cfg("cfg-eps", "rms_norm_eps", (-1.0).into());
    let rope = variant(root, b, "cfg-rope", |v| v["rope_parameters"]["rope_theta"] = 0.0.into());
    let scalar = cfg("cfg-scalar", "query_pre_attn_scalar", (-1).into());
    let window = cfg("cfg-window", "sliding_window", 0.into());
    let softcap = cfg("cfg-softcap", "final_logit_softcapping", 0.0.into());
    let positions = cfg("cfg-positions", "max_position_embeddings", 0.into());
    let bos = cfg("cfg-bos", "bos_token_id", 99999.into());
    let eos = cfg("cfg-eos", "eos_token_id", (-5).into());
    let layers = variant(root, b, "cfg-layers", |v| {
        v["num_hidden_layers"] = 3.into();
        if let Some(t) = v["layer_types"].as_array_mut() {
            t.pop();
        }
    });
    let inspect = |model: &str| strings(&["inspect", "--model", model, "--prompt", "x", "--out", &fresh]);
    let long_prompt = "word ".repeat(300);
    // Conversations the chat template refuses.
    let system = root.join("system.jsonl");
    std::fs::write(
        &system,
        "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}, {\"role\": \"user\", \"content\": \"y\"}]}\n",
    )
    .unwrap();
    let system = system.display().to_string();
    // A run trained further after its analysis, and a run without config.json.
    let stale = copy_run(run, &root.join("run-stale"));
    ok(&strings(&[
        "train",
        "--cache",
        cache,
        "--out",
        &stale,
        "--dict-size",
        "64",
        "--k",
        "8",
        "--batch",
        "128",
        "--steps",
        "25",
        "--threshold-start",
        "5",
        "--warmup-steps",
        "5",
    ]));
    // Runs whose files were edited by hand.
    let edited = |name: &str, file: &str, edit: &dyn Fn(String) -> String| {
        let dir = copy_run(run, &root.join(name));
        let path = Path::new(&dir).join(file);
        std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
        dir
    };
    let reordered = edited("run-reordered", "latents.csv", &|t| {
        let mut lines: Vec<&str> = t.lines().collect();
        lines.swap(1, 2);
        lines.join("\n") + "\n"
    });
    let kind_l1 = edited("run-kind", "config.json", &|t| t.replace("\"batchtopk\"", "\"l1\""));
    let relabelled = edited("run-relabelled", "latents.csv", &|t| t.replacen(",shared,", ",chat_only,", 1));
    let layer_3 = edited("run-layer", "config.json", &|t| t.replace("\"layer\": 1", "\"layer\": 3"));
    let d_text = edited("run-d", "config.json", &|t| t.replace("\"d\": 72", "\"d\": \"72\""));
    let dead_latent = std::fs::read_to_string(Path::new(run).join("latents.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .find(|l| l.split(',').nth(5) == Some("dead"))
        .map(|l| l.split(',').next().unwrap().to_string());
    let locked = copy_run(run, &root.join("run-locked"));
    std::fs::write(Path::new(&locked).join(".crossdiff.lock"), "1").unwrap();
    // A run another process holds with the OS lock (this test process, while the cases run).
    let os_locked = copy_run(run, &root.join("run-os-locked"));
    let lock_path = Path::new(&os_locked).join(".crossdiff.lock");
    std::fs::write(&lock_path, "4294966").unwrap();
    let held = std::fs::File::open(&lock_path).unwrap();
    held.lock().unwrap();
    let a_file = root.join("a-file.txt");
    std::fs::write(&a_file, "notes").unwrap();
    let a_file = a_file.display().to_string();
    let bare = copy_run(run, &root.join("run-bare"));
    std::fs::remove_file(Path::new(&bare).join("config.json")).unwrap();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        // ── a model's config.json ──
        ("config: negative rms_norm_eps", inspect(&eps), "`rms_norm_eps` must be a positive finite number"),
        ("config: rope theta 0", inspect(&rope), "`rope_parameters.rope_theta` must be a positive finite number"),
        ("config: negative attention scalar", inspect(&scalar), "`query_pre_attn_scalar` must be a positive"),
        ("config: sliding window 0", inspect(&window), "`sliding_window` must be positive"),
        ("config: softcapping 0", inspect(&softcap), "`final_logit_softcapping` must be a positive"),
        ("config: no positions", inspect(&positions), "`max_position_embeddings` must be positive"),
        ("config: bos outside the vocabulary", inspect(&bos), "`bos_token_id` is 99999, outside the vocabulary"),
        ("config: negative eos", inspect(&eos), "`eos_token_id` has -5"),
        (
            "config: fewer layers than the weights",
            inspect(&layers),
            "`num_hidden_layers` is 3, the weights have 4 blocks",
        ),
        (
            "inspect: a prompt beyond the context",
            strings(&["inspect", "--model", b, "--prompt", &long_prompt, "--out", &fresh]),
            "longer than the model's context of 256",
        ),
        (
            "generate: beyond the context",
            generate(&["--max-tokens", "100000000"]),
            "--max-tokens 100000000: the prompt",
        ),
        ("generate: 0 tokens", generate(&["--max-tokens", "0"]), "--max-tokens must be positive"),
        ("generate: negative tokens", generate(&["--max-tokens", "-1"]), "'--max-tokens <MAX_TOKENS>'"),
        (
            "generate: infinite temperature",
            generate(&["--temperature", "inf"]),
            "--temperature must be a finite number",
        ),
        ("cache: the same model twice", cache_new(&["--chat", b]), "are the same model"),
        ("cache: a conversation the template refuses", cache_new(&["--data", &system]), "system.jsonl: document 1"),
        (
            "analyze: a huge examples store",
            analyze(&["--cache", cache, "--examples", "100000000"]),
            "--examples must be in 1..=1000",
        ),
        (
            "analyze: a huge context",
            analyze(&["--cache", cache, "--context", "100000000"]),
            "--context must be at most 512",
        ),
        (
            "analyze: token lists from models of another width",
            analyze(&["--cache", cache, "--base", &demo_base, "--chat", &demo_chat]),
            "the model has width 64",
        ),
        ("kl: the same model twice", kl(&["--base", b, "--chat", b]), "are the same model"),
        (
            "kl: a latents.csv of an earlier crosscoder",
            strings(&["kl", "--run", &stale, "--data", chats, "--conversations", "2", "--base", b, "--chat", c]),
            "computed from an earlier crosscoder",
        ),
        (
            "steer: a latents.csv of an earlier crosscoder",
            strings(&["steer", "--run", &stale, "--model", c, "--latent", "0", "--strength", "1", "--prompt", "x"]),
            "computed from an earlier crosscoder",
        ),
        (
            "kl: a run without config.json",
            strings(&["kl", "--run", &bare, "--data", chats, "--conversations", "2", "--base", b, "--chat", c]),
            "config.json is missing or names no layer",
        ),
        (
            "steer: a strength that overflows",
            steer(&["--model", c, "--latent", "0", "--strength", "1e30"]),
            "--strength for latent 0 must be within ±1000",
        ),
        // ── values at the boundary ──
        (
            "inspect: no snapshot",
            strings(&["inspect", "--model", "/no/model", "--prompt", "x", "--out", &fresh]),
            "/no/model: not a model snapshot",
        ),
        ("generate: NaN temperature", generate(&["--temperature", "NaN"]), "--temperature must be a finite number ≥ 0"),
        (
            "generate: negative temperature",
            generate(&["--temperature=-1"]),
            "--temperature must be a finite number ≥ 0",
        ),
        ("generate: top-p above 1", generate(&["--top-p", "2"]), "--top-p must be in (0, 1]"),
        ("generate: top-p 0", generate(&["--top-p", "0"]), "--top-p must be in (0, 1]"),
        (
            "cache: layer beyond the blocks",
            cache_new(&["--layer", "9"]),
            "--layer 9 is out of range: the models have 4 blocks",
        ),
        ("cache: 0 tokens", cache_new(&["--tokens", "0"]), "--tokens must be positive"),
        ("cache: 0 context", cache_new(&["--context", "0"]), "--context must be positive"),
        ("cache: 0 batch tokens", cache_new(&["--batch-tokens", "0"]), "--batch-tokens must be positive"),
        (
            "cache: shards smaller than a document",
            cache_new(&["--shard-tokens", "10"]),
            "--shard-tokens (10) must be at least --context (64)",
        ),
        ("cache: unknown dtype", cache_new(&["--dtype", "f8"]), "\"f8\" is not one of bf16, f16, f32"),
        ("train: D 0", train_new(&["--dict-size", "0"]), "--dict-size must be positive"),
        (
            "train: expansion 0",
            strings(&["train", "--cache", cache, "--out", &fresh, "--expansion", "0"]),
            "--expansion must be positive",
        ),
        ("train: k 0", train_new(&["--k", "0"]), "--k must be at least 1"),
        (
            "train: unknown init",
            train_new(&["--init", "random"]),
            "--init: \"random\" is not one of shared, independent",
        ),
        ("train: k above D", train_new(&["--k", "65"]), "--k 65 is larger than the dictionary (D = 64)"),
        ("train: NaN lr", train_new(&["--lr", "NaN"]), "--lr must be a positive finite number, not NaN"),
        ("train: infinite lr", train_new(&["--lr", "inf"]), "--lr must be a positive finite number, not inf"),
        ("train: negative lr", train_new(&["--lr=-0.001"]), "--lr must be a positive finite number"),
        ("train: negative mu", train_new(&["--mu=-1"]), "--mu must be a finite number ≥ 0"),
        ("train: NaN init norm", train_new(&["--init-norm", "NaN"]), "--init-norm must be a positive finite number"),
        (
            "train: a subnormal init norm",
            train_new(&["--init-norm", "1e-320"]),
            "--init-norm must be between 1e-6 and 1000",
        ),
        ("train: negative aux alpha", train_new(&["--aux-alpha=-1"]), "--aux-alpha must be a finite number ≥ 0"),
        ("train: batch 0", train_new(&["--batch", "0"]), "--batch must be positive"),
        ("train: 0 steps", train_new(&["--steps", "0"]), "--steps must be positive"),
        (
            "train: k anneal below k",
            train_new(&["--k-anneal-from", "2"]),
            "--k-anneal-from (2) must be at least --k (8)",
        ),
        ("train: log every 0", train_new(&["--log-every", "0"]), "--log-every must be positive"),
        ("train: shuffle pool 0", train_new(&["--shuffle-tokens", "0"]), "--shuffle-tokens must be positive"),
        ("train: dead after 0 tokens", train_new(&["--dead-tokens", "0"]), "--dead-tokens must be positive"),
        (
            "train: validation without held-out tokens",
            train_new(&["--val-every", "5"]),
            "--val-every needs --val-tokens",
        ),
        (
            "train on the fly: layer beyond the blocks",
            strings(&[
                "train", "--base", b, "--chat", c, "--data", web, "--layer", "99", "--out", &fresh, "--steps", "2",
            ]),
            "--layer 99 is out of range",
        ),
        ("analyze: 0 tokens", analyze(&["--cache", cache, "--tokens", "0"]), "--tokens must be positive"),
        ("analyze: batch 0", analyze(&["--cache", cache, "--batch", "0"]), "--batch must be positive"),
        ("analyze: base without chat", analyze(&["--cache", cache, "--base", b]), "--base and --chat go together"),
        (
            "kl: 0 conversations",
            strings(&["kl", "--run", run, "--data", chats, "--conversations", "0", "--base", b, "--chat", c]),
            "--conversations must be positive",
        ),
        (
            "kl: unknown patch",
            kl(&["--base", b, "--chat", c, "--patch-on", "reply"]),
            "--patch-on: \"reply\" is not one of all, template, first-k, template+first-k",
        ),
        (
            "kl: first-k 0",
            kl(&["--base", b, "--chat", c, "--patch-on", "first-k", "--first-k", "0"]),
            "--first-k must be positive",
        ),
        (
            "kl: sweep past the model",
            kl(&["--base", b, "--chat", c, "--layers", "0,99"]),
            "--layers 99 is past the models' last block",
        ),
        ("kl: sweep not a number", kl(&["--base", b, "--chat", c, "--layers", "1,x"]), "--layers"),
        (
            "kl: another layer than the crosscoder's",
            kl(&["--base", b, "--chat", c, "--layer", "2"]),
            "--layer 2: the crosscoder in",
        ),
        (
            "steer: NaN strength",
            steer(&["--model", c, "--latent", "0", "--strength", "NaN"]),
            "--strength for latent 0 must be a finite number",
        ),
        (
            "steer: infinite strength",
            steer(&["--model", c, "--latent", "0", "--strength", "inf"]),
            "--strength for latent 0 must be a finite number",
        ),
        ("steer: latent beyond D", steer(&["--model", c, "--latent", "64", "--strength", "1"]), "--latent 64"),
        (
            "steer: 0 tokens",
            strings(&[
                "steer",
                "--run",
                run,
                "--prompt",
                "x",
                "--max-tokens",
                "0",
                "--model",
                c,
                "--latent",
                "0",
                "--strength",
                "1",
            ]),
            "--max-tokens must be positive",
        ),
        (
            "steer: another layer than the crosscoder's",
            steer(&["--model", c, "--latent", "0", "--strength", "1", "--layer", "2"]),
            "--layer 2: the crosscoder in",
        ),
        // ── artifacts that do not belong together ──
        (
            "cache: base and chat of different widths",
            cache_new(&["--chat", &demo_chat]),
            "differ in config.json field `hidden_size`",
        ),
        (
            "cache: resume with another layer",
            strings(&[
                "cache",
                "--base",
                b,
                "--chat",
                c,
                "--data",
                web,
                chats,
                "--mix",
                "--layer",
                "2",
                "--tokens",
                "1200",
                "--context",
                "64",
                "--shard-tokens",
                "400",
                "--out",
                cache,
            ]),
            "made with other settings",
        ),
        (
            "cache: resume with the models swapped",
            strings(&[
                "cache",
                "--base",
                c,
                "--chat",
                b,
                "--data",
                web,
                chats,
                "--mix",
                "--layer",
                "1",
                "--tokens",
                "1200",
                "--context",
                "64",
                "--shard-tokens",
                "400",
                "--out",
                cache,
            ]),
            "made from other models",
        ),
        (
            "train: resume with other settings",
            strings(&[
                "train",
                "--cache",
                cache,
                "--out",
                run,
                "--dict-size",
                "64",
                "--k",
                "4",
                "--batch",
                "128",
                "--steps",
                "20",
                "--threshold-start",
                "5",
                "--warmup-steps",
                "5",
            ]),
            "started with other settings",
        ),
        (
            "train: resume on a cache of other models",
            strings(&[
                "train",
                "--cache",
                &w.cache_swapped,
                "--out",
                run,
                "--dict-size",
                "64",
                "--k",
                "8",
                "--batch",
                "128",
                "--steps",
                "30",
                "--threshold-start",
                "5",
                "--warmup-steps",
                "5",
            ]),
            "trains on other models",
        ),
        (
            "analyze: a cache of another layer",
            analyze(&["--cache", &w.cache_layer2]),
            "the cache is of layer 2, the crosscoder was trained on layer 1",
        ),
        (
            "analyze: a cache of another width",
            analyze(&["--cache", &w.cache_demo]),
            "the cache has width 64, the crosscoder 72",
        ),
        (
            "analyze: a cache of other models",
            analyze(&["--cache", &w.cache_swapped]),
            "were made from different models",
        ),
        (
            "analyze: token lists of the models swapped",
            analyze(&["--cache", cache, "--base", c, "--chat", b]),
            "base and chat swapped?",
        ),
        ("kl: base and chat swapped", kl(&["--base", c, "--chat", b]), "base and chat swapped?"),
        ("kl: models of another width", kl(&["--base", &demo_base, "--chat", &demo_chat]), "the model has width 64"),
        (
            "steer: a model of another width",
            steer(&["--model", &demo_chat, "--latent", "0", "--strength", "1"]),
            "the model has width 64",
        ),
        (
            "inspect: a chat prompt on a model without a template",
            strings(&["inspect", "--model", &w.base_no_template, "--prompt", "x", "--chat", "--out", &fresh]),
            "chat_template",
        ),
        // ── training sizes, sources and folders ──
        (
            "train: a batch beyond the cache",
            train_new(&["--batch", "5000", "--shuffle-tokens", "8000"]),
            "larger than the cache's training split",
        ),
        (
            "train: a shuffle pool smaller than a batch",
            train_new(&["--shuffle-tokens", "64"]),
            "--shuffle-tokens (64) must be at least --batch (128)",
        ),
        (
            "train: k annealing without its steps",
            train_new(&["--k-anneal-from", "16"]),
            "--k-anneal-from needs --k-anneal-steps",
        ),
        (
            "train: k annealing steps without a start",
            train_new(&["--k-anneal-steps", "3"]),
            "--k-anneal-steps needs --k-anneal-from",
        ),
        (
            "train: k annealing from beyond D",
            train_new(&["--k-anneal-from", "100", "--k-anneal-steps", "3"]),
            "--k-anneal-from 100 is larger than the dictionary",
        ),
        (
            "train: threshold estimated after the last step",
            train_new(&["--threshold-start", "5"]),
            "--threshold-start 5 must be below the step budget (5)",
        ),
        ("train: a dictionary beyond memory", train_new(&["--dict-size", "1000000000"]), "more than this machine's"),
        (
            "train: --layer with --cache",
            train_new(&["--layer", "2"]),
            "'--cache <CACHE>' cannot be used with '--layer <LAYER>'",
        ),
        ("train: --out is a cache", train_new(&["--out", &w.cache_layer2]), "holds an activation cache"),
        ("cache: --out is a run", cache_new(&["--out", run]), "holds a training run"),
        (
            "train on the fly: empty data",
            strings(&[
                "train",
                "--base",
                b,
                "--chat",
                c,
                "--data",
                &w.empty,
                "--layer",
                "1",
                "--out",
                &fresh,
                "--steps",
                "3",
                "--context",
                "64",
            ]),
            "--data gave no training pairs",
        ),
        (
            "train: resume with another batch",
            strings(&[
                "train",
                "--cache",
                cache,
                "--out",
                run,
                "--dict-size",
                "64",
                "--k",
                "8",
                "--batch",
                "64",
                "--steps",
                "20",
                "--threshold-start",
                "5",
                "--warmup-steps",
                "5",
            ]),
            "trains on other data: --batch 128, now --batch 64",
        ),
        (
            "kl: text without conversations",
            kl(&["--base", b, "--chat", c, "--data", web]),
            "no conversation with an assistant reply",
        ),
        // ── bench and demo ──
        ("bench train: width 0", strings(&["bench", "train", "--d", "0", "--steps", "1"]), "--d must be positive"),
        (
            "bench train: k beyond D",
            strings(&["bench", "train", "--d", "8", "--dict-size", "16", "--k", "32", "--steps", "1"]),
            "--k 32 is larger than the dictionary",
        ),
        (
            "bench forward: batch 0",
            strings(&["bench", "forward", "--model", b, "--batch", "0"]),
            "--batch must be positive",
        ),
        (
            "bench forward: beyond the context",
            strings(&["bench", "forward", "--model", b, "--decode", "100000"]),
            "--decode 100000 with --context 128 exceeds",
        ),
        (
            "bench reader: no tokens",
            strings(&["bench", "reader", "--cache", &fresh, "--synthetic-tokens", "0"]),
            "--synthetic-tokens must be positive",
        ),
        (
            "demo: 0 training steps",
            strings(&["demo", "--rebuild", "--models", &fresh, "--steps", "0"]),
            "--steps must be positive",
        ),
        // ── found by the second sweep ──
        (
            "bench reader: synthetic pairs over a real cache",
            strings(&["bench", "reader", "--cache", cache, "--synthetic-tokens", "1000", "--d", "16"]),
            "holds other files (a real cache?)",
        ),
        (
            "bench forward: a batch beyond memory",
            strings(&["bench", "forward", "--model", b, "--batch", "18446744073709551615"]),
            "--batch 18446744073709551615 with --context 128",
        ),
        (
            "bench forward: decode steps that overflow",
            strings(&["bench", "forward", "--model", b, "--decode", "18446744073709551615"]),
            "--decode 18446744073709551615",
        ),
        (
            "bench reader: rows beyond any model",
            strings(&["bench", "reader", "--cache", &fresh, "--synthetic-tokens", "10", "--d", "18446744073709551615"]),
            "--d must be at most",
        ),
        (
            "bench reader: tokens beyond any cache",
            strings(&["bench", "reader", "--cache", &fresh, "--synthetic-tokens", "18446744073709551615"]),
            "--synthetic-tokens must be at most",
        ),
        (
            "bench analyze: tokens beyond any run",
            strings(&[
                "bench",
                "analyze",
                "--d",
                "8",
                "--dict-size",
                "16",
                "--k",
                "2",
                "--tokens",
                "18446744073709551615",
            ]),
            "--tokens must be at most",
        ),
        (
            "generate: max tokens that overflow",
            generate(&["--max-tokens", "18446744073709551615"]),
            "--max-tokens 18446744073709551615",
        ),
        (
            "inspect: --out inside a model snapshot",
            strings(&[
                "inspect",
                "--model",
                b,
                "--prompt",
                "x",
                "--out",
                &format!("{}/model-00001-of-00004.safetensors", w.base_no_template),
            ]),
            "inside a folder with a config.json",
        ),
        (
            "inspect: --out in a missing folder",
            strings(&["inspect", "--model", b, "--prompt", "x", "--out", "/no/dir/x.safetensors"]),
            "the folder /no/dir does not exist",
        ),
        (
            "demo: --models over other files",
            strings(&["demo", "--rebuild", "--models", &w.root.display().to_string(), "--steps", "1"]),
            "holds other files",
        ),
        (
            "demo: --project over a run",
            strings(&["demo", "--no-app", "--models", &asset("demo"), "--project", run]),
            "holds other files",
        ),
        (
            "steer: a reordered latents.csv",
            strings(&["steer", "--run", &reordered, "--model", c, "--latent", "0", "--strength", "1", "--prompt", "x"]),
            "row 2 is latent 1",
        ),
        (
            "kl: config.json's kind against the weights",
            strings(&["kl", "--run", &kind_l1, "--data", chats, "--conversations", "2", "--base", b, "--chat", c]),
            "field `kind` is L1",
        ),
        (
            "steer: config.json's layer against the checkpoint",
            strings(&["steer", "--run", &layer_3, "--model", c, "--latent", "0", "--strength", "1", "--prompt", "x"]),
            "field `layer` is 3, the run's checkpoint",
        ),
        (
            "kl: config.json's d as text",
            strings(&["kl", "--run", &d_text, "--data", chats, "--conversations", "2", "--base", b, "--chat", c]),
            "field `d`",
        ),
        // ── found by the third sweep ──
        (
            "inspect: --out inside a cache",
            strings(&["inspect", "--model", b, "--prompt", "x", "--out", &format!("{cache}/acts-00000.safetensors")]),
            "inside an activation cache",
        ),
        (
            "inspect: --out over another file",
            strings(&["inspect", "--model", b, "--prompt", "x", "--out", &a_file]),
            "exists and is not an earlier inspection",
        ),
        (
            "generate: a run given as the model",
            strings(&["generate", "--model", run, "--prompt", "x"]),
            "this is a crosscoder run's config.json",
        ),
        (
            "generate: a cache given as the model",
            strings(&["generate", "--model", cache, "--prompt", "x"]),
            "this is an activation cache",
        ),
        (
            "train: fewer tokens than a batch",
            train_new(&["--tokens", "10"]).into_iter().filter(|a| a != "--steps" && a != "5").collect(),
            "--tokens 10 is less than one batch",
        ),
        (
            "train: k annealing beyond the budget",
            train_new(&["--k-anneal-from", "16", "--k-anneal-steps", "100"]),
            "--k-anneal-steps 100 must be within the step budget (5)",
        ),
        (
            "train: k annealing on L1",
            train_new(&["--kind", "l1", "--k-anneal-from", "16", "--k-anneal-steps", "2"]),
            "--k-anneal-from is for BatchTopK",
        ),
        ("train: diverging before a checkpoint", train_new(&["--lr", "1e30"]), "training diverged"),
        (
            "analyze: a run another job holds",
            strings(&["analyze", "--run", &locked, "--cache", cache]),
            "is in use by another crossdiff job (process 1)",
        ),
        (
            "demo: --models without the pair",
            strings(&["demo", "--no-app", "--models", b, "--project", &fresh]),
            "must hold the pair's `base` and `chat` model folders",
        ),
        (
            "demo: --models missing",
            strings(&["demo", "--no-app", "--models", "/nonexistent", "--project", &fresh]),
            "/nonexistent must hold the pair's",
        ),
        (
            "demo: --project is a file",
            strings(&["demo", "--no-app", "--models", &asset("demo"), "--project", &a_file]),
            "is a file, not a folder",
        ),
        (
            "demo: --steps without --rebuild",
            strings(&["demo", "--no-app", "--steps", "5", "--project", &fresh]),
            "--rebuild",
        ),
        (
            "steer: a latents.csv class edited against its Δ",
            strings(&[
                "steer",
                "--run",
                &relabelled,
                "--model",
                c,
                "--latent",
                "0",
                "--strength",
                "1",
                "--prompt",
                "x",
            ]),
            "has class chat_only but Δ",
        ),
        // ── the activation-difference lens ──
        ("adl: 0 samples", adl(&["--samples", "0"]), "--samples must be positive"),
        ("adl: 0 positions", adl(&["--positions", "0"]), "--positions must be positive"),
        ("adl: layer beyond the blocks", adl(&["--layer", "4"]), "--layer 4 is out of range: the models have 4 blocks"),
        ("adl: a strength that is no number", adl(&["--strengths", "1,abc"]), "invalid value 'abc' for '--strengths"),
        ("adl: a NaN strength", adl(&["--strengths", "0,NaN"]), "--strengths must be finite numbers"),
        ("adl: a huge strength", adl(&["--strengths", "1e30"]), "--strengths must be finite numbers within ±100"),
        ("adl: a missing data file", adl(&["--data", "/no/data.txt"]), "/no/data.txt: cannot open"),
        ("adl: --out is a file", adl(&["--out", &a_file]), "is a file, not a folder"),
        (
            "adl: steering with a position not averaged",
            adl(&["--steer-position", "4"]),
            "--steer-position 4 must be below --positions (4)",
        ),
        (
            "adl: positions beyond the context",
            adl(&["--positions", "1000"]),
            "--positions 1000 is beyond the models' context of 256",
        ),
        ("adl: the same model twice", adl(&["--chat", b]), "are the same model"),
        ("adl: text with no documents", adl(&["--data", &w.empty]), "holds no documents to average over"),
        // ── integrity ──
        ("train: an unfinished cache", train_new(&["--cache", &w.cache_partial]), "the cache is incomplete"),
        ("analyze: an unfinished cache", analyze(&["--cache", &w.cache_partial]), "--allow-partial"),
        ("cache: an empty source", cache_new(&["--data", &w.empty]), "--data holds no documents to cache (0 tokens)"),
        ("cache: a missing source", cache_new(&["--data", "/no/data.txt"]), "/no/data.txt"),
        ("train: no cache there", train_new(&["--cache", "/no/cache"]), "/no/cache/cache.json"),
        ("analyze: no run there", strings(&["analyze", "--run", "/no/run", "--cache", cache]), "/no/run"),
        (
            "analyze: a run another process holds",
            strings(&["analyze", "--run", &os_locked, "--cache", cache]),
            "is in use by another crossdiff job (process 4294966)",
        ),
        (
            "analyze: a mistyped run folder",
            strings(&["analyze", "--run", &fresh, "--cache", cache]),
            "no such run folder",
        ),
    ];
    let mut cases = cases;
    if let Some(j) = &dead_latent {
        cases.push((
            "steer: a latent that never activated",
            steer(&["--model", c, "--latent", j, "--strength", "1"]),
            "never activated on the analysed cache",
        ));
    }
    let watched = w.watched();
    let before: Vec<_> = watched.iter().map(|d| snapshot(d)).collect();
    let mut failures = Vec::new();
    for (name, args, want) in &cases {
        let r = crossdiff(args);
        let stderr = String::from_utf8_lossy(&r.stderr).to_string();
        let lines = stderr.trim_end().lines().count();
        let mut problems = Vec::new();
        if r.status.code() != Some(1) && r.status.code() != Some(2) {
            problems.push(format!("exit {:?}", r.status.code()));
        }
        if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
            problems.push("panicked".into());
        }
        if lines != 1 {
            problems.push(format!("{lines} lines"));
        }
        if !stderr.contains(want) {
            problems.push(format!("missing {want:?}"));
        }
        if Path::new(&fresh).exists() {
            problems.push("created the fresh output".into());
            let _ = std::fs::remove_dir_all(&fresh);
            let _ = std::fs::remove_file(&fresh);
        }
        for (dir, old) in watched.iter().zip(&before) {
            if snapshot(dir) != *old {
                problems.push(format!("changed {}", dir.display()));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {} — stderr: {}", problems.join(", "), stderr.trim_end()));
        }
    }
    drop(held);
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// The same classes through the jobs the app's views start (each view fills the engine's job from
/// its `Default`), phrased by the view: its field labels, no CLI flags, one line.
#[test]
fn the_apps_jobs_refuse_bad_input_in_the_views_words() {
    use crossdiff::workflow::Handle;
    use crossdiff::workflow::cache::CacheJob;
    use crossdiff::workflow::models::ModelStore;
    use crossdiff::workflow::prompt_lab::PromptLabJob;
    use crossdiff::workflow::steer::SteerJob;
    use crossdiff::workflow::train::TrainJob;
    use crossdiff_app::errors::{Fields, phrase};
    let w = World::build("jobs");
    let device = burn::tensor::Device::flex();
    let store = ModelStore::new();
    let p = |s: &str| PathBuf::from(s);
    let fresh = p(&w.fresh());
    let train = TrainJob {
        cache: Some(p(&w.cache)),
        out: fresh.clone(),
        dict_size: Some(64),
        k: 8,
        batch: 128,
        steps: Some(5),
        threshold_start: Some(2),
        ..Default::default()
    };
    let cache = CacheJob {
        base: p(&w.base),
        chat: p(&w.chat),
        data: vec![p(&w.web)],
        layer: 1,
        tokens: 500,
        out: fresh.clone(),
        tokenize: crossdiff::data::TokenizeOptions { context: 64, ..Default::default() },
        ..Default::default()
    };
    let steer =
        SteerJob { run: p(&w.run), model: p(&w.chat), prompt: "hello".into(), max_tokens: 3, ..Default::default() };
    let lab =
        PromptLabJob { run: p(&w.run), base: p(&w.base), chat: p(&w.chat), text: "hello".into(), ..Default::default() };
    let run_train = |j: TrainJob| j.run(&device, Handle::silent()).map(|_| ());
    let run_cache = |j: CacheJob| crossdiff::workflow::cache::run(&j, &device, Handle::silent()).map(|_| ());
    let run_steer = |j: SteerJob| j.run(&device, &store, Handle::silent()).map(|_| ());
    let run_lab = |j: PromptLabJob| j.run(&device, &store, Handle::silent()).map(|_| ());
    let adl = crossdiff::workflow::adl::AdlJob {
        base: p(&w.base),
        chat: p(&w.chat),
        data: p(&w.web),
        layer: 1,
        out: fresh.clone(),
        samples: 2,
        max_new_tokens: 2,
        ..Default::default()
    };
    let run_adl = |j: crossdiff::workflow::adl::AdlJob| j.run(&device, &store, Handle::silent()).map(|_| ());
    use crossdiff_app::{adl_view, cache_view, prompt_lab_view, steering_view, train_view};
    let cases: Vec<(&str, anyhow::Result<()>, Fields, &str)> = vec![
        (
            "train: NaN learning rate",
            run_train(TrainJob { lr: f64::NAN, ..train.clone() }),
            train_view::FIELDS,
            "Learning rate must be a positive finite number, not NaN",
        ),
        (
            "train: D 0",
            run_train(TrainJob { dict_size: Some(0), ..train.clone() }),
            train_view::FIELDS,
            "Dictionary size must be positive",
        ),
        (
            "train: k above D",
            run_train(TrainJob { k: 65, ..train.clone() }),
            train_view::FIELDS,
            "k 65 is larger than the dictionary",
        ),
        (
            "train: an unfinished cache",
            run_train(TrainJob { cache: Some(p(&w.cache_partial)), ..train.clone() }),
            train_view::FIELDS,
            "tick “Use an incomplete cache”",
        ),
        (
            "train: resume on other models",
            run_train(TrainJob {
                cache: Some(p(&w.cache_swapped)),
                out: p(&w.run),
                steps: Some(30),
                threshold_start: Some(5),
                warmup_steps: 5,
                ..train.clone()
            }),
            train_view::FIELDS,
            "“Run directory”",
        ),
        (
            "cache: 0 tokens",
            run_cache(CacheJob { tokens: 0, ..cache.clone() }),
            cache_view::FIELDS,
            "Tokens must be positive",
        ),
        (
            "cache: layer beyond the blocks",
            run_cache(CacheJob { layer: 9, ..cache.clone() }),
            cache_view::FIELDS,
            "Layer 9 is out of range",
        ),
        (
            "cache: an empty source",
            run_cache(CacheJob { data: vec![p(&w.empty)], ..cache.clone() }),
            cache_view::FIELDS,
            "Data files holds no documents",
        ),
        (
            "steer: NaN strength",
            run_steer(SteerJob { strength: f64::NAN, ..steer.clone() }),
            steering_view::FIELDS,
            "Strength for latent 0 must be a finite number",
        ),
        (
            "steer: a model of another width",
            run_steer(SteerJob { model: PathBuf::from(asset("demo/chat")), ..steer.clone() }),
            steering_view::FIELDS,
            "the model has width 64",
        ),
        (
            "prompt lab: base and chat swapped",
            run_lab(PromptLabJob { base: p(&w.chat), chat: p(&w.base), ..lab.clone() }),
            prompt_lab_view::FIELDS,
            "tick “Allow other models”",
        ),
        (
            "adl: 0 documents",
            run_adl(crossdiff::workflow::adl::AdlJob { samples: 0, ..adl.clone() }),
            adl_view::FIELDS,
            "Documents must be positive",
        ),
        (
            "adl: layer beyond the blocks",
            run_adl(crossdiff::workflow::adl::AdlJob { layer: 9, ..adl.clone() }),
            adl_view::FIELDS,
            "Layer 9 is out of range",
        ),
        (
            "adl: no documents",
            run_adl(crossdiff::workflow::adl::AdlJob { data: p(&w.empty), ..adl.clone() }),
            adl_view::FIELDS,
            "Text file",
        ),
        (
            "prompt lab: no text",
            run_lab(PromptLabJob { text: String::new(), ..lab.clone() }),
            prompt_lab_view::FIELDS,
            "Text to analyse is empty",
        ),
    ];
    let mut failures = Vec::new();
    for (name, result, fields, want) in cases {
        let Err(e) = result else {
            failures.push(format!("{name}: succeeded"));
            continue;
        };
        let shown = phrase(&e, fields);
        if !shown.contains(want) || shown.contains(" --") || shown.starts_with("--") || shown.contains('\n') {
            failures.push(format!("{name}: {shown}"));
        }
        if fresh.exists() {
            failures.push(format!("{name}: created {}", fresh.display()));
            let _ = std::fs::remove_dir_all(&fresh);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
