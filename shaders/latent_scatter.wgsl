// Counting sort by latent, step 3: each pick's index goes into its latent's segment (the order
// inside a segment is fixed afterwards by `segment_sort`). Slots past the last sorted entry get 0
// (never read: they lie past every segment).
//
// out (i32): [0..=d] offsets (from `exclusive_scan`), then the order [n] at d + 1;
// cursor (u32, zeroed): [d]. params: [n, d]
@group(0) @binding(0) var<storage, read_write> latents: array<i32>;
@group(0) @binding(1) var<storage, read_write> out: array<i32>;
@group(0) @binding(2) var<storage, read_write> cursor: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = params[0];
    let d = params[1];
    let total = u32(out[d]);
    let order = d + 1u;
    let stride = groups.x * {{ workgroup }}u;
    for (var p = gid.x; p < n; p = p + stride) {
        let l = latents[p];
        if (l >= 0 && u32(l) < d) {
            let at = u32(out[u32(l)]) + atomicAdd(&cursor[u32(l)], 1u);
            out[order + at] = i32(p);
        }
        if (p >= total) {
            out[order + p] = 0;
        }
    }
}
