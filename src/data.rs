//! Documents for the activation cache: `.txt`, `.jsonl` and `.parquet` sources, streamed (never
//! loaded whole), tokenized with the model's tokenizer and chat template, optionally mixed 1:1.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::tokenizer::{ChatTokenizer, Message};

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

/// Opens one data file by its extension.
pub fn open_source(path: &Path) -> Result<DocStream> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "text" => Ok(Box::new(TextBlocks::open(path)?)),
        "jsonl" | "json" => Ok(Box::new(JsonLines::open(path)?)),
        "parquet" => crate::parquet_source::open(path),
        _ => bail!("{}: unknown data file type (expected .txt, .jsonl or .parquet)", path.display()),
    }
}

/// `.txt`: one document per blank-line-separated block (a file without blank lines is one document).
struct TextBlocks {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    done: bool,
}

impl TextBlocks {
    fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        Ok(Self { lines: BufReader::with_capacity(1 << 20, f).lines(), path: path.to_path_buf(), done: false })
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
struct JsonLines {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    line_no: usize,
}

impl JsonLines {
    fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
        Ok(Self { lines: BufReader::with_capacity(1 << 20, f).lines(), path: path.to_path_buf(), line_no: 0 })
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

/// How documents become token sequences.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Truncate to this many tokens (the paper: 1024).
    pub context: usize,
    /// Drop the leading `<bos>` (another public replication does; the paper keeps it for Gemma).
    pub drop_bos: bool,
    /// Drop the first N tokens of every document (after the BOS decision).
    pub skip_first: usize,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self { context: 1024, drop_bos: false, skip_first: 0 }
    }
}

/// Tokenizes a document; `None` when nothing is left after truncation and skipping.
pub fn tokenize(
    tok: &ChatTokenizer,
    doc: &Document,
    source: usize,
    opts: &TokenizeOptions,
) -> Result<Option<TokenizedDoc>> {
    let ids = match doc {
        Document::Text(t) => tok.encode(t, true)?,
        Document::Chat(m) => tok.encode_chat(m, false)?,
    };
    let template = template_flags(tok, &ids);
    let mut start = 0;
    if opts.drop_bos && ids.first().is_some_and(|&i| Some(i) == tok.bos_id) {
        start = 1;
    }
    start += opts.skip_first;
    let end = ids.len().min(start + opts.context);
    if start >= end {
        return Ok(None);
    }
    Ok(Some(TokenizedDoc {
        ids: ids[start..end].to_vec(),
        first_position: start as u32,
        template: template[start..end].to_vec(),
        source,
    }))
}

/// Chat-template tokens: `<start_of_turn>`, the role token(s) and the newline after them,
/// `<end_of_turn>` and the newline after it. BOS is not a template token (counted separately).
pub fn template_flags(tok: &ChatTokenizer, ids: &[u32]) -> Vec<bool> {
    let mut flags = vec![false; ids.len()];
    let has_newline = |id: u32| tok.decode(&[id]).map(|s| s.contains('\n')).unwrap_or(false);
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
        } else {
            i += 1;
        }
    }
    flags
}

/// Documents from several sources, either one after another or mixed 1:1 by tokens: the next
/// document comes from the source that has contributed the fewest tokens so far.
pub struct Mixer<'a> {
    sources: Vec<Option<DocStream>>,
    names: Vec<PathBuf>,
    tokens: Vec<u64>,
    mix: bool,
    tok: &'a ChatTokenizer,
    opts: TokenizeOptions,
    /// Documents produced so far (the resume point).
    pub produced: u64,
    pending: VecDeque<TokenizedDoc>,
}

impl<'a> Mixer<'a> {
    pub fn new(paths: &[PathBuf], mix: bool, tok: &'a ChatTokenizer, opts: TokenizeOptions) -> Result<Self> {
        if paths.is_empty() {
            bail!("--data: no data files given");
        }
        let sources = paths.iter().map(|p| open_source(p).map(Some)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            sources,
            names: paths.to_vec(),
            tokens: vec![0; paths.len()],
            mix,
            tok,
            opts,
            produced: 0,
            pending: VecDeque::new(),
        })
    }

    fn pick(&self) -> Option<usize> {
        let open = (0..self.sources.len()).filter(|&i| self.sources[i].is_some());
        if self.mix { open.min_by_key(|&i| (self.tokens[i], i)) } else { open.min() }
    }

    /// The next tokenized document, or `None` when every source is exhausted.
    pub fn next_doc(&mut self) -> Result<Option<TokenizedDoc>> {
        if let Some(d) = self.pending.pop_front() {
            return Ok(Some(d));
        }
        while let Some(i) = self.pick() {
            let next = self.sources[i].as_mut().and_then(|s| s.next());
            match next {
                None => self.sources[i] = None,
                Some(doc) => {
                    let doc = doc.with_context(|| format!("source {}", self.names[i].display()))?;
                    if let Some(t) = tokenize(self.tok, &doc, i, &self.opts)? {
                        self.tokens[i] += t.ids.len() as u64;
                        self.produced += 1;
                        return Ok(Some(t));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Skips `n` documents (resume).
    pub fn skip(&mut self, n: u64) -> Result<()> {
        while self.produced < n {
            if self.next_doc()?.is_none() {
                bail!("the data files hold fewer documents than the cache already contains ({n}): were they changed?");
            }
        }
        Ok(())
    }

    /// Tokens taken from each source so far.
    pub fn tokens_per_source(&self) -> &[u64] {
        &self.tokens
    }
}
