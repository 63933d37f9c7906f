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
}
