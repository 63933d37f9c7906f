//! Crosscoder training (shared/spec/method.md §2): L1 or BatchTopK, Adam with linear warm-up,
//! gradient-norm clipping, AuxK with dead-latent counters, the EMA inference threshold, optional
//! k annealing; checkpoints that resume to the same loss curve.
//!
//! Layout (each module imports only those before it): `config` (settings and defaults) ←
//! `step` (the step contract and the bookkeeping every route shares) ← the routes `dense`,
//! `host_sparse`, `kernel_sparse`, `autodiff_sparse` ← `dispatch` (the route choice, [`step_loss`]);
//! `checkpoint` (save, load, trim the metrics); this file: the data sources and the training loop.

mod autodiff_sparse;
mod checkpoint;
mod config;
mod dense;
mod dispatch;
mod host_picks;
pub mod host_sparse;
mod kernel_sparse;
mod parallel;
pub mod resident;
mod sae_step;
mod step;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;

pub use crate::crosscoder::train::checkpoint::{SavedRun, TrainState, check_checkpoint_dir, saved_config, saved_run};
pub use crate::crosscoder::train::config::{TrainConfig, defaults, training_bytes};
pub use crate::crosscoder::train::dispatch::step_loss;
pub use crate::crosscoder::train::step::{StepMetrics, StepOutput, clip_factor, clip_gradients, fve, update_threshold};

use crate::activations::reader::PairBatch;
use crate::crosscoder::optim::AdamConfig;
use crate::crosscoder::train::checkpoint::{Provenance, load, save, trim_metrics};
use crate::crosscoder::train::step::dead_fraction;
use crate::crosscoder::{
    Crosscoder, CrosscoderConfig, Kind, Params, decode, dictionary_input, geometric_median, tensor,
};

/// Anything that yields training batches: the cache reader, the on-the-fly source, synthetic data.
pub trait PairSource {
    fn next_batch(&mut self) -> Result<Option<PairBatch>>;

    /// Skips `n` batches (resume); the default draws and drops them, which replays the stream exactly.
    fn skip_batches(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            if self.next_batch()?.is_none() {
                bail!("the data ended while skipping to the checkpoint's position");
            }
        }
        Ok(())
    }
}

impl PairSource for crate::activations::reader::CacheReader {
    fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        crate::activations::reader::CacheReader::next_batch(self)
    }
}

impl PairSource for crate::activations::onthefly::OnTheFlySource {
    fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        crate::activations::onthefly::OnTheFlySource::next_batch(self)
    }
}

/// Training progress for a bar or the app's curves.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    pub metrics: StepMetrics,
    pub total_steps: u64,
}

pub struct TrainRun<'a> {
    pub config: TrainConfig,
    pub out: PathBuf,
    /// Where the parameters, the optimizer and the batches live (with `devices`: the first of them).
    pub device: Device,
    /// Data-parallel training: the devices each batch's rows are split over (the first is
    /// `device`; each once, as `crate::backend::connect_devices` makes the list); empty: everything
    /// on `device`.
    pub devices: Vec<Device>,
    pub source: &'a mut dyn PairSource,
    /// Validation pairs `[n, 2, d]` for `val_every`.
    pub validation: Option<PairBatch>,
    pub layer: Option<usize>,
    pub models: Vec<String>,
    /// The models' identities (base, chat; empty when unknown), kept in the checkpoint and the run.
    pub model_ids: Vec<String>,
    /// Width d of one model's activations.
    pub width: usize,
    /// Where the batches come from (the cache's layer, width, size and shards, or the on-the-fly
    /// data and tokenization; the batch and shuffle settings), as a JSON object whose keys
    /// [`crate::activations::writer::flag_name`] names. Kept in the checkpoint; a resume whose
    /// source differs is refused naming what differs. `Null`: not recorded, not checked.
    pub source_fingerprint: serde_json::Value,
}

/// The data ended before the first step: there is nothing to train on, and nothing was written.
#[derive(Debug)]
pub struct NoTrainingPairs;

impl std::fmt::Display for NoTrainingPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the data gave no training pairs (0 tokens); nothing was written")
    }
}

impl std::error::Error for NoTrainingPairs {}

/// What a finished (or stopped) training call leaves.
pub struct Trained {
    pub crosscoder: Crosscoder,
    /// The step the checkpoint (and the exported crosscoder) is at.
    pub step: u64,
    /// The data ran out at `step`, before the step budget (not a cancel): the run is finished with
    /// what there was; running it again trains nothing more (recorded in the checkpoint, so a
    /// resume neither replays the data nor waits for more).
    pub data_ended: bool,
    /// Pairs in the batch of the last step this call trained (`None`: it trained none). A batch
    /// holds fewer pairs than asked for only at the end of the data (or of a pass over a cache):
    /// it is trained at its own size, its loss the mean over the pairs it has.
    pub last_batch: Option<usize>,
}

impl TrainRun<'_> {
    /// Trains (resuming from `out/checkpoint` when present) until `steps` or the data ends, or until
    /// `keep_going` says stop; checkpoints and exports the crosscoder on the way out. Data that ends
    /// before `steps` is [`Trained::data_ended`] (recorded in the checkpoint); a checkpoint that
    /// cannot be written stops training with the error naming the file (the previous checkpoint
    /// stays, and the metrics logged past it are trimmed on the next resume). A non-finite
    /// loss or parameter stops training with an error naming the step; the last good checkpoint
    /// and crosscoder stay as they were. Data that ends before step 1 is [`NoTrainingPairs`], with
    /// nothing written; a checkpoint made with other settings, models or data is refused, naming
    /// each difference.
    pub fn run(&mut self, mut progress: impl FnMut(TrainProgress), keep_going: impl Fn() -> bool) -> Result<Trained> {
        let cfg = self.config.clone();
        let run = crate::run_dir::RunDir::new(&self.out);
        let made = Provenance { model_ids: &self.model_ids, source: &self.source_fingerprint };
        let mut state = match load(&self.out, &cfg, &made, &self.device)? {
            Some(s) => {
                let d = cfg.width_of(&s.params);
                if d != self.width {
                    bail!("{}: field `d` is {d}, the data has width {}", run.checkpoint_state().display(), self.width);
                }
                // The checkpoint's stream position: the reader replays the same batches (unless the
                // data ended there: nothing is left to draw).
                if !s.data_ended {
                    self.source.skip_batches(s.step)?;
                }
                trim_metrics(&self.out, s.step)?;
                s
            }
            None => self.fresh_state()?,
        };
        // A run at step 0 draws its first batch before writing anything: data that gives none is
        // an error, not an untrained crosscoder.
        let mut first = None;
        if state.step == 0 && cfg.steps > 0 && keep_going() {
            first = Some(self.source.next_batch()?.ok_or(NoTrainingPairs)?);
        }
        let checkpoint_dir = run.checkpoint_dir();
        check_checkpoint_dir(&checkpoint_dir)?;
        std::fs::create_dir_all(&checkpoint_dir)
            .map_err(|e| anyhow!("{}: cannot create: {e}", checkpoint_dir.display()))?;
        if state.step == 0 {
            let _ = std::fs::remove_file(run.metrics());
        }
        let d = cfg.width_of(&state.params);
        let mut metrics_file = fs_err::OpenOptions::new().create(true).append(true).open(run.metrics())?;
        let mut first_batch = state.step == 0;
        // The step the checkpoint on disk holds (None: no checkpoint yet), and whether it records
        // the data's end.
        let mut saved = (state.step > 0).then_some(state.step);
        let recorded_end = state.data_ended;
        let mut last_batch = None;
        // On wgpu, the dead-latent counters and θ live on the device between checkpoints.
        let mut resident = (self.devices.is_empty() && resident::applies(&cfg, &self.device))
            .then(|| resident::Resident::upload(&state.since_selected, state.threshold, &cfg, &self.device));
        while state.step < cfg.steps && !state.data_ended && keep_going() {
            let batch = match first.take() {
                Some(b) => b,
                None => match self.source.next_batch()? {
                    Some(b) => b,
                    None => {
                        state.data_ended = true;
                        break;
                    }
                },
            };
            if batch.d != d {
                bail!("the data has width {}, the crosscoder {d}", batch.d);
            }
            let step = state.step + 1;
            if first_batch && cfg.kind.is_topk() {
                // b_dec := geometric median of the first batch (per model; an SAE's of its input).
                state.params.b_dec =
                    tensor(first_median(&cfg, &batch.acts, d), [1, state.params.b_dec.dims()[1]], &self.device);
            }
            first_batch = false;
            let x = dictionary_input(cfg.kind, cfg.target, batch.acts, d, &self.device);
            let mut out = match resident.as_mut() {
                Some(r) => {
                    let _phase = crate::phases::phase("device-resident step", &self.device);
                    let tokens_after = state.tokens + batch.batch as u64;
                    Outcome::Device(resident::step(&cfg, &state.params, x.clone(), step, tokens_after, r)?)
                }
                None if !self.devices.is_empty() => Outcome::Host(parallel::step(
                    &cfg,
                    &state.params,
                    x.clone(),
                    step,
                    &mut state.since_selected,
                    &self.devices,
                )?),
                None => Outcome::Host(step_loss(&cfg, &state.params, x.clone(), step, &mut state.since_selected)?),
            };
            let phase = crate::phases::phase("clip", &self.device);
            let mut g = match &mut out {
                Outcome::Host(out) => out.take_gradients(),
                Outcome::Device(out) => out.grads.clone(),
            };
            if cfg.kind == Kind::Sae {
                g[2] = crate::crosscoder::sae::remove_parallel_gradient(&state.params.w_dec, g[2].clone());
            }
            // On the CPU the clip's factor is applied inside Adam's pass (one pass less over the
            // gradients); elsewhere the gradients are scaled here.
            let (g, grad_scale) = match &out {
                Outcome::Host(_) if crate::backend::is_flex(&self.device) => {
                    let s = clip_factor(&g, cfg.clip_grad)?;
                    (g, s)
                }
                Outcome::Host(_) => (clip_gradients(g, cfg.clip_grad)?, 1.0),
                Outcome::Device(_) => (resident::clip(g, cfg.clip_grad), 1.0),
            };
            drop(phase);
            let phase = crate::phases::phase("optimizer", &self.device);
            let lr = cfg.lr_at(step);
            let TrainState { params, adam_m, adam_v, .. } = &mut state;
            AdamConfig::default().update_params(step, lr, params, adam_m, adam_v, g, grad_scale)?;
            if cfg.kind == Kind::Sae {
                params.w_dec = crate::crosscoder::sae::unit_rows(params.w_dec.clone());
            }
            drop(phase);
            match (&out, resident.as_mut()) {
                (Outcome::Device(o), Some(r)) => o.update_threshold(r, step, cfg.threshold_start),
                (Outcome::Host(o), _) => {
                    state.threshold = update_threshold(state.threshold, o.min_kept(), step, cfg.threshold_start)
                }
                (Outcome::Device(_), None) => unreachable!("a device outcome comes from the resident route"),
            }
            state.step = step;
            state.tokens += batch.batch as u64;
            last_batch = Some(batch.batch);

            if step % cfg.log_every.max(1) == 0 || step == cfg.steps {
                let mut m = match (&out, &resident) {
                    (Outcome::Device(o), Some(r)) => o.metrics(&x, r, &cfg, step, state.tokens, lr)?,
                    (Outcome::Host(o), _) => {
                        o.metrics(&x, step, state.tokens, dead_fraction(&cfg, &state.since_selected), lr)?
                    }
                    (Outcome::Device(_), None) => unreachable!("a device outcome comes from the resident route"),
                };
                if !m.loss.is_finite() {
                    return Err(diverged(&format!("the loss is {}", m.loss), step, saved, &self.out));
                }
                if cfg.val_every > 0 && step % cfg.val_every == 0 {
                    if let Some(v) = &self.validation {
                        // Validation encodes with θ: bring the device's current one over.
                        if let Some(r) = &resident {
                            r.download(&mut state.since_selected, &mut state.threshold)?;
                        }
                        let [vb, vc] = self.validation_fve(&state, v)?;
                        m.val_fve_base = Some(vb);
                        m.val_fve_chat = Some(vc);
                    }
                }
                writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
                metrics_file.flush()?;
                progress(TrainProgress { metrics: m, total_steps: cfg.steps });
            }
            if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 {
                if let Some(r) = &resident {
                    r.download(&mut state.since_selected, &mut state.threshold)?;
                }
                self.save_checked(&cfg, &state, saved)?;
                saved = Some(step);
            }
        }
        if let Some(r) = &resident {
            r.download(&mut state.since_selected, &mut state.threshold)?;
        }
        // A resume that trained nothing leaves the checkpoint as it is (unless it learnt the end).
        if saved != Some(state.step) || state.data_ended != recorded_end {
            self.save_checked(&cfg, &state, saved)?;
        }
        let crosscoder = self.export(&state)?;
        Ok(Trained { crosscoder, step: state.step, data_ended: state.data_ended, last_batch })
    }

    /// Checkpoints unless a parameter has gone non-finite (one scalar read: the sum of every
    /// parameter is finite exactly when all of them are, short of an overflow that is as bad).
    fn save_checked(&self, cfg: &TrainConfig, state: &TrainState, saved: Option<u64>) -> Result<()> {
        let p = &state.params;
        let total = p.w_enc.clone().sum() + p.b_enc.clone().sum() + p.w_dec.clone().sum() + p.b_dec.clone().sum();
        let total = crate::counters::read_f32(total)?[0];
        if !total.is_finite() {
            return Err(diverged("a parameter is not finite", state.step, saved, &self.out));
        }
        save(&self.out, cfg, state, &Provenance { model_ids: &self.model_ids, source: &self.source_fingerprint })
    }

    fn fresh_state(&self) -> Result<TrainState> {
        let cfg = &self.config;
        let params = if cfg.kind == Kind::Sae {
            crate::crosscoder::sae::init(self.width, cfg.dict_size, cfg.seed, &self.device)
        } else {
            Params::init_as(cfg.init, self.width, cfg.dict_size, cfg.init_norm, cfg.seed, &self.device)
        };
        let zeros = params.clone().map(|t| t.zeros_like());
        Ok(TrainState {
            adam_m: zeros.clone(),
            adam_v: zeros,
            params,
            step: 0,
            tokens: 0,
            since_selected: vec![0; cfg.dict_size],
            threshold: None,
            data_ended: false,
        })
    }

    fn validation_fve(&self, state: &TrainState, v: &PairBatch) -> Result<[f64; 2]> {
        let cc = self.crosscoder(state);
        let x = dictionary_input(cc.config.kind, cc.config.target, v.acts.clone(), v.d, &self.device);
        let recon = decode(&cc.params, cc.codes(x.clone()));
        // An SAE's one input fills both fields.
        let blocks = if cc.config.kind == Kind::Sae { 1 } else { 2 };
        let f = crate::crosscoder::train::step::fve_blocks(&x, &(x.clone() - recon), blocks, v.d)?;
        Ok([f[0], f[blocks - 1]])
    }

    fn crosscoder(&self, state: &TrainState) -> Crosscoder {
        let (d, dict) = (self.config.width_of(&state.params), state.params.w_enc.dims()[1]);
        Crosscoder {
            config: CrosscoderConfig {
                kind: self.config.kind,
                d,
                dict_size: dict,
                // k means nothing to an L1 crosscoder: recorded as 0 (the authors' L1 files have none).
                k: if self.config.kind == Kind::L1 { 0 } else { self.config.k },
                mu: self.config.mu,
                layer: self.layer,
                models: self.models.clone(),
                model_ids: self.model_ids.clone(),
                target: self.config.target.filter(|_| self.config.kind == Kind::Sae),
            },
            params: state.params.clone(),
            threshold: state.threshold,
            file_checksum: None,
        }
    }

    fn export(&self, state: &TrainState) -> Result<Crosscoder> {
        let cc = self.crosscoder(state);
        cc.save(&self.out)?;
        Ok(cc)
    }
}

/// One step's outcome: from a host-bookkept route, or from the device-resident one.
enum Outcome {
    Host(StepOutput),
    Device(resident::ResidentOutput),
}

/// b_dec's start: the geometric median of the first batch (Weiszfeld, ≤ 100 iterations, tol 1e-5),
/// per model for a crosscoder, of the SAE's input rows for an SAE.
fn first_median(cfg: &TrainConfig, pairs: &[f32], d: usize) -> Vec<f32> {
    if cfg.kind == Kind::Sae {
        return geometric_median(&cfg.target.unwrap_or_default().rows(pairs, d), d, 100, 1e-5);
    }
    let mut b_dec = Vec::with_capacity(2 * d);
    for m in 0..2 {
        let rows: Vec<f32> = pairs.chunks_exact(2 * d).flat_map(|r| r[m * d..(m + 1) * d].to_vec()).collect();
        b_dec.extend(geometric_median(&rows, d, 100, 1e-5));
    }
    b_dec
}

/// Training went non-finite at `step`: the error says so and what is kept.
fn diverged(what: &str, step: u64, saved: Option<u64>, out: &std::path::Path) -> anyhow::Error {
    let run = crate::run_dir::RunDir::new(out);
    let kept = match saved {
        Some(s) if run.has_crosscoder() => {
            format!("the checkpoint at step {s} and the last exported crosscoder are kept")
        }
        Some(s) => format!("the checkpoint at step {s} is kept"),
        None => {
            // Nothing worth keeping: the metrics of a run that never checkpointed go too (the
            // job's cleanup then removes the folders it made).
            let _ = std::fs::remove_file(run.metrics());
            "nothing was saved".into()
        }
    };
    let restart = match saved {
        Some(_) => format!(
            "; a resume keeps the run's settings, so to train again with others choose another --out (or delete the run folder {})",
            out.display()
        ),
        None => String::new(),
    };
    anyhow!(
        "training diverged at step {step}: {what} ({kept}); lower --lr, or check the data for extreme values{restart}"
    )
}
