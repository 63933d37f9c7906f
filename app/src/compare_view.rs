//! Compare runs: two analysed runs (e.g. L1 and BatchTopK) side by side — class counts, FVE, L0,
//! how many chat-only latents pass Latent Scaling — and their Δ histograms: the paper's central
//! comparison.

use std::path::PathBuf;

use crossdiff::analysis::analyze::LatentRow;
use crossdiff::analysis::figures::delta_histogram;
use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot};

#[derive(Default)]
pub struct CompareView {
    pub runs: [String; 2],
    loaded: [Option<(Vec<LatentRow>, serde_json::Value)>; 2],
    errors: [Option<String>; 2],
}

/// Chat-only latents and how many of them Latent Scaling calls chat-specific (ν^ε < 0.2, ν^r < 0.5).
pub fn chat_only_passing(rows: &[LatentRow]) -> (usize, usize) {
    let chat: Vec<&LatentRow> = rows.iter().filter(|r| r.class == "chat_only").collect();
    let pass = chat.iter().filter(|r| crossdiff::analysis::analyze::is_chat_specific(r)).count();
    (chat.len(), pass)
}

impl CompareView {
    pub fn load(&mut self) {
        for i in 0..2 {
            let dir = PathBuf::from(&self.runs[i]);
            let result = crossdiff::analysis::latents_csv::read_latents_csv(&dir.join("latents.csv")).and_then(|rows| {
                let path = dir.join("summary.json");
                let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let summary: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok((rows, summary))
            });
            match result {
                Ok(r) => {
                    self.loaded[i] = Some(r);
                    self.errors[i] = None;
                }
                Err(e) => {
                    self.loaded[i] = None;
                    self.errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        for (i, label) in ["First run", "Second run"].iter().enumerate() {
            ui.horizontal(|ui| {
                let name = ui.label(*label).id;
                ui.add(egui::TextEdit::singleline(&mut self.runs[i]).desired_width(480.0)).labelled_by(name);
            });
        }
        if ui.button("Compare").clicked() {
            self.load();
        }
        ui.columns(2, |cols| {
            for i in 0..2 {
                let ui = &mut cols[i];
                if let Some(e) = &self.errors[i] {
                    ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
                }
                let Some((rows, summary)) = &self.loaded[i] else { continue };
                let kind = summary["thresholds"]["kind"].as_str().unwrap_or("?");
                ui.strong(format!("run {}: {kind}", i + 1));
                let c = &summary["classes"];
                ui.label(format!(
                    "run {}: chat-only {}, base-only {}, shared {}, other {}, dead {}",
                    i + 1,
                    c["chat_only"],
                    c["base_only"],
                    c["shared"],
                    c["other"],
                    c["dead"]
                ));
                let (chat, pass) = chat_only_passing(rows);
                let share = if chat > 0 { 100.0 * pass as f64 / chat as f64 } else { 0.0 };
                ui.label(format!(
                    "run {}: {pass} of {chat} chat-only latents pass Latent Scaling ({share:.0}%)",
                    i + 1
                ));
                ui.label(format!(
                    "FVE base {:.3}, chat {:.3}; L0 {:.1}",
                    summary["fve_base"].as_f64().unwrap_or(f64::NAN),
                    summary["fve_chat"].as_f64().unwrap_or(f64::NAN),
                    summary["l0"].as_f64().unwrap_or(f64::NAN)
                ));
                Plot::new(format!("compare delta {i}")).height(160.0).legend(Legend::default()).show(ui, |plot| {
                    for (class, counts) in delta_histogram(rows, 0.0, 1.0, 50) {
                        let bars = counts
                            .iter()
                            .enumerate()
                            .map(|(b, &n)| Bar::new((b as f64 + 0.5) / 50.0, n as f64).width(0.02))
                            .collect();
                        plot.bar_chart(BarChart::new(class, bars));
                    }
                });
            }
        });
    }
}
