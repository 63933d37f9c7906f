//! Documents → token ids (with `<bos>` handling, truncation, skipping) and chat-template flags.

use anyhow::Result;

use crate::data::document::{Document, TokenizedDoc};
use crate::model::family::Family;
use crate::model::tokenizer::ChatTokenizer;

/// The paper's context length: documents are truncated to 1024 tokens.
pub const DEFAULT_CONTEXT: usize = 1024;

/// How documents become token sequences.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TokenizeOptions {
    /// Truncate documents to this many tokens (the paper: 1024).
    #[arg(long, default_value_t = DEFAULT_CONTEXT)]
    pub context: usize,
    /// Drop each document's leading <bos> (another public replication does; the paper keeps it for Gemma).
    #[arg(long)]
    pub drop_bos: bool,
    /// Drop the first N tokens of each document (counted after --drop-bos). Default: the authors'
    /// value for the models' family — Gemma 2: 0, Gemma 3: 1, Llama 3: 25, Qwen 2/2.5: 21, Qwen 3: 2
    /// (the first positions of Llama and Qwen carry attention-sink activations with huge norms).
    #[arg(long)]
    pub skip_first: Option<usize>,
}

impl TokenizeOptions {
    /// What can be refused before a document is read: a positive `--context`, and a `--skip-first`
    /// below it (at or above it, every document would be cut to nothing).
    pub fn validate(&self) -> Result<()> {
        self.check(self.skip(), None)
    }

    /// [`TokenizeOptions::resolved`] for `family`, validated: a default `--skip-first` that leaves
    /// nothing of `--context` is named as the family's default.
    pub fn resolved_for(&self, family: Family) -> Result<Self> {
        let resolved = self.resolved(family);
        self.check(resolved.skip(), Some(family))?;
        Ok(resolved)
    }

    fn check(&self, skip: usize, family: Option<Family>) -> Result<()> {
        crate::bad_value::positive(self.context as u64, "context")?;
        crate::bad_value::ensure(skip < self.context, "skip-first", || match (self.skip_first, family) {
            (None, Some(f)) => format!(
                "defaults to {skip} for {f} models (the authors' value), which leaves nothing of --context {}: give a larger --context or a smaller --skip-first",
                self.context
            ),
            _ => format!("({skip}) must be below --context ({})", self.context),
        })
    }

    /// These options with `--skip-first` filled in from the models' family when not given.
    pub fn resolved(&self, family: Family) -> Self {
        Self { skip_first: Some(self.skip_first.unwrap_or(family.default_skip_first())), ..self.clone() }
    }

    /// Tokens left out at the start of each document (0 until [`TokenizeOptions::resolved`]).
    pub fn skip(&self) -> usize {
        self.skip_first.unwrap_or(0)
    }
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self { context: DEFAULT_CONTEXT, drop_bos: false, skip_first: None }
    }
}

/// Tokenizes a document; `None` when nothing is left after truncation and skipping, and for a text
/// that is empty or only whitespace (it would be a lone `<bos>`).
pub fn tokenize(
    tok: &ChatTokenizer,
    doc: &Document,
    source: usize,
    opts: &TokenizeOptions,
) -> Result<Option<TokenizedDoc>> {
    let ids = match doc {
        Document::Text(t) if t.trim().is_empty() => return Ok(None),
        Document::Text(t) => tok.encode(t, true)?,
        Document::Chat(m) => tok.encode_chat(m, false)?,
    };
    let template = template_flags(tok, &ids);
    // The model's input: the document from its first kept token (after --drop-bos), truncated to
    // --context; the first --skip-first of those are read but not kept.
    let input = usize::from(opts.drop_bos && ids.first().is_some_and(|&i| Some(i) == tok.bos_id));
    let end = ids.len().min(input + opts.context);
    let start = input + opts.skip();
    if start >= end {
        return Ok(None);
    }
    Ok(Some(TokenizedDoc {
        ids: ids[start..end].to_vec(),
        prefix: ids[input..start].to_vec(),
        first_position: start as u32,
        template: template[start..end].to_vec(),
        source,
    }))
}

/// Chat-template tokens, for every [`crate::model::tokenizer::ChatFormat`]: the turn opener, the
/// role and its line end (Llama 3: `<|end_header_id|>` and `\n\n`), the turn closer and the
/// newline after it (Gemma, ChatML), and Qwen 3's empty `<think>\n\n</think>\n\n` block that
/// the template puts before a reply. The authors mark the same tokens through their templates'
/// `{% generation %}` blocks (5 per Gemma turn). BOS is not a template token (counted separately).
pub fn template_flags(tok: &ChatTokenizer, ids: &[u32]) -> Vec<bool> {
    let mut flags = vec![false; ids.len()];
    let has_newline = |id: u32| tok.decode(&[id]).map(|s| s.contains('\n')).unwrap_or(false);
    let only_newlines = |id: u32| tok.decode(&[id]).map(|s| !s.is_empty() && s.trim().is_empty()).unwrap_or(false);
    let mut i = 0;
    while i < ids.len() {
        let id = Some(ids[i]);
        if id == tok.start_of_turn_id && id.is_some() {
            flags[i] = true;
            // The role name up to and including its newline (a role is a few tokens at most).
            let mut j = i + 1;
            while j < ids.len() && j <= i + 8 {
                flags[j] = true;
                if has_newline(ids[j]) {
                    break;
                }
                j += 1;
            }
            i = j + 1;
        } else if id == tok.end_of_turn_id && id.is_some() {
            flags[i] = true;
            if i + 1 < ids.len() && has_newline(ids[i + 1]) {
                flags[i + 1] = true;
                i += 1;
            }
            i += 1;
        } else if let Some((_, close)) = tok.think_ids.filter(|(open, _)| ids[i] == *open) {
            // An empty thinking block: `<think>`, newlines, `</think>`, newlines.
            let mut j = i + 1;
            while j < ids.len() && only_newlines(ids[j]) {
                j += 1;
            }
            if j < ids.len() && ids[j] == close {
                j += 1;
                while j < ids.len() && only_newlines(ids[j]) {
                    j += 1;
                }
                flags[i..j].iter_mut().for_each(|f| *f = true);
                i = j;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    flags
}
