//! The Cache view: configure sources, layer, tokens and dtype; see the disk the cache will take;
//! run it on a background thread with progress (Cancel finishes the current shard; Start again
//! resumes).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crossdiff::activations::cache::ActDtype;
use crossdiff::activations::writer::{CacheJob, run_cache};
use crossdiff::data::TokenizeOptions;
use eframe::egui;

use crate::jobs::{Job, JobEvent, job_ui};

pub struct CacheView {
    pub base_dir: String,
    pub chat_dir: String,
    /// Data files, one per line.
    pub data: String,
    pub out_dir: String,
    pub layer: usize,
    pub tokens: u64,
    pub context: usize,
    pub dtype: ActDtype,
    pub mix: bool,
    pub low_memory: bool,
    pub backend: crossdiff::Backend,
    job: Option<Job>,
}

impl CacheView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        Self {
            base_dir,
            chat_dir,
            data: String::new(),
            out_dir: String::new(),
            layer: 1,
            tokens: 100_000,
            context: 1024,
            dtype: ActDtype::Bf16,
            mix: true,
            low_memory: false,
            backend: crossdiff::Backend::Cpu,
            job: None,
        }
    }

    /// Bytes the pairs will take: tokens × 2 models × width × dtype size (the width from the base
    /// model's config, when it can be read).
    pub fn disk_estimate(&self) -> Option<u64> {
        let d = crossdiff::Snapshot::open(&self.base_dir).ok()?.config.hidden_size as u64;
        Some(self.tokens * 2 * d * self.dtype.bytes() as u64)
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        ui.heading("Activation cache");
        egui::Grid::new("cache settings").num_columns(2).show(ui, |ui| {
            for (label, field) in [
                ("Base model directory", &mut self.base_dir),
                ("Chat model directory", &mut self.chat_dir),
                ("Cache directory", &mut self.out_dir),
            ] {
                let name = ui.label(label).id;
                ui.add(egui::TextEdit::singleline(field).desired_width(420.0)).labelled_by(name);
                ui.end_row();
            }
            let name = ui.label("Data files (one per line)").id;
            ui.add(egui::TextEdit::multiline(&mut self.data).desired_rows(3).desired_width(420.0)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Layer").id;
            ui.add(egui::DragValue::new(&mut self.layer).range(0..=200)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Tokens").id;
            ui.add(egui::DragValue::new(&mut self.tokens).range(1..=u64::MAX).speed(1000)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Context").id;
            ui.add(egui::DragValue::new(&mut self.context).range(1..=1 << 16)).labelled_by(name);
            ui.end_row();
            ui.label("Dtype");
            ui.horizontal(|ui| {
                for (dt, label) in [(ActDtype::Bf16, "bf16"), (ActDtype::F16, "f16"), (ActDtype::F32, "f32")] {
                    ui.radio_value(&mut self.dtype, dt, label);
                }
            });
            ui.end_row();
        });
        ui.checkbox(&mut self.mix, "Mix the data files 1:1");
        ui.checkbox(&mut self.low_memory, "Low memory (one model on the device at a time)");
        match self.disk_estimate() {
            Some(bytes) => ui.label(format!("Disk needed: {:.2} GB", bytes as f64 / 1e9)),
            None => ui.weak("Disk needed: (choose a readable base model)"),
        };
        let running = self.job.as_ref().is_some_and(Job::running);
        if ui.add_enabled(!running, egui::Button::new("Start caching")).clicked() {
            self.start(ctx.clone());
        }
        if let Some(job) = &mut self.job {
            job_ui(ui, job);
        }
    }

    fn start(&mut self, ctx: egui::Context) {
        let job = CacheJob {
            base: PathBuf::from(&self.base_dir),
            chat: PathBuf::from(&self.chat_dir),
            data: self.data.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect(),
            layer: self.layer,
            tokens: self.tokens,
            out: PathBuf::from(&self.out_dir),
            dtype: self.dtype,
            tokenize: TokenizeOptions { context: self.context, ..Default::default() },
            mix: self.mix,
            shard_tokens: 65_536.max(self.context),
            batch_tokens: 8192,
            low_memory: self.low_memory,
            load: crossdiff::LoadOptions::default(),
        };
        let backend = self.backend;
        self.job = Some(Job::spawn("caching", ctx, move |tx, cancel| {
            let device = backend.device()?;
            let index = run_cache(
                &job,
                &device,
                |p| {
                    tx.send(JobEvent::Progress {
                        done: p.tokens,
                        total: p.target,
                        status: format!("{}: {} tokens", p.phase, p.tokens),
                    })
                },
                || !cancel.load(Ordering::SeqCst),
            )?;
            let state = if index.complete { "complete" } else { "stopped; start again to resume" };
            Ok(format!("{} tokens in {} shards, {state}", index.total_tokens, index.shards.len()))
        }));
    }
}
