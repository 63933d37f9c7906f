//! The forward's element-wise passes fused into one host loop each on the CPU (burn flex), where a
//! chain of tensor ops would read and write a fresh `[tokens, 9216]` buffer per op; every other
//! device runs the tensor ops, which are also the reference the tests compare the loops with.
//!
//! The MLP's `act(gate) · up` (2 × 9216 values per token at the 2B widths; as tensor ops, nine
//! passes over a fresh buffer each) and the unembedding (256k logits per token: per vocabulary
//! block a product, then a concatenation and a three-pass soft-cap) are the two that matter. A
//! decoding step's few rows take [`crate::model::few_rows`] instead.

use burn::tensor::activation::{gelu_approximate, silu};
use burn::tensor::{DType, Device, Tensor};

use crate::host_tensor::{HostValues, Simd, give_vec};
use crate::model::few_rows::{DOT_ROWS, logits_by_dots};

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Gemma: `gelu_pytorch_tanh`.
    GeluTanh,
    /// Llama, Qwen: SwiGLU's `silu`.
    Silu,
}

/// `act(gate) · up` from the fused gate/up product `gu` (`[rows, 2·inter]`: gate columns, then up
/// columns) → `[rows, inter]`: one host pass on flex, the tensor ops elsewhere and under autodiff.
pub fn gated_activation(gu: Tensor<2>, inter: usize, act: Activation) -> Tensor<2> {
    let device = gu.device();
    // Not under autodiff (the demo models train through this forward): a host loop records no tape.
    if crate::backend::is_flex(&device)
        && !device.is_autodiff()
        && let Ok(values) = HostValues::of(&gu)
    {
        let rows = gu.dims()[0];
        return gated_activation_host(&values, rows, inter, act, &device);
    }
    gated_activation_reference(gu, inter, act)
}

/// The tensor-op route (and the reference): burn's `gelu_approximate` / `silu` on the gate columns
/// times the up columns.
pub fn gated_activation_reference(gu: Tensor<2>, inter: usize, act: Activation) -> Tensor<2> {
    let gate = gu.clone().narrow(1, 0, inter);
    let gate = match act {
        Activation::GeluTanh => gelu_approximate(gate),
        Activation::Silu => silu(gate),
    };
    gate * gu.narrow(1, inter, inter)
}

/// The host pass over `gu`'s values (`[rows, 2·inter]`, row-major), rows split over rayon's threads.
///
/// The tensor route's f32 operations in its order, with two differences of a few ulp: x³ as
/// `x·x·x` (not `powf`) and [`tanh`] / flex's σ through [`exp`] (not libm's), so that the loop
/// vectorises. The tensor route reads and writes a `[rows, inter]` buffer per op (nine for
/// GELU-tanh · up) and calls libm per element; this loop reads `gu` once and writes once.
pub fn gated_activation_host(gu: &[f32], rows: usize, inter: usize, act: Activation, device: &Device) -> Tensor<2> {
    use rayon::prelude::*;
    // Rows per task: enough work per task (~0.3M values) that scheduling is noise.
    let per_task = (1 << 18) / inter.max(1) + 1;
    let simd = Simd::detect();
    let mut out = vec![0.0f32; rows * inter];
    out.par_chunks_mut(per_task * inter).enumerate().for_each(|(task, chunk)| {
        for (r, dst) in chunk.chunks_exact_mut(inter).enumerate() {
            let row = (task * per_task + r) * 2 * inter;
            let (gate, up) = gu[row..row + 2 * inter].split_at(inter);
            gated_row(simd, act, gate, up, dst);
        }
    });
    give_vec(out, [rows, inter], device)
}

fn gated_row(simd: Simd, act: Activation, gate: &[f32], up: &[f32], dst: &mut [f32]) {
    match simd {
        // SAFETY: `Simd::detect` saw the features these functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { gated_row_avx512(act, gate, up, dst) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { gated_row_avx2(act, gate, up, dst) },
        Simd::Portable => gated_row_portable(act, gate, up, dst),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gated_row_avx512(act: Activation, gate: &[f32], up: &[f32], dst: &mut [f32]) {
    gated_row_portable(act, gate, up, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gated_row_avx2(act: Activation, gate: &[f32], up: &[f32], dst: &mut [f32]) {
    gated_row_portable(act, gate, up, dst)
}

/// burn's `gelu_approximate` (`(x·(tanh(√(2/π)·(x + x³·0.044715)) + 1))·0.5`) and `silu` (`x·σ(x)`,
/// flex's two-branch σ) on the gate, times up, in the tensor route's order of f32 operations.
#[inline(always)]
fn gated_row_portable(act: Activation, gate: &[f32], up: &[f32], dst: &mut [f32]) {
    const SQRT_2_OVER_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    let (c, k) = (0.044715f64 as f32, SQRT_2_OVER_PI as f32);
    match act {
        Activation::GeluTanh => {
            for ((o, &x), &u) in dst.iter_mut().zip(gate).zip(up) {
                let inner = (x + x * x * x * c) * k;
                *o = ((x * (tanh(inner) + 1.0)) * 0.5) * u;
            }
        }
        Activation::Silu => {
            for ((o, &x), &u) in dst.iter_mut().zip(gate).zip(up) {
                let (e_neg, e_pos) = (exp(-x), exp(x));
                let sigmoid = if x >= 0.0 { 1.0 / (1.0 + e_neg) } else { e_pos / (1.0 + e_pos) };
                *o = (x * sigmoid) * u;
            }
        }
    }
}

/// `e^x` in f32 to ~1 ulp (Cephes' `expf`), branch-free so that the loops using it (σ, [`tanh`])
/// vectorise: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-7 series, 2^n put into the
/// exponent bits. x is clamped to [−87, 88] so 2^n stays a normal float (n ≤ 127): below, the result is ~1.6e−38 instead of a
/// subnormal or 0; above, ~1.7e38 instead of ∞ — both saturate the sigmoid above the same way.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in the vector unit.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `softcap(x · Eᵀ)` with `E` in vocabulary blocks (`[n_i, hidden]` each, concatenated in order):
/// `[rows, vocab]` logits. On flex with f32 blocks each block's product is written by gemm straight
/// into its columns of one buffer and the cap `c·tanh(z/c)` is one pass over it; elsewhere the tensor
/// ops (also the reference).
pub fn logits(x: Tensor<2>, blocks: &[Tensor<2>], cap: Option<f64>) -> Tensor<2> {
    let device = x.device();
    let all_f32 = blocks.iter().all(|b| b.dtype() == DType::F32);
    if crate::backend::is_flex(&device) && !device.is_autodiff() && all_f32 {
        let host: Result<Vec<HostValues>, _> = blocks.iter().map(HostValues::of).collect();
        if let (Ok(xv), Ok(host)) = (HostValues::of(&x), host) {
            let [rows, hidden] = x.dims();
            let slices: Vec<(&[f32], usize)> = host.iter().zip(blocks).map(|(v, b)| (&v[..], b.dims()[0])).collect();
            return logits_host(&xv, rows, hidden, &slices, cap.map(|c| c as f32), &device);
        }
    }
    logits_reference(x, blocks, cap)
}

/// The tensor-op route: per block `x · Bᵀ` (in f16 when the block is), concatenated, soft-capped.
pub fn logits_reference(x: Tensor<2>, blocks: &[Tensor<2>], cap: Option<f64>) -> Tensor<2> {
    use burn::tensor::FloatDType;
    let unembed = |block: &Tensor<2>| {
        if block.dtype() == DType::F16 {
            x.clone().cast(FloatDType::F16).matmul(block.clone().transpose()).cast(FloatDType::F32)
        } else {
            x.clone().matmul(block.clone().transpose())
        }
    };
    let logits = match blocks {
        [one] => unembed(one),
        blocks => Tensor::cat(blocks.iter().map(unembed).collect(), 1),
    };
    match cap {
        Some(c) => soft_cap(logits, c),
        None => logits,
    }
}

/// `c · tanh(x / c)` as tensor ops (Gemma's attention and final soft-caps).
pub fn soft_cap<const D: usize>(x: Tensor<D>, cap: f64) -> Tensor<D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
}

/// The host route of [`logits`] on plain slices: `x` is `[rows, hidden]`, each block `(values, n_i)`
/// is `[n_i, hidden]`.
///
/// Panics when a shape does not match its values (the caller passes tensors' own dims).
pub fn logits_host(
    x: &[f32],
    rows: usize,
    hidden: usize,
    blocks: &[(&[f32], usize)],
    cap: Option<f32>,
    device: &Device,
) -> Tensor<2> {
    use rayon::prelude::*;
    let vocab: usize = blocks.iter().map(|(_, n)| n).sum();
    assert_eq!(Some(x.len()), rows.checked_mul(hidden), "logits_host: x is not [rows, hidden]");
    let len = rows.checked_mul(vocab).expect("logits_host: rows × vocab overflows");
    if len == 0 || hidden == 0 {
        return give_vec(vec![0.0; len], [rows, vocab], device);
    }
    for &(block, n) in blocks {
        assert_eq!(Some(block.len()), n.checked_mul(hidden), "logits_host: a block is not [n, hidden]");
    }
    if rows <= DOT_ROWS {
        let mut out = logits_by_dots(x, rows, hidden, blocks, vocab);
        if let Some(c) = cap {
            soft_cap_in_place(Simd::detect(), &mut out, c);
        }
        return give_vec(out, [rows, vocab], device);
    }
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let mut col = 0;
    for &(block, n) in blocks {
        if n == 0 {
            continue;
        }
        // SAFETY: dst is `out`'s [rows, vocab] allocation at column `col` (row stride vocab), the
        // block's n columns fit (col + n ≤ vocab); lhs is x as [rows, hidden] (row stride hidden),
        // rhs is the block read as its transpose [hidden, n] (element (k, j) at j·hidden + k). With
        // `read_dst` false gemm only writes dst (checked in gemm-common 0.19 for the x86 kernels
        // burn-flex builds; its Apple AMX kernel, off unless burn-flex's `apple-amx` feature is on,
        // copies dst for partial tiles), and the blocks together write every element.
        unsafe {
            gemm::gemm(
                rows,
                n,
                hidden,
                out.as_mut_ptr().add(col),
                1,
                vocab as isize,
                false,
                x.as_ptr(),
                1,
                hidden as isize,
                block.as_ptr(),
                hidden as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(0),
            );
        }
        col += n;
    }
    // SAFETY: every element was written above (rows × Σ n_i = rows × vocab).
    unsafe { out.set_len(len) };
    if let Some(c) = cap {
        let simd = Simd::detect();
        out.par_chunks_mut(1 << 16).for_each(|chunk| soft_cap_in_place(simd, chunk, c));
    }
    give_vec(out, [rows, vocab], device)
}

fn soft_cap_in_place(simd: Simd, v: &mut [f32], cap: f32) {
    match simd {
        // SAFETY: `Simd::detect` saw the features these functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { soft_cap_avx512(v, cap) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { soft_cap_avx2(v, cap) },
        Simd::Portable => soft_cap_portable(v, cap),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn soft_cap_avx512(v: &mut [f32], cap: f32) {
    soft_cap_portable(v, cap)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn soft_cap_avx2(v: &mut [f32], cap: f32) {
    soft_cap_portable(v, cap)
}

#[inline(always)]
fn soft_cap_portable(v: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for z in v.iter_mut() {
        *z = cap * tanh(*z * inv);
    }
}

/// `tanh` in f32 to a few ulp, branch-free so that it vectorises: an odd series below |y| = 0.25
/// (where `1 − e^{−2|y|}` would cancel), `(1 − t)/(1 + t)` with `t = e^{−2|y|}` above.
#[inline(always)]
pub fn tanh(y: f32) -> f32 {
    let a = y.abs();
    let a2 = a * a;
    // tanh a = a − a³/3 + 2a⁵/15 − 17a⁷/315 + 62a⁹/2835 − …; at a = 0.25 the next term is ~9e−9·a.
    let series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))));
    let t = exp(-2.0 * a);
    let big = (1.0 - t) / (1.0 + t);
    let r = if a < 0.25 { series } else { big };
    r.copysign(y)
}
