//! The Latents view on an SAE run, driven through its accessible labels (egui_kittest) on a run the
//! engine's jobs trained and analysed (with both models, so sae-tokens.json is written) on the
//! fixtures: the table's order and filter, a latent's examples and tokens, and a crosscoder run
//! loaded after it showing the crosscoder's table again.

mod common;

use common::{Scratch, assets, small_cache};
use std::path::Path;

use burn::tensor::Device;
use crossdiff::analysis::examples::ExamplesStore;
use crossdiff::analysis::sae_latents::{LatentTokens, SaeLatentRow, SaeSummary};
use crossdiff::crosscoder::Kind;
use crossdiff::run_dir::RunDir;
use crossdiff::workflow::Handle;
use crossdiff::workflow::analyze::AnalyzeJob;
use crossdiff::workflow::train::TrainJob;
use crossdiff_app::app::CrossdiffApp;
use crossdiff_app::commands::AppCommand;
use crossdiff_app::sae_latents_view::{HEADER, row_text, tokens_text};
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};

/// A 12-step run of `kind` (D 64, k 8) on `cache`, analysed with both fixture models.
fn analysed_run(cache: &Path, out: &Path, kind: Kind) {
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
    AnalyzeJob {
        run: out.to_path_buf(),
        cache: cache.to_path_buf(),
        base: Some(assets().join("tiny-gemma2/base")),
        chat: Some(assets().join("tiny-gemma2/chat")),
        examples: 2,
        ..Default::default()
    }
    .run_any(&Device::flex(), Handle::silent())
    .unwrap();
}

/// The latents in `rows`' order under `key` (low first), ties by index: computed here, apart
/// from the view.
fn order_by(rows: &[SaeLatentRow], key: impl Fn(&SaeLatentRow) -> f64) -> Vec<usize> {
    let mut order: Vec<&SaeLatentRow> = rows.iter().collect();
    order.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.latent.cmp(&b.latent)));
    order.iter().map(|r| r.latent).collect()
}

/// The table rows the window lays out (only the visible ones), top to bottom, as latents.
fn table_latents(harness: &Harness<'_, CrossdiffApp>, rows: &[SaeLatentRow]) -> Vec<usize> {
    let texts: Vec<String> = harness
        .query_all(egui_kittest::kittest::By::new().predicate(|n| n.label().is_some()))
        .filter_map(|n| n.accesskit_node().label())
        .collect();
    texts.iter().filter_map(|t| rows.iter().find(|r| row_text(r) == *t).map(|r| r.latent)).collect()
}

/// The rendered window into CROSSDIFF_RENDER_DIR, for a person to look at (no comparison).
fn save_render(harness: &mut Harness<'_, CrossdiffApp>, name: &str) {
    if crossdiff::Backend::Wgpu.device().is_err() {
        return;
    }
    if let (Ok(img), Ok(dir)) = (harness.render(), std::env::var("CROSSDIFF_RENDER_DIR")) {
        img.save(Path::new(&dir).join(format!("{name}.png"))).unwrap();
    }
}

fn click(harness: &mut Harness<'_, CrossdiffApp>, label: &str) {
    harness.get_by_label(label).click();
    harness.run_steps(3);
}

#[test]
fn latents_view_lists_an_sae_runs_latents_and_opens_their_examples_and_tokens() {
    let dir = Scratch::new("sae-latents");
    let cache = dir.0.join("cache");
    small_cache(&cache);
    let (sae, cc) = (dir.0.join("sae"), dir.0.join("cc"));
    analysed_run(&cache, &sae, Kind::Sae);
    let run = RunDir::new(&sae);
    let rows: Vec<SaeLatentRow> = run.read_sae_latents().unwrap();
    let summary: SaeSummary = run.read_json(RunDir::SAE_SUMMARY).unwrap();
    let tokens: Vec<LatentTokens> = run.read_json(RunDir::SAE_TOKENS).unwrap();
    assert_eq!(rows.len(), 64);
    assert!(rows.iter().enumerate().all(|(i, r)| r.latent == i), "one row per latent, in order");
    let ratio = |r: &SaeLatentRow| r.beta_ratio.map_or(f64::INFINITY, f64::abs);
    let by_ratio = order_by(&rows, ratio);
    let low = rows.iter().filter(|r| ratio(r) <= 0.3).count();
    assert!(low > 0 && !tokens.is_empty(), "the run has chat-specific latents with tokens ({low})");
    assert!(rows.iter().any(|r| ratio(r) > 0.3), "and latents above the filter's limit");

    let mut harness = Harness::builder().with_size(eframe::egui::vec2(1300.0, 900.0)).build_eframe(|cc| {
        let mut app = CrossdiffApp::new(cc.egui_ctx.clone());
        app.latents.run_dir = sae.display().to_string();
        app.latents.model_dir = assets().join("tiny-gemma2/chat").display().to_string();
        app.backend = crossdiff::Backend::Cpu;
        app
    });
    harness.run_steps(2);
    click(&mut harness, "Latents");
    click(&mut harness, "Load run");
    assert!(harness.query_by_label_contains("error:").is_none(), "an analysed SAE run loads without an error");
    harness.get_by_label("64 of 64 SAE latents shown");
    harness.get_by_label(HEADER);
    assert!(harness.query_by_label("Class").is_none(), "no crosscoder class filter on an SAE");
    // The default order: |β_base/β_chat| low first, as computed from sae-latents.csv.
    assert_eq!(harness.state().latents.sae_latents_shown().unwrap(), by_ratio);
    let drawn = table_latents(&harness, &rows);
    assert!(drawn.len() >= 10, "the window draws the first rows ({drawn:?})");
    assert_eq!(drawn, by_ratio[..drawn.len()], "the rows as drawn, top to bottom");

    // The filter: only the latents with |β_base/β_chat| ≤ 0.3.
    click(&mut harness, "|β_base/β_chat| ≤ 0.3 only");
    harness.get_by_label(&format!("{low} of 64 SAE latents shown"));
    assert_eq!(harness.state().latents.sae_latents_shown().unwrap(), by_ratio[..low]);
    click(&mut harness, "|β_base/β_chat| ≤ 0.3 only");
    harness.get_by_label("64 of 64 SAE latents shown");

    // By frequency and by largest activation, high first.
    for (choice, key) in [
        ("frequency (high first)", (|r: &SaeLatentRow| -r.freq) as fn(&SaeLatentRow) -> f64),
        ("max activation (high first)", |r: &SaeLatentRow| -r.max_act),
        ("|β_base/β_chat| (low first)", |r: &SaeLatentRow| r.beta_ratio.map_or(f64::INFINITY, f64::abs)),
    ] {
        click(&mut harness, "Sort");
        click(&mut harness, choice);
        let want = order_by(&rows, key);
        assert_eq!(harness.state().latents.sae_latents_shown().unwrap(), want, "sorted by {choice}");
        let drawn = table_latents(&harness, &rows);
        assert_eq!(drawn, want[..drawn.len()], "drawn sorted by {choice}");
    }

    // The most chat-specific latent with tokens: its row opens its examples and its tokens.
    let t = tokens.iter().min_by(|a, b| ratio(&rows[a.latent]).total_cmp(&ratio(&rows[b.latent]))).unwrap();
    let j = t.latent;
    harness.get_by_label(&row_text(&rows[j])).click();
    harness.run_steps(3);
    harness.get_by_label(&format!("Latent {j}"));
    harness.get_by_label("Activation histogram (fraction of max)");
    let ex = ExamplesStore::open(&sae).unwrap().latent(j).unwrap();
    let top = ex.examples.iter().find(|e| e.kind == 0).expect("an active latent has a top example");
    assert!(harness.query_all_by_label(&format!("top: activation {:.3}", top.act)).count() >= 1);
    harness.get_by_label(&tokens_text("chat", "promotes", &t.chat.promoted));
    harness.get_by_label(&tokens_text("chat", "suppresses", &t.chat.suppressed));
    harness.get_by_label(&tokens_text("base", "promotes", &t.base.promoted));
    assert!(!t.chat.promoted.is_empty());
    // A top example's tokens, decoded by the chat model's tokenizer (the one shaded most).
    let tok = crossdiff::model::tokenizer::ChatTokenizer::from_dir(&assets().join("tiny-gemma2/chat")).unwrap();
    let (peak, _) = top.window_ids.iter().zip(&top.window_acts).max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
    let peak_text = crossdiff_app::widgets::printable(&tok.decode(&[*peak]).unwrap());
    if !peak_text.trim().is_empty() {
        assert!(harness.query_all_by_label(&peak_text).count() >= 1, "the peak token {peak_text:?} is drawn");
    }
    assert!(harness.query_by_label_contains("Steer with latent").is_none(), "steering refuses SAE runs");
    save_render(&mut harness, "latents_view_sae");

    // A latent above the limit: no tokens, said so; found by its index.
    let above = rows.iter().find(|r| ratio(r) > 0.3 && r.freq > 0.0).unwrap().latent;
    harness.get_by_label("Latent index").focus();
    harness.get_by_label("Latent index").type_text(&above.to_string());
    harness.run_steps(3);
    harness.get_by_label("1 of 64 SAE latents shown");
    harness.get_by_label(&row_text(&rows[above])).click();
    harness.run_steps(3);
    harness.get_by_label(&format!("Latent {above}"));
    harness.get_by_label_contains("No promoted/suppressed tokens: sae-tokens.json lists the latents");
    harness.get_by_label("Activation histogram (fraction of max)");

    // A finished analysis (a command) shows the run at its most chat-specific latent.
    harness.state_mut().push(AppCommand::Analysed { run: sae.display().to_string() });
    harness.run_steps(3);
    harness.get_by_label(&format!("Latent {}", summary.most_chat_specific[0]));
    harness.get_by_label("64 of 64 SAE latents shown");

    // An analysis of an earlier SAE (its recorded checksum is not the file's): still shown, with why
    // it is out of date.
    let mut stale = summary.clone();
    stale.sae_checksum = Some(summary.sae_checksum.expect("the analysis records the SAE file").wrapping_add(1));
    run.write_json(RunDir::SAE_SUMMARY, &stale).unwrap();
    click(&mut harness, "Load run");
    harness.get_by_label_contains("sae-latents.csv is out of date: it was computed from an earlier SAE");
    harness.get_by_label("64 of 64 SAE latents shown");
    run.write_json(RunDir::SAE_SUMMARY, &summary).unwrap();
    click(&mut harness, "Load run");
    assert!(harness.query_by_label_contains("error:").is_none());

    // An SAE run not analysed yet: what to do, and the Analyze button.
    let bare = dir.0.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(sae.join("config.json"), bare.join("config.json")).unwrap();
    harness.state_mut().latents.run_dir = bare.display().to_string();
    click(&mut harness, "Load run");
    harness.get_by_label_contains("is an SAE run without sae-latents.csv: analyse it in the Analyze view first");
    harness.get_by_label("Analyze this run");
    harness.get_by_label("0 of 0 SAE latents shown");

    // A crosscoder run afterwards: the crosscoder's table again.
    analysed_run(&cache, &cc, Kind::BatchTopK);
    harness.state_mut().latents.run_dir = cc.display().to_string();
    click(&mut harness, "Load run");
    harness.get_by_label("64 of 64 latents shown");
    harness.get_by_label("Class");
    assert!(harness.state().latents.sae_latents_shown().is_none());
    assert!(harness.query_by_label_contains("SAE latents shown").is_none());
}
