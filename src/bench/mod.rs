//! `crossdiff bench …`: the benchmarks' measurements (forward in `forward.rs`, caching in
//! `cache.rs`; training, reader and analyze here).

use std::time::Instant;

use anyhow::{Result, anyhow};
use serde::Serialize;

use crate::bad_value::{ensure, positive};

mod cache;
mod forward;
use crate::rng::SplitMix64;
pub use cache::{CacheBench, bench_cache};
pub use forward::{ForwardBench, bench_forward};

/// A benchmark's token count: at least one, at most 10⁸ (a bound on a typo, not on a real run).
fn check_tokens(tokens: u64) -> Result<()> {
    positive(tokens, "tokens")?;
    ensure(tokens <= 100_000_000, "tokens", || format!("must be at most 100000000, not {tokens}"))
}

/// A benchmark crosscoder's size: positive, k within D, and training state that fits in memory.
fn check_size(d: usize, dict: usize, k: usize, batch: usize) -> Result<()> {
    positive(d as u64, "d")?;
    ensure(d <= MAX_D, "d", || format!("must be at most {MAX_D}, not {d}"))?;
    ensure(batch <= 1 << 24, "batch", || format!("must be at most {}, not {batch}", 1 << 24))?;
    positive(dict as u64, "dict-size")?;
    positive(k as u64, "k")?;
    positive(batch as u64, "batch")?;
    ensure(k <= dict, "k", || format!("{k} is larger than the dictionary (--dict-size {dict})"))?;
    if let Some(total) = crate::io::memory_total_bytes() {
        let needed = crate::crosscoder::train::training_bytes(crate::crosscoder::Kind::BatchTopK, d, dict, batch);
        ensure(needed <= total as f64, "dict-size", || {
            format!(
                "{dict} with --d {d}: about {:.1} GiB of training state, more than this machine's {:.1} GiB",
                needed / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            )
        })?;
    }
    Ok(())
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Debug, Clone, Serialize)]
pub struct ReaderBench {
    pub tokens: u64,
    pub reader_tokens_per_s: f64,
    /// f32 pair bytes delivered per second (what training consumes).
    pub reader_gb_per_s: f64,
    /// Sequential read of the shard files, bytes as stored per second.
    pub raw_read_gb_per_s: f64,
}

/// One epoch through the shuffled reader, then a plain sequential read of every shard file.
pub fn bench_reader(cache: &std::path::Path, batch: usize, shuffle_tokens: usize) -> Result<ReaderBench> {
    positive(batch as u64, "batch")?;
    ensure(shuffle_tokens >= batch, "shuffle-tokens", || {
        format!("({shuffle_tokens}) must be at least --batch ({batch})")
    })?;
    use crate::activations::reader::{CacheReader, ReaderConfig};
    let cfg = ReaderConfig { batch, shuffle_tokens, epochs: Some(1), ..Default::default() };
    let mut reader = CacheReader::open(cache, cfg)?;
    let d = reader.index.d_model;
    let start = Instant::now();
    let mut tokens = 0u64;
    while let Some(b) = reader.next_batch()? {
        tokens += b.batch as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let index = reader.index.clone();
    let start = Instant::now();
    let mut bytes = 0u64;
    for s in &index.shards {
        bytes += fs_err::read(cache.join(&s.file))?.len() as u64;
    }
    let raw = bytes as f64 / start.elapsed().as_secs_f64() / 1e9;
    Ok(ReaderBench {
        tokens,
        reader_tokens_per_s: tokens as f64 / secs,
        reader_gb_per_s: (tokens * 2 * d as u64 * 4) as f64 / secs / 1e9,
        raw_read_gb_per_s: raw,
    })
}

/// Writes a cache of `tokens` random pairs of width `d` (bf16, shards of `shard_tokens`) for
/// benchmarking the reader at real sizes without running a model.
/// The most synthetic tokens / the widest rows a benchmark writes (a paper-scale cache is 10⁸
/// tokens at d = 2304; this bounds a typo, not a real run).
const MAX_SYNTHETIC_TOKENS: u64 = 1_000_000_000;
const MAX_D: usize = 65_536;

pub fn write_synthetic_cache(dir: &std::path::Path, tokens: u64, d: usize, shard_tokens: u64) -> Result<()> {
    positive(tokens, "synthetic-tokens")?;
    ensure(tokens <= MAX_SYNTHETIC_TOKENS, "synthetic-tokens", || {
        format!("must be at most {MAX_SYNTHETIC_TOKENS}, not {tokens}")
    })?;
    positive(d as u64, "d")?;
    ensure(d <= MAX_D, "d", || format!("must be at most {MAX_D}, not {d}"))?;
    let bytes = tokens as f64 * 2.0 * d as f64 * 2.0;
    ensure(bytes < 4e12, "synthetic-tokens", || format!("{tokens} at --d {d} would write {:.0} GB", bytes / 1e9))?;
    // Never over a folder the user made: only a new or empty one, or an earlier synthetic cache.
    let earlier = crate::activations::cache::CacheIndex::open(dir)
        .is_ok_and(|i| i.models.iter().any(|m| m.starts_with("synthetic-")));
    let empty = std::fs::read_dir(dir).map_or(true, |mut e| e.next().is_none());
    ensure(empty || earlier, "cache", || {
        format!(
            "{} holds other files (a real cache?); --synthetic-tokens writes a new cache: choose an empty or new folder",
            dir.display()
        )
    })?;
    if earlier {
        std::fs::remove_dir_all(dir)
            .map_err(|e| anyhow!("{}: cannot replace the earlier synthetic cache: {e}", dir.display()))?;
    }
    let mut rng = SplitMix64(1);
    write_cache(dir, tokens, d, shard_tokens, |row| row.iter_mut().for_each(|x| *x = rng.next_f64() as f32 - 0.5))
}

/// Writes a bf16 cache of `tokens` pairs `[2d]` filled by `fill` (rows start at zero), in shards.
fn write_cache(
    dir: &std::path::Path,
    tokens: u64,
    d: usize,
    shard_tokens: u64,
    mut fill: impl FnMut(&mut [f32]),
) -> Result<()> {
    use crate::activations::cache::{ActDtype, CacheIndex, FORMAT, ShardInfo, checksum};
    use crate::io::{OwnedTensor, write_safetensors};
    fs_err::create_dir_all(dir)?;
    let mut shards = Vec::new();
    let mut done = 0;
    while done < tokens {
        let n = (tokens - done).min(shard_tokens) as usize;
        let mut values = vec![0.0f32; n * 2 * d];
        values.chunks_exact_mut(2 * d).for_each(&mut fill);
        let mut bytes = Vec::new();
        ActDtype::Bf16.encode(&values, &mut bytes);
        let file = format!("acts-{:05}.safetensors", shards.len());
        let path = dir.join(&file);
        let acts = OwnedTensor { name: "acts".into(), dtype: safetensors::Dtype::BF16, shape: vec![n, 2, d], bytes };
        write_safetensors(&path, &[acts])?;
        shards.push(ShardInfo { file, tokens: n as u64, documents: 0, checksum: checksum(&fs_err::read(&path)?) });
        done += n as u64;
    }
    CacheIndex {
        format: FORMAT.into(),
        d_model: d,
        layer: Some(0),
        model_ids: Vec::new(),
        dtype: ActDtype::Bf16,
        models: vec!["synthetic-base".into(), "synthetic-chat".into()],
        total_tokens: tokens,
        shards,
        sources: Vec::new(),
        settings: None,
        documents: 0,
        complete: true,
        partial_shards: Vec::new(),
    }
    .write(dir)
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub steps: u64,
    pub seconds_per_step: f64,
    pub tokens_per_s: f64,
    pub peak_host_bytes: Option<u64>,
    /// Device→host readbacks and kernel dispatches per step over the timed steps (metrics logged
    /// once, at the last step, as a run logging every 10 steps would).
    pub readbacks_per_step: f64,
    pub dispatches_per_step: f64,
    /// Per-phase totals over the timed steps when [`crate::phases`] recording was on (`--phases`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phases::PhaseTime>,
}

/// Warm-up steps before the clock starts: the first step allocates and compiles kernels, and on the
/// CPU the first two grow the heap to its working size (every page touched the first time is a
/// fault; the steps after reuse the same memory, src/host_memory.rs).
const WARMUP_STEPS: u64 = 2;

/// Times `steps` training steps (after [`WARMUP_STEPS`]) on random Gaussian pairs.
pub fn bench_train(
    device: &burn::tensor::Device,
    devices: &[burn::tensor::Device],
    kind: crate::crosscoder::Kind,
    d: usize,
    dict: usize,
    k: usize,
    batch: usize,
    steps: u64,
) -> Result<TrainBench> {
    check_size(d, dict, k, batch)?;
    positive(steps, "steps")?;
    use crate::activations::reader::PairBatch;
    use crate::crosscoder::train::{PairSource, TrainConfig, TrainRun};
    struct Random<'a> {
        rng: SplitMix64,
        d: usize,
        batch: usize,
        calls: u64,
        window_start: std::rc::Rc<std::cell::Cell<Option<(Instant, u64, u64)>>>,
        counting: &'a crate::counters::Counting,
    }
    impl PairSource for Random<'_> {
        fn next_batch(&mut self) -> Result<Option<PairBatch>> {
            self.calls += 1;
            if self.calls == WARMUP_STEPS + 1 {
                let c = self.counting;
                // The phase totals, like the clock, start after the warm-up steps.
                crate::phases::reset();
                self.window_start.set(Some((Instant::now(), c.readbacks(), c.dispatches())));
            }
            let acts = (0..self.batch * 2 * self.d).map(|_| (self.rng.next_f64() as f32 - 0.5) * 2.0).collect();
            Ok(Some(PairBatch { acts, batch: self.batch, d: self.d }))
        }
    }
    let dir = std::env::temp_dir().join(format!("crossdiff-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Metrics only at the last step (the default interval is longer than a benchmark).
    let config =
        TrainConfig { k, steps: steps + WARMUP_STEPS, checkpoint_every: 0, ..TrainConfig::defaults(kind, dict) };
    let counting = crate::counters::Counting::start();
    // Timed (and counted) from the start of step 3 (after allocation and kernel compilation) to
    // the end of the last step; the final checkpoint and export are outside the window.
    let window_start: std::rc::Rc<std::cell::Cell<Option<(Instant, u64, u64)>>> = Default::default();
    let mut src =
        Random { rng: SplitMix64(1), d, batch, calls: 0, window_start: window_start.clone(), counting: &counting };
    let mut end: Option<(Instant, u64, u64)> = None;
    TrainRun {
        config,
        out: dir.clone(),
        device: devices.first().unwrap_or(device).clone(),
        devices: devices.to_vec(),
        source: &mut src,
        validation: None,
        layer: None,
        models: vec![],
        model_ids: vec![],
        width: d,
        source_fingerprint: serde_json::Value::Null,
    }
    .run(
        |_| {
            end = Some((Instant::now(), counting.readbacks(), counting.dispatches()));
            // The checkpoint and export after the last step are outside the window.
            crate::phases::disable();
        },
        || true,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    let ((t0, r0, d0), (t1, r1, d1)) = (
        window_start.get().ok_or_else(|| anyhow::anyhow!("bench train: no step ran after the warm-up"))?,
        end.ok_or_else(|| anyhow::anyhow!("bench train: no step finished"))?,
    );
    let secs = (t1 - t0).as_secs_f64().max(1e-9);
    Ok(TrainBench {
        steps,
        seconds_per_step: secs / steps as f64,
        tokens_per_s: (steps as usize * batch) as f64 / secs,
        peak_host_bytes: peak_rss_bytes(),
        readbacks_per_step: (r1 - r0) as f64 / steps as f64,
        dispatches_per_step: (d1 - d0) as f64 / steps as f64,
        phases: crate::phases::take(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct AnalyzeBench {
    pub tokens: u64,
    pub chat_only: usize,
    pub shared: usize,
    pub dict_size: usize,
    pub analyze_tokens_per_s: f64,
    pub examples_seconds: f64,
    /// Median and worst time to fetch one latent's dashboard data from the examples store.
    pub query_ms_median: f64,
    pub query_ms_max: f64,
    /// Device→host readbacks and kernel dispatches per analysed batch (of 256 pairs).
    pub readbacks_per_batch: f64,
    pub dispatches_per_batch: f64,
    /// Per-phase totals over the analysis, when [`crate::phases`] recording was on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<crate::phases::PhaseTime>,
}

/// The planted 2B-width case: `tokens` synthetic pairs of width `d` built from `dict` known unit
/// directions (a tenth chat-only, a tenth base-only, the rest shared; ~`k` active per token) and a
/// crosscoder whose latents are exactly those directions. Runs analyze and the examples store over
/// it, then 200 random latent queries.
pub fn bench_analyze(
    device: &burn::tensor::Device,
    d: usize,
    dict: usize,
    k: usize,
    tokens: u64,
    threshold: f32,
) -> Result<AnalyzeBench> {
    check_size(d, dict, k, 256)?;
    check_tokens(tokens)?;
    use crate::crosscoder::{Crosscoder, CrosscoderConfig, Kind, Params, tensor};
    let root = std::env::temp_dir().join(format!("crossdiff-bench-analyze-{}", std::process::id()));
    let (run, cache) = (root.join("run"), root.join("cache"));
    let _ = std::fs::remove_dir_all(&root);
    let mut rng = SplitMix64(5);
    // Directions: one unit vector per latent; which models carry it depends on its kind.
    let mut dirs = vec![0.0f32; dict * d];
    for row in dirs.chunks_exact_mut(d) {
        row.iter_mut().for_each(|x| *x = rng.next_f64() as f32 - 0.5);
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    let kind = |j: usize| match j % 10 {
        0 => 1u8, // chat-only
        1 => 2,   // base-only
        _ => 0,   // shared
    };
    let (in_base, in_chat) = (|j: usize| kind(j) != 1, |j: usize| kind(j) != 2);
    // Pairs: each token activates ~k latents with magnitudes in [0.5, 1.5).
    write_cache(&cache, tokens, d, 65536, |row| {
        for _ in 0..k {
            let j = (rng.next_u64() % dict as u64) as usize;
            let a = 0.5 + rng.next_f64() as f32;
            let v = &dirs[j * d..(j + 1) * d];
            if in_base(j) {
                row[..d].iter_mut().zip(v).for_each(|(x, y)| *x += a * y);
            }
            if in_chat(j) {
                row[d..].iter_mut().zip(v).for_each(|(x, y)| *x += a * y);
            }
        }
    })?;
    let mut enc = vec![0.0f32; 2 * d * dict];
    let mut dec = vec![0.0f32; dict * 2 * d];
    for j in 0..dict {
        for i in 0..d {
            let v = dirs[j * d + i];
            if in_base(j) {
                enc[i * dict + j] = v;
                dec[j * 2 * d + i] = v;
            }
            if in_chat(j) {
                enc[(d + i) * dict + j] = v;
                dec[j * 2 * d + d + i] = v;
            }
        }
    }
    let cc = Crosscoder {
        config: CrosscoderConfig {
            kind: Kind::BatchTopK,
            d,
            dict_size: dict,
            k,
            mu: 0.0,
            layer: None,
            models: vec![],
            model_ids: vec![],
            target: None,
        },
        params: Params {
            w_enc: tensor(enc, [2 * d, dict], device),
            b_enc: tensor(vec![-0.3; dict], [1, dict], device),
            w_dec: tensor(dec, [dict, 2 * d], device),
            b_dec: tensor(vec![0.0; 2 * d], [1, 2 * d], device),
        },
        threshold: Some(threshold),
        file_checksum: None,
    };
    cc.save(&run)?;
    let run = crate::run_dir::RunDir::new(run);
    let cache = cache.as_path();
    let opts = crate::analysis::analyze::AnalyzeOptions { tokens: Some(tokens), batch: 256, ..Default::default() };
    let start = Instant::now();
    let counting = crate::counters::Counting::start();
    crate::phases::reset();
    let (rows, summary) = crate::analysis::analyze::analyze(&run, &cc, cache, device, &opts, |_, _| {}, || true)?;
    let analyze_secs = start.elapsed().as_secs_f64();
    let phases = crate::phases::take();
    crate::phases::disable();
    let batches = summary.tokens.div_ceil(opts.batch as u64).max(1) as f64;
    let (readbacks_per_batch, dispatches_per_batch) =
        (counting.readbacks() as f64 / batches, counting.dispatches() as f64 / batches);
    drop(counting);
    run.write_latents(&rows, &summary)?;
    let start = Instant::now();
    let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
    let ex = crate::analysis::examples::ExamplesOptions { batch: 256, ..Default::default() };
    crate::analysis::examples::build_examples(&run, &cc, cache, device, &max_act, None, &ex, Some(tokens))?;
    let examples_seconds = start.elapsed().as_secs_f64();
    let store = crate::analysis::examples::ExamplesStore::open(run.path())?;
    let mut rng = SplitMix64(9);
    let mut times: Vec<f64> = (0..200)
        .map(|_| {
            let j = (rng.next_u64() % dict as u64) as usize;
            let t = Instant::now();
            let _ = store.latent(j);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let _ = std::fs::remove_dir_all(&root);
    Ok(AnalyzeBench {
        tokens: summary.tokens,
        chat_only: summary.count(crate::analysis::latents::LatentClass::ChatOnly),
        shared: summary.count(crate::analysis::latents::LatentClass::Shared),
        dict_size: dict,
        analyze_tokens_per_s: summary.tokens as f64 / analyze_secs,
        examples_seconds,
        query_ms_median: times[times.len() / 2],
        query_ms_max: times[times.len() - 1],
        readbacks_per_batch,
        dispatches_per_batch,
        phases,
    })
}
