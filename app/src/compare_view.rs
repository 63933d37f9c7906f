//! Compare runs: two analysed runs (e.g. L1 and BatchTopK) side by side — class counts, FVE, L0,
//! how many chat-only latents pass Latent Scaling — and their Δ histograms: the paper's central
//! comparison. An SAE run (`kind: sae`) shows what its analysis measured instead: its input, FVE,
//! L0, dead fraction, the latents with |β_base/β_chat| at most 0.1/0.3/0.6, and a histogram of
//! |β_base/β_chat|.

use crossdiff::analysis::figures::delta_histogram;
use crossdiff::analysis::latents::{LatentClass, LatentRow, Summary};
use crossdiff::analysis::sae_latents::{SaeLatentRow, SaeSummary};
use crossdiff::crosscoder::{Kind, SaeTarget};
use crossdiff::run_dir::RunDir;
use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot, VLine};

use crate::widgets::{GUIDE_COLOR, SERIES_COLOR};

/// The |β_base/β_chat| histogram: [0, RATIO_MAX] in RATIO_BINS bins, larger ratios in the last.
pub const RATIO_MAX: f64 = 2.0;
pub const RATIO_BINS: usize = 40;

/// A crosscoder run as the view shows it.
struct CrosscoderRun {
    summary: Summary,
    /// (chat-only latents, how many of them pass Latent Scaling).
    chat_only: (usize, usize),
    delta: Vec<(LatentClass, Vec<u64>)>,
}

/// An SAE run as the view shows it.
struct SaeRun {
    summary: SaeSummary,
    ratios: RatioHistogram,
}

enum Loaded {
    Crosscoder(CrosscoderRun),
    Sae(SaeRun),
}

impl Loaded {
    fn is_sae(&self) -> bool {
        matches!(self, Loaded::Sae(_))
    }
}

/// |β_base/β_chat| of an SAE's latents, clipped to [0, [`RATIO_MAX`]].
#[derive(Debug, Clone, PartialEq)]
pub struct RatioHistogram {
    pub counts: Vec<u64>,
    /// Latents above [`RATIO_MAX`] (counted in the last bin) and latents without a ratio (never
    /// active, or no β of the chat activations).
    pub clipped: usize,
    pub missing: usize,
}

/// The histogram of |β_base/β_chat| over `rows` in [`RATIO_BINS`] bins of [0, [`RATIO_MAX`]].
pub fn ratio_histogram(rows: &[SaeLatentRow]) -> RatioHistogram {
    let mut h = RatioHistogram { counts: vec![0; RATIO_BINS], clipped: 0, missing: 0 };
    let width = RATIO_MAX / RATIO_BINS as f64;
    for r in rows {
        match r.beta_ratio.map(f64::abs).filter(|v| v.is_finite()) {
            Some(v) => {
                if v > RATIO_MAX {
                    h.clipped += 1;
                }
                h.counts[((v / width) as usize).min(RATIO_BINS - 1)] += 1;
            }
            None => h.missing += 1,
        }
    }
    h
}

#[derive(Default)]
pub struct CompareView {
    pub runs: [String; 2],
    /// Each run's summary with what the view shows of its rows, derived once in `load`.
    loaded: [Option<Loaded>; 2],
    errors: [Option<String>; 2],
    /// Why the two runs are not like for like (another layer, width, dictionary size or models, a
    /// crosscoder beside an SAE), shown above the comparison, which still shows.
    mismatch: Option<String>,
}

/// Chat-only latents and how many of them Latent Scaling calls chat-specific (ν^ε < 0.2, ν^r < 0.5).
pub fn chat_only_passing(rows: &[LatentRow]) -> (usize, usize) {
    let chat = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).count();
    let pass = rows.iter().filter(|r| r.is_chat_specific()).count();
    (chat, pass)
}

/// Reads one run: an SAE run's sae-summary.json and sae-latents.csv, or a crosscoder's summary.json
/// and latents.csv (also when its config.json cannot be read: the error then names latents.csv).
fn load_run(path: &str) -> anyhow::Result<Loaded> {
    let run = RunDir::new(path);
    if run.read_config().is_ok_and(|c| c.kind == Kind::Sae) {
        let summary: SaeSummary = run.read_json(RunDir::SAE_SUMMARY).map_err(|e| {
            anyhow::anyhow!("{path} is an SAE run without its analysis ({e:#}); analyse it in the Analyze view first")
        })?;
        let rows = run.read_sae_latents()?;
        return Ok(Loaded::Sae(SaeRun { summary, ratios: ratio_histogram(&rows) }));
    }
    let rows = run.read_latents()?;
    let summary = run.read_summary()?;
    Ok(Loaded::Crosscoder(CrosscoderRun {
        summary,
        chat_only: chat_only_passing(&rows),
        delta: delta_histogram(&rows, 0.0, 1.0, 50),
    }))
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
            match load_run(&self.runs[i]) {
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
        if let [Some(a), Some(b)] = &self.loaded
            && a.is_sae() != b.is_sae()
        {
            let (cc, sae) = if a.is_sae() { (2, 1) } else { (1, 2) };
            let note = format!(
                "run {cc} is a crosscoder and run {sae} an SAE: the crosscoder's classes and Δ and the SAE's \
                 |β_base/β_chat| are different measures (the Methods view puts their KL results side by side)"
            );
            self.mismatch = Some(match self.mismatch.take() {
                Some(m) => format!("{m}; {note}"),
                None => note,
            });
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
            for (i, ui) in cols.iter_mut().enumerate() {
                if let Some(e) = &self.errors[i] {
                    ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
                }
                match &self.loaded[i] {
                    Some(Loaded::Crosscoder(run)) => crosscoder_ui(ui, i + 1, run),
                    Some(Loaded::Sae(run)) => sae_ui(ui, i + 1, run),
                    None => {}
                }
            }
        });
    }
}

fn crosscoder_ui(ui: &mut egui::Ui, n: usize, run: &CrosscoderRun) {
    let CrosscoderRun { summary, chat_only: (chat, pass), delta } = run;
    let (chat, pass) = (*chat, *pass);
    let kind = summary.thresholds["kind"].as_str().unwrap_or("?");
    ui.strong(format!("run {n}: {kind}"));
    let count = |c| summary.count(c);
    ui.label(format!(
        "run {n}: chat-only {}, base-only {}, shared {}, other {}, dead {}",
        count(LatentClass::ChatOnly),
        count(LatentClass::BaseOnly),
        count(LatentClass::Shared),
        count(LatentClass::Other),
        count(LatentClass::Dead)
    ));
    let share = if chat > 0 { 100.0 * pass as f64 / chat as f64 } else { 0.0 };
    ui.label(format!("run {n}: {pass} of {chat} chat-only latents pass Latent Scaling ({share:.0}%)"));
    ui.label(format!("FVE base {:.3}, chat {:.3}; L0 {:.1}", summary.fve_base, summary.fve_chat, summary.l0));
    if delta.iter().all(|(_, counts)| counts.iter().all(|&c| c == 0)) {
        ui.colored_label(egui::Color32::YELLOW, format!("run {n}: latents.csv has no latents: no Δ histogram"));
        return;
    }
    ui.weak("Δ = relative decoder norm (0 base-only, 1 chat-only)");
    Plot::new(format!("compare delta {}", n - 1)).height(160.0).legend(Legend::default()).show(ui, |plot| {
        crate::widgets::class_bars(plot, delta, 0.0, 0.02);
    });
}

fn sae_ui(ui: &mut egui::Ui, n: usize, run: &SaeRun) {
    let SaeRun { summary: s, ratios } = run;
    ui.strong(format!("run {n}: sae"));
    let diff = matches!(s.target, SaeTarget::ChatMinusBase | SaeTarget::BaseMinusChat);
    let what = if diff { "a diff-SAE" } else { "an SAE of one model" };
    ui.label(format!("run {n}: input {} ({what}), {} tokens analysed", s.target, s.tokens));
    let below: Vec<String> = s.ratio_below.iter().map(|(t, c)| format!("≤ {t}: {c}")).collect();
    ui.label(format!("run {n}: latents with |β_base/β_chat| {}", below.join(", "))).on_hover_text(
        "|β_base/β_chat| near 0: the latent's direction is in the chat activations but not the base ones",
    );
    ui.label(format!("FVE {:.3}; L0 {:.1}; dead {:.1}%", s.fve, s.l0, 100.0 * s.dead_fraction));
    let shown: u64 = ratios.counts.iter().sum();
    if shown == 0 {
        ui.colored_label(
            egui::Color32::YELLOW,
            format!("run {n}: no latent has a β ratio ({} without one): no |β_base/β_chat| histogram", ratios.missing),
        );
        return;
    }
    ui.weak(format!(
        "|β_base/β_chat| of {shown} latents, clipped to [0, {RATIO_MAX}] ({} above it in the last bin, {} without a ratio)",
        ratios.clipped, ratios.missing
    ));
    let w = RATIO_MAX / RATIO_BINS as f64;
    Plot::new(format!("compare ratio {}", n - 1)).height(160.0).legend(Legend::default()).show(ui, |plot| {
        let bars =
            ratios.counts.iter().enumerate().map(|(b, &c)| Bar::new((b as f64 + 0.5) * w, c as f64).width(w)).collect();
        plot.bar_chart(BarChart::new("|β_base/β_chat|", bars).color(SERIES_COLOR));
        for (t, _) in &s.ratio_below {
            plot.vline(VLine::new(format!("{t}"), *t).color(GUIDE_COLOR).style(egui_plot::LineStyle::dashed_loose()));
        }
    });
}
