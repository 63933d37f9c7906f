// Where each row's picks start in the compacted pick list, and how many of its ties it keeps: ties
// are kept in position order (the first rows' first), as the host selection keeps them. One thread.
//
// out (i32): [0..=b] the row offsets (out[b] = picks in all); eq_take (u32): [row] ties kept.
// params: [b].
@group(0) @binding(0) var<storage, read_write> counts: array<u32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<i32>;
@group(0) @binding(3) var<storage, read_write> eq_take: array<u32>;
@group(0) @binding(4) var<storage, read_write> params: array<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x != 0u) {
        return;
    }
    let b = params[0];
    var need = state[6];
    var run = 0u;
    for (var t = 0u; t < b; t = t + 1u) {
        let e = min(counts[2u * t + 1u], need);
        need = need - e;
        eq_take[t] = e;
        out[t] = i32(run);
        run = run + counts[2u * t] + e;
    }
    out[b] = i32(run);
}
