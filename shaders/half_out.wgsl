// half_out.wgsl — the scalar fused kernels' store of O in a half dtype (OUT_DT 1 = f16,
// 2 = bf16), two elements per u32 word, in place of fused_io.wgsl's f32 `store_o` (kernels/ swaps
// them and binds `out` as words). Rounding is half_pack.wgsl's, as the pack pass it replaces.
//
// Every row starts at an even element (Dv is even and O's strides are multiples of it: the
// host checks), so a vec4 column's elements e..e+3 are the words e/2 and e/2 + 1, which only
// the thread that owns the column writes; a pair is inside V_DIM whole or not at all.
fn store_o(e: u32, col: u32, o: vec4<f32>) {
    if 4u * col < V_DIM {
        out[e / 2u] = to_half(o.x) | (to_half(o.y) << 16u);
    }
    if 4u * col + 2u < V_DIM {
        out[e / 2u + 1u] = to_half(o.z) | (to_half(o.w) << 16u);
    }
}
