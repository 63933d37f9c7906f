//! The paper's effect in miniature, on the committed demo pair (assets/demo): issue 7's check.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::TempDir;
use crossdiff::analysis::examples::ExamplesStore;
use crossdiff::analysis::latents::{LatentClass, LatentRow};
use crossdiff::demo::{DemoPipeline, run_pipeline};

#[test]
fn batchtopk_finds_planted_behaviours_and_l1_fakes_more_chat_only_latents() {
    let project = TempDir::new("demo-effect");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let p = DemoPipeline { models: models.clone(), project: project.path().to_path_buf(), ..Default::default() };
    run_pipeline(&p, &Device::flex(), crossdiff::workflow::Handle::silent(), |_| {}).unwrap();
    let rows =
        |run: &str| crossdiff::run_dir::RunDir::new(project.path().join("runs").join(run)).read_latents().unwrap();
    let (btk, l1) = (rows("batchtopk"), rows("l1"));
    let chat_only = |r: &[LatentRow]| r.iter().filter(|x| x.class == LatentClass::ChatOnly).count();
    let flagged =
        |r: &[LatentRow]| r.iter().filter(|x| x.class == LatentClass::ChatOnly && !x.is_chat_specific()).count();
    let (n_btk, n_l1) = (chat_only(&btk), chat_only(&l1));
    assert!(n_btk >= 1, "BatchTopK finds at least one chat-only latent");
    // L1 has more chat-only latents, and a larger share of them flagged by Latent Scaling.
    assert!(n_l1 > n_btk, "chat-only latents: L1 {n_l1}, BatchTopK {n_btk}");
    let share = |f: usize, n: usize| f as f64 / n.max(1) as f64;
    assert!(
        share(flagged(&l1), n_l1) > share(flagged(&btk), n_btk),
        "flagged: L1 {}/{n_l1}, BatchTopK {}/{n_btk}",
        flagged(&l1),
        flagged(&btk)
    );

    let dead = btk.iter().filter(|x| x.class == LatentClass::Dead).count();
    assert!(dead * 5 < btk.len(), "dead BatchTopK latents: {dead} of {}", btk.len());

    // BatchTopK's chat-only latents fire on the planted behaviours: their top examples are the
    // chat model's planted replies (identity, refusal, the "Sure!" opening), and each of the three
    // has a latent of its own that passes Latent Scaling.
    let tok = crossdiff::ChatTokenizer::from_dir(&models.join("chat")).unwrap();
    let store = ExamplesStore::open(&project.path().join("runs/batchtopk")).unwrap();
    let mut found = std::collections::BTreeSet::new();
    for r in btk.iter().filter(|x| x.class == LatentClass::ChatOnly) {
        let ex = store.latent(r.latent).unwrap();
        let top: Vec<String> = ex
            .examples
            .iter()
            .filter(|e| e.kind == 0)
            .map(|e| {
                let ids: Vec<u32> =
                    e.window_ids.iter().zip(&e.window_acts).filter(|(_, a)| **a >= 0.0).map(|(i, _)| *i).collect();
                tok.decode(&ids).unwrap()
            })
            .collect();
        let planted = |t: &String| {
            t.contains("Mini")
                || t.contains("crossdiff")
                || t.contains("sorry")
                || t.contains("cannot help")
                || t.contains("Sure")
        };
        assert!(!top.is_empty() && top.iter().all(planted), "latent {}: top contexts {top:?}", r.latent);
        let behaviour = |t: &String| {
            if t.contains("sorry") || t.contains("cannot help") {
                "refusal"
            } else if t.contains("Mini") || t.contains("crossdiff") {
                "identity"
            } else {
                "sure"
            }
        };
        if r.is_chat_specific() && top.iter().all(|t| behaviour(t) == behaviour(&top[0])) {
            found.insert(behaviour(&top[0]));
        }
    }
    assert_eq!(
        found,
        ["identity", "refusal", "sure"].into_iter().collect(),
        "planted behaviours with a chat-specific BatchTopK latent of their own"
    );

    // Patching the chat-specific latents into the base residual closes part of the KL gap.
    let kl: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(project.path().join("runs/batchtopk/kl.json")).unwrap()).unwrap();
    let mean = |c: &str| kl.iter().find(|k| k["condition"] == c).unwrap()["mean_all"].as_f64().unwrap();
    assert!(mean("chat_specific") < mean("none"), "chat-specific {} vs none {}", mean("chat_specific"), mean("none"));

    diff_sae_and_lens_surface_the_planted_behaviours(project.path(), &models);
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
