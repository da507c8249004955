// flash.wgsl — fused attention with an online softmax (FlashAttention-style), register tiled.
//
// One workgroup owns BQ query rows of one (batch, head) unit and streams K/V tiles of BK = 4·TPR
// keys through workgroup memory; scores never leave the chip. Threads form BQ/4 row groups of
// TPR threads. Thread (g, t) computes a 4×4 block of S (rows 4g..4g+3, keys 4t..4t+3) with vec4
// reads, and accumulates the same 4 rows of O for output columns (vec4 groups) t, t+TPR, ... in
// registers. Row max and sum: each thread reduces its own 4 keys, then the TPR threads of a row
// group combine them through workgroup memory, or where every subgroup size is a multiple of
// TPR through XOR-butterfly shuffles (fixed order, identical in every lane: deterministic).
//
// Why this shape (measured on lavapipe, where each memory access of a SIMD-8 invocation group is
// a loop over its 8 lanes while arithmetic is one vector instruction): every vec4 read feeds
// 16 FMAs instead of the one FMA per two scalar reads of a thread-per-(row, key) kernel, and a key
// tile costs three barriers (two with subgroups). Workgroup rows are padded by one vec4 (DS4,
// DVS4) so that the threads of a row group, which read different key rows, do not all hit one
// memory bank on GPUs (16-byte banks; D = 64 and 128 are multiples of the bank count otherwise).
//
// Masking: a key that a row cannot see contributes nothing: its weight is 0 and its p·v product
// is dropped by a select (V at hidden keys may hold NaN or inf). Tiles that every valid row of
// the workgroup sees whole (no mask, no bias, inside the causal/window band and the key range)
// skip the per-element checks.
//
// Two modes serve decoding (split-K): PACK_GQA makes a workgroup's rows the (query position,
// query head) pairs of one key/value head, so every query head of a group shares each K/V tile;
// PAGED reads K and V through a block table (a paged KV cache). With num_chunks > 1 the key range
// is split across workgroups and merge.wgsl combines the partial results.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
override BQ: u32 = 32u;
override BK: u32 = 32u;
override TPR: u32 = 8u;
// Row max and sum through subgroup shuffles instead of workgroup memory. Only set where every
// subgroup size is a multiple of TPR, so a row group's TPR threads share one subgroup; the
// variant that sets it also gets the shuffle versions of row_max / row_add below (kernels/).
override SUBGROUP_ROWS: bool = false;
// K and V read four elements per load (k4/v4 in kv_loads.wgsl; set by kernels/ with the rewrite).
override VEC4_KV: bool = false;

// Output vec4 columns per thread, ceil(ceil(V_DIM / 4) / TPR) (at most 64): the size of the
// accumulator array. A function-scope array needs a constant size, which an override cannot
// give, so kernels/ rewrites this line for each pipeline. Sized for the largest case instead
// (and with the 4 query rows kept in registers too), the kernel took lavapipe ~16 s to compile
// per pipeline; sized per variant, about 1 s (measured 2026-11-28, README Limits).
const NC: u32 = 64u; // register columns

override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
// Row strides in vec4, padded by one (see the header).
override DS4: u32 = D4 + 1u;
override DVS4: u32 = DV4 + 1u;
override NT: u32 = BQ / 4u * TPR;

var<workgroup> q_s: array<vec4<f32>, BQ * DS4>;
var<workgroup> k_s: array<vec4<f32>, BK * DS4>;
var<workgroup> v_s: array<vec4<f32>, BK * DVS4>;
// p_s[row * TPR + t]: the weights of keys 4t..4t+3 of a row.
var<workgroup> p_s: array<vec4<f32>, BQ * TPR>;
// Per-thread partial row max and sum of its 4 rows (without subgroups).
var<workgroup> max_s: array<vec4<f32>, NT>;
var<workgroup> sum_s: array<vec4<f32>, NT>;

@compute @workgroup_size(NT)
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
    let tiles_i = (unit_rows + BQ - 1u) / BQ;
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
    let g = lid / TPR;
    let t = lid % TPR;
    let r0 = ti * BQ;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let zero4 = vec4<f32>(0.0);

    // This thread's rows: r0 + 4g + r.
    var rpos: array<u32, 4>;
    var rhead: array<u32, 4>;
    var rok: array<bool, 4>;
    for (var r = 0u; r < 4u; r++) {
        let rr = r0 + 4u * g + r;
        rpos[r] = row_pos(rr);
        rhead[r] = row_head(unit, rr);
        rok[r] = rr < unit_rows && rpos[r] < lq;
    }

    for (var x = lid; x < BQ * D4; x += NT) {
        let row = x / D4;
        let d0 = (x % D4) * 4u;
        let rr = r0 + row;
        let ii = row_pos(rr);
        var val = zero4;
        if rr < unit_rows && ii < lq {
            let hh = row_head(unit, rr);
            let base = b * params.q_sb + ii * params.q_ss + hh * params.q_sh + d0;
            for (var c = 0u; c < 4u; c++) {
                if d0 + c < HEAD_DIM {
                    val[c] = load_q(base + c);
                }
            }
        }
        q_s[row * DS4 + x % D4] = val;
    }

    // Keys visible to at least one row of this tile, [j_lo, j_hi), and the keys every valid row
    // sees, [all_lo, all_hi) (fused_units.wgsl).
    let i_first = row_pos(r0);
    let i_last = row_pos(min(r0 + BQ, unit_rows) - 1u);
    let keys = key_band(i_first, i_last, lq, lk, off, chunk);
    let j_lo = keys.x;
    let j_hi = keys.y;
    let all_lo = keys.z;
    let all_hi = keys.w;
    let no_masks = !has(F_MASK) && !has(F_BIAS);
    // Logits that are scale·(q·k) alone.
    let plain = !has(F_BIAS) && !has(F_ALIBI) && !(params.softcap > 0.0);

    var m = vec4<f32>(ninf);
    var l = zero4;
    var acc: array<vec4<f32>, 4u * NC>;
    // Column groups this thread owns, ceil(DV4 / TPR): a constant of the variant, so loops to
    // it have a known trip count.
    let nc = NC;
    for (var n = 0u; n < 4u * nc; n++) {
        acc[n] = zero4;
    }

    workgroupBarrier();
    var j0 = (j_lo / i32(BK)) * i32(BK);
    for (; j0 < j_hi; j0 += i32(BK)) {
        let ju = u32(j0);
        workgroupBarrier(); // everyone is done with the previous tile
        for (var x = lid; x < BK * D4; x += NT) {
            let jj = ju + x / D4;
            let d0 = (x % D4) * 4u;
            var val = zero4;
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base; // row in this dispatch's K
                val = k4(kv_row(b, jl, params.k_sb, params.k_ss) + kvh * params.k_sh, d0);
            }
            k_s[(x / D4) * DS4 + x % D4] = val;
        }
        for (var x = lid; x < BK * DV4; x += NT) {
            let jj = ju + x / DV4;
            let d0 = (x % DV4) * 4u;
            var val = zero4;
            // Padding never reaches the output, whatever it holds.
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base;
                val = v4(kv_row(b, jl, params.v_sb, params.v_ss) + kvh * params.v_sh, d0);
            }
            v_s[(x / DV4) * DVS4 + x % DV4] = val;
        }
        workgroupBarrier();

        // S block: rows 4g..4g+3 (s0..s3), keys 4t..4t+3 (components).
        var s0 = zero4;
        var s1 = zero4;
        var s2 = zero4;
        var s3 = zero4;
        let kb = 4u * t * DS4;
        let qb = 4u * g * DS4;
        for (var d = 0u; d < opaque(D4); d++) {
            let km = mat4x4<f32>(k_s[kb + d], k_s[kb + DS4 + d], k_s[kb + 2u * DS4 + d], k_s[kb + 3u * DS4 + d]);
            s0 += q_s[qb + d] * km;
            s1 += q_s[qb + DS4 + d] * km;
            s2 += q_s[qb + 2u * DS4 + d] * km;
            s3 += q_s[qb + 3u * DS4 + d] * km;
        }
        let jt = ju + 4u * t; // this thread's first key
        let clean = no_masks && j0 >= all_lo && j0 + i32(BK) <= all_hi;
        var sv: array<vec4<f32>, 4> = array<vec4<f32>, 4>(s0, s1, s2, s3);
        if clean && plain {
            for (var r = 0u; r < 4u; r++) {
                sv[r] = params.scale * sv[r];
            }
        } else {
            // Per-element checks through this thread's own slots of p_s (free until the weights
            // are written below), in a loop that is not unrolled: 16 inlined copies of the mask,
            // bias and softcap code made the pipeline compile far longer (README, Limits).
            for (var r = 0u; r < 4u; r++) {
                p_s[(4u * g + r) * TPR + t] = sv[r];
            }
            let n_el = opaque(16u);
            for (var e = 0u; e < n_el; e++) {
                let r = e / 4u;
                let c = e % 4u;
                let slot = (4u * g + r) * TPR + t;
                let j = jt + c;
                var s = ninf;
                // [j_lo, j_hi) bounds this workgroup's keys (its window and chunk); tiles are
                // aligned to BK, so a tile may reach past either end.
                let mine = i32(j) >= j_lo && i32(j) < j_hi;
                if clean || (rok[r] && mine && visible(b, rhead[r], rpos[r], j, off, lk)) {
                    s = finish_logit(b, rhead[r], rpos[r], j, off, p_s[slot][c]);
                }
                p_s[slot][c] = s;
            }
            for (var r = 0u; r < 4u; r++) {
                sv[r] = p_s[(4u * g + r) * TPR + t];
            }
        }
        var mx = zero4;
        for (var r = 0u; r < 4u; r++) {
            let s = sv[r];
            mx[r] = max(max(s.x, s.y), max(s.z, s.w));
        }
        var m_tile = zero4;
        if SUBGROUP_ROWS {
            m_tile = row_max(mx);
        } else {
            max_s[lid] = mx;
            workgroupBarrier();
            m_tile = vec4<f32>(ninf);
            for (var u = 0u; u < TPR; u++) {
                m_tile = max(m_tile, max_s[g * TPR + u]);
            }
        }
        let m_new = max(m, m_tile);
        var part = zero4;
        for (var r = 0u; r < 4u; r++) {
            let s = sv[r];
            // Hidden keys (-inf) weigh 0; a NaN logit gives a NaN weight that poisons the row.
            let p = sm_weight4(s, vec4<f32>(m_new[r]));
            p_s[(4u * g + r) * TPR + t] = p;
            part[r] = (p.x + p.y) + (p.z + p.w);
        }
        var row_sum = zero4;
        if SUBGROUP_ROWS {
            row_sum = row_add(part);
            workgroupBarrier();
        } else {
            sum_s[lid] = part;
            workgroupBarrier();
            for (var u = 0u; u < TPR; u++) {
                row_sum += sum_s[g * TPR + u];
            }
        }
        let alpha = sm_rescale4(m, m_new);
        l = l * alpha + row_sum;
        m = m_new;

        // O rows 4g..4g+3, column groups t + TPR·n: acc[4n + r]. Weights are read once per 4
        // keys and reused over every column group (measured: fewer reads than columns outer).
        for (var n = 0u; n < nc; n++) {
            acc[4u * n] *= alpha.x;
            acc[4u * n + 1u] *= alpha.y;
            acc[4u * n + 2u] *= alpha.z;
            acc[4u * n + 3u] *= alpha.w;
        }
        let pb = 4u * g * TPR;
        for (var k4 = 0u; k4 < TPR; k4++) {
            var p0 = p_s[pb + k4];
            var p1 = p_s[pb + TPR + k4];
            var p2 = p_s[pb + 2u * TPR + k4];
            var p3 = p_s[pb + 3u * TPR + k4];
            // A weight of 0 (a hidden key, or a visible one whose weight underflowed: README,
            // Semantics) must add nothing even where V is NaN or inf: unless the tile is clean
            // and this thread's 16 weights of these keys are all nonzero, each product goes
            // through a select.
            let nz0 = !(p0 == zero4);
            let nz1 = !(p1 == zero4);
            let nz2 = !(p2 == zero4);
            let nz3 = !(p3 == zero4);
            let dense = clean && all(nz0) && all(nz1) && all(nz2) && all(nz3);
            for (var n = 0u; n < nc; n++) {
                let col = t + n * TPR;
                if col >= DV4 {
                    break;
                }
                var a0 = acc[4u * n];
                var a1 = acc[4u * n + 1u];
                var a2 = acc[4u * n + 2u];
                var a3 = acc[4u * n + 3u];
                let vb = 4u * k4 * DVS4 + col;
                for (var e = 0u; e < 4u; e++) {
                    let vv = v_s[vb + e * DVS4];
                    if dense {
                        a0 += p0[e] * vv;
                        a1 += p1[e] * vv;
                        a2 += p2[e] * vv;
                        a3 += p3[e] * vv;
                    } else {
                        a0 += select(zero4, p0[e] * vv, nz0[e]);
                        a1 += select(zero4, p1[e] * vv, nz1[e]);
                        a2 += select(zero4, p2[e] * vv, nz2[e]);
                        a3 += select(zero4, p3[e] * vv, nz3[e]);
                    }
                }
                acc[4u * n] = a0;
                acc[4u * n + 1u] = a1;
                acc[4u * n + 2u] = a2;
                acc[4u * n + 3u] = a3;
            }
        }
    }

    let rows = params.batch * params.q_heads * params.q_len;
    for (var r = 0u; r < 4u; r++) {
        let rr = r0 + 4u * g + r;
        if rr >= unit_rows {
            continue;
        }
        let i = rpos[r];
        let h = rhead[r];
        // l is 0 exactly when no key was visible (every p was 0); NaN when a logit was NaN.
        let valid = i < lq && sm_row_valid(l[r]);
        // Unsplit: O in the problem's layout. Split: partial O as [chunk][b][h][i][Dv] and partial
        // LSE as [chunk][b][h][i], for the merge pass.
        let row = chunk * rows + (b * params.q_heads + h) * params.q_len + i;
        var o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
        if params.num_chunks > 1u {
            o_base = row * V_DIM;
        }
        for (var n = 0u; n < nc; n++) {
            let col = t + n * TPR;
            if col >= DV4 {
                break;
            }
            var o = zero4;
            if valid {
                o = acc[4u * n + r] / l[r];
            }
            store_o(o_base + col * 4u, col, o);
        }
        if t == 0u {
            lse[row] = select(ninf, sm_lse(m[r], l[r]), valid);
        }
    }
}

// `n`, in a form the shader compiler cannot fold (q_len is never u32::MAX: the host's limits
// refuse such problems), so a loop to it is not unrolled. Used where full unrolling multiplies
// the code (and lavapipe's compile time) without making the kernel faster.
fn opaque(n: u32) -> u32 {
    return n - u32(params.q_len == 0xffffffffu);
}

// Row-group reductions over TPR threads, for 4 rows at once. These stubs are never called
// (SUBGROUP_ROWS is off); the subgroup variant rewrites these two lines into XOR-butterfly
// shuffles, which give every lane of the row group the same, fixed-order result.
fn row_max(x: vec4<f32>) -> vec4<f32> { return x; } // subgroup row_max
fn row_add(x: vec4<f32>) -> vec4<f32> { return x; } // subgroup row_add
