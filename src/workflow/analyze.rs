//! The analyze job: `crossdiff analyze`, the app and the demo. The crosscoder is loaded once; the
//! latents table with Latent Scaling, `summary.json` and the examples store are written from it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::activations::cache::CacheIndex;
use crate::analysis::analyze::AnalyzeOptions;
use crate::analysis::examples::ExamplesOptions;
use crate::analysis::latents::{LatentRow, Summary};
use crate::crosscoder::Crosscoder;
use crate::model::snapshot::Snapshot;
use crate::run_dir::RunDir;
use crate::workflow::Handle;
use crate::workflow::checks::{Made, check_model, check_same_models, ensure, positive};

/// Pairs per device batch, examples per latent and their context: the engine's defaults.
pub const DEFAULT_BATCH: usize = crate::analysis::analyze::DEFAULT_BATCH;
pub const DEFAULT_EXAMPLES: usize = crate::analysis::examples::DEFAULT_TOP_N;
pub const DEFAULT_CONTEXT: usize = crate::analysis::examples::DEFAULT_CONTEXT;

/// The most examples per latent and context tokens per side the examples store holds (a viewer
/// shows a handful; the store is D × examples × (2·context + 1) tokens).
pub const MAX_EXAMPLES: usize = 1000;
pub const MAX_CONTEXT: usize = 512;

/// `crossdiff analyze`: per-latent metrics and Latent Scaling over a cache (RUN/latents.csv,
/// RUN/summary.json) and the examples store (RUN/examples.safetensors).
#[derive(Debug, Clone, clap::Args)]
pub struct AnalyzeJob {
    /// The run directory (a trained crosscoder).
    #[arg(long)]
    pub run: PathBuf,
    /// The activation cache to stream.
    #[arg(long)]
    pub cache: PathBuf,
    /// Tokens of the cache to use (default: all).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Pairs per device batch.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Error betas for the top-N latents by Δ (default: the number of chat-only latents, at least 100).
    #[arg(long)]
    pub error_top_n: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The base model (for each latent's promoted/suppressed tokens through its unembedding).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// The chat model (likewise).
    #[arg(long)]
    pub chat: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the chat model's weights: --chat is then the adapter's base model.
    #[arg(long, value_name = "DIR", requires = "chat")]
    pub chat_adapter: Option<PathBuf>,
    /// Top activating examples stored per latent.
    #[arg(long, default_value_t = DEFAULT_EXAMPLES)]
    pub examples: usize,
    /// Context tokens on each side of an example.
    #[arg(long, default_value_t = DEFAULT_CONTEXT)]
    pub context: usize,
    /// Analyse a cache whose `cache` run has not finished (what is there so far).
    #[arg(long)]
    pub allow_partial: bool,
    /// Go on when the cache (or --base/--chat) comes from other models than the run was trained on.
    #[arg(long)]
    pub allow_other_models: bool,
}

impl Default for AnalyzeJob {
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            cache: PathBuf::new(),
            tokens: None,
            batch: DEFAULT_BATCH,
            error_top_n: None,
            seed: 0,
            base: None,
            chat: None,
            chat_adapter: None,
            examples: DEFAULT_EXAMPLES,
            context: DEFAULT_CONTEXT,
            allow_partial: false,
            allow_other_models: false,
        }
    }
}

/// What an analysis ends with (also on disk in the run directory).
pub struct AnalyzeOutcome {
    pub rows: Vec<LatentRow>,
    pub summary: Summary,
    pub seconds: f64,
}

impl AnalyzeJob {
    pub fn validate(&self) -> Result<()> {
        crate::workflow::checks::path_given(&self.run, "run")?;
        crate::workflow::checks::path_given(&self.cache, "cache")?;
        if let Some(t) = self.tokens {
            positive(t, "tokens")?;
        }
        positive(self.batch as u64, "batch")?;
        if let Some(n) = self.error_top_n {
            positive(n as u64, "error-top-n")?;
        }
        ensure((1..=MAX_EXAMPLES).contains(&self.examples), "examples", || {
            format!("must be in 1..={MAX_EXAMPLES}, not {}", self.examples)
        })?;
        ensure(self.context <= MAX_CONTEXT, "context", || {
            format!("must be at most {MAX_CONTEXT}, not {}", self.context)
        })?;
        ensure(self.base.is_some() == self.chat.is_some(), "base", || {
            "and --chat go together (for promoted/suppressed tokens)".into()
        })?;
        Ok(())
    }

    /// `--base`/`--chat` opened, each checked to have the run's width and to be the run's model
    /// for its role (unless `--allow-other-models`).
    fn open_models(&self, cc: &Crosscoder, dirs: [&std::path::PathBuf; 2]) -> Result<[Snapshot; 2]> {
        let made = Made { what: format!("the run in {}", self.run.display()), ids: &cc.config.model_ids };
        let open = |role: usize| -> Result<Snapshot> {
            let (dir, snap) = (dirs[role], Snapshot::open(dirs[role])?);
            let adapter = if role == 1 { self.chat_adapter.as_deref() } else { None };
            if snap.config.hidden_size != cc.config.d {
                bail!(
                    "{}: the model has width {}, the crosscoder in {} was trained on width {}",
                    dir.display(),
                    snap.config.hidden_size,
                    self.run.display(),
                    cc.config.d
                );
            }
            check_model(&made, role, dir, &crate::model::identity_of(dir, adapter)?, self.allow_other_models)?;
            Ok(snap)
        };
        Ok([open(0)?, open(1)?])
    }

    pub fn run(&self, device: &Device, handle: Handle) -> Result<AnalyzeOutcome> {
        self.validate()?;
        let started = std::time::Instant::now();
        let run = RunDir::new(&self.run);
        // One job per run folder: not while it trains, not two analyses at once.
        crate::bad_value::ensure(run.path().is_dir(), "run", || {
            format!("{}: no such run folder", run.path().display())
        })?;
        let _lock = crate::io::DirLock::acquire(run.path(), "run")?;
        let cc = Crosscoder::load(run.path(), device)?;
        crate::workflow::checks::crosscoder_run(&cc, run.path(), "analyze")?;
        if cc.config.kind == crate::crosscoder::Kind::BatchTopK && cc.threshold.is_none() {
            bail!(
                "{}: the BatchTopK crosscoder has no inference threshold yet (θ is estimated on the steps after \
                 --threshold-start); train it longer, or train with a lower --threshold-start",
                run.crosscoder().display()
            );
        }
        self.check_examples_memory(&cc)?;
        let index = CacheIndex::open(&self.cache)?;
        index.check_usable(&self.cache, self.allow_partial)?;
        check_run_against_cache(&cc, &self.run, &index, &self.cache, self.allow_other_models)?;
        // The models for the token lists, opened (and checked against the run) once.
        let models = match (&self.base, &self.chat) {
            (Some(b), Some(c)) => Some(self.open_models(&cc, [b, c])?),
            _ => None,
        };
        let opts =
            AnalyzeOptions { tokens: self.tokens, batch: self.batch, error_top_n: self.error_top_n, seed: self.seed };
        let (rows, summary) = crate::analysis::analyze::analyze(
            &run,
            &cc,
            &self.cache,
            device,
            &opts,
            |done, total| handle.progress("analysing", done, total, "tokens"),
            || handle.keep_going(),
        )?;
        check_result(&rows, &summary, &cc)?;
        run.write_latents(&rows, &summary)?;
        handle.progress("examples", 0, 1, "stores");
        let unembed = match &models {
            Some([b, c]) => Some([embedding(b)?, embedding(c)?]),
            None => None,
        };
        let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
        let ex = self.examples_options();
        crate::analysis::examples::build_examples(&run, &cc, &self.cache, device, &max_act, unembed, &ex, self.tokens)?;
        Ok(AnalyzeOutcome { rows, summary, seconds: started.elapsed().as_secs_f64() })
    }
}

impl AnalyzeJob {
    /// The examples store must fit in half the machine's memory.
    fn check_examples_memory(&self, cc: &Crosscoder) -> Result<()> {
        let store = cc.config.dict_size as u64 * self.examples as u64 * (2 * self.context as u64 + 1) * 8;
        if let Some(total) = crate::io::memory_total_bytes() {
            ensure(store < total / 2, "examples", || {
                format!(
                    "{} with --context {}: the examples store of {} latents needs {:.1} GiB, more than half this machine's memory",
                    self.examples,
                    self.context,
                    cc.config.dict_size,
                    store as f64 / (1u64 << 30) as f64
                )
            })?;
        }
        Ok(())
    }

    fn examples_options(&self) -> ExamplesOptions {
        ExamplesOptions {
            top_n: self.examples,
            context: self.context,
            batch: self.batch,
            seed: self.seed,
            ..Default::default()
        }
    }
}

/// What an analysis of either kind of run ends with.
pub enum Analysed {
    Crosscoder(AnalyzeOutcome),
    Sae(SaeOutcome),
}

/// An SAE run's analysis: `sae-latents.csv` and `sae-summary.json`.
pub struct SaeOutcome {
    pub rows: Vec<crate::analysis::sae_latents::SaeLatentRow>,
    pub summary: crate::analysis::sae_latents::SaeSummary,
    pub seconds: f64,
}

impl SaeOutcome {
    /// One line for a summary: input, tokens, FVE, L0, and the authors' |ν| counts.
    pub fn line(&self) -> String {
        let s = &self.summary;
        let below: Vec<String> = s.ratio_below.iter().map(|(t, n)| format!("{n} with |ν| ≤ {t}")).collect();
        format!(
            "SAE on {}: {} latents over {} tokens, {:.1}% dead; FVE {:.3}, L0 {:.1}; chat-specificity β_base/β_chat: {}",
            s.target,
            self.rows.len(),
            s.tokens,
            100.0 * s.dead_fraction,
            s.fve,
            s.l0,
            below.join(", ")
        )
    }
}

impl AnalyzeJob {
    /// Analyses the run in `--run` whichever kind it is: a crosscoder ([`AnalyzeJob::run`]) or an
    /// SAE ([`AnalyzeJob::run_sae`]).
    pub fn run_any(&self, device: &Device, handle: Handle) -> Result<Analysed> {
        let is_sae = RunDir::new(&self.run).read_config().is_ok_and(|c| c.kind == crate::crosscoder::Kind::Sae);
        if is_sae {
            self.run_sae(device, handle).map(Analysed::Sae)
        } else {
            self.run(device, handle).map(Analysed::Crosscoder)
        }
    }

    /// An SAE run on the cache: per-latent frequency, largest code, template share and the authors'
    /// activation β ratio (`crate::analysis::sae_latents`); with `--base`/`--chat`, the tokens the
    /// most chat-specific latents' directions promote and suppress through each model
    /// (`sae-tokens.json`).
    pub fn run_sae(&self, device: &Device, handle: Handle) -> Result<SaeOutcome> {
        self.validate()?;
        let started = std::time::Instant::now();
        let run = RunDir::new(&self.run);
        crate::bad_value::ensure(run.path().is_dir(), "run", || {
            format!("{}: no such run folder", run.path().display())
        })?;
        let _lock = crate::io::DirLock::acquire(run.path(), "run")?;
        let cc = Crosscoder::load(run.path(), device)?;
        ensure(cc.config.kind == crate::crosscoder::Kind::Sae, "run", || {
            format!("{} holds a crosscoder, not an SAE", run.path().display())
        })?;
        self.check_examples_memory(&cc)?;
        let index = CacheIndex::open(&self.cache)?;
        index.check_usable(&self.cache, self.allow_partial)?;
        check_run_against_cache(&cc, &self.run, &index, &self.cache, self.allow_other_models)?;
        let (models, unembed) = match (&self.base, &self.chat) {
            (Some(b), Some(c)) => {
                let [sb, sc] = self.open_models(&cc, [b, c])?;
                let load = |dir: &std::path::Path, adapter: Option<&std::path::Path>| {
                    crate::model::Model::load_adapted(dir, adapter, device, Default::default(), |_, _| {})
                };
                (
                    Some([load(b, None)?, load(c, self.chat_adapter.as_deref())?]),
                    Some([embedding(&sb)?, embedding(&sc)?]),
                )
            }
            _ => (None, None),
        };
        let (rows, summary) = crate::analysis::sae_latents::analyze_sae(
            &cc,
            &self.cache,
            device,
            self.tokens,
            self.batch,
            |done, total| handle.progress("analysing", done, total, "tokens"),
            || handle.keep_going(),
        )?;
        if let Some(r) = rows.iter().find(|r| !(r.freq.is_finite() && r.max_act.is_finite())) {
            bail!("the SAE analysis came out unusable (latent {} not finite); nothing was written", r.latent);
        }
        if !summary.fve.is_finite() {
            bail!("the SAE analysis came out unusable (FVE {}); nothing was written", summary.fve);
        }
        run.write_sae_latents(&rows, &summary)?;
        // The max-activating and quantile examples, as for a crosscoder (examples.safetensors).
        handle.progress("examples", 0, 1, "stores");
        let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
        let ex = self.examples_options();
        crate::analysis::examples::build_examples(&run, &cc, &self.cache, device, &max_act, unembed, &ex, self.tokens)?;
        if let Some(models) = &models {
            handle.progress("token lists", 0, 1, "models");
            let tokens = crate::analysis::sae_latents::latent_tokens(&cc, &rows, models)?;
            run.write_json(RunDir::SAE_TOKENS, &tokens)?;
        }
        Ok(SaeOutcome { rows, summary, seconds: started.elapsed().as_secs_f64() })
    }
}

/// A run analysed on a cache must share its width, its layer and its models (when both record
/// them; `allow_other_models` lets the models differ).
pub fn check_run_against_cache(
    cc: &Crosscoder,
    run: &std::path::Path,
    index: &CacheIndex,
    cache: &std::path::Path,
    allow_other_models: bool,
) -> Result<()> {
    if index.d_model != cc.config.d {
        bail!("{}: the cache has width {}, the crosscoder {}", cache.display(), index.d_model, cc.config.d);
    }
    if let (Some(trained), Some(cached)) = (cc.config.layer, index.layer) {
        if trained != cached {
            bail!("{}: the cache is of layer {cached}, the crosscoder was trained on layer {trained}", cache.display());
        }
    }
    let r = Made { what: format!("the run in {}", run.display()), ids: &cc.config.model_ids };
    let c = Made { what: format!("the cache in {}", cache.display()), ids: &index.model_ids };
    check_same_models(&r, &c, allow_other_models)
}

/// An analysis is written only when it is one: tokens seen, one finite row per latent. (A bad one
/// must not replace a good latents.csv.)
fn check_result(rows: &[LatentRow], summary: &Summary, cc: &Crosscoder) -> Result<()> {
    let bad_row = rows.iter().find(|r| !(r.max_act.is_finite() && r.freq.is_finite() && r.delta_norm.is_finite()));
    if summary.tokens == 0 || rows.len() != cc.config.dict_size || !summary.l0.is_finite() || bad_row.is_some() {
        bail!(
            "the analysis came out unusable ({} tokens, {} rows for {} latents, L0 {}{}); latents.csv and summary.json were left as they were",
            summary.tokens,
            rows.len(),
            cc.config.dict_size,
            summary.l0,
            bad_row.map_or(String::new(), |r| format!(", latent {} not finite", r.latent))
        );
    }
    Ok(())
}

/// A snapshot's `[vocab, d]` embedding (the tied unembedding), as f32.
pub fn embedding(snap: &Snapshot) -> Result<Vec<f32>> {
    let c = &snap.config;
    snap.read_f32("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])
}
