//! SAEs and diff-SAEs (`train --kind sae`): the step against a PyTorch autograd reference of the
//! authors' trainer, their saved layout, resume, and recovery of planted directions.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use common::planted::Planted;
use common::{TempDir, assert_close};
use crossdiff::crosscoder::sae::{remove_parallel_gradient, unit_rows};
use crossdiff::crosscoder::train::{PairSource, TrainConfig, step_loss};
use crossdiff::crosscoder::{Crosscoder, Kind, Params, SaeTarget, read_vec, tensor};
use safetensors::{Dtype, SafeTensors};

fn reference() -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sae-reference/cases.safetensors");
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values: Vec<f64> = match v.dtype() {
                Dtype::F32 => {
                    v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                Dtype::I64 => {
                    v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect()
                }
                other => panic!("{name}: {other:?}"),
            };
            (name, (v.shape().to_vec(), values))
        })
        .collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

fn reference_params(r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>, device: &Device) -> Params {
    let t = |name: &str| {
        let (shape, v) = &r[name];
        tensor(f32s(v), [shape[0], shape[1]], device)
    };
    Params { w_enc: t("w_enc"), b_enc: t("b_enc"), w_dec: t("w_dec"), b_dec: t("b_dec") }
}

fn sae_config(k: usize, dict: usize) -> TrainConfig {
    TrainConfig { k, target: Some(SaeTarget::ChatMinusBase), ..TrainConfig::defaults(Kind::Sae, dict) }
}

#[test]
fn the_sae_step_equals_the_pytorch_reference() {
    let r = reference();
    let device = Device::flex();
    let meta: Vec<usize> = r["meta"].1.iter().map(|v| *v as usize).collect();
    let [d, dict, b, k, dead_tokens, _k_aux] = meta[..] else { panic!("meta") };
    let p = reference_params(&r, &device);
    // Both routes: the host loops over the picks (the CPU's default) and dense autodiff.
    for cpu_kernels in [true, false] {
        let cfg = TrainConfig { dead_tokens: dead_tokens as u64, cpu_kernels, ..sae_config(k, dict) };
        step_equals_reference(&r, &cfg, &p, [d, dict, b], &device);
    }
}

fn step_equals_reference(
    r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    cfg: &TrainConfig,
    p: &Params,
    [d, dict, b]: [usize; 3],
    device: &Device,
) {
    let device = device.clone();
    let rows = SaeTarget::ChatMinusBase.rows(&f32s(&r["pairs"].1), d);
    let mut since: Vec<u64> = r["since"].1.iter().map(|v| *v as u64).collect();
    let out = step_loss(cfg, p, tensor(rows, [b, d], &device), 1, &mut since).unwrap();
    let scalar = |t: &burn::tensor::Tensor<1>| read_vec(t.clone()).unwrap();
    assert_close("loss", &scalar(&out.loss), &r["loss"].1, 1e-5);
    assert_close("recon", &scalar(&out.recon), &r["recon"].1, 1e-5);
    assert_close("aux", &scalar(out.aux.as_ref().expect("latents are dead")), &r["aux"].1, 1e-5);
    assert_close("min kept", &[out.min_kept().unwrap()], &r["min_kept"].1, 1e-6);
    let since_after: Vec<u64> = r["since_after"].1.iter().map(|v| *v as u64).collect();
    assert_eq!(since, since_after, "the dead-latent counters");
    let g = out.gradients().unwrap();
    for (name, got) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(&g) {
        assert_close(&format!("∂L/∂{name}"), &read_vec(got.clone()).unwrap(), &r[&format!("grad.{name}")].1, 1e-4);
    }
    let projected = remove_parallel_gradient(&p.w_dec, g[2].clone());
    assert_close("projected ∂L/∂w_dec", &read_vec(projected).unwrap(), &r["grad.w_dec.projected"].1, 1e-4);
    let stretched = tensor(f32s(&r["stretched"].1), [dict, d], &device);
    assert_close("unit rows", &read_vec(unit_rows(stretched)).unwrap(), &r["renormed"].1, 1e-6);
}

#[test]
fn the_sparse_and_dense_sae_routes_agree_on_a_larger_case() {
    let device = Device::flex();
    let (d, dict, b, k) = (24, 96, 160, 2);
    let mut rng = crossdiff::rng::SplitMix64(11);
    let mut draw = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * s).collect() };
    let p = Params {
        w_enc: tensor(draw(d * dict, 0.8), [d, dict], &device),
        // A third of the latents held below the others: rarely selected, dead by their counters.
        b_enc: tensor(
            draw(dict, 0.1).into_iter().enumerate().map(|(j, v)| if j % 3 == 0 { v - 1.5 } else { v }).collect(),
            [1, dict],
            &device,
        ),
        w_dec: crossdiff::crosscoder::sae::unit_rows(tensor(draw(dict * d, 1.0), [dict, d], &device)),
        b_dec: tensor(draw(d, 0.2), [1, d], &device),
    };
    let pairs = draw(b * 2 * d, 2.0);
    // A third of the latents unselected for long: AuxK runs.
    let since0: Vec<u64> = (0..dict).map(|j| if j % 3 == 0 { 10_000 } else { 0 }).collect();
    let run = |cpu_kernels: bool| {
        let cfg = TrainConfig { dead_tokens: 5_000, cpu_kernels, ..sae_config(k, dict) };
        let mut since = since0.clone();
        let x = tensor(SaeTarget::BaseMinusChat.rows(&pairs, d), [b, d], &device);
        let out = step_loss(&cfg, &p, x, 3, &mut since).unwrap();
        let scalar = |t: &burn::tensor::Tensor<1>| read_vec(t.clone()).unwrap()[0] as f64;
        let grads: Vec<Vec<f32>> = out.gradients().unwrap().iter().map(|g| read_vec(g.clone()).unwrap()).collect();
        (scalar(&out.loss), scalar(out.aux.as_ref().unwrap()), out.min_kept(), since, grads)
    };
    let (sparse, dense) = (run(true), run(false));
    assert!((sparse.0 - dense.0).abs() < 1e-5 * dense.0.abs(), "loss {} vs {}", sparse.0, dense.0);
    assert!((sparse.1 - dense.1).abs() < 1e-5 * dense.1.abs().max(1e-6), "aux {} vs {}", sparse.1, dense.1);
    assert_eq!((sparse.2, &sparse.3), (dense.2, &dense.3), "selection and counters");
    for (i, (a, b)) in sparse.4.iter().zip(&dense.4).enumerate() {
        let want: Vec<f64> = b.iter().map(|v| *v as f64).collect();
        assert_close(&format!("gradient {i}"), a, &want, 1e-4);
    }
}

#[test]
fn the_authors_sae_file_loads_and_ours_round_trips() {
    let r = reference();
    let device = Device::flex();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sae-reference");
    let theirs = Crosscoder::load(&dir.join("authors.safetensors"), &device).unwrap();
    assert_eq!(theirs.config.kind, Kind::Sae);
    assert_eq!((theirs.config.d, theirs.config.dict_size, theirs.config.k), (5, 16, 2));
    assert_eq!(theirs.threshold, Some(0.5));
    for (name, t) in [("w_enc", &theirs.params.w_enc), ("w_dec", &theirs.params.w_dec), ("b_dec", &theirs.params.b_dec)]
    {
        assert_close(name, &read_vec(t.clone()).unwrap(), &r[name].1, 1e-7);
    }
    // Inference: the codes strictly above θ.
    let rows = SaeTarget::ChatMinusBase.rows(&f32s(&r["pairs"].1), 5);
    let codes = theirs.codes(tensor(rows, [7, 5], &device));
    assert_close("codes", &read_vec(codes).unwrap(), &r["codes"].1, 1e-5);

    // Their hub folder: model.safetensors beside their own config.json (activation_dim, dict_size, k).
    let hub = TempDir::new("sae-hub");
    std::fs::copy(dir.join("authors.safetensors"), hub.path().join("model.safetensors")).unwrap();
    let mixin = |d: usize| serde_json::json!({"activation_dim": d, "dict_size": 16, "k": 2}).to_string();
    std::fs::write(hub.path().join("config.json"), mixin(5)).unwrap();
    let from_hub = Crosscoder::load(hub.path(), &device).unwrap();
    assert_eq!((from_hub.config.kind, from_hub.config.d, from_hub.threshold), (Kind::Sae, 5, Some(0.5)));
    std::fs::write(hub.path().join("config.json"), mixin(7)).unwrap();
    let msg = Crosscoder::load(hub.path(), &device).err().unwrap().to_string();
    assert!(msg.contains("field `activation_dim` is 7, the SAE in") && msg.contains("has 5"), "{msg}");

    // Ours: sae.safetensors in their layout (int32 0-dim k, 0-dim θ), reloaded the same.
    let out = TempDir::new("sae-save");
    theirs.save(out.path()).unwrap();
    let bytes = std::fs::read(out.path().join("sae.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let k = st.tensor("k").unwrap();
    assert_eq!((k.dtype(), k.shape().to_vec(), k.data().to_vec()), (Dtype::I32, vec![], 2i32.to_le_bytes().to_vec()));
    assert_eq!(st.tensor("encoder.weight").unwrap().shape().to_vec(), vec![16, 5]);
    assert_eq!(st.tensor("decoder.weight").unwrap().shape().to_vec(), vec![5, 16]);
    assert_eq!(st.tensor("threshold").unwrap().shape().to_vec(), Vec::<usize>::new());
    let again = Crosscoder::load(out.path(), &device).unwrap();
    assert_eq!(again.threshold, Some(0.5));
    assert_eq!(read_vec(again.params.w_enc).unwrap(), read_vec(theirs.params.w_enc).unwrap());
}

fn planted_run(out: &Path, cfg: TrainConfig, source: &mut dyn PairSource, d: usize) -> Crosscoder {
    common::train_run(out.to_path_buf(), cfg, source, d).run(|_| {}, || true).unwrap().crosscoder
}

fn planted_config() -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        warmup_steps: 50,
        threshold_start: 200,
        steps: 2000,
        dead_tokens: 256 * 100,
        seed: 5,
        checkpoint_every: 300,
        log_every: 50,
        ..sae_config(1, 24)
    }
}

#[test]
fn a_diff_sae_finds_the_planted_chat_only_directions() {
    // chat − base of the planted pairs: the shared directions cancel, the chat-only ones remain
    // (and the base-only ones, negated). k = 1 leaves little budget to spare (1.28 directions are
    // active per token on average), so no direction is split over two co-firing latents.
    let d = 16;
    let dir = TempDir::new("diff-sae");
    let mut source = Planted::new(d, [14, 8, 8], 9, 256, 10_000);
    let sae = planted_run(dir.path(), planted_config(), &mut source, d);
    assert_eq!(sae.config.target, Some(SaeTarget::ChatMinusBase));
    let w_dec = read_vec(sae.params.w_dec.clone()).unwrap();
    let norms: Vec<f32> = w_dec.chunks_exact(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "unit-norm decoder rows: {norms:?}");
    let probe = Planted::new(d, [14, 8, 8], 9, 1, 1);
    let best = |v: &[f32]| -> f32 {
        w_dec.chunks_exact(d).map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum::<f32>()).fold(f32::MIN, f32::max)
    };
    for (i, v) in probe.chat_only.iter().enumerate() {
        let cos = best(v);
        eprintln!("chat-only direction {i}: best cosine {cos:.3}");
        assert!(cos > 0.9, "chat-only direction {i}: best latent cosine {cos}");
    }
    for (i, v) in probe.base_only.iter().enumerate() {
        let negated: Vec<f32> = v.iter().map(|x| -x).collect();
        assert!(best(&negated) > 0.9, "base-only direction {i} (negated in chat − base): {}", best(&negated));
    }
    // No latent reads a shared direction: they cancel in the difference.
    for (i, v) in probe.shared.iter().enumerate() {
        assert!(best(v) < 0.8, "shared direction {i} has a latent: cosine {}", best(v));
    }
    let last = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert!(last["fve_chat"].as_f64().unwrap() > 0.8, "FVE of chat − base: {last}");
}

#[test]
fn a_resumed_sae_run_is_bit_identical() {
    let d = 16;
    let cfg = TrainConfig { steps: 300, checkpoint_every: 100, threshold_start: 50, ..planted_config() };
    let whole = TempDir::new("sae-whole");
    planted_run(whole.path(), cfg.clone(), &mut Planted::new(d, [14, 4, 4], 9, 128, 10_000), d);
    let parts = TempDir::new("sae-parts");
    {
        let stop_at = std::cell::Cell::new(0u64);
        let mut src = Planted::new(d, [14, 4, 4], 9, 128, 10_000);
        let mut run = common::train_run(parts.path().to_path_buf(), cfg.clone(), &mut src, d);
        run.run(|p| stop_at.set(p.metrics.step), || stop_at.get() < 150).unwrap();
    }
    planted_run(parts.path(), cfg, &mut Planted::new(d, [14, 4, 4], 9, 128, 10_000), d);
    let read = |p: &Path, f: &str| std::fs::read(p.join(f)).unwrap();
    assert_eq!(read(whole.path(), "metrics.jsonl"), read(parts.path(), "metrics.jsonl"));
    assert_eq!(read(whole.path(), "sae.safetensors"), read(parts.path(), "sae.safetensors"));
    assert!(!parts.path().join("crosscoder.safetensors").exists());
}

#[test]
fn an_sae_run_from_the_cli_job_and_what_other_jobs_say_of_it() {
    use crossdiff::workflow::Handle;
    use crossdiff::workflow::analyze::{Analysed, AnalyzeJob};
    use crossdiff::workflow::kl::KlJob;
    use crossdiff::workflow::models::ModelStore;
    use crossdiff::workflow::train::TrainJob;
    let dir = TempDir::new("sae-job");
    let (cache, run) = (dir.path().join("cache"), dir.path().join("run"));
    common::cache_outcome(&common::small_cache_job(&cache)).unwrap();
    let job =
        TrainJob { kind: Kind::Sae, steps: Some(6), threshold_start: Some(2), ..common::small_train_job(&cache, &run) };
    let done = job.run(&Device::flex(), Handle::silent()).unwrap();
    assert_eq!(done.crosscoder.config.target, Some(SaeTarget::ChatMinusBase), "the default input: a diff-SAE");
    assert!(run.join("sae.safetensors").exists() && !run.join("crosscoder.safetensors").exists());
    // Resumed with another input: refused, naming it.
    let other = TrainJob { target: Some(SaeTarget::Base), steps: Some(8), ..job.clone() };
    common::has(
        &common::one_line_err(other.run(&Device::flex(), Handle::silent())),
        &["--target chat-minus-base, now --target base"],
    );
    // The app's Continue: the run's own settings (an SAE has no encoder scale to carry over).
    let saved = crossdiff::crosscoder::train::saved_run(&run).unwrap().unwrap();
    let more = TrainJob { steps: None, ..common::small_train_job(&cache, &run) }.continuing(&saved, 9);
    assert_eq!((more.kind, more.target, more.init_norm), (Kind::Sae, Some(SaeTarget::ChatMinusBase), None));
    assert_eq!(more.run(&Device::flex(), Handle::silent()).unwrap().step, 9);
    // The crosscoder analysis (its two decoders) refuses it in one line; `run_any` analyses it.
    let analyze = AnalyzeJob { run: run.clone(), cache: cache.clone(), ..Default::default() };
    common::has(
        &common::one_line_err(analyze.run(&Device::flex(), Handle::silent())),
        &["--run", "holds an SAE (kind sae, target chat-minus-base), not a crosscoder: analyze reads crosscoder runs"],
    );
    let kl = KlJob {
        run: run.clone(),
        base: common::fixture("base"),
        chat: common::fixture("chat"),
        data: common::data("chat.jsonl"),
        conversations: 2,
        ..Default::default()
    };
    // KL patching reads the SAE's latents table: first analyse.
    common::has(
        &common::one_line_err(kl.run(&Device::flex(), &ModelStore::new(), Handle::silent())),
        &["--run", "no sae-latents.csv yet: run `crossdiff analyze --run"],
    );
    assert!(matches!(analyze.run_any(&Device::flex(), Handle::silent()).unwrap(), Analysed::Sae(_)));
    let report = kl.run(&Device::flex(), &ModelStore::new(), Handle::silent()).unwrap();
    let written: Vec<crossdiff::analysis::kl::KlStat> =
        serde_json::from_str(&std::fs::read_to_string(run.join("kl.json")).unwrap()).unwrap();
    assert_eq!(written.len(), report.table.len());
    for (w, r) in written.iter().zip(&report.table) {
        assert_eq!((&w.condition, w.tokens_all, w.latents), (&r.condition, r.tokens_all, r.latents));
        assert!((w.mean_all - r.mean_all).abs() < 1e-12, "{w:?} vs {r:?}");
    }
    assert!(report.table.iter().any(|s| s.condition == "sae_recon" && s.tokens_all > 0 && s.mean_all.is_finite()));
    // Steering and the prompt lab still read a crosscoder's two decoders.
    let steer = crossdiff::workflow::steer::SteerJob {
        run: run.clone(),
        model: common::fixture("chat"),
        prompt: "hello".into(),
        max_tokens: 2,
        ..Default::default()
    };
    common::has(
        &common::one_line_err(steer.run(&Device::flex(), &ModelStore::new(), Handle::silent())),
        &["--run", "holds an SAE", "steer reads crosscoder runs"],
    );
}
