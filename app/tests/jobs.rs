//! The app's one background-job mechanism, without a window: engine events become progress and
//! metrics, Cancel reaches the job, a panic becomes the job's error, and views start from the
//! engine's workflow defaults.

use std::time::{Duration, Instant};

use crossdiff_app::jobs::{Job, JobSlot};
use eframe::egui;

/// Polls until the job ends (or `until` holds), at most 30 s.
fn poll_until(job: &mut Job, until: impl Fn(&Job) -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        job.poll();
        if until(job) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the job did not get there within 30 s");
}

fn metrics(step: u64) -> crossdiff::crosscoder::train::StepMetrics {
    serde_json::from_value(serde_json::json!({
        "step": step, "tokens": 16 * step, "loss": 0.5, "recon": 0.4, "aux": 0.1, "l0": 4.0,
        "fve_base": 0.8, "fve_chat": 0.7, "dead_frac": 0.0, "lr": 1e-4
    }))
    .unwrap()
}

#[test]
fn events_become_progress_and_metrics_and_cancel_stops_the_job() {
    let mut job = Job::spawn("work", egui::Context::default(), |h| {
        h.progress("training", 10, 100, "steps");
        h.metrics(metrics(10));
        while h.keep_going() {
            std::thread::sleep(Duration::from_millis(2));
        }
        h.progress("training", 40, 100, "steps");
        Ok("stopped at 40".into())
    });
    poll_until(&mut job, |j| !j.metrics.is_empty());
    assert!(job.running());
    assert_eq!((job.phase.as_str(), job.unit, job.progress), ("training", "steps", (10, 100)));
    assert!(job.status.starts_with("step 10 loss 0.5000"), "{}", job.status);
    assert!(!job.cancel_requested());
    job.cancel();
    assert!(job.cancel_requested(), "the view shows the job as cancelled");
    poll_until(&mut job, |j| !j.running());
    assert_eq!(job.finished, Some(Ok("stopped at 40".to_string())));
    assert_eq!(job.progress, (40, 100));
    assert_eq!(job.device, None, "a bare job names no device");
}

#[test]
fn a_panicking_job_reports_its_message_clears_its_progress_and_frees_the_slot() {
    let ctx = egui::Context::default();
    let mut slot = JobSlot::default();
    slot.start(Job::spawn("work", ctx.clone(), |h| {
        h.progress("caching", 3, 10, "tokens");
        let step = 3;
        panic!("index out of range at step {step}")
    }));
    let start = Instant::now();
    while slot.running() && start.elapsed() < Duration::from_secs(30) {
        slot.poll();
        std::thread::sleep(Duration::from_millis(5));
    }
    let job = slot.job().unwrap();
    assert_eq!(job.error(), Some("the job panicked: index out of range at step 3"));
    assert_eq!((job.progress, job.status.as_str()), ((0, 0), ""), "only the error is left");
    assert!(slot.take_ended(), "the view learns that the job ended");
    assert!(!slot.take_ended());
    // The next job starts in the same slot and finishes.
    slot.start(Job::spawn("work", ctx, |_| Ok("fine".into())));
    while slot.running() {
        slot.poll();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(slot.job().unwrap().finished, Some(Ok("fine".to_string())));
}

#[test]
fn an_error_keeps_its_whole_context_chain() {
    let mut job = Job::spawn("work", egui::Context::default(), |_| {
        Err(anyhow::anyhow!("no such file").context("opening /x/cache.json"))
    });
    poll_until(&mut job, |j| !j.running());
    assert_eq!(job.error(), Some("opening /x/cache.json: no such file"));
}

/// A job's error is phrased with its view's fields: a bad value by its label, other flags in the
/// text by theirs; the failed job's progress, phase, status and curves are gone.
#[test]
fn an_error_names_the_views_fields_and_only_the_error_is_left() {
    let mut slot = JobSlot::new(crossdiff_app::train_view::FIELDS);
    slot.start(Job::spawn("training", egui::Context::default(), |h| {
        h.progress("training", 0, 0, "steps");
        h.metrics(metrics(10));
        let mut job = crossdiff::workflow::train::TrainJob { out: "r".into(), ..Default::default() };
        job.lr = f64::NAN;
        Err(job.validate().unwrap_err().context("training"))
    }));
    while slot.running() {
        slot.poll();
        std::thread::sleep(Duration::from_millis(5));
    }
    let job = slot.job().unwrap();
    assert_eq!(job.error(), Some("training: Learning rate must be a positive finite number, not NaN"));
    assert_eq!((job.progress, job.phase.as_str(), job.status.as_str()), ((0, 0), "", ""));
    assert!(job.metrics.is_empty());
    let mut slot = JobSlot::new(crossdiff_app::train_view::FIELDS);
    slot.start(Job::spawn("training", egui::Context::default(), |_| {
        anyhow::bail!(
            "c: the cache is incomplete: re-run that command to finish it, or pass --allow-partial to use what is there"
        )
    }));
    while slot.running() {
        slot.poll();
    }
    assert_eq!(
        slot.job().unwrap().error(),
        Some(
            "c: the cache is incomplete: start that job again to finish it, or tick “Use an incomplete cache” to use what is there"
        )
    );
}

/// Every flag a view's table names is a flag of the job the view runs (a renamed flag fails here).
#[test]
fn the_views_field_tables_name_real_flags() {
    use clap::Args;
    use crossdiff::workflow::{
        adl::AdlJob, analyze::AnalyzeJob, cache::CacheJob, kl::KlJob, steer::SteerJob, train::TrainJob,
    };
    let flags = |cmd: clap::Command| -> Vec<String> {
        cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect()
    };
    for (fields, cmd) in [
        (crossdiff_app::train_view::FIELDS, TrainJob::augment_args(clap::Command::new("train"))),
        (crossdiff_app::cache_view::FIELDS, CacheJob::augment_args(clap::Command::new("cache"))),
        (crossdiff_app::steering_view::FIELDS, SteerJob::augment_args(clap::Command::new("steer"))),
        (crossdiff_app::analyze_view::FIELDS, AnalyzeJob::augment_args(clap::Command::new("analyze"))),
        (crossdiff_app::analyze_view::KL_FIELDS, KlJob::augment_args(clap::Command::new("kl"))),
        (crossdiff_app::adl_view::FIELDS, AdlJob::augment_args(clap::Command::new("adl"))),
    ] {
        let known = flags(cmd);
        for (flag, _) in fields {
            assert!(known.iter().any(|k| k == flag), "--{flag} is not a flag of this job: {known:?}");
        }
    }
}

#[test]
fn views_fill_the_engines_workflow_configs_from_their_defaults() {
    use crossdiff::workflow::{cache::CacheJob, prompt_lab::PromptLabJob, steer::SteerJob, train::TrainJob};
    let app = crossdiff_app::app::CrossdiffApp::new(egui::Context::default());
    // Train: exactly the engine's defaults, plus the view's paths.
    let mut train = app.train.job_config();
    assert_eq!(train.cache.as_deref(), Some(std::path::Path::new("")));
    train.cache = None;
    assert_eq!(format!("{train:?}"), format!("{:?}", TrainJob::default()));
    // Cache: the engine's defaults except the two values the CLI requires (layer, tokens).
    let cache = app.cache.job_config(None);
    let want = CacheJob {
        layer: cache.layer,
        tokens: cache.tokens,
        base: cache.base.clone(),
        chat: cache.chat.clone(),
        ..CacheJob::default()
    };
    assert_eq!(format!("{cache:?}"), format!("{want:?}"));
    // Prompt lab and Steering: the engine's defaults under the example text and latents.
    let lab = app.prompt_lab.job_config(None);
    assert_eq!(lab.top, PromptLabJob::default().top);
    assert_eq!(lab.allow_other_models, PromptLabJob::default().allow_other_models);
    let mut steering = crossdiff_app::steering_view::SteeringView::new(String::new());
    assert!(steering.job_config(None).is_none(), "nothing to steer with yet");
    steering.add_latent(3);
    steering.add_latent(5);
    let steer = steering.job_config(None).unwrap();
    assert_eq!((steer.latent, steer.strength, steer.more.clone()), (3, 1.0, vec![(5, 1.0)]));
    assert_eq!(steer.max_tokens, SteerJob::default().max_tokens);
    assert_eq!(steer.allow_other_models, SteerJob::default().allow_other_models);
}

/// The Analyze view starts from the engine's `AnalyzeJob::default()` and `crossdiff kl`'s defaults;
/// the models are passed for the token lists only when given.
#[test]
fn the_analyze_view_fills_the_analyze_and_kl_jobs() {
    use clap::{Args, FromArgMatches};
    use crossdiff::workflow::{analyze::AnalyzeJob, kl::KlJob};
    let mut view = crossdiff_app::analyze_view::AnalyzeView::new(String::new(), String::new());
    view.run_dir = "r".into();
    view.cache_dir = "c".into();
    let job = view.job_config(None);
    assert_eq!((job.base.clone(), job.chat.clone()), (None, None), "no models: no token lists");
    let want = AnalyzeJob { run: "r".into(), cache: "c".into(), ..AnalyzeJob::default() };
    assert_eq!(format!("{job:?}"), format!("{want:?}"));
    view.base_dir = "b".into();
    view.chat_dir = "h".into();
    view.allow_other_models = true;
    let job = view.job_config(None);
    assert_eq!((job.base, job.chat, job.allow_other_models), (Some("b".into()), Some("h".into()), true));
    // KL: the command line's defaults (its clap definition is the one source).
    let cmd = KlJob::augment_args(clap::Command::new("kl"));
    let m = cmd.try_get_matches_from(["kl", "--run", "r", "--base", "b", "--chat", "h", "--data", "d"]).unwrap();
    let cli = KlJob::from_arg_matches(&m).unwrap();
    view.kl_data = "d".into();
    view.allow_other_models = false;
    assert_eq!(format!("{:?}", view.kl_config(None)), format!("{cli:?}"));
}

/// The chat adapter: one value in the app, given to every view's job config, kept in the project
/// (a project file without one reads and writes as before).
#[test]
fn the_chat_adapter_is_the_apps_one_value_and_the_projects() {
    use crossdiff::workflow::project::{FILE, Project};
    let dir = std::env::temp_dir().join(format!("crossdiff-app-project-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut app = crossdiff_app::app::CrossdiffApp::new(egui::Context::default());
    assert_eq!(app.job_env().chat_adapter(), None, "none unless given");
    // A project file written before adapters: no key, and the same bytes once saved again.
    std::fs::create_dir_all(&dir).unwrap();
    let old = "{\n  \"base\": \"/m/base\",\n  \"chat\": \"/m/chat\",\n  \"data\": [],\n  \"cache\": \"cache\",\n  \"runs\": []\n}";
    std::fs::write(dir.join(FILE), old).unwrap();
    let p = Project::open(&dir).unwrap();
    assert_eq!(p.chat_adapter, None);
    p.save().unwrap();
    assert_eq!(std::fs::read_to_string(dir.join(FILE)).unwrap(), old);
    // The Models view's pair and the app's adapter make a project that keeps it; opening it fills
    // the field (relative to the project, as its other paths).
    app.set_model_dirs(["/m/base".into(), "/m/base".into()]);
    app.chat_adapter = " /m/lora ".into();
    app.create_project(&dir);
    let p = Project::open(&dir).unwrap();
    assert_eq!(p.chat_adapter.as_deref(), Some(std::path::Path::new("/m/lora")));
    let mut p = p;
    p.chat_adapter = Some("adapters/lora".into());
    p.save().unwrap();
    let mut app = crossdiff_app::app::CrossdiffApp::new(egui::Context::default());
    app.open_project(&dir);
    let lora = dir.join("adapters/lora");
    assert_eq!(app.chat_adapter, lora.display().to_string());
    let env = app.job_env();
    let adapter = env.chat_adapter();
    assert_eq!(adapter.as_deref(), Some(lora.as_path()));
    // Every view's job gets it (Steering when it steers the chat model; Analyze when it loads one).
    assert_eq!(app.cache.job_config(adapter.clone()).chat_adapter, adapter);
    assert_eq!(app.prompt_lab.job_config(adapter.clone()).chat_adapter, adapter);
    assert_eq!(app.adl.job_config(adapter.clone()).chat_adapter, adapter);
    assert_eq!(app.analyze.kl_config(adapter.clone()).chat_adapter, adapter);
    assert_eq!(app.analyze.job_config(adapter.clone()).chat_adapter, adapter);
    app.analyze.chat_dir.clear();
    assert_eq!(app.analyze.job_config(adapter.clone()).chat_adapter, None, "no chat model: no adapter");
    app.steering.add_latent(1);
    assert_eq!(app.steering.job_config(adapter.clone()).unwrap().adapter, adapter);
    app.steering.merge_adapter = false;
    assert_eq!(app.steering.job_config(adapter.clone()).unwrap().adapter, None);
    std::fs::remove_dir_all(&dir).unwrap();
}
