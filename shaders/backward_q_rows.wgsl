// backward_q_rows.wgsl — dQ for CPU adapters: backward_q.wgsl's pass written with the recipe of
// flash_rows.wgsl (read its header first: why loads are counted, why registers are only indexed
// by constants and why marked loops are unrolled in the text) and the column ownership of
// backward_kv_rows.wgsl (read its header for why), with the roles of queries and keys exchanged.
//
// One subgroup per workgroup owns R query rows of one (batch, query head); lane `lane` owns the
// vec4 columns lane + WG·n of their Q and dO rows (read once, in registers) and of their dQ
// (accumulated in registers). Every key the rows can see is then taken in turn by the whole
// subgroup (keys in blocks of KBL·WG, the unit of the host's dispatch split), in key order:
// - each lane reads the key's K and V at its own columns (vec4) and computes its share of
//   S = Q·kᵀ and dP = dO·vᵀ for all R rows; a reduce-scatter over the subgroup
//   (row_scatter.wgsl) leaves the full sums of rows lane + LW·q (q < OPL) in lane `lane`;
// - that lane computes their g = P·(dP - D_i)·∂s/∂dot with P = exp(S - LSE_i), encoded +0.0
//   where the key is not visible to the row (or the row passes nothing on: padding, LSE = -inf)
//   and an exact zero as -0.0 (seen_grad), and with WRITE_DS stores dS;
// - dQ += g·k for every row that sees the key, at the lane's columns, each row's g coming from
//   the lane that owns it by subgroupShuffle: the K vectors are the ones just read.
// Results, order of accumulation per element (keys in increasing order) and semantics are those
// of backward_q.wgsl (the same logit_grad; a key adds to dQ exactly when it is visible), so both
// kernels agree to f32 rounding and each is deterministic.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override WG: u32 = 8u;
// Also write dS (for dBias) as [B, Hq, Lq, Lk] f32 from range.dv_offset in dqs.
override WRITE_DS: bool = false;
// K and V read four elements per load (kernels/ rewrites k4/v4, as for flash_rows.wgsl).
override VEC4_KV: bool = false;
// The problem has no mask, bias, ALiBi or soft cap (set by the host: plan.rs `plain_logits`):
// only bands and lengths hide keys, and every key takes the band path below instead of the
// general per-logit one, which then compiles away. Why a variant: gallivm (lavapipe,
// llvmpipe) compiles both sides of every branch, and the general path was two thirds of the
// backward's first call (flash_rows.wgsl has the same switch). WRITE_DS (dS, for dBias) never
// comes with it: the plain path does not write dS.
override PLAIN_LOGITS: bool = false;

// Query rows per workgroup and keys per lane per block (kernels/: BackwardTiles::rows).
// R is the host's ROWS (8 or 16; FlashTiles::row_count), written into this line per pipeline
// (it sizes register arrays, which an override cannot).
override ROWS: u32 = 8u;
const R: u32 = 8u; // rows per workgroup
const KBL: u32 = 4u;
// Q/dQ and dO vec4 columns per lane, ceil(ceil(dim / 4) / WG): rewritten by kernels/.
const NK8: u32 = 2u; // register columns k
const NV8: u32 = 2u; // register columns v
override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
// Lanes of the subgroup (WG, as a constant for register indices), partial sums per lane before
// the reduce-scatter (RS = max(R, LW)) and rows each lane owns after it (OPL = RS / LW; with more
// lanes than rows, lanes past R own none): rewritten per pipeline by kernels/.
const LW: u32 = 8u; // lanes
const RS: u32 = 8u; // partial sums
const OPL: u32 = 1u; // owned per lane

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(7) var<storage, read> dout: array<u32>;
// [dQ in Q's layout][with WRITE_DS: dS as [B, Hq, Lq, Lk] from range.dv_offset], f32.
@group(0) @binding(8) var<storage, read_write> dqs: array<f32>;

fn load_do(idx: u32) -> f32 {
    return elem_value(dout[elem_word(idx, DO_DT)], idx, DO_DT);
}

fn v4(base: u32, d0: u32) -> vec4<f32> { return v4_scalar(base, d0); } // load v4

// The streamed keys' operands of S and dP for row_scatter.wgsl: K and V.
fn s_op4(base: u32, d0: u32) -> vec4<f32> { return k4(base, d0); }
fn p_op4(base: u32, d0: u32) -> vec4<f32> { return v4(base, d0); }

fn v4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < V_DIM {
            x[c] = load_v(base + d0 + c);
        }
    }
    return x;
}

// Vec4 column d4 of row i0 + r's Q (zero past the head dim or the valid rows).
fn load_q_row(b: u32, h: u32, i0: u32, r: u32, lq: u32, d4: u32) -> vec4<f32> {
    var val = vec4<f32>(0.0);
    let ii = i0 + r;
    if ii < lq && d4 < D4 {
        let base = b * params.q_sb + ii * params.q_ss + h * params.q_sh + 4u * d4;
        for (var c = 0u; c < 4u; c++) {
            if 4u * d4 + c < HEAD_DIM {
                val[c] = load_q(base + c);
            }
        }
    }
    return val;
}

// The same for dO, also zero for a row that passes nothing on (LSE = -inf).
fn load_do_row(b: u32, h: u32, i0: u32, row0: u32, r: u32, lq: u32, d4: u32) -> vec4<f32> {
    var val = vec4<f32>(0.0);
    let ii = i0 + r;
    if ii < lq && d4 < DV4 && !(row_lse(row0 + r) == neg_inf()) {
        let base = b * params.o_sb + ii * params.o_ss + h * params.o_sh + 4u * d4;
        for (var c = 0u; c < 4u; c++) {
            if 4u * d4 + c < V_DIM {
                val[c] = load_do(base + c);
            }
        }
    }
    return val;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let unit = query_rows(wg, nwg);
    if !unit.ok {
        return;
    }
    let b = unit.b;
    let h = unit.h;
    let i0 = unit.i0;
    let kvh = h / params.group;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let zero4 = vec4<f32>(0.0);
    let row0 = (b * params.q_heads + h) * params.q_len;

    // The statistics of this lane's rows i0 + LW·q + lid (the rows whose full S and dP it gets);
    // a row passes a gradient on only when it is valid and saw something (LSE > -inf).
    var lse_o: array<f32, OPL>;
    var delta_o: array<f32, OPL>;
    var live_o: array<bool, OPL>;
    var band_o: array<vec2<i32>, OPL>;
    for (var q = 0u; q < OPL; q++) { // unroll
        let rr = q * LW + lid;
        let i = i0 + rr;
        var l = ninf;
        var dl = 0.0;
        if rr < R && i < lq {
            l = row_lse(row0 + i);
            dl = row_delta(row0 + i);
        }
        lse_o[q] = l;
        delta_o[q] = dl;
        live_o[q] = rr < R && i < lq && !(l == ninf);
        band_o[q] = band_limits(i, off, lk);
    }

    // Q and dO of the R rows (dO of a row that passes nothing on is never read: 0): slot r·NK8 + n
    // holds q[row r][vec4 column n·WG + lid], loaded one row per iteration into the last slots,
    // every slot moving down one (constant indices only); dO likewise.
    var qreg: array<vec4<f32>, R * NK8>;
    var oreg: array<vec4<f32>, R * NV8>;
    for (var r = 0u; r < R; r++) {
        for (var k = 0u; k < R - 1u; k++) { // unroll
            for (var n = 0u; n < NK8; n++) { // unroll
                qreg[k * NK8 + n] = qreg[(k + 1u) * NK8 + n];
            }
            for (var n = 0u; n < NV8; n++) { // unroll
                oreg[k * NV8 + n] = oreg[(k + 1u) * NV8 + n];
            }
        }
        for (var n = 0u; n < NK8; n++) { // unroll
            qreg[(R - 1u) * NK8 + n] = load_q_row(b, h, i0, r, lq, n * WG + lid);
        }
        for (var n = 0u; n < NV8; n++) { // unroll
            oreg[(R - 1u) * NV8 + n] = load_do_row(b, h, i0, row0 + i0, r, lq, n * WG + lid);
        }
    }

    let blk = KBL * WG;
    let i_last = min(i0 + R, params.q_len) - 1u;
    let band = visible_key_range(i0, i_last, lq, lk, off);
    let t_lo = max(u32(band.x) / blk, range.begin);
    let t_hi = min(u32(max(band.y, band.x) + i32(blk) - 1) / blk, range.end);
    let last_key = params.kv_len - 1u;

    var acc: array<vec4<f32>, R * NK8>;
    for (var e = 0u; e < R * NK8; e++) { // unroll
        acc[e] = zero4;
    }

    for (var tk = t_lo; tk < t_hi; tk++) {
        for (var e = 0u; e < blk; e++) {
            let j = tk * blk + e;
            let jl = min(j, last_key);
            let kb = b * params.k_sb + jl * params.k_ss + kvh * params.k_sh;
            let vb = b * params.v_sb + jl * params.v_ss + kvh * params.v_sh;
            // The key's K and V at this lane's columns.
            var kv: array<vec4<f32>, NK8>;
            var vv: array<vec4<f32>, NV8>;
            load_streamed(kb, vb, &kv, &vv, lid);
            // S and dP of every row, the full sums of this lane's own.
            var ss: array<f32, RS>;
            var ds: array<f32, RS>;
            scattered_products(&qreg, &oreg, &kv, &vv, &ss, &ds, lid);
            // g of this lane's rows i0 + LW·q + lid with the key's visibility in it (seen_grad,
            // backward_common.wgsl), so that one shuffle per row carries both.
            var go: array<f32, OPL>;
            for (var q = 0u; q < OPL; q++) { // unroll
                let i = i0 + q * LW + lid;
                if PLAIN_LOGITS {
                    // Only the bands and lengths hide keys: the general path's decision
                    // (visible is the band without a mask, logit_grad's logit is scale·dot).
                    let bl = band_o[q];
                    let w = sm_weight(params.scale * ss[q * LW], lse_o[q]);
                    let seen = live_o[q] && i32(j) >= bl.x && i32(j) <= bl.y;
                    go[q] = seen_grad(w * (ds[q * LW] - delta_o[q]) * params.scale, seen);
                } else {
                    var pg = vec3<f32>(-1.0, 0.0, 0.0);
                    if live_o[q] && j < lk && visible(b, h, i, j, off, lk) {
                        let sq = ss[q * LW];
                        let dpq = ds[q * LW];
                        pg = logit_grad(b, h, i, j, off, sq, dpq, lse_o[q], delta_o[q]);
                        if WRITE_DS {
                            dqs[range.dv_offset + (row0 + i) * params.kv_len + j] = pg.y;
                        }
                    }
                    go[q] = seen_grad(pg.z, !(pg.x < 0.0));
                }
            }
            // dQ at this lane's columns: row r's g from the lane that owns it.
            for (var r = 0u; r < R; r++) { // unroll
                let gw = subgroupShuffle(go[r / LW], r % LW);
                let add = bitcast<u32>(gw) != 0u;
                for (var n = 0u; n < NK8; n++) { // unroll
                    acc[r * NK8 + n] += select(zero4, gw * kv[n], add);
                }
            }
        }
    }

    store_dq(acc, b, h, i0, lid);
}
