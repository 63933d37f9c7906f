//! Gemma 2 exactly as transformers' `modeling_gemma2.py` computes it (eager attention), on any burn
//! device. Config-driven: nothing is tied to the 2B sizes. See shared/spec/gemma2.md.
//!
//! Layout choices: per-token work runs on `[tokens, width]` matrices; q/k/v and gate/up are fused
//! into one matmul each; linear weights are stored transposed (`[in, out]`) so `x · W` reads both
//! operands contiguously. Batches are right-padded: with a causal mask, a real token never sees a
//! pad, so per-token outputs equal the unpadded run and no padding mask is needed.

use anyhow::{Result, bail};
use burn::tensor::activation::{gelu_approximate, softmax};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use crate::model::snapshot::{Gemma2Config, Snapshot, StoredDtype};

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

/// A `[in, out]` weight; multiplies in f16 when stored in f16 and returns f32.
pub(crate) struct Linear {
    pub(crate) w: Tensor<2>,
}

impl Linear {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        if self.w.dtype() == DType::F16 {
            x.cast(FloatDType::F16).matmul(self.w.clone()).cast(FloatDType::F32)
        } else {
            x.matmul(self.w.clone())
        }
    }
}

pub(crate) struct Block {
    /// Each norm holds `1 + w` (Gemma stores the offset from one), f32.
    pub(crate) input_norm: Tensor<2>,
    pub(crate) post_attention_norm: Tensor<2>,
    pub(crate) pre_feedforward_norm: Tensor<2>,
    pub(crate) post_feedforward_norm: Tensor<2>,
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
    pub(crate) sliding: bool,
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

pub struct Gemma2 {
    pub config: Gemma2Config,
    /// `[vocab, hidden]` in vocabulary blocks of at most 1 GiB; also the unembedding (tied).
    pub(crate) embed: Vec<Tensor<2>>,
    /// sqrt(hidden) rounded to the stored weight dtype, as transformers multiplies it.
    pub(crate) normalizer: f32,
    pub(crate) final_norm: Tensor<2>,
    pub(crate) layers: Vec<Block>,
    pub(crate) device: Device,
}

impl Gemma2 {
    /// Loads all weights of a snapshot onto `device`, one tensor at a time.
    pub fn load(snapshot: &Snapshot, device: &Device, options: LoadOptions) -> Result<Self> {
        Self::load_with_progress(snapshot, device, options, |_, _| {})
    }

    /// As [`Gemma2::load`], reporting `(tensors done, tensors total)`.
    pub fn load_with_progress(
        snapshot: &Snapshot,
        device: &Device,
        options: LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let c = snapshot.config.clone();
        let (d, hd, h, kv, inter) =
            (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
        let total = 2 + c.num_hidden_layers * 11;
        let mut done = 0;
        let mut tick = |n: usize| {
            done += n;
            progress(done, total);
        };
        let weight_dtype = if options.f16_weights { DType::F16 } else { DType::F32 };
        let upload = |values: Vec<f32>, shape: [usize; 2], dtype: DType| -> Tensor<2> {
            match dtype {
                DType::F16 => {
                    let v: Vec<half::f16> = values.iter().map(|x| half::f16::from_f32(*x)).collect();
                    Tensor::from_data(TensorData::new(v, shape), (device, DType::F16))
                }
                _ => Tensor::from_data(TensorData::new(values, shape), (device, DType::F32)),
            }
        };
        let norm = |name: &str| -> Result<Tensor<2>> {
            let w = snapshot.read_f32(name, &[d])?;
            Ok(upload(w.iter().map(|x| 1.0 + x).collect(), [1, d], DType::F32))
        };

        let embed_name = "model.embed_tokens.weight";
        // transformers multiplies by sqrt(hidden) cast to the dtype the model runs in: the dtype the
        // config declares (what the model was trained in), else the stored one.
        let run_dtype = match c.declared_dtype().and_then(StoredDtype::from_torch_name) {
            Some(dt) => dt,
            None => snapshot.dtype_of(embed_name)?,
        };
        let all = snapshot.read_f32(embed_name, &[c.vocab_size, d])?;
        let elem = if options.f16_weights { 2 } else { 4 };
        let block_rows = options.embed_block_rows.unwrap_or((1usize << 30) / (d * elem)).max(1);
        let embed =
            all.chunks(block_rows * d).map(|rows| upload(rows.to_vec(), [rows.len() / d, d], weight_dtype)).collect();
        drop(all);
        tick(1);
        let normalizer = run_dtype.round((d as f32).sqrt());

        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let q = snapshot.read_linear_t(&format!("{p}.self_attn.q_proj.weight"), h * hd, d)?;
            let k = snapshot.read_linear_t(&format!("{p}.self_attn.k_proj.weight"), kv * hd, d)?;
            let v = snapshot.read_linear_t(&format!("{p}.self_attn.v_proj.weight"), kv * hd, d)?;
            let qkv = concat_columns(&[(&q, h * hd), (&k, kv * hd), (&v, kv * hd)], d);
            drop((q, k, v));
            let o = snapshot.read_linear_t(&format!("{p}.self_attn.o_proj.weight"), d, h * hd)?;
            tick(4);
            let gate = snapshot.read_linear_t(&format!("{p}.mlp.gate_proj.weight"), inter, d)?;
            let up = snapshot.read_linear_t(&format!("{p}.mlp.up_proj.weight"), inter, d)?;
            let gate_up = concat_columns(&[(&gate, inter), (&up, inter)], d);
            drop((gate, up));
            let down = snapshot.read_linear_t(&format!("{p}.mlp.down_proj.weight"), d, inter)?;
            tick(3);
            layers.push(Block {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_feedforward_norm: norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                post_feedforward_norm: norm(&format!("{p}.post_feedforward_layernorm.weight"))?,
                qkv: Linear { w: upload(qkv, [d, (h + 2 * kv) * hd], weight_dtype) },
                o: Linear { w: upload(o, [h * hd, d], weight_dtype) },
                gate_up: Linear { w: upload(gate_up, [d, 2 * inter], weight_dtype) },
                down: Linear { w: upload(down, [inter, d], weight_dtype) },
                sliding: c.is_sliding(i),
            });
            tick(4);
        }
        let final_norm = norm("model.norm.weight")?;
        tick(1);
        Ok(Self { config: c, embed, normalizer, final_norm, layers, device: device.clone() })
    }

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
        let [b, t] = ids.dims();
        let ids = ids.reshape([b * t]);
        let to_f32 = |rows: Tensor<2>| if rows.dtype() == DType::F16 { rows.cast(FloatDType::F32) } else { rows };
        if self.embed.len() == 1 {
            return to_f32(self.embed[0].clone().select(0, ids)).mul_scalar(self.normalizer);
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
        out.expect("at least one embedding block").mul_scalar(self.normalizer)
    }

    /// Runs blocks `0..=last_layer` and returns their output `[batch, time, hidden]`, calling
    /// `on_block(l, output)` after each block (inspect uses it to record every block).
    pub fn forward_blocks(
        &self,
        ids: Tensor<2, Int>,
        last_layer: usize,
        mut on_block: impl FnMut(usize, &Tensor<3>),
    ) -> Tensor<3> {
        let [b, t] = ids.dims();
        let mut h = self.embed_tokens(ids);
        let rope = self.rope(0, t);
        let masks = self.masks(0, t, t);
        for (l, block) in self.layers.iter().enumerate().take(last_layer + 1) {
            h = self.block_forward(block, h, b, t, &rope, &masks, None);
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
        let rope = self.rope(0, t);
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

    /// Final norm, tied unembedding, final soft-cap: `[rows, hidden]` → `[rows, vocab]`.
    pub fn logits(&self, h: Tensor<2>) -> Tensor<2> {
        let x = rms_norm(h, &self.final_norm, self.config.rms_norm_eps);
        let unembed = |block: &Tensor<2>| {
            if block.dtype() == DType::F16 {
                x.clone().cast(FloatDType::F16).matmul(block.clone().transpose()).cast(FloatDType::F32)
            } else {
                x.clone().matmul(block.clone().transpose())
            }
        };
        let logits = match self.embed.as_slice() {
            [one] => unembed(one),
            blocks => Tensor::cat(blocks.iter().map(unembed).collect(), 1),
        };
        match self.config.final_logit_softcapping {
            Some(c) => soft_cap(logits, c),
            None => logits,
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), len: 0 }
    }

    /// Incremental decoding: runs `ids` (`[batch, new]`) at positions `cache.len..`, appends their
    /// keys and values to the cache, and returns the logits of the last new position `[batch, vocab]`.
    pub fn step(&self, ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<2> {
        self.step_edited(ids, cache, None)
    }

    /// [`Gemma2::step`] with `edit.add` (`[1, hidden]`) added to the output of block `edit.layer`
    /// at every new position (steering).
    pub fn step_edited(&self, ids: Tensor<2, Int>, cache: &mut KvCache, edit: Option<&ResidualEdit>) -> Tensor<2> {
        let [b, t] = ids.dims();
        let p0 = cache.len;
        let mut h = self.embed_tokens(ids);
        let rope = self.rope(p0, t);
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
        rope: &(Tensor<4>, Tensor<4>),
        masks: &Masks,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<2> {
        let eps = self.config.rms_norm_eps;
        let x = rms_norm(h.clone(), &block.input_norm, eps);
        let x = self.attention(block, x, b, t, rope, masks, cache);
        let x = rms_norm(x, &block.post_attention_norm, eps);
        let h = h + x;
        let x = rms_norm(h.clone(), &block.pre_feedforward_norm, eps);
        let inter = self.config.intermediate_size;
        let gu = block.gate_up.forward(x);
        let x = gelu_approximate(gu.clone().narrow(1, 0, inter)) * gu.narrow(1, inter, inter);
        let x = block.down.forward(x);
        let x = rms_norm(x, &block.post_feedforward_norm, eps);
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
        let q = qkv.clone().narrow(1, 0, h * hd).reshape([b, t, h, hd]).swap_dims(1, 2);
        let k = qkv.clone().narrow(1, h * hd, kv * hd).reshape([b, t, kv, hd]).swap_dims(1, 2);
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
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(c.query_pre_attn_scalar.powf(-0.5));
        let scores = match c.attn_logit_softcapping {
            Some(cap) => soft_cap(scores, cap),
            None => scores,
        };
        let mask = if block.sliding { &masks.sliding } else { &masks.causal };
        let scores = scores.reshape([b, kv, groups, t, s]) + mask.clone();
        let probs = softmax(scores, 4).reshape([b, kv, groups * t, s]);
        let out = probs.matmul(v).reshape([b, h, t, hd]).swap_dims(1, 2).reshape([b * t, h * hd]);
        block.o.forward(out)
    }

    /// cos and sin tables `[1, 1, time, head_dim]` for positions `p0..p0+t` (half-split layout:
    /// dimension i and i + head_dim/2 share a frequency), computed in f32 as transformers does.
    fn rope(&self, p0: usize, t: usize) -> (Tensor<4>, Tensor<4>) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        let base = self.config.rope_base() as f32;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / hd as f32)).collect();
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
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let build = |sliding: bool| {
            let mut m = vec![0.0f32; t * s];
            for i in 0..t {
                let qi = p0 + i;
                for j in 0..s {
                    if j > qi || (sliding && qi - j >= window) {
                        m[i * s + j] = MASKED;
                    }
                }
            }
            Tensor::from_data(TensorData::new(m, [1, 1, 1, t, s]), (&self.device, DType::F32))
        };
        Masks { causal: build(false), sliding: build(true) }
    }
}

/// Added to hidden scores; finite so that no backend turns it into NaN.
const MASKED: f32 = -1.0e30;

struct Masks {
    causal: Tensor<5>,
    sliding: Tensor<5>,
}

/// Gemma RMSNorm in f32: `x · rsqrt(mean(x²) + eps) · (1 + w)`; `one_plus_w` is `[1, hidden]`.
fn rms_norm(x: Tensor<2>, one_plus_w: &Tensor<2>, eps: f64) -> Tensor<2> {
    let inv = x.clone().square().mean_dim(1).add_scalar(eps).sqrt().recip();
    x * inv * one_plus_w.clone()
}

/// `c · tanh(x / c)`.
fn soft_cap<const D: usize>(x: Tensor<D>, cap: f64) -> Tensor<D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
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

/// Concatenates `[in, out_i]` row-major matrices along the output axis.
fn concat_columns(parts: &[(&Vec<f32>, usize)], rows: usize) -> Vec<f32> {
    let width: usize = parts.iter().map(|(_, w)| w).sum();
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        for (m, w) in parts {
            out.extend_from_slice(&m[r * w..(r + 1) * w]);
        }
    }
    out
}
