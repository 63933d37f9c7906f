//! The device-resident route (wgpu; sparse BatchTopK crosscoders and SAEs, and L1): the kernel
//! route's arithmetic (L1: the dense one) with every decision that used to come back to the host
//! kept on the device — the selection ([`batch_topk_picks`]), the dead-latent counters, AuxK's picks
//! (a fixed-size top-k over the dead latents, empty slots masked), AuxK's finite-or-not rule, the
//! gradient clip and θ's EMA — so a step reads nothing back; the metrics come back in one read on
//! log steps, the counters and θ at checkpoints. Same rules as the host routes
//! (shared/spec/method.md §2, §8); ties inside AuxK's per-token top-k may be broken in another order
//! than the host's.

use anyhow::Result;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::crosscoder::kernels::{batch_topk_picks, is_wgpu, latent_segments, row_topk};
use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::kernel_sparse::{Set, recon_terms, set_gradients};
use crate::crosscoder::train::step::{StepMetrics, fve_blocks_of};
use crate::crosscoder::{Kind, Params, aux_loss, read_vec};

/// Whether a run takes this route: on wgpu, L1 (dense by construction) and sparse BatchTopK
/// crosscoders and SAEs with the kernels, with a dead-token window the device's i32 counters hold.
pub fn applies(cfg: &TrainConfig, device: &Device) -> bool {
    (cfg.kind == Kind::L1 || (cfg.sparse && cfg.cpu_kernels))
        && is_wgpu(device)
        && cfg.dead_tokens < (i32::MAX / 2) as u64
}

/// The bookkeeping kept on the device between steps.
pub struct Resident {
    /// Tokens since each latent was last selected (i32 `[D]`), capped at the dead window: only
    /// "at least `dead_tokens`" matters, and the cap keeps i32 from overflowing.
    since: Tensor<1, Int>,
    /// θ and whether it is set: `[2]` (value, 0/1).
    theta: Tensor<1>,
    cap: i64,
    /// AuxK's fixed slot layout for (B, k): each slot's token and the token offsets.
    aux_layout: Option<((usize, usize), Tensor<1, Int>, Tensor<1, Int>)>,
}

impl Resident {
    /// From the host state (a fresh run, or a checkpoint).
    pub fn upload(since_selected: &[u64], threshold: Option<f32>, cfg: &TrainConfig, device: &Device) -> Self {
        let cap = cfg.dead_tokens as i64;
        let since: Vec<i64> = since_selected.iter().map(|&c| (c as i64).min(cap)).collect();
        let n = since.len();
        Self {
            since: Tensor::from_data(TensorData::new(since, [n]), device),
            theta: Tensor::from_data(
                TensorData::new(vec![threshold.unwrap_or(0.0), f32::from(u8::from(threshold.is_some()))], [2]),
                device,
            ),
            cap,
            aux_layout: None,
        }
    }

    /// Back to the host state (checkpoints, the end of a run): two reads.
    pub fn download(&self, since_selected: &mut [u64], threshold: &mut Option<f32>) -> Result<()> {
        let since = crate::counters::read_i64(self.since.clone())?;
        since_selected.iter_mut().zip(since).for_each(|(c, s)| *c = s as u64);
        let theta = read_vec(self.theta.clone())?;
        *threshold = (theta[1] > 0.5).then_some(theta[0]);
        Ok(())
    }

    /// θ's rule ([`crate::crosscoder::train::update_threshold`]) on the device: the first kept
    /// minimum, then an EMA with weight 0.001, on steps whose 0-based index exceeds `start`; a step
    /// that kept nothing (`min_kept` infinite) leaves θ as it is.
    fn update_threshold(&mut self, min_kept: Tensor<1>, step: u64, start: u64) {
        if step.saturating_sub(1) <= start {
            return;
        }
        let t = self.theta.clone().narrow(0, 0, 1);
        let set = self.theta.clone().narrow(0, 1, 1);
        let kept = min_kept.clone().lower_elem(f32::INFINITY);
        let ema = t.clone().mul_scalar(0.999) + min_kept.clone().mul_scalar(0.001);
        let next = min_kept.mask_where(set.clone().greater_elem(0.5), ema);
        let t = t.mask_where(kept.clone(), next);
        let set = set.max_pair(kept.float());
        self.theta = Tensor::cat(vec![t, set], 0);
    }
}

/// One step's outcome on this route: device tensors only.
pub struct ResidentOutput {
    loss: Tensor<1>,
    recon: Tensor<1>,
    /// L_aux as the metrics report it (0 when no latent is dead).
    aux: Tensor<1>,
    err: Tensor<2>,
    /// Models per row: 2 for a crosscoder's pairs, 1 for an SAE's input.
    blocks: usize,
    /// Picks this step (L0 × B), as f32 `[1]`.
    picks: Tensor<1>,
    /// The smallest kept score (∞ when nothing was kept).
    min_kept: Tensor<1>,
    pub grads: [Tensor<2>; 4],
}

/// One step on the batch `x` (`[B, 2d]`, 1-based `step`); `tokens_after` counts every token the
/// run has seen with this batch (no latent can be dead before the dead window has passed, so AuxK
/// is skipped until then).
pub fn step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    tokens_after: u64,
    r: &mut Resident,
) -> Result<ResidentOutput> {
    if cfg.kind == Kind::L1 {
        return l1_step(cfg, p, x, r);
    }
    let sae = cfg.kind == Kind::Sae;
    let (d, dict) = (cfg.width_of(p), p.w_enc.dims()[1]);
    let [b, two_d] = x.dims();
    let device = x.device();
    let keep = cfg.k_at(step) * b;
    // An SAE's encoder reads x − b_dec, and its scores are its codes (unit decoder rows).
    let enc_input = if sae { x.clone() - p.b_dec.clone() } else { x.clone() };
    let f = (enc_input.clone().matmul(p.w_enc.clone()) + p.b_enc.clone()).clamp_min(0.0);
    let scores = if sae { f.clone() } else { f.clone() * p.norm_sum() };
    let flat_scores = scores.clone().reshape([b * dict]);
    let picks = batch_topk_picks(&flat_scores, keep, b, dict);
    let n = picks.token_offsets.clone().narrow(0, b, 1);
    // Empty slots (fewer positive scores than k·B) carry latent `dict`: out of every segment.
    let (main, flat, empty) = device_set(picks.token_offsets, picks.tokens, picks.latents, &f, dict);
    let min_kept = flat_scores.clone().select(0, flat).mask_fill(empty, f32::INFINITY).min();
    // The counters take this batch's selection first (selected → 0, others += B), then the dead set.
    let selected = picks.per_latent.clone().greater_elem(0);
    r.since = r.since.clone().add_scalar(b as i64).clamp_max(r.cap).mask_fill(selected, 0);
    let err = x.clone() - (main.decode(&p.w_dec) + p.b_dec.clone());
    let (recon, g) = recon_terms(cfg, &err, b, d, two_d);
    let mut loss = recon.clone();
    let mut aux_reported = Tensor::<1>::zeros([1], &device);
    let mut sets = vec![(main, g)];
    if tokens_after >= cfg.dead_tokens {
        let dead = r.since.clone().greater_equal_elem(cfg.dead_tokens as i64);
        let (set, e_hat) = aux_picks(&f, &scores, dead.clone(), d, p, r)?;
        let e = err.clone();
        let a = aux_loss(e.clone(), e_hat.clone());
        let centered = e.clone() - e.clone().mean_dim(0);
        let den = centered.square().sum_dim(1).mean();
        // L_aux counts (once, weighted α) when some latent is dead and its value is finite.
        let any_dead = dead.float().sum().greater_elem(0.0);
        let counts = a.clone().is_finite().bool_and(any_dead.clone());
        loss = loss + a.clone().mul_scalar(cfg.aux_alpha).mask_fill(counts.clone().bool_not(), 0.0);
        aux_reported = a.mask_fill(any_dead.bool_not(), 0.0);
        // ∂(α·num/den)/∂ê = −2α(e − ê)/(B·den); e is detached. Zero when the term does not count.
        let weight = den.recip().mul_scalar(-2.0 * cfg.aux_alpha / b as f64).mask_fill(counts.bool_not(), 0.0);
        let g_aux = (e - e_hat) * weight.reshape([1, 1]);
        sets.push((set, g_aux));
    }
    let grads = set_gradients(&sets, p, &enc_input, sae);
    let picks = n.float();
    let blocks = if sae { 1 } else { 2 };
    Ok(ResidentOutput { loss, recon, aux: aux_reported, err, blocks, picks, min_kept, grads })
}

/// L1 (dense, through autodiff as the dense route): its counters count the latents active on the
/// batch; it has no AuxK and no θ.
fn l1_step(cfg: &TrainConfig, p: &Params, x: Tensor<2>, r: &mut Resident) -> Result<ResidentOutput> {
    let (d, dict) = (cfg.width_of(p), p.w_enc.dims()[1]);
    let b = x.dims()[0];
    let device = x.device();
    let ad = p.clone().map(|t| t.autodiff().require_grad());
    let (loss, recon, err, f) = crate::crosscoder::train::dense::l1_loss(cfg, &ad, x.autodiff(), d);
    let grads = crate::crosscoder::train::dense::backward(&loss, &ad)?;
    let active = f.greater_elem(0.0).float().sum_dim(0).reshape([dict]); // tokens per latent
    r.since = r.since.clone().add_scalar(b as i64).clamp_max(r.cap).mask_fill(active.clone().greater_elem(0.0), 0);
    Ok(ResidentOutput {
        loss: loss.inner(),
        recon: recon.inner(),
        aux: Tensor::zeros([1], &device),
        err: err.inner(),
        blocks: 2,
        picks: active.sum(),
        min_kept: Tensor::full([1], f32::INFINITY, &device),
        grads,
    })
}

/// A pick set from device picks: `latents` entries out of `0..dict` are empty slots (value 0, no
/// gradient, in no latent segment); the latent segments come from a counting sort on the device.
fn device_set(
    token_offsets: Tensor<1, Int>,
    tokens: Tensor<1, Int>,
    latents: Tensor<1, Int>,
    f: &Tensor<2>,
    dict: usize,
) -> (Set, Tensor<1, Int>, Tensor<1, Bool>) {
    let [_, width] = f.dims();
    let (latent_offsets, by_latent) = latent_segments(&latents, dict);
    let valid = latents.clone().lower_elem(dict as i64).bool_and(latents.clone().greater_equal_elem(0));
    let latents = latents.clamp(0, dict as i64 - 1);
    let flat = tokens.clone().mul_scalar(width as i64) + latents.clone();
    let values = f.clone().reshape([f.dims()[0] * width]).select(0, flat.clone()) * valid.clone().float();
    let empty = valid.clone().bool_not();
    let set = Set { tokens, latents, values, token_offsets, by_latent, latent_offsets, valid: Some(valid.float()) };
    (set, flat, empty)
}

/// AuxK's picks on the device: per token, the top k_aux = min(d/2, #dead) dead latents with a
/// positive score (`row_topk`, a per-row radix select), as a fixed `[B · min(d/2, D)]` set whose
/// unused slots are empty; and their decode ε̂.
fn aux_picks(
    f: &Tensor<2>,
    scores: &Tensor<2>,
    dead: Tensor<1, Bool>,
    d: usize,
    p: &Params,
    r: &mut Resident,
) -> Result<(Set, Tensor<2>)> {
    let [b, dict] = scores.dims();
    let device = scores.device();
    let k = (d / 2).min(dict).max(1);
    let candidate = f.clone().greater_elem(0.0).bool_and(dead.reshape([1, dict]).expand([b, dict]));
    // Non-candidates score 0: the per-row selection takes positive scores only (empty slots, where
    // a row has fewer than k dead latents with a positive score, get latent `dict`).
    let masked = scores.clone().mask_fill(candidate.bool_not(), 0.0);
    let latents = row_topk(&masked, k);
    // Slot s belongs to token s / k: a fixed layout, uploaded once (burn's arange is a cumsum,
    // quadratic on the device).
    let layout = match r.aux_layout.take() {
        Some(l) if l.0 == (b, k) => l,
        _ => {
            let ints = |v: Vec<i64>| {
                let n = v.len();
                Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
            };
            (
                (b, k),
                ints((0..b * k).map(|s| (s / k) as i64).collect()),
                ints((0..=b).map(|t| (t * k) as i64).collect()),
            )
        }
    };
    let set = device_set(layout.2.clone(), layout.1.clone(), latents, f, dict).0;
    r.aux_layout = Some(layout);
    let e_hat = set.decode(&p.w_dec);
    Ok((set, e_hat))
}

/// Scales the gradients so their global norm is at most `max`, without reading the norm back.
pub fn clip(g: [Tensor<2>; 4], max: Option<f64>) -> [Tensor<2>; 4] {
    let Some(max) = max else { return g };
    let parts: Vec<Tensor<1>> = g.iter().map(|t| t.clone().square().sum()).collect();
    let norm = Tensor::cat(parts, 0).sum().sqrt();
    let scale = norm.recip().mul_scalar(max).clamp_max(1.0).reshape([1, 1]);
    g.map(|t| t * scale.clone())
}

impl ResidentOutput {
    /// The step's loss (recon + α·aux when AuxK counts).
    pub fn loss(&self) -> Tensor<1> {
        self.loss.clone()
    }

    /// The smallest kept score (∞ when nothing was kept).
    pub fn min_kept(&self) -> Tensor<1> {
        self.min_kept.clone()
    }

    /// θ's update from this step's smallest kept score.
    pub fn update_threshold(&self, r: &mut Resident, step: u64, start: u64) {
        r.update_threshold(self.min_kept.clone(), step, start);
    }

    /// The metrics line, in one read: loss terms, FVE's variances, L0 and the dead count.
    pub fn metrics(
        &self,
        x: &Tensor<2>,
        r: &Resident,
        cfg: &TrainConfig,
        step: u64,
        tokens: u64,
        lr: f64,
    ) -> Result<StepMetrics> {
        let [b, width] = x.dims();
        let blocks = self.blocks;
        let dead = r.since.clone().greater_equal_elem(cfg.dead_tokens as i64).float().sum();
        let [var_x, var_err] = [x, &self.err].map(|t| fve_blocks_of(t, blocks, width / blocks));
        let packed = Tensor::cat(
            vec![self.loss.clone(), self.recon.clone(), self.aux.clone(), self.picks.clone(), dead, var_x, var_err],
            0,
        );
        // [loss, recon, aux, picks, dead, var_x (blocks), var_err (blocks)]; an SAE's one FVE fills
        // both fields.
        let v = read_vec(packed)?;
        let fve = |m: usize| {
            let m = m.min(blocks - 1);
            1.0 - v[5 + blocks + m] as f64 / (v[5 + m] as f64).max(1e-30)
        };
        let dict = r.since.dims()[0];
        Ok(StepMetrics {
            step,
            tokens,
            loss: v[0] as f64,
            recon: v[1] as f64,
            aux: v[2] as f64,
            l0: v[3] as f64 / b as f64,
            fve_base: fve(0),
            fve_chat: fve(1),
            dead_frac: v[4] as f64 / dict as f64,
            lr,
            val_fve_base: None,
            val_fve_chat: None,
        })
    }
}
