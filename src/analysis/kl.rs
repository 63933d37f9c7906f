//! `crossdiff kl`: the causal check of shared/spec/method.md §5. Base and chat run to block L on
//! the same conversation; the pair is encoded; the base residual is patched with the chat-minus-base
//! decoder difference of a set S of latents, `h_S = h_base + Σ_{j∈S} f_j (d_j^chat − d_j^base)`; the
//! chat model's remaining blocks run from h_S; KL(P_chat ‖ P_patched) is measured on the positions
//! that predict each assistant turn's generated part (`kl_positions`). Patching can be limited to
//! template tokens or the first k predictions, and swept over layers (one pass of each model per
//! conversation serves every layer).

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Serialize};

pub use crate::analysis::kl_positions::{FIRST_WINDOW, PatchOn, Turns, reply_positions};
use crate::analysis::latents::{LatentClass, LatentRow};
use crate::analysis::sae_latents::SaeLatentRow;
use crate::crosscoder::{Crosscoder, SaeTarget, read_vec, tensor};
use crate::data::{Document, open_source};
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
    /// The layer patched (recorded in a layer sweep; `None`: the crosscoder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// Where the patch replaced the base activation (absent: every position).
    #[serde(default, skip_serializing_if = "is_all")]
    pub patch_on: PatchOn,
}

fn is_all(p: &PatchOn) -> bool {
    *p == PatchOn::All
}

/// How the KL check patches: where, and at which layers besides the crosscoder's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KlOptions {
    pub patch_on: PatchOn,
    /// Predictions per assistant turn patched by [`PatchOn::FirstK`] (the authors use 5).
    pub first_k: usize,
    /// Layers swept with the conditions that need no crosscoder (`none`, and `chat` when the patch
    /// is limited); the crosscoder's own layer always gets the full table.
    pub sweep: Vec<usize>,
}

/// The KL check's results: the table at the crosscoder's layer and the sweep's rows (each with its
/// layer; empty without a sweep).
#[derive(Debug, Clone)]
pub struct KlReport {
    pub table: Vec<KlStat>,
    pub sweep: Vec<KlStat>,
}

/// Which latents each condition patches (`None` = special handling: none / chat error only).
///
/// The best/worst halves follow the authors' `setup_to_eval.py`: the candidates are the chat-only
/// latents that are alive (active on the evaluation tokens) with both ν computed and within
/// [−0.1, 2]; ranked by Δ (descending) or by rank(ν^ε) + rank(ν^r) of the **signed** ν (ascending,
/// average ranks for ties, as pandas' `rank()`); "best" is the first ⌊n/2⌋, "worst" the last ⌊n/2⌋
/// (their `[-num_latents:]` with `num_latents = n // 2`: the whole list when n = 1).
pub fn condition_sets(rows: &[LatentRow]) -> Vec<(String, Option<Vec<usize>>)> {
    let dict = rows.len();
    let in_range = |v: Option<f64>| v.is_some_and(|v| (-0.1..=2.0).contains(&v));
    let cand: Vec<&LatentRow> = rows
        .iter()
        .filter(|r| {
            r.class == LatentClass::ChatOnly && r.freq > 0.0 && in_range(r.nu_error) && in_range(r.nu_reconstruction)
        })
        .collect();
    let n = cand.len();
    // The authors' `num_latents = len(df) // 2`, `[:num_latents]` and `[-num_latents:]`: with
    // n // 2 = 0 the latter is the whole list.
    let (best_n, worst_n) = (n / 2, if n / 2 == 0 { n } else { n / 2 });
    let mut by_delta = cand.clone();
    by_delta.sort_by(|a, b| b.delta_norm.total_cmp(&a.delta_norm).then(a.latent.cmp(&b.latent)));
    let average_ranks = |key: fn(&LatentRow) -> Option<f64>| -> Vec<f64> {
        let v: Vec<f64> = cand.iter().map(|r| key(r).expect("filtered to computed ν")).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut ranks = vec![0.0; n];
        let mut i = 0;
        while i < n {
            let mut j = i;
            while j + 1 < n && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            // 1-based ranks i+1 ..= j+1 share their mean.
            let mean = (i + j) as f64 / 2.0 + 1.0;
            for &o in &order[i..=j] {
                ranks[o] = mean;
            }
            i = j + 1;
        }
        ranks
    };
    let (re, rr) = (average_ranks(|r| r.nu_error), average_ranks(|r| r.nu_reconstruction));
    let mut by_ls: Vec<usize> = (0..n).collect();
    by_ls.sort_by(|&a, &b| (re[a] + rr[a]).total_cmp(&(re[b] + rr[b])).then(cand[a].latent.cmp(&cand[b].latent)));
    let by_ls: Vec<&LatentRow> = by_ls.into_iter().map(|i| cand[i]).collect();
    let ids = |v: &[&LatentRow]| Some(v.iter().map(|r| r.latent).collect::<Vec<_>>());
    vec![
        ("none".into(), None),
        ("all".into(), Some((0..dict).collect())),
        ("chat_error_only".into(), None),
        ("best_delta_50".into(), ids(&by_delta[..best_n])),
        ("worst_delta_50".into(), ids(&by_delta[n - worst_n..])),
        ("best_ls_50".into(), ids(&by_ls[..best_n])),
        ("worst_ls_50".into(), ids(&by_ls[n - worst_n..])),
        // The latents Latent Scaling calls genuinely chat-specific (chat-only, ν^ε < 0.2, ν^r < 0.5).
        ("chat_specific".into(), ids(&rows.iter().filter(|r| r.is_chat_specific()).collect::<Vec<_>>())),
    ]
}

/// What the check patches with: a crosscoder and its latents table, or a diff-SAE and its
/// `sae-latents.csv`.
#[derive(Clone, Copy)]
pub enum Latents<'a> {
    Crosscoder(&'a [LatentRow]),
    Sae(&'a [SaeLatentRow]),
}

/// A diff-SAE's conditions (the authors' `patch_diff_sae_*` and `patch_all_sae_*` runs): with s the
/// input's sign (+1 for chat − base, −1 for base − chat) and SAE(x) = f·W_dec + b_dec,
/// `sae_recon` = h_base + s·SAE(x) (bias included, no error term), `sae_error` = h_base +
/// s·(x − SAE(x)), `sae_bias` = h_base + s·b_dec, and latent sets h_base + s·Σ_{j∈S} f_j d_j (no
/// bias): `all_latents`, and the latents with |β_base/β_chat| at most 0.1, 0.3, 0.6.
pub fn sae_condition_sets(rows: &[SaeLatentRow]) -> Vec<(String, Option<Vec<usize>>)> {
    let below =
        |t: f64| Some(rows.iter().filter(|r| r.beta_ratio.is_some_and(|v| v.abs() <= t)).map(|r| r.latent).collect());
    let mut sets = vec![
        ("none".into(), None),
        ("sae_recon".into(), None),
        ("sae_error".into(), None),
        ("sae_bias".into(), None),
        ("all_latents".into(), Some((0..rows.len()).collect())),
    ];
    for t in crate::analysis::sae_latents::RATIO_THRESHOLDS {
        sets.push((format!("ratio_le_{t}"), below(t)));
    }
    sets
}

/// One measured (layer, condition): what it patches and the KL values it collects.
struct Cell {
    layer: usize,
    name: String,
    set: Option<Vec<usize>>,
    /// The set as a `[1, D]` 0/1 mask on the device, made once for all conversations.
    mask: Option<Tensor<2>>,
    all: Vec<f64>,
    first: Vec<f64>,
}

impl Cell {
    fn new(layer: usize, name: String, set: Option<Vec<usize>>, dict: usize, device: &burn::tensor::Device) -> Self {
        let mask = set.as_ref().map(|set| {
            let mut m = vec![0.0f32; dict];
            set.iter().for_each(|&j| m[j] = 1.0);
            tensor(m, [1, dict], device)
        });
        Self { layer, name, set, mask, all: Vec::new(), first: Vec::new() }
    }
}

/// Runs the KL check over up to `limit` conversations of a `.jsonl`/`.parquet` file with
/// `messages`: the full table at `layer` (the crosscoder's) and, for each layer of
/// `options.sweep`, the conditions that need no crosscoder. Each model runs once per conversation
/// up to the deepest layer; the chat model's own distribution comes from that pass.
#[allow(clippy::too_many_arguments)]
pub fn kl_table(
    base: &Model,
    chat: &Model,
    cc: &Crosscoder,
    latents: Latents,
    layer: usize,
    data: &Path,
    limit: usize,
    options: &KlOptions,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<KlReport> {
    crate::model::check_models(base, chat)?;
    // One model's width (a crosscoder's rows hold two, an SAE's one).
    let (d, dict) = (
        cc.params.w_dec.dims()[1] / if cc.config.kind == crate::crosscoder::Kind::Sae { 1 } else { 2 },
        cc.params.w_dec.dims()[0],
    );
    if d != base.lm.config.hidden_size {
        bail!("the crosscoder has width {d}, the models {}", base.lm.config.hidden_size);
    }
    let (rows_len, table) = match latents {
        Latents::Crosscoder(rows) => (rows.len(), "latents.csv"),
        Latents::Sae(rows) => (rows.len(), "sae-latents.csv"),
    };
    if rows_len != dict {
        bail!("{table} has {rows_len} rows, the dictionary {dict} latents");
    }
    // A diff-SAE reads s·(chat − base); a crosscoder both activations.
    let sae_sign = match (latents, cc.config.target) {
        (Latents::Crosscoder(_), _) => None,
        (Latents::Sae(_), Some(SaeTarget::ChatMinusBase)) => Some(1.0),
        (Latents::Sae(_), Some(SaeTarget::BaseMinusChat)) => Some(-1.0),
        (Latents::Sae(_), other) => bail!(
            "KL patching needs a diff-SAE (target chat-minus-base or base-minus-chat), not one on {}",
            other.map_or_else(|| "an unknown input".to_string(), |t| t.to_string())
        ),
    };
    let mut layers = options.sweep.clone();
    layers.push(layer);
    layers.sort_unstable();
    layers.dedup();
    let last = *layers.last().expect("the crosscoder's layer is there");
    if last >= base.lm.num_layers() {
        bail!("layer {last} is past the models' last block ({})", base.lm.num_layers() - 1);
    }
    let restricted = options.patch_on != PatchOn::All;
    let device = base.lm.device().clone();
    let mut cells = Vec::new();
    for &l in &layers {
        let sets = match latents {
            _ if l != layer => vec![("none".into(), None)],
            Latents::Crosscoder(rows) => condition_sets(rows),
            Latents::Sae(rows) => sae_condition_sets(rows),
        };
        for (name, set) in sets {
            cells.push(Cell::new(l, name, set, dict, &device));
        }
        // Chat's own activations, where the patch is limited: how much of the gap those
        // positions carry (patched everywhere it is 0 by construction).
        if restricted {
            cells.push(Cell::new(l, "chat".into(), None, dict, &device));
        }
    }
    // What a latent adds when patched, [D, d]: a crosscoder's decoder difference, a diff-SAE's
    // signed direction.
    let diff = match sae_sign {
        None => cc.params.w_dec.clone().narrow(1, d, d) - cc.params.w_dec.clone().narrow(1, 0, d),
        Some(s) => cc.params.w_dec.clone().mul_scalar(s),
    };
    let vocab = chat.lm.config.vocab_size;
    let mut seen = 0;
    // Conversations longer than the model's context are cut there (as `cache` cuts at --context).
    let max_len = chat.lm.config.max_position_embeddings.unwrap_or(usize::MAX);
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
        let turns = Turns::of(chat, &ids);
        let positions = turns.measured();
        if positions.is_empty() {
            continue;
        }
        let t = ids.len();
        let patch = turns.patch_mask(options.patch_on, options.first_k).map(|m| tensor(m, [t, 1], &device));
        let input = || base.lm.batch_ids(std::slice::from_ref(&ids));
        let capture = |model: &Model| -> Result<Vec<Tensor<2>>> {
            let mut out = Vec::with_capacity(layers.len());
            model.lm.forward_blocks(input()?, last, |l, h| {
                if layers.contains(&l) {
                    out.push(h.clone().reshape([t, d]));
                }
            });
            Ok(out)
        };
        let (h_base, h_chat) = (capture(base)?, capture(chat)?);
        let at = |l: usize| layers.iter().position(|&x| x == l).expect("a captured layer");
        let chat_logp =
            log_softmax(chat.lm.forward_from(last, h_chat[at(last)].clone().reshape([1, t, d])).reshape([t, vocab]), 1);
        let p_chat = chat_logp.clone().exp();
        let (hb_l, hc_l) = (h_base[at(layer)].clone(), h_chat[at(layer)].clone());
        // A diff-SAE's input x and its reconstruction SAE(x), once per conversation.
        let (f, sae_parts) = match sae_sign {
            None => (cc.codes(Tensor::cat(vec![hb_l, hc_l], 1)), None), // [T, D]
            Some(s) => {
                let x = (hc_l - hb_l).mul_scalar(s);
                let f = cc.codes(x.clone());
                let recon = f.clone().matmul(cc.params.w_dec.clone()) + cc.params.b_dec.clone();
                (f, Some((s, x, recon)))
            }
        };
        for cell in &mut cells {
            let (hb, hc) = (&h_base[at(cell.layer)], &h_chat[at(cell.layer)]);
            let target = match (cell.name.as_str(), &cell.mask) {
                ("none", _) => hb.clone(),
                ("chat", _) => hc.clone(),
                ("chat_error_only", _) => hc.clone() - f.clone().matmul(diff.clone()),
                ("sae_recon" | "sae_error" | "sae_bias", _) => {
                    let Some((s, x, recon)) = &sae_parts else { bail!("\"{}\" needs a diff-SAE", cell.name) };
                    let add = match cell.name.as_str() {
                        "sae_recon" => recon.clone(),
                        "sae_error" => x.clone() - recon.clone(),
                        _ => cc.params.b_dec.clone(),
                    };
                    hb.clone() + add.mul_scalar(*s)
                }
                (_, Some(m)) => hb.clone() + (f.clone() * m.clone()).matmul(diff.clone()),
                _ => unreachable!("every condition is covered"),
            };
            // A limited patch keeps the base activation outside its positions.
            let patched = match &patch {
                None => target,
                Some(m) => hb.clone() + (target - hb.clone()) * m.clone(),
            };
            let logp = log_softmax(chat.lm.forward_from(cell.layer, patched.reshape([1, t, d])).reshape([t, vocab]), 1);
            let kl = read_vec((p_chat.clone() * (chat_logp.clone() - logp)).sum_dim(1).reshape([t]))?;
            for &(pos, first) in &positions {
                cell.all.push(kl[pos] as f64);
                if first {
                    cell.first.push(kl[pos] as f64);
                }
            }
        }
        seen += 1;
        // `false` from the caller (Cancel, Ctrl-C) stops here; no result file is touched.
        if !progress(seen) {
            bail!("the KL check was cancelled after {seen} conversations; the KL results are unchanged");
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
    let row = |c: &Cell, layer: Option<usize>| {
        let ((ma, ca), (mf, cf)) = (stat(&c.all), stat(&c.first));
        KlStat {
            condition: c.name.clone(),
            mean_all: ma,
            ci_all: ca,
            tokens_all: c.all.len(),
            mean_first9: mf,
            ci_first9: cf,
            tokens_first9: c.first.len(),
            latents: c.set.as_ref().map_or(0, Vec::len),
            layer,
            patch_on: options.patch_on,
        }
    };
    let table = cells.iter().filter(|c| c.layer == layer).map(|c| row(c, None)).collect();
    let sweep = cells
        .iter()
        .filter(|c| options.sweep.contains(&c.layer) && (c.name == "none" || c.name == "chat"))
        .map(|c| row(c, Some(c.layer)))
        .collect();
    Ok(KlReport { table, sweep })
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

    /// The results file of a KL check patched `on` (`kl.json` for every position), or of its layer
    /// sweep (`…-layers.json`).
    pub fn kl_file(&self, on: PatchOn, first_k: usize, sweep: bool) -> std::path::PathBuf {
        self.file(&Self::kl_name(on, first_k, sweep))
    }

    pub fn kl_name(on: PatchOn, first_k: usize, sweep: bool) -> String {
        let suffix = if sweep { "-layers" } else { "" };
        format!("{}{suffix}.json", on.stem(first_k))
    }
}
