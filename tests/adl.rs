//! The activation-difference lens against an independent recomputation
//! (assets/tiny-gemma2/reference/adl.json, made by scripts/adl_reference.py from transformers' block
//! outputs and the fixtures' weights), and its steering edit on a forward.

mod common;

use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use common::{TempDir, assert_close, fixture, one_line_err};
use crossdiff::analysis::adl::{Lens, steer_sweep, steering_edit};
use crossdiff::crosscoder::{read_vec, tensor};
use crossdiff::model::generate::{Sampling, generate};
use crossdiff::workflow::Handle;
use crossdiff::workflow::adl::AdlJob;
use crossdiff::workflow::models::ModelStore;
use crossdiff::{LoadOptions, Model};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn reference() -> Value {
    let path = fixture("reference").join("adl.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference's prompts as a .jsonl of `text` documents (exact strings: tabs and double spaces kept).
fn prompts_file(dir: &TempDir, reference: &Value) -> std::path::PathBuf {
    let path = dir.path().join("prompts.jsonl");
    let lines: Vec<String> =
        reference["texts"].as_array().unwrap().iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn job(data: &std::path::Path, out: &std::path::Path, layer: usize) -> AdlJob {
    AdlJob {
        base: fixture("base"),
        chat: fixture("chat"),
        data: data.to_path_buf(),
        layer,
        out: out.to_path_buf(),
        positions: 12,
        top: 20,
        strengths: vec![0.0, 2.0],
        max_new_tokens: 3,
        ..AdlJob::default()
    }
}

/// Token ids rank by rank, ties aside (the reference's logits at that rank and a neighbour within
/// `tol`), and the logits rank by rank.
fn assert_tokens(what: &str, got: &[crossdiff::analysis::adl::TokenLogit], ids: &Value, logits: &Value) {
    let ids: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
    let logits: Vec<f64> = serde_json::from_value(logits.clone()).unwrap();
    assert_eq!(got.len(), ids.len(), "{what}: length");
    let tol = 1e-3;
    for (i, g) in got.iter().enumerate() {
        assert!((g.logit as f64 - logits[i]).abs() <= tol, "{what} rank {i}: logit {} vs {}", g.logit, logits[i]);
        let tie = |j: usize| logits.get(j).is_some_and(|l| (l - logits[i]).abs() <= tol);
        if g.token_id != ids[i] {
            assert!(i > 0 && tie(i - 1) || tie(i + 1), "{what} rank {i}: token {} vs {} (no tie)", g.token_id, ids[i]);
        }
        assert!(!g.token.is_empty() || g.token_id < 4, "{what} rank {i}: token {} has no text", g.token_id);
    }
}

fn assert_lens(what: &str, got: &Lens, want: &Value) {
    assert_tokens(&format!("{what} promoted"), &got.promoted, &want["promoted"], &want["promoted_logits"]);
    assert_tokens(&format!("{what} suppressed"), &got.suppressed, &want["suppressed"], &want["suppressed_logits"]);
}

#[test]
fn means_and_token_lists_equal_the_reference() {
    let reference = reference();
    let dir = TempDir::new("adl");
    let data = prompts_file(&dir, &reference);
    let store = ModelStore::new();
    let device = Device::flex();
    for layer in [1usize, 3] {
        let want = &reference["layers"][layer.to_string()];
        let out = dir.path().join(format!("out-{layer}"));
        let done = job(&data, &out, layer).run(&device, &store, Handle::silent()).unwrap();
        let r = &done.report;
        assert_eq!((r.layer, r.samples, r.positions), (layer, 4, 12));
        let counts: Vec<u64> = serde_json::from_value(want["counts"].clone()).unwrap();
        assert_eq!(r.per_position.iter().map(|p| p.count).collect::<Vec<_>>(), counts);
        assert_eq!(counts, vec![4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2], "the prompts' lengths are 16, 10, 53 and 2");
        let ref_norm = want["mean_chat_norm"].as_f64().unwrap();
        assert!(
            (r.mean_chat_norm - ref_norm).abs() <= TOL * ref_norm,
            "mean chat norm {} vs {ref_norm}",
            r.mean_chat_norm
        );
        for (p, reading) in r.per_position.iter().enumerate() {
            let mean: Vec<f64> = serde_json::from_value(want["mean_diff"][p].clone()).unwrap();
            assert_close(&format!("layer {layer} position {p} mean"), &done.mean_diff[p], &mean, TOL);
            let n = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((reading.norm_of_mean_diff - n).abs() <= TOL * n);
            assert_eq!(reading.position, p);
            assert_lens(&format!("layer {layer} position {p} base"), &reading.base, &want["base"][p]);
            assert_lens(&format!("layer {layer} position {p} chat"), &reading.chat, &want["chat"][p]);
        }
        // The files: adl.json as returned (read back: the same report), the means as [positions, d] f32.
        let text = std::fs::read_to_string(out.join("adl.json")).unwrap();
        assert_eq!(text, serde_json::to_string_pretty(r).unwrap());
        let back = crossdiff::workflow::adl::read_report(&out).unwrap();
        assert_eq!((back.per_position.len(), &back.steering), (12, &r.steering));
        let bytes = std::fs::read(out.join("adl.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("mean_diff").unwrap();
        assert_eq!(t.shape(), &[12, 72]);
        let stored: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(stored, done.mean_diff.concat());
        // Steering: one answer per prompt and strength.
        assert_eq!(r.steering.prompts.len(), 3);
        assert_eq!(r.steering.strengths, vec![0.0, 2.0]);
        assert!(r.steering.outputs.iter().all(|row| row.len() == 2));
        assert_eq!(r.steering.position, 1);
    }
}

#[test]
fn the_edit_adds_exactly_the_scaled_vector_at_every_position() {
    let device = Device::flex();
    let chat = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    let g = &chat.lm;
    let d = g.config.hidden_size;
    let direction: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
    let len = direction.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let ids = chat.prompt_ids("Why does a sparse dictionary help?", true).unwrap();
    let t = ids.len();
    for layer in 0..g.num_layers() {
        let (strength, norm) = (2.5, 40.0);
        let edit = steering_edit(&direction, strength, norm, layer, &device);
        // The vector: the direction at length strength × norm.
        let add = read_vec(edit.add.clone()).unwrap();
        let want: Vec<f64> = direction.iter().map(|v| *v as f64 / len * strength * norm).collect();
        assert_close(&format!("layer {layer} vector"), &add, &want, 1e-6);
        // Generation's forward with the edit equals the plain forward with the vector added to
        // block `layer`'s output at every position, then the remaining blocks.
        let mut cache = g.new_cache();
        let stepped =
            read_vec(g.step_edited(g.batch_ids(std::slice::from_ref(&ids)).unwrap(), &mut cache, Some(&edit))).unwrap();
        let h = g.forward_to(g.batch_ids(std::slice::from_ref(&ids)).unwrap(), layer);
        let moved = h + tensor(add.repeat(t), [1, t, d], &device);
        let full = read_vec(g.forward_from(layer, moved)).unwrap();
        let vocab = g.config.vocab_size;
        let last: Vec<f64> = full[(t - 1) * vocab..].iter().map(|v| *v as f64).collect();
        assert_close(&format!("layer {layer} steered logits"), &stepped, &last, 1e-5);
        // Added at the last position only, the logits differ: every position is edited.
        let last_only = g.forward_to(g.batch_ids(std::slice::from_ref(&ids)).unwrap(), layer);
        let mut mask = vec![0.0f32; t * d];
        mask[(t - 1) * d..].copy_from_slice(&add);
        let partial = read_vec(g.forward_from(layer, last_only + tensor(mask, [1, t, d], &device))).unwrap();
        if layer + 1 < g.num_layers() {
            let gap =
                partial[(t - 1) * vocab..].iter().zip(&last).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(gap > 1e-3, "layer {layer}: editing every position should differ from the last one only");
        }
    }
}

#[test]
fn strength_zero_is_plain_greedy_generation_and_a_strong_push_changes_it() {
    let device = Device::flex();
    let chat = Model::load(fixture("chat"), &device, LoadOptions::default()).unwrap();
    let d = chat.lm.config.hidden_size;
    let direction: Vec<f32> = (0..d).map(|i| if i % 3 == 0 { 1.0 } else { -0.5 }).collect();
    let prompts: Vec<Vec<u32>> =
        ["Tell me a story?", "Hello!"].iter().map(|p| chat.prompt_ids(p, true).unwrap()).collect();
    let out = steer_sweep(&chat, &prompts, &direction, 30.0, 1, &[0.0, 8.0], 12, |_| true).unwrap();
    let stop = chat.stop_ids();
    for (p, row) in prompts.iter().zip(&out) {
        let plain = generate(&chat.lm, p, 12, Sampling::default(), &stop, |_| true).unwrap();
        assert_eq!(row[0], plain, "strength 0 is the unsteered greedy completion");
        assert_ne!(row[1], plain, "strength 8 × the norm changes the completion");
    }
    // Cancelling stops the sweep with an error.
    let cancelled = steer_sweep(&chat, &prompts, &direction, 30.0, 1, &[0.0, 8.0], 2, |_| false);
    assert!(one_line_err(cancelled).contains("cancelled"));
}

#[test]
fn bad_settings_are_refused_before_anything_is_written() {
    let dir = TempDir::new("adl-bad");
    let data = common::data("web.txt");
    let out = dir.path().join("out");
    let base = job(&data, &out, 1);
    let refuse = |j: AdlJob, want: &str| {
        let store = ModelStore::new();
        let e = one_line_err(j.run(&Device::flex(), &store, Handle::silent()));
        assert!(e.contains(want), "{want:?} missing from: {e}");
        assert!(!out.exists(), "{want}: created --out");
    };
    refuse(AdlJob { samples: 0, ..base.clone() }, "--samples must be positive");
    refuse(AdlJob { positions: 0, ..base.clone() }, "--positions must be positive");
    refuse(AdlJob { top: 0, ..base.clone() }, "--top must be positive");
    refuse(AdlJob { max_new_tokens: 0, ..base.clone() }, "--max-new-tokens must be positive");
    refuse(AdlJob { steer_position: 12, ..base.clone() }, "--steer-position 12 must be below --positions (12)");
    refuse(AdlJob { strengths: vec![1.0, f64::NAN], ..base.clone() }, "--strengths must be finite numbers");
    refuse(AdlJob { strengths: vec![1e9], ..base.clone() }, "within ±100");
    refuse(AdlJob { strengths: vec![], ..base.clone() }, "--strengths needs at least one value");
    refuse(AdlJob { layer: 4, ..base.clone() }, "--layer 4 is out of range: the models have 4 blocks");
    refuse(AdlJob { positions: 300, ..base.clone() }, "--positions 300 is beyond the models' context of 256");
    refuse(AdlJob { max_new_tokens: 250, ..base.clone() }, "--max-new-tokens 250: the prompt");
    refuse(AdlJob { data: dir.path().join("none.txt"), ..base.clone() }, "none.txt: cannot open");
    refuse(AdlJob { chat: fixture("base"), ..base.clone() }, "are the same model");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    refuse(AdlJob { data: empty.clone(), ..base.clone() }, "--data");
    refuse(AdlJob { steer_prompts: Some(empty), ..base.clone() }, "--steer-prompts");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "notes").unwrap();
    let e = one_line_err(AdlJob { out: file.clone(), ..base.clone() }.run(
        &Device::flex(),
        &ModelStore::new(),
        Handle::silent(),
    ));
    assert!(e.contains("--out") && e.contains("is a file"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "notes");
    // Cancelled during the pass over the data: nothing written.
    let cancel = AtomicBool::new(true);
    let handle = Handle::new(&|_| {}, &cancel);
    let e = one_line_err(base.run(&Device::flex(), &ModelStore::new(), handle));
    assert!(e.contains("cancelled") && !out.exists(), "{e}");
}
