//! Writing the paired activation cache: documents stream in, are grouped into shards of whole
//! documents (in stream order), and each shard's documents are batched by length, run through
//! blocks 0..=L of each model and written atomically; `cache.json` is rewritten after every shard,
//! so a killed run resumes at the next shard and produces byte-identical files. `--low-memory` runs
//! the base model over every shard first (partial shards on disk), then the chat model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use burn::tensor::Device;
use safetensors::SafeTensors;

use crate::activations::cache::{ActDtype, CacheIndex, CacheSettings, ShardInfo, checksum};
use crate::activations::plan::{Planner, ShardPlan, check_context, check_finite, compute_acts_on, plan_from_partial};
use crate::data::{Mixer, TokenizeOptions};
use crate::io::OwnedTensor;
use crate::model::decoder::LoadOptions;
use crate::model::tokenizer::ChatTokenizer;
use crate::model::{Model, check_models};

mod resume;
pub use resume::{changed_settings, flag_name};

/// Default tokens per shard file.
pub const DEFAULT_SHARD_TOKENS: usize = 65_536;
/// Default padded tokens per forward batch.
pub const DEFAULT_BATCH_TOKENS: usize = 8192;

/// `crossdiff cache`: run blocks 0..=L of both models over the data and write token-aligned
/// (base, chat) pairs. Re-running the same job resumes.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheJob {
    /// The base model: a Hugging Face snapshot directory.
    #[arg(long)]
    pub base: PathBuf,
    /// The chat model (its chat template renders the conversations).
    #[arg(long)]
    pub chat: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the chat model's weights: --chat is then the adapter's base model.
    #[arg(long, value_name = "DIR")]
    pub chat_adapter: Option<PathBuf>,
    /// .txt, .jsonl (`text` or `messages`) or .parquet (`text` or `messages` column) files.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// The block whose output is cached (0-indexed; the paper: 13 of Gemma 2 2B's 26).
    #[arg(long)]
    pub layer: usize,
    /// Tokens to cache.
    #[arg(long)]
    pub tokens: u64,
    /// The cache directory (cache.json and shards).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored element type of the activations.
    #[arg(long, default_value = "bf16")]
    pub dtype: ActDtype,
    #[command(flatten)]
    pub tokenize: TokenizeOptions,
    /// Interleave the data files 1:1 by tokens (the paper mixes web text and chat).
    #[arg(long)]
    pub mix: bool,
    /// Tokens per shard file.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
    /// Padded tokens per forward batch (batch × longest document).
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    pub batch_tokens: usize,
    /// One model on the device at a time: a base pass over every shard, then a chat pass.
    #[arg(long)]
    pub low_memory: bool,
    #[command(flatten)]
    pub load: LoadOptions,
    /// Fan the forward batches out over these devices — local backends or `remote:ws://HOST:PORT`
    /// servers, comma-separated — each holding both models; the shards are the one-device ones.
    /// --backend is then not used for caching.
    #[arg(long, value_delimiter = ',', value_name = "DEV,DEV,…")]
    pub devices: Vec<crate::Backend>,
}

impl Default for CacheJob {
    /// The defaults of every optional setting; paths empty and `tokens` 0 (a caller fills them).
    fn default() -> Self {
        Self {
            base: PathBuf::new(),
            chat: PathBuf::new(),
            chat_adapter: None,
            data: Vec::new(),
            layer: 0,
            tokens: 0,
            out: PathBuf::new(),
            dtype: ActDtype::Bf16,
            tokenize: TokenizeOptions::default(),
            mix: false,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            low_memory: false,
            load: LoadOptions::default(),
            devices: Vec::new(),
        }
    }
}

impl CacheJob {
    /// Checks what can be checked without opening a model (the layer against the models' depth is
    /// checked once the snapshots are open).
    pub fn validate(&self) -> Result<()> {
        use crate::bad_value::{ensure, path_given, positive};
        for (p, flag) in [(&self.base, "base"), (&self.chat, "chat"), (&self.out, "out")] {
            path_given(p, flag)?;
        }
        crate::data::mix::check_data_files(&self.data)?;
        ensure(self.tokens > 0, "tokens", || "must be positive: a cache with no tokens trains nothing".into())?;
        positive(self.batch_tokens as u64, "batch-tokens")?;
        self.tokenize.validate()?;
        ensure(self.shard_tokens >= self.tokenize.context, "shard-tokens", || {
            format!(
                "({}) must be at least --context ({}): shards hold whole documents",
                self.shard_tokens, self.tokenize.context
            )
        })
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            ActDtype::Bf16 => "bf16",
            ActDtype::F16 => "f16",
            ActDtype::F32 => "f32",
        }
    }

    /// What the cache records, with `tokenize` resolved for the models' family.
    pub fn settings(&self, tokenize: &TokenizeOptions) -> CacheSettings {
        CacheSettings {
            target_tokens: self.tokens,
            context: tokenize.context,
            mix: self.mix,
            drop_bos: tokenize.drop_bos,
            skip_first: tokenize.skip(),
            shard_tokens: self.shard_tokens,
            batch_tokens: self.batch_tokens,
            data: self.data.iter().map(|p| p.display().to_string()).collect(),
            f16_weights: self.load.f16_weights,
        }
    }
}

/// Progress of a cache run, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct CacheProgress {
    pub tokens: u64,
    pub target: u64,
    pub phase: &'static str,
}

fn shard_name(i: usize) -> String {
    format!("acts-{i:05}.safetensors")
}

/// Interleaves base and chat rows `[n, d]` each into `[n, 2, d]` bytes of `dtype`.
pub(crate) fn pair_bytes(base: &[f32], chat: &[f32], d: usize, dtype: ActDtype) -> Vec<u8> {
    let n = base.len() / d;
    let mut out = Vec::with_capacity(n * 2 * d * dtype.bytes());
    for r in 0..n {
        dtype.encode(&base[r * d..(r + 1) * d], &mut out);
        dtype.encode(&chat[r * d..(r + 1) * d], &mut out);
    }
    out
}

/// Runs (or resumes) a cache job. `progress` is called after every shard; returning `false` from
/// `keep_going` stops cleanly after the current shard (Ctrl-C, the app's cancel button).
pub fn run_cache(
    job: &CacheJob,
    device: &Device,
    mut progress: impl FnMut(CacheProgress),
    keep_going: impl Fn() -> bool,
) -> Result<CacheIndex> {
    job.validate()?;
    resume::check_out_holds_a_cache(&job.out)?;
    // One writer per folder: a second run on the same --out would interleave its shards with this
    // one's. Taking the lock creates the folder; it is released when this function returns (before
    // `clean_on_failure` removes a folder a refused run left empty).
    let _lock = crate::io::DirLock::acquire(&job.out, "out")?;
    let base_snap = crate::model::snapshot::Snapshot::open(&job.base)?;
    let chat_snap = crate::model::snapshot::Snapshot::open(&job.chat)?;
    crate::model::snapshot::check_pair(&base_snap, &chat_snap)?;
    for snap in [&base_snap, &chat_snap] {
        check_context(job.tokenize.context, &snap.config, &snap.dir)?;
    }
    let layers = base_snap.config.num_hidden_layers;
    crate::bad_value::ensure(job.layer < layers, "layer", || {
        format!("{} is out of range: the models have {layers} blocks (0..={})", job.layer, layers - 1)
    })?;
    let d = base_snap.config.hidden_size;
    let tokenize = job.tokenize.resolved_for(base_snap.config.family)?;
    let models = vec![base_snap.name(), crate::model::adapted_name(chat_snap.name(), job.chat_adapter.as_deref())];
    let model_ids = vec![base_snap.identity()?, crate::model::identity_of(&job.chat, job.chat_adapter.as_deref())?];
    crate::model::snapshot::check_distinct((&job.base, &model_ids[0]), (&job.chat, &model_ids[1]))?;
    drop((base_snap, chat_snap));

    let request = resume::Request {
        out: &job.out,
        layer: job.layer,
        dtype: job.dtype,
        settings: job.settings(&tokenize),
        low_memory: job.low_memory,
    };
    let mut index = resume::open_or_start(request, d, models, model_ids)?;
    if index.complete {
        return Ok(index);
    }

    // Conversations are rendered with the chat model's template (a base model often has none);
    // the tokenizers are checked to be the same, so both models read the same ids. Both, and the
    // data files, are checked before the models load.
    let chat_tok = ChatTokenizer::with_adapter(&job.chat, job.chat_adapter.as_deref())?;
    ChatTokenizer::from_dir(&job.base)?.check_same(&chat_tok)?;
    let mut mixer = Mixer::new(&job.data, job.mix, &chat_tok, tokenize)?;
    mixer.skip(done_docs_total(&index))?;

    // --devices: each device holds the models and takes every n-th forward batch.
    let devices = match job.devices.as_slice() {
        [] => vec![device.clone()],
        many => crate::backend::connect_devices(many)?,
    };
    let device = devices[0].clone();
    let load = |dir: &Path, adapter: Option<&Path>| -> Result<Vec<Model>> {
        devices.iter().map(|dev| Model::load_adapted(dir, adapter, dev, job.load, |_, _| {})).collect()
    };
    let timing = crate::phases::phase("load models", &device);
    let bases = load(&job.base, None)?;
    let chats = if job.low_memory { None } else { Some(load(&job.chat, job.chat_adapter.as_deref())?) };
    drop(timing);
    let base = &bases[0];
    let chat = chats.as_ref().map(|c| &c[0]);
    if let Some(chat) = chat {
        check_models(base, chat)?;
    }

    // Base (or both) pass over the data stream.
    let mut tokens_done = index.total_tokens + index.partial_shards.iter().map(|s| s.tokens).sum::<u64>();
    let mut planner = Planner::default();
    let phase = if job.low_memory { "base pass" } else { "caching" };
    // Models are loaded: a first report lets callers time the computation alone.
    progress(CacheProgress { tokens: tokens_done, target: job.tokens, phase });
    while tokens_done < job.tokens && keep_going() {
        let timing = crate::phases::phase("read and tokenize documents", &device);
        let Some(plan) =
            planner.next(&mut mixer, done_docs_total(&index), job.shard_tokens, job.tokens - tokens_done)?
        else {
            break;
        };
        drop(timing);
        let base_acts = compute_acts_on(&refs(&bases), &plan, job.layer, job.batch_tokens)?;
        check_finite(&base_acts, d, &plan, base, job.layer, job.dtype, &job.data)?;
        let shard_i = index.shards.len() + index.partial_shards.len();
        let info = ShardInfo {
            file: shard_name(shard_i),
            tokens: plan.tokens as u64,
            documents: plan.docs.len() as u64,
            checksum: 0,
        };
        match chats.as_deref() {
            Some(chats) => {
                let chat = &chats[0];
                let chat_acts = compute_acts_on(&refs(chats), &plan, job.layer, job.batch_tokens)?;
                let _phase = crate::phases::phase("check and write shards", &device);
                check_finite(&chat_acts, d, &plan, chat, job.layer, job.dtype, &job.data)?;
                finish_shard(job, &mut index, info, &plan, &base_acts, &chat_acts, d)?;
            }
            None => {
                let mut bytes = Vec::new();
                job.dtype.encode(&base_acts, &mut bytes);
                let mut tensors = vec![OwnedTensor {
                    name: "acts_base".into(),
                    dtype: job.dtype.safetensors(),
                    shape: vec![plan.tokens, d],
                    bytes,
                }];
                tensors.extend(plan.metadata_tensors());
                tensors.extend(plan.prefix_tensors());
                let bytes = shard_bytes(&tensors, &Default::default())?;
                write_shard(&job.out.join(partial_name(&info.file)), &bytes)?;
                index.partial_shards.push(info);
            }
        }
        tokens_done += plan.tokens as u64;
        // What the written shards hold per source: not a document drawn but carried to the next
        // shard, nor the part of the run's last document that was cut off.
        for doc in &plan.docs {
            if let Some(source) = index.sources.get_mut(doc.source) {
                source.tokens += doc.ids.len() as u64;
            }
        }
        index.write(&job.out)?;
        progress(CacheProgress { tokens: tokens_done, target: job.tokens, phase });
    }
    if !keep_going() {
        return Ok(index);
    }
    drop(bases);

    // --low-memory: the chat pass over the partial shards.
    if job.low_memory && !index.partial_shards.is_empty() {
        let chats = load(&job.chat, job.chat_adapter.as_deref())?;
        let chat = &chats[0];
        let mut done = index.total_tokens;
        while let Some(info) = index.partial_shards.first().cloned() {
            if !keep_going() {
                return Ok(index);
            }
            let partial = job.out.join(partial_name(&info.file));
            let bytes = std::fs::read(&partial)
                .map_err(|e| anyhow!("{}: cannot read partial shard: {e}", partial.display()))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| anyhow!("{}: corrupt partial shard: {e}", partial.display()))?;
            let plan = plan_from_partial(&st).with_context(|| partial.display().to_string())?;
            let base_view = st.tensor("acts_base").map_err(|e| anyhow!("{}: {e}", partial.display()))?;
            if base_view.shape() != [plan.tokens, d] || base_view.dtype() != job.dtype.safetensors() {
                anyhow::bail!(
                    "{}: corrupt partial shard: tensor `acts_base` is {:?} {:?}, expected {:?} [{}, {d}]",
                    partial.display(),
                    base_view.dtype(),
                    base_view.shape(),
                    job.dtype.safetensors(),
                    plan.tokens
                );
            }
            let mut base_acts = vec![0.0f32; plan.tokens * d];
            job.dtype.decode(base_view.data(), &mut base_acts);
            let chat_acts = compute_acts_on(&refs(&chats), &plan, job.layer, job.batch_tokens)
                .with_context(|| partial.display().to_string())?;
            check_finite(&chat_acts, d, &plan, chat, job.layer, job.dtype, &job.data)?;
            index.partial_shards.remove(0);
            finish_shard(job, &mut index, info.clone(), &plan, &base_acts, &chat_acts, d)?;
            index.write(&job.out)?;
            let _ = std::fs::remove_file(&partial);
            done += info.tokens;
            progress(CacheProgress {
                tokens: done,
                target: index.total_tokens + index.partial_shards.iter().map(|s| s.tokens).sum::<u64>(),
                phase: "chat pass",
            });
        }
    }
    if index.total_tokens == 0 {
        return Err(crate::bad_value::bad("data", "holds no documents to cache (0 tokens)"));
    }
    index.complete = true;
    index.write(&job.out)?;
    Ok(index)
}

/// Writes a complete shard (pairs and per-token metadata) and lists it in the index.
fn finish_shard(
    job: &CacheJob,
    index: &mut CacheIndex,
    info: ShardInfo,
    plan: &ShardPlan,
    base_acts: &[f32],
    chat_acts: &[f32],
    d: usize,
) -> Result<()> {
    let mut tensors = vec![OwnedTensor {
        name: "acts".into(),
        dtype: job.dtype.safetensors(),
        shape: vec![plan.tokens, 2, d],
        bytes: pair_bytes(base_acts, chat_acts, d, job.dtype),
    }];
    tensors.extend(plan.metadata_tensors());
    let path = job.out.join(&info.file);
    write_shard(&path, &shard_bytes(&tensors, &index.shard_metadata())?)?;
    let checksum = checksum(&fs_err::read(&path)?);
    index.total_tokens += plan.tokens as u64;
    index.documents += plan.docs.len() as u64;
    index.shards.push(ShardInfo { checksum, ..info });
    Ok(())
}

fn done_docs_total(index: &CacheIndex) -> u64 {
    index.documents + index.partial_shards.iter().map(|s| s.documents).sum::<u64>()
}

fn partial_name(file: &str) -> String {
    format!("{file}.base-partial")
}

/// A safetensors file of `tensors` in the order given, with `metadata` as its `__metadata__`
/// (omitted when empty). Built here, not by `safetensors::serialize`, whose metadata map has no
/// fixed order: a resumed cache must write the same bytes as an uninterrupted one.
fn shard_bytes(tensors: &[OwnedTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for t in tensors {
        let entry = serde_json::json!({
            "dtype": serde_json::to_value(t.dtype)?,
            "shape": t.shape,
            "data_offsets": [offset, offset + t.bytes.len()],
        });
        header.insert(t.name.clone(), entry);
        offset += t.bytes.len();
    }
    let mut json = serde_json::to_vec(&header)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

/// Writes a shard file atomically. A file already there that cache.json does not list (the
/// resume check lets through only the one an interrupted run may have left) is replaced when it
/// holds the same bytes or is no safetensors file (cut short by a crash); a whole shard with other
/// contents is someone's, and is refused, never overwritten.
fn write_shard(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Ok(old) = std::fs::read(path) {
        if old != bytes && SafeTensors::deserialize(&old).is_ok() {
            anyhow::bail!(
                "{}: a shard file cache.json does not list is there, holding other activations than the \
                 shard this run writes under its name: cache.json and the folder disagree; move it away, \
                 or choose another --out",
                path.display()
            );
        }
    }
    crate::io::write_atomic(path, |f| Ok(std::io::Write::write_all(f, bytes)?))
}

/// The models as the list [`compute_acts_on`] takes.
fn refs(models: &[Model]) -> Vec<&Model> {
    models.iter().collect()
}
