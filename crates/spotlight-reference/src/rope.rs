//! Rotary position embeddings (RoPE), the executable definition.
//!
//! For a token at position `p` and pair index `i < R/2` (`R` = rotary dims, even, `<= D`), with
//! `θ_i = p · base^(−2i/R)`, a pair `(a, b)` of the head's first `R` dims becomes
//! `(a·cos θ_i − b·sin θ_i, a·sin θ_i + b·cos θ_i)`. The conventions differ in which dims pair up:
//! - [`RopeStyle::RotateHalf`] (GPT-NeoX, LLaMA, Hugging Face's `rotate_half`): `(x[i], x[i + R/2])`;
//! - [`RopeStyle::Interleaved`] (GPT-J, the original RoFormer): `(x[2i], x[2i + 1])`.
//!
//! Dims `R..D` pass through unchanged (partial rotary). Angles are computed in f64.

use crate::error::ProblemError;

/// Which dims of a head form the rotated pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Pairs `(x[i], x[i + R/2])`: GPT-NeoX, LLaMA, Mistral, Qwen (Hugging Face `rotate_half`).
    #[default]
    RotateHalf,
    /// Pairs `(x[2i], x[2i + 1])`: GPT-J, RoFormer.
    Interleaved,
}

impl std::str::FromStr for RopeStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "half" | "rotate-half" | "neox" => Ok(RopeStyle::RotateHalf),
            "interleaved" | "gptj" | "gpt-j" => Ok(RopeStyle::Interleaved),
            _ => Err(format!(
                "unknown rotary style '{s}': expected rotate-half (GPT-NeoX/LLaMA) or interleaved (GPT-J)"
            )),
        }
    }
}

/// A rotary embedding: convention, base θ and how many leading dims of each head rotate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    /// The base θ (10 000 in most models).
    pub theta: f64,
    /// Rotated dims per head `R` (even, at most the head dim).
    pub rotary_dim: usize,
}

impl Rope {
    pub fn new(style: RopeStyle, theta: f64, rotary_dim: usize) -> Self {
        Rope {
            style,
            theta,
            rotary_dim,
        }
    }

    /// Partial rotary as models state it: `R = floor(D · fraction)` rounded down to even.
    pub fn with_fraction(style: RopeStyle, theta: f64, head_dim: usize, fraction: f64) -> Self {
        let r = (head_dim as f64 * fraction).floor().max(0.0) as usize;
        Rope::new(style, theta, r / 2 * 2)
    }

    /// Checks the embedding for heads of `head_dim` dims.
    pub fn validate(&self, head_dim: usize) -> Result<(), ProblemError> {
        let bad = |detail: String| {
            Err(ProblemError::BadValue {
                what: "rope",
                detail,
            })
        };
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return bad(format!(
                "base theta {} must be a finite number > 0",
                self.theta
            ));
        }
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > head_dim
        {
            return bad(format!(
                "rotary_dim {} must be even, at least 2 and at most the head dim {head_dim}",
                self.rotary_dim
            ));
        }
        if !head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dim {head_dim} is odd; rotary embeddings need an even head dim"
            ));
        }
        Ok(())
    }

    /// The angle of pair `i` at position `pos`: `pos · θ^(−2i/R)`.
    pub fn angle(&self, pos: u32, i: usize) -> f64 {
        pos as f64 * self.theta.powf(-2.0 * i as f64 / self.rotary_dim as f64)
    }

    /// `(cos, sin)` of every pair of every position, as f32: `[n][R/2][2]`. Computed in f64 and
    /// rounded once, so the GPU's rotation carries no error from evaluating large angles in f32.
    pub fn table(&self, positions: &[u32]) -> Vec<f32> {
        let half = self.rotary_dim / 2;
        let mut t = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            for i in 0..half {
                let a = self.angle(p, i);
                t.push(a.cos() as f32);
                t.push(a.sin() as f32);
            }
        }
        t
    }

    /// The dims `(a, b)` of pair `i` in this convention.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.style {
            RopeStyle::RotateHalf => (i, i + self.rotary_dim / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        }
    }

    /// Rotates `x` (`[n, heads, head_dim]`, token `t` at `positions[t]`) in place.
    pub fn apply(&self, x: &mut [f64], positions: &[u32], heads: usize, head_dim: usize) {
        assert_eq!(x.len(), positions.len() * heads * head_dim, "rope: shape");
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                let row = &mut x[(t * heads + h) * head_dim..][..head_dim];
                for i in 0..self.rotary_dim / 2 {
                    let (c, s) = (self.angle(pos, i).cos(), self.angle(pos, i).sin());
                    let (ia, ib) = self.pair(i);
                    let (a, b) = (row[ia], row[ib]);
                    row[ia] = a * c - b * s;
                    row[ib] = a * s + b * c;
                }
            }
        }
    }
}
