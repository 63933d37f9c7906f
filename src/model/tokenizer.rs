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
    pub start_of_turn_id: Option<u32>,
    pub end_of_turn_id: Option<u32>,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (or `chat_template.jinja`,
    /// where newer transformers versions save the template) from a snapshot directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!("{}: missing (the tokenizer file of the snapshot)", path.display());
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: cannot parse: {e}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let mut chat_template = None;
        let mut template_source = config_path.clone();
        let mut bos_token = "<bos>".to_string();
        let mut eos_token = "<eos>".to_string();
        if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| anyhow!("{}: cannot read: {e}", config_path.display()))?;
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", config_path.display()))?;
            chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Hub files may list several named templates; "default" is the chat one.
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
            if let Some(t) = special_token(&cfg, "bos_token") {
                bos_token = t;
            }
            if let Some(t) = special_token(&cfg, "eos_token") {
                eos_token = t;
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| anyhow!("{}: cannot read: {e}", jinja.display()))?);
            template_source = jinja;
        }
        Ok(Self {
            bos_id: inner.token_to_id(&bos_token),
            eos_id: inner.token_to_id(&eos_token),
            start_of_turn_id: inner.token_to_id("<start_of_turn>"),
            end_of_turn_id: inner.token_to_id("<end_of_turn>"),
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
        env.add_template("chat", source)
            .map_err(|e| anyhow!("{}: field `chat_template` does not parse: {e}", self.template_source.display()))?;
        let template = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        template
            .render(minijinja::context! {
                messages => messages,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(|e| anyhow!("{}: chat template failed: {}", self.template_source.display(), e))
    }

    /// Ids of a rendered conversation (the rendering already holds `<bos>`).
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// Ids generation stops on: `<end_of_turn>` and `<eos>`, plus any the model config lists.
    pub fn stop_ids(&self, config_eos: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> =
            self.end_of_turn_id.into_iter().chain(self.eos_id).chain(config_eos.iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Base and chat must tokenize identically: same vocabulary, same ids.
    pub fn check_same(&self, other: &ChatTokenizer) -> Result<()> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            bail!(
                "tokenizers differ: {} has {} tokens, {} has {}",
                self.path.display(),
                a.len(),
                other.path.display(),
                b.len()
            );
        }
        let mut diffs: Vec<_> = a.iter().filter(|(tok, id)| b.get(*tok) != Some(id)).map(|(t, _)| t.clone()).collect();
        diffs.sort();
        if let Some(tok) = diffs.first() {
            bail!(
                "tokenizers differ: token {tok:?} has id {:?} in {} and {:?} in {}",
                a.get(tok),
                self.path.display(),
                b.get(tok),
                other.path.display()
            );
        }
        Ok(())
    }
}

fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
