//! The desktop app driven through its accessible labels (egui_kittest), on the committed fixtures.

use std::time::{Duration, Instant};

use crossdiff::analysis::latents::{LatentClass, read_latents_csv};
use crossdiff_app::app::CrossdiffApp;
use crossdiff_app::commands::AppCommand;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

/// Steps the UI until `label` (a substring) shows up; background work needs real time.
fn wait_for(harness: &mut Harness<'_, CrossdiffApp>, label: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        harness.step();
        if harness.query_by_label_contains(label).is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("'{label}' did not appear within 60 s");
}

#[test]
fn loads_both_models_and_runs_a_prompt_on_each() {
    let mut harness = Harness::builder()
        .with_size(eframe::egui::vec2(1100.0, 720.0))
        .build_eframe(|cc| CrossdiffApp::new(cc.egui_ctx.clone()));
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "tiny-gemma2/base\nGemma 2 · 4 layers, width 72, vocab 676");
    wait_for(&mut harness, "tiny-gemma2/chat\nGemma 2 · 4 layers, width 72, vocab 676");
    // Configs side by side and the memory both need (parameter counts from config.json).
    let c = crossdiff::ModelConfig::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-gemma2/base/config.json"),
    )
    .unwrap();
    let gib = (2 * c.parameter_count() * 4) as f64 / (1u64 << 30) as f64;
    wait_for(&mut harness, &format!("Memory for both models' weights: {gib:.2} GiB in f32"));
    harness.get_by_label("query_pre_attn_scalar");
    harness.get_by_label("Run on both").click();
    // Greedy continuations of the rendered chat prompt appear under both columns.
    wait_for(&mut harness, "answer base:");
    wait_for(&mut harness, "answer chat:");
}

#[test]
fn a_bad_model_directory_shows_an_error_not_a_crash() {
    let mut harness = Harness::builder().build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.set_model_dirs(["/no/such/base".into(), "/no/such/chat".into()]);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "error: /no/such/base: not a model snapshot directory");
}

/// A small analysed run: a cache from the fixtures, a crosscoder with latents of every class, its
/// latents.csv and examples store.
fn analysed_run(tag: &str) -> std::path::PathBuf {
    use crossdiff::activations::cache::ActDtype;
    use crossdiff::activations::writer::{CacheJob, run_cache};
    use crossdiff::crosscoder::{Crosscoder, CrosscoderConfig, Kind, Params, read_vec, tensor};
    use crossdiff::data::TokenizeOptions;
    let root = std::env::temp_dir().join(format!("crossdiff-app-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let job = CacheJob {
        base: assets.join("tiny-gemma2/base"),
        chat: assets.join("tiny-gemma2/chat"),
        chat_adapter: None,
        data: vec![assets.join("data/web.txt"), assets.join("data/chat.jsonl")],
        layer: 1,
        tokens: 400,
        out: root.join("cache"),
        dtype: ActDtype::F32,
        tokenize: TokenizeOptions { context: 48, ..Default::default() },
        mix: true,
        shard_tokens: 256,
        batch_tokens: 256,
        low_memory: false,
        load: crossdiff::LoadOptions::default(),
        devices: Vec::new(),
    };
    let device = burn::tensor::Device::flex();
    run_cache(&job, &device, |_| {}, || true).unwrap();
    let (d, dict) = (72, 40);
    let p = Params::init(d, dict, 0.3, 7, &device);
    let mut w_dec = read_vec(p.w_dec.clone()).unwrap();
    for j in 0..dict {
        let (sb, sc) = match j % 8 {
            0 => (0.02, 1.0),
            2 => (1.0, 0.05),
            3 => (0.5, 1.0),
            _ => (1.0, 1.0),
        };
        for i in 0..d {
            w_dec[j * 2 * d + i] *= sb;
            w_dec[j * 2 * d + d + i] *= sc;
        }
    }
    let cc = Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::L1,
            d,
            dict_size: dict,
            k: 0,
            mu: 0.0,
            layer: Some(1),
            models: vec![],
            // The fixtures' identities: jobs that use the run check the models they are given.
            model_ids: vec![
                crossdiff::Snapshot::open(&assets.join("tiny-gemma2/base")).unwrap().identity().unwrap(),
                crossdiff::Snapshot::open(&assets.join("tiny-gemma2/chat")).unwrap().identity().unwrap(),
            ],
            target: None,
        },
        params: Params { w_dec: tensor(w_dec, [dict, 2 * d], &device), ..p },
        threshold: None,
        file_checksum: None,
    };
    let run = root.join("run");
    cc.save(&run).unwrap();
    let run_dir = crossdiff::run_dir::RunDir::new(&run);
    let opts = crossdiff::analysis::analyze::AnalyzeOptions::default();
    let (rows, summary) =
        crossdiff::analysis::analyze::analyze(&run_dir, &cc, &root.join("cache"), &device, &opts, |_, _| {}, || true)
            .unwrap();
    run_dir.write_latents(&rows, &summary).unwrap();
    let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
    let ex = crossdiff::analysis::examples::ExamplesOptions { top_n: 3, per_bin: 1, context: 4, ..Default::default() };
    crossdiff::analysis::examples::build_examples(
        &run_dir,
        &cc,
        &root.join("cache"),
        &device,
        &max_act,
        None,
        &ex,
        None,
    )
    .unwrap();
    run
}

#[test]
fn latents_view_filters_rows_and_opens_the_dashboard() {
    let run = analysed_run("latents");
    let rows = read_latents_csv(&run.join("latents.csv")).unwrap();
    let chat_only = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).count();
    assert!(chat_only > 0 && chat_only < rows.len());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 800.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.latents.run_dir = run.display().to_string();
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Latents").click();
    harness.run_steps(2);
    harness.get_by_label("Load run").click();
    harness.run_steps(2);
    harness.get_by_label("40 of 40 latents shown");
    // Class filter: chat-only rows only.
    harness.get_by_label("Class").click();
    harness.run_steps(2);
    harness.get_by_label("chat_only").click();
    harness.run_steps(3);
    harness.get_by_label(&format!("{chat_only} of 40 latents shown"));
    // Search by index, then open that latent's dashboard.
    harness.get_by_label("Class").click();
    harness.run_steps(2);
    harness.get_by_label("all").click();
    harness.run_steps(3);
    harness.get_by_label("40 of 40 latents shown");
    // ν^ε at most 0.2: only latents whose error beta ratio was computed and is that small.
    let low_nu = rows.iter().filter(|r| r.nu_error.is_some_and(|v| v <= 0.2)).count();
    harness.get_by_label("ν^ε at most").click();
    harness.run_steps(3);
    harness.get_by_label(&format!("{low_nu} of 40 latents shown"));
    harness.get_by_label("ν^ε at most").click();
    harness.run_steps(3);
    harness.get_by_label("40 of 40 latents shown");
    harness.get_by_label("Latent index").focus();
    harness.get_by_label("Latent index").type_text("16");
    harness.run_steps(3);
    harness.get_by_label("1 of 40 latents shown");
    harness.get_by_label_contains("     16 ").click();
    harness.run_steps(3);
    harness.get_by_label("Latent 16");
    let verdict = rows[16].verdict();
    harness.get_by_label(&format!("class {} — {verdict}", rows[16].class));
    harness.get_by_label("Activation histogram (fraction of max)");
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

#[test]
fn train_view_shows_progress_and_cancel_stops_then_resumes() {
    let run = analysed_run("train");
    let root = run.parent().unwrap().to_path_buf();
    let out = root.join("train-run");
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.train.cache_dir = root.join("cache").display().to_string();
        app.train.run_dir = out.display().to_string();
        app.train.config.dict_size = Some(64);
        app.train.config.k = 4;
        app.train.config.batch = 16;
        app.train.config.steps = Some(10_000_000);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Train").click();
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training status: step");
    // Rate and ETA from the progress reports.
    wait_for(&mut harness, "training rate ");
    harness.get_by_label("Cancel training").click();
    wait_for(&mut harness, "training cancelled: BatchTopK D=64 at step ");
    let step = |p: &std::path::Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("checkpoint/state.json")).unwrap()).unwrap();
        v["step"].as_u64().unwrap()
    };
    let first = step(&out);
    harness.run_steps(2);
    harness.get_by_label_contains(&format!("checkpoint: step {first} "));
    assert!(first > 0 && first < 10_000_000, "cancel checkpointed mid-run at step {first}");
    // Start again: the run resumes from the checkpoint instead of starting over.
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training status: step");
    harness.get_by_label("Cancel training").click();
    wait_for(&mut harness, "training cancelled: BatchTopK D=64 at step ");
    let last = step(&out);
    assert!(last > first);
    harness.get_by_label_contains(&format!("at step {last} of 10000000, checkpoint saved in "));
    assert!(out.join("crosscoder.safetensors").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// The whole text of the first label that contains `part` (AccessKit keeps a label's text in its
/// value).
fn label_text(harness: &Harness<'_, CrossdiffApp>, part: &str) -> String {
    use egui_kittest::kittest::NodeT;
    let node = harness.get_by_label_contains(part).accesskit_node();
    node.value().or_else(|| node.label()).unwrap_or_default()
}

/// A failed job shows its error (phrased with the view's own labels, no CLI flags) and nothing of
/// its progress; the checkbox an error points at lets the job go on.
#[test]
fn train_view_errors_name_its_fields_and_leave_only_the_error() {
    let run = analysed_run("train-errors");
    let root = run.parent().unwrap().to_path_buf();
    let (cache, out) = (root.join("cache"), root.join("train-errors"));
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.tab = crossdiff_app::commands::Tab::Train;
        app.train.cache_dir = cache.display().to_string();
        app.train.run_dir = out.display().to_string();
        app.train.config.dict_size = Some(64);
        app.train.config.k = 4;
        app.train.config.batch = 16;
        app.train.config.steps = Some(20);
        app.train.config.lr = f64::NAN;
        app
    });
    harness.run_steps(2);
    let start_and_fail = |harness: &mut Harness<'_, CrossdiffApp>| -> String {
        harness.get_by_label("Start training").click();
        wait_for(harness, "training failed — error: ");
        let error = label_text(harness, "training failed — error: ");
        assert!(!error.contains("--"), "a CLI flag in the app's error: {error}");
        // Only the error: no progress, status, rate or Cancel of the failed job.
        assert!(harness.query_by_label_contains("training status").is_none());
        assert!(harness.query_by_label_contains("training rate").is_none());
        assert!(harness.query_by_label("Cancel training").is_none());
        let job = harness.state().train.job.job().unwrap();
        assert_eq!((job.progress, job.status.as_str(), job.phase.as_str()), ((0, 0), "", ""));
        error
    };
    // A bad value: named by the view's label.
    let error = start_and_fail(&mut harness);
    assert_eq!(error, "training failed — error: Learning rate must be a positive finite number, not NaN");
    harness.state_mut().train.config.lr = 1e-3;
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training finished: BatchTopK D=64 at step 20 of 20, saved in ");
    // Other settings on the same run directory: the error points at the view's field.
    harness.state_mut().train.config.k = 8;
    let error = start_and_fail(&mut harness);
    assert!(
        error.ends_with(
            "started with other settings: “k” 4, now “k” 8; start the same job again to resume it, or choose \
             another “Run directory”"
        ),
        "{error}"
    );
    // An interrupted cache: the error points at the checkbox, which lets training go on.
    let index = cache.join("cache.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["complete"] = serde_json::Value::Bool(false);
    std::fs::write(&index, v.to_string()).unwrap();
    harness.state_mut().train.run_dir = root.join("train-partial").display().to_string();
    harness.state_mut().train.config.k = 4;
    let error = start_and_fail(&mut harness);
    assert!(error.contains("the cache is incomplete"), "{error}");
    assert!(error.ends_with("or tick “Use an incomplete cache” to use what is there"), "{error}");
    harness.get_by_label("Use an incomplete cache").click();
    harness.run_steps(1);
    assert!(harness.state().train.config.allow_partial);
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training finished: BatchTopK D=64 at step 20 of 20");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn cache_view_estimates_disk_and_runs_a_cache() {
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let out = std::env::temp_dir().join(format!("crossdiff-app-cacheview-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.cache.data =
            format!("{}\n{}", assets.join("data/web.txt").display(), assets.join("data/chat.jsonl").display());
        app.cache.out_dir = out.display().to_string();
        app.cache.config.tokens = 1000;
        app.cache.config.tokenize.context = 48;
        app.cache.config.dtype = crossdiff::activations::cache::ActDtype::F32;
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Cache").click();
    harness.run_steps(2);
    // 1000 tokens × 2 models × 72 wide × 4 bytes.
    harness.get_by_label("Disk needed: 0.00 GB");
    assert_eq!(harness.state().cache.disk_estimate(), Some(1000 * 2 * 72 * 4));
    harness.get_by_label("Start caching").click();
    wait_for(&mut harness, "caching finished: 1000 tokens");
    let index = crossdiff::activations::cache::CacheIndex::open(&out).unwrap();
    assert!(index.complete && index.total_tokens == 1000);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn plots_view_draws_the_figures_exports_csv_and_opens_a_clicked_latent() {
    let run = analysed_run("plots");
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 1000.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.plots.run_dir = run.display().to_string();
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Plots").click();
    harness.run_steps(2);
    harness.get_by_label("Load figures").click();
    harness.run_steps(3);
    harness.get_by_label("Relative decoder norm Δ");
    harness.get_by_label_contains("ν^ε vs ν^r");
    harness.get_by_label("Decoder cosine per class");
    harness.get_by_label("ν^ε histogram");
    harness.get_by_label("ν^r histogram");
    harness.get_by_label("Activation frequency per class");
    harness.get_by_label("Export CSV: Relative decoder norm Δ").click();
    harness.run_steps(2);
    let csv = std::fs::read_to_string(run.join("fig-delta.csv")).unwrap();
    let rows = read_latents_csv(&run.join("latents.csv")).unwrap();
    let live = rows.iter().filter(|r| r.class != LatentClass::Dead).count() as u64;
    let total: u64 =
        csv.lines().skip(1).map(|l| l.split(',').skip(2).map(|c| c.parse::<u64>().unwrap()).sum::<u64>()).sum();
    assert_eq!(total, live, "every live latent is in one bin");
    // PNG export of the figures, as rendered (needs the wgpu renderer: lavapipe in CI).
    if crossdiff::Backend::Wgpu.device().is_ok() {
        harness.get_by_label("Export PNG").click();
        harness.run_steps(3);
        let png = image::open(run.join("figures.png")).unwrap();
        assert_eq!((png.width(), png.height()), (1300, 1000));
        harness.get_by_label_contains("wrote ");
    }
    // A click on a point asks for its latent (a command): the Latents view opens on its dashboard.
    harness.state_mut().push(AppCommand::OpenLatent { run: run.display().to_string(), latent: 8 });
    harness.run_steps(3);
    harness.get_by_label("Latent 8");
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

#[test]
fn compare_view_puts_two_runs_side_by_side() {
    let a = analysed_run("compare-a");
    let b = analysed_run("compare-b");
    let rows = read_latents_csv(&a.join("latents.csv")).unwrap();
    let (chat, pass) = crossdiff_app::compare_view::chat_only_passing(&rows);
    let want_pass = rows
        .iter()
        .filter(|r| {
            r.class == LatentClass::ChatOnly
                && r.nu_error.is_some_and(|v| v < 0.2)
                && r.nu_reconstruction.is_some_and(|v| v < 0.5)
        })
        .count();
    assert_eq!(pass, want_pass);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.compare.runs = [a.display().to_string(), b.display().to_string()];
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Compare runs").click();
    harness.run_steps(2);
    harness.get_by_label("Compare").click();
    harness.run_steps(3);
    let c = &summary["classes"];
    harness.get_by_label(&format!(
        "run 1: chat-only {}, base-only {}, shared {}, other {}, dead {}",
        c["chat_only"], c["base_only"], c["shared"], c["other"], c["dead"]
    ));
    harness.get_by_label_contains(&format!("run 2: {pass} of {chat} chat-only latents pass Latent Scaling"));
    assert!(harness.query_by_label_contains("not comparable").is_none(), "like for like: no warning");
    // A run of another layer: still shown, with a warning saying how they differ.
    let config = b.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"layer\": 1", "\"layer\": 2");
    std::fs::write(&config, text).unwrap();
    harness.get_by_label("Compare").click();
    harness.run_steps(3);
    harness.get_by_label_contains("are not comparable: layer 1 vs 2");
    harness.get_by_label_contains(&format!("run 2: {pass} of {chat} chat-only latents pass Latent Scaling"));
    for r in [a, b] {
        std::fs::remove_dir_all(r.parent().unwrap()).unwrap();
    }
}

#[test]
fn steering_view_generates_side_by_side_from_the_dashboard_button() {
    let run = analysed_run("steer");
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.latents.run_dir = run.display().to_string();
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Latents").click();
    harness.run_steps(2);
    harness.get_by_label("Load run").click();
    harness.run_steps(2);
    harness.get_by_label("Latent index").focus();
    harness.get_by_label("Latent index").type_text("3");
    harness.run_steps(3);
    harness.get_by_label_contains("      3 ").click();
    harness.run_steps(3);
    harness.get_by_label("Steer with latent 3").click();
    harness.run_steps(3);
    // The Steering view opened with latent 3 at strength 1.
    harness.get_by_label("remove latent 3");
    harness.get_by_label("Generate steered").click();
    wait_for(&mut harness, "steering finished: 1 latents at layer 1");
    wait_for(&mut harness, "unsteered: ");
    // Both columns: the steered label starts with "steered: " (the other one contains it too).
    assert_eq!(harness.query_all_by_label_contains("steered: ").count(), 2);
    // The run's models are checked; the checkbox the error would point at is there.
    assert!(!harness.state().steering.config.allow_other_models, "off by default, as in SteerJob");
    harness.get_by_label("Allow other models").click();
    harness.run_steps(1);
    assert!(harness.state().steering.config.allow_other_models);
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

#[test]
fn adl_view_runs_the_lens_and_shows_its_tokens_and_steered_answers() {
    let out = std::env::temp_dir().join(format!("crossdiff-app-adl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/data/web.txt");
    let (data_text, out_text) = (data.display().to_string(), out.display().to_string());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.adl.data = data_text;
        app.adl.out_dir = out_text;
        app.adl.config.samples = 8;
        app.adl.config.max_new_tokens = 3;
        app
    });
    harness.run_steps(2);
    harness.get_by_label("ADL").click();
    harness.run_steps(2);
    // The bundled pair's middle block, as the authors choose it (int(0.5·(4 − 1))).
    assert_eq!(harness.state().adl.config.layer, 1);
    harness.get_by_label("Run ADL").click();
    wait_for(&mut harness, "ADL finished: 8 documents × 16 positions at layer 1");
    wait_for(&mut harness, "prompt: Tell me a story?");
    // One answer per default prompt and strength.
    assert_eq!(harness.query_all_by_label_contains("answer: ").count(), 3 * 5);
    // The table reads through the chat model, and through the base model when ticked.
    let report = crossdiff::workflow::adl::read_report(&out).unwrap();
    let shown = |lens: &crossdiff::analysis::adl::Lens| {
        lens.promoted
            .iter()
            .take(8)
            .map(|t| crossdiff_app::widgets::printable(&t.token))
            .collect::<Vec<_>>()
            .join(" · ")
    };
    let (chat, base) = (shown(&report.per_position[3].chat), shown(&report.per_position[3].base));
    assert_ne!(chat, base);
    harness.get_by_label(&chat);
    assert!(harness.query_by_label(&base).is_none());
    harness.get_by_label("Read through the base model").click();
    harness.run_steps(2);
    harness.get_by_label(&base);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn prompt_lab_shows_per_token_kl_and_latents() {
    let run = analysed_run("lab");
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.prompt_lab.run_dir = run.display().to_string();
        app.prompt_lab.latents = "3, 8".into();
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Prompt lab").click();
    harness.run_steps(2);
    harness.get_by_label("Analyse").click();
    wait_for(&mut harness, "analysis finished:");
    harness.run_steps(3);
    harness.get_by_label("latent 3");
    harness.get_by_label("latent 8");
    harness.get_by_label("KL(chat || base) of next");
    // Base and chat swapped: the run records its models, the error points at the view's checkbox,
    // which lets the analysis go on.
    let lab = &mut harness.state_mut().prompt_lab;
    std::mem::swap(&mut lab.base_dir, &mut lab.chat_dir);
    harness.get_by_label("Analyse").click();
    wait_for(&mut harness, "analysis failed — error: ");
    let error = label_text(&harness, "analysis failed — error: ");
    assert!(
        error.ends_with(
            "(base and chat swapped? or, for a LoRA fine-tune, “Chat adapter (LoRA, optional)” missing?); tick “Allow other models” to go on anyway"
        ),
        "{error}"
    );
    assert!(!error.contains("--"), "{error}");
    harness.get_by_label("Allow other models").click();
    harness.run_steps(1);
    assert!(harness.state().prompt_lab.config.allow_other_models);
    harness.get_by_label("Analyse").click();
    wait_for(&mut harness, "analysis finished:");
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

#[test]
fn opening_a_project_fills_every_view_and_remembers_it() {
    let run = analysed_run("project");
    let root = run.parent().unwrap().to_path_buf();
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let proj = root.join("proj");
    let p = crossdiff::workflow::project::Project::create(
        &proj,
        assets.join("tiny-gemma2/base"),
        assets.join("tiny-gemma2/chat"),
        vec![assets.join("data/web.txt")],
    )
    .unwrap();
    // The analysed run, moved under the project's runs/.
    std::fs::rename(&run, proj.join("runs/l1")).unwrap();
    let proj2 = proj.clone();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.open_project(&proj2);
        app
    });
    harness.run_steps(2);
    harness.get_by_label(&format!("project: {}", proj.display()));
    let app = harness.state();
    assert_eq!(app.recent, vec![proj.clone()]);
    assert_eq!(app.latents.run_dir, proj.join("runs/l1").display().to_string());
    assert_eq!(app.cache.out_dir, p.resolve(&p.cache).display().to_string());
    assert_eq!(app.train.cache_dir, proj.join("cache").display().to_string());
    // The Latents view loads the project's run.
    harness.get_by_label("Latents").click();
    harness.run_steps(2);
    harness.get_by_label("Load run").click();
    harness.run_steps(2);
    harness.get_by_label("40 of 40 latents shown");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Rendered images of views whose content does not depend on paths or data (layout regressions),
/// compared with tests/snapshots/*.png. `UPDATE_SNAPSHOTS=1` rewrites them.
#[test]
fn snapshot_images_of_the_empty_views() {
    // Rendering needs a Vulkan driver (lavapipe in CI, where its absence is a failure).
    if let Err(e) = crossdiff::Backend::Wgpu.device() {
        assert!(
            std::env::var("CROSSDIFF_REQUIRE_WGPU").is_err(),
            "CROSSDIFF_REQUIRE_WGPU=1 but wgpu is unusable: {e:#}"
        );
        eprintln!("skipping snapshot images: {e:#}");
        return;
    }
    let mut results = egui_kittest::SnapshotResults::new();
    for (tab, name) in [
        ("Train", "train_view"),
        ("Analyze", "analyze_view"),
        ("Compare runs", "compare_view"),
        ("Steering", "steering_view"),
        ("Methods", "methods_view"),
    ] {
        let mut harness = Harness::builder().with_size(eframe::egui::vec2(900.0, 520.0)).build_eframe(|cc| {
            let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
            // No paths of this checkout in the images.
            app.steering.model_dir.clear();
            app.analyze.base_dir.clear();
            app.analyze.chat_dir.clear();
            // A fixed device, so the top bar reads the same on machines with and without a GPU.
            app.backend = crossdiff::Backend::Cpu;
            app
        });
        harness.run_steps(2);
        harness.get_by_label(tab).click();
        harness.run_steps(3);
        harness.snapshot(name);
        results.extend(harness.take_snapshot_results());
    }
}

#[test]
fn a_job_that_panics_shows_its_error_and_the_next_job_runs() {
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1100.0, 720.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app
    });
    harness.run_steps(2);
    // A job of the app's one mechanism that panics, in the Models view's job slot.
    let env = harness.state().job_env();
    let job = env.spawn("loading models", |_, _, handle| {
        handle.progress("loading", 1, 2, "tensors");
        panic!("boom inside the job")
    });
    harness.state_mut().models.job.start(job);
    wait_for(&mut harness, "loading models failed — error: the job panicked: boom inside the job");
    // Only the error shows: the failed job's progress and status lines are gone.
    assert!(harness.query_by_label_contains("loading models status").is_none());
    assert!(!harness.state().models.job.running());
    // The UI is free again: the next job starts and finishes.
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "loading models finished: both models on cpu");
    wait_for(&mut harness, "tiny-gemma2/chat\nGemma 2 · 4 layers, width 72, vocab 676");
    assert!(harness.query_by_label_contains("the job panicked").is_none());
}

/// A job that hangs and then panics: every frame meanwhile returns at once (nothing in a frame waits
/// on a job), and the panic ends as the job's error in the window.
#[test]
fn a_job_that_hangs_then_panics_never_holds_up_a_frame() {
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1100.0, 720.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.tab = crossdiff_app::commands::Tab::Train;
        app
    });
    harness.run_steps(2);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let job = harness.state().job_env().spawn("training", move |_, _, handle| {
        handle.progress("training", 3, 10, "steps");
        let _ = released.recv_timeout(Duration::from_secs(60));
        panic!("stuck, then boom")
    });
    harness.state_mut().train.job.start(job);
    wait_for(&mut harness, "training status: training: 3/10 steps");
    let start = Instant::now();
    for _ in 0..50 {
        harness.step();
    }
    assert!(start.elapsed() < Duration::from_secs(20), "50 frames took {:?} while the job hung", start.elapsed());
    assert!(harness.state().train.job.running());
    // Cancel asked: the window says so while the job has not stopped yet.
    harness.get_by_label("Cancel training").click();
    wait_for(&mut harness, "training cancelling");
    release.send(()).unwrap();
    wait_for(&mut harness, "training failed — error: the job panicked: stuck, then boom");
    assert!(harness.query_by_label_contains("training status").is_none());
    assert!(harness.query_by_label_contains("training cancelling").is_none());
    assert!(!harness.state().train.job.running());
}

/// Picks a device in the top bar's selector.
fn select_device(harness: &mut Harness<'_, CrossdiffApp>, name: &str) {
    harness.get_by_label("Device").click();
    harness.run_steps(2);
    harness.get_by_label(name).click();
    harness.run_steps(2);
}

#[test]
fn every_job_runs_on_the_device_the_top_bar_names() {
    let run = analysed_run("device");
    let root = run.parent().unwrap().to_path_buf();
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let (run2, root2) = (run.clone(), root.clone());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.cache.data = assets.join("data/web.txt").display().to_string();
        app.cache.out_dir = root2.join("cache-device").display().to_string();
        app.cache.config.tokens = 200;
        app.cache.config.tokenize.context = 48;
        app.train.cache_dir = root2.join("cache").display().to_string();
        app.train.run_dir = root2.join("train-device").display().to_string();
        app.train.config.dict_size = Some(64);
        app.train.config.k = 4;
        app.train.config.batch = 16;
        app.train.config.steps = Some(20);
        app.prompt_lab.run_dir = run2.display().to_string();
        app.steering.run_dir = run2.display().to_string();
        app.steering.add_latent(3);
        app
    });
    harness.run_steps(2);
    assert_eq!(harness.state().backend, crossdiff::Backend::Auto, "the app starts on auto");
    // CUDA is not in this build: every job fails opening it — each asked for the selected device.
    select_device(&mut harness, "cuda");
    assert_eq!(harness.state().backend, crossdiff::Backend::Cuda);
    for (tab, button, job) in [
        ("Cache", "Start caching", "caching"),
        ("Train", "Start training", "training"),
        ("Prompt lab", "Analyse", "analysis"),
        ("Steering", "Generate steered", "steering"),
        ("Models", "Load models", "loading models"),
    ] {
        harness.get_by_label(tab).click();
        harness.run_steps(2);
        harness.get_by_label(button).click();
        wait_for(&mut harness, &format!("{job} failed — error: “Device” cuda"));
    }
    let app = harness.state();
    for device in
        [app.cache.job.device(), app.train.job.device(), app.prompt_lab.job.device(), app.steering.job.device()]
    {
        assert_eq!(device, Some(crossdiff::Backend::Cuda));
    }
    assert_eq!(app.models.job.device(), Some(crossdiff::Backend::Cuda));
    // Back on the CPU, the same jobs run there.
    select_device(&mut harness, "cpu");
    harness.get_by_label("Train").click();
    harness.run_steps(2);
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training finished: BatchTopK D=64");
    harness.get_by_label_contains("(ran on cpu");
    // On wgpu (lavapipe here), when a Vulkan driver is there: training runs on it, and the models
    // the Models view loads are on it.
    if crossdiff::Backend::Wgpu.device().is_ok() {
        select_device(&mut harness, "wgpu");
        harness.state_mut().train.run_dir = root.join("train-wgpu").display().to_string();
        harness.run_steps(1);
        harness.get_by_label("Start training").click();
        wait_for(&mut harness, "training finished: BatchTopK D=64");
        harness.get_by_label_contains("(ran on wgpu");
        assert_eq!(harness.state().train.job.device(), Some(crossdiff::Backend::Wgpu));
        harness.get_by_label("Models").click();
        harness.run_steps(2);
        harness.get_by_label("Load models").click();
        wait_for(&mut harness, "loading models finished: both models on wgpu");
        wait_for(&mut harness, "tiny-gemma2/base\nGemma 2 · 4 layers, width 72, vocab 676, 0.");
        assert_eq!(harness.query_all_by_label_contains("parameters, on wgpu").count(), 2);
    } else {
        assert!(std::env::var("CROSSDIFF_REQUIRE_WGPU").is_err(), "CROSSDIFF_REQUIRE_WGPU=1 but wgpu is unusable");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn views_share_one_model_store() {
    let run = analysed_run("store");
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.prompt_lab.run_dir = run.display().to_string();
        app.steering.run_dir = run.display().to_string();
        app.steering.add_latent(3);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "loading models finished");
    assert_eq!(harness.state().store.len(), 2);
    // Prompt lab and Steering use the models the Models view loaded: nothing more is loaded.
    harness.get_by_label("Prompt lab").click();
    harness.run_steps(2);
    harness.get_by_label("Analyse").click();
    wait_for(&mut harness, "analysis finished:");
    harness.get_by_label("Steering").click();
    harness.run_steps(2);
    harness.get_by_label("Generate steered").click();
    wait_for(&mut harness, "steering finished:");
    assert_eq!(harness.state().store.len(), 2);
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

/// The demo project (`crossdiff demo`'s pipeline on the committed miniature pair, at a smaller
/// size), built in its own folder for one test.
fn demo_project(tag: &str) -> std::path::PathBuf {
    demo_project_of(tag, 30_000, 800)
}

/// The demo project with `tokens` cached and `steps` of training per crosscoder.
fn demo_project_of(tag: &str, tokens: u64, steps: u64) -> std::path::PathBuf {
    use crossdiff::demo::{DemoPipeline, run_pipeline};
    let dir = std::env::temp_dir().join(format!("crossdiff-app-demo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/demo");
    let p = DemoPipeline { models, project: dir.clone(), tokens, steps, ..Default::default() };
    let device = burn::tensor::Device::flex();
    run_pipeline(&p, &device, crossdiff::workflow::Handle::silent(), |_| {}).unwrap();
    dir
}

/// Analyze: a run without latents.csv offers its analysis; the analysis runs with progress, and
/// when it finishes the Latents and Plots views show the run without being asked; then the KL
/// check, whose kl.json the Plots view shows. Errors name the view's fields; Cancel stops a job.
#[test]
fn analyze_view_analyses_a_run_then_checks_kl_and_the_views_reload() {
    let run = analysed_run("analyze");
    let root = run.parent().unwrap().to_path_buf();
    for f in ["latents.csv", "summary.json", "examples.safetensors"] {
        std::fs::remove_file(run.join(f)).unwrap();
    }
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let (run2, root2) = (run.clone(), root.clone());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.latents.run_dir = run2.display().to_string();
        app.analyze.cache_dir = root2.join("cache").display().to_string();
        app.analyze.config.examples = 3;
        app.analyze.config.context = 4;
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Latents").click();
    harness.run_steps(2);
    harness.get_by_label("Load run").click();
    harness.run_steps(2);
    harness.get_by_label("0 of 0 latents shown");
    // The Latents view offers the analysis: the Analyze view opens on this run.
    harness.get_by_label("Analyze this run").click();
    harness.run_steps(3);
    assert_eq!(harness.state().tab, crossdiff_app::commands::Tab::Analyze);
    assert_eq!(harness.state().analyze.run_dir, run.display().to_string());
    // A bad value: named by the view's label, no CLI flag.
    harness.state_mut().analyze.config.examples = 0;
    harness.get_by_label("Start analysis").click();
    wait_for(&mut harness, "latent analysis failed — error: ");
    let error = label_text(&harness, "latent analysis failed — error: ");
    assert_eq!(error, "latent analysis failed — error: Examples per latent must be in 1..=1000, not 0");
    harness.state_mut().analyze.config.examples = 3;
    harness.get_by_label("Start analysis").click();
    wait_for(&mut harness, "latent analysis finished: 40 latents over ");
    wait_for(&mut harness, "analysed: chat-only ");
    assert!(run.join("latents.csv").exists() && run.join("examples.safetensors").exists());
    // Finished: the Latents and Plots views show the analysed run without a click on Load.
    harness.get_by_label("Open the latents").click();
    harness.run_steps(3);
    harness.get_by_label("40 of 40 latents shown");
    assert_eq!(harness.state().plots.run_dir, run.display().to_string());
    harness.get_by_label("Plots").click();
    harness.run_steps(3);
    harness.get_by_label("Relative decoder norm Δ");
    harness.get_by_label("No KL check for this run yet (kl.json).");
    // The KL check, from the Plots view's offer.
    harness.get_by_label("Run the KL check").click();
    harness.run_steps(3);
    assert_eq!(harness.state().tab, crossdiff_app::commands::Tab::Analyze);
    harness.state_mut().analyze.kl_data = assets.join("data/chat.jsonl").display().to_string();
    harness.state_mut().analyze.conversations = 0;
    harness.get_by_label("Start KL check").click();
    wait_for(&mut harness, "KL check failed — error: ");
    assert_eq!(
        label_text(&harness, "KL check failed — error: "),
        "KL check failed — error: Conversations must be positive, not 0"
    );
    harness.state_mut().analyze.conversations = 6;
    // A sweep entry that is not a block: named by the view's label.
    harness.state_mut().analyze.sweep_layers = "0, x".into();
    harness.get_by_label("Start KL check").click();
    wait_for(&mut harness, "KL check failed — error: ");
    assert_eq!(
        label_text(&harness, "KL check failed — error: "),
        "KL check failed — error: Sweep layers \"x\" is not a block number"
    );
    harness.state_mut().analyze.sweep_layers = "0".into();
    harness.get_by_label("Start KL check").click();
    wait_for(&mut harness, "KL check finished: ");
    harness.get_by_label_contains("over 6 conversations, written to kl.json");
    wait_for(&mut harness, "KL, all reply tokens");
    // The sweep's rows follow the table, each with its block.
    harness.get_by_label("none @ block 0");
    assert!(run.join("kl.json").exists() && run.join("kl-layers.json").exists());
    harness.get_by_label("Open the KL chart").click();
    harness.run_steps(3);
    harness.get_by_label("KL(P_chat || P_patched) per condition, all reply tokens, with 95% CIs");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Cancel stops the real KL check between conversations; the view says it stopped (not that it
/// failed), kl.json is not written and the Plots view is not told to reload.
#[test]
fn analyze_view_cancel_stops_the_kl_check() {
    let run = analysed_run("kl-cancel");
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let run2 = run.clone();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.tab = crossdiff_app::commands::Tab::Analyze;
        app.analyze.set_run(&run2.display().to_string());
        // The demo's 2000 conversations: far more than the check gets through before Cancel.
        app.analyze.kl_data = assets.join("demo/data/chat.jsonl").display().to_string();
        app.analyze.conversations = 2000;
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Start KL check").click();
    wait_for(&mut harness, "KL check status: kl: ");
    harness.get_by_label("Cancel KL check").click();
    wait_for(&mut harness, "KL check cancelled: stopped — the KL check was cancelled after ");
    let line = label_text(&harness, "KL check cancelled: ");
    assert!(line.contains("conversations; the KL results are unchanged"), "{line}");
    assert!(harness.query_by_label_contains("KL check failed").is_none());
    assert!(!run.join("kl.json").exists());
    harness.run_steps(2);
    assert_eq!(harness.state().plots.run_dir, "");
    assert!(harness.query_by_label("KL, all reply tokens").is_none());
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

/// The demo project's run in the Train view: its own settings in the fields, its step and curves;
/// Start training no longer refuses it; Continue trains it further; New run picks a fresh folder.
#[test]
fn train_view_shows_an_existing_run_and_continues_it() {
    let proj = demo_project("train");
    let run = proj.join("runs/batchtopk");
    let metrics = crossdiff::run_dir::RunDir::new(&run).read_metrics().unwrap();
    let proj2 = proj.clone();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.open_project(&proj2);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Train").click();
    harness.run_steps(3);
    harness.get_by_label_contains("checkpoint: step 800 of 800 (");
    harness.get_by_label("this run's settings: BatchTopK, k 8, dictionary size 128, learning rate 0.001, batch 256");
    harness.get_by_label(&format!("curves: {} logged steps, the last at step 800", metrics.len()));
    let config = &harness.state().train.config;
    assert_eq!((config.k, config.dict_size, config.batch, config.steps), (8, Some(128), 256, Some(800)));
    // Start training with the run's own settings: nothing refused, nothing left to do.
    harness.get_by_label("Start training").click();
    wait_for(&mut harness, "training finished: BatchTopK D=128 at step 800 of 800");
    // Continue to step 900 with the run's settings.
    harness.state_mut().train.continue_to = 900;
    harness.get_by_label("Continue (more steps)").click();
    wait_for(&mut harness, "training finished: BatchTopK D=128 at step 900 of 900");
    harness.run_steps(2);
    harness.get_by_label_contains("checkpoint: step 900 of 900 (");
    let more = crossdiff::run_dir::RunDir::new(&run).read_metrics().unwrap();
    assert_eq!(more.last().unwrap().step, 900);
    harness.get_by_label(&format!("curves: {} logged steps, the last at step 900", more.len()));
    // New run: a fresh folder beside it, the settings kept as a starting point.
    harness.get_by_label("New run").click();
    harness.run_steps(3);
    assert_eq!(harness.state().train.run_dir, proj.join("runs/batchtopk-2").display().to_string());
    assert_eq!(harness.state().train.config.k, 8);
    assert!(harness.query_by_label_contains("checkpoint: step").is_none());
    // Analyze this run → the Analyze view on it.
    harness.state_mut().train.run_dir = run.display().to_string();
    harness.run_steps(2);
    harness.get_by_label("Analyze this run").click();
    harness.run_steps(3);
    assert_eq!(harness.state().tab, crossdiff_app::commands::Tab::Analyze);
    assert_eq!(harness.state().analyze.run_dir, run.display().to_string());
    std::fs::remove_dir_all(&proj).unwrap();
}

/// Opening the demo project fills Prompt lab and Steering from its first run — its models and its
/// most chat-specific latent (the chat-only one with the largest Δ) — and each runs once when shown.
#[test]
fn prompt_lab_and_steering_start_from_the_projects_run() {
    let proj = demo_project("lab");
    let run = proj.join("runs/batchtopk");
    let rows = read_latents_csv(&run.join("latents.csv")).unwrap();
    let latent = crossdiff_app::suggest::strongest_latent(&rows).unwrap();
    let proj2 = proj.clone();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.open_project(&proj2);
        app
    });
    harness.run_steps(2);
    let app = harness.state();
    assert_eq!(app.prompt_lab.run_dir, run.display().to_string());
    assert_eq!(app.prompt_lab.latents, latent.to_string());
    assert!(!app.prompt_lab.config.text.is_empty());
    assert_eq!(app.steering.latents, vec![(latent, 1.0)]);
    assert_eq!(app.steering.run_dir, run.display().to_string());
    // The Latents view shows the run at that latent's dashboard.
    harness.get_by_label("Latents").click();
    harness.run_steps(3);
    harness.get_by_label(&format!("Latent {latent}"));
    // Run once on open: no button pressed.
    harness.get_by_label("Prompt lab").click();
    wait_for(&mut harness, "analysis finished:");
    harness.run_steps(2);
    harness.get_by_label(&format!("latent {latent}"));
    harness.get_by_label("Steering").click();
    wait_for(&mut harness, "steering finished: 1 latents at layer 3");
    wait_for(&mut harness, "unsteered: ");
    harness.get_by_label(&format!("remove latent {latent}"));
    // Once only: back on the view, nothing starts again.
    harness.get_by_label("Prompt lab").click();
    harness.run_steps(3);
    assert!(!harness.state().prompt_lab.job.running());
    std::fs::remove_dir_all(&proj).unwrap();
}

/// One colour per latent class: the table in widgets, and the Plots, Compare and Latents views
/// (figures, legends, the table's class column and the dashboard) draw each class in it, as
/// rendered.
#[test]
fn every_view_draws_a_class_in_its_one_colour() {
    use crossdiff_app::widgets::{CLASS_COLORS, class_color};
    for (i, (a, ca)) in CLASS_COLORS.iter().enumerate() {
        assert_eq!(class_color(*a), *ca);
        for (b, cb) in &CLASS_COLORS[i + 1..] {
            assert!(a != b && ca != cb, "{a:?} and {b:?} share a colour");
        }
    }
    if let Err(e) = crossdiff::Backend::Wgpu.device() {
        assert!(
            std::env::var("CROSSDIFF_REQUIRE_WGPU").is_err(),
            "CROSSDIFF_REQUIRE_WGPU=1 but wgpu is unusable: {e:#}"
        );
        eprintln!("skipping the rendered colours: {e:#}");
        return;
    }
    let run = analysed_run("colours");
    let run2 = run.clone();
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.plots.show_run(&run2.display().to_string());
        app.latents.show_run(&run2.display().to_string());
        app.compare.runs = [run2.display().to_string(), run2.display().to_string()];
        app.compare.load();
        app
    });
    // Pixels within a small distance of a colour.
    let count = |img: &image::RgbaImage, c: eframe::egui::Color32| {
        img.pixels().filter(|p| (0..3).all(|i| (p.0[i] as i32 - [c.r(), c.g(), c.b()][i] as i32).abs() <= 3)).count()
    };
    for tab in ["Plots", "Compare runs", "Latents"] {
        harness.get_by_label(tab).click();
        harness.run_steps(3);
        let img = harness.render().unwrap();
        for class in [LatentClass::ChatOnly, LatentClass::BaseOnly, LatentClass::Shared] {
            assert!(count(&img, class_color(class)) >= 10, "{tab}: no {class:?} colour drawn");
        }
        // No magenta (what a class once read as, from the plot library's own palette), and no
        // colour of that palette on the guides: saturated pixels are a class's or the UI's.
        let magenta = img.pixels().filter(|p| {
            let [r, g, b, _] = p.0.map(i32::from);
            r > 120 && b > 120 && 2 * g < r && 2 * g < b
        });
        assert_eq!(magenta.count(), 0, "{tab}: magenta drawn");
    }
    std::fs::remove_dir_all(run.parent().unwrap()).unwrap();
}

/// The window fits the monitor at start: 85% of it, at least the minimum, centred.
#[test]
fn the_window_is_sized_to_the_monitor() {
    use crossdiff_app::app::{MIN_WINDOW, window_size};
    use eframe::egui::vec2;
    assert_eq!(window_size(vec2(1920.0, 1080.0)), vec2(1632.0, 918.0));
    assert_eq!(window_size(vec2(1000.0, 700.0)), vec2(MIN_WINDOW[0], MIN_WINDOW[1]), "at least the minimum");
    assert_eq!(window_size(vec2(800.0, 500.0)), vec2(800.0, 500.0), "never larger than the monitor");
    let mut harness =
        Harness::builder().with_size(vec2(1100.0, 720.0)).build_eframe(|cc| CrossdiffApp::new(cc.egui_ctx.clone()));
    harness.input_mut().viewports.entry(eframe::egui::ViewportId::ROOT).or_default().monitor_size =
        Some(vec2(2560.0, 1440.0));
    harness.run_steps(3);
    assert_eq!(harness.ctx.content_rect().size(), vec2(2176.0, 1224.0));
}

/// The app's settings in memory (what eframe keeps on disk between starts).
#[derive(Default)]
struct MemoryStorage(std::collections::HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn flush(&mut self) {}
}

/// The guided tour on the demo project: it starts when the project opens, each step opens its
/// view with the BatchTopK run's most chat-specific latent (the models answering "Who are you?",
/// the cache, the chat-only latents with that latent's dashboard, L1 beside BatchTopK, the KL bars
/// in sight, steering with it); Close hides it, it stays hidden on the next start, and Help → Tour
/// brings it back.
#[test]
fn the_tour_walks_through_the_views_on_the_demo_project() {
    use crossdiff_app::commands::Tab;
    use egui_kittest::kittest::NodeT;
    // At `crossdiff demo`'s own size, where BatchTopK finds the planted chat-only latents.
    let defaults = crossdiff::demo::DemoPipeline::default();
    let proj = demo_project_of("tour", defaults.tokens, defaults.steps);
    let (btk, l1) = (proj.join("runs/batchtopk"), proj.join("runs/l1"));
    let rows = read_latents_csv(&btk.join("latents.csv")).unwrap();
    let latent = crossdiff_app::suggest::strongest_latent(&rows).unwrap();
    assert_eq!(rows.iter().find(|r| r.latent == latent).unwrap().class, LatentClass::ChatOnly);
    let chat_only = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).count();
    let l1_rows = read_latents_csv(&l1.join("latents.csv")).unwrap();
    let (l1_chat, l1_pass) = crossdiff_app::compare_view::chat_only_passing(&l1_rows);
    let size = eframe::egui::vec2(1300.0, 900.0);
    let open = |storage: Option<std::rc::Rc<MemoryStorage>>| {
        let proj = proj.clone();
        Harness::builder().with_size(size).build_eframe(move |cc| {
            let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
            app.backend = crossdiff::Backend::Cpu;
            if let Some(s) = storage {
                app.restore_settings(&*s);
            }
            app.open_project(&proj);
            app
        })
    };
    let mut harness = open(None);
    harness.run_steps(2);
    let next = |harness: &mut Harness<'_, CrossdiffApp>, step: &str, tab: Tab| {
        harness.get_by_label("Next").click();
        harness.run_steps(5);
        harness.get_by_label(step);
        assert_eq!(harness.state().tab, tab, "{step}");
    };
    // 1: the models, answering the chat prompt (run once, without a button).
    harness.get_by_label("Tour (1/6)");
    harness.get_by_label("The models");
    assert_eq!(harness.state().tab, Tab::Models);
    assert_eq!(harness.get_by_label("Prompt text").value().as_deref(), Some("Who are you?"));
    wait_for(&mut harness, "answer chat: I am Mini");
    // The prompt loaded both models (no Load models pressed): their summaries show.
    harness.run_steps(2);
    assert_eq!(harness.query_all_by_label_contains("4 layers, width 64").count(), 2);
    // 2: the paired activations in the project's cache.
    next(&mut harness, "Tour (2/6)", Tab::Cache);
    let total = crossdiff::activations::cache::CacheIndex::open(&proj.join("cache")).unwrap().total_tokens;
    harness.get_by_label_contains(&format!(
        "This cache holds {total} (base, chat) activation pairs, one per token, from the output of block 3"
    ));
    // 3: the BatchTopK run's chat-only latents and its most chat-specific latent's dashboard.
    next(&mut harness, "Tour (3/6)", Tab::Latents);
    harness.get_by_label(&format!("Latent {latent}"));
    harness.get_by_label(&format!("{chat_only} of {} latents shown", rows.len()));
    assert_eq!(harness.state().latents.run_dir, btk.display().to_string());
    // 4: L1 beside BatchTopK.
    next(&mut harness, "Tour (4/6)", Tab::Compare);
    harness.get_by_label("run 1: l1");
    harness.get_by_label("run 2: batchtopk");
    harness.get_by_label_contains(&format!("run 1: {l1_pass} of {l1_chat} chat-only latents pass Latent Scaling"));
    // 5: the KL bars, scrolled into sight above the tour panel.
    next(&mut harness, "Tour (5/6)", Tab::Plots);
    let kl = harness.get_by_label("KL(P_chat || P_patched) per condition, all reply tokens, with 95% CIs").rect();
    let panel = harness.get_by_label("Tour (5/6)").rect();
    assert!(kl.top() > 0.0 && kl.bottom() < panel.top(), "KL bars at {kl:?}, the tour panel at {panel:?}");
    // 6: steering with that latent, generated once.
    next(&mut harness, "Tour (6/6)", Tab::Steering);
    harness.get_by_label(&format!("remove latent {latent}"));
    assert_eq!(harness.state().steering.run_dir, btk.display().to_string());
    wait_for(&mut harness, "unsteered: ");
    assert_eq!(harness.query_all_by_label_contains("steered: ").count(), 2, "unsteered beside steered");
    assert!(harness.get_by_label("Next").accesskit_node().is_disabled(), "Next on the last step");
    // Back: the previous step's view again.
    harness.get_by_label("Back").click();
    harness.run_steps(3);
    harness.get_by_label("Tour (5/6)");
    assert_eq!(harness.state().tab, Tab::Plots);
    // Close hides it, and the next start (the settings saved and restored) keeps it hidden.
    harness.get_by_label("Close").click();
    harness.run_steps(2);
    assert!(harness.query_by_label_contains("Tour (").is_none());
    let mut storage = MemoryStorage::default();
    eframe::App::save(harness.state_mut(), &mut storage);
    wait_idle(&mut harness);
    drop(harness);
    let storage = std::rc::Rc::new(storage);
    let mut harness = open(Some(storage));
    harness.run_steps(3);
    assert!(harness.query_by_label_contains("Tour (").is_none(), "dismissed: not shown on the next start");
    assert_eq!(harness.state().tab, Tab::Models);
    // Help → Tour brings it back from the first step.
    harness.get_by_label("Help").click();
    harness.run_steps(2);
    harness.get_by_label("Tour").click();
    harness.run_steps(3);
    harness.get_by_label("Tour (1/6)");
    assert!(!harness.state().tour.dismissed);
    wait_for(&mut harness, "answer chat: I am Mini");
    wait_idle(&mut harness);
    std::fs::remove_dir_all(&proj).unwrap();
}

/// Steps the UI until no view's job runs (a generous limit: the demo's jobs take seconds alone,
/// but CI runs this beside other test binaries on two cores).
fn wait_idle(harness: &mut Harness<'_, CrossdiffApp>) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(180) {
        harness.step();
        let app = harness.state();
        if !(app.models.job.running() || app.steering.job.running() || app.prompt_lab.job.running()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("jobs still running after 180 s");
}

/// Clears a text field by its label and types `text` into it.
fn retype(harness: &mut Harness<'_, CrossdiffApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.run_steps(1);
    harness.key_press_modifiers(eframe::egui::Modifiers::COMMAND, eframe::egui::Key::A);
    harness.key_press(eframe::egui::Key::Backspace);
    harness.run_steps(1);
    if !text.is_empty() {
        harness.get_by_label(label).type_text(text);
    }
    harness.run_steps(2);
}

#[test]
fn models_view_names_the_family_and_the_merged_adapter() {
    use crossdiff_app::widgets::ADAPTER_LABEL;
    let llama = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-llama");
    let dirs = [llama.join("base").display().to_string(), llama.join("chat").display().to_string()];
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.set_model_dirs(dirs);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "tiny-llama/base\nLlama 3 · 3 layers, width 48, vocab 452");
    wait_for(&mut harness, "tiny-llama/chat\nLlama 3 · 3 layers, width 48, vocab 452");
    // The configs' family row names it too; no adapter is merged.
    assert_eq!(harness.query_all_by_label("Llama 3 (llama)").count(), 2);
    assert!(harness.query_by_label_contains("adapter merged").is_none());
    // The chat model made as the base with the LoRA adapter: its summary says what was merged.
    let lora = llama.join("lora").display().to_string();
    harness.state_mut().models.dirs[1] = llama.join("base").display().to_string();
    retype(&mut harness, ADAPTER_LABEL, &lora);
    assert_eq!(harness.state().chat_adapter, lora);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "loading models finished");
    let base = llama.join("base").display().to_string();
    let line = "Llama 3 · 3 layers, width 48, vocab 452, 0.1M parameters, on cpu";
    harness.get_by_label(&format!("base: {base}\n{line}"));
    harness.get_by_label(&format!(
        "chat: {base}\n{line}\nadapter merged: LoRA r=4 alpha=8 on down_proj, gate_proj, o_proj, q_proj, v_proj from {lora}"
    ));
}

/// The chat adapter is one field, shown beside every chat model field; every job that loads the
/// chat model gets its folder (a folder that is no adapter makes each of them fail naming it).
#[test]
fn every_job_merges_the_chat_adapter_the_field_names() {
    use crossdiff_app::widgets::ADAPTER_LABEL;
    let run = analysed_run("adapter");
    let root = run.parent().unwrap().to_path_buf();
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets");
    let (run2, root2, assets2) = (run.clone(), root.clone(), assets.clone());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.cache.data = assets2.join("data/web.txt").display().to_string();
        app.cache.out_dir = root2.join("cache-adapter").display().to_string();
        app.cache.config.tokens = 200;
        app.cache.config.tokenize.context = 48;
        app.analyze.set_run(&run2.display().to_string());
        app.analyze.cache_dir = root2.join("cache").display().to_string();
        app.analyze.kl_data = assets2.join("data/chat.jsonl").display().to_string();
        app.prompt_lab.run_dir = run2.display().to_string();
        app.steering.run_dir = run2.display().to_string();
        app.steering.add_latent(3);
        app.adl.data = assets2.join("data/web.txt").display().to_string();
        app.adl.out_dir = root2.join("adl").display().to_string();
        app
    });
    harness.run_steps(2);
    // Typed once, in the Models view.
    let bad = assets.join("tiny-gemma2/base").display().to_string();
    retype(&mut harness, ADAPTER_LABEL, &bad);
    assert_eq!(harness.state().chat_adapter, bad);
    let error = format!("error: {bad}/adapter_config.json: cannot read");
    for (tab, button, job) in [
        ("Cache", "Start caching", "caching"),
        ("Analyze", "Start analysis", "latent analysis"),
        ("Analyze", "Start KL check", "KL check"),
        ("Prompt lab", "Analyse", "analysis"),
        ("Steering", "Generate steered", "steering"),
        ("ADL", "Run ADL", "ADL"),
        ("Models", "Load models", "loading models"),
    ] {
        harness.get_by_label(tab).click();
        harness.run_steps(2);
        // The same field in every view, holding the one value.
        let shown = {
            use egui_kittest::kittest::NodeT;
            harness.get_by_label(ADAPTER_LABEL).accesskit_node().value()
        };
        assert_eq!(shown.as_deref(), Some(bad.as_str()), "{tab}");
        harness.get_by_label(button).click();
        wait_for(&mut harness, &format!("{job} failed — {error}"));
    }
    // Steering the model as it is (no adapter merged): it runs.
    harness.get_by_label("Steering").click();
    harness.run_steps(2);
    harness.get_by_label(crossdiff_app::steering_view::MERGE_ADAPTER).click();
    harness.run_steps(1);
    harness.get_by_label("Generate steered").click();
    wait_for(&mut harness, "steering finished:");
    // Cleared in one view, cleared everywhere: the cache runs without an adapter.
    retype(&mut harness, ADAPTER_LABEL, "");
    assert_eq!(harness.state().chat_adapter, "");
    assert_eq!(harness.state().job_env().chat_adapter(), None);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A cache of the tiny Llama pair made as base + LoRA adapter from the Cache view records the
/// adapted chat model (the adapter merged into the job's chat model).
#[test]
fn the_cache_view_caches_a_chat_model_made_with_an_adapter() {
    use crossdiff_app::widgets::ADAPTER_LABEL;
    let llama = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-llama");
    let out = std::env::temp_dir().join(format!("crossdiff-app-adapter-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (llama2, out2) = (llama.clone(), out.clone());
    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(move |cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app.tab = crossdiff_app::commands::Tab::Cache;
        app.cache.base_dir = llama2.join("base").display().to_string();
        app.cache.chat_dir = llama2.join("base").display().to_string();
        app.cache.data = llama2.join("../data/web.txt").display().to_string();
        app.cache.out_dir = out2.display().to_string();
        app.cache.config.tokens = 200;
        app.cache.config.tokenize.context = 64;
        app
    });
    harness.run_steps(2);
    retype(&mut harness, ADAPTER_LABEL, &llama.join("lora").display().to_string());
    harness.get_by_label("Start caching").click();
    wait_for(&mut harness, "caching finished: 200 tokens");
    let index = crossdiff::activations::cache::CacheIndex::open(&out).unwrap();
    let adapted = crossdiff::model::identity_of(&llama.join("base"), Some(&llama.join("lora"))).unwrap();
    let plain = crossdiff::model::identity_of(&llama.join("base"), None).unwrap();
    assert_eq!(index.model_ids, vec![plain, adapted]);
    std::fs::remove_dir_all(&out).unwrap();
}

/// The app on the Models view with the Compute window open (no servers yet).
fn compute_harness() -> Harness<'static, CrossdiffApp> {
    let mut harness = Harness::builder()
        .with_size(eframe::egui::vec2(1300.0, 900.0))
        .build_eframe(|cc| CrossdiffApp::new(cc.egui_ctx.clone()));
    harness.run_steps(2);
    harness.get_by_label("Compute…").click();
    harness.run_steps(2);
    assert!(harness.state().compute.open);
    harness
}

/// Types `url` into the Compute window's address field and presses Add.
fn add_server(harness: &mut Harness<'_, CrossdiffApp>, url: &str) {
    retype(harness, crossdiff_app::compute_view::URL_LABEL, url);
    harness.get_by_label("Add").click();
    harness.run_steps(2);
}

#[test]
fn the_compute_window_refuses_a_bad_server_url_in_the_parsers_words() {
    let mut harness = compute_harness();
    for url in ["ws://127.0.0.1", "http://127.0.0.1:7000", "ws://127.0.0.1:99999", "wss://host:443"] {
        // The engine's parser's own one-line reason, without its `--backend remote:…` prefix.
        let engine = format!("remote:{url}").parse::<crossdiff::Backend>().unwrap_err().to_string();
        let why = engine.split_once(&format!("remote:{url}: ")).unwrap().1.to_string();
        add_server(&mut harness, url);
        harness.get_by_label(&format!("error: {why}"));
        assert!(harness.state().compute.servers.is_empty(), "{url} was added");
        // The address stays in its field, to be corrected.
        assert_eq!(harness.state().compute.url, url);
    }
}

#[test]
fn an_added_server_is_offered_by_the_device_selector_and_jobs_run_there() {
    let mut harness = compute_harness();
    add_server(&mut harness, "ws://127.0.0.1:1");
    let app = harness.state();
    assert_eq!(app.compute.urls(), vec!["ws://127.0.0.1:1".to_string()]);
    assert!(app.compute.url.is_empty() && app.compute.error.is_none());
    harness.get_by_label("ws://127.0.0.1:1");
    // Adding it again adds nothing.
    add_server(&mut harness, "ws://127.0.0.1:1/");
    harness.get_by_label("error: ws://127.0.0.1:1 is in the list already");
    assert_eq!(harness.state().compute.servers.len(), 1);
    harness.get_by_label("Compute…").click();
    harness.run_steps(2);
    assert!(!harness.state().compute.open);
    // The Device selector offers it after the local devices; choosing it makes it the jobs' device.
    select_device(&mut harness, "remote:ws://127.0.0.1:1");
    let is_remote = |b: &crossdiff::Backend| matches!(b, crossdiff::Backend::Remote(r) if r.url == "ws://127.0.0.1:1");
    assert!(is_remote(&harness.state().backend), "{:?}", harness.state().backend);
    assert!(is_remote(&harness.state().job_env().backend));
    // A job started now opens that device: nobody listens there, so it fails saying so.
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "loading models failed — error: “Device” remote:ws://127.0.0.1:1: no server answers there");
    assert!(harness.state().models.job.device().as_ref().is_some_and(is_remote));
}

#[test]
fn testing_a_server_where_nobody_listens_shows_the_engines_error() {
    let mut harness = compute_harness();
    add_server(&mut harness, "ws://127.0.0.1:1");
    harness.get_by_label("Test").click();
    // A real connect, on a background job: the frames go on meanwhile, and its error shows.
    wait_for(&mut harness, "ws://127.0.0.1:1: no server answers there (");
    let line = label_text(&harness, "no server answers there");
    assert!(line.contains("start one with `crossdiff serve --port PORT` on that machine"), "{line}");
    assert!(!line.contains("--backend"), "{line}");
    assert!(harness.query_by_label_contains("ok: ").is_none());
}

#[test]
fn servers_are_remembered_across_starts_without_their_tokens() {
    let mut harness = compute_harness();
    retype(&mut harness, crossdiff_app::compute_view::TOKEN_LABEL, "s3cret-token");
    add_server(&mut harness, "ws://127.0.0.1:7000");
    let server = &harness.state().compute.servers[0];
    assert!(matches!(server.backend(), crossdiff::Backend::Remote(r) if r.token.as_deref() == Some("s3cret-token")));
    let mut storage = MemoryStorage::default();
    eframe::App::save(harness.state_mut(), &mut storage);
    let saved: String = storage.0.values().cloned().collect();
    assert!(saved.contains("ws://127.0.0.1:7000"), "{saved}");
    assert!(!saved.contains("s3cret-token"), "a token was saved: {saved}");
    // The next start lists it again, with no token typed.
    let mut app = CrossdiffApp::new(eframe::egui::Context::default());
    app.restore_settings(&storage);
    assert_eq!(app.compute.urls(), vec!["ws://127.0.0.1:7000".to_string()]);
    assert!(app.compute.servers[0].token.is_empty());
    // Started with `--backend remote:ws://127.0.0.1:7000 --remote-token T`: that listed server, with T.
    let started =
        "remote:ws://127.0.0.1:7000".parse::<crossdiff::Backend>().unwrap().with_remote_token(Some("T".into()));
    app.compute.adopt(&started);
    assert_eq!(app.compute.servers.len(), 1);
    assert_eq!(app.compute.servers[0].backend(), started);
}
