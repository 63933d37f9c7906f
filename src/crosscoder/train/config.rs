//! The training run's settings (shared/spec/method.md §2) and the recipe's defaults: what every
//! step route reads, so it sits below them (no route or the loop imports upward).

use serde::{Deserialize, Serialize};

use crate::crosscoder::{Init, Kind, Params, SaeTarget};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub kind: Kind,
    pub dict_size: usize,
    pub k: usize,
    pub mu: f64,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The inference threshold θ is updated on steps after this one.
    pub threshold_start: u64,
    pub steps: u64,
    pub aux_alpha: f64,
    /// A latent is dead after this many tokens without being selected.
    pub dead_tokens: u64,
    /// Per-latent encoder column norm at init (L1: 0.005, BatchTopK: 1.0 by default).
    pub init_norm: f64,
    /// One encoder matrix for both models (the paper's scripts) or one per model.
    #[serde(default)]
    pub init: Init,
    /// An SAE's input (`kind: sae`; `None` for crosscoders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<SaeTarget>,
    pub k_anneal_from: Option<usize>,
    pub k_anneal_steps: u64,
    pub squared_recon: bool,
    /// Clip the global gradient norm to this (BatchTopK: 1.0).
    pub clip_grad: Option<f64>,
    /// BatchTopK: decode and back-propagate through the selected (token, latent) entries only
    /// (k·B of B·D); `false` runs the dense reference computation.
    #[serde(default = "yes")]
    pub sparse: bool,
    /// Run the sparse decoder and its backward through crossdiff's own kernels: plain host loops
    /// on the CPU (flex, `sparse_cpu`), the WGSL kernels on wgpu (`kernels`); `false` takes the
    /// autodiff route through burn's generic gather/scatter.
    #[serde(default = "yes")]
    pub cpu_kernels: bool,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
    pub val_every: u64,
}

/// The recipe's defaults (shared/spec/method.md §2): one place for the engine, the CLI's flags and
/// the app's fields.
pub mod defaults {
    pub const K: usize = 100;
    pub const MU: f64 = 0.041;
    pub const LR: f64 = 1e-4;
    pub const WARMUP_STEPS: u64 = 1000;
    pub const THRESHOLD_START: u64 = 1000;
    pub const STEPS: u64 = 10_000;
    pub const AUX_ALPHA: f64 = 1.0 / 32.0;
    pub const DEAD_TOKENS: u64 = 10_000_000;
    pub const INIT_NORM_L1: f64 = 0.005;
    pub const INIT_NORM_BATCHTOPK: f64 = 1.0;
    pub const CHECKPOINT_EVERY: u64 = 1000;
    pub const LOG_EVERY: u64 = 10;
    pub const BATCH: usize = 2048;
    /// D = 32 × d, the paper's dictionary size (73,728 for Gemma 2 2B).
    pub const EXPANSION: usize = 32;
    pub const SHUFFLE_TOKENS: usize = 262_144;
}

impl TrainConfig {
    pub fn defaults(kind: Kind, dict_size: usize) -> Self {
        use defaults::*;
        Self {
            kind,
            dict_size,
            k: K,
            mu: MU,
            lr: LR,
            warmup_steps: WARMUP_STEPS,
            threshold_start: THRESHOLD_START,
            steps: STEPS,
            aux_alpha: AUX_ALPHA,
            dead_tokens: DEAD_TOKENS,
            init_norm: Self::default_init_norm(kind),
            init: Init::Shared,
            target: (kind == Kind::Sae).then_some(SaeTarget::ChatMinusBase),
            k_anneal_from: None,
            k_anneal_steps: 0,
            squared_recon: false,
            clip_grad: if kind.is_topk() { Some(1.0) } else { None },
            sparse: true,
            cpu_kernels: true,
            seed: 0,
            checkpoint_every: CHECKPOINT_EVERY,
            log_every: LOG_EVERY,
            val_every: 0,
        }
    }

    /// Encoder column norm at init: 0.005 for L1, 1.0 for BatchTopK.
    pub fn default_init_norm(kind: Kind) -> f64 {
        if kind == Kind::L1 { defaults::INIT_NORM_L1 } else { defaults::INIT_NORM_BATCHTOPK }
    }

    /// k at a (1-based) step, with optional linear annealing from `k_anneal_from`.
    pub fn k_at(&self, step: u64) -> usize {
        match self.k_anneal_from {
            Some(from) if self.k_anneal_steps > 0 && from > self.k => {
                let t = ((step.saturating_sub(1)) as f64 / self.k_anneal_steps as f64).min(1.0);
                (from as f64 - (from - self.k) as f64 * t).round() as usize
            }
            _ => self.k,
        }
    }

    /// The width of one input row to the dictionary: one model's d for a crosscoder (whose rows
    /// hold both models), the input's d for an SAE.
    pub fn width_of(&self, p: &Params) -> usize {
        let [rows, _] = p.w_enc.dims();
        if self.kind == Kind::Sae { rows } else { rows / 2 }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 { self.lr } else { self.lr * (step as f64 / self.warmup_steps as f64).min(1.0) }
    }
}

/// Bytes training holds for one model's width d, dictionary size D and a batch, for a check before
/// anything is allocated: the dictionary, its gradients and Adam's two moments (4 × 2·w·D floats:
/// encoder and decoder are w × D each, w = 2d for a crosscoder's pairs, d for an SAE's input) plus
/// the batch's activations and their intermediates over the dictionary (about 4 · batch · D
/// floats), in f32.
pub fn training_bytes(kind: Kind, d: usize, dict_size: usize, batch: usize) -> f64 {
    let w = if kind == Kind::Sae { d } else { 2 * d } as f64;
    let (dict, batch) = (dict_size as f64, batch as f64);
    4.0 * (8.0 * w * dict + 4.0 * batch * dict + 2.0 * batch * w)
}

fn yes() -> bool {
    true
}
