// row_loads.wgsl — shared by the row kernels (flash_rows.wgsl, backward_q_rows.wgsl,
// backward_kv_rows.wgsl): decoding the words of their wide loads.

// Four elements from the words of a wide load (VEC4_KV): f32 as vec4<u32>, f16 and bf16 packed
// two per word as vec2<u32>.
fn wide_f32(w: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(w);
}

fn wide_half(w: vec2<u32>, dt: u32) -> vec4<f32> {
    if dt == 1u {
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return bitcast<vec4<f32>>(vec4<u32>(w.x << 16u, w.x & 0xffff0000u, w.y << 16u, w.y & 0xffff0000u));
}
