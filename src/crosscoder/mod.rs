//! The crosscoder (shared/spec/method.md §2): one sparse dictionary over (base, chat) activation
//! pairs, with L1 or BatchTopK sparsity, stored in the authors' tensor names and shapes.
//!
//! Internally a pair is one row of width 2d (base then chat), so the encoder is a `[2d, D]` matmul
//! and the decoder a `[D, 2d]` one; the stored `(2, d, D)` / `(2, D, d)` layouts are reshapes and a
//! transpose away. Selection (top k·B over the batch, AuxK's per-token top among dead latents, the
//! inference threshold) is computed by [`select`] from the scores; it is the plain reference that a
//! device kernel must match.

mod init;
pub mod kernels;
pub mod optim;
mod params;
pub mod sae;
mod select;
pub mod train;

pub use crate::host_tensor::{HostValues, give_vec, take_vec};
pub use init::Init;
pub use params::{Params, read_vec, tensor};
pub use sae::SaeTarget;
pub use select::{select_aux, select_batch_topk};

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::{LazyTensor, f32_bytes, write_atomic, write_safetensors_streaming};
use crate::run_dir::RunDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    L1,
    BatchTopK,
    /// A BatchTopK SAE on one activation per token (`sae`): base, chat, or their difference.
    Sae,
}

impl Kind {
    /// Sparse by BatchTopK selection (k, θ, AuxK): the BatchTopK crosscoder and the SAE.
    pub fn is_topk(self) -> bool {
        matches!(self, Self::BatchTopK | Self::Sae)
    }
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "l1" => Ok(Self::L1),
            "batchtopk" | "batch-topk" | "topk" => Ok(Self::BatchTopK),
            "sae" => Ok(Self::Sae),
            _ => bail!("--kind: \"{s}\" is not one of batchtopk, l1, sae"),
        }
    }
}

/// `config.json` beside `crosscoder.safetensors`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrosscoderConfig {
    pub kind: Kind,
    /// Residual width of one model.
    pub d: usize,
    /// Dictionary size D.
    #[serde(rename = "D")]
    pub dict_size: usize,
    pub k: usize,
    pub mu: f64,
    #[serde(default)]
    pub layer: Option<usize>,
    #[serde(default)]
    pub models: Vec<String>,
    /// The models' identities (base, chat): see [`crate::model::snapshot::Snapshot::identity`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_ids: Vec<String>,
    /// An SAE's input (`kind: sae`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<SaeTarget>,
}

/// Pair rows `[n, 2d]` (base then chat) as a dictionary reads them: unchanged for a crosscoder,
/// an SAE's input `[n, d]` for an SAE (its target: chat − base, …).
pub fn dictionary_input(
    kind: Kind,
    target: Option<SaeTarget>,
    pairs: Vec<f32>,
    d: usize,
    device: &Device,
) -> Tensor<2> {
    let n = pairs.len() / (2 * d);
    match kind {
        Kind::Sae => tensor(target.unwrap_or_default().rows(&pairs, d), [n, d], device),
        _ => tensor(pairs, [n, 2 * d], device),
    }
}

/// Pre-activations → codes `f = ReLU(x·W_enc + b_enc)`, `[B, D]`.
pub fn encode(p: &Params, x: Tensor<2>) -> Tensor<2> {
    (x.matmul(p.w_enc.clone()) + p.b_enc.clone()).clamp_min(0.0)
}

/// `codes·W_dec + b_dec`, `[B, 2d]`.
pub fn decode(p: &Params, codes: Tensor<2>) -> Tensor<2> {
    codes.matmul(p.w_dec.clone()) + p.b_dec.clone()
}

/// Reconstruction term: the released code's unsquared `mean_b mean_m ‖h^m − ĥ^m‖₂`, or the paper's
/// squared `mean_b Σ_m ½‖h^m − ĥ^m‖²`.
pub fn recon_loss(err: Tensor<2>, d: usize, squared: bool) -> Tensor<1> {
    let [b, _] = err.dims();
    let per_model = err.reshape([b, 2, d]).square().sum_dim(2); // [B, 2, 1]
    // A row reconstructed exactly (a zero row at a zero decode) has a norm of 0, where sqrt's
    // derivative is infinite and autodiff's 0·∞ is NaN: the clamp gives it the subgradient 0
    // (the sparse routes clamp the same way) and changes no other value.
    if squared { per_model.sum().mul_scalar(0.5 / b as f64) } else { per_model.clamp_min(1e-30).sqrt().mean() }
}

/// AuxK loss `mean_b ‖e − ê‖² / mean_b ‖e − mean_b e‖²`; `e` is the (detached) main error.
pub fn aux_loss(e: Tensor<2>, e_hat: Tensor<2>) -> Tensor<1> {
    let num = (e.clone() - e_hat).square().sum_dim(1).mean();
    let centered = e.clone() - e.mean_dim(0);
    let den = centered.square().sum_dim(1).mean();
    num / den
}

/// Weiszfeld's geometric median of the rows of `x` (`[n, d]`, f64 on the host).
pub fn geometric_median(x: &[f32], d: usize, max_iter: usize, tol: f64) -> Vec<f32> {
    let n = x.len() / d;
    let mut y: Vec<f64> = (0..d).map(|i| (0..n).map(|r| x[r * d + i] as f64).sum::<f64>() / n as f64).collect();
    for _ in 0..max_iter {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0;
        for r in 0..n {
            let row = &x[r * d..(r + 1) * d];
            let dist = row.iter().zip(&y).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt().max(1e-12);
            let w = 1.0 / dist;
            den += w;
            for i in 0..d {
                num[i] += w * row[i] as f64;
            }
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let shift = next.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        y = next;
        if shift < tol {
            break;
        }
    }
    y.iter().map(|v| *v as f32).collect()
}

/// A trained crosscoder on the host side of the API: parameters plus BatchTopK's k and θ.
pub struct Crosscoder {
    pub config: CrosscoderConfig,
    pub params: Params,
    /// Inference threshold on norm-scaled scores (BatchTopK).
    pub threshold: Option<f32>,
    /// Checksum of the file it was loaded from (resumable analyses check they read the same one).
    pub file_checksum: Option<u64>,
}

impl Crosscoder {
    /// Writes `crosscoder.safetensors` (the authors' names and shapes) and `config.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs_err::create_dir_all(dir)?;
        if self.config.kind == Kind::Sae {
            return self.save_sae(dir);
        }
        let (d, dict) = self.params.dims();
        let p = &self.params;
        let lazy = |name: &str, shape: Vec<usize>, t: Tensor<2>| LazyTensor {
            name: name.into(),
            dtype: safetensors::Dtype::F32,
            shape,
            bytes: Box::new(move || Ok(f32_bytes(&read_vec(t)?))),
        };
        let mut tensors = vec![
            // [2d, D] is (2, d, D) as stored; [D, 2d] → (D, 2, d) → (2, D, d).
            lazy("encoder.weight", vec![2, d, dict], p.w_enc.clone()),
            lazy("encoder.bias", vec![dict], p.b_enc.clone()),
            LazyTensor {
                name: "decoder.weight".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![2, dict, d],
                bytes: Box::new(move || {
                    Ok(f32_bytes(&read_vec(p.w_dec.clone().reshape([dict, 2, d]).swap_dims(0, 1))?))
                }),
            },
            lazy("decoder.bias", vec![2, d], p.b_dec.clone()),
        ];
        if self.config.kind == Kind::BatchTopK {
            let k = self.config.k as f32;
            let theta = self.threshold.unwrap_or(-1.0);
            tensors.push(LazyTensor {
                name: "k".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                bytes: Box::new(move || Ok(f32_bytes(&[k]))),
            });
            tensors.push(LazyTensor {
                name: "threshold".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                bytes: Box::new(move || Ok(f32_bytes(&[theta]))),
            });
        }
        let run = RunDir::new(dir);
        write_safetensors_streaming(&run.crosscoder(), tensors)?;
        let text = serde_json::to_string_pretty(&self.config)?;
        write_atomic(&run.config(), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }

    /// Loads `crosscoder.safetensors` (ours or the authors', `_orig_mod.` prefixes accepted);
    /// `config.json` beside it is optional (shapes and the `k`/`threshold` tensors say the rest).
    pub fn load(dir_or_file: &Path, device: &Device) -> Result<Self> {
        let (dir, file) = if dir_or_file.is_dir() {
            let run = RunDir::new(dir_or_file);
            // Ours, else an SAE run's, else an SAE as the authors' hub folders hold it.
            let hub = dir_or_file.join("model.safetensors");
            let file = [run.crosscoder(), run.sae(), hub].into_iter().find(|f| f.exists()).unwrap_or(run.crosscoder());
            (dir_or_file.to_path_buf(), file)
        } else {
            (dir_or_file.parent().map(Path::to_path_buf).unwrap_or_default(), dir_or_file.to_path_buf())
        };
        let bytes = std::fs::read(&file).map_err(|e| anyhow!("{}: cannot read: {e}", file.display()))?;
        if sae::is_sae_file(&bytes) {
            return Self::load_sae(&dir, &file, &bytes, device);
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!("{}: corrupt safetensors header: {}", file.display(), crate::io::diagnose_safetensors(&bytes, &e))
        })?;
        let mut map: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
        for (name, view) in st.tensors() {
            let key = name.trim_start_matches("_orig_mod.").to_string();
            let values = crate::io::decode_f32(view.dtype(), view.data())
                .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", file.display()))?;
            map.insert(key, (view.shape().to_vec(), values));
        }
        let get = |name: &str| map.get(name).ok_or_else(|| anyhow!("{}: missing tensor `{name}`", file.display()));
        let (enc_shape, enc) = get("encoder.weight")?;
        let [two, d, dict] = enc_shape[..] else {
            bail!("{}: tensor `encoder.weight` has shape {enc_shape:?}, expected (2, d, D)", file.display());
        };
        if two != 2 {
            bail!(
                "{}: tensor `encoder.weight` has shape {enc_shape:?}: the first axis must be the 2 models",
                file.display()
            );
        }
        let expect = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let (s, v) = get(name)?;
            if s != shape {
                bail!("{}: tensor `{name}` has shape {s:?}, expected {shape:?}", file.display());
            }
            Ok(v.clone())
        };
        let b_enc = expect("encoder.bias", &[dict])?;
        let dec = expect("decoder.weight", &[2, dict, d])?;
        let b_dec = expect("decoder.bias", &[2, d])?;
        // (2, D, d) → [D, 2d]
        let mut w_dec = vec![0.0f32; dict * 2 * d];
        for m in 0..2 {
            for j in 0..dict {
                w_dec[j * 2 * d + m * d..j * 2 * d + (m + 1) * d]
                    .copy_from_slice(&dec[(m * dict + j) * d..(m * dict + j + 1) * d]);
            }
        }
        let k = map.get("k").and_then(|(_, v)| v.first().copied());
        if let Some(k) = k {
            if !(k.is_finite() && k >= 1.0 && k.fract() == 0.0 && (k as usize) <= dict) {
                bail!("{}: tensor `k` is {k}, not a whole number of latents in 1..={dict}", file.display());
            }
        }
        // A negative θ means "not learned yet" (the authors' convention); anything else must be finite.
        let threshold = map.get("threshold").and_then(|(_, v)| v.first().copied()).filter(|t| *t >= 0.0 || t.is_nan());
        if let Some(t) = threshold.filter(|t| !t.is_finite()) {
            bail!("{}: tensor `threshold` is {t}, not a finite number", file.display());
        }
        for name in ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"] {
            if let Some(i) = map.get(name).and_then(|(_, v)| v.iter().position(|x| !x.is_finite())) {
                bail!("{}: tensor `{name}` has a non-finite value at index {i}", file.display());
            }
        }
        let config_path = RunDir::new(&dir).config();
        let config = if config_path.exists() {
            let text = fs_err::read_to_string(&config_path)?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", config_path.display()))?;
            let c: CrosscoderConfig = serde_json::from_value(value.clone()).map_err(|e| {
                let field = crate::model::config::culprit::<CrosscoderConfig>(&value)
                    .map_or_else(String::new, |k| format!("field `{k}`: "));
                anyhow!("{}: {field}{}", config_path.display(), crate::model::config::describe_serde_error(&e))
            })?;
            if c.d != d || c.dict_size != dict {
                bail!(
                    "{}: d/D ({}, {}) do not match the weights ({d}, {dict})",
                    config_path.display(),
                    c.d,
                    c.dict_size
                );
            }
            // The weights say which kind they are (BatchTopK files carry `k` and `threshold`).
            let weights_kind = if k.is_some() { Kind::BatchTopK } else { Kind::L1 };
            if c.kind != weights_kind {
                bail!(
                    "{}: field `kind` is {:?}, the weights in {} are {weights_kind:?}",
                    config_path.display(),
                    c.kind,
                    file.display()
                );
            }
            if let Some(k) = k.filter(|_| c.kind == Kind::BatchTopK) {
                if c.k != k as usize {
                    bail!("{}: field `k` is {}, the weights' `k` tensor is {k}", config_path.display(), c.k);
                }
            }
            // The checkpoint beside it records the layer and models the run was trained on.
            let state = RunDir::new(&dir).checkpoint_state();
            if let Some(saved) =
                std::fs::read_to_string(&state).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            {
                // On the fly the source records `layer` itself; a cache source records it under `cache`.
                let source = &saved["source"];
                let trained_layer = source["layer"]
                    .as_u64()
                    .or_else(|| source.as_object().and_then(|m| m.values().find_map(|v| v["layer"].as_u64())));
                if let (Some(l), Some(t)) = (c.layer, trained_layer) {
                    if l as u64 != t {
                        bail!(
                            "{}: field `layer` is {l}, the run's checkpoint ({}) was trained on layer {t}",
                            config_path.display(),
                            state.display()
                        );
                    }
                }
                let ids: Vec<String> = serde_json::from_value(saved["model_ids"].clone()).unwrap_or_default();
                if !ids.is_empty() && !c.model_ids.is_empty() && ids != c.model_ids {
                    bail!(
                        "{}: field `model_ids` differs from the run's checkpoint ({})",
                        config_path.display(),
                        state.display()
                    );
                }
            }
            if c.model_ids.len() != 0 && c.model_ids.len() != 2 {
                bail!(
                    "{}: field `model_ids` must list the base and the chat model (2 entries), not {}",
                    config_path.display(),
                    c.model_ids.len()
                );
            }
            c
        } else {
            CrosscoderConfig {
                kind: if k.is_some() { Kind::BatchTopK } else { Kind::L1 },
                d,
                dict_size: dict,
                k: k.map_or(0, |k| k as usize),
                mu: 0.0,
                layer: None,
                models: Vec::new(),
                model_ids: Vec::new(),
                target: None,
            }
        };
        Ok(Self {
            config,
            params: Params {
                w_enc: tensor(enc.clone(), [2 * d, dict], device),
                b_enc: tensor(b_enc, [1, dict], device),
                w_dec: tensor(w_dec, [dict, 2 * d], device),
                b_dec: tensor(b_dec, [1, 2 * d], device),
            },
            threshold,
            file_checksum: Some(crate::io::checksum(&bytes)),
        })
    }

    /// Inference codes: L1 → ReLU codes; BatchTopK → the global JumpReLU `f_j` where the
    /// norm-scaled score exceeds θ (all positive codes when no θ was learned yet).
    pub fn codes(&self, x: Tensor<2>) -> Tensor<2> {
        if self.config.kind == Kind::Sae {
            return sae::codes(&self.params, self.threshold, x);
        }
        let f = encode(&self.params, x);
        match (self.config.kind, self.threshold) {
            (Kind::BatchTopK, Some(theta)) => {
                let scores = f.clone() * self.params.norm_sum();
                f * scores.greater_elem(theta).float()
            }
            _ => f,
        }
    }
}

impl Crosscoder {
    /// Writes `sae.safetensors` and `config.json`.
    fn save_sae(&self, dir: &Path) -> Result<()> {
        let run = RunDir::new(dir);
        sae::save(&run.sae(), &self.params, self.config.k, self.threshold)?;
        let text = serde_json::to_string_pretty(&self.config)?;
        crate::io::write_atomic(&run.config(), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }

    /// Reads an SAE file; `config.json` beside it (when there) must agree with the weights.
    fn load_sae(dir: &Path, file: &Path, bytes: &[u8], device: &Device) -> Result<Self> {
        let sae = sae::load(file, bytes, device)?;
        let config_path = RunDir::new(dir).config();
        // The authors' hub folders hold their own config.json ({activation_dim, dict_size, k}):
        // ours has `kind`; theirs must agree with the weights.
        let text = std::fs::read_to_string(&config_path).ok();
        let theirs = text
            .as_deref()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .filter(|v| v.get("kind").is_none());
        if let Some(v) = &theirs {
            let field = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
            if let Some((k, n)) = [("activation_dim", sae.d), ("dict_size", sae.dict), ("k", sae.k)]
                .into_iter()
                .find(|(k, n)| field(k).is_some_and(|f| f != *n as u64))
            {
                bail!(
                    "{}: field `{k}` is {}, the SAE in {} has {n}",
                    config_path.display(),
                    field(k).unwrap_or(0),
                    file.display()
                );
            }
        }
        let config = if text.is_some() && theirs.is_none() {
            let c: CrosscoderConfig = RunDir::new(dir).read_config()?;
            if c.kind != Kind::Sae || c.d != sae.d || c.dict_size != sae.dict || c.k != sae.k {
                bail!(
                    "{}: kind/d/D/k ({:?}, {}, {}, {}) do not match the SAE in {} ({}, {}, {})",
                    config_path.display(),
                    c.kind,
                    c.d,
                    c.dict_size,
                    c.k,
                    file.display(),
                    sae.d,
                    sae.dict,
                    sae.k
                );
            }
            c
        } else {
            CrosscoderConfig {
                kind: Kind::Sae,
                d: sae.d,
                dict_size: sae.dict,
                k: sae.k,
                mu: 0.0,
                layer: None,
                models: Vec::new(),
                model_ids: Vec::new(),
                target: None,
            }
        };
        Ok(Self {
            config,
            params: sae.params,
            threshold: sae.threshold,
            file_checksum: Some(crate::io::checksum(bytes)),
        })
    }
}

impl RunDir {
    /// The run's `config.json` (kind, d, D, k, μ, layer, models).
    pub fn read_config(&self) -> Result<CrosscoderConfig> {
        self.read_json(RunDir::CONFIG)
    }
}
