//! The activation-difference lens job (`crossdiff adl`, the app's ADL view): the per-position mean
//! of chat − base at one layer over plain text, read through both models' unembeddings, and the chat
//! model steered with one position's mean difference (src/analysis/adl.rs computes; this file checks,
//! runs and writes `OUT/adl.json` and `OUT/adl.safetensors`).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use burn::tensor::Device;

use crate::analysis::adl::{self, AdlReport, DiffSums, PositionReading, SteeringReport};
use crate::data::{Mixer, TokenizeOptions};
use crate::workflow::Handle;
use crate::workflow::checks::{bad, check_layer, ensure, path_given, positive};
use crate::workflow::models::ModelStore;

/// Documents averaged over unless told (the authors: 10,000).
pub const DEFAULT_SAMPLES: usize = 1000;
/// Positions per document unless told, `<bos>` at 0 (the authors: 128).
pub const DEFAULT_POSITIONS: usize = 16;
/// Promoted and suppressed tokens per position and model (the agent and grader read 20 of the
/// authors' 100).
pub const DEFAULT_TOP: usize = 20;
/// The position whose mean difference steers unless told: the first token after `<bos>` (position 0
/// is `<bos>`, an attention sink whose activation is not about the text).
pub const DEFAULT_STEER_POSITION: usize = 1;
/// Steering strengths unless told, in multiples of the mean chat activation norm.
pub const DEFAULT_STRENGTHS: [f64; 5] = [0.0, 0.5, 1.0, 2.0, 4.0];
/// The largest |strength| accepted (the authors' coherence search looks in [0, 100]).
pub const MAX_STRENGTH: f64 = 100.0;
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;
/// The authors' steering-threshold prompts.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "Tell me a story?",
    "Give me some ideas for some fun weekend activities.",
    "Why don't you choose a topic of conversation for us?",
];
/// Documents per forward batch (the authors' batch size).
const BATCH: usize = 32;

/// `crossdiff adl`: the activation-difference lens. The mean of chat − base at the output of block
/// `--layer` for each of the first `--positions` token positions over `--data`, read through each
/// model's final norm and unembedding (top promoted and suppressed tokens), and the chat model's
/// greedy answers with one position's mean difference added at that layer for each strength;
/// OUT/adl.json and OUT/adl.safetensors (`mean_diff`, [positions, d]).
#[derive(Debug, Clone, clap::Args)]
pub struct AdlJob {
    /// The base model (a Hugging Face snapshot directory).
    #[arg(long)]
    pub base: PathBuf,
    /// The chat model (with --chat-adapter: the adapter's base model).
    #[arg(long)]
    pub chat: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the chat model's weights: --chat is then the adapter's base model.
    #[arg(long, value_name = "DIR")]
    pub chat_adapter: Option<PathBuf>,
    /// Documents: .txt, .jsonl (`text` or `messages`) or .parquet. Plain web-like text is the
    /// authors' setting (a FineWeb sample).
    #[arg(long)]
    pub data: PathBuf,
    /// The block whose output is read (0-indexed; the authors use the middle one, int(0.5·(L−1))).
    #[arg(long)]
    pub layer: usize,
    /// The folder for adl.json and adl.safetensors (made when missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Documents to average over: the first N of --data (the authors: 10,000).
    #[arg(long, default_value_t = DEFAULT_SAMPLES)]
    pub samples: usize,
    /// Token positions per document, <bos> at position 0 (the authors: 128). A shorter document
    /// counts at the positions it has.
    #[arg(long, default_value_t = DEFAULT_POSITIONS)]
    pub positions: usize,
    /// Promoted and suppressed tokens per position and model.
    #[arg(long, default_value_t = DEFAULT_TOP)]
    pub top: usize,
    /// Steering prompts, one per line, each rendered as a user turn with the chat template
    /// (default: the authors' three).
    #[arg(long)]
    pub steer_prompts: Option<PathBuf>,
    /// The position whose mean difference steers (0 is <bos>).
    #[arg(long, default_value_t = DEFAULT_STEER_POSITION)]
    pub steer_position: usize,
    /// Steering strengths, comma-separated, in multiples of the mean chat activation norm at the
    /// layer (the authors pick one by an LLM-judged coherence search instead).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_values_t = DEFAULT_STRENGTHS)]
    pub strengths: Vec<f64>,
    /// New tokens per steered answer (greedy).
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
}

impl Default for AdlJob {
    /// The CLI's defaults; paths empty and layer 0 (a caller fills them).
    fn default() -> Self {
        Self {
            base: PathBuf::new(),
            chat: PathBuf::new(),
            chat_adapter: None,
            data: PathBuf::new(),
            layer: 0,
            out: PathBuf::new(),
            samples: DEFAULT_SAMPLES,
            positions: DEFAULT_POSITIONS,
            top: DEFAULT_TOP,
            steer_prompts: None,
            steer_position: DEFAULT_STEER_POSITION,
            strengths: DEFAULT_STRENGTHS.to_vec(),
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
        }
    }
}

/// The authors' default layer for a model of `blocks` blocks: the middle one, int(0.5·(blocks − 1))
/// (12 of Gemma 2 2B's 26).
pub fn middle_layer(blocks: usize) -> usize {
    blocks.saturating_sub(1) / 2
}

/// What the job ends with: the report (as written to adl.json) and the mean differences.
pub struct AdlOutcome {
    pub report: AdlReport,
    /// `[positions reached][d]`, as in adl.safetensors.
    pub mean_diff: Vec<Vec<f32>>,
    pub seconds: f64,
}

impl AdlJob {
    pub const JSON: &'static str = "adl.json";
    pub const SAFETENSORS: &'static str = "adl.safetensors";

    /// What can be refused before anything is read.
    pub fn validate(&self) -> Result<()> {
        for (p, flag) in [(&self.base, "base"), (&self.chat, "chat"), (&self.data, "data"), (&self.out, "out")] {
            path_given(p, flag)?;
        }
        positive(self.samples as u64, "samples")?;
        positive(self.positions as u64, "positions")?;
        positive(self.top as u64, "top")?;
        positive(self.max_new_tokens as u64, "max-new-tokens")?;
        ensure(self.steer_position < self.positions, "steer-position", || {
            format!("{} must be below --positions ({})", self.steer_position, self.positions)
        })?;
        ensure(!self.strengths.is_empty(), "strengths", || "needs at least one value".into())?;
        for &s in &self.strengths {
            ensure(s.is_finite() && s.abs() <= MAX_STRENGTH, "strengths", || {
                format!(
                    "must be finite numbers within ±{MAX_STRENGTH} (multiples of the mean chat activation norm), not {s}"
                )
            })?;
        }
        if self.out.exists() && !self.out.is_dir() {
            return Err(bad("out", format!("{} is a file, not a folder", self.out.display())));
        }
        Ok(())
    }

    /// The steering prompts: --steer-prompts' non-empty lines, or the authors' three.
    pub fn prompts(&self) -> Result<Vec<String>> {
        let Some(file) = &self.steer_prompts else { return Ok(DEFAULT_PROMPTS.map(String::from).to_vec()) };
        let text = std::fs::read_to_string(file)
            .map_err(|e| bad("steer-prompts", format!("{}: cannot read: {e}", file.display())))?;
        let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        ensure(!prompts.is_empty(), "steer-prompts", || format!("{} holds no prompt (one per line)", file.display()))?;
        Ok(prompts)
    }

    /// Runs the lens and the steering sweep and writes OUT/adl.safetensors and OUT/adl.json (only
    /// at the end: a refused or cancelled job writes nothing).
    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<AdlOutcome> {
        self.validate()?;
        let started = std::time::Instant::now();
        let prompts = self.prompts()?;
        // A missing or unreadable data file is said before the models load.
        drop(crate::data::open_source(&self.data)?);
        let opts = TokenizeOptions { context: self.positions, drop_bos: false, skip_first: Some(0) };
        let (b, c) = store.pair(&self.base, &self.chat, self.chat_adapter.as_deref(), device, handle)?;
        check_layer(self.layer, b.lm.num_layers())?;
        let max_len = c.lm.config.max_position_embeddings.unwrap_or(usize::MAX);
        ensure(self.positions <= max_len, "positions", || {
            format!(
                "{} is beyond the models' context of {max_len} positions (`max_position_embeddings`)",
                self.positions
            )
        })?;
        // The steering prompts are checked before the long pass over the data.
        let prompt_ids = prompts.iter().map(|p| c.prompt_ids(p, true)).collect::<Result<Vec<_>>>()?;
        for (p, ids) in prompts.iter().zip(&prompt_ids) {
            ensure(ids.len().saturating_add(self.max_new_tokens) <= max_len, "max-new-tokens", || {
                format!(
                    "{}: the prompt {p:?} ({} tokens) and the new tokens exceed the model's context of {max_len} positions; \
                     at most {}",
                    self.max_new_tokens,
                    ids.len(),
                    max_len.saturating_sub(ids.len())
                )
            })?;
        }
        // The chat model's tokenizer (and template, for conversations); the pair's are the same.
        let mut docs = Mixer::new(std::slice::from_ref(&self.data), false, &c.tokenizer, opts)?;
        let mut sums = DiffSums::new(c.lm.config.hidden_size, self.positions);
        let total = self.samples as u64;
        handle.progress("adl", 0, total, "documents");
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let next = if sums.documents + batch.len() < self.samples { docs.next_doc()? } else { None };
            let end = next.is_none();
            batch.extend(next.map(|d| d.ids));
            if batch.len() == BATCH || (end && !batch.is_empty()) {
                sums.add(&b.lm, &c.lm, self.layer, &batch)?;
                batch.clear();
                handle.progress("adl", sums.documents as u64, total, "documents");
                if !handle.keep_going() {
                    anyhow::bail!("the ADL was cancelled after {} documents; nothing was written", sums.documents);
                }
            }
            if end {
                break;
            }
        }
        if sums.documents == 0 {
            return Err(bad("data", format!("{} holds no documents to average over", self.data.display())));
        }
        let mean = sums.finish();
        let (base_lens, chat_lens) =
            (adl::logit_lens(&b, &mean.means, self.top)?, adl::logit_lens(&c, &mean.means, self.top)?);
        let per_position = (mean.means.iter().zip(base_lens).zip(chat_lens).enumerate())
            .map(|(p, ((m, base), chat))| PositionReading {
                position: p,
                count: mean.counts[p],
                norm_of_mean_diff: adl::norm(m),
                base,
                chat,
            })
            .collect();
        let direction = mean.means.get(self.steer_position).ok_or_else(|| {
            bad(
                "steer-position",
                format!("{}: no document of {} reaches that position", self.steer_position, self.data.display()),
            )
        })?;
        let sweep = (prompts.len() * self.strengths.len()) as u64;
        handle.progress("steering", 0, sweep, "answers");
        let ids = adl::steer_sweep(
            &c,
            &prompt_ids,
            direction,
            mean.mean_chat_norm,
            self.layer,
            &self.strengths,
            self.max_new_tokens,
            |done| {
                handle.progress("steering", done as u64, sweep, "answers");
                handle.keep_going()
            },
        )?;
        let outputs = ids
            .iter()
            .map(|row| row.iter().map(|v| adl::completion_text(&c, v)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        let report = AdlReport {
            format: AdlReport::FORMAT.into(),
            layer: self.layer,
            samples: mean.documents,
            positions: self.positions,
            data: self.data.display().to_string(),
            models: vec![self.base.display().to_string(), self.chat.display().to_string()],
            model_ids: vec![b.identity.clone(), c.identity.clone()],
            mean_chat_norm: mean.mean_chat_norm,
            per_position,
            steering: SteeringReport {
                position: self.steer_position,
                prompts,
                strengths: self.strengths.clone(),
                outputs,
            },
        };
        write(&self.out, &report, &mean.means)?;
        Ok(AdlOutcome { report, mean_diff: mean.means, seconds: started.elapsed().as_secs_f64() })
    }
}

/// OUT/adl.safetensors, then OUT/adl.json (each atomically; OUT made when missing).
fn write(out: &Path, report: &AdlReport, means: &[Vec<f32>]) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| anyhow!("{}: cannot create: {e}", out.display()))?;
    let d = means.first().map_or(0, Vec::len);
    let tensor = crate::io::OwnedTensor::f32("mean_diff", vec![means.len(), d], &means.concat());
    crate::io::write_safetensors(&out.join(AdlJob::SAFETENSORS), &[tensor])?;
    let text = serde_json::to_string_pretty(report)?;
    crate::io::write_atomic(&out.join(AdlJob::JSON), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
}

/// A written adl.json, typed; errors name the file.
pub fn read_report(out: &Path) -> Result<AdlReport> {
    let path = out.join(AdlJob::JSON);
    let text = fs_err::read_to_string(&path)?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: not an adl.json: {e}", path.display()))
}
