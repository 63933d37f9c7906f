//! The steering job: `crossdiff steer` and the app's Steering view.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;

use crate::analysis::latents::LatentRow;
use crate::crosscoder::Crosscoder;
use crate::model::decoder::LoadOptions;
use crate::run_dir::RunDir;
use crate::workflow::checks::{ALLOW_OTHER_MODELS, ensure, path_given, positive};
use crate::workflow::models::ModelStore;
use crate::workflow::{Handle, check_width, resolve_layer};

/// The largest |strength| accepted: a multiple of the latent's largest observed activation.
pub const MAX_STRENGTH: f64 = 1000.0;

/// New tokens generated on each side by default.
pub const DEFAULT_MAX_TOKENS: usize = 64;

/// `crossdiff steer`: generation with latents' chat decoder directions added at the crosscoder's
/// layer, beside the unsteered completion.
#[derive(Debug, Clone, clap::Args)]
pub struct SteerJob {
    /// The run directory (crosscoder and latents.csv).
    #[arg(long)]
    pub run: PathBuf,
    /// A Hugging Face snapshot directory (the chat model, usually).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder merged into --model (a chat model made as an adapter).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadOptions,
    /// The latent to add.
    #[arg(long)]
    pub latent: usize,
    /// Multiple of the latent's largest observed activation (latents.csv's max_act).
    #[arg(long)]
    pub strength: f64,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as one user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    pub max_tokens: usize,
    /// The layer (default: the crosscoder's).
    #[arg(long)]
    pub layer: Option<usize>,
    /// More latents with their own strengths (the app's sliders); `latent`/`strength` come first.
    #[arg(skip)]
    pub more: Vec<(usize, f64)>,
    /// Go on when --model is neither of the models the run was trained on.
    #[arg(long)]
    pub allow_other_models: bool,
}

impl Default for SteerJob {
    /// The CLI's defaults; paths and prompt empty, latent 0 at strength 1 (a caller fills them).
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            model: PathBuf::new(),
            adapter: None,
            load: LoadOptions::default(),
            latent: 0,
            strength: 1.0,
            prompt: String::new(),
            chat: false,
            max_tokens: DEFAULT_MAX_TOKENS,
            layer: None,
            more: Vec::new(),
            allow_other_models: false,
        }
    }
}

pub struct SteerOutcome {
    pub plain: String,
    pub steered: String,
    /// The rows of the steered latents, in order.
    pub rows: Vec<LatentRow>,
    pub layer: usize,
    pub new_tokens: [usize; 2],
}

impl SteerJob {
    pub fn validate(&self) -> Result<()> {
        path_given(&self.run, "run")?;
        path_given(&self.model, "model")?;
        for (j, s) in self.latents() {
            ensure(s.is_finite(), "strength", || format!("for latent {j} must be a finite number, not {s}"))?;
            // Far beyond any useful steering, the residual overflows and the model prints padding.
            ensure(s.abs() <= MAX_STRENGTH, "strength", || {
                format!("for latent {j} must be within ±{MAX_STRENGTH} (a multiple of its largest activation), not {s}")
            })?;
        }
        positive(self.max_tokens as u64, "max-tokens")
    }

    fn latents(&self) -> Vec<(usize, f64)> {
        std::iter::once((self.latent, self.strength)).chain(self.more.iter().copied()).collect()
    }

    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<SteerOutcome> {
        self.validate()?;
        let run = RunDir::new(&self.run);
        let m = store.get(&self.model, self.adapter.as_deref(), device, self.load, handle)?;
        let cc = Crosscoder::load(run.path(), device)?;
        crate::workflow::checks::crosscoder_run(&cc, run.path(), "steer")?;
        check_width(&cc, &self.run, &m, &self.model)?;
        // Steering adds a decoder direction to either model of the pair (usually the chat one).
        let ids = &cc.config.model_ids;
        if !self.allow_other_models && !ids.is_empty() && !ids.contains(&m.identity) {
            bail!(
                "{}: not one of the models the run in {} was trained on (identities {}, this one is {}); pass --{ALLOW_OTHER_MODELS} to go on anyway",
                m.shown(&self.model).display(),
                self.run.display(),
                ids.join("/"),
                m.identity
            );
        }
        let all = run.read_latents_of(&cc)?;
        let layer = resolve_layer(self.layer, &cc, &self.run)?;
        crate::workflow::checks::check_resolved_layer(layer, m.lm.num_layers(), self.layer, &self.run)?;
        let mut rows = Vec::new();
        let mut specs = Vec::new();
        for (j, s) in self.latents() {
            let row = all.get(j).ok_or_else(|| anyhow!("--latent {j}: latents.csv has {} rows", all.len()))?.clone();
            ensure(row.max_act > 0.0, "latent", || {
                format!(
                    "{j} never activated on the analysed cache (max_act 0): a multiple of its activation adds nothing"
                )
            })?;
            specs.push((j, s, row.max_act));
            rows.push(row);
        }
        let edit = crate::analysis::steer::combined_edit(&cc, &specs, layer)?;
        let ids = m.prompt_ids(&self.prompt, self.chat)?;
        handle.progress("generating", 0, 2, "completions");
        let (plain, steered) =
            crate::analysis::steer::steer_until(&m, &ids, &edit, self.max_tokens, &|| handle.keep_going())?;
        let stop = m.stop_ids();
        let text = |v: &[u32]| m.tokenizer.decode(&v.iter().copied().filter(|i| !stop.contains(i)).collect::<Vec<_>>());
        Ok(SteerOutcome {
            plain: text(&plain)?,
            steered: text(&steered)?,
            rows,
            layer,
            new_tokens: [plain.len(), steered.len()],
        })
    }
}
