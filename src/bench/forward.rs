//! `crossdiff bench forward`: prefill and decode throughput of the decoder forward, peak memory,
//! and (with [`crate::phases`] on) where a forward's time goes.

use std::time::Instant;

use anyhow::{Result, anyhow};
use serde::Serialize;

use crate::bad_value::{ensure, positive};
use crate::model::Model;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Serialize)]
pub struct ForwardBench {
    pub batch: usize,
    pub context: usize,
    pub decode_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Peak resident host memory of the process (VmHWM), bytes; left out where the OS has no VmHWM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_host_bytes: Option<u64>,
    /// Bytes the device allocator holds after the run, where the backend reports it.
    pub device_bytes: Option<u64>,
    /// Per-phase totals over the timed prefill forwards, when [`crate::phases`] recording was on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phases::PhaseTime>,
}

/// Times `repeats` full forwards of a `[batch, context]` batch of random tokens (after one warm-up),
/// then `decode_tokens` KV-cache decode steps after a `context`-token prompt.
pub fn bench_forward(
    model: &Model,
    batch: usize,
    context: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<ForwardBench> {
    positive(batch as u64, "batch")?;
    positive(context as u64, "context")?;
    positive(repeats as u64, "repeats")?;
    // A forward batch's activations must fit in memory: refuse before allocating.
    let d = model.lm.config.hidden_size.max(model.lm.config.intermediate_size);
    let bytes = (batch as f64) * (context as f64) * (d as f64) * 4.0 * 8.0;
    if let Some(total) = crate::io::memory_total_bytes() {
        ensure(bytes < total as f64, "batch", || {
            format!(
                "{batch} with --context {context}: about {:.1} GiB of activations, more than this machine's memory",
                bytes / (1u64 << 30) as f64
            )
        })?;
    }
    if let Some(max) = model.lm.config.max_position_embeddings {
        ensure(context.saturating_add(decode_tokens) <= max, "decode", || {
            format!("{decode_tokens} with --context {context} exceeds the model's context of {max} positions")
        })?;
    }
    let g = &model.lm;
    let vocab = g.config.vocab_size as u64;
    let mut rng = SplitMix64(7);
    let seqs: Vec<Vec<u32>> =
        (0..batch).map(|_| (0..context).map(|_| (rng.next_u64() % vocab) as u32).collect()).collect();
    let sync = || g.device().sync().map_err(|e| anyhow!("device sync failed: {e:?}"));

    let run = || -> Result<()> {
        let logits = g.forward(g.batch_ids(&seqs)?);
        drop(logits);
        sync()
    };
    run()?;
    // The phase totals, like the clock, cover the timed prefill forwards (not the warm-up, not decode).
    crate::phases::reset();
    let start = Instant::now();
    for _ in 0..repeats.max(1) {
        run()?;
    }
    let prefill = (batch * context * repeats.max(1)) as f64 / start.elapsed().as_secs_f64();
    let phases = crate::phases::take();
    crate::phases::disable();

    let mut decode = 0.0;
    if decode_tokens > 0 {
        let mut cache = g.new_cache();
        let prompt = g.batch_ids(&seqs)?;
        drop(g.step(prompt, &mut cache));
        sync()?;
        let start = Instant::now();
        let mut next: Vec<Vec<u32>> = vec![vec![1]; batch];
        for _ in 0..decode_tokens {
            let logits = g.step(g.batch_ids(&next)?, &mut cache);
            let rows = crate::counters::read_i64(logits.argmax(1))?;
            next = rows.iter().map(|&r| vec![r as u32]).collect();
        }
        decode = (batch * decode_tokens) as f64 / start.elapsed().as_secs_f64();
    }
    Ok(ForwardBench {
        batch,
        context,
        decode_tokens,
        prefill_tokens_per_s: prefill,
        decode_tokens_per_s: decode,
        peak_host_bytes: super::peak_rss_bytes(),
        device_bytes: g.device().memory_pool_usage().map(|u| u.bytes_in_use as u64),
        phases,
    })
}
