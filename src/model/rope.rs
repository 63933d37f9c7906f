//! Rotary position embeddings as transformers' `modeling_rope_utils.py` computes them: the base
//! frequencies and the scalings these families use (`linear`: Gemma 3's global layers; `llama3`:
//! Llama 3.1/3.2). Read from either config spelling: transformers 5's `rope_parameters` (nested per
//! layer type for Gemma 3) or the hub's older `rope_theta` + `rope_scaling` (+ Gemma 3's
//! `rope_local_base_freq`).

use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// How the base frequencies are rescaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Long wavelengths divided by `factor`, short ones kept, the band between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// One RoPE table's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeSpec {
    /// Reads one parameter object (`rope_parameters`, one of its per-layer-type entries, or the
    /// older `rope_scaling`); `field` names it in errors. `theta` is used when the object has none;
    /// `max_positions` is llama3's fallback for `original_max_position_embeddings`, as in
    /// transformers.
    pub fn parse(params: &Map<String, Value>, field: &str, theta: f64, max_positions: Option<usize>) -> Result<Self> {
        let number = |key: &str| -> Result<Option<f64>> {
            match params.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                    _ => bail!("field `{field}.{key}` must be a positive finite number, not {v}"),
                },
            }
        };
        let required = |key: &str, kind: &str| -> Result<f64> {
            number(key)?
                .ok_or_else(|| anyhow::anyhow!("field `{field}.{key}` is missing (needed by rope type \"{kind}\")"))
        };
        let theta = number("rope_theta")?.unwrap_or(theta);
        if let Some(f) = number("partial_rotary_factor")? {
            if f != 1.0 {
                bail!("field `{field}.partial_rotary_factor` is {f}; only 1.0 (RoPE over the whole head) is supported");
            }
        }
        let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: required("factor", kind)? },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor", kind)?,
                low_freq_factor: required("low_freq_factor", kind)?,
                high_freq_factor: required("high_freq_factor", kind)?,
                original_max_position_embeddings: match number("original_max_position_embeddings")? {
                    Some(n) => n,
                    None => match max_positions {
                        Some(n) => n as f64,
                        None => required("original_max_position_embeddings", kind)?,
                    },
                },
            },
            other => bail!("field `{field}.rope_type` is \"{other}\"; supported: \"default\", \"linear\", \"llama3\""),
        };
        if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = scaling {
            if high_freq_factor <= low_freq_factor {
                bail!(
                    "field `{field}.high_freq_factor` ({high_freq_factor}) must be above `low_freq_factor` ({low_freq_factor})"
                );
            }
        }
        Ok(Self { theta, scaling })
    }

    /// The inverse frequencies of a `head_dim`-wide head, in f32 as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect::<Vec<f32>>();
        match self.scaling {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings);
                let low_freq_wavelen = (old / low_freq_factor) as f32;
                let high_freq_wavelen = (old / high_freq_factor) as f32;
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                            scaled
                        } else {
                            let smooth = (old as f32 / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// An object-valued config field, or an empty one when absent or null.
pub(crate) fn object<'a>(value: Option<&'a Value>, field: &str) -> Result<Option<&'a Map<String, Value>>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => bail!("field `{field}` must be an object, not {other}"),
    }
}
