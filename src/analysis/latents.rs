//! The latents table (`latents.csv`) and `summary.json`: one row per latent with its decoder norms,
//! Δ class, activation statistics and Latent Scaling ratios (shared/spec/method.md §3–4).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::run_dir::RunDir;

/// The header of `latents.csv`, exactly as interfaces.md fixes it.
pub const CSV_HEADER: &str = "latent,delta_norm,dec_norm_base,dec_norm_chat,dec_cos,class,freq,max_act,nu_error,nu_reconstruction,beta_error_base,beta_error_chat,beta_recon_base,beta_recon_chat,template_share";

/// A latent's class by its relative decoder norm Δ (method.md §3), or dead.
/// Variants in the alphabetical order of their names, so maps keyed by class serialise in the
/// order the string-keyed maps did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatentClass {
    BaseOnly,
    ChatOnly,
    Dead,
    Other,
    Shared,
}

impl LatentClass {
    /// In the order the figures draw them (base-only at Δ 0 to chat-only at 1, then dead).
    pub const FIGURE_ORDER: [LatentClass; 5] =
        [LatentClass::BaseOnly, LatentClass::Other, LatentClass::Shared, LatentClass::ChatOnly, LatentClass::Dead];

    /// The name used in files and on screen (`chat_only`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            LatentClass::BaseOnly => "base_only",
            LatentClass::ChatOnly => "chat_only",
            LatentClass::Dead => "dead",
            LatentClass::Other => "other",
            LatentClass::Shared => "shared",
        }
    }

    /// Δ class boundaries (method.md §3): < 0.1 base-only, [0.4, 0.6) shared, ≥ 0.9 chat-only.
    pub fn of_delta(delta: f64) -> Self {
        if delta < 0.1 {
            LatentClass::BaseOnly
        } else if (0.4..0.6).contains(&delta) {
            LatentClass::Shared
        } else if delta >= 0.9 {
            LatentClass::ChatOnly
        } else {
            LatentClass::Other
        }
    }
}

impl std::fmt::Display for LatentClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LatentClass {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        LatentClass::FIGURE_ORDER
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| anyhow!("unknown latent class {s:?} (base_only, shared, chat_only, other, dead)"))
    }
}

/// Relative decoder norm Δ = ½·[(‖chat‖ − ‖base‖) / max(‖chat‖, ‖base‖) + 1].
pub fn delta_norm(base: f64, chat: f64) -> f64 {
    let m = base.max(chat);
    if m == 0.0 { 0.5 } else { 0.5 * ((chat - base) / m + 1.0) }
}

/// One row of `latents.csv` (field order = the header's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentRow {
    pub latent: usize,
    /// Δ of the decoder norms (0 base-only … 0.5 shared … 1 chat-only).
    pub delta_norm: f64,
    /// ‖d_j^base‖ and ‖d_j^chat‖, and the cosine between the two directions.
    pub dec_norm_base: f64,
    pub dec_norm_chat: f64,
    pub dec_cos: f64,
    pub class: LatentClass,
    /// Share of tokens on which the latent is active, and its largest norm-scaled activation.
    pub freq: f64,
    pub max_act: f64,
    /// Latent Scaling ratios ν^ε = β^ε_base / β^ε_chat and ν^r (empty where not computed).
    pub nu_error: Option<f64>,
    pub nu_reconstruction: Option<f64>,
    pub beta_error_base: Option<f64>,
    pub beta_error_chat: Option<f64>,
    pub beta_recon_base: Option<f64>,
    pub beta_recon_chat: Option<f64>,
    /// Share of its activations that fall on chat-template tokens.
    pub template_share: Option<f64>,
}

impl LatentRow {
    /// Genuinely chat-specific (method.md §4): chat-only with ν^ε < 0.2 and ν^r < 0.5.
    pub fn is_chat_specific(&self) -> bool {
        self.class == LatentClass::ChatOnly
            && self.nu_error.is_some_and(|v| v < 0.2)
            && self.nu_reconstruction.is_some_and(|v| v < 0.5)
    }

    /// A plain-words reading of the Latent Scaling ratios (method.md §4), for dashboards.
    pub fn verdict(&self) -> &'static str {
        if self.class == LatentClass::Dead {
            return "dead: never active on the evaluation tokens";
        }
        if self.class != LatentClass::ChatOnly {
            return "not chat-only";
        }
        match (self.nu_error, self.nu_reconstruction) {
            (Some(e), _) if e >= 0.2 => "Complete Shrinkage suspected: the base model's error carries this direction",
            (_, Some(r)) if r >= 0.5 => {
                "Latent Decoupling suspected: the base reconstruction carries it through other latents"
            }
            (Some(_), Some(_)) => "chat-specific",
            _ => "chat-only (Latent Scaling not computed for this latent)",
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub tokens: u64,
    pub classes: BTreeMap<LatentClass, usize>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub fve_base: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub fve_chat: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub fve: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub l0: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub dead_fraction: f64,
    /// Chat-only latents with ν^ε < 0.2 and ν^r < 0.5.
    pub chat_specific: usize,
    pub error_betas_top_n: usize,
    pub error_betas_random_shared: usize,
    #[serde(deserialize_with = "f64_or_nan")]
    pub cosine_random_pairs_mean: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub cosine_random_pairs_std: f64,
    pub thresholds: serde_json::Value,
    /// The checksum of the crosscoder file analysed; jobs that read latents.csv check it is still
    /// the run's crosscoder (not one trained further since). Absent in older runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crosscoder_checksum: Option<u64>,
}

/// serde_json writes a non-finite f64 as `null` (an FVE over constant data is NaN); read it back
/// as NaN instead of refusing the file.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Summary {
    /// Latents of one class.
    pub fn count(&self, class: LatentClass) -> usize {
        self.classes.get(&class).copied().unwrap_or(0)
    }
}

/// Reads a `latents.csv`; errors name the file, the line and the field.
pub fn read_latents_csv(path: &Path) -> Result<Vec<LatentRow>> {
    let file = fs_err::File::open(path).map_err(|e| anyhow!("{e}; run `crossdiff analyze` on this run first"))?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(std::io::BufReader::new(file));
    let header = reader.headers().with_context(|| format!("{}: unreadable header", path.display()))?;
    if header.iter().collect::<Vec<_>>().join(",") != CSV_HEADER {
        bail!("{}: the header is not latents.csv's", path.display());
    }
    reader
        .deserialize::<LatentRow>()
        .enumerate()
        .map(|(i, row)| row.map_err(|e| anyhow!("{}:{}: {}", path.display(), i + 2, csv_error(&e))))
        .collect()
}

fn csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => match err.field() {
            Some(k) => {
                format!("field {} ({}): {}", k + 1, CSV_HEADER.split(',').nth(k as usize).unwrap_or("?"), err.kind())
            }
            // serde names no field for an unknown enum value; the only enum column is `class`.
            None if err.to_string().contains("unknown variant") => format!("field 6 (class): {}", err.kind()),
            None => err.kind().to_string(),
        },
        csv::ErrorKind::UnequalLengths { len, .. } => format!("{len} fields, expected 15"),
        _ => e.to_string(),
    }
}

/// The CSV text of a latents table (header exactly as interfaces.md).
pub fn latents_csv_bytes(rows: &[LatentRow]) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new().has_headers(true).from_writer(Vec::with_capacity(rows.len() * 160));
    for r in rows {
        w.serialize(r)?;
    }
    w.into_inner().map_err(|e| anyhow!("latents.csv: {e}"))
}

impl RunDir {
    pub fn read_latents(&self) -> Result<Vec<LatentRow>> {
        read_latents_csv(&self.latents())
    }

    /// Writes `latents.csv` and `summary.json`, each atomically.
    pub fn write_latents(&self, rows: &[LatentRow], summary: &Summary) -> Result<()> {
        let bytes = latents_csv_bytes(rows)?;
        crate::io::write_atomic(&self.latents(), |f| Ok(std::io::Write::write_all(f, &bytes)?))?;
        self.write_json(RunDir::SUMMARY, summary)
    }

    pub fn read_summary(&self) -> Result<Summary> {
        self.read_json(RunDir::SUMMARY)
    }

    /// Why `latents.csv` no longer describes the run's crosscoder (trained further or replaced since
    /// `analyze`), or `None` when it does or nothing records which crosscoder was analysed. Reads
    /// the crosscoder file once (for its checksum): call it when a run is loaded, not per frame.
    pub fn stale_analysis(&self) -> Option<String> {
        let analysed = self.read_summary().ok()?.crosscoder_checksum?;
        let bytes = std::fs::read(self.crosscoder()).ok()?;
        (crate::io::checksum(&bytes) != analysed).then(|| {
            format!(
                "{} is out of date: it was computed from an earlier crosscoder (the run was trained further, or its \
                 crosscoder replaced); run `crossdiff analyze` again",
                self.latents().display()
            )
        })
    }

    /// `latents.csv` checked against the crosscoder it describes: one row per latent, finite
    /// numbers, computed from this very crosscoder file (a run trained further since, or a
    /// crosscoder copied in from elsewhere, needs `crossdiff analyze` again).
    pub fn read_latents_of(&self, cc: &crate::crosscoder::Crosscoder) -> Result<Vec<LatentRow>> {
        let path = self.latents();
        let rows = self.read_latents()?;
        let dict = cc.config.dict_size;
        if rows.len() != dict {
            bail!(
                "{}: {} rows, the crosscoder has {dict} latents; run `crossdiff analyze` again",
                path.display(),
                rows.len()
            );
        }
        if let Some(r) =
            rows.iter().find(|r| !(r.delta_norm.is_finite() && r.max_act.is_finite() && r.freq.is_finite()))
        {
            bail!("{}: latent {} has a non-finite delta_norm, max_act or freq", path.display(), r.latent);
        }
        // Rows are used by position (row j is latent j): a reordered or edited table is refused.
        if let Some((j, r)) = rows.iter().enumerate().find(|(j, r)| r.latent != *j) {
            bail!(
                "{}: row {} is latent {}; the table must list latents 0..{dict} in order",
                path.display(),
                j + 2,
                r.latent
            );
        }
        // The class follows from Δ (and a dead latent never fires): an edited class is refused.
        if let Some(r) = rows.iter().find(|r| {
            if r.class == LatentClass::Dead { r.freq > 0.0 } else { r.class != LatentClass::of_delta(r.delta_norm) }
        }) {
            bail!(
                "{}: latent {} has class {} but Δ {} and frequency {} say {}",
                path.display(),
                r.latent,
                r.class,
                r.delta_norm,
                r.freq,
                if r.class == LatentClass::Dead {
                    "it fires".to_string()
                } else {
                    LatentClass::of_delta(r.delta_norm).to_string()
                }
            );
        }
        if let Some(r) = rows.iter().find(|r| r.max_act < 0.0 || !(0.0..=1.0).contains(&r.freq)) {
            bail!("{}: latent {} has max_act {} or freq {} out of range", path.display(), r.latent, r.max_act, r.freq);
        }
        let analysed =
            self.summary().exists().then(|| self.read_summary()).transpose()?.and_then(|s| s.crosscoder_checksum);
        if let (Some(a), Some(now)) = (analysed, cc.file_checksum) {
            if a != now {
                bail!(
                    "{}: computed from an earlier crosscoder (the run was trained further, or its crosscoder replaced); run `crossdiff analyze` again",
                    path.display()
                );
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(latent: usize, class: LatentClass, nu: Option<f64>) -> LatentRow {
        LatentRow {
            latent,
            delta_norm: 0.95,
            dec_norm_base: 0.01,
            dec_norm_chat: 0.2,
            dec_cos: -0.125,
            class,
            freq: 1e-7,
            max_act: 3.5,
            nu_error: nu,
            nu_reconstruction: nu,
            beta_error_base: None,
            beta_error_chat: Some(2.0),
            beta_recon_base: None,
            beta_recon_chat: None,
            template_share: Some(0.0),
        }
    }

    #[test]
    fn csv_round_trip_keeps_every_field_and_the_header() {
        let rows = vec![row(0, LatentClass::ChatOnly, Some(0.1)), row(1, LatentClass::Dead, None)];
        let bytes = latents_csv_bytes(&rows).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.lines().next(), Some(CSV_HEADER));
        assert!(text.lines().nth(2).unwrap().contains(",dead,"), "{text}");
        let dir = std::env::temp_dir().join(format!("crossdiff-latents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latents.csv");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_latents_csv(&path).unwrap(), rows);
        // The pre-csv-crate writer's spelling (Display floats, empty options) reads the same.
        std::fs::write(&path, format!("{CSV_HEADER}\n0,0.95,0.01,0.2,-0.125,chat_only,0.0000001,3.5,0.1,0.1,,2,,,0\n1,0.95,0.01,0.2,-0.125,dead,0.0000001,3.5,,,,2,,,0\n")).unwrap();
        assert_eq!(read_latents_csv(&path).unwrap(), rows);
        std::fs::write(&path, format!("{CSV_HEADER}\n0,0.95,0.01,0.2,-0.125,purple,0,3.5,,,,,,,\n")).unwrap();
        let e = read_latents_csv(&path).unwrap_err().to_string();
        assert!(e.contains("latents.csv:2") && e.contains("class"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn class_boundaries() {
        assert_eq!(LatentClass::of_delta(0.09), LatentClass::BaseOnly);
        assert_eq!(LatentClass::of_delta(0.1), LatentClass::Other);
        assert_eq!(LatentClass::of_delta(0.4), LatentClass::Shared);
        assert_eq!(LatentClass::of_delta(0.6), LatentClass::Other);
        assert_eq!(LatentClass::of_delta(0.9), LatentClass::ChatOnly);
        assert_eq!("chat_only".parse::<LatentClass>().unwrap(), LatentClass::ChatOnly);
        assert!(row(0, LatentClass::ChatOnly, Some(0.1)).is_chat_specific());
        assert!(!row(0, LatentClass::ChatOnly, Some(0.3)).is_chat_specific());
    }
}
