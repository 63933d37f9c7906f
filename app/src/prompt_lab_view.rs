//! The Prompt lab: type text or a conversation turn; see, per token, the chosen latents'
//! activations (shaded), the top latents, and where base and chat disagree about the next token
//! (KL per position and each model's top candidates). The models come from the app's store, so a
//! second analysis does not reload them.

use std::path::PathBuf;

use crossdiff::workflow::prompt_lab::{PromptLabJob, PromptLabOutcome};
use eframe::egui;

use crate::errors::{Field, Fields};
use crate::jobs::{Delivery, JobEnv, JobSlot};

/// The Prompt lab's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("run", Field::Value("Run directory")),
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("prompt", Field::Value("Text to analyse")),
    ("latent", Field::Value("Latents to follow")),
    ("allow-other-models", Field::Check("Allow other models")),
];

pub struct PromptLabView {
    pub run_dir: String,
    pub base_dir: String,
    pub chat_dir: String,
    /// Latent indices, comma separated.
    pub latents: String,
    /// The text, the chat-turn switch and the rest, from `PromptLabJob::default()`.
    pub config: PromptLabJob,
    pub job: JobSlot,
    delivery: Delivery<(PromptLabOutcome, Vec<usize>)>,
    /// The last analysis and the latents it followed.
    result: Option<(PromptLabOutcome, Vec<usize>)>,
    /// Analyse once when the view is first shown (a project's run was just opened).
    pub auto_run: bool,
}

impl PromptLabView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        Self {
            run_dir: String::new(),
            base_dir,
            chat_dir,
            latents: String::new(),
            // A first example to analyse, as a chat turn.
            config: PromptLabJob { text: "Who are you?".into(), chat_turn: true, ..PromptLabJob::default() },
            job: JobSlot::new(FIELDS),
            delivery: Delivery::default(),
            result: None,
            auto_run: false,
        }
    }

    /// Fills the view from a project's run: its models, the suggested latent and the text it fires
    /// on (as plain text: it holds the chat template's turns); the analysis runs when the view is
    /// first shown.
    pub fn prefill(&mut self, run: &str, base: &str, chat: &str, suggestion: &crate::suggest::Suggestion) {
        self.run_dir = run.to_string();
        self.base_dir = base.to_string();
        self.chat_dir = chat.to_string();
        self.result = None;
        if let Some(j) = suggestion.latent {
            self.latents = j.to_string();
        }
        if let Some(text) = &suggestion.text {
            self.config.text = text.clone();
            self.config.chat_turn = false;
        }
        self.auto_run = true;
    }

    fn start(&mut self, env: &JobEnv) {
        let (job, delivery) = (self.job_config(env.chat_adapter()), self.delivery.clone());
        self.job.start(env.spawn("analysis", move |device, store, handle| {
            let outcome = job.run(device, store, handle)?;
            let n = outcome.tokens.len();
            delivery.put((outcome, job.chosen));
            Ok(format!("{n} tokens"))
        }));
    }

    /// The job the Analyse button runs: the engine's config with this view's paths and latents, and
    /// the app's chat adapter.
    pub fn job_config(&self, chat_adapter: Option<PathBuf>) -> PromptLabJob {
        PromptLabJob {
            run: PathBuf::from(&self.run_dir),
            base: PathBuf::from(&self.base_dir),
            chat: PathBuf::from(&self.chat_dir),
            chat_adapter,
            chosen: self.latents.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
            ..self.config.clone()
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut crate::commands::Commands) {
        if let Some(result) = self.job.delivered(&self.delivery) {
            self.result = Some(result);
        }
        ui.heading("Prompt lab");
        crate::widgets::text_rows(
            ui,
            [
                ("Run directory", &mut self.run_dir),
                ("Base model directory", &mut self.base_dir),
                ("Chat model directory", &mut self.chat_dir),
            ],
        );
        crate::widgets::adapter_row(ui, &env.chat_adapter, commands);
        let name = ui.label("Text to analyse").id;
        ui.add(egui::TextEdit::multiline(&mut self.config.text).desired_rows(2).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.config.chat_turn, "As a chat turn");
            let name = ui.label("Latents to follow").id;
            ui.add(egui::TextEdit::singleline(&mut self.latents).desired_width(160.0)).labelled_by(name);
            ui.checkbox(&mut self.config.allow_other_models, "Allow other models")
                .on_hover_text("Go on when these are not the models the run was trained on");
        });
        let auto = std::mem::take(&mut self.auto_run) && !self.job.running();
        if self.job.start_button(ui, true, "Analyse") || auto {
            self.start(env);
        }
        self.job.ui(ui);
        if let Some((outcome, chosen)) = &self.result {
            tokens_ui(ui, outcome, chosen);
        }
    }
}

/// One row per token: KL of the next-token distributions, the chosen latents, the top latents and
/// each model's most likely next token.
fn tokens_ui(ui: &mut egui::Ui, outcome: &PromptLabOutcome, chosen: &[usize]) {
    let (a, tokens) = (&outcome.analysis, &outcome.tokens);
    let max_kl = a.kl.iter().copied().fold(1e-9, f64::max);
    egui::ScrollArea::vertical().show(ui, |ui| {
        egui::Grid::new("prompt lab tokens").striped(true).show(ui, |ui| {
            ui.strong("token");
            ui.strong("KL(chat || base) of next");
            for j in chosen {
                ui.strong(format!("latent {j}"));
            }
            ui.strong("top latents");
            ui.strong("base next / chat next");
            ui.end_row();
            for (i, tok) in tokens.iter().enumerate() {
                ui.label(crate::widgets::printable(tok));
                let alpha = (255.0 * (a.kl[i] / max_kl)) as u8;
                ui.label(
                    egui::RichText::new(format!("{:.4}", a.kl[i]))
                        .background_color(egui::Color32::from_rgba_unmultiplied(220, 80, 60, alpha)),
                );
                for c in &a.chosen {
                    ui.label(format!("{:.3}", c[i]));
                }
                let top: Vec<String> = a.top_latents[i].iter().map(|(j, v)| format!("{j}:{v:.2}")).collect();
                ui.label(top.join(" "));
                ui.label(format!(
                    "{} / {}",
                    a.next[i][0].first().map_or(0, |x| x.0),
                    a.next[i][1].first().map_or(0, |x| x.0)
                ));
                ui.end_row();
            }
        });
    });
}
