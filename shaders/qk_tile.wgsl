// qk_tile.wgsl — the 16x16 tiled dot products q_i · k_j through workgroup memory, shared by the
// three-pass scores pass and the lens pass (which recomputes the same logits). The including
// kernel defines load_q / load_k and runs a 16x16 workgroup: lid.y picks the query row, lid.x
// the key column.

const TS: u32 = 16u;

var<workgroup> q_tile: array<array<f32, 17>, 16>;
var<workgroup> k_tile: array<array<f32, 17>, 16>;

// q_i · k_j of query row i (this thread's lid.y) and key j0 + lid.x of (b, h); kr = j0 + lid.y is
// the key row this thread stages. Has barriers: call it in uniform control flow.
fn qk_tile_dot(b: u32, h: u32, kvh: u32, i: u32, kr: u32, lid: vec3<u32>) -> f32 {
    var acc = 0.0;
    for (var d0 = 0u; d0 < params.head_dim; d0 += TS) {
        let d = d0 + lid.x;
        var qv = 0.0;
        if i < params.q_len && d < params.head_dim {
            qv = load_q(b * params.q_sb + i * params.q_ss + h * params.q_sh + d);
        }
        var kv = 0.0;
        if kr < params.kv_len && d < params.head_dim {
            kv = load_k(b * params.k_sb + kr * params.k_ss + kvh * params.k_sh + d);
        }
        q_tile[lid.y][lid.x] = qv;
        k_tile[lid.y][lid.x] = kv;
        workgroupBarrier();
        for (var dd = 0u; dd < TS; dd++) {
            acc += q_tile[lid.y][dd] * k_tile[lid.x][dd];
        }
        workgroupBarrier();
    }
    return acc;
}
