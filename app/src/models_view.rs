//! The Models view: load a base/chat pair (into the app's model store, on the app's device), their
//! config.json side by side with the memory their weights need, and one prompt run through both
//! with the answers streaming in. Loading and the prompt are jobs of the app's one mechanism.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crossdiff::model::generate::{Sampling, generate};
use crossdiff::{Backend, LoadOptions, Model, ModelConfig};
use eframe::egui;

use crate::errors::{Field, Fields};
use crate::jobs::{JobEnv, JobSlot};

/// The Models view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("prompt", Field::Value("Prompt text")),
    ("max-tokens", Field::Value("max tokens")),
];

#[derive(Clone)]
pub struct ModelSummary {
    pub dir: String,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub parameters: usize,
    pub config: ModelConfig,
    /// The device it was loaded on.
    pub device: Backend,
    /// The LoRA adapter merged into it: its folder and what it adapts.
    pub adapter: Option<(PathBuf, String)>,
}

impl ModelSummary {
    fn of(dir: &std::path::Path, m: &Model, device: Backend) -> Self {
        let c = &m.lm.config;
        Self {
            dir: dir.display().to_string(),
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            vocab: c.vocab_size,
            parameters: c.parameter_count(),
            config: c.clone(),
            device,
            adapter: m.adapter.clone(),
        }
    }

    /// What the view says about a loaded model (`name`: base or chat): its folder, then its family
    /// and size, then the adapter merged into it, if any.
    pub fn text(&self, name: &str) -> String {
        let mut text = format!(
            "{name}: {}\n{} · {} layers, width {}, vocab {}, {:.1}M parameters, on {}",
            self.dir,
            self.config.family,
            self.layers,
            self.hidden,
            self.vocab,
            self.parameters as f64 / 1e6,
            self.device
        );
        if let Some((dir, description)) = &self.adapter {
            text += &format!("\nadapter merged: {description} from {}", dir.display());
        }
        text
    }
}

/// What the jobs write and the view shows: each model's summary and its answer so far (`None`
/// before its generation starts).
#[derive(Default)]
struct Shown {
    models: [Option<ModelSummary>; 2],
    answers: [Option<String>; 2],
}

pub struct ModelsView {
    /// Base and chat snapshot directories (the two text fields).
    pub dirs: [String; 2],
    pub prompt: String,
    pub chat: bool,
    pub max_tokens: usize,
    shown: Arc<Mutex<Shown>>,
    /// Loading and the prompt: one job at a time.
    pub job: JobSlot,
    /// Run the prompt once when the view is next shown (the tour asked for it).
    auto_run: bool,
}

impl ModelsView {
    pub fn new(dirs: [String; 2]) -> Self {
        Self {
            dirs,
            prompt: "What is a crosscoder?".into(),
            chat: true,
            max_tokens: 32,
            shown: Default::default(),
            job: JobSlot::new(FIELDS),
            auto_run: false,
        }
    }

    /// Puts `prompt` in the prompt box as a chat turn, to run through both models (loading them when
    /// needed) once the view is shown.
    pub fn ask(&mut self, prompt: &str) {
        self.prompt = prompt.to_string();
        self.chat = true;
        self.auto_run = true;
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, Shown> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn models_ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut crate::commands::Commands) {
        ui.heading("Models");
        for (slot, label) in ["Base model directory", "Chat model directory"].iter().enumerate() {
            let name = ui.label(*label).id;
            ui.add(egui::TextEdit::singleline(&mut self.dirs[slot]).desired_width(f32::INFINITY)).labelled_by(name);
        }
        let name = ui.label(crate::widgets::ADAPTER_LABEL).id;
        if let Some(dir) = crate::widgets::adapter_field(ui, name, &env.chat_adapter) {
            commands.push(crate::commands::AppCommand::SetChatAdapter { dir });
        }
        if self.job.start_button(ui, true, "Load models") {
            self.start_load(env);
        }
        self.job.ui(ui);
        ui.separator();
        let shown = self.shown();
        for (slot, name) in ["base", "chat"].iter().enumerate() {
            match &shown.models[slot] {
                Some(m) => {
                    ui.label(m.text(name));
                }
                None => {
                    ui.weak(format!("{name}: not loaded"));
                }
            }
        }
    }

    /// Loads both models into the store (a model already there on this device is not reloaded), the
    /// chat one with the app's chat adapter merged in.
    fn start_load(&mut self, env: &JobEnv) {
        let dirs = [PathBuf::from(&self.dirs[0]), PathBuf::from(&self.dirs[1])];
        let adapters = [None, env.chat_adapter()];
        let shown = self.shown.clone();
        *self.shown() = Shown::default();
        let backend = env.device_backend();
        self.job.start(env.spawn("loading models", move |device, store, handle| {
            let mut models = Vec::new();
            for (slot, dir) in dirs.iter().enumerate() {
                let m = store.get(dir, adapters[slot].as_deref(), device, LoadOptions::default(), handle)?;
                shown.lock().unwrap_or_else(|e| e.into_inner()).models[slot] =
                    Some(ModelSummary::of(dir, &m, backend.clone()));
                models.push(m);
            }
            crossdiff::model::check_models(&models[0], &models[1])?;
            Ok(format!("both models on {backend}"))
        }));
    }

    /// Both snapshots' configurations side by side, and the memory their weights need.
    fn configs_ui(&self, ui: &mut egui::Ui) {
        let shown = self.shown();
        let [Some(a), Some(b)] = &shown.models else { return };
        let (a, b) = (&a.config, &b.config);
        let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| v.to_string());
        let fields: Vec<(&str, String, String)> = vec![
            ("family", format!("{} ({})", a.family, a.model_type), format!("{} ({})", b.family, b.model_type)),
            ("hidden_size", a.hidden_size.to_string(), b.hidden_size.to_string()),
            ("num_hidden_layers", a.num_hidden_layers.to_string(), b.num_hidden_layers.to_string()),
            ("num_attention_heads", a.num_attention_heads.to_string(), b.num_attention_heads.to_string()),
            ("num_key_value_heads", a.num_key_value_heads.to_string(), b.num_key_value_heads.to_string()),
            ("head_dim", a.head_dim.to_string(), b.head_dim.to_string()),
            ("intermediate_size", a.intermediate_size.to_string(), b.intermediate_size.to_string()),
            ("vocab_size", a.vocab_size.to_string(), b.vocab_size.to_string()),
            (
                "sliding_window",
                format!("{:?}", a.effective_sliding_window()),
                format!("{:?}", b.effective_sliding_window()),
            ),
            ("rope_theta", a.rope_base().to_string(), b.rope_base().to_string()),
            ("tie_word_embeddings", a.tied().to_string(), b.tied().to_string()),
            ("attn_logit_softcapping", opt(a.attn_logit_softcapping), opt(b.attn_logit_softcapping)),
            ("final_logit_softcapping", opt(a.final_logit_softcapping), opt(b.final_logit_softcapping)),
            ("query_pre_attn_scalar", opt(a.query_pre_attn_scalar), opt(b.query_pre_attn_scalar)),
            ("dtype", a.declared_dtype().unwrap_or("–").to_string(), b.declared_dtype().unwrap_or("–").to_string()),
        ];
        egui::Grid::new("configs").striped(true).show(ui, |ui| {
            ui.strong("config.json");
            ui.strong("base");
            ui.strong("chat");
            ui.end_row();
            for (name, x, y) in fields {
                ui.label(name);
                ui.label(&x);
                if x == y {
                    ui.label(&y)
                } else {
                    ui.colored_label(egui::Color32::LIGHT_RED, &y)
                };
                ui.end_row();
            }
        });
        let gib = |bytes: usize| bytes as f64 / (1u64 << 30) as f64;
        let both = a.parameter_count() + b.parameter_count();
        ui.label(format!(
            "Memory for both models' weights: {:.2} GiB in f32, {:.2} GiB in 16-bit",
            gib(both * 4),
            gib(both * 2)
        ));
    }

    pub fn prompt_ui(&mut self, ui: &mut egui::Ui, env: &JobEnv) {
        self.configs_ui(ui);
        ui.separator();
        ui.heading("Prompt");
        let name = ui.label("Prompt text").id;
        ui.add(egui::TextEdit::multiline(&mut self.prompt).desired_rows(3).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.chat, "Use chat template");
            ui.add(egui::DragValue::new(&mut self.max_tokens).range(1..=1024)).labelled_by(ui.label("max tokens").id);
        });
        let loaded = self.shown().models.iter().all(Option::is_some);
        let auto = std::mem::take(&mut self.auto_run) && !self.job.running();
        if self.job.start_button(ui, loaded, "Run on both") || auto {
            self.start_prompt(env);
        }
        let shown = self.shown();
        ui.columns(2, |cols| {
            for (slot, name) in ["base", "chat"].iter().enumerate() {
                cols[slot].strong(format!("{name} answer"));
                if let Some(answer) = &shown.answers[slot] {
                    cols[slot].label(format!("answer {name}: {answer}"));
                }
            }
        });
    }

    /// The prompt through both models (from the store: loaded once, reloaded only for a new path or
    /// device; their summaries shown), the answers streaming into the view.
    fn start_prompt(&mut self, env: &JobEnv) {
        let dirs = [PathBuf::from(&self.dirs[0]), PathBuf::from(&self.dirs[1])];
        let adapter = env.chat_adapter();
        let (text, chat, max_tokens) = (self.prompt.clone(), self.chat, self.max_tokens);
        let shown = self.shown.clone();
        self.shown().answers = [None, None];
        let ctx = env.ctx.clone();
        let backend = env.device_backend();
        self.job.start(env.spawn("generating", move |device, store, handle| {
            let (b, c) = store.pair(&dirs[0], &dirs[1], adapter.as_deref(), device, handle)?;
            shown.lock().unwrap_or_else(|e| e.into_inner()).models = [
                Some(ModelSummary::of(&dirs[0], &b, backend.clone())),
                Some(ModelSummary::of(&dirs[1], &c, backend.clone())),
            ];
            let mut counts = [0usize; 2];
            for (slot, m) in [b, c].iter().enumerate() {
                let ids = m.prompt_ids(&text, chat)?;
                let stop = m.stop_ids();
                let mut new = Vec::new();
                let phase = format!("generating ({})", ["base", "chat"][slot]);
                let set = |t: String| {
                    shown.lock().unwrap_or_else(|e| e.into_inner()).answers[slot] = Some(t);
                    ctx.request_repaint();
                };
                set(String::new());
                generate(&m.lm, &ids, max_tokens, Sampling::default(), &stop, |id| {
                    if !stop.contains(&id) {
                        new.push(id);
                        handle.progress(&phase, new.len() as u64, max_tokens as u64, "tokens");
                        if let Ok(t) = m.tokenizer.decode(&new) {
                            set(crate::widgets::answer_text(&t));
                        }
                    }
                    handle.keep_going()
                })?;
                counts[slot] = new.len();
            }
            Ok(format!("{} and {} new tokens", counts[0], counts[1]))
        }));
    }
}
