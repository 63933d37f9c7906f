//! The examples store: for every latent, its top activating contexts and examples from quantile
//! bins of its maximum, each with ±T tokens of context and the latent's activation on every context
//! token, plus an activation histogram and the tokens each model's decoder direction promotes and
//! suppresses through the (tied) unembedding.
//!
//! Storage: one `examples.safetensors` in RUN with fixed-size per-latent records (`[D, K, W]`
//! arrays). A latent's dashboard is K·W entries at an offset computed from its index, so a query
//! is a few slices of a memory-mapped file: no index to search, no database engine to build or
//! ship (SQLite would add a C build and a schema for what is, here, plain fixed-stride arrays).

use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::activations::batches::{CacheBatch, for_each_batch};
use crate::activations::cache::CacheIndex;
use crate::crosscoder::{Crosscoder, Kind, dictionary_input, read_vec, tensor};
use crate::io::{LazyTensor, f32_bytes, write_safetensors_streaming};
use crate::rng::SplitMix64;
use crate::run_dir::RunDir;

/// Upper edges of the quantile bins, as fractions of a latent's maximum activation.
pub const BINS: [f64; 5] = [0.25, 0.5, 0.75, 0.95, 1.0];
pub const HIST_BINS: usize = 50;

/// Top examples kept per latent, and context tokens on each side of one.
pub const DEFAULT_TOP_N: usize = 10;
pub const DEFAULT_CONTEXT: usize = 16;

#[derive(Debug, Clone)]
pub struct ExamplesOptions {
    pub top_n: usize,
    pub per_bin: usize,
    /// Context tokens on each side.
    pub context: usize,
    pub batch: usize,
    pub seed: u64,
    /// Promoted/suppressed tokens per model (0 = none).
    pub top_tokens: usize,
}

impl Default for ExamplesOptions {
    fn default() -> Self {
        Self {
            top_n: DEFAULT_TOP_N,
            per_bin: 2,
            context: DEFAULT_CONTEXT,
            batch: crate::analysis::analyze::DEFAULT_BATCH,
            seed: 0,
            top_tokens: 10,
        }
    }
}

/// One token's norm-scaled activation of one latent, with where it is.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hit {
    act: f32,
    token: u64,
}

impl Eq for Hit {}
impl Ord for Hit {
    // Reversed: a BinaryHeap of Hits is a min-heap on activation (ties: lower token first out).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.act.total_cmp(&self.act).then(self.token.cmp(&o.token))
    }
}
impl PartialOrd for Hit {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// The activations `[rows, D]` the examples rank, on the host, from pair rows: a crosscoder's
/// norm-scaled codes; an SAE's codes on its input (its directions have unit norm).
fn scaled_acts(cc: &Crosscoder, rows: &[f32], d: usize, device: &Device) -> Result<Vec<f32>> {
    let codes = cc.codes(dictionary_input(cc.config.kind, cc.config.target, rows.to_vec(), d, device));
    if cc.config.kind == Kind::Sae { read_vec(codes) } else { read_vec(codes * cc.params.norm_sum()) }
}

/// Builds `RUN/examples.safetensors`. `max_act` is analyze's per-latent maximum (the bins' scale);
/// `unembed` gives each model's `[vocab, d]` embedding for promoted/suppressed tokens.
pub fn build_examples(
    run: &RunDir,
    cc: &Crosscoder,
    cache: &Path,
    device: &Device,
    max_act: &[f64],
    unembed: Option<[Vec<f32>; 2]>,
    opts: &ExamplesOptions,
    tokens: Option<u64>,
) -> Result<()> {
    let index = CacheIndex::open(cache)?;
    // One model's width and D, for a crosscoder and an SAE alike.
    let (d, dict) = (cc.config.d, cc.config.dict_size);
    if max_act.len() != dict {
        bail!("max activations for {} latents, the crosscoder has {dict}", max_act.len());
    }
    let total = tokens.unwrap_or(index.total_tokens).min(index.total_tokens);
    let k = opts.top_n + BINS.len() * opts.per_bin;
    let w = 2 * opts.context + 1;

    // Pass 1: top-N heaps, per-bin reservoirs, histograms.
    let mut top: Vec<BinaryHeap<Hit>> = vec![BinaryHeap::new(); dict];
    let mut bins: Vec<Vec<Vec<Hit>>> = vec![vec![Vec::new(); BINS.len()]; dict];
    let mut seen: Vec<[u64; 5]> = vec![[0; 5]; dict];
    let mut hist = vec![0u32; dict * HIST_BINS];
    let mut rng = SplitMix64(opts.seed ^ 0xE7A);
    let mut docs_of: Vec<u32> = Vec::with_capacity(total as usize);
    let mut ids_of: Vec<u32> = Vec::with_capacity(total as usize);
    for_each_batch(cache, &index, total, opts.batch, |&CacheBatch { first, rows, ids, docs, .. }| {
        ids_of.extend_from_slice(ids);
        docs_of.extend_from_slice(docs);
        let a = scaled_acts(&cc, rows, d, device)?;
        for (r, row) in a.chunks_exact(dict).enumerate() {
            let token = first + r as u64;
            for (j, &act) in row.iter().enumerate() {
                if act <= 0.0 || max_act[j] <= 0.0 {
                    continue;
                }
                let frac = (act as f64 / max_act[j]).min(1.0);
                hist[j * HIST_BINS + ((frac * HIST_BINS as f64).ceil() as usize).clamp(1, HIST_BINS) - 1] += 1;
                let hit = Hit { act, token };
                let heap = &mut top[j];
                if heap.len() < opts.top_n {
                    heap.push(hit);
                } else if heap.peek().is_some_and(|m| hit.cmp(m) == std::cmp::Ordering::Less) {
                    heap.pop();
                    heap.push(hit);
                }
                let b = BINS.iter().position(|&q| frac <= q).unwrap_or(BINS.len() - 1);
                seen[j][b] += 1;
                let res = &mut bins[j][b];
                if res.len() < opts.per_bin {
                    res.push(hit);
                } else {
                    let slot = rng.next_u64() % seen[j][b];
                    if (slot as usize) < opts.per_bin {
                        res[slot as usize] = hit;
                    }
                }
            }
        }
        Ok(())
    })?;

    // The chosen examples per latent: top first (descending), then each bin's (descending).
    let mut chosen: Vec<Vec<(u8, Hit)>> = Vec::with_capacity(dict);
    for j in 0..dict {
        let mut list: Vec<(u8, Hit)> = {
            let mut t: Vec<Hit> = top[j].iter().copied().collect();
            t.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.token.cmp(&b.token)));
            t.into_iter().map(|h| (0u8, h)).collect()
        };
        for (b, res) in bins[j].iter().enumerate() {
            let mut r = res.clone();
            r.sort_by(|a, b| b.act.total_cmp(&a.act).then(a.token.cmp(&b.token)));
            list.extend(r.into_iter().map(|h| (b as u8 + 1, h)));
        }
        chosen.push(list);
    }

    // Pass 2: the activation of each latent on its examples' context tokens (same document only).
    let mut needs: BTreeMap<u64, Vec<(u32, u32)>> = BTreeMap::new(); // token → (latent, slot·W + offset)
    let mut window_ids = vec![0u32; dict * k * w];
    let mut window_acts = vec![-1.0f32; dict * k * w];
    for (j, list) in chosen.iter().enumerate() {
        for (slot, (_, hit)) in list.iter().enumerate() {
            let c = hit.token as i64;
            for o in 0..w {
                let t = c + o as i64 - opts.context as i64;
                if t < 0 || t >= total as i64 || docs_of[t as usize] != docs_of[c as usize] {
                    continue;
                }
                let at = (slot * w + o) as u32;
                window_ids[(j * k) * w + at as usize] = ids_of[t as usize];
                needs.entry(t as u64).or_default().push((j as u32, at));
            }
        }
    }
    for_each_batch(cache, &index, total, opts.batch, |&CacheBatch { first, rows, .. }| {
        let n = (rows.len() / (2 * d)) as u64;
        let wanted: Vec<(u64, &Vec<(u32, u32)>)> = needs.range(first..first + n).map(|(t, v)| (*t, v)).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut sub = Vec::with_capacity(wanted.len() * 2 * d);
        for (t, _) in &wanted {
            let r = (t - first) as usize;
            sub.extend_from_slice(&rows[r * 2 * d..(r + 1) * 2 * d]);
        }
        let a = scaled_acts(&cc, &sub, d, device)?;
        for (i, (_, targets)) in wanted.iter().enumerate() {
            for &(j, at) in targets.iter() {
                window_acts[(j as usize * k) * w + at as usize] = a[i * dict + j as usize];
            }
        }
        Ok(())
    })?;

    let mut center_act = vec![-1.0f32; dict * k];
    let mut kind = vec![255u8; dict * k];
    let mut center_token = vec![0i64; dict * k];
    for (j, list) in chosen.iter().enumerate() {
        for (slot, (b, hit)) in list.iter().enumerate() {
            center_act[j * k + slot] = hit.act;
            kind[j * k + slot] = *b;
            center_token[j * k + slot] = hit.token as i64;
        }
    }

    let p = opts.top_tokens;
    let mut lists: Vec<(String, Vec<u32>, Vec<f32>)> = Vec::new();
    if let (Some(embeds), true) = (unembed, p > 0) {
        let w_dec = read_vec(cc.params.w_dec.clone())?;
        for (m, name) in ["base", "chat"].iter().enumerate() {
            let e = &embeds[m];
            let vocab = e.len() / d;
            let e_t = tensor(e.clone(), [vocab, d], device).transpose();
            // A crosscoder's model-m decoder rows; an SAE's one direction per latent, signed as
            // chat − base, through each model's unembedding.
            let dirs: Vec<f32> = match (cc.config.kind, cc.config.target) {
                (Kind::Sae, Some(crate::crosscoder::SaeTarget::BaseMinusChat)) => w_dec.iter().map(|v| -v).collect(),
                (Kind::Sae, _) => w_dec.clone(),
                _ => (0..dict).flat_map(|j| w_dec[j * 2 * d + m * d..j * 2 * d + (m + 1) * d].to_vec()).collect(),
            };
            let logits = tensor(dirs, [dict, d], device).matmul(e_t);
            let (up_v, up_i) = logits.clone().topk_with_indices(p.min(vocab), 1);
            let (down_v, down_i) = logits.neg().topk_with_indices(p.min(vocab), 1);
            let ints = |t: burn::tensor::Tensor<2, burn::tensor::Int>| -> Result<Vec<u32>> {
                Ok(crate::counters::read_i64(t)?.into_iter().map(|v| v as u32).collect())
            };
            lists.push((format!("promoted_{name}"), ints(up_i)?, read_vec(up_v)?));
            lists.push((format!("suppressed_{name}"), ints(down_i)?, read_vec(down_v.neg())?));
        }
    }

    let u32_bytes = |v: Vec<u32>| v.into_iter().flat_map(u32::to_le_bytes).collect::<Vec<u8>>();
    let lazy = |name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| LazyTensor {
        name: name.into(),
        dtype,
        shape,
        bytes: Box::new(move || Ok(bytes)),
    };
    let mut out = vec![
        lazy(
            "config",
            Dtype::U32,
            vec![4],
            u32_bytes(vec![opts.context as u32, opts.top_n as u32, opts.per_bin as u32, BINS.len() as u32]),
        ),
        lazy("center_act", Dtype::F32, vec![dict, k], f32_bytes(&center_act)),
        lazy("kind", Dtype::U8, vec![dict, k], kind),
        lazy("center_token", Dtype::I64, vec![dict, k], center_token.iter().flat_map(|v| v.to_le_bytes()).collect()),
        lazy("window_ids", Dtype::U32, vec![dict, k, w], u32_bytes(window_ids)),
        lazy("window_acts", Dtype::F32, vec![dict, k, w], f32_bytes(&window_acts)),
        lazy("histogram", Dtype::U32, vec![dict, HIST_BINS], u32_bytes(hist)),
    ];
    for (name, ids, vals) in lists {
        out.push(lazy(&name, Dtype::U32, vec![dict, p], u32_bytes(ids)));
        out.push(lazy(&format!("{name}_logit"), Dtype::F32, vec![dict, p], f32_bytes(&vals)));
    }
    write_safetensors_streaming(&run.examples(), out)?;
    Ok(())
}

/// One example context of a latent.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 0 = top activating; 1..=5 = quantile bin (upper edges [`BINS`]).
    pub kind: u8,
    pub act: f32,
    /// Global token index in the cache.
    pub token: u64,
    /// `2T + 1` token ids and the latent's activation on each (`-1` outside the document).
    pub window_ids: Vec<u32>,
    pub window_acts: Vec<f32>,
}

impl Example {
    /// The window's token ids inside the example's document (positions outside it carry a negative
    /// activation).
    pub fn document_ids(&self) -> Vec<u32> {
        self.window_ids.iter().zip(&self.window_acts).filter(|(_, a)| **a >= 0.0).map(|(id, _)| *id).collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LatentExamples {
    pub examples: Vec<Example>,
    pub histogram: Vec<u32>,
    /// (token id, logit) per list name: promoted_base, suppressed_base, promoted_chat, suppressed_chat.
    pub tokens: BTreeMap<String, Vec<(u32, f32)>>,
}

/// A memory-mapped examples store.
pub struct ExamplesStore {
    mmap: Mmap,
    pub dict: usize,
    k: usize,
    w: usize,
}

impl ExamplesStore {
    pub fn open(run: &Path) -> Result<Self> {
        let path = RunDir::new(run).examples();
        let file = std::fs::File::open(&path)
            .map_err(|e| anyhow!("{}: cannot open ({e}); run `crossdiff analyze` first", path.display()))?;
        // SAFETY: read-only mapping of a file crossdiff writes atomically (never in place).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let (dict, k, w) = {
            let st = SafeTensors::deserialize(&mmap).map_err(|e| anyhow!("{}: corrupt: {e}", path.display()))?;
            let shape = st.tensor("window_ids").map_err(|e| anyhow!("{}: {e}", path.display()))?.shape().to_vec();
            (shape[0], shape[1], shape[2])
        };
        Ok(Self { mmap, dict, k, w })
    }

    /// Everything the dashboard shows for latent `j`: slices at fixed offsets, no scan.
    pub fn latent(&self, j: usize) -> Result<LatentExamples> {
        if j >= self.dict {
            bail!("latent {j} is out of range (the store has {})", self.dict);
        }
        let st = SafeTensors::deserialize(&self.mmap).map_err(|e| anyhow!("examples store: {e}"))?;
        let slice = |name: &str, per: usize, elem: usize| -> Result<&[u8]> {
            let t = st.tensor(name).map_err(|e| anyhow!("examples store, `{name}`: {e}"))?;
            let data = t.data();
            Ok(&data[j * per * elem..(j + 1) * per * elem])
        };
        let f32s = |b: &[u8]| crate::io::decode_f32(Dtype::F32, b);
        let u32s = |b: &[u8]| crate::io::decode_u32(Dtype::U32, b);
        let (k, w) = (self.k, self.w);
        let acts = f32s(slice("center_act", k, 4)?)?;
        let kinds = slice("kind", k, 1)?;
        let tokens: Vec<u64> =
            crate::io::decode_i64(Dtype::I64, slice("center_token", k, 8)?)?.into_iter().map(|t| t as u64).collect();
        let ids = u32s(slice("window_ids", k * w, 4)?)?;
        let wacts = f32s(slice("window_acts", k * w, 4)?)?;
        let examples = (0..k)
            .filter(|&s| kinds[s] != 255)
            .map(|s| Example {
                kind: kinds[s],
                act: acts[s],
                token: tokens[s],
                window_ids: ids[s * w..(s + 1) * w].to_vec(),
                window_acts: wacts[s * w..(s + 1) * w].to_vec(),
            })
            .collect();
        let histogram = u32s(slice("histogram", HIST_BINS, 4)?)?;
        let mut lists = BTreeMap::new();
        for name in ["promoted_base", "suppressed_base", "promoted_chat", "suppressed_chat"] {
            if let Ok(t) = st.tensor(name) {
                let p = t.shape()[1];
                let ids = u32s(slice(name, p, 4)?)?;
                let vals = f32s(slice(&format!("{name}_logit"), p, 4)?)?;
                lists.insert(name.to_string(), ids.into_iter().zip(vals).collect());
            }
        }
        Ok(LatentExamples { examples, histogram, tokens: lists })
    }
}
