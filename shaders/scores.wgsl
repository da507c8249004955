// scores.wgsl — three-pass attention, pass 1: S[b, h, i, j] = logit (or -inf when invisible).
// Tiled 16x16 through workgroup memory over the head dimension.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;

const TS: u32 = 16u;

var<workgroup> q_tile: array<array<f32, 17>, 16>;
var<workgroup> k_tile: array<array<f32, 17>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let tiles_j = (params.kv_len + TS - 1u) / TS;
    let tiles_i = (params.q_len + TS - 1u) / TS;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_j * tiles_i * params.batch * params.q_heads {
        return;
    }
    let tj = flat % tiles_j;
    let ti = (flat / tiles_j) % tiles_i;
    let bh = flat / (tiles_j * tiles_i);
    let h = bh % params.q_heads;
    let b = bh / params.q_heads;
    let kvh = h / params.group;
    let i = ti * TS + lid.y;
    let j = tj * TS + lid.x;
    let kr = tj * TS + lid.y; // key row this thread loads

    var acc = 0.0;
    for (var d0 = 0u; d0 < params.head_dim; d0 += TS) {
        let d = d0 + lid.x;
        var qv = 0.0;
        if i < params.q_len && d < params.head_dim {
            let idx = b * params.q_sb + i * params.q_ss + h * params.q_sh + d;
            qv = load_q(idx);
        }
        var kv = 0.0;
        if kr < params.kv_len && d < params.head_dim {
            let idx = b * params.k_sb + kr * params.k_ss + kvh * params.k_sh + d;
            kv = load_k(idx);
        }
        q_tile[lid.y][lid.x] = qv;
        k_tile[lid.y][lid.x] = kv;
        workgroupBarrier();
        for (var dd = 0u; dd < TS; dd++) {
            acc += q_tile[lid.y][dd] * k_tile[lid.x][dd];
        }
        workgroupBarrier();
    }

    if i < params.q_len && j < params.kv_len {
        let lq = q_valid(b);
        let lk = kv_valid(b);
        let off = i32(lk) - i32(lq);
        var s = neg_inf();
        if i < lq && visible(b, h, i, j, off, lk) {
            s = finish_logit(b, h, i, j, off, acc);
        }
        scores[((b * params.q_heads + h) * params.q_len + i) * params.kv_len + j] = s;
    }
}
