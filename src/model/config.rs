//! `config.json` of a model snapshot (any supported family), read and validated: every error names
//! the file and the field, and every number that shapes the computation is checked before a weight
//! is read. Fields a file omits take transformers' defaults for its family.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::model::family::Family;
use crate::model::rope::{RopeSpec, object};

/// `config.json` of a decoder LM. Field names mirror the file; both spellings are accepted (the
/// hub's older `rope_theta`/`rope_scaling`/`rope_local_base_freq`/`torch_dtype`, and transformers 5's
/// `rope_parameters`, nested per layer type for Gemma 3, `dtype` and explicit `layer_types`).
/// Fields added after Gemma 2 are left out of the serialized form when absent, so a Gemma 2
/// snapshot's identity (a checksum over it) is what earlier versions computed.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct ModelConfig {
    /// From `model_type`.
    #[serde(skip)]
    pub family: Family,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Resolved on reading: the file's value, else transformers' default (see [`Family::default_kv_heads`]).
    pub num_key_value_heads: usize,
    /// Resolved on reading: the file's value, else the family's default (see [`Family::default_head_dim`]).
    #[serde(default)]
    pub head_dim: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Gemma's attention scale is `query_pre_attn_scalar^-½` (default 256); other families use head_dim.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
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
    /// The older spelling of the RoPE scaling (`rope_parameters` holds it in transformers 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Gemma 3's RoPE base on sliding layers (older spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: every `sliding_window_pattern`-th layer is global (older spelling of `layer_types`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Qwen: the sliding window applies only when this is true, and only from `max_window_layers` on.
    #[serde(default, skip_serializing_if = "absent_or_false")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Biases on q/k/v/o (Llama, Qwen 3, Gemma); Qwen 2 has q/k/v biases whatever this says.
    #[serde(default, skip_serializing_if = "absent_or_false")]
    pub attention_bias: Option<bool>,
    /// Biases on the MLP's projections (Llama).
    #[serde(default, skip_serializing_if = "absent_or_false")]
    pub mlp_bias: Option<bool>,
    /// Gemma 3 embedding models attend both ways; refused (crossdiff runs causal LMs).
    #[serde(default, skip_serializing_if = "absent_or_false")]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

/// New flags are left out of the serialized config when absent or false (their default), so the
/// identity of a Gemma 2 snapshot (a checksum over the serialized config; real ones say
/// `"attention_bias": false`) is what earlier versions computed.
fn absent_or_false(v: &Option<bool>) -> bool {
    !v.unwrap_or(false)
}

fn default_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    /// Reads and validates `config.json`; every error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            // A PEFT adapter folder given where a model goes: say which flag takes it.
            let adapter = path.parent().is_some_and(|d| d.join("adapter_config.json").exists());
            let hint = if adapter { "; this is a LoRA adapter folder: give it with --chat-adapter (or --adapter), and its base model as the model" } else { "" };
            anyhow!("{}: cannot read: {e}{hint}", path.display())
        })?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        // A vision-language checkpoint (gemma-3-4b and up) holds a vision tower and names its
        // weights `language_model.…`: refused rather than read as its text half.
        if value.get("text_config").is_some() && value.get("vision_config").is_some() {
            let kind = value.get("model_type").and_then(Value::as_str).unwrap_or("?");
            bail!(
                "{}: field `vision_config`: a multimodal checkpoint (model_type \"{kind}\"); crossdiff reads text-only models (for Gemma 3: google/gemma-3-270m or google/gemma-3-1b-pt / google/gemma-3-1b-it, model_type \"gemma3_text\")",
                path.display()
            );
        }
        // Text-only wrappers may still put the text model under text_config.
        let mut value = match value.get("text_config") {
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
        let family = match value.get("model_type").and_then(Value::as_str) {
            Some(name) => Family::from_model_type(name).ok_or_else(|| {
                anyhow!("{}: field `model_type` is \"{name}\"; supported: {}", path.display(), Family::supported_list())
            })?,
            None => bail!("{}: missing field `model_type`; supported: {}", path.display(), Family::supported_list()),
        };
        fill_defaults(&mut value, family);
        let mut config: Self = serde_json::from_value(value.clone()).map_err(|e| {
            // serde names the field only for a missing one; find the field a wrong value sits in.
            let field = culprit::<Self>(&value).map_or_else(String::new, |k| format!("field `{k}`: "));
            anyhow!("{}: {field}{}", path.display(), describe_serde_error(&e))
        })?;
        config.family = family;
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
        if !self.family.accepts_activation(act) {
            let field = if self.hidden_activation.is_some() { "hidden_activation" } else { "hidden_act" };
            bail!(
                "field `{field}` is \"{act}\"; {} computes its MLP with {}",
                self.family,
                self.family.default_activation()
            );
        }
        let reals = [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("rope_theta", self.rope_theta),
            ("rope_local_base_freq", self.rope_local_base_freq),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
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
        for (field, v) in [
            ("sliding_window", self.sliding_window),
            ("max_position_embeddings", self.max_position_embeddings),
            ("sliding_window_pattern", self.sliding_window_pattern),
        ] {
            if v == Some(0) {
                bail!("field `{field}` must be positive");
            }
        }
        if self.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            bail!("field `partial_rotary_factor` must be 1.0 (RoPE over the whole head)");
        }
        if self.use_bidirectional_attention == Some(true) {
            bail!(
                "field `use_bidirectional_attention` is true (an embedding model); crossdiff runs causal language models"
            );
        }
        for layer in 0..self.num_hidden_layers {
            self.rope(layer)?;
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
        if self.family == Family::Gemma2 && self.tie_word_embeddings == Some(false) {
            bail!("field `tie_word_embeddings` is false; Gemma 2 ties the unembedding to the embedding");
        }
        Ok(())
    }

    /// The RoPE parameters of layer `layer`: one set for the whole model, except Gemma 3, whose
    /// sliding layers have their own base (`rope_parameters.sliding_attention` or
    /// `rope_local_base_freq`) and whose global layers carry the scaling.
    pub fn rope(&self, layer: usize) -> Result<RopeSpec> {
        let params = object(self.rope_parameters.as_ref(), "rope_parameters")?;
        let scaling = object(self.rope_scaling.as_ref(), "rope_scaling")?;
        let max = self.max_position_embeddings;
        let theta = self.rope_theta.unwrap_or(self.family.default_rope_theta());
        let none = |theta| Ok(RopeSpec { theta, scaling: crate::model::rope::RopeScaling::None });
        // transformers 5 (`convert_rope_params_to_dict`): `rope_scaling or rope_parameters`, so a
        // non-empty `rope_scaling` wins where a file has both.
        let flat = || match (scaling.filter(|s| !s.is_empty()), params) {
            (Some(s), _) => RopeSpec::parse(s, "rope_scaling", theta, max),
            (None, Some(p)) => RopeSpec::parse(p, "rope_parameters", theta, max),
            (None, None) => none(theta),
        };
        if self.family != Family::Gemma3 {
            return flat();
        }
        let kind = if self.is_sliding_type(layer) { "sliding_attention" } else { "full_attention" };
        let nested = params.filter(|p| p.contains_key("full_attention") || p.contains_key("sliding_attention"));
        if let Some(p) = nested {
            // Gemma 3's `convert_rope_params_to_dict`: `rope_scaling` updates the global entry, and an
            // entry without `rope_theta` takes the top-level `rope_theta` (global) or
            // `rope_local_base_freq` (sliding), else 1,000,000 / 10,000.
            let field = format!("rope_parameters.{kind}");
            let mut entry = object(p.get(kind), &field)?.cloned().unwrap_or_default();
            let default = if kind == "sliding_attention" {
                self.rope_local_base_freq.unwrap_or(10_000.0)
            } else {
                entry.extend(scaling.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
                theta
            };
            return RopeSpec::parse(&entry, &field, default, max);
        }
        if kind == "sliding_attention" {
            return none(self.rope_local_base_freq.unwrap_or(10_000.0));
        }
        flat()
    }

    /// The RoPE base of layer 0's table (the Models view and the pair check show it).
    pub fn rope_base(&self) -> f64 {
        self.rope(0).map(|r| r.theta).unwrap_or(10_000.0)
    }

    pub fn activation(&self) -> &str {
        self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or(self.family.default_activation())
    }

    /// The window of sliding layers, if the model has one: Qwen's applies only with
    /// `use_sliding_window: true`, as transformers reads it.
    pub fn effective_sliding_window(&self) -> Option<usize> {
        match self.family {
            Family::Qwen2 | Family::Qwen3 if self.use_sliding_window != Some(true) => None,
            Family::Llama => None,
            _ => self.sliding_window,
        }
    }

    /// Whether layer `i` is marked sliding: `layer_types` when present, else the family's rule
    /// (Gemma 2: even layers; Gemma 3: all but every `sliding_window_pattern`-th, default 6; Qwen:
    /// layers from `max_window_layers` on, default 28).
    fn is_sliding_type(&self, layer: usize) -> bool {
        if let Some(types) = &self.layer_types {
            return types[layer] == "sliding_attention";
        }
        match self.family {
            Family::Gemma2 => layer % 2 == 0,
            Family::Gemma3 => (layer + 1) % self.sliding_window_pattern.unwrap_or(6) != 0,
            Family::Qwen2 | Family::Qwen3 => layer >= self.max_window_layers.unwrap_or(28),
            Family::Llama => false,
        }
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.effective_sliding_window().is_some() && self.is_sliding_type(layer)
    }

    /// The attention soft-cap: Gemma 2's `attn_logit_softcapping`. Gemma 3 configs may carry the
    /// field, but transformers' Gemma 3 never applies it (its attention passes no `softcap`).
    pub fn attention_softcap(&self) -> Option<f64> {
        self.attn_logit_softcapping.filter(|_| self.family == Family::Gemma2)
    }

    /// The final logits' soft-cap (Gemma 2 and 3; the other families have none).
    pub fn final_softcap(&self) -> Option<f64> {
        self.final_logit_softcapping.filter(|_| self.family.is_gemma())
    }

    /// The factor on q·k: Gemma's `query_pre_attn_scalar^-½` (default 256), else `head_dim^-½`.
    pub fn attention_scale(&self) -> f64 {
        let scalar =
            if self.family.is_gemma() { self.query_pre_attn_scalar.unwrap_or(256.0) } else { self.head_dim as f64 };
        scalar.powf(-0.5)
    }

    /// Whether the unembedding is the embedding (else `lm_head.weight` is read).
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(self.family.default_tied())
    }

    /// Biases on q/k/v, and on o.
    pub fn attention_biases(&self) -> (bool, bool) {
        let flag = self.attention_bias == Some(true);
        if self.family.always_qkv_bias() { (true, false) } else { (flag, flag) }
    }

    pub fn mlp_biases(&self) -> bool {
        self.family == Family::Llama && self.mlp_bias == Some(true)
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

    /// Parameters in the model, as transformers counts them (a tied unembedding counted once).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let inter = self.intermediate_size;
        let (qkv_bias, o_bias) = self.attention_biases();
        let norms = if self.family.sandwich_norms() { 4 * d } else { 2 * d };
        let mut per_layer = d * q + 2 * d * kv + q * d + 3 * d * inter + norms;
        per_layer += if qkv_bias { q + 2 * kv } else { 0 } + if o_bias { d } else { 0 };
        per_layer += if self.mlp_biases() { 2 * inter + d } else { 0 };
        per_layer += if self.family.has_qk_norm() { 2 * self.head_dim } else { 0 };
        let unembed = if self.tied() { 0 } else { self.vocab_size * d };
        self.vocab_size * d + unembed + self.num_hidden_layers * per_layer + d
    }
}

/// Fills in the fields transformers fills in when config.json omits them: `head_dim` (see
/// [`Family::default_head_dim`]; null too where the default is computed), `num_key_value_heads`
/// (see [`Family::default_kv_heads`]) and Gemma's `sliding_window` (4096). Values the file writes, 0 included, are kept (and validated).
fn fill_defaults(value: &mut Value, family: Family) {
    let Some(obj) = value.as_object_mut() else { return };
    let number = |key: &str| obj.get(key).and_then(Value::as_u64).map(|n| n as usize);
    let (hidden, heads) = (number("hidden_size"), number("num_attention_heads"));
    let head_dim = match obj.get("head_dim") {
        None => true,
        Some(Value::Null) => family.default_head_dim().is_none(),
        Some(_) => false,
    };
    let head_dim = head_dim.then(|| match (family.default_head_dim(), hidden, heads) {
        (Some(d), _, _) => Some(d),
        (None, Some(hidden), Some(heads)) if heads > 0 => Some(hidden / heads),
        _ => None,
    });
    let kv = match (obj.get("num_key_value_heads"), heads) {
        (None, Some(heads)) => family.default_kv_heads(heads, false),
        (Some(Value::Null), Some(heads)) => family.default_kv_heads(heads, true),
        _ => None,
    };
    if let Some(d) = head_dim.flatten() {
        obj.insert("head_dim".into(), d.into());
    }
    if let Some(kv) = kv {
        obj.insert("num_key_value_heads".into(), kv.into());
    }
    // Gemma's config classes default the sliding layers' window to 4096 (an explicit null stays:
    // no window).
    if matches!(family, Family::Gemma2 | Family::Gemma3) && !obj.contains_key("sliding_window") {
        obj.insert("sliding_window".into(), 4096.into());
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
