//! Command-line front end (interfaces.md, "Commands"): flags parse straight into the engine's
//! workflow configs (`crossdiff::workflow`), the job runs with a progress bar as its handle, and a
//! one-line summary is printed. No domain logic lives here.

mod bench;
mod progress;

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

#[derive(Parser)]
#[command(
    name = "crossdiff",
    version,
    about = "Find what chat fine-tuning changed inside a language model. No subcommand opens the desktop app."
)]
struct Cli {
    /// Compute backend: auto (a real GPU through wgpu, else CUDA if built with it, else cpu; the
    /// CROSSDIFF_BACKEND variable overrides it), wgpu (any GPU vendor; on a machine without one,
    /// Mesa's lavapipe, a CPU posing as a GPU), cpu (burn flex), cuda (needs the `cuda` build feature).
    #[arg(long, global = true, default_value = "auto")]
    backend: Backend,
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
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
            eprintln!("{}", head.join(" "));
            std::process::exit(2);
        }
    }
}

pub fn run() -> Result<()> {
    let cli = parse();
    // No subcommand: the desktop app, with the device the flags chose selected.
    let Some(command) = cli.command else { return crate::app::run(cli.backend) };
    // `auto` settles once, here, before any job thread starts a device.
    let backend = cli.backend.resolve()?;
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
            let device = backend.device()?;
            let bar = Bar::cancellable("tokens");
            let done = crossdiff::workflow::cache::run(&job, &device, bar.handle())?;
            bar.finish();
            let index = &done.index;
            let state = done.state(job.tokens, "interrupted; re-run the same command to resume");
            println!(
                "cache: {} tokens in {} shards at layer {}, {} → {} ({:.1}s, {:.1} tokens/s after loading, {state}; {device_name})",
                index.total_tokens,
                index.shards.len(),
                job.layer,
                job.dtype_name(),
                job.out.display(),
                done.seconds,
                done.tokens_per_s,
            );
        }
        Command::Train(job) => {
            let device = backend.device()?;
            let bar = Bar::cancellable("steps");
            let done = job.run(&device, bar.handle())?;
            bar.finish();
            println!("{}", train_summary(&job, &done, bar.cancelled(), &device_name));
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
                if let Err(e) = crate::app::run(cli.backend) {
                    // A machine without a display still gets the finished project.
                    eprintln!(
                        "demo: {}; open the project later with `crossdiff` → Project → Open",
                        format!("{e:#}").lines().next().unwrap_or_default()
                    );
                }
            }
        }
        Command::Bench { which } => bench::run(which, backend)?,
    }
    if progress::interrupted() {
        std::process::exit(130);
    }
    Ok(())
}

/// The train command's one line: where the checkpoint is (`done.step`, also after a Ctrl-C that
/// stopped past the last logged step) and the last logged metrics.
fn train_summary(
    job: &TrainJob,
    done: &crossdiff::workflow::train::TrainOutcome,
    stopped: bool,
    device: &str,
) -> String {
    let (cc, out) = (&done.crosscoder, job.out.display());
    if done.data_ended {
        let short = done.short_last_batch.map_or(String::new(), |n| format!(", its last batch {n} pairs"));
        let logged = done.last.as_ref().map_or(String::new(), |m| format!("; loss {:.4}, L0 {:.1}", m.loss, m.l0));
        return format!(
            "train: the data ran out at step {} of {}{short}; the run is finished with what there was{logged} → {out} ({device})",
            done.step, done.total_steps
        );
    }
    let Some(m) = &done.last else {
        return if done.step < done.total_steps {
            format!(
                "train: stopped at step {} of {} before logging a step (checkpoint in {out}; re-run the same command to resume)",
                done.step, done.total_steps
            )
        } else {
            format!("train: nothing to do, {out} already holds a finished run")
        };
    };
    // An SAE has one input: its FVE fills both fields.
    let fve = match cc.config.target {
        Some(t) => format!("FVE of {t} {:.3}", m.fve_chat),
        None => format!("FVE base {:.3} chat {:.3}", m.fve_base, m.fve_chat),
    };
    let metrics = format!("loss {:.4}, {fve}, L0 {:.1}, dead {:.1}%", m.loss, m.l0, 100.0 * m.dead_frac);
    if stopped && done.step < done.total_steps {
        format!(
            "train: stopped at step {} of {} (checkpoint saved; re-run the same command to resume); last logged step {}: {metrics} → {out} ({:.1}s, {device})",
            done.step, done.total_steps, m.step, done.seconds
        )
    } else {
        let logged = if m.step == done.step { String::new() } else { format!(", last logged step {}", m.step) };
        format!(
            "train: {} D={} step {} ({} tokens{logged}), {metrics} → {out} ({:.1}s, {device})",
            match cc.config.kind {
                crossdiff::crosscoder::Kind::Sae => "SAE".to_string(),
                k => format!("{k:?}"),
            },
            cc.config.dict_size,
            done.step,
            m.tokens,
            done.seconds
        )
    }
}

/// The ADL's table: per position the chat model's top 5 promoted tokens, then the steered answers.
fn adl_summary(r: &crossdiff::analysis::adl::AdlReport) -> String {
    let mut out = String::from("position  documents  ‖mean diff‖  top promoted tokens through the chat model\n");
    for p in &r.per_position {
        let tokens: Vec<String> = p.chat.promoted.iter().take(5).map(|t| format!("{:?}", t.token)).collect();
        out += &format!("{:>8}  {:>9}  {:>11.4}  {}\n", p.position, p.count, p.norm_of_mean_diff, tokens.join(" "));
    }
    let s = &r.steering;
    out += &format!(
        "steering with position {}'s mean difference at layer {} (strength × mean chat norm {:.4}):\n",
        s.position, r.layer, r.mean_chat_norm
    );
    for (prompt, answers) in s.prompts.iter().zip(&s.outputs) {
        out += &format!("--- {prompt:?} ---\n");
        for (strength, answer) in s.strengths.iter().zip(answers) {
            out += &format!("{strength:>6}: {}\n", answer.replace('\n', "\\n"));
        }
    }
    out
}

/// Loads a model (with its adapter merged in, when given) with a progress bar over its tensors.
pub(crate) fn load(args: &ModelArgs, backend: Backend) -> Result<Model> {
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

/// `crossdiff kl`'s table, the sweep when there is one, and a last line with the gap it closes.
fn print_kl(job: &KlJob, report: &crossdiff::analysis::kl::KlReport, device_name: &str) {
    let print_rows = |rows: &[crossdiff::analysis::kl::KlStat]| {
        println!("{:<18} {:>8} {:>22} {:>22}", "condition", "latents", "KL all reply tokens", "KL first 9 tokens");
        for s in rows {
            let name = match s.layer {
                Some(l) => format!("{} @ {l}", s.condition),
                None => s.condition.clone(),
            };
            let (all, first9) = (s.mean_all + 0.0, s.mean_first9 + 0.0); // + 0.0: never "-0.0000"
            println!(
                "{:<18} {:>8} {:>12.4} ± {:<7.4} {:>12.4} ± {:<7.4}",
                name, s.latents, all, s.ci_all, first9, s.ci_first9
            );
        }
    };
    print_rows(&report.table);
    if !report.sweep.is_empty() {
        println!("layer sweep (patched on {}):", job.patch_on);
        print_rows(&report.sweep);
    }
    let get = |c: &str| report.table.iter().find(|s| s.condition == c);
    // A crosscoder's "all latents", or a diff-SAE's full reconstruction.
    let (Some(none), Some(all)) = (get("none"), get("all").or_else(|| get("sae_recon"))) else { return };
    let gap = none.mean_all;
    let closed = |v: f64| if gap > 0.0 { (100.0 * (1.0 - v / gap)).round() + 0.0 } else { 0.0 }; // no "-0%"
    let chat = match get("chat") {
        Some(c) => format!("; chat's own activations there close {:.0}%", closed(c.mean_all)),
        None => String::new(),
    };
    let sweep = if report.sweep.is_empty() { String::new() } else { format!(", sweep {}", job.sweep_file().display()) };
    println!(
        "kl: {} tokens; base→chat gap {gap:.4} (first 9: {:.4}); patching {} on {} positions closes {:.0}%{chat} → {}{sweep} ({device_name})",
        none.tokens_all,
        none.mean_first9,
        if all.condition == "all" { "all latents" } else { "the diff-SAE's reconstruction" },
        job.patch_on,
        closed(all.mean_all),
        job.table_file().display(),
    );
}
