//! The cache's rows in order, shard by shard, in batches with each token's id, document and
//! template flag: what the analyses stream (the examples store, an SAE's latents table).

use std::path::Path;

use anyhow::{Result, anyhow};
use safetensors::SafeTensors;

use crate::activations::cache::{CacheIndex, read_shard_file};

/// One batch of cached pairs.
pub struct CacheBatch<'a> {
    /// The global index of the batch's first token.
    pub first: u64,
    /// `[n, 2d]` pair rows (base then chat).
    pub rows: &'a [f32],
    pub ids: &'a [u32],
    pub docs: &'a [u32],
    /// Whether each token is a chat-template token (all false in caches that record none).
    pub template: &'a [bool],
}

/// Calls `f` on every batch of up to `batch` rows of the first `tokens` tokens, in cache order.
pub fn for_each_batch(
    cache: &Path,
    index: &CacheIndex,
    tokens: u64,
    batch: usize,
    mut f: impl FnMut(&CacheBatch) -> Result<()>,
) -> Result<()> {
    let d = index.d_model;
    let mut global = 0u64;
    for shard in &index.shards {
        if global >= tokens {
            break;
        }
        let layout = index.check_shard_header(cache, shard)?;
        let bytes = read_shard_file(cache, shard)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", shard.file))?;
        let u32s = |name: &str| -> Vec<u32> {
            st.tensor(name)
                .ok()
                .and_then(|t| crate::io::decode_u32(t.dtype(), t.data()).ok())
                .unwrap_or_else(|| vec![0; shard.tokens as usize])
        };
        let (ids, docs) = (u32s("token_ids"), u32s("doc_index"));
        let template: Vec<bool> = match st.tensor("template") {
            Ok(t) => t.data().iter().map(|&b| b != 0).collect(),
            Err(_) => vec![false; shard.tokens as usize],
        };
        let n = shard.tokens.min(tokens - global) as usize;
        let row_bytes = 2 * d * layout.dtype.bytes();
        let mut start = 0;
        while start < n {
            let b = batch.min(n - start);
            let mut rows = vec![0.0f32; b * 2 * d];
            let from = layout.acts_offset + start * row_bytes;
            layout.dtype.decode(&bytes[from..from + b * row_bytes], &mut rows);
            let at = start..start + b;
            f(&CacheBatch {
                first: global + start as u64,
                rows: &rows,
                ids: &ids[at.clone()],
                docs: &docs[at.clone()],
                template: &template[at],
            })?;
            start += b;
        }
        global += n as u64;
    }
    Ok(())
}
