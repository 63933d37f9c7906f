//! A loaded model: snapshot, tokenizer and decoder weights on a device (any supported family, a
//! LoRA adapter merged in when given).

pub mod config;
pub mod decoder;
pub mod family;
pub mod few_rows;
pub mod fused;
pub mod generate;
pub mod inspect;
pub mod load;
pub mod lora;
pub mod packed;
pub mod rope;
pub mod snapshot;
pub mod tokenizer;

use std::path::Path;

use anyhow::Result;
use burn::tensor::Device;

use crate::model::decoder::{DecoderLm, LoadOptions};
use crate::model::lora::LoraAdapter;
use crate::model::snapshot::{Snapshot, check_pair};
use crate::model::tokenizer::{ChatTokenizer, Message};

pub struct Model {
    pub snapshot: Snapshot,
    pub tokenizer: ChatTokenizer,
    pub lm: DecoderLm,
    /// [`Snapshot::identity`]: which model this is, for checking it against caches and runs (with
    /// an adapter: the base's identity and the adapter's files together).
    pub identity: String,
    /// The merged adapter's folder and [`LoraAdapter::describe`], if any.
    pub adapter: Option<(std::path::PathBuf, String)>,
}

impl Model {
    pub fn load(dir: impl AsRef<Path>, device: &Device, options: LoadOptions) -> Result<Self> {
        Self::load_with_progress(dir, device, options, |_, _| {})
    }

    pub fn load_with_progress(
        dir: impl AsRef<Path>,
        device: &Device,
        options: LoadOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        Self::load_adapted(dir, None, device, options, progress)
    }

    /// The model at `dir` with the PEFT LoRA adapter at `adapter` merged into its weights.
    pub fn load_adapted(
        dir: impl AsRef<Path>,
        adapter: Option<&Path>,
        device: &Device,
        options: LoadOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let snapshot = Snapshot::open(dir)?;
        let adapter = adapter.map(LoraAdapter::open).transpose()?;
        let identity = adapted_identity(snapshot.identity()?, adapter.as_ref());
        let tokenizer = ChatTokenizer::with_adapter(&snapshot.dir, adapter.as_ref().map(|a| a.dir.as_path()))?;
        let lm = DecoderLm::load_with_progress(&snapshot, adapter.as_ref(), device, options, progress)?;
        let adapter = adapter.map(|a| (a.dir.clone(), a.describe()));
        Ok(Self { snapshot, tokenizer, lm, identity, adapter })
    }

    /// Token ids for a prompt: plain text gets `<bos>` from the tokenizer; `chat` renders it as
    /// one user turn with the model's template and the generation prompt.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let ids = if chat {
            self.tokenizer.encode_chat(&[Message::user(text)], true)?
        } else {
            self.tokenizer.encode(text, true)?
        };
        if let Some(max) = self.lm.config.max_position_embeddings {
            crate::bad_value::ensure(ids.len() <= max, "prompt", || {
                format!(
                    "is {} tokens, longer than the model's context of {max} positions (`max_position_embeddings` in {})",
                    ids.len(),
                    self.snapshot.dir.join("config.json").display()
                )
            })?;
        }
        Ok(ids)
    }

    /// Ids generation stops on: the tokenizer's (turn closer and EOS), config.json's and
    /// generation_config.json's `eos_token_id`.
    /// `dir` as messages name this model: with its adapter when one is merged.
    pub fn shown(&self, dir: &Path) -> std::path::PathBuf {
        match &self.adapter {
            Some((a, _)) => format!("{} (+ adapter {})", dir.display(), a.display()).into(),
            None => dir.to_path_buf(),
        }
    }

    pub fn stop_ids(&self) -> Vec<u32> {
        let mut eos = self.snapshot.config.eos_token_ids();
        eos.extend_from_slice(&self.snapshot.generation_eos);
        self.tokenizer.stop_ids(&eos)
    }
}

/// A model's identity with an adapter merged in: the base's and the adapter's files together.
fn adapted_identity(base: String, adapter: Option<&LoraAdapter>) -> String {
    match adapter {
        Some(a) => format!("{:016x}", crate::io::checksum(format!("{base}+{:016x}", a.fingerprint).as_bytes())),
        None => base,
    }
}

/// A model's name as caches and runs record it: with an adapter, `chat + adapter-folder`.
pub fn adapted_name(name: String, adapter: Option<&Path>) -> String {
    match adapter {
        Some(a) => format!(
            "{name} + {}",
            a.file_name().map_or_else(|| a.display().to_string(), |f| f.to_string_lossy().into())
        ),
        None => name,
    }
}

/// The identity of the model at `dir` with `adapter` merged in, without loading its weights (what
/// caches and runs record; see [`Snapshot::identity`]).
pub fn identity_of(dir: &Path, adapter: Option<&Path>) -> Result<String> {
    let snapshot = Snapshot::open(dir)?;
    let adapter = adapter.map(LoraAdapter::open).transpose()?;
    Ok(adapted_identity(snapshot.identity()?, adapter.as_ref()))
}

/// Refuses a base/chat pair with different widths or tokenizers, naming the differing field.
pub fn check_models(base: &Model, chat: &Model) -> Result<()> {
    check_pair(&base.snapshot, &chat.snapshot)?;
    base.tokenizer.check_same(&chat.tokenizer)
}
