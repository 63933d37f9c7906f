//! Methods side by side (`crossdiff compare`, the app's Methods view): for crosscoder runs, diff-SAE
//! runs and activation-difference-lens results on the same data, the KL gap each closes (all reply
//! tokens and the first 9), how many latents each calls chat-specific, and its top latents or
//! tokens. Reads what `analyze`, `kl` and `adl` wrote; computes nothing new.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::Serialize;

use crate::analysis::kl::KlStat;
use crate::analysis::sae_latents::SaeSummary;
use crate::crosscoder::{CrosscoderConfig, Kind};
use crate::run_dir::RunDir;

/// The |ν| threshold a diff-SAE latent counts as chat-specific below (the middle of the authors'
/// 0.1/0.3/0.6).
pub const SAE_RATIO_THRESHOLD: f64 = 0.3;

/// One method's line of the comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MethodRow {
    /// "crosscoder (batchtopk)", "diff-SAE (chat-minus-base)", "ADL".
    pub method: String,
    pub source: PathBuf,
    /// The condition whose KL is compared with `none` (the whole dictionary: `all` or
    /// `sae_recon`), and the share of the base→chat gap it closes (all reply tokens, first 9);
    /// `None` without a kl.json.
    pub kl_condition: Option<String>,
    pub gap_closed_all: Option<f64>,
    pub gap_closed_first9: Option<f64>,
    /// The same for the chat-specific latents alone (`chat_specific`, or `ratio_le_0.3`).
    pub specific_closed_all: Option<f64>,
    /// Latents the method calls chat-specific (crosscoder: chat-only with ν^ε < 0.2 and ν^r < 0.5;
    /// diff-SAE: |β_base/β_chat| ≤ 0.3); `None` for the lens.
    pub chat_specific: Option<usize>,
    /// Its top latents ("#j") or, for the lens, the tokens its first position promotes.
    pub top: Vec<String>,
}

/// The share of the gap `none → 0` that `cond` closes, by `value` (all or first 9).
fn closed(kl: &[KlStat], cond: &str, value: fn(&KlStat) -> f64) -> Option<f64> {
    let none = kl.iter().find(|s| s.condition == "none")?;
    let c = kl.iter().find(|s| s.condition == cond)?;
    (value(none) > 0.0).then(|| 1.0 - value(c) / value(none))
}

/// The comparison of `runs` (crosscoder or SAE run folders) and `adl` folders.
pub fn compare_methods(runs: &[PathBuf], adl: &[PathBuf]) -> Result<Vec<MethodRow>> {
    let mut rows = Vec::new();
    for path in runs {
        let run = RunDir::new(path);
        let config: CrosscoderConfig = run.read_config().map_err(|e| anyhow!("--runs: {e:#}"))?;
        let kl = run.read_kl().ok();
        let kl = kl.as_deref().unwrap_or(&[]);
        let row = if config.kind == Kind::Sae {
            let summary: SaeSummary = run.read_json(RunDir::SAE_SUMMARY).map_err(|_| {
                anyhow!(
                    "--runs: {} is an SAE run without sae-summary.json: run `crossdiff analyze` on it first",
                    path.display()
                )
            })?;
            let specific = summary.ratio_below.iter().find(|(t, _)| *t == SAE_RATIO_THRESHOLD).map(|(_, n)| *n);
            MethodRow {
                method: format!("diff-SAE ({})", summary.target),
                source: path.clone(),
                kl_condition: kl.iter().any(|s| s.condition == "sae_recon").then(|| "sae_recon".into()),
                gap_closed_all: closed(kl, "sae_recon", |s| s.mean_all),
                gap_closed_first9: closed(kl, "sae_recon", |s| s.mean_first9),
                specific_closed_all: closed(kl, &format!("ratio_le_{SAE_RATIO_THRESHOLD}"), |s| s.mean_all),
                chat_specific: specific,
                top: summary.most_chat_specific.iter().take(5).map(|j| format!("#{j}")).collect(),
            }
        } else {
            let summary = run.read_summary().map_err(|_| {
                anyhow!("--runs: {} has no summary.json: run `crossdiff analyze` on it first", path.display())
            })?;
            let latents = run.read_latents().unwrap_or_default();
            let mut specific: Vec<_> = latents.iter().filter(|r| r.is_chat_specific()).collect();
            specific.sort_by(|a, b| b.delta_norm.total_cmp(&a.delta_norm).then(a.latent.cmp(&b.latent)));
            MethodRow {
                method: format!("crosscoder ({})", format!("{:?}", config.kind).to_lowercase()),
                source: path.clone(),
                kl_condition: kl.iter().any(|s| s.condition == "all").then(|| "all".into()),
                gap_closed_all: closed(kl, "all", |s| s.mean_all),
                gap_closed_first9: closed(kl, "all", |s| s.mean_first9),
                specific_closed_all: closed(kl, "chat_specific", |s| s.mean_all),
                chat_specific: Some(summary.chat_specific),
                top: specific.iter().take(5).map(|r| format!("#{}", r.latent)).collect(),
            }
        };
        rows.push(row);
    }
    for dir in adl {
        let path = dir.join("adl.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| anyhow!("--adl: {}: cannot read: {e}", path.display()))?;
        let report: crate::analysis::adl::AdlReport =
            serde_json::from_str(&text).map_err(|e| anyhow!("--adl: {}: not an adl.json: {e}", path.display()))?;
        // The first position after BOS reads the text, not the start token.
        let reading = report.per_position.iter().find(|p| p.position == 1).or(report.per_position.first());
        rows.push(MethodRow {
            method: "ADL".into(),
            source: dir.clone(),
            kl_condition: None,
            gap_closed_all: None,
            gap_closed_first9: None,
            specific_closed_all: None,
            chat_specific: None,
            top: reading.map_or_else(Vec::new, |p| p.chat.promoted.iter().take(5).map(|t| t.token.clone()).collect()),
        });
    }
    if rows.is_empty() {
        bail!("--runs: give at least one run (or --adl a lens folder) to compare");
    }
    Ok(rows)
}

/// A comparison's rows as a text table (the CLI's output).
pub fn table(rows: &[MethodRow]) -> String {
    let pct = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{:.0}%", 100.0 * v));
    let mut out = format!(
        "{:<28} {:>12} {:>14} {:>16} {:>14}  {}\n",
        "method", "gap closed", "first 9", "specific closes", "chat-specific", "top latents / tokens"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:>12} {:>14} {:>16} {:>14}  {}\n",
            r.method,
            pct(r.gap_closed_all),
            pct(r.gap_closed_first9),
            pct(r.specific_closed_all),
            r.chat_specific.map_or_else(|| "—".to_string(), |n| n.to_string()),
            r.top.join(" ")
        ));
    }
    out
}

/// Where a comparison was asked to be written, refused when it is a folder.
pub fn check_out(out: &Path) -> Result<()> {
    if out.is_dir() {
        bail!("--out: {} is a folder; give a file name for the comparison's JSON", out.display());
    }
    Ok(())
}
