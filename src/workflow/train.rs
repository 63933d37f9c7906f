//! The train job: `crossdiff train`, the app's Train view and the demo's training stages. Picks the
//! data source (a cache through the shuffled reader, or both models on the fly), resolves the
//! dictionary size and the step budget, and runs the engine's training loop with progress.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::workflow::checks::{bad, ensure};
use burn::tensor::Device;
use serde_json::{Value, json};

use crate::activations::cache::CacheIndex;
use crate::activations::onthefly::{OnTheFlyConfig, OnTheFlySource};
use crate::activations::reader::{CacheReader, PairBatch, ReaderConfig};
use crate::crosscoder::train::{NoTrainingPairs, PairSource, StepMetrics, TrainConfig, TrainRun, defaults};
use crate::crosscoder::{Crosscoder, Init, Kind, SaeTarget};
use crate::data::TokenizeOptions;
use crate::model::decoder::LoadOptions;
use crate::workflow::Handle;

/// `crossdiff train`: a crosscoder on a cache (or on the fly), checkpointed in `out`; re-running
/// the same job resumes.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainJob {
    /// The activation cache to train on (or train on the fly with --base/--chat/--data/--layer).
    #[arg(long, required_unless_present = "base")]
    pub cache: Option<PathBuf>,
    /// The run directory (crosscoder, checkpoint, metrics).
    #[arg(long)]
    pub out: PathBuf,
    /// On the fly, no disk cache: the base model (with --chat, --data, --layer).
    #[arg(long, requires_all = ["chat", "data", "layer"], conflicts_with = "cache")]
    pub base: Option<PathBuf>,
    /// On the fly: the chat model.
    #[arg(long, conflicts_with = "cache")]
    pub chat: Option<PathBuf>,
    /// On the fly: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the chat model's weights: --chat is then the adapter's base model.
    #[arg(long, value_name = "DIR", requires = "chat", conflicts_with = "cache")]
    pub chat_adapter: Option<PathBuf>,
    /// On the fly: the data files.
    #[arg(long, num_args = 1.., conflicts_with = "cache")]
    pub data: Vec<PathBuf>,
    /// On the fly: the block whose output is used.
    #[arg(long, conflicts_with = "cache")]
    pub layer: Option<usize>,
    /// On the fly: how documents are tokenized (a cache was tokenized when it was made: with
    /// --cache these stay at their defaults).
    #[command(flatten)]
    pub tokenize: TokenizeOptions,
    /// On the fly: interleave the data files 1:1 by tokens.
    #[arg(long, conflicts_with = "cache")]
    pub mix: bool,
    /// What to train: a `batchtopk` or `l1` crosscoder, or an `sae` (BatchTopK, on --target).
    #[arg(long, default_value = "batchtopk")]
    pub kind: Kind,
    /// SAE only: what it reconstructs from each pair — `chat-minus-base` (a diff-SAE, the
    /// default), `base-minus-chat`, `base` or `chat`.
    #[arg(long)]
    pub target: Option<SaeTarget>,
    /// Dictionary size D (default: 32 × d, the paper's).
    #[arg(long, conflicts_with = "expansion")]
    pub dict_size: Option<usize>,
    /// D as a multiple of d.
    #[arg(long)]
    pub expansion: Option<usize>,
    /// BatchTopK: active latents per token on average.
    #[arg(long, default_value_t = defaults::K)]
    pub k: usize,
    /// L1: the sparsity coefficient μ.
    #[arg(long, default_value_t = defaults::MU)]
    pub mu: f64,
    /// Adam's learning rate after warm-up.
    #[arg(long, default_value_t = defaults::LR)]
    pub lr: f64,
    #[arg(long, default_value_t = defaults::WARMUP_STEPS)]
    pub warmup_steps: u64,
    /// BatchTopK: the inference threshold θ is estimated on steps after this one (default: 1000, or
    /// half the step budget when that is shorter).
    #[arg(long)]
    pub threshold_start: Option<u64>,
    /// Pairs per step.
    #[arg(long, default_value_t = defaults::BATCH)]
    pub batch: usize,
    /// Train on this many tokens (default: one pass over the cache's training split).
    #[arg(long, conflicts_with = "steps")]
    pub tokens: Option<u64>,
    /// Train for this many steps.
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AuxK's weight α.
    #[arg(long, default_value_t = defaults::AUX_ALPHA)]
    pub aux_alpha: f64,
    /// A latent is dead after this many tokens without being selected.
    #[arg(long, default_value_t = defaults::DEAD_TOKENS)]
    pub dead_tokens: u64,
    /// Encoder column norm at init (default: 0.005 for L1, 1.0 for BatchTopK).
    #[arg(long)]
    pub init_norm: Option<f64>,
    /// The encoder's start: `shared` (one matrix for both models, the paper's scripts) or
    /// `independent` (one per model, the authors' library default; separates chat-only directions
    /// in fewer steps).
    #[arg(long, default_value = "shared")]
    pub init: Init,
    /// Anneal k linearly from this value down to --k over --k-anneal-steps (give both).
    #[arg(long)]
    pub k_anneal_from: Option<usize>,
    /// The steps over which k anneals from --k-anneal-from to --k (give both).
    #[arg(long, default_value_t = 0)]
    pub k_anneal_steps: u64,
    /// The paper's ½‖ε‖² per model instead of the released code's unsquared norm.
    #[arg(long)]
    pub squared_recon: bool,
    /// Validation FVE every N steps on the held-out slice (0: never).
    #[arg(long, default_value_t = 0)]
    pub val_every: u64,
    /// Tokens held out at the end of the cache for validation.
    #[arg(long, default_value_t = 0)]
    pub val_tokens: u64,
    /// Checkpoint every N steps (0: only at the end, or when stopped).
    #[arg(long, default_value_t = defaults::CHECKPOINT_EVERY)]
    pub checkpoint_every: u64,
    /// Rows in the shuffle pool (at least --batch: the pool must hold a batch).
    #[arg(long, default_value_t = defaults::SHUFFLE_TOKENS)]
    pub shuffle_tokens: usize,
    /// Steps between metrics lines (and progress reports).
    #[arg(long, default_value_t = defaults::LOG_EVERY, hide = true)]
    pub log_every: u64,
    /// Train on a cache whose `cache` run has not finished (what is there so far).
    #[arg(long)]
    pub allow_partial: bool,
    /// Data-parallel: split each batch's rows over these devices — local backends or
    /// `remote:ws://HOST:PORT` servers, comma-separated — with the selection over the whole batch
    /// and the gradients summed on the first device, where the parameters and the optimizer live.
    /// The same global batch gives the one-device loss curve (to float rounding). --backend is then
    /// not used for training.
    #[arg(long, value_delimiter = ',', value_name = "DEV,DEV,…")]
    pub devices: Vec<crate::Backend>,
}

impl Default for TrainJob {
    /// Every optional setting at its default; `cache`/`out` empty (a caller fills them).
    fn default() -> Self {
        Self {
            cache: None,
            out: PathBuf::new(),
            base: None,
            chat: None,
            chat_adapter: None,
            data: Vec::new(),
            layer: None,
            tokenize: TokenizeOptions::default(),
            mix: false,
            kind: Kind::BatchTopK,
            target: None,
            dict_size: None,
            expansion: None,
            k: defaults::K,
            mu: defaults::MU,
            lr: defaults::LR,
            warmup_steps: defaults::WARMUP_STEPS,
            threshold_start: None,
            batch: defaults::BATCH,
            tokens: None,
            steps: None,
            seed: 0,
            aux_alpha: defaults::AUX_ALPHA,
            dead_tokens: defaults::DEAD_TOKENS,
            init_norm: None,
            init: Init::Shared,
            k_anneal_from: None,
            k_anneal_steps: 0,
            squared_recon: false,
            val_every: 0,
            val_tokens: 0,
            checkpoint_every: defaults::CHECKPOINT_EVERY,
            shuffle_tokens: defaults::SHUFFLE_TOKENS,
            devices: Vec::new(),
            log_every: defaults::LOG_EVERY,
            allow_partial: false,
        }
    }
}

/// What a training run ends with.
pub struct TrainOutcome {
    pub crosscoder: Crosscoder,
    /// The last logged step of this run (`None`: nothing was left to do).
    pub last: Option<StepMetrics>,
    /// The step the checkpoint is at (after a cancel, possibly past `last`'s).
    pub step: u64,
    pub total_steps: u64,
    pub seconds: f64,
    /// The data ran out at `step`, before `total_steps` (on the fly: the --data files hold no
    /// more tokens; not a cancel). The run is finished with what there was: running the same
    /// command again trains nothing more and says the same. Front ends say so, e.g. "the data ran
    /// out at step 9 of 200; the run is finished with what there was", not "re-run to resume".
    pub data_ended: bool,
    /// Pairs in the last step's batch when this run trained one smaller than --batch: the end of
    /// the data (or of a pass over the cache) leaves fewer pairs than a batch, and that step is
    /// trained on them, its loss the mean over the pairs it has, as the cache reader does at
    /// the end of every pass. `None`: the last step (if any) was full-size.
    pub short_last_batch: Option<usize>,
}

/// The data side of a run, opened.
struct Opened {
    source: Box<dyn PairSource>,
    d: usize,
    models: Vec<String>,
    model_ids: Vec<String>,
    layer: Option<usize>,
    validation: Option<PairBatch>,
    /// D and the step budget.
    dict: usize,
    steps: u64,
    /// Where the batches come from ([`TrainRun::source_fingerprint`]).
    fingerprint: Value,
}

impl TrainJob {
    /// The job that goes on with `saved` (the run in `self.out`) to `steps`: the run's own settings
    /// (those its checkpoint checks on resume) over this job's paths and other options.
    pub fn continuing(&self, saved: &crate::crosscoder::train::SavedRun, steps: u64) -> TrainJob {
        let c = &saved.config;
        TrainJob {
            kind: c.kind,
            target: c.target,
            dict_size: Some(c.dict_size),
            expansion: None,
            k: c.k,
            mu: c.mu,
            lr: c.lr,
            warmup_steps: c.warmup_steps,
            threshold_start: Some(c.threshold_start),
            steps: Some(steps),
            tokens: None,
            seed: c.seed,
            aux_alpha: c.aux_alpha,
            dead_tokens: c.dead_tokens,
            // An SAE has no encoder scale to carry over (its directions start at unit norm).
            init_norm: (c.kind != Kind::Sae).then_some(c.init_norm),
            init: c.init,
            k_anneal_from: c.k_anneal_from,
            k_anneal_steps: c.k_anneal_steps,
            squared_recon: c.squared_recon,
            val_every: c.val_every,
            checkpoint_every: c.checkpoint_every,
            log_every: c.log_every,
            batch: saved.batch().unwrap_or(self.batch),
            shuffle_tokens: saved.shuffle_tokens().unwrap_or(self.shuffle_tokens),
            val_tokens: saved.val_tokens().unwrap_or(self.val_tokens),
            ..self.clone()
        }
    }

    /// `--threshold-start`, else the one a resumed run started with, else 1000 or half the budget.
    fn threshold_start_for(&self, steps: u64) -> u64 {
        let saved = crate::crosscoder::train::saved_config(&self.out).ok().flatten().map(|c| c.threshold_start);
        self.threshold_start.or(saved).unwrap_or(defaults::THRESHOLD_START.min(steps.saturating_sub(1) / 2))
    }

    /// The engine's hyperparameters once D and the step budget are known.
    pub fn config(&self, dict_size: usize, steps: u64) -> TrainConfig {
        let defaults = TrainConfig::defaults(self.kind, dict_size);
        TrainConfig {
            k: self.k,
            mu: self.mu,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            threshold_start: self.threshold_start_for(steps),
            steps,
            aux_alpha: self.aux_alpha,
            dead_tokens: self.dead_tokens,
            init_norm: self.init_norm.unwrap_or(defaults.init_norm),
            init: self.init,
            target: match self.kind {
                Kind::Sae => Some(self.target.unwrap_or_default()),
                _ => None,
            },
            k_anneal_from: self.k_anneal_from,
            k_anneal_steps: self.k_anneal_steps,
            squared_recon: self.squared_recon,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            log_every: self.log_every,
            val_every: self.val_every,
            ..defaults
        }
    }

    fn open(&self, device: &Device) -> Result<Opened> {
        match (&self.cache, &self.base, &self.chat, self.layer) {
            (Some(cache), _, _, _) => {
                let cfg = ReaderConfig {
                    batch: self.batch,
                    seed: self.seed,
                    shuffle_tokens: self.shuffle_tokens,
                    val_tokens: self.val_tokens,
                    epochs: None,
                };
                // An unfinished cache is said to be unfinished before anything else about it.
                let index = CacheIndex::open(cache)?;
                index.check_usable(cache, self.allow_partial)?;
                let reader = CacheReader::with_index(cache, index, cfg)?;
                ensure(self.batch as u64 <= reader.train_tokens, "batch", || {
                    let (n, all, held) = (reader.train_tokens, reader.index.total_tokens, self.val_tokens);
                    format!(
                        "{} is larger than the cache's training split ({n} of its {all} tokens; --val-tokens {held})",
                        self.batch
                    )
                })?;
                let one_pass_steps = Some(reader.train_tokens.div_ceil(self.batch as u64));
                let (dict, steps) = self.sizes(reader.index.d_model, one_pass_steps, device)?;
                let validation = if self.val_tokens > 0 { Some(reader.validation()?) } else { None };
                Ok(Opened {
                    fingerprint: self.sampling(json!({ "cache": crate::workflow::cache::fingerprint(&reader.index) })),
                    d: reader.index.d_model,
                    models: reader.index.models.clone(),
                    model_ids: reader.index.model_ids.clone(),
                    layer: reader.index.layer,
                    validation,
                    dict,
                    steps,
                    source: Box::new(reader),
                })
            }
            (None, Some(base), Some(chat), Some(layer)) => {
                if self.val_tokens > 0 {
                    bail!("--val-tokens needs a cache (the on-the-fly source has no held-out slice)");
                }
                let (base_snap, chat_snap) =
                    (crate::model::snapshot::Snapshot::open(base)?, crate::model::snapshot::Snapshot::open(chat)?);
                crate::model::snapshot::check_pair(&base_snap, &chat_snap)?;
                let config = base_snap.config.clone();
                crate::workflow::check_layer(layer, config.num_hidden_layers)?;
                let model_ids =
                    vec![base_snap.identity()?, crate::model::identity_of(chat, self.chat_adapter.as_deref())?];
                crate::model::snapshot::check_distinct((base, &model_ids[0]), (chat, &model_ids[1]))?;
                let (dict, steps) = self.sizes(config.hidden_size, None, device)?;
                drop((base_snap, chat_snap));
                let cfg = OnTheFlyConfig {
                    base: base.clone(),
                    chat: chat.clone(),
                    chat_adapter: self.chat_adapter.clone(),
                    data: self.data.clone(),
                    layer,
                    tokenize: self.tokenize.clone(),
                    mix: self.mix,
                    chunk_tokens: crate::activations::writer::DEFAULT_SHARD_TOKENS,
                    batch_tokens: crate::activations::writer::DEFAULT_BATCH_TOKENS,
                    tokens: u64::MAX,
                    load: LoadOptions::default(),
                };
                let src = OnTheFlySource::start(cfg, device.clone(), self.batch, self.shuffle_tokens, self.seed)?;
                let fingerprint = self.sampling(json!({
                    "layer": layer,
                    // Canonical: the same files given relative or absolute are the same data.
                    "data": self.data.iter().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string()).collect::<Vec<_>>(),
                    "context": self.tokenize.context,
                    "drop_bos": self.tokenize.drop_bos,
                    "skip_first": self.tokenize.resolved(config.family).skip(),
                    "mix": self.mix,
                }));
                Ok(Opened {
                    fingerprint,
                    source: Box::new(src),
                    d: config.hidden_size,
                    models: vec![
                        base.display().to_string(),
                        crate::model::adapted_name(chat.display().to_string(), self.chat_adapter.as_deref()),
                    ],
                    model_ids,
                    layer: Some(layer),
                    validation: None,
                    dict,
                    steps,
                })
            }
            _ => bail!("give --cache, or --base, --chat, --data and --layer to train on the fly"),
        }
    }

    /// A source's fingerprint with the settings that decide how its pairs are drawn.
    fn sampling(&self, mut source: Value) -> Value {
        source["batch"] = self.batch.into();
        source["shuffle_tokens"] = self.shuffle_tokens.into();
        if self.cache.is_some() {
            source["val_tokens"] = self.val_tokens.into();
        }
        source
    }

    /// Trains (resuming from `out`'s checkpoint); a cancelled handle checkpoints and returns. A run
    /// refused before it saved anything leaves no folder behind. `out` must be new, empty, or a run
    /// ([`TrainJob::check_out`], before anything is written), and is held by this job alone for
    /// the whole run ([`crate::io::DirLock`]).
    pub fn run(&self, device: &Device, handle: Handle) -> Result<TrainOutcome> {
        self.validate()?;
        self.check_out()?;
        // Data-parallel: connected before anything is written; the first device is home.
        let devices = crate::backend::connect_devices(&self.devices)?;
        let device = devices.first().unwrap_or(device);
        crate::io::clean_on_failure(&self.out, || {
            // Inside: the lock is gone before an empty folder left by a refusal is removed.
            let _lock = crate::io::DirLock::acquire(&self.out, "out")?;
            self.run_in(device, &devices, handle)
        })
    }

    fn run_in(&self, device: &Device, devices: &[Device], handle: Handle) -> Result<TrainOutcome> {
        let started = std::time::Instant::now();
        let mut opened = self.open(device)?;
        let (dict, steps) = (opened.dict, opened.steps);
        let config = self.config(dict, steps);
        let mut run = TrainRun {
            config,
            out: self.out.clone(),
            device: device.clone(),
            devices: devices.to_vec(),
            source: opened.source.as_mut(),
            validation: opened.validation.take(),
            layer: opened.layer,
            models: opened.models.clone(),
            model_ids: opened.model_ids.clone(),
            width: opened.d,
            source_fingerprint: opened.fingerprint.clone(),
        };
        let mut last = None;
        handle.progress("training", 0, steps, "steps");
        let trained = run.run(
            |p| {
                handle.progress("training", p.metrics.step, p.total_steps, "steps");
                handle.metrics(p.metrics.clone());
                last = Some(p.metrics);
            },
            || handle.keep_going(),
        );
        let trained = match trained {
            Err(e) if e.downcast_ref::<NoTrainingPairs>().is_some() && self.cache.is_none() => {
                return Err(bad("data", "gave no training pairs (0 tokens): nothing to train on; nothing was written"));
            }
            other => other?,
        };
        Ok(TrainOutcome {
            crosscoder: trained.crosscoder,
            last,
            step: trained.step,
            total_steps: steps,
            seconds: started.elapsed().as_secs_f64(),
            data_ended: trained.data_ended,
            short_last_batch: trained.last_batch.filter(|&n| n < self.batch),
        })
    }
}
