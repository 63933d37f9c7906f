//! The Methods view and Compare runs with an SAE run, driven through their accessible labels
//! (egui_kittest) on runs the engine's jobs trained, analysed and KL-checked on the fixtures.

mod common;

use common::{Scratch, assets, small_cache};
use std::path::Path;

use burn::tensor::Device;
use crossdiff::analysis::methods::MethodRow;
use crossdiff::analysis::sae_latents::{SaeLatentRow, SaeSummary};
use crossdiff::crosscoder::Kind;
use crossdiff::run_dir::RunDir;
use crossdiff::workflow::Handle;
use crossdiff::workflow::adl::AdlJob;
use crossdiff::workflow::analyze::AnalyzeJob;
use crossdiff::workflow::compare::CompareJob;
use crossdiff::workflow::kl::KlJob;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::train::TrainJob;
use crossdiff_app::app::CrossdiffApp;
use crossdiff_app::commands::AppCommand;
use crossdiff_app::compare_view::{RATIO_BINS, ratio_histogram};
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};

/// A 12-step run of `kind` (D 64, k 8) on `cache`, analysed, and KL-checked on 2 conversations.
fn checked_run(cache: &Path, out: &Path, kind: Kind, store: &ModelStore) {
    TrainJob {
        kind,
        cache: Some(cache.to_path_buf()),
        out: out.to_path_buf(),
        dict_size: Some(64),
        k: 8,
        batch: 64,
        steps: Some(12),
        threshold_start: Some(2),
        checkpoint_every: 3,
        log_every: 1,
        shuffle_tokens: 256,
        ..Default::default()
    }
    .run(&Device::flex(), Handle::silent())
    .unwrap();
    AnalyzeJob { run: out.to_path_buf(), cache: cache.to_path_buf(), examples: 2, ..Default::default() }
        .run_any(&Device::flex(), Handle::silent())
        .unwrap();
    KlJob {
        run: out.to_path_buf(),
        base: assets().join("tiny-gemma2/base"),
        chat: assets().join("tiny-gemma2/chat"),
        data: assets().join("data/chat.jsonl"),
        conversations: 2,
        ..Default::default()
    }
    .run(&Device::flex(), store, Handle::silent())
    .unwrap();
}

/// A share as the view must show it.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{:.1}%", 100.0 * v))
}

fn app(size: (f32, f32)) -> Harness<'static, CrossdiffApp> {
    Harness::builder().with_size(eframe::egui::vec2(size.0, size.1)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.backend = crossdiff::Backend::Cpu;
        app
    })
}

/// Clears a text field by its label and types `text` into it.
fn retype(harness: &mut Harness<'_, CrossdiffApp>, label: &str, text: &str) {
    harness.get_by_label(label).focus();
    harness.run_steps(1);
    harness.key_press_modifiers(eframe::egui::Modifiers::COMMAND, eframe::egui::Key::A);
    harness.key_press(eframe::egui::Key::Backspace);
    harness.run_steps(1);
    if !text.is_empty() {
        harness.get_by_label(label).type_text(text);
    }
    harness.run_steps(2);
}

#[test]
fn methods_view_and_compare_runs_show_a_crosscoder_and_an_sae() {
    let dir = Scratch::new("methods");
    let cache = dir.0.join("cache");
    small_cache(&cache);
    let store = ModelStore::new();
    let (cc, sae) = (dir.0.join("cc"), dir.0.join("sae"));
    checked_run(&cache, &cc, Kind::BatchTopK, &store);
    checked_run(&cache, &sae, Kind::Sae, &store);
    // The lens on the same pair (a few documents, short answers).
    let lens = dir.0.join("adl");
    AdlJob {
        base: assets().join("tiny-gemma2/base"),
        chat: assets().join("tiny-gemma2/chat"),
        data: assets().join("data/web.txt"),
        layer: 1,
        out: lens.clone(),
        samples: 8,
        max_new_tokens: 3,
        ..Default::default()
    }
    .run(&Device::flex(), &store, Handle::silent())
    .unwrap();
    let want: Vec<MethodRow> =
        CompareJob { runs: vec![cc.clone(), sae.clone()], adl: vec![lens.clone()], out: None }.run().unwrap();
    assert_eq!(want.len(), 3);
    assert!(want[..2].iter().all(|r| r.gap_closed_all.is_some() && r.gap_closed_first9.is_some()));
    assert!(!want[2].top.is_empty(), "the lens promotes tokens");

    let mut harness = app((1300.0, 900.0));
    harness.run_steps(2);
    harness.get_by_label("Methods").click();
    harness.run_steps(2);
    // Nothing given: the engine's error in the view's words.
    harness.get_by_label("Compare").click();
    harness.run_steps(2);
    harness.get_by_label_contains("error: “Runs”: give at least one run (or “Lens folders” a lens folder)");
    // A folder that is no run.
    retype(&mut harness, "Runs", &dir.0.join("nothing").display().to_string());
    harness.get_by_label("Compare").click();
    harness.run_steps(2);
    harness.get_by_label_contains("error: “Runs”: ");
    harness.get_by_label_contains("nothing/config.json");
    // An unanalysed SAE run: what to do, said as the app offers it.
    let bare = dir.0.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(sae.join("config.json"), bare.join("config.json")).unwrap();
    retype(&mut harness, "Runs", &bare.display().to_string());
    harness.get_by_label("Compare").click();
    harness.run_steps(2);
    harness.get_by_label_contains("is an SAE run without sae-summary.json: analyse it in the Analyze view first");

    // Both runs, typed one per line, and the lens.
    retype(&mut harness, "Runs", &format!("{}\n{}", cc.display(), sae.display()));
    assert_eq!(harness.state().methods.job().runs, vec![cc.clone(), sae.clone()]);
    retype(&mut harness, "Lens folders", &lens.display().to_string());
    harness.get_by_label("Compare").click();
    harness.run_steps(3);
    assert!(harness.query_by_label_contains("error:").is_none(), "no error after a good comparison");
    assert_eq!(harness.state().methods.rows(), &want[..]);
    harness.get_by_label("crosscoder (batchtopk)");
    harness.get_by_label("diff-SAE (chat-minus-base)");
    harness.get_by_label("cc");
    harness.get_by_label("sae");
    // The lens's row: its name (the ADL tab's too), no KL, the tokens it promotes.
    assert_eq!(harness.query_all_by_label("ADL").count(), 2);
    harness.get_by_label("adl");
    let tokens: Vec<String> = want[2].top.iter().map(|t| crossdiff_app::widgets::printable(t)).collect();
    harness.get_by_label(&tokens.join(" · "));
    assert!(harness.query_all_by_label("—").count() >= 4, "the lens's KL columns and count read —");
    // Each row's cells in the grid's order: method, folder, gap closed, first 9, specific closes,
    // chat-specific, top latents / tokens.
    let texts = label_texts(&harness);
    for (row, folder) in want.iter().zip(["cc", "sae", "adl"]) {
        let top = if row.top.is_empty() { "—".to_string() } else { row.top.join(" · ") };
        let top = crossdiff_app::widgets::printable(&top);
        let cells = [
            row.method.clone(),
            folder.to_string(),
            pct(row.gap_closed_all),
            pct(row.gap_closed_first9),
            pct(row.specific_closed_all),
            row.chat_specific.map_or_else(|| "—".to_string(), |n| n.to_string()),
            top,
        ];
        assert!(texts.windows(cells.len()).any(|w| w == cells), "row {cells:?} not in {texts:?}");
    }
    save_render(&mut harness, "methods_view_filled");
    // Every column says what it means on hover.
    for (name, meaning) in crossdiff_app::methods_view::COLUMNS {
        harness.get_by_label(name).hover();
        harness.run_steps(4);
        assert!(harness.query_by_label(meaning).is_some(), "column {name}: no hover text");
    }

    // A finished KL check of a listed run compares again (here: its kl.json gone, so —).
    std::fs::rename(sae.join("kl.json"), dir.0.join("kl.json")).unwrap();
    harness.state_mut().push(AppCommand::KlMeasured { run: sae.display().to_string() });
    harness.run_steps(3);
    assert_eq!(harness.state().methods.rows()[1].gap_closed_all, None);
    assert_eq!(harness.state().methods.rows()[0], want[0]);
    std::fs::rename(dir.0.join("kl.json"), sae.join("kl.json")).unwrap();

    // Compare runs: the crosscoder beside the SAE.
    let summary: SaeSummary = RunDir::new(&sae).read_json(RunDir::SAE_SUMMARY).unwrap();
    let sae_rows: Vec<SaeLatentRow> = RunDir::new(&sae).read_sae_latents().unwrap();
    let with_ratio = sae_rows.iter().filter(|r| r.beta_ratio.is_some()).count();
    assert!(with_ratio > 0, "the SAE's histogram must not be empty");
    let below = |t: f64| sae_rows.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= t)).count();
    harness.get_by_label("Compare runs").click();
    harness.run_steps(2);
    retype(&mut harness, "First run", &cc.display().to_string());
    retype(&mut harness, "Second run", &sae.display().to_string());
    harness.get_by_label("Compare").click();
    harness.run_steps(3);
    harness.get_by_label("run 1: batchtopk");
    harness.get_by_label("run 2: sae");
    harness.get_by_label(&format!("run 2: input chat-minus-base (a diff-SAE), {} tokens analysed", summary.tokens));
    harness.get_by_label(&format!(
        "run 2: latents with |β_base/β_chat| ≤ 0.1: {}, ≤ 0.3: {}, ≤ 0.6: {}",
        below(0.1),
        below(0.3),
        below(0.6)
    ));
    harness.get_by_label(&format!(
        "FVE {:.3}; L0 {:.1}; dead {:.1}%",
        summary.fve,
        summary.l0,
        100.0 * summary.dead_fraction
    ));
    harness.get_by_label_contains(&format!("|β_base/β_chat| of {with_ratio} latents, clipped to [0, 2]"));
    harness.get_by_label_contains("run 1 is a crosscoder and run 2 an SAE");
    harness.get_by_label_contains("run 1: chat-only ");
    assert!(harness.query_by_label_contains("error:").is_none());
    save_render(&mut harness, "compare_view_sae");
}

/// Every label's text, in the order the window lays them out.
fn label_texts(harness: &Harness<'_, CrossdiffApp>) -> Vec<String> {
    use eframe::egui::accesskit::Role;
    let by = egui_kittest::kittest::By::new().predicate(|n| matches!(n.role(), Role::Label));
    harness.query_all(by).filter_map(|n| n.accesskit_node().label().or_else(|| n.accesskit_node().value())).collect()
}

/// The rendered window into the target folder's tmp, for a person to look at (no comparison).
fn save_render(harness: &mut Harness<'_, CrossdiffApp>, name: &str) {
    if crossdiff::Backend::Wgpu.device().is_err() {
        return;
    }
    if let (Ok(img), Ok(dir)) = (harness.render(), std::env::var("CROSSDIFF_RENDER_DIR")) {
        img.save(Path::new(&dir).join(format!("{name}.png"))).unwrap();
    }
}

#[test]
fn ratio_histogram_clips_to_two_and_counts_latents_without_a_ratio() {
    let row = |ratio: Option<f64>| SaeLatentRow {
        latent: 0,
        freq: 0.0,
        max_act: 0.0,
        dec_norm: 1.0,
        beta_base: None,
        beta_chat: None,
        beta_ratio: ratio,
        template_share: None,
    };
    let rows = [row(Some(0.0)), row(Some(-0.07)), row(Some(1.99)), row(Some(2.0)), row(Some(7.5)), row(None)];
    let h = ratio_histogram(&rows);
    assert_eq!(h.counts.len(), RATIO_BINS);
    assert_eq!(h.counts[0], 1);
    assert_eq!(h.counts[1], 1, "|-0.07| is in [0.05, 0.1)");
    assert_eq!(h.counts[RATIO_BINS - 1], 3, "1.99, 2 and 7.5 (clipped) in the last bin");
    assert_eq!((h.clipped, h.missing), (1, 1));
    assert_eq!(h.counts.iter().sum::<u64>(), 5);
}

/// A project with a crosscoder run, an SAE run and the lens's output: the Methods view starts from them.
#[test]
fn methods_view_starts_from_the_projects_runs_and_lens() {
    let dir = Scratch::new("methods-project");
    let proj = dir.0.join("proj");
    crossdiff::workflow::project::Project::create(
        &proj,
        assets().join("tiny-gemma2/base"),
        assets().join("tiny-gemma2/chat"),
        vec![],
    )
    .unwrap();
    let run = proj.join("runs/cc");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join(RunDir::CROSSCODER), b"").unwrap();
    // An SAE run under runs/ is listed too.
    let sae = proj.join("runs/sae");
    std::fs::create_dir_all(&sae).unwrap();
    std::fs::write(sae.join(RunDir::SAE), b"").unwrap();
    let mut harness = app((1100.0, 720.0));
    harness.state_mut().open_project(&proj);
    assert_eq!(harness.state().methods.job().runs, vec![run.clone(), sae.clone()]);
    assert!(harness.state().methods.job().adl.is_empty(), "no adl.json: no lens folder");
    std::fs::create_dir_all(proj.join("adl")).unwrap();
    std::fs::write(proj.join("adl").join(AdlJob::JSON), b"{}").unwrap();
    harness.state_mut().open_project(&proj);
    assert_eq!(harness.state().methods.job().adl, vec![proj.join("adl")]);
    // A lens file that is not one, alone: the error names the view's field.
    harness.run_steps(2);
    harness.get_by_label("Methods").click();
    harness.run_steps(2);
    retype(&mut harness, "Runs", "");
    assert!(harness.state().methods.job().runs.is_empty());
    harness.get_by_label("Compare").click();
    harness.run_steps(2);
    harness.get_by_label_contains("error: “Lens folders”: ");
    harness.get_by_label_contains("adl.json: not an adl.json");
}
