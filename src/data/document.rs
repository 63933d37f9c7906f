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
    pub ids: Vec<u32>,
    /// Position in the original document of `ids[0]` (non-zero after `--skip-first`).
    pub first_position: u32,
    pub template: Vec<bool>,
    /// Which source (index into the `--data` list) it came from.
    pub source: usize,
}

pub type DocStream = Box<dyn Iterator<Item = Result<Document>> + Send>;

/// A `text` string or a `messages` list of {role, content} objects.
pub fn document_from_json(v: &Value) -> Result<Document> {
    if let Some(text) = v.get("text") {
        return match text {
            Value::String(s) => Ok(Document::Text(s.clone())),
            _ => bail!("field `text` is not a string"),
        };
    }
    if let Some(messages) = v.get("messages") {
        return messages_from_json(messages).map(Document::Chat);
    }
    bail!("neither a `text` nor a `messages` field")
}

pub fn messages_from_json(v: &Value) -> Result<Vec<Message>> {
    let list = v.as_array().ok_or_else(|| anyhow!("field `messages` is not a list"))?;
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
