//! The dictionary's parameters as tensors (crosscoder and SAE alike) and the host↔tensor helpers
//! every part of `crosscoder` uses; a leaf, so the init and the SAE code import it, not their parent.

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// Parameters, as plain tensors on one device (autodiff or not).
#[derive(Clone)]
pub struct Params {
    /// `[2d, D]`: rows 0..d read the base activation, d..2d the chat one.
    pub w_enc: Tensor<2>,
    /// `[1, D]`.
    pub b_enc: Tensor<2>,
    /// `[D, 2d]`: row j is (d_j^base, d_j^chat).
    pub w_dec: Tensor<2>,
    /// `[1, 2d]`.
    pub b_dec: Tensor<2>,
}

impl Params {
    pub fn list(&self) -> [&Tensor<2>; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    pub fn map(self, mut f: impl FnMut(Tensor<2>) -> Tensor<2>) -> Self {
        Self { w_enc: f(self.w_enc), b_enc: f(self.b_enc), w_dec: f(self.w_dec), b_dec: f(self.b_dec) }
    }

    pub fn dims(&self) -> (usize, usize) {
        let [two_d, dict] = self.w_enc.dims();
        (two_d / 2, dict)
    }

    /// Per-latent decoder norms `[D, 2]` (base, chat), read to the host.
    pub fn decoder_norms(&self) -> Result<Vec<[f32; 2]>> {
        let (d, dict) = self.dims();
        let w = self.w_dec.clone().reshape([dict, 2, d]);
        let n = w.square().sum_dim(2).sqrt().reshape([dict * 2]);
        let v = read_vec(n)?;
        Ok(v.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
    }

    /// `‖d_j^0‖ + ‖d_j^1‖` as a `[1, D]` tensor (part of the graph when the params are tracked).
    pub fn norm_sum(&self) -> Tensor<2> {
        let (d, dict) = self.dims();
        let w = self.w_dec.clone().reshape([dict, 2, d]);
        w.square().sum_dim(2).sqrt().sum_dim(1).reshape([1, dict])
    }
}

pub fn tensor<const N: usize>(values: Vec<f32>, shape: [usize; N], device: &Device) -> Tensor<N> {
    let start = crate::phases::enabled().then(std::time::Instant::now);
    let bytes = 4 * values.len() as u64;
    let t = Tensor::from_data(TensorData::new(values, shape), (device, DType::F32));
    if let Some(s) = start {
        crate::phases::transfer(bytes, s.elapsed().as_secs_f64());
    }
    t
}

pub fn read_vec<const N: usize>(t: Tensor<N>) -> Result<Vec<f32>> {
    crate::counters::read_f32(t)
}
