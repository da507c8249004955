// merge.wgsl — combines partial attention results over disjoint key sets by their log-sum-exp:
// with m = max_c LSE_c and w_c = exp(LSE_c - m): O = Σ w_c O_c / Σ w_c, LSE = m + log Σ w_c.
// Exact: splitting the keys anywhere and merging gives the unsplit result. Parts whose LSE is
// -inf (no visible key) weigh nothing; a row empty in every part gives O = 0 and LSE = -inf.
//
// Partial O is [part][row][Dv] and partial LSE [part][row], with row = (b * Hq + h) * Lq + i;
// the merged O goes to the problem's layout in the output dtype (OUT_DT: 0 = f32, 1 = f16,
// 2 = bf16, two per word: the host picks a half dtype only when Dv is even, so a word never
// straddles two rows), the merged LSE to [B, Hq, Lq].
//
// One workgroup per row. The chunk weights w_c are computed once per block of WG chunks into
// workgroup memory (not once per output element), and their sum accumulates in chunk order, the
// same order in every invocation (so every invocation holds the same total, bitwise).

override WG: u32 = 128u;
override OUT_DT: u32 = 0u;

@group(0) @binding(4) var<storage, read> part_o: array<f32>;
@group(0) @binding(5) var<storage, read> part_lse: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<u32>;
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;

var<workgroup> weights: array<f32, WG>;

fn out_word(x: f32, y: f32) -> u32 {
    if OUT_DT == 0u {
        return bitcast<u32>(x);
    }
    return to_half(x) | (to_half(y) << 16u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params.batch * params.q_heads * params.q_len;
    let row = folded_group(wg, nwg);
    if row >= rows {
        return;
    }
    let i = row % params.q_len;
    let h = (row / params.q_len) % params.q_heads;
    let b = row / (params.q_len * params.q_heads);
    let chunks = params.num_chunks;
    let dv = params.v_head_dim;
    var m = neg_inf();
    var poisoned = false;
    for (var c = 0u; c < chunks; c++) {
        let l = part_lse[c * rows + row];
        poisoned = poisoned || is_nan(l);
        m = max(m, l);
    }
    if poisoned {
        m = nan(); // a NaN part poisons the row
    }
    // Elements per invocation: one f32, or the two halves of one output word.
    let per = select(2u, 1u, OUT_DT == 0u);
    let o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
    var total = 0.0; // Dv >= 1, so the loop below runs at least once
    for (var d0 = 0u; d0 < dv; d0 += WG * per) {
        let d = d0 + lid * per;
        var acc = vec2<f32>(0.0);
        var sum = 0.0;
        for (var c0 = 0u; c0 < chunks; c0 += WG) {
            workgroupBarrier();
            if c0 + lid < chunks {
                weights[lid] = sm_weight(part_lse[(c0 + lid) * rows + row], m);
            }
            workgroupBarrier();
            let n = min(WG, chunks - c0);
            for (var j = 0u; j < n; j++) {
                let w = weights[j];
                sum += w;
                if w > 0.0 && d < dv {
                    let at = ((c0 + j) * rows + row) * dv + d;
                    acc.x += w * part_o[at];
                    if per == 2u && d + 1u < dv {
                        acc.y += w * part_o[at + 1u];
                    }
                }
            }
        }
        total = sum;
        let valid = sm_row_valid(total);
        if d < dv {
            let o = select(vec2<f32>(0.0), acc / total, valid);
            out[(o_base + d) / per] = out_word(o.x, o.y);
        }
    }
    if lid == 0u {
        lse[row] = sm_lse(m, total);
    }
}
