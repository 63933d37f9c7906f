//! The decoder-LM families crossdiff runs, and what sets each apart. One core computes them all
//! ([`crate::model::decoder`]); a family only decides which parts a block has and how a few numbers
//! are derived, each matching transformers' `modeling_<family>.py`.

use serde::{Deserialize, Serialize};

/// A model family, read from `model_type` in config.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Gemma 2 (`gemma2`): sandwich norms storing `w − 1`, GELU-tanh, scaled embedding, soft-caps.
    #[default]
    Gemma2,
    /// Gemma 3 text (`gemma3_text`): Gemma 2's block plus q/k norms and a local RoPE base on the
    /// sliding layers.
    Gemma3,
    /// Llama 3.x (`llama`): pre-norms, SwiGLU, optional `llama3` RoPE scaling, untied unembedding.
    Llama,
    /// Qwen 2 / 2.5 (`qwen2`): Llama's block with q/k/v biases.
    Qwen2,
    /// Qwen 3 (`qwen3`): Llama's block with q/k norms.
    Qwen3,
}

/// The `model_type` values crossdiff reads, each with its family.
pub const SUPPORTED: [(&str, Family); 5] = [
    ("gemma2", Family::Gemma2),
    ("gemma3_text", Family::Gemma3),
    ("llama", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
];

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        SUPPORTED.iter().find(|(name, _)| *name == model_type).map(|(_, f)| *f)
    }

    /// The supported `model_type` values, for the "unknown model_type" message.
    pub fn supported_list() -> String {
        SUPPORTED.iter().map(|(name, _)| format!("\"{name}\"")).collect::<Vec<_>>().join(", ")
    }

    /// A name for people (the Models view, `inspect`'s summary).
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Gemma2 => "Gemma 2",
            Self::Gemma3 => "Gemma 3",
            Self::Llama => "Llama 3",
            Self::Qwen2 => "Qwen 2",
            Self::Qwen3 => "Qwen 3",
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// Gemma's norms store the offset from one (`x · (1 + w)`); the others store the scale.
    pub fn norm_stores_offset(self) -> bool {
        self.is_gemma()
    }

    /// Gemma normalises each sublayer's output too (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`); in Llama and Qwen `post_attention_layernorm` is the MLP's
    /// input norm.
    pub fn sandwich_norms(self) -> bool {
        self.is_gemma()
    }

    /// Gemma multiplies the embedding by sqrt(hidden) (rounded to the weight dtype).
    pub fn scales_embedding(self) -> bool {
        self.is_gemma()
    }

    /// RMS norms over each head's queries and keys before RoPE (`q_norm`, `k_norm`).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Qwen3)
    }

    /// Qwen 2 always has q/k/v biases (and no `o_proj` bias), whatever `attention_bias` says.
    pub fn always_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    /// The MLP's activation when config.json names none.
    pub fn default_activation(self) -> &'static str {
        if self.is_gemma() { "gelu_pytorch_tanh" } else { "silu" }
    }

    /// The activations this family's MLP is computed with.
    pub fn accepts_activation(self, act: &str) -> bool {
        if self.is_gemma() { matches!(act, "gelu_pytorch_tanh" | "gelu_tanh") } else { act == "silu" }
    }

    /// Whether the unembedding is the embedding when `tie_word_embeddings` is absent (transformers'
    /// defaults).
    pub fn default_tied(self) -> bool {
        self.is_gemma()
    }

    /// `head_dim` when config.json omits it (transformers' defaults; `None`: hidden / heads).
    pub fn default_head_dim(self) -> Option<usize> {
        match self {
            Self::Gemma2 | Self::Gemma3 => Some(256),
            Self::Qwen3 => Some(128),
            Self::Llama | Self::Qwen2 => None,
        }
    }

    /// `num_key_value_heads` when config.json omits it (`null`: writes null), as transformers'
    /// config classes fill it in: Llama uses `num_attention_heads`; Qwen's classes default to 32
    /// (null: `num_attention_heads`), Gemma's to 4 (null is refused).
    pub fn default_kv_heads(self, heads: usize, null: bool) -> Option<usize> {
        match self {
            Self::Llama => Some(heads),
            Self::Qwen2 | Self::Qwen3 => Some(if null { heads } else { 32 }),
            Self::Gemma2 | Self::Gemma3 => (!null).then_some(4),
        }
    }

    /// The RoPE base when config.json names none (Gemma 3: the global layers'; its sliding layers
    /// default to 10,000).
    pub fn default_rope_theta(self) -> f64 {
        if self == Self::Gemma3 { 1_000_000.0 } else { 10_000.0 }
    }

    /// Leading tokens of each cached sequence left out by default, as the authors do: their paper's
    /// code (sparsity-artifacts-crosscoders, tools/configs.py `ignore_first_n_tokens_per_sample`)
    /// drops 25 for Llama 3 (BOS and the system header with its dates) and 21 for Qwen 2.5 (the
    /// default system turn), 0 for Gemma 2; their later toolkit (diffing-toolkit, configs/model/)
    /// skips 1 for Gemma 3 and 2 for Qwen 3. `--skip-first` overrides.
    pub fn default_skip_first(self) -> usize {
        match self {
            Self::Gemma2 => 0,
            Self::Gemma3 => 1,
            Self::Llama => 25,
            Self::Qwen2 => 21,
            Self::Qwen3 => 2,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.display_name())
    }
}
