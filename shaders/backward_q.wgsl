// backward_q.wgsl — dQ (FlashAttention-2's backward, query-tile side), without atomics.
//
// One workgroup owns BQ query rows of one (batch, query head), keeps their Q and dO rows in
// workgroup memory and their dQ rows in registers (TPR threads per row), and streams BK-key tiles
// of K and V over the keys its rows can see (causal/window tiles skipped). It recomputes P and
// the logit gradient as the key/value pass does and accumulates dQ += g·K in a fixed order. With
// WRITE_DS it also writes the logit gradient dS of every visible (row, key) for dBias (the
// buffer is cleared first, so what no row sees stays 0).

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override BQ: u32 = 16u;
override BK: u32 = 32u;
override TPR: u32 = 8u;
override WRITE_DS: bool = false;

const MAX_COLS: u32 = 32u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(7) var<storage, read> dout: array<u32>;
// [dQ in Q's layout][with WRITE_DS: dS as [B, Hq, Lq, Lk] from range.dv_offset], f32.
@group(0) @binding(8) var<storage, read_write> dqs: array<f32>;

var<workgroup> q_s: array<f32, BQ * HEAD_DIM>;
var<workgroup> do_s: array<f32, BQ * V_DIM>;
var<workgroup> k_s: array<f32, BK * HEAD_DIM>;
var<workgroup> v_s: array<f32, BK * V_DIM>;
// g of (row, key), and P or -1 where the key is not visible to the row.
var<workgroup> p_s: array<f32, BQ * BK>;
var<workgroup> g_s: array<f32, BQ * BK>;

@compute @workgroup_size(BQ * TPR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let nthreads = BQ * TPR;
    let tiles_i = (params.q_len + BQ - 1u) / BQ;
    let units = params.batch * params.q_heads;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_i * units {
        return;
    }
    let ti = flat % tiles_i;
    let unit = flat / tiles_i;
    let b = unit / params.q_heads;
    let h = unit % params.q_heads;
    let kvh = h / params.group;
    let r = lid / TPR;
    let t = lid % TPR;
    let i0 = ti * BQ;
    let i = i0 + r;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let row = (b * params.q_heads + h) * params.q_len + i;
    var lse = ninf;
    var delta = 0.0;
    if i < lq {
        lse = row_lse(row);
        delta = row_delta(row);
    }
    let live = i < lq && !(lse == ninf);

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
        if ii < lq && !(row_lse((b * params.q_heads + h) * params.q_len + ii) == ninf) {
            let idx = b * params.o_sb + ii * params.o_ss + h * params.o_sh + x % V_DIM;
            val = elem_value(dout[elem_word(idx, DO_DT)], idx, DO_DT);
        }
        do_s[x] = val;
    }

    let ncols = (HEAD_DIM + TPR - 1u) / TPR;
    var acc: array<f32, MAX_COLS>;
    for (var c = 0u; c < ncols; c++) {
        acc[c] = 0.0;
    }

    let band = visible_key_range(i0, min(i0 + BQ, params.q_len) - 1u, lq, lk, off);
    let t_lo = max(u32(band.x) / BK, range.begin);
    let t_hi = min((u32(band.y) + BK - 1u) / BK, range.end);
    for (var tk = t_lo; tk < t_hi; tk++) {
        let j0 = tk * BK;
        workgroupBarrier();
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
        workgroupBarrier();

        for (var kk = t; kk < BK; kk += TPR) {
            let j = j0 + kk;
            var pg = vec3<f32>(-1.0, 0.0, 0.0);
            if live && visible(b, h, i, j, off, lk) {
                var dot = 0.0;
                for (var d = 0u; d < HEAD_DIM; d++) {
                    dot += q_s[r * HEAD_DIM + d] * k_s[kk * HEAD_DIM + d];
                }
                var dp = 0.0;
                for (var d = 0u; d < V_DIM; d++) {
                    dp += do_s[r * V_DIM + d] * v_s[kk * V_DIM + d];
                }
                pg = logit_grad(b, h, i, j, off, dot, dp, lse, delta);
                if WRITE_DS {
                    dqs[range.dv_offset + row * params.kv_len + j] = pg.y;
                }
            }
            p_s[r * BK + kk] = pg.x;
            g_s[r * BK + kk] = pg.z;
        }
        workgroupBarrier();

        for (var c = 0u; c < ncols; c++) {
            let d = t + c * TPR;
            if d >= HEAD_DIM {
                break;
            }
            var a = acc[c];
            for (var kk = 0u; kk < BK; kk++) {
                let p = p_s[r * BK + kk];
                a += select(0.0, g_s[r * BK + kk] * k_s[kk * HEAD_DIM + d], !(p < 0.0));
            }
            acc[c] = a;
        }
    }

    if i < params.q_len {
        let qb = b * params.q_sb + i * params.q_ss + h * params.q_sh;
        for (var c = 0u; c < ncols; c++) {
            let d = t + c * TPR;
            if d >= HEAD_DIM {
                break;
            }
            var val = acc[c];
            if range.accumulate != 0u {
                val = dqs[qb + d] + val;
            }
            dqs[qb + d] = val;
        }
    }
}
