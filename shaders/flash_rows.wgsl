// flash_rows.wgsl — fused attention with an online softmax for CPU adapters (lavapipe, llvmpipe,
// WARP, SwiftShader): one subgroup per workgroup, R = 8, 16 or 32 query rows, Q in registers
// (staged in workgroup memory for D > 128 on 8 lanes), K and V read straight from the buffers,
// no barrier.
//
// Why this shape (read from Mesa 22.3's gallivm and measured on lavapipe: README, Performance):
// a CPU adapter runs a subgroup of WG invocations (8 with AVX2) as one SIMD vector. Arithmetic
// is one vector instruction, but every load or store of workgroup or storage memory is a loop
// over the lanes whatever the address, and a dynamically indexed function-scope array is memory
// too. Subgroup shuffles stay in registers. So the kernel counts lane loops per FMA:
// - Q·Kᵀ: key j0 + c·WG + lane belongs to lane `lane` (c < KBL). Each lane reads its keys' K as
//   vec4 and computes their logits for all R rows; the q vector every lane needs at step d comes
//   from the lane that holds it (each lane keeps one vec4 of every row per chunk of WG vec4 in
//   registers, read once; Q_STAGED: in workgroup memory) through subgroupShuffle. One K vector
//   a lane loads feeds R·4 FMAs (`dot_chunk`, row_chunks.wgsl).
// - Softmax: the block's row max through subgroupMax (the same in every lane), then each lane's
//   weights and its share of the row sum (subgroupAdd once at the end).
// - P·V: lane `lane` owns the output vec4 columns lane + WG·n (n < NV8) of all R rows in
//   registers; the weights of keys (c, u), c < KBL, come from lane u as one vec4 per row by
//   shuffle, and each accumulator takes all KBL products in one update (PV_BY_KEY: one key per
//   update). One V vector feeds R·4 FMAs.
// Register arrays (logits, weights, accumulators) are only ever indexed by constants: loops
// marked `// unroll` are unrolled in the text by kernels/ (`unroll_marked`); the loops over
// keys of a block, lanes and vec4 columns inside a chunk stay loops (unrolling them too took
// lavapipe 7-30 s to compile for no gain).
// Two things gallivm does that shaped the rest (read from Mesa 22.3 and its JIT output under
// perf, 2026-12-06): llvmpipe runs every compute workgroup as a coroutine and a barrier is a
// suspend point (Q once staged in workgroup memory behind a barrier, and re-read from it every
// block, cost 20-25% of the run time against Q in registers); and register arrays this large
// live in stack memory, where each update of a loop-carried value is a load, a blend with the
// lane mask and a store, so an accumulator should take several products per update.
//
// The semantics are flash.wgsl's, through the same functions (visible, finish_logit, the softmax
// rules): masked keys weigh exactly 0 and their p·v product is dropped by a select; in the
// general variant, blocks that every valid row of the workgroup sees whole skip the per-element
// checks (the plain variant's band path costs two comparisons per logit in every block).
// PACK_GQA, PAGED and the key chunks of split-K work as in flash.wgsl, and the bindings are the
// same.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override WG: u32 = 8u;
// K and V read four elements per load (k4/v4 in kv_loads.wgsl; set by kernels/ with the rewrite).
override VEC4_KV: bool = false;
// The problem has no mask, bias, ALiBi or soft cap (set by the host from the problem): only
// bands and lengths hide keys, so the general per-logit path below is dead and compiles away.
// Why a variant: gallivm (lavapipe, llvmpipe) compiles both sides of every branch and runs
// them under a lane mask, and that path was a third of the 16-row kernel's compile (whole first
// process at 1,1024,2,64, Mesa's cache off: 2.6-4.0 -> 1.6-1.9 s; run time within noise).
override PLAIN_LOGITS: bool = false;

// Query rows per workgroup (every lane works on all of them) and keys per lane per block: a
// block is KBL·WG keys, key j0 + c·WG + lane for c < KBL; the running max moves once per block.
// kernels/ mirrors both (FlashTiles::ROWS_R, ROWS_KBL).
// R is the host's ROWS (8, 16 or 32; FlashTiles::row_count), written into this line per pipeline
// (it sizes register arrays, which an override cannot).
override ROWS: u32 = 8u;
const R: u32 = 8u; // rows per workgroup
const KBL: u32 = 4u;
// Lane `lane` owns the output vec4 columns lane + WG·n, n < NV8 = ceil(ceil(V_DIM / 4) / WG). A
// function-scope array needs a constant size, which an override cannot give, so kernels/
// rewrites this line for each pipeline.
const NV8: u32 = 2u; // register columns
// Lane `lane` holds the q vec4 columns lane + WG·n, n < NQ8 = ceil(ceil(HEAD_DIM / 4) / WG), of
// every row (rewritten per pipeline like NV8); Q·Kᵀ walks them chunk by chunk (unrolled),
// shuffling each to every lane.
const NQ8: u32 = 2u; // register columns q
// Wider heads (more than FlashTiles::ROWS_Q_REGISTER_COLUMNS chunks: D > 128 on 8 lanes) stage
// Q once in workgroup memory instead, QS = R·ND8·WG vec4 (1 otherwise), and walk the chunks in a
// loop: their unrolled chunks cost more compile than they saved (D = 256: first call 2.0 -> 3.0 s
// for 14%). NQ8 (1 when staged) and QS are rewritten per pipeline by kernels/, which sets the
// Q_STAGED override with them. No barrier: each lane reads back only the slots it wrote
// (x ≡ lane mod WG), and a barrier is a coroutine suspend point on llvmpipe.
const QS: u32 = 1u; // staged q
override Q_STAGED: bool = false;
// P·V takes one key per accumulator update where the output has more than
// FlashTiles::ROWS_PV_GROUPED_COLUMNS vec4 columns per lane (Dv > 128 on 8 lanes), and KBL keys
// per update otherwise (each update of
// an accumulator in stack memory is a load, a blend and a store on a CPU adapter: 1,1024,2,64
// 13.5 -> 12 ms, 4,256,2,64 3.9 -> 3.5), whose unrolled copies at NV8 = 8 cost 1 s of compile.
override PV_BY_KEY: bool = false;
// P·V drops its zero-weight selects in steps whose V vectors are all finite (there a weight of
// 0 adds ±0 either way), behind a branch every lane takes alike (subgroupAny); the selects run
// only in steps with an inf or NaN in V. Set by the host where the driver skips the side of a
// branch no lane takes (Engine::finite_v_branch: Mesa >= 26's llvmpipe, whose JIT turns each
// select on a shuffled weight into a masked move per product, 1024 per step at R = 32: 1,1024,2,64
// 10.5 -> 8.5 ms without them). Mesa 22 runs both sides of every branch under a lane mask, and
// its selects cost nothing measurable (README, Performance), so it keeps the selects alone.
override FINITE_V_BRANCH: bool = false;
override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
override ND8: u32 = (D4 + WG - 1u) / WG;

var<workgroup> q_s: array<vec4<f32>, QS>;

// Row `rr` of a unit, vec4 column d4 of q (zero past the head dim or the valid rows).
fn load_q_row(b: u32, unit: u32, rr: u32, unit_rows: u32, lq: u32, d4: u32) -> vec4<f32> {
    var val = vec4<f32>(0.0);
    let ii = row_pos(rr);
    if rr < unit_rows && ii < lq && d4 < D4 {
        let base = b * params.q_sb + ii * params.q_ss + row_head(unit, rr) * params.q_sh + 4u * d4;
        for (var c = 0u; c < 4u; c++) {
            if 4u * d4 + c < HEAD_DIM {
                val[c] = load_q(base + c);
            }
        }
    }
    return val;
}

// The operand of Q·Kᵀ that dot_chunk (row_chunks.wgsl) loads: K.
fn row_vec4(which: u32, base: u32, d0: u32) -> vec4<f32> {
    return k4(base, d0);
}

// P·V of one step: every row's accumulators take the KBL products of the keys of lane u (their
// weights shuffled from lane u, one vec4 per row), in one update each. `guarded` (a constant at
// both calls, so each copy compiles one form) drops every zero-weight product by a select, so a
// hidden key's inf or NaN in V adds nothing; unguarded is for steps whose V is finite and takes
// the products by fused multiply-adds (one instruction where a multiply and an add were two:
// Mesa 26, 1,1024,2,64 8.5 -> 8.0 ms). With FINITE_V_BRANCH the guarded form chains the same
// `fma` calls under selects, so where the compiler fuses every `fma` (Mesa 26) a step's
// results are the same on either side up to the sign of an exact zero. Without it (Mesa 22)
// the guarded form keeps separate products, summed then added: the chained form ran no faster
// there and cost its first call 0.1-0.15 s of compile (1,1024,2,64, Mesa's cache off).
fn add_pv(acc: ptr<function, array<vec4<f32>, R * NV8>>, p: array<vec4<f32>, R>, vv: array<vec4<f32>, KBL * NV8>, u: u32, guarded: bool) {
    let zero4 = vec4<f32>(0.0);
    for (var r = 0u; r < R; r++) { // unroll
        let w = subgroupShuffle(p[r], u);
        for (var n = 0u; n < NV8; n++) { // unroll
            let v0 = vv[n];
            let v1 = vv[NV8 + n];
            let v2 = vv[2u * NV8 + n];
            let v3 = vv[3u * NV8 + n];
            var a = (*acc)[r * NV8 + n];
            if !guarded {
                a = fma(vec4(w.w), v3, fma(vec4(w.z), v2, fma(vec4(w.y), v1, fma(vec4(w.x), v0, a))));
            } else if FINITE_V_BRANCH {
                a = select(a, fma(vec4(w.x), v0, a), !(w.x == 0.0));
                a = select(a, fma(vec4(w.y), v1, a), !(w.y == 0.0));
                a = select(a, fma(vec4(w.z), v2, a), !(w.z == 0.0));
                a = select(a, fma(vec4(w.w), v3, a), !(w.w == 0.0));
            } else {
                var t = select(zero4, w.x * v0, !(w.x == 0.0));
                t += select(zero4, w.y * v1, !(w.y == 0.0));
                t += select(zero4, w.z * v2, !(w.z == 0.0));
                t += select(zero4, w.w * v3, !(w.w == 0.0));
                a += t;
            }
            (*acc)[r * NV8 + n] = a;
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var unit_rows = params.q_len;
    var units = params.batch * params.q_heads;
    if PACK_GQA {
        unit_rows = params.q_len * params.group;
        units = params.batch * params.kv_heads;
    }
    let tiles_i = (unit_rows + R - 1u) / R;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_i * units * params.num_chunks {
        return;
    }
    let ti = flat % tiles_i;
    let unit = (flat / tiles_i) % units;
    let chunk = flat / (tiles_i * units);
    var b = unit / params.q_heads;
    var kvh = (unit % params.q_heads) / params.group;
    if PACK_GQA {
        b = unit / params.kv_heads;
        kvh = unit % params.kv_heads;
    }
    let r0 = ti * R;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let zero4 = vec4<f32>(0.0);

    // Q in registers: slot r·NQ8 + n holds q[row r][vec4 column n·WG + lid]; loaded one row per
    // iteration into the last slots, every slot moving down one (constant indices only). Staged
    // instead: q_s[(r·ND8 + n)·WG + lane] = q[row r][vec4 column n·WG + lane].
    var qreg: array<vec4<f32>, R * NQ8>;
    if Q_STAGED {
        for (var x = lid; x < R * ND8 * WG; x += WG) {
            let r = x / (ND8 * WG);
            let d4 = x % (ND8 * WG);
            q_s[x] = load_q_row(b, unit, r0 + r, unit_rows, lq, d4);
        }
    } else {
        for (var r = 0u; r < R; r++) {
            for (var k = 0u; k < R - 1u; k++) { // unroll
                for (var n = 0u; n < NQ8; n++) { // unroll
                    qreg[k * NQ8 + n] = qreg[(k + 1u) * NQ8 + n];
                }
            }
            for (var n = 0u; n < NQ8; n++) { // unroll
                qreg[(R - 1u) * NQ8 + n] = load_q_row(b, unit, r0 + r, unit_rows, lq, n * WG + lid);
            }
        }
    }

    let i_first = row_pos(r0);
    let i_last = row_pos(min(r0 + R, unit_rows) - 1u);
    let keys = key_band(i_first, i_last, lq, lk, off, chunk);
    let j_lo = keys.x;
    let j_hi = keys.y;
    let all_lo = keys.z;
    let all_hi = keys.w;
    let no_masks = !has(F_MASK) && !has(F_BIAS);
    let last_row = i32(params.kv_len) - 1;

    // Row max (the same in every lane), this lane's share of the row sum, and the output
    // columns this lane owns.
    var m: array<f32, R>;
    var l: array<f32, R>;
    var acc: array<vec4<f32>, R * NV8>;
    for (var r = 0u; r < R; r++) { // unroll
        m[r] = ninf;
        l[r] = 0.0;
        for (var n = 0u; n < NV8; n++) { // unroll
            acc[r * NV8 + n] = zero4;
        }
    }

    // Each row's visible keys from the bands, this chunk's end and the key length alone
    // (inclusive; empty for a row past the valid query length): the band path below.
    var band_lo: array<i32, R>;
    var band_hi: array<i32, R>;
    for (var r = 0u; r < R; r++) { // unroll
        let rr = r0 + r;
        let i = row_pos(rr);
        let band = band_limits(i, off, lk);
        band_lo[r] = band.x;
        band_hi[r] = select(-1, min(band.y, j_hi - 1), rr < unit_rows && i < lq);
    }

    for (var j0 = j_lo; j0 < j_hi; j0 += i32(WG * KBL)) {
        // S: lane `lid` computes the logits of its keys j0 + c·WG + lid for the R rows.
        var kb: array<u32, KBL>;
        for (var c = 0u; c < KBL; c++) { // unroll
            let jl = u32(clamp(j0 + i32(c * WG + lid) - i32(params.key_base), 0, last_row));
            kb[c] = kv_row(b, jl, params.k_sb, params.k_ss) + kvh * params.k_sh;
        }
        var s: array<f32, R * KBL>;
        for (var e = 0u; e < R * KBL; e++) { // unroll
            s[e] = 0.0;
        }
        if Q_STAGED {
            for (var n = 0u; n < ND8; n++) {
                var qd: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    qd[r] = q_s[(r * ND8 + n) * WG + lid];
                }
                dot_chunk(n, D4, qd, kb, 0u, &s);
            }
        } else {
            for (var n = 0u; n < NQ8; n++) { // unroll
                var qd: array<vec4<f32>, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    qd[r] = qreg[r * NQ8 + n];
                }
                dot_chunk(n, D4, qd, kb, 0u, &s);
            }
        }
        let clean = no_masks && j0 >= all_lo && j0 + i32(WG * KBL) <= all_hi;
        if PLAIN_LOGITS {
            // Only the bands and lengths hide keys: two comparisons per logit against the rows'
            // limits, unrolled so the logits stay in registers; the same decision as the general
            // path below (band_limits is visible without a mask, the scale is finish_logit
            // without bias, ALiBi or cap). Blocks every row sees whole take it too: a separate
            // clean branch would only be compiled and run beside it (gallivm runs both sides of
            // a branch), 0.3 s of the 32-row kernel's compile for no run-time gain.
            for (var e = 0u; e < R * KBL; e++) { // unroll
                let j = j0 + i32((e % KBL) * WG + lid);
                let ok = j >= band_lo[e / KBL] && j <= band_hi[e / KBL];
                s[e] = select(ninf, params.scale * s[e], ok);
            }
        } else {
            var t: array<f32, R * KBL>;
            for (var e = 0u; e < R * KBL; e++) { // unroll
                t[e] = s[e];
            }
            for (var e = 0u; e < R * KBL; e++) {
                let r = e / KBL;
                let c = e % KBL;
                let rr = r0 + r;
                let i = row_pos(rr);
                let h = row_head(unit, rr);
                let j = u32(j0) + c * WG + lid;
                var x = ninf;
                let ok = rr < unit_rows && i < lq;
                if clean || (ok && i32(j) < j_hi && visible(b, h, i, j, off, lk)) {
                    x = finish_logit(b, h, i, j, off, t[e]);
                }
                t[e] = x;
            }
            for (var e = 0u; e < R * KBL; e++) { // unroll
                s[e] = t[e];
            }
        }
        // Softmax: the block's row max over every lane's keys, then this lane's weights.
        var alpha: array<f32, R>;
        // Weights as one vec4 per row (KBL = 4): the PV loop below picks a key by a dynamic
        // component index, which compiles to selects; a dynamic index into an array would put
        // the array in memory.
        var p: array<vec4<f32>, R>;
        for (var r = 0u; r < R; r++) { // unroll
            var mb = m[r];
            for (var c = 0u; c < KBL; c++) { // unroll
                mb = max(mb, s[r * KBL + c]);
            }
            mb = subgroupMax(mb);
            alpha[r] = sm_rescale(m[r], mb);
            var ps = 0.0;
            for (var c = 0u; c < KBL; c++) { // unroll
                let w = sm_weight(s[r * KBL + c], mb);
                p[r][c] = w;
                ps += w;
            }
            l[r] = l[r] * alpha[r] + ps;
            m[r] = mb;
            for (var n = 0u; n < NV8; n++) { // unroll
                acc[r * NV8 + n] *= alpha[r];
            }
        }
        // O: lane `lid` adds p·V for its own output columns; lane u holds the weights of the
        // keys j0 + c·WG + u (c < KBL) as one vec4 per row. A weight of 0 adds nothing even
        // where V is NaN or inf: a hidden key's, and a visible key's whose weight underflowed
        // (README, Semantics), in every block. (One formula: gallivm would run a clean-block
        // branch beside it.)
        if PV_BY_KEY {
            // Wide heads: one key per step, its weights from lane u by shuffle.
            for (var c = 0u; c < KBL; c++) {
                var pc: array<f32, R>;
                for (var r = 0u; r < R; r++) { // unroll
                    pc[r] = p[r][c];
                }
                for (var u = 0u; u < WG; u++) {
                    let jl = u32(clamp(j0 + i32(c * WG + u) - i32(params.key_base), 0, last_row));
                    let vb = kv_row(b, jl, params.v_sb, params.v_ss) + kvh * params.v_sh;
                    var w: array<f32, R>;
                    for (var r = 0u; r < R; r++) { // unroll
                        w[r] = subgroupShuffle(pc[r], u);
                    }
                    for (var n = 0u; n < NV8; n++) { // unroll
                        let vv = v4(vb, 4u * min(n * WG + lid, DV4 - 1u));
                        for (var r = 0u; r < R; r++) { // unroll
                            acc[r * NV8 + n] += select(zero4, w[r] * vv, !(w[r] == 0.0));
                        }
                    }
                }
            }
        } else {
            // KBL keys per step, so each accumulator takes KBL products per update (they live
            // in stack memory on a CPU adapter: one load, blend and store per update).
            for (var u = 0u; u < WG; u++) {
                var vv: array<vec4<f32>, KBL * NV8>;
                for (var c = 0u; c < KBL; c++) { // unroll
                    let jl = u32(clamp(j0 + i32(c * WG + u) - i32(params.key_base), 0, last_row));
                    let vb = kv_row(b, jl, params.v_sb, params.v_ss) + kvh * params.v_sh;
                    for (var n = 0u; n < NV8; n++) { // unroll
                        vv[c * NV8 + n] = v4(vb, 4u * min(n * WG + lid, DV4 - 1u));
                    }
                }
                var finite_v = false;
                if FINITE_V_BRANCH {
                    var bad = false;
                    for (var c = 0u; c < KBL; c++) { // unroll
                        for (var n = 0u; n < NV8; n++) { // unroll
                            let e = bitcast<vec4<u32>>(vv[c * NV8 + n]) & vec4(0x7f800000u);
                            bad = bad | any(e == vec4(0x7f800000u)); // `|`: no branch
                        }
                    }
                    finite_v = !subgroupAny(bad);
                }
                if finite_v {
                    add_pv(&acc, p, vv, u, false);
                } else {
                    add_pv(&acc, p, vv, u, true);
                }
            }
        }
    }

    let rows = params.batch * params.q_heads * params.q_len;
    // One loop over the rows with one copy of the stores: row r's statistics and output are
    // picked from the registers (constant indices) by a chain of selects. Each storage store is
    // a lane loop with bounds checks in gallivm; unrolled per row (and an inner loop per
    // component) they were half of the 16-row kernel's compile (whole first process, Mesa's
    // cache off, 1,1024,2,64 1.6-1.9 -> 0.8-0.9 s, D = 128 3.4 -> 1.4 s). The selects replaced
    // moving every slot down one per row (5.7% of the run time at 4,256,2,64 under perf against
    // 6.9%: a move of a loop-carried register is a load, a blend and a store).
    for (var r = 0u; r < R; r++) {
        var lr = l[0];
        var mr = m[0];
        var ar: array<vec4<f32>, NV8>;
        for (var n = 0u; n < NV8; n++) { // unroll
            ar[n] = acc[n];
        }
        for (var k = 0u; k < R - 1u; k++) { // unroll
            let pick = r == k + 1u;
            lr = select(lr, l[k + 1u], pick);
            mr = select(mr, m[k + 1u], pick);
            for (var n = 0u; n < NV8; n++) { // unroll
                ar[n] = select(ar[n], acc[(k + 1u) * NV8 + n], pick);
            }
        }
        let ll = subgroupAdd(lr);
        let rr = r0 + r;
        let i = row_pos(rr);
        let h = row_head(unit, rr);
        if rr < unit_rows {
            let valid = i < lq && sm_row_valid(ll);
            let row = chunk * rows + (b * params.q_heads + h) * params.q_len + i;
            var o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
            if params.num_chunks > 1u {
                o_base = row * V_DIM;
            }
            for (var n = 0u; n < NV8; n++) { // unroll
                let col = n * WG + lid;
                var o = zero4;
                if valid {
                    o = ar[n] / ll;
                }
                store_o(o_base + 4u * col, col, o);
            }
            if lid == 0u {
                lse[row] = select(ninf, sm_lse(mr, ll), valid);
            }
        }
    }
}
