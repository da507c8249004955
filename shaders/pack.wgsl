// pack.wgsl — converts f32 values to packed f16 or bf16 (two per u32 word), rounding to nearest
// even (half_pack.wgsl). Used when the output is asked for in half precision and the pass that
// computes it writes f32.

struct PackParams {
    count: u32,
    words: u32,
    pad0: u32,
    pad1: u32,
}

override OUT_DT: u32 = 1u;

@group(0) @binding(0) var<uniform> pp: PackParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = (wg.x + wg.y * nwg.x) * 256u + lid;
    if w >= pp.words {
        return;
    }
    let lo = to_half(src[2u * w]);
    var hi = 0u;
    if 2u * w + 1u < pp.count {
        hi = to_half(src[2u * w + 1u]);
    }
    dst[w] = lo | (hi << 16u);
}
