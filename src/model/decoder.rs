//! The decoder-LM core: Gemma 2, Gemma 3, Llama 3 and Qwen 2/3 exactly as transformers'
//! `modeling_<family>.py` computes them (eager attention), on any burn device. Config-driven: nothing
//! is tied to a size; a block holds only the parts its family has (sandwich norms, biases, q/k
//! norms), and [`crate::model::load`] fills them. See shared/spec/gemma2.md.
//!
//! Layout choices: per-token work runs on `[tokens, width]` matrices; q/k/v and gate/up are fused
//! into one matmul each; linear weights are stored transposed (`[in, out]`) so `x · W` reads both
//! operands contiguously. Batches are right-padded: with a causal mask, a real token never sees a
//! pad, so per-token outputs equal the unpadded run and no padding mask is needed.

use anyhow::{Result, bail};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};

use crate::model::fused::soft_cap;
use crate::model::rope::RopeSpec;
use crate::model::snapshot::ModelConfig;

/// How weights live on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct LoadOptions {
    /// Keep matmul weights and the embedding in f16 on the device (half the memory; activations,
    /// norms and softmax stay f32).
    #[arg(long = "f16")]
    pub f16_weights: bool,
    /// Rows per embedding block (default: as many as fit in 1 GiB). Gemma's 256000 × 2304 f32
    /// embedding is 2.4 GB, more than some drivers allow in one buffer (lavapipe: 2 GiB), so it
    /// is stored in vocabulary blocks.
    #[arg(skip)]
    pub embed_block_rows: Option<usize>,
}

/// A `[in, out]` weight with an optional `[1, out]` bias (f32); multiplies in f16 when stored in
/// f16 and returns f32.
pub(crate) struct Linear {
    pub(crate) w: Tensor<2>,
    pub(crate) b: Option<Tensor<2>>,
}

impl Linear {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = if let Some(y) = crate::model::few_rows::few_rows_matmul(&x, &self.w) {
            y
        } else if self.w.dtype() == DType::F16 {
            x.cast(FloatDType::F16).matmul(self.w.clone()).cast(FloatDType::F32)
        } else {
            x.matmul(self.w.clone())
        };
        match &self.b {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
}

pub use crate::model::fused::Activation;

/// One decoder block. Norm weights are stored as the factor the normalised vector is multiplied by
/// (Gemma's `1 + w`, the others' `w`), f32, `[1, width]`.
pub(crate) struct Block {
    /// `input_layernorm`.
    pub(crate) attn_norm: Tensor<2>,
    /// Gemma's `post_attention_layernorm` on the attention output.
    pub(crate) attn_out_norm: Option<Tensor<2>>,
    /// The MLP's input norm: Gemma's `pre_feedforward_layernorm`, Llama/Qwen's
    /// `post_attention_layernorm`.
    pub(crate) mlp_norm: Tensor<2>,
    /// Gemma's `post_feedforward_layernorm` on the MLP output.
    pub(crate) mlp_out_norm: Option<Tensor<2>>,
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
    /// Gemma 3 / Qwen 3: RMS norms over each head's queries and keys, `[1, head_dim]`.
    pub(crate) q_norm: Option<Tensor<2>>,
    pub(crate) k_norm: Option<Tensor<2>>,
    pub(crate) sliding: bool,
    /// Index into [`DecoderLm::ropes`].
    pub(crate) rope: usize,
}

/// A vector added to the residual stream after one block (steering).
#[derive(Clone)]
pub struct ResidualEdit {
    pub layer: usize,
    /// `[1, hidden]`.
    pub add: Tensor<2>,
}

/// Keys and values of every layer for incremental decoding, `[batch, kv_heads, seen, head_dim]`.
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Positions already in the cache.
    pub len: usize,
}

pub struct DecoderLm {
    pub config: ModelConfig,
    /// `[vocab, hidden]` in vocabulary blocks of at most 1 GiB; also the unembedding when tied.
    pub(crate) embed: Vec<Tensor<2>>,
    /// `lm_head.weight` in the same blocks, when the unembedding is not tied.
    pub(crate) unembed: Option<Vec<Tensor<2>>>,
    /// Gemma: sqrt(hidden) rounded to the stored weight dtype, as transformers multiplies it.
    pub(crate) normalizer: Option<f32>,
    pub(crate) final_norm: Tensor<2>,
    pub(crate) layers: Vec<Block>,
    /// The distinct RoPE tables' parameters (Gemma 3: local and global).
    pub(crate) ropes: Vec<RopeSpec>,
    pub(crate) activation: Activation,
    pub(crate) device: Device,
}

impl DecoderLm {
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Right-pads token sequences into a `[batch, time]` id tensor.
    pub fn batch_ids(&self, seqs: &[Vec<u32>]) -> Result<Tensor<2, Int>> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            bail!("empty input: no tokens to run");
        }
        let pad = self.config.pad_token_id.unwrap_or(0) as i64;
        let mut flat = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            for &id in s {
                if id as usize >= self.config.vocab_size {
                    bail!("token id {id} is outside the vocabulary (vocab_size {})", self.config.vocab_size);
                }
                flat.push(id as i64);
            }
            flat.extend(std::iter::repeat_n(pad, t - s.len()));
        }
        Ok(Tensor::from_data(TensorData::new(flat, [seqs.len(), t]), &self.device))
    }

    /// Embedding lookup × normaliser: `[batch·time, hidden]`.
    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<2> {
        let _phase = crate::phases::phase("embedding", &self.device);
        let [b, t] = ids.dims();
        let ids = ids.reshape([b * t]);
        let to_f32 = |rows: Tensor<2>| if rows.dtype() == DType::F16 { rows.cast(FloatDType::F32) } else { rows };
        let scale = |x: Tensor<2>| match self.normalizer {
            Some(n) => x.mul_scalar(n),
            None => x,
        };
        if self.embed.len() == 1 {
            return scale(to_f32(self.embed[0].clone().select(0, ids)));
        }
        // Several vocabulary blocks: look up in each with clamped local ids, keep the rows whose id
        // falls in the block.
        let mut start = 0i64;
        let mut out: Option<Tensor<2>> = None;
        for block in &self.embed {
            let n = block.dims()[0] as i64;
            let local = ids.clone().sub_scalar(start);
            let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(n));
            let rows = to_f32(block.clone().select(0, local.clamp(0, n - 1)));
            let keep = inside.float().reshape([b * t, 1]);
            let rows = rows * keep;
            out = Some(match out {
                Some(acc) => acc + rows,
                None => rows,
            });
            start += n;
        }
        scale(out.expect("at least one embedding block"))
    }

    /// Runs blocks `0..=last_layer` and returns their output `[batch, time, hidden]`, calling
    /// `on_block(l, output)` after each block (inspect uses it to record every block).
    pub fn forward_blocks(
        &self,
        ids: Tensor<2, Int>,
        last_layer: usize,
        on_block: impl FnMut(usize, &Tensor<3>),
    ) -> Tensor<3> {
        let t = ids.dims()[1];
        let (rope, masks) = (self.rope_tables(0, t), self.masks(0, t, t));
        self.run_blocks(ids, last_layer, &rope, &masks, on_block)
    }

    /// Blocks `0..=last_layer` with the given RoPE tables and masks (plain or packed rows).
    pub(crate) fn run_blocks(
        &self,
        ids: Tensor<2, Int>,
        last_layer: usize,
        rope: &[(Tensor<4>, Tensor<4>)],
        masks: &Masks,
        mut on_block: impl FnMut(usize, &Tensor<3>),
    ) -> Tensor<3> {
        let [b, t] = ids.dims();
        let mut h = self.embed_tokens(ids);
        for (l, block) in self.layers.iter().enumerate().take(last_layer + 1) {
            h = self.block_forward(block, h, b, t, rope, masks, None);
            let out = h.clone().reshape([b, t, self.config.hidden_size]);
            on_block(l, &out);
        }
        h.reshape([b, t, self.config.hidden_size])
    }

    /// Output of block `layer` (0-indexed): runs only blocks `0..=layer`.
    pub fn forward_to(&self, ids: Tensor<2, Int>, layer: usize) -> Tensor<3> {
        self.forward_blocks(ids, layer.min(self.layers.len() - 1), |_, _| {})
    }

    /// Continues from the output of block `layer` through the remaining blocks to the logits
    /// `[batch, time, vocab]`.
    pub fn forward_from(&self, layer: usize, residual: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = residual.dims();
        let mut h = residual.reshape([b * t, d]);
        let rope = self.rope_tables(0, t);
        let masks = self.masks(0, t, t);
        for block in self.layers.iter().skip(layer + 1) {
            h = self.block_forward(block, h, b, t, &rope, &masks, None);
        }
        self.logits(h).reshape([b, t, self.config.vocab_size])
    }

    /// Full forward: logits `[batch, time, vocab]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let last = self.layers.len() - 1;
        let h = self.forward_to(ids, last);
        let [b, t, d] = h.dims();
        self.logits(h.reshape([b * t, d])).reshape([b, t, self.config.vocab_size])
    }

    /// Final norm, unembedding (tied or `lm_head`), final soft-cap: `[rows, hidden]` → `[rows, vocab]`.
    pub fn logits(&self, h: Tensor<2>) -> Tensor<2> {
        let _phase = crate::phases::phase("unembedding (final norm, logits, soft-cap)", &self.device);
        let x = rms_norm(h, &self.final_norm, self.config.rms_norm_eps);
        let blocks = self.unembed.as_ref().unwrap_or(&self.embed);
        crate::model::fused::logits(x, blocks, self.config.final_softcap())
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), len: 0 }
    }

    /// Incremental decoding: runs `ids` (`[batch, new]`) at positions `cache.len..`, appends their
    /// keys and values to the cache, and returns the logits of the last new position `[batch, vocab]`.
    pub fn step(&self, ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<2> {
        self.step_edited(ids, cache, None)
    }

    /// [`DecoderLm::step`] with `edit.add` (`[1, hidden]`) added to the output of block `edit.layer`
    /// at every new position (steering).
    pub fn step_edited(&self, ids: Tensor<2, Int>, cache: &mut KvCache, edit: Option<&ResidualEdit>) -> Tensor<2> {
        let [b, t] = ids.dims();
        let p0 = cache.len;
        let mut h = self.embed_tokens(ids);
        let rope = self.rope_tables(p0, t);
        let masks = self.masks(p0, t, p0 + t);
        for (l, block) in self.layers.iter().enumerate() {
            h = self.block_forward(block, h, b, t, &rope, &masks, Some(&mut cache.layers[l]));
            if let Some(e) = edit.filter(|e| e.layer == l) {
                h = h + e.add.clone();
            }
        }
        cache.len += t;
        let d = self.config.hidden_size;
        let last = h.reshape([b, t, d]).narrow(1, t - 1, 1).reshape([b, d]);
        self.logits(last)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        h: Tensor<2>,
        b: usize,
        t: usize,
        rope: &[(Tensor<4>, Tensor<4>)],
        masks: &Masks,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let eps = self.config.rms_norm_eps;
        let x = rms_norm(h.clone(), &block.attn_norm, eps);
        let phase = crate::phases::phase("attention (q/k/v, RoPE, scores, softmax, o)", &self.device);
        let x = self.attention(block, x, b, t, &rope[block.rope], masks, cache);
        drop(phase);
        let x = match &block.attn_out_norm {
            Some(n) => rms_norm(x, n, eps),
            None => x,
        };
        let h = h + x;
        let x = rms_norm(h.clone(), &block.mlp_norm, eps);
        let inter = self.config.intermediate_size;
        let phase = crate::phases::phase("MLP (gate/up, activation, down)", &self.device);
        let gu = block.gate_up.forward(x);
        let x = block.down.forward(crate::model::fused::gated_activation(gu, inter, self.activation));
        drop(phase);
        let x = match &block.mlp_out_norm {
            Some(n) => rms_norm(x, n, eps),
            None => x,
        };
        h + x
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        x: Tensor<2>,
        b: usize,
        t: usize,
        (cos, sin): &(Tensor<4>, Tensor<4>),
        masks: &Masks,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let c = &self.config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let groups = h / kv;
        let qkv = block.qkv.forward(x);
        // Gemma 3 / Qwen 3 normalise each head's query and key (over head_dim) before RoPE.
        let head_norm = |x: Tensor<2>, heads: usize, norm: &Option<Tensor<2>>| match norm {
            Some(n) => rms_norm(x.reshape([b * t * heads, hd]), n, c.rms_norm_eps),
            None => x,
        };
        let q = head_norm(qkv.clone().narrow(1, 0, h * hd), h, &block.q_norm).reshape([b, t, h, hd]).swap_dims(1, 2);
        let k = head_norm(qkv.clone().narrow(1, h * hd, kv * hd), kv, &block.k_norm)
            .reshape([b, t, kv, hd])
            .swap_dims(1, 2);
        let v = qkv.narrow(1, (h + kv) * hd, kv * hd).reshape([b, t, kv, hd]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let s = k.dims()[2];
        // Query head i uses KV head i / groups: fold the groups into the query-time axis.
        let q = q.reshape([b, kv, groups * t, hd]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(c.attention_scale());
        let scores = match c.attention_softcap() {
            Some(cap) => soft_cap(scores, cap),
            None => scores,
        };
        let mask = if block.sliding { &masks.sliding } else { &masks.causal };
        let scores = scores.reshape([b, kv, groups, t, s]) + mask.clone();
        let probs = softmax(scores, 4).reshape([b, kv, groups * t, s]);
        let out = probs.matmul(v).reshape([b, h, t, hd]).swap_dims(1, 2).reshape([b * t, h * hd]);
        block.o.forward(out)
    }

    /// Each RoPE table of the model for positions `p0..p0+t` (see [`DecoderLm::rope`]).
    pub(crate) fn rope_tables(&self, p0: usize, t: usize) -> Vec<(Tensor<4>, Tensor<4>)> {
        self.ropes.iter().map(|spec| self.rope(spec, p0, t)).collect()
    }

    /// cos and sin tables `[1, 1, time, head_dim]` for positions `p0..p0+t` (half-split layout:
    /// dimension i and i + head_dim/2 share a frequency), computed in f32 as transformers does.
    fn rope(&self, spec: &RopeSpec, p0: usize, t: usize) -> (Tensor<4>, Tensor<4>) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        let inv_freq = spec.inv_freq(hd);
        let mut cos = vec![0.0f32; t * hd];
        let mut sin = vec![0.0f32; t * hd];
        for p in 0..t {
            for i in 0..half {
                let angle = inv_freq[i] * (p0 + p) as f32;
                let (s, c) = (angle as f64).sin_cos();
                for j in [i, i + half] {
                    cos[p * hd + j] = c as f32;
                    sin[p * hd + j] = s as f32;
                }
            }
        }
        let shape = [1, 1, t, hd];
        (
            Tensor::from_data(TensorData::new(cos, shape), (&self.device, DType::F32)),
            Tensor::from_data(TensorData::new(sin, shape), (&self.device, DType::F32)),
        )
    }

    /// Additive masks `[1, 1, 1, t, s]` for queries at `p0..p0+t` over keys `0..s`: causal, and
    /// causal plus the sliding window (key j hidden from query i when i − j ≥ window).
    fn masks(&self, p0: usize, t: usize, s: usize) -> Masks {
        let at = |from: usize, n: usize| {
            Tensor::<1, Int>::arange(from as i64..(from + n) as i64, &self.device).reshape([1, n])
        };
        let window = self.config.effective_sliding_window();
        Masks::new(at(p0, t), at(0, s), None, window.filter(|&w| w < p0 + t))
    }
}

/// Added to hidden scores; finite so that no backend turns it into NaN.
pub(crate) const MASKED: f32 = -1.0e30;

/// Additive attention masks, `[1 or batch, 1, 1, t, s]`.
pub(crate) struct Masks {
    pub(crate) causal: Tensor<5>,
    pub(crate) sliding: Tensor<5>,
}

impl Masks {
    /// The masks for queries at positions `query` (`[rows, t]`) over keys at `key` (`[rows, s]`), built
    /// on their device from those b·(t + s) numbers (not t·s values made on the host and uploaded).
    /// Key j is hidden from query i when it comes later (pos_i − pos_j < 0) or, given `documents`
    /// (each token's document number in its row — packed rows, where queries and keys are the same
    /// tokens), belongs to another document; the sliding mask also hides keys `window` or more
    /// behind. `window: None` (no window, or one no key can reach) reuses the causal mask.
    pub(crate) fn new(
        query: Tensor<2, Int>,
        key: Tensor<2, Int>,
        documents: Option<Tensor<2, Int>>,
        window: Option<usize>,
    ) -> Masks {
        let ([rows, t], s) = (query.dims(), key.dims()[1]);
        let device = query.device();
        let by_query = |x: Tensor<2, Int>| x.reshape([rows, 1, 1, t, 1]).expand([rows, 1, 1, t, s]);
        let by_key = |x: Tensor<2, Int>| x.reshape([rows, 1, 1, 1, s]).expand([rows, 1, 1, t, s]);
        let behind = by_query(query) - by_key(key);
        let mut visible = behind.clone().greater_equal_elem(0);
        if let Some(doc) = documents {
            visible = visible.bool_and(by_query(doc.clone()).equal(by_key(doc)));
        }
        let additive = |visible: Tensor<5, Bool>| {
            Tensor::<5>::zeros([rows, 1, 1, t, s], (&device, DType::F32)).mask_fill(visible.bool_not(), MASKED)
        };
        let causal = additive(visible.clone());
        let sliding = match window {
            Some(w) => additive(visible.bool_and(behind.lower_elem(w as i64))),
            None => causal.clone(),
        };
        Masks { causal, sliding }
    }
}

/// RMSNorm in f32: `x · rsqrt(mean(x²) + eps) · scale`; `scale` is `[1, width]` (Gemma's `1 + w`,
/// the others' `w`).
fn rms_norm(x: Tensor<2>, scale: &Tensor<2>, eps: f64) -> Tensor<2> {
    let inv = x.clone().square().mean_dim(1).add_scalar(eps).sqrt().recip();
    x * inv * scale.clone()
}

/// Half-split rotary embedding: `x·cos + rotate_half(x)·sin`, rotate_half(x) = [−x₂, x₁].
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
