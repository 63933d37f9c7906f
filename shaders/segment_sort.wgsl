// Counting sort by latent, step 4: each latent's segment sorted by pick index (insertion sort, one
// thread per latent), so the order — and every sum over a segment — is the same on every run.
//
// out (i32): [0..=d] offsets, then the order at d + 1. params: [d]
@group(0) @binding(0) var<storage, read_write> out: array<i32>;
@group(0) @binding(1) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let d = params[0];
    let stride = groups.x * {{ workgroup }}u;
    for (var l = gid.x; l < d; l = l + stride) {
        let lo = d + 1u + u32(out[l]);
        let hi = d + 1u + u32(out[l + 1u]);
        for (var i = lo + 1u; i < hi; i = i + 1u) {
            let v = out[i];
            var j = i;
            loop {
                if (j <= lo || out[j - 1u] <= v) {
                    break;
                }
                out[j] = out[j - 1u];
                j = j - 1u;
            }
            out[j] = v;
        }
    }
}
