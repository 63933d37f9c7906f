//! `crossdiff bench …`: the benchmarks; each prints one JSON line and a summary line.

use anyhow::Result;
use clap::Subcommand;
use crossdiff::Backend;
use crossdiff::crosscoder::Kind;
use std::path::PathBuf;

use super::ModelArgs;

/// A crosscoder's size (default: the paper's, on Gemma 2 2B).
#[derive(clap::Args)]
pub struct CrosscoderSize {
    /// Width of one model's activations.
    #[arg(long, default_value_t = 2304)]
    d: usize,
    #[arg(long, default_value_t = 73_728)]
    dict_size: usize,
    #[arg(long, default_value_t = 100)]
    k: usize,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s and peak memory of the Gemma 2 forward.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        context: usize,
        /// Decode steps to time after a `context`-token prompt.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Print where a prefill forward's time goes (embedding, attention, MLP, unembedding, and
        /// the rest: norms and residual adds).
        #[arg(long)]
        phases: bool,
    },
    /// Crosscoder training steps/s and tokens/s on random pairs.
    Train {
        #[command(flatten)]
        size: CrosscoderSize,
        #[arg(long, default_value_t = 2048)]
        batch: usize,
        #[arg(long, default_value = "batchtopk")]
        kind: Kind,
        #[arg(long, default_value_t = 5)]
        steps: u64,
        /// End with `readbacks/step=R dispatches/step=N` (device→host reads and kernel launches).
        #[arg(long)]
        counters: bool,
        /// Print where a step's time goes: encoder forward, selection, sparse decode, loss and
        /// backward, AuxK, gradient assembly, clip, optimizer, and the host↔device transfers inside
        /// them (time and bytes per step).
        #[arg(long)]
        phases: bool,
        /// Data-parallel over these devices (as `train --devices`).
        #[arg(long, value_delimiter = ',', value_name = "DEV,DEV,…")]
        devices: Vec<Backend>,
    },
    /// analyze throughput and the examples store's per-latent query time on the planted case:
    /// synthetic pairs from known directions and a crosscoder made of them.
    Analyze {
        #[command(flatten)]
        size: CrosscoderSize,
        #[arg(long, default_value_t = 2048)]
        tokens: u64,
        /// End with `readbacks/batch=R dispatches/batch=N` (per analysed batch of 256 pairs).
        #[arg(long)]
        counters: bool,
        /// Print where the analysis's time goes (shards read, rows decoded, encoder and decoder,
        /// per-batch statistics, host accumulation, Latent Scaling).
        #[arg(long)]
        phases: bool,
        /// The planted crosscoder's θ: 0.4 keeps about a quarter of the latents per token (dense
        /// codes); 1.8 keeps about k, as a trained BatchTopK crosscoder's θ does.
        #[arg(long, default_value_t = 0.4)]
        threshold: f32,
    },
    /// Caching tokens/s of a model pair over generated sentences (the demo corpus's words) or
    /// `--data` files, as `crossdiff cache` runs it; nothing is kept.
    Cache {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        chat: PathBuf,
        #[arg(long, default_value_t = 13)]
        layer: usize,
        #[arg(long, default_value_t = 65_536)]
        tokens: u64,
        #[arg(long, default_value_t = 1024)]
        context: usize,
        #[arg(long, default_value_t = crossdiff::activations::writer::DEFAULT_BATCH_TOKENS)]
        batch_tokens: usize,
        /// Cache these files instead of generated sentences (several: mixed 1:1, as `cache --mix`).
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        /// End with `readbacks/batch=R dispatches/batch=N` (per forward batch of one model).
        #[arg(long)]
        counters: bool,
        /// Print where caching's time goes (model loading, documents, the models' embedding,
        /// attention, MLP, the readbacks, checking and writing shards).
        #[arg(long)]
        phases: bool,
    },
    /// Reader throughput (GB/s of f32 pairs delivered) beside a raw sequential read of the shards.
    Reader {
        /// The cache to read; with --synthetic-tokens it is created there first (random bf16 pairs).
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        synthetic_tokens: Option<u64>,
        /// Width of the synthetic pairs (2304 = Gemma 2 2B).
        #[arg(long, default_value_t = 2304)]
        d: usize,
        #[arg(long, default_value_t = 2048)]
        batch: usize,
        #[arg(long, default_value_t = 262144)]
        shuffle_tokens: usize,
    },
}

pub fn run(which: BenchCommand, backend: &Backend) -> Result<()> {
    match which {
        BenchCommand::Train {
            size: CrosscoderSize { d, dict_size, k },
            batch,
            kind,
            steps,
            counters,
            phases,
            devices,
        } => {
            // With --devices those are connected; --backend is not used.
            let device = if devices.is_empty() { backend.device()? } else { burn::tensor::Device::flex() };
            let on = super::on_devices(&devices, backend.describe(), "data-parallel over");
            let devices = crossdiff::backend::connect_devices(&devices)?;
            if phases {
                crossdiff::phases::enable();
            }
            let r = crossdiff::bench::bench_train(&device, &devices, kind, d, dict_size, k, batch, steps)?;
            crossdiff::phases::disable();
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench train: {:?} d={d} D={dict_size} k={k} batch {batch}: {:.3} s/step, {:.0} tokens/s, peak host {} MiB ({})",
                kind,
                r.seconds_per_step,
                r.tokens_per_s,
                r.peak_host_bytes.unwrap_or(0) / (1 << 20),
                on
            );
            if phases {
                print_phases(&r, steps);
            }
            if counters {
                println!("readbacks/step={:.1} dispatches/step={:.1}", r.readbacks_per_step, r.dispatches_per_step);
            }
        }
        BenchCommand::Analyze { size: CrosscoderSize { d, dict_size, k }, tokens, counters, phases, threshold } => {
            let device = backend.device()?;
            if phases {
                crossdiff::phases::enable();
            }
            let r = crossdiff::bench::bench_analyze(&device, d, dict_size, k, tokens, threshold)?;
            crossdiff::phases::disable();
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench analyze: {:.0} tokens/s (D={dict_size}), examples store {:.1}s, latent query {:.2} ms median / {:.2} ms max ({})",
                r.analyze_tokens_per_s,
                r.examples_seconds,
                r.query_ms_median,
                r.query_ms_max,
                backend.describe()
            );
            if phases {
                let secs = r.tokens as f64 / r.analyze_tokens_per_s;
                print_phase_table(&r.phases, secs, r.tokens as f64 / 1000.0, "ms/1k tok", "(rest)");
            }
            if counters {
                println!("readbacks/batch={:.1} dispatches/batch={:.1}", r.readbacks_per_batch, r.dispatches_per_batch);
            }
        }
        BenchCommand::Cache { base, chat, layer, tokens, context, batch_tokens, data, counters, phases } => {
            let device = backend.device()?;
            if phases {
                crossdiff::phases::enable();
            }
            let r = crossdiff::bench::bench_cache(&device, &base, &chat, layer, tokens, context, batch_tokens, &data)?;
            crossdiff::phases::disable();
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench cache: {:.0} tokens/s after loading ({} tokens, layer {layer}, {} forward batches, {:.1}s; {})",
                r.tokens_per_s,
                r.tokens,
                r.forward_batches,
                r.seconds,
                backend.describe()
            );
            if phases {
                // The phases cover the run's whole time, loading included (as `seconds` does).
                print_phase_table(
                    &r.phases,
                    r.seconds,
                    r.tokens as f64 / 1000.0,
                    "ms/1k tok",
                    "(rest: index, progress, bookkeeping)",
                );
            }
            if counters {
                println!("readbacks/batch={:.1} dispatches/batch={:.1}", r.readbacks_per_batch, r.dispatches_per_batch);
            }
        }
        BenchCommand::Reader { cache, synthetic_tokens, d, batch, shuffle_tokens } => {
            if let Some(tokens) = synthetic_tokens {
                crossdiff::bench::write_synthetic_cache(&cache, tokens, d, 65536)?;
            }
            let r = crossdiff::bench::bench_reader(&cache, batch, shuffle_tokens)?;
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench reader: {:.2} GB/s of f32 pairs ({:.0} tokens/s), raw sequential read {:.2} GB/s of shard bytes",
                r.reader_gb_per_s, r.reader_tokens_per_s, r.raw_read_gb_per_s
            );
        }
        BenchCommand::Forward { model, batch, context, decode, repeats, phases } => {
            let m = super::load(&model, backend)?;
            if phases {
                crossdiff::phases::enable();
            }
            let r = crossdiff::bench::bench_forward(&m, batch, context, decode, repeats)?;
            crossdiff::phases::disable();
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench forward: prefill {:.1} tokens/s, decode {:.1} tokens/s, peak host {} MiB ({}, batch {batch}, context {context})",
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.peak_host_bytes.unwrap_or(0) / (1 << 20),
                backend.describe()
            );
            if phases {
                let per_forward = (batch * context) as f64 / r.prefill_tokens_per_s;
                let n = repeats.max(1) as f64;
                print_phase_table(
                    &r.phases,
                    per_forward * n,
                    n,
                    "ms/forward",
                    "(rest: norms, residual adds, masks, RoPE tables)",
                );
            }
        }
    }
    Ok(())
}

/// A phase table: each phase's time per unit (a forward, 1k tokens), its share of `total_seconds`
/// and its bytes per unit; the remainder on a last line named `rest`.
fn print_phase_table(phases: &[crossdiff::phases::PhaseTime], total_seconds: f64, units: f64, per: &str, rest: &str) {
    let units = units.max(1e-9);
    println!("{:<52} {:>12} {:>7} {:>12}", "phase", per, "share", "MB per unit");
    let mut accounted = 0.0;
    for p in phases {
        if p.name != crossdiff::phases::TRANSFERS {
            accounted += p.seconds;
        }
        let mb = if p.bytes > 0 { format!("{:.2}", p.bytes as f64 / units / 1e6) } else { "—".into() };
        println!(
            "{:<52} {:>12.2} {:>6.1}% {:>12}",
            p.name,
            1000.0 * p.seconds / units,
            100.0 * p.seconds / total_seconds,
            mb
        );
    }
    let left = (total_seconds - accounted).max(0.0);
    println!("{:<52} {:>12.2} {:>6.1}%", rest, 1000.0 * left / units, 100.0 * left / total_seconds);
}

/// The per-phase table of `bench train --phases`: time and bytes per step, and each phase's share
/// of the step (transfers happen inside the other phases, so their share overlaps).
fn print_phases(r: &crossdiff::bench::TrainBench, steps: u64) {
    let step_ms = 1000.0 * r.seconds_per_step;
    println!("{:<48} {:>10} {:>7} {:>12}", "phase", "ms/step", "share", "MB/step");
    let mut accounted = 0.0;
    for p in &r.phases {
        let ms = 1000.0 * p.seconds / steps as f64;
        if p.name != crossdiff::phases::TRANSFERS {
            accounted += ms;
        }
        let mb = if p.bytes > 0 { format!("{:.1}", p.bytes as f64 / steps as f64 / 1e6) } else { "—".into() };
        println!("{:<48} {:>10.1} {:>6.1}% {:>12}", p.name, ms, 100.0 * ms / step_ms, mb);
    }
    println!(
        "{:<48} {:>10.1} {:>6.1}%",
        "(rest: data, threshold, metrics, bookkeeping)",
        step_ms - accounted,
        100.0 * (step_ms - accounted) / step_ms
    );
}
