//! The dense route: every parameter tracked by autodiff, codes masked over the whole `[B, D]`
//! batch. L1 always takes it; for BatchTopK and the SAE (`sparse = false`, or a device without a
//! faster route) it is the reference the sparse routes are tested against. The SAE differs in three
//! places (src/crosscoder/sae.rs): its encoder reads x − b_dec, its codes are their own scores (unit
//! decoder rows), and its reconstruction term is mean_b Σ (x − x̂)².

use anyhow::{Result, anyhow};
use burn::tensor::Tensor;

use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::step::{Selection, StepInput, StepOutput, add_aux, column_sums};
use crate::crosscoder::{Kind, Params, aux_loss, decode, encode, read_vec, recon_loss, select_batch_topk, tensor};

pub fn step(input: StepInput) -> Result<StepOutput> {
    let StepInput { cfg, p, x, step, since_selected, d, dict, b, .. } = input;
    let sae = cfg.kind == Kind::Sae;
    let p = p.clone().map(|t| t.autodiff().require_grad());
    let x = x.autodiff();
    match cfg.kind {
        Kind::L1 => {
            // `l1_loss` encodes: the codes are not computed here as well (a second B×2d×D product).
            let phase = crate::phases::phase("encoder forward, decode, loss", &x.device());
            let (loss, recon, err, codes) = l1_loss(cfg, &p, x, d);
            drop(phase);
            let phase = crate::phases::phase("selection", &codes.device());
            let selection = Selection::active(read_vec(codes.greater_elem(0.0).float().sum_dim(0))?);
            selection.record(cfg, since_selected, b, d);
            drop(phase);
            let _phase = crate::phases::phase("loss/backward", &loss.device());
            let grads = backward(&loss, &p)?;
            Ok(StepOutput::new(selection, loss, recon, None, err, grads))
        }
        Kind::BatchTopK | Kind::Sae => {
            let f = if sae { crate::crosscoder::sae::encode(&p, x.clone()) } else { encode(&p, x.clone()) };
            let scores =
                if sae { read_vec(f.clone().detach())? } else { read_vec(f.clone().detach() * p.norm_sum().detach())? };
            let keep = cfg.k_at(step) * b;
            let (mask, min_kept) = select_batch_topk(&scores, keep);
            let device = f.device();
            let codes = f.clone() * tensor(mask.clone(), [b, dict], &device);
            let err = x - decode(&p, codes);
            let recon = if sae {
                err.clone().square().sum_dim(1).mean()
            } else {
                recon_loss(err.clone(), d, cfg.squared_recon)
            };
            let selection = Selection::batch_topk(column_sums(&mask, dict), mask, min_kept);
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
            let grads = backward(&loss, &p)?;
            let out = StepOutput::new(selection, loss, recon, aux, err, grads);
            Ok(if sae { out.one_block() } else { out })
        }
    }
}

/// L1's loss on autodiff parameters `p` and batch `x`: (loss, recon, the error, the codes
/// detached). The spec's L = recon + μ·Σ_j f_j (‖d_j^0‖ + ‖d_j^1‖), averaged over the batch.
pub(super) fn l1_loss(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    d: usize,
) -> (Tensor<1>, Tensor<1>, Tensor<2>, Tensor<2>) {
    let f = encode(p, x.clone());
    let err = x - decode(p, f.clone());
    let recon = recon_loss(err.clone(), d, cfg.squared_recon);
    let sparsity = (f.clone() * p.norm_sum()).sum_dim(1).mean().mul_scalar(cfg.mu);
    (recon.clone() + sparsity, recon, err, f.detach())
}

/// Back-propagates `loss` and reads every parameter's gradient.
pub(super) fn backward(loss: &Tensor<1>, p: &Params) -> Result<[Tensor<2>; 4]> {
    let grads = loss.backward();
    let grad = |t: &Tensor<2>| t.grad(&grads).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for a parameter"));
    Ok([grad(&p.w_enc)?, grad(&p.b_enc)?, grad(&p.w_dec)?, grad(&p.b_dec)?])
}
