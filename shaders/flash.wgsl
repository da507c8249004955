// flash.wgsl — fused attention with an online softmax (FlashAttention-style).
//
// One workgroup owns BQ query rows of one (batch, head) and streams K/V tiles of BK keys through
// workgroup memory; scores never leave the chip. TPR threads share a row: thread t computes the
// logits of keys t, t+TPR, ... and accumulates output columns t, t+TPR, ... of that row in
// registers. Row max and sum go through workgroup memory (no subgroup operations needed, so any
// subgroup size works). Key tiles that causal masking or a window makes invisible for every row of
// the workgroup are skipped.
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
override BQ: u32 = 16u;
override BK: u32 = 16u;
override TPR: u32 = 8u;
override PACK_GQA: bool = false;
override PAGED: bool = false;
// Row max and sum through subgroup shuffles instead of workgroup memory. Only set where every
// subgroup size is a multiple of TPR, so a row's TPR threads share one subgroup; the variant
// that sets it also gets the shuffle versions of row_max / row_add below (see kernels.rs).
override SUBGROUP_ROWS: bool = false;

// Output columns per thread: ceil(V_DIM / TPR) must not exceed this (checked on the host).
const MAX_COLS: u32 = 32u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;

var<workgroup> q_s: array<f32, BQ * HEAD_DIM>;
var<workgroup> k_s: array<f32, BK * HEAD_DIM>;
var<workgroup> v_s: array<f32, BK * V_DIM>;
var<workgroup> p_s: array<f32, BQ * BK>;

@compute @workgroup_size(BQ * TPR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let nthreads = BQ * TPR;
    // Rows of one (batch, head) unit: query positions, or with PACK_GQA (position, head) pairs
    // of one key/value head.
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
    let r = lid / TPR;
    let t = lid % TPR;
    let r0 = ti * BQ;
    let row_ok = r0 + r < unit_rows;
    let h = row_head(unit, r0 + r);
    let i = row_pos(r0 + r);
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();

    for (var x = lid; x < BQ * HEAD_DIM; x += nthreads) {
        let rr = r0 + x / HEAD_DIM;
        let ii = row_pos(rr);
        var val = 0.0;
        if rr < unit_rows && ii < lq {
            let hh = row_head(unit, rr);
            let idx = b * params.q_sb + ii * params.q_ss + hh * params.q_sh + x % HEAD_DIM;
            val = load_q(idx);
        }
        q_s[x] = val;
    }

    // Keys visible to at least one row of this tile: [j_lo, j_hi). Rows are ordered by position.
    let i_first = row_pos(r0);
    let i_last = row_pos(min(r0 + BQ, unit_rows) - 1u);
    // Global key indices; this dispatch holds keys [key_base, key_base + kv_len).
    let band = visible_key_range(i_first, i_last, lq, lk, off);
    var j_lo = max(band.x, i32(params.key_base));
    var j_hi = min(band.y, i32(params.key_base + params.kv_len));
    if params.num_chunks > 1u {
        // Split over the key range: this workgroup takes one chunk; a merge pass combines them.
        j_lo = max(j_lo, i32(params.key_base + chunk * params.chunk_keys));
        j_hi = min(j_hi, i32(params.key_base + (chunk + 1u) * params.chunk_keys));
    }

    var m = ninf;
    var l = 0.0;
    var acc: array<f32, MAX_COLS>;
    // Columns this thread owns: the column loops run to this bound, known when the pipeline is
    // made, not to MAX_COLS with a break, which Mesa's GLSL compiler unrolled 32 times (~25 s per
    // pipeline on llvmpipe; README, Limits and guarantees).
    let ncols = (V_DIM + TPR - 1u) / TPR;
    for (var c = 0u; c < ncols; c++) {
        acc[c] = 0.0;
    }

    var j0 = (j_lo / i32(BK)) * i32(BK);
    for (; j0 < j_hi; j0 += i32(BK)) {
        let ju = u32(j0);
        workgroupBarrier(); // everyone is done with the previous tile
        for (var x = lid; x < BK * HEAD_DIM; x += nthreads) {
            let jj = ju + x / HEAD_DIM;
            var val = 0.0;
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base; // row in this dispatch's K
                let idx = kv_row(b, jl, params.k_sb, params.k_ss) + kvh * params.k_sh + x % HEAD_DIM;
                val = load_k(idx);
            }
            k_s[x] = val;
        }
        for (var x = lid; x < BK * V_DIM; x += nthreads) {
            let jj = ju + x / V_DIM;
            var val = 0.0;
            // Padding never reaches the output, whatever it holds.
            if jj < lk && jj - params.key_base < params.kv_len {
                let jl = jj - params.key_base;
                let idx = kv_row(b, jl, params.v_sb, params.v_ss) + kvh * params.v_sh + x % V_DIM;
                val = load_v(idx);
            }
            v_s[x] = val;
        }
        workgroupBarrier();

        // Logits of this thread's keys.
        var m_local = ninf;
        for (var kk = t; kk < BK; kk += TPR) {
            let j = ju + kk;
            var s = ninf;
            // [j_lo, j_hi) bounds this workgroup's keys (its window and chunk); tiles are aligned
            // to BK, so a tile may reach past either end.
            let mine = i32(j) >= j_lo && i32(j) < j_hi;
            if row_ok && mine && i < lq && visible(b, h, i, j, off, lk) {
                var dot = 0.0;
                for (var d = 0u; d < HEAD_DIM; d++) {
                    dot += q_s[r * HEAD_DIM + d] * k_s[kk * HEAD_DIM + d];
                }
                s = finish_logit(b, h, i, j, off, dot);
            }
            p_s[r * BK + kk] = s;
            m_local = max(m_local, s);
        }

        var m_tile = ninf;
        if SUBGROUP_ROWS {
            m_tile = row_max(m_local);
        } else {
            workgroupBarrier();
            for (var kk = 0u; kk < BK; kk++) {
                m_tile = max(m_tile, p_s[r * BK + kk]);
            }
            workgroupBarrier(); // the row's logits are read before they are overwritten
        }
        let m_new = max(m, m_tile);
        var sum_local = 0.0;
        for (var kk = t; kk < BK; kk += TPR) {
            let s = p_s[r * BK + kk];
            var p = 0.0;
            if is_nan(s) {
                p = s; // a NaN logit poisons the row through l and acc
            } else if m_new != ninf && s != ninf {
                p = exp(s - m_new);
            }
            p_s[r * BK + kk] = p;
            sum_local += p;
        }
        workgroupBarrier();

        var alpha = 0.0;
        if m != ninf {
            alpha = exp(m - m_new);
        }
        var row_sum = 0.0;
        if SUBGROUP_ROWS {
            row_sum = row_add(sum_local);
        } else {
            for (var kk = 0u; kk < BK; kk++) {
                row_sum += p_s[r * BK + kk];
            }
        }
        l = l * alpha + row_sum;
        for (var c = 0u; c < ncols; c++) {
            let d = t + c * TPR;
            if d >= V_DIM {
                break;
            }
            var a = acc[c] * alpha;
            for (var kk = 0u; kk < BK; kk++) {
                // A key this row cannot see (p = 0) adds nothing, even where V holds NaN or inf
                // (0 · NaN would be NaN).
                let pk = p_s[r * BK + kk];
                a += select(0.0, pk * v_s[kk * V_DIM + d], !(pk == 0.0));
            }
            acc[c] = a;
        }
        m = m_new;
    }

    if row_ok {
        // l is 0 exactly when no key was visible (every p was 0); NaN when a logit was NaN.
        let valid = i < lq && !(l == 0.0);
        // Unsplit: O in the problem's layout. Split: partial O as [chunk][b][h][i][Dv] and partial
        // LSE as [chunk][b][h][i], for the merge pass.
        let rows = params.batch * params.q_heads * params.q_len;
        let row = chunk * rows + (b * params.q_heads + h) * params.q_len + i;
        var o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
        if params.num_chunks > 1u {
            o_base = row * V_DIM;
        }
        for (var c = 0u; c < ncols; c++) {
            let d = t + c * TPR;
            if d >= V_DIM {
                break;
            }
            var o = 0.0;
            if valid {
                o = acc[c] / l;
            }
            out[o_base + d] = o;
        }
        if t == 0u {
            lse[row] = select(ninf, m + log(l), valid);
        }
    }
}

// Query head of row `rr` of a unit (a (batch, head) pair, or with PACK_GQA a (batch, kv head)).
fn row_head(unit: u32, rr: u32) -> u32 {
    if PACK_GQA {
        return (unit % params.kv_heads) * params.group + rr % params.group;
    }
    return unit % params.q_heads;
}

// Query position of row `rr` of a unit.
fn row_pos(rr: u32) -> u32 {
    if PACK_GQA {
        return rr / params.group;
    }
    return rr;
}

// Element index of key/value row j of batch entry b (head 0, dim 0): strided, or through the
// block table in aux when PAGED (pages of page_size rows of seq_stride elements).
fn kv_row(b: u32, j: u32, batch_stride: u32, seq_stride: u32) -> u32 {
    if PAGED {
        let page = aux[params.table_off + b * params.table_stride + j / params.page_size];
        return (page * params.page_size + j % params.page_size) * seq_stride;
    }
    return b * batch_stride + j * seq_stride;
}

// Row reductions over a row's TPR threads. These stubs are never called (SUBGROUP_ROWS is off);
// the subgroup variant rewrites these two lines into XOR-butterfly shuffles, which give every
// lane of the row the same, fixed-order result.
fn row_max(x: f32) -> f32 { return x; } // subgroup row_max
fn row_add(x: f32) -> f32 { return x; } // subgroup row_add
