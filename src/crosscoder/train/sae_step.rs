//! The SAE's step (`kind: sae`, src/crosscoder/sae.rs) by host loops over the picks on flex; the
//! dense route (`dense`, the reference) and the WGSL one (`kernel_sparse`) take the same rules:
//! f = ReLU((x − b_dec)·W_enc + b_enc), the top k·B codes of the batch kept, x̂ = f·W_dec + b_dec,
//! L = mean_b Σ_dims (x − x̂)² + α·L_aux, AuxK on the codes of dead latents (per token the top
//! min(d/2, #dead)) decoded without bias; `b_dec` enters the encoder too. The decoder constraint
//! (gradient projection, unit rows) is applied around the optimiser by the loop.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::step::{Selection, StepOutput};
use crate::crosscoder::{Params, read_vec, tensor};

/// The step by host loops over the picked entries (flex, `cpu_kernels`): only the encoder
/// matmul runs dense; the selection, decode, loss and every gradient touch the k·B picks (and
/// AuxK's) alone, as the crosscoder's `host_sparse` route does. `b_dec` enters the encoder too:
/// ∂L/∂b_dec = Σ_t ∂L/∂x̂_t − W_enc·(∂L/∂b_enc)ᵀ.
pub fn sparse_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    use crate::crosscoder::train::host_picks::latent_grads;
    use crate::crosscoder::train::host_sparse::{HostPicks, aux_terms, decode_into, select_topk};
    let [b, d] = x.dims();
    let [_, dict] = p.w_enc.dims();
    let device = x.device();
    let centred = x.clone() - p.b_dec.clone();
    let f = read_vec((centred.clone().matmul(p.w_enc.clone()) + p.b_enc.clone()).clamp_min(0.0))?;
    let (main, selected, mask, min_kept) = select_topk(&f, &vec![1.0; dict], dict, cfg.k_at(step) * b);
    let selection = Selection::batch_topk(selected, mask, min_kept);
    let dead = selection.record(cfg, since_selected, b, d);
    let (xh, xc) = (read_vec(x)?, read_vec(centred)?);
    let w_dec = crate::crosscoder::HostValues::of(&p.w_dec)?;
    let b_dec = read_vec(p.b_dec.clone())?;
    let mut recon: Vec<f32> = (0..b).flat_map(|_| b_dec.iter().copied()).collect();
    decode_into(&mut recon, &main, &w_dec, d);
    let err: Vec<f32> = xh.iter().zip(&recon).map(|(a, r)| a - r).collect();
    // L_rec = mean_b Σ e², g = ∂L/∂x̂ = −2e/B.
    let recon_loss = err.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / b as f64;
    let g: Vec<f32> = err.iter().map(|e| -2.0 * e / b as f32).collect();
    let (mut loss, mut aux_value, mut aux_picks, mut g_aux) = (recon_loss, None, None, Vec::new());
    if dead.any() {
        let picks = HostPicks::from_mask(&f, &dead.aux_mask(&f, dict), dict);
        let mut e_hat = vec![0.0f32; b * d];
        decode_into(&mut e_hat, &picks, &w_dec, d);
        let (num, den) = aux_terms(&err, &e_hat, d);
        let a = num / den;
        aux_value = Some(a);
        if let Some(alpha) = crate::crosscoder::train::step::aux_weight(cfg, a) {
            loss += alpha * a;
            let k = (-2.0 * alpha / (b as f64 * den)) as f32;
            g_aux = err.iter().zip(&e_hat).map(|(e, h)| k * (e - h)).collect();
            aux_picks = Some(picks);
        }
    }
    let mut sets: Vec<(&HostPicks, &[f32])> = vec![(&main, &g)];
    if let Some(pk) = &aux_picks {
        sets.push((pk, &g_aux));
    }
    let grads = latent_grads(&w_dec, &xc, d, &sets);
    let grad_b_dec = crate::crosscoder::train::step::column_sums(&g, d);
    let grad_b_enc = tensor(grads.b_enc, [1, dict], &device);
    let through_encoder = grad_b_enc.clone().matmul(p.w_enc.clone().transpose()); // [1, d]
    let scalar = |v: f64| tensor(vec![v as f32], [1], &device);
    let grads = [
        tensor(grads.w_enc, [d, dict], &device),
        grad_b_enc,
        tensor(grads.w_dec, [dict, d], &device),
        tensor(grad_b_dec, [1, d], &device) - through_encoder,
    ];
    let out = StepOutput::new(
        selection,
        scalar(loss),
        scalar(recon_loss),
        aux_value.map(scalar),
        tensor(err, [b, d], &device),
        grads,
    );
    Ok(out.one_block())
}
