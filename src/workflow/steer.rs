//! The steering job: `crossdiff steer` and the app's Steering view.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;

use crate::analysis::latents::LatentRow;
use crate::crosscoder::Crosscoder;
use crate::model::gemma2::LoadOptions;
use crate::run_dir::RunDir;
use crate::workflow::models::ModelStore;
use crate::workflow::{Handle, check_layer, check_width, resolve_layer};

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
}

impl Default for SteerJob {
    /// The CLI's defaults; paths and prompt empty, latent 0 at strength 1 (a caller fills them).
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            model: PathBuf::new(),
            load: LoadOptions::default(),
            latent: 0,
            strength: 1.0,
            prompt: String::new(),
            chat: false,
            max_tokens: DEFAULT_MAX_TOKENS,
            layer: None,
            more: Vec::new(),
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
        for (j, s) in self.latents() {
            if !s.is_finite() {
                bail!("--strength for latent {j} must be a finite number, not {s}");
            }
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be positive");
        }
        Ok(())
    }

    fn latents(&self) -> Vec<(usize, f64)> {
        std::iter::once((self.latent, self.strength)).chain(self.more.iter().copied()).collect()
    }

    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<SteerOutcome> {
        self.validate()?;
        let run = RunDir::new(&self.run);
        let m = store.get(&self.model, device, self.load, handle)?;
        let cc = Crosscoder::load(run.path(), device)?;
        check_width(&cc, &self.run, &m, &self.model)?;
        let all = run.read_latents()?;
        let layer = resolve_layer(self.layer, &cc)?;
        check_layer(layer, m.gemma.num_layers())?;
        let mut rows = Vec::new();
        let mut specs = Vec::new();
        for (j, s) in self.latents() {
            let row = all.get(j).ok_or_else(|| anyhow!("--latent {j}: latents.csv has {} rows", all.len()))?.clone();
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
