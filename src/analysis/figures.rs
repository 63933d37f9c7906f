//! The data behind the paper's figures (shared/spec/method.md §7), computed from latents.csv rows
//! and kl.json; the app draws them, and exports them as CSV.

use crate::analysis::latents::{LatentClass, LatentRow};

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
pub fn delta_histogram(rows: &[LatentRow], lo: f64, hi: f64, bins: usize) -> Vec<(LatentClass, Vec<u64>)> {
    class_histogram(rows, |r| r.delta_norm, lo, hi, bins)
}

/// (latent, ν^ε, ν^r) of the latents of a class where both ratios were computed.
pub fn nu_points(rows: &[LatentRow], class: LatentClass) -> Vec<(usize, f64, f64)> {
    rows.iter()
        .filter(|r| r.class == class)
        .filter_map(|r| Some((r.latent, r.nu_error?, r.nu_reconstruction?)))
        .collect()
}

/// How many chat-only latents have |ν^ε| < π and |ν^r| < π, for π in `thresholds`.
pub fn below_threshold_curve(rows: &[LatentRow], thresholds: &[f64]) -> Vec<(f64, usize)> {
    let pts = nu_points(rows, LatentClass::ChatOnly);
    thresholds.iter().map(|&p| (p, pts.iter().filter(|(_, e, r)| e.abs() < p && r.abs() < p).count())).collect()
}

/// CSV of a per-class histogram: `bin_lo,bin_hi,<class>...`.
pub fn histogram_csv(series: &[(LatentClass, Vec<u64>)], lo: f64, hi: f64) -> String {
    let bins = series.first().map_or(0, |s| s.1.len());
    let mut out = String::from("bin_lo,bin_hi");
    for (c, _) in series {
        out.push(',');
        out.push_str(c.as_str());
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
) -> Vec<(LatentClass, Vec<u64>)> {
    LatentClass::FIGURE_ORDER
        .into_iter()
        .filter(|c| *c != LatentClass::Dead)
        .map(|c| (c, histogram(rows.iter().filter(|r| r.class == c).map(field), lo, hi, bins)))
        .collect()
}
