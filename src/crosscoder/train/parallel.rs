//! Data-parallel steps (`crossdiff train --devices A,B,…`; BatchTopK and L1 crosscoders, SAEs):
//! each device encodes, decodes and back-propagates a contiguous slice of the batch's rows; what
//! couples the rows is
//! computed over the whole batch, so a step equals the one-device step on the same batch up to
//! float summation order:
//! - the selection (the k·B largest scores of the whole batch, ties by position): every device's
//!   codes come to the host, as the portable route's do, and one selection runs over them;
//! - the dead-latent counters and AuxK's dead set, from that global selection;
//! - the losses' means over B (each slice's sum is divided by the global B), AuxK's normaliser
//!   `mean_b ‖e − mean_b e‖²` (a constant: the error is detached) from the global mean of e, and
//!   AuxK's finite-or-not rule on the global value;
//! - the gradients: each device's are brought to the first device and summed (burn 0.22's
//!   collective all-reduce covers devices of one server only — `burn-remote` asserts "cross-peer
//!   all_reduce is not supported yet" — and flex/wgpu have none, so the reduce is tensor moves
//!   between devices). A move between two servers goes through this client: burn's own
//!   server-to-server transfer has the target dial the source at the address the client used,
//!   which an SSH tunnel's 127.0.0.1 or a loopback-only server does not offer.
//!
//! L1 couples rows only through its means over B and the per-latent activity counts (summed).
//!
//! The step returns one [`StepOutput`] on the first device (the batch's error concatenated), so
//! the clip, the optimizer, θ, the metrics and the checkpoints are the one-device loop's.

use anyhow::{Result, anyhow};
use burn::tensor::{DType, Device, Tensor};

use crate::backend::is_remote;
use crate::crosscoder::train::autodiff_sparse::{Picks, decode_picks, encoder_grads, pick};
use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::dense::{backward, l1_loss};
use crate::crosscoder::train::host_sparse::select_topk;
use crate::crosscoder::train::step::{Selection, StepOutput, aux_weight, host_scores};
use crate::crosscoder::{Kind, Params, encode, read_vec, recon_loss, tensor};

/// `t` on `dev`: in place when it is there, through this client between two servers.
fn move_to<const N: usize>(t: Tensor<N>, dev: &Device) -> Result<Tensor<N>> {
    let from = t.device();
    if &from == dev {
        return Ok(t);
    }
    if is_remote(&from) && is_remote(dev) {
        let data = t.try_into_data().map_err(|e| anyhow!("moving a tensor between servers: {e:?}"))?;
        return Ok(Tensor::from_data(data, dev));
    }
    Ok(t.to_device(dev))
}

/// The parameters on `dev` (a copy for this step).
fn params_on(p: &Params, dev: &Device) -> Result<Params> {
    Ok(Params {
        w_enc: move_to(p.w_enc.clone(), dev)?,
        b_enc: move_to(p.b_enc.clone(), dev)?,
        w_dec: move_to(p.w_dec.clone(), dev)?,
        b_dec: move_to(p.b_dec.clone(), dev)?,
    })
}

/// Adds `mine` into `acc` (the first slice's gradients start it), on the first device.
fn sum_grads(acc: Option<[Tensor<2>; 4]>, mine: [Tensor<2>; 4], home: &Device) -> Result<[Tensor<2>; 4]> {
    let mut moved = Vec::with_capacity(4);
    for t in mine {
        moved.push(move_to(t, home)?);
    }
    let mine: [Tensor<2>; 4] = moved.try_into().map_err(|_| anyhow!("four gradients"))?;
    Ok(match acc {
        None => mine,
        Some([a0, a1, a2, a3]) => {
            let [m0, m1, m2, m3] = mine;
            [a0 + m0, a1 + m1, a2 + m2, a3 + m3]
        }
    })
}

/// The rows each device takes: contiguous slices, the first ones one row longer when B does not
/// divide (empty slices dropped: a last batch smaller than the device count).
fn slices(b: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (b / n, b % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// A slice's picks on `device` (row indices local to the slice), none when the slice has none.
fn picks(f: &[f32], mask: &[f32], dict: usize, device: &Device) -> Option<Picks> {
    mask.iter().any(|&m| m > 0.0).then(|| pick(f, mask, dict, device, &device.clone().autodiff()))
}

/// The picks' decode into an `[n, 2d]` zero on `dev`'s autodiff device (zero without picks).
fn decode(w_dec: &Tensor<2>, pk: Option<&Picks>, n: usize, dev: &Device) -> Tensor<2> {
    let ad = dev.clone().autodiff();
    match pk {
        Some(pk) => decode_picks(w_dec, pk, n, &ad),
        None => Tensor::<2>::zeros([n, w_dec.dims()[1]], (&ad, DType::F32)),
    }
}

/// `acc + t` (`t` alone for the first slice).
fn add_to(acc: Option<Tensor<1>>, t: Tensor<1>) -> Option<Tensor<1>> {
    Some(match acc {
        Some(a) => a + t,
        None => t,
    })
}

/// One data-parallel step on the batch `x` (`[B, 2d]`, on `devices[0]`, where `p` lives).
pub fn step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
    devices: &[Device],
) -> Result<StepOutput> {
    match cfg.kind {
        Kind::L1 => l1_step(cfg, p, x, since_selected, devices),
        _ => batch_topk_step(cfg, p, x, step, since_selected, devices),
    }
}

/// L1 over the slices: each slice's loss (a mean over its rows) × n/B, the activity counts summed.
fn l1_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    since_selected: &mut [u64],
    devices: &[Device],
) -> Result<StepOutput> {
    let (d, dict) = p.dims();
    let [b, two_d] = x.dims();
    let home = x.device();
    // Every slice's forward and backward queued before the first read.
    let mut queued = Vec::new();
    for (rows, dev) in slices(b, devices.len()).iter().zip(devices) {
        let xs = move_to(x.clone().slice([rows.clone(), 0..two_d]), dev)?;
        let ps = params_on(p, dev)?.map(|t| t.autodiff().require_grad());
        let (loss, recon, err, codes) = l1_loss(cfg, &ps, xs.autodiff(), d);
        let share = rows.len() as f64 / b as f64;
        let (loss, recon) = (loss.mul_scalar(share), recon.mul_scalar(share));
        let grads = backward(&loss, &ps)?;
        queued.push((loss, recon, err, codes.greater_elem(0.0).float().sum_dim(0), grads));
    }
    let mut active = vec![0f32; dict];
    let (mut loss_total, mut recon_total, mut grads, mut errs) =
        (None::<Tensor<1>>, None::<Tensor<1>>, None, Vec::new());
    for (loss, recon, err, counts, g) in queued {
        for (a, c) in active.iter_mut().zip(read_vec(counts)?) {
            *a += c;
        }
        loss_total = add_to(loss_total, move_to(loss.inner(), &home)?);
        recon_total = add_to(recon_total, move_to(recon.inner(), &home)?);
        grads = Some(sum_grads(grads, g, &home)?);
        errs.push(move_to(err.inner(), &home)?);
    }
    let selection = Selection::active(active);
    selection.record(cfg, since_selected, b, d);
    let empty = || anyhow!("an empty batch");
    Ok(StepOutput::new(
        selection,
        loss_total.ok_or_else(empty)?,
        recon_total.ok_or_else(empty)?,
        None,
        Tensor::cat(errs, 0),
        grads.ok_or_else(empty)?,
    ))
}

/// One data-parallel BatchTopK step on the batch `x` (`[B, 2d]`, on `devices[0]`, where `p` lives).
fn batch_topk_step(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
    devices: &[Device],
) -> Result<StepOutput> {
    // An SAE (its rows one input of width d; src/crosscoder/sae.rs): the encoder reads x − b_dec,
    // its scores are its codes (unit decoder rows), its reconstruction term mean_b Σ (x − x̂)².
    let sae = cfg.kind == Kind::Sae;
    let (d, dict) = (cfg.width_of(p), p.w_enc.dims()[1]);
    let [b, two_d] = x.dims();
    let home = x.device();
    let parts = slices(b, devices.len());
    // Each device's parameters and rows, then its codes on the host.
    let mut shards: Vec<(Device, Params, Tensor<2>)> = Vec::new();
    for (rows, dev) in parts.iter().zip(devices) {
        let xs = move_to(x.clone().slice([rows.clone(), 0..two_d]), dev)?;
        shards.push((dev.clone(), params_on(p, dev)?, xs));
    }
    // Every device's encoder is queued before the first read, so the devices run side by side.
    let queued: Vec<Tensor<2>> = shards
        .iter()
        .map(|(_, ps, xs)| if sae { crate::crosscoder::sae::encode(ps, xs.clone()) } else { encode(ps, xs.clone()) })
        .collect();
    let codes: Vec<Vec<f32>> = queued.into_iter().map(read_vec).collect::<Result<_>>()?;
    let norms = if sae { vec![1.0; dict] } else { read_vec(p.norm_sum())? };
    let f: Vec<f32> = codes.concat();

    // The batch-global selection and bookkeeping, as on one device.
    let keep = cfg.k_at(step) * b;
    let (_, selected, mask, min_kept) = select_topk(&f, &norms, dict, keep);
    let selection = Selection::batch_topk(selected, mask, min_kept);
    let dead = selection.record(cfg, since_selected, b, d);
    let aux_mask = dead.any().then(|| dead.aux_mask(&host_scores(&f, &norms, dict), dict));
    let mask = &selection.kept.as_ref().ok_or_else(|| anyhow!("a BatchTopK selection keeps a mask"))?.0;

    // Per slice: the decode, its error and its share of the reconstruction loss.
    struct Slice {
        w_dec: Tensor<2>,
        b_dec: Tensor<2>,
        err: Tensor<2>,
        recon: Tensor<1>,
        main: Option<Picks>,
        aux: Option<Picks>,
    }
    let mut slices_out = Vec::new();
    for ((rows, (dev, ps, xs)), f_s) in parts.iter().zip(&shards).zip(&codes) {
        let w_dec = ps.w_dec.clone().autodiff().require_grad();
        let b_dec = ps.b_dec.clone().autodiff().require_grad();
        let span = rows.start * dict..rows.end * dict;
        let main = picks(f_s, &mask[span.clone()], dict, dev);
        let aux = aux_mask.as_ref().and_then(|m| picks(f_s, &m[span], dict, dev));
        let err = xs.clone().autodiff() - (decode(&w_dec, main.as_ref(), rows.len(), dev) + b_dec.clone());
        // recon_loss is a mean over the slice's rows: × n/B makes the slices add up to the batch's.
        let recon =
            if sae { err.clone().square().sum_dim(1).mean() } else { recon_loss(err.clone(), d, cfg.squared_recon) };
        let recon = recon.mul_scalar(rows.len() as f64 / b as f64);
        slices_out.push(Slice { w_dec, b_dec, err, recon, main, aux });
    }

    // AuxK over the whole batch: mean_b ‖e − ê‖² / mean_b ‖e − mean_b e‖², e detached.
    let mut aux_terms: Vec<Option<Tensor<1>>> = slices_out.iter().map(|_| None).collect();
    let mut aux_value = None;
    if aux_mask.is_some() {
        let mut sum = vec![0f64; two_d];
        for s in &slices_out {
            for (acc, v) in sum.iter_mut().zip(read_vec(s.err.clone().inner().sum_dim(0))?) {
                *acc += v as f64;
            }
        }
        let mean: Vec<f32> = sum.iter().map(|v| (v / b as f64) as f32).collect();
        let mut den = 0f64;
        let mut nums = Vec::new();
        for (s, (dev, _, xs)) in slices_out.iter().zip(&shards) {
            let e = s.err.clone().inner();
            den += read_vec((e.clone() - tensor(mean.clone(), [1, two_d], dev)).square().sum())?[0] as f64;
            let e_hat = decode(&s.w_dec, s.aux.as_ref(), xs.dims()[0], dev);
            nums.push((e.autodiff() - e_hat).square().sum());
        }
        // Σ_slices Σ_rows ‖e − ê‖² / B over the normaliser Σ ‖e − ē‖² / B: the B's cancel. The value
        // (for AuxK's finite-or-not rule) is the slices' terms summed on the first device, one read.
        let mut total = None;
        for (slot, num) in aux_terms.iter_mut().zip(nums) {
            let term = num.div_scalar(den);
            total = add_to(total, move_to(term.clone().inner(), &home)?);
            *slot = Some(term);
        }
        aux_value = total.map(|t| read_vec(t).map(|v| v[0] as f64)).transpose()?;
    }
    let alpha = aux_value.and_then(|v| aux_weight(cfg, v));

    // Backward per slice (queued on each device, nothing read); the gradients, losses and errors
    // summed or joined on the first device in slice order.
    let mut grads: Option<[Tensor<2>; 4]> = None;
    let (mut loss_total, mut recon_total): (Option<Tensor<1>>, Option<Tensor<1>>) = (None, None);
    let mut errs = Vec::new();
    for ((s, (_, ps, xs)), aux_term) in slices_out.into_iter().zip(&shards).zip(aux_terms) {
        let mut loss = s.recon.clone();
        if let (Some(a), Some(t)) = (alpha, &aux_term) {
            loss = loss + t.clone().mul_scalar(a);
        }
        recon_total = add_to(recon_total, move_to(s.recon.clone().inner(), &home)?);
        loss_total = add_to(loss_total, move_to(loss.clone().inner(), &home)?);
        let g = loss.backward();
        let enc_in = if sae { xs.clone() - ps.b_dec.clone() } else { xs.clone() };
        // AuxK's picks carry a gradient only when its term counted.
        let counted: Vec<&Picks> =
            [s.main.as_ref(), s.aux.as_ref().filter(|_| alpha.is_some())].into_iter().flatten().collect();
        let (g_w_enc_t, g_b_enc) = encoder_grads(&enc_in, &counted, &g, dict)?;
        // A slice none of whose entries was picked leaves W_dec out of its graph: its gradient is 0.
        let g_w_dec = s.w_dec.grad(&g).map(Tensor::inner).unwrap_or_else(|| s.w_dec.clone().inner().zeros_like());
        let g_b_enc = g_b_enc.reshape([1, dict]);
        let mut g_b_dec = s.b_dec.grad(&g).map(Tensor::inner).ok_or_else(|| anyhow!("no gradient for b_dec"))?;
        if sae {
            // b_dec enters the SAE's encoder too: − W_enc·(∂L/∂b_enc)ᵀ.
            g_b_dec = g_b_dec - g_b_enc.clone().matmul(ps.w_enc.clone().transpose());
        }
        let mine = [g_w_enc_t.transpose(), g_b_enc, g_w_dec, g_b_dec];
        grads = Some(sum_grads(grads, mine, &home)?);
        errs.push(move_to(s.err.inner(), &home)?);
    }
    let grads = grads.ok_or_else(|| anyhow!("an empty batch"))?;
    let (loss, recon) =
        (loss_total.ok_or_else(|| anyhow!("an empty batch"))?, recon_total.ok_or_else(|| anyhow!("an empty batch"))?);
    let aux = aux_value.map(|v| tensor(vec![v as f32], [1], &home));
    let out = StepOutput::new(selection, loss, recon, aux, Tensor::cat(errs, 0), grads);
    Ok(if sae { out.one_block() } else { out })
}
