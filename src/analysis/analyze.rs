//! `crossdiff analyze`: per-latent metrics (shared/spec/method.md §3) and Latent Scaling (§4),
//! streamed over the activation cache, written as `latents.csv` and `summary.json`.
//!
//! Latent Scaling in closed form for every latent at once: with d_j = d_j^chat,
//! β_j = d_jᵀ Σ_i f_ij y_ij / (‖d_j‖² Σ_i f_ij²). For the reconstruction target y = ĥ^m the sums are
//! `Σ_i f_ij (ĥ^m_i · d_j)`, one `[B, D]` matmul per batch; for the error target with latent j's own
//! contribution added back, y = h^m − ĥ^m + f_ij d_j^m, so d_jᵀy = (h^m − ĥ^m)·d_j + f_ij (d_j^m·d_j)
//! and the second part is `(d_j^m·d_j) Σ_i f_ij²`. Batch sums run on the device in f32 and are
//! accumulated in f64 on the host.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use serde::Serialize;

use crate::activations::cache::{CacheIndex, read_shard_file};
use crate::analysis::analyze_host::{HostDecoder, Sums, batch_sums};
use crate::analysis::batch_sums::BatchRow;
use crate::analysis::latents::{LatentClass, LatentRow, Summary, delta_norm};
use crate::crosscoder::{Crosscoder, Kind, decode, read_vec, tensor};
use crate::io::write_atomic;
use crate::rng::SplitMix64;
use crate::run_dir::RunDir;

/// Pairs per device batch.
pub const DEFAULT_BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Tokens of the cache to stream (default: all).
    pub tokens: Option<u64>,
    pub batch: usize,
    /// Error betas for this many top-Δ latents (default: the number of chat-only latents, ≥ 100).
    pub error_top_n: Option<usize>,
    pub seed: u64,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self { tokens: None, batch: DEFAULT_BATCH, error_top_n: None, seed: 0 }
    }
}

/// The analysis's running sums (see [`Sums`]).
type Accumulators = Sums;

/// Streams the cache through the crosscoder `cc` (loaded once by the caller from `run`).
pub fn analyze(
    run: &RunDir,
    cc: &Crosscoder,
    cache: &Path,
    device: &Device,
    opts: &AnalyzeOptions,
    mut progress: impl FnMut(u64, u64),
    keep_going: impl Fn() -> bool,
) -> Result<(Vec<LatentRow>, Summary)> {
    let index = CacheIndex::open(cache)?;
    let (d, dict) = cc.params.dims();
    if index.d_model != d {
        bail!("{}: the cache has width {}, the crosscoder {d}", cache.display(), index.d_model);
    }
    let total = opts.tokens.unwrap_or(index.total_tokens).min(index.total_tokens);
    let mut acc = Sums::zeros(dict, 2 * d);
    let p = &cc.params;
    let norm_sum = p.norm_sum();
    // On the CPU with sparse codes, the sums after the encoder run as host loops over the active
    // entries; the first batch decides (dense codes keep the tensor route).
    let mut route = if crate::backend::is_flex(device) { Route::Undecided } else { Route::Dense };
    // d_j^chat as a `[2d, D]`-shaped projector for each model's half: [d, D].
    let w_chat_t = p.w_dec.clone().narrow(1, d, d).transpose();
    // Resume: the sums after the last finished shard, if this same analysis was interrupted.
    let fingerprint =
        format!("{}|{}|{}|{total}|{}", cache.display(), index.total_tokens, cc.file_checksum.unwrap_or(0), opts.batch);
    let state_path = run.analyze_state();
    let mut first_shard = 0;
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        if let Ok(saved) = serde_json::from_str::<SavedState>(&text) {
            if saved.fingerprint == fingerprint {
                first_shard = saved.shards_done;
                acc = saved.acc;
            }
        }
    }
    for (shard_i, shard) in index.shards.iter().enumerate().skip(first_shard) {
        if acc.tokens >= total {
            break;
        }
        if !keep_going() {
            let tokens = acc.tokens;
            let saved = SavedState { fingerprint, shards_done: shard_i, acc };
            let text = serde_json::to_string(&saved)?;
            write_atomic(&state_path, |f| Ok(f.write_all(text.as_bytes())?))?;
            bail!("analysis interrupted after {tokens} tokens; re-run the same command to resume");
        }
        let phase = crate::phases::phase("read shards (disk)", device);
        let layout = index.check_shard_header(cache, shard)?;
        let bytes = read_shard_file(cache, shard)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", shard.file))?;
        drop(phase);
        let template: Vec<bool> = match st.tensor("template") {
            Ok(t) => t.data().iter().map(|&b| b != 0).collect(),
            Err(_) => vec![false; shard.tokens as usize],
        };
        let row_bytes = 2 * d * layout.dtype.bytes();
        let n = (shard.tokens.min(total - acc.tokens)) as usize;
        let mut start = 0;
        while start < n {
            let b = opts.batch.min(n - start);
            let mut rows = vec![0.0f32; b * 2 * d];
            let from = layout.acts_offset + start * row_bytes;
            let phase = crate::phases::phase("decode stored rows to f32", device);
            layout.dtype.decode(&bytes[from..from + b * row_bytes], &mut rows);
            drop(phase);
            let template = &template[start..start + b];
            let projectors = [&norm_sum, &w_chat_t];
            match &route {
                Route::Dense => accumulate(cc, &mut acc, &rows, template, projectors, None, device)?,
                Route::Host(hd) => {
                    let codes = read_codes(cc, &rows, template.len(), device)?.1;
                    add_host_sums(&mut acc, batch_sums(hd, &codes, &rows, template), device);
                }
                Route::Undecided => route = first_batch(cc, &mut acc, &rows, template, projectors, device)?,
            }
            start += b;
            progress(acc.tokens, total);
        }
    }
    let _ = std::fs::remove_file(&state_path);
    let _phase = crate::phases::phase("Latent Scaling and the latents table", device);
    // The host route holds the decoder already: no second read of it.
    let w = match route {
        Route::Host(hd) => hd.into_decoder(),
        _ => read_vec(cc.params.w_dec.clone())?,
    };
    finish(&cc, acc, &w, opts, dict, d)
}

/// Codes with at most one active entry in this many take the host loops (which pay per active
/// entry what gemm pays per entry of the dense products, at ~20× the rate).
const SPARSE_ENOUGH: usize = 32;

/// How a CPU analysis sums its batches, decided on the first one.
enum Route {
    Undecided,
    /// Dense tensors, one row read back per batch (the device route; dense codes on the CPU).
    Dense,
    /// Host loops over the active entries (sparse codes on the CPU).
    Host(HostDecoder),
}

/// The codes of a batch, as a tensor and read back.
fn read_codes(cc: &Crosscoder, rows: &[f32], b: usize, device: &Device) -> Result<(Tensor<2>, Vec<f32>)> {
    let _phase = crate::phases::phase("encoder (codes)", device);
    let f = cc.codes(tensor(rows.to_vec(), [b, 2 * cc.params.dims().0], device));
    let codes = read_vec(f.clone())?;
    Ok((f, codes))
}

/// The first batch on the CPU: its codes' density chooses the route, and it is summed by it.
fn first_batch(
    cc: &Crosscoder,
    acc: &mut Accumulators,
    rows: &[f32],
    template: &[bool],
    projectors: [&Tensor<2>; 2],
    device: &Device,
) -> Result<Route> {
    let (f, codes) = read_codes(cc, rows, template.len(), device)?;
    let active = codes.iter().filter(|v| **v > 0.0).count();
    if active * SPARSE_ENOUGH > codes.len() {
        accumulate(cc, acc, rows, template, projectors, Some(f), device)?;
        return Ok(Route::Dense);
    }
    let hd = HostDecoder::new(cc)?;
    add_host_sums(acc, batch_sums(&hd, &codes, rows, template), device);
    Ok(Route::Host(hd))
}

/// Adds a batch's host sums into the accumulators.
fn add_host_sums(acc: &mut Accumulators, s: Sums, device: &Device) {
    let _phase = crate::phases::phase("host accumulation (f64)", device);
    acc.absorb(&s);
}

#[derive(Serialize, serde::Deserialize)]
struct SavedState {
    fingerprint: String,
    shards_done: usize,
    acc: Accumulators,
}

/// One batch's sums through dense tensors (the device route; `codes` when already computed), read
/// back in one row. `projectors`: the decoder norm sums `[1, D]` and `[d, D]` chat directions.
fn accumulate(
    cc: &Crosscoder,
    acc: &mut Accumulators,
    rows: &[f32],
    template: &[bool],
    [norm_sum, w_chat_t]: [&Tensor<2>; 2],
    codes: Option<Tensor<2>>,
    device: &Device,
) -> Result<()> {
    let (b, d) = (template.len(), cc.params.dims().0);
    let phase = crate::phases::phase("encoder and decoder (codes, reconstruction)", device);
    let x = tensor(rows.to_vec(), [b, 2 * d], device);
    let f = codes.unwrap_or_else(|| cc.codes(x.clone()));
    let recon = decode(&cc.params, f.clone());
    let err = x.clone() - recon.clone();
    drop(phase);
    let phase = crate::phases::phase("per-batch statistics (reductions, one readback)", device);
    let a = f.clone() * norm_sum.clone();
    let active = a.clone().greater_elem(0.0).float();
    let t = tensor(template.iter().map(|&v| f32::from(u8::from(v))).collect(), [1, b], device);
    // Every per-batch reduction in one [1, 8·D + 1 + 8·d] row, read back once (one device→host
    // synchronisation per batch instead of thirteen), then added into the f64 accumulators.
    let mut parts = vec![active.clone().sum_dim(0), t.matmul(active), a.max_dim(0), f.clone().square().sum_dim(0)];
    for m in 0..2 {
        let r = recon.clone().narrow(1, m * d, d).matmul(w_chat_t.clone());
        parts.push((f.clone() * r).sum_dim(0));
        let e = err.clone().narrow(1, m * d, d).matmul(w_chat_t.clone());
        parts.push((f.clone() * e).sum_dim(0));
    }
    parts.push(f.greater_elem(0.0).float().sum().reshape([1, 1]));
    parts.extend([x.clone().sum_dim(0), x.square().sum_dim(0), err.clone().sum_dim(0), err.square().sum_dim(0)]);
    let mut row = BatchRow::read(parts)?;
    drop(phase);
    let _phase = crate::phases::phase("host accumulation (f64)", device);
    row.add_into(&mut acc.active);
    row.add_into(&mut acc.template_active);
    row.max_into(&mut acc.max_act);
    row.add_into(&mut acc.sum_f2);
    for m in 0..2 {
        row.add_into(&mut acc.recon[m]);
        row.add_into(&mut acc.err[m]);
    }
    acc.l0 += row.scalar();
    for v in [&mut acc.x_sum, &mut acc.x_sq, &mut acc.e_sum, &mut acc.e_sq] {
        row.add_into(v);
    }
    acc.tokens += b as u64;
    Ok(())
}

fn finish(
    cc: &Crosscoder,
    acc: Accumulators,
    w: &[f32],
    opts: &AnalyzeOptions,
    dict: usize,
    d: usize,
) -> Result<(Vec<LatentRow>, Summary)> {
    let n = acc.tokens.max(1) as f64;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
    let mut rows = Vec::with_capacity(dict);
    for j in 0..dict {
        let (base, chat) = (&w[j * 2 * d..j * 2 * d + d], &w[j * 2 * d + d..(j + 1) * 2 * d]);
        let (nb, nc) = (dot(base, base).sqrt(), dot(chat, chat).sqrt());
        let delta = delta_norm(nb, nc);
        let dead = acc.active[j] == 0.0;
        let denom = nc * nc * acc.sum_f2[j];
        let beta = |num: f64| if denom > 0.0 && num.is_finite() { Some(num / denom) } else { None };
        rows.push(LatentRow {
            latent: j,
            delta_norm: delta,
            dec_norm_base: nb,
            dec_norm_chat: nc,
            dec_cos: if nb > 0.0 && nc > 0.0 { dot(base, chat) / (nb * nc) } else { 0.0 },
            class: if dead { LatentClass::Dead } else { LatentClass::of_delta(delta) },
            freq: acc.active[j] / n,
            max_act: acc.max_act[j],
            nu_error: None,
            nu_reconstruction: None,
            beta_error_base: None,
            beta_error_chat: None,
            beta_recon_base: beta(acc.recon[0][j]),
            beta_recon_chat: beta(acc.recon[1][j]),
            template_share: if dead { None } else { Some(acc.template_active[j] / acc.active[j]) },
        });
    }
    // Error betas: the top-N latents by Δ plus an equal seeded sample of shared latents.
    let chat_only = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).count();
    let top_n = opts.error_top_n.unwrap_or(chat_only.max(100)).min(dict);
    let mut by_delta: Vec<usize> = (0..dict).filter(|&j| rows[j].class != LatentClass::Dead).collect();
    by_delta.sort_by(|&a, &b| rows[b].delta_norm.total_cmp(&rows[a].delta_norm).then(a.cmp(&b)));
    let top: Vec<usize> = by_delta.into_iter().take(top_n).collect();
    let mut shared: Vec<usize> =
        (0..dict).filter(|&j| rows[j].class == LatentClass::Shared && !top.contains(&j)).collect();
    crate::rng::shuffle(&mut shared, &mut SplitMix64(opts.seed ^ 0xB37A));
    shared.truncate(top.len());
    for &j in top.iter().chain(&shared) {
        let (base, chat) = (&w[j * 2 * d..j * 2 * d + d], &w[j * 2 * d + d..(j + 1) * 2 * d]);
        let nc2 = dot(chat, chat);
        let denom = nc2 * acc.sum_f2[j];
        if denom <= 0.0 {
            continue;
        }
        let own = [dot(base, chat), nc2];
        rows[j].beta_error_base = Some((acc.err[0][j] + own[0] * acc.sum_f2[j]) / denom);
        rows[j].beta_error_chat = Some((acc.err[1][j] + own[1] * acc.sum_f2[j]) / denom);
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && (a / b).is_finite() => Some(a / b),
        _ => None,
    };
    for r in &mut rows {
        r.nu_error = ratio(r.beta_error_base, r.beta_error_chat);
        r.nu_reconstruction = ratio(r.beta_recon_base, r.beta_recon_chat);
    }
    let mut classes = std::collections::BTreeMap::new();
    for c in LatentClass::FIGURE_ORDER {
        classes.insert(c, rows.iter().filter(|r| r.class == c).count());
    }
    let chat_specific = rows.iter().filter(|r| r.is_chat_specific()).count();
    let var = |sum: &[f64], sq: &[f64], m: usize| -> f64 {
        (m * d..(m + 1) * d).map(|i| sq[i] / n - (sum[i] / n).powi(2)).sum()
    };
    let fve_m = |m: usize| 1.0 - var(&acc.e_sum, &acc.e_sq, m) / var(&acc.x_sum, &acc.x_sq, m);
    let total_var = var(&acc.x_sum, &acc.x_sq, 0) + var(&acc.x_sum, &acc.x_sq, 1);
    let resid_var = var(&acc.e_sum, &acc.e_sq, 0) + var(&acc.e_sum, &acc.e_sq, 1);
    // Random-pair baseline for the decoder cosine: 10k random (i, j) pairs, base of i vs chat of j.
    let mut rng = SplitMix64(opts.seed ^ 0xC05);
    let cos: Vec<f64> = (0..10_000)
        .map(|_| {
            let (i, j) = ((rng.next_u64() % dict as u64) as usize, (rng.next_u64() % dict as u64) as usize);
            let (a, b) = (&w[i * 2 * d..i * 2 * d + d], &w[j * 2 * d + d..(j + 1) * 2 * d]);
            dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()).max(1e-30)
        })
        .collect();
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let std = (cos.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / cos.len() as f64).sqrt();
    let summary = Summary {
        tokens: acc.tokens,
        fve_base: fve_m(0),
        fve_chat: fve_m(1),
        fve: 1.0 - resid_var / total_var,
        l0: acc.l0 / n,
        dead_fraction: classes[&LatentClass::Dead] as f64 / dict as f64,
        classes,
        chat_specific,
        error_betas_top_n: top.len(),
        error_betas_random_shared: shared.len(),
        cosine_random_pairs_mean: mean,
        cosine_random_pairs_std: std,
        thresholds: serde_json::json!({
            "base_only_below": 0.1, "shared": [0.4, 0.6], "chat_only_from": 0.9,
            "chat_specific": {"nu_error_below": 0.2, "nu_reconstruction_below": 0.5},
            "inference_threshold": cc.threshold, "kind": match cc.config.kind { Kind::L1 => "l1", Kind::BatchTopK => "batchtopk", Kind::Sae => "sae" },
        }),
        crosscoder_checksum: cc.file_checksum,
    };
    Ok((rows, summary))
}
