// Counting sort by latent, step 2: segment offsets from the counts, in one workgroup (each thread
// scans a contiguous chunk; a serial pass over the 256 chunk sums joins them). out[d] is the total.
//
// counts (u32): [d]; out (i32): [0..=d] offsets. params: [d]
@group(0) @binding(0) var<storage, read_write> counts: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<i32>;
@group(0) @binding(2) var<storage, read_write> params: array<u32>;

var<workgroup> chunk_sum: array<u32, {{ workgroup }}>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if (wid.x != 0u) {
        return;
    }
    let d = params[0];
    let chunk = (d + {{ workgroup }}u - 1u) / {{ workgroup }}u;
    let lo = min(lid.x * chunk, d);
    let hi = min(lo + chunk, d);
    var sum = 0u;
    for (var i = lo; i < hi; i = i + 1u) {
        sum = sum + counts[i];
    }
    chunk_sum[lid.x] = sum;
    workgroupBarrier();
    if (lid.x == 0u) {
        var run = 0u;
        for (var i = 0u; i < {{ workgroup }}u; i = i + 1u) {
            let s = chunk_sum[i];
            chunk_sum[i] = run;
            run = run + s;
        }
        out[d] = i32(run);
    }
    workgroupBarrier();
    var run = chunk_sum[lid.x];
    for (var i = lo; i < hi; i = i + 1u) {
        out[i] = i32(run);
        run = run + counts[i];
    }
}
