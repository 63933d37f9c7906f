//! The autodiff-sparse route (CUDA, `cpu_kernels = false`, or wgpu when the device selection
//! leaves ties to the host): the encoder runs dense without autodiff, only the k·B selected entries
//! (and AuxK's picks) are decoded and back-propagated through burn's generic
//! `select`/`select_assign`, and the encoder gradient is assembled from the picked codes' gradients
//! (ReLU' = 1 on selected entries). The reference the host-sparse and kernel routes are tested
//! against, beside the dense one.

use anyhow::{Result, anyhow};
use burn::tensor::{DType, Device, Gradients, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::crosscoder::train::host_sparse::HostPicks;
use crate::crosscoder::train::kernel_sparse::DeviceSelection;
use crate::crosscoder::train::step::{Selection, StepInput, StepOutput, add_aux, column_sums, host_scores};
use crate::crosscoder::{aux_loss, read_vec, recon_loss, select_batch_topk, tensor};

/// Selected (token, latent) entries and their code values as an autodiff leaf `[n, 1]`.
pub(super) struct Picks {
    pub tokens: Tensor<1, Int>,
    pub latents: Tensor<1, Int>,
    pub values: Tensor<2>,
}

/// The entries of a 0/1 mask over `[B, D]`, with their code values as an autodiff leaf.
pub(super) fn pick(f: &[f32], mask: &[f32], dict: usize, device: &Device, ad: &Device) -> Picks {
    let HostPicks { tokens, latents, values } = HostPicks::from_mask(f, mask, dict);
    let n = values.len();
    let ints = |v: Vec<u32>| Tensor::from_data(TensorData::new(v.into_iter().map(i64::from).collect(), [n]), device);
    Picks { tokens: ints(tokens), latents: ints(latents), values: tensor(values, [n, 1], ad).require_grad() }
}

/// Σ over the picks of f · d_j (rows of the autodiff decoder `w_dec`), accumulated into each
/// picked row of an `[n, 2d]` zero on the autodiff device `ad`.
pub(super) fn decode_picks(w_dec: &Tensor<2>, pk: &Picks, n: usize, ad: &Device) -> Tensor<2> {
    let rows = w_dec.clone().select(0, pk.latents.clone().autodiff()) * pk.values.clone();
    Tensor::<2>::zeros([n, w_dec.dims()[1]], (ad, DType::F32)).select_assign(
        0,
        pk.tokens.clone().autodiff(),
        rows,
        IndexingUpdateOp::Add,
    )
}

/// The encoder's gradients (`W_encᵀ` as `[D, width]`, `b_enc` as `[D, 1]`) assembled from dL/df of
/// the picks (ReLU' = 1 on picked entries): each pick adds its encoder input row `enc_in[token]`
/// times dL/df to its latent's row.
pub(super) fn encoder_grads(
    enc_in: &Tensor<2>,
    picks: &[&Picks],
    grads: &Gradients,
    dict: usize,
) -> Result<(Tensor<2>, Tensor<2>)> {
    let device = enc_in.device();
    let mut g_w_enc_t = Tensor::<2>::zeros([dict, enc_in.dims()[1]], (&device, DType::F32));
    let mut g_b_enc = Tensor::<2>::zeros([dict, 1], (&device, DType::F32));
    for pk in picks {
        let g = pk.values.grad(grads).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for the picked codes"))?;
        let rows = enc_in.clone().select(0, pk.tokens.clone()) * g.clone();
        g_w_enc_t = g_w_enc_t.select_assign(0, pk.latents.clone(), rows, IndexingUpdateOp::Add);
        g_b_enc = g_b_enc.select_assign(0, pk.latents.clone(), g, IndexingUpdateOp::Add);
    }
    Ok((g_w_enc_t, g_b_enc))
}

/// The route, from the codes `f_dev` (`[B, D]`, no autodiff) and the device selection when one
/// ran; otherwise the selection runs on the host.
pub fn step(
    input: StepInput,
    f_dev: &Tensor<2>,
    on_device: Option<DeviceSelection>,
    keep: usize,
) -> Result<StepOutput> {
    let StepInput { cfg, p, x, since_selected, d, dict, b, device, .. } = input;
    let ad = device.clone().autodiff();
    // Host copies of the codes and scores: the host selection needs them, and AuxK does when
    // something is dead; the device selection (wgpu) reads back only per-latent counts.
    let read_host = || -> Result<(Vec<f32>, Vec<f32>)> {
        let f = read_vec(f_dev.clone())?;
        let norms = read_vec(p.norm_sum())?;
        let scores = host_scores(&f, &norms, dict);
        Ok((f, scores))
    };
    let mut host: Option<(Vec<f32>, Vec<f32>)> = None;
    let (main, selection) = match on_device {
        Some(sel) => {
            let n = sel.values.dims()[0];
            let picks = Picks {
                tokens: sel.tokens,
                latents: sel.latents,
                values: sel.values.reshape([n, 1]).autodiff().require_grad(),
            };
            (picks, sel.selection)
        }
        None => {
            let (f, scores) = read_host()?;
            let (mask, min_kept) = select_batch_topk(&scores, keep);
            let selected = column_sums(&mask, dict);
            let picks = pick(&f, &mask, dict, &device, &ad);
            host = Some((f, scores));
            (picks, Selection::batch_topk(selected, mask, min_kept))
        }
    };
    let dead = selection.record(cfg, since_selected, b, d);

    let w_dec = p.w_dec.clone().autodiff().require_grad();
    let b_dec = p.b_dec.clone().autodiff().require_grad();
    let xa = x.clone().autodiff();
    let err = xa - (decode_picks(&w_dec, &main, b, &ad) + b_dec.clone());
    let recon = recon_loss(err.clone(), d, cfg.squared_recon);
    let mut loss = recon.clone();
    let mut aux = None;
    let mut picks = vec![main];
    if dead.any() {
        let (f, scores) = match host.take() {
            Some(h) => h,
            None => read_host()?,
        };
        let aux_mask = dead.aux_mask(&scores, dict);
        // Nothing fired: ε̂ = 0, a constant with no gradient (and no empty pick set).
        let aux_picks = aux_mask.iter().any(|&m| m > 0.0).then(|| pick(&f, &aux_mask, dict, &device, &ad));
        let e_hat = match &aux_picks {
            Some(pk) => decode_picks(&w_dec, pk, b, &ad),
            None => err.clone().detach().zeros_like(),
        };
        let a = aux_loss(err.clone().detach(), e_hat);
        let (with_aux, weight) = add_aux(cfg, loss, &a)?;
        loss = with_aux;
        if let (Some(_), Some(pk)) = (weight, aux_picks) {
            picks.push(pk);
        }
        aux = Some(a);
    }

    // Gradients: the decoder's from autodiff, the encoder's assembled from dL/df of the picks.
    let grads = loss.backward();
    let grad = |t: &Tensor<2>| t.grad(&grads).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for a parameter"));
    let (g_w_enc_t, g_b_enc) = encoder_grads(&x, &picks.iter().collect::<Vec<_>>(), &grads, dict)?;
    let grads = [g_w_enc_t.transpose(), g_b_enc.reshape([1, dict]), grad(&w_dec)?, grad(&b_dec)?];
    Ok(StepOutput::new(selection, loss, recon, aux, err, grads))
}
