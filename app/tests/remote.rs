//! `crossdiff serve` and `--backend remote:ws://…` on loopback: a run through a server equals the
//! local run, a wrong or missing token is refused on both sides, bad flags are refused in one line,
//! and a server killed mid-run stops the client with a clear error, the run resuming from its
//! checkpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{Scratch, assets, small_cache};

/// The command's stdout, after asserting it succeeded (its stderr in the failure message).
fn succeeds<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let r =
        Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args).env_remove("CROSSDIFF_REMOTE_TOKEN").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).to_string()
}

fn crossdiff(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(args).env_remove("CROSSDIFF_REMOTE_TOKEN").output().unwrap()
}

/// A `crossdiff serve` process on 127.0.0.1 (any free port), its stderr (the session log) in
/// `log`; killed on drop.
struct Server {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(extra: &[&str], log: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
            .args(["--backend", "cpu", "serve", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // The guard first: a failed assertion below still kills the process.
        let mut server = Self { child, url: String::new(), log: log.to_path_buf() };
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).unwrap();
        // "serve: listening on 127.0.0.1:PORT (cpu (burn flex)); clients: --backend remote:ws://127.0.0.1:PORT"
        assert!(first.starts_with("serve: listening on 127.0.0.1:"), "{first}");
        server.url = first.split("--backend ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
        assert!(server.url.starts_with("remote:ws://127.0.0.1:"), "{first}");
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// The log once it holds `count` lines containing `what` (the session thread writes a close a
    /// little after the client is gone); the log as it is after 20 s otherwise.
    fn log_with(&self, what: &str, count: usize) -> String {
        let started = std::time::Instant::now();
        loop {
            let log = self.log();
            if log.matches(what).count() >= count || started.elapsed().as_secs() >= 20 {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn train_args<'a>(backend: &'a str, cache: &'a Path, out: &'a Path, steps: &'a str) -> Vec<&'a str> {
    vec![
        "--backend",
        backend,
        "train",
        "--cache",
        cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dict-size",
        "64",
        "--k",
        "4",
        "--batch",
        "32",
        "--steps",
        steps,
        "--warmup-steps",
        "5",
        "--threshold-start",
        "10",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "5",
        "--log-every",
        "1",
    ]
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    // A crosscoder's file, or an SAE's.
    let file = ["crosscoder.safetensors", "sae.safetensors"].iter().map(|f| run.join(f)).find(|p| p.exists()).unwrap();
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = st
                .tensor(&n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, v)
        })
        .collect()
}

/// The same curve (loss, L0, FVE per step) and the same weights, to float tolerance: the server
/// runs the portable route (burn's remote backend carries tensor operations, not the host loops
/// the local CPU route uses).
fn assert_same_run(local: &Path, remote: &Path) {
    assert_same_run_within(local, remote, Weights::Strict);
}

/// How close the weights must be: `Strict` 10⁻⁴ of each value plus 10⁻⁵ of the tensor's scale;
/// `OfScale` 5·10⁻⁴ of the tensor's scale.
#[derive(Clone, Copy)]
enum Weights {
    Strict,
    OfScale,
}

fn assert_same_run_within(local: &Path, remote: &Path, tolerance: Weights) {
    let (a, b) = (metrics(local), metrics(remote));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["tokens"], y["tokens"]);
        for key in ["loss", "recon", "aux", "l0", "fve_base", "fve_chat", "dead_frac"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-5 * p.abs().max(1.0),
                "step {}: {key} {p} locally, {q} through the server",
                x["step"]
            );
        }
    }
    // Elementwise. `OfScale` for the SAE and L1, whose weights hold many near-zero entries: Adam
    // turns float-rounding differences in tiny gradients into whole steps, so the SAE's two
    // one-device routes (host loops vs tensor ops) already differ by up to 1.1e-4 of the scale after
    // 40 steps (measured on its encoder bias); L1's split run differs by 2.7e-5 of it.
    let (a, b) = (weights(local), weights(remote));
    assert_eq!(a.len(), b.len());
    for ((n, p), (m, q)) in a.iter().zip(&b) {
        assert_eq!((n, p.len()), (m, q.len()));
        let scale = p.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
        for (i, (x, y)) in p.iter().zip(q).enumerate() {
            let bound = match tolerance {
                Weights::Strict => 1e-4 * x.abs() + 1e-5 * scale,
                Weights::OfScale => 5e-4 * scale,
            };
            assert!((x - y).abs() <= bound, "{n}[{i}]: {x} vs {y} (scale {scale})");
        }
    }
}

#[test]
fn a_training_run_through_a_server_equals_the_local_run_and_the_server_logs_the_session() {
    let tmp = Scratch::new("remote-train");
    let cache = tmp.0.join("cache");
    small_cache(&cache);
    let server = Server::start(&[], &tmp.0.join("server.log"));
    let local = tmp.0.join("local");
    succeeds(&train_args("cpu", &cache, &local, "20"));
    let remote = tmp.0.join("remote");
    let line = succeeds(&train_args(&server.url, &cache, &remote, "20"));
    assert!(line.contains("step 20") && line.contains("(portable route)"), "{line}");
    assert_same_run(&local, &remote);
    // The server's log: the session, who opened it and on which device, and when it closed.
    let log = server.log_with("closed after", 1);
    assert!(
        log.contains("opened by WebSocket client 127.0.0.1:") && log.contains("on device 0 (cpu (burn flex))"),
        "{log}"
    );
    assert!(log.contains("closed after"), "{log}");
}

#[test]
fn a_wrong_or_missing_token_is_refused_on_both_sides() {
    let tmp = Scratch::new("remote-token");
    let token_file = tmp.0.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let server = Server::start(&["--token-file", token_file.to_str().unwrap()], &tmp.0.join("server.log"));
    let cache = tmp.0.join("cache");
    small_cache(&cache);
    let run = tmp.0.join("run");
    for (token, says) in [(None, "the server requires a token"), (Some("wrong"), "the server refused the token")] {
        let mut args = train_args(&server.url, &cache, &run, "20");
        if let Some(t) = token {
            args.extend(["--remote-token", t]);
        }
        let r = crossdiff(&args);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(says) && err.contains(&server.url), "{err}");
        assert!(!run.exists(), "a refused client wrote nothing");
    }
    // The right token, from the environment.
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
        .args(train_args(&server.url, &cache, &run, "20"))
        .env("CROSSDIFF_REMOTE_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let log = server.log_with("refused WebSocket client 127.0.0.1:", 2);
    assert_eq!(log.matches("refused WebSocket client 127.0.0.1:").count(), 2, "{log}");
    assert!(log.contains("wrong or missing token"), "{log}");
    assert!(!log.contains("s3cret"), "the log never shows a token: {log}");

    // --remote-token reaches every --devices entry (and a refusal there names --devices).
    let parallel = tmp.0.join("parallel");
    let mut args = train_args("cpu", &cache, &parallel, "20");
    args.extend(["--devices", &server.url]);
    let r = crossdiff(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains(&format!("--devices {}: the server requires a token", server.url)),
        "{err}"
    );
    args.extend(["--remote-token", "s3cret"]);
    succeeds(&args);
    // … and the server CROSSDIFF_BACKEND names when --backend is left at auto.
    let via_env = tmp.0.join("via-env");
    let mut args = train_args("auto", &cache, &via_env, "20");
    args.extend(["--remote-token", "s3cret"]);
    let r = Command::new(env!("CARGO_BIN_EXE_crossdiff"))
        .args(&args)
        .env_remove("CROSSDIFF_REMOTE_TOKEN")
        .env("CROSSDIFF_BACKEND", &server.url)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("(portable route)"));
}

#[test]
fn bad_serve_and_remote_flags_are_one_line() {
    let tmp = Scratch::new("remote-flags");
    let empty = tmp.0.join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--backend", "cpu", "serve", "--port", "0", "--bind", "0.0.0.0"],
            "--bind 0.0.0.0: listening beyond this machine needs a token",
        ),
        (vec!["--backend", "cpu", "serve", "--port", "0", "--token", ""], "--token: the token is empty"),
        (
            vec!["--backend", "cpu", "serve", "--port", "0", "--token-file", empty.to_str().unwrap()],
            "the token is empty",
        ),
        (
            vec!["--backend", "cpu", "serve", "--port", "0", "--token-file", "/nonexistent/token"],
            "--token-file /nonexistent/token: cannot read",
        ),
        (
            vec!["--backend", "remote:ws://127.0.0.1:9", "serve", "--port", "0"],
            "a server hosts a device of its own machine",
        ),
        (
            vec!["--backend", "remote:http://x:1", "inspect", "--model", "m", "--prompt", "p", "--out", "o"],
            "expected remote:ws://HOST:PORT",
        ),
        (vec!["--backend", "remote:ws://x", "inspect", "--model", "m", "--prompt", "p", "--out", "o"], "no port"),
        (
            vec!["--backend", "remote:ws://x:99999", "inspect", "--model", "m", "--prompt", "p", "--out", "o"],
            "is not a port number",
        ),
    ];
    for (args, says) in cases {
        let r = crossdiff(&args);
        assert!(!r.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says) && !err.contains("mid-job"), "{args:?}: {err}");
    }
    // A port in use: the second server on the first one's port.
    let server = Server::start(&[], &tmp.0.join("server.log"));
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let r = crossdiff(&["--backend", "cpu", "serve", "--port", &port]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("the port is in use"), "{err}");
    // Nobody listening: the client says so and how to start one.
    drop(server);
    let cache = tmp.0.join("cache");
    small_cache(&cache);
    let url = format!("remote:ws://127.0.0.1:{port}");
    let r = crossdiff(&train_args(&url, &cache, &tmp.0.join("run"), "20"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.trim().lines().count() == 1, "{err}");
    assert!(err.contains("no server answers there") && err.contains("crossdiff serve --port"), "{err}");
    assert!(!err.contains("mid-job"), "a server never reached did not stop mid-job: {err}");
    assert!(!tmp.0.join("run").exists());
}

#[test]
fn a_server_killed_mid_run_stops_the_client_clearly_and_the_run_resumes() {
    let tmp = Scratch::new("remote-kill");
    let cache = tmp.0.join("cache");
    small_cache(&cache);
    let mut server = Server::start(&[], &tmp.0.join("server.log"));
    let run = tmp.0.join("run");
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_crossdiff"))
            .args(train_args(&server.url, &cache, &run, "100000"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let client = &mut guard.0;
    let state = run.join("checkpoint/state.json");
    let started = std::time::Instant::now();
    loop {
        assert!(client.try_wait().unwrap().is_none(), "the client stopped before the server was killed");
        assert!(started.elapsed().as_secs() < 120, "no checkpoint within 2 minutes");
        if std::fs::read_to_string(&state).is_ok_and(|t| t.contains("\"step\"")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let waited = std::time::Instant::now();
    let out = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        assert!(waited.elapsed().as_secs() < 60, "the client hangs after its server died");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!out.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut err).unwrap();
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    assert!(last.contains("the remote server") && last.contains("re-run the same command to resume"), "{err}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let saved = saved["step"].as_u64().unwrap();
    assert!(saved >= 5 && saved % 5 == 0, "the checkpoint stays a whole one: step {saved}");

    // A new server; the same command resumes from the checkpoint (to a finite number of steps).
    let server = Server::start(&[], &tmp.0.join("server2.log"));
    let target = (saved + 10).to_string();
    succeeds(&train_args(&server.url, &cache, &run, &target));
    let lines = metrics(&run);
    let steps: Vec<u64> = lines.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=saved + 10).collect::<Vec<_>>(), "one line per step, none twice");
    let _ = assets();
}

/// Every tensor of each shard: the activations within one bf16 rounding, the rest exact.
fn assert_same_cache(local: &Path, remote: &Path) {
    let mut shards: Vec<_> = std::fs::read_dir(local).unwrap().map(|e| e.unwrap().file_name()).collect();
    shards.retain(|n| n.to_string_lossy().ends_with(".safetensors"));
    assert!(!shards.is_empty());
    for name in shards {
        let (a, b) = (std::fs::read(local.join(&name)).unwrap(), std::fs::read(remote.join(&name)).unwrap());
        let (a, b) =
            (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
        for (tensor, view) in a.tensors() {
            let other = b.tensor(&tensor).unwrap();
            assert_eq!(view.shape(), other.shape(), "{tensor}");
            if tensor != "acts" {
                assert_eq!(view.data(), other.data(), "{name:?} {tensor}");
                continue;
            }
            let bf16 = |d: &[u8]| {
                d.chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect::<Vec<_>>()
            };
            for (x, y) in bf16(view.data()).iter().zip(bf16(other.data())) {
                assert!(
                    (x - y).abs() <= x.abs().max(y.abs()) / 128.0 + 1e-6,
                    "{name:?}: {x} locally, {y} through the server"
                );
            }
        }
    }
}

#[test]
fn cache_analyze_kl_and_steer_through_a_server_equal_the_local_ones() {
    let tmp = Scratch::new("remote-cache");
    let server = Server::start(&[], &tmp.0.join("server.log"));
    let a = assets();
    let (base, chat, web) = (a.join("tiny-gemma2/base"), a.join("tiny-gemma2/chat"), a.join("data/web.txt"));
    let cache = |backend: &str, out: &Path, devices: Option<&str>| {
        let mut args = vec![
            "--backend",
            backend,
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
            "600",
            "--context",
            "64",
            "--shard-tokens",
            "256",
            "--batch-tokens",
            "128",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(d) = devices {
            args.extend(["--devices", d]);
        }
        succeeds(&args)
    };
    let (local, remote) = (tmp.0.join("local"), tmp.0.join("remote"));
    cache("cpu", &local, None);
    let line = cache(&server.url, &remote, None);
    assert!(line.starts_with("cache: 600 tokens in 3 shards") && line.contains("remote ws://127.0.0.1:"), "{line}");
    assert_same_cache(&local, &remote);
    // The forward batches fanned out over two servers, and over this machine beside a server
    // (batches of 128 padded tokens: several per shard, so every device takes some).
    let other = Server::start(&[], &tmp.0.join("other.log"));
    for (devices, name) in [(format!("{},{}", server.url, other.url), "two"), (format!("cpu,{}", other.url), "mixed")] {
        let out = tmp.0.join(name);
        let line = cache("cpu", &out, Some(&devices));
        assert!(line.starts_with("cache: 600 tokens in 3 shards") && line.contains("fanned out over"), "{line}");
        assert_same_cache(&local, &out);
    }
    assert!(other.log().contains("session 2 opened"), "both fan-outs used the second server: {}", other.log());

    // One trained run, analysed here and through the server: the same latents table.
    let run = tmp.0.join("run");
    succeeds(&train_args("cpu", &local, &run, "20"));
    let analyze = |backend: &str| {
        succeeds(&[
            "--backend",
            backend,
            "analyze",
            "--run",
            run.to_str().unwrap(),
            "--cache",
            local.to_str().unwrap(),
        ]);
        std::fs::read_to_string(run.join("latents.csv")).unwrap()
    };
    let (here, there) = (analyze("cpu"), analyze(&server.url));
    let (here, there): (Vec<&str>, Vec<&str>) = (here.lines().collect(), there.lines().collect());
    assert_eq!(here.len(), 65);
    assert_eq!(here[0], there[0]);
    for (x, y) in here[1..].iter().zip(&there[1..]) {
        for (p, q) in x.split(',').zip(y.split(',')) {
            match (p.parse::<f64>(), q.parse::<f64>()) {
                (Ok(p), Ok(q)) => {
                    assert!((p - q).abs() <= 1e-3 * p.abs().max(1.0) || (p.is_nan() && q.is_nan()), "{x}\n{y}")
                }
                _ => assert_eq!(p, q, "{x}\n{y}"),
            }
        }
    }
    // kl and steer on the same run: the same table, the same greedy completions.
    let kl = |backend: &str| {
        let conversations = a.join("data/chat.jsonl");
        let args = [
            "--backend",
            backend,
            "kl",
            "--run",
            run.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--chat",
            chat.to_str().unwrap(),
            "--data",
            conversations.to_str().unwrap(),
            "--conversations",
            "8",
        ];
        succeeds(&args);
        let rows: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("kl.json")).unwrap()).unwrap();
        rows.as_array().unwrap().clone()
    };
    let (here, there) = (kl("cpu"), kl(&server.url));
    assert!(here.len() >= 2 && here.len() == there.len());
    for (x, y) in here.iter().zip(&there) {
        assert_eq!(
            (&x["condition"], &x["tokens_all"], &x["latents"]),
            (&y["condition"], &y["tokens_all"], &y["latents"])
        );
        for key in ["mean_all", "mean_first9"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-4 * p.abs().max(1e-3), "{}: {key} {p} here, {q} there", x["condition"]);
        }
    }
    let steer = |backend: &str| {
        let args = [
            "--backend",
            backend,
            "steer",
            "--run",
            run.to_str().unwrap(),
            "--model",
            chat.to_str().unwrap(),
            "--latent",
            "3",
            "--strength",
            "4",
            "--prompt",
            "The river",
            "--max-tokens",
            "8",
        ];
        let out = succeeds(&args);
        out.lines().filter(|l| !l.starts_with("steer:")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(steer("cpu"), steer(&server.url));
}

#[test]
fn data_parallel_training_over_two_servers_equals_the_one_device_run() {
    let tmp = Scratch::new("remote-dp");
    let cache = tmp.0.join("cache");
    small_cache(&cache);
    let (one, two) = (Server::start(&[], &tmp.0.join("one.log")), Server::start(&[], &tmp.0.join("two.log")));
    // A batch that does not divide evenly, and dead latents early so AuxK's batch-global
    // normaliser and its gradients are part of the comparison.
    let args = |backend: &str, devices: Option<String>, out: &Path| -> Vec<String> {
        let mut a: Vec<String> = train_args(backend, &cache, out, "40").iter().map(|s| s.to_string()).collect();
        for (flag, value) in [("--batch", "50"), ("--dict-size", "256")] {
            let i = a.iter().position(|s| s == flag).unwrap();
            a[i + 1] = value.to_string();
        }
        a.extend(["--dead-tokens".to_string(), "100".to_string()]);
        if let Some(d) = devices {
            a.extend(["--devices".to_string(), d]);
        }
        a
    };
    let run = |a: Vec<String>| succeeds(&a);
    let single = tmp.0.join("single");
    run(args("cpu", None, &single));
    let parallel = tmp.0.join("parallel");
    let line = run(args("cpu", Some(format!("{},{}", one.url, two.url)), &parallel));
    assert!(line.contains("data-parallel over remote ws://127.0.0.1:"), "{line}");
    let m = metrics(&single);
    assert!(m.last().unwrap()["dead_frac"].as_f64().unwrap() > 0.1 && m.last().unwrap()["aux"].as_f64().unwrap() > 0.0);
    assert_same_run(&single, &parallel);
    // A run begun on two servers and finished on this machine alone (the checkpoint knows no
    // devices): the one-device run again.
    let switched = tmp.0.join("switched");
    let mut first_half = args("cpu", Some(format!("{},{}", two.url, one.url)), &switched);
    let i = first_half.iter().position(|s| s == "--steps").unwrap();
    first_half[i + 1] = "20".to_string();
    run(first_half);
    run(args("cpu", None, &switched));
    assert_same_run(&single, &switched);
    // A local device beside a server, three slices.
    let mixed = tmp.0.join("mixed");
    run(args("cpu", Some(format!("cpu,{},{}", two.url, one.url)), &mixed));
    assert_same_run(&single, &mixed);
    // Variants, each run on one device and split: `set` replaces flag values, `extra` adds flags.
    let variant = |devices: Option<String>, out: &Path, set: &[(&str, &str)], extra: &[&str]| {
        let mut a = args("cpu", devices, out);
        for (flag, value) in set {
            let i = a.iter().position(|s| s == flag).unwrap();
            a[i + 1] = value.to_string();
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        run(a);
    };
    let cases: [(&str, &str, &[(&str, &str)], &[&str]); 4] = [
        // The paper's squared reconstruction term.
        ("squared", "", &[], &["--squared-recon"]),
        // Batches of 4 rows with k = 1 over three devices: slices of one or two rows, most of them
        // without a single pick (their decoder gradient is 0, not an error).
        ("tiny", "cpu,", &[("--batch", "4"), ("--k", "1"), ("--dict-size", "64")], &[]),
        // L1: its means over B and the activity counts behind the dead fraction.
        ("l1", "", &[], &["--kind", "l1", "--mu", "0.5"]),
        // A diff-SAE: its encoder reads x − b_dec (b_dec's gradient through the encoder too).
        ("sae", "", &[], &["--kind", "sae"]),
    ];
    for (name, local, set, extra) in cases {
        let (single, split) = (tmp.0.join(format!("{name}-one")), tmp.0.join(format!("{name}-split")));
        variant(None, &single, set, extra);
        variant(Some(format!("{local}{},{}", one.url, two.url)), &split, set, extra);
        // The dead-latent bookkeeping (L1's activity counts; AuxK for the others) took part.
        let last = metrics(&single).pop().unwrap();
        assert!(last["dead_frac"].as_f64().unwrap() > 0.0, "{name}: no dead latents to compare");
        if name != "l1" {
            assert!(last["aux"].as_f64().unwrap() > 0.0, "{name}: AuxK did not run");
        }
        let tolerance = if name == "sae" || name == "l1" { Weights::OfScale } else { Weights::Strict };
        assert_same_run_within(&single, &split, tolerance);
    }
    // Every data-parallel run above opened a session on both servers (and closed it).
    assert!(one.log_with("closed after", 6).matches("closed after").count() >= 6, "{}", one.log());
    assert!(two.log_with("closed after", 6).matches("closed after").count() >= 6, "{}", two.log());

    // Refused in one line before anything is written.
    for (devices, kind, says) in [
        (format!("{},{}", one.url, one.url), "batchtopk", "is given twice"),
        // `auto` settles on the CPU (CROSSDIFF_BACKEND below): the same device as `cpu`.
        ("auto,cpu".to_string(), "batchtopk", "--devices: cpu is given twice (entry 2)"),
    ] {
        let out = tmp.0.join("refused");
        let mut a = args("cpu", Some(devices), &out);
        a.extend(["--kind".to_string(), kind.to_string()]);
        let r =
            Command::new(env!("CARGO_BIN_EXE_crossdiff")).args(&a).env("CROSSDIFF_BACKEND", "cpu").output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.trim().lines().count() == 1 && err.contains(says), "{err}");
        assert!(!out.exists());
    }
}
