// stream.wgsl — a plain streaming read, the bandwidth yardstick for decoding: every thread
// reads vec4<u32> words with a grid stride and folds them into one value per workgroup (written,
// so the reads cannot be optimised away).

struct StreamParams {
    words: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> sp: StreamParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> sink: array<u32>;

var<workgroup> fold: array<u32, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wg.x + wg.y * nwg.x;
    let stride = nwg.x * nwg.y * 256u;
    var acc = vec4<u32>(0u);
    for (var w = group * 256u + lid; w < sp.words; w += stride) {
        acc ^= src[w];
    }
    fold[lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
    workgroupBarrier();
    if lid == 0u {
        var x = 0u;
        for (var t = 0u; t < 256u; t++) {
            x ^= fold[t];
        }
        sink[group] = x;
    }
}
