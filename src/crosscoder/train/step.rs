//! One training step's contract (shared/spec/method.md §2): what every route returns
//! ([`StepOutput`]) and the bookkeeping they share, each written once — the dead-latent counters and
//! the dead set ([`Selection::record`], [`DeadSet`]), AuxK's k_aux and its rule for when L_aux
//! counts ([`DeadSet::aux_mask`], [`aux_weight`]), L0 and the smallest kept score for the threshold
//! ([`Selection`]), the threshold's EMA ([`update_threshold`]), the gradient-norm clip
//! ([`clip_gradients`]) and the metrics line ([`StepMetrics`], [`fve`]).
//!
//! The routes (`dense`, `host_sparse`, `kernel_sparse`, `autodiff_sparse`) differ only in how they
//! compute the selection, the decode, the loss and the gradients; `dispatch` chooses one.

use anyhow::Result;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::{Params, read_vec};

/// One step's inputs (the batch `x` is `[B, 2d]`, `step` 1-based) with the sizes every route reads.
pub struct StepInput<'a> {
    pub cfg: &'a TrainConfig,
    pub p: &'a Params,
    pub x: Tensor<2>,
    pub step: u64,
    /// Tokens since each latent was last selected; the step updates it.
    pub since_selected: &'a mut [u64],
    pub d: usize,
    pub dict: usize,
    pub b: usize,
    pub two_d: usize,
    pub device: Device,
}

impl<'a> StepInput<'a> {
    pub fn new(cfg: &'a TrainConfig, p: &'a Params, x: Tensor<2>, step: u64, since_selected: &'a mut [u64]) -> Self {
        // One model's width (an SAE's rows are one input of that width: `two_d` = d then).
        let (d, dict) = (cfg.width_of(p), p.w_enc.dims()[1]);
        let [b, two_d] = x.dims();
        let device = x.device();
        Self { cfg, p, x, step, since_selected, d, dict, b, two_d, device }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub recon: f64,
    pub aux: f64,
    pub l0: f64,
    pub fve_base: f64,
    pub fve_chat: f64,
    pub dead_frac: f64,
    pub lr: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fve_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_fve_chat: Option<f64>,
}

/// The outcome of one step (before the optimiser), the same from every route. The loss terms and
/// the error are plain tensors (no autodiff); the gradients are computed.
pub struct StepOutput {
    pub loss: Tensor<1>,
    pub recon: Tensor<1>,
    /// L_aux when some latent is dead (NaN when it is undefined; it then did not count).
    pub aux: Option<Tensor<1>>,
    /// Active latents per token, summed over the batch (for L0).
    pub l0_total: f64,
    /// The main reconstruction's error `h − ĥ`, `[B, 2d]`.
    pub err: Tensor<2>,
    /// BatchTopK: the entries kept (0/1, `[B, D]` on the host; empty when the selection ran on the
    /// device) and the smallest kept score.
    pub kept: Option<(Vec<f32>, Option<f32>)>,
    /// ∂loss/∂(w_enc, b_enc, w_dec, b_dec).
    grads: [Tensor<2>; 4],
    /// Models in a row of the batch: 2 for a crosscoder's pairs, 1 for an SAE's input (whose FVE
    /// then fills both metrics fields).
    blocks: usize,
}

impl StepOutput {
    /// What a route assembles: its selection (L0, kept entries), loss terms, error and gradients.
    pub fn new(
        selection: Selection,
        loss: Tensor<1>,
        recon: Tensor<1>,
        aux: Option<Tensor<1>>,
        err: Tensor<2>,
        grads: [Tensor<2>; 4],
    ) -> Self {
        Self {
            loss: loss.inner(),
            recon: recon.inner(),
            aux: aux.map(Tensor::inner),
            l0_total: selection.l0_total(),
            err: err.inner(),
            kept: selection.kept,
            grads,
            blocks: 2,
        }
    }

    /// The outcome of an SAE step: one model's width per row.
    pub fn one_block(self) -> Self {
        Self { blocks: 1, ..self }
    }

    /// The gradients for (w_enc, b_enc, w_dec, b_dec), without autodiff.
    pub fn gradients(&self) -> Result<[Tensor<2>; 4]> {
        Ok(self.grads.clone())
    }

    /// The gradients, moved out (the training loop's route: on the CPU the optimizer then updates
    /// them in place instead of copying buffers other handles still share).
    pub fn take_gradients(&mut self) -> [Tensor<2>; 4] {
        let empty = || Tensor::<2>::empty([0, 0], &self.err.device());
        std::mem::replace(&mut self.grads, [empty(), empty(), empty(), empty()])
    }

    /// BatchTopK's smallest kept score (the threshold's EMA input); `None` for L1.
    pub fn min_kept(&self) -> Option<f32> {
        self.kept.as_ref().and_then(|(_, m)| *m)
    }

    /// The metrics line of this step on the batch `x` (`[B, 2d]`).
    pub fn metrics(&self, x: &Tensor<2>, step: u64, tokens: u64, dead_frac: f64, lr: f64) -> Result<StepMetrics> {
        let [b, width] = x.dims();
        let [fve_base, fve_chat] = if self.blocks == 1 {
            let v = fve_blocks(x, &self.err, 1, width)?[0];
            [v, v]
        } else {
            fve(x, &self.err, width / 2)?
        };
        let scalar = |t: &Tensor<1>| -> Result<f64> { Ok(read_vec(t.clone().detach())?[0] as f64) };
        Ok(StepMetrics {
            step,
            tokens,
            loss: scalar(&self.loss)?,
            recon: scalar(&self.recon)?,
            aux: match &self.aux {
                Some(a) => scalar(a)?,
                None => 0.0,
            },
            l0: self.l0_total / b as f64,
            fve_base,
            fve_chat,
            dead_frac,
            lr,
            val_fve_base: None,
            val_fve_chat: None,
        })
    }
}

/// What a step's selection decided: per latent, how many tokens selected it (L1: had it active),
/// and for BatchTopK the kept mask and smallest kept score.
pub struct Selection {
    pub per_latent: Vec<f32>,
    pub kept: Option<(Vec<f32>, Option<f32>)>,
}

impl Selection {
    /// L1: every positive code is active.
    pub fn active(per_latent: Vec<f32>) -> Self {
        Self { per_latent, kept: None }
    }

    /// BatchTopK: the kept entries' per-latent counts, the mask (empty when the selection ran on the
    /// device) and the smallest kept score.
    pub fn batch_topk(per_latent: Vec<f32>, mask: Vec<f32>, min_kept: Option<f32>) -> Self {
        Self { per_latent, kept: Some((mask, min_kept)) }
    }

    /// L0 summed over the batch.
    pub fn l0_total(&self) -> f64 {
        self.per_latent.iter().map(|&a| a as f64).sum()
    }

    /// The spec's order: the counters take this batch's selection first (selected → 0, all others
    /// += B), then the dead set is read.
    pub fn record(&self, cfg: &TrainConfig, since_selected: &mut [u64], batch: usize, d: usize) -> DeadSet {
        for (c, &s) in since_selected.iter_mut().zip(&self.per_latent) {
            if s > 0.0 { *c = 0 } else { *c += batch as u64 }
        }
        DeadSet::read(cfg, since_selected, d)
    }
}

/// Column sums of a row-major matrix of rows of `width` (a `[B, D]` 0/1 mask: selections per
/// latent; a `[B, w]` gradient: the bias's). A row-major pass: a strided one misses the cache.
pub fn column_sums(m: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; width];
    for row in m.chunks_exact(width) {
        out.iter_mut().zip(row).for_each(|(o, m)| *o += m);
    }
    out
}

/// BatchTopK's scores `s = f_j · (‖d_j^0‖ + ‖d_j^1‖)` on the host, from the codes `[B, D]` and the
/// per-latent norm sums.
pub fn host_scores(f: &[f32], norms: &[f32], dict: usize) -> Vec<f32> {
    f.iter().enumerate().map(|(i, v)| v * norms[i % dict]).collect()
}

/// Whether a latent unselected for `since` tokens is dead.
pub fn is_dead(cfg: &TrainConfig, since: u64) -> bool {
    since >= cfg.dead_tokens
}

/// The fraction of dead latents (the metrics' `dead_frac`).
pub fn dead_fraction(cfg: &TrainConfig, since_selected: &[u64]) -> f64 {
    since_selected.iter().filter(|&&c| is_dead(cfg, c)).count() as f64 / since_selected.len() as f64
}

/// The dead latents after this step's counter update, and AuxK's k_aux = min(d/2, #dead).
pub struct DeadSet {
    dead: Vec<bool>,
    count: usize,
    d: usize,
}

impl DeadSet {
    fn read(cfg: &TrainConfig, since_selected: &[u64], d: usize) -> Self {
        let dead: Vec<bool> = since_selected.iter().map(|&c| is_dead(cfg, c)).collect();
        let count = dead.iter().filter(|&&v| v).count();
        Self { dead, count, d }
    }

    /// Whether AuxK runs this step.
    pub fn any(&self) -> bool {
        self.count > 0
    }

    /// AuxK's picks as a 0/1 mask over `[B, D]` from the scores: per token the top
    /// k_aux = min(d/2, #dead) dead latents with a positive score. May be all zero (nothing
    /// fired): ε̂ = 0, so L_aux is a constant — its value counts, no gradient flows.
    pub fn aux_mask(&self, scores: &[f32], dict: usize) -> Vec<f32> {
        crate::crosscoder::select_aux(scores, dict, &self.dead, (self.d / 2).min(self.count))
    }
}

/// AuxK's weight in the loss, the one place of its rule: α (applied exactly once) when L_aux is
/// finite; NaN (the main error has no variance over the batch) or ±∞ contributes nothing, to the
/// loss or to the gradients.
pub fn aux_weight(cfg: &TrainConfig, value: f64) -> Option<f64> {
    value.is_finite().then_some(cfg.aux_alpha)
}

/// `loss + α·aux` under [`aux_weight`]'s rule for the tensor routes; also returns the weight when
/// the term counted (the route then back-propagates AuxK's picks).
pub fn add_aux(cfg: &TrainConfig, loss: Tensor<1>, aux: &Tensor<1>) -> Result<(Tensor<1>, Option<f64>)> {
    let value = read_vec(aux.clone())?[0] as f64;
    Ok(match aux_weight(cfg, value) {
        Some(alpha) => (loss + aux.clone().mul_scalar(alpha), Some(alpha)),
        None => (loss, None),
    })
}

/// Scales the gradients so their global norm is at most `max` (BatchTopK: 1.0), through tensor
/// ops (the training loop on flex uses [`clip_factor`] instead and scales inside Adam's pass).
pub fn clip_gradients(g: [Tensor<2>; 4], max: Option<f64>) -> Result<[Tensor<2>; 4]> {
    let Some(max) = max else { return Ok(g) };
    // The four squared norms in one readback (summed on the host in the same order as before).
    let parts: Vec<Tensor<1>> = g.iter().map(|t| t.clone().square().sum()).collect();
    let sq: f32 = read_vec(Tensor::cat(parts, 0))?.iter().sum();
    let norm = (sq as f64).sqrt();
    Ok(if norm > max { g.map(|t| t.mul_scalar(max / norm)) } else { g })
}

/// The clip's factor without applying it: `max / norm` when the gradients' global norm exceeds
/// `max`, else 1. The training loop on flex hands it to Adam's host pass, which scales each value
/// as it reads it (one pass over the gradients less). The squared norm is summed in f64 over both
/// cores from the tensors' memory in place (a read-back copy elsewhere).
pub fn clip_factor(g: &[Tensor<2>; 4], max: Option<f64>) -> Result<f32> {
    use rayon::prelude::*;
    let Some(max) = max else { return Ok(1.0) };
    let mut sq = 0.0f64;
    for t in g {
        let v = crate::crosscoder::HostValues::of(t)?;
        // Chunk sums added in order: the factor is the same on every run (resumes stay exact).
        let parts: Vec<f64> = v.par_chunks(1 << 16).map(crate::crosscoder::train::host_picks::sum_squares).collect();
        sq += parts.iter().sum::<f64>();
    }
    let norm = sq.sqrt();
    Ok(if norm > max { (max / norm) as f32 } else { 1.0 })
}

/// θ's update rule: first minimum, then an EMA with weight 0.001, on the steps whose 0-based index
/// exceeds `threshold_start` (the authors' `step > threshold_start_step`, steps counted from 0): the
/// 1-based `step` here is that index + 1, so with 1000 the first update is on step 1002.
pub fn update_threshold(theta: Option<f32>, min_kept: Option<f32>, step: u64, start: u64) -> Option<f32> {
    if step.saturating_sub(1) <= start {
        return theta;
    }
    match (theta, min_kept) {
        (None, Some(m)) => Some(m),
        (Some(t), Some(m)) => Some(0.999 * t + 0.001 * m),
        (t, None) => t,
    }
}

/// FVE per model on a batch: `1 − Σ_dims Var(h − ĥ) / Σ_dims Var(h)`.
pub fn fve(x: &Tensor<2>, err: &Tensor<2>, d: usize) -> Result<[f64; 2]> {
    let v = fve_blocks(x, err, 2, d)?;
    Ok([v[0], v[1]])
}

/// Σ over each d-wide block's dimensions of the variance over the rows: `[blocks]`, on the device.
pub fn fve_blocks_of(t: &Tensor<2>, blocks: usize, d: usize) -> Tensor<1> {
    t.clone().detach().var(0).reshape([blocks, d]).sum_dim(1).reshape([blocks])
}

/// FVE of each of `blocks` consecutive d-wide blocks of the rows.
pub fn fve_blocks(x: &Tensor<2>, err: &Tensor<2>, blocks: usize, d: usize) -> Result<Vec<f64>> {
    let (total, resid) = (read_vec(fve_blocks_of(x, blocks, d))?, read_vec(fve_blocks_of(err, blocks, d))?);
    Ok((0..blocks).map(|m| 1.0 - resid[m] as f64 / total[m].max(1e-30) as f64).collect())
}
