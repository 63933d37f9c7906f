//! The Train view: configure a crosscoder run on a cache (the engine's `TrainJob`, from its paper
//! defaults), run it as a background job on the app's device (Cancel checkpoints and stops; Start
//! again resumes), live curves of loss, FVE per model, L0 and the dead fraction. A run directory
//! that already holds a run shows that run — its settings, step and curves — with Continue, New
//! run and Analyze this run (`train_run`).

use std::path::PathBuf;

use crossdiff::crosscoder::{Init, Kind, SaeTarget};
use crossdiff::workflow::train::TrainJob;
use eframe::egui;

use crate::commands::{AppCommand, Commands};
use crate::errors::{Field, Fields};
use crate::jobs::{JobEnv, JobSlot};
use crate::train_run::{RunAction, RunInfo, curves_ui, fresh_run_dir, run_panel_ui};

/// The Train view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("cache", Field::Value("Cache directory")),
    ("out", Field::Value("Run directory")),
    ("kind", Field::Value("Kind")),
    ("init", Field::Value("Init")),
    ("target", Field::Value("SAE input")),
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
    /// What the run directory holds (checkpoint, curves), read when the directory changes, when a
    /// job ends, and when a running job passes a checkpoint step (never every frame), with the
    /// checkpoint step it was read at.
    run: Option<(RunInfo, u64)>,
    /// The step budget "Continue" asks for (the run's budget doubled, when a run is read).
    pub continue_to: u64,
    pub job: JobSlot,
}

impl Default for TrainView {
    fn default() -> Self {
        Self {
            cache_dir: String::new(),
            run_dir: String::new(),
            config: TrainJob::default(),
            run: None,
            continue_to: 0,
            job: JobSlot::new(FIELDS),
        }
    }
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

    /// What the run directory holds, as last read.
    pub fn run_info(&self) -> Option<&RunInfo> {
        self.run.as_ref().map(|(info, _)| info).filter(|info| info.dir == self.run_dir)
    }

    fn refresh_run(&mut self, job_ended: bool) {
        let every = self.config.checkpoint_every.max(1);
        let step = self.job.job().map_or(0, |j| j.progress.0) / every;
        let stale = match &self.run {
            Some((info, at)) => info.dir != self.run_dir || *at != step,
            None => true,
        };
        if stale || job_ended {
            let dir_changed = self.run.as_ref().is_none_or(|(info, _)| info.dir != self.run_dir);
            let info = RunInfo::read(&self.run_dir);
            if let Ok(Some(saved)) = &info.saved {
                // The run's budget doubled for a run just opened; otherwise what the user set,
                // unless the run has got there already.
                if dir_changed || self.continue_to <= saved.step {
                    self.continue_to = saved.config.steps.saturating_mul(2).max(saved.step + 1);
                }
                // A run directory opened (not one this view just trained in): its own settings in
                // the fields, so Start training resumes it rather than being refused.
                if dir_changed && !self.job.running() {
                    self.config = self.config.continuing(saved, saved.config.steps);
                }
            }
            self.run = Some((info, step));
        }
    }

    /// Starts training with the view's settings (resuming the run directory's checkpoint when it
    /// has one with the same settings).
    pub fn start(&mut self, env: &JobEnv) {
        let (job, out) = (self.job_config(), self.run_dir.clone());
        self.job.start(env.spawn("training", move |device, _, handle| {
            let done = job.run(device, handle)?;
            let cc = &done.crosscoder;
            let at =
                format!("{:?} D={} at step {} of {}", cc.config.kind, cc.config.dict_size, done.step, done.total_steps);
            Ok(if done.data_ended {
                format!("{at}: the data ran out, the run is finished with what there was; saved in {out}")
            } else if done.step < done.total_steps {
                format!("{at}, checkpoint saved in {out}; Start training again resumes")
            } else {
                format!("{at}, saved in {out}")
            })
        }));
    }

    /// Carries out an action of the run panel.
    fn act(&mut self, action: RunAction, env: &JobEnv, commands: &mut Commands) {
        if let RunAction::Analyze = action {
            commands.push(AppCommand::AnalyzeRun { run: self.run_dir.clone(), cache: Some(self.cache_dir.clone()) });
            return;
        }
        let Some(Ok(Some(saved))) = self.run_info().map(|i| &i.saved) else { return };
        match action {
            RunAction::Continue(steps) => {
                self.config = self.config.continuing(saved, steps);
                self.start(env);
            }
            RunAction::NewRun => {
                self.config = self.config.continuing(saved, saved.config.steps);
                self.run_dir = fresh_run_dir(&self.run_dir);
            }
            RunAction::Analyze => {}
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut Commands) {
        let ended = self.job.take_ended();
        self.refresh_run(ended);
        ui.heading("Train a crosscoder");
        self.settings_ui(ui);
        if self.job.start_button(ui, true, "Start training") {
            self.start(env);
        }
        let busy = self.job.running();
        let action = match &self.run {
            Some((info, _)) if info.dir == self.run_dir => run_panel_ui(ui, info, &mut self.continue_to, busy),
            _ => None,
        };
        if let Some(action) = action {
            self.act(action, env, commands);
        }
        self.job.ui(ui);
        let live = self.job.job().filter(|j| j.error().is_none()).map_or(&[][..], |j| &j.metrics[..]);
        let saved = self.run_info().map_or(&[][..], |i| &i.metrics[..]);
        curves_ui(ui, saved, live);
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
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
                ui.radio_value(&mut c.kind, Kind::Sae, "SAE")
                    .on_hover_text("A BatchTopK sparse autoencoder on one activation per token (a diff-SAE by default)");
            });
            ui.end_row();
            if c.kind == Kind::Sae {
                // The crosscoder-only settings go back to their defaults (an SAE refuses them).
                c.init = Init::Shared;
                c.init_norm = None;
                c.squared_recon = false;
                ui.label("SAE input");
                ui.horizontal(|ui| {
                    let target = c.target.get_or_insert_default();
                    for (t, label) in [
                        (SaeTarget::ChatMinusBase, "chat − base"),
                        (SaeTarget::BaseMinusChat, "base − chat"),
                        (SaeTarget::Base, "base"),
                        (SaeTarget::Chat, "chat"),
                    ] {
                        ui.radio_value(target, t, label);
                    }
                });
            } else {
                c.target = None;
                ui.label("Init");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut c.init, Init::Shared, "shared")
                        .on_hover_text("One encoder matrix for both models (the paper's scripts)");
                    ui.radio_value(&mut c.init, Init::Independent, "independent").on_hover_text(
                        "One matrix per model (the authors' library default): chat-only directions separate in fewer steps",
                    );
                });
            }
            ui.end_row();
            optional_ui(ui, "Dictionary size", "32 × the model width", &mut c.dict_size, 1 << 20);
            if c.kind.is_topk() {
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
