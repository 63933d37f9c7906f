//! crossdiff engine: what fine-tuning changed inside a language model. No UI code lives here; the
//! command line and the desktop app are in `app/` and only fill [`workflow`] configs.
//!
//! Folders by concern, each depending only on the ones above it:
//! - [`model`]: snapshots, tokenizers and chat templates, the Gemma 2 architecture, generation;
//! - [`data`]: text / jsonl / parquet document sources, tokenization, 1:1 mixing;
//! - [`activations`]: the paired activation cache (format, writer, shuffled reader, on the fly);
//! - [`crosscoder`]: the model, its losses, training (one step contract, its routes, kernels), Adam;
//! - [`analysis`]: the run directory, latents table, Latent Scaling, examples, KL, steering, prompt lab;
//! - [`workflow`]: one config + run function per job, shared by the CLI, the app and the demo;
//! - [`demo`]: the miniature base/chat pair and the demo project.

pub mod activations;
pub mod analysis;
pub mod backend;
pub mod bad_value;
pub mod bench;
pub mod counters;
pub mod crosscoder;
pub mod data;
pub mod demo;
pub mod dir_lock;
pub mod host_memory;
pub mod host_tensor;
pub mod io;
pub mod model;
pub mod phases;
pub mod rng;
pub mod run_dir;
pub mod workflow;

pub use backend::Backend;
pub use model::Model;
pub use model::decoder::{DecoderLm, LoadOptions};
pub use model::snapshot::{ModelConfig, Snapshot};
pub use model::tokenizer::{ChatTokenizer, Message};
