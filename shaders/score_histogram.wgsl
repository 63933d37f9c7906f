// Histogram of positive f32 scores by a bit field of their IEEE-754 pattern (for non-negative
// floats the u32 pattern orders like the value), restricted to scores whose higher bits equal
// `prefix` under `prefix_mask`. Three passes (11, 11 and 10 bits) find the k-th largest score of a
// batch exactly: the threshold search of BatchTopK's batch-global top k·B selection.
//
// state: [prefix, prefix_mask, ...] (read from a buffer, so that `radix_scan` can choose the next
// pass's prefix on the device); params: [n, shift, bin_mask]. Every binding is read_write: CubeCL
// may place small buffers in one pooled allocation, and wgpu refuses read-only and read-write uses
// of one buffer in the same dispatch.
@group(0) @binding(0) var<storage, read_write> scores: array<f32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = params[0];
    let prefix = state[0];
    let prefix_mask = state[1];
    let stride = groups.x * {{ workgroup }}u;
    var i = gid.x;
    loop {
        if (i >= n) {
            break;
        }
        let s = scores[i];
        if (s > 0.0) {
            let bits = bitcast<u32>(s);
            if ((bits & prefix_mask) == prefix) {
                atomicAdd(&hist[(bits >> params[1]) & params[2]], 1u);
            }
        }
        i = i + stride;
    }
}
