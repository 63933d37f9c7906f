//! Adam, one implementation for crosscoder training (over [`Params`], moments in the checkpoint) and
//! the demo's language-model training (over a list of 2-D tensors, [`Adam`]).

use burn::tensor::Tensor;

use crate::crosscoder::Params;

/// Adam's constants (shared/spec/method.md §2.3: β = (0.9, 0.999)) and its update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

impl AdamConfig {
    /// One bias-corrected step (1-based `step`) on one tensor: updates the moments `m`, `v` in place
    /// and returns the new parameter.
    /// m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; p − lr · (m/c1) / (sqrt(v/c2) + ε), c_i = 1 − β_i^step.
    pub fn update(
        &self,
        step: u64,
        lr: f64,
        p: Tensor<2>,
        m: &mut Tensor<2>,
        v: &mut Tensor<2>,
        g: Tensor<2>,
    ) -> Tensor<2> {
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(step as i32);
        let c2 = 1.0 - b2.powi(step as i32);
        *m = m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        *v = v.clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let denom = v.clone().div_scalar(c2).sqrt().add_scalar(self.eps);
        p - m.clone().div_scalar(c1).div(denom).mul_scalar(lr)
    }

    /// One step on one tensor as a single pass over host memory (burn flex): the parameter and its
    /// moments are moved out of their tensors (no copy when nothing else holds them), updated in
    /// place, and moved back; the gradient is read in place. Each gradient value is first
    /// multiplied by `grad_scale` (the clip's factor; 1 leaves it exact), then the same f32
    /// operations in the same order as [`AdamConfig::update`], so the results are bit-identical
    /// to scaling the gradient and running the tensor ops; it replaces eight element-wise passes.
    #[allow(clippy::too_many_arguments)]
    pub fn update_host(
        &self,
        step: u64,
        lr: f64,
        p: Tensor<2>,
        m: &mut Tensor<2>,
        v: &mut Tensor<2>,
        g: Tensor<2>,
        grad_scale: f32,
    ) -> anyhow::Result<Tensor<2>> {
        use rayon::prelude::*;
        let (device, shape) = (p.device(), p.dims());
        let vec = crate::crosscoder::take_vec::<2>;
        let placeholder = || Tensor::<2>::zeros([1, 1], &device);
        let (mut pv, mut mv, mut vv) =
            (vec(p)?, vec(std::mem::replace(m, placeholder()))?, vec(std::mem::replace(v, placeholder()))?);
        let gv = crate::crosscoder::HostValues::of(&g)?;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = ((1.0 - b1.powi(step as i32)) as f32, (1.0 - b2.powi(step as i32)) as f32);
        let (b1f, nb1, b2f, nb2) = (b1 as f32, (1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32);
        let (eps, lr) = (self.eps as f32, lr as f32);
        const CHUNK: usize = 1 << 16;
        pv.par_chunks_mut(CHUNK)
            .zip(mv.par_chunks_mut(CHUNK))
            .zip(vv.par_chunks_mut(CHUNK))
            .zip(gv.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = g[i] * grad_scale;
                    m[i] = m[i] * b1f + g * nb1;
                    v[i] = v[i] * b2f + g * g * nb2;
                    let denom = (v[i] / c2).sqrt() + eps;
                    p[i] -= m[i] / c1 / denom * lr;
                }
            });
        let back = |x: Vec<f32>| crate::crosscoder::give_vec(x, shape, &device);
        *m = back(mv);
        *v = back(vv);
        Ok(back(pv))
    }

    /// The step on a crosscoder's parameters, gradients in the order (w_enc, b_enc, w_dec, b_dec),
    /// each multiplied by `grad_scale` first (the clip's factor, [`crate::crosscoder::train::clip_factor`]).
    #[allow(clippy::too_many_arguments)]
    pub fn update_params(
        &self,
        step: u64,
        lr: f64,
        params: &mut Params,
        m: &mut Params,
        v: &mut Params,
        grads: [Tensor<2>; 4],
        grad_scale: f32,
    ) -> anyhow::Result<()> {
        let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] = grads;
        // On the CPU one pass over host memory per tensor; elsewhere burn's element-wise ops.
        let host = crate::backend::is_flex(&params.w_enc.device());
        let one = |p: &mut Tensor<2>, m: &mut Tensor<2>, v: &mut Tensor<2>, g: Tensor<2>| -> anyhow::Result<()> {
            // Moved out (not cloned) so the host pass takes the buffer without a copy.
            let taken = std::mem::replace(p, Tensor::<2>::zeros([1, 1], &m.device()));
            *p = if host {
                self.update_host(step, lr, taken, m, v, g, grad_scale)?
            } else {
                let g = if grad_scale == 1.0 { g } else { g.mul_scalar(grad_scale) };
                self.update(step, lr, taken, m, v, g)
            };
            Ok(())
        };
        one(&mut params.w_enc, &mut m.w_enc, &mut v.w_enc, g_w_enc)?;
        one(&mut params.b_enc, &mut m.b_enc, &mut v.b_enc, g_b_enc)?;
        one(&mut params.w_dec, &mut m.w_dec, &mut v.w_dec, g_w_dec)?;
        one(&mut params.b_dec, &mut m.b_dec, &mut v.b_dec, g_b_dec)
    }
}

/// Adam over a list of 2-D parameter tensors with its own moments and step count (the demo's
/// Gemma 2 training).
pub struct Adam {
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    pub step: u64,
    pub config: AdamConfig,
}

impl Adam {
    pub fn new(params: &[Tensor<2>]) -> Self {
        let zeros: Vec<Tensor<2>> = params.iter().map(|p| p.clone().zeros_like()).collect();
        Self { m: zeros.clone(), v: zeros, step: 0, config: AdamConfig::default() }
    }

    /// One step with bias correction: returns the updated parameters.
    pub fn update(&mut self, params: Vec<Tensor<2>>, grads: Vec<Tensor<2>>, lr: f64) -> Vec<Tensor<2>> {
        self.step += 1;
        params
            .into_iter()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .map(|((p, g), (m, v))| self.config.update(self.step, lr, p, m, v, g))
            .collect()
    }
}
