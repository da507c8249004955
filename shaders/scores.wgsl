// scores.wgsl — three-pass attention, pass 1: S[b, h, i, j] = logit (or -inf when invisible).
// The dot products come from qk_tile.wgsl (16x16 tiles through workgroup memory).

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;


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

    let acc = qk_tile_dot(b, h, kvh, i, kr, lid);

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
