// Counting sort of a pick set by latent, step 1: how many picks each latent has. Entries whose
// latent is outside 0..d (empty slots carry d) are left out.
//
// params: [n, d]
@group(0) @binding(0) var<storage, read_write> latents: array<i32>;
@group(0) @binding(1) var<storage, read_write> counts: array<atomic<u32>>;
@group(0) @binding(2) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = params[0];
    let d = params[1];
    let stride = groups.x * {{ workgroup }}u;
    for (var p = gid.x; p < n; p = p + stride) {
        let l = latents[p];
        if (l >= 0 && u32(l) < d) {
            atomicAdd(&counts[u32(l)], 1u);
        }
    }
}
