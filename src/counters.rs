//! What a GPU pass costs beyond its arithmetic: device→host readbacks (each one a synchronisation
//! point) and kernel dispatches. Every readback in the engine goes through [`read_f32`] /
//! [`read_i64`] / [`read_data`], which count it; dispatches are counted by cubecl's launch
//! observer (the CPU path, burn flex, launches no kernels). `crossdiff bench train|analyze
//! --counters` reports both per step or batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow};
use burn::tensor::{Int, Tensor, TensorData};
use cubecl::logging::{LaunchObservation, LaunchObserver};

static READBACKS: AtomicU64 = AtomicU64::new(0);
static FORWARD_BATCHES: AtomicU64 = AtomicU64::new(0);

/// Marks one forward batch of a model over documents (caching, on-the-fly pairs): the unit
/// `bench cache --counters` reports readbacks per (the target is exactly one: the block's output).
pub fn count_forward_batch() {
    FORWARD_BATCHES.fetch_add(1, Ordering::Relaxed);
}

fn count_readback() {
    READBACKS.fetch_add(1, Ordering::Relaxed);
}

/// Reads a float tensor back to the host as f32 (counted; timed and sized under `--phases`).
pub fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    count_readback();
    let start = crate::phases::enabled().then(std::time::Instant::now);
    let v = t.try_into_vec_as::<f32>().map_err(|e| anyhow!("reading a tensor from the device: {e:?}"))?;
    if let Some(s) = start {
        crate::phases::transfer(4 * v.len() as u64, s.elapsed().as_secs_f64());
    }
    Ok(v)
}

/// Reads an integer tensor back to the host as i64 (counted).
pub fn read_i64<const D: usize>(t: Tensor<D, Int>) -> Result<Vec<i64>> {
    count_readback();
    t.try_into_vec_as::<i64>().map_err(|e| anyhow!("reading a tensor from the device: {e:?}"))
}

/// Reads a float tensor's raw data back (counted): kernels that pack integers into f32 buffers.
pub fn read_data<const D: usize>(t: Tensor<D>) -> Result<TensorData> {
    count_readback();
    t.try_into_data().map_err(|e| anyhow!("reading a tensor from the device: {e:?}"))
}

#[derive(Default)]
struct Dispatches(AtomicU64);

impl LaunchObserver for Dispatches {
    fn launched(&self, _kernel: &'static str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counting from now until dropped: readbacks (process-wide) and kernel dispatches (cubecl's one
/// observer slot; a second `Counting` replaces the first while it lives).
pub struct Counting {
    dispatches: Arc<Dispatches>,
    readbacks_at_start: u64,
    forward_batches_at_start: u64,
    _observation: LaunchObservation,
}

impl Counting {
    pub fn start() -> Self {
        let dispatches = Arc::new(Dispatches::default());
        let observation = LaunchObservation::new(dispatches.clone());
        Self {
            dispatches,
            readbacks_at_start: READBACKS.load(Ordering::Relaxed),
            forward_batches_at_start: FORWARD_BATCHES.load(Ordering::Relaxed),
            _observation: observation,
        }
    }

    /// Readbacks since `start` (from any thread).
    pub fn readbacks(&self) -> u64 {
        READBACKS.load(Ordering::Relaxed) - self.readbacks_at_start
    }

    /// Forward batches over documents since `start` ([`count_forward_batch`]).
    pub fn forward_batches(&self) -> u64 {
        FORWARD_BATCHES.load(Ordering::Relaxed) - self.forward_batches_at_start
    }

    /// Kernel dispatches since `start`.
    pub fn dispatches(&self) -> u64 {
        self.dispatches.0.load(Ordering::Relaxed)
    }
}
