// merge.wgsl — combines partial attention results over disjoint key sets by their log-sum-exp:
// with m = max_c LSE_c and w_c = exp(LSE_c - m): O = Σ w_c O_c / Σ w_c, LSE = m + log Σ w_c.
// Exact: splitting the keys anywhere and merging gives the unsplit result. Parts whose LSE is
// -inf (no visible key) weigh nothing; a row empty in every part gives O = 0 and LSE = -inf.
//
// Partial O is [part][row][Dv] and partial LSE [part][row], with row = (b * Hq + h) * Lq + i;
// the merged O goes to the problem's layout, the merged LSE to [B, Hq, Lq].

override WG: u32 = 64u;

@group(0) @binding(4) var<storage, read> part_o: array<f32>;
@group(0) @binding(5) var<storage, read> part_lse: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> lse: array<f32>;

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
    let ninf = neg_inf();
    var m = ninf;
    var poisoned = false;
    for (var c = 0u; c < params.num_chunks; c++) {
        let l = part_lse[c * rows + row];
        poisoned = poisoned || is_nan(l);
        m = max(m, l);
    }
    if poisoned {
        m = nan(); // a NaN part poisons the row
    }
    var total = 0.0;
    for (var c = 0u; c < params.num_chunks; c++) {
        total += sm_weight(part_lse[c * rows + row], m);
    }
    let valid = sm_row_valid(total);
    let o_base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
    for (var d = lid; d < params.v_head_dim; d += WG) {
        var acc = 0.0;
        if valid {
            for (var c = 0u; c < params.num_chunks; c++) {
                let w = sm_weight(part_lse[c * rows + row], m);
                if w > 0.0 {
                    acc += w * part_o[(c * rows + row) * params.v_head_dim + d];
                }
            }
            acc /= total;
        }
        out[o_base + d] = acc;
    }
    if lid == 0u {
        lse[row] = sm_lse(m, total);
    }
}
