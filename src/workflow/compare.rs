//! The methods comparison job (`crossdiff compare`, the app's Methods view): crosscoder runs,
//! diff-SAE runs and lens folders side by side (`crate::analysis::methods`).

use std::path::PathBuf;

use anyhow::Result;

use crate::analysis::methods::{MethodRow, check_out, compare_methods};

/// `crossdiff compare`: the KL gap each method closes, the latents it calls chat-specific, its top
/// latents or tokens — from what `analyze`, `kl` and `adl` wrote for the same data.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CompareJob {
    /// Run folders: crosscoders and SAEs, each analysed (and, for the KL columns, `kl` run on it).
    #[arg(long, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Activation-difference-lens folders (`crossdiff adl --out`).
    #[arg(long, num_args = 1..)]
    pub adl: Vec<PathBuf>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl CompareJob {
    pub fn run(&self) -> Result<Vec<MethodRow>> {
        if let Some(out) = &self.out {
            check_out(out)?;
        }
        let rows = compare_methods(&self.runs, &self.adl)?;
        if let Some(out) = &self.out {
            let text = serde_json::to_string_pretty(&rows)?;
            crate::io::write_atomic(out, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
        }
        Ok(rows)
    }
}
