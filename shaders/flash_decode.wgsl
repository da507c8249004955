// flash_decode.wgsl — fused attention for short queries (decoding) on GPUs: one workgroup per
// unit and key chunk, holding all R (<= 16) query rows of the unit at once. With PACK_GQA a
// unit is a key/value head's group of query heads (every query head of the group shares each K
// and V row read); else one head's rows.
//
// Why this shape: the tiled kernel (flash.wgsl) gives a unit of 4 query rows a workgroup of 8
// threads that stages K/V through workgroup memory with scalar loads; a decode step is a
// stream over the cache, so what counts is how many bytes per second one workgroup pulls in.
// Here the WG threads of a workgroup (a power of two) read K/V straight from the buffers:
// - Q·Kᵀ: thread t owns key j0 + t of each tile of WG keys: it reads that key's K row (four
//   elements per load with VEC4_KV) and computes its logits for all R rows against q in
//   workgroup memory (every thread reads the same q address: a broadcast).
// - Softmax: the tile's row max, then each thread turns its key's logits into weights against
//   it. With SUBGROUP_ROWS each subgroup's max (subgroupMax) goes to one slot of workgroup
//   memory, and after one barrier the lanes of each subgroup read the slots between them and
//   take subgroupMax again. Without subgroups, a tree in workgroup memory: log2 WG steps, a
//   barrier each.
// - P·V: thread t owns the output vec4 column t % DV4 of all R rows and walks the keys of the
//   tile in subsets of WG / DV4 (key t / DV4, then every KS-th), so the threads of a subset read
//   a V row side by side. The subsets' partial outputs and sums are added in a fixed order at the
//   end (bit-for-bit deterministic).
// Register arrays (per-row logits, maxima, sums, accumulators) are indexed only by constants:
// loops marked `// unroll` are unrolled in the text by kernels/, and R is written into its line
// per pipeline, as for the row kernels.
//
// The semantics are flash.wgsl's, through the same functions (visible, finish_logit, the softmax
// rules): masked keys weigh exactly 0 and their p·v product is dropped by a select; tiles that
// every valid row sees whole skip the per-element checks. PAGED and the key chunks of split-K
// work as in flash.wgsl, and the bindings are the same.

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;
override V_DT: u32 = 0u;
override HEAD_DIM: u32 = 64u;
override V_DIM: u32 = 64u;
// Threads per workgroup and keys per tile (a power of two, at least ceil(V_DIM / 4)).
override WG: u32 = 128u;
// K and V read four elements per load (k4/v4 in kv_loads.wgsl; set by kernels/ with the rewrite).
override VEC4_KV: bool = false;
// The host's row count (at least the unit's rows), written into the `const R` line per pipeline
// (it sizes register arrays, which an override cannot).
override ROWS: u32 = 4u;
const R: u32 = 4u; // rows per workgroup
override D4: u32 = (HEAD_DIM + 3u) / 4u;
override DV4: u32 = (V_DIM + 3u) / 4u;
// Key subsets of the P·V loop: WG / DV4 threads share each output column.
override KS: u32 = WG / DV4;
// The tile's row max through subgroup operations (set where the device has subgroups). The
// subgroup variant rewrites the stub `sg_max` into subgroupMax and replaces the `let` line of
// subgroup ids in `main` with the builtins (kernels/); a module without it never names a
// subgroup builtin, which naga would refuse on a device without subgroups.
override SUBGROUP_ROWS: bool = false;

fn sg_max(x: f32) -> f32 { return x; } // subgroup sg_max

var<workgroup> q_s: array<vec4<f32>, R * D4>;
// s_s[r * WG + t]: row r's weight of key t of the tile.
var<workgroup> s_s: array<f32, R * WG>;
// The tile's row max: a tree, or with SUBGROUP_ROWS one slot per subgroup.
var<workgroup> red_s: array<f32, R * WG>;
// One key subset's partial output and sums, added into subset 0's at the end.
var<workgroup> o_s: array<vec4<f32>, R * DV4>;
var<workgroup> l_s: array<f32, R>;

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
    let flat = folded_group(wg, nwg);
    if flat >= units * params.num_chunks {
        return;
    }
    let unit = flat % units;
    let chunk = flat / units;
    var b = unit / params.q_heads;
    var kvh = (unit % params.q_heads) / params.group;
    if PACK_GQA {
        b = unit / params.kv_heads;
        kvh = unit % params.kv_heads;
    }
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let zero4 = vec4<f32>(0.0);
    let sg_lane = 0u; let sg_id = 0u; let n_sg = 1u; let sg_size = 1u; // subgroup ids

    var rpos: array<u32, R>;
    var rhead: array<u32, R>;
    var rok: array<bool, R>;
    for (var r = 0u; r < R; r++) { // unroll
        rpos[r] = row_pos(r);
        rhead[r] = row_head(unit, r);
        rok[r] = r < unit_rows && rpos[r] < lq;
    }
    for (var x = lid; x < R * D4; x += WG) {
        let row = x / D4;
        let d0 = (x % D4) * 4u;
        let ii = row_pos(row);
        var val = zero4;
        if row < unit_rows && ii < lq {
            let base = b * params.q_sb + ii * params.q_ss + row_head(unit, row) * params.q_sh + d0;
            for (var c = 0u; c < 4u; c++) {
                if d0 + c < HEAD_DIM {
                    val[c] = load_q(base + c);
                }
            }
        }
        q_s[x] = val;
    }

    // Keys visible to at least one row, [j_lo, j_hi), and those every valid row sees from the
    // bands alone, [all_lo, all_hi) (fused_units.wgsl).
    let keys = key_band(row_pos(0u), row_pos(min(R, unit_rows) - 1u), lq, lk, off, chunk);
    let j_lo = keys.x;
    let j_hi = keys.y;
    let no_masks = !has(F_MASK) && !has(F_BIAS);
    let plain = !has(F_BIAS) && !has(F_ALIBI) && !(params.softcap > 0.0);
    let col = lid % DV4;
    let ks = lid / DV4;

    var m: array<f32, R>;
    var l: array<f32, R>;
    var acc: array<vec4<f32>, R>;
    for (var r = 0u; r < R; r++) { // unroll
        m[r] = ninf;
        l[r] = 0.0;
        acc[r] = zero4;
    }

    workgroupBarrier();
    var j0 = (j_lo / i32(WG)) * i32(WG);
    for (; j0 < j_hi; j0 += i32(WG)) {
        // This thread's key: its logits for every row.
        let j = u32(j0) + lid;
        let live = i32(j) >= j_lo && i32(j) < j_hi && j < lk;
        let clean = no_masks && j0 >= keys.z && j0 + i32(WG) <= keys.w;
        var s: array<f32, R>;
        for (var r = 0u; r < R; r++) { // unroll
            s[r] = 0.0;
        }
        if live {
            let kb = kv_row(b, j - params.key_base, params.k_sb, params.k_ss) + kvh * params.k_sh;
            for (var d = 0u; d < D4; d++) {
                let kv = k4(kb, d * 4u);
                for (var r = 0u; r < R; r++) { // unroll
                    s[r] += dot(q_s[r * D4 + d], kv);
                }
            }
        }
        var x: array<f32, R>;
        for (var r = 0u; r < R; r++) { // unroll
            var xr = ninf;
            if live && (clean || (rok[r] && visible(b, rhead[r], rpos[r], j, off, lk))) {
                if clean && plain {
                    xr = params.scale * s[r];
                } else {
                    xr = finish_logit(b, rhead[r], rpos[r], j, off, s[r]);
                }
            }
            x[r] = xr;
        }
        // The tile's max of each row, in every thread.
        var mt: array<f32, R>;
        if SUBGROUP_ROWS {
            // Slot sg_id of row r: subgroup sg_id's max. Then each subgroup's lanes read the
            // n_sg slots between them (one each where n_sg <= sg_size) and take their max
            // again: every thread reading every slot cost 8-10% of lavapipe's decode time (16
            // subgroups of 8 at 128 threads, each load a loop over the lanes there).
            for (var r = 0u; r < R; r++) { // unroll
                let sm = sg_max(x[r]);
                if sg_lane == 0u {
                    red_s[r * WG + sg_id] = sm;
                }
            }
            workgroupBarrier();
            for (var r = 0u; r < R; r++) { // unroll
                var mx = ninf;
                for (var i = sg_lane; i < n_sg; i += sg_size) {
                    mx = max(mx, red_s[r * WG + i]);
                }
                mt[r] = sg_max(mx);
            }
        } else {
            for (var r = 0u; r < R; r++) { // unroll
                red_s[r * WG + lid] = x[r];
            }
            workgroupBarrier();
            for (var w = WG / 2u; w > 0u; w >>= 1u) {
                if lid < w {
                    for (var r = 0u; r < R; r++) { // unroll
                        red_s[r * WG + lid] = max(red_s[r * WG + lid], red_s[r * WG + lid + w]);
                    }
                }
                workgroupBarrier();
            }
            for (var r = 0u; r < R; r++) { // unroll
                mt[r] = red_s[r * WG];
            }
        }
        var alpha: array<f32, R>;
        for (var r = 0u; r < R; r++) { // unroll
            let m_new = max(m[r], mt[r]);
            alpha[r] = sm_rescale(m[r], m_new);
            m[r] = m_new;
            // Hidden keys (-inf) weigh 0; a NaN logit gives a NaN weight that poisons the row.
            s_s[r * WG + lid] = sm_weight(x[r], m_new);
        }
        workgroupBarrier();
        if ks < KS {
            for (var r = 0u; r < R; r++) { // unroll
                acc[r] *= alpha[r];
                l[r] *= alpha[r];
            }
            for (var kk = ks; kk < WG; kk += KS) {
                let jj = u32(j0) + kk;
                if i32(jj) >= j_lo && i32(jj) < j_hi && jj < lk {
                    let vb = kv_row(b, jj - params.key_base, params.v_sb, params.v_ss) + kvh * params.v_sh;
                    let vv = v4(vb, col * 4u);
                    for (var r = 0u; r < R; r++) { // unroll
                        let p = s_s[r * WG + kk];
                        l[r] += p;
                        // A weight of 0 adds nothing even where V is NaN or inf.
                        acc[r] += select(zero4, p * vv, !(p == 0.0));
                    }
                }
            }
        }
        workgroupBarrier(); // everyone is done with this tile's weights and tree
    }

    // Subsets 1.. add into subset 0 in order.
    for (var u = 1u; u < KS; u++) {
        if ks == u {
            for (var r = 0u; r < R; r++) { // unroll
                o_s[r * DV4 + col] = acc[r];
                if col == 0u {
                    l_s[r] = l[r];
                }
            }
        }
        workgroupBarrier();
        if ks == 0u {
            for (var r = 0u; r < R; r++) { // unroll
                acc[r] += o_s[r * DV4 + col];
                l[r] += l_s[r];
            }
        }
        workgroupBarrier();
    }
    if ks != 0u {
        return;
    }
    let rows = params.batch * params.q_heads * params.q_len;
    for (var r = 0u; r < R; r++) { // unroll
        if r < unit_rows {
            let i = rpos[r];
            let h = rhead[r];
            // l is 0 exactly when no key was visible; NaN when a logit was NaN.
            let valid = i < lq && sm_row_valid(l[r]);
            // Unsplit: O in the problem's layout. Split: partial O and LSE for the merge pass.
            let row = chunk * rows + (b * params.q_heads + h) * params.q_len + i;
            var o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
            if params.num_chunks > 1u {
                o_base = row * V_DIM;
            }
            var o = zero4;
            if valid {
                o = acc[r] / l[r];
            }
            store_o(o_base + col * 4u, col, o);
            if col == 0u {
                lse[row] = select(ninf, sm_lse(m[r], l[r]), valid);
            }
        }
    }
}
