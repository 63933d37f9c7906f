//! The one place that chooses a step's route.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::crosscoder::kernels::{is_flex, is_wgpu};
use crate::crosscoder::train::config::TrainConfig;
use crate::crosscoder::train::step::{StepInput, StepOutput};
use crate::crosscoder::train::{autodiff_sparse, dense, host_sparse, kernel_sparse};
use crate::crosscoder::{Kind, Params, encode};

/// One step on the batch `x` (`[B, 2d]`, 1-based `step`): loss terms, gradients and the
/// dead-latent bookkeeping of the spec (the counters take this batch's selection first, then the
/// dead set is read for AuxK).
///
/// Routes: L1, and BatchTopK with `sparse = false`, run dense (the reference). Sparse BatchTopK
/// decodes and back-propagates only the k·B selected entries: by host loops on flex
/// (`cpu_kernels`), by the WGSL kernels on wgpu (`cpu_kernels`, when the device selection is
/// exact), and otherwise (CUDA, `cpu_kernels = false`, or ties at the device threshold) through
/// burn's `select`/`select_assign` under autodiff.
pub fn step_loss(
    cfg: &TrainConfig,
    p: &Params,
    x: Tensor<2>,
    step: u64,
    since_selected: &mut [u64],
) -> Result<StepOutput> {
    if cfg.kind == Kind::Sae {
        // Host loops on the CPU, the WGSL kernels on wgpu (when the device selection is exact),
        // else the dense autodiff route (the reference).
        let fast = cfg.sparse && cfg.cpu_kernels;
        if fast && is_flex(&x.device()) {
            return super::sae_step::sparse_step(cfg, p, x, step, since_selected);
        }
        if fast && is_wgpu(&x.device()) {
            let (b, dict) = (x.dims()[0], p.w_enc.dims()[1]);
            let f = crate::crosscoder::sae::encode(p, x.clone());
            let unit = Tensor::<2>::ones([1, dict], &x.device());
            if let Some(sel) = kernel_sparse::select_on_device(&f, &unit, cfg.k_at(step) * b, b, dict)? {
                return kernel_sparse::step(StepInput::new(cfg, p, x, step, since_selected), &f, sel);
            }
        }
        return dense::step(StepInput::new(cfg, p, x, step, since_selected));
    }
    let input = StepInput::new(cfg, p, x, step, since_selected);
    if cfg.kind == Kind::L1 {
        // Its own phases (encoder forward with decode and loss, selection, backward).
        return dense::step(input);
    }
    if !(cfg.kind == Kind::BatchTopK && cfg.sparse) {
        let _phase = crate::phases::phase("dense step (encoder, decode, loss, backward)", &input.device);
        return dense::step(input);
    }
    if cfg.cpu_kernels && is_flex(&input.device) {
        return host_sparse::step(input);
    }
    let (b, dict) = (input.b, input.dict);
    let keep = cfg.k_at(step) * b;
    let phase = crate::phases::phase("encoder forward", &input.device);
    let f = encode(p, input.x.clone());
    drop(phase);
    let phase = crate::phases::phase("selection", &input.device);
    let on_device =
        if is_wgpu(&input.device) { kernel_sparse::select_on_device(&f, &p.norm_sum(), keep, b, dict)? } else { None };
    drop(phase);
    let _phase = crate::phases::phase("sparse decode, loss, backward, gradient assembly", &input.device);
    match on_device {
        Some(sel) if cfg.cpu_kernels => kernel_sparse::step(input, &f, sel),
        other => autodiff_sparse::step(input, &f, other, keep),
    }
}
