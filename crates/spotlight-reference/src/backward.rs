//! The exact gradient of attention (f64): the executable definition of the backward pass.
//!
//! For the loss `L` with `dO = ∂L/∂O`, per query row `(b, h, i)` with a finite LSE and every key
//! `j` visible to it (the forward's rule 4), with `s` its logit and `P = exp(s − LSE)`:
//! - `D_i = Σ_d dO_i · O_i` (the row's `rowsum(dO ∘ O)`);
//! - `dV_j += P · dO_i`, `dP = dO_i · V_j`, `dS = P · (dP − D_i)` (the gradient of the logit);
//! - `dBias[b, h, i, j] += dS` (summed over a broadcast batch or head dim);
//! - with softcap `c`: `g = dS · scale · (1 − tanh²(scale · q·k / c))`, else `g = dS · scale`;
//!   `dQ_i += g · K_j`, `dK_j += g · Q_i` (summed over the query heads of a key/value group).
//!
//! What follows from the forward's semantics: a key a row cannot see contributes nothing to any
//! gradient (whatever Q, K, V, dO hold); padded query rows (`i ≥ Lq_b`), rows with no visible
//! key (`LSE = −inf`: their O is the constant 0) and padded keys (`j ≥ Lk_b`) get zero gradient
//! and pass nothing on; a NaN row (NaN LSE) or a NaN in `dO_i`, `Q_i`, `K_j` or `V_j` makes the
//! gradients it reaches NaN: `dQ_i`, and `dK_j`, `dV_j`, `dBias[.., i, j]` of the keys the row
//! sees. ALiBi slopes, the mask and the sequence lengths get no gradient.

use crate::error::ProblemError;
use crate::problem::{Inputs, Problem};
use crate::reference::{Reference, logit, valid_lengths};
use crate::tensor::TensorRef;

/// Gradients in f64, each in the layout of its input.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// `[B, Lq, Hq, D]`, layout of Q.
    pub dq: Vec<f64>,
    /// `[B, Lk, Hkv, D]`, layout of K.
    pub dk: Vec<f64>,
    /// `[B, Lk, Hkv, Dv]`, layout of V.
    pub dv: Vec<f64>,
    /// `[B|1, Hq|1, Lq, Lk]` like the bias, when the problem has one.
    pub dbias: Option<Vec<f64>>,
}

/// Checks the forward results and `dO` given to a backward pass against the problem.
pub fn check_backward_inputs(
    p: &Problem,
    inputs: &Inputs<'_>,
    out_len: usize,
    lse_len: usize,
    d_out_len: usize,
) -> Result<(), ProblemError> {
    p.check_inputs(inputs)?;
    for (what, got, expected) in [
        ("forward out", out_len, p.o_elems()),
        ("forward lse", lse_len, p.lse_elems()),
        ("d_out", d_out_len, p.o_elems()),
    ] {
        if got != expected {
            return Err(ProblemError::LengthMismatch {
                what,
                got,
                expected,
            });
        }
    }
    Ok(())
}

/// The exact gradients of attention given the forward result (`O` and `LSE`, e.g. from
/// [`crate::attention`]) and `dO` (`[B, Lq, Hq, Dv]` in the problem's layout).
pub fn attention_backward(
    p: &Problem,
    inputs: &Inputs<'_>,
    forward: &Reference,
    d_out: TensorRef<'_>,
) -> Result<Gradients, ProblemError> {
    check_backward_inputs(p, inputs, forward.out.len(), forward.lse.len(), d_out.len())?;
    let mut g = Gradients {
        dq: vec![0.0; p.q_elems()],
        dk: vec![0.0; p.k_elems()],
        dv: vec![0.0; p.v_elems()],
        dbias: p
            .bias
            .map(|b| vec![0.0; b.batch * b.heads * p.q_len * p.kv_len]),
    };
    let (qs, ks, vs, os) = (p.q_strides(), p.k_strides(), p.v_strides(), p.o_strides());
    let scale = p.effective_scale() as f64;
    let c = p.effective_softcap() as f64;
    let (d, dv) = (p.head_dim, p.v_head_dim);
    let bias_strides = p.bias.map(|b| b.strides(p.q_len, p.kv_len));
    for b in 0..p.batch {
        let (lq, lk) = valid_lengths(p, inputs, b);
        let off = lk as i64 - lq as i64;
        for h in 0..p.q_heads {
            let kvh = p.kv_head_of(h);
            for i in 0..lq {
                let lse = forward.lse[(b * p.q_heads + h) * p.q_len + i];
                if lse == f64::NEG_INFINITY {
                    continue; // O is the constant 0 here: no gradient flows
                }
                let d_o: Vec<f64> = (0..dv)
                    .map(|x| d_out.get(os.index(b, i, h, x)) as f64)
                    .collect();
                let delta: f64 = (0..dv)
                    .map(|x| d_o[x] * forward.out[os.index(b, i, h, x)])
                    .sum();
                for j in 0..lk {
                    let Some(s) = logit(p, inputs, b, h, i, j, off, lk) else {
                        continue;
                    };
                    let prob = (s - lse).exp();
                    let mut dp = 0.0;
                    for (x, &o) in d_o.iter().enumerate() {
                        let vi = vs.index(b, j, kvh, x);
                        g.dv[vi] += prob * o;
                        dp += o * inputs.v.get(vi) as f64;
                    }
                    let ds = prob * (dp - delta);
                    if let (Some(db), Some((sb, sh))) = (g.dbias.as_mut(), bias_strides) {
                        db[b * sb + h * sh + i * p.kv_len + j] += ds;
                    }
                    let mut gdot = ds * scale;
                    if c > 0.0 {
                        let dot: f64 = (0..d)
                            .map(|x| {
                                inputs.q.get(qs.index(b, i, h, x)) as f64
                                    * inputs.k.get(ks.index(b, j, kvh, x)) as f64
                            })
                            .sum();
                        let t = (scale * dot / c).tanh();
                        gdot *= 1.0 - t * t;
                    }
                    for x in 0..d {
                        let (qi, ki) = (qs.index(b, i, h, x), ks.index(b, j, kvh, x));
                        g.dq[qi] += gdot * inputs.k.get(ki) as f64;
                        g.dk[ki] += gdot * inputs.q.get(qi) as f64;
                    }
                }
            }
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::{Broadcast, Layout, Window};
    use crate::random::Rng;
    use crate::{TensorRef, attention};

    /// Owned inputs of one problem (f32), with every optional tensor the problem declares.
    struct Data {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        bias: Option<Vec<f32>>,
        mask: Option<Vec<u8>>,
        slopes: Option<Vec<f32>>,
        q_lens: Option<Vec<i32>>,
        kv_lens: Option<Vec<i32>>,
    }

    impl Data {
        fn inputs(&self) -> Inputs<'_> {
            Inputs {
                q: TensorRef::F32(&self.q),
                k: TensorRef::F32(&self.k),
                v: TensorRef::F32(&self.v),
                bias: self.bias.as_deref(),
                mask: self.mask.as_deref(),
                alibi_slopes: self.slopes.as_deref(),
                q_seqlens: self.q_lens.as_deref(),
                kv_seqlens: self.kv_lens.as_deref(),
            }
        }
    }

    fn data(p: &Problem, rng: &mut Rng) -> Data {
        let n = |b: &Broadcast| b.batch * b.heads * p.q_len * p.kv_len;
        Data {
            q: rng.vec(p.q_elems()),
            k: rng.vec(p.k_elems()),
            v: rng.vec(p.v_elems()),
            bias: p
                .bias
                .map(|b| (0..n(&b)).map(|_| rng.uniform(-1.0, 1.0)).collect()),
            mask: p
                .mask
                .map(|b| (0..n(&b)).map(|_| rng.chance(0.75) as u8).collect()),
            slopes: p
                .alibi
                .then(|| (0..p.q_heads).map(|_| rng.uniform(0.05, 0.5)).collect()),
            q_lens: p
                .q_seqlens
                .then(|| (0..p.batch).map(|_| rng.range(0, p.q_len) as i32).collect()),
            kv_lens: p.kv_seqlens.then(|| {
                (0..p.batch)
                    .map(|_| rng.range(0, p.kv_len) as i32)
                    .collect()
            }),
        }
    }

    /// `L = Σ dO ∘ O` in f64.
    fn loss(p: &Problem, data: &Data, d_out: &[f32]) -> f64 {
        let r = attention(p, &data.inputs()).unwrap();
        r.out.iter().zip(d_out).map(|(o, &g)| o * g as f64).sum()
    }

    /// Central difference of the loss in one f32 input element, divided by the exact distance
    /// between the two perturbed f32 values.
    fn central(
        p: &Problem,
        data: &mut Data,
        d_out: &[f32],
        get: fn(&mut Data) -> &mut [f32],
        idx: usize,
    ) -> f64 {
        let x = get(data)[idx];
        let h = 1e-3f32 * x.abs().max(1.0);
        let (xp, xm) = (x + h, x - h);
        get(data)[idx] = xp;
        let lp = loss(p, data, d_out);
        get(data)[idx] = xm;
        let lm = loss(p, data, d_out);
        get(data)[idx] = x;
        (lp - lm) / (xp as f64 - xm as f64)
    }

    type Target<'a> = (&'static str, fn(&mut Data) -> &mut [f32], &'a [f64]);

    fn check_fd(p: &Problem, seed: u64) -> usize {
        let mut rng = Rng::new(seed);
        let mut data = data(p, &mut rng);
        let d_out = rng.vec(p.o_elems());
        let fwd = attention(p, &data.inputs()).unwrap();
        let g = attention_backward(p, &data.inputs(), &fwd, TensorRef::F32(&d_out)).unwrap();
        let mut checked = 0;
        let targets: [Target<'_>; 4] = [
            ("dq", |d| &mut d.q, &g.dq),
            ("dk", |d| &mut d.k, &g.dk),
            ("dv", |d| &mut d.v, &g.dv),
            (
                "dbias",
                |d| d.bias.as_deref_mut().unwrap_or(&mut []),
                g.dbias.as_deref().unwrap_or(&[]),
            ),
        ];
        for (name, get, exact) in targets {
            let scale = exact.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
            for (idx, &want) in exact.iter().enumerate() {
                let fd = central(p, &mut data, &d_out, get, idx);
                assert!(
                    (fd - want).abs() <= 2e-5 * scale + 1e-6 * want.abs(),
                    "{name}[{idx}] of {p:?} (seed {seed:#x}): exact {want:e}, finite difference {fd:e}"
                );
                checked += 1;
            }
        }
        checked
    }

    /// The reference gradients equal central finite differences of `Σ dO ∘ O` on small
    /// problems with every option (the test of the test).
    #[test]
    fn gradients_match_finite_differences() {
        let base = Problem::new(2, 4, 6, 4, 2, 3).v_head_dim(2);
        let mut cases = vec![
            base.clone(),
            base.clone().causal(true),
            base.clone().layout(Layout::Bhsd).causal(true),
        ];
        let mut p = base.clone();
        p.softcap = Some(1.5);
        p.scale = Some(0.9);
        p.bias = Some(Broadcast { batch: 1, heads: 4 });
        cases.push(p);
        let mut p = base.clone();
        p.bias = Some(Broadcast { batch: 2, heads: 1 });
        p.mask = Some(Broadcast { batch: 1, heads: 1 });
        p.alibi = true;
        p.window = Some(Window {
            left: Some(2),
            right: Some(1),
        });
        cases.push(p);
        let mut p = base.causal(true);
        p.q_seqlens = true;
        p.kv_seqlens = true;
        p.softcap = Some(0.7);
        p.bias = Some(Broadcast { batch: 1, heads: 1 });
        cases.push(p);
        let mut p = Problem::new(1, 5, 3, 3, 1, 4).causal(true); // Lq > Lk: empty rows; MQA
        p.bias = Some(Broadcast { batch: 1, heads: 3 });
        cases.push(p);
        let mut checked = 0;
        for (n, p) in cases.iter().enumerate() {
            checked += check_fd(p, 0xB00 + n as u64);
        }
        assert!(checked > 500, "checked only {checked} partial derivatives");
    }

    /// Padded rows and keys, rows that see nothing and masked keys get zero gradient, and NaN in
    /// what no row sees does not leak; a NaN a row sees reaches exactly the row's gradients.
    #[test]
    fn zero_and_nan_rules() {
        let mut p = Problem::new(1, 4, 5, 1, 1, 2).causal(true);
        p.q_seqlens = true;
        p.kv_seqlens = true;
        p.mask = Some(Broadcast { batch: 1, heads: 1 });
        let mut rng = Rng::new(7);
        let mut data = data(&p, &mut rng);
        data.q_lens = Some(vec![3]);
        data.kv_lens = Some(vec![4]);
        // off = 1: row 0 sees keys 0..=1, row 1 keys 0..=2, row 2 keys 0..=3. Mask out key 2
        // for every row, and row 0 entirely.
        let mut mask = vec![1u8; 20];
        for i in 0..4 {
            mask[i * 5 + 2] = 0;
        }
        mask[0] = 0;
        mask[1] = 0;
        data.mask = Some(mask);
        // NaN where nothing looks: key 2 (masked), key 4 (padding), query row 3 (padding), and
        // dO of row 0 (sees nothing) and row 3.
        for x in 0..2 {
            data.k[2 * 2 + x] = f32::NAN;
            data.v[2 * 2 + x] = f32::NAN;
            data.k[4 * 2 + x] = f32::NAN;
            data.v[4 * 2 + x] = f32::NAN;
            data.q[3 * 2 + x] = f32::NAN;
        }
        let mut d_out = rng.vec(p.o_elems());
        d_out[0] = f32::NAN;
        d_out[6] = f32::NAN;
        let fwd = attention(&p, &data.inputs()).unwrap();
        let g = attention_backward(&p, &data.inputs(), &fwd, TensorRef::F32(&d_out)).unwrap();
        let all = [&g.dq, &g.dk, &g.dv];
        assert!(all.iter().all(|t| t.iter().all(|x| x.is_finite())), "{g:?}");
        assert_eq!(&g.dq[0..2], &[0.0, 0.0], "row 0 sees nothing");
        assert_eq!(&g.dq[6..8], &[0.0, 0.0], "row 3 is padding");
        for j in [2, 4] {
            assert_eq!(&g.dk[j * 2..j * 2 + 2], &[0.0, 0.0], "key {j}");
            assert_eq!(&g.dv[j * 2..j * 2 + 2], &[0.0, 0.0], "key {j}");
        }
        assert!(g.dq[2..6].iter().any(|&x| x != 0.0));
        // A NaN in dO[row 1, column 0] (row 1 sees keys 0, 1) poisons dQ of row 1 and dK, dV of keys 0, 1 only.
        d_out[2] = f32::NAN;
        let g = attention_backward(&p, &data.inputs(), &fwd, TensorRef::F32(&d_out)).unwrap();
        assert!(g.dq[2..4].iter().all(|x| x.is_nan()));
        assert!(g.dq[4..6].iter().all(|x| x.is_finite()));
        assert!(g.dk[0..4].iter().all(|x| x.is_nan()));
        // dV_j = Σ P dO_i column by column: only column 0 of keys 0 and 1.
        assert!(g.dv[0].is_nan() && g.dv[2].is_nan());
        assert!(g.dv[1].is_finite() && g.dv[3].is_finite());
        assert!(g.dk[6..].iter().all(|x| x.is_finite()));
    }
}
