//! The executable definition of attention. Every GPU path must agree with this, row for row.
//!
//! For batch `b`, query head `h` (key/value head `h / (Hq/Hkv)`), query row `i`, key `j`, with
//! `off = Lk_b - Lq_b` (valid lengths of batch entry `b`):
//! 1. `s = scale · q_i · k_j`;
//! 2. with softcap `c > 0`: `s = c · tanh(s / c)`;
//! 3. `s += bias[b, h, i, j]`; with ALiBi slopes: `s -= m_h · |i + off - j|`;
//! 4. `j` is visible iff `mask[b, h, i, j] != 0`, causal ⇒ `j <= i + off`, window ⇒
//!    `i + off - left <= j <= i + off + right`, and `j < Lk_b`;
//! 5. `P = softmax over visible j`, `O = P · V`, `LSE = log Σ_visible exp(s)`; a key that is
//!    not visible, or whose logit is -inf, contributes nothing to O whatever V holds there
//!    (NaN and inf included) and has `P = 0`;
//! 6. a row with no visible key (or whose visible logits are all -inf), and every row
//!    `i >= Lq_b`, gives `O = 0`, `LSE = -inf` and `P = 0`;
//! 7. a row with a NaN or +inf logit (from NaN or infinite inputs) gives NaN for O and LSE, and
//!    NaN for P at its visible keys whose logit is not -inf.

use crate::error::ProblemError;
use crate::problem::{Inputs, Problem};

/// The reference result, in f64.
#[derive(Clone, Debug)]
pub struct Reference {
    /// `[B, Lq, Hq, Dv]` in the problem's layout.
    pub out: Vec<f64>,
    /// `[B, Hq, Lq]`, natural log of the softmax denominator (-inf for empty rows).
    pub lse: Vec<f64>,
    /// `[B, Hq, Lq, Lk]`, the attention probabilities.
    pub probs: Vec<f64>,
}

/// Valid lengths `(Lq_b, Lk_b)` of batch entry `b`.
pub(crate) fn valid_lengths(p: &Problem, inputs: &Inputs<'_>, b: usize) -> (usize, usize) {
    let lq = inputs.q_seqlens.map_or(p.q_len, |l| l[b] as usize);
    let lk = inputs.kv_seqlens.map_or(p.kv_len, |l| l[b] as usize);
    (lq, lk)
}

/// Logit of (b, h, i, j), or `None` when key j is not visible to query i.
/// `off` is `Lk_b - Lq_b` and `lk` is `Lk_b`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn logit(
    p: &Problem,
    inputs: &Inputs<'_>,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
    off: i64,
    lk: usize,
) -> Option<f64> {
    let diag = i as i64 + off; // the key aligned with query i
    let jj = j as i64;
    if j >= lk {
        return None;
    }
    if p.causal && jj > diag {
        return None;
    }
    if let Some(w) = p.window {
        if let Some(left) = w.left
            && jj < diag - left as i64
        {
            return None;
        }
        if let Some(right) = w.right
            && jj > diag + right as i64
        {
            return None;
        }
    }
    if let (Some(shape), Some(mask)) = (p.mask, inputs.mask) {
        let (sb, sh) = shape.strides(p.q_len, p.kv_len);
        if mask[b * sb + h * sh + i * p.kv_len + j] == 0 {
            return None;
        }
    }
    let q = p.q_strides();
    let k = p.k_strides();
    let kvh = p.kv_head_of(h);
    let mut dot = 0.0f64;
    for d in 0..p.head_dim {
        dot +=
            inputs.q.get(q.index(b, i, h, d)) as f64 * inputs.k.get(k.index(b, j, kvh, d)) as f64;
    }
    let mut s = p.effective_scale() as f64 * dot;
    let c = p.effective_softcap() as f64;
    if c > 0.0 {
        s = c * (s / c).tanh();
    }
    if let (Some(shape), Some(bias)) = (p.bias, inputs.bias) {
        let (sb, sh) = shape.strides(p.q_len, p.kv_len);
        s += bias[b * sb + h * sh + i * p.kv_len + j] as f64;
    }
    if let Some(slopes) = inputs.alibi_slopes {
        s -= slopes[h] as f64 * (diag - jj).abs() as f64;
    }
    Some(s)
}

/// One query row of the reference: its output `[Dv]`, LSE and probabilities `[Lk]`.
#[derive(Clone, Debug)]
pub struct Row {
    pub out: Vec<f64>,
    pub lse: f64,
    pub probs: Vec<f64>,
}

/// Computes one query row `(b, h, i)`. Inputs must already be checked.
fn row(p: &Problem, inputs: &Inputs<'_>, b: usize, h: usize, i: usize) -> Row {
    let mut r = Row {
        out: vec![0.0; p.v_head_dim],
        lse: f64::NEG_INFINITY,
        probs: vec![0.0; p.kv_len],
    };
    let (lq, lk) = valid_lengths(p, inputs, b);
    if i >= lq {
        return r; // padding row: O = 0, LSE = -inf, P = 0
    }
    let off = lk as i64 - lq as i64;
    let logits: Vec<Option<f64>> = (0..p.kv_len)
        .map(|j| logit(p, inputs, b, h, i, j, off, lk))
        .collect();
    let m = logits
        .iter()
        .flatten()
        .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
    let sum: f64 = logits.iter().flatten().map(|&s| (s - m).exp()).sum();
    if logits.iter().flatten().any(|s| s.is_nan()) || m == f64::INFINITY {
        // A NaN logit (from NaN or infinite inputs), or a +inf one (whose softmax is inf/inf),
        // poisons its row: O and LSE are NaN, and so is P at every key that takes part (visible,
        // logit not -inf). A key with a -inf logit takes no part in any row (rule 5).
        r.out.fill(f64::NAN);
        r.lse = f64::NAN;
        for (j, s) in logits.iter().enumerate() {
            if s.is_some_and(|s| s != f64::NEG_INFINITY) {
                r.probs[j] = f64::NAN;
            }
        }
        return r;
    }
    if m == f64::NEG_INFINITY {
        return r; // empty row: O = 0, LSE = -inf, P = 0
    }
    r.lse = m + sum.ln();
    let v = p.v_strides();
    let kvh = p.kv_head_of(h);
    for (j, s) in logits.iter().enumerate() {
        // Hidden keys, and keys whose logit is -inf (a -inf bias masks), contribute nothing,
        // whatever V holds there: NaN or inf in V at such a key does not reach the row.
        let Some(s) = *s else { continue };
        if s == f64::NEG_INFINITY {
            continue;
        }
        let w = (s - m).exp() / sum;
        r.probs[j] = w;
        for (d, o) in r.out.iter_mut().enumerate() {
            *o += w * inputs.v.get(v.index(b, j, kvh, d)) as f64;
        }
    }
    r
}

/// Computes only the query rows `(b, h, i)` listed, for checking large problems on a sample.
pub fn attention_rows(
    p: &Problem,
    inputs: &Inputs<'_>,
    rows: &[(usize, usize, usize)],
) -> Result<Vec<Row>, ProblemError> {
    p.check_inputs(inputs)?;
    Ok(rows
        .iter()
        .map(|&(b, h, i)| row(p, inputs, b, h, i))
        .collect())
}

/// Computes attention on the CPU with f64 accumulation. Inputs are validated first.
pub fn attention(p: &Problem, inputs: &Inputs<'_>) -> Result<Reference, ProblemError> {
    p.check_inputs(inputs)?;
    let mut out = vec![0.0f64; p.o_elems()];
    let mut lse = vec![f64::NEG_INFINITY; p.lse_elems()];
    let mut probs = vec![0.0f64; p.probs_elems()];
    let o = p.o_strides();
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            for i in 0..p.q_len {
                let r = row(p, inputs, b, h, i);
                let index = (b * p.q_heads + h) * p.q_len + i;
                lse[index] = r.lse;
                probs[index * p.kv_len..(index + 1) * p.kv_len].copy_from_slice(&r.probs);
                for (d, &x) in r.out.iter().enumerate() {
                    out[o.index(b, i, h, d)] = x;
                }
            }
        }
    }
    Ok(Reference { out, lse, probs })
}

/// Merges partial results over disjoint key sets into the exact result of attending to their
/// union: with `m = max LSE_c` and `w_c = exp(LSE_c − m)`, `O = Σ w_c O_c / Σ w_c` and
/// `LSE = m + log Σ w_c`. Parts with `LSE = −inf` weigh nothing; a row empty everywhere gives
/// `O = 0`, `LSE = −inf`. Each part is `(O, LSE)` with O `[B, Lq, Hq, Dv]` in the problem's layout
/// and LSE `[B, Hq, Lq]`; `p.kv_len` is not used.
pub fn merge(
    p: &Problem,
    parts: &[(&[f32], &[f32])],
) -> Result<(Vec<f32>, Vec<f32>), ProblemError> {
    check_parts(p, parts)?;
    let o = p.o_strides();
    let mut out = vec![0.0f32; p.o_elems()];
    let mut lse = vec![f32::NEG_INFINITY; p.lse_elems()];
    for b in 0..p.batch {
        for h in 0..p.q_heads {
            for i in 0..p.q_len {
                let row = (b * p.q_heads + h) * p.q_len + i;
                if parts.iter().any(|(_, l)| l[row].is_nan()) {
                    lse[row] = f32::NAN;
                    for d in 0..p.v_head_dim {
                        out[o.index(b, i, h, d)] = f32::NAN;
                    }
                    continue;
                }
                let m = parts
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, (_, l)| m.max(l[row] as f64));
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = parts
                    .iter()
                    .map(|(_, l)| (l[row] as f64 - m).exp())
                    .collect();
                let total: f64 = w.iter().sum();
                lse[row] = (m + total.ln()) as f32;
                for d in 0..p.v_head_dim {
                    let idx = o.index(b, i, h, d);
                    let acc: f64 = parts
                        .iter()
                        .zip(&w)
                        .filter(|(_, w)| **w > 0.0)
                        .map(|((po, _), w)| w * po[idx] as f64)
                        .sum();
                    out[idx] = (acc / total) as f32;
                }
            }
        }
    }
    Ok((out, lse))
}

/// Checks the parts given to a merge: at least one, each of the problem's O and LSE sizes.
pub fn check_parts(p: &Problem, parts: &[(&[f32], &[f32])]) -> Result<(), ProblemError> {
    p.validate()?;
    if parts.is_empty() {
        return Err(ProblemError::BadValue {
            what: "merge",
            detail: "no parts to merge: expected at least one (O, LSE) pair".into(),
        });
    }
    for (o, l) in parts {
        for (what, got, expected) in [
            ("partial out", o.len(), p.o_elems()),
            ("partial lse", l.len(), p.lse_elems()),
        ] {
            if got != expected {
                return Err(ProblemError::LengthMismatch {
                    what,
                    got,
                    expected,
                });
            }
        }
    }
    Ok(())
}
