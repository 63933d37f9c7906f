//! The activation-difference lens (ADL; Minder et al., arXiv 2510.13900, as the authors'
//! diffing-toolkit computes it): the mean of chat − base at the output of block L for each token
//! position over plain text, read through each model's final norm and unembedding (a logit lens),
//! and greedy generation of the chat model with one position's mean difference added at block L.
//!
//! Position 0 is `<bos>` and is kept, as the authors keep it. Sums are accumulated in f64 on the
//! host. The typical activation norm (the unit of steering strengths) is the mean ‖h_chat‖ over
//! positions ≥ [`NORM_SKIP`] (the authors skip the first five tokens to avoid BOS effects).

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::counters::read_f32;
use crate::crosscoder::tensor;
use crate::model::Model;
use crate::model::decoder::{DecoderLm, ResidualEdit};
use crate::model::generate::{Sampling, generate_edited};

/// Positions before this one do not count towards the typical activation norm.
pub const NORM_SKIP: usize = 5;

/// Running sums of chat − base per position, and of the chat model's activation norms.
pub struct DiffSums {
    d: usize,
    positions: usize,
    /// `[positions × d]`.
    sum: Vec<f64>,
    counts: Vec<u64>,
    /// (Σ‖h_chat‖, count) over positions ≥ [`NORM_SKIP`], and over all positions.
    norm_late: (f64, u64),
    norm_all: (f64, u64),
    pub documents: usize,
}

/// The finished means.
#[derive(Debug, Clone)]
pub struct MeanDiff {
    /// Row p: the mean of chat − base at position p, for every position some document reached
    /// (a prefix of 0..positions).
    pub means: Vec<Vec<f32>>,
    /// Documents that reached each position.
    pub counts: Vec<u64>,
    /// Mean ‖h_chat‖ over positions ≥ [`NORM_SKIP`] (over all positions when no document is longer).
    pub mean_chat_norm: f64,
    pub documents: usize,
}

impl DiffSums {
    pub fn new(d: usize, positions: usize) -> Self {
        Self {
            d,
            positions,
            sum: vec![0.0; positions * d],
            counts: vec![0; positions],
            norm_late: (0.0, 0),
            norm_all: (0.0, 0),
            documents: 0,
        }
    }

    /// Runs both models to block `layer` on `docs` (right-padded into one batch: with the causal
    /// mask no real token sees a pad) and adds each document's first `positions` differences.
    pub fn add(&mut self, base: &DecoderLm, chat: &DecoderLm, layer: usize, docs: &[Vec<u32>]) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let ids = base.batch_ids(docs)?;
        let h_base = base.forward_to(ids.clone(), layer);
        let h_chat = chat.forward_to(ids, layer);
        let [_, t, d] = h_chat.dims();
        if d != self.d {
            bail!("the models have width {d}, the lens was set up for {}", self.d);
        }
        let norms = read_f32(h_chat.clone().square().sum_dim(2).sqrt())?;
        let diff = read_f32(h_chat - h_base)?;
        for (i, doc) in docs.iter().enumerate() {
            for p in 0..doc.len().min(self.positions) {
                let row = &diff[(i * t + p) * d..(i * t + p + 1) * d];
                let norm = norms[i * t + p] as f64;
                if !norm.is_finite() || row.iter().any(|v| !v.is_finite()) {
                    bail!(
                        "the activations at layer {layer} are not finite (document {}, position {p}): check the models' \
                         weights",
                        self.documents + i + 1
                    );
                }
                for (s, v) in self.sum[p * d..(p + 1) * d].iter_mut().zip(row) {
                    *s += *v as f64;
                }
                self.counts[p] += 1;
                self.norm_all.0 += norm;
                self.norm_all.1 += 1;
                if p >= NORM_SKIP {
                    self.norm_late.0 += norm;
                    self.norm_late.1 += 1;
                }
            }
        }
        self.documents += docs.len();
        Ok(())
    }

    pub fn finish(&self) -> MeanDiff {
        let reached = self.counts.iter().take_while(|&&c| c > 0).count();
        let means = (0..reached)
            .map(|p| {
                let n = self.counts[p] as f64;
                self.sum[p * self.d..(p + 1) * self.d].iter().map(|s| (s / n) as f32).collect()
            })
            .collect();
        let (s, n) = if self.norm_late.1 > 0 { self.norm_late } else { self.norm_all };
        MeanDiff {
            means,
            counts: self.counts[..reached].to_vec(),
            mean_chat_norm: if n > 0 { s / n as f64 } else { 0.0 },
            documents: self.documents,
        }
    }
}

/// A token and its logit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogit {
    pub token_id: u32,
    pub token: String,
    pub logit: f32,
}

/// One vector read through one model: the tokens with the largest and with the smallest logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lens {
    pub promoted: Vec<TokenLogit>,
    pub suppressed: Vec<TokenLogit>,
}

/// The indices of the `k` largest and the `k` smallest values, each in order (ties: lower index first).
pub fn top_bottom(row: &[f32], k: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let top = order[..k.min(row.len())].to_vec();
    order.sort_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
    (top, order[..k.min(row.len())].to_vec())
}

/// Each row of `rows` (vectors of the model's width) through `model`'s final norm, tied
/// unembedding and final soft-cap: its `k` promoted and `k` suppressed tokens.
pub fn logit_lens(model: &Model, rows: &[Vec<f32>], k: usize) -> Result<Vec<Lens>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let d = model.lm.config.hidden_size;
    let h = tensor(rows.concat(), [rows.len(), d], model.lm.device());
    let logits = read_f32(model.lm.logits(h))?;
    let vocab = model.lm.config.vocab_size;
    let token = |id: usize| -> Result<TokenLogit> {
        Ok(TokenLogit { token_id: id as u32, token: model.tokenizer.decode(&[id as u32])?, logit: 0.0 })
    };
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let (top, bottom) = top_bottom(row, k);
            let read = |ids: Vec<usize>| -> Result<Vec<TokenLogit>> {
                ids.into_iter().map(|i| Ok(TokenLogit { logit: row[i], ..token(i)? })).collect()
            };
            Ok(Lens { promoted: read(top)?, suppressed: read(bottom)? })
        })
        .collect()
}

/// `strength × norm × direction / ‖direction‖`, added at the output of block `layer` (every
/// position, prompt and generated). A zero direction adds nothing.
pub fn steering_edit(direction: &[f32], strength: f64, norm: f64, layer: usize, device: &Device) -> ResidualEdit {
    let len = self::norm(direction);
    let scale = if len > 0.0 { strength * norm / len } else { 0.0 };
    let add = direction.iter().map(|v| (*v as f64 * scale) as f32).collect();
    ResidualEdit { layer, add: tensor(add, [1, direction.len()], device) }
}

/// Greedy completions (token ids, a final stop id included) of each prompt with the edit of each
/// strength: `out[prompt][strength]`. `progress(done)` after each completion; `false` stops.
#[allow(clippy::too_many_arguments)]
pub fn steer_sweep(
    model: &Model,
    prompts: &[Vec<u32>],
    direction: &[f32],
    norm: f64,
    layer: usize,
    strengths: &[f64],
    max_new_tokens: usize,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let stop = model.stop_ids();
    let mut out = Vec::with_capacity(prompts.len());
    let mut done = 0;
    for prompt in prompts {
        let mut row = Vec::with_capacity(strengths.len());
        for &s in strengths {
            let edit = steering_edit(direction, s, norm, layer, model.lm.device());
            let ids =
                generate_edited(&model.lm, prompt, max_new_tokens, Sampling::default(), &stop, Some(&edit), |_| true)?;
            row.push(ids);
            done += 1;
            if !progress(done) {
                bail!("the ADL was cancelled while steering ({done} completions); nothing was written");
            }
        }
        out.push(row);
    }
    Ok(out)
}

/// A completion as text, without its stop tokens.
pub fn completion_text(model: &Model, ids: &[u32]) -> Result<String> {
    let stop = model.stop_ids();
    model.tokenizer.decode(&ids.iter().copied().filter(|i| !stop.contains(i)).collect::<Vec<_>>())
}

/// The norm of a vector.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

/// One position's mean difference, read through both models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionReading {
    pub position: usize,
    /// Documents that reached this position.
    pub count: u64,
    pub norm_of_mean_diff: f64,
    pub base: Lens,
    pub chat: Lens,
}

/// The chat model steered with one position's mean difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteeringReport {
    pub position: usize,
    pub prompts: Vec<String>,
    /// Multiples of the mean chat activation norm.
    pub strengths: Vec<f64>,
    /// `outputs[prompt][strength]`: the greedy completion, without its stop token.
    pub outputs: Vec<Vec<String>>,
}

/// `adl.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdlReport {
    pub format: String,
    pub layer: usize,
    /// Documents averaged over.
    pub samples: usize,
    /// Positions asked for (`per_position` stops earlier when no document was that long).
    pub positions: usize,
    pub data: String,
    /// The models' folders and identities, base then chat.
    pub models: Vec<String>,
    pub model_ids: Vec<String>,
    pub mean_chat_norm: f64,
    pub per_position: Vec<PositionReading>,
    pub steering: SteeringReport,
}

impl AdlReport {
    pub const FORMAT: &'static str = "crossdiff-adl/1";
}
