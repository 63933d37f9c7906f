//! The Train view: configure a crosscoder run on a cache (the engine's `TrainJob`, from its paper
//! defaults), run it as a background job on the app's device (Cancel checkpoints and stops; Start
//! again resumes), live curves of loss, FVE per model, L0 and the dead fraction.

use std::path::PathBuf;

use crossdiff::crosscoder::Kind;
use crossdiff::crosscoder::train::StepMetrics;
use crossdiff::run_dir::RunDir;
use crossdiff::workflow::train::TrainJob;
use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use crate::errors::{Field, Fields};
use crate::jobs::{JobEnv, JobSlot};

/// The Train view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("cache", Field::Value("Cache directory")),
    ("out", Field::Value("Run directory")),
    ("kind", Field::Value("Kind")),
    ("dict-size", Field::Value("Dictionary size")),
    ("expansion", Field::Value("Dictionary size")),
    ("k", Field::Value("k")),
    ("mu", Field::Value("μ (L1 weight)")),
    ("lr", Field::Value("Learning rate")),
    ("batch", Field::Value("Batch")),
    ("steps", Field::Value("Steps")),
    ("allow-partial", Field::Check("Use an incomplete cache")),
];

pub struct TrainView {
    pub cache_dir: String,
    pub run_dir: String,
    /// Everything else the job takes, starting from `TrainJob::default()` (the paper's settings).
    pub config: TrainJob,
    /// The run's checkpoint line, read when the run directory changes, when a job ends, and when
    /// a running job passes a checkpoint step (never every frame): (run dir, step it was read at, line).
    checkpoint: Option<(String, u64, Option<String>)>,
    pub job: JobSlot,
}

impl Default for TrainView {
    fn default() -> Self {
        Self {
            cache_dir: String::new(),
            run_dir: String::new(),
            config: TrainJob::default(),
            checkpoint: None,
            job: JobSlot::new(FIELDS),
        }
    }
}

/// "checkpoint: step S (T tokens) in PATH", when the run has a checkpoint.
fn read_checkpoint(run_dir: &str) -> Option<String> {
    let state = RunDir::new(run_dir).checkpoint_state();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).ok()?).ok()?;
    Some(format!("checkpoint: step {} ({} tokens) in {}", v["step"], v["tokens"], state.display()))
}

impl TrainView {
    /// The job the Start button runs: the engine's config with this view's paths.
    pub fn job_config(&self) -> TrainJob {
        TrainJob {
            cache: Some(PathBuf::from(&self.cache_dir)),
            out: PathBuf::from(&self.run_dir),
            ..self.config.clone()
        }
    }

    fn refresh_checkpoint(&mut self, job_ended: bool) {
        let every = self.config.checkpoint_every.max(1);
        let step = self.job.job().map_or(0, |j| j.progress.0) / every;
        let stale = match &self.checkpoint {
            Some((dir, at, _)) => *dir != self.run_dir || *at != step,
            None => true,
        };
        if stale || job_ended {
            self.checkpoint = Some((self.run_dir.clone(), step, read_checkpoint(&self.run_dir)));
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv) {
        let ended = self.job.take_ended();
        self.refresh_checkpoint(ended);
        ui.heading("Train a crosscoder");
        let c = &mut self.config;
        egui::Grid::new("train settings").num_columns(2).show(ui, |ui| {
            let name = ui.label("Cache directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.cache_dir).desired_width(360.0)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Run directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.run_dir).desired_width(360.0)).labelled_by(name);
            ui.end_row();
            ui.label("Kind");
            ui.horizontal(|ui| {
                ui.radio_value(&mut c.kind, Kind::BatchTopK, "BatchTopK");
                ui.radio_value(&mut c.kind, Kind::L1, "L1");
            });
            ui.end_row();
            optional_ui(ui, "Dictionary size", "32 × the model width", &mut c.dict_size, 1 << 20);
            if c.kind == Kind::BatchTopK {
                let name = ui.label("k").id;
                ui.add(number(&mut c.k).range(1..=4096)).labelled_by(name);
            } else {
                let name = ui.label("μ (L1 weight)").id;
                ui.add(number(&mut c.mu).range(0.0..=100.0).speed(0.001)).labelled_by(name);
            }
            ui.end_row();
            let name = ui.label("Learning rate").id;
            ui.add(number(&mut c.lr).range(1e-6..=1.0).speed(1e-5)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Batch").id;
            ui.add(number(&mut c.batch).range(1..=65536)).labelled_by(name);
            ui.end_row();
            optional_ui(ui, "Steps", "one pass over the cache", &mut c.steps, 10_000_000);
        });
        ui.checkbox(&mut c.allow_partial, "Use an incomplete cache")
            .on_hover_text("Train on the tokens an interrupted cache holds so far");
        if self.job.start_button(ui, true, "Start training") {
            let (job, out) = (self.job_config(), self.run_dir.clone());
            self.job.start(env.spawn("training", move |device, _, handle| {
                let done = job.run(device, handle)?;
                let cc = &done.crosscoder;
                let at = format!(
                    "{:?} D={} at step {} of {}",
                    cc.config.kind, cc.config.dict_size, done.step, done.total_steps
                );
                Ok(if done.step < done.total_steps {
                    format!("{at}, checkpoint saved in {out}; Start training again resumes")
                } else {
                    format!("{at}, saved in {out}")
                })
            }));
        }
        // The run's checkpoint (the latest one is kept; resuming continues from it).
        if let Some((_, _, Some(line))) = &self.checkpoint {
            ui.label(line.as_str());
        }
        self.job.ui(ui);
        if let Some(job) = self.job.job() {
            if job.error().is_none() {
                curves_ui(ui, &job.metrics);
            }
        }
    }
}

/// A number field: dragging and typing stay in its range, but a value set elsewhere (a test, code)
/// is shown as it is, not silently clamped: the job's checks name a bad one.
fn number<T: egui::emath::Numeric>(value: &mut T) -> egui::DragValue<'_> {
    egui::DragValue::new(value).clamp_existing_to_range(false)
}

/// A setting the engine derives when it is not given: a checkbox to set it, then its value.
fn optional_ui<T>(ui: &mut egui::Ui, label: &str, otherwise: &str, value: &mut Option<T>, max: T)
where
    T: egui::emath::Numeric,
{
    let name = ui.label(label).id;
    ui.horizontal(|ui| {
        let mut set = value.is_some();
        if ui.checkbox(&mut set, "set").changed() {
            *value = set.then(|| T::from_f64(1000f64.min(max.to_f64())));
        }
        match value {
            Some(v) => {
                ui.add(number(v).range(T::from_f64(1.0)..=max)).labelled_by(name);
            }
            None => {
                ui.weak(format!("default: {otherwise}"));
            }
        }
    });
    ui.end_row();
}

/// Loss, FVE per model, L0 and dead fraction against the step.
fn curves_ui(ui: &mut egui::Ui, metrics: &[StepMetrics]) {
    let series = |f: fn(&StepMetrics) -> f64| -> PlotPoints { metrics.iter().map(|m| [m.step as f64, f(m)]).collect() };
    ui.columns(2, |cols| {
        Plot::new("loss").height(180.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new("loss", series(|m| m.loss)));
        });
        Plot::new("fve").height(180.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            plot.line(Line::new("FVE base", series(|m| m.fve_base)));
            plot.line(Line::new("FVE chat", series(|m| m.fve_chat)));
        });
    });
    ui.columns(2, |cols| {
        Plot::new("l0").height(140.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new("L0", series(|m| m.l0)));
        });
        Plot::new("dead").height(140.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            plot.line(Line::new("dead fraction", series(|m| m.dead_frac)));
        });
    });
}
