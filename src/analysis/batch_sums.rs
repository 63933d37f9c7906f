//! A batch's reductions read back from the device as one row (one synchronisation per batch
//! instead of one per statistic), then taken apart in the order they were concatenated and added
//! into the analyses' f64 sums.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::crosscoder::read_vec;

pub struct BatchRow {
    row: Vec<f32>,
    at: usize,
}

impl BatchRow {
    /// Concatenates `[1, n_i]` parts and reads them back once.
    pub fn read(parts: Vec<Tensor<2>>) -> Result<Self> {
        Ok(Self { row: read_vec(Tensor::cat(parts, 1))?, at: 0 })
    }

    fn next(&mut self, n: usize) -> &[f32] {
        self.at += n;
        &self.row[self.at - n..self.at]
    }

    /// Adds the next `into.len()` values into `into`.
    pub fn add_into(&mut self, into: &mut [f64]) {
        let v = self.next(into.len());
        into.iter_mut().zip(v).for_each(|(o, v)| *o += *v as f64);
    }

    /// Keeps the elementwise maximum of `into` and the next `into.len()` values.
    pub fn max_into(&mut self, into: &mut [f64]) {
        let v = self.next(into.len());
        into.iter_mut().zip(v).for_each(|(o, v)| *o = o.max(*v as f64));
    }

    /// The next single value.
    pub fn scalar(&mut self) -> f64 {
        self.next(1)[0] as f64
    }
}
