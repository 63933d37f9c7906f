//! What a data file yields: documents (text or a conversation) and their tokenized form.

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use crate::model::tokenizer::Message;

/// One training document: web-style text, or a conversation rendered with the chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    Text(String),
    Chat(Vec<Message>),
}

/// A document as token ids, with the per-token chat-template flag.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedDoc {
    /// The tokens whose activations are kept.
    pub ids: Vec<u32>,
    /// The tokens before `ids` that `--skip-first` leaves out of the cache: the model still reads
    /// them (as the authors' caching does: it runs the whole sequence and masks the first
    /// positions), so `ids` see their real context and positions.
    pub prefix: Vec<u32>,
    /// Position in the original document of `ids[0]` (non-zero after `--skip-first`).
    pub first_position: u32,
    pub template: Vec<bool>,
    /// Which source (index into the `--data` list) it came from.
    pub source: usize,
}

pub type DocStream = Box<dyn Iterator<Item = Result<Document>> + Send>;

/// A `text` string or a `messages` list of {role, content} objects; a record with both is refused
/// (which one to use would be a guess), as is one that is not a JSON object.
pub fn document_from_json(v: &Value) -> Result<Document> {
    if !v.is_object() {
        bail!("not a JSON object (expected {{\"text\": ...}} or {{\"messages\": [...]}})");
    }
    // A null field is an absent one.
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match (get("text"), get("messages")) {
        (Some(_), Some(_)) => bail!("has both a `text` and a `messages` field: keep one"),
        (Some(Value::String(s)), None) => Ok(Document::Text(s.clone())),
        (Some(_), None) => bail!("field `text` is not a string"),
        (None, Some(messages)) => messages_from_json(messages).map(Document::Chat),
        (None, None) => match ["text", "messages"].into_iter().find(|k| v.get(*k).is_some()) {
            Some(k) => bail!("field `{k}` is null"),
            None => bail!("neither a `text` nor a `messages` field"),
        },
    }
}

/// Why a conversation without turns is refused (a chat template cannot render it).
pub(crate) const EMPTY_MESSAGES: &str = "`messages` is empty: a conversation needs at least one turn";

pub fn messages_from_json(v: &Value) -> Result<Vec<Message>> {
    let list = v.as_array().ok_or_else(|| anyhow!("field `messages` is not a list"))?;
    if list.is_empty() {
        bail!("{EMPTY_MESSAGES}");
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("field `messages[{i}].{k}` is missing or not a string"))
            };
            Ok(Message { role: get("role")?, content: get("content")? })
        })
        .collect()
}
