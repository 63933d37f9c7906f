//! The jobs a user runs — cache, train, analyze (with examples), kl, steer, prompt lab, the
//! activation-difference lens (adl) and the demo — each as one config struct that carries its
//! defaults, its docs (the CLI's `--help` is built from them: the configs derive `clap::Args`) and
//! its validation, run with a [`Handle`] that carries progress out and cancellation in, returning a
//! typed result. The CLI parses flags into these configs; the app's views fill the same ones; the
//! demo calls the same jobs. A check written here applies to all three.

pub mod adl;
pub mod analyze;
pub mod cache;
pub mod checks;
pub mod compare;
pub mod kl;
pub mod models;
pub mod project;
pub mod prompt_lab;
pub mod serve;
pub mod steer;
pub mod train;
mod train_checks;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::crosscoder::train::StepMetrics;

pub use checks::{BadValue, check_layer, check_width, resolve_layer};

/// What a running job reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// `done` of `total` `unit`s in the named phase ("loading models", "caching", "training", …).
    Progress { phase: String, done: u64, total: u64, unit: &'static str },
    /// One logged training step (the curves).
    Metrics(StepMetrics),
}

/// The two-way line between a job and whoever runs it: events out, a cancel flag in. A cancelled
/// job stops at its next safe point (a shard, a step, a batch), saves, and returns normally, so the
/// same job resumes later.
#[derive(Clone, Copy)]
pub struct Handle<'a> {
    on_event: &'a (dyn Fn(Event) + Sync),
    cancel: &'a AtomicBool,
}

fn ignore(_: Event) {}

static NEVER_CANCELLED: AtomicBool = AtomicBool::new(false);

impl<'a> Handle<'a> {
    pub fn new(on_event: &'a (dyn Fn(Event) + Sync), cancel: &'a AtomicBool) -> Self {
        Self { on_event, cancel }
    }

    /// Reports nothing and is never cancelled (tests, the demo's inner stages).
    pub fn silent() -> Handle<'static> {
        Handle { on_event: &ignore, cancel: &NEVER_CANCELLED }
    }

    pub fn progress(&self, phase: &str, done: u64, total: u64, unit: &'static str) {
        (self.on_event)(Event::Progress { phase: phase.to_string(), done, total, unit });
    }

    pub fn metrics(&self, m: StepMetrics) {
        (self.on_event)(Event::Metrics(m));
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn keep_going(&self) -> bool {
        !self.cancelled()
    }
}
