//! The data behind the paper's figures (shared/spec/method.md §7), computed from latents.csv rows
//! and kl.json; the app draws them, and exports them as CSV.

use crate::analyze::LatentRow;

pub const CLASS_ORDER: [&str; 5] = ["base_only", "other", "shared", "chat_only", "dead"];

/// Counts of `values` in `bins` equal bins over `[lo, hi]` (the top edge inclusive).
pub fn histogram(values: impl Iterator<Item = f64>, lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    let mut out = vec![0u64; bins];
    for v in values {
        if v < lo || v > hi || !v.is_finite() {
            continue;
        }
        let b = (((v - lo) / (hi - lo)) * bins as f64) as usize;
        out[b.min(bins - 1)] += 1;
    }
    out
}

/// Δ histogram per class: `[class][bin]` over [lo, hi] (100 bins over [0, 1] in the paper; the
/// zoomed inset is the same over [0.9, 1]).
pub fn delta_histogram(rows: &[LatentRow], lo: f64, hi: f64, bins: usize) -> Vec<(&'static str, Vec<u64>)> {
    CLASS_ORDER
        .iter()
        .filter(|c| **c != "dead")
        .map(|&c| (c, histogram(rows.iter().filter(|r| r.class == c).map(|r| r.delta_norm), lo, hi, bins)))
        .collect()
}

/// (latent, ν^ε, ν^r) of the latents of a class where both ratios were computed.
pub fn nu_points(rows: &[LatentRow], class: &str) -> Vec<(usize, f64, f64)> {
    rows.iter()
        .filter(|r| r.class == class)
        .filter_map(|r| Some((r.latent, r.nu_error?, r.nu_reconstruction?)))
        .collect()
}

/// How many chat-only latents have |ν^ε| < π and |ν^r| < π, for π in `thresholds`.
pub fn below_threshold_curve(rows: &[LatentRow], thresholds: &[f64]) -> Vec<(f64, usize)> {
    let pts = nu_points(rows, "chat_only");
    thresholds.iter().map(|&p| (p, pts.iter().filter(|(_, e, r)| e.abs() < p && r.abs() < p).count())).collect()
}

/// CSV of a per-class histogram: `bin_lo,bin_hi,<class>...`.
pub fn histogram_csv(series: &[(&'static str, Vec<u64>)], lo: f64, hi: f64) -> String {
    let bins = series.first().map_or(0, |s| s.1.len());
    let mut out = String::from("bin_lo,bin_hi");
    for (c, _) in series {
        out.push(',');
        out.push_str(c);
    }
    out.push('\n');
    let w = (hi - lo) / bins.max(1) as f64;
    for b in 0..bins {
        out.push_str(&format!("{},{}", lo + b as f64 * w, lo + (b + 1) as f64 * w));
        for (_, counts) in series {
            out.push_str(&format!(",{}", counts[b]));
        }
        out.push('\n');
    }
    out
}

/// A per-class histogram of any latent field over [lo, hi] (decoder cosine: [−1, 1]; frequency:
/// [0, max]).
pub fn class_histogram(
    rows: &[LatentRow],
    field: fn(&LatentRow) -> f64,
    lo: f64,
    hi: f64,
    bins: usize,
) -> Vec<(&'static str, Vec<u64>)> {
    CLASS_ORDER
        .iter()
        .filter(|c| **c != "dead")
        .map(|&c| (c, histogram(rows.iter().filter(|r| r.class == c).map(field), lo, hi, bins)))
        .collect()
}

/// `kl.json` rows: (condition, mean over all reply tokens, its 95% CI, mean over the first 9, CI).
pub fn read_kl(path: &std::path::Path) -> anyhow::Result<Vec<(String, f64, f64, f64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(v.iter()
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            (
                r["condition"].as_str().unwrap_or("?").to_string(),
                f("mean_all"),
                f("ci_all"),
                f("mean_first9"),
                f("ci_first9"),
            )
        })
        .collect())
}
