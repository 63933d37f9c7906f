// Per row (token) of the B×D scores: how many are above the selection threshold and how many equal
// it (ties; counted only when some are to be kept). One workgroup per row.
//
// state: as `radix_scan` leaves it ([5] threshold bits, [6] ties to keep).
// counts (out, u32): [2·row] above, [2·row + 1] equal. params: [b, d].
@group(0) @binding(0) var<storage, read_write> scores: array<f32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

var<workgroup> above_acc: atomic<u32>;
var<workgroup> equal_acc: atomic<u32>;

@compute @workgroup_size({{ workgroup }})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let b = params[0];
    let d = params[1];
    let thr = bitcast<f32>(state[5]);
    let ties = state[6] > 0u;
    for (var row = wid.x; row < b; row = row + groups.x) {
        if (lid.x == 0u) {
            atomicStore(&above_acc, 0u);
            atomicStore(&equal_acc, 0u);
        }
        workgroupBarrier();
        var above = 0u;
        var equal = 0u;
        for (var j = lid.x; j < d; j = j + {{ workgroup }}u) {
            let s = scores[row * d + j];
            if (s > thr) {
                above = above + 1u;
            } else if (ties && s == thr) {
                equal = equal + 1u;
            }
        }
        atomicAdd(&above_acc, above);
        atomicAdd(&equal_acc, equal);
        workgroupBarrier();
        if (lid.x == 0u) {
            counts[2u * row] = atomicLoad(&above_acc);
            counts[2u * row + 1u] = atomicLoad(&equal_acc);
        }
        workgroupBarrier();
    }
}
