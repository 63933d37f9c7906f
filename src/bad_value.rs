//! [`BadValue`]: a setting with a value a job cannot use, named by its CLI flag, and the small
//! checks that produce one. Below every other module (the model's sampler uses it as the workflow
//! jobs do); `workflow::checks` re-exports it beside the checks that need models and runs.

use std::fmt;
use std::path::Path;

use anyhow::Result;

/// A setting with a value the job cannot use: `flag` is the CLI flag without dashes (`dict-size`),
/// `rule` completes the sentence after the setting's name ("must be positive").
#[derive(Debug, Clone, PartialEq)]
pub struct BadValue {
    pub flag: &'static str,
    pub rule: String,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--{} {}", self.flag, self.rule)
    }
}

impl std::error::Error for BadValue {}

impl BadValue {
    /// The same error with the setting called `label` (the app's field names).
    pub fn with_label(&self, label: &str) -> String {
        format!("{label} {}", self.rule)
    }

    /// The `BadValue` anywhere in an error's chain.
    pub fn find(err: &anyhow::Error) -> Option<&BadValue> {
        err.chain().find_map(|e| e.downcast_ref::<BadValue>())
    }
}

/// An error naming `flag`.
pub fn bad(flag: &'static str, rule: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadValue { flag, rule: rule.into() })
}

/// `Err(bad(flag, rule))` unless `ok`.
pub fn ensure(ok: bool, flag: &'static str, rule: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(bad(flag, rule())) }
}

/// A count that must be at least 1.
pub fn positive(value: u64, flag: &'static str) -> Result<()> {
    ensure(value > 0, flag, || "must be positive, not 0".into())
}

/// A finite number > 0.
pub fn finite_positive(value: f64, flag: &'static str) -> Result<()> {
    ensure(value.is_finite() && value > 0.0, flag, || format!("must be a positive finite number, not {value}"))
}

/// A finite number ≥ 0.
pub fn finite_non_negative(value: f64, flag: &'static str) -> Result<()> {
    ensure(value.is_finite() && value >= 0.0, flag, || format!("must be a finite number ≥ 0, not {value}"))
}

/// A path that must be given.
pub fn path_given(path: &Path, flag: &'static str) -> Result<()> {
    ensure(!path.as_os_str().is_empty(), flag, || "is required (a path)".into())
}

/// A folder holds a job (a cache, a run) started with other settings: resuming it with these would
/// mix the two. `changed` lists the settings by flag, old → new. Its own type so that a front end
/// that chose the folder by another flag (the demo's `--project`) can say so.
#[derive(Debug, Clone, PartialEq)]
pub struct OtherSettings {
    /// The file that records the settings (cache.json, checkpoint/state.json).
    pub file: std::path::PathBuf,
    /// "the cache there was made" / "the run there was started".
    pub what: &'static str,
    pub changed: String,
}

impl fmt::Display for OtherSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} with other settings: {}; re-run the same command to resume it, or choose another --out",
            self.file.display(),
            self.what,
            self.changed
        )
    }
}

impl std::error::Error for OtherSettings {}
