// BatchTopK's picks, compacted in position order (token-major, as the host's mask lists them): for
// each row (one workgroup), the entries above the threshold and its first `eq_take[row]` ties are
// written at the row's offset as (token, latent), and counted per latent. Slots past the last pick
// (fewer positive scores than k·B) get token b − 1 and latent d: out of range, so the latent
// segments leave them out; a gather clamps it).
//
// out (i32): [0..=b] row offsets (from `row_offsets`), then `keep` tokens, `keep` latents and `d`
// per-latent counts (zeroed). params: [b, d, keep].
@group(0) @binding(0) var<storage, read_write> scores: array<f32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<atomic<i32>>;
@group(0) @binding(3) var<storage, read_write> eq_take: array<u32>;
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

var<workgroup> above_before: array<u32, {{ workgroup }}>;
var<workgroup> equal_before: array<u32, {{ workgroup }}>;

@compute @workgroup_size({{ workgroup }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let b = params[0];
    let d = params[1];
    let keep = params[2];
    let tokens = b + 1u;
    let latents = tokens + keep;
    let per_latent = latents + keep;
    let thr = bitcast<f32>(state[5]);
    let ties = state[6] > 0u;
    let chunk = (d + {{ workgroup }}u - 1u) / {{ workgroup }}u;
    let lo = min(lid.x * chunk, d);
    let hi = min(lo + chunk, d);
    for (var row = wid.x; row < b; row = row + groups.x) {
        let base = row * d;
        var above = 0u;
        var equal = 0u;
        for (var j = lo; j < hi; j = j + 1u) {
            let s = scores[base + j];
            if (s > thr) {
                above = above + 1u;
            } else if (ties && s == thr) {
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
        }
        workgroupBarrier();
        let take = eq_take[row];
        var seen = equal_before[lid.x];
        var pos = u32(atomicLoad(&out[row])) + above_before[lid.x] + min(seen, take);
        for (var j = lo; j < hi; j = j + 1u) {
            let s = scores[base + j];
            var picked = s > thr;
            if (!picked && ties && s == thr) {
                picked = seen < take;
                seen = seen + 1u;
            }
            if (picked) {
                atomicStore(&out[tokens + pos], i32(row));
                atomicStore(&out[latents + pos], i32(j));
                atomicAdd(&out[per_latent + j], 1);
                pos = pos + 1u;
            }
        }
        workgroupBarrier();
    }
    // Empty slots (fewer picks than keep).
    let n = u32(atomicLoad(&out[b]));
    let threads = groups.x * {{ workgroup }}u;
    for (var p = wid.x * {{ workgroup }}u + lid.x; p < keep; p = p + threads) {
        if (p >= n) {
            atomicStore(&out[tokens + p], i32(b - 1u));
            atomicStore(&out[latents + p], i32(d));
        }
    }
}
