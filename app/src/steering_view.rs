//! The Steering view: side-by-side greedy generation without and with chosen latents' chat decoder
//! directions added at the crosscoder's layer, one strength slider per latent. The model comes from
//! the app's store.

use std::path::PathBuf;

use crossdiff::workflow::steer::SteerJob;
use eframe::egui;

use crate::errors::{Field, Fields};
use crate::jobs::{Delivery, JobEnv, JobSlot};

/// The Steering view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("run", Field::Value("Run directory")),
    ("model", Field::Value("Model to steer")),
    ("adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("prompt", Field::Value("Steering prompt")),
    ("latent", Field::Value("Add latent")),
    ("strength", Field::Value("Strength")),
    ("chat", Field::Check("Render as a chat turn")),
    ("allow-other-models", Field::Check("Allow other models")),
];

/// The checkbox that merges the chat adapter into the model to steer.
pub const MERGE_ADAPTER: &str = "Steer the chat model (merge the chat adapter)";

pub struct SteeringView {
    pub run_dir: String,
    pub model_dir: String,
    /// Merge the app's chat adapter (when there is one) into the model to steer: it is the chat
    /// model. Off: the model as it is (the base, say).
    pub merge_adapter: bool,
    /// (latent, strength as a multiple of its max activation).
    pub latents: Vec<(usize, f64)>,
    /// The prompt, chat switch, token budget and the rest, from `SteerJob::default()`.
    pub config: SteerJob,
    new_latent: String,
    pub job: JobSlot,
    delivery: Delivery<(String, String)>,
    result: Option<(String, String)>,
    /// Generate once when the view is first shown (a project's run was just opened).
    pub auto_run: bool,
}

impl SteeringView {
    pub fn new(model_dir: String) -> Self {
        Self {
            run_dir: String::new(),
            model_dir,
            merge_adapter: true,
            latents: Vec::new(),
            // A first example prompt, as a chat turn.
            config: SteerJob { prompt: "Who are you?".into(), chat: true, ..SteerJob::default() },
            new_latent: String::new(),
            job: JobSlot::new(FIELDS),
            delivery: Delivery::default(),
            result: None,
            auto_run: false,
        }
    }

    /// Fills the view from a project's run: the chat model and the suggested latent at strength 1;
    /// the generation runs when the view is first shown.
    pub fn prefill(&mut self, run: &str, chat: &str, suggestion: &crate::suggest::Suggestion) {
        self.run_dir = run.to_string();
        self.model_dir = chat.to_string();
        self.merge_adapter = true;
        self.latents.clear();
        self.result = None;
        // A greeting: the chat model answers in its own voice, which a chat-specific latent changes.
        self.config.prompt = "Hello!".into();
        self.config.chat = true;
        if let Some(j) = suggestion.latent {
            self.add_latent(j);
            self.auto_run = true;
        }
    }

    /// Generates with the view's latents once it is shown (the tour, through a command).
    pub fn generate_when_shown(&mut self) {
        self.auto_run = !self.latents.is_empty();
    }

    fn start(&mut self, env: &JobEnv) {
        let Some(job) = self.job_config(env.chat_adapter()) else { return };
        let delivery = self.delivery.clone();
        self.job.start(env.spawn("steering", move |device, store, handle| {
            let done = job.run(device, store, handle)?;
            delivery.put((crate::widgets::answer_text(&done.plain), crate::widgets::answer_text(&done.steered)));
            Ok(format!("{} latents at layer {}", done.rows.len(), done.layer))
        }));
    }

    /// Adds a latent to steer with.
    pub fn add_latent(&mut self, latent: usize) {
        if !self.latents.iter().any(|(j, _)| *j == latent) {
            self.latents.push((latent, 1.0));
        }
    }

    /// Steer with latent `latent` of run `run` (the dashboard's Steer button, through a command).
    pub fn steer_latent(&mut self, run: &str, latent: usize) {
        if self.run_dir != run {
            self.run_dir = run.to_string();
            self.latents.clear();
        }
        self.add_latent(latent);
    }

    /// The job the Generate button runs: the engine's config with this view's paths and latents
    /// (`None` without a latent), and the app's chat adapter when the chat model is steered.
    pub fn job_config(&self, chat_adapter: Option<PathBuf>) -> Option<SteerJob> {
        let (&(latent, strength), more) = self.latents.split_first()?;
        Some(SteerJob {
            run: PathBuf::from(&self.run_dir),
            model: PathBuf::from(&self.model_dir),
            adapter: chat_adapter.filter(|_| self.merge_adapter),
            latent,
            strength,
            more: more.to_vec(),
            ..self.config.clone()
        })
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut crate::commands::Commands) {
        if let Some(pair) = self.job.delivered(&self.delivery) {
            self.result = Some(pair);
        }
        ui.heading("Steering");
        crate::widgets::text_rows(ui, [("Run directory", &mut self.run_dir), ("Model to steer", &mut self.model_dir)]);
        crate::widgets::adapter_row(ui, &env.chat_adapter, commands);
        let name = ui.label("Steering prompt").id;
        ui.add(egui::TextEdit::multiline(&mut self.config.prompt).desired_rows(2).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.config.chat, "Render as a chat turn");
            ui.checkbox(&mut self.config.allow_other_models, "Allow other models")
                .on_hover_text("Go on when this is not the chat model the run was trained on");
            ui.add_enabled(env.chat_adapter().is_some(), egui::Checkbox::new(&mut self.merge_adapter, MERGE_ADAPTER))
                .on_hover_text("The chat adapter merged into the model to steer; untick to steer that model as it is")
                .on_disabled_hover_text("No chat adapter: the model is steered as it is");
        });
        ui.horizontal(|ui| {
            let name = ui.label("Add latent").id;
            ui.add(egui::TextEdit::singleline(&mut self.new_latent).desired_width(80.0)).labelled_by(name);
            if ui.button("Add").clicked() {
                if let Ok(j) = self.new_latent.trim().parse() {
                    self.add_latent(j);
                }
            }
        });
        let mut remove = None;
        for (i, (j, strength)) in self.latents.iter_mut().enumerate() {
            ui.horizontal(|ui| {
                let name = ui.label(format!("strength of latent {j}")).id;
                ui.add(egui::Slider::new(strength, -10.0..=10.0)).labelled_by(name);
                if ui.button(format!("remove latent {j}")).clicked() {
                    remove = Some(i);
                }
            });
        }
        if let Some(i) = remove {
            self.latents.remove(i);
        }
        let auto = std::mem::take(&mut self.auto_run) && !self.job.running();
        if self.job.start_button(ui, !self.latents.is_empty(), "Generate steered") || auto {
            self.start(env);
        }
        self.job.ui(ui);
        if let Some((plain, steered)) = &self.result {
            ui.columns(2, |cols| {
                cols[0].strong("unsteered");
                cols[0].label(format!("unsteered: {plain}"));
                cols[1].strong("steered");
                cols[1].label(format!("steered: {steered}"));
            });
        }
    }
}
