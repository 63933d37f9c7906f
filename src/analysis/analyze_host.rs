//! analyze's per-batch sums on the CPU (flex): the encoder stays one dense matmul (flex's gemm);
//! everything after it — the reconstruction, Latent Scaling's projections onto the chat decoder,
//! the per-latent counts, maxima and squares — runs as host loops over the active (token, latent)
//! entries only (about k per token), instead of the dense B×D×d products the device route uses.
//! Same sums as [`crate::analysis::analyze`]'s tensor route, accumulated in f64.

use anyhow::Result;
use rayon::prelude::*;

use crate::crosscoder::{Crosscoder, read_vec};

/// The decoder on the host, read once per analysis.
pub(crate) struct HostDecoder {
    /// `[D, 2d]`.
    w: Vec<f32>,
    /// `[2d]`.
    b_dec: Vec<f32>,
    /// `[D]`: ‖d_j^0‖ + ‖d_j^1‖, BatchTopK's score weights.
    norm_sum: Vec<f32>,
    d: usize,
    dict: usize,
}

impl HostDecoder {
    /// Reads the decoder, its bias and the norm sums back in one read.
    pub(crate) fn new(cc: &Crosscoder) -> Result<Self> {
        let (d, dict) = cc.params.dims();
        let p = &cc.params;
        let parts = vec![
            p.w_dec.clone().reshape([dict * 2 * d]),
            p.b_dec.clone().reshape([2 * d]),
            p.norm_sum().reshape([dict]),
        ];
        let mut all = read_vec(burn::tensor::Tensor::cat(parts, 0))?;
        let norm_sum = all.split_off(dict * 2 * d + 2 * d);
        let b_dec = all.split_off(dict * 2 * d);
        Ok(Self { w: all, b_dec, norm_sum, d, dict })
    }

    /// The decoder `[D, 2d]`, for Latent Scaling after the last batch.
    pub(crate) fn into_decoder(self) -> Vec<f32> {
        self.w
    }
}

/// Running sums over the cache (per latent, and per dimension of the pair), f64: one batch's from
/// [`batch_sums`], or the analysis's accumulators (saved between shards so an interrupted analysis
/// resumes). Saved as the floats' bit patterns: serde_json's default number parser may round a
/// float's last bit (it has no `float_roundtrip` here), and a resumed analysis must equal an
/// uninterrupted one bit for bit.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Sums {
    pub tokens: u64,
    #[serde(with = "exact")]
    pub active: Vec<f64>,
    #[serde(with = "exact")]
    pub template_active: Vec<f64>,
    #[serde(with = "exact")]
    pub max_act: Vec<f64>,
    #[serde(with = "exact")]
    pub sum_f2: Vec<f64>,
    #[serde(with = "exact")]
    pub recon: [Vec<f64>; 2],
    #[serde(with = "exact")]
    pub err: [Vec<f64>; 2],
    #[serde(with = "exact")]
    pub l0: f64,
    #[serde(with = "exact")]
    pub x_sum: Vec<f64>,
    #[serde(with = "exact")]
    pub x_sq: Vec<f64>,
    #[serde(with = "exact")]
    pub e_sum: Vec<f64>,
    #[serde(with = "exact")]
    pub e_sq: Vec<f64>,
}

/// f64 values (alone, in a Vec, in a pair of Vecs) written and read as their `u64` bit patterns.
mod exact {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub trait Bits: Sized {
        type Repr: Serialize + for<'de> Deserialize<'de>;
        fn to_bits(&self) -> Self::Repr;
        fn from_bits(r: Self::Repr) -> Self;
    }

    impl Bits for f64 {
        type Repr = u64;
        fn to_bits(&self) -> u64 {
            f64::to_bits(*self)
        }
        fn from_bits(r: u64) -> Self {
            f64::from_bits(r)
        }
    }

    impl Bits for Vec<f64> {
        type Repr = Vec<u64>;
        fn to_bits(&self) -> Vec<u64> {
            self.iter().map(|v| v.to_bits()).collect()
        }
        fn from_bits(r: Vec<u64>) -> Self {
            r.into_iter().map(f64::from_bits).collect()
        }
    }

    impl Bits for [Vec<f64>; 2] {
        type Repr = [Vec<u64>; 2];
        fn to_bits(&self) -> [Vec<u64>; 2] {
            [self[0].to_bits(), self[1].to_bits()]
        }
        fn from_bits([a, b]: [Vec<u64>; 2]) -> Self {
            [Vec::from_bits(a), Vec::from_bits(b)]
        }
    }

    pub fn serialize<T: Bits, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.to_bits().serialize(s)
    }

    pub fn deserialize<'de, T: Bits, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        T::Repr::deserialize(d).map(T::from_bits)
    }
}

impl Sums {
    /// All zero, for `dict` latents and pairs `width` wide.
    pub(crate) fn zeros(dict: usize, width: usize) -> Self {
        let z = || vec![0.0f64; dict];
        let w = || vec![0.0f64; width];
        Self {
            tokens: 0,
            active: z(),
            template_active: z(),
            max_act: z(),
            sum_f2: z(),
            recon: [z(), z()],
            err: [z(), z()],
            l0: 0.0,
            x_sum: w(),
            x_sq: w(),
            e_sum: w(),
            e_sq: w(),
        }
    }

    /// Adds `o` in (the maxima kept elementwise).
    pub(crate) fn absorb(&mut self, o: &Self) {
        let add = |a: &mut Vec<f64>, b: &Vec<f64>| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.active, &o.active);
        add(&mut self.template_active, &o.template_active);
        self.max_act.iter_mut().zip(&o.max_act).for_each(|(x, y)| *x = x.max(*y));
        add(&mut self.sum_f2, &o.sum_f2);
        for m in 0..2 {
            add(&mut self.recon[m], &o.recon[m]);
            add(&mut self.err[m], &o.err[m]);
        }
        self.l0 += o.l0;
        self.tokens += o.tokens;
        add(&mut self.x_sum, &o.x_sum);
        add(&mut self.x_sq, &o.x_sq);
        add(&mut self.e_sum, &o.e_sum);
        add(&mut self.e_sq, &o.e_sq);
    }
}

/// The sums of a batch (statistics over the active entries, on the host): `codes` `[b, D]` (the crosscoder's inference codes of `rows`), `rows`
/// `[b, 2d]` the pairs, `template` the chat-template flag of each token.
pub(crate) fn batch_sums(hd: &HostDecoder, codes: &[f32], rows: &[f32], template: &[bool]) -> Sums {
    let _phase = crate::phases::phase("statistics over the active entries (host)", &burn::tensor::Device::flex());
    let (d, dict) = (hd.d, hd.dict);
    let width = 2 * d;
    let b = template.len();
    (0..b)
        .into_par_iter()
        // A few large chunks: each fold starts its own D-wide sums.
        .with_min_len((b / rayon::current_num_threads().max(1)).max(1))
        .fold(
            || Sums::zeros(dict, width),
            |mut s, t| {
                let f = &codes[t * dict..(t + 1) * dict];
                let x = &rows[t * width..(t + 1) * width];
                let picks: Vec<(usize, f32)> =
                    f.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(j, v)| (j, *v)).collect();
                // ĥ = b_dec + Σ f_j d_j over the active latents.
                let mut recon = hd.b_dec.clone();
                for &(j, v) in &picks {
                    recon.iter_mut().zip(&hd.w[j * width..(j + 1) * width]).for_each(|(r, w)| *r += v * w);
                }
                let err: Vec<f32> = x.iter().zip(&recon).map(|(x, r)| x - r).collect();
                let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
                for &(j, v) in &picks {
                    let a = v * hd.norm_sum[j];
                    if a > 0.0 {
                        s.active[j] += 1.0;
                        if template[t] {
                            s.template_active[j] += 1.0;
                        }
                    }
                    s.max_act[j] = s.max_act[j].max(a as f64);
                    s.sum_f2[j] += (v * v) as f64;
                    let chat_dir = &hd.w[j * width + d..(j + 1) * width];
                    for m in 0..2 {
                        s.recon[m][j] += (v * dot(&recon[m * d..(m + 1) * d], chat_dir)) as f64;
                        s.err[m][j] += (v * dot(&err[m * d..(m + 1) * d], chat_dir)) as f64;
                    }
                }
                s.l0 += picks.len() as f64;
                s.tokens += 1;
                for i in 0..width {
                    let (xv, ev) = (x[i] as f64, err[i] as f64);
                    s.x_sum[i] += xv;
                    s.x_sq[i] += xv * xv;
                    s.e_sum[i] += ev;
                    s.e_sq[i] += ev * ev;
                }
                s
            },
        )
        .reduce(
            || Sums::zeros(dict, width),
            |mut a, b| {
                a.absorb(&b);
                a
            },
        )
}
