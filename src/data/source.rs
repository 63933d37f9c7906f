//! A data file by its extension.

use std::path::Path;

use anyhow::{Result, bail};

use crate::data::document::DocStream;
use crate::data::text::{JsonLines, TextBlocks};

/// Opens one data file by its extension.
pub fn open_source(path: &Path) -> Result<DocStream> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "text" => Ok(Box::new(TextBlocks::open(path)?)),
        "jsonl" | "json" => Ok(Box::new(JsonLines::open(path)?)),
        "parquet" => crate::data::parquet::open(path),
        _ => bail!("{}: unknown data file type (expected .txt, .jsonl or .parquet)", path.display()),
    }
}
