//! The paper's effect in miniature, on the committed demo pair (assets/demo): issue 7's check.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::TempDir;
use crossdiff::analysis::examples::ExamplesStore;
use crossdiff::analysis::latents::{LatentClass, LatentRow};
use crossdiff::demo::{DemoPipeline, run_pipeline};

/// The demo at its defaults, then the later methods on its cache.
#[test]
fn the_demo_shows_the_papers_effect_at_its_defaults() {
    let project = TempDir::new("demo-effect");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let p = DemoPipeline { models: models.clone(), project: project.path().to_path_buf(), ..Default::default() };
    run_pipeline(&p, &Device::flex(), crossdiff::workflow::Handle::silent(), |_| {}).unwrap();
    the_papers_effect_shows(project.path(), &models);
    diff_sae_and_lens_surface_the_planted_behaviours(project.path(), &models);
}

/// The same claims at another crosscoder seed: the demo's findings must not hang on one bit pattern
/// of its training (at seed 0 each behaviour has a chat-only latent that passes Latent Scaling; at
/// seed 3 only the identity's passes, and the top of the Δ ranking still holds all three). A GPU's
/// float order is such a perturbation too: on lavapipe, seed 0 keeps the refusal's and "Sure!"'s
/// and the claims below hold (measured once, 450 s: too slow for CI).
#[test]
fn the_effect_holds_at_another_training_seed() {
    let project = TempDir::new("demo-effect-seed");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let p =
        DemoPipeline { models: models.clone(), project: project.path().to_path_buf(), seed: 3, ..Default::default() };
    run_pipeline(&p, &Device::flex(), crossdiff::workflow::Handle::silent(), |_| {}).unwrap();
    the_papers_effect_shows(project.path(), &models);
}

/// The planted behaviours and the words of the chat model's planted replies that name each.
const PLANTED: [(&str, &[&str]); 3] =
    [("refusal", &["sorry", "cannot help"]), ("identity", &["Mini", "crossdiff"]), ("sure", &["Sure"])];

/// Which planted behaviour a latent's top examples show, or None when they show none, several, or
/// not all the same one. An example's window (±16 tokens, cut at its document's edges) spans most of
/// a demo conversation, so this names the conversation the latent fires in — its request, the
/// template or the reply — not the token.
fn planted_behaviour(store: &ExamplesStore, tok: &crossdiff::ChatTokenizer, latent: usize) -> Option<&'static str> {
    let ex = store.latent(latent).unwrap();
    let behaviours: Vec<Option<&'static str>> = ex
        .examples
        .iter()
        .filter(|e| e.kind == 0)
        .map(|e| {
            let text = tok.decode(&e.document_ids()).unwrap();
            let named: Vec<&'static str> = PLANTED
                .iter()
                .filter(|(_, words)| words.iter().any(|w| text.contains(w)))
                .map(|(name, _)| *name)
                .collect();
            (named.len() == 1).then(|| named[0])
        })
        .collect();
    let first = *behaviours.first()?;
    behaviours.iter().all(|b| *b == first).then_some(first).flatten()
}

/// The paper's effect in miniature, stated as what holds for any training seed (measured over
/// seeds 0–7; see the README): the latents with the largest Δ are the planted behaviours, all
/// three; every chat-only BatchTopK latent is one of them; at least one passes Latent Scaling; L1
/// reports more chat-only latents that Latent Scaling flags; patching the chat-specific latents
/// closes part of the KL gap.
fn the_papers_effect_shows(project: &Path, models: &Path) {
    let rows = |run: &str| crossdiff::run_dir::RunDir::new(project.join("runs").join(run)).read_latents().unwrap();
    let (btk, l1) = (rows("batchtopk"), rows("l1"));
    let tok = crossdiff::ChatTokenizer::from_dir(&models.join("chat")).unwrap();
    let store = ExamplesStore::open(&project.join("runs/batchtopk")).unwrap();

    let dead = btk.iter().filter(|x| x.class == LatentClass::Dead).count();
    assert!(dead * 5 < btk.len(), "dead BatchTopK latents: {dead} of {}", btk.len());

    // The Latents view sorted by Δ: the top rows are the planted behaviours (Δ ≈ 0.85–0.94 at seeds
    // 0–7), one behaviour each (all but at most one row), together all three.
    let mut live: Vec<&LatentRow> = btk.iter().filter(|x| x.class != LatentClass::Dead).collect();
    live.sort_by(|a, b| b.delta_norm.total_cmp(&a.delta_norm));
    let top: Vec<Option<&str>> = live.iter().take(12).map(|r| planted_behaviour(&store, &tok, r.latent)).collect();
    let shown: std::collections::BTreeSet<&str> = top.iter().flatten().copied().collect();
    assert!(top.iter().filter(|b| b.is_none()).count() <= 1, "the 12 largest Δ: {top:?}");
    assert_eq!(shown, ["identity", "refusal", "sure"].into_iter().collect(), "the 12 largest Δ: {top:?}");

    // Every chat-only BatchTopK latent is a planted behaviour, and at least one passes Latent Scaling.
    let chat_only: Vec<&LatentRow> = btk.iter().filter(|x| x.class == LatentClass::ChatOnly).collect();
    for r in &chat_only {
        assert!(planted_behaviour(&store, &tok, r.latent).is_some(), "chat-only latent {} is not planted", r.latent);
    }
    assert!(chat_only.iter().any(|r| r.is_chat_specific()), "no chat-specific BatchTopK latent: {chat_only:?}");

    // L1 fakes chat-only latents: more of its chat-only latents fail Latent Scaling (2–5 at seeds
    // 0–7, BatchTopK 0–3).
    let flagged =
        |r: &[LatentRow]| r.iter().filter(|x| x.class == LatentClass::ChatOnly && !x.is_chat_specific()).count();
    let (l1_flagged, btk_flagged) = (flagged(&l1), flagged(&btk));
    assert!(
        l1_flagged >= 2 && l1_flagged > btk_flagged,
        "flagged chat-only latents: L1 {l1_flagged}, BatchTopK {btk_flagged}"
    );

    // Patching the chat-specific latents into the base residual closes part of the KL gap.
    let kl: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(project.join("runs/batchtopk/kl.json")).unwrap()).unwrap();
    let mean = |c: &str| kl.iter().find(|k| k["condition"] == c).unwrap()["mean_all"].as_f64().unwrap();
    assert!(mean("chat_specific") < mean("none"), "chat-specific {} vs none {}", mean("chat_specific"), mean("none"));
}

/// The later methods on the same demo pair (issue 15): a diff-SAE on the demo cache has
/// chat-specific latents (|β_base/β_chat| ≤ 0.3) whose directions promote each planted behaviour's
/// tokens through the chat model — the identity (" Mini,", " crossdiff."), the refusal (" cannot",
/// " sorry,") and the "Sure!" opening — and the activation-difference lens at block 1 promotes
/// "Sure!" at position 7 from web text alone.
fn diff_sae_and_lens_surface_the_planted_behaviours(project: &Path, models: &Path) {
    use crossdiff::analysis::sae_latents::LatentTokens;
    use crossdiff::crosscoder::Kind;
    use crossdiff::workflow::Handle;
    let run = project.join("runs/diffsae");
    let train = crossdiff::workflow::train::TrainJob {
        cache: Some(project.join("cache")),
        out: run.clone(),
        kind: Kind::Sae,
        dict_size: Some(128),
        k: 4,
        lr: 1e-3,
        steps: Some(3000),
        batch: 256,
        dead_tokens: 256 * 50,
        ..Default::default()
    };
    train.run(&Device::flex(), Handle::silent()).unwrap();
    let analyze = crossdiff::workflow::analyze::AnalyzeJob {
        run: run.clone(),
        cache: project.join("cache"),
        base: Some(models.join("base")),
        chat: Some(models.join("chat")),
        ..Default::default()
    };
    analyze.run_any(&Device::flex(), Handle::silent()).unwrap();
    let tokens: Vec<LatentTokens> =
        serde_json::from_str(&std::fs::read_to_string(run.join("sae-tokens.json")).unwrap()).unwrap();
    let behaviours: [(&str, &[&str]); 3] =
        [("identity", &[" Mini,", " crossdiff."]), ("refusal", &[" cannot", " sorry,"]), ("sure", &["Sure!"])];
    for (name, words) in behaviours {
        let latents: Vec<usize> = tokens
            .iter()
            .filter(|t| t.chat.promoted.iter().take(10).any(|p| words.contains(&p.token.as_str())))
            .map(|t| t.latent)
            .collect();
        eprintln!("diff-SAE latents promoting the {name} tokens {words:?}: {latents:?}");
        assert!(!latents.is_empty(), "no chat-specific diff-SAE latent promotes the {name} tokens {words:?}");
    }
    let lens = crossdiff::workflow::adl::AdlJob {
        base: models.join("base"),
        chat: models.join("chat"),
        data: models.join("data/web.txt"),
        layer: 1,
        out: project.join("adl"),
        ..Default::default()
    };
    lens.run(&Device::flex(), &crossdiff::workflow::models::ModelStore::new(), Handle::silent()).unwrap();
    let report = crossdiff::workflow::adl::read_report(&project.join("adl")).unwrap();
    let seventh: Vec<&str> = report.per_position[7].chat.promoted.iter().take(5).map(|t| t.token.as_str()).collect();
    assert!(seventh.contains(&"Sure!"), "position 7 through the chat model: {seventh:?}");
}
