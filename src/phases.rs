//! Where a training step's time goes (`crossdiff bench train --phases`): named phases timed around
//! the step's parts, and the bytes every host↔device transfer moves. Off unless a benchmark turns
//! it on; then a phase on a GPU device waits for the device at its end (`Device::sync`), so the
//! work a phase queued is charged to it rather than to the next readback.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<PhaseTime>> = Mutex::new(Vec::new());

/// The table, also after a panic elsewhere held the lock (the numbers are only a report).
fn table() -> std::sync::MutexGuard<'static, Vec<PhaseTime>> {
    TABLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open() -> std::sync::MutexGuard<'static, Vec<&'static str>> {
    OPEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// The phases open now, innermost last: a transfer's bytes are charged to the innermost.
static OPEN: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// One phase's totals since the last [`reset`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseTime {
    pub name: &'static str,
    pub seconds: f64,
    /// Bytes moved between host and device inside the phase (transfers only).
    pub bytes: u64,
    pub calls: u64,
}

/// The name transfers are recorded under (they happen inside the other phases).
pub const TRANSFERS: &str = "host↔device transfers";

/// Starts recording (and clears what was recorded).
pub fn enable() {
    reset();
    ENABLED.store(true, Ordering::Relaxed);
}

/// Stops recording.
pub fn disable() {
    ENABLED.store(false, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Clears the totals (a benchmark's warm-up step is left out this way).
pub fn reset() {
    table().clear();
}

/// Whether a phase's bytes are all transfers inside other phases (the [`TRANSFERS`] line).
pub fn is_transfers(p: &PhaseTime) -> bool {
    p.name == TRANSFERS
}

/// The totals, in the order the phases first ran.
pub fn take() -> Vec<PhaseTime> {
    table().clone()
}

fn add(name: &'static str, seconds: f64, bytes: u64, calls: u64) {
    let mut t = table();
    match t.iter_mut().find(|p| p.name == name) {
        Some(p) => {
            p.seconds += seconds;
            p.bytes += bytes;
            p.calls += calls;
        }
        None => t.push(PhaseTime { name, seconds, bytes, calls }),
    }
}

/// Times the phase `name` until dropped (nothing when recording is off).
pub struct Phase {
    name: &'static str,
    start: Instant,
    device: Option<Device>,
}

/// A guard for the phase `name` on `device`; `None` when recording is off.
pub fn phase(name: &'static str, device: &Device) -> Option<Phase> {
    enabled().then(|| {
        open().push(name);
        Phase { name, start: Instant::now(), device: Some(device.clone()) }
    })
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(d) = &self.device {
            // The CPU path computes as it goes; a GPU queue is drained so its work counts here.
            if !crate::backend::is_flex(d) {
                let _ = d.sync();
            }
        }
        add(self.name, self.start.elapsed().as_secs_f64(), 0, 1);
        let mut open = open();
        if let Some(i) = open.iter().rposition(|n| *n == self.name) {
            open.remove(i);
        }
    }
}

/// Records one transfer of `bytes` that took `seconds` (readbacks and uploads).
pub fn transfer(bytes: u64, seconds: f64) {
    if enabled() {
        add(TRANSFERS, seconds, bytes, 1);
        let open = open().last().copied();
        if let Some(name) = open {
            add(name, 0.0, bytes, 0);
        }
    }
}
