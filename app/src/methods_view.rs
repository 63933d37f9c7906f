//! The Methods view: crosscoder runs, SAE runs and activation-difference-lens folders side by side
//! (`crossdiff compare`'s `CompareJob`): the share of the base→chat KL gap each method's whole
//! dictionary closes (all reply tokens, the first 9), the share its chat-specific latents close,
//! how many latents it calls chat-specific, and its top latents or tokens. The job only reads what
//! `analyze`, `kl` and `adl` wrote, so it runs on the click, not as a background job.

use std::path::{Path, PathBuf};

use crossdiff::analysis::methods::MethodRow;
use crossdiff::workflow::adl::AdlJob;
use crossdiff::workflow::compare::CompareJob;
use eframe::egui;

use crate::errors::{Field, Fields, phrase};
use crate::widgets::printable;

/// The Methods view's fields by the flags the engine's errors name.
pub const FIELDS: Fields = &[("runs", Field::Value("Runs")), ("adl", Field::Value("Lens folders"))];

/// The grid's columns, each with what it means (the header's hover text).
pub const COLUMNS: [(&str, &str); 7] = [
    ("method", "The kind of run (a crosscoder and its sparsity, a diff-SAE and its input) or the lens"),
    ("folder", "The run or lens folder the row was read from (hover a name for its full path)"),
    (
        "gap closed",
        "Share of the base-to-chat KL gap closed by patching in the whole dictionary, on all reply tokens \
         (crosscoder: all latents; diff-SAE: its reconstruction, sae_recon); — without that KL result",
    ),
    ("first 9", "The same share on the first 9 predicted tokens of each reply (template tokens left out)"),
    (
        "specific closes",
        "Share of the gap, on all reply tokens, closed by the chat-specific latents alone \
         (crosscoder: chat_specific; diff-SAE: the latents with |β_base/β_chat| ≤ 0.3)",
    ),
    (
        "chat-specific",
        "Latents the method calls chat-specific (crosscoder: chat-only with ν^ε < 0.2 and ν^r < 0.5; \
         diff-SAE: |β_base/β_chat| ≤ 0.3); the lens has no latents",
    ),
    (
        "top latents / tokens",
        "The most chat-specific latents (#index), or for the lens the tokens its first position after BOS \
         promotes through the chat model",
    ),
];

#[derive(Default)]
pub struct MethodsView {
    /// Run folders (crosscoders and SAEs), one per line.
    pub runs: String,
    /// Activation-difference-lens folders (`crossdiff adl --out`), one per line.
    pub adl: String,
    rows: Vec<MethodRow>,
    error: Option<String>,
}

/// A field's non-empty lines as paths.
fn paths(text: &str) -> Vec<PathBuf> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect()
}

/// A share as the grid shows it (one decimal), or — when there is none.
pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{:.1}%", 100.0 * v))
}

impl MethodsView {
    /// Fills the view from a project: its runs, and its lens folder `adl` when the lens ran there.
    pub fn prefill(&mut self, runs: &[PathBuf], adl: &Path) {
        self.runs = runs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n");
        self.adl = if adl.join(AdlJob::JSON).exists() { adl.display().to_string() } else { String::new() };
        self.rows.clear();
        self.error = None;
    }

    /// The job the Compare button runs: the engine's, with this view's folders and no file written.
    pub fn job(&self) -> CompareJob {
        CompareJob { runs: paths(&self.runs), adl: paths(&self.adl), out: None }
    }

    /// Runs the comparison (file reads only): its rows, or its error in the view's words.
    pub fn compare(&mut self) {
        match self.job().run() {
            Ok(rows) => {
                self.rows = rows;
                self.error = None;
            }
            Err(e) => {
                self.rows.clear();
                self.error = Some(phrase(&e, FIELDS));
            }
        }
    }

    /// The rows of the last comparison.
    pub fn rows(&self) -> &[MethodRow] {
        &self.rows
    }

    /// Compares again when run `run` (just analysed or KL-checked) is among the rows shown.
    pub fn reload_if_listed(&mut self, run: &str) {
        let shown = !self.rows.is_empty() || self.error.is_some();
        if shown && paths(&self.runs).contains(&PathBuf::from(run.trim())) {
            self.compare();
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Methods side by side");
        ui.weak(
            "Crosscoders, diff-SAEs and the activation-difference lens on the same data, from what Analyze, \
             the KL check and ADL wrote. The KL columns compare only when each run's KL check used the same \
             conversations and patch setting.",
        );
        egui::Grid::new("methods folders").num_columns(3).show(ui, |ui| {
            folder_list(ui, "Runs", &mut self.runs, "one run folder per line: crosscoders and SAEs, analysed");
            folder_list(ui, "Lens folders", &mut self.adl, "one ADL output folder per line (optional)");
        });
        if ui.button("Compare").clicked() {
            self.compare();
        }
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("error: {e}"));
        }
        if !self.rows.is_empty() {
            ui.separator();
            egui::ScrollArea::both().show(ui, |ui| grid_ui(ui, &self.rows));
        }
    }
}

/// A labelled multi-line field of folders (a row of the view's folder grid), with a button that
/// adds one through a folder dialog.
fn folder_list(ui: &mut egui::Ui, label: &str, text: &mut String, hint: &str) {
    let name = ui.label(label).id;
    // Sized, not desired: a grid cell's width comes from the last frame's.
    ui.add_sized([560.0, 40.0], egui::TextEdit::multiline(text).desired_rows(2).hint_text(hint)).labelled_by(name);
    if ui.button(format!("Add to {}…", label.to_lowercase())).clicked()
        && let Some(dir) = rfd::FileDialog::new().set_title(label).pick_folder()
    {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&dir.display().to_string());
    }
    ui.end_row();
}

/// Where a KL cell's number comes from (its hover text).
fn kl_source(row: &MethodRow) -> String {
    match (&row.kl_condition, row.chat_specific) {
        (Some(c), _) => format!("kl.json: condition {c} against none"),
        (None, None) => "the lens patches nothing".into(),
        (None, Some(_)) => "no KL result in this run: run the KL check on it (Analyze view)".into(),
    }
}

fn grid_ui(ui: &mut egui::Ui, rows: &[MethodRow]) {
    egui::Grid::new("methods grid").striped(true).spacing([18.0, 6.0]).show(ui, |ui| {
        for (name, meaning) in COLUMNS {
            ui.strong(name).on_hover_text(meaning);
        }
        ui.end_row();
        for r in rows {
            ui.label(&r.method);
            let folder =
                r.source.file_name().map_or_else(|| r.source.display().to_string(), |n| n.to_string_lossy().into());
            ui.label(folder).on_hover_text(r.source.display().to_string());
            let kl = kl_source(r);
            ui.label(percent(r.gap_closed_all)).on_hover_text(&kl);
            ui.label(percent(r.gap_closed_first9)).on_hover_text(&kl);
            let specific = match r.kl_condition.as_deref() {
                Some("sae_recon") => "kl.json: condition ratio_le_0.3 against none".to_string(),
                Some(_) => "kl.json: condition chat_specific against none".to_string(),
                None => kl.clone(),
            };
            ui.label(percent(r.specific_closed_all)).on_hover_text(specific);
            ui.label(r.chat_specific.map_or_else(|| "—".to_string(), |n| n.to_string()));
            let top: Vec<String> = r.top.iter().map(|t| printable(t)).collect();
            ui.label(if top.is_empty() { "—".to_string() } else { top.join(" · ") });
            ui.end_row();
        }
    });
}
