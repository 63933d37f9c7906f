//! The KL job (the causal check, shared/spec/method.md §5): `crossdiff kl`, the app and the demo.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::analysis::kl::KlStat;
use crate::crosscoder::Crosscoder;
use crate::run_dir::RunDir;
use crate::workflow::checks::{Made, check_model, path_given, positive};
use crate::workflow::models::ModelStore;
use crate::workflow::{Handle, check_width, resolve_layer};

/// Conversations the check uses unless told (the paper's 512).
pub const DEFAULT_CONVERSATIONS: usize = 512;

/// `crossdiff kl`: KL(P_chat ‖ P_patched) on assistant-predicting tokens when the base residual is
/// patched with sets of latents; a table and RUN/kl.json.
#[derive(Debug, Clone, clap::Args)]
pub struct KlJob {
    /// The run directory (crosscoder and latents.csv).
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub chat: PathBuf,
    /// Conversations: .jsonl or .parquet with `messages`.
    #[arg(long)]
    pub data: PathBuf,
    /// Conversations to use (the paper: 512).
    #[arg(long, default_value_t = DEFAULT_CONVERSATIONS)]
    pub conversations: usize,
    /// The layer (default: the crosscoder's, from its config.json).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Go on when --base/--chat are not the models the run was trained on.
    #[arg(long)]
    pub allow_other_models: bool,
}

impl KlJob {
    pub fn validate(&self) -> Result<()> {
        for (p, flag) in [(&self.run, "run"), (&self.base, "base"), (&self.chat, "chat"), (&self.data, "data")] {
            path_given(p, flag)?;
        }
        positive(self.conversations as u64, "conversations")
    }

    /// Runs the check and writes `kl.json`; models come from (and stay in) `store`.
    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<Vec<KlStat>> {
        self.validate()?;
        let run = RunDir::new(&self.run);
        crate::bad_value::ensure(run.path().is_dir(), "run", || {
            format!("{}: no such run folder", run.path().display())
        })?;
        let _lock = crate::io::DirLock::acquire(run.path(), "run")?;
        let cc = Crosscoder::load(run.path(), device)?;
        let rows = run.read_latents_of(&cc)?;
        let layer = resolve_layer(self.layer, &cc, &self.run)?;
        let (b, c) = store.pair(&self.base, &self.chat, device, handle)?;
        crate::workflow::checks::check_resolved_layer(layer, b.gemma.num_layers(), self.layer, &self.run)?;
        check_width(&cc, &self.run, &b, &self.base)?;
        check_pair_against_run(&cc, &self.run, [(&self.base, &b), (&self.chat, &c)], self.allow_other_models)?;
        let total = self.conversations as u64;
        let stats = crate::analysis::kl::kl_table(&b, &c, &cc, &rows, layer, &self.data, self.conversations, |n| {
            handle.progress("kl", n as u64, total, "conversations");
            handle.keep_going()
        })?;
        // A KL that is not a number (a broken model) must not replace a good kl.json.
        if stats.iter().all(|s| s.tokens_all == 0) {
            return Err(crate::bad_value::bad("data", "holds no assistant replies to measure (0 tokens)"));
        }
        if let Some(s) = stats.iter().find(|s| s.tokens_all > 0 && !s.mean_all.is_finite()) {
            bail!("the KL for \"{}\" came out {}; {} was left as it was", s.condition, s.mean_all, run.kl().display());
        }
        run.write_kl(&stats)?;
        Ok(stats)
    }
}

/// The base and chat models given to a job that uses a run: the ones it was trained on (by identity,
/// when the run records them), unless `allow` (`--allow-other-models`).
pub fn check_pair_against_run(
    cc: &Crosscoder,
    run: &std::path::Path,
    models: [(&std::path::Path, &crate::model::Model); 2],
    allow: bool,
) -> Result<()> {
    let made = Made { what: format!("the run in {}", run.display()), ids: &cc.config.model_ids };
    for (role, (dir, m)) in models.into_iter().enumerate() {
        check_model(&made, role, dir, &m.identity, allow)?;
    }
    Ok(())
}
