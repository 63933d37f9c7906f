//! `.txt` and `.jsonl` sources, streamed line by line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::data::document::{Document, document_from_json};

/// `.txt`: one document per blank-line-separated block (a file without blank lines is one document).
pub(crate) struct TextBlocks {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    line_no: usize,
    done: bool,
}

/// A data file's lines through a 1 MiB buffer. A UTF-8 byte order mark (some editors write one) is
/// not text and is dropped; a UTF-16 file is refused by name (its lines would not decode).
fn open_lines(path: &Path) -> Result<std::io::Lines<BufReader<File>>> {
    let f = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, f);
    let head = reader.fill_buf().map_err(|e| anyhow!("{}: read failed: {e}", path.display()))?;
    if head.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    } else if head.starts_with(b"\xFF\xFE") || head.starts_with(b"\xFE\xFF") {
        bail!("{}: is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8", path.display());
    }
    Ok(reader.lines())
}

/// A line that could not be read: `at` is `file:line`.
fn read_error(at: String, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        anyhow!("{at}: not UTF-8 text; save the file as UTF-8")
    } else {
        anyhow!("{at}: read failed: {e}")
    }
}

impl TextBlocks {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Ok(Self { lines: open_lines(path)?, path: path.to_path_buf(), line_no: 0, done: false })
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
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(read_error(format!("{}:{}", self.path.display(), self.line_no + 1), e)));
                }
                Some(Ok(line)) => {
                    self.line_no += 1;
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
            let line = self.lines.next()?;
            self.line_no += 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(read_error(format!("{}:{}", self.path.display(), self.line_no), e))),
            };
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
