//! `.txt` and `.jsonl` sources, streamed line by line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use crate::data::document::{Document, document_from_json};

/// `.txt`: one document per blank-line-separated block (a file without blank lines is one document).
pub(crate) struct TextBlocks {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    done: bool,
}

/// A data file's lines through a 1 MiB buffer.
fn open_lines(path: &Path) -> Result<std::io::Lines<BufReader<File>>> {
    let f = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    Ok(BufReader::with_capacity(1 << 20, f).lines())
}

impl TextBlocks {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Ok(Self { lines: open_lines(path)?, path: path.to_path_buf(), done: false })
    }
}

impl Iterator for TextBlocks {
    type Item = Result<Document>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut block = String::new();
        loop {
            match self.lines.next() {
                None => {
                    self.done = true;
                    break;
                }
                Some(Err(e)) => return Some(Err(anyhow!("{}: read failed: {e}", self.path.display()))),
                Some(Ok(line)) => {
                    if line.trim().is_empty() {
                        if block.is_empty() {
                            continue;
                        }
                        break;
                    }
                    if !block.is_empty() {
                        block.push('\n');
                    }
                    block.push_str(&line);
                }
            }
        }
        if block.is_empty() { None } else { Some(Ok(Document::Text(block))) }
    }
}

/// `.jsonl`: one object per line with `text` (string) or `messages` (list of {role, content}).
pub(crate) struct JsonLines {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    line_no: usize,
}

impl JsonLines {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Ok(Self { lines: open_lines(path)?, path: path.to_path_buf(), line_no: 0 })
    }
}

impl Iterator for JsonLines {
    type Item = Result<Document>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(anyhow!("{}: read failed: {e}", self.path.display()))),
            };
            self.line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", self.path.display(), self.line_no);
            return Some(
                serde_json::from_str::<Value>(&line)
                    .map_err(|e| anyhow!("{at}: not valid JSON: {e}"))
                    .and_then(|v| document_from_json(&v).with_context(|| at.clone())),
            );
        }
    }
}
