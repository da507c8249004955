// row_scatter.wgsl — the reduce-scatter of the backward's column-owning row kernels
// (backward_kv_rows.wgsl, backward_q_rows.wgsl, after their LW and RS constants): every lane
// holds a partial sum (its columns' share of a dot product) for each of RS positions (keys or
// rows of the workgroup); after it, each position's full sum sits on one lane.

// One step of the reduce-scatter: the live positions p (p's bits of LW - 1 above d all 0) with
// bit d clear pair with p | d; lane `lid` keeps the one whose bit d matches its own, adds the
// value its partner lid ^ d kept there, and stores the sum at p. After the steps d = LW/2 .. 1,
// position LW·q of lane `lid` holds the sum over all lanes of position LW·q + lid, added in the
// same order in every run. `d` is a constant at every call, so the conditions and indices fold.
fn scatter_step(x: ptr<function, array<f32, RS>>, d: u32, lid: u32) {
    let lo = (lid & d) == 0u;
    for (var p = 0u; p < RS; p++) { // unroll
        if (p & (LW - 1u) & ~(2u * d - 1u)) == 0u && (p & d) == 0u {
            let keep = select((*x)[p | d], (*x)[p], lo);
            let give = select((*x)[p], (*x)[p | d], lo);
            (*x)[p] = keep + subgroupShuffleXor(give, d);
        }
    }
}

// Sums every lane's partial values of each position and leaves position LW·q + lid's sum at
// position LW·q.
fn reduce_scatter(x: ptr<function, array<f32, RS>>, lid: u32) {
    if LW > 32u {
        scatter_step(x, 32u, lid);
    }
    if LW > 16u {
        scatter_step(x, 16u, lid);
    }
    if LW > 8u {
        scatter_step(x, 8u, lid);
    }
    if LW > 4u {
        scatter_step(x, 4u, lid);
    }
    if LW > 2u {
        scatter_step(x, 2u, lid);
    }
    scatter_step(x, 1u, lid);
}
