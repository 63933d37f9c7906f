//! `config.json` of a Gemma 2 snapshot, read and validated: every error names the file and the
//! field, and every number that shapes the computation is checked before a weight is read.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

/// `config.json` of a Gemma 2 model. Field names mirror the file; both hub spellings are accepted
/// (`rope_theta` or `rope_parameters.rope_theta`; `hidden_activation` or `hidden_act`; `layer_types`
/// present or not).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct Gemma2Config {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    pub query_pre_attn_scalar: f64,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// The longest sequence the model was trained on; prompts and generations beyond it are refused.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

impl Gemma2Config {
    /// Reads and validates `config.json`; every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        // Gemma 2 checkpoints nest nothing, but multimodal wrappers put the text model under text_config.
        let value = match value.get("text_config") {
            Some(inner) if value.get("hidden_size").is_none() => inner.clone(),
            _ => value,
        };
        if value.get("D").is_some() && value.get("kind").is_some() {
            bail!(
                "{}: this is a crosscoder run's config.json, not a model snapshot's: give the model's folder",
                path.display()
            );
        }
        if value.get("format").and_then(Value::as_str).is_some_and(|f| f.starts_with("crossdiff-cache")) {
            bail!("{}: this is an activation cache, not a model snapshot: give the model's folder", path.display());
        }
        match value.get("model_type").and_then(Value::as_str) {
            Some("gemma2") => {}
            Some(other) => bail!("{}: field `model_type` is \"{other}\", only \"gemma2\" is supported", path.display()),
            None => bail!("{}: missing field `model_type`", path.display()),
        }
        let config: Self = serde_json::from_value(value.clone()).map_err(|e| {
            // serde names the field only for a missing one; find the field a wrong value sits in.
            let field = culprit::<Self>(&value).map_or_else(String::new, |k| format!("field `{k}`: "));
            anyhow!("{}: {field}{}", path.display(), describe_serde_error(&e))
        })?;
        config.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (field, v) in positive {
            if v == 0 {
                bail!("field `{field}` must be positive");
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.num_key_value_heads,
                self.num_attention_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("field `head_dim` ({}) must be even for rotary embeddings", self.head_dim);
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                bail!(
                    "field `layer_types` has {} entries, `num_hidden_layers` is {}",
                    types.len(),
                    self.num_hidden_layers
                );
            }
            if let Some(bad) = types.iter().find(|t| *t != "sliding_attention" && *t != "full_attention") {
                bail!("field `layer_types` has unknown entry \"{bad}\"");
            }
        }
        let act = self.activation();
        if act != "gelu_pytorch_tanh" && act != "gelu_tanh" {
            bail!("field `hidden_activation` is \"{act}\", only gelu_pytorch_tanh is supported");
        }
        let reals = [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("rope_theta", self.rope_theta),
            ("rope_parameters.rope_theta", self.rope_parameters.as_ref().and_then(|p| p.rope_theta)),
            ("query_pre_attn_scalar", Some(self.query_pre_attn_scalar)),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ];
        for (field, v) in reals {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    bail!("field `{field}` must be a positive finite number, not {v}");
                }
            }
        }
        for (field, v) in
            [("sliding_window", self.sliding_window), ("max_position_embeddings", self.max_position_embeddings)]
        {
            if v == Some(0) {
                bail!("field `{field}` must be positive");
            }
        }
        let ids = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)];
        for (field, id) in ids.into_iter().filter_map(|(f, id)| id.map(|i| (f, i as usize))) {
            if id >= self.vocab_size {
                bail!("field `{field}` is {id}, outside the vocabulary (`vocab_size` {})", self.vocab_size);
            }
        }
        match &self.eos_token_id {
            None | Some(Value::Null) => {}
            Some(v) => {
                let list = match v {
                    Value::Array(a) => a.clone(),
                    other => vec![other.clone()],
                };
                for id in list {
                    if !id.as_u64().is_some_and(|i| (i as usize) < self.vocab_size) {
                        bail!("field `eos_token_id` has {id}, not a token id below `vocab_size` {}", self.vocab_size);
                    }
                }
            }
        }
        if self.tie_word_embeddings == Some(false) {
            bail!("field `tie_word_embeddings` is false; Gemma 2 ties the unembedding to the embedding");
        }
        Ok(())
    }

    pub fn rope_base(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0)
    }

    pub fn activation(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh")
    }

    /// Whether layer `i` uses the sliding window: `layer_types` when present, else even layers.
    pub fn is_sliding(&self, layer: usize) -> bool {
        if self.sliding_window.is_none() {
            return false;
        }
        match &self.layer_types {
            Some(types) => types[layer] == "sliding_attention",
            None => layer % 2 == 0,
        }
    }

    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), if any.
    pub fn declared_dtype(&self) -> Option<&str> {
        self.torch_dtype.as_deref().or(self.dtype.as_deref())
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
            _ => Vec::new(),
        }
    }

    /// Parameters in the model (embedding counted once: it is tied).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 4 * d;
        self.vocab_size * d + self.num_hidden_layers * per_layer + d
    }
}

/// The key of a JSON object whose value stops it deserializing as `T`: the one whose removal
/// makes it deserialize, or turns the error into that key missing.
pub(crate) fn culprit<T: serde::de::DeserializeOwned>(value: &Value) -> Option<String> {
    let object = value.as_object()?;
    object.keys().find_map(|k| {
        let mut without = object.clone();
        without.remove(k);
        match serde_json::from_value::<T>(Value::Object(without)) {
            Ok(_) => Some(k.clone()),
            Err(e) if e.to_string().contains(&format!("missing field `{k}`")) => Some(k.clone()),
            Err(_) => None,
        }
    })
}

/// serde's messages already name the field ("missing field `x`", "invalid type ... for key `x`").
pub(crate) fn describe_serde_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}
