//! Training pairs straight from the two models, with no disk cache: a producer thread runs the
//! same shard pipeline as `crossdiff cache` and feeds the reader's shuffle pool (an in-memory ring:
//! a bounded channel of chunks plus the pool). For users who cannot store the paper's ~0.9 TB.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;

use anyhow::Result;
use burn::tensor::Device;

use crate::activations::cache::ActDtype;
use crate::activations::plan::{Planner, check_context, check_finite, compute_acts};
use crate::activations::reader::{Chunk, PairBatch, RowBlock, ShufflePool};
use crate::data::{Mixer, TokenizeOptions};
use crate::model::decoder::LoadOptions;
use crate::model::{Model, check_models};

#[derive(Debug, Clone)]
pub struct OnTheFlyConfig {
    pub base: PathBuf,
    pub chat: PathBuf,
    /// A LoRA adapter merged into the chat model.
    pub chat_adapter: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub layer: usize,
    pub tokenize: TokenizeOptions,
    pub mix: bool,
    /// Tokens computed per chunk (one forward pass group).
    pub chunk_tokens: usize,
    pub batch_tokens: usize,
    /// Stop after this many tokens.
    pub tokens: u64,
    pub load: LoadOptions,
}

pub struct OnTheFlySource {
    pool: ShufflePool,
}

impl OnTheFlySource {
    /// Loads both models on a producer thread and starts computing; batches of `batch` pairs are
    /// drawn from a shuffle pool of `shuffle_tokens` rows, seeded by `seed`.
    pub fn start(cfg: OnTheFlyConfig, device: Device, batch: usize, shuffle_tokens: usize, seed: u64) -> Result<Self> {
        // What can be refused before the models load: the data list, the tokenizing options,
        // `--context` against what the models were trained on, and `--skip-first` (its default
        // is the base's family's) against `--context`.
        crate::data::mix::check_data_files(&cfg.data)?;
        cfg.tokenize.validate()?;
        let mut families = Vec::new();
        for dir in [&cfg.base, &cfg.chat] {
            let config = crate::model::config::ModelConfig::from_file(&dir.join("config.json"))?;
            check_context(cfg.tokenize.context, &config, dir)?;
            families.push(config.family);
        }
        let mut cfg = cfg;
        cfg.tokenize = cfg.tokenize.resolved_for(families[0])?;
        let base = Model::load(&cfg.base, &device, cfg.load)?;
        let chat = Model::load_adapted(&cfg.chat, cfg.chat_adapter.as_deref(), &device, cfg.load, |_, _| {})?;
        check_models(&base, &chat)?;
        let d = base.lm.config.hidden_size;
        // Two chunks in flight: the ring's memory is bounded by the pool plus two chunks.
        let (tx, rx) = sync_channel(2);
        std::thread::spawn(move || {
            let result = (|| -> Result<()> {
                // The chat model's template renders conversations (as `cache` does).
                let mut mixer = Mixer::new(&cfg.data, cfg.mix, &chat.tokenizer, cfg.tokenize.clone())?;
                let mut planner = Planner::default();
                let mut done = 0u64;
                let mut docs = 0u64;
                while done < cfg.tokens {
                    let Some(plan) = planner.next(
                        &mut mixer,
                        docs,
                        cfg.chunk_tokens.max(cfg.tokenize.context),
                        cfg.tokens - done,
                    )?
                    else {
                        break;
                    };
                    let b = compute_acts(&base, &plan, cfg.layer, cfg.batch_tokens)?;
                    let c = compute_acts(&chat, &plan, cfg.layer, cfg.batch_tokens)?;
                    check_finite(&b, d, &plan, &base, cfg.layer, ActDtype::F32, &cfg.data)?;
                    check_finite(&c, d, &plan, &chat, cfg.layer, ActDtype::F32, &cfg.data)?;
                    let mut rows = Vec::with_capacity(2 * b.len());
                    for (rb, rc) in b.chunks_exact(d).zip(c.chunks_exact(d)) {
                        rows.extend_from_slice(rb);
                        rows.extend_from_slice(rc);
                    }
                    done += plan.tokens as u64;
                    docs += plan.docs.len() as u64;
                    if tx.send(Chunk::Rows(RowBlock::from_f32(&rows, d))).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            })();
            if let Err(e) = result {
                let _ = tx.send(Chunk::Failed(format!("{e:#}")));
            }
        });
        Ok(Self { pool: ShufflePool::new(rx, d, batch, shuffle_tokens, seed) })
    }

    /// The next shuffled batch; `None` when the data or the token budget is used up.
    pub fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        self.pool.next_batch()
    }
}
