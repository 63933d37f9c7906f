// AuxK's per-token selection: in each row of `scores` ([b, d], one workgroup per row), the `k`
// largest positive scores (ties kept by lower index, as the host's `select_aux`), found by the same
// three radix passes as the batch selection but over a workgroup-private histogram, then written in
// index order to the row's k slots; unused slots get latent d (out of range). A non-candidate has a
// score ≤ 0 (the caller masks them).
//
// out (i32): [b · k] latents. params: [b, d, k].
@group(0) @binding(0) var<storage, read_write> scores: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<i32>;
@group(0) @binding(2) var<storage, read_write> params: array<u32>;

var<workgroup> hist: array<atomic<u32>, 2048>;
var<workgroup> above_before: array<u32, {{ workgroup }}>;
var<workgroup> equal_before: array<u32, {{ workgroup }}>;
// [prefix, mask, remaining, above, take all positives]
var<workgroup> state: array<u32, 5>;

@compute @workgroup_size({{ workgroup }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let b = params[0];
    let d = params[1];
    let k = params[2];
    let chunk = (d + {{ workgroup }}u - 1u) / {{ workgroup }}u;
    let lo = min(lid.x * chunk, d);
    let hi = min(lo + chunk, d);
    for (var row = wid.x; row < b; row = row + groups.x) {
        let base = row * d;
        if (lid.x == 0u) {
            state[0] = 0u;
            state[1] = 0u;
            state[2] = k;
            state[3] = 0u;
            state[4] = 0u;
        }
        for (var round = 0u; round < 3u; round = round + 1u) {
            var shift = 21u;
            var bits = 11u;
            if (round == 1u) {
                shift = 10u;
            } else if (round == 2u) {
                shift = 0u;
                bits = 10u;
            }
            let bins = 1u << bits;
            for (var i = lid.x; i < 2048u; i = i + {{ workgroup }}u) {
                atomicStore(&hist[i], 0u);
            }
            workgroupBarrier();
            let prefix = state[0];
            let mask = state[1];
            if (state[4] == 0u) {
                for (var j = lid.x; j < d; j = j + {{ workgroup }}u) {
                    let s = scores[base + j];
                    if (s > 0.0) {
                        let v = bitcast<u32>(s);
                        if ((v & mask) == prefix) {
                            atomicAdd(&hist[(v >> shift) & (bins - 1u)], 1u);
                        }
                    }
                }
            }
            workgroupBarrier();
            if (lid.x == 0u && state[4] == 0u) {
                if (round == 0u) {
                    var total = 0u;
                    for (var i = 0u; i < bins; i = i + 1u) {
                        total = total + atomicLoad(&hist[i]);
                    }
                    if (total <= k) {
                        state[4] = 1u;
                    }
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
                        let c = atomicLoad(&hist[bin]);
                        if (c >= remaining) {
                            break;
                        }
                        remaining = remaining - c;
                        above = above + c;
                    }
                    state[0] = state[0] | (bin << shift);
                    state[1] = state[1] | ((bins - 1u) << shift);
                    state[2] = remaining;
                    state[3] = above;
                }
            }
            workgroupBarrier();
        }
        // The threshold (every positive score when they are at most k) and the ties to keep.
        var thr = 0.0;
        var take = 0u;
        if (state[4] == 0u) {
            thr = bitcast<f32>(state[0]);
            take = k - state[3];
        }
        var above = 0u;
        var equal = 0u;
        for (var j = lo; j < hi; j = j + 1u) {
            let s = scores[base + j];
            if (s > thr) {
                above = above + 1u;
            } else if (take > 0u && s == thr) {
                equal = equal + 1u;
            }
        }
        above_before[lid.x] = above;
        equal_before[lid.x] = equal;
        workgroupBarrier();
        if (lid.x == 0u) {
            var a = 0u;
            var e = 0u;
            for (var i = 0u; i < {{ workgroup }}u; i = i + 1u) {
                let na = above_before[i];
                let ne = equal_before[i];
                above_before[i] = a;
                equal_before[i] = e;
                a = a + na;
                e = e + ne;
            }
            // Unused slots: past the picks (the picks number min(k, positives)).
            let picks = a + min(e, take);
            for (var p = picks; p < k; p = p + 1u) {
                out[row * k + p] = i32(d);
            }
        }
        workgroupBarrier();
        var seen = equal_before[lid.x];
        var pos = above_before[lid.x] + min(seen, take);
        for (var j = lo; j < hi; j = j + 1u) {
            let s = scores[base + j];
            var picked = s > thr;
            if (!picked && take > 0u && s == thr) {
                picked = seen < take;
                seen = seen + 1u;
            }
            if (picked) {
                out[row * k + pos] = i32(j);
                pos = pos + 1u;
            }
        }
        workgroupBarrier();
    }
}
