// backward_kv.wgsl — dK and dV (FlashAttention-2's backward, key-tile side).
//
// One workgroup owns BK keys of one (batch, key/value head) and keeps their K and V rows in
// workgroup memory and their dK, dV rows in registers (TPR threads per key, each owning columns
// t, t+TPR, ...). It streams BQ-row tiles of Q and dO of every query head of the group over the
// query rows that can see any of its keys (causal/window tiles skipped), recomputes P from the
// logits and the forward's LSE (no Lq×Lk buffer), and accumulates dV += Pᵀ·dO and
// dK += gᵀ·Q in a fixed order: no atomics, bit-for-bit deterministic. Keys a row cannot see add
// nothing, whatever the row holds (no 0·NaN).

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override BQ: u32 = 16u;
override BK: u32 = 32u;
override TPR: u32 = 8u;

const MAX_COLS: u32 = 32u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(7) var<storage, read> dout: array<u32>;
// [dK in K's layout][dV in V's layout at range.dv_offset], f32.
@group(0) @binding(8) var<storage, read_write> dkv: array<f32>;

var<workgroup> k_s: array<f32, BK * HEAD_DIM>;
var<workgroup> v_s: array<f32, BK * V_DIM>;
var<workgroup> q_s: array<f32, BQ * HEAD_DIM>;
var<workgroup> do_s: array<f32, BQ * V_DIM>;
// P of (key, query) or -1 where the key is not visible to the query; g likewise.
var<workgroup> p_s: array<f32, BK * BQ>;
var<workgroup> g_s: array<f32, BK * BQ>;
var<workgroup> lse_s: array<f32, BQ>;
var<workgroup> delta_s: array<f32, BQ>;

@compute @workgroup_size(BK * TPR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let nthreads = BK * TPR;
    let tiles_k = (params.kv_len + BK - 1u) / BK;
    let units = params.batch * params.kv_heads;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_k * units {
        return;
    }
    let tk = flat % tiles_k;
    let unit = flat / tiles_k;
    let b = unit / params.kv_heads;
    let kvh = unit % params.kv_heads;
    let r = lid / TPR;
    let t = lid % TPR;
    let j0 = tk * BK;
    let j = j0 + r;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();

    for (var x = lid; x < BK * HEAD_DIM; x += nthreads) {
        let jj = j0 + x / HEAD_DIM;
        var val = 0.0;
        if jj < lk {
            val = load_k(b * params.k_sb + jj * params.k_ss + kvh * params.k_sh + x % HEAD_DIM);
        }
        k_s[x] = val;
    }
    for (var x = lid; x < BK * V_DIM; x += nthreads) {
        let jj = j0 + x / V_DIM;
        var val = 0.0;
        if jj < lk {
            val = load_v(b * params.v_sb + jj * params.v_ss + kvh * params.v_sh + x % V_DIM);
        }
        v_s[x] = val;
    }

    let ncols_k = (HEAD_DIM + TPR - 1u) / TPR;
    let ncols_v = (V_DIM + TPR - 1u) / TPR;
    var dk_acc: array<f32, MAX_COLS>;
    var dv_acc: array<f32, MAX_COLS>;
    for (var c = 0u; c < ncols_k; c++) {
        dk_acc[c] = 0.0;
    }
    for (var c = 0u; c < ncols_v; c++) {
        dv_acc[c] = 0.0;
    }

    // Query tiles that can see any key of this tile, within this dispatch's range.
    let band = visible_query_range(j0, j0 + BK - 1u, lq, lk, off);
    let t_lo = max(u32(band.x) / BQ, range.begin);
    let t_hi = min((u32(band.y) + BQ - 1u) / BQ, range.end);
    for (var g = 0u; g < params.group; g++) {
        let h = kvh * params.group + g;
        for (var tq = t_lo; tq < t_hi; tq++) {
            let i0 = tq * BQ;
            workgroupBarrier(); // everyone is done with the previous tile
            let row0 = (b * params.q_heads + h) * params.q_len + i0;
            for (var x = lid; x < BQ; x += nthreads) {
                var l = ninf;
                var dl = 0.0;
                if i0 + x < lq {
                    l = row_lse(row0 + x);
                    dl = row_delta(row0 + x);
                }
                lse_s[x] = l;
                delta_s[x] = dl;
            }
            for (var x = lid; x < BQ * HEAD_DIM; x += nthreads) {
                let ii = i0 + x / HEAD_DIM;
                var val = 0.0;
                if ii < lq {
                    val = load_q(b * params.q_sb + ii * params.q_ss + h * params.q_sh + x % HEAD_DIM);
                }
                q_s[x] = val;
            }
            for (var x = lid; x < BQ * V_DIM; x += nthreads) {
                let ii = i0 + x / V_DIM;
                var val = 0.0;
                // dO of rows that pass nothing on (padding, nothing visible) is never read.
                if ii < lq && !(row_lse(row0 + x / V_DIM) == ninf) {
                    let idx = b * params.o_sb + ii * params.o_ss + h * params.o_sh + x % V_DIM;
                    val = elem_value(dout[elem_word(idx, DO_DT)], idx, DO_DT);
                }
                do_s[x] = val;
            }
            workgroupBarrier();

            for (var qi = t; qi < BQ; qi += TPR) {
                let i = i0 + qi;
                var pg = vec3<f32>(-1.0, 0.0, 0.0);
                let lse = lse_s[qi];
                if j < lk && i < lq && !(lse == ninf) && visible(b, h, i, j, off, lk) {
                    var dot = 0.0;
                    for (var d = 0u; d < HEAD_DIM; d++) {
                        dot += q_s[qi * HEAD_DIM + d] * k_s[r * HEAD_DIM + d];
                    }
                    var dp = 0.0;
                    for (var d = 0u; d < V_DIM; d++) {
                        dp += do_s[qi * V_DIM + d] * v_s[r * V_DIM + d];
                    }
                    pg = logit_grad(b, h, i, j, off, dot, dp, lse, delta_s[qi]);
                }
                p_s[r * BQ + qi] = pg.x;
                g_s[r * BQ + qi] = pg.z;
            }
            workgroupBarrier();

            for (var c = 0u; c < ncols_v; c++) {
                let d = t + c * TPR;
                if d >= V_DIM {
                    break;
                }
                var a = dv_acc[c];
                for (var qi = 0u; qi < BQ; qi++) {
                    let p = p_s[r * BQ + qi];
                    a += select(0.0, p * do_s[qi * V_DIM + d], !(p < 0.0));
                }
                dv_acc[c] = a;
            }
            for (var c = 0u; c < ncols_k; c++) {
                let d = t + c * TPR;
                if d >= HEAD_DIM {
                    break;
                }
                var a = dk_acc[c];
                for (var qi = 0u; qi < BQ; qi++) {
                    let p = p_s[r * BQ + qi];
                    a += select(0.0, g_s[r * BQ + qi] * q_s[qi * HEAD_DIM + d], !(p < 0.0));
                }
                dk_acc[c] = a;
            }
        }
    }

    if j < params.kv_len {
        let kb = b * params.k_sb + j * params.k_ss + kvh * params.k_sh;
        for (var c = 0u; c < ncols_k; c++) {
            let d = t + c * TPR;
            if d >= HEAD_DIM {
                break;
            }
            var val = dk_acc[c];
            if range.accumulate != 0u {
                val = dkv[kb + d] + val;
            }
            dkv[kb + d] = val;
        }
        let vb = range.dv_offset + b * params.v_sb + j * params.v_ss + kvh * params.v_sh;
        for (var c = 0u; c < ncols_v; c++) {
            let d = t + c * TPR;
            if d >= V_DIM {
                break;
            }
            var val = dv_acc[c];
            if range.accumulate != 0u {
                val = dkv[vb + d] + val;
            }
            dkv[vb + d] = val;
        }
    }
}
