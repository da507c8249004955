// flash_coop.wgsl — fused attention on matrix units through cooperative matrices: Q·Kᵀ and P·V as
// EDGE x EDGE x EDGE f16 products with f32 accumulation (EDGE = 8: Apple's simdgroup matrices and
// Mesa >= 26 lavapipe; 16: NVIDIA, AMD, Intel), the online softmax in scalar code through
// workgroup memory (cooperative matrices have no per-element access).
//
// Structure (FlashAttention-2's, in WGSL's matrix model), with the reasons:
// - A workgroup is NS subgroups; subgroup `sg` owns EDGE query rows, so the workgroup owns
//   BQ = NS * EDGE rows of one (batch, head) and all NS subgroups share each staged K/V tile of
//   BK keys: global K/V traffic and staging work fall by NS against one subgroup per workgroup.
// - Q is staged once (f16) and loaded into matrix registers once: each subgroup holds its rows
//   as HEAD_DIM / EDGE fragments (qf_0, qf_1, ...) for the whole key loop. WGSL cannot size an
//   array of cooperative matrices by an override, so blocks marked `// each t < DQ {` are
//   written out by the host once per fragment with numbered variables (kernels::expand_marked).
//   Q's staging memory is then free, so it is the same memory as the K/V tiles (`STAGE`, the
//   larger of the two, from the host: CoopTiles::stage_len): that doubles the key tile at
//   D = 128 on 32 and 48 KiB adapters.
// - O stays in V_DIM / EDGE accumulators (of_0, ...) across all key tiles. S = Q·Kᵀ goes into
//   BK / EDGE independent accumulators: one accumulator chained through every product made each
//   product wait for the previous (on Mesa 26 lavapipe the chained kernel reached 0.58x of the
//   probe's matmul rate, this one 1.0x).
// - Lazy rescale: a row's reference max m moves only when a tile's max exceeds it by more than
//   TAU (e^8 ≈ 2981 keeps P well inside f16 and l inside f32); otherwise P = exp(s − m) with the
//   stale m is exact algebra, and the O row is not touched. When some row's max moved (and it
//   had keys before: else its O is exactly 0), or a non-finite V value must be added, O goes
//   through workgroup memory for that tile: stored, rescaled and fixed up per row in scalar
//   code, reloaded. Cooperative operations need uniform control flow, so that branch is taken on
//   a workgroup-uniform flag (workgroupUniformLoad).
// - Logits and P are computed by all NS * WG lanes (one element each), only the per-row max and
//   sum by one lane per row.
// - Row strides of the workgroup arrays are padded by 16 bytes (8 f16 or 4 f32): rows of
//   2·D bytes with D a multiple of 64 would otherwise start on the same bank; 16 bytes keeps the
//   alignment cooperative loads want.
// - Staging loads 4 consecutive elements per lane per step (one 16-byte load for f32, two words
//   for packed f16/bf16).
// Semantics: a key a row cannot see contributes nothing. Its P entry is exactly 0, and V is
// staged with non-finite values replaced by 0 (a flag per subgroup records that this happened),
// so 0 · V is 0; when a tile had any, each row adds p · v for the non-finite values of its
// visible keys afterwards in scalar code (so inf and NaN in V still reach the rows that see
// them, as in the reference). Keys past the valid length are staged as 0.
// Known naga 30 bug: a cooperative load or store whose index is an inline expression panics the
// SPIR-V writer, so every index is bound to a `let` first.
// The host rewrites `coop_mat16x16` to `coop_mat8x8` for EDGE = 8 (a type cannot be overridden).

override Q_DT: u32 = 1u;
override K_DT: u32 = 1u;
override V_DT: u32 = 1u;
override HEAD_DIM: u32 = 64u; // a multiple of EDGE
override V_DIM: u32 = 64u; // a multiple of EDGE
override WG: u32 = 32u; // the subgroup size
override NS: u32 = 4u; // subgroups per workgroup
override BK: u32 = 32u; // keys per tile, a multiple of EDGE
override EDGE: u32 = 16u; // the matrix edge

fn load_q4(idx: u32) -> vec4<f32> {
    return vec4<f32>(load_q(idx), load_q(idx + 1u), load_q(idx + 2u), load_q(idx + 3u));
}
fn load_k4(idx: u32) -> vec4<f32> {
    return vec4<f32>(load_k(idx), load_k(idx + 1u), load_k(idx + 2u), load_k(idx + 3u));
}
fn load_v4(idx: u32) -> vec4<f32> {
    return vec4<f32>(load_v(idx), load_v(idx + 1u), load_v(idx + 2u), load_v(idx + 3u));
}

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

const TAU: f32 = 8.0;

override BQ: u32 = NS * EDGE; // query rows per workgroup
override QS: u32 = HEAD_DIM + 8u; // f16 row stride of Q and K
override VS: u32 = V_DIM + 8u; // f16 row stride of V
override SS: u32 = BK + 4u; // f32 row stride of S
override PS: u32 = BK + 8u; // f16 row stride of P
override OS: u32 = V_DIM + 4u; // f32 row stride of O

// Q at the start (BQ rows of stride QS), then each tile's K (BK rows of stride QS, from 0) and V
// (BK rows of stride VS, from VO). STAGE = max(BQ * QS, BK * QS + BK * VS), set by the host.
override STAGE: u32 = BK * QS + BK * VS;
override VO: u32 = BK * QS; // where V starts
var<workgroup> kvq_h: array<f16, STAGE>;
var<workgroup> s_f: array<f32, BQ * SS>;
var<workgroup> p_h: array<f16, BQ * PS>;
var<workgroup> o_f: array<f32, BQ * OS>;
var<workgroup> m_w: array<f32, BQ>; // each row's reference max for this tile
var<workgroup> a_w: array<f32, BQ>; // each row's rescale factor for this tile (1: none)
var<workgroup> l_w: array<f32, BQ>; // each row's final sum
var<workgroup> bad_sg: array<u32, NS>; // a subgroup staged a non-finite V value as 0
var<workgroup> fix_w: array<u32, BQ>; // this row's O must be rescaled (or fixed up) this tile
var<workgroup> fix_any: u32; // some row's O must: O goes through workgroup memory this tile

@compute @workgroup_size(NS * WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let nt = NS * WG;
    let tiles_i = (params.q_len + BQ - 1u) / BQ;
    let units = params.batch * params.q_heads;
    // No early return: cooperative-matrix operations need uniform control flow all the way, so
    // a workgroup past the grid runs an empty key range and writes nothing.
    let groups = tiles_i * units * params.num_chunks;
    let live = folded_group(wg, nwg) < groups;
    let flat = min(folded_group(wg, nwg), groups - 1u);
    let ti = flat % tiles_i;
    let unit = (flat / tiles_i) % units;
    let chunk = flat / (tiles_i * units);
    let h = unit % params.q_heads;
    let b = unit / params.q_heads;
    let kvh = h / params.group;
    let i0 = ti * BQ;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();

    for (var x = lid * 4u; x < BQ * HEAD_DIM; x += nt * 4u) {
        let rr = x / HEAD_DIM;
        let c = x % HEAD_DIM;
        let ii = i0 + rr;
        var val = vec4<f32>(0.0);
        if ii < lq {
            val = load_q4(b * params.q_sb + ii * params.q_ss + h * params.q_sh + c);
        }
        let o = rr * QS + c;
        kvq_h[o] = f16(val.x);
        kvq_h[o + 1u] = f16(val.y);
        kvq_h[o + 2u] = f16(val.z);
        kvq_h[o + 3u] = f16(val.w);
    }
    workgroupBarrier();
    let sq = sg * EDGE; // this subgroup's first row in the tile
    // This subgroup's Q rows, in matrix registers for the whole key loop: HEAD_DIM / EDGE
    // fragments (qf_0, qf_1, ...; the host writes one line per fragment, because WGSL cannot
    // size an array of cooperative matrices by the head dim).
    // each t < DQ {
    let qo_{t} = sq * QS + {t}u * EDGE;
    let qf_{t} = coopLoadT<coop_mat16x16<f16, A>>(&kvq_h[qo_{t}], QS);
    // } each t
    // This subgroup's O rows, in accumulators across all key tiles (of_0, of_1, ...: V_DIM /
    // EDGE of them). They go through workgroup memory only in a tile where a row's reference max
    // moves (rare: the lazy rescale) or a non-finite V value must be added, and at the end.
    // each t < DO {
    var of_{t} = coop_mat16x16<f32, C>();
    // } each t

    // Keys visible to at least one row of this tile: [j_lo, j_hi); this dispatch holds keys
    // [key_base, key_base + kv_len); with num_chunks > 1 this workgroup takes one chunk of them.
    let band = visible_key_range(i0, min(i0 + BQ, params.q_len) - 1u, lq, lk, off);
    var j_lo = max(band.x, i32(params.key_base));
    var j_hi = min(band.y, i32(params.key_base + params.kv_len));
    if params.num_chunks > 1u {
        j_lo = max(j_lo, i32(params.key_base + chunk * params.chunk_keys));
        j_hi = min(j_hi, i32(params.key_base + (chunk + 1u) * params.chunk_keys));
    }
    if !live {
        j_hi = j_lo;
    }

    // Row statistics live in the lane that owns the row (lid < BQ).
    let r = lid;
    let i = i0 + r;
    var m = ninf;
    var l = 0.0;
    var j0 = (j_lo / i32(BK)) * i32(BK);
    for (; j0 < j_hi; j0 += i32(BK)) {
        let ju = u32(j0);
        workgroupBarrier(); // everyone is done with the previous tile
        for (var x = lid * 4u; x < BK * HEAD_DIM; x += nt * 4u) {
            let kk = x / HEAD_DIM;
            let c = x % HEAD_DIM;
            let jj = ju + kk;
            var val = vec4<f32>(0.0);
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base;
                val = load_k4(b * params.k_sb + jl * params.k_ss + kvh * params.k_sh + c);
            }
            let o = kk * QS + c;
            kvq_h[o] = f16(val.x);
            kvq_h[o + 1u] = f16(val.y);
            kvq_h[o + 2u] = f16(val.z);
            kvq_h[o + 3u] = f16(val.w);
        }
        var bad = false;
        for (var x = lid * 4u; x < BK * V_DIM; x += nt * 4u) {
            let kk = x / V_DIM;
            let c = x % V_DIM;
            let jj = ju + kk;
            var val = vec4<f32>(0.0);
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base;
                val = load_v4(b * params.v_sb + jl * params.v_ss + kvh * params.v_sh + c);
            }
            let fin = vec4<bool>(finite(val.x), finite(val.y), finite(val.z), finite(val.w));
            bad = bad || !all(fin);
            val = select(vec4<f32>(0.0), val, fin);
            let o = VO + kk * VS + c;
            kvq_h[o] = f16(val.x);
            kvq_h[o + 1u] = f16(val.y);
            kvq_h[o + 2u] = f16(val.z);
            kvq_h[o + 3u] = f16(val.w);
        }
        let sg_bad = subgroupAny(bad);
        if lane == 0u {
            bad_sg[sg] = u32(sg_bad);
        }
        workgroupBarrier();

        // S = Q·Kᵀ for this subgroup's rows: A = the Q fragments, B = Kᵀ (K row-major is Kᵀ
        // column-major), f32 accumulation: one load per product.
        // each u < KQ {
        var acc_{u} = coop_mat16x16<f32, C>();
        // } each u
        // each t < DQ {
        // each u < KQ {
        let ko_{t}_{u} = {u}u * EDGE * QS + {t}u * EDGE;
        acc_{u} = coopMultiplyAdd(qf_{t}, coopLoad<coop_mat16x16<f16, B>>(&kvq_h[ko_{t}_{u}], QS), acc_{u});
        // } each u
        // } each t
        // each u < KQ {
        let so_{u} = sq * SS + {u}u * EDGE;
        coopStoreT(acc_{u}, &s_f[so_{u}], SS);
        // } each u
        workgroupBarrier();

        // The semantics of each logit (logits.wgsl), one element per lane; invisible = −inf.
        for (var x = lid; x < BQ * BK; x += nt) {
            let rr = x / BK;
            let kk = x % BK;
            let ii = i0 + rr;
            let j = ju + kk;
            let o = rr * SS + kk;
            var s = ninf;
            // [j_lo, j_hi) bounds this workgroup's keys; tiles are aligned to BK.
            let mine = i32(j) >= j_lo && i32(j) < j_hi;
            if mine && ii < lq && visible(b, h, ii, j, off, lk) {
                s = finish_logit(b, h, ii, j, off, s_f[o]);
            }
            s_f[o] = s;
        }
        workgroupBarrier();

        // Per row: the tile's max, and the lazy rescale (see the header). O is rescaled below
        // only where a row had keys before (else it is still exactly 0).
        if lid < BQ {
            var m_tile = ninf;
            for (var kk = 0u; kk < BK; kk++) {
                m_tile = max(m_tile, s_f[r * SS + kk]);
            }
            var alpha = 1.0;
            let had_keys = m != ninf;
            if m_tile > m + TAU {
                alpha = sm_rescale(m, m_tile);
                l *= alpha;
                m = m_tile;
            }
            m_w[r] = m;
            a_w[r] = alpha;
            var bad_any = 0u;
            for (var s = 0u; s < NS; s++) {
                bad_any |= bad_sg[s];
            }
            fix_w[r] = u32(had_keys && alpha != 1.0) | bad_any;
        }
        workgroupBarrier();

        // P = exp(s − m) in f16, one element per lane. Invisible keys give exactly 0; a NaN
        // logit gives NaN (it poisons its row through l and O, semantics item 7).
        for (var x = lid; x < BQ * BK; x += nt) {
            let rr = x / BK;
            let kk = x % BK;
            let s = s_f[rr * SS + kk];
            p_h[rr * PS + kk] = f16(sm_weight(s, m_w[rr]));
        }
        if lid == 0u {
            var flag = 0u;
            for (var rr = 0u; rr < BQ; rr++) {
                flag |= fix_w[rr];
            }
            fix_any = flag;
        }
        // A workgroup-uniform answer (cooperative operations need uniform control flow): does
        // O go through workgroup memory this tile? Also the barrier after P.
        if workgroupUniformLoad(&fix_any) != 0u {
            // each t < DO {
            let oo_{t} = sq * OS + {t}u * EDGE;
            coopStoreT(of_{t}, &o_f[oo_{t}], OS);
            // } each t
            workgroupBarrier();
            if lid < BQ && fix_w[r] != 0u {
                let alpha = a_w[r];
                for (var c = 0u; c < V_DIM; c++) {
                    o_f[r * OS + c] *= alpha;
                }
                // Non-finite V values were staged as 0; the rows that see their keys add them.
                for (var kk = 0u; kk < BK; kk++) {
                    let s = s_f[r * SS + kk];
                    if s == ninf {
                        continue;
                    }
                    let p = sm_weight(s, m);
                    // A weight that underflowed to 0 skips its key like a hidden one (README,
                    // Semantics): 0 · inf would be NaN.
                    if p == 0.0 {
                        continue;
                    }
                    let jl = ju + kk - params.key_base;
                    let base = b * params.v_sb + jl * params.v_ss + kvh * params.v_sh;
                    for (var c = 0u; c < V_DIM; c++) {
                        let val = load_v(base + c);
                        if !finite(val) {
                            o_f[r * OS + c] += p * val;
                        }
                    }
                }
            }
            workgroupBarrier();
            // each t < DO {
            of_{t} = coopLoadT<coop_mat16x16<f32, C>>(&o_f[oo_{t}], OS);
            // } each t
        }

        // The row sums of what P·V multiplies (the f16 P), so O stays normalised.
        if lid < BQ {
            var row_sum = 0.0;
            for (var kk = 0u; kk < BK; kk++) {
                row_sum += f32(p_h[r * PS + kk]);
            }
            l += row_sum;
        }
        // O += P·V for this subgroup's rows: the P fragments loaded once, then one V load per
        // product into the accumulators.
        for (var kb = 0u; kb < BK; kb += EDGE) {
            let po = sq * PS + kb;
            let pa = coopLoadT<coop_mat16x16<f16, A>>(&p_h[po], PS);
            // each t < DO {
            let vo_{t} = VO + kb * VS + {t}u * EDGE;
            of_{t} = coopMultiplyAdd(pa, coopLoadT<coop_mat16x16<f16, B>>(&kvq_h[vo_{t}], VS), of_{t});
            // } each t
        }
    }

    // O to workgroup memory once, then normalised rows out. Unsplit: O in the problem's
    // layout. Split: partial O as [chunk][b][h][i][Dv] and partial LSE as [chunk][b][h][i], for
    // the merge pass.
    workgroupBarrier();
    // each t < DO {
    let oe_{t} = sq * OS + {t}u * EDGE;
    coopStoreT(of_{t}, &o_f[oe_{t}], OS);
    // } each t
    let rows = params.batch * params.q_heads * params.q_len;
    if live && lid < BQ && i < params.q_len {
        // l is 0 exactly when no key was visible; NaN when a logit was NaN.
        let valid = i < lq && sm_row_valid(l);
        let row = chunk * rows + (b * params.q_heads + h) * params.q_len + i;
        lse[row] = select(ninf, sm_lse(m, l), valid);
        l_w[r] = select(0.0, l, valid);
    }
    // Four columns per step (V_DIM is a multiple of EDGE), stored through fused_io.wgsl's
    // store_o: in f32, or in the half variant two halves per word (half_out.wgsl), so an
    // unsplit run with a half output needs no pack pass after this kernel.
    workgroupBarrier();
    let n4 = V_DIM / 4u;
    for (var x = lid; x < BQ * n4; x += nt) {
        let rr = x / n4;
        let col = x % n4;
        let ii = i0 + rr;
        if live && ii < params.q_len {
            let lr = l_w[rr];
            var o = vec4<f32>(0.0);
            if sm_row_valid(lr) {
                let e = rr * OS + 4u * col;
                o = vec4<f32>(o_f[e], o_f[e + 1u], o_f[e + 2u], o_f[e + 3u]) / lr;
            }
            var o_base = b * params.o_sb + ii * params.o_ss + h * params.o_sh;
            if params.num_chunks > 1u {
                o_base = (chunk * rows + (b * params.q_heads + h) * params.q_len + ii) * V_DIM;
            }
            store_o(o_base + 4u * col, col, o);
        }
    }
}
