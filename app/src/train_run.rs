//! The Train view's run panel: what its run directory already holds — the checkpoint's own settings
//! and step, the logged curves (metrics.jsonl) — read when the directory changes or a job ends,
//! never per frame; and the actions on such a run: continue it with more steps, resume it, start a
//! new run beside it, analyse it.

use std::path::Path;

use crossdiff::analysis::latents::LatentClass;
use crossdiff::crosscoder::Kind;
use crossdiff::crosscoder::train::{SavedRun, StepMetrics, saved_run};
use crossdiff::run_dir::RunDir;
use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use crate::widgets::{SERIES_COLOR, class_color};

/// What a run directory holds.
pub struct RunInfo {
    pub dir: String,
    /// `Ok(None)`: no checkpoint; an error: one that cannot be read.
    pub saved: Result<Option<SavedRun>, String>,
    /// The logged steps (empty when there is no metrics.jsonl).
    pub metrics: Vec<StepMetrics>,
    pub has_crosscoder: bool,
}

impl RunInfo {
    /// Reads `dir`'s checkpoint (through the engine's `saved_run`) and metrics.jsonl.
    pub fn read(dir: &str) -> Self {
        let run = RunDir::new(dir);
        let saved = saved_run(run.path()).map_err(|e| crate::errors::phrase(&e, crate::train_view::FIELDS));
        Self {
            dir: dir.to_string(),
            saved,
            metrics: run.read_metrics().unwrap_or_default(),
            has_crosscoder: run.has_crosscoder(),
        }
    }
}

/// "checkpoint: step S of N (T tokens) in PATH".
fn checkpoint_line(saved: &SavedRun, dir: &str) -> String {
    let state = RunDir::new(dir).checkpoint_state();
    format!(
        "checkpoint: step {} of {} ({} tokens) in {}",
        saved.step,
        saved.config.steps,
        saved.tokens,
        state.display()
    )
}

/// The run's settings in the Train view's words.
fn settings_line(saved: &SavedRun) -> String {
    let c = &saved.config;
    let sparsity = match c.kind {
        Kind::BatchTopK => format!("BatchTopK, k {}", c.k),
        Kind::L1 => format!("L1, μ {}", c.mu),
        Kind::Sae => format!("SAE on {}, k {}", c.target.unwrap_or_default(), c.k),
    };
    let batch = saved.batch().map_or(String::new(), |b| format!(", batch {b}"));
    format!("this run's settings: {sparsity}, dictionary size {}, learning rate {}{batch}", c.dict_size, c.lr)
}

/// What the user asked of an existing run.
pub enum RunAction {
    /// Fill the view from the run's settings with this step budget, then start.
    Continue(u64),
    /// A fresh run directory beside this one, from this run's settings.
    NewRun,
    Analyze,
}

/// The panel over a run directory that holds a run: its step, its settings and what to do with it.
/// `continue_to` is the step budget "Continue" asks for.
pub fn run_panel_ui(ui: &mut egui::Ui, info: &RunInfo, continue_to: &mut u64, busy: bool) -> Option<RunAction> {
    let mut action = None;
    let saved = match &info.saved {
        Ok(Some(s)) => s,
        Ok(None) => {
            if info.has_crosscoder && ui.add_enabled(!busy, egui::Button::new("Analyze this run")).clicked() {
                action = Some(RunAction::Analyze);
            }
            return action;
        }
        Err(e) => {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
            return None;
        }
    };
    ui.group(|ui| {
        ui.label(checkpoint_line(saved, &info.dir));
        ui.label(settings_line(saved));
        let finished = saved.step >= saved.config.steps;
        ui.weak(if finished {
            "The run is finished. Continue trains it further with its own settings; New run starts another beside it."
        } else {
            "The run stopped early. Continue resumes it with its own settings; New run starts another beside it."
        });
        ui.horizontal(|ui| {
            let name = ui.label("Continue to step").id;
            ui.add(egui::DragValue::new(continue_to).range(saved.step + 1..=u64::MAX / 2).speed(100)).labelled_by(name);
            let on_cache = saved.on_cache();
            let label = if finished { "Continue (more steps)" } else { "Continue" };
            if ui
                .add_enabled(!busy && on_cache, egui::Button::new(label))
                .on_disabled_hover_text("a run trained on the fly continues from the command line (`crossdiff train`)")
                .clicked()
            {
                action = Some(RunAction::Continue(*continue_to));
            }
            if ui
                .add_enabled(!busy, egui::Button::new("New run"))
                .on_hover_text("A fresh run directory beside this one, starting from this run's settings")
                .clicked()
            {
                action = Some(RunAction::NewRun);
            }
            if info.has_crosscoder && ui.add_enabled(!busy, egui::Button::new("Analyze this run")).clicked() {
                action = Some(RunAction::Analyze);
            }
        });
    });
    action
}

/// The first of `DIR-2`, `DIR-3`, … (after any `-N` the name already ends with) that does not exist.
pub fn fresh_run_dir(dir: &str) -> String {
    let path = Path::new(dir.trim_end_matches(['/', '\\']));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let stem = match name.rsplit_once('-') {
        Some((stem, n)) if !stem.is_empty() && n.parse::<u32>().is_ok() => stem.to_string(),
        _ => name,
    };
    (2u32..)
        .map(|n| path.with_file_name(format!("{stem}-{n}")))
        .find(|p| !p.exists())
        .expect("some name is free")
        .display()
        .to_string()
}

/// Loss, FVE per model, L0 and dead fraction against the step: the logged steps of earlier runs in
/// this directory up to where the live job took over, then the live job's.
pub fn curves_ui(ui: &mut egui::Ui, saved: &[StepMetrics], live: &[StepMetrics]) {
    let from = live.first().map_or(u64::MAX, |m| m.step);
    let metrics: Vec<&StepMetrics> = saved.iter().filter(|m| m.step < from).chain(live).collect();
    if metrics.is_empty() {
        return;
    }
    let series = |f: fn(&StepMetrics) -> f64| -> PlotPoints { metrics.iter().map(|m| [m.step as f64, f(m)]).collect() };
    ui.label(format!("curves: {} logged steps, the last at step {}", metrics.len(), metrics[metrics.len() - 1].step));
    ui.columns(2, |cols| {
        Plot::new("loss").height(180.0).include_y(0.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new("loss", series(|m| m.loss)).color(SERIES_COLOR));
        });
        Plot::new("fve").height(180.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            // Each model in its class's colour (base-only blue, chat-only red).
            plot.line(Line::new("FVE base", series(|m| m.fve_base)).color(class_color(LatentClass::BaseOnly)));
            plot.line(Line::new("FVE chat", series(|m| m.fve_chat)).color(class_color(LatentClass::ChatOnly)));
        });
    });
    ui.columns(2, |cols| {
        Plot::new("l0").height(140.0).include_y(0.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new("L0", series(|m| m.l0)).color(SERIES_COLOR));
        });
        Plot::new("dead").height(140.0).include_y(0.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            plot.line(Line::new("dead fraction", series(|m| m.dead_frac)).color(class_color(LatentClass::Dead)));
        });
    });
}
