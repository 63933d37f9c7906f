//! The SAE's step (`kind: sae`, src/crosscoder/sae.rs), as the authors' `BatchTopKTrainer.loss`:
//! f = ReLU((x − b_dec)·W_enc + b_enc), the top k·B codes of the batch kept, x̂ = f·W_dec + b_dec,
//! L = mean_b Σ_dims (x − x̂)² + α·L_aux, AuxK on the codes of dead latents (per token the top
//! min(d/2, #dead)) decoded without bias. Every parameter is tracked by autodiff (the encoder's
//! `b_dec` too); the selection runs on the host ([`select_batch_topk`], the crosscoder's). The
//! decoder constraint (gradient projection, unit rows) is applied around the optimiser by the loop.

use anyhow::{Result, anyhow};
use burn::tensor::Tensor;

use crate::crosscoder::sae;
use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::step::{Selection, StepOutput, add_aux, per_latent};
use crate::crosscoder::{Params, aux_loss, read_vec, select_batch_topk, tensor};

/// One step on the SAE's input rows `x` (`[B, d]`, 1-based `step`).
pub fn step(cfg: &TrainConfig, p: &Params, x: Tensor<2>, step: u64, since_selected: &mut [u64]) -> Result<StepOutput> {
    let [b, d] = x.dims();
    let [_, dict] = p.w_enc.dims();
    let device = x.device();
    let p = p.clone().map(|t| t.autodiff().require_grad());
    let x = x.autodiff();
    let f = sae::encode(&p, x.clone());
    // The decoder rows have unit norm: the codes are their own scores.
    let scores = read_vec(f.clone().detach())?;
    let (mask, min_kept) = select_batch_topk(&scores, cfg.k_at(step) * b);
    let codes = f.clone() * tensor(mask.clone(), [b, dict], &device);
    let err = x - (codes.matmul(p.w_dec.clone()) + p.b_dec.clone());
    let recon = err.clone().square().sum_dim(1).mean();
    let selection = Selection::batch_topk(per_latent(&mask, dict), mask, min_kept);
    let dead = selection.record(cfg, since_selected, b, d);
    let mut loss = recon.clone();
    let mut aux = None;
    if dead.any() {
        let aux_mask = dead.aux_mask(&scores, dict);
        let e_hat = (f * tensor(aux_mask, [b, dict], &device)).matmul(p.w_dec.clone());
        let a = aux_loss(err.clone().detach(), e_hat);
        loss = add_aux(cfg, loss, &a)?.0;
        aux = Some(a);
    }
    let grads = loss.backward();
    let grad = |t: &Tensor<2>| t.grad(&grads).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for a parameter"));
    let g = [grad(&p.w_enc)?, grad(&p.b_enc)?, grad(&p.w_dec)?, grad(&p.b_dec)?];
    Ok(StepOutput::new(selection, loss, recon, aux, err, g).one_block())
}
