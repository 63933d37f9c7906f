//! The KL job (the causal check, shared/spec/method.md §5): `crossdiff kl`, the app and the demo.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::analysis::kl::{KlOptions, KlReport, Latents, PatchOn};
use crate::analysis::sae_latents::{SaeLatentRow, SaeSummary};
use crate::crosscoder::Crosscoder;
use crate::crosscoder::SaeTarget;
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
    /// The base model the run was trained on (a Hugging Face snapshot directory).
    #[arg(long)]
    pub base: PathBuf,
    /// The chat model the run was trained on (with --chat-adapter: the adapter's base model).
    #[arg(long)]
    pub chat: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the chat model's weights: --chat is then the adapter's base model.
    #[arg(long, value_name = "DIR")]
    pub chat_adapter: Option<PathBuf>,
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
    /// Where the patch replaces the base activation: `all` positions (the paper's table, written to
    /// kl.json), only the chat-`template` tokens, only the positions predicting the `first-k`
    /// generated tokens of each assistant turn, or `template+first-k` (written to
    /// kl-template.json, kl-firstK.json, kl-template+firstK.json). A limited patch adds the
    /// condition `chat` (chat's own activations on those positions).
    #[arg(long, default_value = "all")]
    pub patch_on: PatchOn,
    /// `--patch-on first-k` patches the first k predicting positions of each assistant turn minus
    /// template inputs (10: the measured "first 9" set, as the authors' "first5" runs patch).
    #[arg(long, default_value_t = DEFAULT_FIRST_K)]
    pub first_k: usize,
    /// Also sweep these layers (comma-separated) with the conditions that need no crosscoder
    /// (`none`, and `chat` with a limited patch): written to kl-layers.json (or kl-template-layers.json, …).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
}

/// Predicting positions per turn `--patch-on first-k` covers unless told: the authors' mask
/// default (their `--k-first` never reaches it), so their "first5" runs patch this set.
pub const DEFAULT_FIRST_K: usize = 10;

impl Default for KlJob {
    /// Every setting at its default; the paths empty (a caller fills them).
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            base: PathBuf::new(),
            chat: PathBuf::new(),
            chat_adapter: None,
            data: PathBuf::new(),
            conversations: DEFAULT_CONVERSATIONS,
            layer: None,
            allow_other_models: false,
            patch_on: PatchOn::All,
            first_k: DEFAULT_FIRST_K,
            layers: Vec::new(),
        }
    }
}

impl KlJob {
    pub fn validate(&self) -> Result<()> {
        for (p, flag) in [(&self.run, "run"), (&self.base, "base"), (&self.chat, "chat"), (&self.data, "data")] {
            path_given(p, flag)?;
        }
        positive(self.conversations as u64, "conversations")?;
        positive(self.first_k as u64, "first-k")
    }

    /// The engine's options for this job.
    pub fn options(&self) -> KlOptions {
        KlOptions { patch_on: self.patch_on, first_k: self.first_k, sweep: self.layers.clone() }
    }

    /// Runs the check and writes its table (`kl.json` when patching every position) and, with
    /// `--layers`, the sweep; models come from (and stay in) `store`.
    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<KlReport> {
        self.validate()?;
        let run = RunDir::new(&self.run);
        crate::bad_value::ensure(run.path().is_dir(), "run", || {
            format!("{}: no such run folder", run.path().display())
        })?;
        let _lock = crate::io::DirLock::acquire(run.path(), "run")?;
        let cc = Crosscoder::load(run.path(), device)?;
        // A crosscoder patches with its latents table; a diff-SAE with its sae-latents.csv.
        let (cc_rows, sae_rows) = if cc.config.kind == crate::crosscoder::Kind::Sae {
            let diff = matches!(cc.config.target, Some(SaeTarget::ChatMinusBase | SaeTarget::BaseMinusChat));
            crate::bad_value::ensure(diff, "run", || {
                format!(
                    "{} holds an SAE on {}: KL patching needs a diff-SAE (--target chat-minus-base or base-minus-chat)",
                    run.path().display(),
                    cc.config.target.map_or_else(|| "an unknown input".to_string(), |t| t.to_string())
                )
            })?;
            (Vec::new(), read_sae_rows_of(&run, &cc)?)
        } else {
            (run.read_latents_of(&cc)?, Vec::new())
        };
        let latents = if sae_rows.is_empty() { Latents::Crosscoder(&cc_rows) } else { Latents::Sae(&sae_rows) };
        let layer = resolve_layer(self.layer, &cc, &self.run)?;
        let (b, c) = store.pair(&self.base, &self.chat, self.chat_adapter.as_deref(), device, handle)?;
        crate::workflow::checks::check_resolved_layer(layer, b.lm.num_layers(), self.layer, &self.run)?;
        if let Some(&past) = self.layers.iter().find(|&&l| l >= b.lm.num_layers()) {
            return Err(crate::bad_value::bad(
                "layers",
                format!(
                    "{past} is past the models' last block ({}): give blocks 0..={}",
                    b.lm.num_layers() - 1,
                    b.lm.num_layers() - 1
                ),
            ));
        }
        check_width(&cc, &self.run, &b, &self.base)?;
        check_pair_against_run(&cc, &self.run, [(&self.base, &b), (&self.chat, &c)], self.allow_other_models)?;
        let total = self.conversations as u64;
        let options = self.options();
        let report = crate::analysis::kl::kl_table(
            &b,
            &c,
            &cc,
            latents,
            layer,
            &self.data,
            self.conversations,
            &options,
            |n| {
                handle.progress("kl", n as u64, total, "conversations");
                handle.keep_going()
            },
        )?;
        // A KL that is not a number (a broken model) must not replace good results.
        if report.table.iter().all(|s| s.tokens_all == 0) {
            return Err(crate::bad_value::bad("data", "holds no assistant replies to measure (0 tokens)"));
        }
        let table_file = self.table_file();
        if let Some(s) = report.table.iter().chain(&report.sweep).find(|s| s.tokens_all > 0 && !s.mean_all.is_finite())
        {
            bail!(
                "the KL for \"{}\" came out {}; {} was left as it was",
                s.condition,
                s.mean_all,
                table_file.display()
            );
        }
        run.write_json(&RunDir::kl_name(self.patch_on, self.first_k, false), &report.table)?;
        if !report.sweep.is_empty() {
            run.write_json(&RunDir::kl_name(self.patch_on, self.first_k, true), &report.sweep)?;
        }
        Ok(report)
    }
}

impl KlJob {
    /// Where the table goes: `RUN/kl.json` when every position is patched, else
    /// `RUN/kl-template.json`, `RUN/kl-first10.json`, ….
    pub fn table_file(&self) -> PathBuf {
        RunDir::new(&self.run).kl_file(self.patch_on, self.first_k, false)
    }

    /// Where `--layers` puts the sweep (`RUN/kl-layers.json`, …).
    pub fn sweep_file(&self) -> PathBuf {
        RunDir::new(&self.run).kl_file(self.patch_on, self.first_k, true)
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
        check_model(&made, role, &m.shown(dir), &m.identity, allow)?;
    }
    Ok(())
}

/// An SAE run's `sae-latents.csv`, checked to describe the SAE now in the run (the analysis records
/// the file it read).
fn read_sae_rows_of(run: &RunDir, cc: &Crosscoder) -> Result<Vec<SaeLatentRow>> {
    let csv = run.file(RunDir::SAE_LATENTS);
    if !csv.exists() {
        return Err(crate::bad_value::bad(
            "run",
            format!(
                "{}: no {} yet: run `crossdiff analyze --run {} --cache CACHE` first",
                run.path().display(),
                RunDir::SAE_LATENTS,
                run.path().display()
            ),
        ));
    }
    let summary: SaeSummary = run.read_json(RunDir::SAE_SUMMARY)?;
    if summary.sae_checksum.is_some() && summary.sae_checksum != cc.file_checksum {
        bail!(
            "{} is out of date: it was computed from an earlier SAE (the run was trained further since); run `crossdiff analyze` again",
            csv.display()
        );
    }
    let rows = run.read_sae_latents()?;
    if rows.len() != cc.config.dict_size {
        bail!("{}: {} rows, the SAE has {} latents", csv.display(), rows.len(), cc.config.dict_size);
    }
    Ok(rows)
}
