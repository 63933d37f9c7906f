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

    /// The step on a crosscoder's parameters, gradients in the order (w_enc, b_enc, w_dec, b_dec).
    pub fn update_params(
        &self,
        step: u64,
        lr: f64,
        params: &mut Params,
        m: &mut Params,
        v: &mut Params,
        grads: [Tensor<2>; 4],
    ) {
        let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] = grads;
        let one = |p: &mut Tensor<2>, m: &mut Tensor<2>, v: &mut Tensor<2>, g| {
            *p = self.update(step, lr, p.clone(), m, v, g);
        };
        one(&mut params.w_enc, &mut m.w_enc, &mut v.w_enc, g_w_enc);
        one(&mut params.b_enc, &mut m.b_enc, &mut v.b_enc, g_b_enc);
        one(&mut params.w_dec, &mut m.w_dec, &mut v.w_dec, g_w_dec);
        one(&mut params.b_dec, &mut m.b_dec, &mut v.b_dec, g_b_dec);
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
