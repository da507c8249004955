// backward_pre.wgsl — the backward's pre-pass: per query row, D_i = rowsum(dO ∘ O) and the row's
// LSE (-inf for padded rows), written as [lse: rows][delta: rows] for the aux of the other passes.

override O_DT: u32 = 0u;
override DO_DT: u32 = 0u;
override V_DIM: u32 = 64u;

@group(0) @binding(4) var<storage, read> o: array<u32>;
@group(0) @binding(5) var<storage, read> dout: array<u32>;
@group(0) @binding(6) var<storage, read> lse_in: array<f32>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = params.batch * params.q_heads * params.q_len;
    let row = folded_group(wg, nwg) * 64u + lid;
    if row >= rows {
        return;
    }
    let i = row % params.q_len;
    let h = (row / params.q_len) % params.q_heads;
    let b = row / (params.q_len * params.q_heads);
    let lse = lse_in[row];
    let valid = i < q_valid(b) && !(lse == neg_inf());
    var delta = 0.0;
    if valid {
        let base = b * params.o_sb + i * params.o_ss + h * params.o_sh;
        for (var d = 0u; d < V_DIM; d++) {
            let idx = base + d;
            delta += elem_value(dout[elem_word(idx, DO_DT)], idx, DO_DT)
                * elem_value(o[elem_word(idx, O_DT)], idx, O_DT);
        }
    }
    stats[row] = select(neg_inf(), lse, valid);
    stats[rows + row] = delta;
}
