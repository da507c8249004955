// backward_dq_rows.wgsl — dQ = dS·K for CPU adapters, from the logit gradients the key/value
// row pass wrote (backward_kv_rows.wgsl with WRITE_DS), instead of recomputing S, P, dP and dS as
// backward_q_rows.wgsl does: one product per (row, key) instead of three. The host picks it when
// the gradients [B, Hq, Lq, Lk] fit one binding (BackwardPlan::dq_from_ds) and the problem has
// no bias. Written with the recipe of flash_rows.wgsl (read its header first).
//
// ds holds, per row (b·Hq + h)·Lq + i, LK4 = ceil(Lk / 4)·4 words from range.dv_offset (in vec4
// units): the bits of g = dS·∂s/∂dot where key j is visible to the row (a g equal to ±0 stored
// as -0.0, bits 0x80000000), and +0.0 (bits 0) where it is not or nobody wrote (the buffer is
// cleared first). So a key adds g·K exactly when it is visible, as in backward_q_rows.wgsl: an
// invisible key whose K holds inf or NaN adds nothing, a visible one with g = 0 adds 0·K.
//
// One subgroup per workgroup owns R query rows of one (batch, query head). For each block of
// KBL·WG keys the rows can see, lane u reads the gradients of keys j0 + 4u .. j0 + 4u + 3 of all
// R rows as one vec4 per row; then lane `lid` adds g·K over every key of the block for its own
// dQ columns lid + WG·n, key j0 + 4u + c's gradients coming from lane u by shuffle (the same
// order of accumulation per element in every run: deterministic).

override K_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override WG: u32 = 8u;
// K read four elements per load (kernels/ rewrites k4, as for flash_rows.wgsl).
override VEC4_KV: bool = false;

// Query rows per workgroup (kernels/: BackwardTiles::rows), written into this line per
// pipeline (it sizes register arrays, which an override cannot).
override ROWS: u32 = 8u;
const R: u32 = 8u; // rows per workgroup
const KBL: u32 = 4u;
// dQ vec4 columns per lane, ceil(ceil(HEAD_DIM / 4) / WG): rewritten by kernels/ per pipeline.
const NK8: u32 = 2u; // register columns k
// Up to this many columns per lane the key loop takes four keys per accumulator update
// (FlashTiles::ROWS_PV_GROUPED_COLUMNS, the forward's bound).
const KEYS_PER_UPDATE_MAX_COLS: u32 = 4u;
override D4: u32 = (HEAD_DIM + 3u) / 4u;

@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k

fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
// The key/value pass's output [dK][dV][dS]; dS from range.dv_offset vec4s.
@group(0) @binding(7) var<storage, read> ds: array<vec4<f32>>;
// dQ in Q's layout, f32 (query_rows.wgsl's store_dq writes it).
@group(0) @binding(8) var<storage, read_write> dqs: array<f32>;

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
    let zero4 = vec4<f32>(0.0);
    let row0 = (b * params.q_heads + h) * params.q_len + i0;
    let lk4 = (params.kv_len + 3u) / 4u;

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
        // This lane's four keys, every row (rows past the problem's end read nothing).
        let col4 = j0 / 4u + lid;
        var g: array<vec4<u32>, R>;
        for (var r = 0u; r < R; r++) { // unroll
            g[r] = vec4<u32>(0u);
            if i0 + r < params.q_len && col4 < lk4 {
                g[r] = bitcast<vec4<u32>>(ds[range.dv_offset + (row0 + r) * lk4 + col4]);
            }
        }
        if NK8 <= KEYS_PER_UPDATE_MAX_COLS {
            // The four keys of lane u per step, so each accumulator takes all four products in
            // one update (they live in stack memory on a CPU adapter: one load, blend and store
            // per update; flash_rows.wgsl's P·V does the same).
            for (var u = 0u; u < WG; u++) {
                var kk: array<vec4<f32>, KBL * NK8>;
                for (var c = 0u; c < KBL; c++) { // unroll
                    let jl = min(j0 + 4u * u + c, last_key);
                    let kbu = b * params.k_sb + jl * params.k_ss + kvh * params.k_sh;
                    for (var n = 0u; n < NK8; n++) { // unroll
                        kk[c * NK8 + n] = k4(kbu, 4u * min(n * WG + lid, D4 - 1u));
                    }
                }
                for (var r = 0u; r < R; r++) { // unroll
                    let gw = subgroupShuffle(g[r], u);
                    let gf = bitcast<vec4<f32>>(gw);
                    for (var n = 0u; n < NK8; n++) { // unroll
                        var t = select(zero4, gf.x * kk[n], gw.x != 0u);
                        t += select(zero4, gf.y * kk[NK8 + n], gw.y != 0u);
                        t += select(zero4, gf.z * kk[2u * NK8 + n], gw.z != 0u);
                        t += select(zero4, gf.w * kk[3u * NK8 + n], gw.w != 0u);
                        acc[r * NK8 + n] += t;
                    }
                }
            }
        } else {
            // Wide heads: one key per update (the grouped loop's unrolled K loads would cost
            // compile time, as flash_rows.wgsl's PV_BY_KEY).
            for (var c = 0u; c < KBL; c++) {
                var gc: array<u32, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    gc[r] = g[r][c];
                }
                for (var u = 0u; u < WG; u++) {
                    let jl = min(j0 + 4u * u + c, last_key);
                    let kbu = b * params.k_sb + jl * params.k_ss + kvh * params.k_sh;
                    var gw: array<u32, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        gw[r] = subgroupShuffle(gc[r], u);
                    }
                    for (var n = 0u; n < NK8; n++) { // unroll
                        let col = n * WG + lid;
                        let kk = k4(kbu, 4u * min(col, D4 - 1u));
                        for (var r = 0u; r < R; r++) { // unroll
                            acc[r * NK8 + n] += select(zero4, bitcast<f32>(gw[r]) * kk, gw[r] != 0u);
                        }
                    }
                }
            }
        }
    }

    store_dq(acc, b, h, i0, lid);
}
