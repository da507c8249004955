//! The problem description shared by the reference and every GPU path: shapes, layout, options,
//! and the validation that decides whether a problem is well formed.
//!
//! Owning this here means the GPU crate and the reference cannot disagree about what a problem is:
//! both call [`Problem::validate`] and [`Problem::check_inputs`] and index tensors through
//! [`Strides`]. (Over 500 lines because each field of a problem and the check that guards it
//! belong side by side: split, a new option could be added without its validation.)

use crate::error::ProblemError;
use crate::random::Rng;
use crate::tensor::{DType, Tensor, TensorRef};

/// Memory layout of Q, K, V and O.
///
/// `Bshd` (batch, sequence, head, dim) is FlashAttention's and JAX's layout and the default;
/// `Bhsd` (batch, head, sequence, dim) is PyTorch SDPA's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    #[default]
    Bshd,
    Bhsd,
}

impl Layout {
    /// Element strides of a `[batch, seq, heads, dim]` tensor stored in this layout.
    pub fn strides(self, seq: usize, heads: usize, dim: usize) -> Strides {
        match self {
            Layout::Bshd => Strides {
                batch: seq * heads * dim,
                seq: heads * dim,
                head: dim,
            },
            Layout::Bhsd => Strides {
                batch: heads * seq * dim,
                seq: dim,
                head: seq * dim,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Bshd => "bshd",
            Layout::Bhsd => "bhsd",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bshd" => Ok(Layout::Bshd),
            "bhsd" => Ok(Layout::Bhsd),
            _ => Err(format!("unknown layout '{s}': expected bshd or bhsd")),
        }
    }
}

/// Element strides of one 4-D tensor (the dim stride is always 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    pub batch: usize,
    pub seq: usize,
    pub head: usize,
}

impl Strides {
    /// Flat index of element `(b, s, h, d)`.
    #[inline]
    pub fn index(&self, b: usize, s: usize, h: usize, d: usize) -> usize {
        b * self.batch + s * self.seq + h * self.head + d
    }
}

/// Sizes of the leading dimensions of a bias or mask tensor `[batch, heads, Lq, Lk]`.
/// Each of `batch` and `heads` is either 1 (broadcast) or the full size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Broadcast {
    pub batch: usize,
    pub heads: usize,
}

impl Broadcast {
    /// Element strides `(batch, head)` of a `[batch|1, heads|1, Lq, Lk]` tensor; 0 where broadcast.
    pub fn strides(&self, q_len: usize, kv_len: usize) -> (usize, usize) {
        let head = if self.heads == 1 { 0 } else { q_len * kv_len };
        let batch = if self.batch == 1 {
            0
        } else {
            self.heads * q_len * kv_len
        };
        (batch, head)
    }
}

/// A sliding window around the (bottom-right aligned) diagonal: query `i` sees key `j` only if
/// `i + off - left <= j <= i + off + right`. `None` means unbounded on that side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Window {
    pub left: Option<u32>,
    pub right: Option<u32>,
}

impl Window {
    /// Parses `LEFT,RIGHT` where -1 means unbounded, as in FlashAttention's `window_size`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() != 2 {
            return Err(format!(
                "window '{s}' must be LEFT,RIGHT (two integers, -1 = unbounded)"
            ));
        }
        let side = |p: &str| -> Result<Option<u32>, String> {
            let v: i64 = p
                .parse()
                .map_err(|_| format!("window side '{p}' is not an integer"))?;
            match v {
                -1 => Ok(None),
                v if (0..=u32::MAX as i64).contains(&v) => Ok(Some(v as u32)),
                _ => Err(format!(
                    "window side {v} must be -1 or a non-negative integer"
                )),
            }
        };
        Ok(Window {
            left: side(parts[0])?,
            right: side(parts[1])?,
        })
    }
}

/// The product of `dims`, or `None` when it overflows `usize`.
fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// One attention problem: every shape and option, but no data.
///
/// Q is `[B, Lq, Hq, D]`, K is `[B, Lk, Hkv, D]`, V is `[B, Lk, Hkv, Dv]` (in `layout`), O is
/// `[B, Lq, Hq, Dv]` in the same layout as Q, LSE is `[B, Hq, Lq]` and the probability map P is
/// `[B, Hq, Lq, Lk]`.
///
/// ```
/// use spotlight_reference::Problem;
/// let p = Problem::new(2, 100, 257, 8, 2, 64).causal(true);
/// p.validate().unwrap();
/// assert_eq!(p.kv_head_of(7), 1);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub layout: Layout,
    /// Logit scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    pub causal: bool,
    pub window: Option<Window>,
    /// Logit soft-capping `c · tanh(s / c)`; `None` (or 0) is off.
    pub softcap: Option<f32>,
    /// Shape of the additive f32 bias, if any.
    pub bias: Option<Broadcast>,
    /// Shape of the boolean (u8, nonzero = visible) mask, if any.
    pub mask: Option<Broadcast>,
    /// Whether ALiBi slopes `[Hq]` are given.
    pub alibi: bool,
    /// Whether per-batch valid query lengths `[B]` are given.
    pub q_seqlens: bool,
    /// Whether per-batch valid key lengths `[B]` are given.
    pub kv_seqlens: bool,
}

impl Problem {
    /// A plain problem: BSHD, default scale, no masks, `Dv = D`.
    pub fn new(
        batch: usize,
        q_len: usize,
        kv_len: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Problem {
            batch,
            q_len,
            kv_len,
            q_heads,
            kv_heads,
            head_dim,
            v_head_dim: head_dim,
            layout: Layout::Bshd,
            scale: None,
            causal: false,
            window: None,
            softcap: None,
            bias: None,
            mask: None,
            alibi: false,
            q_seqlens: false,
            kv_seqlens: false,
        }
    }

    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    pub fn v_head_dim(mut self, dv: usize) -> Self {
        self.v_head_dim = dv;
        self
    }

    /// A sliding window (see [`Window`]); `None` removes it.
    pub fn window(mut self, window: Option<Window>) -> Self {
        self.window = window;
        self
    }

    /// The logit scale; `None` means `1 / sqrt(head_dim)`.
    pub fn scale(mut self, scale: Option<f32>) -> Self {
        self.scale = scale;
        self
    }

    /// Logit soft-capping `c · tanh(s / c)`; `None` or 0 is off.
    pub fn softcap(mut self, softcap: Option<f32>) -> Self {
        self.softcap = softcap;
        self
    }

    /// An additive f32 bias of shape `[batch, heads, Lq, Lk]` (each of `batch`, `heads` 1 or the
    /// full size); `None` removes it. The data goes in [`Inputs::bias`].
    pub fn bias(mut self, shape: Option<Broadcast>) -> Self {
        self.bias = shape;
        self
    }

    /// A boolean mask (u8, nonzero = visible) of shape `[batch, heads, Lq, Lk]`; `None` removes
    /// it. The data goes in [`Inputs::mask`].
    pub fn mask(mut self, shape: Option<Broadcast>) -> Self {
        self.mask = shape;
        self
    }

    /// Whether ALiBi slopes `[Hq]` are given ([`Inputs::alibi_slopes`]).
    pub fn alibi(mut self, on: bool) -> Self {
        self.alibi = on;
        self
    }

    /// Whether per-batch valid query lengths `[B]` are given ([`Inputs::q_seqlens`]).
    pub fn q_seqlens(mut self, on: bool) -> Self {
        self.q_seqlens = on;
        self
    }

    /// Whether per-batch valid key lengths `[B]` are given ([`Inputs::kv_seqlens`]).
    pub fn kv_seqlens(mut self, on: bool) -> Self {
        self.kv_seqlens = on;
        self
    }

    /// The presence of every optional input taken from `inputs`, so the two cannot disagree:
    /// ALiBi and sequence lengths are set or cleared to match, a bias or mask that is given keeps
    /// its declared broadcast shape (or, when none was declared, gets the full `[B, Hq, Lq, Lk]`
    /// or, for one of `Lq·Lk` elements, `[1, 1, Lq, Lk]`), and one that is not given is removed.
    /// [`Problem::check_inputs`] still checks the lengths.
    pub fn with_presence_of(mut self, inputs: &Inputs<'_>) -> Self {
        let infer = |declared: Option<Broadcast>, len: usize, p: &Problem| {
            declared.or_else(|| {
                let plane = p.q_len.saturating_mul(p.kv_len);
                Some(if len == plane {
                    Broadcast { batch: 1, heads: 1 }
                } else {
                    Broadcast {
                        batch: p.batch,
                        heads: p.q_heads,
                    }
                })
            })
        };
        self.bias = inputs.bias.and_then(|b| infer(self.bias, b.len(), &self));
        self.mask = inputs.mask.and_then(|m| infer(self.mask, m.len(), &self));
        self.alibi = inputs.alibi_slopes.is_some();
        self.q_seqlens = inputs.q_seqlens.is_some();
        self.kv_seqlens = inputs.kv_seqlens.is_some();
        self
    }

    /// The scale actually used.
    pub fn effective_scale(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// The softcap actually used (0 = off).
    pub fn effective_softcap(&self) -> f32 {
        self.softcap.unwrap_or(0.0)
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// The key/value head that query head `h` reads.
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / self.group_size()
    }

    pub fn q_strides(&self) -> Strides {
        self.layout.strides(self.q_len, self.q_heads, self.head_dim)
    }
    pub fn k_strides(&self) -> Strides {
        self.layout
            .strides(self.kv_len, self.kv_heads, self.head_dim)
    }
    pub fn v_strides(&self) -> Strides {
        self.layout
            .strides(self.kv_len, self.kv_heads, self.v_head_dim)
    }
    pub fn o_strides(&self) -> Strides {
        self.layout
            .strides(self.q_len, self.q_heads, self.v_head_dim)
    }

    // Element counts saturate instead of overflowing, so they never panic on absurd sizes;
    // [`Problem::validate`] refuses any problem whose counts overflow (checked arithmetic).
    pub fn q_elems(&self) -> usize {
        product(&[self.batch, self.q_len, self.q_heads, self.head_dim]).unwrap_or(usize::MAX)
    }
    pub fn k_elems(&self) -> usize {
        product(&[self.batch, self.kv_len, self.kv_heads, self.head_dim]).unwrap_or(usize::MAX)
    }
    pub fn v_elems(&self) -> usize {
        product(&[self.batch, self.kv_len, self.kv_heads, self.v_head_dim]).unwrap_or(usize::MAX)
    }
    pub fn o_elems(&self) -> usize {
        product(&[self.batch, self.q_len, self.q_heads, self.v_head_dim]).unwrap_or(usize::MAX)
    }
    pub fn lse_elems(&self) -> usize {
        product(&[self.batch, self.q_heads, self.q_len]).unwrap_or(usize::MAX)
    }
    pub fn probs_elems(&self) -> usize {
        product(&[self.batch, self.q_heads, self.q_len, self.kv_len]).unwrap_or(usize::MAX)
    }
    /// Elements of a bias or mask of shape `[b.batch, b.heads, Lq, Lk]` (saturating).
    pub fn broadcast_elems(&self, b: &Broadcast) -> usize {
        product(&[b.batch, b.heads, self.q_len, self.kv_len]).unwrap_or(usize::MAX)
    }

    /// FLOPs by FlashAttention's convention: `4·B·Hq·Lq·Lk·D`, halved when causal.
    pub fn flops(&self) -> f64 {
        let f = 2.0
            * self.batch as f64
            * self.q_heads as f64
            * self.q_len as f64
            * self.kv_len as f64
            * (self.head_dim + self.v_head_dim) as f64;
        if self.causal { f / 2.0 } else { f }
    }

    /// Checks that the shapes and options are consistent. Says what was wrong and what was expected.
    pub fn validate(&self) -> Result<(), ProblemError> {
        for (name, v) in [
            ("batch", self.batch),
            ("q_len", self.q_len),
            ("kv_len", self.kv_len),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("v_head_dim", self.v_head_dim),
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
        if let Some(s) = self.scale
            && !s.is_finite()
        {
            return Err(ProblemError::BadScale(s));
        }
        if let Some(c) = self.softcap
            && !(c.is_finite() && c >= 0.0)
        {
            return Err(ProblemError::BadSoftcap(c));
        }
        for (what, b) in [("bias", &self.bias), ("mask", &self.mask)] {
            if let Some(b) = b
                && (!(b.batch == 1 || b.batch == self.batch)
                    || !(b.heads == 1 || b.heads == self.q_heads))
            {
                return Err(ProblemError::BadBroadcast {
                    what,
                    got: [b.batch, b.heads, self.q_len, self.kv_len],
                    batch: self.batch,
                    heads: self.q_heads,
                });
            }
        }
        // Indices are computed in u32 on the GPU and i64 here; keep every tensor addressable.
        // Counts use checked arithmetic: sizes whose product overflows are refused, not wrapped.
        let limit = u32::MAX as usize;
        let dims = |what: &'static str, d: &[usize]| {
            product(d).ok_or(ProblemError::Overflow {
                what,
                dims: d.to_vec(),
            })
        };
        for (what, n) in [
            (
                "q",
                dims("q", &[self.batch, self.q_len, self.q_heads, self.head_dim])?,
            ),
            (
                "k",
                dims(
                    "k",
                    &[self.batch, self.kv_len, self.kv_heads, self.head_dim],
                )?,
            ),
            (
                "v",
                dims(
                    "v",
                    &[self.batch, self.kv_len, self.kv_heads, self.v_head_dim],
                )?,
            ),
            (
                "out",
                dims(
                    "out",
                    &[self.batch, self.q_len, self.q_heads, self.v_head_dim],
                )?,
            ),
        ] {
            if n > limit {
                return Err(ProblemError::TooLarge { what, elems: n });
            }
        }
        // The LSE, the probability map (three-pass) and a bias or mask must have a size too.
        dims(
            "probs",
            &[self.batch, self.q_heads, self.q_len, self.kv_len],
        )?;
        for (what, b) in [("bias", &self.bias), ("mask", &self.mask)] {
            if let Some(b) = b {
                let n = dims(what, &[b.batch, b.heads, self.q_len, self.kv_len])?;
                dims(what, &[n, 4])?;
            }
        }
        Ok(())
    }

    /// Checks the problem and that every tensor matches it: lengths, presence, value ranges.
    pub fn check_inputs(&self, inputs: &Inputs<'_>) -> Result<(), ProblemError> {
        self.validate()?;
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
        check("q", inputs.q.len(), self.q_elems())?;
        check("k", inputs.k.len(), self.k_elems())?;
        check("v", inputs.v.len(), self.v_elems())?;
        let presence = |what: &'static str, declared: bool, given: bool| {
            if declared == given {
                Ok(())
            } else {
                Err(ProblemError::Presence {
                    what,
                    declared,
                    given,
                })
            }
        };
        presence("bias", self.bias.is_some(), inputs.bias.is_some())?;
        presence("mask", self.mask.is_some(), inputs.mask.is_some())?;
        presence("alibi_slopes", self.alibi, inputs.alibi_slopes.is_some())?;
        presence("q_seqlens", self.q_seqlens, inputs.q_seqlens.is_some())?;
        presence("kv_seqlens", self.kv_seqlens, inputs.kv_seqlens.is_some())?;
        if let (Some(b), Some(d)) = (&self.bias, inputs.bias) {
            check("bias", d.len(), self.broadcast_elems(b))?;
        }
        if let (Some(b), Some(d)) = (&self.mask, inputs.mask) {
            check("mask", d.len(), self.broadcast_elems(b))?;
        }
        if let Some(s) = inputs.alibi_slopes {
            check("alibi_slopes", s.len(), self.q_heads)?;
            if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
                return Err(ProblemError::BadValue {
                    what: "alibi_slopes",
                    detail: format!("slope {bad} is not finite"),
                });
            }
        }
        for (what, lens, max) in [
            ("q_seqlens", inputs.q_seqlens, self.q_len),
            ("kv_seqlens", inputs.kv_seqlens, self.kv_len),
        ] {
            if let Some(lens) = lens {
                check(what, lens.len(), self.batch)?;
                for (index, &value) in lens.iter().enumerate() {
                    if value < 0 || value as usize > max {
                        return Err(ProblemError::SeqlenOutOfRange {
                            what,
                            index,
                            value,
                            max,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The data of one problem. Q, K and V may each be f32, f16 or bf16 (mixed is allowed); the bias
/// is f32, the mask u8 (nonzero = visible), ALiBi slopes f32 `[Hq]`, sequence lengths i32 `[B]`.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub q: TensorRef<'a>,
    pub k: TensorRef<'a>,
    pub v: TensorRef<'a>,
    pub bias: Option<&'a [f32]>,
    pub mask: Option<&'a [u8]>,
    pub alibi_slopes: Option<&'a [f32]>,
    pub q_seqlens: Option<&'a [i32]>,
    pub kv_seqlens: Option<&'a [i32]>,
}

impl<'a> Inputs<'a> {
    /// Q, K and V with no optional inputs.
    pub fn new(q: TensorRef<'a>, k: TensorRef<'a>, v: TensorRef<'a>) -> Self {
        Inputs {
            q,
            k,
            v,
            bias: None,
            mask: None,
            alibi_slopes: None,
            q_seqlens: None,
            kv_seqlens: None,
        }
    }

    /// The additive f32 bias (declare its shape with [`Problem::bias`]).
    pub fn bias(mut self, bias: &'a [f32]) -> Self {
        self.bias = Some(bias);
        self
    }

    /// The boolean mask, u8, nonzero = visible (declare its shape with [`Problem::mask`]).
    pub fn mask(mut self, mask: &'a [u8]) -> Self {
        self.mask = Some(mask);
        self
    }

    /// ALiBi slopes `[Hq]`.
    pub fn alibi_slopes(mut self, slopes: &'a [f32]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Valid query lengths `[B]`.
    pub fn q_seqlens(mut self, lens: &'a [i32]) -> Self {
        self.q_seqlens = Some(lens);
        self
    }

    /// Valid key lengths `[B]`.
    pub fn kv_seqlens(mut self, lens: &'a [i32]) -> Self {
        self.kv_seqlens = Some(lens);
        self
    }

    pub fn dtypes(&self) -> [DType; 3] {
        [self.q.dtype(), self.k.dtype(), self.v.dtype()]
    }
}

/// The owned counterpart of [`Inputs`]: a problem's data held in memory (what a file loader or a
/// test builds), lent out as [`Inputs`] by [`OwnedInputs::inputs`].
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedInputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub bias: Option<Vec<f32>>,
    pub mask: Option<Vec<u8>>,
    pub alibi_slopes: Option<Vec<f32>>,
    pub q_seqlens: Option<Vec<i32>>,
    pub kv_seqlens: Option<Vec<i32>>,
}

impl OwnedInputs {
    /// Q, K and V with no optional inputs.
    pub fn new(q: Tensor, k: Tensor, v: Tensor) -> Self {
        OwnedInputs {
            q,
            k,
            v,
            bias: None,
            mask: None,
            alibi_slopes: None,
            q_seqlens: None,
            kv_seqlens: None,
        }
    }

    /// Random Q, K, V for `p` from `rng`, uniform in `[-1, 1)` (Q scaled by `amp`, which
    /// sharpens the softmax), rounded to `dtypes`; no optional inputs.
    pub fn random(p: &Problem, dtypes: [DType; 3], amp: f32, rng: &mut Rng) -> Self {
        let q: Vec<f32> = rng.vec(p.q_elems()).iter().map(|x| x * amp).collect();
        OwnedInputs::new(
            Tensor::from_f32(&q, dtypes[0]),
            Tensor::from_f32(&rng.vec(p.k_elems()), dtypes[1]),
            Tensor::from_f32(&rng.vec(p.v_elems()), dtypes[2]),
        )
    }

    /// The data as [`Inputs`].
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            q: self.q.as_ref(),
            k: self.k.as_ref(),
            v: self.v.as_ref(),
            bias: self.bias.as_deref(),
            mask: self.mask.as_deref(),
            alibi_slopes: self.alibi_slopes.as_deref(),
            q_seqlens: self.q_seqlens.as_deref(),
            kv_seqlens: self.kv_seqlens.as_deref(),
        }
    }
}
