//! The cache job: `crossdiff cache`, the app's Cache view and the demo's first stage.

use anyhow::Result;
use burn::tensor::Device;

use crate::activations::cache::CacheIndex;
pub use crate::activations::writer::CacheJob;
use crate::workflow::Handle;

/// What a cache run ends with.
#[derive(Debug, Clone)]
pub struct CacheOutcome {
    pub index: CacheIndex,
    /// The data ended before `--tokens`: the finished cache holds all the data had,
    /// `index.total_tokens` (fewer than the job's `tokens`; the shortfall is the difference). A
    /// front end says so ("the data ran out at 1,032 of 4,096 tokens"): the cache is complete and
    /// usable, only smaller than asked. `false` for a cache that reached `--tokens` and for a
    /// cancelled (unfinished) one.
    pub exhausted: bool,
    /// Tokens/s of the computation alone (from the first report after the models loaded).
    pub tokens_per_s: f64,
    /// Tokens this run computed (0 for a cache that was complete already).
    pub tokens_now: u64,
    pub seconds: f64,
}

/// Runs (or resumes) a cache job; stops after the current shard when the handle is cancelled.
pub fn run(job: &CacheJob, device: &Device, handle: Handle) -> Result<CacheOutcome> {
    job.validate()?;
    let started = std::time::Instant::now();
    // (time, tokens) at the first report, after the models loaded: the rate is this run's own.
    let mut first: Option<(std::time::Instant, u64)> = None;
    handle.progress("loading models", 0, job.tokens, "tokens");
    let index = crate::io::clean_on_failure(&job.out, || {
        crate::activations::writer::run_cache(
            job,
            device,
            |p| {
                first.get_or_insert((std::time::Instant::now(), p.tokens));
                handle.progress(p.phase, p.tokens, p.target, "tokens");
            },
            || handle.keep_going(),
        )
    })?;
    let tokens_now = first.map_or(0, |(_, n)| index.total_tokens.saturating_sub(n));
    let tokens_per_s = first.map_or(0.0, |(t, _)| tokens_now as f64 / t.elapsed().as_secs_f64().max(1e-9));
    let exhausted = index.complete && index.total_tokens < job.tokens;
    Ok(CacheOutcome { index, exhausted, tokens_per_s, tokens_now, seconds: started.elapsed().as_secs_f64() })
}

/// A cache as a run's data source: what it holds (layer, width, size) and, through its shards'
/// names, sizes and checksums, which activations exactly.
pub fn fingerprint(index: &CacheIndex) -> serde_json::Value {
    let mut bytes = Vec::new();
    for s in &index.shards {
        bytes.extend_from_slice(s.file.as_bytes());
        bytes.extend_from_slice(&s.tokens.to_le_bytes());
        bytes.extend_from_slice(&s.checksum.to_le_bytes());
    }
    serde_json::json!({
        "layer": index.layer,
        "width": index.d_model,
        "tokens": index.total_tokens,
        "shards": format!("{:016x}", crate::io::checksum(&bytes)),
    })
}

impl CacheOutcome {
    /// How the cache ended, for a summary line: "complete", "complete; the data ran out at N of the
    /// M tokens asked for", or `stopped` (each front end's words for an unfinished cache).
    pub fn state(&self, asked: u64, stopped: &str) -> String {
        match (self.index.complete, self.exhausted) {
            (true, true) => {
                format!("complete; the data ran out at {} of the {asked} tokens asked for", self.index.total_tokens)
            }
            (true, false) => "complete".to_string(),
            (false, _) => stopped.to_string(),
        }
    }
}
