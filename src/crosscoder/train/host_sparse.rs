//! The host-sparse route (flex, `cpu_kernels`): BatchTopK's selection, sparse decoder, loss and
//! backward as plain loops over host memory, where tensors already live in RAM and burn's generic
//! gather/scatter and unfused element-wise ops cost more than the arithmetic. The autodiff-sparse
//! route (decoder rows through `select`/`select_assign`) and the dense route are the references
//! this is tested against.
//!
//! Gradients of the loss of method.md §2.2 for the picked entries (token t, latent l, code v):
//! ĥ_t = b_dec + Σ_p v_p W_l; g_t = ∂L/∂ĥ_t; ∂L/∂W_l += v_p g_t; ∂L/∂v_p = W_l · g_t; the encoder
//! gradient follows from ∂L/∂v_p (ReLU' = 1 on picked entries): ∂L/∂W_enc[:, l] += ∂L/∂v_p x_t.

use anyhow::Result;

pub use crate::crosscoder::train::host_picks::HostPicks;
use crate::crosscoder::train::host_picks::{latent_grads, sum_squares};
use crate::crosscoder::train::step::{Selection, StepInput, StepOutput, aux_weight, column_sums, host_scores};
use crate::crosscoder::{HostValues, encode, give_vec, read_vec, tensor};

/// The route: selection, decode, loss and every gradient by the loops below; only the dense encoder
/// matmul runs through burn.
pub(crate) fn step(input: StepInput) -> Result<StepOutput> {
    let StepInput { cfg, p, x, step, since_selected, d, dict, b, two_d, device } = input;
    let phase = crate::phases::phase("encoder forward", &device);
    let f = read_vec(encode(p, x.clone()))?;
    // The decoder read in place on flex (a copy elsewhere), its norms summed here.
    let w_dec = HostValues::of(&p.w_dec)?;
    let norms = norm_sums(&w_dec, d);
    drop(phase);
    let phase = crate::phases::phase("selection", &device);
    let (main, selected, mask, min_kept) = select_topk(&f, &norms, dict, cfg.k_at(step) * b);
    let selection = Selection::batch_topk(selected, mask, min_kept);
    let dead = selection.record(cfg, since_selected, b, d);
    drop(phase);
    let phase = crate::phases::phase("sparse decode", &device);
    let xh = read_vec(x)?;
    let b_dec = read_vec(p.b_dec.clone())?;

    let mut recon: Vec<f32> = (0..b).flat_map(|_| b_dec.iter().copied()).collect();
    decode_into(&mut recon, &main, &w_dec, two_d);
    let err: Vec<f32> = xh.iter().zip(&recon).map(|(a, r)| a - r).collect();
    drop(phase);
    let phase = crate::phases::phase("loss/backward", &device);
    let (g, recon_loss) = recon_terms(&err, d, cfg.squared_recon);
    let mut loss = recon_loss;
    let mut aux_value = None;
    let mut aux_picks = None;
    let mut g_aux = Vec::new();
    drop(phase);
    let phase = crate::phases::phase("AuxK", &device);
    if dead.any() {
        let aux_mask = dead.aux_mask(&host_scores(&f, &norms, dict), dict);
        let picks = HostPicks::from_mask(&f, &aux_mask, dict);
        let mut e_hat = vec![0.0f32; b * two_d];
        decode_into(&mut e_hat, &picks, &w_dec, two_d);
        let (num, den) = aux_terms(&err, &e_hat, two_d);
        let a = num / den;
        aux_value = Some(a);
        if let Some(alpha) = aux_weight(cfg, a) {
            loss += alpha * a;
            // ∂(α·num/den)/∂ê = −2α(e − ê)/(B·den); e is detached.
            let k = (-2.0 * alpha / (b as f64 * den)) as f32;
            g_aux = err.iter().zip(&e_hat).map(|(e, h)| k * (e - h)).collect();
            aux_picks = Some(picks);
        }
    }
    drop(phase);
    drop(f);
    let _phase = crate::phases::phase("gradient assembly", &device);
    // Gradients: ∂L/∂v per pick, decoder rows and encoder columns, in one pass by latent.
    let mut sets: Vec<(&HostPicks, &[f32])> = vec![(&main, &g)];
    if let Some(p) = &aux_picks {
        sets.push((p, &g_aux));
    }
    let grads = latent_grads(&w_dec, &xh, two_d, &sets);
    let scalar = |v: f64| tensor(vec![v as f32], [1], &device);
    // Wrapped, not copied (this route runs on flex only).
    let grads = [
        give_vec(grads.w_enc, [two_d, dict], &device),
        give_vec(grads.b_enc, [1, dict], &device),
        give_vec(grads.w_dec, [dict, two_d], &device),
        give_vec(column_sums(&g, two_d), [1, two_d], &device),
    ];
    Ok(StepOutput::new(
        selection,
        scalar(loss),
        scalar(recon_loss),
        aux_value.map(scalar),
        tensor(err, [b, two_d], &device),
        grads,
    ))
}

/// AuxK's numerator and denominator over rows of width `w`: `mean_b ‖e − ê‖²` and
/// `mean_b ‖e − mean_b e‖²`, in f64.
pub fn aux_terms(err: &[f32], e_hat: &[f32], w: usize) -> (f64, f64) {
    let b = (err.len() / w) as f64;
    let mut mean = vec![0.0f64; w];
    for row in err.chunks_exact(w) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64 / b);
    }
    let den = err
        .chunks_exact(w)
        .map(|r| r.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
        .sum::<f64>()
        / b;
    let num = err.iter().zip(e_hat).map(|(e, h)| (*e as f64 - *h as f64).powi(2)).sum::<f64>() / b;
    (num, den)
}

/// BatchTopK's selection from the codes `f` (`[B, D]`) and per-latent decoder norm sums, in two
/// passes and no sort: a 4096-bin histogram of the positive scores' top bits finds the bin holding
/// the `keep`-th largest, an exact selection among that bin's few members gives the threshold, and
/// one more pass emits the picks (ties at the threshold by position, exactly `keep` in all), the
/// per-latent selection counts and the 0/1 mask. Equals [`crate::crosscoder::select_batch_topk`].
pub fn select_topk(f: &[f32], norms: &[f32], dict: usize, keep: usize) -> (HostPicks, Vec<f32>, Vec<f32>, Option<f32>) {
    use rayon::prelude::*;
    const BITS: u32 = 12;
    fn bin_of(s: f32) -> usize {
        (s.to_bits() >> (32 - BITS)) as usize
    }
    // Rows are split across threads in chunks; within a row the norm of latent j is a zip.
    let rows_per = (f.len() / dict).div_ceil(rayon::current_num_threads() * 4).max(1);
    let chunk = rows_per * dict;
    // Every score is counted by its top bits without a branch (half the scores are 0 and a
    // branch on `s > 0` mispredicts): bins 1..2040 hold the finite positive scores, bin 0 holds
    // +0 and the positive scores below 2^-129, bins 2040..2048 +∞ and NaN, the rest negatives.
    fn histogram(f: &[f32], chunk: usize, norms: &[f32], keep_if: impl Fn(f32) -> bool + Sync) -> Vec<usize> {
        f.par_chunks(chunk)
            .map(|part| {
                let mut h = vec![0u32; 1 << BITS];
                for row in part.chunks_exact(norms.len()) {
                    for (v, n) in row.iter().zip(norms) {
                        let s = v * n;
                        h[bin_of(s)] += keep_if(s) as u32;
                    }
                }
                h
            })
            .reduce(|| vec![0u32; 1 << BITS], |a, b| a.into_iter().zip(b).map(|(x, y)| x + y).collect())
            .into_iter()
            .map(|c| c as usize)
            .collect()
    }
    let mut hist = histogram(f, chunk, norms, |_| true);
    const POSITIVE_FINITE: std::ops::Range<usize> = 1..2040;
    if hist[2040..2048].iter().any(|&c| c > 0) || hist[POSITIVE_FINITE].iter().sum::<usize>() <= keep {
        // +∞ or NaN among the scores, or few positive ones (bin 0's then matter): count exactly.
        hist = histogram(f, chunk, norms, |s| s > 0.0);
    } else {
        // The `keep`-th largest lies in bins 1..2040: the others do not take part.
        hist[0] = 0;
        hist[2040..].fill(0);
    }
    let positive: usize = hist.iter().sum();
    // (threshold, how many scores lie strictly above it)
    let threshold = if positive <= keep || keep == 0 {
        None
    } else {
        let (mut bin, mut above) = (hist.len(), 0usize);
        while bin > 0 {
            bin -= 1;
            if above + hist[bin] >= keep {
                break;
            }
            above += hist[bin];
        }
        // Bins 1..2040 hold only positive finite scores; bin 0 (reached only by the exact count)
        // also holds +0, which is no member.
        let member = |s: f32| bin_of(s) == bin && (bin != 0 || s > 0.0);
        let mut members: Vec<f32> = f
            .par_chunks(chunk)
            .map(|part| {
                let mut m = Vec::new();
                for row in part.chunks_exact(dict) {
                    for (v, n) in row.iter().zip(norms) {
                        let s = v * n;
                        if member(s) {
                            m.push(s);
                        }
                    }
                }
                m
            })
            .flatten_iter()
            .collect();
        let at = members.len() - (keep - above);
        let (_, &mut t, _) = members.select_nth_unstable_by(at, f32::total_cmp);
        let above_in_bin = members.iter().filter(|&&m| m > t).count();
        Some((t, above + above_in_bin))
    };
    // Each chunk emits its entries above the threshold and, separately, its ties (in order); the
    // first `keep − above` ties over the whole batch are taken afterwards.
    let mut mask = vec![0.0f32; f.len()];
    let parts: Vec<(Vec<(u32, u32, f32, f32)>, Vec<usize>)> = f
        .par_chunks(chunk)
        .zip(mask.par_chunks_mut(chunk))
        .enumerate()
        .map(|(c, (part, mpart))| {
            let (mut taken, mut ties) = (Vec::new(), Vec::new());
            for (r, (row, mrow)) in part.chunks_exact(dict).zip(mpart.chunks_exact_mut(dict)).enumerate() {
                let t = c * rows_per + r;
                for (l, ((&v, &n), m)) in row.iter().zip(norms).zip(mrow.iter_mut()).enumerate() {
                    let s = v * n;
                    let above = match threshold {
                        None => s > 0.0,
                        Some((th, _)) => s > th,
                    };
                    if above {
                        *m = 1.0;
                        taken.push((t as u32, l as u32, v, s));
                    } else if threshold.is_some_and(|(th, _)| s == th) {
                        ties.push(t * dict + l);
                    }
                }
            }
            (taken, ties)
        })
        .collect();
    let mut ties_left = threshold.map_or(0, |(_, above)| keep - above);
    let mut entries: Vec<(u32, u32, f32, f32)> = Vec::with_capacity(keep);
    for (taken, ties) in parts {
        entries.extend(taken);
        for i in ties {
            if ties_left == 0 {
                break;
            }
            ties_left -= 1;
            mask[i] = 1.0;
            let (t, l) = (i / dict, i % dict);
            entries.push((t as u32, l as u32, f[i], f[i] * norms[l]));
        }
    }
    // Row-major order, as the reference mask enumerates them.
    entries.sort_unstable_by_key(|e| (e.0, e.1));
    let mut picks = HostPicks {
        tokens: Vec::with_capacity(entries.len()),
        latents: Vec::with_capacity(entries.len()),
        values: Vec::with_capacity(entries.len()),
    };
    let mut selected = vec![0.0f32; dict];
    let mut min_kept = None::<f32>;
    for (t, l, v, s) in entries {
        picks.tokens.push(t);
        picks.latents.push(l);
        picks.values.push(v);
        selected[l as usize] += 1.0;
        min_kept = Some(min_kept.map_or(s, |m: f32| m.min(s)));
    }
    (picks, selected, mask, min_kept)
}

/// `out[t] += Σ_{p: token t} v_p W[l_p]` (rows of width `w`; picks in token order, as
/// [`select_topk`] and [`HostPicks::from_mask`] emit them): threads own bands of tokens.
pub fn decode_into(out: &mut [f32], picks: &HostPicks, w_dec: &[f32], w: usize) {
    use rayon::prelude::*;
    assert!(picks.tokens.is_sorted(), "decode_into: picks in token order");
    let rows = out.len() / w;
    let band = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
    out.par_chunks_mut(band * w).enumerate().for_each(|(i, dst)| {
        let (t0, t1) = ((i * band) as u32, ((i + 1) * band) as u32);
        let (from, to) = (picks.tokens.partition_point(|&t| t < t0), picks.tokens.partition_point(|&t| t < t1));
        for p in from..to {
            let (t, l, v) = (picks.tokens[p] - t0, picks.latents[p] as usize, picks.values[p]);
            let row = &w_dec[l * w..(l + 1) * w];
            let dst = &mut dst[t as usize * w..(t as usize + 1) * w];
            dst.iter_mut().zip(row).for_each(|(o, r)| *o += v * r);
        }
    });
}

/// Per latent `‖W_dec[l, 0..d]‖ + ‖W_dec[l, d..2d]‖` (BatchTopK's score weights, as
/// [`crate::crosscoder::Params::norm_sum`]), summed in f64 over both cores.
pub fn norm_sums(w_dec: &[f32], d: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let norm = |v: &[f32]| sum_squares(v).sqrt();
    w_dec.par_chunks(2 * d).map(|row| (norm(&row[..d]) + norm(&row[d..])) as f32).collect()
}

/// The reconstruction term of method.md §2.2 on the error rows `err` (`[B, 2d]`) and its gradient
/// g = ∂L/∂ĥ: per model ‖e‖ averaged over the batch (or ½ mean ‖e‖² with `squared`), a row with no
/// error giving the subgradient 0 (as the tensor route's clamp).
fn recon_terms(err: &[f32], d: usize, squared: bool) -> (Vec<f32>, f64) {
    let two_d = 2 * d;
    let b = err.len() / two_d;
    let mut g = vec![0.0f32; err.len()];
    let mut recon_loss = 0.0f64;
    for (e_row, g_row) in err.chunks_exact(two_d).zip(g.chunks_exact_mut(two_d)) {
        for (e, gs) in e_row.chunks_exact(d).zip(g_row.chunks_exact_mut(d)) {
            let sq = sum_squares(e);
            if squared {
                recon_loss += 0.5 * sq / b as f64;
                gs.iter_mut().zip(e).for_each(|(gv, ev)| *gv = -ev / b as f32);
            } else {
                let n = sq.sqrt();
                recon_loss += n / (2 * b) as f64;
                if n > 0.0 {
                    let k = (1.0 / (2.0 * b as f64 * n)) as f32;
                    gs.iter_mut().zip(e).for_each(|(gv, ev)| *gv = -ev * k);
                }
            }
        }
    }
    (g, recon_loss)
}
