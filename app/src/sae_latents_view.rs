//! The Latents view on an SAE run (`kind: sae`): sae-latents.csv as a virtualised table, sorted by
//! the authors' chat-specificity |β_base/β_chat| (most chat-specific first) or by frequency or
//! largest activation, with a "≤ 0.3 only" filter; the selected latent's dashboard shows its β
//! values, the tokens its direction promotes and suppresses through each model (sae-tokens.json,
//! written for the latents with |β_base/β_chat| ≤ 0.3 when the analysis had both models) and its
//! examples, drawn as the crosscoder's. Every file is read when the run is loaded, never per frame.

use std::collections::HashMap;

use crossdiff::analysis::adl::Lens;
use crossdiff::analysis::examples::LatentExamples;
use crossdiff::analysis::sae_latents::{LatentTokens, SaeLatentRow, SaeSummary};
use crossdiff::crosscoder::Kind;
use crossdiff::model::tokenizer::ChatTokenizer;
use crossdiff::run_dir::RunDir;
use eframe::egui;

/// The |β_base/β_chat| limit of the filter (the authors' middle threshold; sae-tokens.json lists
/// the latents at or below it).
pub const RATIO_LIMIT: f64 = 0.3;

/// Whether `run` holds an SAE (its config.json says `kind: sae`).
pub fn is_sae_run(run: &RunDir) -> bool {
    run.read_config().is_ok_and(|c| c.kind == Kind::Sae)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SaeSort {
    /// |β_base/β_chat| low first (latents without a ratio last).
    Ratio,
    /// Frequency, high first.
    Freq,
    /// Largest activation, high first.
    MaxAct,
    Latent,
}

impl SaeSort {
    const ALL: [SaeSort; 4] = [SaeSort::Ratio, SaeSort::Freq, SaeSort::MaxAct, SaeSort::Latent];

    fn label(self) -> &'static str {
        match self {
            SaeSort::Ratio => "|β_base/β_chat| (low first)",
            SaeSort::Freq => "frequency (high first)",
            SaeSort::MaxAct => "max activation (high first)",
            SaeSort::Latent => "index",
        }
    }
}

/// |β_base/β_chat| of a row (∞ without one), the default sort's key.
pub fn abs_ratio(r: &SaeLatentRow) -> f64 {
    r.beta_ratio.map_or(f64::INFINITY, f64::abs)
}

/// A number of the table, or – when the analysis left it empty.
fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

/// The table's header, aligned with [`row_text`].
pub const HEADER: &str = " latent |βb/βc|     freq  max act   β base   β chat template";

/// One row of the table as it is drawn (and named for screen readers and tests).
pub fn row_text(r: &SaeLatentRow) -> String {
    format!(
        "{:>7} {:>7} {:>8.4} {:>8.3} {:>8} {:>8} {:>8}",
        r.latent,
        cell(r.beta_ratio.map(f64::abs), 3),
        r.freq,
        r.max_act,
        cell(r.beta_base, 3),
        cell(r.beta_chat, 3),
        cell(r.template_share, 2)
    )
}

/// The label of one of a latent's token lists in its dashboard (`model` "chat" or "base", `what`
/// "promotes" or "suppresses").
pub fn tokens_text(model: &str, what: &str, list: &[crossdiff::analysis::adl::TokenLogit]) -> String {
    let toks: Vec<String> = list.iter().map(|t| crate::widgets::printable(&t.token)).collect();
    format!("{model} model {what}: {}", toks.join(" · "))
}

/// The SAE side of the Latents view: the run's rows and token lists, the filter and the order.
pub struct SaeLatents {
    rows: Vec<SaeLatentRow>,
    summary: Option<SaeSummary>,
    tokens: HashMap<usize, LatentTokens>,
    shown: Vec<usize>,
    sort: SaeSort,
    chat_specific_only: bool,
    search: String,
}

impl SaeLatents {
    /// Reads the run's sae-latents.csv, sae-summary.json and (when there) sae-tokens.json; the
    /// second value is what went wrong, in the view's words (rows of an out-of-date analysis are
    /// still shown).
    pub fn load(run: &RunDir) -> (Self, Option<String>) {
        let mut errors = Vec::new();
        let rows = if run.file(RunDir::SAE_LATENTS).exists() {
            run.read_sae_latents().unwrap_or_else(|e| {
                errors.push(format!("{e:#}"));
                Vec::new()
            })
        } else {
            errors.push(format!(
                "{} is an SAE run without {}: analyse it in the Analyze view first",
                run.path().display(),
                RunDir::SAE_LATENTS
            ));
            Vec::new()
        };
        let summary = run.read_json::<SaeSummary>(RunDir::SAE_SUMMARY).ok();
        let analysed = summary.as_ref().and_then(|s| s.sae_checksum);
        let now = std::fs::read(run.sae()).ok().map(|b| crossdiff::io::checksum(&b));
        if analysed.is_some() && now.is_some() && analysed != now {
            errors.push(format!(
                "{} is out of date: it was computed from an earlier SAE (the run was trained further since); \
                 analyse it again in the Analyze view",
                run.file(RunDir::SAE_LATENTS).display()
            ));
        }
        let mut tokens = HashMap::new();
        if run.file(RunDir::SAE_TOKENS).exists() {
            match run.read_json::<Vec<LatentTokens>>(RunDir::SAE_TOKENS) {
                Ok(list) => tokens.extend(list.into_iter().map(|t| (t.latent, t))),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        let mut view = Self {
            rows,
            summary,
            tokens,
            shown: Vec::new(),
            sort: SaeSort::Ratio,
            chat_specific_only: false,
            search: String::new(),
        };
        view.refilter();
        (view, (!errors.is_empty()).then(|| errors.join("; ")))
    }

    fn refilter(&mut self) {
        let index: Option<usize> = self.search.trim().parse().ok();
        let rows = &self.rows;
        self.shown = (0..rows.len())
            .filter(|&i| {
                let r = &rows[i];
                index.is_none_or(|j| r.latent == j) && (!self.chat_specific_only || abs_ratio(r) <= RATIO_LIMIT)
            })
            .collect();
        let key = |i: &usize| -> f64 {
            let r = &rows[*i];
            match self.sort {
                SaeSort::Ratio => abs_ratio(r),
                SaeSort::Freq => -r.freq,
                SaeSort::MaxAct => -r.max_act,
                SaeSort::Latent => r.latent as f64,
            }
        };
        // Stable: ties keep the index order.
        self.shown.sort_by(|a, b| key(a).total_cmp(&key(b)));
    }

    /// Whether the run had any rows to show.
    pub fn has_rows(&self) -> bool {
        !self.rows.is_empty()
    }

    /// The latents in the table's order (after the filter).
    pub fn shown_latents(&self) -> Vec<usize> {
        self.shown.iter().map(|&i| self.rows[i].latent).collect()
    }

    /// The latent with the smallest |β_base/β_chat| (the one opened first), if any has a ratio.
    pub fn most_chat_specific(&self) -> Option<usize> {
        let from_summary = self.summary.as_ref().and_then(|s| s.most_chat_specific.first().copied());
        from_summary.or_else(|| {
            let rows = self.rows.iter().filter(|r| r.beta_ratio.is_some());
            rows.min_by(|a, b| abs_ratio(a).total_cmp(&abs_ratio(b))).map(|r| r.latent)
        })
    }

    /// Sort, filter and index search, and how many rows they leave.
    pub fn controls_ui(&mut self, ui: &mut egui::Ui) {
        let mut changed = false;
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("Sort").selected_text(self.sort.label()).show_ui(ui, |ui| {
                for s in SaeSort::ALL {
                    changed |= ui.selectable_value(&mut self.sort, s, s.label()).changed();
                }
            });
            changed |= ui
                .checkbox(&mut self.chat_specific_only, format!("|β_base/β_chat| ≤ {RATIO_LIMIT} only"))
                .on_hover_text(
                    "ν = β_base/β_chat: how strongly the latent's direction is in the base activations relative to \
                     the chat ones; near 0, it is (mostly) only in the chat model's",
                )
                .changed();
            let name = ui.label("Latent index").id;
            changed |=
                ui.add(egui::TextEdit::singleline(&mut self.search).desired_width(80.0)).labelled_by(name).changed();
        });
        if changed {
            self.refilter();
        }
        ui.label(format!("{} of {} SAE latents shown", self.shown.len(), self.rows.len()));
    }

    /// The table (only the visible rows are laid out); returns the latent clicked.
    pub fn table_ui(&self, ui: &mut egui::Ui, selected: Option<usize>) -> Option<usize> {
        let row_height = ui.text_style_height(&egui::TextStyle::Body) + 4.0;
        let mut clicked = None;
        ui.monospace(HEADER);
        egui::ScrollArea::vertical().auto_shrink([false, false]).show_rows(
            ui,
            row_height,
            self.shown.len(),
            |ui, range| {
                for &i in &self.shown[range] {
                    let r = &self.rows[i];
                    let text = egui::RichText::new(row_text(r)).monospace();
                    if ui.selectable_label(selected == Some(r.latent), text).clicked() {
                        clicked = Some(r.latent);
                    }
                }
            },
        );
        clicked
    }

    /// Latent `selected`'s dashboard: its numbers, its tokens through each model, its examples.
    pub fn dashboard_ui(
        &self,
        ui: &mut egui::Ui,
        selected: Option<&(usize, Option<LatentExamples>)>,
        tokenizer: Option<&ChatTokenizer>,
    ) {
        let Some((j, examples)) = selected else {
            ui.weak("Select a latent to open its dashboard.");
            return;
        };
        let Some(r) = self.rows.iter().find(|r| r.latent == *j) else { return };
        ui.heading(format!("Latent {j}"));
        ui.label(verdict(r));
        ui.label(format!(
            "β_base {}   β_chat {}   |β_base/β_chat| {}",
            cell(r.beta_base, 3),
            cell(r.beta_chat, 3),
            cell(r.beta_ratio.map(f64::abs), 3)
        ));
        ui.label(format!(
            "frequency {:.4}   max activation {:.3}   |d| {:.3}   template share {}",
            r.freq,
            r.max_act,
            r.dec_norm,
            cell(r.template_share, 2)
        ));
        ui.separator();
        match self.tokens.get(j) {
            Some(t) => {
                ui.label("Its direction (chat − base) through each model's unembedding:");
                for (model, lens) in [("chat", &t.chat), ("base", &t.base)] {
                    lens_ui(ui, model, lens);
                }
            }
            None => {
                ui.weak(format!(
                    "No promoted/suppressed tokens: {} lists the latents with |β_base/β_chat| ≤ {RATIO_LIMIT} when the \
                     analysis was given both models.",
                    RunDir::SAE_TOKENS
                ));
            }
        }
        match examples {
            Some(ex) => crate::latents_view::examples_ui(ui, ex, tokenizer),
            None => {
                ui.weak("No examples store in this run (run `crossdiff analyze`).");
            }
        }
    }
}

fn lens_ui(ui: &mut egui::Ui, model: &str, lens: &Lens) {
    ui.label(tokens_text(model, "promotes", &lens.promoted));
    ui.label(tokens_text(model, "suppresses", &lens.suppressed));
}

/// What a latent's ratio says, in words.
fn verdict(r: &SaeLatentRow) -> String {
    match r.beta_ratio {
        None if r.freq == 0.0 => "never active on the analysed tokens".to_string(),
        None => "no β ratio (its β_chat is zero)".to_string(),
        Some(v) if v.abs() <= 0.1 => {
            "chat-specific: in the chat activations with the latent's strength, hardly in the base ones".to_string()
        }
        Some(v) if v.abs() <= RATIO_LIMIT => "mostly chat-specific: weak in the base activations".to_string(),
        Some(_) => "in both models' activations".to_string(),
    }
}
