//! A loaded model: snapshot, tokenizer and Gemma 2 weights on a device.

pub mod config;
pub mod gemma2;
pub mod generate;
pub mod inspect;
pub mod snapshot;
pub mod tokenizer;

use std::path::Path;

use anyhow::Result;
use burn::tensor::Device;

use crate::model::gemma2::{Gemma2, LoadOptions};
use crate::model::snapshot::{Snapshot, check_pair};
use crate::model::tokenizer::{ChatTokenizer, Message};

pub struct Model {
    pub snapshot: Snapshot,
    pub tokenizer: ChatTokenizer,
    pub gemma: Gemma2,
    /// [`Snapshot::identity`]: which model this is, for checking it against caches and runs.
    pub identity: String,
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
        let snapshot = Snapshot::open(dir)?;
        let identity = snapshot.identity()?;
        let tokenizer = ChatTokenizer::from_dir(&snapshot.dir)?;
        let gemma = Gemma2::load_with_progress(&snapshot, device, options, progress)?;
        Ok(Self { snapshot, tokenizer, gemma, identity })
    }

    /// Token ids for a prompt: plain text gets `<bos>` from the tokenizer; `chat` renders it as
    /// one user turn with the model's template and the generation prompt.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let ids = if chat {
            self.tokenizer.encode_chat(&[Message::user(text)], true)?
        } else {
            self.tokenizer.encode(text, true)?
        };
        if let Some(max) = self.gemma.config.max_position_embeddings {
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

    pub fn stop_ids(&self) -> Vec<u32> {
        self.tokenizer.stop_ids(&self.snapshot.config.eos_token_ids())
    }
}

/// Refuses a base/chat pair with different widths or tokenizers, naming the differing field.
pub fn check_models(base: &Model, chat: &Model) -> Result<()> {
    check_pair(&base.snapshot, &chat.snapshot)?;
    base.tokenizer.check_same(&chat.tokenizer)
}
