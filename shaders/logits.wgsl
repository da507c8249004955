// logits.wgsl — the semantics of one logit, shared by the three-pass scores pass and the fused
// kernel so that every path computes exactly the same thing (see the README's "Semantics").

@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<u32>;

// Whether key j (a global key index) is visible to query row i of (b, h); off = Lk_b - Lq_b,
// lk = Lk_b: inside the bands (in_band) and kept by the mask.
fn visible(b: u32, h: u32, i: u32, j: u32, off: i32, lk: u32) -> bool {
    if j >= lk || !in_band(i, i32(j), off, lk) {
        return false;
    }
    if has(F_MASK) {
        let idx = b * params.mask_sb + h * params.mask_sh + i * params.kv_total + j;
        let byte = (mask[idx >> 2u] >> ((idx & 3u) * 8u)) & 0xffu;
        if byte == 0u {
            return false;
        }
    }
    return true;
}

// Whether key j lies inside the key length and the causal and window bands of query row i:
// what `visible` decides before the mask (which also tests j < lk in u32, for keys past i32).
fn in_band(i: u32, j: i32, off: i32, lk: u32) -> bool {
    let band = band_limits(i, off, lk);
    return j >= band.x && j <= band.y;
}

// The keys query row i sees from the key length and the causal and window bands alone, as an
// inclusive range [x, y] (empty when y < x): in_band's decision, for kernels that hoist it out
// of their key loop.
fn band_limits(i: u32, off: i32, lk: u32) -> vec2<i32> {
    let diag = i32(i) + off;
    // j < lk, for every lk a u32 holds (past i32's range every key index is below it).
    var hi = select(i32(lk) - 1, 0x7fffffff, lk > 0x7fffffffu);
    if has(F_CAUSAL) {
        hi = min(hi, diag);
    }
    if params.win_right >= 0 {
        hi = min(hi, diag + params.win_right);
    }
    var lo = -2147483647 - 1; // no lower bound but the left window
    if params.win_left >= 0 {
        lo = diag - params.win_left;
    }
    return vec2<i32>(lo, hi);
}

// Keys that can be visible to at least one of the query rows at positions i_first..=i_last of a
// batch entry, from the causal and window bounds: [x, y). lq and lk are the valid lengths and
// off = lk - lq. The fused kernels skip key tiles outside it.
fn visible_key_range(i_first: u32, i_last: u32, lq: u32, lk: u32, off: i32) -> vec2<i32> {
    if i_first >= lq {
        return vec2<i32>(0, 0);
    }
    var lo = 0;
    var hi = i32(lk);
    let first = i32(i_first) + off;
    let last = i32(min(i_last, lq - 1u)) + off;
    if has(F_CAUSAL) {
        hi = min(hi, last + 1);
    }
    if params.win_right >= 0 {
        hi = min(hi, last + params.win_right + 1);
    }
    if params.win_left >= 0 {
        lo = max(lo, first - params.win_left);
    }
    return vec2<i32>(lo, hi);
}

// The logit of a visible key from its raw dot product q_i · k_j.
fn finish_logit(b: u32, h: u32, i: u32, j: u32, off: i32, dot: f32) -> f32 {
    var s = params.scale * dot;
    if params.softcap > 0.0 {
        s = params.softcap * softcap_tanh(s / params.softcap);
    }
    if has(F_BIAS) {
        s += bias[b * params.bias_sb + h * params.bias_sh + i * params.kv_total + j];
    }
    if has(F_ALIBI) {
        s -= alibi_slope(h) * f32(abs(i32(i) + off - i32(j)));
    }
    return s;
}

// tanh(x) accurate to f32 rounding for every x, so that c·tanh(s/c) stays exact to f32 rounding
// for any cap c (with a large cap, s/c is tiny and a tanh built on exp loses every digit to
// cancellation: the LSE drifted by c·6e-8 per logit). NaN stays NaN (no clamp, which would send
// it to a bound) and ±inf gives ±1.
fn softcap_tanh(x: f32) -> f32 {
    let a = abs(x);
    if a < 0.125 {
        // Taylor series to x^9: the first dropped term is below 1e-10 · |x| here.
        let x2 = x * x;
        return x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))));
    }
    // 1 - 2/(e^2a + 1): no cancellation for a >= 0.125 (tanh >= 0.124), 1 once e^2a overflows.
    let t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(-t, t, x >= 0.0);
}
