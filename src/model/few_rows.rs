//! A decoding step's host loops on the CPU (burn flex): with one to four rows, every product is
//! memory-bound — each weight is read once per step — and gemm's repacking of the weight for its
//! kernel cost more than the arithmetic. So the projections stream each weight once
//! ([`few_rows_matmul`]) and the logits are dot products over the vocabulary rows
//! (`logits_by_dots`, called by [`crate::model::fused::logits`]). Every other case, and every
//! other device, runs the tensor ops (the tests' reference).

use burn::tensor::{DType, Tensor};

use crate::host_tensor::{HostValues, Simd, give_vec};

/// `x · w` for a few rows of `x` (`[rows, k]`, rows ≤ 4: a decoding step) and an f32 `[k, n]` weight
/// on flex, not under autodiff: one sequential pass over `w` (gemm repacks the whole weight for so
/// few rows). Threads take 128-row slices of `w` and sum their rows in order; the slices' sums are
/// then added in order, so the result does not depend on the thread count. None where this does
/// not apply: the caller multiplies with tensor ops.
pub fn few_rows_matmul(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    use rayon::prelude::*;
    let device = x.device();
    let ([rows, k], [k_w, n]) = (x.dims(), w.dims());
    let applies = rows <= DOT_ROWS
        && k == k_w
        && rows * k * n > 0
        && crate::backend::is_flex(&device)
        && !device.is_autodiff()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32;
    if !applies {
        return None;
    }
    let (xv, wv) = (HostValues::of(x).ok()?, HostValues::of(w).ok()?);
    let simd = Simd::detect();
    let starts: Vec<usize> = (0..k).step_by(AXPY_ROWS).collect();
    let parts: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&i0| {
            let mut acc = vec![0.0f32; rows * n];
            axpys(simd, &xv, k, &wv[i0 * n..(i0 + AXPY_ROWS).min(k) * n], i0, &mut acc);
            acc
        })
        .collect();
    let mut parts = parts.into_iter();
    let mut out = parts.next()?;
    for part in parts {
        add_in_place(&mut out, &part);
    }
    Some(give_vec(out, [rows, n], &device))
}

/// Weight rows per task of [`few_rows_matmul`]: a 2304-deep projection makes 18 tasks, so two
/// threads stay balanced (256 rows made 9; decoding timed 6.5–6.8 tokens/s against 6.4–6.5, within
/// this machine's noise).
const AXPY_ROWS: usize = 128;

fn axpys(simd: Simd, x: &[f32], k: usize, w: &[f32], i0: usize, acc: &mut [f32]) {
    match simd {
        // SAFETY: `Simd::detect` saw the features these functions are compiled for.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { axpys_avx512(x, k, w, i0, acc) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { axpys_avx2(x, k, w, i0, acc) },
        Simd::Portable => axpys_portable(x, k, w, i0, acc),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn axpys_avx512(x: &[f32], k: usize, w: &[f32], i0: usize, acc: &mut [f32]) {
    axpys_portable(x, k, w, i0, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn axpys_avx2(x: &[f32], k: usize, w: &[f32], i0: usize, acc: &mut [f32]) {
    axpys_portable(x, k, w, i0, acc)
}

/// `acc[r] += x[r][i0 + i] · w[i]` for the weight rows `w` in order: `acc` is `[rows, n]`.
#[inline(always)]
fn axpys_portable(x: &[f32], k: usize, w: &[f32], i0: usize, acc: &mut [f32]) {
    let rows = x.len() / k;
    let n = acc.len() / rows;
    for (i, row) in w.chunks_exact(n).enumerate() {
        for (r, out) in acc.chunks_exact_mut(n).enumerate() {
            let a = x[r * k + i0 + i];
            for (o, v) in out.iter_mut().zip(row) {
                *o += a * v;
            }
        }
    }
}

/// `out += part` (a few thousand values per call: no dispatch).
fn add_in_place(out: &mut [f32], part: &[f32]) {
    out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
}

/// Up to this many rows (a decoding step's tokens) the logits are one streaming pass of dot
/// products over the vocabulary: gemm repacks each block's transpose for its kernel, which for a
/// handful of rows costs more than the arithmetic — a 2B model's step read and rewrote the 2.36 GB
/// unembedding (decoding ran at half transformers' speed). The order of the sums differs from
/// gemm's, so a prompt's last-token logits from a ≥ 5-row prefill and from a decode step agree to
/// rounding, not bit for bit.
pub(crate) const DOT_ROWS: usize = 4;
/// Vocabulary rows per task (2.4 MB of a 2304-wide block).
const DOT_CHUNK: usize = 256;

/// `[rows, vocab]` logits as `rows` dot products per vocabulary row, each block read once.
pub(crate) fn logits_by_dots(
    x: &[f32],
    rows: usize,
    hidden: usize,
    blocks: &[(&[f32], usize)],
    vocab: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let simd = Simd::detect();
    // Vocabulary-major while computing, so each task owns whole output rows; rows-major after.
    let mut by_word = vec![0.0f32; vocab * rows];
    let mut at = 0;
    for &(block, n) in blocks {
        by_word[at * rows..(at + n) * rows]
            .par_chunks_mut(DOT_CHUNK * rows)
            .zip(block.par_chunks(DOT_CHUNK * hidden))
            .for_each(|(out, words)| dots(simd, x, hidden, words, out));
        at += n;
    }
    let mut out = vec![0.0f32; rows * vocab];
    for (j, word) in by_word.chunks_exact(rows).enumerate() {
        for (r, &v) in word.iter().enumerate() {
            out[r * vocab + j] = v;
        }
    }
    out
}

/// `out[j·rows + r] = x_r · words_j` for the `[m, hidden]` rows `words` and `[rows, hidden]` rows `x`.
fn dots(simd: Simd, x: &[f32], hidden: usize, words: &[f32], out: &mut [f32]) {
    let rows = x.len() / hidden;
    for (word, o) in words.chunks_exact(hidden).zip(out.chunks_exact_mut(rows)) {
        for (r, o) in o.iter_mut().enumerate() {
            *o = dot(simd, &x[r * hidden..(r + 1) * hidden], word);
        }
    }
}

/// `a · b` at the given level, which [`Simd::detect`] reported (or [`dot_at`] checked).
#[inline(always)]
fn dot(simd: Simd, a: &[f32], b: &[f32]) -> f32 {
    match simd {
        // SAFETY: the level's features are present (above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { dot_avx2(a, b) },
        Simd::Portable => dot_portable(a, b),
    }
}

/// The decoding logits' dot product at a chosen SIMD level; None where this CPU lacks it. The
/// tests compare the levels bit for bit.
pub fn dot_at(simd: Simd, a: &[f32], b: &[f32]) -> Option<f32> {
    let present = match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
        Simd::Portable => true,
    };
    present.then(|| dot(simd, a, b))
}

/// A dot product's order, the same on every SIMD level (so every CPU gets the same logits): 64
/// partial sums, element i into sum i mod 64 (four AVX-512 or eight AVX2 registers: independent
/// adds, so the loop streams memory instead of waiting on one add), multiply then add (no fused
/// multiply-add), a pairwise fold of the 64, then the tail past the last full 64 in order.
const LANES: usize = 64;

fn fold(mut acc: [f32; LANES], a: &[f32], b: &[f32], from: usize) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + a[from..].iter().zip(&b[from..]).map(|(p, q)| p * q).sum::<f32>()
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (p, q) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += p[l] * q[l];
        }
    }
    fold(acc, a, b, a.len().min(b.len()) / LANES * LANES)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let full = a.len().min(b.len()) / LANES * LANES;
    let mut acc = [_mm512_setzero_ps(); 4];
    for i in (0..full).step_by(LANES) {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16r + 16 ≤ full ≤ both lengths.
            let (p, q) =
                unsafe { (_mm512_loadu_ps(a.as_ptr().add(i + 16 * r)), _mm512_loadu_ps(b.as_ptr().add(i + 16 * r))) };
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(p, q));
        }
    }
    let mut lanes = [0.0f32; LANES];
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: 16 floats at 16r within the 64.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * r), *acc) };
    }
    fold(lanes, a, b, full)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let full = a.len().min(b.len()) / LANES * LANES;
    let mut acc = [_mm256_setzero_ps(); 8];
    for i in (0..full).step_by(LANES) {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8r + 8 ≤ full ≤ both lengths.
            let (p, q) =
                unsafe { (_mm256_loadu_ps(a.as_ptr().add(i + 8 * r)), _mm256_loadu_ps(b.as_ptr().add(i + 8 * r))) };
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(p, q));
        }
    }
    let mut lanes = [0.0f32; LANES];
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: 8 floats at 8r within the 64.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * r), *acc) };
    }
    fold(lanes, a, b, full)
}
