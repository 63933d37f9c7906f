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
    /// Tokens/s of the computation alone (from the first report after the models loaded).
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// Runs (or resumes) a cache job; stops after the current shard when the handle is cancelled.
pub fn run(job: &CacheJob, device: &Device, handle: Handle) -> Result<CacheOutcome> {
    job.validate()?;
    let started = std::time::Instant::now();
    // (time, tokens) at the first report, after the models loaded: the rate is this run's own.
    let mut first: Option<(std::time::Instant, u64)> = None;
    handle.progress("loading models", 0, job.tokens, "tokens");
    let index = crate::activations::writer::run_cache(
        job,
        device,
        |p| {
            first.get_or_insert((std::time::Instant::now(), p.tokens));
            handle.progress(p.phase, p.tokens, p.target, "tokens");
        },
        || handle.keep_going(),
    )?;
    let tokens_per_s =
        first.map_or(0.0, |(t, n)| index.total_tokens.saturating_sub(n) as f64 / t.elapsed().as_secs_f64().max(1e-9));
    Ok(CacheOutcome { index, tokens_per_s, seconds: started.elapsed().as_secs_f64() })
}
