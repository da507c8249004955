// softmax_rules.wgsl — the softmax rules every kernel shares (README, Semantics), written once:
// the fused kernels (flash, flash_coop), the three-pass softmax, the merge of split-K parts and
// the backward passes include this file after common.wgsl.
// - A key whose logit is -inf (hidden by the mask, the causal or window band, a -inf bias, or
//   past a valid length) takes no part: its weight is exactly 0 whatever the running max, also
//   in a poisoned row.
// - A NaN logit gives a NaN weight, which poisons the row (sum, output and LSE become NaN);
//   +inf logits do the same through inf - inf.
// - While a row has seen no key its running max is -inf; rescaling from it gives 0.
// - A row is empty when its sum is exactly 0 (no key took part): output 0, LSE -inf. A NaN sum
//   is not empty.
// Tests on -inf and 0 are written `x == y` / `!(x == y)` so that NaN always takes the
// "takes part" / "not empty" branch.

// The weight of logit `s` against the running max (or the LSE) `m`.
fn sm_weight(s: f32, m: f32) -> f32 {
    return select(exp(s - m), 0.0, s == neg_inf());
}

fn sm_weight4(s: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return select(exp(s - m), vec4<f32>(0.0), s == vec4<f32>(neg_inf()));
}

// The factor that moves a running sum (and output) from max `m_old` to max `m_new`.
fn sm_rescale(m_old: f32, m_new: f32) -> f32 {
    return select(exp(m_old - m_new), 0.0, m_old == neg_inf());
}

fn sm_rescale4(m_old: vec4<f32>, m_new: vec4<f32>) -> vec4<f32> {
    return select(exp(m_old - m_new), vec4<f32>(0.0), m_old == vec4<f32>(neg_inf()));
}

// The normalised weight of logit `s` in a row with max `m` and sum `l`: exactly 0 for a key that
// takes no part, also in an empty or a poisoned row.
fn sm_prob(s: f32, m: f32, l: f32) -> f32 {
    return select(exp(s - m) / l, 0.0, s == neg_inf());
}

// Whether some key took part in a row whose weights sum to `l`.
fn sm_row_valid(l: f32) -> bool {
    return !(l == 0.0);
}

// The log-sum-exp of a row from its max `m` and sum `l`: -inf for an empty row.
fn sm_lse(m: f32, l: f32) -> f32 {
    return select(neg_inf(), m + log(l), sm_row_valid(l));
}
