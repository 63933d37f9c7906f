//! The readback and dispatch counters (`crossdiff bench … --counters`): they count what happens.
//! One test in its own binary: both counters are process-wide, so no other test may run beside it.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use crossdiff::counters::{Counting, read_f32, read_i64};
use crossdiff::crosscoder::Kind;
use crossdiff::crosscoder::sae::SaeTarget;
use crossdiff::crosscoder::train::TrainConfig;

#[test]
fn counters_count_readbacks_and_kernel_dispatches() {
    let flex = Device::flex();
    let counting = Counting::start();
    let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &flex);
    assert_eq!(read_f32(t.clone().mul_scalar(2.0)).unwrap(), vec![2.0, 4.0, 6.0]);
    let i = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, 5], [2]), &flex);
    assert_eq!(read_i64(i).unwrap(), vec![4, 5]);
    assert_eq!(counting.readbacks(), 2);
    // burn flex runs no GPU kernels.
    assert_eq!(counting.dispatches(), 0);
    drop(counting);

    // Caching reads each forward batch's block output back exactly once (issue 12's target).
    let fixture = common::fixture("base").parent().unwrap().to_path_buf();
    let r = crossdiff::bench::bench_cache(&flex, &fixture.join("base"), &fixture.join("chat"), 1, 3000, 64, 256, &[])
        .unwrap();
    assert_eq!(r.tokens, 3000);
    assert!(r.forward_batches >= 2 * 3000 / 256, "both models, batches of at most 256 tokens: {}", r.forward_batches);
    assert_eq!(r.readbacks_per_batch, 1.0, "readbacks per forward batch");
    // `bench cache --data`: the user's files (short documents, packed into shared rows), the same
    // one readback per batch; a missing file is named, not replaced by generated text.
    let data = common::data("web.txt").parent().unwrap().to_path_buf();
    let files = [data.join("web.txt"), data.join("chat.jsonl")];
    let r = crossdiff::bench::bench_cache(&flex, &fixture.join("base"), &fixture.join("chat"), 1, 600, 64, 256, &files)
        .unwrap();
    assert_eq!(r.tokens, 600);
    assert_eq!(r.readbacks_per_batch, 1.0, "readbacks per packed forward batch");
    let missing = data.join("no-such-file.txt");
    let err = crossdiff::bench::bench_cache(
        &flex,
        &fixture.join("base"),
        &fixture.join("chat"),
        1,
        600,
        64,
        256,
        &[missing.clone()],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("no-such-file.txt"), "{err:#}");

    // analyze reads each batch's statistics back once (issue 12's target), plus a few reads at the
    // end (the decoder for Latent Scaling), spread over the batches here.
    let r = crossdiff::bench::bench_analyze(&flex, 16, 64, 4, 8192, 0.4).unwrap();
    assert!(
        (1.0..=1.1).contains(&r.readbacks_per_batch),
        "analyze readbacks per batch of 256: {}",
        r.readbacks_per_batch
    );

    // Training on the CPU reads its host bookkeeping (the host route: reads are copies there).
    let r = crossdiff::bench::bench_train(&flex, &[], Kind::BatchTopK, 64, 1024, 8, 256, 5).unwrap();
    assert!(r.readbacks_per_step <= 7.0, "training readbacks per step on cpu: {}", r.readbacks_per_step);

    let Some(wgpu) = common::wgpu_device() else { return };
    // On wgpu, training reads nothing back between log steps (issue 12's target): the benchmark
    // logs once, at its last step, so 5 steps read back once in all.
    let r = crossdiff::bench::bench_train(&wgpu, &[], Kind::BatchTopK, 64, 1024, 8, 256, 5).unwrap();
    assert_eq!(r.readbacks_per_step, 1.0 / 5.0, "training readbacks per step on wgpu");
    // With AuxK running (dead latents), for every kind: one read per log step, none between.
    for kind in [Kind::BatchTopK, Kind::Sae, Kind::L1] {
        let batch = 64;
        let cfg = TrainConfig {
            k: 3,
            steps: 24,
            dead_tokens: 4 * batch as u64,
            checkpoint_every: 0,
            log_every: 6,
            target: (kind == Kind::Sae).then_some(SaeTarget::ChatMinusBase),
            ..TrainConfig::defaults(kind, 96)
        };
        let dir = common::TempDir::new("counters-train");
        let mut src = common::planted::Planted::new(16, [6, 3, 2], 11, batch, 1000);
        let mut run = common::train_run(dir.path().join("run"), cfg, &mut src, 16);
        run.device = wgpu.clone();
        let counting = Counting::start();
        let mut at_log = Vec::new();
        run.run(|_| at_log.push(counting.readbacks()), || true).unwrap();
        let between: Vec<u64> = at_log.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(between, vec![1, 1, 1], "{kind:?}: readbacks from one log step to the next");
    }
    let counting = Counting::start();
    let offsets = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 3], [3]), &wgpu);
    let index = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0, 1], [3]), &wgpu);
    let coef = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &wgpu);
    let table = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 10.0, 100.0, 1000.0], [2, 2]), &wgpu);
    let out = read_f32(crossdiff::crosscoder::kernels::segment_rows(&offsets, &index, &coef, &table)).unwrap();
    // Row 0: 1·table[1]; row 1: 2·table[0] + 3·table[1].
    assert_eq!(out, vec![100.0, 1000.0, 302.0, 3020.0]);
    assert_eq!(counting.readbacks(), 1);
    // The segment_rows kernel at least (uploads and the layout copies may add more).
    assert!(counting.dispatches() >= 1, "no kernel dispatch counted");
}
