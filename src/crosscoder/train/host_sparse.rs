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

use crate::crosscoder::train::step::{Selection, StepInput, StepOutput, aux_weight, host_scores};
use crate::crosscoder::{encode, read_vec, tensor};

/// The route: selection, decode, loss and every gradient by the loops below; only the dense encoder
/// matmul runs through burn.
pub(crate) fn step(input: StepInput) -> Result<StepOutput> {
    let StepInput { cfg, p, x, step, since_selected, d, dict, b, two_d, device } = input;
    let phase = crate::phases::phase("encoder forward", &device);
    let f = read_vec(encode(p, x.clone()))?;
    let norms = read_vec(p.norm_sum())?;
    drop(phase);
    let phase = crate::phases::phase("selection", &device);
    let (main, selected, mask, min_kept) = select_topk(&f, &norms, dict, cfg.k_at(step) * b);
    let selection = Selection::batch_topk(selected, mask, min_kept);
    let dead = selection.record(cfg, since_selected, b, d);
    drop(phase);
    let phase = crate::phases::phase("sparse decode", &device);
    let xh = read_vec(x)?;
    let w_dec = read_vec(p.w_dec.clone())?;
    let b_dec = read_vec(p.b_dec.clone())?;

    let mut recon: Vec<f32> = (0..b).flat_map(|_| b_dec.iter().copied()).collect();
    decode_into(&mut recon, &main, &w_dec, two_d);
    let err: Vec<f32> = xh.iter().zip(&recon).map(|(a, r)| a - r).collect();
    drop(phase);
    let phase = crate::phases::phase("loss/backward", &device);
    // Reconstruction term and g = ∂L/∂ĥ.
    let mut g = vec![0.0f32; b * two_d];
    let mut recon_loss = 0.0f64;
    for t in 0..b {
        for m in 0..2 {
            let e = &err[t * two_d + m * d..t * two_d + (m + 1) * d];
            let gs = &mut g[t * two_d + m * d..t * two_d + (m + 1) * d];
            let sq: f64 = e.iter().map(|v| (*v as f64).powi(2)).sum();
            if cfg.squared_recon {
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
    let _phase = crate::phases::phase("gradient assembly", &device);
    // Gradients: ∂L/∂v per pick, then decoder rows and encoder columns grouped by latent.
    let grad_v = pick_grads(&main, &w_dec, &g, two_d);
    let mut grad_b_dec = vec![0.0f32; two_d];
    for row in g.chunks_exact(two_d) {
        grad_b_dec.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
    let grad_v_aux = aux_picks.as_ref().map(|p| pick_grads(p, &w_dec, &g_aux, two_d));
    let mut dec_sets: Vec<(&HostPicks, &[f32], &[f32])> = vec![(&main, &main.values, &g)];
    let mut enc_sets: Vec<(&HostPicks, &[f32], &[f32])> = vec![(&main, &grad_v, &xh)];
    if let (Some(p), Some(gv)) = (&aux_picks, &grad_v_aux) {
        dec_sets.push((p, &p.values, &g_aux));
        enc_sets.push((p, gv, &xh));
    }
    let mut grad_w_dec = vec![0.0f32; dict * two_d];
    accumulate_by_latent(&mut grad_w_dec, two_d, &dec_sets);
    // Encoder gradient accumulated as [D, 2d] rows (contiguous), transposed once at the end.
    let mut grad_enc_t = vec![0.0f32; dict * two_d];
    accumulate_by_latent(&mut grad_enc_t, two_d, &enc_sets);
    let mut grad_b_enc = vec![0.0f32; dict];
    for (picks, gv, _) in &enc_sets {
        for (&l, &gvp) in picks.latents.iter().zip(gv.iter()) {
            grad_b_enc[l as usize] += gvp;
        }
    }
    let grad_w_enc = transpose(&grad_enc_t, dict, two_d);
    let scalar = |v: f64| tensor(vec![v as f32], [1], &device);
    let grads = [
        tensor(grad_w_enc, [two_d, dict], &device),
        tensor(grad_b_enc, [1, dict], &device),
        tensor(grad_w_dec, [dict, two_d], &device),
        tensor(grad_b_dec, [1, two_d], &device),
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

/// Picked (token, latent, code) entries.
pub struct HostPicks {
    pub tokens: Vec<u32>,
    pub latents: Vec<u32>,
    pub values: Vec<f32>,
}

impl HostPicks {
    pub fn from_mask(f: &[f32], mask: &[f32], dict: usize) -> Self {
        let (mut tokens, mut latents, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &m) in mask.iter().enumerate() {
            if m > 0.0 {
                tokens.push((i / dict) as u32);
                latents.push((i % dict) as u32);
                values.push(f[i]);
            }
        }
        Self { tokens, latents, values }
    }
}

/// BatchTopK's selection from the codes `f` (`[B, D]`) and per-latent decoder norm sums, in two
/// passes and no sort: a 4096-bin histogram of the positive scores' top bits finds the bin holding
/// the `keep`-th largest, an exact selection among that bin's few members gives the threshold, and
/// one more pass emits the picks (ties at the threshold by position, exactly `keep` in all), the
/// per-latent selection counts and the 0/1 mask. Equals [`crate::crosscoder::select_batch_topk`].
pub fn select_topk(f: &[f32], norms: &[f32], dict: usize, keep: usize) -> (HostPicks, Vec<f32>, Vec<f32>, Option<f32>) {
    use rayon::prelude::*;
    const BITS: u32 = 12;
    let bin_of = |s: f32| (s.to_bits() >> (32 - BITS)) as usize;
    // Rows are split across threads in chunks; within a row the norm of latent j is a zip.
    let rows_per = (f.len() / dict).div_ceil(rayon::current_num_threads() * 4).max(1);
    let chunk = rows_per * dict;
    let hist: Vec<usize> = f
        .par_chunks(chunk)
        .map(|part| {
            let mut h = vec![0u32; 1 << BITS];
            for row in part.chunks_exact(dict) {
                for (v, n) in row.iter().zip(norms) {
                    let s = v * n;
                    if s > 0.0 {
                        h[bin_of(s)] += 1;
                    }
                }
            }
            h
        })
        .reduce(
            || vec![0u32; 1 << BITS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
        .into_iter()
        .map(|c| c as usize)
        .collect();
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
        let mut members: Vec<f32> = f
            .par_chunks(chunk)
            .flat_map_iter(|part| {
                let mut m = Vec::new();
                for row in part.chunks_exact(dict) {
                    for (v, n) in row.iter().zip(norms) {
                        let s = v * n;
                        if s > 0.0 && bin_of(s) == bin {
                            m.push(s);
                        }
                    }
                }
                m
            })
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

/// `[rows, cols]` → `[cols, rows]`, in cache-sized blocks.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut out = vec![0.0f32; src.len()];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out
}

/// `out[t] += Σ_{p: token t} v_p W[l_p]` (rows of width `w`).
pub fn decode_into(out: &mut [f32], picks: &HostPicks, w_dec: &[f32], w: usize) {
    for ((&t, &l), &v) in picks.tokens.iter().zip(&picks.latents).zip(&picks.values) {
        let row = &w_dec[l as usize * w..(l as usize + 1) * w];
        let dst = &mut out[t as usize * w..(t as usize + 1) * w];
        dst.iter_mut().zip(row).for_each(|(o, r)| *o += v * r);
    }
}

/// `∂L/∂v_p = W[l_p] · g[t_p]` for every pick, in parallel.
pub fn pick_grads(picks: &HostPicks, w_dec: &[f32], g: &[f32], w: usize) -> Vec<f32> {
    use rayon::prelude::*;
    picks
        .tokens
        .par_iter()
        .zip(picks.latents.par_iter())
        .map(|(&t, &l)| {
            let (t, l) = (t as usize, l as usize);
            w_dec[l * w..(l + 1) * w].iter().zip(&g[t * w..(t + 1) * w]).map(|(a, b)| a * b).sum()
        })
        .collect()
}

/// `out[l] += Σ_{p: l_p = l} c_p · src[t_p]` over several pick sets (`out` is `[D, w]`, each
/// `src` `[B, w]`): the gradient of the decoder rows (c = code values, src = ∂L/∂ĥ) and of the
/// encoder columns (c = ∂L/∂v, src = x). Picks are grouped by latent so threads own whole rows.
pub fn accumulate_by_latent(out: &mut [f32], w: usize, sets: &[(&HostPicks, &[f32], &[f32])]) {
    use rayon::prelude::*;
    let dict = out.len() / w;
    // Counting sort of (set, pick) by latent.
    let mut count = vec![0usize; dict + 1];
    for (picks, _, _) in sets {
        for &l in &picks.latents {
            count[l as usize + 1] += 1;
        }
    }
    for j in 0..dict {
        count[j + 1] += count[j];
    }
    let mut order = vec![(0u32, 0u32); count[dict]];
    let mut next = count.clone();
    for (si, (picks, _, _)) in sets.iter().enumerate() {
        for (p, &l) in picks.latents.iter().enumerate() {
            order[next[l as usize]] = (si as u32, p as u32);
            next[l as usize] += 1;
        }
    }
    out.par_chunks_mut(w).enumerate().for_each(|(l, row)| {
        for &(si, p) in &order[count[l]..count[l + 1]] {
            let (picks, coeffs, src) = sets[si as usize];
            let (t, c) = (picks.tokens[p as usize] as usize, coeffs[p as usize]);
            row.iter_mut().zip(&src[t * w..(t + 1) * w]).for_each(|(o, x)| *o += c * x);
        }
    });
}
