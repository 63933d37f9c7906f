//! Prompt lab: one text through both models and the crosscoder — per-token activations of chosen
//! latents and the top latents at each token, each model's next-token distribution and
//! KL(P_chat ‖ P_base) per position.

use anyhow::{Result, bail};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use crate::crosscoder::{Crosscoder, read_vec};
use crate::model::Model;

#[derive(Debug, Clone)]
pub struct PromptAnalysis {
    pub ids: Vec<u32>,
    /// Top latents at each token by norm-scaled activation: `[(latent, activation)]`.
    pub top_latents: Vec<Vec<(usize, f32)>>,
    /// Norm-scaled activation of each chosen latent at each token: `[chosen][token]`.
    pub chosen: Vec<Vec<f32>>,
    /// KL(P_chat ‖ P_base) of the next-token distributions at each position.
    pub kl: Vec<f64>,
    /// Most likely next tokens `(id, probability)` for base and chat at each position.
    pub next: Vec<[Vec<(u32, f32)>; 2]>,
}

pub fn analyze_prompt(
    base: &Model,
    chat: &Model,
    cc: &Crosscoder,
    layer: usize,
    ids: &[u32],
    chosen: &[usize],
    top: usize,
) -> Result<PromptAnalysis> {
    crate::model::check_models(base, chat)?;
    let (d, dict) = cc.params.dims();
    if let Some(&j) = chosen.iter().find(|&&j| j >= dict) {
        bail!("latent {j} is out of range: the crosscoder has {dict} latents");
    }
    let t = ids.len();
    let input = || base.lm.batch_ids(&[ids.to_vec()]);
    let h_base = base.lm.forward_to(input()?, layer).reshape([t, d]);
    let h_chat = chat.lm.forward_to(input()?, layer).reshape([t, d]);
    let acts = read_vec(cc.codes(Tensor::cat(vec![h_base, h_chat], 1)) * cc.params.norm_sum())?;
    let top_latents = acts
        .chunks_exact(dict)
        .map(|row| {
            let mut v: Vec<(usize, f32)> = row.iter().copied().enumerate().filter(|(_, a)| *a > 0.0).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(top);
            v
        })
        .collect();
    let chosen_acts = chosen.iter().map(|&j| (0..t).map(|i| acts[i * dict + j]).collect()).collect();
    let v = base.lm.config.vocab_size;
    let logp = |m: &Model| -> Result<Vec<f32>> { read_vec(log_softmax(m.lm.forward(input()?).reshape([t, v]), 1)) };
    let (lb, lc) = (logp(base)?, logp(chat)?);
    let mut kl = Vec::with_capacity(t);
    let mut next = Vec::with_capacity(t);
    for i in 0..t {
        let (rb, rc) = (&lb[i * v..(i + 1) * v], &lc[i * v..(i + 1) * v]);
        kl.push(rc.iter().zip(rb).map(|(c, b)| (*c as f64).exp() * (*c as f64 - *b as f64)).sum());
        let best = |r: &[f32]| -> Vec<(u32, f32)> {
            let mut v: Vec<(u32, f32)> = r.iter().enumerate().map(|(i, l)| (i as u32, l.exp())).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(top);
            v
        };
        next.push([best(rb), best(rc)]);
    }
    Ok(PromptAnalysis { ids: ids.to_vec(), top_latents, chosen: chosen_acts, kl, next })
}
