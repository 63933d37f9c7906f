//! WGSL kernels against their plain references, on the CI driver (Mesa lavapipe).

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use crossdiff::crosscoder::kernels::{batch_topk_picks, kth_largest};
use crossdiff::crosscoder::select_batch_topk;
use crossdiff::rng::SplitMix64;

/// Scores like norm-weighted ReLU codes: many zeros, positive values over a wide range, and
/// optionally a few exactly repeated levels (ties).
fn scores_like_codes(rng: &mut SplitMix64, n: usize, zeros: f64, tie_levels: u32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u = rng.next_f64();
            if u < zeros {
                0.0
            } else if tie_levels > 0 && u < zeros + 0.2 {
                (1 + rng.next_u64() % tie_levels as u64) as f32 * 0.125
            } else {
                (rng.next_f64() * 10.0).exp() as f32 * 1e-3
            }
        })
        .collect()
}

#[test]
fn device_picks_equal_the_reference_selection() {
    let Some(device) = common::wgpu_device() else { return };
    let mut rng = SplitMix64(5);
    // (rows, width, keep, zero share, tie levels): ties across rows, fewer positives than keep,
    // nothing positive, rows wider than a workgroup's chunking.
    for &(b, d, keep, zeros, ties) in &[
        (64usize, 300usize, 640usize, 0.3, 0u32),
        (50, 1000, 800, 0.5, 4),
        (33, 77, 2000, 0.9, 0),
        (8, 64, 40, 1.0, 0),
        (16, 5000, 1600, 0.2, 2),
        // Only tie levels above zero: the threshold is a level with more ties than fit, split
        // across rows and across each row's chunks.
        (40, 900, 2000, 0.7, 3),
    ] {
        let scores = scores_like_codes(&mut rng, b * d, zeros, ties);
        let t = Tensor::<1>::from_data(TensorData::new(scores.clone(), [b * d]), (&device, DType::F32));
        let picks = batch_topk_picks(&t, keep, b, d);
        let ints = |x: Tensor<1, burn::tensor::Int>| -> Vec<i64> { x.try_into_vec_as::<i64>().unwrap() };
        let (offsets, tokens, latents, per_latent) =
            (ints(picks.token_offsets), ints(picks.tokens), ints(picks.latents), ints(picks.per_latent));
        let (mask, min_kept) = select_batch_topk(&scores, keep);
        if (b, d, keep) == (40, 900, 2000) {
            let threshold = min_kept.unwrap();
            let ties = scores.iter().filter(|&&s| s == threshold).count();
            let kept = mask.iter().zip(&scores).filter(|(m, s)| **m > 0.0 && **s == threshold).count();
            assert!(kept > 0 && kept < ties, "the case splits a tie level: {kept} of {ties}");
        }
        // The reference's kept entries in position order.
        let want: Vec<(i64, i64)> =
            mask.iter().enumerate().filter(|(_, m)| **m > 0.0).map(|(i, _)| ((i / d) as i64, (i % d) as i64)).collect();
        let n = want.len();
        assert_eq!(offsets[b] as usize, n, "b={b} d={d} keep={keep}: picks");
        let got: Vec<(i64, i64)> = tokens[..n].iter().copied().zip(latents[..n].iter().copied()).collect();
        assert_eq!(got, want, "b={b} d={d} keep={keep}");
        for t in 0..b {
            let row = want.iter().filter(|(tok, _)| *tok == t as i64).count() as i64;
            assert_eq!(offsets[t + 1] - offsets[t], row, "row {t}");
        }
        let counts: Vec<i64> = (0..d).map(|j| want.iter().filter(|(_, l)| *l == j as i64).count() as i64).collect();
        assert_eq!(per_latent, counts);
        // Empty slots point at the last token and at latent d (out of range: in no latent segment).
        assert!(tokens[n..].iter().all(|&t| t == b as i64 - 1) && latents[n..].iter().all(|&l| l == d as i64));
        // The latent segments by counting sort on the device equal a stable sort by latent.
        let t = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(latents.clone(), [keep]), &device);
        let (offsets, order) = crossdiff::crosscoder::kernels::latent_segments(&t, d);
        let (offsets, order) = (ints(offsets), ints(order));
        let mut want_order: Vec<i64> = (0..n as i64).collect();
        want_order.sort_by_key(|&p| latents[p as usize]);
        assert_eq!(order[..n], want_order[..], "b={b} d={d} keep={keep}: latent order");
        for (j, c) in counts.iter().enumerate() {
            assert_eq!(offsets[j + 1] - offsets[j], *c, "latent {j}'s segment");
        }
    }
}

#[test]
fn row_topk_picks_what_the_host_auxk_selection_picks() {
    // Per token the k largest positive scores among the dead latents (ties by lower index), as
    // `select_aux`; rows with fewer candidates than k, rows with none, and tie levels.
    let Some(device) = common::wgpu_device() else { return };
    let mut rng = SplitMix64(17);
    for &(b, d, k, zeros, ties, dead_every) in &[
        (16usize, 300usize, 20usize, 0.5, 0u32, 3usize),
        (9, 1000, 64, 0.9, 3, 2),
        (12, 77, 40, 0.6, 2, 5),
        (4, 50, 8, 1.0, 0, 1),
    ] {
        let scores = scores_like_codes(&mut rng, b * d, zeros, ties);
        let dead: Vec<bool> = (0..d).map(|j| j % dead_every == 0).collect();
        let masked: Vec<f32> = scores.iter().enumerate().map(|(i, &s)| if dead[i % d] { s } else { 0.0 }).collect();
        let t = Tensor::<2>::from_data(TensorData::new(masked, [b, d]), (&device, DType::F32));
        let got: Vec<i64> = crossdiff::crosscoder::kernels::row_topk(&t, k).try_into_vec_as::<i64>().unwrap();
        let n_dead = dead.iter().filter(|&&x| x).count();
        let mask = crossdiff::crosscoder::select_aux(&scores, d, &dead, k.min(n_dead));
        for r in 0..b {
            let want: Vec<i64> = (0..d).filter(|&j| mask[r * d + j] > 0.0).map(|j| j as i64).collect();
            let row = &got[r * k..(r + 1) * k];
            assert_eq!(&row[..want.len()], &want[..], "b={b} d={d} k={k} row {r}");
            assert!(row[want.len()..].iter().all(|&l| l == d as i64), "row {r}: unused slots carry d: {row:?}");
        }
    }
}

#[test]
fn histogram_select_finds_the_same_threshold_as_the_reference() {
    let Some(device) = common::wgpu_device() else { return };
    let mut rng = SplitMix64(21);
    for &(n, keep, zeros, tie_levels) in
        &[(5000usize, 300usize, 0.3, 0u32), (20_000, 1234, 0.5, 16), (777, 5, 0.9, 3), (4096, 4000, 0.0, 0)]
    {
        let scores = scores_like_codes(&mut rng, n, zeros, tie_levels);
        let t = Tensor::<1>::from_data(TensorData::new(scores.clone(), [n]), (&device, DType::F32));
        let got = kth_largest(&t, keep).unwrap();
        let (mask, min_kept) = select_batch_topk(&scores, keep);
        let positive = scores.iter().filter(|&&s| s > 0.0).count();
        if positive <= keep {
            assert_eq!(got, None, "n={n}: every positive score is kept");
            continue;
        }
        let (threshold, above) = got.expect("more positive scores than keep");
        assert_eq!(Some(threshold), min_kept, "n={n} keep={keep}: the keep-th largest score");
        assert_eq!(above, scores.iter().filter(|&&s| s > threshold).count());
        // Entries above the threshold plus the first ties reproduce the reference mask.
        let mut ties = keep - above;
        let device_mask: Vec<f32> = scores
            .iter()
            .map(|&s| {
                if s > threshold {
                    1.0
                } else if s == threshold && ties > 0 {
                    ties -= 1;
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(device_mask, mask);
    }
}

#[test]
fn sparse_batchtopk_step_on_wgpu_equals_the_host_selection_on_flex() {
    use crossdiff::crosscoder::train::{TrainConfig, step_loss};
    use crossdiff::crosscoder::{Kind, Params, read_vec, tensor};
    let Some(gpu) = common::wgpu_device() else { return };
    let cpu = burn::tensor::Device::flex();
    // The step takes the device route on wgpu only.
    assert!(
        crossdiff::crosscoder::kernels::is_wgpu(&gpu) && !crossdiff::crosscoder::kernels::is_wgpu(&cpu),
        "{gpu:?} / {cpu:?}"
    );
    let (d, dict, b) = (6, 64, 32);
    let mut rng = SplitMix64(8);
    let x: Vec<f32> = (0..b * 2 * d).map(|_| rng.next_f64() as f32 - 0.3).collect();
    for dead_every in [0usize, 5] {
        // With dead latents AuxK reads the scores back; without, nothing B×D leaves the device.
        let before: Vec<u64> =
            (0..dict).map(|j| if dead_every > 0 && j % dead_every == 0 { 1000 } else { 0 }).collect();
        let run = |device: &burn::tensor::Device, cpu_kernels: bool| {
            let p = Params::init(d, dict, 1.0, 3, device);
            let cfg =
                TrainConfig { k: 3, dead_tokens: 1000, cpu_kernels, ..TrainConfig::defaults(Kind::BatchTopK, dict) };
            let mut since = before.clone();
            let out = step_loss(&cfg, &p, tensor(x.clone(), [b, 2 * d], device), 1, &mut since).unwrap();
            let loss = read_vec(out.loss.clone().detach()).unwrap();
            let min_kept = out.kept.as_ref().unwrap().1;
            (loss, out.gradients().unwrap().map(|g| read_vec(g).unwrap()), since, min_kept)
        };
        let (l_cpu, g_cpu, s_cpu, m_cpu) = run(&cpu, true);
        // On wgpu: the WGSL kernels (segment_rows, pick_dot) and the autodiff route.
        for kernels in [true, false] {
            let (l_gpu, g_gpu, s_gpu, m_gpu) = run(&gpu, kernels);
            assert_eq!(s_cpu, s_gpu, "dead counters");
            assert_eq!(m_cpu, m_gpu, "smallest kept score");
            let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            common::assert_close(
                &format!("loss (kernels {kernels}, dead every {dead_every})"),
                &l_gpu,
                &want(&l_cpu),
                1e-5,
            );
            for (name, (g, c)) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(g_gpu.iter().zip(&g_cpu)) {
                common::assert_close(
                    &format!("{name} (kernels {kernels}, dead every {dead_every})"),
                    g,
                    &want(c),
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn device_resident_step_equals_the_host_route_on_flex() {
    // The resident route keeps the selection, the dead counters, AuxK and its rule on the device;
    // one step must give the host route's loss, gradients, counters and smallest kept score.
    use crossdiff::crosscoder::train::resident::{Resident, step};
    use crossdiff::crosscoder::train::{TrainConfig, step_loss};
    use crossdiff::crosscoder::{Kind, Params, read_vec, tensor};
    let Some(gpu) = common::wgpu_device() else { return };
    let cpu = burn::tensor::Device::flex();
    let (d, dict, b) = (6, 64, 32);
    let mut rng = SplitMix64(8);
    let x: Vec<f32> = (0..b * 2 * d).map(|_| rng.next_f64() as f32 - 0.3).collect();
    let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    for dead_every in [0usize, 5, 1] {
        let before: Vec<u64> =
            (0..dict).map(|j| if dead_every > 0 && j % dead_every == 0 { 1000 } else { 0 }).collect();
        let cfg = TrainConfig { k: 3, dead_tokens: 1000, ..TrainConfig::defaults(Kind::BatchTopK, dict) };
        // The host route on the CPU.
        let p = Params::init(d, dict, 1.0, 3, &cpu);
        let mut since_cpu = before.clone();
        let out = step_loss(&cfg, &p, tensor(x.clone(), [b, 2 * d], &cpu), 1, &mut since_cpu).unwrap();
        let l_cpu = read_vec(out.loss.clone().detach()).unwrap();
        let g_cpu = out.gradients().unwrap().map(|g| read_vec(g).unwrap());
        let m_cpu = out.kept.as_ref().unwrap().1;
        // The resident route on wgpu.
        let p = Params::init(d, dict, 1.0, 3, &gpu);
        let mut r = Resident::upload(&before, None, &cfg, &gpu);
        let out = step(&cfg, &p, tensor(x.clone(), [b, 2 * d], &gpu), 1, 2000, &mut r).unwrap();
        let l_gpu = read_vec(out.loss()).unwrap();
        let m_gpu = read_vec(out.min_kept()).unwrap()[0];
        let g_gpu = out.grads.clone().map(|g| read_vec(g).unwrap());
        let (mut since_gpu, mut theta) = (vec![0u64; dict], None);
        r.download(&mut since_gpu, &mut theta).unwrap();
        // The device caps the counters at the dead window (only "at least dead_tokens" matters).
        let capped: Vec<u64> = since_cpu.iter().map(|&c| c.min(1000)).collect();
        assert_eq!(since_gpu, capped, "dead counters (dead every {dead_every})");
        assert_eq!(Some(m_gpu), m_cpu, "smallest kept score");
        common::assert_close(&format!("loss (dead every {dead_every})"), &l_gpu, &want(&l_cpu), 1e-5);
        for (name, (g, c)) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(g_gpu.iter().zip(&g_cpu)) {
            common::assert_close(&format!("{name} (dead every {dead_every})"), g, &want(c), 1e-4);
        }
    }
}

#[test]
fn sae_step_on_wgpu_equals_the_host_route_on_flex() {
    // The SAE's WGSL route (unit score weights, squared loss, the encoder reading x − b_dec) and its
    // dense autodiff route on wgpu, against the host loops on flex.
    use crossdiff::crosscoder::train::{TrainConfig, step_loss};
    use crossdiff::crosscoder::{Kind, read_vec, tensor};
    let cpu = burn::tensor::Device::flex();
    let Some(gpu) = common::wgpu_device() else { return };
    let (d, dict, b) = (6, 48, 32);
    let mut rng = SplitMix64(9);
    let pairs: Vec<f32> = (0..b * 2 * d).map(|_| rng.next_f64() as f32 - 0.4).collect();
    let rows = crossdiff::crosscoder::SaeTarget::ChatMinusBase.rows(&pairs, d);
    for dead_every in [0usize, 4] {
        let before: Vec<u64> =
            (0..dict).map(|j| if dead_every > 0 && j % dead_every == 0 { 1000 } else { 0 }).collect();
        let run = |device: &burn::tensor::Device, cpu_kernels: bool| {
            let mut p = crossdiff::crosscoder::sae::init(d, dict, 3, device);
            p.b_dec = tensor((0..d).map(|i| 0.05 * i as f32).collect(), [1, d], device);
            let cfg = TrainConfig {
                k: 3,
                dead_tokens: 1000,
                cpu_kernels,
                target: Some(crossdiff::crosscoder::SaeTarget::ChatMinusBase),
                ..TrainConfig::defaults(Kind::Sae, dict)
            };
            let mut since = before.clone();
            let out = step_loss(&cfg, &p, tensor(rows.clone(), [b, d], device), 1, &mut since).unwrap();
            let loss = read_vec(out.loss.clone().detach()).unwrap();
            (loss, out.gradients().unwrap().map(|g| read_vec(g).unwrap()), since, out.min_kept())
        };
        let (l_cpu, g_cpu, s_cpu, m_cpu) = run(&cpu, true);
        for kernels in [true, false] {
            let (l_gpu, g_gpu, s_gpu, m_gpu) = run(&gpu, kernels);
            assert_eq!(s_cpu, s_gpu, "dead counters");
            assert_eq!(m_cpu, m_gpu, "smallest kept code");
            let want = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            common::assert_close(
                &format!("SAE loss (kernels {kernels}, dead every {dead_every})"),
                &l_gpu,
                &want(&l_cpu),
                1e-5,
            );
            for (name, (g, c)) in ["w_enc", "b_enc", "w_dec", "b_dec"].iter().zip(g_gpu.iter().zip(&g_cpu)) {
                common::assert_close(
                    &format!("SAE {name} (kernels {kernels}, dead every {dead_every})"),
                    g,
                    &want(c),
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn segment_rows_and_pick_dot_equal_their_references() {
    use burn::tensor::Int;
    use crossdiff::crosscoder::kernels::{pick_dot, pick_dot_reference, segment_rows, segment_rows_reference};
    let Some(gpu) = common::wgpu_device() else { return };
    let mut rng = SplitMix64(4);
    let (rows, m, w) = (37usize, 53usize, 19usize);
    // Segments of varied sizes, some empty; entries sorted by segment.
    let mut segment_of = Vec::new();
    for r in 0..rows {
        for _ in 0..(rng.next_u64() % 6) {
            segment_of.push(r as i64);
        }
    }
    let n = segment_of.len();
    let mut offsets = vec![0i64; rows + 1];
    for &r in &segment_of {
        offsets[r as usize + 1] += 1;
    }
    for r in 0..rows {
        offsets[r + 1] += offsets[r];
    }
    let index: Vec<i64> = (0..n).map(|_| (rng.next_u64() % m as u64) as i64).collect();
    let coef: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
    let table: Vec<f32> = (0..m * w).map(|_| rng.next_f64() as f32 - 0.5).collect();
    let other: Vec<f32> = (0..rows * w).map(|_| rng.next_f64() as f32 - 0.5).collect();
    let ints =
        |v: &Vec<i64>, d: &burn::tensor::Device| Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), d);
    let floats = |v: &Vec<f32>, shape: [usize; 2], d: &burn::tensor::Device| {
        Tensor::<2>::from_data(TensorData::new(v.clone(), shape), (d, DType::F32))
    };
    let cpu = burn::tensor::Device::flex();
    // Reference on flex, kernels on wgpu.
    let want = segment_rows_reference(
        &ints(&segment_of, &cpu),
        rows,
        &ints(&index, &cpu),
        &floats(&coef, [n, 1], &cpu).reshape([n]),
        &floats(&table, [m, w], &cpu),
    );
    let got = segment_rows(
        &ints(&offsets, &gpu),
        &ints(&index, &gpu),
        &floats(&coef, [n, 1], &gpu).reshape([n]),
        &floats(&table, [m, w], &gpu),
    );
    let want: Vec<f64> = want.try_into_vec_as::<f32>().unwrap().iter().map(|&x| x as f64).collect();
    common::assert_close("segment_rows", &got.try_into_vec_as::<f32>().unwrap(), &want, 1e-6);

    let want = pick_dot_reference(
        &ints(&index, &cpu),
        &ints(&segment_of, &cpu),
        &floats(&table, [m, w], &cpu),
        &floats(&other, [rows, w], &cpu),
    );
    let got = pick_dot(
        &ints(&index, &gpu),
        &ints(&segment_of, &gpu),
        &floats(&table, [m, w], &gpu),
        &floats(&other, [rows, w], &gpu),
    );
    let want: Vec<f64> = want.try_into_vec_as::<f32>().unwrap().iter().map(|&x| x as f64).collect();
    common::assert_close("pick_dot", &got.try_into_vec_as::<f32>().unwrap(), &want, 1e-6);
}

/// A training run on wgpu takes the device-resident route (BatchTopK crosscoders, SAEs and L1):
/// its loss curve, θ and dead counters follow the CPU's host route (AuxK active), it reads back
/// once per log step and nothing between, and a run stopped at its checkpoint resumes to the same
/// bytes.
#[test]
fn device_resident_training_follows_the_cpu_and_reads_back_only_on_log_steps() {
    use crossdiff::crosscoder::Kind;
    use crossdiff::crosscoder::sae::SaeTarget;
    use crossdiff::crosscoder::train::TrainConfig;
    let Some(gpu) = common::wgpu_device() else { return };
    let batch = 64;
    let base = |kind: Kind| TrainConfig {
        k: 3,
        lr: 3e-3,
        warmup_steps: 5,
        threshold_start: 4,
        steps: 24,
        // Latents unselected for 4 batches are dead: AuxK runs from step 4 on.
        dead_tokens: 4 * batch as u64,
        seed: 5,
        checkpoint_every: 12,
        log_every: 6,
        ..TrainConfig::defaults(kind, 96)
    };
    let sae = TrainConfig { target: Some(SaeTarget::ChatMinusBase), ..base(Kind::Sae) };
    // L1 at its own defaults (with the fast warm-up above it diverges on this data, on either device).
    let l1 = TrainConfig {
        steps: 24,
        dead_tokens: 4 * batch as u64,
        seed: 5,
        checkpoint_every: 12,
        log_every: 6,
        ..TrainConfig::defaults(Kind::L1, 96)
    };
    for cfg in [base(Kind::BatchTopK), sae, l1] {
        resident_run_follows_the_cpu(&gpu, &cfg, batch);
    }
}

fn resident_run_follows_the_cpu(
    gpu: &burn::tensor::Device,
    cfg: &crossdiff::crosscoder::train::TrainConfig,
    batch: usize,
) {
    use crossdiff::crosscoder::Kind;
    use crossdiff::crosscoder::train::TrainConfig;
    let d = 16;
    let kind = cfg.kind;
    let train = |device: &burn::tensor::Device, out: &std::path::Path, steps: u64| {
        let mut src = common::planted::Planted::new(d, [6, 3, 2], 11, batch, 1000);
        let mut reads = Vec::new();
        let cfg = TrainConfig { steps, ..cfg.clone() };
        let mut run = common::train_run(out.to_path_buf(), cfg, &mut src, d);
        run.device = device.clone();
        let trained = run
            .run(|p| reads.push((p.metrics.clone(), 0u64)), || true)
            .unwrap_or_else(|e| panic!("{kind:?} on {device:?}: {e:#}"));
        (trained, reads)
    };
    let dir = common::TempDir::new("resident-run");
    let (cpu, cpu_log) = train(&burn::tensor::Device::flex(), &dir.path().join("cpu"), 24);
    let (gpu_run, gpu_log) = train(gpu, &dir.path().join("gpu"), 24);
    assert_eq!(cpu_log.len(), 4);
    for ((c, _), (g, _)) in cpu_log.iter().zip(&gpu_log) {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1e-3);
        assert!(
            close(g.loss, c.loss) && close(g.recon, c.recon) && close(g.aux, c.aux) && close(g.fve_chat, c.fve_chat),
            "{kind:?} step {}: gpu {g:?} cpu {c:?}",
            c.step
        );
        assert!(close(g.l0, c.l0) && g.dead_frac == c.dead_frac, "{kind:?} step {}: gpu {g:?} cpu {c:?}", c.step);
    }
    if kind != Kind::L1 {
        assert!(cpu_log.iter().any(|(m, _)| m.aux > 0.0), "{kind:?}: AuxK ran: {cpu_log:?}");
        let (tc, tg) = (cpu.crosscoder.threshold.unwrap(), gpu_run.crosscoder.threshold.unwrap());
        assert!((tc - tg).abs() <= 1e-3 * tc.abs(), "{kind:?} θ: cpu {tc} gpu {tg}");
    }
    // (Readbacks between log steps are counted in tests/counters.rs: the counter is process-wide
    // and this binary's tests run side by side.)
    // Stopped at the checkpoint and resumed: the same crosscoder, byte for byte.
    let resumed = dir.path().join("resumed");
    train(gpu, &resumed, 12);
    train(gpu, &resumed, 24);
    let file = |p: &std::path::Path| {
        let run = crossdiff::run_dir::RunDir::new(p);
        let path = if kind == Kind::Sae { p.join(crossdiff::run_dir::RunDir::SAE) } else { run.crosscoder() };
        std::fs::read(path).unwrap()
    };
    assert!(
        file(&resumed) == file(&dir.path().join("gpu")),
        "{kind:?}: a resumed wgpu run ends where an uninterrupted one does"
    );
}
