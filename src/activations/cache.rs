//! The paired activation cache's format (interfaces.md, "Activation cache"): token-aligned
//! (base, chat) residuals at the output of block L, in safetensors shards, with `cache.json` as the
//! index. The writer is `activations::writer`, the shuffled reader `activations::reader`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub use crate::io::checksum;

use crate::io::write_atomic;

pub const FORMAT: &str = "crossdiff-cache/1";

/// Element type of the stored activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActDtype {
    #[default]
    Bf16,
    F16,
    F32,
}

impl std::str::FromStr for ActDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => bail!("--dtype: \"{s}\" is not one of bf16, f16, f32"),
        }
    }
}

impl ActDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }

    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F32 => Some(Self::F32),
            _ => None,
        }
    }

    /// Appends `values` encoded in this dtype.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes little-endian bytes of this dtype into f32.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        crate::io::decode_f32_into(self.safetensors(), bytes, out).expect("the three cache dtypes are float types")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    #[serde(default)]
    pub documents: u64,
    /// Word-wise FNV-style hash of the file, checked when the reader loads it (0 = not recorded).
    #[serde(default)]
    pub checksum: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    pub path: String,
    #[serde(default)]
    pub tokens: u64,
}

/// `cache.json`. Reading needs only `format`, `d_model`, `dtype` and `shards` (`file`, `tokens`);
/// every other key is read when it has the expected shape and ignored otherwise, so a cache written
/// by another tool in this format trains (interfaces.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheIndex {
    pub format: String,
    pub d_model: usize,
    /// The block whose output is cached (`None`: not recorded, as another tool may write it).
    pub layer: Option<usize>,
    pub dtype: ActDtype,
    /// The models' directory names, for people.
    pub models: Vec<String>,
    /// The models' identities ([`crate::model::snapshot::Snapshot::identity`], base then chat),
    /// checked against the models and runs this cache meets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub model_ids: Vec<String>,
    pub total_tokens: u64,
    pub shards: Vec<ShardInfo>,
    pub sources: Vec<SourceInfo>,
    /// What the run was asked for; a resumed run must ask for the same.
    pub settings: Option<CacheSettings>,
    /// Documents fully written (the resume point in the data stream).
    pub documents: u64,
    /// Whether the writer finished (absent in a foreign file: taken as finished).
    pub complete: bool,
    /// `--low-memory` base pass: shards holding only base activations so far.
    pub partial_shards: Vec<ShardInfo>,
}

/// A key of `cache.json` that is not required: its value when it has the expected shape, else
/// the default.
fn lenient<T: serde::de::DeserializeOwned + Default>(v: &serde_json::Value, key: &str) -> T {
    v.get(key).and_then(|x| serde_json::from_value(x.clone()).ok()).unwrap_or_default()
}

impl CacheIndex {
    /// The index from parsed JSON: the four required keys strictly, the rest leniently; each shard
    /// a file inside the cache folder, listed once; `total_tokens`, when given, the shards' sum.
    pub fn from_value(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let index = Self::parse(v, path)?;
        index.check_total(v, path)?;
        Ok(index)
    }

    /// [`Self::from_value`] without the `total_tokens` check ([`Self::open`] checks the shards'
    /// headers first, so a shard whose `tokens` is wrong is named, not the total).
    fn parse(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let at = path.display();
        let field = |k: &str| v.get(k).ok_or_else(|| anyhow!("{at}: missing field `{k}`"));
        let format = field("format")?.as_str().ok_or_else(|| anyhow!("{at}: field `format` must be a string"))?;
        if format != FORMAT {
            bail!("{at}: field `format` is \"{format}\", expected \"{FORMAT}\"");
        }
        let d_model = field("d_model")?
            .as_u64()
            .filter(|&d| d > 0)
            .ok_or_else(|| anyhow!("{at}: field `d_model` must be a positive integer"))? as usize;
        let dtype: ActDtype = serde_json::from_value(field("dtype")?.clone())
            .map_err(|_| anyhow!("{at}: field `dtype` must be one of \"bf16\", \"f16\", \"f32\""))?;
        let list = field("shards")?.as_array().ok_or_else(|| anyhow!("{at}: field `shards` must be a list"))?;
        let mut shards = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let file = s
                .get("file")
                .and_then(|f| f.as_str())
                .ok_or_else(|| anyhow!("{at}: field `shards[{i}].file` must be a string"))?;
            let tokens = s
                .get("tokens")
                .and_then(|t| t.as_u64())
                .ok_or_else(|| anyhow!("{at}: field `shards[{i}].tokens` must be a whole number"))?;
            shards.push(ShardInfo {
                file: file.to_string(),
                tokens,
                documents: lenient(s, "documents"),
                checksum: lenient(s, "checksum"),
            });
        }
        let partial_shards: Vec<ShardInfo> = lenient(v, "partial_shards");
        let mut seen: BTreeMap<PathBuf, String> = BTreeMap::new();
        let listed_files = shards.iter().enumerate().map(|(i, s)| (format!("shards[{i}]"), &s.file));
        let partial_files = partial_shards.iter().enumerate().map(|(i, s)| (format!("partial_shards[{i}]"), &s.file));
        for (field, file) in listed_files.chain(partial_files) {
            let key = shard_file_key(file).map_err(|why| anyhow!("{at}: field `{field}.file` is {file:?}: {why}"))?;
            if let Some(first) = seen.insert(key, field.clone()) {
                bail!("{at}: shard {file} is listed twice (`{first}` and `{field}`); each shard is listed once");
            }
        }
        let total_tokens = shards.iter().map(|s| s.tokens).sum();
        Ok(Self {
            format: format.to_string(),
            d_model,
            layer: lenient(v, "layer"),
            dtype,
            models: lenient(v, "models"),
            model_ids: lenient(v, "model_ids"),
            total_tokens,
            shards,
            sources: lenient(v, "sources"),
            settings: lenient(v, "settings"),
            documents: lenient(v, "documents"),
            // Absent: finished (another tool's file); present but not a bool: not trusted as finished.
            complete: v.get("complete").map_or(true, |c| c.as_bool() == Some(true)),
            partial_shards,
        })
    }

    /// `total_tokens`, when the file gives it, against the shards' sum.
    fn check_total(&self, v: &serde_json::Value, path: &Path) -> Result<()> {
        match v.get("total_tokens").and_then(|t| t.as_u64()) {
            Some(t) if t != self.total_tokens => {
                bail!("{}: field `total_tokens` is {t} but the shards hold {}", path.display(), self.total_tokens)
            }
            _ => Ok(()),
        }
    }

    /// Refuses a cache a job cannot read in full: unfinished (unless `allow_partial`, the
    /// `--allow-partial` flag) or empty. Unfinished is said first: a `--low-memory` cache stopped
    /// in its base pass holds no finished tokens yet, and is not "empty".
    pub fn check_usable(&self, dir: &Path, allow_partial: bool) -> Result<()> {
        let base_only: u64 = self.partial_shards.iter().map(|s| s.tokens).sum();
        let so_far = if base_only > 0 {
            format!(
                "{} tokens finished so far, {base_only} more with only the base model's activations (--low-memory)",
                self.total_tokens
            )
        } else {
            format!("{} tokens so far", self.total_tokens)
        };
        if !self.complete && !allow_partial {
            bail!(
                "{}: the cache is incomplete ({so_far}; its `cache` run was interrupted): re-run that command to \
                 finish it, or pass --allow-partial to use what is there",
                dir.display()
            );
        }
        if self.total_tokens == 0 {
            if !self.complete {
                let base = if base_only > 0 {
                    format!("; {base_only} tokens have only the base model's activations (--low-memory)")
                } else {
                    String::new()
                };
                bail!(
                    "{}: the cache is incomplete and holds no finished tokens yet (its `cache` run was \
                     interrupted{base}): re-run that command to finish it",
                    dir.display()
                );
            }
            bail!("{}: the cache holds 0 tokens", dir.display());
        }
        Ok(())
    }
}

/// The options that determine a cache's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheSettings {
    pub target_tokens: u64,
    pub context: usize,
    pub mix: bool,
    pub drop_bos: bool,
    pub skip_first: usize,
    pub shard_tokens: usize,
    pub batch_tokens: usize,
    pub data: Vec<String>,
    /// `--f16`: the models' weights were loaded in f16 (it decides the activations' precision, so a
    /// resume must load them the same way; absent in older caches: false).
    #[serde(default)]
    pub f16_weights: bool,
}

impl CacheIndex {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cache.json")
    }

    /// Reads `cache.json` and checks every listed shard's header against it (cheap: headers only).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        let index = Self::parse(&value, &path)?;
        for shard in &index.shards {
            index.check_shard_header(dir, shard)?;
        }
        index.check_total(&value, &path)?;
        Ok(index)
    }

    /// Validates a shard's safetensors header, tensor shapes and file length without reading its data.
    pub fn check_shard_header(&self, dir: &Path, shard: &ShardInfo) -> Result<ShardLayout> {
        use std::io::Read;
        let path = dir.join(&shard.file);
        let mut f = std::fs::File::open(&path)
            .map_err(|e| anyhow!("{}: shard listed in cache.json cannot be opened: {e}", path.display()))?;
        let len = f.metadata()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|_| anyhow!("{}: corrupt shard: shorter than a safetensors header", path.display()))?;
        let header_len = u64::from_le_bytes(n);
        if header_len > 100_000_000 || 8 + header_len > len {
            bail!("{}: corrupt shard: safetensors header length {header_len} does not fit the file", path.display());
        }
        let mut header = vec![0u8; header_len as usize];
        f.read_exact(&mut header)?;
        // Parse the header JSON directly: safetensors' own parser wants the whole file in memory.
        let meta: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| anyhow!("{}: corrupt shard header: {e}", path.display()))?;
        let mut data_len = 0u64;
        let mut acts = None;
        for (name, info) in &meta {
            if name == "__metadata__" {
                self.check_shard_metadata(&path, info)?;
                continue;
            }
            let info: HeaderEntry = serde_json::from_value(info.clone())
                .map_err(|e| anyhow!("{}: corrupt shard header, tensor `{name}`: {e}", path.display()))?;
            data_len = data_len.max(info.data_offsets.1);
            if name == "acts" {
                acts = Some(info);
            }
        }
        if 8 + header_len + data_len != len {
            bail!(
                "{}: corrupt shard: file is {len} bytes, its header describes {} (truncated?)",
                path.display(),
                8 + header_len + data_len
            );
        }
        let acts = acts.ok_or_else(|| anyhow!("{}: shard has no `acts` tensor", path.display()))?;
        let dtype = match acts.dtype.as_str() {
            "BF16" => ActDtype::Bf16,
            "F16" => ActDtype::F16,
            "F32" => ActDtype::F32,
            other => bail!("{}: tensor `acts` has dtype {other}, expected BF16, F16 or F32", path.display()),
        };
        if acts.shape != [shard.tokens as usize, 2, self.d_model] {
            bail!(
                "{}: tensor `acts` has shape {:?}, but cache.json lists this shard with {} tokens of width {} \
                 (shape [{}, 2, {}])",
                path.display(),
                acts.shape,
                shard.tokens,
                self.d_model,
                shard.tokens,
                self.d_model
            );
        }
        let expected = acts.shape.iter().product::<usize>() as u64 * dtype.bytes() as u64;
        if acts.data_offsets.1 - acts.data_offsets.0 != expected {
            bail!("{}: corrupt shard header: tensor `acts` data size does not match its shape", path.display());
        }
        Ok(ShardLayout { dtype, acts_offset: 8 + header_len as usize + acts.data_offsets.0 as usize })
    }

    /// The `__metadata__` this writer puts in a shard: what cache.json says of the cache it belongs
    /// to, so a shard listed in another cache's cache.json is recognised (deterministic: sorted keys).
    pub fn shard_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".to_string(), FORMAT.to_string());
        m.insert("d_model".to_string(), self.d_model.to_string());
        if let Some(layer) = self.layer {
            m.insert("layer".to_string(), layer.to_string());
        }
        if !self.model_ids.is_empty() {
            m.insert("model_ids".to_string(), self.model_ids.join("/"));
        }
        m
    }

    /// A shard's `__metadata__` against cache.json: a shard this writer made for another cache
    /// (another layer, width or models) is refused, naming the file and the field. Metadata of other
    /// tools (no `format` of this writer) and keys cache.json does not record are not compared.
    fn check_shard_metadata(&self, path: &Path, meta: &serde_json::Value) -> Result<()> {
        let get = |k: &str| meta.get(k).and_then(|v| v.as_str());
        if get("format") != Some(FORMAT) {
            return Ok(());
        }
        let layer = self.layer.map(|l| l.to_string());
        let ids = (!self.model_ids.is_empty()).then(|| self.model_ids.join("/"));
        let expected = [
            ("layer", layer, "the block"),
            ("d_model", Some(self.d_model.to_string()), "the width"),
            ("model_ids", ids, "the models' identities"),
        ];
        for (key, want, what) in expected {
            let (Some(want), Some(got)) = (want, get(key)) else { continue };
            if got != want {
                bail!(
                    "{}: shard metadata `{key}` is {got}, but cache.json says {want} ({what}): the shard was written \
                     for another cache; list only this cache's shards in cache.json",
                    path.display()
                );
            }
        }
        Ok(())
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(&Self::path(dir), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }
}

/// A shard's `file` as a path inside the cache folder (its plain names joined, a leading `./`
/// dropped: the key two listings of one file share), or why it is not one: absolute, leaving the
/// folder (`..`), or naming no file.
fn shard_file_key(file: &str) -> std::result::Result<PathBuf, &'static str> {
    use std::path::Component;
    let path = Path::new(file);
    if path.is_absolute() || path.has_root() {
        return Err("a shard must be a file inside the cache folder, not an absolute path");
    }
    let mut key = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => key.push(n),
            Component::CurDir => {}
            _ => return Err("a shard must be a file inside the cache folder (a relative path without `..`)"),
        }
    }
    if key.as_os_str().is_empty() || file.ends_with('/') {
        return Err("a shard must name a file in the cache folder");
    }
    Ok(key)
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Where a shard's activations sit in its file.
#[derive(Debug, Clone, Copy)]
pub struct ShardLayout {
    pub dtype: ActDtype,
    pub acts_offset: usize,
}

/// Reads a whole shard file, verifying its checksum when cache.json records one.
pub fn read_shard_file(dir: &Path, shard: &ShardInfo) -> Result<Vec<u8>> {
    let path = dir.join(&shard.file);
    let bytes = std::fs::read(&path).map_err(|e| anyhow!("{}: cannot read shard: {e}", path.display()))?;
    if shard.checksum != 0 && checksum(&bytes) != shard.checksum {
        bail!("{}: corrupt shard: checksum does not match cache.json", path.display());
    }
    check_acts_finite(&path, &bytes)?;
    Ok(bytes)
}

/// Refuses a shard whose `acts` hold a NaN or an infinity (checksums are optional, and a shard of
/// another tool may hold them), naming the file and the token. An integer test of each value's
/// exponent bits: cheap next to the read and the decode. A header this cannot parse is left to
/// [`CacheIndex::check_shard_header`].
fn check_acts_finite(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(n) = bytes.get(..8) else { return Ok(()) };
    let header_len = u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize;
    let Some(header) = bytes.get(8..8usize.saturating_add(header_len)) else { return Ok(()) };
    let Ok(meta) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else { return Ok(()) };
    let Some(acts) = meta.get("acts").and_then(|v| serde_json::from_value::<HeaderEntry>(v.clone()).ok()) else {
        return Ok(());
    };
    let dtype = match acts.dtype.as_str() {
        "BF16" => ActDtype::Bf16,
        "F16" => ActDtype::F16,
        "F32" => ActDtype::F32,
        _ => return Ok(()),
    };
    let start = 8 + header_len + acts.data_offsets.0 as usize;
    let Some(data) = bytes.get(start..8 + header_len + acts.data_offsets.1 as usize) else { return Ok(()) };
    let bad = match dtype {
        ActDtype::Bf16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        ActDtype::F16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00),
        ActDtype::F32 => {
            data.chunks_exact(4).position(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000)
        }
    };
    let Some(bad) = bad else { return Ok(()) };
    let d = acts.shape.get(2).copied().unwrap_or(1).max(1);
    let width = dtype.bytes();
    let mut value = [0.0f32];
    dtype.decode(&data[bad * width..(bad + 1) * width], &mut value);
    let model = if bad / d % 2 == 0 { "base" } else { "chat" };
    bail!(
        "{}: corrupt shard: activation {} at token {} ({} model, element {}) is not finite; \
         a cache must hold finite activations: re-create this shard",
        path.display(),
        value[0],
        bad / (2 * d),
        model,
        bad % d
    )
}
