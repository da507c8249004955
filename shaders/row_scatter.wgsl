// row_scatter.wgsl — the streamed row's loads and the reduce-scatter of the backward's
// column-owning row kernels (backward_kv_rows.wgsl, backward_q_rows.wgsl, after their R, NK8,
// NV8, LW and RS constants and their s_op4/p_op4 loads): every lane holds a partial sum (its
// columns' share of a dot product) for each of RS positions (keys or rows of the workgroup);
// after the reduce-scatter, each position's full sum sits on one lane.

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

// This lane's columns of a streamed row's S operand (from `sb` through the kernel's s_op4) and dP
// operand (from `pb` through p_op4), 0 past the head dims (there the load is clamped to the
// row's last vec4, whose inf or NaN would otherwise enter the sums a second time through the
// owned rows' zero columns).
fn load_streamed(
    sb: u32,
    pb: u32,
    x: ptr<function, array<vec4<f32>, NK8>>,
    y: ptr<function, array<vec4<f32>, NV8>>,
    lid: u32,
) {
    let zero4 = vec4<f32>(0.0);
    for (var n = 0u; n < NK8; n++) { // unroll
        let col = n * WG + lid;
        (*x)[n] = select(zero4, s_op4(sb, 4u * min(col, D4 - 1u)), col < D4);
    }
    for (var n = 0u; n < NV8; n++) { // unroll
        let col = n * WG + lid;
        (*y)[n] = select(zero4, p_op4(pb, 4u * min(col, DV4 - 1u)), col < DV4);
    }
}

// S and dP of the streamed vector against the R owned ones, reduce-scattered: `a` and `b` hold
// this lane's columns of the R owned rows of the S operand (K in the dK/dV pass, Q in the dQ
// pass) and of the dP operand (V, dO), slot r·NK8 + n; `x` and `y` this lane's columns of the
// streamed row (Q and dO, or K and V), zero past the head dims. Afterwards position LW·q of `ss`
// and `ds` holds the full S and dP of owned row LW·q + lid.
fn scattered_products(
    a: ptr<function, array<vec4<f32>, R * NK8>>,
    b: ptr<function, array<vec4<f32>, R * NV8>>,
    x: ptr<function, array<vec4<f32>, NK8>>,
    y: ptr<function, array<vec4<f32>, NV8>>,
    ss: ptr<function, array<f32, RS>>,
    ds: ptr<function, array<f32, RS>>,
    lid: u32,
) {
    for (var r = 0u; r < RS; r++) { // unroll
        (*ss)[r] = 0.0;
        (*ds)[r] = 0.0;
    }
    for (var r = 0u; r < R; r++) { // unroll
        for (var n = 0u; n < NK8; n++) { // unroll
            (*ss)[r] += dot((*a)[r * NK8 + n], (*x)[n]);
        }
        for (var n = 0u; n < NV8; n++) { // unroll
            (*ds)[r] += dot((*b)[r * NV8 + n], (*y)[n]);
        }
    }
    reduce_scatter(ss, lid);
    reduce_scatter(ds, lid);
}
