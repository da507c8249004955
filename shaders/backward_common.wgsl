// backward_common.wgsl — shared by the backward passes (after common.wgsl and logits.wgsl): the
// per-row statistics in aux and the gradient of one logit. See the README's "Semantics of
// gradients" and crates/spotlight-reference/src/backward.rs.
//
// aux holds, after the forward's words, the statistics the pre-pass made: the LSE of every row
// `(b * Hq + h) * Lq + i` at params.table_off + row, then D_i = rowsum(dO ∘ O) at
// params.table_off + rows + row (f32 bits). A row with LSE = -inf (padding, nothing visible)
// passes no gradient on; its dO is read as 0.

// Which query tiles / key tiles one dispatch covers, whether it adds to what an earlier dispatch
// wrote (a range split over dispatches on adapters that bound loops), and where dV starts in the
// output of the key/value pass.
struct Range {
    begin: u32,
    end: u32,
    accumulate: u32,
    dv_offset: u32,
}

@group(0) @binding(12) var<uniform> range: Range;

fn row_lse(row: u32) -> f32 {
    return bitcast<f32>(aux[params.table_off + row]);
}

fn row_delta(row: u32) -> f32 {
    let rows = params.batch * params.q_heads * params.q_len;
    return bitcast<f32>(aux[params.table_off + rows + row]);
}

// Query rows that can see at least one of keys j_first..=j_last of a batch entry (causal and
// window bounds only): [x, y).
fn visible_query_range(j_first: u32, j_last: u32, lq: u32, lk: u32, off: i32) -> vec2<i32> {
    if j_first >= lk || lq == 0u {
        return vec2<i32>(0, 0);
    }
    var lo = 0;
    var hi = i32(lq);
    let first = i32(j_first);
    let last = i32(min(j_last, lk - 1u));
    if has(F_CAUSAL) {
        lo = max(lo, first - off);
    }
    if params.win_right >= 0 {
        lo = max(lo, first - off - params.win_right);
    }
    if params.win_left >= 0 {
        hi = min(hi, last - off + params.win_left + 1);
    }
    return vec2<i32>(lo, hi);
}

// The gradient of one visible logit. `dot` is q_i · k_j, `dp` is dO_i · v_j. Returns
// (P, dS, g): P = exp(s - LSE), dS = P (dp - D_i) the gradient of the logit (and of the bias),
// and g = dS · ∂s/∂dot, what dQ and dK accumulate (times K_j and Q_i).
fn logit_grad(b: u32, h: u32, i: u32, j: u32, off: i32, dot: f32, dp: f32, lse: f32, delta: f32) -> vec3<f32> {
    let s = finish_logit(b, h, i, j, off, dot);
    let p = sm_weight(s, lse);
    let ds = p * (dp - delta);
    var g = ds * params.scale;
    if params.softcap > 0.0 {
        // The same clamped tanh as finish_logit: beyond |x| = 15 it is ±1 in f32, slope 0.
        let t = tanh(clamp(params.scale * dot / params.softcap, -15.0, 15.0));
        g *= 1.0 - t * t;
    }
    return vec3<f32>(p, ds, g);
}

// A logit gradient g with the key's visibility in it, as the row kernels pass it on (stored for
// backward_dq_rows.wgsl, shuffled in backward_q_rows.wgsl): g where the key is visible, an exact
// zero as -0.0, and +0.0 where it is not, so that a visible key's 0 still multiplies its K
// (0·inf = NaN, as the reference) and an invisible key never does (bits != 0: visible).
fn seen_grad(g: f32, seen: bool) -> f32 {
    var w = select(0u, bitcast<u32>(g), seen);
    if seen && g == 0.0 {
        w = 0x80000000u;
    }
    return bitcast<f32>(w);
}
