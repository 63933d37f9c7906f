//! Several sources as one stream: one after another, or mixed 1:1 by tokens.

use std::collections::VecDeque;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::data::document::{DocStream, TokenizedDoc};
use crate::data::source::open_source;
use crate::data::tokenize::{TokenizeOptions, tokenize};
use crate::model::tokenizer::ChatTokenizer;

/// The `--data` list: at least one file, none listed twice (by its canonical path when it exists,
/// so `a.txt` and `./a.txt` are the same file): a file given twice would be read twice.
pub fn check_data_files(paths: &[PathBuf]) -> Result<()> {
    use crate::bad_value::{bad, ensure};
    ensure(!paths.is_empty(), "data", || "is required (no data files given)".into())?;
    let mut seen: std::collections::HashMap<PathBuf, &PathBuf> = std::collections::HashMap::new();
    for p in paths {
        let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if let Some(first) = seen.insert(key, p) {
            let also =
                if first.as_os_str() == p.as_os_str() { String::new() } else { format!(" (also as {})", p.display()) };
            return Err(bad("data", format!("lists {} twice{also}", first.display())));
        }
    }
    Ok(())
}

/// Documents from several sources, either one after another or mixed 1:1 by tokens: the next
/// document comes from the source that has contributed the fewest tokens so far.
pub struct Mixer<'a> {
    sources: Vec<Option<DocStream>>,
    names: Vec<PathBuf>,
    tokens: Vec<u64>,
    /// Documents read from each source so far (for errors: which document failed).
    read: Vec<u64>,
    mix: bool,
    tok: &'a ChatTokenizer,
    opts: TokenizeOptions,
    /// Documents produced so far (the resume point).
    pub produced: u64,
    pending: VecDeque<TokenizedDoc>,
}

impl<'a> Mixer<'a> {
    pub fn new(paths: &[PathBuf], mix: bool, tok: &'a ChatTokenizer, opts: TokenizeOptions) -> Result<Self> {
        check_data_files(paths)?;
        let sources = paths.iter().map(|p| open_source(p).map(Some)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            sources,
            names: paths.to_vec(),
            tokens: vec![0; paths.len()],
            read: vec![0; paths.len()],
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
                    self.read[i] += 1;
                    let doc = doc.with_context(|| format!("source {}", self.names[i].display()))?;
                    let tokenized = tokenize(self.tok, &doc, i, &self.opts)
                        .with_context(|| format!("{}: document {}", self.names[i].display(), self.read[i]))?;
                    if let Some(t) = tokenized {
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
