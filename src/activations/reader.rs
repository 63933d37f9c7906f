//! Shuffled batches of (base, chat) pairs for training.
//!
//! A background thread reads whole shards with large sequential reads (never per-token random
//! access), converts them to f32 and hands them over a bounded channel; the consumer keeps a
//! shuffle pool of rows and draws batches from it uniformly at random (swap-remove), refilling the
//! pool with the next shard whenever it drops below the buffer size. The consumer decides when a
//! shard enters the pool, so the batches depend only on the seed, never on thread timing. Every
//! training token appears exactly once per epoch; shard order is re-permuted every epoch.
//!
//! The same pool serves the on-the-fly source ([`crate::onthefly`]), whose producer thread runs
//! the two models instead of reading files.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use anyhow::{Result, bail};

use crate::activations::cache::{ActDtype, CacheIndex, read_shard_file};
use crate::rng::{SplitMix64, shuffle};

/// A batch of pairs, `[batch, 2, d]` row-major f32 (index 1: 0 = base, 1 = chat).
#[derive(Debug, Clone)]
pub struct PairBatch {
    pub acts: Vec<f32>,
    pub batch: usize,
    pub d: usize,
}

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub batch: usize,
    pub seed: u64,
    /// Rows kept in the shuffle pool (more = better mixing across shards, more memory).
    pub shuffle_tokens: usize,
    /// Tokens held out at the end of the cache for validation.
    pub val_tokens: u64,
    /// Stop after this many epochs (`None`: never).
    pub epochs: Option<u64>,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self { batch: 2048, seed: 0, shuffle_tokens: 1 << 18, val_tokens: 0, epochs: None }
    }
}

/// A contiguous row range of one shard.
#[derive(Debug, Clone)]
struct Piece {
    shard: usize,
    rows: std::ops::Range<usize>,
}

/// What the producer thread sends: a block of rows as stored, or the end of an epoch.
pub(crate) enum Chunk {
    Rows(RowBlock),
    EpochEnd,
    Failed(String),
}

/// Rows `[rows, 2, d]` in their stored dtype, starting at byte `offset` of `bytes` (a whole shard
/// file read in one go, or rows computed on the fly).
pub(crate) struct RowBlock {
    pub(crate) bytes: Vec<u8>,
    pub(crate) offset: usize,
    pub(crate) rows: usize,
    pub(crate) dtype: ActDtype,
}

impl RowBlock {
    pub(crate) fn from_f32(rows: &[f32], d: usize) -> Self {
        let mut bytes = Vec::with_capacity(rows.len() * 4);
        ActDtype::F32.encode(rows, &mut bytes);
        Self { rows: rows.len() / (2 * d), bytes, offset: 0, dtype: ActDtype::F32 }
    }
}

/// The training stream over a cache directory.
pub struct CacheReader {
    pool: ShufflePool,
    pub index: CacheIndex,
    dir: PathBuf,
    val: Vec<Piece>,
    pub train_tokens: u64,
}

impl CacheReader {
    pub fn open(dir: &Path, cfg: ReaderConfig) -> Result<Self> {
        Self::with_index(dir, CacheIndex::open(dir)?, cfg)
    }

    /// [`Self::open`] with the index already read (and checked by the caller, e.g.
    /// [`CacheIndex::check_usable`] so that an unfinished cache is said to be unfinished first).
    pub fn with_index(dir: &Path, index: CacheIndex, cfg: ReaderConfig) -> Result<Self> {
        if index.total_tokens == 0 {
            // Says "incomplete" for an unfinished cache, "0 tokens" for a finished empty one.
            index.check_usable(dir, true)?;
        }
        crate::bad_value::ensure(cfg.val_tokens < index.total_tokens, "val-tokens", || {
            format!(
                "{} is not smaller than the cache ({} tokens in {}): the validation slice must leave tokens to train on",
                cfg.val_tokens,
                index.total_tokens,
                dir.display()
            )
        })?;
        crate::bad_value::positive(cfg.batch as u64, "batch")?;
        // The validation slice is the cache's last `val_tokens` tokens; training gets the rest.
        let train_tokens = index.total_tokens - cfg.val_tokens;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        let mut start = 0u64;
        for (i, s) in index.shards.iter().enumerate() {
            let end = start + s.tokens;
            let cut = train_tokens.clamp(start, end) - start;
            if cut > 0 {
                train.push(Piece { shard: i, rows: 0..cut as usize });
            }
            if cut < s.tokens {
                val.push(Piece { shard: i, rows: cut as usize..s.tokens as usize });
            }
            start = end;
        }
        let d = index.d_model;
        let (tx, rx) = sync_channel(2);
        let (dir2, index2, seed, epochs) = (dir.to_path_buf(), index.clone(), cfg.seed, cfg.epochs);
        std::thread::spawn(move || produce_epochs(&dir2, &index2, train, seed, epochs, tx));
        Ok(Self {
            pool: ShufflePool::new(rx, d, cfg.batch, cfg.shuffle_tokens, cfg.seed),
            index,
            dir: dir.to_path_buf(),
            val,
            train_tokens,
        })
    }

    /// The next shuffled training batch; the last batch of an epoch may be smaller. `None` after
    /// the last epoch.
    pub fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        self.pool.next_batch()
    }

    /// Epochs completed so far.
    pub fn epoch(&self) -> u64 {
        self.pool.epoch
    }

    /// The held-out validation rows in cache order, `[val_tokens, 2, d]` f32.
    pub fn validation(&self) -> Result<PairBatch> {
        let d = self.index.d_model;
        let mut acts = Vec::new();
        for p in &self.val {
            acts.extend(read_rows(&self.dir, &self.index, p)?);
        }
        Ok(PairBatch { batch: acts.len() / (2 * d), acts, d })
    }
}

/// Reads one piece of a shard: the whole file in one sequential read, checked.
fn read_block(dir: &Path, index: &CacheIndex, piece: &Piece) -> Result<RowBlock> {
    let info = &index.shards[piece.shard];
    let layout = index.check_shard_header(dir, info)?;
    let bytes = read_shard_file(dir, info)?;
    let row_bytes = 2 * index.d_model * layout.dtype.bytes();
    Ok(RowBlock {
        bytes,
        offset: layout.acts_offset + piece.rows.start * row_bytes,
        rows: piece.rows.len(),
        dtype: layout.dtype,
    })
}

/// Reads one piece of a shard as f32 rows `[rows, 2, d]`.
fn read_rows(dir: &Path, index: &CacheIndex, piece: &Piece) -> Result<Vec<f32>> {
    let block = read_block(dir, index, piece)?;
    let row_bytes = 2 * index.d_model * block.dtype.bytes();
    let mut out = vec![0.0f32; block.rows * 2 * index.d_model];
    block.dtype.decode(&block.bytes[block.offset..block.offset + block.rows * row_bytes], &mut out);
    Ok(out)
}

fn produce_epochs(
    dir: &Path,
    index: &CacheIndex,
    pieces: Vec<Piece>,
    seed: u64,
    epochs: Option<u64>,
    tx: SyncSender<Chunk>,
) {
    let mut epoch = 0u64;
    while epochs.is_none_or(|e| epoch < e) {
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        shuffle(&mut order, &mut SplitMix64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xC0FFEE));
        for i in order {
            let chunk = match read_block(dir, index, &pieces[i]) {
                Ok(rows) => Chunk::Rows(rows),
                Err(e) => Chunk::Failed(format!("{e:#}")),
            };
            let failed = matches!(chunk, Chunk::Failed(_));
            if tx.send(chunk).is_err() || failed {
                return;
            }
        }
        if tx.send(Chunk::EpochEnd).is_err() {
            return;
        }
        epoch += 1;
    }
}

/// Rows waiting to be drawn, and the channel that refills them. The pool keeps whole blocks in
/// their stored dtype and a list of (block, row) handles; a draw swap-removes a handle and
/// converts just that row to f32, so refills never copy rows and the pool costs the stored size.
pub(crate) struct ShufflePool {
    rx: Receiver<Chunk>,
    blocks: Vec<Option<PoolBlock>>,
    handles: Vec<(u32, u32)>,
    d: usize,
    batch: usize,
    capacity: usize,
    rng: SplitMix64,
    /// The producer finished the current epoch (no more rows until the pool drains).
    epoch_drained: bool,
    finished: bool,
    pub epoch: u64,
}

struct PoolBlock {
    block: RowBlock,
    /// Rows of this block still in the pool; the block is freed at zero.
    left: usize,
}

impl ShufflePool {
    pub(crate) fn new(rx: Receiver<Chunk>, d: usize, batch: usize, capacity: usize, seed: u64) -> Self {
        Self {
            rx,
            blocks: Vec::new(),
            handles: Vec::new(),
            d,
            batch,
            capacity: capacity.max(batch),
            rng: SplitMix64(seed ^ 0x5EED),
            epoch_drained: false,
            finished: false,
            epoch: 0,
        }
    }

    fn len(&self) -> usize {
        self.handles.len()
    }

    fn add(&mut self, block: RowBlock) {
        let slot = match self.blocks.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.blocks.push(None);
                self.blocks.len() - 1
            }
        };
        self.handles.extend((0..block.rows as u32).map(|r| (slot as u32, r)));
        self.blocks[slot] = Some(PoolBlock { left: block.rows, block });
    }

    /// Pulls blocks until the pool holds `capacity` rows or the epoch's data is all in.
    fn fill(&mut self) -> Result<()> {
        while !self.epoch_drained && !self.finished && self.len() < self.capacity {
            match self.rx.recv() {
                Ok(Chunk::Rows(b)) => self.add(b),
                Ok(Chunk::EpochEnd) => self.epoch_drained = true,
                Ok(Chunk::Failed(e)) => bail!("{e}"),
                Err(_) => self.finished = true,
            }
        }
        Ok(())
    }

    pub(crate) fn next_batch(&mut self) -> Result<Option<PairBatch>> {
        loop {
            self.fill()?;
            if self.len() == 0 {
                if self.epoch_drained {
                    // Epoch boundary: the next epoch's rows start arriving.
                    self.epoch_drained = false;
                    self.epoch += 1;
                    continue;
                }
                return Ok(None);
            }
            break;
        }
        let w = 2 * self.d;
        let take = self.batch.min(self.len());
        let mut acts = vec![0.0f32; take * w];
        for out in acts.chunks_exact_mut(w) {
            let r = (self.rng.next_u64() % self.len() as u64) as usize;
            let (slot, row) = self.handles.swap_remove(r);
            let entry = self.blocks[slot as usize].as_mut().expect("a handle points at a live block");
            let b = &entry.block;
            let row_bytes = w * b.dtype.bytes();
            let at = b.offset + row as usize * row_bytes;
            b.dtype.decode(&b.bytes[at..at + row_bytes], out);
            entry.left -= 1;
            if entry.left == 0 {
                self.blocks[slot as usize] = None;
            }
        }
        Ok(Some(PairBatch { acts, batch: take, d: self.d }))
    }
}
