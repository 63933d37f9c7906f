//! The Cache view: configure sources, layer, tokens and dtype; see the disk the cache will take;
//! run it as a background job on the app's device with progress (Cancel finishes the current shard;
//! Start again resumes).

use std::path::PathBuf;

use crossdiff::activations::cache::ActDtype;
use crossdiff::workflow::cache::CacheJob;
use eframe::egui;

use crate::commands::{AppCommand, Commands};
use crate::errors::{Field, Fields};
use crate::jobs::{JobEnv, JobSlot};

/// The Cache view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[
    ("base", Field::Value("Base model directory")),
    ("chat", Field::Value("Chat model directory")),
    ("chat-adapter", Field::Value(crate::widgets::ADAPTER_LABEL)),
    ("out", Field::Value("Cache directory")),
    ("data", Field::Value("Data files")),
    ("layer", Field::Value("Layer")),
    ("tokens", Field::Value("Tokens")),
    ("context", Field::Value("Context")),
    ("dtype", Field::Value("Dtype")),
    ("mix", Field::Check("Mix the data files 1:1")),
    ("low-memory", Field::Check("Low memory (one model on the device at a time)")),
];

pub struct CacheView {
    pub base_dir: String,
    pub chat_dir: String,
    /// Data files, one per line.
    pub data: String,
    pub out_dir: String,
    /// Everything else the job takes, starting from the engine's defaults (the paths above are
    /// filled in when the job starts).
    pub config: CacheJob,
    /// The base model's width for the disk estimate, read once per base directory.
    width: Option<(String, Option<u64>)>,
    /// (directory, what it already holds): a project's cache, read in `show_cache`, described
    /// while the Cache directory field names it.
    existing: Option<(String, String)>,
    pub job: JobSlot,
}

impl CacheView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        Self {
            base_dir,
            chat_dir,
            data: String::new(),
            out_dir: String::new(),
            // The layer and token count have no engine default (the CLI requires them): a first
            // suggestion for the bundled models.
            config: CacheJob { layer: 1, tokens: 100_000, ..CacheJob::default() },
            width: None,
            existing: None,
            job: JobSlot::new(FIELDS),
        }
    }

    /// Shows the cache in `dir` (a project's, when it is opened): its settings fill the fields and
    /// one line says what it holds. A folder without a readable cache.json leaves the fields as
    /// they are.
    pub fn show_cache(&mut self, dir: &std::path::Path) {
        self.out_dir = dir.display().to_string();
        self.existing = None;
        let Ok(index) = crossdiff::activations::cache::CacheIndex::open(dir) else { return };
        if let Some(layer) = index.layer {
            self.config.layer = layer;
        }
        if let Some(s) = &index.settings {
            self.config.tokens = s.target_tokens;
            self.config.tokenize.context = s.context;
            self.config.mix = s.mix;
        }
        self.config.dtype = index.dtype;
        let dtype = match index.dtype {
            ActDtype::Bf16 => "bf16",
            ActDtype::F16 => "f16",
            ActDtype::F32 => "f32",
        };
        let site = index.layer.map_or("one layer".to_string(), |l| format!("the output of block {l}"));
        let state = if index.complete { "complete" } else { "unfinished" };
        let line = format!(
            "This cache holds {} (base, chat) activation pairs, one per token, from {site} (width {}, {dtype}); {state}.",
            index.total_tokens, index.d_model
        );
        self.existing = Some((self.out_dir.clone(), line));
    }

    /// The base model's width, from its config.json: read when the base directory changes only.
    fn refresh_width(&mut self) {
        if self.width.as_ref().is_none_or(|(dir, _)| *dir != self.base_dir) {
            let d = crossdiff::Snapshot::open(&self.base_dir).ok().map(|s| s.config.hidden_size as u64);
            self.width = Some((self.base_dir.clone(), d));
        }
    }

    /// Bytes the pairs will take: tokens × 2 models × width × dtype size (the width from the base
    /// model's config, when it can be read; as of the last frame).
    pub fn disk_estimate(&self) -> Option<u64> {
        let d = self.width.as_ref().filter(|(dir, _)| *dir == self.base_dir)?.1?;
        Some(self.config.tokens * 2 * d * self.config.dtype.bytes() as u64)
    }

    /// The job the Start button runs: the engine's config with this view's paths and the app's chat
    /// adapter.
    pub fn job_config(&self, chat_adapter: Option<PathBuf>) -> CacheJob {
        CacheJob {
            base: PathBuf::from(&self.base_dir),
            chat: PathBuf::from(&self.chat_dir),
            chat_adapter,
            data: self.data.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect(),
            out: PathBuf::from(&self.out_dir),
            ..self.config.clone()
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, env: &JobEnv, commands: &mut Commands) {
        self.refresh_width();
        ui.heading("Activation cache");
        if let Some((_, line)) = self.existing.as_ref().filter(|(dir, _)| *dir == self.out_dir) {
            ui.label(line.as_str());
        }
        let c = &mut self.config;
        egui::Grid::new("cache settings").num_columns(2).show(ui, |ui| {
            for (label, field) in
                [("Base model directory", &mut self.base_dir), ("Chat model directory", &mut self.chat_dir)]
            {
                let name = ui.label(label).id;
                ui.add(egui::TextEdit::singleline(field).desired_width(420.0)).labelled_by(name);
                ui.end_row();
            }
            let name = ui.label(crate::widgets::ADAPTER_LABEL).id;
            if let Some(dir) = crate::widgets::adapter_field(ui, name, &env.chat_adapter) {
                commands.push(AppCommand::SetChatAdapter { dir });
            }
            ui.end_row();
            let name = ui.label("Cache directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.out_dir).desired_width(420.0)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Data files (one per line)").id;
            ui.add(egui::TextEdit::multiline(&mut self.data).desired_rows(3).desired_width(420.0)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Layer").id;
            ui.add(egui::DragValue::new(&mut c.layer).range(0..=200)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Tokens").id;
            ui.add(egui::DragValue::new(&mut c.tokens).range(1..=u64::MAX).speed(1000)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Context").id;
            ui.add(egui::DragValue::new(&mut c.tokenize.context).range(1..=c.shard_tokens)).labelled_by(name);
            ui.end_row();
            ui.label("Dtype");
            ui.horizontal(|ui| {
                for (dt, label) in [(ActDtype::Bf16, "bf16"), (ActDtype::F16, "f16"), (ActDtype::F32, "f32")] {
                    ui.radio_value(&mut c.dtype, dt, label);
                }
            });
            ui.end_row();
        });
        ui.checkbox(&mut c.mix, "Mix the data files 1:1");
        ui.checkbox(&mut c.low_memory, "Low memory (one model on the device at a time)");
        match self.disk_estimate() {
            Some(bytes) => ui.label(format!("Disk needed: {:.2} GB", bytes as f64 / 1e9)),
            None => ui.weak("Disk needed: (choose a readable base model)"),
        };
        if self.job.start_button(ui, true, "Start caching") {
            let job = self.job_config(env.chat_adapter());
            self.job.start(env.spawn("caching", move |device, _, handle| {
                let done = crossdiff::workflow::cache::run(&job, device, handle)?;
                let index = &done.index;
                let state = done.state(job.tokens, "stopped; start again to resume");
                Ok(format!("{} tokens in {} shards, {state}", index.total_tokens, index.shards.len()))
            }));
        }
        self.job.ui(ui);
    }
}
