//! The ADL view: the activation-difference lens as a job (`crossdiff adl`'s `AdlJob`): the mean of
//! chat − base per token position at one layer over plain text, read through the chat model's (or
//! the base model's) unembedding as promoted and suppressed tokens, and the chat model's answers
//! steered with one position's mean difference at each strength.

use std::path::{Path, PathBuf};

use crossdiff::analysis::adl::{AdlReport, Lens};
use crossdiff::workflow::adl::AdlJob;
use eframe::egui;

use crate::errors::{Field, Fields, phrase};
use crate::jobs::{Delivery, JobEnv, JobSlot};
use crate::widgets::printable;

/// The ADL view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("data", Field::Value("Text file")),
    ("out", Field::Value("Output folder")),
    ("layer", Field::Value("Layer")),
    ("samples", Field::Value("Documents")),
    ("positions", Field::Value("Positions")),
];

/// Tokens shown per cell of the table.
const SHOWN: usize = 8;

pub struct AdlView {
    pub base_dir: String,
    pub chat_dir: String,
    /// Documents (plain text is the authors' setting).
    pub data: String,
    pub out_dir: String,
    /// Layer, documents, positions and the rest, from `AdlJob::default()` (the paths above are
    /// filled in when the job starts).
    pub config: AdlJob,
    /// Read the mean differences through the base model's unembedding instead of the chat model's.
    pub through_base: bool,
    pub job: JobSlot,
    delivery: Delivery<AdlReport>,
    result: Option<AdlReport>,
}

impl AdlView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        let mut view = Self {
            base_dir: String::new(),
            chat_dir: String::new(),
            data: String::new(),
            out_dir: String::new(),
            config: AdlJob::default(),
            through_base: false,
            job: JobSlot::new(FIELDS),
            delivery: Delivery::default(),
            result: None,
        };
        view.set_models(&base_dir, &chat_dir);
        view
    }

    /// The models to compare; the layer becomes the chat model's middle block (the authors' choice)
    /// when its config.json says how many it has.
    pub fn set_models(&mut self, base: &str, chat: &str) {
        self.base_dir = base.to_string();
        self.chat_dir = chat.to_string();
        let config = Path::new(chat).join("config.json");
        if let Ok(c) = crossdiff::ModelConfig::from_file(&config) {
            self.config.layer = crossdiff::workflow::adl::middle_layer(c.num_hidden_layers);
        }
    }

    /// Fills the view from a project: its models, its first text file, and `adl/` inside it.
    pub fn prefill(&mut self, base: &str, chat: &str, data: Option<String>, out: &Path) {
        self.set_models(base, chat);
        self.data = data.unwrap_or_default();
        self.out_dir = out.display().to_string();
        self.result = None;
    }

    /// The job the Run button starts: the engine's config with this view's paths and the app's chat
    /// adapter.
    pub fn job_config(&self, chat_adapter: Option<PathBuf>) -> AdlJob {
        let path = |s: &str| PathBuf::from(s.trim());
        AdlJob {
            base: path(&self.base_dir),
            chat: path(&self.chat_dir),
            chat_adapter,
            data: path(&self.data),
            out: path(&self.out_dir),
            ..self.config.clone()
        }
    }

    fn start(&mut self, env: &JobEnv) {
        let (job, delivery) = (self.job_config(env.chat_adapter()), self.delivery.clone());
        self.job.start(env.spawn("ADL", move |device, store, handle| match job.run(device, store, handle) {
            Ok(done) => {
                let r = &done.report;
                let line = format!(
                    "{} documents × {} positions at layer {}; {} written",
                    r.samples,
                    r.per_position.len(),
                    r.layer,
                    job.out.join(AdlJob::JSON).display()
                );
                delivery.put(done.report);
                Ok(line)
            }
            // Cancel stops the pass (nothing is written): said as a stop.
            Err(e) if handle.cancelled() => Ok(format!("stopped — {}", phrase(&e, FIELDS))),
            Err(e) => Err(e),
        }));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut crate::commands::Commands) {
        if let Some(report) = self.job.delivered(&self.delivery) {
            self.result = Some(report);
        }
        ui.heading("Activation-difference lens");
        ui.weak(
            "The mean of chat - base at one layer for each token position over plain text, read through a \
             model's unembedding, and the chat model steered with it.",
        );
        crate::widgets::text_rows(
            ui,
            [("Base model directory", &mut self.base_dir), ("Chat model directory", &mut self.chat_dir)],
        );
        crate::widgets::adapter_row(ui, &env.chat_adapter, commands);
        crate::widgets::text_rows(ui, [("Text file", &mut self.data), ("Output folder", &mut self.out_dir)]);
        let c = &mut self.config;
        egui::Grid::new("adl settings").num_columns(2).show(ui, |ui| {
            for (label, value, max) in [
                ("Layer", &mut c.layer, 1_000),
                ("Documents", &mut c.samples, 10_000_000),
                ("Positions", &mut c.positions, 1_000_000),
            ] {
                let name = ui.label(label).id;
                ui.add(egui::DragValue::new(value).range(0..=max).clamp_existing_to_range(false)).labelled_by(name);
                ui.end_row();
            }
        });
        if self.job.start_button(ui, true, "Run ADL") {
            self.start(env);
        }
        self.job.ui(ui);
        if let Some(r) = &self.result {
            ui.separator();
            egui::ScrollArea::vertical().show(ui, |ui| result_ui(ui, r, &mut self.through_base));
        }
    }
}

fn tokens(lens: &[crossdiff::analysis::adl::TokenLogit]) -> String {
    lens.iter().take(SHOWN).map(|t| printable(&t.token)).collect::<Vec<_>>().join(" · ")
}

fn result_ui(ui: &mut egui::Ui, r: &AdlReport, through_base: &mut bool) {
    ui.label(format!(
        "{} documents at layer {}; mean chat activation norm {:.3} (the unit of steering strengths)",
        r.samples, r.layer, r.mean_chat_norm
    ));
    ui.checkbox(through_base, "Read through the base model")
        .on_hover_text("The authors read through the fine-tuned (chat) model; the base model's reading is beside it");
    let model = if *through_base { "base" } else { "chat" };
    egui::Grid::new("adl table").striped(true).show(ui, |ui| {
        for h in ["position", "documents", "norm of mean diff", "promoted", "suppressed"] {
            ui.strong(h);
        }
        ui.end_row();
        for p in &r.per_position {
            let lens: &Lens = if *through_base { &p.base } else { &p.chat };
            ui.label(p.position.to_string());
            ui.label(p.count.to_string());
            ui.label(format!("{:.3}", p.norm_of_mean_diff));
            ui.label(tokens(&lens.promoted)).on_hover_text(format!("promoted through the {model} model"));
            ui.label(tokens(&lens.suppressed)).on_hover_text(format!("suppressed through the {model} model"));
            ui.end_row();
        }
    });
    ui.separator();
    let s = &r.steering;
    ui.strong(format!("The chat model steered with position {}'s mean difference", s.position));
    for (prompt, answers) in s.prompts.iter().zip(&s.outputs) {
        ui.label(egui::RichText::new(format!("prompt: {prompt}")).italics());
        egui::Grid::new(("adl steering", prompt)).striped(true).show(ui, |ui| {
            for (strength, answer) in s.strengths.iter().zip(answers) {
                ui.label(format!("strength {strength}"));
                ui.label(format!("answer: {}", printable(answer)));
                ui.end_row();
            }
        });
    }
}
