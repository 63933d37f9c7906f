//! A PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`), merged into the
//! base's linear weights at load: `W += s · B·A` with `s = lora_alpha / r` (rsLoRA:
//! `lora_alpha / √r`), what PEFT's `merge_and_unload()` computes. Variants that are not a plain
//! low-rank update of the linear weights (DoRA, LoRA biases, embedding adapters, fully saved
//! modules) are refused with the field that asks for them.

use std::collections::{BTreeMap, HashMap, HashSet};
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
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
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
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: {}", config_path.display(), crate::model::config::describe_serde_error(&e)))?;
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
        if config.use_dora {
            return Err(at("use_dora", "is true; DoRA adapters are not supported (plain LoRA and rsLoRA are)"));
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
            modules,
            used: Mutex::new(HashSet::new()),
            fingerprint: crate::io::checksum(&fingerprint_bytes),
        })
    }

    /// The factor on `B·A` for `module`: `alpha / r`, or `alpha / √r` with rsLoRA, where a module
    /// listed in `alpha_pattern` (by its full name or its last components) has its own alpha.
    fn scale(&self, module: &str, r: usize) -> f64 {
        let alpha = self
            .config
            .alpha_pattern
            .iter()
            .find(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
            .map_or(self.config.lora_alpha, |(_, a)| *a);
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
