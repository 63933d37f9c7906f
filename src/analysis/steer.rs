//! `crossdiff steer`: generation with a latent's chat decoder direction added to the residual
//! stream at the crosscoder's layer, beside the unsteered completion.

use anyhow::{Result, bail};

use crate::crosscoder::{Crosscoder, read_vec, tensor};
use crate::model::Model;
use crate::model::decoder::ResidualEdit;
use crate::model::generate::{Sampling, generate_edited};

/// `strength × (max f_j) × d_j^chat`, with max f_j = max norm-scaled activation / (‖d_j^0‖ + ‖d_j^1‖):
/// strength 1 adds the latent at its strongest observed activation.
pub fn steering_edit(
    cc: &Crosscoder,
    latent: usize,
    strength: f64,
    max_act: f64,
    layer: usize,
) -> Result<ResidualEdit> {
    let (d, dict) = cc.params.dims();
    if latent >= dict {
        bail!("--latent {latent} is out of range: the crosscoder has {dict} latents");
    }
    let row = read_vec(cc.params.w_dec.clone().narrow(0, latent, 1))?;
    let (base, chat) = row.split_at(d);
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let norm_sum = n(base) + n(chat);
    let scale = if norm_sum > 0.0 { strength * max_act / norm_sum } else { 0.0 };
    let add: Vec<f32> = chat.iter().map(|x| (*x as f64 * scale) as f32).collect();
    Ok(ResidualEdit { layer, add: tensor(add, [1, d], &cc.params.w_dec.device()) })
}

/// Several latents at once: the sum of their steering vectors (`(latent, strength, max_act)`).
pub fn combined_edit(cc: &Crosscoder, latents: &[(usize, f64, f64)], layer: usize) -> Result<ResidualEdit> {
    let (d, _) = cc.params.dims();
    let mut add = tensor(vec![0.0; d], [1, d], &cc.params.w_dec.device());
    for &(j, strength, max_act) in latents {
        add = add + steering_edit(cc, j, strength, max_act, layer)?.add;
    }
    Ok(ResidualEdit { layer, add })
}

/// Greedy completions without and with the edit.
pub fn steer(model: &Model, prompt: &[u32], edit: &ResidualEdit, max_tokens: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    steer_until(model, prompt, edit, max_tokens, &|| true)
}

/// [`steer`], stopping each completion early once `keep_going` says no (Cancel, Ctrl-C).
pub fn steer_until(
    model: &Model,
    prompt: &[u32],
    edit: &ResidualEdit,
    max_tokens: usize,
    keep_going: &dyn Fn() -> bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let stop = model.stop_ids();
    let run = |edit| generate_edited(&model.lm, prompt, max_tokens, Sampling::default(), &stop, edit, |_| keep_going());
    Ok((run(None)?, run(Some(edit))?))
}
