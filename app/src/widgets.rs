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
