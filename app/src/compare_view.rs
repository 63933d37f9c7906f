//! Compare runs: two analysed runs (e.g. L1 and BatchTopK) side by side — class counts, FVE, L0,
//! how many chat-only latents pass Latent Scaling — and their Δ histograms: the paper's central
//! comparison.

use crossdiff::analysis::figures::delta_histogram;
use crossdiff::analysis::latents::{LatentClass, LatentRow, Summary};
use crossdiff::run_dir::RunDir;
use eframe::egui;
use egui_plot::{Legend, Plot};

struct Loaded {
    summary: Summary,
    /// (chat-only latents, how many of them pass Latent Scaling).
    chat_only: (usize, usize),
    delta: Vec<(LatentClass, Vec<u64>)>,
}

#[derive(Default)]
pub struct CompareView {
    pub runs: [String; 2],
    /// Each run's summary with what the view shows of its rows, derived once in `load`.
    loaded: [Option<Loaded>; 2],
    errors: [Option<String>; 2],
    /// Why the two runs are not like for like (another layer, width, dictionary size or models),
    /// shown above the comparison, which still shows.
    mismatch: Option<String>,
}

/// Chat-only latents and how many of them Latent Scaling calls chat-specific (ν^ε < 0.2, ν^r < 0.5).
pub fn chat_only_passing(rows: &[LatentRow]) -> (usize, usize) {
    let chat = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).count();
    let pass = rows.iter().filter(|r| r.is_chat_specific()).count();
    (chat, pass)
}

impl CompareView {
    /// Puts runs `runs` side by side (the tour, through a command).
    pub fn compare(&mut self, runs: [String; 2]) {
        self.runs = runs;
        self.load();
    }

    pub fn load(&mut self) {
        self.mismatch = None;
        let configs: Vec<_> = self.runs.iter().map(|r| RunDir::new(r).read_config().ok()).collect();
        if let [Some(a), Some(b)] = &configs[..] {
            let (pa, pb) = (std::path::Path::new(&self.runs[0]), std::path::Path::new(&self.runs[1]));
            self.mismatch =
                crossdiff::workflow::checks::check_comparable((pa, a), (pb, b)).err().map(|e| format!("{e:#}"));
        }
        for i in 0..2 {
            let run = RunDir::new(&self.runs[i]);
            let result = run.read_latents().and_then(|rows| {
                let summary = run.read_summary()?;
                Ok(Loaded { summary, chat_only: chat_only_passing(&rows), delta: delta_histogram(&rows, 0.0, 1.0, 50) })
            });
            match result {
                Ok(r) => {
                    self.loaded[i] = Some(r);
                    self.errors[i] = None;
                }
                Err(e) => {
                    self.loaded[i] = None;
                    self.errors[i] = Some(crate::errors::phrase(&e, &[]));
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
        if let Some(m) = &self.mismatch {
            ui.colored_label(egui::Color32::YELLOW, format!("warning: {m}"));
        }
        ui.columns(2, |cols| {
            for i in 0..2 {
                let ui = &mut cols[i];
                if let Some(e) = &self.errors[i] {
                    ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
                }
                let Some(Loaded { summary, chat_only: (chat, pass), delta }) = &self.loaded[i] else { continue };
                let (chat, pass) = (*chat, *pass);
                let kind = summary.thresholds["kind"].as_str().unwrap_or("?");
                ui.strong(format!("run {}: {kind}", i + 1));
                let n = |c| summary.count(c);
                ui.label(format!(
                    "run {}: chat-only {}, base-only {}, shared {}, other {}, dead {}",
                    i + 1,
                    n(LatentClass::ChatOnly),
                    n(LatentClass::BaseOnly),
                    n(LatentClass::Shared),
                    n(LatentClass::Other),
                    n(LatentClass::Dead)
                ));
                let share = if chat > 0 { 100.0 * pass as f64 / chat as f64 } else { 0.0 };
                ui.label(format!(
                    "run {}: {pass} of {chat} chat-only latents pass Latent Scaling ({share:.0}%)",
                    i + 1
                ));
                ui.label(format!(
                    "FVE base {:.3}, chat {:.3}; L0 {:.1}",
                    summary.fve_base, summary.fve_chat, summary.l0
                ));
                Plot::new(format!("compare delta {i}")).height(160.0).legend(Legend::default()).show(ui, |plot| {
                    crate::widgets::class_bars(plot, delta, 0.0, 0.02);
                });
            }
        });
    }
}
