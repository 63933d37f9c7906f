//! Packed rows: several short documents back to back in one batch row, each attending only to its
//! own tokens from position 0, so every document's outputs are those of running it alone (to float
//! rounding) while the batch carries no padding but each row's tail. Caching uses it: a shard of
//! chat turns and short web pages, padded row per document, ran ~2× the tokens it kept.

use anyhow::{Result, bail};
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::decoder::{DecoderLm, Masks};

impl DecoderLm {
    /// The output of block `layer` (`[batch, time, hidden]`) for packed rows: row r of `ids` holds
    /// documents of lengths `docs[r]` back to back from column 0 (then padding). Position and
    /// attention restart at each document; the padding after a row's last document is a document
    /// of its own whose outputs mean nothing.
    pub fn forward_to_packed(&self, ids: Tensor<2, Int>, docs: &[Vec<usize>], layer: usize) -> Result<Tensor<3>> {
        let [b, t] = ids.dims();
        if docs.len() != b {
            bail!("packed rows: {} rows of ids, {} rows of document lengths", b, docs.len());
        }
        // Per token: its position in its document and its document's number in the row.
        let mut positions = Vec::with_capacity(b * t);
        let mut segment = Vec::with_capacity(b * t);
        for row in docs {
            let used: usize = row.iter().sum();
            if used > t {
                bail!("packed rows: documents of {used} tokens in a row of {t}");
            }
            for (s, &n) in row.iter().enumerate() {
                positions.extend((0..n).map(|p| p as i64));
                segment.extend(std::iter::repeat_n(s as i64, n));
            }
            let tail = t - used;
            positions.extend((0..tail).map(|p| p as i64));
            segment.extend(std::iter::repeat_n(row.len() as i64, tail));
        }
        let device = self.device();
        // The unpacked tables for positions 0..t, gathered per token: the same values as a row that
        // starts its document at column 0.
        let index = Tensor::<1, Int>::from_data(TensorData::new(positions, [b * t]), device);
        let hd = self.config.head_dim;
        let rope = self
            .rope_tables(0, t)
            .into_iter()
            .map(|(cos, sin)| {
                let gather = |x: Tensor<4>| x.reshape([t, hd]).select(0, index.clone()).reshape([b, 1, t, hd]);
                (gather(cos), gather(sin))
            })
            .collect::<Vec<_>>();
        // Within one document a later column has a larger position, so the rule is the plain one
        // plus "same document". A window as long as the rows hides nothing more (Gemma 2's 4096).
        let segment = Tensor::<2, Int>::from_data(TensorData::new(segment, [b, t]), device);
        let position = index.clone().reshape([b, t]);
        let window = self.config.effective_sliding_window().filter(|&w| w < t);
        let masks = Masks::new(position.clone(), position, Some(segment), window);
        Ok(self.run_blocks(ids, layer.min(self.layers.len() - 1), &rope, &masks, |_, _| {}))
    }
}

/// Packs documents of the given lengths into rows of at most `row_len` tokens, longest first, each
/// into the fullest row it still fits (best-fit decreasing: rows end up nearly full). Returns the
/// rows as document indices in placement order; a document longer than `row_len` gets a row alone.
pub fn pack_rows(lengths: &[usize], row_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Open rows by (room left, row number): the best fit is the first with room ≥ the length.
    let mut open = std::collections::BTreeSet::new();
    for i in order {
        let n = lengths[i];
        match open.range((n, 0)..).next().copied() {
            Some((room, r)) => {
                open.remove(&(room, r));
                rows[r].push(i);
                if room > n {
                    open.insert((room - n, r));
                }
            }
            None => {
                rows.push(vec![i]);
                if row_len > n {
                    open.insert((row_len - n, rows.len() - 1));
                }
            }
        }
    }
    rows
}
