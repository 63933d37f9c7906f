//! Crosscoder training (shared/spec/method.md §2): L1 or BatchTopK, Adam with linear warm-up,
//! gradient-norm clipping, AuxK with dead-latent counters, the EMA inference threshold, optional
//! k annealing; checkpoints that resume to the same loss curve.

pub mod host_sparse;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, IndexingUpdateOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::crosscoder::{
    Crosscoder, CrosscoderConfig, Kind, Params, aux_loss, decode, encode, geometric_median, read_vec, recon_loss,
    select_aux, select_batch_topk, tensor,
};
use crate::io::{LazyTensor, f32_bytes, write_atomic, write_safetensors_streaming};
use crate::activations::reader::PairBatch;

/// Anything that yields training batches: the cache reader, the on-the-fly source, synthetic data.
pub trait PairSource {
    fn next_batch(&mut self) -> Result<Option<PairBatch>>;

    /// Skips `n` batches (resume); the default draws and drops them, which replays the stream exactly.
    fn skip_batches(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            if self.next_batch()?.is_none() {
                bail!("the data ended while skipping to the checkpoint's position");
            }
        }
        Ok(())
    }
}

impl PairSource for crate::activations::reader::CacheReader {
    fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        crate::activations::reader::CacheReader::next_batch(self)
    }
}

impl PairSource for crate::activations::onthefly::OnTheFlySource {
    fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        crate::activations::onthefly::OnTheFlySource::next_batch(self)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub kind: Kind,
    pub dict_size: usize,
    pub k: usize,
    pub mu: f64,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The inference threshold θ is updated on steps after this one.
    pub threshold_start: u64,
    pub steps: u64,
    pub aux_alpha: f64,
    /// A latent is dead after this many tokens without being selected.
    pub dead_tokens: u64,
    /// Per-latent encoder column norm at init (L1: 0.005, BatchTopK: 1.0 by default).
    pub init_norm: f64,
    pub k_anneal_from: Option<usize>,
    pub k_anneal_steps: u64,
    pub squared_recon: bool,
    /// Clip the global gradient norm to this (BatchTopK: 1.0).
    pub clip_grad: Option<f64>,
    /// BatchTopK: decode and back-propagate through the selected (token, latent) entries only
    /// (k·B of B·D); `false` runs the dense reference computation.
    #[serde(default = "yes")]
    pub sparse: bool,
    /// Run the sparse decoder and its backward through crossdiff's own kernels: plain host loops
    /// on the CPU (flex, `sparse_cpu`), the WGSL kernels on wgpu (`kernels`); `false` takes the
    /// autodiff route through burn's generic gather/scatter.
    #[serde(default = "yes")]
    pub cpu_kernels: bool,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    pub val_every: u64,
}

/// The recipe's defaults (shared/spec/method.md §2): one place for the engine, the CLI's flags and
/// the app's fields.
pub mod defaults {
    pub const K: usize = 100;
    pub const MU: f64 = 0.041;
    pub const LR: f64 = 1e-4;
    pub const WARMUP_STEPS: u64 = 1000;
    pub const THRESHOLD_START: u64 = 1000;
    pub const STEPS: u64 = 10_000;
    pub const AUX_ALPHA: f64 = 1.0 / 32.0;
    pub const DEAD_TOKENS: u64 = 10_000_000;
    pub const INIT_NORM_L1: f64 = 0.005;
    pub const INIT_NORM_BATCHTOPK: f64 = 1.0;
    pub const CHECKPOINT_EVERY: u64 = 1000;
    pub const LOG_EVERY: u64 = 10;
    pub const BATCH: usize = 2048;
    /// D = 32 × d, the paper's dictionary size (73,728 for Gemma 2 2B).
    pub const EXPANSION: usize = 32;
    pub const SHUFFLE_TOKENS: usize = 262_144;
}

impl TrainConfig {
    pub fn defaults(kind: Kind, dict_size: usize) -> Self {
        use defaults::*;
        Self {
            kind,
            dict_size,
            k: K,
            mu: MU,
            lr: LR,
            warmup_steps: WARMUP_STEPS,
            threshold_start: THRESHOLD_START,
            steps: STEPS,
            aux_alpha: AUX_ALPHA,
            dead_tokens: DEAD_TOKENS,
            init_norm: Self::default_init_norm(kind),
            k_anneal_from: None,
            k_anneal_steps: 0,
            squared_recon: false,
            clip_grad: if kind == Kind::BatchTopK { Some(1.0) } else { None },
            sparse: true,
            cpu_kernels: true,
            seed: 0,
            checkpoint_every: CHECKPOINT_EVERY,
            log_every: LOG_EVERY,
            val_every: 0,
        }
    }

    /// Encoder column norm at init: 0.005 for L1, 1.0 for BatchTopK.
    pub fn default_init_norm(kind: Kind) -> f64 {
        if kind == Kind::L1 { defaults::INIT_NORM_L1 } else { defaults::INIT_NORM_BATCHTOPK }
    }

    /// k at a (1-based) step, with optional linear annealing from `k_anneal_from`.
    pub fn k_at(&self, step: u64) -> usize {
        match self.k_anneal_from {
            Some(from) if self.k_anneal_steps > 0 && from > self.k => {
                let t = ((step.saturating_sub(1)) as f64 / self.k_anneal_steps as f64).min(1.0);
                (from as f64 - (from - self.k) as f64 * t).round() as usize
            }
            _ => self.k,
        }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 { self.lr } else { self.lr * (step as f64 / self.warmup_steps as f64).min(1.0) }
    }
}

fn yes() -> bool {
    true
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

/// Everything a step changes; what a checkpoint stores.
pub struct TrainState {
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    pub step: u64,
    pub tokens: u64,
    /// Tokens since each latent was last selected.
    pub since_selected: Vec<u64>,
    pub threshold: Option<f32>,
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: u64,
    tokens: u64,
    threshold: Option<f32>,
    weights: String,
    config: TrainConfig,
    d: usize,
}

/// The loss terms of one step (before the optimiser), exposed for tests.
pub struct StepOutput {
    pub loss: Tensor<1>,
    pub recon: Tensor<1>,
    pub aux: Option<Tensor<1>>,
    /// Active latents per token, summed over the batch (for L0).
    pub l0_total: f64,
    pub err: Tensor<2>,
    /// Entries kept by BatchTopK (0/1, `[B, D]` on the host; empty when the selection ran on the
    /// device) and the smallest kept score.
    pub kept: Option<(Vec<f32>, Option<f32>)>,
    grads: GradPlan,
}

/// How the parameter gradients come out of `loss.backward()`.
enum GradPlan {
    /// Every parameter is tracked by autodiff.
    Dense(Params),
    /// Sparse BatchTopK: the decoder is tracked; the selected code values are autodiff leaves,
    /// and the encoder gradient is assembled from their gradients (ReLU' = 1 on selected entries).
    Sparse { w_dec: Tensor<2>, b_dec: Tensor<2>, x: Tensor<2>, picks: Vec<Picks>, dict: usize },
    /// Computed directly (the CPU sparse path).
    Ready([Tensor<2>; 4]),
}

/// Selected (token, latent) entries and their code values as an autodiff leaf `[n, 1]`.
struct Picks {
    tokens: Tensor<1, burn::tensor::Int>,
    latents: Tensor<1, burn::tensor::Int>,
    values: Tensor<2>,
}

impl StepOutput {
    /// Back-propagates the loss; gradients for (w_enc, b_enc, w_dec, b_dec), without autodiff.
    pub fn gradients(&self) -> Result<[Tensor<2>; 4]> {
        if let GradPlan::Ready(g) = &self.grads {
            return Ok(g.clone());
        }
        let grads = self.loss.backward();
        let grad =
            |t: &Tensor<2>| t.grad(&grads).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for a parameter"));
        match &self.grads {
            GradPlan::Dense(p) => Ok([grad(&p.w_enc)?, grad(&p.b_enc)?, grad(&p.w_dec)?, grad(&p.b_dec)?]),
            GradPlan::Ready(_) => unreachable!("returned above"),
            GradPlan::Sparse { w_dec, b_dec, x, picks, dict } => {
                let [_, two_d] = x.dims();
                let device = x.device();
                let mut g_w_enc_t = Tensor::<2>::zeros([*dict, two_d], (&device, burn::tensor::DType::F32));
                let mut g_b_enc = Tensor::<2>::zeros([*dict, 1], (&device, burn::tensor::DType::F32));
                for pk in picks {
                    let g = grad(&pk.values)?; // dL/df for the picked entries, [n, 1]
                    let rows = x.clone().select(0, pk.tokens.clone()) * g.clone();
                    g_w_enc_t = g_w_enc_t.select_assign(0, pk.latents.clone(), rows, IndexingUpdateOp::Add);
                    g_b_enc = g_b_enc.select_assign(0, pk.latents.clone(), g, IndexingUpdateOp::Add);
                }
                Ok([g_w_enc_t.transpose(), g_b_enc.reshape([1, *dict]), grad(w_dec)?, grad(b_dec)?])
            }
        }
    }
}

/// The forward pass and loss of one batch, with the dead-latent bookkeeping of the spec:
/// counters are updated with this batch's selection first, then the dead set is read for AuxK.
pub fn step_loss(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    if cfg.kind == Kind::BatchTopK && cfg.sparse {
        return sparse_topk_step(cfg, p, x, step, since_selected);
    }
    let (d, dict) = p.dims();
    let [b, _] = x.dims();
    let p = p.clone().map(|t| t.autodiff().require_grad());
    let x = x.autodiff();
    let f = encode(&p, x.clone());
    match cfg.kind {
        Kind::L1 => {
            let codes = f.clone();
            let err = x - decode(&p, codes.clone());
            let recon = recon_loss(err.clone(), d, cfg.squared_recon);
            let sparsity = (f * p.norm_sum()).sum_dim(1).mean().mul_scalar(cfg.mu);
            let active = read_vec(codes.detach().greater_elem(0.0).float().sum_dim(0))?;
            update_counters(since_selected, &active, b);
            Ok(StepOutput {
                loss: recon.clone() + sparsity,
                recon,
                aux: None,
                l0_total: active.iter().map(|&a| a as f64).sum(),
                err,
                kept: None,
                grads: GradPlan::Dense(p),
            })
        }
        Kind::BatchTopK => {
            let scores = read_vec(f.clone().detach() * p.norm_sum().detach())?;
            let keep = cfg.k_at(step) * b;
            let (mask, min_kept) = select_batch_topk(&scores, keep);
            let device = f.device();
            let codes = f.clone() * tensor(mask.clone(), [b, dict], &device);
            let err = x - decode(&p, codes);
            let recon = recon_loss(err.clone(), d, cfg.squared_recon);
            let selected = per_latent(&mask, dict);
            update_counters(since_selected, &selected, b);
            let dead: Vec<bool> = since_selected.iter().map(|&c| c >= cfg.dead_tokens).collect();
            let n_dead = dead.iter().filter(|&&x| x).count();
            let mut loss = recon.clone();
            let mut aux = None;
            if n_dead > 0 {
                let k_aux = (d / 2).min(n_dead);
                let aux_mask = select_aux(&scores, dict, &dead, k_aux);
                let e_hat = (f * tensor(aux_mask, [b, dict], &device)).matmul(p.w_dec.clone());
                let a = aux_loss(err.clone().detach(), e_hat);
                let value = read_vec(a.clone())?[0];
                // NaN (no variance, or nothing fired) contributes nothing.
                let a = if value.is_finite() { a } else { a.mul_scalar(0.0).detach() };
                loss = loss + a.clone().mul_scalar(cfg.aux_alpha);
                aux = Some(a);
            }
            let l0_total = selected.iter().map(|&a| a as f64).sum();
            Ok(StepOutput { loss, recon, aux, l0_total, err, kept: Some((mask, min_kept)), grads: GradPlan::Dense(p) })
        }
    }
}

/// The sparse BatchTopK step on the host (flex): selection, decode, loss, and every gradient by
/// plain loops (`sparse_cpu`); only the dense encoder matmul runs through burn.
fn host_sparse_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    use crate::crosscoder::train::host_sparse::{HostPicks, accumulate_by_latent, decode_into, pick_grads, select_topk, transpose};
    let (d, dict) = p.dims();
    let [b, two_d] = x.dims();
    let device = x.device();
    let f = read_vec(encode(p, x.clone()))?;
    let norms = read_vec(p.norm_sum())?;
    let (main, selected, mask, min_kept) = select_topk(&f, &norms, dict, cfg.k_at(step) * b);
    update_counters(since_selected, &selected, b);
    let dead: Vec<bool> = since_selected.iter().map(|&c| c >= cfg.dead_tokens).collect();
    let n_dead = dead.iter().filter(|&&v| v).count();
    let xh = read_vec(x)?;
    let w_dec = read_vec(p.w_dec.clone())?;
    let b_dec = read_vec(p.b_dec.clone())?;

    let mut recon: Vec<f32> = (0..b).flat_map(|_| b_dec.iter().copied()).collect();
    decode_into(&mut recon, &main, &w_dec, two_d);
    let err: Vec<f32> = xh.iter().zip(&recon).map(|(a, r)| a - r).collect();
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
    if n_dead > 0 {
        let scores: Vec<f32> = f.iter().enumerate().map(|(i, v)| v * norms[i % dict]).collect();
        let aux_mask = select_aux(&scores, dict, &dead, (d / 2).min(n_dead));
        let picks = HostPicks::from_mask(&f, &aux_mask, dict);
        let mut e_hat = vec![0.0f32; b * two_d];
        decode_into(&mut e_hat, &picks, &w_dec, two_d);
        let mut mean = vec![0.0f64; two_d];
        for row in err.chunks_exact(two_d) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64 / b as f64);
        }
        let den: f64 = err
            .chunks_exact(two_d)
            .map(|r| r.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>())
            .sum::<f64>()
            / b as f64;
        let num: f64 = err.iter().zip(&e_hat).map(|(e, h)| (*e as f64 - *h as f64).powi(2)).sum::<f64>() / b as f64;
        let a = num / den;
        aux_value = Some(a);
        if a.is_finite() {
            loss += cfg.aux_alpha * a;
            // ∂(α·num/den)/∂ê = −2α(e − ê)/(B·den); e is detached.
            let k = (-2.0 * cfg.aux_alpha / (b as f64 * den)) as f32;
            g_aux = err.iter().zip(&e_hat).map(|(e, h)| k * (e - h)).collect();
            aux_picks = Some(picks);
        }
    }
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
    Ok(StepOutput {
        loss: scalar(loss),
        recon: scalar(recon_loss),
        aux: aux_value.map(scalar),
        l0_total: selected.iter().map(|&a| a as f64).sum(),
        err: tensor(err, [b, two_d], &device),
        kept: Some((mask, min_kept)),
        grads: GradPlan::Ready([
            tensor(grad_w_enc, [two_d, dict], &device),
            tensor(grad_b_enc, [1, dict], &device),
            tensor(grad_w_dec, [dict, two_d], &device),
            tensor(grad_b_dec, [1, two_d], &device),
        ]),
    })
}

/// The entries of a 0/1 mask over `[B, D]`, with their code values as an autodiff leaf.
fn pick(f: &[f32], mask: &[f32], dict: usize, device: &Device, ad: &Device) -> Picks {
    let (mut ts, mut js, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &on) in mask.iter().enumerate() {
        if on > 0.0 {
            ts.push((i / dict) as i64);
            js.push((i % dict) as i64);
            vs.push(f[i]);
        }
    }
    let n = vs.len();
    Picks {
        tokens: Tensor::from_data(burn::tensor::TensorData::new(ts, [n]), device),
        latents: Tensor::from_data(burn::tensor::TensorData::new(js, [n]), device),
        values: tensor(vs, [n, 1], ad).require_grad(),
    }
}

/// BatchTopK's selection without reading the B×D scores back: the WGSL histogram search finds the
/// k·B-th largest score, a comparison makes the mask, and the picked entries are gathered on the
/// device. `None` when the host must decide (ties split at the threshold, or nothing positive).
struct DeviceSelection {
    tokens: Tensor<1, burn::tensor::Int>,
    latents: Tensor<1, burn::tensor::Int>,
    values: Tensor<1>,
    selected: Vec<f32>,
    min_kept: Option<f32>,
}

fn select_on_device(
    f: &Tensor<2>,
    norms: &Tensor<2>,
    keep: usize,
    b: usize,
    dict: usize,
) -> Result<Option<DeviceSelection>> {
    let a = f.clone() * norms.clone();
    let count = |m: Tensor<2, burn::tensor::Bool>| -> Result<usize> { Ok(read_vec(m.float().sum())?[0] as usize) };
    let (mask, min_kept) = match crate::crosscoder::kernels::kth_largest(&a.clone().reshape([b * dict]), keep)? {
        None => {
            let positive = a.clone().greater_elem(0.0);
            if count(positive.clone())? == 0 {
                return Ok(None);
            }
            let min = read_vec(a.clone().mask_fill(a.clone().lower_equal_elem(0.0), f32::INFINITY).min())?[0];
            (positive, Some(min))
        }
        Some((threshold, above)) => {
            if above + count(a.clone().equal_elem(threshold))? != keep {
                return Ok(None);
            }
            (a.greater_equal_elem(threshold), Some(threshold))
        }
    };
    let idx = mask.clone().argwhere(); // [n, 2]: (token, latent)
    let n = idx.dims()[0];
    let tokens = idx.clone().narrow(1, 0, 1).reshape([n]);
    let latents = idx.narrow(1, 1, 1).reshape([n]);
    let flat = tokens.clone().mul_scalar(dict as i64) + latents.clone();
    let values = f.clone().reshape([b * dict]).select(0, flat);
    let selected = read_vec(mask.float().sum_dim(0))?;
    Ok(Some(DeviceSelection { tokens, latents, values, selected, min_kept }))
}

/// Per-segment offsets (`len + 1` entries) from per-segment counts.
fn offsets_from_counts(counts: impl Iterator<Item = usize>) -> Vec<i64> {
    let mut out = vec![0i64];
    for c in counts {
        out.push(out[out.len() - 1] + c as i64);
    }
    out
}

/// The sparse BatchTopK step on wgpu with the hand-written kernels: the selection from
/// [`select_on_device`], then decode, ∂L/∂f and the decoder/encoder gradients through
/// `segment_rows` and `pick_dot` (`shaders/`), touching only the selected entries' rows; the loss
/// derivative itself is a few plain tensor ops. AuxK's rare picks come from the host selection.
fn kernel_sparse_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    f_dev: &Tensor<2>,
    sel: DeviceSelection,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    use crate::crosscoder::kernels::{pick_dot, segment_rows};
    use burn::tensor::{Int, TensorData};
    let (d, dict) = p.dims();
    let [b, two_d] = x.dims();
    let device = x.device();
    let ints = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
    update_counters(since_selected, &sel.selected, b);
    let dead: Vec<bool> = since_selected.iter().map(|&c| c >= cfg.dead_tokens).collect();
    let n_dead = dead.iter().filter(|&&v| v).count();

    // A pick set sorted by token (segments = tokens) and the same entries sorted by latent.
    struct Set {
        tokens: Tensor<1, Int>,
        latents: Tensor<1, Int>,
        values: Tensor<1>,
        token_offsets: Tensor<1, Int>,
        by_latent: Tensor<1, Int>,
        latent_offsets: Tensor<1, Int>,
    }
    let make_set =
        |tokens: Tensor<1, Int>, latents: Tensor<1, Int>, values: Tensor<1>, per_latent: &[f32]| -> Result<Set> {
            let t = tokens.clone().try_into_vec_as::<i64>().map_err(|e| anyhow!("{e:?}"))?;
            let mut per_token = vec![0usize; b];
            t.iter().for_each(|&v| per_token[v as usize] += 1);
            Ok(Set {
                token_offsets: ints(offsets_from_counts(per_token.into_iter())),
                by_latent: latents.clone().argsort(0),
                latent_offsets: ints(offsets_from_counts(per_latent.iter().map(|&c| c as usize))),
                tokens,
                latents,
                values,
            })
        };
    let decode = |s: &Set| segment_rows(&s.token_offsets, &s.latents, &s.values, &p.w_dec);
    let main = make_set(sel.tokens, sel.latents, sel.values, &sel.selected)?;
    let err = x.clone() - (decode(&main) + p.b_dec.clone());
    // ∂L/∂ĥ of the reconstruction term.
    let (recon, g) = if cfg.squared_recon {
        (err.clone().square().sum().mul_scalar(0.5 / b as f64), err.clone().mul_scalar(-1.0 / b as f64))
    } else {
        let norms = err.clone().reshape([b, 2, d]).square().sum_dim(2).sqrt(); // [B, 2, 1]
        let g = err.clone().reshape([b, 2, d]) / norms.clone().clamp_min(1e-30).mul_scalar(-2.0 * b as f64);
        (norms.mean(), g.reshape([b, two_d]))
    };
    let mut loss = recon.clone();
    let mut aux = None;
    let mut sets = vec![(main, g.clone())];
    if n_dead > 0 {
        let f = read_vec(f_dev.clone())?;
        let norms = read_vec(p.norm_sum())?;
        let scores: Vec<f32> = f.iter().enumerate().map(|(i, v)| v * norms[i % dict]).collect();
        let aux_mask = select_aux(&scores, dict, &dead, (d / 2).min(n_dead));
        let (mut ts, mut ls, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &m) in aux_mask.iter().enumerate() {
            if m > 0.0 {
                ts.push((i / dict) as i64);
                ls.push((i % dict) as i64);
                vs.push(f[i]);
            }
        }
        let e = err.clone();
        let e_hat = if vs.is_empty() {
            e.clone().zeros_like()
        } else {
            let per = per_latent(&aux_mask, dict);
            let n = vs.len();
            let set = make_set(ints(ts), ints(ls), tensor(vs, [n], &device), &per)?;
            let e_hat = decode(&set);
            sets.push((set, e_hat.clone()));
            e_hat
        };
        let centered = e.clone() - e.clone().mean_dim(0);
        let den = read_vec(centered.square().sum_dim(1).mean())?[0] as f64;
        let a = aux_loss(e.clone(), e_hat.clone());
        let value = read_vec(a.clone())?[0];
        if value.is_finite() {
            loss = loss + a.clone().mul_scalar(cfg.aux_alpha);
            if let Some((_, g_aux)) = sets.get_mut(1) {
                // ∂(α·num/den)/∂ê = −2α(e − ê)/(B·den); e is detached.
                *g_aux = (e - e_hat).mul_scalar(-2.0 * cfg.aux_alpha / (b as f64 * den));
            }
        } else {
            sets.truncate(1);
        }
        aux = Some(a);
    }
    // Gradients, per pick set: ∂L/∂f = W_dec[l] · g[t]; rows of W_dec and columns of W_enc.
    let mut grad_w_dec = Tensor::<2>::zeros([dict, two_d], &device);
    let mut grad_enc_t = Tensor::<2>::zeros([dict, two_d], &device);
    let mut grad_b_enc = Tensor::<2>::zeros([dict, 1], &device);
    for (s, gs) in &sets {
        let n = s.values.dims()[0];
        let grad_v = pick_dot(&s.latents, &s.tokens, &p.w_dec, gs);
        let tokens_by_l = s.tokens.clone().select(0, s.by_latent.clone());
        grad_w_dec = grad_w_dec
            + segment_rows(&s.latent_offsets, &tokens_by_l, &s.values.clone().select(0, s.by_latent.clone()), gs);
        grad_enc_t = grad_enc_t
            + segment_rows(&s.latent_offsets, &tokens_by_l, &grad_v.clone().select(0, s.by_latent.clone()), &x);
        grad_b_enc = grad_b_enc.select_assign(0, s.latents.clone(), grad_v.reshape([n, 1]), IndexingUpdateOp::Add);
    }
    let grad_b_dec = sets[0].1.clone().sum_dim(0);
    Ok(StepOutput {
        loss,
        recon,
        aux,
        l0_total: sel.selected.iter().map(|&a| a as f64).sum(),
        err,
        kept: Some((Vec::new(), sel.min_kept)),
        grads: GradPlan::Ready([grad_enc_t.transpose(), grad_b_enc.reshape([1, dict]), grad_w_dec, grad_b_dec]),
    })
}

/// BatchTopK with the sparse decoder: the encoder runs dense (no autodiff), then only the k·B
/// selected entries (and AuxK's picks) are decoded and back-propagated and the encoder gradient is
/// assembled from them. Routes: host loops on flex ([`host_sparse_step`]), the WGSL kernels on
/// wgpu ([`kernel_sparse_step`]), and otherwise (CUDA, or `cpu_kernels = false`) burn's
/// `select`/`select_assign` under autodiff — the reference the others are tested against.
fn sparse_topk_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    let (d, dict) = p.dims();
    let [b, two_d] = x.dims();
    let device = x.device();
    if cfg.cpu_kernels && crate::crosscoder::kernels::is_flex(&device) {
        return host_sparse_step(cfg, p, x, step, since_selected);
    }
    let ad = device.clone().autodiff();
    let keep = cfg.k_at(step) * b;
    let f_dev = encode(p, x.clone());
    // Host copies of the codes and scores: the host selection needs them, and AuxK does when
    // something is dead; the device selection (wgpu) reads back only per-latent counts.
    let read_host = || -> Result<(Vec<f32>, Vec<f32>)> {
        let f = read_vec(f_dev.clone())?;
        let norms = read_vec(p.norm_sum())?;
        let scores = f.iter().enumerate().map(|(i, v)| v * norms[i % dict]).collect();
        Ok((f, scores))
    };
    let on_device =
        if crate::crosscoder::kernels::is_wgpu(&device) { select_on_device(&f_dev, &p.norm_sum(), keep, b, dict)? } else { None };
    let on_device = match on_device {
        Some(sel) if cfg.cpu_kernels => return kernel_sparse_step(cfg, p, x, &f_dev, sel, since_selected),
        other => other,
    };
    let mut host: Option<(Vec<f32>, Vec<f32>)> = None;
    let (main, selected, mask, min_kept) = match on_device {
        Some(sel) => {
            let n = sel.values.dims()[0];
            let picks = Picks {
                tokens: sel.tokens,
                latents: sel.latents,
                values: sel.values.reshape([n, 1]).autodiff().require_grad(),
            };
            (picks, sel.selected, Vec::new(), sel.min_kept)
        }
        None => {
            let (f, scores) = read_host()?;
            let (mask, min_kept) = select_batch_topk(&scores, keep);
            let selected = per_latent(&mask, dict);
            let picks = pick(&f, &mask, dict, &device, &ad);
            host = Some((f, scores));
            (picks, selected, mask, min_kept)
        }
    };
    update_counters(since_selected, &selected, b);
    let dead: Vec<bool> = since_selected.iter().map(|&c| c >= cfg.dead_tokens).collect();
    let n_dead = dead.iter().filter(|&&v| v).count();

    let w_dec = p.w_dec.clone().autodiff().require_grad();
    let b_dec = p.b_dec.clone().autodiff().require_grad();
    // Σ over picks of f · d_j, accumulated into each picked token's row.
    let decode_picks = |pk: &Picks| -> Tensor<2> {
        let rows = w_dec.clone().select(0, pk.latents.clone().autodiff()) * pk.values.clone();
        Tensor::<2>::zeros([b, two_d], (&ad, burn::tensor::DType::F32)).select_assign(
            0,
            pk.tokens.clone().autodiff(),
            rows,
            IndexingUpdateOp::Add,
        )
    };
    let xa = x.clone().autodiff();
    let err = xa - (decode_picks(&main) + b_dec.clone());
    let recon = recon_loss(err.clone(), d, cfg.squared_recon);
    let mut loss = recon.clone();
    let mut aux = None;
    let mut picks = vec![main];
    if n_dead > 0 {
        let (f, scores) = match host.take() {
            Some(h) => h,
            None => read_host()?,
        };
        let aux_mask = select_aux(&scores, dict, &dead, (d / 2).min(n_dead));
        if aux_mask.iter().any(|&m| m > 0.0) {
            let aux_picks = pick(&f, &aux_mask, dict, &device, &ad);
            let a = aux_loss(err.clone().detach(), decode_picks(&aux_picks));
            let value = read_vec(a.clone())?[0];
            if value.is_finite() {
                loss = loss + a.clone().mul_scalar(cfg.aux_alpha);
                picks.push(aux_picks);
            }
            aux = Some(a);
        } else {
            // Dead latents exist but none fired: ε̂ = 0, a constant with no gradient.
            let a = aux_loss(err.clone().detach(), err.clone().detach().zeros_like());
            if read_vec(a.clone())?[0].is_finite() {
                loss = loss + a.clone().mul_scalar(cfg.aux_alpha);
            }
            aux = Some(a);
        }
    }
    let l0_total = selected.iter().map(|&a| a as f64).sum();
    Ok(StepOutput {
        loss,
        recon,
        aux,
        l0_total,
        err,
        kept: Some((mask, min_kept)),
        grads: GradPlan::Sparse { w_dec, b_dec, x, picks, dict },
    })
}

/// Column sums of a row-major `[B, D]` 0/1 mask (row-major pass: a strided one misses the cache).
fn per_latent(mask: &[f32], dict: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; dict];
    for row in mask.chunks_exact(dict) {
        out.iter_mut().zip(row).for_each(|(o, m)| *o += m);
    }
    out
}

fn update_counters(since: &mut [u64], selected_per_latent: &[f32], batch: usize) {
    for (c, &s) in since.iter_mut().zip(selected_per_latent) {
        if s > 0.0 { *c = 0 } else { *c += batch as u64 }
    }
}

/// θ's update rule: first minimum, then an EMA with weight 0.001 on steps after `threshold_start`.
pub fn update_threshold(theta: Option<f32>, min_kept: Option<f32>, step: u64, start: u64) -> Option<f32> {
    if step <= start {
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
    let var =
        |t: Tensor<2>| -> Result<Vec<f32>> { read_vec(t.detach().var(0).reshape([2, d]).sum_dim(1).reshape([2])) };
    let (total, resid) = (var(x.clone())?, var(err.clone())?);
    Ok([0, 1].map(|m| 1.0 - resid[m] as f64 / total[m].max(1e-30) as f64))
}

/// Training progress for a bar or the app's curves.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    pub metrics: StepMetrics,
    pub total_steps: u64,
}

pub struct TrainRun<'a> {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub device: Device,
    pub source: &'a mut dyn PairSource,
    /// Validation pairs `[n, 2, d]` for `val_every`.
    pub validation: Option<PairBatch>,
    pub layer: Option<usize>,
    pub models: Vec<String>,
    /// Width d of one model's activations.
    pub width: usize,
}

impl TrainRun<'_> {
    /// Trains (resuming from `out/checkpoint` when present) until `steps` or the data ends, or until
    /// `keep_going` says stop; checkpoints and exports the crosscoder on the way out.
    pub fn run(
        &mut self,
        mut progress: impl FnMut(TrainProgress),
        keep_going: impl Fn() -> bool,
    ) -> Result<Crosscoder> {
        let cfg = self.config.clone();
        std::fs::create_dir_all(self.out.join("checkpoint")).map_err(|e| anyhow!("{}: {e}", self.out.display()))?;
        let mut state = match load_checkpoint(&self.out, &cfg, &self.device)? {
            Some(s) => {
                // The checkpoint's stream position: the reader replays the same batches.
                self.source.skip_batches(s.step)?;
                trim_metrics(&self.out, s.step)?;
                s
            }
            None => {
                let _ = std::fs::remove_file(self.out.join("metrics.jsonl"));
                self.fresh_state()?
            }
        };
        let (d, dict) = state.params.dims();
        let mut metrics_file =
            std::fs::OpenOptions::new().create(true).append(true).open(self.out.join("metrics.jsonl"))?;
        let mut first_batch = state.step == 0;
        while state.step < cfg.steps && keep_going() {
            let Some(batch) = self.source.next_batch()? else { break };
            if batch.d != d {
                bail!("the data has width {}, the crosscoder {d}", batch.d);
            }
            let step = state.step + 1;
            if first_batch && cfg.kind == Kind::BatchTopK {
                // b_dec^m := geometric median of the first batch, per model.
                let mut b_dec = Vec::with_capacity(2 * d);
                for m in 0..2 {
                    let rows: Vec<f32> =
                        batch.acts.chunks_exact(2 * d).flat_map(|r| r[m * d..(m + 1) * d].to_vec()).collect();
                    b_dec.extend(geometric_median(&rows, d, 100, 1e-5));
                }
                state.params.b_dec = tensor(b_dec, [1, 2 * d], &self.device);
            }
            first_batch = false;
            let x = tensor(batch.acts, [batch.batch, 2 * d], &self.device);
            let out = step_loss(&cfg, &state.params, x.clone(), step, &mut state.since_selected)?;
            let mut g = out.gradients()?;
            if let Some(max) = cfg.clip_grad {
                let sq: f32 =
                    g.iter().map(|t| read_vec(t.clone().square().sum()).map(|v| v[0])).sum::<Result<f32>>()?;
                let norm = (sq as f64).sqrt();
                if norm > max {
                    g = g.map(|t| t.mul_scalar(max / norm));
                }
            }
            let lr = cfg.lr_at(step);
            adam_step(&mut state, g, lr, step);
            if let Some((_, min_kept)) = &out.kept {
                state.threshold = update_threshold(state.threshold, *min_kept, step, cfg.threshold_start);
            }
            state.step = step;
            state.tokens += batch.batch as u64;

            if step % cfg.log_every.max(1) == 0 || step == cfg.steps {
                let [fb, fc] = fve(&x, &out.err.clone().inner(), d)?;
                let l0 = out.l0_total / batch.batch as f64;
                let mut m = StepMetrics {
                    step,
                    tokens: state.tokens,
                    loss: read_vec(out.loss.detach())?[0] as f64,
                    recon: read_vec(out.recon.detach())?[0] as f64,
                    aux: match out.aux {
                        Some(a) => read_vec(a.detach())?[0] as f64,
                        None => 0.0,
                    },
                    l0,
                    fve_base: fb,
                    fve_chat: fc,
                    dead_frac: state.since_selected.iter().filter(|&&c| c >= cfg.dead_tokens).count() as f64
                        / dict as f64,
                    lr,
                    val_fve_base: None,
                    val_fve_chat: None,
                };
                if cfg.val_every > 0 && step % cfg.val_every == 0 {
                    if let Some(v) = &self.validation {
                        let [vb, vc] = self.validation_fve(&state, v)?;
                        m.val_fve_base = Some(vb);
                        m.val_fve_chat = Some(vc);
                    }
                }
                writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
                metrics_file.flush()?;
                progress(TrainProgress { metrics: m, total_steps: cfg.steps });
            }
            if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                save_checkpoint(&self.out, &cfg, &state)?;
            }
        }
        save_checkpoint(&self.out, &cfg, &state)?;
        let cc = self.export(&state)?;
        Ok(cc)
    }

    fn fresh_state(&self) -> Result<TrainState> {
        let cfg = &self.config;
        let params = Params::init(self.width, cfg.dict_size, cfg.init_norm, cfg.seed, &self.device);
        let zeros = params.clone().map(|t| t.zeros_like());
        Ok(TrainState {
            adam_m: zeros.clone(),
            adam_v: zeros,
            params,
            step: 0,
            tokens: 0,
            since_selected: vec![0; cfg.dict_size],
            threshold: None,
        })
    }

    fn validation_fve(&self, state: &TrainState, v: &PairBatch) -> Result<[f64; 2]> {
        let cc = self.crosscoder(state);
        let d = v.d;
        let x = tensor(v.acts.clone(), [v.batch, 2 * d], &self.device);
        let recon = decode(&cc.params, cc.codes(x.clone()));
        fve(&x, &(x.clone() - recon), d)
    }

    fn crosscoder(&self, state: &TrainState) -> Crosscoder {
        let (d, dict) = state.params.dims();
        Crosscoder {
            config: CrosscoderConfig {
                kind: self.config.kind,
                d,
                dict_size: dict,
                k: self.config.k,
                mu: self.config.mu,
                layer: self.layer,
                models: self.models.clone(),
            },
            params: state.params.clone(),
            threshold: state.threshold,
            file_checksum: None,
        }
    }

    fn export(&self, state: &TrainState) -> Result<Crosscoder> {
        let cc = self.crosscoder(state);
        cc.save(&self.out)?;
        Ok(cc)
    }
}

fn adam_step(state: &mut TrainState, grads: [Tensor<2>; 4], lr: f64, step: u64) {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let c1 = 1.0 - b1.powi(step as i32);
    let c2 = 1.0 - b2.powi(step as i32);
    let update = |p: &mut Tensor<2>, m: &mut Tensor<2>, v: &mut Tensor<2>, g: Tensor<2>| {
        *m = m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        *v = v.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let denom = v.clone().div_scalar(c2).sqrt().add_scalar(eps);
        *p = p.clone() - m.clone().div_scalar(c1).div(denom).mul_scalar(lr);
    };
    let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] = grads;
    let (p, m, v) = (&mut state.params, &mut state.adam_m, &mut state.adam_v);
    update(&mut p.w_enc, &mut m.w_enc, &mut v.w_enc, g_w_enc);
    update(&mut p.b_enc, &mut m.b_enc, &mut v.b_enc, g_b_enc);
    update(&mut p.w_dec, &mut m.w_dec, &mut v.w_dec, g_w_dec);
    update(&mut p.b_dec, &mut m.b_dec, &mut v.b_dec, g_b_dec);
}

const NAMES: [&str; 4] = ["w_enc", "b_enc", "w_dec", "b_dec"];

/// Writes the weights file first (a new name per step), then `state.json` pointing at it: the
/// JSON's atomic rename is the commit point, so a crash leaves the previous checkpoint valid.
fn save_checkpoint(out: &Path, cfg: &TrainConfig, s: &TrainState) -> Result<()> {
    let dir = out.join("checkpoint");
    let (d, _) = s.params.dims();
    let weights = format!("state-{:09}.safetensors", s.step);
    let mut tensors = Vec::new();
    for (prefix, p) in [("param", &s.params), ("adam_m", &s.adam_m), ("adam_v", &s.adam_v)] {
        for (name, t) in NAMES.iter().zip(p.list()) {
            tensors.push(LazyTensor {
                name: format!("{prefix}.{name}"),
                dtype: safetensors::Dtype::F32,
                shape: t.dims().to_vec(),
                bytes: Box::new(move || Ok(f32_bytes(&read_vec(t.clone())?))),
            });
        }
    }
    let since: Vec<u8> = s.since_selected.iter().flat_map(|&c| (c as i64).to_le_bytes()).collect();
    tensors.push(LazyTensor {
        name: "since_selected".into(),
        dtype: safetensors::Dtype::I64,
        shape: vec![s.since_selected.len()],
        bytes: Box::new(move || Ok(since)),
    });
    write_safetensors_streaming(&dir.join(&weights), tensors)?;
    let meta = CheckpointMeta {
        step: s.step,
        tokens: s.tokens,
        threshold: s.threshold,
        weights: weights.clone(),
        config: cfg.clone(),
        d,
    };
    let text = serde_json::to_string_pretty(&meta)?;
    write_atomic(&dir.join("state.json"), |f| Ok(f.write_all(text.as_bytes())?))?;
    for entry in fs_err::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("state-") && name != weights {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn load_checkpoint(out: &Path, cfg: &TrainConfig, device: &Device) -> Result<Option<TrainState>> {
    let dir = out.join("checkpoint");
    let path = dir.join("state.json");
    if !path.exists() {
        return Ok(None);
    }
    let meta: CheckpointMeta =
        serde_json::from_str(&fs_err::read_to_string(&path)?).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut same = meta.config.clone();
    same.steps = cfg.steps;
    if &same != cfg {
        bail!(
            "{}: the run there was started with other settings; re-run the same command to resume it, or choose another --out",
            path.display()
        );
    }
    let file = dir.join(&meta.weights);
    let bytes = std::fs::read(&file).map_err(|e| anyhow!("{}: cannot read: {e}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: corrupt checkpoint: {e}", file.display()))?;
    let get = |name: &str| -> Result<Tensor<2>> {
        let v = st.tensor(name).map_err(|_| anyhow!("{}: missing `{name}`", file.display()))?;
        let shape: [usize; 2] = v.shape().try_into().map_err(|_| anyhow!("{}: `{name}` is not 2-D", file.display()))?;
        let vals = crate::io::decode_f32(v.dtype(), v.data()).map_err(|e| anyhow!("{}: `{name}`: {e}", file.display()))?;
        Ok(tensor(vals, shape, device))
    };
    let params = |prefix: &str| -> Result<Params> {
        Ok(Params {
            w_enc: get(&format!("{prefix}.w_enc"))?,
            b_enc: get(&format!("{prefix}.b_enc"))?,
            w_dec: get(&format!("{prefix}.w_dec"))?,
            b_dec: get(&format!("{prefix}.b_dec"))?,
        })
    };
    let since_view =
        st.tensor("since_selected").map_err(|_| anyhow!("{}: missing `since_selected`", file.display()))?;
    let since = crate::io::decode_i64(since_view.dtype(), since_view.data())
        .map_err(|e| anyhow!("{}: `since_selected`: {e}", file.display()))?
        .into_iter()
        .map(|c| c as u64)
        .collect();
    Ok(Some(TrainState {
        params: params("param")?,
        adam_m: params("adam_m")?,
        adam_v: params("adam_v")?,
        step: meta.step,
        tokens: meta.tokens,
        since_selected: since,
        threshold: meta.threshold,
    }))
}

/// Keeps the metrics lines up to the checkpoint's step (the resumed run writes the rest again).
fn trim_metrics(out: &Path, step: u64) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(&path, |f| Ok(f.write_all(kept.as_bytes())?))
}
