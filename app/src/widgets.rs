//! Small widgets the views share.

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
