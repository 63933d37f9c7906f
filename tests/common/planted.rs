//! A planted pair source: shared directions in both models, chat-only and base-only directions in
//! one, each switched on per token with probability 0.08 at a random strength (the crosscoder and
//! SAE training tests' ground truth).

use crossdiff::activations::reader::PairBatch;
use crossdiff::crosscoder::train::PairSource;
use crossdiff::rng::SplitMix64;

pub struct Planted {
    pub d: usize,
    pub shared: Vec<Vec<f32>>,
    pub chat_only: Vec<Vec<f32>>,
    pub base_only: Vec<Vec<f32>>,
    pub rng: SplitMix64,
    pub batch: usize,
    pub batches_left: u64,
}

impl Planted {
    pub fn new(d: usize, n: [usize; 3], seed: u64, batch: usize, batches: u64) -> Self {
        let mut rng = SplitMix64(seed);
        let unit = |rng: &mut SplitMix64| {
            let v: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let dirs = |k: usize, rng: &mut SplitMix64| (0..k).map(|_| unit(rng)).collect::<Vec<_>>();
        let shared = dirs(n[0], &mut rng);
        let chat_only = dirs(n[1], &mut rng);
        let base_only = dirs(n[2], &mut rng);
        Self { d, shared, chat_only, base_only, rng, batch, batches_left: batches }
    }
}

impl PairSource for Planted {
    fn next_batch(&mut self) -> anyhow::Result<Option<PairBatch>> {
        if self.batches_left == 0 {
            return Ok(None);
        }
        self.batches_left -= 1;
        let d = self.d;
        let mut acts = vec![0.0f32; self.batch * 2 * d];
        for row in acts.chunks_exact_mut(2 * d) {
            let (base, chat) = row.split_at_mut(d);
            let add = |dir: &Vec<f32>, into: &mut [&mut [f32]], rng: &mut SplitMix64| {
                if rng.next_f64() < 0.08 {
                    let a = 0.5 + rng.next_f64() as f32;
                    for t in into.iter_mut() {
                        t.iter_mut().zip(dir).for_each(|(x, v)| *x += a * v);
                    }
                }
            };
            for v in &self.shared {
                add(v, &mut [&mut *base, &mut *chat], &mut self.rng);
            }
            for v in &self.chat_only {
                add(v, &mut [&mut *chat], &mut self.rng);
            }
            for v in &self.base_only {
                add(v, &mut [&mut *base], &mut self.rng);
            }
        }
        Ok(Some(PairBatch { acts, batch: self.batch, d }))
    }
}
