//! A Hugging Face model snapshot directory: `config.json`, safetensors weights (single file or
//! sharded with `model.safetensors.index.json`; bf16, f16 or f32), tokenizer files.
//!
//! Weights are memory-mapped and converted one tensor at a time, so peak host memory stays near one
//! converted tensor plus the page cache of the mapping.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

pub use crate::model::config::ModelConfig;
use crate::model::config::describe_serde_error;

/// The element type of stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    Bf16,
}

impl StoredDtype {
    fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// `torch_dtype` names as config.json writes them.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(Self::F32),
            "float16" | "half" => Some(Self::F16),
            "bfloat16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// Rounds an f32 value to this dtype and back (what `torch.tensor(x, dtype=...)` does).
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::F16 => half::f16::from_f32(v).to_f32(),
            Self::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
}

/// A snapshot directory with its config and memory-mapped weight files.
pub struct Snapshot {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// `eos_token_id` of generation_config.json, when the snapshot has one (see [`generation_eos`]).
    pub generation_eos: Vec<u32>,
    files: Vec<WeightFile>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
}

struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
}

impl WeightFile {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        // SAFETY: the mapping is read-only; a snapshot modified while crossdiff reads it is outside
        // what any loader can defend against (transformers maps the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot map: {e}", path.display()))?;
        Ok(Self { path, mmap })
    }

    /// Drops the mapped pages of a tensor that has been converted, so the page cache of the
    /// mapping does not add a second copy of the weights to the process's resident memory.
    fn release(&self, bytes: &[u8]) {
        #[cfg(unix)]
        {
            let offset = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
            // SAFETY: a read-only, file-backed mapping: MADV_DONTNEED only drops pages, which are
            // read back from the file on the next access; contents never change.
            let _ =
                unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len()) };
        }
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            anyhow!(
                "{}: corrupt safetensors header: {}",
                self.path.display(),
                crate::io::diagnose_safetensors(&self.mmap, &e)
            )
        })
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Snapshot {
    /// Opens a snapshot directory: parses `config.json` and maps the weight files (no copy yet).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            bail!("{}: not a model snapshot directory", dir.display());
        }
        if !dir.join("config.json").exists() && dir.join("cache.json").exists() {
            bail!("{}: this is an activation cache, not a model snapshot: give the model's folder", dir.display());
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let generation_eos = generation_eos(&dir.join("generation_config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| anyhow!("{}: cannot read: {e}", index_path.display()))?;
            let parsed: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: {}", index_path.display(), describe_serde_error(&e)))?;
            let mut by_file: BTreeMap<&str, usize> = BTreeMap::new();
            for (tensor, file) in &parsed.weight_map {
                let next = by_file.len();
                let slot = *by_file.entry(file.as_str()).or_insert(next);
                index.insert(tensor.clone(), slot);
            }
            let mut names: Vec<(&str, usize)> = by_file.into_iter().collect();
            names.sort_by_key(|(_, i)| *i);
            for (name, _) in names {
                files.push(WeightFile::open(dir.join(name))?);
            }
        } else if single.exists() {
            let file = WeightFile::open(single)?;
            for name in file.parse()?.names() {
                index.insert(name.to_string(), 0);
            }
            files.push(file);
        } else {
            bail!("{}: no weights: expected model.safetensors or model.safetensors.index.json", dir.display());
        }
        // Parse every header once up front so a corrupt shard is reported before any work.
        for f in &files {
            f.parse()?;
        }
        // Blocks in the weights beyond `num_hidden_layers` would be silently skipped: the config is
        // wrong for these weights (a missing block is named when it is read).
        let blocks = index
            .keys()
            .filter_map(|k| k.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        if blocks > config.num_hidden_layers {
            bail!(
                "{}: field `num_hidden_layers` is {}, the weights have {blocks} blocks (model.layers.{})",
                dir.join("config.json").display(),
                config.num_hidden_layers,
                blocks - 1
            );
        }
        Ok(Self { dir, config, generation_eos, files, index })
    }

    /// The directory's last path component (how caches and runs refer to a model).
    pub fn name(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Stored dtype of a tensor.
    pub fn dtype_of(&self, name: &str) -> Result<StoredDtype> {
        let (file, view) = self.view(name)?;
        StoredDtype::from_safetensors(view.dtype())
            .ok_or_else(|| anyhow!("{}: tensor `{name}` has unsupported dtype {:?}", file.path.display(), view.dtype()))
    }

    fn view(&self, name: &str) -> Result<(&WeightFile, safetensors::tensor::TensorView<'_>)> {
        let &slot = self.index.get(name).ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.dir.display()))?;
        let file = &self.files[slot];
        let view = file
            .parse()?
            .tensor(name)
            .map_err(|_| anyhow!("{}: missing tensor `{name}` (listed in the index)", file.path.display()))?;
        Ok((file, view))
    }

    /// Reads tensor `name`, checks its shape, converts it to f32 (row-major, as stored).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (file, view) = self.view(name)?;
        if view.shape() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from config.json",
                file.path.display(),
                view.shape(),
                shape
            );
        }
        let bytes = view.data();
        let dtype = StoredDtype::from_safetensors(view.dtype()).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` has unsupported dtype {:?} (expected bf16, f16 or f32)",
                file.path.display(),
                view.dtype()
            )
        })?;
        let _ = dtype; // checked above: only the three float types reach the decoder
        let values = crate::io::decode_f32(view.dtype(), bytes)?;
        file.release(bytes);
        Ok(values)
    }

    /// Reads a PyTorch `[out, in]` linear weight and returns it transposed to `[in, out]`, so the
    /// model computes `x · W` with contiguous operands.
    pub fn read_linear_t(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Vec<f32>> {
        let w = self.read_f32(name, &[out_dim, in_dim])?;
        let mut t = vec![0.0f32; w.len()];
        for o in 0..out_dim {
            let row = &w[o * in_dim..(o + 1) * in_dim];
            for (i, v) in row.iter().enumerate() {
                t[i * out_dim + o] = *v;
            }
        }
        Ok(t)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// Bytes the weights take on disk.
    pub fn weight_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.mmap.len() as u64).sum()
    }

    /// A short fingerprint of this model (16 hex digits), recorded in cache.json, a run's
    /// config.json and its checkpoint, so that a cache, a run and the models given to a later job
    /// can be checked to belong together. A fine-tune has its base's config and tensor layout, and
    /// may change only some tensors (a LoRA merge of the attention projections), so every tensor is
    /// sampled: its name, dtype, shape and 4 KiB from the middle of its data, plus the parsed config
    /// (so line endings or key order in config.json do not matter). About 1 MB read on a 2B model.
    pub fn identity(&self) -> Result<String> {
        const WINDOW: usize = 4 << 10;
        // Each file's header parsed once; tensors in name order whatever file holds them.
        let mut samples: Vec<(String, Vec<u8>)> = Vec::with_capacity(self.index.len());
        for f in &self.files {
            for (name, view) in f.parse()?.tensors() {
                let data = view.data();
                let start = (data.len() / 2).saturating_sub(WINDOW / 2);
                let mut sample = format!("{:?}{:?}", view.dtype(), view.shape()).into_bytes();
                sample.extend_from_slice(&data[start..(start + WINDOW).min(data.len())]);
                samples.push((name, sample));
            }
        }
        samples.sort();
        let mut bytes = serde_json::to_vec(&self.config)?;
        for (name, sample) in samples {
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&sample);
        }
        Ok(format!("{:016x}", crate::io::checksum(&bytes)))
    }

    pub fn context(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The stop ids generation_config.json lists (`eos_token_id`: one id or a list; none without the
/// file), which transformers' `generate` stops on: instruct models list some there only (Qwen 2.5
/// and 3 `<|endoftext|>`, Llama 3.0 `<|eot_id|>`). Only that field is read; an entry that is not a
/// token id is refused.
fn generation_eos(path: &Path) -> Result<Vec<u32>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let entries = match value.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list.clone(),
        Some(one) => vec![one.clone()],
    };
    entries
        .iter()
        .map(|id| {
            id.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| anyhow!("{}: field `eos_token_id` has {id}, not a token id", path.display()))
        })
        .collect()
}

/// Refuses a base/chat pair that cannot be diffed: a fine-tune has its base's architecture (every
/// field that shapes the computation agrees).
pub fn check_pair(base: &Snapshot, chat: &Snapshot) -> Result<()> {
    let (a, b) = (&base.config, &chat.config);
    let f = |x: Option<f64>| x.map_or("none".to_string(), |v| v.to_string());
    let ropes = |c: &ModelConfig| format!("{:?}", (0..c.num_hidden_layers).map(|l| c.rope(l).ok()).collect::<Vec<_>>());
    let layers =
        |c: &ModelConfig| format!("{:?}", (0..c.num_hidden_layers).map(|l| c.is_sliding(l)).collect::<Vec<_>>());
    let fields = [
        ("model_type", a.model_type.clone(), b.model_type.clone()),
        ("hidden_size", a.hidden_size.to_string(), b.hidden_size.to_string()),
        ("vocab_size", a.vocab_size.to_string(), b.vocab_size.to_string()),
        ("num_hidden_layers", a.num_hidden_layers.to_string(), b.num_hidden_layers.to_string()),
        ("intermediate_size", a.intermediate_size.to_string(), b.intermediate_size.to_string()),
        ("num_attention_heads", a.num_attention_heads.to_string(), b.num_attention_heads.to_string()),
        ("num_key_value_heads", a.num_key_value_heads.to_string(), b.num_key_value_heads.to_string()),
        ("head_dim", a.head_dim.to_string(), b.head_dim.to_string()),
        ("rope_theta", a.rope_base().to_string(), b.rope_base().to_string()),
        ("rope_parameters", ropes(a), ropes(b)),
        ("layer_types", layers(a), layers(b)),
        ("attention_bias", format!("{:?}", a.attention_biases()), format!("{:?}", b.attention_biases())),
        ("mlp_bias", a.mlp_biases().to_string(), b.mlp_biases().to_string()),
        ("tie_word_embeddings", a.tied().to_string(), b.tied().to_string()),
        ("rms_norm_eps", a.rms_norm_eps.to_string(), b.rms_norm_eps.to_string()),
        ("query_pre_attn_scalar", a.attention_scale().to_string(), b.attention_scale().to_string()),
        ("attn_logit_softcapping", f(a.attn_logit_softcapping), f(b.attn_logit_softcapping)),
        ("final_logit_softcapping", f(a.final_logit_softcapping), f(b.final_logit_softcapping)),
        (
            "sliding_window",
            format!("{:?}", a.effective_sliding_window()),
            format!("{:?}", b.effective_sliding_window()),
        ),
        ("hidden_activation", a.activation().to_string(), b.activation().to_string()),
    ];
    for (field, x, y) in fields {
        if x != y {
            bail!(
                "base and chat differ in config.json field `{field}`: {} has {x}, {} has {y}",
                base.dir.display(),
                chat.dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses a pair that is one model twice (the same identity): the jobs that diff a pair call this
/// (cache, on-the-fly training, kl, the prompt lab); the engine's functions do not, so a KL of a
/// model against itself stays computable as a check of the machinery.
pub fn check_distinct(base: (&Path, &str), chat: (&Path, &str)) -> Result<()> {
    if base.1 == chat.1 {
        bail!(
            "{} and {} are the same model (identity {}): there is nothing to diff; give the base and its fine-tune (a LoRA fine-tune with --chat-adapter)",
            base.0.display(),
            chat.0.display(),
            base.1
        );
    }
    Ok(())
}
