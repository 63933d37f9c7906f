// out[r, :] = Σ_{p ∈ [offsets[r], offsets[r+1])} coef[p] · table[index[p], :]
//
// The sparse decoder and its backward in one kernel: with segments = tokens, index = latents,
// coef = code values and table = W_dec it decodes the selected entries (ĥ without bias); with
// segments = latents (entries sorted by latent), index = tokens, it accumulates ∂L/∂W_dec
// (coef = codes, table = ∂L/∂ĥ) and ∂L/∂W_encᵀ (coef = ∂L/∂f, table = x). Only the selected
// entries' rows are read: k·B·w work instead of B·D·w. Each thread owns one output element, so no
// atomics are needed. Every binding is read_write (CubeCL may pool small buffers together).
//
// params: [rows, width]
@group(0) @binding(0) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(1) var<storage, read_write> index: array<i32>;
@group(0) @binding(2) var<storage, read_write> coef: array<f32>;
@group(0) @binding(3) var<storage, read_write> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let rows = params[0];
    let width = params[1];
    let total = rows * width;
    let stride = groups.x * {{ workgroup }}u;
    var e = gid.x;
    loop {
        if (e >= total) {
            break;
        }
        let r = e / width;
        let i = e % width;
        var acc = 0.0;
        for (var p = offsets[r]; p < offsets[r + 1u]; p = p + 1) {
            acc = acc + coef[p] * table[u32(index[p]) * width + i];
        }
        out[e] = acc;
        e = e + stride;
    }
}
