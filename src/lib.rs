//! crossdiff engine: Gemma 2 on burn (wgpu, CPU, CUDA), snapshots, tokenizers and chat templates,
//! the paired activation cache and its shuffled reader.
//! No UI code lives here; the app and the command line are in `app/`.

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod cache;
pub mod crosscoder;
pub mod data;
pub mod demo;
pub mod demo_corpus;
pub mod demo_tokenizer;
pub mod examples;
pub mod figures;
pub mod gemma2;
pub mod generate;
pub mod inspect;
pub mod io;
pub mod kernels;
pub mod kl;
pub mod latents_csv;
pub mod model;
pub mod onthefly;
pub mod optim;
mod parquet_source;
pub mod project;
pub mod prompt_lab;
pub mod reader;
pub mod snapshot;
pub mod sparse_cpu;
pub mod steer;
pub mod tokenizer;
pub mod train;

pub use backend::Backend;
pub use gemma2::{Gemma2, LoadOptions};
pub use model::Model;
pub use snapshot::{Gemma2Config, Snapshot};
pub use tokenizer::{ChatTokenizer, Message};
