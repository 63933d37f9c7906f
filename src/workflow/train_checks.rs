//! The train job's checks: every value at the boundary ([`TrainJob::validate`]), then the sizes
//! once the data's width is known (D, k against D, memory, the step budget), before a model or a
//! byte of training state is loaded.

use std::path::Path;

use anyhow::Result;

use crate::activations::cache::CacheIndex;
use crate::crosscoder::Kind;
use crate::crosscoder::train::{defaults, training_bytes};
use crate::data::TokenizeOptions;
use crate::run_dir::RunDir;
use crate::workflow::checks::{bad, ensure, finite_non_negative, finite_positive, path_given, positive};
use crate::workflow::train::TrainJob;

impl TrainJob {
    /// Checks every value that needs no file (`d`-dependent checks follow once the data is open).
    pub fn validate(&self) -> Result<()> {
        path_given(&self.out, "out")?;
        if let Some(cache) = &self.cache {
            path_given(cache, "cache")?;
        }
        positive(self.batch as u64, "batch")?;
        finite_positive(self.lr, "lr")?;
        finite_non_negative(self.mu, "mu")?;
        finite_non_negative(self.aux_alpha, "aux-alpha")?;
        if let Some(n) = self.init_norm {
            finite_positive(n, "init-norm")?;
            // Far outside the paper's 0.005 (L1) and 1.0 (BatchTopK), f32 codes underflow or overflow.
            ensure((1e-6..=1e3).contains(&n), "init-norm", || format!("must be between 1e-6 and 1000, not {n}"))?;
        }
        if let Some(n) = self.dict_size {
            positive(n as u64, "dict-size")?;
        }
        if let Some(n) = self.expansion {
            positive(n as u64, "expansion")?;
        }
        if self.kind.is_topk() {
            ensure(self.k > 0, "k", || "must be at least 1 (k = 0 keeps no latent)".into())?;
        }
        ensure(self.k_anneal_from.is_none() || self.kind.is_topk(), "k-anneal-from", || {
            "is for BatchTopK (an L1 crosscoder has no k)".into()
        })?;
        ensure(self.target.is_none() || self.kind == Kind::Sae, "target", || {
            "is what an SAE reconstructs: give it with --kind sae".into()
        })?;
        if self.kind == Kind::Sae {
            ensure(self.init == crate::crosscoder::Init::Shared, "init", || {
                "chooses how a crosscoder's two models start; an SAE (--kind sae) has one input".into()
            })?;
            ensure(self.init_norm.is_none(), "init-norm", || {
                "is a crosscoder's encoder scale; an SAE (--kind sae) starts with unit-norm directions".into()
            })?;
            ensure(!self.squared_recon, "squared-recon", || {
                "is a crosscoder's option; an SAE's loss is already the squared error".into()
            })?;
        }
        if let Some(from) = self.k_anneal_from {
            ensure(from >= self.k, "k-anneal-from", || format!("({from}) must be at least --k ({})", self.k))?;
            ensure(self.k_anneal_steps > 0, "k-anneal-from", || {
                "needs --k-anneal-steps (the steps to anneal over)".into()
            })?;
        }
        ensure(self.k_anneal_steps == 0 || self.k_anneal_from.is_some(), "k-anneal-steps", || {
            "needs --k-anneal-from (the k to anneal from)".into()
        })?;
        if let Some(n) = self.steps {
            positive(n, "steps")?;
        }
        if let Some(n) = self.tokens {
            positive(n, "tokens")?;
        }
        positive(self.tokenize.context as u64, "context")?;
        positive(self.log_every, "log-every")?;
        positive(self.dead_tokens, "dead-tokens")?;
        positive(self.shuffle_tokens as u64, "shuffle-tokens")?;
        ensure(self.shuffle_tokens >= self.batch, "shuffle-tokens", || {
            format!(
                "({}) must be at least --batch ({}): the shuffle pool must hold a batch",
                self.shuffle_tokens, self.batch
            )
        })?;
        if self.cache.is_some() {
            self.check_no_on_the_fly_options()?;
        }
        ensure(self.val_every == 0 || self.val_tokens > 0, "val-every", || {
            "needs --val-tokens (a held-out slice)".into()
        })?;
        Ok(())
    }

    /// `--out` is new, empty (hidden files such as the lock aside), a run to resume (one with
    /// checkpoint/state.json), or a run stopped before its first checkpoint (metrics.jsonl and a
    /// checkpoint folder with nothing in it); anything else is refused naming --out and what is
    /// there, before anything is written, so a mistaken folder is never trained over.
    pub fn check_out(&self) -> Result<()> {
        let out = &self.out;
        let shown = out.display();
        if !out.exists() {
            return Ok(());
        }
        ensure(out.is_dir(), "out", || format!("{shown} is a file, not a folder"))?;
        ensure(!CacheIndex::path(out).exists(), "out", || {
            format!(
                "{shown} holds an activation cache (cache.json), not a training run: choose another folder for the run"
            )
        })?;
        let run = RunDir::new(out);
        let checkpoint = run.checkpoint_dir();
        ensure(!checkpoint.exists() || checkpoint.is_dir(), "out", || {
            format!(
                "{shown}: its `checkpoint` is a file, not the run's checkpoint folder: move the file away, or choose \
                 another folder"
            )
        })?;
        if run.checkpoint_state().is_file() {
            return Ok(());
        }
        let visible = visible_entries(out);
        let weights: Vec<String> =
            visible_entries(&checkpoint).into_iter().filter(|n| n.starts_with("state-")).collect();
        let checkpoint_empty = visible_entries(&checkpoint).is_empty();
        let unstarted = visible.iter().all(|n| n == RunDir::METRICS || (n == RunDir::CHECKPOINT && checkpoint_empty));
        if unstarted {
            return Ok(());
        }
        let has = |name: &str| visible.iter().any(|n| n == name);
        // A model snapshot: config.json beside weights or a tokenizer (a run's config.json sits
        // beside crosscoder.safetensors, refused above).
        let model_files: Vec<&String> = visible
            .iter()
            .filter(|n| n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json") || *n == "tokenizer.json")
            .collect();
        if has(RunDir::CROSSCODER) {
            return Err(bad(
                "out",
                format!(
                    "{shown} holds a crosscoder without a checkpoint (imported, or its checkpoint was deleted): choose \
                     another folder"
                ),
            ));
        }
        if has("config.json") && !model_files.is_empty() {
            let mut named = vec!["config.json".to_string()];
            named.extend(model_files.iter().take(2).map(|n| n.to_string()));
            if model_files.len() > 2 {
                named.push("…".into());
            }
            return Err(bad(
                "out",
                format!(
                    "{shown} holds a model snapshot ({}), not a training run: choose another folder for the run",
                    named.join(", ")
                ),
            ));
        }
        if let Some(w) = weights.first() {
            return Err(bad(
                "out",
                format!(
                    "{shown} holds a run whose checkpoint/state.json is missing (checkpoint/{w} has nothing pointing \
                     at it): it cannot be resumed; choose another folder, or empty this one to start over"
                ),
            ));
        }
        let mut named: Vec<String> = visible.iter().take(3).cloned().collect();
        if visible.len() > 3 {
            named.push("…".into());
        }
        Err(bad(
            "out",
            format!(
                "{shown} is not empty and holds no training run ({}): choose a new or empty folder",
                named.join(", ")
            ),
        ))
    }

    /// With --cache, the on-the-fly options stay unset: the cache fixed its layer, data and
    /// tokenization when it was made (clap refuses most of them; this also covers the app, the
    /// demo and the flattened tokenize options).
    fn check_no_on_the_fly_options(&self) -> Result<()> {
        let tok = TokenizeOptions::default();
        let given = [
            (self.base.is_some(), "base"),
            (self.chat.is_some(), "chat"),
            (!self.data.is_empty(), "data"),
            (self.layer.is_some(), "layer"),
            (self.mix, "mix"),
            (self.tokenize.context != tok.context, "context"),
            (self.tokenize.drop_bos != tok.drop_bos, "drop-bos"),
            (self.tokenize.skip_first.is_some(), "skip-first"),
        ];
        let why = "is for training on the fly and cannot be used with --cache (the cache fixed its layer, data and \
                   tokenization when it was made)";
        given.into_iter().try_for_each(|(given, flag)| ensure(!given, flag, || why.into()))
    }

    /// D for a model width d.
    pub fn dict_size_for(&self, d: usize) -> usize {
        self.dict_size.unwrap_or(self.expansion.unwrap_or(defaults::EXPANSION).saturating_mul(d))
    }

    /// Refuses a D whose training state ([`training_bytes`]) would not fit this machine's memory
    /// (Linux; elsewhere unchecked), before anything is allocated.
    fn check_memory(&self, d: usize, dict: usize, device: &burn::tensor::Device) -> Result<()> {
        let Some(host) = crate::io::memory_total_bytes() else { return Ok(()) };
        // On the CPU the host holds the training state; on a GPU the device does, whose memory is
        // not known here: only a request far beyond any machine (4× the host's) is refused.
        let total = if crate::crosscoder::kernels::is_flex(device) { host } else { host.saturating_mul(4) };
        let needed = training_bytes(self.kind, d, dict, self.batch);
        let (flag, value) = match (self.dict_size, self.expansion) {
            (Some(n), _) => ("dict-size", n.to_string()),
            (None, Some(e)) => ("expansion", e.to_string()),
            (None, None) => ("dict-size", format!("(default {} × d)", defaults::EXPANSION)),
        };
        let gib = |b: f64| b / (1u64 << 30) as f64;
        ensure(needed <= total as f64, flag, || {
            let (needed, total) = (gib(needed), gib(total as f64));
            format!(
                "{value} gives D = {dict}: training needs about {needed:.1} GiB (the dictionary, its gradients and \
                 Adam state, plus the batch), more than this machine's {total:.1} GiB of memory"
            )
        })
    }

    /// D and the step budget once the data's width is known, checked before a model or a byte of
    /// training state is loaded.
    pub(super) fn sizes(&self, d: usize, one_pass: Option<u64>, device: &burn::tensor::Device) -> Result<(usize, u64)> {
        let dict = self.dict_size_for(d);
        if self.kind.is_topk() {
            ensure(self.k <= dict, "k", || format!("{} is larger than the dictionary (D = {dict})", self.k))?;
        }
        if let Some(from) = self.k_anneal_from {
            ensure(from <= dict, "k-anneal-from", || format!("{from} is larger than the dictionary (D = {dict})"))?;
        }
        self.check_memory(d, dict, device)?;
        let steps = self.steps(one_pass)?;
        if let Some(t) = self.tokens {
            ensure(t >= self.batch as u64, "tokens", || {
                format!("{t} is less than one batch (--batch {}): train on at least a batch", self.batch)
            })?;
        }
        if self.k_anneal_from.is_some() {
            ensure(self.k_anneal_steps <= steps, "k-anneal-steps", || {
                format!("{} must be within the step budget ({steps}): k would never reach --k", self.k_anneal_steps)
            })?;
        }
        if let (true, Some(start)) = (self.kind.is_topk(), self.threshold_start) {
            ensure(steps > start.saturating_add(1), "threshold-start", || {
                format!(
                    "{start} must be below the step budget ({steps}) minus 1: BatchTopK's inference threshold is \
                     estimated on the steps whose 0-based index exceeds it"
                )
            })?;
        }
        Ok((dict, steps))
    }

    /// The step budget: --steps, else --tokens / batch, else one pass over the cache.
    fn steps(&self, one_pass: Option<u64>) -> Result<u64> {
        match (self.steps, self.tokens, one_pass) {
            (Some(s), _, _) => Ok(s),
            (None, Some(t), _) => Ok(t.div_ceil(self.batch as u64)),
            (None, None, Some(s)) => Ok(s),
            (None, None, None) => {
                Err(bad("steps", "or --tokens is required: on the fly there is no cache size to default to"))
            }
        }
    }
}

/// The names in `dir` that do not start with a dot (hidden files, the job lock and temporary
/// siblings aside), sorted; empty when `dir` cannot be read.
fn visible_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}
