//! Documents for the activation cache: `.txt`, `.jsonl` and `.parquet` sources, streamed (never
//! loaded whole), tokenized with the model's tokenizer and chat template, optionally mixed 1:1.

pub mod document;
pub mod mix;
pub mod parquet;
pub mod source;
pub mod text;
pub mod tokenize;

pub use document::{DocStream, Document, TokenizedDoc, document_from_json, messages_from_json};
pub use mix::Mixer;
pub use source::open_source;
pub use tokenize::{TokenizeOptions, template_flags, tokenize};
