//! The Steering view: side-by-side greedy generation without and with chosen latents' chat decoder
//! directions added at the crosscoder's layer, one strength slider per latent.

use std::path::PathBuf;

use eframe::egui;

use crate::jobs::{Job, job_ui};

pub struct SteeringView {
    pub run_dir: String,
    pub model_dir: String,
    pub prompt: String,
    pub chat: bool,
    pub max_tokens: usize,
    /// (latent, strength as a multiple of its max activation).
    pub latents: Vec<(usize, f64)>,
    new_latent: String,
    job: Option<Job>,
    result: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
}

impl SteeringView {
    pub fn new(model_dir: String) -> Self {
        Self {
            run_dir: String::new(),
            model_dir,
            prompt: "Who are you?".into(),
            chat: true,
            max_tokens: 24,
            latents: Vec::new(),
            new_latent: String::new(),
            job: None,
            result: Default::default(),
        }
    }

    /// Adds a latent to steer with (the dashboard's steer button uses this).
    pub fn add_latent(&mut self, latent: usize) {
        if !self.latents.iter().any(|(j, _)| *j == latent) {
            self.latents.push((latent, 1.0));
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        ui.heading("Steering");
        for (label, field) in [("Run directory", &mut self.run_dir), ("Model to steer", &mut self.model_dir)] {
            ui.horizontal(|ui| {
                let name = ui.label(label).id;
                ui.add(egui::TextEdit::singleline(field).desired_width(420.0)).labelled_by(name);
            });
        }
        let name = ui.label("Steering prompt").id;
        ui.add(egui::TextEdit::multiline(&mut self.prompt).desired_rows(2).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.checkbox(&mut self.chat, "Render as a chat turn");
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
        let running = self.job.as_ref().is_some_and(|j| j.running());
        if ui.add_enabled(!running && !self.latents.is_empty(), egui::Button::new("Generate steered")).clicked() {
            self.start(ctx.clone());
        }
        if let Some(job) = &mut self.job {
            job_ui(ui, job);
        }
        if let Some((plain, steered)) = self.result.lock().ok().and_then(|r| r.clone()) {
            ui.columns(2, |cols| {
                cols[0].strong("unsteered");
                cols[0].label(format!("unsteered: {plain}"));
                cols[1].strong("steered");
                cols[1].label(format!("steered: {steered}"));
            });
        }
    }

    fn start(&mut self, ctx: egui::Context) {
        let (run, model) = (PathBuf::from(&self.run_dir), PathBuf::from(&self.model_dir));
        let (prompt, chat, max_tokens, latents) =
            (self.prompt.clone(), self.chat, self.max_tokens, self.latents.clone());
        let result = self.result.clone();
        self.job = Some(Job::spawn("steering", ctx, move |_, _| {
            let device = crossdiff::Backend::Cpu.device()?;
            let m = crossdiff::Model::load(&model, &device, crossdiff::LoadOptions::default())?;
            let cc = crossdiff::crosscoder::Crosscoder::load(&run, &device)?;
            let rows = crossdiff::analysis::latents_csv::read_latents_csv(&run.join("latents.csv"))?;
            let layer = cc.config.layer.ok_or_else(|| anyhow::anyhow!("the run's config.json names no layer"))?;
            let specs: Vec<(usize, f64, f64)> = latents
                .iter()
                .map(|&(j, s)| {
                    rows.get(j)
                        .map(|r| (j, s, r.max_act))
                        .ok_or_else(|| anyhow::anyhow!("latent {j} is not in latents.csv"))
                })
                .collect::<anyhow::Result<_>>()?;
            let edit = crossdiff::analysis::steer::combined_edit(&cc, &specs, layer)?;
            let ids = m.prompt_ids(&prompt, chat)?;
            let (plain, steered) = crossdiff::analysis::steer::steer(&m, &ids, &edit, max_tokens)?;
            let stop = m.stop_ids();
            let text =
                |v: &[u32]| m.tokenizer.decode(&v.iter().copied().filter(|i| !stop.contains(i)).collect::<Vec<_>>());
            let pair = (text(&plain)?, text(&steered)?);
            if let Ok(mut r) = result.lock() {
                *r = Some(pair);
            }
            Ok(format!("{} latents at layer {layer}", specs.len()))
        }));
    }
}
