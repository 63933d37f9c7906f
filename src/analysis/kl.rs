//! `crossdiff kl`: the causal check of shared/spec/method.md §5. Base and chat run to block L on
//! the same conversation; the pair is encoded; the base residual is patched with the chat-minus-base
//! decoder difference of a set S of latents, `h_S = h_base + Σ_{j∈S} f_j (d_j^chat − d_j^base)`; the
//! chat model's remaining blocks run from h_S; KL(P_chat ‖ P_patched) is measured on every token that
//! predicts the assistant's reply.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

use crate::analysis::latents::{LatentClass, LatentRow};
use crate::crosscoder::{Crosscoder, read_vec, tensor};
use crate::data::{Document, open_source, template_flags};
use crate::model::Model;
use crate::run_dir::RunDir;

/// The conditions of the paper's KL table, plus the latents Latent Scaling keeps.
pub const CONDITIONS: [&str; 8] =
    ["none", "all", "chat_error_only", "best_delta_50", "worst_delta_50", "best_ls_50", "worst_ls_50", "chat_specific"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KlStat {
    pub condition: String,
    /// Mean KL over all assistant-predicting tokens, with a 95% CI half-width.
    pub mean_all: f64,
    pub ci_all: f64,
    pub tokens_all: usize,
    /// Mean over the first 9 reply tokens of each assistant turn.
    pub mean_first9: f64,
    pub ci_first9: f64,
    pub tokens_first9: usize,
    /// Latents patched.
    pub latents: usize,
}

/// Which latents each condition patches (`None` = special handling: none / chat error only).
pub fn condition_sets(rows: &[LatentRow]) -> Vec<(String, Option<Vec<usize>>)> {
    let dict = rows.len();
    let chat_only: Vec<&LatentRow> = rows.iter().filter(|r| r.class == LatentClass::ChatOnly).collect();
    let half = chat_only.len() / 2;
    let mut by_delta = chat_only.clone();
    by_delta.sort_by(|a, b| b.delta_norm.total_cmp(&a.delta_norm).then(a.latent.cmp(&b.latent)));
    // rank(ν^ε) + rank(ν^r), ascending ν = more chat-specific; a missing ν ranks last.
    let rank = |key: fn(&LatentRow) -> Option<f64>| -> Vec<usize> {
        let mut order: Vec<usize> = (0..chat_only.len()).collect();
        order.sort_by(|&a, &b| {
            let v = |i: usize| key(chat_only[i]).map_or(f64::INFINITY, f64::abs);
            v(a).total_cmp(&v(b)).then(a.cmp(&b))
        });
        let mut r = vec![0; chat_only.len()];
        for (pos, i) in order.into_iter().enumerate() {
            r[i] = pos;
        }
        r
    };
    let (re, rr) = (rank(|r| r.nu_error), rank(|r| r.nu_reconstruction));
    let mut by_ls: Vec<usize> = (0..chat_only.len()).collect();
    by_ls.sort_by_key(|&i| (re[i] + rr[i], chat_only[i].latent));
    let ids = |v: Vec<&LatentRow>| Some(v.into_iter().map(|r| r.latent).collect::<Vec<_>>());
    vec![
        ("none".into(), None),
        ("all".into(), Some((0..dict).collect())),
        ("chat_error_only".into(), None),
        ("best_delta_50".into(), ids(by_delta[..half].to_vec())),
        ("worst_delta_50".into(), ids(by_delta[by_delta.len() - half..].to_vec())),
        ("best_ls_50".into(), ids(by_ls[..half].iter().map(|&i| chat_only[i]).collect())),
        ("worst_ls_50".into(), ids(by_ls[by_ls.len() - half..].iter().map(|&i| chat_only[i]).collect())),
        // The latents Latent Scaling calls genuinely chat-specific (chat-only, ν^ε < 0.2, ν^r < 0.5).
        ("chat_specific".into(), ids(rows.iter().filter(|r| r.is_chat_specific()).collect())),
    ]
}

/// Positions that predict an assistant reply token, and whether each is among the first 9 reply
/// tokens of its turn. A reply token is a non-template token inside a `model` turn.
pub fn reply_positions(model: &Model, ids: &[u32]) -> Vec<(usize, bool)> {
    let tok = &model.tokenizer;
    let flags = template_flags(tok, ids);
    let mut out = Vec::new();
    let mut in_model_turn = false;
    let mut count = 0;
    let mut i = 0;
    while i < ids.len() {
        if Some(ids[i]) == tok.start_of_turn_id {
            // The role: template tokens up to the newline.
            let mut j = i + 1;
            let mut role = Vec::new();
            while j < ids.len() && flags[j] {
                role.push(ids[j]);
                j += 1;
            }
            in_model_turn = tok.decode(&role).map(|r| r.trim() == "model").unwrap_or(false);
            count = 0;
            i = j;
            continue;
        }
        if Some(ids[i]) == tok.end_of_turn_id {
            in_model_turn = false;
        }
        if in_model_turn && !flags[i] && i > 0 {
            out.push((i - 1, count < 9));
            count += 1;
        }
        i += 1;
    }
    out
}

/// Runs the KL table over up to `limit` conversations of a `.jsonl`/`.parquet` file with `messages`.
pub fn kl_table(
    base: &Model,
    chat: &Model,
    cc: &Crosscoder,
    rows: &[LatentRow],
    layer: usize,
    data: &Path,
    limit: usize,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<Vec<KlStat>> {
    crate::model::check_models(base, chat)?;
    let (d, dict) = cc.params.dims();
    if d != base.gemma.config.hidden_size {
        bail!("the crosscoder has width {d}, the models {}", base.gemma.config.hidden_size);
    }
    if rows.len() != dict {
        bail!("latents.csv has {} rows, the crosscoder {dict} latents", rows.len());
    }
    let sets = condition_sets(rows);
    let diff = cc.params.w_dec.clone().narrow(1, d, d) - cc.params.w_dec.clone().narrow(1, 0, d); // [D, d]
    let device = base.gemma.device().clone();
    let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); sets.len()];
    let mut seen = 0;
    // Conversations longer than the model's context are cut there (as `cache` cuts at --context).
    let max_len = chat.gemma.config.max_position_embeddings.unwrap_or(usize::MAX);
    for (n, doc) in open_source(data)?.enumerate() {
        if seen >= limit {
            break;
        }
        let Document::Chat(messages) = doc? else { continue };
        let mut ids = chat
            .tokenizer
            .encode_chat(&messages, false)
            .map_err(|e| anyhow::anyhow!("{}: conversation {}: {e:#}", data.display(), n + 1))?;
        ids.truncate(max_len);
        let positions = reply_positions(chat, &ids);
        if positions.is_empty() {
            continue;
        }
        let t = ids.len();
        let input = || base.gemma.batch_ids(std::slice::from_ref(&ids));
        let h_base = base.gemma.forward_to(input()?, layer).reshape([t, d]);
        let h_chat = chat.gemma.forward_to(input()?, layer).reshape([t, d]);
        let f = cc.codes(Tensor::cat(vec![h_base.clone(), h_chat.clone()], 1)); // [T, D]
        let chat_logp = log_softmax(
            chat.gemma
                .forward_from(layer, h_chat.clone().reshape([1, t, d]))
                .reshape([t, chat.gemma.config.vocab_size]),
            1,
        );
        let p_chat = chat_logp.clone().exp();
        for (c, (name, set)) in sets.iter().enumerate() {
            let patched = match (name.as_str(), set) {
                ("none", _) => h_base.clone(),
                ("chat_error_only", _) => h_chat.clone() - f.clone().matmul(diff.clone()),
                (_, Some(set)) => {
                    let mut mask = vec![0.0f32; dict];
                    set.iter().for_each(|&j| mask[j] = 1.0);
                    let m = tensor(mask, [1, dict], &device);
                    h_base.clone() + (f.clone() * m).matmul(diff.clone())
                }
                _ => unreachable!("every condition is covered"),
            };
            let logp = log_softmax(
                chat.gemma.forward_from(layer, patched.reshape([1, t, d])).reshape([t, chat.gemma.config.vocab_size]),
                1,
            );
            let kl = read_vec((p_chat.clone() * (chat_logp.clone() - logp)).sum_dim(1).reshape([t]))?;
            for &(pos, first) in &positions {
                per[c].0.push(kl[pos] as f64);
                if first {
                    per[c].1.push(kl[pos] as f64);
                }
            }
        }
        seen += 1;
        // `false` from the caller (Cancel, Ctrl-C) stops here; kl.json is not touched.
        if !progress(seen) {
            bail!("the KL check was cancelled after {seen} conversations; kl.json is unchanged");
        }
    }
    if seen == 0 {
        let within = if max_len < usize::MAX {
            format!(" within the model's context ({max_len} positions)")
        } else {
            String::new()
        };
        return Err(anyhow!("{}: no conversation with an assistant reply{within}", data.display()));
    }
    let stat = |v: &[f64]| -> (f64, f64) {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        (mean, 1.96 * (var / n).sqrt())
    };
    Ok(sets
        .iter()
        .zip(&per)
        .map(|((name, set), (all, first))| {
            let ((ma, ca), (mf, cf)) = (stat(all), stat(first));
            KlStat {
                condition: name.clone(),
                mean_all: ma,
                ci_all: ca,
                tokens_all: all.len(),
                mean_first9: mf,
                ci_first9: cf,
                tokens_first9: first.len(),
                latents: set.as_ref().map_or(0, Vec::len),
            }
        })
        .collect())
}

/// `kl.json` rows, typed; errors name the file.
pub fn read_kl(path: &Path) -> Result<Vec<KlStat>> {
    let text = fs_err::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a kl.json: {e}", path.display()))
}

impl RunDir {
    pub fn read_kl(&self) -> Result<Vec<KlStat>> {
        read_kl(&self.kl())
    }

    pub fn write_kl(&self, stats: &[KlStat]) -> Result<()> {
        self.write_json(RunDir::KL, stats)
    }
}
