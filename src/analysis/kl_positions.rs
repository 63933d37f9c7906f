//! Which positions the KL check measures and which it patches (shared/spec/method.md §5).
//!
//! Measured: the positions that predict each assistant turn's generated part — its reply content
//! and its `<end_of_turn>` (the template's generation block shifted left by one). The "first 9"
//! set is, per turn, the first 10 such positions minus those whose input token is a template token:
//! the position holding the `\n` after `model` drops out, so it holds the predictions of reply
//! tokens 2–10 (a shorter reply ends at its `<end_of_turn>`). This is the authors'
//! `evaluate_interventions` rule.
//!
//! Patched: every position (the paper's table), or only the template tokens, only the first k
//! predicting positions of each assistant turn minus template inputs, or both (the authors'
//! `PatchCtrl`, `PatchKFirstPredictions`, `PatchKFirstAndCtrl`; their "first5" patches run with the
//! mask's default k of 10, the measured "first 9" set): elsewhere the base activation stays.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::template_flags;
use crate::model::Model;

/// Predicting positions per assistant turn considered for the "first 9" set.
pub const FIRST_WINDOW: usize = 10;

/// Where the patched activation replaces the base one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchOn {
    /// Every position, BOS included (the paper's table).
    #[default]
    All,
    /// Chat-template tokens only (`<start_of_turn>`, the role and its newline, `<end_of_turn>`
    /// and its newline).
    Template,
    /// The first k predicting positions of each assistant turn minus those whose input is a
    /// template token (k = 10: the "first 9" set, reply tokens 2–10).
    FirstK,
    /// Both of the above.
    TemplateAndFirstK,
}

impl std::str::FromStr for PatchOn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "all" => Self::All,
            "template" => Self::Template,
            "first-k" => Self::FirstK,
            "template+first-k" | "template-and-first-k" => Self::TemplateAndFirstK,
            _ => bail!("--patch-on: \"{s}\" is not one of all, template, first-k, template+first-k"),
        })
    }
}

impl std::fmt::Display for PatchOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::Template => "template",
            Self::FirstK => "first-k",
            Self::TemplateAndFirstK => "template+first-k",
        })
    }
}

impl PatchOn {
    /// The file stem of this patching's results: `kl` for all positions, else `kl-template`,
    /// `kl-first10`, `kl-template+first10`.
    pub fn stem(&self, first_k: usize) -> String {
        match self {
            Self::All => "kl".into(),
            Self::Template => "kl-template".into(),
            Self::FirstK => format!("kl-first{first_k}"),
            Self::TemplateAndFirstK => format!("kl-template+first{first_k}"),
        }
    }
}

/// A conversation's token roles for the KL check.
pub struct Turns {
    /// Per assistant turn, the positions predicting its generated tokens, in order.
    pub turns: Vec<Vec<usize>>,
    /// Whether each token is a chat-template token.
    pub template: Vec<bool>,
}

impl Turns {
    /// Reads the turns of a chat-formatted sequence: after the turn opener (`<start_of_turn>`,
    /// `<|start_header_id|>`, `<|im_start|>`) and a role line naming the assistant (`model` or
    /// `assistant`), every token up to and including the turn closer (or the sequence's end) is
    /// generated; the position before each predicts it.
    pub fn of(model: &Model, ids: &[u32]) -> Self {
        let tok = &model.tokenizer;
        let template = template_flags(tok, ids);
        let mut turns = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if tok.start_of_turn_id != Some(ids[i]) {
                i += 1;
                continue;
            }
            // The role: the template tokens after `<start_of_turn>`, up to its newline.
            let mut j = i + 1;
            while j < ids.len() && template[j] && tok.end_of_turn_id != Some(ids[j]) {
                let newline = tok.decode(&[ids[j]]).map(|s| s.contains('\n')).unwrap_or(false);
                j += 1;
                if newline {
                    break;
                }
            }
            let assistant = tok.format.map_or("model", |f| f.assistant_role());
            let is_model = tok.decode_text(&ids[i + 1..j]).map(|r| r.trim() == assistant).unwrap_or(false);
            let mut targets = Vec::new();
            while j < ids.len() {
                if tok.start_of_turn_id == Some(ids[j]) {
                    break;
                }
                targets.push(j - 1);
                j += 1;
                if tok.end_of_turn_id == Some(ids[j - 1]) {
                    break;
                }
            }
            if is_model && !targets.is_empty() {
                turns.push(targets);
            }
            i = j;
        }
        Self { turns, template }
    }

    /// Every measured position with whether it is in the "first 9" set.
    pub fn measured(&self) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        for turn in &self.turns {
            for (n, &p) in turn.iter().enumerate() {
                out.push((p, n < FIRST_WINDOW && !self.template[p]));
            }
        }
        out
    }

    /// The positions a patch replaces, as a 0/1 mask over the sequence (`None`: every position).
    pub fn patch_mask(&self, on: PatchOn, first_k: usize) -> Option<Vec<f32>> {
        let mut mask = vec![0.0f32; self.template.len()];
        let (template, first) = match on {
            PatchOn::All => return None,
            PatchOn::Template => (true, false),
            PatchOn::FirstK => (false, true),
            PatchOn::TemplateAndFirstK => (true, true),
        };
        if template {
            for (m, &t) in mask.iter_mut().zip(&self.template) {
                if t {
                    *m = 1.0;
                }
            }
        }
        if first {
            // As the authors' `k_first_pred_toks_mask`: the first k predicting positions of each
            // turn minus those whose input is a template token (the `\n` after `model`).
            for turn in &self.turns {
                for &p in turn.iter().take(first_k).filter(|&&p| !self.template[p]) {
                    mask[p] = 1.0;
                }
            }
        }
        Some(mask)
    }
}

/// Positions that predict an assistant turn's generated tokens, and whether each is in the
/// "first 9" set ([`Turns::measured`]).
pub fn reply_positions(model: &Model, ids: &[u32]) -> Vec<(usize, bool)> {
    Turns::of(model, ids).measured()
}
