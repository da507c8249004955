//! Error metrics for judging a result against the f64 reference.

/// How far a result is from the reference.
#[derive(Clone, Copy, Debug, Default)]
pub struct Error {
    /// `‖got − want‖₂ / max(‖want‖₂, tiny)` over the finite reference entries.
    pub rel_frobenius: f64,
    /// Largest `|got − want|` over the finite reference entries.
    pub max_abs: f64,
    /// Entries where the two disagree about being finite (NaN, or ±inf where a value was expected,
    /// or a value where ±inf was expected). Must be 0.
    pub non_finite_mismatches: usize,
    /// First index where `non_finite_mismatches` happened, or where the largest error is.
    pub worst_index: usize,
}

impl Error {
    /// True when the result is within `rel` relative Frobenius error and every non-finite value
    /// matches.
    pub fn within(&self, rel: f64) -> bool {
        self.non_finite_mismatches == 0 && self.rel_frobenius <= rel
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rel {:.3e}, max abs {:.3e}, non-finite mismatches {} (worst at index {})",
            self.rel_frobenius, self.max_abs, self.non_finite_mismatches, self.worst_index
        )
    }
}

/// Compares `got` with `want`. Non-finite reference values (the -inf LSE of an empty row, the NaN
/// entropy of a row without a distribution) must be matched exactly; NaN in `got` where the
/// reference is finite is always a mismatch.
pub fn compare(got: &[f32], want: &[f64]) -> Error {
    assert_eq!(got.len(), want.len(), "compare: length mismatch");
    let mut e = Error::default();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut worst_set = false;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_finite() {
            if !g.is_finite() {
                e.non_finite_mismatches += 1;
                if !worst_set {
                    e.worst_index = i;
                    worst_set = true;
                }
                continue;
            }
            let d = (g - w).abs();
            num += d * d;
            den += w * w;
            if d > e.max_abs {
                e.max_abs = d;
                if !worst_set {
                    e.worst_index = i;
                }
            }
        } else if g != w && !(g.is_nan() && w.is_nan()) {
            e.non_finite_mismatches += 1;
            if !worst_set {
                e.worst_index = i;
                worst_set = true;
            }
        }
    }
    e.rel_frobenius = num.sqrt() / den.sqrt().max(1e-30);
    e
}

/// Compares the listed query rows `(b, h, i)` of a result with the reference computed for those
/// rows alone: the check for problems too large to compute whole on the CPU. `out` is in the
/// problem's layout, `lse` is `[B, Hq, Lq]`. Each row contributes its `Dv` outputs and then its
/// LSE, so `worst_index / (Dv + 1)` is the worst row's position in `rows`.
pub fn compare_rows(
    p: &crate::Problem,
    inputs: &crate::Inputs<'_>,
    out: &[f32],
    lse: &[f32],
    rows: &[(usize, usize, usize)],
) -> Result<Error, crate::ProblemError> {
    let want = crate::attention_rows(p, inputs, rows)?;
    compare_computed_rows(p, out, lse, rows, &want)
}

/// [`compare_rows`] against reference rows computed already (`want[k]` is row `rows[k]`, from
/// [`crate::attention_rows`]): for a caller that computes them while the GPU runs.
pub fn compare_computed_rows(
    p: &crate::Problem,
    out: &[f32],
    lse: &[f32],
    rows: &[(usize, usize, usize)],
    want: &[crate::Row],
) -> Result<Error, crate::ProblemError> {
    for (what, got, expected) in [
        ("out", out.len(), p.o_elems()),
        ("lse", lse.len(), p.lse_elems()),
        ("reference rows", want.len(), rows.len()),
    ] {
        if got != expected {
            return Err(crate::ProblemError::LengthMismatch {
                what,
                got,
                expected,
            });
        }
    }
    let o = p.o_strides();
    let (mut got_v, mut want_v) = (Vec::new(), Vec::new());
    for (&(b, h, i), r) in rows.iter().zip(want) {
        for d in 0..p.v_head_dim {
            got_v.push(out[o.index(b, i, h, d)]);
            want_v.push(r.out[d]);
        }
        got_v.push(lse[(b * p.q_heads + h) * p.q_len + i]);
        want_v.push(r.lse);
    }
    Ok(compare(&got_v, &want_v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;
    use crate::{DType, OwnedInputs, Problem};

    /// Rows computed ahead (as `spotlight bench` does while the GPU runs) judge a result as the
    /// whole reference does: an exact result passes, a wrong or NaN entry in a listed row is
    /// found and located, and mismatched lengths are an error, not a panic.
    #[test]
    fn rows_computed_ahead_judge_like_the_whole_reference() {
        let mut p = Problem::new(2, 9, 11, 4, 2, 8);
        p.causal = true;
        let mut rng = Rng::new(5);
        let data = OwnedInputs::random(&p, [DType::F32; 3], 1.0, &mut rng);
        let inputs = data.inputs();
        let whole = crate::attention(&p, &inputs).unwrap();
        let out: Vec<f32> = whole.out.iter().map(|&x| x as f32).collect();
        let lse: Vec<f32> = whole.lse.iter().map(|&x| x as f32).collect();
        let rows = [(0, 0, 0), (1, 3, 8), (1, 1, 4)];
        let want = crate::attention_rows(&p, &inputs, &rows).unwrap();
        let e = compare_computed_rows(&p, &out, &lse, &rows, &want).unwrap();
        assert!(e.within(1e-6), "{e}");
        assert_eq!(e.non_finite_mismatches, 0);

        // Row (1, 1, 4), element 3: off by a visible amount, then NaN.
        let at = p.o_strides().index(1, 4, 1, 3);
        let mut wrong = out.clone();
        wrong[at] += 0.5;
        let e = compare_computed_rows(&p, &wrong, &lse, &rows, &want).unwrap();
        assert!(!e.within(1e-3), "{e}");
        assert_eq!(e.worst_index, 2 * (p.v_head_dim + 1) + 3, "{e}");
        wrong[at] = f32::NAN;
        let e = compare_computed_rows(&p, &wrong, &lse, &rows, &want).unwrap();
        assert_eq!(e.non_finite_mismatches, 1, "{e}");
        assert_eq!(e.worst_index / (p.v_head_dim + 1), 2, "{e}");
        // The same as computing the rows inside.
        let inside = compare_rows(&p, &inputs, &wrong, &lse, &rows).unwrap();
        assert_eq!(inside.non_finite_mismatches, 1);
        assert_eq!(inside.worst_index, e.worst_index);

        for (o, l, w) in [
            (&out[1..], &lse[..], &want[..]),
            (&out[..], &lse[1..], &want[..]),
            (&out[..], &lse[..], &want[1..]),
        ] {
            assert!(matches!(
                compare_computed_rows(&p, o, l, &rows, w),
                Err(crate::ProblemError::LengthMismatch { .. })
            ));
        }
    }
}
