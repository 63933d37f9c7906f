//! Command-line front end (interfaces.md, "Commands"): flags parse straight into the engine's
//! workflow configs (`crossdiff::workflow`), the job runs with a progress bar as its handle, and a
//! one-line summary is printed. No domain logic lives here.

mod bench;
mod progress;
mod summary;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use crossdiff::analysis::latents::LatentClass;
use crossdiff::model::generate::{Sampling, generate};
use crossdiff::workflow::adl::AdlJob;
use crossdiff::workflow::analyze::AnalyzeJob;
use crossdiff::workflow::cache::CacheJob;
use crossdiff::workflow::kl::KlJob;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::steer::SteerJob;
use crossdiff::workflow::train::TrainJob;
use crossdiff::{Backend, LoadOptions, Model};

use progress::Bar;
use summary::{adl_summary, print_kl, train_summary};

#[derive(Parser)]
#[command(
    name = "crossdiff",
    version,
    about = "Find what chat fine-tuning changed inside a language model. No subcommand opens the desktop app."
)]
struct Cli {
    /// Compute backend: auto (a real GPU through wgpu, else CUDA if built with it, else cpu; the
    /// CROSSDIFF_BACKEND variable overrides it), wgpu (any GPU vendor; on a machine without one,
    /// Mesa's lavapipe, a CPU posing as a GPU), cpu (burn flex), cuda (needs the `cuda` build feature),
    /// remote:ws://HOST:PORT (the device of a `crossdiff serve` process; data and outputs stay here).
    #[arg(long, global = true, default_value = "auto")]
    backend: Backend,
    /// The token of the `crossdiff serve` process --backend remote:… reaches (else the
    /// CROSSDIFF_REMOTE_TOKEN variable).
    #[arg(long, global = true, value_name = "TOKEN")]
    remote_token: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt; write input_ids, every block output and the logits to a safetensors file.
    Inspect {
        #[command(flatten)]
        input: PromptArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Stream a completion (KV cache; greedy unless --temperature > 0).
    Generate {
        #[command(flatten)]
        input: PromptArgs,
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
    Cache(CacheJob),
    /// Train a crosscoder on a cache; checkpoints in RUN, re-running the same command resumes.
    Train(TrainJob),
    /// Per-latent metrics and Latent Scaling over a cache: RUN/latents.csv and RUN/summary.json.
    Analyze(AnalyzeJob),
    /// The causal check: KL(P_chat ‖ P_patched) on assistant-predicting tokens when the base
    /// residual is patched with sets of latents; a table on stdout and RUN/kl.json.
    Kl(KlJob),
    /// Generate with latent J's chat decoder direction added at the crosscoder's layer, beside the
    /// unsteered completion.
    Steer(SteerJob),
    /// The activation-difference lens: the mean of chat − base per token position at one layer over
    /// plain text, read through both models' unembeddings, and the chat model steered with it.
    Adl(AdlJob),
    /// Methods side by side: crosscoder runs, diff-SAE runs and lens folders — the KL gap each
    /// closes, the latents each calls chat-specific, their top latents or tokens.
    Compare(crossdiff::workflow::compare::CompareJob),
    /// The embedded demo. `--rebuild` regenerates the corpus and trains the miniature base and chat
    /// models (with planted behaviours) with crossdiff itself.
    Demo {
        /// Rebuild the miniature models (corpus, tokenizer, base and chat training) into --models.
        #[arg(long)]
        rebuild: bool,
        /// Where the miniature models live.
        #[arg(long, default_value = crossdiff::demo::DEFAULT_MODELS)]
        models: PathBuf,
        /// The project folder the pipeline writes (cache, runs) and the app opens.
        #[arg(long, default_value = crossdiff::demo::DEFAULT_PROJECT)]
        project: PathBuf,
        /// Run the pipeline but do not open the app.
        #[arg(long)]
        no_app: bool,
        /// With --rebuild: training steps for the base model and again for the chat fine-tune.
        #[arg(long, default_value_t = crossdiff::demo::DEFAULT_LM_STEPS, requires = "rebuild")]
        steps: usize,
        /// The crosscoders' training seed (with --rebuild: the corpus's and the models' seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Host this machine's device (--backend) for other machines' jobs (`--backend
    /// remote:ws://HOST:PORT` there) until Ctrl-C; loopback only unless given a token.
    Serve(crossdiff::workflow::serve::ServeJob),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

/// A model and one prompt for it.
#[derive(Args)]
struct PromptArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Render the prompt as one user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A Hugging Face snapshot directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into
    /// the model's weights: --model is then the adapter's base model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    load: LoadOptions,
}

/// The command line, parsed. Negative numbers are values (`--mu -1` reaches the check that names
/// the flag, instead of clap's "unexpected argument '-1'"), and a parse error is one line (clap's
/// usage and tip lines dropped); `--help` and `--version` print whole.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command().mut_subcommands(|s| s.allow_negative_numbers(true));
    match command.try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand) {
                e.exit();
            }
            let text = e.render().to_string();
            let head: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            // clap's own suggestion ("tip: a similar argument exists: '--dict-size'") stays, in the line.
            let tips: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("tip:")).collect();
            let tips = if tips.is_empty() { String::new() } else { format!(" ({})", tips.join("; ")) };
            eprintln!("{}{tips}", head.join(" "));
            std::process::exit(2);
        }
    }
}

pub fn run() -> Result<()> {
    let cli = parse();
    // No subcommand: the desktop app, with the device the flags chose selected.
    let token = cli.remote_token;
    // The token applies to whatever names a server: the flag, or `auto` settled by
    // CROSSDIFF_BACKEND (for the app too, whose jobs settle `auto` later).
    let with_token = |b: Backend| -> Result<Backend> {
        Ok(match b.resolve()? {
            remote @ Backend::Remote(_) => remote.with_remote_token(token.clone()),
            _ => b,
        })
    };
    let Some(mut command) = cli.command else { return crate::app::run(with_token(cli.backend)?) };
    // `auto` settles once, here, before any job thread starts a device.
    let backend = with_token(cli.backend)?.resolve()?;
    // Every --devices entry settled and given the token the same way.
    let settle = |devices: &mut Vec<Backend>| -> Result<()> {
        *devices = devices.drain(..).map(|b| with_token(b)?.resolve()).collect::<Result<_>>()?;
        Ok(())
    };
    match &mut command {
        Command::Train(TrainJob { devices, .. }) | Command::Cache(CacheJob { devices, .. }) => settle(devices)?,
        Command::Bench { which: bench::BenchCommand::Train { devices, .. } } => settle(devices)?,
        _ => {}
    }
    execute(command, &backend).map_err(|e| backend.explain_failure(e))?;
    if progress::interrupted() {
        std::process::exit(130);
    }
    Ok(())
}

/// Runs one subcommand on `backend` and prints its summary.
fn execute(command: Command, backend: &Backend) -> Result<()> {
    let device_name = backend.describe();
    match command {
        Command::Inspect { input: PromptArgs { model, prompt, chat }, out } => {
            crossdiff::model::inspect::check_out(&out)?;
            let m = load(&model, backend)?;
            let ids = m.prompt_ids(&prompt, chat)?;
            let started = Instant::now();
            let result = crossdiff::model::inspect::inspect(&m, ids)?;
            result.write(&out)?;
            println!(
                "inspect: {} tokens, {} blocks, logits [{}, {}] → {} ({:.2}s, {device_name})",
                result.ids.len(),
                result.blocks.len(),
                result.ids.len(),
                m.lm.config.vocab_size,
                out.display(),
                started.elapsed().as_secs_f64(),
            );
            if let Some(line) = adapter_line(&m) {
                println!("inspect: {line}");
            }
        }
        Command::Generate { input: PromptArgs { model, prompt, chat }, max_tokens, temperature, top_p, seed } => {
            let m = load(&model, backend)?;
            if let Some(line) = adapter_line(&m) {
                eprintln!("generate: {line}");
            }
            let ids = m.prompt_ids(&prompt, chat)?;
            let stop = m.stop_ids();
            let started = Instant::now();
            let mut stdout = std::io::stdout();
            let mut shown = String::new();
            let mut generated = Vec::new();
            let sampling = Sampling { temperature, top_p, seed };
            let out = generate(&m.lm, &ids, max_tokens, sampling, &stop, |id| {
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
                "generate: {} prompt + {} new tokens in {secs:.2}s ({:.1} tokens/s, {reason}, {device_name})",
                ids.len(),
                out.len(),
                out.len() as f64 / secs,
            );
        }
        Command::Cache(job) => {
            // With --devices the job connects those; --backend is not used.
            let device = if job.devices.is_empty() { backend.device()? } else { burn::tensor::Device::flex() };
            let bar = Bar::cancellable("tokens");
            let done = crossdiff::workflow::cache::run(&job, &device, bar.handle())
                .map_err(|e| crossdiff::backend::explain_failure_of(&job.devices, e))?;
            bar.finish();
            let device_name = on_devices(&job.devices, device_name, "fanned out over");
            let index = &done.index;
            let state = done.state(job.tokens, "interrupted; re-run the same command to resume");
            // A cache that was complete already: nothing computed, no rate to report.
            let timing = if done.tokens_now == 0 && index.complete {
                "already complete, nothing to do".to_string()
            } else {
                format!("{:.1}s, {:.1} tokens/s after loading, {state}", done.seconds, done.tokens_per_s)
            };
            println!(
                "cache: {} tokens in {} shards at layer {}, {} → {} ({timing}; {device_name})",
                index.total_tokens,
                index.shards.len(),
                job.layer,
                job.dtype_name(),
                job.out.display(),
            );
        }
        Command::Train(job) => {
            // With --devices the job connects those; --backend is not used.
            let device = if job.devices.is_empty() { backend.device()? } else { burn::tensor::Device::flex() };
            let bar = Bar::cancellable("steps");
            let done =
                job.run(&device, bar.handle()).map_err(|e| crossdiff::backend::explain_failure_of(&job.devices, e))?;
            bar.finish();
            let on = on_devices(&job.devices, device_name, "data-parallel over");
            println!("{}", train_summary(&job, &done, bar.cancelled(), &on));
        }
        Command::Analyze(job) => {
            let device = backend.device()?;
            let bar = Bar::cancellable("tokens");
            let done = match job.run_any(&device, bar.handle())? {
                crossdiff::workflow::analyze::Analysed::Crosscoder(done) => done,
                crossdiff::workflow::analyze::Analysed::Sae(done) => {
                    bar.finish();
                    let file = crossdiff::run_dir::RunDir::new(&job.run).file(crossdiff::run_dir::RunDir::SAE_LATENTS);
                    println!("analyze: {} → {} ({:.1}s, {device_name})", done.line(), file.display(), done.seconds);
                    return Ok(());
                }
            };
            bar.finish();
            let (s, n) = (&done.summary, |c| done.summary.count(c));
            println!(
                "analyze: {} latents over {} tokens: {} chat-only ({} chat-specific by Latent Scaling), {} base-only, {} shared, {} dead; FVE {:.3}/{:.3}, L0 {:.1} → {} ({:.1}s, {device_name})",
                done.rows.len(),
                s.tokens,
                n(LatentClass::ChatOnly),
                s.chat_specific,
                n(LatentClass::BaseOnly),
                n(LatentClass::Shared),
                n(LatentClass::Dead),
                s.fve_base,
                s.fve_chat,
                s.l0,
                crossdiff::run_dir::RunDir::new(&job.run).latents().display(),
                done.seconds
            );
        }
        Command::Kl(job) => {
            let device = backend.device()?;
            let bar = Bar::cancellable("conversations");
            let report = job.run(&device, &ModelStore::new(), bar.handle())?;
            bar.finish();
            print_kl(&job, &report, &device_name);
        }
        Command::Steer(job) => {
            let device = backend.device()?;
            let bar = Bar::new("tensors");
            let done = job.run(&device, &ModelStore::new(), bar.handle())?;
            bar.finish();
            let row = &done.rows[0];
            println!(
                "--- unsteered ---\n{}\n--- steered: latent {} ({}, Δ {:.3}) × {} at layer {} ---\n{}",
                done.plain, job.latent, row.class, row.delta_norm, job.strength, done.layer, done.steered
            );
            println!("steer: {} vs {} new tokens ({device_name})", done.new_tokens[0], done.new_tokens[1]);
        }
        Command::Compare(job) => {
            let rows = job.run()?;
            print!("{}", crossdiff::analysis::methods::table(&rows));
            let written = job.out.as_ref().map_or(String::new(), |o| format!(" → {}", o.display()));
            println!("compare: {} methods{written}", rows.len());
        }
        Command::Adl(job) => {
            let device = backend.device()?;
            let bar = Bar::cancellable("documents");
            let done = job.run(&device, &ModelStore::new(), bar.handle())?;
            bar.finish();
            print!("{}", adl_summary(&done.report));
            println!(
                "adl: {} samples × {} positions at layer {} → {} ({device_name})",
                done.report.samples,
                done.report.per_position.len(),
                job.layer,
                job.out.join(AdlJob::JSON).display()
            );
        }
        Command::Demo { rebuild, models, project, no_app, steps, seed } => {
            let device = backend.device()?;
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
            let flag = progress::interrupt_flag();
            let handle = crossdiff::workflow::Handle::new(&|_| {}, &flag);
            crossdiff::demo::run_pipeline(&p, &device, handle, |step| eprintln!("demo: {step}"))?;
            println!(
                "demo: project ready in {} ({:.0}s, {device_name})",
                project.display(),
                started.elapsed().as_secs_f64()
            );
            if !no_app {
                // SAFETY (set_var): nothing else runs yet; the app reads it once at start.
                unsafe { std::env::set_var("CROSSDIFF_PROJECT", &project) };
                if let Err(e) = crate::app::run(backend.clone()) {
                    // A machine without a display still gets the finished project.
                    eprintln!(
                        "demo: {}; open the project later with `crossdiff` → Project → Open",
                        format!("{e:#}").lines().next().unwrap_or_default()
                    );
                }
            }
        }
        Command::Bench { which } => bench::run(which, backend)?,
        Command::Serve(job) => serve(&job, backend, &device_name)?,
    }
    Ok(())
}

/// What a summary line says a job ran on: `device` alone, or `how` the `--devices` list.
pub(crate) fn on_devices(devices: &[Backend], device: String, how: &str) -> String {
    match devices {
        [] => device,
        many => format!("{how} {}", many.iter().map(Backend::describe).collect::<Vec<_>>().join(" + ")),
    }
}

/// `crossdiff serve`: the flags are checked and the port bound before the device starts; the first
/// line says where clients point `--backend`.
fn serve(job: &crossdiff::workflow::serve::ServeJob, backend: &Backend, device_name: &str) -> Result<()> {
    use crossdiff::workflow::serve::print_line;
    if let Backend::Remote(_) = backend {
        anyhow::bail!("--backend {backend}: a server hosts a device of its own machine (auto, wgpu, cpu or cuda)");
    }
    let bound = job.bind()?;
    if std::env::var_os("RUST_LOG").is_none() {
        // burn's server logs every start at info level, which our own lines already say.
        // SAFETY (set_var): read once by the server's logger below; no thread reads the environment now.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let device = backend.device()?;
    crossdiff::workflow::serve::ServeJob::serve(
        bound,
        device,
        device_name,
        |l| {
            // `SocketAddr`'s Display brackets an IPv6 address, as a URL needs.
            let reach = if l.address.ip().is_unspecified() {
                format!("THIS-HOST:{}", l.address.port())
            } else {
                l.address.to_string()
            };
            let token = if l.token_required { " --remote-token TOKEN" } else { "" };
            print_line(&format!(
                "serve: listening on {} ({device_name}); clients: --backend remote:ws://{reach}{token}",
                l.address
            ));
        },
        |line| eprintln!("{line}"),
    )
}

/// Loads a model (with its adapter merged in, when given) with a progress bar over its tensors.
pub(crate) fn load(args: &ModelArgs, backend: &Backend) -> Result<Model> {
    let device = backend.device()?;
    let bar = Bar::new("tensors");
    let model = Model::load_adapted(&args.model, args.adapter.as_deref(), &device, args.load, |done, total| {
        bar.handle().progress(&format!("loading {}", args.model.display()), done as u64, total as u64, "tensors")
    });
    bar.finish();
    model
}

/// What a summary says about the adapter merged into `m`, if any.
fn adapter_line(m: &Model) -> Option<String> {
    m.adapter.as_ref().map(|(dir, description)| format!("adapter {} merged ({description})", dir.display()))
}
