// softmax.wgsl — three-pass attention, pass 2: per row, one read pass with an online (max, sum)
// per thread, a tree merge of the pairs, then normalise in place (S -> P) and write the LSE.
// A row whose logits are all -inf gives P = 0 and LSE = -inf.

override WG: u32 = 128u;

@group(0) @binding(4) var<storage, read_write> probs: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_l: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = folded_group(wg, nwg);
    if row >= params.batch * params.q_heads * params.q_len {
        return;
    }
    let base = row * params.kv_len;
    let ninf = neg_inf();
    var m = ninf;
    var l = 0.0;
    for (var j = lid; j < params.kv_len; j += WG) {
        let s = probs[base + j];
        if is_nan(s) {
            m = nan(); // a NaN logit poisons the row (see the semantics)
            break;
        }
        if s > m {
            l = l * sm_rescale(m, s) + 1.0;
            m = s;
        } else {
            l += sm_weight(s, m);
        }
    }
    red_m[lid] = m;
    red_l[lid] = l;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            let m1 = red_m[lid];
            let m2 = red_m[lid + stride];
            var mm = max(m1, m2);
            if is_nan(m1) || is_nan(m2) {
                mm = nan();
            }
            let ll = red_l[lid] * sm_rescale(m1, mm) + red_l[lid + stride] * sm_rescale(m2, mm);
            red_m[lid] = mm;
            red_l[lid] = ll;
        }
        workgroupBarrier();
    }
    let mx = red_m[0];
    let sum = red_l[0];
    for (var j = lid; j < params.kv_len; j += WG) {
        probs[base + j] = sm_prob(probs[base + j], mx, sum);
    }
    if lid == 0u {
        lse[row] = sm_lse(mx, sum);
    }
}
