//! `crossdiff bench cache`: caching as `crossdiff cache` runs it, over generated sentences or the
//! user's own data files.

use anyhow::Result;
use serde::Serialize;

/// `bench cache`: caching tokens/s over generated text, and (with a [`crate::counters::Counting`]
/// running) readbacks and dispatches per forward batch.
#[derive(Debug, Serialize)]
pub struct CacheBench {
    pub tokens: u64,
    /// The whole run, loading the models included.
    pub seconds: f64,
    /// After the models loaded.
    pub tokens_per_s: f64,
    pub forward_batches: u64,
    pub readbacks_per_batch: f64,
    pub dispatches_per_batch: f64,
    /// Per-phase totals over the run (model loading included), when [`crate::phases`] was on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phases::PhaseTime>,
}

/// Caches `tokens` pairs at `layer` of `base`/`chat` into a temporary folder, timed after the models
/// load: of `data` (mixed 1:1, as `cache --mix` reads it) when given, else of generated sentences (the
/// demo corpus's words).
#[allow(clippy::too_many_arguments)]
pub fn bench_cache(
    device: &burn::tensor::Device,
    base: &std::path::Path,
    chat: &std::path::Path,
    layer: usize,
    tokens: u64,
    context: usize,
    batch_tokens: usize,
    data: &[std::path::PathBuf],
) -> Result<CacheBench> {
    super::check_tokens(tokens)?;
    let root = std::env::temp_dir().join(format!("crossdiff-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    fs_err::create_dir_all(&root)?;
    let data = if data.is_empty() {
        let corpus = crate::demo::corpus::generate(1, 4000, 0);
        let text = root.join("text.txt");
        fs_err::write(&text, corpus.web.join("\n\n"))?;
        vec![text]
    } else {
        data.to_vec()
    };
    let mix = data.len() > 1;
    let job = crate::workflow::cache::CacheJob {
        base: base.to_path_buf(),
        chat: chat.to_path_buf(),
        data,
        mix,
        layer,
        tokens,
        out: root.join("cache"),
        tokenize: crate::data::TokenizeOptions { context, ..Default::default() },
        batch_tokens,
        ..Default::default()
    };
    let counting = crate::counters::Counting::start();
    crate::phases::reset();
    let done = crate::workflow::cache::run(&job, device, crate::workflow::Handle::silent());
    let phases = crate::phases::take();
    crate::phases::disable();
    let (readbacks, dispatches, batches) = (counting.readbacks(), counting.dispatches(), counting.forward_batches());
    drop(counting);
    let _ = std::fs::remove_dir_all(&root);
    let done = done?;
    let per = |n: u64| n as f64 / batches.max(1) as f64;
    Ok(CacheBench {
        tokens: done.index.total_tokens,
        seconds: done.seconds,
        tokens_per_s: done.tokens_per_s,
        forward_batches: batches,
        readbacks_per_batch: per(readbacks),
        dispatches_per_batch: per(dispatches),
        phases,
    })
}
