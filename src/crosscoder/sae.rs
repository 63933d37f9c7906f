//! BatchTopK sparse autoencoders on one activation per token: the base's, the chat's, or their
//! difference (a diff-SAE), as the authors' `BatchTopKSAE` and `BatchTopKTrainer`
//! (dictionary_learning; `scripts/train_sae.py` of the paper's code) define them.
//!
//! The same [`Params`] carry an SAE, with one model's width: `w_enc` `[d, D]`, `b_enc` `[1, D]`,
//! `w_dec` `[D, d]` (row j is latent j's unit-norm direction), `b_dec` `[1, d]`.
//! f = ReLU((x − b_dec)·W_enc + b_enc); the top k·B entries of f over the batch are kept (scores are
//! the codes themselves: the decoder rows have unit norm); x̂ = f·W_dec + b_dec. Stored as
//! `sae.safetensors` in the authors' names and shapes: `encoder.weight` [D, d], `encoder.bias` [D],
//! `decoder.weight` [d, D], `b_dec` [d], `k` (i32 scalar), `threshold` (f32 scalar, −1 unset).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::crosscoder::params::{Params, read_vec, tensor};
use crate::io::{LazyTensor, f32_bytes, write_safetensors_streaming};
use crate::rng::SplitMix64;

/// What an SAE reconstructs, from each (base, chat) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaeTarget {
    /// chat − base (the authors' `difference_cb`): a diff-SAE.
    #[default]
    ChatMinusBase,
    /// base − chat (`difference_bc`).
    BaseMinusChat,
    Base,
    Chat,
}

impl std::str::FromStr for SaeTarget {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "chat-minus-base" => Self::ChatMinusBase,
            "base-minus-chat" => Self::BaseMinusChat,
            "base" => Self::Base,
            "chat" => Self::Chat,
            _ => bail!("--target: \"{s}\" is not one of chat-minus-base, base-minus-chat, base, chat"),
        })
    }
}

impl std::fmt::Display for SaeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ChatMinusBase => "chat-minus-base",
            Self::BaseMinusChat => "base-minus-chat",
            Self::Base => "base",
            Self::Chat => "chat",
        })
    }
}

impl SaeTarget {
    /// The SAE's input rows `[B, d]` from pair rows `[B, 2d]` (base then chat).
    pub fn rows(&self, pairs: &[f32], d: usize) -> Vec<f32> {
        pairs
            .chunks_exact(2 * d)
            .flat_map(|r| {
                let (base, chat) = r.split_at(d);
                base.iter().zip(chat).map(move |(b, c)| match self {
                    Self::ChatMinusBase => c - b,
                    Self::BaseMinusChat => b - c,
                    Self::Base => *b,
                    Self::Chat => *c,
                })
            })
            .collect()
    }
}

/// The authors' init: nn.Linear's Kaiming-uniform decoder (U(±1/√D)), each latent's direction
/// scaled to unit norm, the encoder its transpose, zero biases.
pub fn init(d: usize, dict: usize, seed: u64, device: &Device) -> Params {
    let bound = 1.0 / (dict as f64).sqrt();
    let mut rng = SplitMix64(seed ^ 0x5ae);
    let mut dec: Vec<f64> = (0..dict * d).map(|_| (rng.next_f64() * 2.0 - 1.0) * bound).collect();
    for row in dec.chunks_exact_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt() + f32::EPSILON as f64;
        row.iter_mut().for_each(|v| *v /= n);
    }
    let mut enc = vec![0.0f32; d * dict];
    for j in 0..dict {
        for i in 0..d {
            enc[i * dict + j] = dec[j * d + i] as f32;
        }
    }
    Params {
        w_enc: tensor(enc, [d, dict], device),
        b_enc: Tensor::zeros([1, dict], (device, DType::F32)),
        w_dec: tensor(dec.into_iter().map(|v| v as f32).collect(), [dict, d], device),
        b_dec: Tensor::zeros([1, d], (device, DType::F32)),
    }
}

/// Pre-threshold codes `ReLU((x − b_dec)·W_enc + b_enc)`, `[B, D]`.
pub fn encode(p: &Params, x: Tensor<2>) -> Tensor<2> {
    ((x - p.b_dec.clone()).matmul(p.w_enc.clone()) + p.b_enc.clone()).clamp_min(0.0)
}

/// Inference codes: the entries above θ (strictly, as the authors' `encode`); every positive code
/// when θ is not learned yet.
pub fn codes(p: &Params, threshold: Option<f32>, x: Tensor<2>) -> Tensor<2> {
    let f = encode(p, x);
    match threshold {
        Some(theta) => f.clone() * f.greater_elem(theta).float(),
        None => f,
    }
}

/// The decoder constraint's first half: removes from each latent's gradient its component along
/// the latent's direction (`g −= (g·ŵ) ŵ`, ŵ = w / (‖w‖ + 1e-6)), as the authors'
/// `remove_gradient_parallel_to_decoder_directions`.
pub fn remove_parallel_gradient(w_dec: &Tensor<2>, g: Tensor<2>) -> Tensor<2> {
    let unit = w_dec.clone() / (w_dec.clone().square().sum_dim(1).sqrt().add_scalar(1e-6));
    let along = (g.clone() * unit.clone()).sum_dim(1);
    g - unit * along
}

/// The second half, after the optimiser: each latent's direction back to unit norm
/// (`w / (‖w‖ + ε)`, ε = f32's machine epsilon).
pub fn unit_rows(w_dec: Tensor<2>) -> Tensor<2> {
    let n = w_dec.clone().square().sum_dim(1).sqrt().add_scalar(f32::EPSILON as f64);
    w_dec / n
}

/// Writes `file` in the authors' `BatchTopKSAE` layout.
pub fn save(file: &Path, p: &Params, k: usize, threshold: Option<f32>) -> Result<()> {
    let [d, dict] = p.w_enc.dims();
    let lazy = |name: &str, shape: Vec<usize>, t: Tensor<2>| LazyTensor {
        name: name.into(),
        dtype: safetensors::Dtype::F32,
        shape,
        bytes: Box::new(move || Ok(f32_bytes(&read_vec(t)?))),
    };
    let k = k as i32;
    let theta = threshold.unwrap_or(-1.0);
    let tensors = vec![
        lazy("encoder.weight", vec![dict, d], p.w_enc.clone().transpose()),
        lazy("encoder.bias", vec![dict], p.b_enc.clone()),
        lazy("decoder.weight", vec![d, dict], p.w_dec.clone().transpose()),
        lazy("b_dec", vec![d], p.b_dec.clone()),
        LazyTensor {
            name: "k".into(),
            dtype: safetensors::Dtype::I32,
            shape: vec![],
            bytes: Box::new(move || Ok(k.to_le_bytes().to_vec())),
        },
        LazyTensor {
            name: "threshold".into(),
            dtype: safetensors::Dtype::F32,
            shape: vec![],
            bytes: Box::new(move || Ok(f32_bytes(&[theta]))),
        },
    ];
    write_safetensors_streaming(file, tensors)?;
    Ok(())
}

/// An SAE read from a file in the authors' layout (ours or theirs; `_orig_mod.` prefixes accepted).
pub struct LoadedSae {
    pub params: Params,
    pub d: usize,
    pub dict: usize,
    pub k: usize,
    pub threshold: Option<f32>,
}

/// Reads `sae.safetensors` (or the authors' file of the same layout), checking every shape.
pub fn load(file: &Path, bytes: &[u8], device: &Device) -> Result<LoadedSae> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow!("{}: corrupt safetensors header: {}", file.display(), crate::io::diagnose_safetensors(bytes, &e))
    })?;
    let mut map: HashMap<String, (Vec<usize>, safetensors::Dtype, Vec<u8>)> = HashMap::new();
    for (name, view) in st.tensors() {
        let key = name.trim_start_matches("_orig_mod.").to_string();
        map.insert(key, (view.shape().to_vec(), view.dtype(), view.data().to_vec()));
    }
    let get = |name: &str| map.get(name).ok_or_else(|| anyhow!("{}: missing tensor `{name}`", file.display()));
    let floats = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, dtype, data) = get(name)?;
        let v = crate::io::decode_f32(*dtype, data).map_err(|e| anyhow!("{}: tensor `{name}`: {e}", file.display()))?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor `{name}` has a non-finite value at index {i}", file.display());
        }
        Ok((shape.clone(), v))
    };
    let (enc_shape, enc) = floats("encoder.weight")?;
    let [dict, d] = enc_shape[..] else {
        bail!("{}: tensor `encoder.weight` has shape {enc_shape:?}, expected (D, d)", file.display());
    };
    let expect = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let (s, v) = floats(name)?;
        if s != shape {
            bail!("{}: tensor `{name}` has shape {s:?}, expected {shape:?}", file.display());
        }
        Ok(v)
    };
    let b_enc = expect("encoder.bias", &[dict])?;
    let dec = expect("decoder.weight", &[d, dict])?;
    let b_dec = expect("b_dec", &[d])?;
    let (_, k_dtype, k_bytes) = get("k")?;
    let k = match k_dtype {
        safetensors::Dtype::I32 if k_bytes.len() == 4 => i32::from_le_bytes(k_bytes[..4].try_into()?) as i64,
        safetensors::Dtype::I64 if k_bytes.len() == 8 => i64::from_le_bytes(k_bytes[..8].try_into()?),
        _ => {
            let v =
                crate::io::decode_f32(*k_dtype, k_bytes).map_err(|e| anyhow!("{}: tensor `k`: {e}", file.display()))?;
            v.first().map_or(-1, |k| if k.fract() == 0.0 { *k as i64 } else { -1 })
        }
    };
    if k < 1 || k as usize > dict {
        bail!("{}: tensor `k` is {k}, not a whole number of latents in 1..={dict}", file.display());
    }
    let threshold = match get("threshold") {
        Ok(_) => floats("threshold")?.1.first().copied().filter(|t| *t >= 0.0),
        Err(_) => None,
    };
    // [D, d] → our [d, D]; [d, D] → our [D, d].
    let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; v.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = v[r * cols + c];
            }
        }
        out
    };
    Ok(LoadedSae {
        params: Params {
            w_enc: tensor(transpose(&enc, dict, d), [d, dict], device),
            b_enc: tensor(b_enc, [1, dict], device),
            w_dec: tensor(transpose(&dec, d, dict), [dict, d], device),
            b_dec: tensor(b_dec, [1, d], device),
        },
        d,
        dict,
        k: k as usize,
        threshold,
    })
}

/// Whether a safetensors file holds an SAE (a `b_dec` tensor and a 2-D `encoder.weight`) rather
/// than a crosscoder.
pub fn is_sae_file(bytes: &[u8]) -> bool {
    safetensors::SafeTensors::deserialize(bytes).is_ok_and(|st| {
        let names: Vec<String> = st.names().iter().map(|n| n.trim_start_matches("_orig_mod.").to_string()).collect();
        names.iter().any(|n| n == "b_dec")
            && st
                .tensors()
                .iter()
                .any(|(n, v)| n.trim_start_matches("_orig_mod.") == "encoder.weight" && v.shape().len() == 2)
    })
}
