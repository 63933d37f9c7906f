//! Loading a snapshot's weights into the decoder core, per family: which tensors a block has, under
//! transformers' names, and how each is stored on the device (linear weights transposed to
//! `[in, out]`, q/k/v and gate/up fused, Gemma's norms as `1 + w`). A LoRA adapter, when given, is
//! merged into the linear weights as they are read.

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::model::decoder::{Activation, Block, DecoderLm, Linear, LoadOptions};
use crate::model::lora::LoraAdapter;
use crate::model::snapshot::{Snapshot, StoredDtype};

impl DecoderLm {
    /// Loads all weights of a snapshot onto `device`, one tensor at a time.
    pub fn load(snapshot: &Snapshot, device: &Device, options: LoadOptions) -> Result<Self> {
        Self::load_with_progress(snapshot, None, device, options, |_, _| {})
    }

    /// As [`DecoderLm::load`] with `adapter` merged in, reporting `(tensors done, tensors total)`.
    pub fn load_with_progress(
        snapshot: &Snapshot,
        adapter: Option<&LoraAdapter>,
        device: &Device,
        options: LoadOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let c = snapshot.config.clone();
        let family = c.family;
        let (d, hd, h, kv, inter) =
            (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
        let total = 3 + c.num_hidden_layers * 11;
        let mut done = 0;
        let mut tick = |n: usize| {
            done += n;
            progress(done, total);
        };
        if options.f16_weights && !device.supports_dtype(DType::F16) {
            anyhow::bail!(
                "--f16: this device ({device:?}) has no f16 arithmetic (a GPU adapter without the shader-f16 feature); leave --f16 off"
            );
        }
        let weight_dtype = if options.f16_weights { DType::F16 } else { DType::F32 };
        // The largest weight the device holds in one buffer: the fused MLP gate/up matrix (or q/k/v).
        if let Some(max) = crate::backend::max_buffer_bytes(device) {
            let elem = if options.f16_weights { 2 } else { 4 };
            let largest = (d * 2 * inter).max(d * (h + 2 * kv) * hd) as u64 * elem;
            if largest > max {
                anyhow::bail!(
                    "{}: the fused MLP weight takes {} MiB, more than one buffer of this device may hold ({} MiB: {}); load with --f16 or use another device",
                    snapshot.dir.display(),
                    largest >> 20,
                    max >> 20,
                    crate::backend::Backend::Wgpu.describe()
                );
            }
        }
        let upload = |values: Vec<f32>, shape: [usize; 2], dtype: DType| -> Tensor<2> {
            match dtype {
                DType::F16 => {
                    let v: Vec<half::f16> = values.iter().map(|x| half::f16::from_f32(*x)).collect();
                    Tensor::from_data(TensorData::new(v, shape), (device, DType::F16))
                }
                _ => Tensor::from_data(TensorData::new(values, shape), (device, DType::F32)),
            }
        };
        // Gemma stores the offset from one; the others store the scale itself.
        let offset = if family.norm_stores_offset() { 1.0 } else { 0.0 };
        let norm = |name: &str, width: usize| -> Result<Tensor<2>> {
            let w = snapshot.read_f32(name, &[width])?;
            Ok(upload(w.iter().map(|x| offset + x).collect(), [1, width], DType::F32))
        };
        let vector = |name: &str, width: usize| -> Result<Tensor<2>> {
            Ok(upload(snapshot.read_f32(name, &[width])?, [1, width], DType::F32))
        };
        // `[in, out]` with the adapter's ΔW merged in.
        let linear_t = |name: &str, out_dim: usize, in_dim: usize| -> Result<Vec<f32>> {
            let mut w = snapshot.read_linear_t(name, out_dim, in_dim)?;
            if let Some(a) = adapter {
                a.merge_into_t(name, &mut w, out_dim, in_dim)?;
            }
            Ok(w)
        };

        let embed_name = "model.embed_tokens.weight";
        // transformers multiplies by sqrt(hidden) cast to the dtype the model runs in: the dtype the
        // config declares (what the model was trained in), else the stored one.
        let run_dtype = match c.declared_dtype().and_then(StoredDtype::from_torch_name) {
            Some(dt) => dt,
            None => snapshot.dtype_of(embed_name)?,
        };
        let elem = if options.f16_weights { 2 } else { 4 };
        // Vocabulary blocks of at most 1 GiB, and no larger than one buffer of this device may be.
        let block_bytes = crate::backend::max_buffer_bytes(device).map_or(1u64 << 30, |m| m.min(1 << 30));
        let block_rows = options.embed_block_rows.unwrap_or(block_bytes as usize / (d * elem)).max(1);
        let vocab_blocks = |name: &str| -> Result<Vec<Tensor<2>>> {
            let all = snapshot.read_f32(name, &[c.vocab_size, d])?;
            Ok(all
                .chunks(block_rows * d)
                .map(|rows| upload(rows.to_vec(), [rows.len() / d, d], weight_dtype))
                .collect())
        };
        let embed = vocab_blocks(embed_name)?;
        tick(1);
        let unembed = if c.tied() {
            None
        } else {
            let why = "config.json's `tie_word_embeddings` is false (or absent), so the unembedding is read from it";
            Some(vocab_blocks("lm_head.weight").map_err(|e| e.context(why))?)
        };
        tick(1);
        let normalizer = family.scales_embedding().then(|| run_dtype.round((d as f32).sqrt()));

        let (qkv_bias, o_bias) = c.attention_biases();
        let mlp_bias = c.mlp_biases();
        let mut ropes = Vec::new();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let q = linear_t(&format!("{a}.q_proj.weight"), h * hd, d)?;
            let k = linear_t(&format!("{a}.k_proj.weight"), kv * hd, d)?;
            let v = linear_t(&format!("{a}.v_proj.weight"), kv * hd, d)?;
            let qkv = concat_columns(&[(&q, h * hd), (&k, kv * hd), (&v, kv * hd)], d);
            drop((q, k, v));
            let qkv_b = if qkv_bias {
                let parts = [("q", h * hd), ("k", kv * hd), ("v", kv * hd)];
                let mut b = Vec::with_capacity((h + 2 * kv) * hd);
                for (name, n) in parts {
                    b.extend(snapshot.read_f32(&format!("{a}.{name}_proj.bias"), &[n])?);
                }
                Some(upload(b, [1, (h + 2 * kv) * hd], DType::F32))
            } else {
                None
            };
            let o = linear_t(&format!("{a}.o_proj.weight"), d, h * hd)?;
            let o_b = if o_bias { Some(vector(&format!("{a}.o_proj.bias"), d)?) } else { None };
            tick(4);
            let m = format!("{p}.mlp");
            let gate = linear_t(&format!("{m}.gate_proj.weight"), inter, d)?;
            let up = linear_t(&format!("{m}.up_proj.weight"), inter, d)?;
            let gate_up = concat_columns(&[(&gate, inter), (&up, inter)], d);
            drop((gate, up));
            let gate_up_b = if mlp_bias {
                let mut b = snapshot.read_f32(&format!("{m}.gate_proj.bias"), &[inter])?;
                b.extend(snapshot.read_f32(&format!("{m}.up_proj.bias"), &[inter])?);
                Some(upload(b, [1, 2 * inter], DType::F32))
            } else {
                None
            };
            let down = linear_t(&format!("{m}.down_proj.weight"), d, inter)?;
            let down_b = if mlp_bias { Some(vector(&format!("{m}.down_proj.bias"), d)?) } else { None };
            tick(3);
            let (q_norm, k_norm) = if family.has_qk_norm() {
                (Some(norm(&format!("{a}.q_norm.weight"), hd)?), Some(norm(&format!("{a}.k_norm.weight"), hd)?))
            } else {
                (None, None)
            };
            // Gemma: input → attention → post-attention norm; pre-feedforward → MLP → post-feedforward.
            // Llama/Qwen: input → attention; post-attention (the MLP's input norm) → MLP.
            let (mlp_norm_name, attn_out, mlp_out) = if family.sandwich_norms() {
                (
                    "pre_feedforward_layernorm",
                    Some(norm(&format!("{p}.post_attention_layernorm.weight"), d)?),
                    Some(norm(&format!("{p}.post_feedforward_layernorm.weight"), d)?),
                )
            } else {
                ("post_attention_layernorm", None, None)
            };
            let spec = c.rope(i)?;
            let rope = match ropes.iter().position(|r| *r == spec) {
                Some(r) => r,
                None => {
                    ropes.push(spec);
                    ropes.len() - 1
                }
            };
            layers.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"), d)?,
                attn_out_norm: attn_out,
                mlp_norm: norm(&format!("{p}.{mlp_norm_name}.weight"), d)?,
                mlp_out_norm: mlp_out,
                qkv: Linear { w: upload(qkv, [d, (h + 2 * kv) * hd], weight_dtype), b: qkv_b },
                o: Linear { w: upload(o, [h * hd, d], weight_dtype), b: o_b },
                gate_up: Linear { w: upload(gate_up, [d, 2 * inter], weight_dtype), b: gate_up_b },
                down: Linear { w: upload(down, [inter, d], weight_dtype), b: down_b },
                q_norm,
                k_norm,
                sliding: c.is_sliding(i),
                rope,
            });
            tick(4);
        }
        if let Some(a) = adapter {
            a.check_all_used()?;
        }
        let final_norm = norm("model.norm.weight", d)?;
        tick(1);
        let activation = if family.is_gemma() { Activation::GeluTanh } else { Activation::Silu };
        Ok(Self {
            config: c,
            embed,
            unembed,
            normalizer,
            final_norm,
            layers,
            ropes,
            activation,
            device: device.clone(),
        })
    }
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
