//! The one background-job mechanism of the app. A job is a closure `FnOnce(Handle) ->
//! anyhow::Result<String>` run on its own thread: the engine's [`workflow::Event`]s arrive over a
//! channel and become progress (phase, done/total, rate and ETA) and training metrics; Cancel sets
//! the handle's flag (the engine then saves, so the same job resumes later); the thread body runs
//! under `catch_unwind`, so a job that panics reports "the job panicked: …" as its error like any
//! failure, and the view's buttons are enabled again. A failed job shows only its error, phrased
//! with the view's field labels ([`crate::errors::phrase`]); a cancelled one says so.
//!
//! Every view starts its jobs through [`JobEnv::spawn`], which resolves the app's one device (the
//! top bar's selector) on the job's thread and hands the job the app's one [`ModelStore`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use burn::tensor::Device;
use crossdiff::Backend;
use crossdiff::crosscoder::train::StepMetrics;
use crossdiff::workflow::models::ModelStore;
use crossdiff::workflow::{Event, Handle};
use eframe::egui;

use crate::errors::{Fields, phrase};

/// What the job's thread sends: the engine's events, then how it ended.
enum Msg {
    Event(Event),
    Done(anyhow::Result<String>),
}

/// A running (or finished) job as the UI sees it.
pub struct Job {
    pub name: &'static str,
    /// The device the job was started on (`None`: a job that needs none).
    pub device: Option<Backend>,
    events: Receiver<Msg>,
    cancel: Arc<AtomicBool>,
    /// The current phase ("loading models", "caching", "training", …) and its unit.
    pub phase: String,
    pub unit: &'static str,
    pub progress: (u64, u64),
    pub status: String,
    pub finished: Option<Result<String, String>>,
    /// One entry per logged training step (the curves).
    pub metrics: Vec<StepMetrics>,
    /// When the current phase's first report arrived and how far it was (for the rate and ETA).
    first_report: Option<(Instant, u64)>,
    /// The view's flag → field table its error is phrased with.
    fields: Fields,
}

impl Job {
    /// Starts `work` on a thread with a [`Handle`] whose events reach this job and whose cancel
    /// flag is [`Job::cancel`]'s. A panic inside `work` becomes the job's error.
    pub fn spawn(
        name: &'static str,
        ctx: egui::Context,
        work: impl FnOnce(Handle) -> anyhow::Result<String> + Send + 'static,
    ) -> Self {
        let (tx, events) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        std::thread::spawn(move || {
            let send = |m: Msg| {
                let _ = tx.send(m);
                ctx.request_repaint();
            };
            let on_event = |e: Event| send(Msg::Event(e));
            let result = catch_unwind(AssertUnwindSafe(|| work(Handle::new(&on_event, &flag))));
            send(Msg::Done(match result {
                Ok(result) => result,
                Err(panic) => Err(anyhow::anyhow!("the job panicked: {}", panic_message(panic.as_ref()))),
            }));
        });
        Self {
            name,
            device: None,
            events,
            cancel,
            phase: String::new(),
            unit: "",
            progress: (0, 0),
            status: "starting".into(),
            finished: None,
            metrics: Vec::new(),
            first_report: None,
            fields: &[],
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether Cancel was pressed (the job then stops at its next safe point and saves).
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> bool {
        self.finished.is_none()
    }

    /// Applies the events that arrived since the last frame; true when the job ended just now.
    pub fn poll(&mut self) -> bool {
        let was_running = self.running();
        while let Ok(msg) = self.events.try_recv() {
            match msg {
                Msg::Event(Event::Progress { phase, done, total, unit }) => {
                    if phase != self.phase {
                        self.first_report = None;
                    }
                    self.first_report.get_or_insert((Instant::now(), done));
                    self.status = format!("{phase}: {done}/{total} {unit}");
                    self.phase = phase;
                    self.unit = unit;
                    self.progress = (done, total);
                }
                Msg::Event(Event::Metrics(m)) => {
                    self.status = format!(
                        "step {} loss {:.4} FVE {:.3}/{:.3} L0 {:.1}",
                        m.step, m.loss, m.fve_base, m.fve_chat, m.l0
                    );
                    self.metrics.push(m);
                }
                Msg::Done(result) => {
                    if result.is_err() {
                        // Only the error is left to show.
                        self.progress = (0, 0);
                        self.phase.clear();
                        self.status.clear();
                        self.first_report = None;
                        self.metrics.clear();
                    }
                    self.finished = Some(result.map_err(|e| phrase(&e, self.fields)));
                }
            }
        }
        was_running && !self.running()
    }

    /// Units per second since the current phase's first report, and the seconds left at that rate.
    pub fn rate_and_eta(&self) -> Option<(f64, f64)> {
        let (start, from) = self.first_report?;
        let secs = start.elapsed().as_secs_f64();
        let (done, total) = self.progress;
        if secs <= 0.0 || done <= from {
            return None;
        }
        let rate = (done - from) as f64 / secs;
        Some((rate, total.saturating_sub(done) as f64 / rate))
    }

    /// The error, when the job failed.
    pub fn error(&self) -> Option<&str> {
        match &self.finished {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// What every view's jobs share: the egui context (to repaint), the app's one device, its one
/// model store and its one chat adapter.
#[derive(Clone)]
pub struct JobEnv {
    pub ctx: egui::Context,
    pub backend: Backend,
    pub store: Arc<ModelStore>,
    /// The "Chat adapter (LoRA, optional)" field as typed (the app keeps one for every view).
    pub chat_adapter: String,
}

impl JobEnv {
    /// The LoRA adapter every job merges into the chat model: the app's field, when it is filled.
    pub fn chat_adapter(&self) -> Option<PathBuf> {
        let dir = self.chat_adapter.trim();
        (!dir.is_empty()).then(|| PathBuf::from(dir))
    }

    /// The backend jobs really run on: `auto` settled (an error there surfaces when the job opens
    /// the device).
    pub fn device_backend(&self) -> Backend {
        self.backend.resolve().unwrap_or_else(|_| self.backend.clone())
    }

    /// A job on the app's device: the device is opened on the job's thread (an unusable one is the
    /// job's error), and `work` gets it with the shared model store.
    pub fn spawn(
        &self,
        name: &'static str,
        work: impl FnOnce(&Device, &ModelStore, Handle) -> anyhow::Result<String> + Send + 'static,
    ) -> Job {
        let backend = self.device_backend();
        let store = self.store.clone();
        let started_on = backend.clone();
        let mut job = Job::spawn(name, self.ctx.clone(), move |handle| {
            handle.progress(&format!("opening the {backend} device"), 0, 1, "devices");
            let device = backend.device()?;
            // A server that goes away mid-job is said as such (not as burn's "RecvError").
            work(&device, &store, handle).map_err(|e| backend.explain_failure(e))
        });
        job.device = Some(started_on);
        job
    }
}

/// A view's one job: started by its Start button (disabled while the job runs), shown with its
/// progress, status, rate/ETA, Cancel, and how it ended.
#[derive(Default)]
pub struct JobSlot {
    job: Option<Job>,
    /// The job ended and the view has not asked yet ([`JobSlot::take_ended`]).
    ended: bool,
    /// The view's flag → field table, for its jobs' errors.
    fields: Fields,
}

impl JobSlot {
    /// The slot of a view whose fields are `fields` (its jobs' errors name them).
    pub fn new(fields: Fields) -> Self {
        Self { fields, ..Self::default() }
    }

    pub fn running(&self) -> bool {
        self.job.as_ref().is_some_and(Job::running)
    }

    /// Starts showing `job`; its error will be phrased with this slot's fields.
    pub fn start(&mut self, mut job: Job) {
        job.fields = self.fields;
        self.job = Some(job);
        self.ended = false;
    }

    pub fn job(&self) -> Option<&Job> {
        self.job.as_ref()
    }

    /// The device the last job was started on.
    pub fn device(&self) -> Option<Backend> {
        self.job.as_ref().and_then(|j| j.device.clone())
    }

    /// Applies the events that arrived since the last call.
    pub fn poll(&mut self) {
        if self.job.as_mut().is_some_and(Job::poll) {
            self.ended = true;
        }
    }

    /// Whether the job ended since the last call (views then re-read what it wrote).
    pub fn take_ended(&mut self) -> bool {
        self.poll();
        std::mem::take(&mut self.ended)
    }

    /// Whether the job ended since the last call having done its work: not failed, not cancelled
    /// (views then tell the others that a run changed).
    pub fn take_succeeded(&mut self) -> bool {
        self.take_ended()
            && self.job.as_ref().is_some_and(|j| matches!(j.finished, Some(Ok(_))) && !j.cancel_requested())
    }

    /// What the job delivered, once it has ended (taken: `None` on later frames).
    pub fn delivered<T>(&mut self, delivery: &Delivery<T>) -> Option<T> {
        if self.take_ended() { delivery.take() } else { None }
    }

    /// A Start button, enabled when no job runs and `ready`; true when clicked.
    pub fn start_button(&self, ui: &mut egui::Ui, ready: bool, label: &str) -> bool {
        ui.add_enabled(ready && !self.running(), egui::Button::new(label)).clicked()
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.poll();
        if let Some(job) = &mut self.job {
            job_ui(ui, job);
        }
    }
}

/// Progress bar, status line, rate/ETA and cancel button of a job; a failed job shows only its
/// error, a cancelled one says so.
pub fn job_ui(ui: &mut egui::Ui, job: &mut Job) {
    let name = job.name;
    if let Some(e) = job.error() {
        ui.colored_label(egui::Color32::LIGHT_RED, format!("{name} failed — error: {e}"));
        return;
    }
    // The device, said here for every view: on the status line while the job runs, in its last
    // line once it ended (`remote ws://HOST:PORT (portable route)`, `wgpu: NVIDIA H100 (Vulkan)`).
    let device = job.device.as_ref().map(Backend::describe);
    let (done, total) = job.progress;
    let frac = if total > 0 { done as f32 / total as f32 } else { 0.0 };
    ui.add(egui::ProgressBar::new(frac).show_percentage().text(format!("{name}: {done}/{total} {}", job.unit)));
    let on = device.as_ref().filter(|_| job.running()).map(|d| format!(" on {d}")).unwrap_or_default();
    ui.label(format!("{name} status: {}{on}", job.status));
    match &job.finished {
        None => {
            if let Some((rate, eta)) = job.rate_and_eta() {
                ui.label(format!("{name} rate {rate:.1} {}/s, ETA {eta:.0}s", job.unit));
            }
            let cancelling = job.cancel_requested();
            if ui.add_enabled(!cancelling, egui::Button::new(format!("Cancel {name}"))).clicked() {
                job.cancel();
            }
            if cancelling {
                ui.label(format!("{name} cancelling: it stops after the current step"));
            }
        }
        Some(Ok(s)) => {
            let ran = device.map(|d| format!(" (ran on {d})")).unwrap_or_default();
            let ended = if job.cancel_requested() { "cancelled" } else { "finished" };
            ui.label(format!("{name} {ended}: {s}{ran}"));
        }
        Some(Err(_)) => {}
    }
}

/// Where a job leaves its typed result for its view: the job `put`s it, the view `take`s it once
/// the job has ended (moved, not cloned every frame).
pub struct Delivery<T>(Arc<std::sync::Mutex<Option<T>>>);

impl<T> Clone for Delivery<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Delivery<T> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<T> Delivery<T> {
    pub fn put(&self, value: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }

    pub fn take(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
