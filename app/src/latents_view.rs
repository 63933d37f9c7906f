//! The Latents view: latents.csv as a virtualised, filterable, sortable table; selecting a row opens
//! its dashboard (decoder norms, Δ, cosine, ν with a plain verdict, activation histogram, top and
//! quantile examples with per-token shading, promoted/suppressed tokens). An SAE run shows its own
//! table and dashboard instead (`sae_latents_view`), with the same example rendering.

use std::path::Path;

use crossdiff::analysis::examples::{ExamplesStore, LatentExamples};
use crossdiff::analysis::latents::{LatentClass, LatentRow};
use crossdiff::model::tokenizer::ChatTokenizer;
use crossdiff::run_dir::RunDir;
use eframe::egui;

use crate::commands::{AppCommand, Commands};
use crate::sae_latents_view::{SaeLatents, is_sae_run};
use crate::widgets::class_color;

/// The class filter's choices (`None`: all).
const CLASSES: [Option<LatentClass>; 6] = [
    None,
    Some(LatentClass::ChatOnly),
    Some(LatentClass::Shared),
    Some(LatentClass::BaseOnly),
    Some(LatentClass::Other),
    Some(LatentClass::Dead),
];

fn class_name(class: Option<LatentClass>) -> &'static str {
    class.map_or("all", LatentClass::as_str)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SortBy {
    Latent,
    Delta,
    Freq,
    NuError,
}

pub struct LatentsView {
    pub run_dir: String,
    /// A model snapshot whose tokenizer decodes example tokens.
    pub model_dir: String,
    rows: Vec<LatentRow>,
    shown: Vec<usize>,
    class: Option<LatentClass>,
    delta_range: (f64, f64),
    nu_error_max: f64,
    freq_min: f64,
    search: String,
    sort: SortBy,
    store: Option<ExamplesStore>,
    tokenizer: Option<ChatTokenizer>,
    selected: Option<(usize, Option<LatentExamples>)>,
    error: Option<String>,
    /// The run's SAE table when the run is an SAE (then `rows` is empty).
    sae: Option<SaeLatents>,
}

impl LatentsView {
    pub fn new(run_dir: String, model_dir: String) -> Self {
        Self {
            run_dir,
            model_dir,
            rows: Vec::new(),
            shown: Vec::new(),
            class: None,
            delta_range: (0.0, 1.0),
            nu_error_max: f64::INFINITY,
            freq_min: 0.0,
            search: String::new(),
            sort: SortBy::Latent,
            store: None,
            tokenizer: None,
            selected: None,
            error: None,
            sae: None,
        }
    }

    /// Reads latents.csv — an SAE run's sae-latents.csv, sae-summary.json and sae-tokens.json — and
    /// the examples store and tokenizer when present.
    pub fn load(&mut self) {
        let run = RunDir::new(&self.run_dir);
        if is_sae_run(&run) {
            self.rows.clear();
            let (sae, error) = SaeLatents::load(&run);
            (self.sae, self.error) = (Some(sae), error);
        } else {
            self.sae = None;
            crate::widgets::load_latents(&run, &mut self.rows, &mut self.error);
        }
        self.store = ExamplesStore::open(run.path()).ok();
        self.tokenizer = ChatTokenizer::from_dir(Path::new(&self.model_dir)).ok();
        self.selected = None;
        self.refilter();
    }

    fn refilter(&mut self) {
        let index: Option<usize> = self.search.trim().parse().ok();
        let (lo, hi) = self.delta_range;
        self.shown = (0..self.rows.len())
            .filter(|&i| {
                let r = &self.rows[i];
                self.class.is_none_or(|c| r.class == c)
                    && r.delta_norm >= lo
                    && r.delta_norm <= hi
                    && index.is_none_or(|j| r.latent == j)
                    && r.freq >= self.freq_min
                    && (self.nu_error_max.is_infinite() || r.nu_error.is_some_and(|v| v <= self.nu_error_max))
            })
            .collect();
        let rows = &self.rows;
        let key = |i: &usize| -> f64 {
            let r = &rows[*i];
            match self.sort {
                SortBy::Latent => r.latent as f64,
                SortBy::Delta => -r.delta_norm,
                SortBy::Freq => -r.freq,
                SortBy::NuError => r.nu_error.unwrap_or(f64::INFINITY),
            }
        };
        self.shown.sort_by(|a, b| key(a).total_cmp(&key(b)));
    }

    /// The first latent of a class, if any (to open a meaningful dashboard first).
    pub fn first_latent_of_class(&self, class: LatentClass) -> Option<usize> {
        self.rows.iter().find(|r| r.class == class).map(|r| r.latent)
    }

    /// Whether the shown run has rows (a crosscoder's or an SAE's).
    fn loaded(&self) -> bool {
        !self.rows.is_empty() || self.sae.as_ref().is_some_and(SaeLatents::has_rows)
    }

    /// Opens latent `latent`'s dashboard.
    pub fn open_latent(&mut self, latent: usize) {
        self.open(latent);
    }

    /// Opens latent `latent` of run `run` (from other views, through a command), loading the run
    /// unless it is the one shown.
    pub fn show_latent(&mut self, run: &str, latent: usize) {
        if self.run_dir != run || !self.loaded() {
            self.run_dir = run.to_string();
            self.load();
        }
        self.open(latent);
    }

    /// Shows run `run` (a project opened, an analysis finished): reloads it and opens its most
    /// chat-specific latent (the chat-only one with the largest Δ; of an SAE, the one with the
    /// smallest |β_base/β_chat|).
    pub fn show_run(&mut self, run: &str) {
        self.run_dir = run.to_string();
        self.load();
        let latent = match &self.sae {
            Some(sae) => sae.most_chat_specific(),
            None => crate::suggest::strongest_latent(&self.rows),
        };
        if let Some(j) = latent {
            self.open(j);
        }
    }

    /// Shows run `run` (loading it unless it is the one shown) with the class filter at `class`,
    /// sorted by Δ (high first), and latent `latent`'s dashboard when given (the tour, through a
    /// command).
    pub fn show_class(&mut self, run: &str, class: Option<LatentClass>, latent: Option<usize>) {
        if self.run_dir != run || !self.loaded() {
            self.run_dir = run.to_string();
            self.load();
        }
        self.class = class;
        self.sort = SortBy::Delta;
        self.refilter();
        if let Some(j) = latent {
            self.open(j);
        }
    }

    fn open(&mut self, latent: usize) {
        let examples = self.store.as_ref().and_then(|s| s.latent(latent).ok());
        self.selected = Some((latent, examples));
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, commands: &mut Commands) {
        ui.horizontal(|ui| {
            let name = ui.label("Run directory").id;
            ui.add(egui::TextEdit::singleline(&mut self.run_dir).desired_width(360.0)).labelled_by(name);
            let name = ui.label("Tokenizer from model").id;
            ui.add(egui::TextEdit::singleline(&mut self.model_dir).desired_width(260.0)).labelled_by(name);
            if ui.button("Load run").clicked() {
                self.load();
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
            // No latents table yet (or a stale one): the analysis is one click away.
            if ui.button("Analyze this run").clicked() {
                commands.push(AppCommand::AnalyzeRun { run: self.run_dir.clone(), cache: None });
            }
        }
        if let Some(sae) = &mut self.sae {
            sae.controls_ui(ui);
            let (selected, tokenizer) = (self.selected.as_ref(), self.tokenizer.as_ref());
            egui::Panel::right("latent dashboard")
                .default_size(460.0)
                .show(ui, |ui| sae.dashboard_ui(ui, selected, tokenizer));
            if let Some(j) = sae.table_ui(ui, selected.map(|(j, _)| *j)) {
                self.open(j);
            }
            return;
        }
        let mut changed = false;
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("Class").selected_text(class_name(self.class)).show_ui(ui, |ui| {
                for c in CLASSES {
                    changed |= ui.selectable_value(&mut self.class, c, class_name(c)).changed();
                }
            });
            let name = ui.label("Δ from").id;
            changed |= ui
                .add(egui::DragValue::new(&mut self.delta_range.0).range(0.0..=1.0).speed(0.01))
                .labelled_by(name)
                .changed();
            let name = ui.label("to").id;
            changed |= ui
                .add(egui::DragValue::new(&mut self.delta_range.1).range(0.0..=1.0).speed(0.01))
                .labelled_by(name)
                .changed();
            let name = ui.label("min frequency").id;
            changed |= ui
                .add(egui::DragValue::new(&mut self.freq_min).range(0.0..=1.0).speed(0.001))
                .labelled_by(name)
                .changed();
            let mut limit = self.nu_error_max.is_finite();
            if ui.checkbox(&mut limit, "ν^ε at most").changed() {
                self.nu_error_max = if limit { 0.2 } else { f64::INFINITY };
                changed = true;
            }
            if limit {
                let name = ui.label("ν^ε limit").id;
                changed |= ui.add(egui::DragValue::new(&mut self.nu_error_max).speed(0.01)).labelled_by(name).changed();
            }
            let name = ui.label("Latent index").id;
            changed |=
                ui.add(egui::TextEdit::singleline(&mut self.search).desired_width(80.0)).labelled_by(name).changed();
            egui::ComboBox::from_label("Sort")
                .selected_text(match self.sort {
                    SortBy::Latent => "index",
                    SortBy::Delta => "Δ (high first)",
                    SortBy::Freq => "frequency",
                    SortBy::NuError => "ν^ε (low first)",
                })
                .show_ui(ui, |ui| {
                    for (s, label) in [
                        (SortBy::Latent, "index"),
                        (SortBy::Delta, "Δ (high first)"),
                        (SortBy::Freq, "frequency"),
                        (SortBy::NuError, "ν^ε (low first)"),
                    ] {
                        changed |= ui.selectable_value(&mut self.sort, s, label).changed();
                    }
                });
        });
        if changed {
            self.refilter();
        }
        ui.label(format!("{} of {} latents shown", self.shown.len(), self.rows.len()));
        egui::Panel::right("latent dashboard").default_size(460.0).show(ui, |ui| self.dashboard_ui(ui, commands));
        self.table_ui(ui);
    }

    fn table_ui(&mut self, ui: &mut egui::Ui) {
        let row_height = ui.text_style_height(&egui::TextStyle::Body) + 4.0;
        let mut clicked = None;
        ui.monospace(format!("{:>7} {:>6} {:>10} {:>8} {:>8} {:>8}", "latent", "Δ", "class", "freq", "ν^ε", "ν^r"));
        // Only the visible rows are laid out: 73,728 rows scroll as fast as 40.
        egui::ScrollArea::vertical().auto_shrink([false, false]).show_rows(
            ui,
            row_height,
            self.shown.len(),
            |ui, range| {
                for &i in &self.shown[range] {
                    let r = &self.rows[i];
                    let nu = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.3}"));
                    // The class in its colour (the one every view uses), the rest as text.
                    let mut row = egui::text::LayoutJob::default();
                    let font = egui::TextStyle::Monospace.resolve(ui.style());
                    let plain = ui.visuals().text_color();
                    for (part, color) in [
                        (format!("{:>7} {:>6.3} ", r.latent, r.delta_norm), plain),
                        (format!("{:>10}", r.class.as_str()), class_color(r.class)),
                        (format!(" {:>8.4} {:>8} {:>8}", r.freq, nu(r.nu_error), nu(r.nu_reconstruction)), plain),
                    ] {
                        row.append(&part, 0.0, egui::TextFormat::simple(font.clone(), color));
                    }
                    let is_selected = self.selected.as_ref().is_some_and(|(j, _)| *j == r.latent);
                    if ui.selectable_label(is_selected, row).on_hover_text(format!("latent {}", r.latent)).clicked() {
                        clicked = Some(r.latent);
                    }
                }
            },
        );
        if let Some(j) = clicked {
            self.open(j);
        }
    }

    fn dashboard_ui(&mut self, ui: &mut egui::Ui, commands: &mut Commands) {
        let Some((j, examples)) = &self.selected else {
            ui.weak("Select a latent to open its dashboard.");
            return;
        };
        let Some(r) = self.rows.iter().find(|r| r.latent == *j) else { return };
        ui.heading(format!("Latent {j}"));
        if ui.button(format!("Steer with latent {j}")).clicked() {
            commands.push(AppCommand::SteerLatent { run: self.run_dir.clone(), latent: *j });
        }
        ui.label(egui::RichText::new(format!("class {} — {}", r.class, r.verdict())).color(class_color(r.class)));
        ui.label(format!(
            "Δ {:.3}   |d base| {:.3}   |d chat| {:.3}   cos {:.3}",
            r.delta_norm, r.dec_norm_base, r.dec_norm_chat, r.dec_cos
        ));
        let nu = |v: Option<f64>| v.map_or("not computed".to_string(), |v| format!("{v:.3}"));
        ui.label(format!("ν^ε {}   ν^r {}", nu(r.nu_error), nu(r.nu_reconstruction)));
        ui.label(format!(
            "frequency {:.4}   max activation {:.3}   template share {}",
            r.freq,
            r.max_act,
            r.template_share.map_or("–".into(), |v| format!("{v:.2}"))
        ));
        let Some(ex) = examples else {
            ui.weak("No examples store in this run (run `crossdiff analyze`).");
            return;
        };
        examples_ui(ui, ex, self.tokenizer.as_ref());
    }

    pub fn rows_shown(&self) -> usize {
        self.sae.as_ref().map_or(self.shown.len(), |sae| sae.shown_latents().len())
    }

    /// The SAE latents in the table's order, when the run is an SAE.
    pub fn sae_latents_shown(&self) -> Option<Vec<usize>> {
        self.sae.as_ref().map(SaeLatents::shown_latents)
    }
}

/// A token id as the tokenizer writes it (`#id` without one).
fn token_text(tokenizer: Option<&ChatTokenizer>, id: u32) -> String {
    match tokenizer {
        Some(t) => t.decode(&[id]).map_or_else(|_| format!("#{id}"), |s| crate::widgets::printable(&s)),
        None => format!("#{id}"),
    }
}

/// A latent's examples (a crosscoder's or an SAE's): its activation histogram, the token lists the
/// store holds, and the top and quantile examples with per-token shading and hover values.
pub(crate) fn examples_ui(ui: &mut egui::Ui, ex: &LatentExamples, tokenizer: Option<&ChatTokenizer>) {
    ui.separator();
    ui.label("Activation histogram (fraction of max)");
    let max = ex.histogram.iter().copied().max().unwrap_or(1).max(1) as f32;
    let (rect, _) = ui.allocate_exact_size(egui::vec2(ui.available_width(), 60.0), egui::Sense::hover());
    let w = rect.width() / ex.histogram.len().max(1) as f32;
    for (i, &c) in ex.histogram.iter().enumerate() {
        let h = rect.height() * c as f32 / max;
        let x = rect.left() + i as f32 * w;
        ui.painter().rect_filled(
            egui::Rect::from_min_max(egui::pos2(x, rect.bottom() - h), egui::pos2(x + w - 1.0, rect.bottom())),
            0.0,
            egui::Color32::from_rgb(90, 140, 220),
        );
    }
    for (name, list) in &ex.tokens {
        let toks: Vec<String> = list.iter().map(|(id, _)| token_text(tokenizer, *id)).collect();
        ui.label(format!("{name}: {}", toks.join(" · ")));
    }
    ui.separator();
    egui::ScrollArea::vertical().id_salt("examples").show(ui, |ui| {
        for e in &ex.examples {
            let kind = if e.kind == 0 {
                "top".to_string()
            } else {
                format!("bin {}", crossdiff::analysis::examples::BINS[e.kind as usize - 1])
            };
            ui.label(format!("{kind}: activation {:.3}", e.act));
            ui.horizontal_wrapped(|ui| {
                ui.spacing_mut().item_spacing.x = 0.0;
                let peak = e.act.max(1e-6);
                for (&id, &a) in e.window_ids.iter().zip(&e.window_acts) {
                    if a < 0.0 {
                        continue;
                    }
                    let alpha = (255.0 * (a / peak).clamp(0.0, 1.0)) as u8;
                    let text = egui::RichText::new(token_text(tokenizer, id))
                        .background_color(egui::Color32::from_rgba_unmultiplied(230, 120, 40, alpha));
                    ui.label(text).on_hover_text(format!("{a:.3}"));
                }
            });
        }
    });
}
