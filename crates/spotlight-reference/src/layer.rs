//! The attention layer, the executable definition: projections (`y = x·Wᵀ + b`, weights
//! `[out, in]` as in `torch.nn.Linear`), rotary embeddings, attention, output projection.
//!
//! For hidden states `x` `[B, L, hidden]`:
//! 1. `q = x·Wqᵀ + bq` `[B, L, Hq, D]`, `k = x·Wkᵀ + bk` `[B, L, Hkv, D]`, `v = x·Wvᵀ + bv`
//!    `[B, L, Hkv, D]` (hidden index `head · D + d`);
//! 2. with a [`Rope`], q and k are rotated at each token's position (`positions[b·L + t]`,
//!    default `t`);
//! 3. q, k and v are stored as f32 (the layer's intermediates are f32 on every path), and
//!    `o = attention(q, k, v)` with the problem's options ([`crate::attention`]);
//! 4. `out = o·Woᵀ + bo` `[B, L, hidden]` (Wo `[hidden, Hq·D]`).
//!
//! Projections and rotation accumulate in f64 here.

use crate::error::ProblemError;
use crate::problem::{Inputs, Layout, Problem};
use crate::rope::Rope;
use crate::tensor::TensorRef;

/// Shape of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerConfig {
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Option<Rope>,
}

impl LayerConfig {
    pub fn new(hidden: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        LayerConfig {
            hidden,
            q_heads,
            kv_heads,
            head_dim,
            rope: None,
        }
    }

    pub fn rope(mut self, rope: Rope) -> Self {
        self.rope = Some(rope);
        self
    }

    /// `Hq · D`.
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }

    /// `Hkv · D`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Rows of a fused QKV weight: `(Hq + 2·Hkv) · D`.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Checks the shape (every size at least 1, Hq a multiple of Hkv, the rotary embedding, and
    /// sizes that fit the u32 indices of the kernels).
    pub fn validate(&self) -> Result<(), ProblemError> {
        for (name, v) in [
            ("hidden", self.hidden),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(ProblemError::ZeroDim { name });
            }
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(ProblemError::HeadsNotDivisible {
                q_heads: self.q_heads,
                kv_heads: self.kv_heads,
            });
        }
        let qkv = (self.q_heads + 2 * self.kv_heads).checked_mul(self.head_dim);
        let w = qkv.and_then(|n| n.checked_mul(self.hidden));
        if w.is_none_or(|n| n > u32::MAX as usize) {
            return Err(ProblemError::TooLarge {
                what: "the QKV weight",
                elems: w.unwrap_or(usize::MAX),
            });
        }
        if let Some(r) = &self.rope {
            r.validate(self.head_dim)?;
        }
        Ok(())
    }

    /// The attention problem of this layer on `[batch, seq]` tokens (self-attention, BSHD, no
    /// options set): set causal, window, scale, softcap, bias, mask, ALiBi and sequence lengths
    /// on it as for [`crate::attention`].
    pub fn problem(&self, batch: usize, seq: usize) -> Problem {
        Problem::new(batch, seq, seq, self.q_heads, self.kv_heads, self.head_dim)
    }

    /// Checks that `p` is this layer's problem on `[batch, seq]` tokens.
    pub fn check_problem(&self, p: &Problem, batch: usize, seq: usize) -> Result<(), ProblemError> {
        p.validate()?;
        let want = self.problem(batch, seq);
        let got = (
            p.batch,
            p.q_len,
            p.kv_len,
            p.q_heads,
            p.kv_heads,
            p.head_dim,
            p.v_head_dim,
        );
        let exp = (
            batch,
            seq,
            seq,
            want.q_heads,
            want.kv_heads,
            want.head_dim,
            want.head_dim,
        );
        if got != exp || p.layout != Layout::Bshd {
            return Err(ProblemError::BadValue {
                what: "layer problem",
                detail: format!(
                    "(B, Lq, Lk, Hq, Hkv, D, Dv, layout) = {got:?} {:?}; expected {exp:?} Bshd (use LayerConfig::problem)",
                    p.layout
                ),
            });
        }
        Ok(())
    }
}

/// The weights of a layer (any of f32, f16, bf16; the dtypes may differ), `[out, in]`.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    /// `[Hq·D, hidden]`
    pub wq: TensorRef<'a>,
    /// `[Hkv·D, hidden]`
    pub wk: TensorRef<'a>,
    /// `[Hkv·D, hidden]`
    pub wv: TensorRef<'a>,
    /// `[hidden, Hq·D]`
    pub wo: TensorRef<'a>,
    pub bq: Option<TensorRef<'a>>,
    pub bk: Option<TensorRef<'a>>,
    pub bv: Option<TensorRef<'a>>,
    pub bo: Option<TensorRef<'a>>,
}

/// Rows `rows` of a row-major tensor with `cols` columns.
pub fn slice_rows<'a>(
    t: TensorRef<'a>,
    rows: std::ops::Range<usize>,
    cols: usize,
) -> TensorRef<'a> {
    let r = rows.start * cols..rows.end * cols;
    match t {
        TensorRef::F32(x) => TensorRef::F32(&x[r]),
        TensorRef::F16(x) => TensorRef::F16(&x[r]),
        TensorRef::Bf16(x) => TensorRef::Bf16(&x[r]),
    }
}

impl<'a> LayerWeights<'a> {
    pub fn new(wq: TensorRef<'a>, wk: TensorRef<'a>, wv: TensorRef<'a>, wo: TensorRef<'a>) -> Self {
        LayerWeights {
            wq,
            wk,
            wv,
            wo,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
        }
    }

    /// From a fused QKV weight `[(Hq + 2·Hkv)·D, hidden]` (rows: all of Q, then K, then V) and
    /// its optional fused bias. Shapes are checked.
    pub fn fused(
        cfg: &LayerConfig,
        wqkv: TensorRef<'a>,
        bqkv: Option<TensorRef<'a>>,
        wo: TensorRef<'a>,
        bo: Option<TensorRef<'a>>,
    ) -> Result<Self, ProblemError> {
        cfg.validate()?;
        let check = |what: &'static str, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(ProblemError::LengthMismatch {
                    what,
                    got,
                    expected,
                })
            }
        };
        check("wqkv", wqkv.len(), cfg.qkv_dim() * cfg.hidden)?;
        if let Some(b) = bqkv {
            check("bqkv", b.len(), cfg.qkv_dim())?;
        }
        let (nq, nkv) = (cfg.q_dim(), cfg.kv_dim());
        let h = cfg.hidden;
        let parts = [0..nq, nq..nq + nkv, nq + nkv..nq + 2 * nkv];
        let w: Vec<TensorRef<'a>> = parts
            .iter()
            .map(|r| slice_rows(wqkv, r.clone(), h))
            .collect();
        let b: Vec<Option<TensorRef<'a>>> = parts
            .iter()
            .map(|r| bqkv.map(|b| slice_rows(b, r.clone(), 1)))
            .collect();
        Ok(LayerWeights {
            wq: w[0],
            wk: w[1],
            wv: w[2],
            wo,
            bq: b[0],
            bk: b[1],
            bv: b[2],
            bo,
        })
    }

    /// Checks every length against the layer's shape.
    pub fn check(&self, cfg: &LayerConfig) -> Result<(), ProblemError> {
        cfg.validate()?;
        let (h, nq, nkv) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let checks = [
            ("wq", Some(self.wq), nq * h),
            ("wk", Some(self.wk), nkv * h),
            ("wv", Some(self.wv), nkv * h),
            ("wo", Some(self.wo), h * nq),
            ("bq", self.bq, nq),
            ("bk", self.bk, nkv),
            ("bv", self.bv, nkv),
            ("bo", self.bo, h),
        ];
        for (what, t, expected) in checks {
            if let Some(t) = t
                && t.len() != expected
            {
                return Err(ProblemError::LengthMismatch {
                    what,
                    got: t.len(),
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// `y = x·Wᵀ + b` in f64: `x` `[rows, in]`, `w` `[out, in]`, `b` `[out]`; returns `[rows, out]`.
pub fn linear(x: &[f64], w: TensorRef<'_>, b: Option<TensorRef<'_>>, out: usize) -> Vec<f64> {
    let inp = w.len().checked_div(out).unwrap_or(0);
    assert_eq!(w.len(), out * inp, "linear: weight shape");
    let rows = x.len().checked_div(inp).unwrap_or(0);
    let wf: Vec<f64> = (0..w.len()).map(|i| w.get(i) as f64).collect();
    let mut y = vec![0.0f64; rows * out];
    for r in 0..rows {
        let xr = &x[r * inp..][..inp];
        for n in 0..out {
            let wr = &wf[n * inp..][..inp];
            let mut s = b.map_or(0.0, |b| b.get(n) as f64);
            for (a, c) in xr.iter().zip(wr) {
                s += a * c;
            }
            y[r * out + n] = s;
        }
    }
    y
}

/// The optional attention inputs of a layer (bias, mask, ALiBi slopes, sequence lengths), as in
/// [`Inputs`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerExtras<'a> {
    pub bias: Option<&'a [f32]>,
    pub mask: Option<&'a [u8]>,
    pub alibi_slopes: Option<&'a [f32]>,
    pub q_seqlens: Option<&'a [i32]>,
    pub kv_seqlens: Option<&'a [i32]>,
}

impl<'a> LayerExtras<'a> {
    /// These extras beside q, k and v.
    pub fn inputs(&self, q: TensorRef<'a>, k: TensorRef<'a>, v: TensorRef<'a>) -> Inputs<'a> {
        Inputs {
            q,
            k,
            v,
            bias: self.bias,
            mask: self.mask,
            alibi_slopes: self.alibi_slopes,
            q_seqlens: self.q_seqlens,
            kv_seqlens: self.kv_seqlens,
        }
    }
}

/// The reference layer's result.
#[derive(Clone, Debug)]
pub struct LayerReference {
    /// `[B, L, hidden]`
    pub out: Vec<f64>,
    /// The rotated q `[B, L, Hq, D]`, k and v `[B, L, Hkv, D]` as stored (f32).
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Checks positions: `B·L` of them, or none (then `t` for token `t` of each entry).
pub fn positions_or_default(
    positions: Option<&[u32]>,
    batch: usize,
    seq: usize,
) -> Result<Vec<u32>, ProblemError> {
    match positions {
        Some(p) if p.len() != batch * seq => Err(ProblemError::LengthMismatch {
            what: "positions",
            got: p.len(),
            expected: batch * seq,
        }),
        Some(p) => Ok(p.to_vec()),
        None => Ok((0..batch).flat_map(|_| 0..seq as u32).collect()),
    }
}

/// The layer forward on the CPU (see the module docs). `p` is the layer's attention problem
/// ([`LayerConfig::problem`] with options set); `positions` `[B·L]` (default `t`).
pub fn layer(
    cfg: &LayerConfig,
    w: &LayerWeights<'_>,
    x: TensorRef<'_>,
    p: &Problem,
    positions: Option<&[u32]>,
    extras: &LayerExtras<'_>,
) -> Result<LayerReference, ProblemError> {
    w.check(cfg)?;
    let (b, l) = (p.batch, p.q_len);
    cfg.check_problem(p, b, l)?;
    if x.len() != b * l * cfg.hidden {
        return Err(ProblemError::LengthMismatch {
            what: "x",
            got: x.len(),
            expected: b * l * cfg.hidden,
        });
    }
    let pos = positions_or_default(positions, b, l)?;
    let xf: Vec<f64> = (0..x.len()).map(|i| x.get(i) as f64).collect();
    let mut q = linear(&xf, w.wq, w.bq, cfg.q_dim());
    let mut k = linear(&xf, w.wk, w.bk, cfg.kv_dim());
    let v = linear(&xf, w.wv, w.bv, cfg.kv_dim());
    if let Some(r) = &cfg.rope {
        r.apply(&mut q, &pos, cfg.q_heads, cfg.head_dim);
        r.apply(&mut k, &pos, cfg.kv_heads, cfg.head_dim);
    }
    let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (q, k, v) = (f32s(&q), f32s(&k), f32s(&v));
    let inputs = extras.inputs(TensorRef::F32(&q), TensorRef::F32(&k), TensorRef::F32(&v));
    let o = crate::attention(p, &inputs)?;
    let out = linear(&o.out, w.wo, w.bo, cfg.hidden);
    Ok(LayerReference { out, q, k, v })
}
