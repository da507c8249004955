// backward_kv_rows.wgsl — dK and dV for CPU adapters: backward_kv.wgsl's pass written with the
// recipe of flash_rows.wgsl (read its header first: why loads are counted, why registers are
// only indexed by constants and why marked loops are unrolled in the text), with the roles of
// queries and keys exchanged.
//
// One subgroup per workgroup owns R keys of one (batch, key/value head); lane `lane` owns the
// vec4 columns lane + WG·n of their K and V rows (read once, in registers) and of their dK and
// dV (accumulated in registers). Every query row of every query head of the group that can see
// the keys is then taken in turn by the whole subgroup (rows in blocks of KBL·WG, the unit of
// the host's dispatch split):
// - each lane reads the row's Q and dO at its own columns (vec4) and computes its share of
//   S = q·Kᵀ and dP = dO·Vᵀ for all R keys; a reduce-scatter over the subgroup (log2 WG steps of
//   subgroupShuffleXor) leaves the full sums of keys lane + LW·q (q < OPL) in lane `lane`;
// - that lane computes their P = exp(S - LSE_i) and g = P·(dP - D_i)·∂s/∂dot, or P = -1 where
//   the key is not visible to the row (or the row passes nothing on: padding, LSE = -inf), and
//   with WRITE_DS stores g;
// - dV += P·dO and dK += g·Q for every key at the lane's columns, each key's P and g coming from
//   the lane that owns it by subgroupShuffle: the Q and dO vectors are the ones just read.
// Why this shape (lavapipe, Mesa 22.3, 2026-12-07): every load whose address differs between
// lanes is a loop over the lanes in gallivm, and the earlier form (each lane owning whole query
// rows for S and dP, then columns for dV and dK) read every Q and dO vector twice, once per
// role; here each is read once, and the K and V columns a lane multiplies are its own, so no
// shuffles of K or V either (README, Training, has the measurements).
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
// Lanes of the subgroup (WG, as a constant for register indices), partial sums per lane before
// the reduce-scatter (RS = max(R, LW)) and keys each lane owns after it (OPL = RS / LW; with more
// lanes than keys, lanes past R own none): rewritten per pipeline by kernels/.
const LW: u32 = 8u; // lanes
const RS: u32 = 8u; // partial sums
const OPL: u32 = 1u; // owned per lane

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

// The streamed rows' operands of S and dP for row_scatter.wgsl: Q and dO.
fn s_op4(base: u32, d0: u32) -> vec4<f32> { return q4(base, d0); }
fn p_op4(base: u32, d0: u32) -> vec4<f32> { return dout4(base, d0); }

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

    // K and V of the R keys: slot r·NK8 + n holds k[key r][vec4 column n·WG + lid], loaded one
    // key per iteration into the last slots, every slot moving down one (constant indices only);
    // v likewise.
    var kreg: array<vec4<f32>, R * NK8>;
    var vreg: array<vec4<f32>, R * NV8>;
    for (var r = 0u; r < R; r++) {
        for (var k = 0u; k < R - 1u; k++) { // unroll
            for (var n = 0u; n < NK8; n++) { // unroll
                kreg[k * NK8 + n] = kreg[(k + 1u) * NK8 + n];
            }
            for (var n = 0u; n < NV8; n++) { // unroll
                vreg[k * NV8 + n] = vreg[(k + 1u) * NV8 + n];
            }
        }
        for (var n = 0u; n < NK8; n++) { // unroll
            kreg[(R - 1u) * NK8 + n] = load_kv_row(0u, b, kvh, j0 + r, lk, n * WG + lid);
        }
        for (var n = 0u; n < NV8; n++) { // unroll
            vreg[(R - 1u) * NV8 + n] = load_kv_row(1u, b, kvh, j0 + r, lk, n * WG + lid);
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

    let dv_elems = params.batch * params.kv_len * params.kv_heads * V_DIM;
    let ds_off = (range.dv_offset + dv_elems + 3u) / 4u * 4u;
    let lk4 = (params.kv_len + 3u) / 4u * 4u;

    for (var gq = 0u; gq < params.group; gq++) {
        let h = kvh * params.group + gq;
        let rows0 = (b * params.q_heads + h) * params.q_len;
        for (var tq = t_lo; tq < t_hi; tq++) {
            for (var c = 0u; c < KBL; c++) {
                // Lane `lid` reads the statistics of row i_c + lid; row i_c + u takes them from
                // lane u.
                let i_c = tq * blk + c * WG;
                var lse_m = ninf;
                var delta_m = 0.0;
                if i_c + lid < lq {
                    lse_m = row_lse(rows0 + i_c + lid);
                    delta_m = row_delta(rows0 + i_c + lid);
                }
                for (var u = 0u; u < WG; u++) {
                    let i = i_c + u;
                    let il = min(i, last_row);
                    let lse = subgroupShuffle(lse_m, u);
                    let delta = subgroupShuffle(delta_m, u);
                    let live = i < lq && !(lse == ninf);
                    let qb = b * params.q_sb + il * params.q_ss + h * params.q_sh;
                    let ob = b * params.o_sb + il * params.o_ss + h * params.o_sh;
                    // The row's Q and dO at this lane's columns.
                    var qv: array<vec4<f32>, NK8>;
                    var ov: array<vec4<f32>, NV8>;
                    load_streamed(qb, ob, &qv, &ov, lid);
                    // S and dP of every key, the full sums of this lane's own.
                    var ss: array<f32, RS>;
                    var ds: array<f32, RS>;
                    scattered_products(&kreg, &vreg, &qv, &ov, &ss, &ds, lid);
                    // P (or -1) and g of this lane's keys j0 + LW·q + lid.
                    let bl = band_limits(i, off, lk);
                    var po: array<f32, OPL>;
                    var go: array<f32, OPL>;
                    for (var q = 0u; q < OPL; q++) { // unroll
                        let rk = q * LW + lid;
                        let j = j0 + rk;
                        if PLAIN_LOGITS {
                            // Only the bands and lengths hide keys: the general path's decision
                            // (visible is the band without a mask, logit_grad's logit is
                            // scale·dot).
                            let w = sm_weight(params.scale * ss[q * LW], lse);
                            let seen = live && rk < R && i32(j) >= bl.x && i32(j) <= bl.y;
                            po[q] = select(-1.0, w, seen);
                            go[q] = w * (ds[q * LW] - delta) * params.scale;
                        } else {
                            var pg = vec3<f32>(-1.0, 0.0, 0.0);
                            if live && rk < R && j < lk && visible(b, h, i, j, off, lk) {
                                pg = logit_grad(b, h, i, j, off, ss[q * LW], ds[q * LW], lse, delta);
                            }
                            po[q] = pg.x;
                            go[q] = pg.z;
                        }
                    }
                    if WRITE_DS {
                        for (var q = 0u; q < OPL; q++) { // unroll
                            let rk = q * LW + lid;
                            let j = j0 + rk;
                            if i < params.q_len && rk < R && j < params.kv_len {
                                let g = seen_grad(go[q], !(po[q] < 0.0));
                                dkv[ds_off + (rows0 + i) * lk4 + j] = g;
                            }
                        }
                    }
                    // dV and dK at this lane's columns: key r's P and g from the lane that owns it.
                    for (var r = 0u; r < R; r++) { // unroll
                        let w = subgroupShuffle(po[r / LW], r % LW);
                        let gw = subgroupShuffle(go[r / LW], r % LW);
                        let add = !(w < 0.0);
                        for (var n = 0u; n < NV8; n++) { // unroll
                            dv[r * NV8 + n] += select(zero4, w * ov[n], add);
                        }
                        for (var n = 0u; n < NK8; n++) { // unroll
                            dk[r * NK8 + n] += select(zero4, gw * qv[n], add);
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
