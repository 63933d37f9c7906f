//! The Prompt lab: type text or a conversation turn; see, per token, the chosen latents'
//! activations (shaded), the top latents, and where base and chat disagree about the next token
//! (KL per position and each model's top candidates).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crossdiff::analysis::prompt_lab::PromptAnalysis;
use eframe::egui;

use crate::jobs::{Job, job_ui};

pub struct PromptLabView {
    pub run_dir: String,
    pub base_dir: String,
    pub chat_dir: String,
    pub text: String,
    pub chat: bool,
    /// Latent indices, comma separated.
    pub latents: String,
    job: Option<Job>,
    result: Arc<Mutex<Option<(PromptAnalysis, Vec<String>, Vec<usize>)>>>,
}

impl PromptLabView {
    pub fn new(base_dir: String, chat_dir: String) -> Self {
        Self {
            run_dir: String::new(),
            base_dir,
            chat_dir,
            text: "Who are you?".into(),
            chat: true,
            latents: String::new(),
            job: None,
            result: Default::default(),
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        ui.heading("Prompt lab");
        for (label, field) in [
            ("Run directory", &mut self.run_dir),
            ("Base model directory", &mut self.base_dir),
            ("Chat model directory", &mut self.chat_dir),
        ] {
            ui.horizontal(|ui| {
                let name = ui.label(label).id;
                ui.add(egui::TextEdit::singleline(field).desired_width(420.0)).labelled_by(name);
            });
        }
        let name = ui.label("Text to analyse").id;
        ui.add(egui::TextEdit::multiline(&mut self.text).desired_rows(2).desired_width(f32::INFINITY))
            .labelled_by(name);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.chat, "As a chat turn");
            let name = ui.label("Latents to follow").id;
            ui.add(egui::TextEdit::singleline(&mut self.latents).desired_width(160.0)).labelled_by(name);
        });
        let running = self.job.as_ref().is_some_and(|j| j.running());
        if ui.add_enabled(!running, egui::Button::new("Analyse")).clicked() {
            self.start(ctx.clone());
        }
        if let Some(job) = &mut self.job {
            job_ui(ui, job);
        }
        let Some((a, tokens, chosen)) = self.result.lock().ok().and_then(|r| r.clone()) else { return };
        let max_kl = a.kl.iter().copied().fold(1e-9, f64::max);
        egui::ScrollArea::vertical().show(ui, |ui| {
            egui::Grid::new("prompt lab tokens").striped(true).show(ui, |ui| {
                ui.strong("token");
                ui.strong("KL(chat || base) of next");
                for j in &chosen {
                    ui.strong(format!("latent {j}"));
                }
                ui.strong("top latents");
                ui.strong("base next / chat next");
                ui.end_row();
                for (i, tok) in tokens.iter().enumerate() {
                    ui.label(tok);
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

    fn start(&mut self, ctx: egui::Context) {
        let (run, base, chat) =
            (PathBuf::from(&self.run_dir), PathBuf::from(&self.base_dir), PathBuf::from(&self.chat_dir));
        let (text, as_chat) = (self.text.clone(), self.chat);
        let chosen: Vec<usize> = self.latents.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        let result = self.result.clone();
        self.job = Some(Job::spawn("analysis", ctx, move |_, _| {
            let device = crossdiff::Backend::Cpu.device()?;
            let load = |dir: &PathBuf| crossdiff::Model::load(dir, &device, crossdiff::LoadOptions::default());
            let (b, c) = (load(&base)?, load(&chat)?);
            let cc = crossdiff::crosscoder::Crosscoder::load(&run, &device)?;
            let layer = cc.config.layer.ok_or_else(|| anyhow::anyhow!("the run's config.json names no layer"))?;
            let ids = c.prompt_ids(&text, as_chat)?;
            let a = crossdiff::analysis::prompt_lab::analyze_prompt(&b, &c, &cc, layer, &ids, &chosen, 5)?;
            let tokens =
                ids.iter().map(|&i| c.tokenizer.decode(&[i]).unwrap_or_default().replace('\n', "\\n")).collect();
            let n = ids.len();
            if let Ok(mut r) = result.lock() {
                *r = Some((a, tokens, chosen));
            }
            Ok(format!("{n} tokens"))
        }));
    }
}
