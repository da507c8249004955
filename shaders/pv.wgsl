// pv.wgsl — three-pass attention, pass 3: O[b, i, h, :] = P[b, h, i, :] · V[b, :, h / group, :].
// Tiled 16x16 through workgroup memory over the key dimension. Keys at or past Lk_b load as 0, so
// whatever padding holds never reaches the output. One dispatch covers the keys
// [range.key_begin, range.key_end); where one invocation may not loop over every key (llvmpipe)
// the host splits the range over several dispatches, each adding its part to O in key order.

override V_DT: u32 = 0u;

@group(0) @binding(4) var<storage, read> probs: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<u32>; // tensor v

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

struct PvRange {
    key_begin: u32, // a multiple of 16
    key_end: u32,
    accumulate: u32, // 0: O = this part; 1: O += this part
    pad: u32,
}
@group(0) @binding(7) var<uniform> range: PvRange;

const TS: u32 = 16u;

var<workgroup> p_tile: array<array<f32, 17>, 16>;
var<workgroup> v_tile: array<array<f32, 17>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let tiles_d = (params.v_head_dim + TS - 1u) / TS;
    let tiles_i = (params.q_len + TS - 1u) / TS;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_d * tiles_i * params.batch * params.q_heads {
        return;
    }
    let td = flat % tiles_d;
    let ti = (flat / tiles_d) % tiles_i;
    let bh = flat / (tiles_d * tiles_i);
    let h = bh % params.q_heads;
    let b = bh / params.q_heads;
    let kvh = h / params.group;
    let i = ti * TS + lid.y;
    let d = td * TS + lid.x;
    let lk = kv_valid(b);
    let row = (b * params.q_heads + h) * params.q_len + i;

    let j_end = min(lk, range.key_end);
    var acc = 0.0;
    for (var j0 = range.key_begin; j0 < j_end; j0 += TS) {
        let jp = j0 + lid.x; // key column of P this thread loads
        var pv = 0.0;
        if i < params.q_len && jp < j_end {
            pv = probs[row * params.kv_len + jp];
        }
        let jv = j0 + lid.y; // key row of V this thread loads
        var vv = 0.0;
        if jv < j_end && d < params.v_head_dim {
            let idx = b * params.v_sb + jv * params.v_ss + kvh * params.v_sh + d;
            vv = load_v(idx);
        }
        p_tile[lid.y][lid.x] = pv;
        v_tile[lid.y][lid.x] = vv;
        workgroupBarrier();
        for (var jj = 0u; jj < TS; jj++) {
            // A hidden key (P = 0) adds nothing, even where V holds NaN or inf.
            let pj = p_tile[lid.y][jj];
            acc += select(0.0, pj * v_tile[jj][lid.x], !(pj == 0.0));
        }
        workgroupBarrier();
    }
    if i < params.q_len && d < params.v_head_dim {
        let o = b * params.o_sb + i * params.o_ss + h * params.o_sh + d;
        if range.accumulate != 0u {
            acc = out[o] + acc;
        }
        out[o] = acc;
    }
}
