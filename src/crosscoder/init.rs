//! The crosscoder's initial weights (shared/spec/method.md §2): Kaiming-uniform encoder columns
//! rescaled to a norm per model, decoder = the encoder's transpose, zero biases; one matrix for both
//! models (`shared`, the paper's scripts) or one per model (`independent`, the authors' library
//! default).

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::crosscoder::params::{Params, tensor};
use crate::rng::SplitMix64;

/// How the two models' encoder (and so decoder) blocks start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// One d×D matrix for both models: the paper's scripts (`--same-init-for-all-layers`). Each
    /// latent starts with the same direction in both models, so the decoders separate only as far
    /// as training pushes them.
    #[default]
    Shared,
    /// One matrix per model: the authors' library default. Chat-only directions separate sooner.
    Independent,
}

impl std::str::FromStr for Init {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "shared" | "same" => Ok(Self::Shared),
            "independent" => Ok(Self::Independent),
            _ => bail!("--init: \"{s}\" is not one of shared, independent"),
        }
    }
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared",
            Self::Independent => "independent",
        })
    }
}

impl Params {
    /// The spec's shared init (see [`Params::init_as`]).
    pub fn init(d: usize, dict: usize, init_norm: f64, seed: u64, device: &Device) -> Self {
        Self::init_as(Init::Shared, d, dict, init_norm, seed, device)
    }

    /// Kaiming-uniform d×D encoder blocks (one shared, or one per model drawn in turn from the same
    /// seeded stream: the shared init's matrix is the independent init's base block), each
    /// latent's column rescaled to norm `init_norm` per model, decoder = the transpose, zero biases.
    pub fn init_as(init: Init, d: usize, dict: usize, init_norm: f64, seed: u64, device: &Device) -> Self {
        // kaiming_uniform_(a = √5) on a [d, D] tensor: bound = 1/√fan_in, fan_in = D. The bound
        // does not matter beyond the direction: every column is rescaled to `init_norm`.
        let bound = 1.0 / (dict as f64).sqrt();
        let mut rng = SplitMix64(seed ^ 0x1417);
        let mut draw = || -> Vec<f64> { (0..d * dict).map(|_| (rng.next_f64() * 2.0 - 1.0) * bound).collect() };
        let base = draw();
        let chat = match init {
            Init::Shared => None,
            Init::Independent => Some(draw()),
        };
        let blocks = [&base, chat.as_ref().unwrap_or(&base)];
        let mut enc = vec![0.0f32; 2 * d * dict];
        let mut dec = vec![0.0f32; dict * 2 * d];
        for (m, w) in blocks.into_iter().enumerate() {
            let mut col_norm = vec![0.0f64; dict];
            for i in 0..d {
                for j in 0..dict {
                    col_norm[j] += w[i * dict + j] * w[i * dict + j];
                }
            }
            let scale: Vec<f64> = col_norm.iter().map(|n| init_norm / n.sqrt().max(1e-12)).collect();
            for i in 0..d {
                for j in 0..dict {
                    let v = (w[i * dict + j] * scale[j]) as f32;
                    enc[(m * d + i) * dict + j] = v;
                    dec[j * 2 * d + m * d + i] = v;
                }
            }
        }
        Self {
            w_enc: tensor(enc, [2 * d, dict], device),
            b_enc: Tensor::zeros([1, dict], (device, DType::F32)),
            w_dec: tensor(dec, [dict, 2 * d], device),
            b_dec: Tensor::zeros([1, 2 * d], (device, DType::F32)),
        }
    }
}
