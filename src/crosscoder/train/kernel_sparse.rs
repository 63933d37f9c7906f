//! The kernel route (wgpu, `cpu_kernels`): BatchTopK's selection on the device
//! ([`select_on_device`], also used by the autodiff-sparse route on wgpu), then decode, ∂L/∂f and
//! the decoder/encoder gradients through the hand-written WGSL kernels `segment_rows` and
//! `pick_dot` (`shaders/`), touching only the selected entries' rows; the loss derivative itself is
//! a few plain tensor ops. AuxK's rare picks come from the host selection. An SAE (`kind: sae`)
//! takes the same route with unit scores weights, its squared loss, the encoder reading x − b_dec
//! and b_dec's encoder-side gradient.

use anyhow::Result;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::crosscoder::kernels::{kth_largest, pick_dot, segment_rows};
use crate::crosscoder::train::host_sparse::HostPicks;
use crate::crosscoder::train::step::{Selection, StepInput, StepOutput, add_aux, column_sums, host_scores};
use crate::crosscoder::{aux_loss, read_vec, tensor};

/// BatchTopK's selection without reading the B×D scores back: the WGSL histogram search finds the
/// k·B-th largest score, a comparison makes the mask, and the picked entries are gathered on the
/// device; only the per-latent counts come back.
pub struct DeviceSelection {
    pub tokens: Tensor<1, Int>,
    pub latents: Tensor<1, Int>,
    pub values: Tensor<1>,
    /// Per-latent counts and the smallest kept score (no host mask).
    pub selection: Selection,
}

/// The device selection from the codes `f` (`[B, D]`) and the decoder norm sums (`[1, D]`);
/// `None` when the host must decide (ties split at the threshold, or nothing positive).
pub fn select_on_device(
    f: &Tensor<2>,
    norms: &Tensor<2>,
    keep: usize,
    b: usize,
    dict: usize,
) -> Result<Option<DeviceSelection>> {
    let a = f.clone() * norms.clone();
    let count = |m: Tensor<2, Bool>| -> Result<usize> { Ok(read_vec(m.float().sum())?[0] as usize) };
    let (mask, min_kept) = match kth_largest(&a.clone().reshape([b * dict]), keep)? {
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
    Ok(Some(DeviceSelection {
        tokens,
        latents,
        values,
        selection: Selection::batch_topk(selected, Vec::new(), min_kept),
    }))
}

/// Per-segment offsets (`len + 1` entries) from per-segment counts.
fn offsets_from_counts(counts: impl Iterator<Item = usize>) -> Vec<i64> {
    let mut out = vec![0i64];
    for c in counts {
        out.push(out[out.len() - 1] + c as i64);
    }
    out
}

/// A pick set sorted by token (segments = tokens) and the same entries sorted by latent.
pub(super) struct Set {
    pub(super) tokens: Tensor<1, Int>,
    pub(super) latents: Tensor<1, Int>,
    pub(super) values: Tensor<1>,
    pub(super) token_offsets: Tensor<1, Int>,
    pub(super) by_latent: Tensor<1, Int>,
    pub(super) latent_offsets: Tensor<1, Int>,
    /// 1 for a real pick, 0 for an empty slot (the device-resident route's fixed-size sets);
    /// `None`: every entry is a pick.
    pub(super) valid: Option<Tensor<1>>,
}

impl Set {
    /// ĥ (without bias) of this set's picks: `[B, 2d]`.
    pub(super) fn decode(&self, w_dec: &Tensor<2>) -> Tensor<2> {
        segment_rows(&self.token_offsets, &self.latents, &self.values, w_dec)
    }
}

/// The reconstruction loss and its derivative ∂L/∂ĥ from the error `h − ĥ` (`[B, two_d]`): an
/// SAE's mean squared error, the squared variant, or the spec's per-model norms.
pub(super) fn recon_terms(
    cfg: &crate::crosscoder::train::config::TrainConfig,
    err: &Tensor<2>,
    b: usize,
    d: usize,
    two_d: usize,
) -> (Tensor<1>, Tensor<2>) {
    if cfg.kind == crate::crosscoder::Kind::Sae {
        // mean_b Σ e², g = −2e/B.
        (err.clone().square().sum().mul_scalar(1.0 / b as f64), err.clone().mul_scalar(-2.0 / b as f64))
    } else if cfg.squared_recon {
        (err.clone().square().sum().mul_scalar(0.5 / b as f64), err.clone().mul_scalar(-1.0 / b as f64))
    } else {
        let norms = err.clone().reshape([b, 2, d]).square().sum_dim(2).sqrt(); // [B, 2, 1]
        let g = err.clone().reshape([b, 2, d]) / norms.clone().clamp_min(1e-30).mul_scalar(-2.0 * b as f64);
        (norms.mean(), g.reshape([b, two_d]))
    }
}

/// The gradients of every pick set with its ∂L/∂ĥ: ∂L/∂f = W_dec[l] · g[t] per pick, then rows of
/// W_dec and columns of W_enc by latent; b_dec from the main set (an SAE's also through b_enc).
pub(super) fn set_gradients(
    sets: &[(Set, Tensor<2>)],
    p: &crate::crosscoder::Params,
    enc_input: &Tensor<2>,
    sae: bool,
) -> [Tensor<2>; 4] {
    let (dict, two_d) = (p.w_dec.dims()[0], p.w_dec.dims()[1]);
    let device = enc_input.device();
    let mut grad_w_dec = Tensor::<2>::zeros([dict, two_d], &device);
    let mut grad_enc_t = Tensor::<2>::zeros([dict, enc_input.dims()[1]], &device);
    let mut grad_b_enc = Tensor::<2>::zeros([dict, 1], &device);
    for (s, gs) in sets {
        let n = s.values.dims()[0];
        let mut grad_v = pick_dot(&s.latents, &s.tokens, &p.w_dec, gs);
        if let Some(valid) = &s.valid {
            grad_v = grad_v * valid.clone();
        }
        let tokens_by_l = s.tokens.clone().select(0, s.by_latent.clone());
        grad_w_dec = grad_w_dec
            + segment_rows(&s.latent_offsets, &tokens_by_l, &s.values.clone().select(0, s.by_latent.clone()), gs);
        grad_enc_t = grad_enc_t
            + segment_rows(&s.latent_offsets, &tokens_by_l, &grad_v.clone().select(0, s.by_latent.clone()), enc_input);
        // Σ of ∂L/∂f per latent as a segment sum (a 1-wide table of ones): burn's scatter-add onto
        // a vector runs on one thread.
        let zeros = Tensor::<1, Int>::zeros([n], &device);
        let ones = Tensor::<2>::ones([1, 1], &device);
        grad_b_enc =
            grad_b_enc + segment_rows(&s.latent_offsets, &zeros, &grad_v.clone().select(0, s.by_latent.clone()), &ones);
    }
    let grad_b_enc = grad_b_enc.reshape([1, dict]);
    let mut grad_b_dec = sets[0].1.clone().sum_dim(0);
    if sae {
        grad_b_dec = grad_b_dec - grad_b_enc.clone().matmul(p.w_enc.clone().transpose());
    }
    [grad_enc_t.transpose(), grad_b_enc, grad_w_dec, grad_b_dec]
}

/// The route, from the codes `f_dev` (`[B, D]`) and their device selection.
pub fn step(input: StepInput, f_dev: &Tensor<2>, sel: DeviceSelection) -> Result<StepOutput> {
    let StepInput { cfg, p, x, since_selected, d, dict, b, two_d, device, .. } = input;
    let sae = cfg.kind == crate::crosscoder::Kind::Sae;
    // What the encoder read: an SAE subtracts b_dec first.
    let enc_input = if sae { x.clone() - p.b_dec.clone() } else { x.clone() };
    let ints = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
    let DeviceSelection { tokens, latents, values, selection } = sel;
    let dead = selection.record(cfg, since_selected, b, d);

    let make_set =
        |tokens: Tensor<1, Int>, latents: Tensor<1, Int>, values: Tensor<1>, per_latent: &[f32]| -> Result<Set> {
            let t = crate::counters::read_i64(tokens.clone())?;
            let mut per_token = vec![0usize; b];
            t.iter().for_each(|&v| per_token[v as usize] += 1);
            Ok(Set {
                token_offsets: ints(offsets_from_counts(per_token.into_iter())),
                by_latent: latents.clone().argsort(0),
                latent_offsets: ints(offsets_from_counts(per_latent.iter().map(|&c| c as usize))),
                tokens,
                latents,
                values,
                valid: None,
            })
        };
    let decode = |s: &Set| s.decode(&p.w_dec);
    let main = make_set(tokens, latents, values, &selection.per_latent)?;
    let err = x.clone() - (decode(&main) + p.b_dec.clone());
    // ∂L/∂ĥ of the reconstruction term.
    let (recon, g) = recon_terms(cfg, &err, b, d, two_d);
    let mut loss = recon.clone();
    let mut aux = None;
    let mut sets = vec![(main, g.clone())];
    if dead.any() {
        let f = read_vec(f_dev.clone())?;
        let norms = if sae { vec![1.0; dict] } else { read_vec(p.norm_sum())? };
        let aux_mask = dead.aux_mask(&host_scores(&f, &norms, dict), dict);
        let HostPicks { tokens, latents, values: vs } = HostPicks::from_mask(&f, &aux_mask, dict);
        let (ts, ls): (Vec<i64>, Vec<i64>) =
            (tokens.into_iter().map(i64::from).collect(), latents.into_iter().map(i64::from).collect());
        let e = err.clone();
        // Nothing fired: ε̂ = 0, no pick set, no gradient.
        let e_hat = if vs.is_empty() {
            e.clone().zeros_like()
        } else {
            let per = column_sums(&aux_mask, dict);
            let n = vs.len();
            let set = make_set(ints(ts), ints(ls), tensor(vs, [n], &device), &per)?;
            let e_hat = decode(&set);
            sets.push((set, e_hat.clone()));
            e_hat
        };
        let centered = e.clone() - e.clone().mean_dim(0);
        let den = read_vec(centered.square().sum_dim(1).mean())?[0] as f64;
        let a = aux_loss(e.clone(), e_hat.clone());
        let (with_aux, weight) = add_aux(cfg, loss, &a)?;
        loss = with_aux;
        match weight {
            Some(alpha) => {
                if let Some((_, g_aux)) = sets.get_mut(1) {
                    // ∂(α·num/den)/∂ê = −2α(e − ê)/(B·den); e is detached.
                    *g_aux = (e - e_hat).mul_scalar(-2.0 * alpha / (b as f64 * den));
                }
            }
            None => sets.truncate(1),
        }
        aux = Some(a);
    }
    let grads = set_gradients(&sets, p, &enc_input, sae);
    let out = StepOutput::new(selection, loss, recon, aux, err, grads);
    Ok(if sae { out.one_block() } else { out })
}
