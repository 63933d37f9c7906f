//! `bench train --phases`: the per-phase view of a training step (its own test binary: recording
//! is process-wide).

use crossdiff::phases;

#[test]
fn the_phases_of_a_step_add_up_and_carry_the_transfers_bytes() {
    let flex = burn::tensor::Device::flex();
    let steps = 4;
    phases::enable();
    let r = crossdiff::bench::bench_train(&flex, &[], crossdiff::crosscoder::Kind::BatchTopK, 32, 512, 8, 256, steps)
        .unwrap();
    phases::disable();
    let names: Vec<&str> = r.phases.iter().map(|p| p.name).collect();
    for want in [
        "encoder forward",
        "selection",
        "sparse decode",
        "loss/backward",
        "AuxK",
        "gradient assembly",
        "clip",
        "optimizer",
    ] {
        let p = r.phases.iter().find(|p| p.name == want).unwrap_or_else(|| panic!("no phase {want}: {names:?}"));
        assert_eq!(p.calls, steps, "{want}: once per timed step (the warm-up steps left out)");
    }
    // The phases lie inside the timed window: together they take no longer than it.
    let window = r.seconds_per_step * steps as f64;
    let inside: f64 = r.phases.iter().filter(|p| !phases::is_transfers(p)).map(|p| p.seconds).sum();
    assert!(inside > 0.0 && inside <= window * 1.001, "phases {inside} s of a {window} s window");
    // Transfers: the encoder's input upload and codes readback among them, and each transfer's bytes
    // charged to the phase it happened in (or to none, between phases).
    let transfers = r.phases.iter().find(|p| phases::is_transfers(p)).expect("transfers");
    let charged: u64 = r.phases.iter().filter(|p| !phases::is_transfers(p)).map(|p| p.bytes).sum();
    assert!(charged <= transfers.bytes, "{charged} charged of {} moved", transfers.bytes);
    let encoder = r.phases.iter().find(|p| p.name == "encoder forward").unwrap();
    // Per step the encoder reads back the B×D codes in f32 (the norm sums come from the decoder,
    // read in place on the CPU).
    assert_eq!(encoder.bytes, steps * 4 * 256 * 512, "the encoder's readbacks");
    // Off again: nothing more is recorded.
    let before = phases::take();
    crossdiff::bench::bench_train(&flex, &[], crossdiff::crosscoder::Kind::BatchTopK, 32, 512, 8, 256, 2).unwrap();
    assert_eq!(phases::take(), Vec::new(), "bench_train resets the table at its window; off, it stays empty");
    assert!(!before.is_empty());
}
