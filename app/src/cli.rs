//! Command-line front end (interfaces.md, "Commands"). Each command parses, calls the engine and
//! prints a one-line summary; the engine owns all the logic.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use crossdiff::cache::{ActDtype, CacheJob, run_cache};
use crossdiff::crosscoder::Kind;
use crossdiff::data::TokenizeOptions;
use crossdiff::generate::{Sampling, generate};
use crossdiff::reader::{CacheReader, ReaderConfig};
use crossdiff::train::{PairSource, TrainConfig, TrainRun};
use crossdiff::{Backend, LoadOptions, Model};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "crossdiff",
    version,
    about = "Find what chat fine-tuning changed inside a language model. No subcommand opens the desktop app."
)]
struct Cli {
    /// Compute backend: wgpu (any GPU, or Mesa lavapipe on CPU), cpu (burn flex), cuda (needs the `cuda` build feature).
    #[arg(long, global = true, default_value = "wgpu")]
    backend: Backend,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt; write input_ids, every block output and the logits to a safetensors file.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Render the prompt as one user turn with the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Stream a completion (KV cache; greedy unless --temperature > 0).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Paired activation cache: run blocks 0..=L of both models over the data, write token-aligned
    /// (base, chat) pairs. Re-running the same command resumes.
    Cache {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        chat: PathBuf,
        /// .txt, .jsonl (`text` or `messages`) or .parquet (`text` or `messages` column) files.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        tokens: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1024)]
        context: usize,
        #[arg(long, default_value = "bf16")]
        dtype: ActDtype,
        /// Interleave the data files 1:1 by tokens (the paper mixes web text and chat).
        #[arg(long)]
        mix: bool,
        /// Drop each document's leading <bos>.
        #[arg(long)]
        drop_bos: bool,
        /// Drop the first N tokens of each document.
        #[arg(long, default_value_t = 0)]
        skip_first: usize,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 65536)]
        shard_tokens: usize,
        /// Padded tokens per forward batch.
        #[arg(long, default_value_t = 8192)]
        batch_tokens: usize,
        /// One model on the device at a time: a base pass, then a chat pass.
        #[arg(long)]
        low_memory: bool,
        #[arg(long)]
        f16: bool,
    },
    /// Train a crosscoder on a cache; checkpoints in RUN, re-running the same command resumes.
    Train {
        /// The activation cache to train on (or train on the fly with --base/--chat/--data/--layer).
        #[arg(long, required_unless_present = "base")]
        cache: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// On the fly, no disk cache: the base model (with --chat, --data, --layer).
        #[arg(long, requires_all = ["chat", "data", "layer"], conflicts_with = "cache")]
        base: Option<PathBuf>,
        #[arg(long)]
        chat: Option<PathBuf>,
        #[arg(long, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long)]
        layer: Option<usize>,
        /// On the fly: truncate documents to this many tokens.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        /// On the fly: interleave the data files 1:1 by tokens.
        #[arg(long)]
        mix: bool,
        #[arg(long, default_value = "batchtopk")]
        kind: Kind,
        /// Dictionary size D (default: 32 × d, the paper's).
        #[arg(long, conflicts_with = "expansion")]
        dict_size: Option<usize>,
        /// D as a multiple of d.
        #[arg(long)]
        expansion: Option<usize>,
        #[arg(long, default_value_t = 100)]
        k: usize,
        #[arg(long, default_value_t = 0.041)]
        mu: f64,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        #[arg(long, default_value_t = 1000)]
        warmup_steps: u64,
        #[arg(long, default_value_t = 1000)]
        threshold_start: u64,
        #[arg(long, default_value_t = 2048)]
        batch: usize,
        /// Train on this many tokens (default: one pass over the cache's training split).
        #[arg(long, conflicts_with = "steps")]
        tokens: Option<u64>,
        #[arg(long)]
        steps: Option<u64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1.0 / 32.0)]
        aux_alpha: f64,
        #[arg(long, default_value_t = 10_000_000)]
        dead_tokens: u64,
        /// Encoder column norm at init (default: 0.005 for L1, 1.0 for BatchTopK).
        #[arg(long)]
        init_norm: Option<f64>,
        #[arg(long)]
        k_anneal_from: Option<usize>,
        #[arg(long, default_value_t = 0)]
        k_anneal_steps: u64,
        /// The paper's ½‖ε‖² per model instead of the released code's unsquared norm.
        #[arg(long)]
        squared_recon: bool,
        /// Validation FVE every N steps on the held-out slice (0: never).
        #[arg(long, default_value_t = 0)]
        val_every: u64,
        #[arg(long, default_value_t = 0)]
        val_tokens: u64,
        #[arg(long, default_value_t = 1000)]
        checkpoint_every: u64,
        #[arg(long, default_value_t = 262_144)]
        shuffle_tokens: usize,
    },
    /// Per-latent metrics and Latent Scaling over a cache: RUN/latents.csv and RUN/summary.json.
    Analyze {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        cache: PathBuf,
        /// Tokens of the cache to use (default: all).
        #[arg(long)]
        tokens: Option<u64>,
        #[arg(long, default_value_t = 1024)]
        batch: usize,
        /// Error betas for the top-N latents by Δ (default: the number of chat-only latents, at least 100).
        #[arg(long)]
        error_top_n: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The base model (for each latent's promoted/suppressed tokens through its unembedding).
        #[arg(long)]
        base: Option<PathBuf>,
        /// The chat model (likewise).
        #[arg(long)]
        chat: Option<PathBuf>,
        /// Top activating examples stored per latent.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        /// Context tokens on each side of an example.
        #[arg(long, default_value_t = 16)]
        context: usize,
    },
    /// The causal check: KL(P_chat ‖ P_patched) on assistant-predicting tokens when the base
    /// residual is patched with sets of latents; a table on stdout and RUN/kl.json.
    Kl {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        chat: PathBuf,
        /// Conversations: .jsonl or .parquet with `messages`.
        #[arg(long)]
        data: PathBuf,
        /// Conversations to use (the paper: 512).
        #[arg(long, default_value_t = 512)]
        conversations: usize,
        /// The layer (default: the crosscoder's, from its config.json).
        #[arg(long)]
        layer: Option<usize>,
    },
    /// Generate with latent J's chat decoder direction added at the crosscoder's layer, beside the
    /// unsteered completion.
    Steer {
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        latent: usize,
        /// Multiple of the latent's largest observed activation (latents.csv's max_act).
        #[arg(long)]
        strength: f64,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long)]
        layer: Option<usize>,
    },
    /// The embedded demo. `--rebuild` regenerates the corpus and trains the miniature base and chat
    /// models (with planted behaviours) with crossdiff itself.
    Demo {
        /// Rebuild the miniature models (corpus, tokenizer, base and chat training) into --models.
        #[arg(long)]
        rebuild: bool,
        /// Where the miniature models live.
        #[arg(long, default_value = "assets/demo")]
        models: PathBuf,
        /// The project folder the pipeline writes (cache, runs) and the app opens.
        #[arg(long, default_value = "demo-project")]
        project: PathBuf,
        /// Run the pipeline but do not open the app.
        #[arg(long)]
        no_app: bool,
        /// Training steps for the base model and again for the chat fine-tune.
        #[arg(long, default_value_t = 800)]
        steps: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    },
    /// Crosscoder training steps/s and tokens/s on random pairs.
    Train {
        #[arg(long, default_value_t = 2304)]
        d: usize,
        #[arg(long, default_value_t = 73_728)]
        dict_size: usize,
        #[arg(long, default_value_t = 100)]
        k: usize,
        #[arg(long, default_value_t = 2048)]
        batch: usize,
        #[arg(long, default_value = "batchtopk")]
        kind: Kind,
        #[arg(long, default_value_t = 5)]
        steps: u64,
    },
    /// analyze throughput and the examples store's per-latent query time on the planted case:
    /// synthetic pairs from known directions and a crosscoder made of them.
    Analyze {
        #[arg(long, default_value_t = 2304)]
        d: usize,
        #[arg(long, default_value_t = 73_728)]
        dict_size: usize,
        #[arg(long, default_value_t = 100)]
        k: usize,
        #[arg(long, default_value_t = 2048)]
        tokens: u64,
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

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face snapshot directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Keep matmul weights in f16 on the device (half the memory; activations stay f32).
    #[arg(long)]
    f16: bool,
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { model, prompt, chat, out } => {
            let m = load(&model, cli.backend)?;
            let ids = m.prompt_ids(&prompt, chat)?;
            let started = Instant::now();
            let result = crossdiff::inspect::inspect(&m, ids)?;
            result.write(&out)?;
            println!(
                "inspect: {} tokens, {} blocks, logits [{}, {}] → {} ({:.2}s, {})",
                result.ids.len(),
                result.blocks.len(),
                result.ids.len(),
                m.gemma.config.vocab_size,
                out.display(),
                started.elapsed().as_secs_f64(),
                cli.backend
            );
        }
        Command::Generate { model, prompt, chat, max_tokens, temperature, top_p, seed } => {
            let m = load(&model, cli.backend)?;
            let ids = m.prompt_ids(&prompt, chat)?;
            let stop = m.stop_ids();
            let started = Instant::now();
            let mut stdout = std::io::stdout();
            let mut shown = String::new();
            let mut generated = Vec::new();
            let sampling = Sampling { temperature, top_p, seed };
            let out = generate(&m.gemma, &ids, max_tokens, sampling, &stop, |id| {
                if stop.contains(&id) {
                    return true;
                }
                // Decode the whole continuation each time so multi-token characters print whole.
                generated.push(id);
                if let Ok(text) = m.tokenizer.decode(&generated) {
                    if let Some(new) = text.strip_prefix(shown.as_str()) {
                        let _ = write!(stdout, "{new}");
                        let _ = stdout.flush();
                    }
                    shown = text;
                }
                true
            })?;
            let secs = started.elapsed().as_secs_f64();
            let reason = if out.last().is_some_and(|id| stop.contains(id)) { "stop token" } else { "max tokens" };
            println!();
            eprintln!(
                "generate: {} prompt + {} new tokens in {secs:.2}s ({:.1} tokens/s, {reason}, {})",
                ids.len(),
                out.len(),
                out.len() as f64 / secs,
                cli.backend
            );
        }
        Command::Cache {
            base,
            chat,
            data,
            layer,
            tokens,
            out,
            context,
            dtype,
            mix,
            drop_bos,
            skip_first,
            shard_tokens,
            batch_tokens,
            low_memory,
            f16,
        } => {
            let job = CacheJob {
                base,
                chat,
                data,
                layer,
                tokens,
                out,
                dtype,
                tokenize: TokenizeOptions { context, drop_bos, skip_first },
                mix,
                shard_tokens,
                batch_tokens,
                low_memory,
                load: LoadOptions { f16_weights: f16, ..Default::default() },
            };
            let device = cli.backend.device()?;
            let stop = interrupt_flag();
            let bar = ProgressBar::new(tokens).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} tokens, {per_sec}, ETA {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message("loading models");
            let started = Instant::now();
            // (time, tokens) at the first report, after the models loaded: the rate is this run's own.
            let mut first: Option<(Instant, u64)> = None;
            let index = run_cache(
                &job,
                &device,
                |p| {
                    first.get_or_insert((Instant::now(), p.tokens));
                    bar.set_length(p.target);
                    bar.set_position(p.tokens);
                    bar.set_message(p.phase);
                },
                || !stop.load(std::sync::atomic::Ordering::SeqCst),
            )?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            let rate =
                first.map_or(0.0, |(t, n)| (index.total_tokens.saturating_sub(n)) as f64 / t.elapsed().as_secs_f64());
            let state = if index.complete { "complete" } else { "interrupted; re-run the same command to resume" };
            println!(
                "cache: {} tokens in {} shards at layer {}, {} → {} ({secs:.1}s, {rate:.1} tokens/s after loading, {state})",
                index.total_tokens,
                index.shards.len(),
                index.layer,
                job.dtype_name(),
                job.out.display(),
            );
        }
        Command::Train {
            cache,
            out,
            base,
            chat,
            data,
            layer,
            context,
            mix,
            kind,
            dict_size,
            expansion,
            k,
            mu,
            lr,
            warmup_steps,
            threshold_start,
            batch,
            tokens,
            steps,
            seed,
            aux_alpha,
            dead_tokens,
            init_norm,
            k_anneal_from,
            k_anneal_steps,
            squared_recon,
            val_every,
            val_tokens,
            checkpoint_every,
            shuffle_tokens,
        } => {
            let device = cli.backend.device()?;
            // The data: a cache through the shuffled reader, or the two models on the fly.
            let (mut source, d, models, layer, validation, default_steps): (
                Box<dyn PairSource>,
                usize,
                Vec<String>,
                Option<usize>,
                _,
                _,
            ) = match (&cache, &base, &chat, layer) {
                (Some(cache), _, _, _) => {
                    let reader_cfg = ReaderConfig { batch, seed, shuffle_tokens, val_tokens, epochs: None };
                    let reader = CacheReader::open(cache, reader_cfg)?;
                    let validation = if val_tokens > 0 { Some(reader.validation()?) } else { None };
                    let (d, models, layer) =
                        (reader.index.d_model, reader.index.models.clone(), Some(reader.index.layer));
                    let default_steps = reader.train_tokens.div_ceil(batch as u64);
                    (Box::new(reader), d, models, layer, validation, Some(default_steps))
                }
                (None, Some(base), Some(chat), Some(layer)) => {
                    if val_tokens > 0 {
                        anyhow::bail!("--val-tokens needs a cache (the on-the-fly source has no held-out slice)");
                    }
                    let d = crossdiff::Snapshot::open(base)?.config.hidden_size;
                    let cfg = crossdiff::onthefly::OnTheFlyConfig {
                        base: base.clone(),
                        chat: chat.clone(),
                        data: data.clone(),
                        layer,
                        tokenize: TokenizeOptions { context, ..Default::default() },
                        mix,
                        chunk_tokens: 65_536,
                        batch_tokens: 8192,
                        tokens: u64::MAX,
                        load: LoadOptions::default(),
                    };
                    let models = vec![base.display().to_string(), chat.display().to_string()];
                    let src =
                        crossdiff::onthefly::OnTheFlySource::start(cfg, device.clone(), batch, shuffle_tokens, seed)?;
                    (Box::new(src), d, models, Some(layer), None, None)
                }
                _ => anyhow::bail!("give --cache, or --base, --chat, --data and --layer to train on the fly"),
            };
            let dict = dict_size.unwrap_or(expansion.unwrap_or(32) * d);
            let steps = match (steps, tokens, default_steps) {
                (Some(s), _, _) => s,
                (None, Some(t), _) => t.div_ceil(batch as u64),
                (None, None, Some(s)) => s,
                (None, None, None) => {
                    anyhow::bail!("--steps or --tokens: on the fly there is no cache size to default to")
                }
            };
            let defaults = TrainConfig::defaults(kind, dict);
            let config = TrainConfig {
                k,
                mu,
                lr,
                warmup_steps,
                threshold_start,
                steps,
                aux_alpha,
                dead_tokens,
                init_norm: init_norm.unwrap_or(defaults.init_norm),
                k_anneal_from,
                k_anneal_steps,
                squared_recon,
                seed,
                checkpoint_every,
                val_every,
                ..defaults
            };
            let stop = interrupt_flag();
            let bar = ProgressBar::new(steps).with_style(
                ProgressStyle::with_template("[{bar:30}] step {pos}/{len} {msg} ({per_sec}, ETA {eta})")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            let started = Instant::now();
            let mut last = None;
            let mut run = TrainRun {
                config,
                out: out.clone(),
                device,
                source: source.as_mut(),
                validation,
                layer,
                models,
                width: d,
            };
            let cc = run.run(
                |p| {
                    let m = &p.metrics;
                    let rate = m.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    bar.set_position(m.step);
                    bar.set_message(format!(
                        "loss {:.4} FVE {:.3}/{:.3} L0 {:.1} dead {:.1}% {:.0} tok/s",
                        m.loss,
                        m.fve_base,
                        m.fve_chat,
                        m.l0,
                        100.0 * m.dead_frac,
                        rate
                    ));
                    last = Some(m.clone());
                },
                || !stop.load(std::sync::atomic::Ordering::SeqCst),
            )?;
            bar.finish_and_clear();
            match last {
                Some(m) => println!(
                    "train: {:?} D={} step {} ({} tokens), loss {:.4}, FVE base {:.3} chat {:.3}, L0 {:.1}, dead {:.1}% → {} ({:.1}s)",
                    cc.config.kind,
                    cc.config.dict_size,
                    m.step,
                    m.tokens,
                    m.loss,
                    m.fve_base,
                    m.fve_chat,
                    m.l0,
                    100.0 * m.dead_frac,
                    out.display(),
                    started.elapsed().as_secs_f64()
                ),
                None => println!("train: nothing to do, {} already holds a finished run", out.display()),
            }
        }
        Command::Analyze { run, cache, tokens, batch, error_top_n, seed, base, chat, examples, context } => {
            let device = cli.backend.device()?;
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("analyze [{bar:30}] {human_pos}/{human_len} tokens, {per_sec}, ETA {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            let started = Instant::now();
            let opts = crossdiff::analyze::AnalyzeOptions { tokens, batch, error_top_n, seed };
            let stop = interrupt_flag();
            let (rows, summary) = crossdiff::analyze::analyze(
                &run,
                &cache,
                &device,
                &opts,
                |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
                || !stop.load(std::sync::atomic::Ordering::SeqCst),
            )?;
            crossdiff::analyze::write_outputs(&run, &rows, &summary)?;
            bar.set_message("examples");
            let unembed = match (&base, &chat) {
                (Some(b), Some(c)) => Some([embedding(b)?, embedding(c)?]),
                (None, None) => None,
                _ => anyhow::bail!("--base and --chat go together (for promoted/suppressed tokens)"),
            };
            let max_act: Vec<f64> = rows.iter().map(|r| r.max_act).collect();
            let ex =
                crossdiff::examples::ExamplesOptions { top_n: examples, context, batch, seed, ..Default::default() };
            crossdiff::examples::build_examples(&run, &cache, &device, &max_act, unembed, &ex, tokens)?;
            bar.finish_and_clear();
            let c = &summary.classes;
            println!(
                "analyze: {} latents over {} tokens: {} chat-only ({} chat-specific by Latent Scaling), {} base-only, {} shared, {} dead; FVE {:.3}/{:.3}, L0 {:.1} → {} ({:.1}s)",
                rows.len(),
                summary.tokens,
                c["chat_only"],
                summary.chat_specific,
                c["base_only"],
                c["shared"],
                c["dead"],
                summary.fve_base,
                summary.fve_chat,
                summary.l0,
                run.join("latents.csv").display(),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Kl { run, base, chat, data, conversations, layer } => {
            let device = cli.backend.device()?;
            let cc = crossdiff::crosscoder::Crosscoder::load(&run, &device)?;
            let rows = crossdiff::latents_csv::read_latents_csv(&run.join("latents.csv"))?;
            let layer = layer
                .or(cc.config.layer)
                .ok_or_else(|| anyhow::anyhow!("--layer: the run's config.json names no layer"))?;
            let load = |dir: &PathBuf| Model::load(dir, &device, LoadOptions::default());
            let (b, c) = (load(&base)?, load(&chat)?);
            let bar = ProgressBar::new(conversations as u64).with_style(
                ProgressStyle::with_template("kl [{bar:30}] {pos}/{len} conversations ({eta})")
                    .expect("static template"),
            );
            let stats = crossdiff::kl::kl_table(&b, &c, &cc, &rows, layer, &data, conversations, |n| {
                bar.set_position(n as u64)
            })?;
            bar.finish_and_clear();
            println!("{:<18} {:>8} {:>22} {:>22}", "condition", "latents", "KL all reply tokens", "KL first 9 tokens");
            for s in &stats {
                println!(
                    "{:<18} {:>8} {:>12.4} ± {:<7.4} {:>12.4} ± {:<7.4}",
                    s.condition, s.latents, s.mean_all, s.ci_all, s.mean_first9, s.ci_first9
                );
            }
            let text = serde_json::to_string_pretty(&stats)?;
            crossdiff::io::write_atomic(&run.join("kl.json"), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
            let gap = stats[0].mean_all;
            let closed = if gap > 0.0 { 100.0 * (1.0 - stats[1].mean_all / gap) } else { 0.0 };
            println!(
                "kl: {} tokens; base→chat gap {gap:.4} (first 9: {:.4}); patching all latents closes {closed:.0}% → {}",
                stats[0].tokens_all,
                stats[0].mean_first9,
                run.join("kl.json").display()
            );
        }
        Command::Steer { run, model, latent, strength, prompt, chat, max_tokens, layer } => {
            let m = load(&model, cli.backend)?;
            let cc = crossdiff::crosscoder::Crosscoder::load(&run, m.gemma.device())?;
            let rows = crossdiff::latents_csv::read_latents_csv(&run.join("latents.csv"))?;
            let row = rows
                .get(latent)
                .ok_or_else(|| anyhow::anyhow!("--latent {latent}: latents.csv has {} rows", rows.len()))?;
            let layer = layer
                .or(cc.config.layer)
                .ok_or_else(|| anyhow::anyhow!("--layer: the run's config.json names no layer"))?;
            let edit = crossdiff::steer::steering_edit(&cc, latent, strength, row.max_act, layer)?;
            let ids = m.prompt_ids(&prompt, chat)?;
            let (plain, steered) = crossdiff::steer::steer(&m, &ids, &edit, max_tokens)?;
            let text = |ids: &[u32]| -> Result<String> {
                let stop = m.stop_ids();
                let keep: Vec<u32> = ids.iter().copied().filter(|i| !stop.contains(i)).collect();
                m.tokenizer.decode(&keep)
            };
            println!(
                "--- unsteered ---\n{}\n--- steered: latent {latent} ({}, Δ {:.3}) × {strength} at layer {layer} ---\n{}",
                text(&plain)?,
                row.class,
                row.delta_norm,
                text(&steered)?
            );
            println!("steer: {} vs {} new tokens", plain.len(), steered.len());
        }
        Command::Demo { rebuild, models, project, no_app, steps, seed } => {
            let device = cli.backend.device()?;
            let started = Instant::now();
            if rebuild {
                let opts = crossdiff::demo::DemoBuild {
                    out: models.clone(),
                    seed,
                    base_steps: steps,
                    chat_steps: steps,
                    ..Default::default()
                };
                let l = crossdiff::demo::rebuild(&opts, &device)?;
                println!(
                    "demo: base loss {:.3} → {:.3}, chat loss {:.3} → {:.3}; models in {} ({:.0}s)",
                    l.base.0,
                    l.base.1,
                    l.chat.0,
                    l.chat.1,
                    models.display(),
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            let p = crossdiff::demo::DemoPipeline { models, project: project.clone(), seed, ..Default::default() };
            crossdiff::demo::run_pipeline(&p, &device, |step| eprintln!("demo: {step}"))?;
            println!("demo: project ready in {} ({:.0}s)", project.display(), started.elapsed().as_secs_f64());
            if !no_app {
                // SAFETY (set_var): nothing else runs yet; the app reads it once at start.
                unsafe { std::env::set_var("CROSSDIFF_PROJECT", &project) };
                if let Err(e) = crate::app::run() {
                    // A machine without a display still gets the finished project.
                    eprintln!(
                        "demo: the app could not open here ({}); open the project later with `crossdiff` → Project → Open",
                        format!("{e:#}").lines().next().unwrap_or_default()
                    );
                }
            }
        }
        Command::Bench { which: BenchCommand::Train { d, dict_size, k, batch, kind, steps } } => {
            let device = cli.backend.device()?;
            let r = crossdiff::bench::bench_train(&device, kind, d, dict_size, k, batch, steps)?;
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench train: {:?} d={d} D={dict_size} k={k} batch {batch}: {:.3} s/step, {:.0} tokens/s, peak host {} MiB ({})",
                kind,
                r.seconds_per_step,
                r.tokens_per_s,
                r.peak_host_bytes.unwrap_or(0) / (1 << 20),
                cli.backend
            );
        }
        Command::Bench { which: BenchCommand::Analyze { d, dict_size, k, tokens } } => {
            let device = cli.backend.device()?;
            let r = crossdiff::bench::bench_analyze(&device, d, dict_size, k, tokens)?;
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench analyze: {:.0} tokens/s (D={dict_size}), examples store {:.1}s, latent query {:.2} ms median / {:.2} ms max ({})",
                r.analyze_tokens_per_s, r.examples_seconds, r.query_ms_median, r.query_ms_max, cli.backend
            );
        }
        Command::Bench { which: BenchCommand::Reader { cache, synthetic_tokens, d, batch, shuffle_tokens } } => {
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
        Command::Bench { which: BenchCommand::Forward { model, batch, context, decode, repeats } } => {
            let m = load(&model, cli.backend)?;
            let r = crossdiff::bench::bench_forward(&m, batch, context, decode, repeats)?;
            println!("{}", serde_json::to_string(&r)?);
            println!(
                "bench forward: prefill {:.1} tokens/s, decode {:.1} tokens/s, peak host {} MiB ({}, batch {batch}, context {context})",
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.peak_host_bytes.unwrap_or(0) / (1 << 20),
                cli.backend
            );
        }
    }
    Ok(())
}

/// Loads a model with a progress bar over its tensors.
fn load(args: &ModelArgs, backend: Backend) -> Result<Model> {
    let device = backend.device()?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(args.model.display().to_string());
    let model = Model::load_with_progress(
        &args.model,
        &device,
        LoadOptions { f16_weights: args.f16, ..Default::default() },
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    );
    bar.finish_and_clear();
    model
}

/// Set by Ctrl-C: long jobs finish the shard or step they are in, save, and exit cleanly.
fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A second Ctrl-C: the user really wants out; the last atomic write is on disk.
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing the current shard, then stopping (Ctrl-C again to quit now)");
    });
    flag
}

/// A snapshot's `[vocab, d]` embedding (the tied unembedding), as f32.
fn embedding(dir: &std::path::Path) -> Result<Vec<f32>> {
    let snap = crossdiff::Snapshot::open(dir)?;
    let c = &snap.config;
    snap.read_f32("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])
}
