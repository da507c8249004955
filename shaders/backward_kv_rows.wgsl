// backward_kv_rows.wgsl — dK and dV for CPU adapters: backward_kv.wgsl's pass written with the
// recipe of flash_rows.wgsl (read its header first: why loads are counted, why registers are
// only indexed by constants and why marked loops are unrolled in the text), with the roles of
// queries and keys exchanged.
//
// One subgroup per workgroup owns R keys of one (batch, key/value head); their K and V rows are
// read once, into registers (wide heads: workgroup memory, see ROWS_STAGED). For every query head of the group and every block of KBL·WG
// query rows that can see the keys (row i0 + c·WG + lane belongs to lane `lane`):
// - Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: each lane reads its rows' Q and dO as vec4 and computes both for
//   all R keys; the k and v vectors come from the lane that read them by subgroupShuffle;
// - P = exp(S - LSE_i), g = P·(dP - D_i)·∂s/∂dot, or P = -1 where the key is not visible to the
//   row (or the row passes nothing on: padding, LSE = -inf);
// - dV += Pᵀ·dO and dK += gᵀ·Q: lane `lane` owns the vec4 columns lane + WG·n of the R keys;
//   row (c, u)'s P and g come from lane u by shuffle, its dO and Q rows are read once per owned
//   column.
// No atomics: each dK/dV element is summed by one invocation in a fixed order (deterministic).
// Semantics are backward_kv.wgsl's (the same logit_grad; a row adds exactly when it sees the key).

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override WG: u32 = 8u;
// Also write the logit gradients g for backward_dq_rows.wgsl (see its header for the layout and
// the encoding), after dV in dkv.
override WRITE_DS: bool = false;
// Q and dO read four elements per load (kernels/ rewrites q4/dout4, as for flash_rows.wgsl).
override VEC4_KV: bool = false;
// The problem has no mask, bias, ALiBi or soft cap (set by the host: plan.rs `plain_logits`):
// only bands and lengths hide keys, and every block takes the band path below instead of the
// general per-logit one, which then compiles away. Why a variant: gallivm (lavapipe,
// llvmpipe) compiles both sides of every branch, and the general path was two thirds of the
// backward's first call (flash_rows.wgsl has the same switch).
override PLAIN_LOGITS: bool = false;

// Keys per workgroup and query rows per lane per block (kernels/: BackwardTiles::rows).
// R is the host's ROWS (8 or 16; FlashTiles::row_count), written into this line per pipeline
// (it sizes register arrays, which an override cannot).
override ROWS: u32 = 8u;
const R: u32 = 8u; // rows per workgroup
const KBL: u32 = 4u;
// dK and dV vec4 columns per lane, ceil(ceil(dim / 4) / WG): rewritten by kernels/.
const NK8: u32 = 2u; // register columns k
const NV8: u32 = 2u; // register columns v
override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
override ND8: u32 = (D4 + WG - 1u) / WG;
override NDV8: u32 = (DV4 + WG - 1u) / WG;
// The R keys' K and V rows live in registers: lane `lid` holds vec4 column n·WG + lid of every
// key, NKR = NK8 and NVR = NV8 chunks per key (read once, no barrier). Wide heads (more than
// FlashTiles::ROWS_Q_REGISTER_COLUMNS chunks for either: D or Dv > 128 on 8 lanes) stage them in
// workgroup memory instead (ROWS_STAGED; KS = R·ND8·WG and VS = R·NDV8·WG vec4, NKR = NVR = 1)
// and re-read them every block, as this pass did for every head until 2026-12-07: the
// registers made the pass 13-14% faster on lavapipe (1,1024,2,64 f32 35.9 -> 31.1 ms,
// 4,256,2,64 9.57 -> 8.22, best of six alternated; first backward call unchanged), for the
// forward's reasons (flash_rows.wgsl: each workgroup-memory read is a lane loop, and the
// barrier a coroutine suspend point). kernels/ rewrites the four lines and sets ROWS_STAGED.
const NKR: u32 = 2u; // register columns kr
const NVR: u32 = 2u; // register columns vr
const KS: u32 = 1u; // staged k
const VS: u32 = 1u; // staged v
override ROWS_STAGED: bool = false;

var<workgroup> k_s: array<vec4<f32>, KS>;
var<workgroup> v_s: array<vec4<f32>, VS>;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(7) var<storage, read> dout: array<u32>; // tensor dout
// [dK in K's layout][dV in V's layout at range.dv_offset][with WRITE_DS: g as [B, Hq, Lq, LK4]
// from the next multiple of 4 elements], f32.
@group(0) @binding(8) var<storage, read_write> dkv: array<f32>;

fn load_dout(idx: u32) -> f32 { return elem_value(dout[elem_word(idx, DO_DT)], idx, DO_DT); } // load dout

fn q4(base: u32, d0: u32) -> vec4<f32> { return q4_scalar(base, d0); } // load q4
fn dout4(base: u32, d0: u32) -> vec4<f32> { return dout4_scalar(base, d0); } // load dout4

// The operands dot_chunk (row_chunks.wgsl) loads: Q for Sᵀ = K·Qᵀ (0), dO for dPᵀ = V·dOᵀ (1).
fn row_vec4(which: u32, base: u32, d0: u32) -> vec4<f32> {
    if which == 0u {
        return q4(base, d0);
    }
    return dout4(base, d0);
}

// Vec4 column d4 of key jj's K row (which = 0) or V row (1), zero past the head dim or the
// valid keys (`which` is a constant at every call, so one branch is compiled).
fn load_kv_row(which: u32, b: u32, kvh: u32, jj: u32, lk: u32, d4: u32) -> vec4<f32> {
    var val = vec4<f32>(0.0);
    let dim = select(HEAD_DIM, V_DIM, which == 1u);
    if jj < lk && d4 < (dim + 3u) / 4u {
        var base = b * params.k_sb + jj * params.k_ss + kvh * params.k_sh + 4u * d4;
        if which == 1u {
            base = b * params.v_sb + jj * params.v_ss + kvh * params.v_sh + 4u * d4;
        }
        for (var c = 0u; c < 4u; c++) {
            if 4u * d4 + c < dim {
                if which == 0u {
                    val[c] = load_k(base + c);
                } else {
                    val[c] = load_v(base + c);
                }
            }
        }
    }
    return val;
}

fn q4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < HEAD_DIM {
            x[c] = load_q(base + d0 + c);
        }
    }
    return x;
}

fn dout4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < V_DIM {
            x[c] = load_dout(base + d0 + c);
        }
    }
    return x;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tiles_k = (params.kv_len + R - 1u) / R;
    let units = params.batch * params.kv_heads;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_k * units {
        return;
    }
    let tk = flat % tiles_k;
    let unit = flat / tiles_k;
    let b = unit / params.kv_heads;
    let kvh = unit % params.kv_heads;
    let j0 = tk * R;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let zero4 = vec4<f32>(0.0);

    // K and V of the R keys. Registers: slot r·NKR + n holds k[key r][vec4 column n·WG + lid],
    // loaded one key per iteration into the last slots, every slot moving down one (constant
    // indices only); v likewise. Staged: k_s[(r·ND8 + n)·WG + lane] = k[key r][vec4 column
    // n·WG + lane]; v_s likewise.
    var kreg: array<vec4<f32>, R * NKR>;
    var vreg: array<vec4<f32>, R * NVR>;
    if ROWS_STAGED {
        for (var x = lid; x < R * ND8 * WG; x += WG) {
            k_s[x] = load_kv_row(0u, b, kvh, j0 + x / (ND8 * WG), lk, x % (ND8 * WG));
        }
        for (var x = lid; x < R * NDV8 * WG; x += WG) {
            v_s[x] = load_kv_row(1u, b, kvh, j0 + x / (NDV8 * WG), lk, x % (NDV8 * WG));
        }
        workgroupBarrier();
    } else {
        for (var r = 0u; r < R; r++) {
            for (var k = 0u; k < R - 1u; k++) { // unroll
                for (var n = 0u; n < NKR; n++) { // unroll
                    kreg[k * NKR + n] = kreg[(k + 1u) * NKR + n];
                }
                for (var n = 0u; n < NVR; n++) { // unroll
                    vreg[k * NVR + n] = vreg[(k + 1u) * NVR + n];
                }
            }
            for (var n = 0u; n < NKR; n++) { // unroll
                kreg[(R - 1u) * NKR + n] = load_kv_row(0u, b, kvh, j0 + r, lk, n * WG + lid);
            }
            for (var n = 0u; n < NVR; n++) { // unroll
                vreg[(R - 1u) * NVR + n] = load_kv_row(1u, b, kvh, j0 + r, lk, n * WG + lid);
            }
        }
    }

    let blk = KBL * WG;
    let j_last = min(j0 + R, params.kv_len) - 1u;
    let band = visible_query_range(j0, j_last, lq, lk, off);
    let t_lo = max(u32(band.x) / blk, range.begin);
    let t_hi = min(u32(max(band.y, band.x) + i32(blk) - 1) / blk, range.end);
    let last_row = params.q_len - 1u;

    var dk: array<vec4<f32>, R * NK8>;
    var dv: array<vec4<f32>, R * NV8>;
    for (var e = 0u; e < R * NK8; e++) { // unroll
        dk[e] = zero4;
    }
    for (var e = 0u; e < R * NV8; e++) { // unroll
        dv[e] = zero4;
    }

    for (var gq = 0u; gq < params.group; gq++) {
        let h = kvh * params.group + gq;
        let rows0 = (b * params.q_heads + h) * params.q_len;
        for (var tq = t_lo; tq < t_hi; tq++) {
            let i0 = tq * blk;
            // This lane's rows: where Q and dO start, their statistics, whether they pass a
            // gradient on.
            var qb: array<u32, KBL>;
            var ob: array<u32, KBL>;
            var lse_c: array<f32, KBL>;
            var delta_c: array<f32, KBL>;
            var live: array<bool, KBL>;
            for (var c = 0u; c < KBL; c++) { // unroll
                let i = i0 + c * WG + lid;
                let il = min(i, last_row);
                qb[c] = b * params.q_sb + il * params.q_ss + h * params.q_sh;
                ob[c] = b * params.o_sb + il * params.o_ss + h * params.o_sh;
                var l = ninf;
                var dl = 0.0;
                if i < lq {
                    l = row_lse(rows0 + i);
                    dl = row_delta(rows0 + i);
                }
                lse_c[c] = l;
                delta_c[c] = dl;
                live[c] = i < lq && !(l == ninf);
            }
            var s: array<f32, R * KBL>;
            var dp: array<f32, R * KBL>;
            for (var e = 0u; e < R * KBL; e++) { // unroll
                s[e] = 0.0;
                dp[e] = 0.0;
            }
            if ROWS_STAGED {
                for (var n = 0u; n < ND8; n++) {
                    var kd: array<vec4<f32>, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        kd[r] = k_s[(r * ND8 + n) * WG + lid];
                    }
                    dot_chunk(n, D4, kd, qb, 0u, &s);
                }
                for (var n = 0u; n < NDV8; n++) {
                    var vd: array<vec4<f32>, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        vd[r] = v_s[(r * NDV8 + n) * WG + lid];
                    }
                    dot_chunk(n, DV4, vd, ob, 1u, &dp);
                }
            } else {
                for (var n = 0u; n < NKR; n++) { // unroll
                    var kd: array<vec4<f32>, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        kd[r] = kreg[r * NKR + n];
                    }
                    dot_chunk(n, D4, kd, qb, 0u, &s);
                }
                for (var n = 0u; n < NVR; n++) { // unroll
                    var vd: array<vec4<f32>, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        vd[r] = vreg[r * NVR + n];
                    }
                    dot_chunk(n, DV4, vd, ob, 1u, &dp);
                }
            }
            // P (or -1) and g, one vec4 of this lane's rows per key (KBL = 4): the loop below
            // picks a row by a dynamic component index, which compiles to selects.
            var p: array<vec4<f32>, R>;
            var g: array<vec4<f32>, R>;
            if PLAIN_LOGITS {
                // Only the bands and lengths hide keys: the general path's decision (visible
                // is the band without a mask, logit_grad's logit is scale·dot), unrolled so the
                // values stay in registers; blocks every row sees whole take it too.
                for (var c = 0u; c < KBL; c++) { // unroll
                    let band = band_limits(i0 + c * WG + lid, off, lk);
                    for (var r = 0u; r < R; r++) { // unroll
                        let j = i32(j0 + r);
                        let w = sm_weight(params.scale * s[r * KBL + c], lse_c[c]);
                        p[r][c] = select(-1.0, w, live[c] && j >= band.x && j <= band.y);
                        g[r][c] = w * (dp[r * KBL + c] - delta_c[c]) * params.scale;
                    }
                }
            } else {
                // The general path, in every block: only problems with a mask, bias,
                // ALiBi or cap take this variant (a block every row saw whole had a branch
                // of its own, which such a problem never took and gallivm compiled anyway).
                var ts: array<f32, R * KBL>;
                var tdp: array<f32, R * KBL>;
                for (var e = 0u; e < R * KBL; e++) { // unroll
                    ts[e] = s[e];
                    tdp[e] = dp[e];
                }
                var tp: array<vec4<f32>, R>;
                var tg: array<vec4<f32>, R>;
                for (var e = 0u; e < R * KBL; e++) {
                    let r = e / KBL;
                    let c = e % KBL;
                    let i = i0 + c * WG + lid;
                    let j = j0 + r;
                    var pg = vec3<f32>(-1.0, 0.0, 0.0);
                    if i < lq && j < lk {
                        let lse = row_lse(rows0 + i);
                        if !(lse == ninf) && visible(b, h, i, j, off, lk) {
                            pg = logit_grad(b, h, i, j, off, ts[e], tdp[e], lse, row_delta(rows0 + i));
                        }
                    }
                    tp[r][c] = pg.x;
                    tg[r][c] = pg.z;
                }
                for (var r = 0u; r < R; r++) { // unroll
                    p[r] = tp[r];
                    g[r] = tg[r];
                }
            }
            if WRITE_DS {
                let dv_elems = params.batch * params.kv_len * params.kv_heads * V_DIM;
                let ds_off = (range.dv_offset + dv_elems + 3u) / 4u * 4u;
                let lk4 = (params.kv_len + 3u) / 4u * 4u;
                // A loop over this lane's rows (p and g picked by a dynamic component index,
                // i.e. selects) with the keys unrolled: R store sites instead of R·KBL (each a
                // lane loop in gallivm; 0.2 s of the first backward call at 4,256,2,64, run time
                // within noise).
                for (var c = 0u; c < KBL; c++) {
                    let i = i0 + c * WG + lid;
                    for (var r = 0u; r < R; r++) { // unroll
                        let j = j0 + r;
                        if i < params.q_len && j < params.kv_len {
                            let pv = p[r][c];
                            let gv = g[r][c];
                            let seen = !(pv < 0.0);
                            var w = select(0u, bitcast<u32>(gv), seen);
                            if seen && gv == 0.0 {
                                w = 0x80000000u;
                            }
                            dkv[ds_off + (rows0 + i) * lk4 + j] = bitcast<f32>(w);
                        }
                    }
                }
            }
            // dV and dK: lane `lid` adds P·dO and g·Q over every row of the block for its own
            // columns; the values of row i0 + c·WG + u come from lane u.
            for (var c = 0u; c < KBL; c++) {
                var pc: array<f32, R>;
                var gc: array<f32, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    pc[r] = p[r][c];
                    gc[r] = g[r][c];
                }
                for (var u = 0u; u < WG; u++) {
                    let il = min(i0 + c * WG + u, last_row);
                    let qbu = b * params.q_sb + il * params.q_ss + h * params.q_sh;
                    let obu = b * params.o_sb + il * params.o_ss + h * params.o_sh;
                    var wp: array<f32, R>;
                    var gw: array<f32, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        wp[r] = subgroupShuffle(pc[r], u);
                        gw[r] = subgroupShuffle(gc[r], u);
                    }
                    for (var n = 0u; n < NV8; n++) { // unroll
                        let col = n * WG + lid;
                        let oo = dout4(obu, 4u * min(col, DV4 - 1u));
                        for (var r = 0u; r < R; r++) { // unroll
                            dv[r * NV8 + n] += select(zero4, wp[r] * oo, !(wp[r] < 0.0));
                        }
                    }
                    for (var n = 0u; n < NK8; n++) { // unroll
                        let col = n * WG + lid;
                        let qq = q4(qbu, 4u * min(col, D4 - 1u));
                        for (var r = 0u; r < R; r++) { // unroll
                            dk[r * NK8 + n] += select(zero4, gw[r] * qq, !(wp[r] < 0.0));
                        }
                    }
                }
            }
        }
    }

    // dK and dV of the R keys: key r is always in slot 0 and the slots move down by one after
    // each key (register moves), so the stores are written once, not R times (see
    // flash_rows.wgsl's last loop: each store is a lane loop in gallivm).
    for (var r = 0u; r < R; r++) {
        let j = j0 + r;
        if j < params.kv_len {
            let kb = b * params.k_sb + j * params.k_ss + kvh * params.k_sh;
            for (var n = 0u; n < NK8; n++) { // unroll
                let col = n * WG + lid;
                let a = dk[n];
                for (var c = 0u; c < 4u; c++) { // unroll
                    if 4u * col + c < HEAD_DIM {
                        var val = a[c];
                        if range.accumulate != 0u {
                            val = dkv[kb + 4u * col + c] + val;
                        }
                        dkv[kb + 4u * col + c] = val;
                    }
                }
            }
            let vb = range.dv_offset + b * params.v_sb + j * params.v_ss + kvh * params.v_sh;
            for (var n = 0u; n < NV8; n++) { // unroll
                let col = n * WG + lid;
                let a = dv[n];
                for (var c = 0u; c < 4u; c++) { // unroll
                    if 4u * col + c < V_DIM {
                        var val = a[c];
                        if range.accumulate != 0u {
                            val = dkv[vb + 4u * col + c] + val;
                        }
                        dkv[vb + 4u * col + c] = val;
                    }
                }
            }
        }
        for (var k = 0u; k < R - 1u; k++) { // unroll
            for (var n = 0u; n < NK8; n++) { // unroll
                dk[k * NK8 + n] = dk[(k + 1u) * NK8 + n];
            }
            for (var n = 0u; n < NV8; n++) { // unroll
                dv[k * NV8 + n] = dv[(k + 1u) * NV8 + n];
            }
        }
    }
}
