//! Adam over a list of 2-D parameter tensors (Gemma 2 training for the demo models).

use burn::tensor::Tensor;

pub struct Adam {
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Adam {
    pub fn new(params: &[Tensor<2>]) -> Self {
        let zeros: Vec<Tensor<2>> = params.iter().map(|p| p.clone().zeros_like()).collect();
        Self { m: zeros.clone(), v: zeros, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    /// One step with bias correction: returns the updated parameters.
    pub fn update(&mut self, params: Vec<Tensor<2>>, grads: Vec<Tensor<2>>, lr: f64) -> Vec<Tensor<2>> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        params
            .into_iter()
            .zip(grads)
            .enumerate()
            .map(|(i, (p, g))| {
                self.m[i] = self.m[i].clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
                self.v[i] = self.v[i].clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
                let denom = self.v[i].clone().div_scalar(c2).sqrt().add_scalar(self.eps);
                p - self.m[i].clone().div_scalar(c1).div(denom).mul_scalar(lr)
            })
            .collect()
    }
}
