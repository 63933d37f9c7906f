//! The CPU forward's host loops (src/model/fused.rs) against the tensor ops they replace and f64
//! formulas, and packed rows (src/model/packed.rs) against each document run alone.

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::{assert_close, family_fixture, fixture};
use crossdiff::model::few_rows::{dot_at, few_rows_matmul};
use crossdiff::model::fused::{
    Activation, exp, gated_activation, gated_activation_reference, logits, logits_reference, tanh,
};
use crossdiff::model::packed::pack_rows;
use crossdiff::{LoadOptions, Model};

fn values<const N: usize>(t: Tensor<N>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn exp_and_tanh_match_f64_to_a_few_ulp() {
    let mut worst_exp = 0.0f64;
    for i in 0..=175_000 {
        let x = -87.0 + i as f32 * 0.001;
        if x > 88.0 {
            break;
        }
        let want = (x as f64).exp();
        worst_exp = worst_exp.max(((exp(x) as f64 - want) / want).abs());
    }
    assert!(worst_exp < 4e-7, "exp: worst relative error {worst_exp:e}");
    // Clamped outside [−87, 88]: tiny and huge but finite, never NaN.
    assert!(exp(-1e4) > 0.0 && exp(-1e4) < 2e-38 && exp(1e4).is_finite() && exp(1e4) > 1e38);
    let mut worst_tanh = 0.0f64;
    for i in -40_000..=40_000 {
        let y = i as f32 * 5e-4;
        let want = (y as f64).tanh();
        let err = (tanh(y) as f64 - want).abs() / want.abs().max(1e-30);
        worst_tanh = worst_tanh.max(if y == 0.0 { (tanh(y) as f64).abs() } else { err });
    }
    assert!(worst_tanh < 1e-6, "tanh: worst relative error {worst_tanh:e}");
    for y in [1e-20f32, 1e-8, 0.249, 0.25, 0.251, 3.0, 9.5, 50.0, 1e30] {
        assert_eq!(tanh(-y), -tanh(y), "tanh is odd at {y}");
        assert!(((tanh(y) as f64) - (y as f64).tanh()).abs() <= 1e-6 * (y as f64).tanh(), "tanh({y})");
    }
}

/// Random `[rows, 2·inter]` gate/up values, the gates spread to ±12 (both saturated ends).
fn gate_up(rows: usize, inter: usize, device: &Device) -> Tensor<2> {
    let gate = Tensor::<2>::random([rows, inter], Distribution::Uniform(-12.0, 12.0), device);
    let up = Tensor::<2>::random([rows, inter], Distribution::Normal(0.0, 1.0), device);
    Tensor::cat(vec![gate, up], 1)
}

#[test]
fn gated_activation_host_loop_matches_the_tensor_ops_to_a_few_ulp_and_the_formula() {
    let device = Device::flex();
    // 4099 columns: not a multiple of any vector width, 64 rows per task; 300 rows: five tasks.
    let (rows, inter) = (300, 4099);
    let gu = gate_up(rows, inter, &device);
    let host = values(gu.clone());
    for act in [Activation::GeluTanh, Activation::Silu] {
        let got = values(gated_activation(gu.clone(), inter, act));
        let reference = values(gated_activation_reference(gu.clone(), inter, act));
        // The same f32 operations in the same order but x³ and tanh/exp: a few ulp of each factor
        // (of x·u where 1 + tanh cancels in GELU's negative tail).
        for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
            let (x, u) = (host[(i / inter) * 2 * inter + i % inter], host[(i / inter) * 2 * inter + inter + i % inter]);
            let scale = b.abs() + (x * u).abs();
            assert!((a - b).abs() <= 8.0 * f32::EPSILON * scale + 1e-37, "{act:?} at {i}: {a} vs {b} (x {x}, u {u})");
        }
        let formula: Vec<f64> = (0..rows * inter)
            .map(|i| {
                let (r, j) = (i / inter, i % inter);
                let (x, u) = (host[r * 2 * inter + j] as f64, host[r * 2 * inter + inter + j] as f64);
                let a = match act {
                    Activation::GeluTanh => {
                        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
                    }
                    Activation::Silu => x / (1.0 + (-x).exp()),
                };
                a * u
            })
            .collect();
        assert_close(&format!("{act:?} vs f64"), &got, &formula, 1e-6);
    }
}

#[test]
fn unembedding_host_route_matches_the_tensor_ops() {
    let device = Device::flex();
    // One row (a decoding step), a few, and a batch; widths past gemm's depth blocking; blocks of
    // odd sizes, as a large embedding is stored.
    // Up to 4 rows take the dot-product route (vocabulary tasks of 256 rows: 300 spans two).
    for (rows, hidden, sizes) in
        [(1, 24, vec![10, 7, 13]), (3, 1100, vec![300, 129, 257]), (5, 24, vec![30]), (37, 1100, vec![300, 129, 257])]
    {
        let x = Tensor::<2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device);
        let blocks: Vec<Tensor<2>> =
            sizes.iter().map(|&n| Tensor::random([n, hidden], Distribution::Normal(0.0, 1.0), &device)).collect();
        let vocab: usize = sizes.iter().sum();
        // Scaled so the cap's both regimes occur: |z/c| below 0.25 (the series) and saturated.
        for (scale, cap) in [(1.0, Some(15.0)), (40.0 / (hidden as f64).sqrt(), Some(15.0)), (1.0, None)] {
            let xs = x.clone().mul_scalar(scale);
            let got = values(logits(xs.clone(), &blocks, cap));
            let want = as_f64(&values(logits_reference(xs, &blocks, cap)));
            assert_eq!(got.len(), rows * vocab);
            assert_close(&format!("{rows}×{hidden}, blocks {sizes:?}, ×{scale:.2}, cap {cap:?}"), &got, &want, 1e-5);
        }
    }
}

/// A decoding step's projections: a few rows times a weight in one pass, against burn's matmul;
/// depths that leave a partial slice of weight rows (128 per task) and span several slices.
#[test]
fn few_rows_matmul_matches_the_tensor_op() {
    let device = Device::flex();
    for (rows, k, n) in [(1, 24, 10), (1, 1100, 2500), (3, 1100, 2500), (4, 9, 1024)] {
        let x = Tensor::<2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let got = values(few_rows_matmul(&x, &w).expect("applies to a few f32 rows on flex"));
        let want = as_f64(&values(x.matmul(w)));
        assert_close(&format!("{rows}×{k} · {k}×{n}"), &got, &want, 1e-5);
    }
    // More rows, or under autodiff: the tensor ops run instead.
    let w = Tensor::<2>::random([8, 8], Distribution::Default, &device);
    assert!(few_rows_matmul(&Tensor::<2>::random([5, 8], Distribution::Default, &device), &w).is_none());
    let ad = device.autodiff();
    let w_ad = Tensor::<2>::random([8, 8], Distribution::Default, &ad);
    assert!(few_rows_matmul(&Tensor::<2>::random([1, 8], Distribution::Default, &ad), &w_ad).is_none());
}

/// The decoding logits' dot product sums in one order on every SIMD level: AVX-512, AVX2 and the
/// portable loop give the same bits (lengths around the 64 partial sums; values within a factor of
/// 100 of each other, so every step's rounding reaches the sum: a fused multiply-add fails this).
#[test]
fn dot_products_are_the_same_bits_on_every_simd_level() {
    use crossdiff::host_tensor::Simd;
    let mut state = 11u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        u * 10f32.powi((state >> 20) as i32 % 3 - 1)
    };
    for len in [0usize, 1, 63, 64, 65, 1100, 4103] {
        let (a, b): (Vec<f32>, Vec<f32>) = (0..len).map(|_| (next(), next())).unzip();
        let portable = dot_at(Simd::Portable, &a, &b).unwrap();
        let exact: f64 = a.iter().zip(&b).map(|(p, q)| *p as f64 * *q as f64).sum();
        let scale: f64 = a.iter().zip(&b).map(|(p, q)| (*p as f64 * *q as f64).abs()).sum();
        assert!((portable as f64 - exact).abs() <= 1e-5 * scale.max(1e-30), "length {len}: {portable} vs {exact}");
        #[cfg(target_arch = "x86_64")]
        for level in [Simd::Avx512, Simd::Avx2] {
            if let Some(v) = dot_at(level, &a, &b) {
                assert_eq!(v.to_bits(), portable.to_bits(), "length {len}, {level:?}: {v} vs portable {portable}");
            }
        }
    }
}

#[test]
fn packing_places_every_document_once_in_rows_that_fit() {
    let mut state = 7u64;
    let lengths: Vec<usize> = (0..500)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            1 + (state >> 33) as usize % 128
        })
        .collect();
    let rows = pack_rows(&lengths, 128);
    let mut seen = vec![0; lengths.len()];
    for row in &rows {
        assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 128);
        for &i in row {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every document exactly once");
    // Best-fit decreasing wastes little: within 5% of the lower bound Σ lengths / 128.
    let bound = lengths.iter().sum::<usize>().div_ceil(128);
    assert!(rows.len() as f64 <= bound as f64 * 1.05, "{} rows for a bound of {bound}", rows.len());
    assert_eq!(rows, pack_rows(&lengths, 128), "deterministic");
    // A document longer than the rows gets one alone; an empty list packs to nothing.
    assert_eq!(pack_rows(&[5, 200, 5], 128), vec![vec![1], vec![0, 2]]);
    assert!(pack_rows(&[], 128).is_empty());
}

/// Packs documents of `lengths` into rows of `row_len` and checks every document's block outputs
/// against the document run alone.
fn check_packed_rows(model: &Model, lengths: &[usize], row_len: usize) {
    let g = &model.lm;
    let (d, vocab) = (g.config.hidden_size, g.config.vocab_size as u32);
    let docs: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(j, &n)| (0..n as u32).map(|i| (7 + 31 * j as u32 + 13 * i) % vocab).collect())
        .collect();
    let rows = pack_rows(lengths, row_len);
    assert!(rows.iter().any(|r| r.len() > 1), "the case packs");
    let seqs: Vec<Vec<u32>> = rows.iter().map(|r| r.iter().flat_map(|&i| docs[i].clone()).collect()).collect();
    let row_docs: Vec<Vec<usize>> = rows.iter().map(|r| r.iter().map(|&i| lengths[i]).collect()).collect();
    let last = g.num_layers() - 1;
    for layer in [0, last] {
        let packed = values(g.forward_to_packed(g.batch_ids(&seqs).unwrap(), &row_docs, layer).unwrap());
        let t = seqs.iter().map(Vec::len).max().unwrap();
        for (r, row) in rows.iter().enumerate() {
            let mut at = 0;
            for &i in row {
                let alone = values(g.forward_to(g.batch_ids(std::slice::from_ref(&docs[i])).unwrap(), layer));
                let got = &packed[(r * t + at) * d..(r * t + at + lengths[i]) * d];
                let what = format!("{:?} layer {layer}, document {i} at {at} of row {r}", g.config.family);
                assert_close(&what, got, &as_f64(&alone), 1e-5);
                at += lengths[i];
            }
        }
    }
    // Lengths that do not add up are refused, not run.
    assert!(g.forward_to_packed(g.batch_ids(&seqs).unwrap(), &row_docs[1..], last).is_err());
}

#[test]
fn packed_rows_equal_each_document_run_alone() {
    // Gemma 2's fixture has a sliding window of 6 on even layers: documents longer than it, also
    // second in their row (7 after 9, 7 after 8 in rows of 16), and short ones; one row keeps padding.
    let lengths = [9usize, 3, 5, 2, 7, 1, 12, 4, 8, 7];
    let gemma2 = Model::load(fixture("base"), &Device::flex(), LoadOptions::default()).unwrap();
    check_packed_rows(&gemma2, &lengths, 16);
    // Gemma 3 (two RoPE tables, sliding window 6, q/k norms), Llama, Qwen 2 and 3.
    for family in ["gemma3", "llama", "qwen2", "qwen3"] {
        let model = Model::load(family_fixture(family, "base"), &Device::flex(), LoadOptions::default()).unwrap();
        check_packed_rows(&model, &lengths, 16);
    }
}

/// The masks are built on the device from per-token positions and document numbers: the same
/// check through WGSL (lavapipe in CI), Gemma 2 for its sliding window and Llama for plain causal.
#[test]
fn packed_rows_equal_each_document_run_alone_on_wgpu() {
    let Some(device) = common::wgpu_device() else { return };
    let lengths = [9usize, 3, 5, 2, 7, 1, 12, 4, 8, 7];
    let gemma2 = Model::load(fixture("base"), &device, LoadOptions::default()).unwrap();
    check_packed_rows(&gemma2, &lengths, 16);
    let llama = Model::load(family_fixture("llama", "base"), &device, LoadOptions::default()).unwrap();
    check_packed_rows(&llama, &lengths, 16);
}

#[test]
fn under_autodiff_the_tensor_ops_run_and_gradients_flow() {
    let device = Device::flex().autodiff();
    let gu = gate_up(4, 5, &device).require_grad();
    let blocks = vec![Tensor::<2>::random([6, 3], Distribution::Default, &device).require_grad()];
    let x = Tensor::<2>::random([4, 3], Distribution::Default, &device).require_grad();
    let loss =
        gated_activation(gu.clone(), 5, Activation::GeluTanh).sum() + logits(x.clone(), &blocks, Some(2.0)).sum();
    let grads = loss.backward();
    for (name, t) in [("gate/up", &gu), ("embedding", &blocks[0]), ("x", &x)] {
        let g = values(t.grad(&grads).unwrap_or_else(|| panic!("no gradient for {name}")));
        assert!(g.iter().any(|v| *v != 0.0), "{name}: zero gradient");
    }
}
