//! The crosscoder run directory (shared/spec/interfaces.md, "Crosscoder run directory"): every file
//! name in one place. The typed readers and writers live beside the types they read (`impl RunDir`
//! blocks in `crosscoder`, `crosscoder::train`, `analysis::latents`, `analysis::kl`), so this module
//! depends only on `io` (atomic writes) and everything may depend on it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A run directory: `crosscoder.safetensors` + `config.json`, `checkpoint/`, `metrics.jsonl`, and
/// what `analyze` and `kl` add.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub const CROSSCODER: &'static str = "crosscoder.safetensors";
    /// An SAE run's weights (the authors' `BatchTopKSAE` layout) instead of `crosscoder.safetensors`.
    pub const SAE: &'static str = "sae.safetensors";
    pub const CONFIG: &'static str = "config.json";
    pub const METRICS: &'static str = "metrics.jsonl";
    pub const CHECKPOINT: &'static str = "checkpoint";
    pub const CHECKPOINT_STATE: &'static str = "state.json";
    pub const LATENTS: &'static str = "latents.csv";
    pub const SUMMARY: &'static str = "summary.json";
    pub const ANALYZE_STATE: &'static str = "analyze-state.json";
    pub const EXAMPLES: &'static str = "examples.safetensors";
    pub const KL: &'static str = "kl.json";
    /// What the app's Plots view exports into the run.
    pub const FIGURES_PNG: &'static str = "figures.png";
    pub const FIG_DELTA_CSV: &'static str = "fig-delta.csv";
    pub const FIG_DELTA_ZOOM_CSV: &'static str = "fig-delta-zoom.csv";

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn checkpoint_state(&self) -> PathBuf {
        self.checkpoint_dir().join(Self::CHECKPOINT_STATE)
    }

    /// Whether a trained dictionary is there (a crosscoder or an SAE).
    pub fn has_crosscoder(&self) -> bool {
        // A trained dictionary of either kind: a crosscoder, or an SAE (`sae.safetensors`).
        self.crosscoder().exists() || self.sae().exists()
    }

    /// Reads and parses one JSON file of the run; errors name the file.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text).with_context(|| format!("{}: not valid", path.display()))
    }

    /// Writes one JSON file of the run atomically (pretty-printed).
    pub fn write_json<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        let text = serde_json::to_string_pretty(value)?;
        crate::io::write_atomic(&self.file(name), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }
}

/// One path accessor per file of the run directory.
macro_rules! run_files {
    ($($method:ident => $name:ident),* $(,)?) => {
        impl RunDir {
            $(
                #[doc = concat!("The path of `RunDir::", stringify!($name), "` in this run.")]
                pub fn $method(&self) -> PathBuf {
                    self.file(Self::$name)
                }
            )*
        }
    };
}

run_files! {
    crosscoder => CROSSCODER,
    sae => SAE,
    config => CONFIG,
    metrics => METRICS,
    checkpoint_dir => CHECKPOINT,
    latents => LATENTS,
    summary => SUMMARY,
    analyze_state => ANALYZE_STATE,
    examples => EXAMPLES,
    kl => KL,
}

impl From<&Path> for RunDir {
    fn from(p: &Path) -> Self {
        Self::new(p)
    }
}

impl From<PathBuf> for RunDir {
    fn from(p: PathBuf) -> Self {
        Self::new(p)
    }
}
