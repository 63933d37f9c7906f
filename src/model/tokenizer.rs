//! The model's own tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`,
//! rendered with a Jinja engine so any model's template works, not a re-implementation of Gemma's).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One chat turn, as in `messages` of a chat dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

pub struct ChatTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    template_source: PathBuf,
    bos_token: String,
    eos_token: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The chat format's turn markers, when the vocabulary has one (see [`ChatFormat`]).
    pub format: Option<ChatFormat>,
    /// The token that opens a turn (`<start_of_turn>`, `<|start_header_id|>`, `<|im_start|>`).
    pub start_of_turn_id: Option<u32>,
    /// The token that closes a turn (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`).
    pub end_of_turn_id: Option<u32>,
    /// Qwen 3's `<think>` and `</think>`, whose empty block the template puts before a reply.
    pub think_ids: Option<(u32, u32)>,
}

/// The chat formats whose template tokens crossdiff marks (template statistics, the KL's
/// first-k positions): the turn opener, the role line, the turn closer and the newline after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<start_of_turn>user\n … <end_of_turn>\n`; the assistant's role is `model`.
    Gemma,
    /// `<|start_header_id|>user<|end_header_id|>\n\n … <|eot_id|>`.
    Llama3,
    /// `<|im_start|>user\n … <|im_end|>\n` (Qwen).
    ChatMl,
}

impl ChatFormat {
    /// (format, turn opener, turn closer), tried in this order on the vocabulary.
    const MARKERS: [(ChatFormat, &'static str, &'static str); 3] = [
        (ChatFormat::Gemma, "<start_of_turn>", "<end_of_turn>"),
        (ChatFormat::Llama3, "<|start_header_id|>", "<|eot_id|>"),
        (ChatFormat::ChatMl, "<|im_start|>", "<|im_end|>"),
    ];

    /// The role name the template gives the model's own turns.
    pub fn assistant_role(self) -> &'static str {
        match self {
            Self::Gemma => "model",
            Self::Llama3 | Self::ChatMl => "assistant",
        }
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (or `chat_template.jinja`,
    /// where newer transformers versions save the template) from a snapshot directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::with_adapter(dir, None)
    }

    /// As [`ChatTokenizer::from_dir`], where a LoRA adapter's folder may carry tokenizer files of
    /// its own (trainers save them beside the adapter, often with the chat template the base
    /// lacks): each file is read from the adapter's folder when it is there, else from `dir`; the
    /// chat template is the adapter folder's when it has one (in either file), else the base's.
    pub fn with_adapter(dir: &Path, adapter: Option<&Path>) -> Result<Self> {
        let pick = |name: &str| match adapter.map(|a| a.join(name)) {
            Some(p) if p.exists() => p,
            _ => dir.join(name),
        };
        let path = pick("tokenizer.json");
        if !path.exists() {
            bail!("{}: missing (the tokenizer file of the snapshot)", path.display());
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: cannot parse: {e}", path.display()))?;
        let config_path = pick("tokenizer_config.json");
        let mut bos_token = "<bos>".to_string();
        let mut eos_token = "<eos>".to_string();
        if let Some(cfg) = read_config(&config_path)? {
            match cfg.get("bos_token") {
                // Qwen declares no BOS (`"bos_token": null`): templates see an empty string.
                Some(Value::Null) => bos_token = String::new(),
                _ => {
                    if let Some(t) = special_token(&cfg, "bos_token") {
                        bos_token = t;
                    }
                }
            }
            if let Some(t) = special_token(&cfg, "eos_token") {
                eos_token = t;
            }
        }
        // The chat template as transformers finds it: `chat_template.jinja` before
        // tokenizer_config.json's field; a template in the adapter's folder (either file) before
        // any in the base's.
        let mut chat_template = None;
        let mut template_source = dir.join("tokenizer_config.json");
        for folder in adapter.into_iter().chain([dir]) {
            if let Some((template, source)) = find_template(folder)? {
                (chat_template, template_source) = (Some(template), source);
                break;
            }
        }
        let markers = ChatFormat::MARKERS
            .iter()
            .find_map(|(format, open, close)| Some((*format, inner.token_to_id(open)?, inner.token_to_id(close)?)));
        let think_ids = inner.token_to_id("<think>").zip(inner.token_to_id("</think>"));
        Ok(Self {
            bos_id: inner.token_to_id(&bos_token),
            eos_id: inner.token_to_id(&eos_token),
            format: markers.map(|m| m.0),
            start_of_turn_id: markers.map(|m| m.1),
            end_of_turn_id: markers.map(|m| m.2),
            think_ids,
            inner,
            path,
            chat_template,
            template_source,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (for Gemma:
    /// prepend `<bos>`); a rendered chat already contains `<bos>` and is encoded without it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    /// Decodes without the special tokens (a role line's name, without Llama's `<|end_header_id|>`).
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
    }

    /// Decodes one token id (for streaming output).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders a conversation with the model's own chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            anyhow!(
                "{}: field `chat_template` missing: this model has no chat template",
                self.template_source.display()
            )
        })?;
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", source).map_err(|e| anyhow!("{} does not parse: {e}", self.template_at()))?;
        let template = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        // A template that expands without bound (a loop repeating the messages) is stopped, not
        // rendered into memory for minutes.
        let mut out = Bounded { text: Vec::new(), limit: MAX_RENDERED_BYTES };
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => add_generation_prompt,
        };
        template
            .render_captured_to(ctx, &mut out)
            .map_err(|e| {
                if out.text.len() >= out.limit {
                    anyhow!(
                        "{} renders more than {} MB for the conversation {}: the template repeats without bound",
                        self.template_at(),
                        MAX_RENDERED_BYTES >> 20,
                        describe_conversation(messages)
                    )
                } else {
                    anyhow!("{}: chat template failed: {}", self.template_source.display(), e)
                }
            })
            .and_then(|_| {
                String::from_utf8(out.text).map_err(|e| anyhow!("{}: renders invalid UTF-8: {e}", self.template_at()))
            })
            .and_then(|text| {
                if text.trim().is_empty() {
                    bail!(
                        "{} renders the conversation {} as empty text: the template does not output the messages",
                        self.template_at(),
                        describe_conversation(messages)
                    );
                }
                Ok(text)
            })
    }

    /// Ids of a rendered conversation (the rendering already holds `<bos>`).
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Ids generation stops on: the turn closer (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`) and
    /// the tokenizer's EOS, plus any the model config lists.
    pub fn stop_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> =
            self.end_of_turn_id.into_iter().chain(self.eos_id).chain(config_eos.iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Base and chat must tokenize identically: the same token at every id, added (special) tokens
    /// included, which decide how `<start_of_turn>` and the like are split. Names the first id
    /// that differs and both files.
    pub fn check_same(&self, other: &ChatTokenizer) -> Result<()> {
        let (a, b) = (self.id_table(), other.id_table());
        let ids = a.keys().chain(b.keys()).copied().collect::<std::collections::BTreeSet<u32>>();
        if let Some(id) = ids.into_iter().find(|id| a.get(id) != b.get(id)) {
            bail!(
                "tokenizers differ at id {id}: {} in {}, {} in {}",
                describe_entry(a.get(&id)),
                self.path.display(),
                describe_entry(b.get(&id)),
                other.path.display()
            );
        }
        Ok(())
    }

    /// Every id's token, with its added-token options when it is an added token.
    fn id_table(&self) -> std::collections::BTreeMap<u32, (String, Option<tokenizers::AddedToken>)> {
        let mut table: std::collections::BTreeMap<u32, (String, Option<tokenizers::AddedToken>)> =
            self.inner.get_vocab(true).into_iter().map(|(token, id)| (id, (token, None))).collect();
        for (id, added) in self.inner.get_added_tokens_decoder() {
            table.insert(id, (added.content.clone(), Some(added)));
        }
        table
    }

    /// Where the chat template comes from, for messages: `tokenizer_config.json`'s field or
    /// `chat_template.jinja`.
    fn template_at(&self) -> String {
        let file = self.template_source.display();
        if self.template_source.extension().is_some_and(|e| e == "jinja") {
            file.to_string()
        } else {
            format!("{file}: field `chat_template`")
        }
    }
}

/// One id's entry for the "tokenizers differ" message.
fn describe_entry(entry: Option<&(String, Option<tokenizers::AddedToken>)>) -> String {
    match entry {
        None => "no token".into(),
        Some((token, None)) => format!("{token:?} (an ordinary vocabulary entry)"),
        Some((token, Some(t))) => {
            let mut options = Vec::new();
            for (on, name) in [
                (t.single_word, "single_word"),
                (t.lstrip, "lstrip"),
                (t.rstrip, "rstrip"),
                (t.normalized, "normalized"),
            ] {
                if on {
                    options.push(name);
                }
            }
            let options = if options.is_empty() { String::new() } else { format!(", {}", options.join(", ")) };
            format!("{token:?} (an added{} token{options})", if t.special { " special" } else { "" })
        }
    }
}

/// A conversation in a few words, for errors: its roles and the start of its first turn.
fn describe_conversation(messages: &[Message]) -> String {
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    let first = messages.first().map_or(String::new(), |m| {
        let text: String = m.content.chars().take(40).collect();
        let more = if m.content.chars().count() > 40 { "…" } else { "" };
        format!(", starting {:?}", format!("{text}{more}"))
    });
    format!("({} turns: {}{first})", messages.len(), roles.join(", "))
}

/// `tokenizer_config.json` at `path`, if there is one.
fn read_config(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map(Some).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))
}

/// The chat template of one folder and the file it comes from: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates whose
/// "default" is the chat one).
fn find_template(folder: &Path) -> Result<Option<(String, PathBuf)>> {
    let jinja = folder.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| anyhow!("{}: cannot read: {e}", jinja.display()))?;
        return Ok(Some((text, jinja)));
    }
    let config_path = folder.join("tokenizer_config.json");
    let Some(cfg) = read_config(&config_path)? else { return Ok(None) };
    let template = match cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        Some(Value::Null) | None => None,
        Some(_) => bail!("{}: field `chat_template` must be a string or a list", config_path.display()),
    };
    Ok(template.map(|t| (t, config_path)))
}

fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The most a chat template may render for one conversation (a long conversation renders to tens
/// of kilobytes).
const MAX_RENDERED_BYTES: usize = 16 << 20;

/// A writer that refuses to grow past `limit`.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.text.resize(self.limit, 0);
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
