//! Training a Gemma 2 language model with crossdiff itself (the demo's miniature base and chat
//! models): random initialisation, every parameter as a list for an optimiser, the next-token loss
//! through burn autodiff, and export as a hub-layout snapshot.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::model::decoder::{Block, DecoderLm, Linear};
use crate::model::snapshot::{ModelConfig, StoredDtype};

/// Training support (the demo's miniature models are trained with crossdiff itself): random
/// initialisation, every parameter as a list for an optimiser, and export as a hub-layout snapshot.
impl DecoderLm {
    /// A randomly initialised Gemma 2 model (normal(0, 0.02) weights, zero norm offsets), one
    /// embedding block. The demo's models are Gemma 2: `config` must be one.
    pub fn random(config: ModelConfig, device: &Device, seed: u64) -> Self {
        assert_eq!(config.family, crate::model::family::Family::Gemma2, "the demo's models are Gemma 2");
        let c = &config;
        let (d, hd, h, kv, inter) =
            (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
        let mut rng = crate::rng::SplitMix64(seed);
        let mut normal = |n: usize, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    // Box–Muller
                    let (u1, u2) = (rng.next_f64().max(1e-12), rng.next_f64());
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect()
        };
        let t =
            |v: Vec<f32>, shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v, shape), (device, DType::F32));
        let ones = |n: usize| t(vec![1.0; n], [1, n]);
        let layers = (0..c.num_hidden_layers)
            .map(|i| Block {
                attn_norm: ones(d),
                attn_out_norm: Some(ones(d)),
                mlp_norm: ones(d),
                mlp_out_norm: Some(ones(d)),
                qkv: Linear { w: t(normal(d * (h + 2 * kv) * hd, 0.02), [d, (h + 2 * kv) * hd]), b: None },
                o: Linear { w: t(normal(h * hd * d, 0.02), [h * hd, d]), b: None },
                gate_up: Linear { w: t(normal(d * 2 * inter, 0.02), [d, 2 * inter]), b: None },
                down: Linear { w: t(normal(inter * d, 0.02), [inter, d]), b: None },
                q_norm: None,
                k_norm: None,
                sliding: c.is_sliding(i),
                rope: 0,
            })
            .collect();
        let run_dtype = c.declared_dtype().and_then(StoredDtype::from_torch_name).unwrap_or(StoredDtype::F32);
        let rope = c.rope(0).expect("the demo's config has a plain RoPE base");
        Self {
            embed: vec![t(normal(c.vocab_size * d, 0.02), [c.vocab_size, d])],
            unembed: None,
            normalizer: Some(run_dtype.round((d as f32).sqrt())),
            final_norm: ones(d),
            layers,
            ropes: vec![rope],
            activation: crate::model::decoder::Activation::GeluTanh,
            device: device.clone(),
            config,
        }
    }

    /// Every parameter, in a fixed order: embedding blocks, final norm, then per block the four
    /// norms (as 1 + w), qkv, o, gate/up and down (as `[in, out]`).
    pub fn parameters(&self) -> Vec<Tensor<2>> {
        let mut out: Vec<Tensor<2>> = self.embed.clone();
        out.push(self.final_norm.clone());
        for b in &self.layers {
            out.extend([
                b.attn_norm.clone(),
                gemma_norm(&b.attn_out_norm).clone(),
                b.mlp_norm.clone(),
                gemma_norm(&b.mlp_out_norm).clone(),
                b.qkv.w.clone(),
                b.o.w.clone(),
                b.gate_up.w.clone(),
                b.down.w.clone(),
            ]);
        }
        out
    }

    /// The same model with new parameters (same order and shapes as [`DecoderLm::parameters`]).
    pub fn with_parameters(mut self, params: Vec<Tensor<2>>) -> Self {
        let mut it = params.into_iter();
        let mut next = || it.next().expect("as many parameters as DecoderLm::parameters returns");
        for e in self.embed.iter_mut() {
            *e = next();
        }
        self.final_norm = next();
        for b in self.layers.iter_mut() {
            b.attn_norm = next();
            b.attn_out_norm = Some(next());
            b.mlp_norm = next();
            b.mlp_out_norm = Some(next());
            b.qkv.w = next();
            b.o.w = next();
            b.gate_up.w = next();
            b.down.w = next();
        }
        self
    }

    /// Mean next-token cross-entropy of right-padded sequences (`lengths[i]` real tokens each).
    pub fn lm_loss(&self, seqs: &[Vec<u32>]) -> Result<Tensor<1>> {
        let ids = self.batch_ids(seqs)?;
        let [b, t] = ids.dims();
        let v = self.config.vocab_size;
        let logp = burn::tensor::activation::log_softmax(self.forward(ids.clone()), 2); // [B, T, V]
        // Targets: the next token; positions without one (last, padding) are masked out.
        let mut targets = vec![0i64; b * t];
        let mut mask = vec![0.0f32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            for p in 0..s.len().saturating_sub(1) {
                targets[i * t + p] = s[p + 1] as i64;
                mask[i * t + p] = 1.0;
            }
        }
        let n: f32 = mask.iter().sum();
        if n == 0.0 {
            bail!("no next-token targets: every sequence has fewer than 2 tokens");
        }
        let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t, 1]), &self.device);
        let picked = logp.gather(2, targets).reshape([b, t]); // log p(target)
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, t]), (&self.device, DType::F32));
        let _ = v;
        Ok((picked * mask).sum().neg().div_scalar(n))
    }

    /// Writes `config.json` and `model.safetensors` (f32, transformers' names and `[out, in]`
    /// layout, norms as offsets from one) into `dir`, atomically.
    pub fn save_snapshot(&self, dir: &std::path::Path) -> Result<()> {
        use crate::io::{LazyTensor, f32_bytes, write_atomic, write_safetensors_streaming};
        fs_err::create_dir_all(dir)?;
        let c = &self.config;
        let (d, hd, h, kv, inter) =
            (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size);
        let read = |t: Tensor<2>| -> Result<Vec<f32>> { crate::counters::read_f32(t) };
        // [in, out] columns [from, from + n) → PyTorch [n, in].
        let out_in = |t: &Tensor<2>, from: usize, n: usize| -> Tensor<2> { t.clone().narrow(1, from, n).transpose() };
        let mut tensors: Vec<LazyTensor> = Vec::new();
        let lazy = |name: String, shape: Vec<usize>, t: Tensor<2>, offset: f32| LazyTensor {
            name,
            dtype: safetensors::Dtype::F32,
            shape,
            bytes: Box::new(move || Ok(f32_bytes(&read(t)?.iter().map(|v| v - offset).collect::<Vec<_>>()))),
        };
        let embed = if self.embed.len() == 1 { self.embed[0].clone() } else { Tensor::cat(self.embed.clone(), 0) };
        tensors.push(lazy("model.embed_tokens.weight".into(), vec![c.vocab_size, d], embed, 0.0));
        tensors.push(lazy("model.norm.weight".into(), vec![d], self.final_norm.clone(), 1.0));
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, n) in [
                ("input_layernorm", &b.attn_norm),
                ("post_attention_layernorm", gemma_norm(&b.attn_out_norm)),
                ("pre_feedforward_layernorm", &b.mlp_norm),
                ("post_feedforward_layernorm", gemma_norm(&b.mlp_out_norm)),
            ] {
                tensors.push(lazy(format!("{p}.{name}.weight"), vec![d], n.clone(), 1.0));
            }
            tensors.push(lazy(
                format!("{p}.self_attn.q_proj.weight"),
                vec![h * hd, d],
                out_in(&b.qkv.w, 0, h * hd),
                0.0,
            ));
            tensors.push(lazy(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv * hd, d],
                out_in(&b.qkv.w, h * hd, kv * hd),
                0.0,
            ));
            tensors.push(lazy(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv * hd, d],
                out_in(&b.qkv.w, (h + kv) * hd, kv * hd),
                0.0,
            ));
            tensors.push(lazy(format!("{p}.self_attn.o_proj.weight"), vec![d, h * hd], b.o.w.clone().transpose(), 0.0));
            tensors.push(lazy(
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, d],
                out_in(&b.gate_up.w, 0, inter),
                0.0,
            ));
            tensors.push(lazy(
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, d],
                out_in(&b.gate_up.w, inter, inter),
                0.0,
            ));
            tensors.push(lazy(format!("{p}.mlp.down_proj.weight"), vec![d, inter], b.down.w.clone().transpose(), 0.0));
        }
        write_safetensors_streaming(&dir.join("model.safetensors"), tensors)?;
        let mut config = c.clone();
        config.torch_dtype = Some("float32".into());
        config.dtype = None;
        let text = serde_json::to_string_pretty(&config)?;
        write_atomic(&dir.join("config.json"), |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
    }
}

/// A Gemma block's output norm (always present in the demo's Gemma 2 models).
fn gemma_norm(norm: &Option<Tensor<2>>) -> &Tensor<2> {
    norm.as_ref().expect("a Gemma 2 block has its sandwich norms")
}
