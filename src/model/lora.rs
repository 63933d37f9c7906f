//! A PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`), merged into the
//! base's linear weights at load: `W += s · B·A` with `s = lora_alpha / r` (rsLoRA:
//! `lora_alpha / √r`), what PEFT's `merge_and_unload()` computes (in f32 here). Variants that are
//! not a plain low-rank update of the decoder blocks' linear weights (DoRA, LoRA biases, embedding
//! and `lm_head` adapters, fully saved modules, …) are refused with the field or tensor that asks
//! for them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

/// The fields of `adapter_config.json` that decide the merge.
#[derive(Debug, Clone, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Value>,
    /// In the file's order: PEFT takes the first key that matches a module.
    #[serde(default, deserialize_with = "ordered_map")]
    alpha_pattern: Vec<(String, f64)>,
    /// Per-module ranks, matched like `alpha_pattern` (checked against the tensors' rank).
    #[serde(default, deserialize_with = "ordered_map")]
    rank_pattern: Vec<(String, f64)>,
    #[serde(default)]
    velora_config: Option<Value>,
    #[serde(default)]
    monteclora_config: Option<Value>,
}

/// Fields of PEFT's `LoraConfig` (peft 0.21, `tuners/lora/config.py`) that make an adapter other
/// than a plain low-rank update `W + s·B·A` of linear weights, refused when set (not null, false or
/// empty), with why. Not listed, because PEFT's merge of them is the plain one: `velora_config`
/// (VeLoRA changes only the backward pass; its `lora_velora_embed` buffers are skipped) and
/// `monteclora_config` (MonteCLoRA samples only while training; its `lora_monteclora_sampler`
/// tensors are skipped), and `init_lora_weights` (an initialisation; MiCA's merge is plain).
const REFUSED_VARIANTS: [(&str, &str); 10] = [
    // A learned magnitude vector rescales every column of W + ΔW.
    ("use_dora", "DoRA adapters are not supported (plain LoRA and rsLoRA are)"),
    // lora_B carries a bias, merged into the layer's bias (the families here mostly have none).
    ("lora_bias", "adapters with a bias on lora_B are not supported"),
    // aLoRA applies only after its invocation tokens: PEFT itself cannot merge it.
    ("alora_invocation_tokens", "activated LoRA (aLoRA) cannot be merged into the weights"),
    // QALoRA's A reads the input pooled over groups: PEFT cannot merge it.
    ("use_qalora", "QALoRA adapters cannot be merged into the weights"),
    // The adapted model repeats base layers: another architecture than the base's.
    ("layer_replication", "adapters that replicate layers are not supported"),
    // LoRA on raw parameters (MoE experts), stored under other names than a linear layer's.
    ("target_parameters", "LoRA on parameters (rather than linear modules) is not supported"),
    // Block-diagonal A or B, stored as the stacked blocks: not the [r, in] × [out, r] product.
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA) is not supported"),
    // Per-token routing among several LoRAs: no single merged weight exists.
    ("arrow_config", "Arrow routing adapters cannot be merged into the weights"),
    // KaSA truncates the base weight's SVD and scales B·A by a learned diagonal.
    ("kasa_config", "KaSA adapters are not supported"),
    // Trains rows of the embedding, not a low-rank update of the linear layers.
    ("trainable_token_indices", "adapters that train embedding rows are not supported"),
];

/// A JSON object's entries in the file's order (null: none).
fn ordered_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, f64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of numbers")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries: Vec<(String, f64)> = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, f64>()? {
                // A repeated key keeps its first place and its last value, as Python's json does.
                match entries.iter_mut().find(|(k, _)| *k == key) {
                    Some(entry) => entry.1 = value,
                    None => entries.push((key, value)),
                }
            }
            Ok(entries)
        }
    }
    d.deserialize_any(Entries)
}

/// Whether a config value asks for something: not null, false, 0 or empty.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Bool(true) => true,
    }
}

/// One adapted module's factors: `A` `[r, in]`, `B` `[out, r]`.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    a_cols: usize,
    b_rows: usize,
}

pub struct LoraAdapter {
    pub dir: PathBuf,
    config: AdapterConfig,
    /// `alpha_pattern` compiled as PEFT matches it (`get_pattern_key`: `(.*\.)?(KEY)$` from the
    /// start of the module name), in the file's order.
    alpha_pattern: Vec<(regex::Regex, f64)>,
    /// Module name as the base names it (`model.layers.0.self_attn.q_proj`) → factors.
    modules: HashMap<String, Factors>,
    used: Mutex<HashSet<String>>,
    /// Checksum of the adapter's files, folded into the adapted model's identity.
    pub fingerprint: u64,
}

impl LoraAdapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| anyhow!("{}: cannot read ({e}); is this a PEFT adapter folder?", config_path.display()))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", config_path.display()))?;
        // Parsed from the text (not the value) so that `alpha_pattern` keeps the file's order.
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| {
            let field = crate::model::config::culprit::<AdapterConfig>(&value)
                .map_or_else(String::new, |k| format!("field `{k}`: "));
            anyhow!("{}: {field}{}", config_path.display(), crate::model::config::describe_serde_error(&e))
        })?;
        let at = |field: &str, why: &str| anyhow!("{}: field `{field}` {why}", config_path.display());
        if let Some(t) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(at("peft_type", &format!("is \"{t}\"; only LoRA adapters are supported")));
        }
        if config.r == 0 {
            return Err(at("r", "must be positive"));
        }
        if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0) {
            return Err(at("lora_alpha", "must be a positive finite number"));
        }
        for (field, why) in REFUSED_VARIANTS {
            if let Some(v) = value.get(field).filter(|v| is_set(v)) {
                return Err(at(field, &format!("is {v}; {why}")));
            }
        }
        if config.fan_in_fan_out {
            return Err(at("fan_in_fan_out", "is true; the supported families store linear weights as [out, in]"));
        }
        if let Some(b) = config.bias.as_deref().filter(|b| *b != "none") {
            return Err(at("bias", &format!("is \"{b}\"; adapters that train biases are not supported")));
        }
        match &config.modules_to_save {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(other) => {
                return Err(at(
                    "modules_to_save",
                    &format!("is {other}; adapters with fully trained modules are not supported"),
                ));
            }
        }
        // PEFT's pattern keys (`get_pattern_key`): a regular expression over the module name's
        // last components, the first match in the file's order.
        let compile = |field: &str, pattern: &[(String, f64)]| -> Result<Vec<(regex::Regex, f64)>> {
            pattern
                .iter()
                .map(|(key, value)| {
                    let re = regex::Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| {
                        // The regex crate's message draws the pattern over lines; its last says why.
                        let e = e.to_string();
                        let why = e.lines().last().unwrap_or_default().trim_start_matches("error: ");
                        at(field, &format!("has key {key:?}, not a valid regular expression ({why})"))
                    })?;
                    if !(value.is_finite() && *value > 0.0) {
                        return Err(at(
                            field,
                            &format!("has {value} for {key:?}; it must be a positive finite number"),
                        ));
                    }
                    Ok((re, *value))
                })
                .collect()
        };
        let alpha_pattern = compile("alpha_pattern", &config.alpha_pattern)?;
        let rank_pattern = compile("rank_pattern", &config.rank_pattern)?;
        // Tensors of variants whose merge ignores them (see REFUSED_VARIANTS).
        let skipped = |name: &str| {
            (config.velora_config.as_ref().is_some_and(is_set) && name.ends_with(".lora_velora_embed"))
                || (config.monteclora_config.as_ref().is_some_and(is_set) && name.contains(".lora_monteclora_sampler."))
        };
        let weights_path = dir.join("adapter_model.safetensors");
        let bytes = fs_err::read(&weights_path).map_err(|e| {
            let bin = dir.join("adapter_model.bin");
            let hint = if bin.exists() {
                " (only the safetensors format is read; re-save with safe_serialization=True)"
            } else {
                ""
            };
            anyhow!("{}: cannot read: {e}{hint}", weights_path.display())
        })?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{}: not a safetensors file: {e}", weights_path.display()))?;
        let mut halves: HashMap<String, [Option<(Vec<usize>, Vec<f32>)>; 2]> = HashMap::new();
        for (name, view) in tensors.tensors() {
            if skipped(&name) {
                continue;
            }
            if let Some(head) = unsupported_target(&name) {
                bail!(
                    "{}: tensor `{name}`: LoRA on `{head}` is not supported; crossdiff merges adapters of the decoder blocks' linear layers",
                    weights_path.display()
                );
            }
            let (module, which) = match parse_key(&name) {
                Some(k) => k,
                None => bail!(
                    "{}: tensor `{name}` is not a LoRA factor of a linear layer (lora_A/lora_B); embedding adapters and other variants are not supported",
                    weights_path.display()
                ),
            };
            if view.shape().len() != 2 {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected 2 dimensions",
                    weights_path.display(),
                    view.shape()
                );
            }
            let values = crate::io::decode_f32(view.dtype(), view.data())
                .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", weights_path.display()))?;
            halves.entry(module).or_default()[which] = Some((view.shape().to_vec(), values));
        }
        let mut modules = HashMap::new();
        for (module, [a, b]) in halves {
            let ((a_shape, a), (b_shape, b)) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (a, _) => bail!(
                    "{}: module `{module}` has lora_{} but not lora_{}",
                    weights_path.display(),
                    if a.is_some() { "A" } else { "B" },
                    if a.is_some() { "B" } else { "A" }
                ),
            };
            if a_shape[0] != b_shape[1] {
                bail!(
                    "{}: module `{module}`: lora_A is {a_shape:?} and lora_B {b_shape:?}; their rank must agree",
                    weights_path.display()
                );
            }
            // The rank the config declares for this module (as PEFT builds it) must be the tensors'.
            let (field, declared) = match rank_pattern.iter().find(|(re, _)| re.is_match(&module)) {
                Some((_, r)) => ("rank_pattern", *r),
                None => ("r", config.r as f64),
            };
            if declared != a_shape[0] as f64 {
                return Err(at(
                    field,
                    &format!(
                        "declares rank {declared} for `{module}`, whose lora_A in adapter_model.safetensors has rank {}",
                        a_shape[0]
                    ),
                ));
            }
            let factors = Factors { r: a_shape[0], a_cols: a_shape[1], b_rows: b_shape[0], a, b };
            modules.insert(module, factors);
        }
        if modules.is_empty() {
            bail!("{}: holds no LoRA factors", weights_path.display());
        }
        let mut fingerprint_bytes = text.into_bytes();
        fingerprint_bytes.extend_from_slice(&bytes);
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            alpha_pattern,
            modules,
            used: Mutex::new(HashSet::new()),
            fingerprint: crate::io::checksum(&fingerprint_bytes),
        })
    }

    /// The factor on `B·A` for `module`: `alpha / r`, or `alpha / √r` with rsLoRA, where the first
    /// key of `alpha_pattern` that matches the module (a regular expression over its last
    /// components, as PEFT matches it) gives its own alpha.
    fn scale(&self, module: &str, r: usize) -> f64 {
        let alpha =
            self.alpha_pattern.iter().find(|(re, _)| re.is_match(module)).map_or(self.config.lora_alpha, |(_, a)| *a);
        if self.config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 }
    }

    /// Adds this adapter's update to `w_t`, the `[in, out]` (transposed) weight named `weight_name`
    /// (`….q_proj.weight`), if the adapter has one for it.
    pub fn merge_into_t(&self, weight_name: &str, w_t: &mut [f32], out_dim: usize, in_dim: usize) -> Result<()> {
        let Some(module) = weight_name.strip_suffix(".weight") else { return Ok(()) };
        let Some(f) = self.modules.get(module) else { return Ok(()) };
        if f.a_cols != in_dim || f.b_rows != out_dim {
            bail!(
                "{}: module `{module}` adapts a [{}, {}] weight, the model's is [{out_dim}, {in_dim}]: the adapter belongs to another base model",
                self.dir.join("adapter_model.safetensors").display(),
                f.b_rows,
                f.a_cols
            );
        }
        let s = self.scale(module, f.r);
        for o in 0..out_dim {
            let b_row = &f.b[o * f.r..(o + 1) * f.r];
            for i in 0..in_dim {
                let mut acc = 0.0f64;
                for (k, bk) in b_row.iter().enumerate() {
                    acc += *bk as f64 * f.a[k * in_dim + i] as f64;
                }
                w_t[i * out_dim + o] += (s * acc) as f32;
            }
        }
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(module.to_string());
        Ok(())
    }

    /// Every adapted module must have met a weight of the model (PEFT refuses an adapter whose
    /// targets are not in the model; a silently ignored factor would diff the wrong model).
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> = self.modules.keys().filter(|m| !used.contains(*m)).collect();
        unused.sort();
        if let Some(first) = unused.first() {
            bail!(
                "{}: module `{first}` ({} of {} adapted modules) matches no linear weight of the model: the adapter belongs to another architecture",
                self.dir.join("adapter_model.safetensors").display(),
                unused.len(),
                self.modules.len()
            );
        }
        Ok(())
    }

    /// What the adapter changes, for summaries: rank, alpha, rsLoRA and the adapted module kinds.
    pub fn describe(&self) -> String {
        let mut kinds: Vec<&str> = self.modules.keys().filter_map(|m| m.rsplit('.').next()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        format!(
            "LoRA r={} alpha={}{} on {}",
            self.config.r,
            self.config.lora_alpha,
            if self.config.use_rslora { " (rsLoRA)" } else { "" },
            kinds.join(", ")
        )
    }
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` →
/// (`model.layers.0.self_attn.q_proj`, 0); `lora_B` → 1. PEFT's saved names drop the adapter name;
/// a name that kept it (`lora_A.default.weight`) is read too.
fn parse_key(name: &str) -> Option<(String, usize)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (marker, which) in [(".lora_A.", 0), (".lora_B.", 1)] {
        if let Some(at) = rest.find(marker) {
            if rest.ends_with(".weight") {
                return Some((rest[..at].to_string(), which));
            }
        }
    }
    None
}

/// `lm_head` or `embed_tokens` when tensor `name` adapts one of them (`lora_A`/`lora_B`, or PEFT's
/// `lora_embedding_A`/`_B` of an embedding): crossdiff merges only the blocks' linear layers.
fn unsupported_target(name: &str) -> Option<&'static str> {
    let at = [".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"].iter().find_map(|m| name.find(m))?;
    let module = &name[..at];
    ["lm_head", "embed_tokens"].into_iter().find(|head| module == *head || module.ends_with(&format!(".{head}")))
}
