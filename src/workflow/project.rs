//! A project: one folder holding (or pointing at) the base and chat models, data files, the
//! activation cache and crosscoder runs, described by `crossdiff-project.json` in that folder.
//! Relative paths are relative to the folder.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::io::write_atomic;

pub const FILE: &str = "crossdiff-project.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Project {
    #[serde(skip)]
    pub dir: PathBuf,
    pub base: PathBuf,
    pub chat: PathBuf,
    /// A PEFT LoRA adapter merged into the chat model (`chat` is then the adapter's base); absent
    /// from the file when there is none, so projects without one read and write as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_adapter: Option<PathBuf>,
    #[serde(default)]
    pub data: Vec<PathBuf>,
    #[serde(default = "default_cache")]
    pub cache: PathBuf,
    #[serde(default)]
    pub runs: Vec<PathBuf>,
}

fn default_cache() -> PathBuf {
    PathBuf::from("cache")
}

impl Project {
    /// Opens `dir/crossdiff-project.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
        let mut p: Project = serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        p.dir = dir.to_path_buf();
        Ok(p)
    }

    /// Creates a project in `dir` (made if missing), with a `runs/` folder.
    pub fn create(dir: &Path, base: PathBuf, chat: PathBuf, data: Vec<PathBuf>) -> Result<Self> {
        Self::create_adapted(dir, base, chat, None, data)
    }

    /// [`Project::create`] for a chat model made as `chat` with the LoRA adapter `chat_adapter`.
    pub fn create_adapted(
        dir: &Path,
        base: PathBuf,
        chat: PathBuf,
        chat_adapter: Option<PathBuf>,
        data: Vec<PathBuf>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir.join("runs")).map_err(|e| anyhow!("{}: cannot create: {e}", dir.display()))?;
        let p = Project {
            dir: dir.to_path_buf(),
            base,
            chat,
            chat_adapter,
            data,
            cache: default_cache(),
            runs: Vec::new(),
        };
        p.save()?;
        Ok(p)
    }

    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        write_atomic(&self.dir.join(FILE), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }

    /// A project path made absolute.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.dir.join(p) }
    }

    /// The run directories: listed ones, plus any folder under `runs/` with a crosscoder in it.
    pub fn run_dirs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.runs.iter().map(|r| self.resolve(r)).collect();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("runs")) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| crate::run_dir::RunDir::new(p).has_crosscoder())
                .collect();
            found.sort();
            for f in found {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        out
    }
}

/// Most-recent-first list of project folders, without duplicates, at most `cap` long.
pub fn remember(recent: &mut Vec<PathBuf>, dir: &Path, cap: usize) {
    recent.retain(|p| p != dir);
    recent.insert(0, dir.to_path_buf());
    recent.truncate(cap);
}
