//! The Train view: configure a crosscoder run on a cache, run it on a background thread (Cancel
//! checkpoints and stops; Start again resumes), live curves of loss, FVE per model, L0 and the dead
//! fraction.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crossdiff::crosscoder::Kind;
use crossdiff::activations::reader::{CacheReader, ReaderConfig};
use crossdiff::crosscoder::train::{TrainConfig, TrainRun};
use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use crate::jobs::{Job, JobEvent, job_ui};

pub struct TrainView {
    pub cache_dir: String,
    pub run_dir: String,
    pub batchtopk: bool,
    pub dict_size: usize,
    pub k: usize,
    pub mu: f64,
    pub lr: f64,
    pub batch: usize,
    pub steps: u64,
    pub backend: crossdiff::Backend,
    job: Option<Job>,
}

impl Default for TrainView {
    fn default() -> Self {
        Self {
            cache_dir: String::new(),
            run_dir: String::new(),
            batchtopk: true,
            dict_size: 256,
            k: 8,
            mu: 0.041,
            lr: 1e-3,
            batch: 256,
            steps: 1000,
            backend: crossdiff::Backend::Cpu,
            job: None,
        }
    }
}

impl TrainView {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &egui::Context) {
        ui.heading("Train a crosscoder");
        egui::Grid::new("train settings").num_columns(2).show(ui, |ui| {
            let name = ui.label("Cache directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.cache_dir).desired_width(360.0)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Run directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.run_dir).desired_width(360.0)).labelled_by(name);
            ui.end_row();
            ui.label("Kind");
            ui.horizontal(|ui| {
                ui.radio_value(&mut self.batchtopk, true, "BatchTopK");
                ui.radio_value(&mut self.batchtopk, false, "L1");
            });
            ui.end_row();
            let name = ui.label("Dictionary size").id;
            ui.add(egui::DragValue::new(&mut self.dict_size).range(1..=1 << 20)).labelled_by(name);
            ui.end_row();
            if self.batchtopk {
                let name = ui.label("k").id;
                ui.add(egui::DragValue::new(&mut self.k).range(1..=4096)).labelled_by(name);
            } else {
                let name = ui.label("μ (L1 weight)").id;
                ui.add(egui::DragValue::new(&mut self.mu).range(0.0..=100.0).speed(0.001)).labelled_by(name);
            }
            ui.end_row();
            let name = ui.label("Learning rate").id;
            ui.add(egui::DragValue::new(&mut self.lr).range(1e-6..=1.0).speed(1e-4)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Batch").id;
            ui.add(egui::DragValue::new(&mut self.batch).range(1..=65536)).labelled_by(name);
            ui.end_row();
            let name = ui.label("Steps").id;
            ui.add(egui::DragValue::new(&mut self.steps).range(1..=10_000_000)).labelled_by(name);
            ui.end_row();
        });
        let running = self.job.as_ref().is_some_and(Job::running);
        if ui.add_enabled(!running, egui::Button::new("Start training")).clicked() {
            self.start(ctx.clone());
        }
        // The run's checkpoint (the latest one is kept; resuming continues from it).
        let state = PathBuf::from(&self.run_dir).join("checkpoint/state.json");
        if let Ok(text) = std::fs::read_to_string(&state) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                ui.label(format!("checkpoint: step {} ({} tokens) in {}", v["step"], v["tokens"], state.display()));
            }
        }
        if let Some(job) = &mut self.job {
            job_ui(ui, job);
            curves_ui(ui, &job.metrics);
        }
    }

    fn start(&mut self, ctx: egui::Context) {
        let (cache, out) = (PathBuf::from(&self.cache_dir), PathBuf::from(&self.run_dir));
        let kind = if self.batchtopk { Kind::BatchTopK } else { Kind::L1 };
        let (dict, k, mu, lr, batch, steps, backend) =
            (self.dict_size, self.k, self.mu, self.lr, self.batch, self.steps, self.backend);
        self.job = Some(Job::spawn("training", ctx, move |tx, cancel| {
            let device = backend.device()?;
            let mut reader = CacheReader::open(&cache, ReaderConfig { batch, ..Default::default() })?;
            let d = reader.index.d_model;
            let config = TrainConfig {
                k,
                mu,
                lr,
                steps,
                warmup_steps: (steps / 10).min(1000),
                threshold_start: (steps / 5).min(1000),
                log_every: 10,
                checkpoint_every: 200,
                ..TrainConfig::defaults(kind, dict)
            };
            let (layer, models) = (Some(reader.index.layer), reader.index.models.clone());
            let mut run = TrainRun {
                config,
                out: out.clone(),
                device,
                source: &mut reader,
                validation: None,
                layer,
                models,
                width: d,
            };
            let cc = run.run(
                |p| {
                    let m = &p.metrics;
                    tx.send(JobEvent::Metrics {
                        step: m.step,
                        loss: m.loss,
                        fve_base: m.fve_base,
                        fve_chat: m.fve_chat,
                        l0: m.l0,
                        dead_frac: m.dead_frac,
                    });
                    let status = format!("step {} loss {:.4} FVE {:.3}/{:.3}", m.step, m.loss, m.fve_base, m.fve_chat);
                    tx.send(JobEvent::Progress { done: m.step, total: p.total_steps, status });
                },
                || !cancel.load(Ordering::SeqCst),
            )?;
            Ok(format!("{:?} D={} saved in {}", cc.config.kind, cc.config.dict_size, out.display()))
        }));
    }
}

/// Loss, FVE per model, L0 and dead fraction against the step.
fn curves_ui(ui: &mut egui::Ui, metrics: &[JobEvent]) {
    let series = |f: fn(&JobEvent) -> Option<[f64; 2]>| -> PlotPoints { metrics.iter().filter_map(f).collect() };
    ui.columns(2, |cols| {
        Plot::new("loss").height(180.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new(
                "loss",
                series(|m| match m {
                    JobEvent::Metrics { step, loss, .. } => Some([*step as f64, *loss]),
                    _ => None,
                }),
            ));
        });
        Plot::new("fve").height(180.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            plot.line(Line::new(
                "FVE base",
                series(|m| match m {
                    JobEvent::Metrics { step, fve_base, .. } => Some([*step as f64, *fve_base]),
                    _ => None,
                }),
            ));
            plot.line(Line::new(
                "FVE chat",
                series(|m| match m {
                    JobEvent::Metrics { step, fve_chat, .. } => Some([*step as f64, *fve_chat]),
                    _ => None,
                }),
            ));
        });
    });
    ui.columns(2, |cols| {
        Plot::new("l0").height(140.0).legend(Legend::default()).show(&mut cols[0], |plot| {
            plot.line(Line::new(
                "L0",
                series(|m| match m {
                    JobEvent::Metrics { step, l0, .. } => Some([*step as f64, *l0]),
                    _ => None,
                }),
            ));
        });
        Plot::new("dead").height(140.0).legend(Legend::default()).show(&mut cols[1], |plot| {
            plot.line(Line::new(
                "dead fraction",
                series(|m| match m {
                    JobEvent::Metrics { step, dead_frac, .. } => Some([*step as f64, *dead_frac]),
                    _ => None,
                }),
            ));
        });
    });
}
