//! Long work (caching, training) on a background thread: progress arrives over a channel, a shared
//! flag cancels it between shards/steps (the engine then saves, so the same job resumes later).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

/// What a job reports.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// `done` of `total` units (tokens, steps) and a one-line status.
    Progress {
        done: u64,
        total: u64,
        status: String,
    },
    /// Training metrics of one logged step: (step, loss, fve_base, fve_chat, l0, dead_frac).
    Metrics {
        step: u64,
        loss: f64,
        fve_base: f64,
        fve_chat: f64,
        l0: f64,
        dead_frac: f64,
    },
    Finished(String),
    Failed(String),
}

/// A running (or finished) job as the UI sees it.
pub struct Job {
    pub name: &'static str,
    events: Receiver<JobEvent>,
    cancel: Arc<AtomicBool>,
    pub progress: (u64, u64),
    pub status: String,
    pub finished: Option<Result<String, String>>,
    pub metrics: Vec<JobEvent>,
    /// When the first progress report arrived and how far it was (for the rate and ETA).
    first_report: Option<(std::time::Instant, u64)>,
}

impl Job {
    /// Starts `work` on a thread; it reports through the sender and should stop when the flag is set.
    pub fn spawn(
        name: &'static str,
        ctx: eframe::egui::Context,
        work: impl FnOnce(&Reporter, &AtomicBool) -> anyhow::Result<String> + Send + 'static,
    ) -> Self {
        let (tx, events) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        std::thread::spawn(move || {
            let reporter = Reporter { tx, ctx };
            let result = work(&reporter, &flag);
            reporter.send(match result {
                Ok(summary) => JobEvent::Finished(summary),
                Err(e) => JobEvent::Failed(format!("{e:#}")),
            });
        });
        Self {
            name,
            events,
            cancel,
            progress: (0, 0),
            status: "starting".into(),
            finished: None,
            metrics: Vec::new(),
            first_report: None,
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn running(&self) -> bool {
        self.finished.is_none()
    }

    /// Applies the events that arrived since the last frame.
    pub fn poll(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                JobEvent::Progress { done, total, status } => {
                    self.first_report.get_or_insert((std::time::Instant::now(), done));
                    self.progress = (done, total);
                    self.status = status;
                }
                m @ JobEvent::Metrics { .. } => self.metrics.push(m),
                JobEvent::Finished(s) => self.finished = Some(Ok(s)),
                JobEvent::Failed(e) => self.finished = Some(Err(e)),
            }
        }
    }
}

/// The job's side of the channel: each event also asks the UI to repaint, so progress shows
/// without user input.
pub struct Reporter {
    tx: Sender<JobEvent>,
    ctx: eframe::egui::Context,
}

impl Reporter {
    pub fn send(&self, event: JobEvent) {
        let _ = self.tx.send(event);
        self.ctx.request_repaint();
    }
}

impl Job {
    /// Units per second since the first report, and the seconds left at that rate.
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
}

/// Progress bar, status line and cancel button of a job.
pub fn job_ui(ui: &mut eframe::egui::Ui, job: &mut Job) {
    job.poll();
    let (done, total) = job.progress;
    let frac = if total > 0 { done as f32 / total as f32 } else { 0.0 };
    ui.add(eframe::egui::ProgressBar::new(frac).show_percentage().text(format!("{}: {done}/{total}", job.name)));
    ui.label(format!("{} status: {}", job.name, job.status));
    if let (Some((rate, eta)), true) = (job.rate_and_eta(), job.running()) {
        ui.label(format!("{} rate {rate:.1}/s, ETA {:.0}s", job.name, eta));
    }
    match &job.finished {
        None => {
            if ui.button(format!("Cancel {}", job.name)).clicked() {
                job.cancel();
            }
        }
        Some(Ok(s)) => {
            ui.label(format!("{} finished: {s}", job.name));
        }
        Some(Err(e)) => {
            ui.colored_label(eframe::egui::Color32::LIGHT_RED, format!("{} failed: {e}", job.name));
        }
    }
}
