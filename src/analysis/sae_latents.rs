//! `crossdiff analyze` on an SAE run: per-latent frequency, largest code, decoder norm, the share
//! of activations on chat-template tokens, and the authors' chat-specificity measure for SAE
//! latents — the Latent Scaling ratio of activations (their `beta_activation_ratio`): with d_j the
//! latent's decoder direction and f_j its code on the SAE's input,
//! β_j^m = Σ_i f_ij (d_j · h_i^m) / (‖d_j‖² Σ_i f_ij²) for the raw base (m = base) and chat
//! activations, and ν_j = β_j^base / β_j^chat. Near 0: the direction is in the chat activations with
//! the latent's strength but not in the base ones. The authors rank latents by |ν| and count those
//! with |ν| ≤ 0.1, 0.3, 0.6. Written as `sae-latents.csv` and `sae-summary.json`.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::activations::batches::{CacheBatch, for_each_batch};
use crate::activations::cache::CacheIndex;
use crate::analysis::batch_sums::BatchRow;
use crate::crosscoder::{Crosscoder, SaeTarget, read_vec, tensor};
use crate::run_dir::RunDir;

/// The |ν| thresholds the authors count SAE latents below.
pub const RATIO_THRESHOLDS: [f64; 3] = [0.1, 0.3, 0.6];

/// One row of `sae-latents.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaeLatentRow {
    pub latent: usize,
    /// Share of tokens on which the latent is active, and its largest code.
    pub freq: f64,
    pub max_act: f64,
    pub dec_norm: f64,
    /// β of the raw base and chat activations onto the latent's contribution, and their ratio ν
    /// (empty for a latent never active).
    pub beta_base: Option<f64>,
    pub beta_chat: Option<f64>,
    pub beta_ratio: Option<f64>,
    /// Share of its activations on chat-template tokens (empty when never active).
    pub template_share: Option<f64>,
}

/// `sae-summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaeSummary {
    pub target: SaeTarget,
    pub tokens: u64,
    /// FVE of the SAE's input, L0 and the fraction of latents never active.
    pub fve: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    /// Latents with |ν| at most each of [`RATIO_THRESHOLDS`], as (threshold, count).
    pub ratio_below: Vec<(f64, usize)>,
    /// The 20 alive latents with the smallest |ν| (most chat-specific first).
    pub most_chat_specific: Vec<usize>,
    /// The SAE file analysed (a later training step makes this analysis stale).
    pub sae_checksum: Option<u64>,
}

/// Sums over the tokens, f64 on the host.
struct Sums {
    tokens: u64,
    active: Vec<f64>,
    template_active: Vec<f64>,
    max_act: Vec<f64>,
    sum_f2: Vec<f64>,
    proj: [Vec<f64>; 2],
    l0: f64,
    x_sum: Vec<f64>,
    x_sq: Vec<f64>,
    e_sum: Vec<f64>,
    e_sq: Vec<f64>,
}

/// Streams up to `tokens` of the cache (all by default) through the SAE `cc` in batches of `batch`.
pub fn analyze_sae(
    cc: &Crosscoder,
    cache: &Path,
    device: &Device,
    tokens: Option<u64>,
    batch: usize,
    mut progress: impl FnMut(u64, u64),
    keep_going: impl Fn() -> bool,
) -> Result<(Vec<SaeLatentRow>, SaeSummary)> {
    let target = cc.config.target.ok_or_else(|| anyhow!("the SAE's config.json records no `target`"))?;
    let index = CacheIndex::open(cache)?;
    let (d, dict) = (cc.config.d, cc.config.dict_size);
    if index.d_model != d {
        bail!("{}: the cache has width {}, the SAE {d}", cache.display(), index.d_model);
    }
    let total = tokens.unwrap_or(index.total_tokens).min(index.total_tokens);
    let zeros = || vec![0.0f64; dict];
    let mut s = Sums {
        tokens: 0,
        active: zeros(),
        template_active: zeros(),
        max_act: zeros(),
        sum_f2: zeros(),
        proj: [zeros(), zeros()],
        l0: 0.0,
        x_sum: vec![0.0; d],
        x_sq: vec![0.0; d],
        e_sum: vec![0.0; d],
        e_sq: vec![0.0; d],
    };
    let w_dec_t = cc.params.w_dec.clone().transpose(); // [d, D]
    for_each_batch(cache, &index, total, batch, |&CacheBatch { rows, template, .. }| {
        if !keep_going() {
            bail!("the SAE analysis was cancelled after {} tokens; nothing was written", s.tokens);
        }
        let b = template.len();
        accumulate(cc, target, &mut s, rows, template, b, d, &w_dec_t, device)?;
        progress(s.tokens, total);
        Ok(())
    })?;
    finish(cc, target, s)
}

#[allow(clippy::too_many_arguments)]
fn accumulate(
    cc: &Crosscoder,
    target: SaeTarget,
    s: &mut Sums,
    pairs: &[f32],
    template: &[bool],
    b: usize,
    d: usize,
    w_dec_t: &Tensor<2>,
    device: &Device,
) -> Result<()> {
    let pair = tensor(pairs.to_vec(), [b, 2 * d], device);
    let x = tensor(target.rows(pairs, d), [b, d], device);
    let f = cc.codes(x.clone());
    let err = x.clone() - (f.clone().matmul(cc.params.w_dec.clone()) + cc.params.b_dec.clone());
    let active = f.clone().greater_elem(0.0).float();
    let t = tensor(template.iter().map(|&v| f32::from(u8::from(v))).collect(), [1, b], device);
    // Every reduction of the batch in one row, read back once.
    let mut parts =
        vec![active.clone().sum_dim(0), t.matmul(active.clone()), f.clone().max_dim(0), f.clone().square().sum_dim(0)];
    for m in 0..2 {
        let h = pair.clone().narrow(1, m * d, d);
        parts.push((f.clone() * h.matmul(w_dec_t.clone())).sum_dim(0));
    }
    parts.push(active.sum().reshape([1, 1]));
    parts.extend([x.clone().sum_dim(0), x.square().sum_dim(0), err.clone().sum_dim(0), err.square().sum_dim(0)]);
    let mut row = BatchRow::read(parts)?;
    row.add_into(&mut s.active);
    row.add_into(&mut s.template_active);
    row.max_into(&mut s.max_act);
    row.add_into(&mut s.sum_f2);
    for m in 0..2 {
        row.add_into(&mut s.proj[m]);
    }
    s.l0 += row.scalar();
    for v in [&mut s.x_sum, &mut s.x_sq, &mut s.e_sum, &mut s.e_sq] {
        row.add_into(v);
    }
    s.tokens += b as u64;
    Ok(())
}

fn finish(cc: &Crosscoder, target: SaeTarget, s: Sums) -> Result<(Vec<SaeLatentRow>, SaeSummary)> {
    if s.tokens == 0 {
        bail!("the cache gave no tokens to analyse");
    }
    let n = s.tokens as f64;
    let w_dec = read_vec(cc.params.w_dec.clone())?;
    let d = cc.config.d;
    let rows: Vec<SaeLatentRow> = (0..cc.config.dict_size)
        .map(|j| {
            let norm2: f64 = w_dec[j * d..(j + 1) * d].iter().map(|v| (*v as f64).powi(2)).sum();
            let alive = s.active[j] > 0.0 && s.sum_f2[j] > 0.0;
            let beta = |m: usize| alive.then(|| s.proj[m][j] / (norm2.max(1e-30) * s.sum_f2[j]));
            let (beta_base, beta_chat) = (beta(0), beta(1));
            SaeLatentRow {
                latent: j,
                freq: s.active[j] / n,
                max_act: s.max_act[j],
                dec_norm: norm2.sqrt(),
                beta_base,
                beta_chat,
                beta_ratio: beta_base.zip(beta_chat).map(|(b, c)| b / c).filter(|v| v.is_finite()),
                template_share: alive.then(|| s.template_active[j] / s.active[j]),
            }
        })
        .collect();
    let var = |sum: &[f64], sq: &[f64]| -> f64 { sum.iter().zip(sq).map(|(a, q)| q / n - (a / n).powi(2)).sum() };
    let fve = 1.0 - var(&s.e_sum, &s.e_sq) / var(&s.x_sum, &s.x_sq).max(1e-30);
    let mut ranked: Vec<&SaeLatentRow> = rows.iter().filter(|r| r.beta_ratio.is_some()).collect();
    ranked.sort_by(|a, b| {
        let key = |r: &SaeLatentRow| r.beta_ratio.map_or(f64::INFINITY, f64::abs);
        key(a).total_cmp(&key(b)).then(a.latent.cmp(&b.latent))
    });
    let summary = SaeSummary {
        target,
        tokens: s.tokens,
        fve,
        l0: s.l0 / n,
        dead_fraction: rows.iter().filter(|r| r.freq == 0.0).count() as f64 / rows.len() as f64,
        ratio_below: RATIO_THRESHOLDS
            .iter()
            .map(|&t| (t, ranked.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= t)).count()))
            .collect(),
        most_chat_specific: ranked.iter().take(20).map(|r| r.latent).collect(),
        sae_checksum: cc.file_checksum,
    };
    Ok((rows, summary))
}

/// Latents whose tokens `sae-tokens.json` lists: those with |ν| ≤ 0.3, the smallest |ν| first, at
/// most this many (each reads the whole vocabulary twice).
pub const TOKEN_LATENTS: usize = 200;

/// One latent's direction (signed as chat − base) through each model's final norm and unembedding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatentTokens {
    pub latent: usize,
    pub beta_ratio: Option<f64>,
    pub base: crate::analysis::adl::Lens,
    pub chat: crate::analysis::adl::Lens,
}

/// The promoted and suppressed tokens (10 each) of the most chat-specific latents' directions,
/// read as the lens reads a mean difference: `s·d_j` (s = −1 for a base − chat SAE, so the
/// direction is what the fine-tune adds) through `models` (base, chat).
pub fn latent_tokens(
    cc: &Crosscoder,
    rows: &[SaeLatentRow],
    models: &[crate::model::Model; 2],
) -> Result<Vec<LatentTokens>> {
    let sign = if cc.config.target == Some(SaeTarget::BaseMinusChat) { -1.0 } else { 1.0 };
    let mut picked: Vec<&SaeLatentRow> = rows.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= 0.3)).collect();
    picked.sort_by(|a, b| {
        let key = |r: &SaeLatentRow| r.beta_ratio.map_or(f64::INFINITY, f64::abs);
        key(a).total_cmp(&key(b)).then(a.latent.cmp(&b.latent))
    });
    picked.truncate(TOKEN_LATENTS);
    let w_dec = read_vec(cc.params.w_dec.clone())?;
    let d = cc.config.d;
    let dirs: Vec<Vec<f32>> =
        picked.iter().map(|r| w_dec[r.latent * d..(r.latent + 1) * d].iter().map(|v| v * sign).collect()).collect();
    let [base, chat] = [&models[0], &models[1]].map(|m| crate::analysis::adl::logit_lens(m, &dirs, 10));
    Ok(picked
        .iter()
        .zip(base?.into_iter().zip(chat?))
        .map(|(r, (base, chat))| LatentTokens { latent: r.latent, beta_ratio: r.beta_ratio, base, chat })
        .collect())
}

impl RunDir {
    pub const SAE_TOKENS: &'static str = "sae-tokens.json";
    pub const SAE_LATENTS: &'static str = "sae-latents.csv";
    pub const SAE_SUMMARY: &'static str = "sae-summary.json";

    /// Writes `sae-latents.csv` and `sae-summary.json` (each atomically).
    pub fn write_sae_latents(&self, rows: &[SaeLatentRow], summary: &SaeSummary) -> Result<()> {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in rows {
            w.serialize(r)?;
        }
        let bytes = w.into_inner().map_err(|e| anyhow!("{e}"))?;
        crate::io::write_atomic(&self.file(Self::SAE_LATENTS), |f| Ok(std::io::Write::write_all(f, &bytes)?))?;
        self.write_json(Self::SAE_SUMMARY, summary)
    }

    /// `sae-latents.csv`, typed; errors name the file.
    pub fn read_sae_latents(&self) -> Result<Vec<SaeLatentRow>> {
        let path = self.file(Self::SAE_LATENTS);
        let mut r = csv::Reader::from_path(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        r.deserialize().map(|row| row.map_err(|e| anyhow!("{}: {e}", path.display()))).collect()
    }
}
