// half_pack.wgsl — rounding an f32 to f16 or bf16 bits (nearest even), for the kernels that write
// half-precision outputs two per u32 word (pack.wgsl, merge.wgsl). The including module declares
// `override OUT_DT` (1 = f16, 2 = bf16).

fn to_bf16(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if (bits & 0x7fffffffu) > 0x7f800000u {
        return 0x7fc0u; // NaN stays NaN
    }
    return (bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u;
}

fn to_half(x: f32) -> u32 {
    if OUT_DT == 2u {
        return to_bf16(x);
    }
    return pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu;
}
