//! Writing the paired activation cache: documents stream in, are grouped into shards of whole
//! documents (in stream order), and each shard's documents are batched by length, run through
//! blocks 0..=L of each model and written atomically; `cache.json` is rewritten after every shard,
//! so a killed run resumes at the next shard and produces byte-identical files. `--low-memory` runs
//! the base model over every shard first (partial shards on disk), then the chat model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use safetensors::SafeTensors;

use crate::activations::cache::{ActDtype, CacheIndex, CacheSettings, FORMAT, ShardInfo, SourceInfo, checksum};
use crate::activations::plan::{Planner, ShardPlan, check_finite, compute_acts, plan_from_partial};
use crate::data::{Mixer, TokenizeOptions};
use crate::io::{OwnedTensor, write_safetensors};
use crate::model::gemma2::LoadOptions;
use crate::model::tokenizer::ChatTokenizer;
use crate::model::{Model, check_models};

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
}

impl Default for CacheJob {
    /// The defaults of every optional setting; paths empty and `tokens` 0 (a caller fills them).
    fn default() -> Self {
        Self {
            base: PathBuf::new(),
            chat: PathBuf::new(),
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
        ensure(!self.data.is_empty(), "data", || "is required (no data files given)".into())?;
        ensure(self.tokens > 0, "tokens", || "must be positive: a cache with no tokens trains nothing".into())?;
        positive(self.batch_tokens as u64, "batch-tokens")?;
        positive(self.tokenize.context as u64, "context")?;
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

    pub fn settings(&self) -> CacheSettings {
        CacheSettings {
            target_tokens: self.tokens,
            context: self.tokenize.context,
            mix: self.mix,
            drop_bos: self.tokenize.drop_bos,
            skip_first: self.tokenize.skip_first,
            shard_tokens: self.shard_tokens,
            batch_tokens: self.batch_tokens,
            data: self.data.iter().map(|p| p.display().to_string()).collect(),
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
    check_out_holds_a_cache(&job.out)?;
    std::fs::create_dir_all(&job.out).map_err(|e| anyhow!("{}: cannot create: {e}", job.out.display()))?;
    let base_snap = crate::model::snapshot::Snapshot::open(&job.base)?;
    let chat_snap = crate::model::snapshot::Snapshot::open(&job.chat)?;
    crate::model::snapshot::check_pair(&base_snap, &chat_snap)?;
    let layers = base_snap.config.num_hidden_layers;
    crate::bad_value::ensure(job.layer < layers, "layer", || {
        format!("{} is out of range: the models have {layers} blocks (0..={})", job.layer, layers - 1)
    })?;
    let d = base_snap.config.hidden_size;
    let models = vec![base_snap.name(), chat_snap.name()];
    let model_ids = vec![base_snap.identity()?, chat_snap.identity()?];
    crate::model::snapshot::check_distinct((&job.base, &model_ids[0]), (&job.chat, &model_ids[1]))?;
    drop((base_snap, chat_snap));

    // Temporary files of an interrupted write are garbage: the shard they belonged to is redone.
    for entry in fs_err::read_dir(&job.out)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let index_path = CacheIndex::path(&job.out);
    let mut index = if index_path.exists() {
        let existing = CacheIndex::open(&job.out)?;
        if !existing.model_ids.is_empty() && existing.model_ids != model_ids {
            bail!(
                "{}: the cache there was made from other models (identities {}, these are {}); choose another --out",
                index_path.display(),
                existing.model_ids.join("/"),
                model_ids.join("/")
            );
        }
        // Recorded identities decide which models; without them (older caches) the folder names do.
        let names = if existing.model_ids.is_empty() { (&existing.models, &models) } else { (&models, &models) };
        let changed = changed_settings(
            &resume_view(existing.layer, existing.d_model, existing.dtype, names.0, existing.settings.as_ref()),
            &resume_view(Some(job.layer), d, job.dtype, names.1, Some(&job.settings())),
            |key| if key == "width" { "the models' width".into() } else { flag_name(key) },
        );
        if !changed.is_empty() {
            bail!(
                "{}: the cache there was made with other settings: {changed}; \
                 re-run the same command to resume it, or choose another --out",
                index_path.display()
            );
        }
        existing
    } else {
        CacheIndex {
            format: FORMAT.into(),
            d_model: d,
            layer: Some(job.layer),
            dtype: job.dtype,
            models,
            model_ids,
            total_tokens: 0,
            shards: Vec::new(),
            sources: job.data.iter().map(|p| SourceInfo { path: p.display().to_string(), tokens: 0 }).collect(),
            settings: Some(job.settings()),
            documents: 0,
            complete: false,
            partial_shards: Vec::new(),
        }
    };
    if index.complete {
        return Ok(index);
    }

    let device = device.clone();
    let load = |dir: &Path| Model::load(dir, &device, job.load);
    let base = load(&job.base)?;
    let chat = if job.low_memory { None } else { Some(load(&job.chat)?) };
    // Conversations are rendered with the chat model's template (a base model often has none);
    // the tokenizers are checked to be the same, so both models read the same ids.
    let chat_tok = ChatTokenizer::from_dir(&job.chat)?;
    base.tokenizer.check_same(&chat_tok)?;
    if let Some(chat) = &chat {
        check_models(&base, chat)?;
    }

    // Base (or both) pass over the data stream.
    let mut mixer = Mixer::new(&job.data, job.mix, &chat_tok, job.tokenize.clone())?;
    mixer.skip(done_docs_total(&index))?;
    let mut tokens_done = index.total_tokens + index.partial_shards.iter().map(|s| s.tokens).sum::<u64>();
    let mut planner = Planner::default();
    let phase = if job.low_memory { "base pass" } else { "caching" };
    // Models are loaded: a first report lets callers time the computation alone.
    progress(CacheProgress { tokens: tokens_done, target: job.tokens, phase });
    while tokens_done < job.tokens && keep_going() {
        let Some(plan) =
            planner.next(&mut mixer, done_docs_total(&index), job.shard_tokens, job.tokens - tokens_done)?
        else {
            break;
        };
        let base_acts = compute_acts(&base, &plan, job.layer, job.batch_tokens)?;
        check_finite(&base_acts, d, &plan, &base, job.layer, job.dtype, &job.data)?;
        let shard_i = index.shards.len() + index.partial_shards.len();
        let info = ShardInfo {
            file: shard_name(shard_i),
            tokens: plan.tokens as u64,
            documents: plan.docs.len() as u64,
            checksum: 0,
        };
        match &chat {
            Some(chat) => {
                let chat_acts = compute_acts(chat, &plan, job.layer, job.batch_tokens)?;
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
                write_safetensors(&job.out.join(partial_name(&info.file)), &tensors)?;
                index.partial_shards.push(info);
            }
        }
        tokens_done += plan.tokens as u64;
        for (s, t) in index.sources.iter_mut().zip(mixer.tokens_per_source()) {
            s.tokens = *t;
        }
        index.write(&job.out)?;
        progress(CacheProgress { tokens: tokens_done, target: job.tokens, phase });
    }
    if !keep_going() {
        return Ok(index);
    }
    drop(base);

    // --low-memory: the chat pass over the partial shards.
    if job.low_memory && !index.partial_shards.is_empty() {
        let chat = load(&job.chat)?;
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
            let mut base_acts = vec![0.0f32; plan.tokens * d];
            job.dtype.decode(base_view.data(), &mut base_acts);
            let chat_acts = compute_acts(&chat, &plan, job.layer, job.batch_tokens)?;
            check_finite(&chat_acts, d, &plan, &chat, job.layer, job.dtype, &job.data)?;
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
    write_safetensors(&path, &tensors)?;
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

/// What a resumed cache must agree on, keyed so that [`flag_name`] names each by its flag.
fn resume_view(
    layer: Option<usize>,
    d: usize,
    dtype: ActDtype,
    models: &[String],
    settings: Option<&CacheSettings>,
) -> serde_json::Value {
    let mut v = settings.map_or_else(|| serde_json::json!({}), |s| serde_json::to_value(s).expect("serializes"));
    if let Some(t) = v.as_object_mut().and_then(|m| m.remove("target_tokens")) {
        v["tokens"] = t;
    }
    (v["layer"], v["width"], v["dtype"]) = (layer.into(), d.into(), serde_json::to_value(dtype).expect("serializes"));
    for (role, name) in ["base", "chat"].into_iter().zip(models) {
        v[role] = name.as_str().into();
    }
    v
}

/// `cache --out` is a new folder, an empty one, or a cache (resumed): a folder holding anything
/// else (a training run, other files) is refused before anything is written there.
fn check_out_holds_a_cache(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    // Hidden files (temporary files of an interrupted write) and this writer's shards are ours.
    let ours = |n: &str| n.starts_with('.') || (n.starts_with("acts-") && n.contains(".safetensors"));
    let mut found: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !ours(n)).collect();
    if found.is_empty() || CacheIndex::path(out).exists() {
        return Ok(());
    }
    found.sort();
    let listed = |names: &[String]| names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    use crate::run_dir::RunDir;
    let run: Vec<String> = found
        .iter()
        .filter(|n| [RunDir::CONFIG, RunDir::CROSSCODER, RunDir::CHECKPOINT].contains(&n.as_str()))
        .cloned()
        .collect();
    let what = if run.is_empty() {
        format!("is not empty and holds no cache.json ({}): choose a new or empty folder", listed(&found))
    } else {
        format!("holds a training run ({}), not a cache: choose another folder", listed(&run))
    };
    Err(crate::bad_value::bad("out", format!("{} {what} for the cache", out.display())))
}

/// The settings that differ between what a folder was made with (`old`) and what a job asks for
/// (`new`), two JSON objects compared leaf by leaf (nested objects by their dotted key path), as
/// `OLD, now NEW` where each side lists `name value` ("--k 8 --lr 0.0001, now --k 4 --lr 0.001");
/// `name` turns a key path into what the user knows it by (see [`flag_name`]). Empty when nothing
/// differs.
pub fn changed_settings(old: &serde_json::Value, new: &serde_json::Value, name: impl Fn(&str) -> String) -> String {
    use std::collections::BTreeMap;
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v.as_object() {
            Some(map) => {
                for (k, x) in map {
                    leaves(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
                }
            }
            None if !prefix.is_empty() => {
                out.insert(prefix.to_string(), v.clone());
            }
            None => {}
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let null = serde_json::Value::Null;
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let (mut was, mut now, mut all_flags) = (Vec::new(), Vec::new(), true);
    for key in keys {
        let (x, y) = (a.get(key).unwrap_or(&null), b.get(key).unwrap_or(&null));
        if x == y {
            continue;
        }
        let name = name(key);
        all_flags &= name.starts_with("--");
        was.push(show_setting(&name, x));
        now.push(show_setting(&name, y));
    }
    if was.is_empty() {
        return String::new();
    }
    let sep = if all_flags { " " } else { ", " };
    format!("{}, now {}", was.join(sep), now.join(sep))
}

/// `layer` → `--layer`, `drop_bos` → `--drop-bos`; a nested `cache.shards` → `the cache's shards`.
pub fn flag_name(key: &str) -> String {
    match key.split_once('.') {
        Some((owner, rest)) => format!("the {owner}'s {}", rest.replace(['_', '.'], " ")),
        None => format!("--{}", key.replace('_', "-")),
    }
}

/// One setting as the user would type it: `--lr 0.001`, `--mix` / `no --mix`, `--data a.txt b.txt`.
fn show_setting(name: &str, v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Bool(true) => name.to_string(),
        Value::Bool(false) | Value::Null if name.starts_with("--") => format!("no {name}"),
        Value::Null => format!("{name} (not recorded)"),
        Value::String(s) => format!("{name} {s}"),
        Value::Array(items) => {
            let items: Vec<String> =
                items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string)).collect();
            format!("{name} {}", items.join(" "))
        }
        other => format!("{name} {other}"),
    }
}
