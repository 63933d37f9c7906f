//! Reading `latents.csv` back (steering, KL conditions, the app's tables).

use std::path::Path;

use anyhow::{Result, anyhow, bail};

use crate::analyze::{CSV_HEADER, LatentRow};

pub fn read_latents_csv(path: &Path) -> Result<Vec<LatentRow>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{}: cannot read ({e}); run `crossdiff analyze` on this run first", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(CSV_HEADER) {
        bail!("{}: the header is not latents.csv's", path.display());
    }
    let class = |s: &str| -> Option<&'static str> {
        ["base_only", "shared", "chat_only", "other", "dead"].into_iter().find(|c| *c == s)
    };
    lines
        .enumerate()
        .map(|(i, line)| {
            let at = || format!("{}:{}", path.display(), i + 2);
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 15 {
                bail!("{}: {} fields, expected 15", at(), f.len());
            }
            let num = |k: usize| -> Result<f64> {
                f[k].parse().map_err(|_| anyhow!("{}: field {} is not a number", at(), k + 1))
            };
            let opt = |k: usize| -> Result<Option<f64>> { if f[k].is_empty() { Ok(None) } else { num(k).map(Some) } };
            Ok(LatentRow {
                latent: f[0].parse().map_err(|_| anyhow!("{}: bad latent index", at()))?,
                delta_norm: num(1)?,
                dec_norm_base: num(2)?,
                dec_norm_chat: num(3)?,
                dec_cos: num(4)?,
                class: class(f[5]).ok_or_else(|| anyhow!("{}: unknown class {:?}", at(), f[5]))?,
                freq: num(6)?,
                max_act: num(7)?,
                nu_error: opt(8)?,
                nu_reconstruction: opt(9)?,
                beta_error_base: opt(10)?,
                beta_error_chat: opt(11)?,
                beta_recon_base: opt(12)?,
                beta_recon_chat: opt(13)?,
                template_share: opt(14)?,
            })
        })
        .collect()
}
