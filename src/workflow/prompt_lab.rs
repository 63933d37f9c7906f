//! The prompt-lab job: one text through both models and the crosscoder (the app's Prompt lab).

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::Device;

use crate::analysis::prompt_lab::PromptAnalysis;
use crate::crosscoder::Crosscoder;
use crate::workflow::models::ModelStore;
use crate::workflow::{Handle, check_width, resolve_layer};

#[derive(Debug, Clone)]
pub struct PromptLabJob {
    pub run: PathBuf,
    pub base: PathBuf,
    pub chat: PathBuf,
    /// A PEFT LoRA adapter merged into the chat model (`chat` is then the adapter's base).
    pub chat_adapter: Option<PathBuf>,
    pub text: String,
    /// Render the text as one user turn with the chat model's template.
    pub chat_turn: bool,
    /// Latents whose activation is shown at every token.
    pub chosen: Vec<usize>,
    /// Top latents listed per token.
    pub top: usize,
    /// Go on when base/chat are not the models the run was trained on.
    pub allow_other_models: bool,
}

impl Default for PromptLabJob {
    /// Paths and text empty (a caller fills them); five top latents per token.
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            base: PathBuf::new(),
            chat: PathBuf::new(),
            chat_adapter: None,
            text: String::new(),
            chat_turn: false,
            chosen: Vec::new(),
            top: 5,
            allow_other_models: false,
        }
    }
}

pub struct PromptLabOutcome {
    pub analysis: PromptAnalysis,
    /// Each token as text (newlines shown as `\n`).
    pub tokens: Vec<String>,
}

impl PromptLabJob {
    pub fn validate(&self) -> Result<()> {
        for (p, flag) in [(&self.run, "run"), (&self.base, "base"), (&self.chat, "chat")] {
            crate::workflow::checks::path_given(p, flag)?;
        }
        crate::workflow::checks::ensure(!self.text.is_empty(), "prompt", || "is empty".into())
    }

    pub fn run(&self, device: &Device, store: &ModelStore, handle: Handle) -> Result<PromptLabOutcome> {
        self.validate()?;
        let (b, c) = store.pair(&self.base, &self.chat, self.chat_adapter.as_deref(), device, handle)?;
        let cc = Crosscoder::load(&self.run, device)?;
        crate::workflow::checks::crosscoder_run(&cc, &self.run, "the prompt lab")?;
        let layer = resolve_layer(None, &cc, &self.run)?;
        crate::workflow::checks::check_resolved_layer(layer, b.lm.num_layers(), None, &self.run)?;
        check_width(&cc, &self.run, &b, &self.base)?;
        crate::workflow::kl::check_pair_against_run(
            &cc,
            &self.run,
            [(&self.base, &b), (&self.chat, &c)],
            self.allow_other_models,
        )?;
        let ids = c.prompt_ids(&self.text, self.chat_turn)?;
        let analysis =
            crate::analysis::prompt_lab::analyze_prompt(&b, &c, &cc, layer, &ids, &self.chosen, self.top.max(1))?;
        let tokens = ids.iter().map(|&i| c.tokenizer.decode(&[i]).unwrap_or_default().replace('\n', "\\n")).collect();
        Ok(PromptLabOutcome { analysis, tokens })
    }
}
