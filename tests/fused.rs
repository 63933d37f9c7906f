//! The CPU forward's host loops (src/model/fused.rs) against the tensor ops they replace and f64
//! formulas, and packed rows (src/model/packed.rs) against each document run alone.

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::{assert_close, fixture};
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
    // Clamped outside [−87, 88.5]: tiny and huge but finite, never NaN.
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
fn gated_activation_host_loop_matches_the_tensor_ops_and_the_formula() {
    let device = Device::flex();
    // 37 columns: not a multiple of any vector width; 300 rows: several tasks.
    let (rows, inter) = (300, 37);
    let gu = gate_up(rows, inter, &device);
    let host = values(gu.clone());
    for act in [Activation::GeluTanh, Activation::Silu] {
        let got = values(gated_activation(gu.clone(), inter, act));
        let reference = as_f64(&values(gated_activation_reference(gu.clone(), inter, act)));
        assert_close(&format!("{act:?} vs the tensor ops"), &got, &reference, 1e-6);
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
    let x = Tensor::<2>::random([5, 24], Distribution::Normal(0.0, 3.0), &device);
    // Three vocabulary blocks of odd sizes, as a large embedding is stored.
    let blocks: Vec<Tensor<2>> =
        [10, 7, 13].iter().map(|&n| Tensor::random([n, 24], Distribution::Normal(0.0, 1.0), &device)).collect();
    for cap in [Some(15.0), None] {
        let got = values(logits(x.clone(), &blocks, cap));
        let want = as_f64(&values(logits_reference(x.clone(), &blocks, cap)));
        assert_eq!(got.len(), 5 * 30);
        assert_close(&format!("logits, cap {cap:?}"), &got, &want, 1e-5);
    }
    // The cap bounds the logits: |softcap(z)| < c even where |z| ≫ c.
    let big = x.mul_scalar(100.0);
    assert!(values(logits(big, &blocks, Some(15.0))).iter().all(|z| z.abs() <= 15.0));
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

#[test]
fn packed_rows_equal_each_document_run_alone() {
    let model = Model::load(fixture("base"), &Device::flex(), LoadOptions::default()).unwrap();
    let g = &model.lm;
    let (d, vocab) = (g.config.hidden_size, g.config.vocab_size as u32);
    // Documents longer than the fixture's sliding window (6) and shorter, packed into rows of 12
    // and one row left with padding at its end.
    let lengths = [9usize, 3, 5, 2, 7, 1, 12, 4];
    let docs: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(j, &n)| (0..n as u32).map(|i| (7 + 31 * j as u32 + 13 * i) % vocab).collect())
        .collect();
    let rows = pack_rows(&lengths, 12);
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
                assert_close(&format!("layer {layer}, document {i} in row {r}"), got, &as_f64(&alone), 1e-5);
                at += lengths[i];
            }
        }
    }
    // Lengths that do not add up are refused, not run.
    assert!(g.forward_to_packed(g.batch_ids(&seqs).unwrap(), &row_docs[1..], last).is_err());
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
