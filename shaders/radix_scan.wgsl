// One step of the device-side radix select (BatchTopK's k·B-th largest score, no readback): after
// each `score_histogram` pass, one thread walks the bins from the largest down until the k-th
// largest falls inside, and fixes that bin's bits in the prefix the next pass reads. The host
// version is `kernels::kth_largest`; `select_batch_topk` is the reference.
//
// state (u32): [0] prefix, [1] prefix mask, [2] scores still to locate, [3] scores strictly above
// the prefix, [4] 1 when at most `keep` scores are positive (keep them all), [5] the threshold's
// bits (0: keep every positive score), [6] how many scores equal to the threshold to keep.
// params: [bins, shift, bits, first pass, keep, last pass].
@group(0) @binding(0) var<storage, read_write> hist: array<u32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x != 0u) {
        return;
    }
    let bins = params[0];
    let keep = params[4];
    if (params[3] == 1u) {
        var total = 0u;
        for (var b = 0u; b < bins; b = b + 1u) {
            total = total + hist[b];
        }
        state[0] = 0u;
        state[1] = 0u;
        state[2] = keep;
        state[3] = 0u;
        state[4] = select(0u, 1u, total <= keep);
        state[5] = 0u;
        state[6] = 0u;
    }
    if (state[4] == 0u) {
        var remaining = state[2];
        var above = state[3];
        var bin = bins;
        loop {
            if (bin == 0u) {
                break;
            }
            bin = bin - 1u;
            let c = hist[bin];
            if (c >= remaining) {
                break;
            }
            remaining = remaining - c;
            above = above + c;
        }
        state[0] = state[0] | (bin << params[1]);
        state[1] = state[1] | (((1u << params[2]) - 1u) << params[1]);
        state[2] = remaining;
        state[3] = above;
    }
    if (params[5] == 1u && state[4] == 0u) {
        state[5] = state[0];
        state[6] = keep - state[3];
    }
}
