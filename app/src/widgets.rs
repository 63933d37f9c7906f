//! Small widgets the views share.

use crossdiff::analysis::latents::LatentClass;
use eframe::egui;

/// One labelled single-line text field per row (paths, mostly); the label names the field for
/// screen readers and tests.
pub fn text_rows<const N: usize>(ui: &mut egui::Ui, fields: [(&str, &mut String); N]) {
    for (label, field) in fields {
        ui.horizontal(|ui| {
            let name = ui.label(label).id;
            ui.add(egui::TextEdit::singleline(field).desired_width(420.0)).labelled_by(name);
        });
    }
}

/// The label of the chat adapter field, in every view that names a chat model.
pub const ADAPTER_LABEL: &str = "Chat adapter (LoRA, optional)";

/// The chat adapter field (labelled by `name`) with a button that picks the folder through a dialog,
/// showing the app's one value `current`; the new text when the user changed it this frame (the
/// view sends it to the app as [`crate::commands::AppCommand::SetChatAdapter`]).
pub fn adapter_field(ui: &mut egui::Ui, name: egui::Id, current: &str) -> Option<String> {
    let mut text = current.to_string();
    let mut changed = false;
    ui.horizontal(|ui| {
        let hint = "a PEFT adapter folder merged into the chat model";
        let field = egui::TextEdit::singleline(&mut text).desired_width(330.0).hint_text(hint);
        changed |= ui.add(field).labelled_by(name).changed();
        if ui.button("Choose adapter…").clicked()
            && let Some(dir) = rfd::FileDialog::new().set_title(ADAPTER_LABEL).pick_folder()
        {
            text = dir.display().to_string();
            changed = true;
        }
    });
    changed.then_some(text)
}

/// [`adapter_field`] on a row of its own, after its label; a change is pushed to `commands`.
pub fn adapter_row(ui: &mut egui::Ui, current: &str, commands: &mut crate::commands::Commands) {
    let changed = ui
        .horizontal(|ui| {
            let name = ui.label(ADAPTER_LABEL).id;
            adapter_field(ui, name, current)
        })
        .inner;
    if let Some(dir) = changed {
        commands.push(crate::commands::AppCommand::SetChatAdapter { dir });
    }
}

/// The field of the views that read a run's files.
const RUN_FIELDS: crate::errors::Fields = &[("run", crate::errors::Field::Value("Run directory"))];

/// A run's latents table into a view's rows, or its error (then no rows).
pub fn load_latents(
    run: &crossdiff::run_dir::RunDir,
    rows: &mut Vec<crossdiff::analysis::latents::LatentRow>,
    error: &mut Option<String>,
) {
    (*rows, *error) = match run.read_latents() {
        // An analysis of an earlier crosscoder is still shown, with the reason it is out of date.
        Ok(r) => (r, run.stale_analysis().map(|why| crate::errors::phrase_text(&why, RUN_FIELDS))),
        Err(e) => (Vec::new(), Some(crate::errors::phrase(&e, RUN_FIELDS))),
    };
}

/// The one colour of each latent class, wherever a class is drawn or named (Plots, Compare runs,
/// the Latents table and its dashboard): chat-only red, base-only blue, shared green, other grey,
/// dead dark grey.
pub const CLASS_COLORS: [(LatentClass, egui::Color32); 5] = [
    (LatentClass::ChatOnly, egui::Color32::from_rgb(220, 80, 60)),
    (LatentClass::BaseOnly, egui::Color32::from_rgb(70, 130, 220)),
    (LatentClass::Shared, egui::Color32::from_rgb(120, 190, 90)),
    (LatentClass::Other, egui::Color32::from_rgb(160, 160, 160)),
    (LatentClass::Dead, egui::Color32::from_rgb(105, 105, 105)),
];

/// A series that is about no class (a loss curve, the KL bars): amber, no class's colour.
pub const SERIES_COLOR: egui::Color32 = egui::Color32::from_rgb(230, 180, 70);

/// Guides (threshold lines, error bars): grey, so they never read as a class.
pub const GUIDE_COLOR: egui::Color32 = egui::Color32::from_rgb(150, 150, 150);

/// A class's colour, from [`CLASS_COLORS`].
pub fn class_color(class: LatentClass) -> egui::Color32 {
    CLASS_COLORS.iter().find(|(c, _)| *c == class).map_or(egui::Color32::GRAY, |(_, color)| *color)
}

/// One bar chart per class of a per-class histogram over bins of width `w` from `lo`, in the
/// classes' colours.
pub fn class_bars(plot: &mut egui_plot::PlotUi, series: &[(LatentClass, Vec<u64>)], lo: f64, w: f64) {
    use egui_plot::{Bar, BarChart};
    for (class, counts) in series {
        let bars =
            counts.iter().enumerate().map(|(b, &c)| Bar::new(lo + (b as f64 + 0.5) * w, c as f64).width(w)).collect();
        plot.bar_chart(BarChart::new(class.as_str(), bars).color(class_color(*class)));
    }
}

/// Text from a tokenizer as a label can show it: a token that is part of a character (byte-level
/// pieces decode to U+FFFD, which the UI font has no glyph for) reads `<byte>`; newlines read `\n`.
pub fn printable(text: &str) -> String {
    text.replace('\u{FFFD}', "<byte>").replace('\n', "\\n")
}

/// A generated answer as a label can show it: [`printable`], keeping its line breaks.
pub fn answer_text(text: &str) -> String {
    text.replace('\u{FFFD}', "<byte>")
}
