//! The Analyze view: what comes after training, on one run. "Start analysis" runs the engine's
//! `AnalyzeJob` (per-latent metrics, Latent Scaling, summary.json and the examples store, with each
//! latent's promoted/suppressed tokens when both models are given); "Start KL check" runs its
//! `KlJob` (KL(P_chat ‖ P_patched) per set of patched latents, kl.json). Both run in the background
//! with progress and Cancel; when one finishes, the views that show the run reload it (a command).

use std::path::PathBuf;

use crossdiff::analysis::kl::{KlStat, PatchOn};
use crossdiff::analysis::latents::LatentClass;
use crossdiff::workflow::analyze::Analysed;
use crossdiff::workflow::analyze::{AnalyzeJob, MAX_CONTEXT, MAX_EXAMPLES};
use crossdiff::workflow::kl::KlJob;
use eframe::egui;

use crate::commands::{AppCommand, Commands, Tab};
use crate::errors::{Field, Fields, phrase};
use crate::jobs::{Delivery, JobEnv, JobSlot};

/// The analysis's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("run", Field::Value("Run directory")),
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("cache", Field::Value("Cache directory")),
    ("tokens", Field::Value("Tokens to analyse")),
    ("examples", Field::Value("Examples per latent")),
    ("context", Field::Value("Example context")),
    ("allow-partial", Field::Check("Use an incomplete cache")),
    ("allow-other-models", Field::Check("Allow other models")),
];

/// The KL check's fields by the flags the engine's errors name.
pub const KL_FIELDS: Fields = &[
    ("run", Field::Value("Run directory")),
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("data", Field::Value("Conversations file")),
    ("conversations", Field::Value("Conversations")),
    ("patch-on", Field::Value("Patch on")),
    ("first-k", Field::Value("k")),
    ("layers", Field::Value("Sweep layers")),
    ("allow-other-models", Field::Check("Allow other models")),
];

/// Conversations the KL check uses unless told: `crossdiff kl`'s default (the paper's 512).
pub const DEFAULT_CONVERSATIONS: usize = crossdiff::workflow::kl::DEFAULT_CONVERSATIONS;

pub struct AnalyzeView {
    pub run_dir: String,
    pub base_dir: String,
    pub chat_dir: String,
    pub cache_dir: String,
    /// Conversations (.jsonl or .parquet with `messages`) for the KL check.
    pub kl_data: String,
    /// Go on when the models or the cache are not the run's (both jobs).
    pub allow_other_models: bool,
    /// The rest of the analysis, from `AnalyzeJob::default()` (the paths above are filled in when
    /// the job starts).
    pub config: AnalyzeJob,
    pub conversations: usize,
    /// Where the KL check patches, and its k for the first-k predictions.
    pub patch_on: PatchOn,
    pub first_k: usize,
    /// Blocks to sweep with the conditions that need no dictionary, comma-separated (`--layers`).
    pub sweep_layers: String,
    pub job: JobSlot,
    pub kl_job: JobSlot,
    delivery: Delivery<String>,
    kl_delivery: Delivery<Vec<KlStat>>,
    /// The last analysis's class counts, and the last KL table.
    summary: Option<String>,
    kl: Option<Vec<KlStat>>,
}

impl AnalyzeView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        Self {
            run_dir: String::new(),
            base_dir,
            chat_dir,
            cache_dir: String::new(),
            kl_data: String::new(),
            allow_other_models: false,
            config: AnalyzeJob::default(),
            conversations: DEFAULT_CONVERSATIONS,
            patch_on: PatchOn::All,
            first_k: crossdiff::workflow::kl::DEFAULT_FIRST_K,
            sweep_layers: String::new(),
            job: JobSlot::new(FIELDS),
            kl_job: JobSlot::new(KL_FIELDS),
            delivery: Delivery::default(),
            kl_delivery: Delivery::default(),
            summary: None,
            kl: None,
        }
    }

    /// Shows run `run` (from the Train and Latents views, through a command).
    pub fn set_run(&mut self, run: &str) {
        if self.run_dir != run {
            self.run_dir = run.to_string();
            self.summary = None;
            self.kl = None;
        }
    }

    /// The analysis the Start button runs: the engine's config with this view's paths; the models
    /// (for each latent's promoted/suppressed tokens) when a directory is given, the chat one with
    /// the app's chat adapter.
    pub fn job_config(&self, chat_adapter: Option<PathBuf>) -> AnalyzeJob {
        let given = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
        let chat = given(&self.chat_dir);
        AnalyzeJob {
            run: PathBuf::from(&self.run_dir),
            cache: PathBuf::from(&self.cache_dir),
            base: given(&self.base_dir),
            chat_adapter: chat_adapter.filter(|_| chat.is_some()),
            chat,
            allow_other_models: self.allow_other_models,
            ..self.config.clone()
        }
    }

    /// The KL check the Start button runs (with the app's chat adapter).
    pub fn kl_config(&self, chat_adapter: Option<PathBuf>) -> KlJob {
        KlJob {
            run: PathBuf::from(&self.run_dir),
            base: PathBuf::from(&self.base_dir),
            chat: PathBuf::from(&self.chat_dir),
            chat_adapter,
            data: PathBuf::from(&self.kl_data),
            conversations: self.conversations,
            allow_other_models: self.allow_other_models,
            patch_on: self.patch_on,
            first_k: self.first_k,
            ..Default::default()
        }
    }

    fn start_analysis(&mut self, env: &JobEnv) {
        let (job, delivery) = (self.job_config(env.chat_adapter()), self.delivery.clone());
        self.job.start(env.spawn("latent analysis", move |device, _, handle| match job.run_any(device, handle) {
            Ok(Analysed::Sae(done)) => {
                let line = done.line();
                delivery.put(line.clone());
                Ok(line)
            }
            Ok(Analysed::Crosscoder(done)) => {
                let n = |c| done.summary.count(c);
                let pass = done.rows.iter().filter(|r| r.is_chat_specific()).count();
                delivery.put(format!(
                    "chat-only {} ({pass} pass Latent Scaling), base-only {}, shared {}, other {}, dead {}; FVE base \
                     {:.3}, chat {:.3}; L0 {:.1}",
                    n(LatentClass::ChatOnly),
                    n(LatentClass::BaseOnly),
                    n(LatentClass::Shared),
                    n(LatentClass::Other),
                    n(LatentClass::Dead),
                    done.summary.fve_base,
                    done.summary.fve_chat,
                    done.summary.l0
                ));
                Ok(format!(
                    "{} latents over {} tokens in {:.0}s; latents.csv, summary.json and the examples written",
                    done.rows.len(),
                    done.summary.tokens,
                    done.seconds
                ))
            }
            // Cancel stops the engine at a shard (it saves where it was): said as a stop.
            Err(e) if handle.cancelled() => Ok(format!("stopped — {}", phrase(&e, FIELDS))),
            Err(e) => Err(e),
        }));
    }

    fn start_kl(&mut self, env: &JobEnv) {
        let (mut job, delivery, sweep) =
            (self.kl_config(env.chat_adapter()), self.kl_delivery.clone(), self.sweep_layers.clone());
        self.kl_job.start(env.spawn("KL check", move |device, store, handle| {
            // The sweep's blocks are read when the job starts: a bad entry is the job's error.
            job.layers = parse_layers(&sweep)?;
            match job.run(device, store, handle) {
                Ok(report) => {
                    let n = report.table.len();
                    // The sweep's rows (each with its block) follow the table.
                    delivery.put(report.table.into_iter().chain(report.sweep).collect());
                    let file = job.table_file();
                    let name = file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    Ok(format!("{n} conditions over {} conversations, written to {name}", job.conversations))
                }
                Err(e) if handle.cancelled() => Ok(format!("stopped — {}", phrase(&e, KL_FIELDS))),
                Err(e) => Err(e),
            }
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut Commands) {
        if self.job.take_succeeded() {
            self.summary = self.delivery.take();
            commands.push(AppCommand::Analysed { run: self.run_dir.clone() });
        }
        if self.kl_job.take_succeeded() {
            self.kl = self.kl_delivery.take();
            commands.push(AppCommand::KlMeasured { run: self.run_dir.clone() });
        }
        ui.heading("Analyze a run");
        ui.weak("Per-latent metrics, Latent Scaling and examples (what the Latents and Plots views show), then the KL check.");
        crate::widgets::text_rows(
            ui,
            [
                ("Run directory", &mut self.run_dir),
                ("Base model directory", &mut self.base_dir),
                ("Chat model directory", &mut self.chat_dir),
            ],
        );
        crate::widgets::adapter_row(ui, &env.chat_adapter, commands);
        ui.checkbox(&mut self.allow_other_models, "Allow other models")
            .on_hover_text("Go on when these models (or the cache's) are not the ones the run was trained on");
        ui.separator();
        egui::ScrollArea::vertical().show(ui, |ui| {
            self.analysis_ui(ui, env, commands);
            ui.separator();
            self.kl_ui(ui, env, commands);
        });
    }

    fn analysis_ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut Commands) {
        ui.strong("Latents and Latent Scaling");
        crate::widgets::text_rows(ui, [("Cache directory", &mut self.cache_dir)]);
        let c = &mut self.config;
        egui::Grid::new("analysis settings").num_columns(2).show(ui, |ui| {
            let name = ui.label("Tokens to analyse").id;
            ui.horizontal(|ui| {
                let mut all = c.tokens.is_none();
                if ui.checkbox(&mut all, "all of the cache").changed() {
                    c.tokens = (!all).then_some(100_000);
                }
                if let Some(t) = &mut c.tokens {
                    ui.add(number(t).range(1..=u64::MAX).speed(1000)).labelled_by(name);
                }
            });
            ui.end_row();
            let name = ui.label("Examples per latent").id;
            ui.add(number(&mut c.examples).range(1..=MAX_EXAMPLES)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Example context").id;
            ui.add(number(&mut c.context).range(0..=MAX_CONTEXT)).labelled_by(name);
            ui.end_row();
        });
        ui.checkbox(&mut c.allow_partial, "Use an incomplete cache")
            .on_hover_text("Analyse the tokens an interrupted cache holds so far");
        if self.job.start_button(ui, true, "Start analysis") {
            self.summary = None;
            self.start_analysis(env);
        }
        self.job.ui(ui);
        if let Some(s) = &self.summary {
            ui.label(format!("analysed: {s}"));
            ui.horizontal(|ui| {
                for (tab, label) in [(Tab::Latents, "Open the latents"), (Tab::Plots, "Open the plots")] {
                    if ui.button(label).clicked() {
                        commands.push(AppCommand::SwitchTab(tab));
                    }
                }
            });
        }
    }

    fn kl_ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut Commands) {
        ui.strong("KL check: the chat model's next-token distribution with the base residual patched");
        crate::widgets::text_rows(ui, [("Conversations file", &mut self.kl_data)]);
        ui.horizontal(|ui| {
            let name = ui.label("Conversations").id;
            ui.add(number(&mut self.conversations).range(1..=1_000_000)).labelled_by(name);
        });
        ui.horizontal(|ui| {
            ui.label("Patch on").on_hover_text(
                "Where the patched activation replaces the base one: every position (the paper's table, kl.json), \
                 only chat-template tokens, or only the positions predicting the first k reply tokens",
            );
            for (on, label) in [
                (PatchOn::All, "all positions"),
                (PatchOn::Template, "template tokens"),
                (PatchOn::FirstK, "first k predictions"),
                (PatchOn::TemplateAndFirstK, "both"),
            ] {
                ui.radio_value(&mut self.patch_on, on, label);
            }
            if matches!(self.patch_on, PatchOn::FirstK | PatchOn::TemplateAndFirstK) {
                let name = ui.label("k").id;
                ui.add(number(&mut self.first_k).range(1..=1000)).labelled_by(name);
            }
        });
        ui.horizontal(|ui| {
            let name = ui.label("Sweep layers").id;
            ui.add(egui::TextEdit::singleline(&mut self.sweep_layers).hint_text("e.g. 0,2,4").desired_width(120.0))
                .labelled_by(name)
                .on_hover_text("Also patch at these blocks with the conditions that need no dictionary (none, and chat's own activations when the patch is limited)");
        });
        if self.kl_job.start_button(ui, true, "Start KL check") {
            self.kl = None;
            self.start_kl(env);
        }
        self.kl_job.ui(ui);
        let Some(stats) = &self.kl else { return };
        egui::Grid::new("kl table").striped(true).show(ui, |ui| {
            for h in ["condition", "latents", "KL, all reply tokens", "KL, first 9 reply tokens"] {
                ui.strong(h);
            }
            ui.end_row();
            for s in stats {
                match s.layer {
                    Some(l) => ui.label(format!("{} @ block {l}", s.condition)),
                    None => ui.label(&s.condition),
                };
                ui.label(s.latents.to_string());
                ui.label(format!("{:.4} ± {:.4}", s.mean_all, s.ci_all));
                ui.label(format!("{:.4} ± {:.4}", s.mean_first9, s.ci_first9));
                ui.end_row();
            }
        });
        if ui.button("Open the KL chart").clicked() {
            commands.push(AppCommand::SwitchTab(Tab::Plots));
        }
    }
}

/// A number field that shows a value set elsewhere as it is (the job's checks name a bad one).
fn number<T: egui::emath::Numeric>(value: &mut T) -> egui::DragValue<'_> {
    egui::DragValue::new(value).clamp_existing_to_range(false)
}

/// The sweep's blocks from "0, 2,4" (empty: no sweep); a bad entry is named.
fn parse_layers(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| crossdiff::bad_value::bad("layers", format!("\"{s}\" is not a block number")))
        })
        .collect()
}
