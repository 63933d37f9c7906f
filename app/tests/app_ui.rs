//! The desktop app driven through its accessible labels (egui_kittest), on the committed fixtures.

use std::time::{Duration, Instant};

use crossdiff_app::app::CrossdiffApp;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

/// Steps the UI until `label` (a substring) shows up; background work needs real time.
fn wait_for(harness: &mut Harness<'_, CrossdiffApp>, label: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        harness.step();
        if harness.query_by_label_contains(label).is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("'{label}' did not appear within 60 s");
}

#[test]
fn loads_both_models_and_runs_a_prompt_on_each() {
    let mut harness = Harness::builder()
        .with_size(eframe::egui::vec2(1100.0, 720.0))
        .build_eframe(|cc| CrossdiffApp::new(cc.egui_ctx.clone()));
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "tiny-gemma2/base\n4 layers, width 72, vocab 676");
    wait_for(&mut harness, "tiny-gemma2/chat\n4 layers, width 72, vocab 676");
    harness.get_by_label("Run on both").click();
    // Greedy continuations of the rendered chat prompt appear under both columns.
    wait_for(&mut harness, "answer base:");
    wait_for(&mut harness, "answer chat:");
}

#[test]
fn a_bad_model_directory_shows_an_error_not_a_crash() {
    let mut harness = Harness::builder().build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.set_model_dirs(["/no/such/base".into(), "/no/such/chat".into()]);
        app
    });
    harness.run_steps(2);
    harness.get_by_label("Load models").click();
    wait_for(&mut harness, "error: /no/such/base: not a model snapshot directory");
}
