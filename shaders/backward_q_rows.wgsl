// backward_q_rows.wgsl — dQ for CPU adapters: backward_q.wgsl's pass written with the recipe of
// flash_rows.wgsl (read its header first: why loads are counted, why registers are only indexed
// by constants and why marked loops are unrolled in the text).
//
// One subgroup per workgroup owns R query rows of one (batch, query head); Q and dO of those rows
// are read once, into registers (wide heads: workgroup memory, see ROWS_STAGED). For each block of KBL·WG keys the rows can see (key
// j0 + c·WG + lane belongs to lane `lane`):
// - S = Q·Kᵀ and dP = dO·Vᵀ: each lane reads its keys' K and V rows as vec4 and computes both
//   for all R rows; the q and dO vectors come from the lane that read them by subgroupShuffle;
// - P = exp(S - LSE), g = P·(dP - D_i)·∂s/∂dot, or P = -1 where the key is not visible;
// - dQ += g·K: lane `lane` owns the dQ vec4 columns lane + WG·n of all R rows; key (c, u)'s g
//   comes from lane u by shuffle, its K row is read once per owned column.
// Results, order of accumulation per element and semantics are those of backward_q.wgsl (the
// same logit_grad; a key adds to dQ exactly when it is visible), so both kernels agree to f32
// rounding and each is deterministic. With WRITE_DS the logit gradients go out as there.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override WG: u32 = 8u;
override WRITE_DS: bool = false;
// K and V read four elements per load (kernels/ rewrites k4/v4, as for flash_rows.wgsl).
override VEC4_KV: bool = false;
// The problem has no mask, bias, ALiBi or soft cap (set by the host: plan.rs `plain_logits`):
// only bands and lengths hide keys, and every block takes the band path below instead of the
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
// dQ vec4 columns per lane, ceil(ceil(HEAD_DIM / 4) / WG): rewritten by kernels/ per pipeline.
const NK8: u32 = 2u; // register columns k
// Words of the visibility bits (R·KBL of them, see `vis`).
const NVW: u32 = (R * KBL + 31u) / 32u;
override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
override ND8: u32 = (D4 + WG - 1u) / WG;
override NDV8: u32 = (DV4 + WG - 1u) / WG;
// The R rows' Q and dO live in registers (NQR = ND8 and NOR = NDV8 chunks per row), or for wide
// heads in workgroup memory (ROWS_STAGED; QS = R·ND8·WG and OS = R·NDV8·WG vec4, NQR = NOR =
// 1), as the forward row kernel keeps Q and for its reasons (flash_rows.wgsl: each read of
// workgroup memory is a lane loop, the barrier a coroutine suspend point). This pass on lavapipe,
// staged -> registers, best of four alternated, 2026-12-07: 1,1024,2,64 26.1 -> 21.4 ms,
// 4,256,2,64 6.91 -> 6.07. kernels/ rewrites the four lines.
const NQR: u32 = 2u; // register columns qr
const NOR: u32 = 2u; // register columns or
const QS: u32 = 1u; // staged q
const OS: u32 = 1u; // staged do
override ROWS_STAGED: bool = false;

var<workgroup> q_s: array<vec4<f32>, QS>;
var<workgroup> do_s: array<vec4<f32>, OS>;

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

// The operands dot_chunk (row_chunks.wgsl) loads: K for S = Q·Kᵀ (0), V for dP = dO·Vᵀ (1).
fn row_vec4(which: u32, base: u32, d0: u32) -> vec4<f32> {
    if which == 0u {
        return k4(base, d0);
    }
    return v4(base, d0);
}

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
    let row0 = (b * params.q_heads + h) * params.q_len + i0;

    // The rows' statistics (the same in every lane); a row passes a gradient on only when it is
    // valid and saw something (LSE > -inf).
    var lse_r: array<f32, R>;
    var delta_r: array<f32, R>;
    var live: array<bool, R>;
    for (var r = 0u; r < R; r++) { // unroll
        var l = ninf;
        var dl = 0.0;
        if i0 + r < lq {
            l = row_lse(row0 + r);
            dl = row_delta(row0 + r);
        }
        lse_r[r] = l;
        delta_r[r] = dl;
        live[r] = i0 + r < lq && !(l == ninf);
    }

    // Q and dO of the R rows (dO of a row that passes nothing on is never read: 0). Registers:
    // slot r·NQR + n holds q[row r][vec4 column n·WG + lid], loaded one row per iteration into
    // the last slots, every slot moving down one (constant indices only); dO likewise. Staged:
    // q_s[(r·ND8 + n)·WG + lane] = q[row r][vec4 column n·WG + lane]; do_s likewise.
    var qreg: array<vec4<f32>, R * NQR>;
    var oreg: array<vec4<f32>, R * NOR>;
    if ROWS_STAGED {
        for (var x = lid; x < R * ND8 * WG; x += WG) {
            q_s[x] = load_q_row(b, h, i0, x / (ND8 * WG), lq, x % (ND8 * WG));
        }
        for (var x = lid; x < R * NDV8 * WG; x += WG) {
            do_s[x] = load_do_row(b, h, i0, row0, x / (NDV8 * WG), lq, x % (NDV8 * WG));
        }
        workgroupBarrier();
    } else {
        for (var r = 0u; r < R; r++) {
            for (var k = 0u; k < R - 1u; k++) { // unroll
                for (var n = 0u; n < NQR; n++) { // unroll
                    qreg[k * NQR + n] = qreg[(k + 1u) * NQR + n];
                }
                for (var n = 0u; n < NOR; n++) { // unroll
                    oreg[k * NOR + n] = oreg[(k + 1u) * NOR + n];
                }
            }
            for (var n = 0u; n < NQR; n++) { // unroll
                qreg[(R - 1u) * NQR + n] = load_q_row(b, h, i0, r, lq, n * WG + lid);
            }
            for (var n = 0u; n < NOR; n++) { // unroll
                oreg[(R - 1u) * NOR + n] = load_do_row(b, h, i0, row0, r, lq, n * WG + lid);
            }
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
        let j0 = tk * blk;
        var kb: array<u32, KBL>;
        var vb: array<u32, KBL>;
        for (var c = 0u; c < KBL; c++) { // unroll
            let jl = min(j0 + c * WG + lid, last_key);
            kb[c] = b * params.k_sb + jl * params.k_ss + kvh * params.k_sh;
            vb[c] = b * params.v_sb + jl * params.v_ss + kvh * params.v_sh;
        }
        // S and dP of this lane's keys for the R rows.
        var s: array<f32, R * KBL>;
        var dp: array<f32, R * KBL>;
        for (var e = 0u; e < R * KBL; e++) { // unroll
            s[e] = 0.0;
            dp[e] = 0.0;
        }
        if ROWS_STAGED {
            for (var n = 0u; n < ND8; n++) {
                var qd: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    qd[r] = q_s[(r * ND8 + n) * WG + lid];
                }
                dot_chunk(n, D4, qd, kb, 0u, &s);
            }
            for (var n = 0u; n < NDV8; n++) {
                var od: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    od[r] = do_s[(r * NDV8 + n) * WG + lid];
                }
                dot_chunk(n, DV4, od, vb, 1u, &dp);
            }
        } else {
            for (var n = 0u; n < NQR; n++) { // unroll
                var qd: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    qd[r] = qreg[r * NQR + n];
                }
                dot_chunk(n, D4, qd, kb, 0u, &s);
            }
            for (var n = 0u; n < NOR; n++) { // unroll
                var od: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    od[r] = oreg[r * NOR + n];
                }
                dot_chunk(n, DV4, od, vb, 1u, &dp);
            }
        }
        // P (or -1 where not visible) and g, one vec4 of keys per row (KBL = 4): the dQ loop
        // below picks a key by a dynamic component index, which compiles to selects.
        var p: array<vec4<f32>, R>;
        var g: array<vec4<f32>, R>;
        if PLAIN_LOGITS {
            // Only the bands and lengths hide keys: the general path's decision, unrolled so
            // the values stay in registers (as in backward_kv_rows.wgsl).
            for (var r = 0u; r < R; r++) { // unroll
                let band = band_limits(i0 + r, off, lk);
                for (var c = 0u; c < KBL; c++) { // unroll
                    let j = i32(j0 + c * WG + lid);
                    let w = sm_weight(params.scale * s[r * KBL + c], lse_r[r]);
                    p[r][c] = select(-1.0, w, live[r] && j >= band.x && j <= band.y);
                    g[r][c] = w * (dp[r * KBL + c] - delta_r[r]) * params.scale;
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
                let i = i0 + r;
                let j = j0 + c * WG + lid;
                var pg = vec3<f32>(-1.0, 0.0, 0.0);
                if i < lq && j < lk {
                    let lse = row_lse(row0 + r);
                    if !(lse == ninf) && visible(b, h, i, j, off, lk) {
                        pg = logit_grad(b, h, i, j, off, ts[e], tdp[e], lse, row_delta(row0 + r));
                        if WRITE_DS {
                            dqs[range.dv_offset + (row0 + r) * params.kv_len + j] = pg.y;
                        }
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
        // Which of this lane's keys each row sees, one bit per (row, key): bit (r % 8)·KBL + c of
        // word r / 8. The dQ loop needs P only for that, and moving one word between lanes costs
        // what moving one weight does (a shuffle is a per-component operation on a CPU adapter).
        var vis: array<u32, NVW>;
        for (var w = 0u; w < NVW; w++) { // unroll
            vis[w] = 0u;
        }
        for (var r = 0u; r < R; r++) { // unroll
            for (var c = 0u; c < KBL; c++) { // unroll
                vis[r / 8u] |= select(0u, 1u << ((r % 8u) * KBL + c), !(p[r][c] < 0.0));
            }
        }
        // dQ: lane `lid` adds g·K over every key of the block for its own columns; the values of
        // key j0 + c·WG + u come from lane u.
        for (var c = 0u; c < KBL; c++) {
            var gc: array<f32, R>;
            for (var r = 0u; r < R; r++) { // unroll
                gc[r] = g[r][c];
            }
            for (var u = 0u; u < WG; u++) {
                let jl = min(j0 + c * WG + u, last_key);
                let kbu = b * params.k_sb + jl * params.k_ss + kvh * params.k_sh;
                var vu: array<u32, NVW>;
                for (var w = 0u; w < NVW; w++) { // unroll
                    vu[w] = subgroupShuffle(vis[w], u) >> c;
                }
                var gw: array<f32, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    gw[r] = subgroupShuffle(gc[r], u);
                }
                for (var n = 0u; n < NK8; n++) { // unroll
                    let col = n * WG + lid;
                    let kk = k4(kbu, 4u * min(col, D4 - 1u));
                    for (var r = 0u; r < R; r++) { // unroll
                        let seen = ((vu[r / 8u] >> ((r % 8u) * KBL)) & 1u) != 0u;
                        acc[r * NK8 + n] += select(zero4, gw[r] * kk, seen);
                    }
                }
            }
        }
    }

    store_dq(acc, b, h, i0, lid);
}
