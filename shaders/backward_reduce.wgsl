// backward_reduce.wgsl — dBias from the logit gradients dS [B, Hq, Lq, Lk]: summed over the
// batch and head dims the bias broadcasts ([B|1, Hq|1, Lq, Lk]), in a fixed order.

struct Dims {
    bias_batch: u32,
    bias_heads: u32,
    ds_offset: u32,
    pad: u32,
}

@group(0) @binding(4) var<storage, read> ds: array<f32>;
@group(0) @binding(5) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(13) var<uniform> dims: Dims;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let ll = params.q_len * params.kv_len;
    let n = dims.bias_batch * dims.bias_heads * ll;
    let x = folded_group(wg, nwg) * 64u + lid;
    if x >= n {
        return;
    }
    let ij = x % ll;
    let hh = (x / ll) % dims.bias_heads;
    let bb = x / (ll * dims.bias_heads);
    var b_lo = bb;
    var b_hi = bb + 1u;
    if dims.bias_batch == 1u {
        b_lo = 0u;
        b_hi = params.batch;
    }
    var h_lo = hh;
    var h_hi = hh + 1u;
    if dims.bias_heads == 1u {
        h_lo = 0u;
        h_hi = params.q_heads;
    }
    var acc = 0.0;
    for (var b = b_lo; b < b_hi; b++) {
        for (var h = h_lo; h < h_hi; h++) {
            acc += ds[dims.ds_offset + (b * params.q_heads + h) * ll + ij];
        }
    }
    dbias[x] = acc;
}
