//! What the Prompt lab and Steering start with when a project's run is opened: the chat-only latent
//! with the largest Δ (the run's most chat-specific direction) and a text it fires on (its top
//! example from the run's examples store, as the chat model's tokenizer writes it). Read once when
//! the project opens, never in a frame.

use std::path::Path;

use crossdiff::analysis::examples::ExamplesStore;
use crossdiff::analysis::latents::{LatentClass, LatentRow};
use crossdiff::model::tokenizer::ChatTokenizer;
use crossdiff::run_dir::RunDir;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Suggestion {
    /// The latent to follow and steer with.
    pub latent: Option<usize>,
    /// The text around its strongest activation.
    pub text: Option<String>,
}

impl Suggestion {
    /// The suggestion for run `run`, its examples decoded with the tokenizer in `chat`.
    pub fn of_run(run: &Path, chat: &Path) -> Self {
        let rows = RunDir::new(run).read_latents().unwrap_or_default();
        let latent = strongest_latent(&rows);
        let text = latent.and_then(|j| top_example_text(run, chat, j));
        Self { latent, text }
    }
}

/// The chat-only latent with the largest Δ; without one, the live latent with the largest Δ.
pub fn strongest_latent(rows: &[LatentRow]) -> Option<usize> {
    let largest = |class: Option<LatentClass>| {
        rows.iter()
            .filter(|r| r.class != LatentClass::Dead && class.is_none_or(|c| r.class == c))
            .max_by(|a, b| a.delta_norm.total_cmp(&b.delta_norm))
            .map(|r| r.latent)
    };
    largest(Some(LatentClass::ChatOnly)).or_else(|| largest(None))
}

/// Latent `j`'s top example window as text (without a leading `<bos>`: the prompt lab adds one).
fn top_example_text(run: &Path, chat: &Path, j: usize) -> Option<String> {
    let examples = ExamplesStore::open(run).ok()?.latent(j).ok()?;
    let top = examples.examples.iter().find(|e| e.kind == 0)?;
    let text = ChatTokenizer::from_dir(chat).ok()?.decode(&top.document_ids()).ok()?;
    // A window cut inside a character starts or ends with a piece of it; one cut inside a line
    // starts with the rest of that line, which is dropped when the line is short.
    let mut text = text.trim_start_matches("<bos>").replace('\u{FFFD}', "");
    if top.window_acts.first().is_some_and(|a| *a >= 0.0) {
        if let Some(i) = text.find('\n').filter(|&i| i < text.len() / 3) {
            text.drain(..=i);
        }
    }
    (!text.trim().is_empty()).then_some(text)
}
