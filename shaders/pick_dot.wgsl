// out[p] = Σ_i a[ia[p], i] · b[ib[p], i]   (∂L/∂f for each selected entry: W_dec row · ∂L/∂ĥ row)
// Every binding is read_write (CubeCL may pool small buffers together).
//
// params: [n, width]
@group(0) @binding(0) var<storage, read_write> ia: array<i32>;
@group(0) @binding(1) var<storage, read_write> ib: array<i32>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = params[0];
    let width = params[1];
    let stride = groups.x * {{ workgroup }}u;
    var p = gid.x;
    loop {
        if (p >= n) {
            break;
        }
        let ra = u32(ia[p]) * width;
        let rb = u32(ib[p]) * width;
        var acc = 0.0;
        for (var i = 0u; i < width; i = i + 1u) {
            acc = acc + a[ra + i] * b[rb + i];
        }
        out[p] = acc;
        p = p + stride;
    }
}
