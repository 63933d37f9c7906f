//! Text generation with the KV cache: greedy or temperature/top-p sampling, stopping on
//! `<end_of_turn>` / `<eos>`.

use anyhow::Result;

use crate::model::decoder::{DecoderLm, ResidualEdit};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 means greedy (argmax, first index on ties, like torch.argmax).
    pub temperature: f32,
    /// Nucleus sampling mass; 1.0 keeps every token.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// Settings a sampler can use, or an error naming the flag.
    pub fn validate(&self) -> Result<()> {
        use crate::bad_value::{ensure, finite_non_negative};
        finite_non_negative(self.temperature as f64, "temperature")?;
        ensure(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0, "top-p", || {
            format!("must be in (0, 1], not {}", self.top_p)
        })
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id as soon as it
/// is chosen (return `false` to stop early). Returns the new ids, including a final stop id.
pub fn generate(
    model: &DecoderLm,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    generate_edited(model, prompt, max_tokens, sampling, stop_ids, None, on_token)
}

/// [`generate`] with a residual edit applied at every position (prompt and generated).
pub fn generate_edited(
    model: &DecoderLm,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop_ids: &[u32],
    edit: Option<&ResidualEdit>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    crate::bad_value::positive(max_tokens as u64, "max-tokens")?;
    if let Some(max) = model.config.max_position_embeddings {
        crate::bad_value::ensure(prompt.len().saturating_add(max_tokens) <= max, "max-tokens", || {
            format!(
                "{max_tokens}: the prompt ({} tokens) and the new tokens exceed the model's context of {max} positions \
                 (`max_position_embeddings`); at most {}",
                prompt.len(),
                max.saturating_sub(prompt.len())
            )
        })?;
    }
    let mut rng = SplitMix64(sampling.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut next_input = prompt.to_vec();
    for _ in 0..max_tokens {
        let ids = model.batch_ids(std::slice::from_ref(&next_input))?;
        let logits = crate::counters::read_f32(model.step_edited(ids, &mut cache, edit))?;
        if logits.iter().any(|v| v.is_nan()) {
            anyhow::bail!(
                "the model produced NaN logits at new token {}: its weights or config.json are broken{}",
                out.len(),
                if edit.is_some() { " (or the steering strength is too large)" } else { "" }
            );
        }
        let id = choose(&logits, sampling, &mut rng);
        out.push(id);
        let keep_going = on_token(id);
        if stop_ids.contains(&id) || !keep_going {
            break;
        }
        next_input = vec![id];
    }
    Ok(out)
}

/// Picks the next token from one row of logits.
pub fn choose(logits: &[f32], sampling: Sampling, rng: &mut SplitMix64) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - max) / sampling.temperature) as f64).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= sampling.top_p as f64 {
            break;
        }
    }
    let probs = &probs[..kept];
    let mut r = rng.next_f64() * mass;
    for p in probs {
        r -= p.1;
        if r <= 0.0 {
            return p.0 as u32;
        }
    }
    probs[kept - 1].0 as u32
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
