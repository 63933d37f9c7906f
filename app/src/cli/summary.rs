//! The one-line summaries (and tables) the commands print when a job finishes.

use crossdiff::workflow::kl::KlJob;
use crossdiff::workflow::train::TrainJob;

/// The train command's one line: where the checkpoint is (`done.step`, also after a Ctrl-C that
/// stopped past the last logged step) and the last logged metrics.
pub(super) fn train_summary(
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
pub(super) fn adl_summary(r: &crossdiff::analysis::adl::AdlReport) -> String {
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

/// `crossdiff kl`'s table, the sweep when there is one, and a last line with the gap it closes.
pub(super) fn print_kl(job: &KlJob, report: &crossdiff::analysis::kl::KlReport, device_name: &str) {
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
