//! BatchTopK's sparse decoder, its backward and Adam as plain loops over host memory: the CPU
//! (flex) path, where tensors already live in RAM and burn's generic gather/scatter and unfused
//! element-wise ops cost more than the arithmetic. The autodiff route in `train.rs` (decoder rows
//! through `select`/`select_assign`) is the reference this is tested against.
//!
//! Gradients of the loss of method.md §2.2 for the picked entries (token t, latent l, code v):
//! ĥ_t = b_dec + Σ_p v_p W_l; g_t = ∂L/∂ĥ_t; ∂L/∂W_l += v_p g_t; ∂L/∂v_p = W_l · g_t; the encoder
//! gradient follows from ∂L/∂v_p (ReLU' = 1 on picked entries): ∂L/∂W_enc[:, l] += ∂L/∂v_p x_t.

/// Picked (token, latent, code) entries.
pub struct HostPicks {
    pub tokens: Vec<u32>,
    pub latents: Vec<u32>,
    pub values: Vec<f32>,
}

impl HostPicks {
    pub fn from_mask(f: &[f32], mask: &[f32], dict: usize) -> Self {
        let (mut tokens, mut latents, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &m) in mask.iter().enumerate() {
            if m > 0.0 {
                tokens.push((i / dict) as u32);
                latents.push((i % dict) as u32);
                values.push(f[i]);
            }
        }
        Self { tokens, latents, values }
    }
}

/// `out[t] += Σ_{p: token t} v_p W[l_p]` (rows of width `w`).
pub fn decode_into(out: &mut [f32], picks: &HostPicks, w_dec: &[f32], w: usize) {
    for ((&t, &l), &v) in picks.tokens.iter().zip(&picks.latents).zip(&picks.values) {
        let row = &w_dec[l as usize * w..(l as usize + 1) * w];
        let dst = &mut out[t as usize * w..(t as usize + 1) * w];
        dst.iter_mut().zip(row).for_each(|(o, r)| *o += v * r);
    }
}

/// Accumulates `∂L/∂W_dec` and returns `∂L/∂v_p` for the picks, given `g = ∂L/∂ĥ` (`[B, w]`).
pub fn decode_backward(picks: &HostPicks, w_dec: &[f32], g: &[f32], w: usize, grad_w_dec: &mut [f32]) -> Vec<f32> {
    let mut grad_v = Vec::with_capacity(picks.values.len());
    for ((&t, &l), &v) in picks.tokens.iter().zip(&picks.latents).zip(&picks.values) {
        let (l, t) = (l as usize, t as usize);
        let gt = &g[t * w..(t + 1) * w];
        let row = &w_dec[l * w..(l + 1) * w];
        grad_v.push(row.iter().zip(gt).map(|(a, b)| a * b).sum());
        grad_w_dec[l * w..(l + 1) * w].iter_mut().zip(gt).for_each(|(o, gv)| *o += v * gv);
    }
    grad_v
}

/// One Adam step with bias correction, over flat slices, fused (one pass instead of a dozen).
#[allow(clippy::too_many_arguments)]
pub fn adam(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], lr: f64, step: u64, grad_scale: f32) {
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let c1 = 1.0 - 0.9f64.powi(step as i32);
    let c2 = 1.0 - 0.999f64.powi(step as i32);
    let (lr_c, c2) = ((lr / c1) as f32, c2 as f32);
    for i in 0..p.len() {
        let gi = g[i] * grad_scale;
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p[i] -= lr_c * m[i] / ((v[i] / c2).sqrt() + eps);
    }
}
