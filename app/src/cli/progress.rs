//! A job's [`Handle`] as a terminal progress bar (rate and ETA), and Ctrl-C as its cancel flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossdiff::workflow::{Event, Handle};
use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Bar {
    bar: ProgressBar,
    on_event: Box<dyn Fn(Event) + Sync + Send>,
    cancel: Arc<AtomicBool>,
}

impl Bar {
    /// A bar counting `unit`s for a job that stops at Ctrl-C (cache, train, analyze): the first
    /// Ctrl-C sets the job's cancel flag, the job saves and returns.
    pub(crate) fn cancellable(unit: &'static str) -> Self {
        Self { cancel: interrupt_flag(), ..Self::new(unit) }
    }

    /// A bar counting `unit`s; Ctrl-C keeps its default meaning (quit now).
    pub(crate) fn new(unit: &'static str) -> Self {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(&format!(
                "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} {{msg}} ({{per_sec}}, ETA {{eta}})"
            ))
            .expect("static template")
            .progress_chars("=> "),
        );
        let b = bar.clone();
        let on_event = Box::new(move |e: Event| match e {
            Event::Progress { phase, done, total, .. } => {
                b.set_prefix(phase);
                b.set_length(total);
                b.set_position(done);
            }
            Event::Metrics(m) => b.set_message(format!(
                "loss {:.4} FVE {:.3}/{:.3} L0 {:.1} dead {:.1}%",
                m.loss,
                m.fve_base,
                m.fve_chat,
                m.l0,
                100.0 * m.dead_frac
            )),
        });
        Self { bar, on_event, cancel: Arc::new(AtomicBool::new(false)) }
    }

    pub(crate) fn handle(&self) -> Handle<'_> {
        Handle::new(self.on_event.as_ref(), &self.cancel)
    }

    /// Whether Ctrl-C stopped the job.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Set by Ctrl-C (one flag for the process: the handler can be installed once): long jobs finish
/// the shard or step they are in, save, and exit cleanly.
static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Whether Ctrl-C stopped a job of this process (then the command exits with status 130, as an
/// interrupted program does, after its summary: a script sees the job did not finish).
pub(crate) fn interrupted() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: the user really wants out; the last atomic write is on disk.
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: finishing the current shard or step, then stopping (Ctrl-C again to quit now)");
        });
        flag
    })
    .clone()
}
