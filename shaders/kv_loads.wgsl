// kv_loads.wgsl — shared by the forward fused kernels (flash.wgsl, flash_rows.wgsl,
// flash_decode.wgsl): four elements of K or V at a time.
//
// k4/v4 read the elements `base + d0 ..` of a K (V) row, zero past the row's HEAD_DIM (V_DIM)
// elements (never read: the next row may hold inf, and 0·inf would be NaN), through the
// kernel's element loads. Where every row of K and V starts at a multiple of 4 elements and the
// head dims are multiples of 4, kernels/ (`VEC4_KV`) rewrites the K and V bindings as vec4 (f32)
// or vec2 (packed f16, bf16) words and these two lines into one wide load each: one 16- or
// 8-byte load instead of four (on a CPU adapter every load is a loop over the lanes, so one load
// of four elements costs about what one element did; on a GPU, a quarter of the instructions).

fn k4(base: u32, d0: u32) -> vec4<f32> { return k4_scalar(base, d0); } // load k4
fn v4(base: u32, d0: u32) -> vec4<f32> { return v4_scalar(base, d0); } // load v4

fn k4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < HEAD_DIM {
            x[c] = load_k(base + d0 + c);
        }
    }
    return x;
}

fn v4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < V_DIM {
            x[c] = load_v(base + d0 + c);
        }
    }
    return x;
}
