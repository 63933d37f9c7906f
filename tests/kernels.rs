//! WGSL kernels against their plain references, on the CI driver (Mesa lavapipe).

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use crossdiff::crosscoder::select_batch_topk;
use crossdiff::generate::SplitMix64;
use crossdiff::kernels::kth_largest;

#[test]
fn histogram_select_finds_the_same_threshold_as_the_reference() {
    let Some(device) = common::wgpu_device() else { return };
    let mut rng = SplitMix64(21);
    for &(n, keep, zeros, tie_levels) in &[(5000usize, 300usize, 0.3, 0u32), (20_000, 1234, 0.5, 16), (777, 5, 0.9, 3), (4096, 4000, 0.0, 0)] {
        // Scores like norm-weighted ReLU codes: many zeros, positive values over a wide range, and
        // optionally a few exactly repeated levels (ties).
        let scores: Vec<f32> = (0..n)
            .map(|_| {
                let u = rng.next_f64();
                if u < zeros {
                    0.0
                } else if tie_levels > 0 && u < zeros + 0.2 {
                    (1 + rng.next_u64() % tie_levels as u64) as f32 * 0.125
                } else {
                    (rng.next_f64() * 10.0).exp() as f32 * 1e-3
                }
            })
            .collect();
        let t = Tensor::<1>::from_data(TensorData::new(scores.clone(), [n]), (&device, DType::F32));
        let got = kth_largest(&t, keep).unwrap();
        let (mask, min_kept) = select_batch_topk(&scores, keep);
        let positive = scores.iter().filter(|&&s| s > 0.0).count();
        if positive <= keep {
            assert_eq!(got, None, "n={n}: every positive score is kept");
            continue;
        }
        let (threshold, above) = got.expect("more positive scores than keep");
        assert_eq!(Some(threshold), min_kept, "n={n} keep={keep}: the keep-th largest score");
        assert_eq!(above, scores.iter().filter(|&&s| s > threshold).count());
        // Entries above the threshold plus the first ties reproduce the reference mask.
        let mut ties = keep - above;
        let device_mask: Vec<f32> = scores
            .iter()
            .map(|&s| {
                if s > threshold {
                    1.0
                } else if s == threshold && ties > 0 {
                    ties -= 1;
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(device_mask, mask);
    }
}
