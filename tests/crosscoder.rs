//! Crosscoder losses, gradients, selection, threshold, weights layout and training behaviour.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor};
use common::planted::Planted;
use common::{TempDir, assert_close};
use crossdiff::crosscoder::train::{TrainConfig, step_loss, update_threshold};
use crossdiff::crosscoder::{Crosscoder, Init, Kind, Params, read_vec, select_batch_topk, tensor};
use crossdiff::rng::SplitMix64;
use safetensors::SafeTensors;

fn reference() -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/crosscoder-reference/cases.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn t2(r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>, name: &str, device: &Device) -> Tensor<2> {
    let (shape, v) = &r[name];
    tensor(v.iter().map(|&x| x as f32).collect(), [shape[0], shape[1]], device)
}

fn reference_params(r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>, device: &Device) -> Params {
    Params {
        w_enc: t2(r, "param.w_enc", device),
        b_enc: t2(r, "param.b_enc", device),
        w_dec: t2(r, "param.w_dec", device),
        b_dec: t2(r, "param.b_dec", device),
    }
}

fn small_config(kind: Kind) -> TrainConfig {
    TrainConfig { k: 2, mu: 0.041, dead_tokens: 100, aux_alpha: 1.0 / 32.0, ..TrainConfig::defaults(kind, 8) }
}

#[test]
fn loss_terms_and_gradients_equal_the_pytorch_reference() {
    let r = reference();
    let device = Device::flex();
    let cases = [
        ("l1", Kind::L1, false, false),
        ("l1sq", Kind::L1, true, false),
        ("topk", Kind::BatchTopK, false, false),
        ("topk", Kind::BatchTopK, false, true),
    ];
    for (tag, kind, squared, sparse) in cases {
        for cpu_kernels in [false, true] {
            let what = format!(
                "{tag}{}{}",
                if sparse { " (sparse)" } else { "" },
                if cpu_kernels { " (cpu kernels)" } else { "" }
            );
            let cfg = TrainConfig { squared_recon: squared, sparse, cpu_kernels, ..small_config(kind) };
            let p = reference_params(&r, &device);
            let x = t2(&r, "x", &device);
            let mut since: Vec<u64> = match r.get("topk.before") {
                Some((_, v)) if kind == Kind::BatchTopK => v.iter().map(|&x| x as u64).collect(),
                _ => vec![0; 8],
            };
            let out = step_loss(&cfg, &p, x, 1, &mut since).unwrap();
            assert_close(
                &format!("{what} loss"),
                &read_vec(out.loss.clone().detach()).unwrap(),
                &r[&format!("{tag}.loss")].1,
                1e-5,
            );
            assert_close(
                &format!("{what} recon"),
                &read_vec(out.recon.clone().detach()).unwrap(),
                &r[&format!("{tag}.recon")].1,
                1e-5,
            );
            let grads = out.gradients().unwrap();
            for (name, g) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(grads) {
                assert_close(
                    &format!("{what} grad {name}"),
                    &read_vec(g).unwrap(),
                    &r[&format!("{tag}.grad.{name}")].1,
                    1e-5,
                );
            }
            if kind == Kind::BatchTopK {
                let aux = read_vec(out.aux.clone().expect("a latent is dead").detach()).unwrap();
                assert_close(&format!("{what} aux"), &aux, &r["topk.aux"].1, 1e-5);
                let (mask, min_kept) = out.kept.unwrap();
                assert_eq!(mask.iter().map(|&m| m as f64).collect::<Vec<_>>(), r["topk.mask"].1);
                assert_close("min kept", &[min_kept.unwrap()], &r["topk.min_kept"].1, 1e-6);
                assert_eq!(since.iter().map(|&c| c as f64).collect::<Vec<_>>(), r["topk.after"].1);
            }
        }
    }
}

#[test]
fn sparse_and_dense_batchtopk_agree_on_a_larger_case() {
    // 32 tokens, D = 64, several dead latents: the sparse path's gradients equal the dense ones.
    // Rows of 12 (shorter than the CPU loops' 16 lanes) and of 40 (two full lane blocks and a rest).
    for d in [6, 20] {
        sparse_and_dense_batchtopk_agree(d);
    }
}

fn sparse_and_dense_batchtopk_agree(d: usize) {
    let device = Device::flex();
    let (dict, b) = (64, 32);
    let p = Params::init(d, dict, 1.0, 3, &device);
    let mut rng = SplitMix64(8);
    let x = tensor((0..b * 2 * d).map(|_| rng.next_f64() as f32 - 0.3).collect(), [b, 2 * d], &device);
    let before: Vec<u64> = (0..dict).map(|j| if j % 5 == 0 { 1000 } else { 0 }).collect();
    let run = |sparse, cpu_kernels| {
        let cfg = TrainConfig {
            k: 3,
            dead_tokens: 1000,
            sparse,
            cpu_kernels,
            ..TrainConfig::defaults(Kind::BatchTopK, dict)
        };
        let mut since = before.clone();
        let out = step_loss(&cfg, &p, x.clone(), 1, &mut since).unwrap();
        assert!(out.aux.is_some());
        let loss = read_vec(out.loss.clone().detach()).unwrap();
        (loss, out.gradients().unwrap().map(|g| read_vec(g).unwrap()), since)
    };
    let (dense_loss, dense_grads, dense_since) = run(false, false);
    let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    // The autodiff sparse route and the CPU loops (sparse_cpu) both equal the dense reference.
    for cpu_kernels in [false, true] {
        let (sparse_loss, sparse_grads, sparse_since) = run(true, cpu_kernels);
        assert_eq!(dense_since, sparse_since);
        assert_close(&format!("loss (cpu kernels {cpu_kernels})"), &sparse_loss, &want(&dense_loss), 1e-6);
        for (name, (s, dn)) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(sparse_grads.iter().zip(&dense_grads)) {
            assert_close(&format!("{name} (cpu kernels {cpu_kernels})"), s, &want(dn), 1e-5);
        }
    }
}

#[test]
fn aux_loss_is_zero_when_nothing_is_dead_and_alpha_applies_once() {
    let r = reference();
    let device = Device::flex();
    let cfg = small_config(Kind::BatchTopK);
    let p = reference_params(&r, &device);
    let mut alive = vec![0u64; 8];
    let out = step_loss(&cfg, &p, t2(&r, "x", &device), 1, &mut alive).unwrap();
    assert!(out.aux.is_none());
    assert_eq!(read_vec(out.loss.detach()).unwrap(), read_vec(out.recon.detach()).unwrap());
    // With a dead latent: loss = recon + α·aux exactly (the bug this guards against applied α twice).
    let mut since: Vec<u64> = r["topk.before"].1.iter().map(|&x| x as u64).collect();
    let out = step_loss(&cfg, &p, t2(&r, "x", &device), 1, &mut since).unwrap();
    let (loss, recon, aux) = (
        read_vec(out.loss.detach()).unwrap()[0] as f64,
        read_vec(out.recon.detach()).unwrap()[0] as f64,
        read_vec(out.aux.unwrap().detach()).unwrap()[0] as f64,
    );
    assert!((loss - (recon + aux / 32.0)).abs() < 1e-6, "{loss} vs {recon} + {aux}/32");
}

#[test]
fn batch_topk_keeps_exactly_k_times_b_entries() {
    let mut rng = SplitMix64(3);
    for &(b, dict, k) in &[(16usize, 50usize, 3usize), (64, 200, 10), (7, 13, 1)] {
        // Some exact ties and zeros, as ReLU codes have.
        let scores: Vec<f32> = (0..b * dict)
            .map(|_| {
                let u = rng.next_f64();
                if u < 0.3 { 0.0 } else { ((u * 8.0).floor() / 8.0) as f32 }
            })
            .collect();
        let (mask, min_kept) = select_batch_topk(&scores, k * b);
        let kept: Vec<f32> = scores.iter().zip(&mask).filter(|(_, m)| **m == 1.0).map(|(s, _)| *s).collect();
        assert_eq!(kept.len(), k * b);
        let floor = kept.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(Some(floor), min_kept);
        assert!(scores.iter().zip(&mask).all(|(s, m)| *m == 1.0 || *s <= floor), "a dropped score beats a kept one");
    }
    // Fewer positive scores than k·B: all positive ones, never a zero.
    let (mask, _) = select_batch_topk(&[0.0, 2.0, 0.0, 1.0], 3);
    assert_eq!(mask, vec![0.0, 1.0, 0.0, 1.0]);
}

#[test]
fn threshold_follows_the_ema_rule() {
    // The authors update on `step > threshold_start_step` with 0-based steps: with 1000, the
    // 1-based steps 1..=1001 leave θ alone and step 1002 sets it.
    assert_eq!(update_threshold(None, Some(0.5), 1000, 1000), None, "not before the start step");
    assert_eq!(update_threshold(None, Some(0.5), 1001, 1000), None, "0-based step 1000 is not after the start");
    let t = update_threshold(None, Some(0.5), 1002, 1000);
    assert_eq!(t, Some(0.5), "starts at the first minimum");
    let t = update_threshold(t, Some(1.5), 1003, 1000).unwrap();
    assert!((t - (0.999 * 0.5 + 0.001 * 1.5)).abs() < 1e-7);
    assert_eq!(update_threshold(Some(t), None, 1004, 1000), Some(t));
    assert_eq!(update_threshold(None, Some(0.5), 1, 0), None, "with 0 the first step (0-based 0) is not after it");
    assert_eq!(update_threshold(None, Some(0.5), 2, 0), Some(0.5));
}

#[test]
fn shared_and_independent_inits_follow_the_spec() {
    let (d, dict, norm) = (6, 10, 0.7);
    let device = Device::flex();
    for init in [Init::Shared, Init::Independent] {
        let p = Params::init_as(init, d, dict, norm, 4, &device);
        let enc = read_vec(p.w_enc.clone()).unwrap();
        let dec = read_vec(p.w_dec.clone()).unwrap();
        let col = |m: usize, j: usize| (0..d).map(|i| enc[(m * d + i) * dict + j]).collect::<Vec<f32>>();
        for j in 0..dict {
            for m in 0..2 {
                let c = col(m, j);
                let n = c.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n - norm as f32).abs() < 1e-5, "{init}: latent {j}, model {m}: column norm {n}");
                assert_eq!(c, dec[j * 2 * d + m * d..j * 2 * d + (m + 1) * d], "{init}: decoder = encoderᵀ");
            }
            let same = col(0, j) == col(1, j);
            assert_eq!(same, init == Init::Shared, "{init}: latent {j} has the same direction in both models: {same}");
        }
        assert!(
            read_vec(p.b_enc.clone()).unwrap().iter().chain(&read_vec(p.b_dec.clone()).unwrap()).all(|&v| v == 0.0)
        );
    }
    // The shared matrix is the independent init's base block (one seeded stream).
    let shared = read_vec(Params::init_as(Init::Shared, d, dict, norm, 4, &device).w_enc).unwrap();
    let independent = read_vec(Params::init_as(Init::Independent, d, dict, norm, 4, &device).w_enc).unwrap();
    assert_eq!(shared[..d * dict], independent[..d * dict]);
}

#[test]
fn the_threshold_first_moves_on_the_step_after_threshold_start_plus_one() {
    // The authors update θ when their 0-based step exceeds threshold_start_step: with 2, the
    // 1-based steps 1–3 leave it unset and step 4 sets it.
    for (steps, set) in [(3, false), (4, true)] {
        let dir = TempDir::new("threshold-start");
        let mut source = Planted::new(8, [4, 2, 2], 1, 64, 100);
        let config =
            TrainConfig { k: 2, threshold_start: 2, steps, log_every: 1, ..TrainConfig::defaults(Kind::BatchTopK, 16) };
        let mut run = common::train_run(dir.path().to_path_buf(), config, &mut source, 8);
        let cc = run.run(|_| {}, || true).unwrap().crosscoder;
        assert_eq!(cc.threshold.is_some(), set, "after {steps} steps with threshold_start 2: θ = {:?}", cc.threshold);
    }
}

#[test]
fn authors_layout_loads_and_round_trips() {
    let r = reference();
    let device = Device::flex();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/crosscoder-reference/authors.safetensors");
    let cc = Crosscoder::load(&file, &device).unwrap();
    assert_eq!((cc.config.kind, cc.config.d, cc.config.dict_size, cc.config.k), (Kind::BatchTopK, 4, 8, 2));
    assert_eq!(cc.threshold, Some(0.25));
    let want = reference_params(&r, &device);
    for (name, (a, b)) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(cc.params.list().into_iter().zip(want.list()))
    {
        let bv: Vec<f64> = read_vec(b.clone()).unwrap().iter().map(|&x| x as f64).collect();
        assert_close(name, &read_vec(a.clone()).unwrap(), &bv, 0.0);
    }
    let dir = TempDir::new("cc-save");
    cc.save(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("crosscoder.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
    assert_eq!(shapes["encoder.weight"], vec![2, 4, 8]);
    assert_eq!(shapes["encoder.bias"], vec![8]);
    assert_eq!(shapes["decoder.weight"], vec![2, 8, 4]);
    assert_eq!(shapes["decoder.bias"], vec![2, 4]);
    assert_eq!(shapes["k"], vec![1]);
    assert_eq!(shapes["threshold"], vec![1]);
    // Same bytes as the authors' file for every tensor (names without the compile prefix).
    let abytes = std::fs::read(&file).unwrap();
    let authors = SafeTensors::deserialize(&abytes).unwrap();
    for (name, view) in authors.tensors() {
        assert_eq!(st.tensor(name.trim_start_matches("_orig_mod.")).unwrap().data(), view.data(), "{name}");
    }
}

/// Synthetic pairs from known unit directions: shared (same direction in both models), chat-only
/// (zero in base) and base-only (zero in chat), each active with probability `p`.
fn planted_config() -> TrainConfig {
    TrainConfig {
        k: 3,
        lr: 3e-3,
        warmup_steps: 50,
        threshold_start: 200,
        steps: 1500,
        dead_tokens: 256 * 100,
        seed: 5,
        checkpoint_every: 250,
        log_every: 50,
        ..TrainConfig::defaults(Kind::BatchTopK, 48)
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt()).max(1e-12)
}

#[test]
fn batchtopk_recovers_planted_chat_only_directions() {
    for init in [Init::Shared, Init::Independent] {
        recovers_planted_directions(init);
    }
}

fn recovers_planted_directions(init: Init) {
    let dir = TempDir::new("planted");
    let d = 16;
    let mut source = Planted::new(d, [14, 4, 4], 9, 256, 10_000);
    let mut run = common::train_run(dir.path().to_path_buf(), TrainConfig { init, ..planted_config() }, &mut source, d);
    let cc = run.run(|_| {}, || true).unwrap().crosscoder;
    let metrics: Vec<crossdiff::crosscoder::train::StepMetrics> =
        std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let last = metrics.last().unwrap();
    eprintln!("planted, {init} init, last step: {last:?}");
    assert_eq!(last.step, 1500);
    assert!(last.fve_base > 0.9 && last.fve_chat > 0.9, "FVE {} / {}", last.fve_base, last.fve_chat);
    assert!(cc.threshold.is_some_and(|t| t > 0.0));
    let w_dec = read_vec(cc.params.w_dec.clone()).unwrap();
    let norms = cc.params.decoder_norms().unwrap();
    let probe = Planted::new(d, [14, 4, 4], 9, 1, 1);
    for (i, v) in probe.chat_only.iter().enumerate() {
        // The latent whose chat decoder points along this chat-only direction.
        let (j, cos) = (0..48)
            .map(|j| (j, cosine(&w_dec[j * 2 * d + d..(j + 1) * 2 * d], v)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        let [nb, nc] = norms[j];
        let delta = 0.5 * ((nc - nb) / nb.max(nc) + 1.0);
        assert!(cos > 0.9, "{init} init, chat-only direction {i}: best latent {j} has cosine {cos}");
        eprintln!("{init} init, chat-only direction {i}: latent {j}, cosine {cos:.3}, Δ {delta:.3}");
        assert!(delta >= 0.9, "{init} init, chat-only direction {i}: latent {j} has Δ = {delta} (norms {nb}, {nc})");
    }
}

#[test]
fn resumed_training_follows_the_same_loss_curve() {
    let d = 16;
    let cfg = TrainConfig { steps: 400, checkpoint_every: 100, log_every: 10, ..planted_config() };
    let whole = TempDir::new("train-whole");
    let mut src = Planted::new(d, [14, 4, 4], 9, 128, 10_000);
    let mut run = common::train_run(whole.path().to_path_buf(), cfg.clone(), &mut src, d);
    run.run(|_| {}, || true).unwrap();

    let parts = TempDir::new("train-parts");
    let stop_at = std::cell::Cell::new(0u64);
    {
        let mut src = Planted::new(d, [14, 4, 4], 9, 128, 10_000);
        let mut run = common::train_run(parts.path().to_path_buf(), cfg.clone(), &mut src, d);
        // Interrupted at step 250: the checkpoint on the way out is at 250.
        run.run(|p| stop_at.set(p.metrics.step), || stop_at.get() < 250).unwrap();
    }
    // Simulate a crash after the last checkpoint: metrics past it must be dropped on resume.
    {
        let mut src = Planted::new(d, [14, 4, 4], 9, 128, 10_000);
        let mut run = common::train_run(parts.path().to_path_buf(), cfg.clone(), &mut src, d);
        run.run(|_| {}, || true).unwrap();
    }
    let read = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap();
    assert_eq!(read(whole.path()), read(parts.path()));
    assert_eq!(
        std::fs::read(whole.path().join("crosscoder.safetensors")).unwrap(),
        std::fs::read(parts.path().join("crosscoder.safetensors")).unwrap()
    );
}

#[test]
fn cpu_histogram_selection_equals_the_reference() {
    use crossdiff::crosscoder::train::host_sparse::{norm_sums, select_topk};
    let mut rng = SplitMix64(77);
    for &(b, dict, k, ties) in
        &[(64usize, 300usize, 5usize, false), (32, 1000, 20, true), (16, 40, 3, true), (8, 50, 40, false)]
    {
        let f: Vec<f32> = (0..b * dict)
            .map(|_| {
                let u = rng.next_f64();
                if u < 0.5 {
                    0.0
                } else if ties && u < 0.7 {
                    0.25
                } else {
                    (rng.next_f64() * 6.0).exp() as f32 * 1e-2
                }
            })
            .collect();
        let norms: Vec<f32> = (0..dict).map(|j| if ties { 1.0 } else { 0.5 + (j % 7) as f32 * 0.1 }).collect();
        let scores: Vec<f32> = f.iter().enumerate().map(|(i, v)| v * norms[i % dict]).collect();
        let (want_mask, want_min) = select_batch_topk(&scores, k * b);
        let (picks, selected, mask, min_kept) = select_topk(&f, &norms, dict, k * b);
        assert_eq!(mask, want_mask, "b={b} dict={dict} k={k}");
        assert_eq!(min_kept, want_min);
        assert_eq!(picks.values.len(), want_mask.iter().filter(|&&m| m > 0.0).count());
        for ((&t, &l), &v) in picks.tokens.iter().zip(&picks.latents).zip(&picks.values) {
            assert_eq!(v, f[t as usize * dict + l as usize]);
        }
        let per: Vec<f32> = (0..dict).map(|j| (0..b).map(|r| want_mask[r * dict + j]).sum()).collect();
        assert_eq!(selected, per);
    }
    // The score weights summed on the host equal the tensor route's.
    let device = Device::flex();
    let p = Params::init(9, 70, 1.0, 4, &device);
    let want: Vec<f64> = read_vec(p.norm_sum()).unwrap().iter().map(|&v| v as f64).collect();
    assert_close("norm sums", &norm_sums(&read_vec(p.w_dec.clone()).unwrap(), 9), &want, 1e-6);
}

#[test]
fn adam_on_the_host_equals_adam_through_tensor_ops_bit_for_bit() {
    use crossdiff::crosscoder::optim::AdamConfig;
    let device = Device::flex();
    let mut rng = SplitMix64(21);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect() };
    let shape = [37, 300];
    let n = shape[0] * shape[1];
    let adam = AdamConfig::default();
    let (p0, gs) = (draw(n), (0..3).map(|_| draw(n)).collect::<Vec<_>>());
    // The host pass applies the clip's factor as it reads each gradient value: the same as
    // scaling the gradient tensor first.
    for scale in [1.0f32, 0.37] {
        let run = |host: bool| -> [Vec<f32>; 3] {
            let mut p = tensor(p0.clone(), shape, &device);
            let mut m = Tensor::<2>::zeros(shape, &device);
            let mut v = Tensor::<2>::zeros(shape, &device);
            for (i, g) in gs.iter().enumerate() {
                let g = tensor(g.clone(), shape, &device);
                let (step, lr) = (i as u64 + 1, 1e-3 * (i + 1) as f64);
                p = if host {
                    adam.update_host(step, lr, p, &mut m, &mut v, g, scale).unwrap()
                } else {
                    adam.update(step, lr, p, &mut m, &mut v, g.mul_scalar(scale))
                };
            }
            [p, m, v].map(|t| read_vec(t).unwrap())
        };
        let (host, tensors) = (run(true), run(false));
        for (name, (a, b)) in ["parameter", "first moment", "second moment"].iter().zip(host.iter().zip(&tensors)) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} (gradient scale {scale}): the host pass differs from the tensor ops");
        }
    }
}

#[test]
fn clipping_on_the_cpu_scales_to_the_global_norm() {
    use crossdiff::crosscoder::train::{clip_factor, clip_gradients};
    let device = Device::flex();
    let mut rng = SplitMix64(5);
    let shapes = [[7, 33], [1, 33], [33, 7], [1, 7]];
    // Values of ±0.005 (global norm ≈ 0.07: untouched) and of ±0.5 (≈ 6.6: scaled to 1).
    for spread in [0.01f32, 1.0] {
        let vals: Vec<Vec<f32>> =
            shapes.iter().map(|s| (0..s[0] * s[1]).map(|_| (rng.next_f64() as f32 - 0.5) * spread).collect()).collect();
        let norm = vals.iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert_eq!(norm > 1.0, spread == 1.0, "one case on each side of the limit (norm {norm})");
        let factor = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let g: [Tensor<2>; 4] = std::array::from_fn(|i| tensor(vals[i].clone(), shapes[i], &device));
        // The factor the training loop hands to Adam, and the gradients scaled by it.
        let s = clip_factor(&g, Some(1.0)).unwrap() as f64;
        assert!((s - factor).abs() < 1e-6 * factor, "clip factor {s}, want {factor}");
        let clipped = clip_gradients(g, Some(1.0)).unwrap();
        let mut total = 0.0f64;
        for (i, (c, v)) in clipped.into_iter().zip(&vals).enumerate() {
            let got = read_vec(c).unwrap();
            total += got.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            let want: Vec<f64> = v.iter().map(|&x| x as f64 * factor).collect();
            assert_close(&format!("gradient {i} (spread {spread})"), &got, &want, 1e-6);
        }
        assert!((total.sqrt() - norm.min(1.0)).abs() < 1e-5, "clipped norm {} for {norm}", total.sqrt());
    }
}

#[test]
fn the_memory_estimate_counts_an_saes_one_input_width() {
    use crossdiff::crosscoder::train::training_bytes;
    let (d, dict, batch) = (2304.0, 73_728.0, 2048.0);
    // A crosscoder: 16·d·D floats of state (parameters, gradients, two moments over 2d×D twice).
    let crosscoder = 4.0 * (16.0 * d * dict + 4.0 * batch * dict + 4.0 * batch * d);
    assert_eq!(training_bytes(Kind::BatchTopK, 2304, 73_728, 2048), crosscoder);
    assert_eq!(training_bytes(Kind::L1, 2304, 73_728, 2048), crosscoder);
    // An SAE reads one model's width: half the state.
    let sae = 4.0 * (8.0 * d * dict + 4.0 * batch * dict + 2.0 * batch * d);
    assert_eq!(training_bytes(Kind::Sae, 2304, 73_728, 2048), sae);
}

#[test]
fn l1_gradients_stay_finite_when_a_row_is_reconstructed_exactly() {
    // A zero row with zero codes and a zero decoder bias has error 0: its norm's derivative is the
    // subgradient 0, not NaN (training on data with empty rows diverged at step 2 before).
    let device = Device::flex();
    let cfg = small_config(Kind::L1);
    let (d, dict, b) = (3, 8, 4);
    let p = Params::init(d, dict, 1.0, 1, &device);
    let mut x = vec![0.0f32; b * 2 * d];
    x[..2 * d].iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f32 + 0.2);
    let mut since = vec![0u64; dict];
    let out = crossdiff::crosscoder::train::step_loss(&cfg, &p, tensor(x, [b, 2 * d], &device), 1, &mut since).unwrap();
    for g in out.gradients().unwrap() {
        let v = read_vec(g).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    }
    assert!(read_vec(out.loss.clone()).unwrap()[0].is_finite());
}
