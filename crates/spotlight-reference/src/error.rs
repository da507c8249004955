//! Validation errors: each says what was wrong and what was expected.

/// Why a problem or its inputs were rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProblemError {
    #[error("dimension {name} is 0: every dimension must be at least 1")]
    ZeroDim { name: &'static str },
    #[error(
        "q_heads ({q_heads}) is not a multiple of kv_heads ({kv_heads}): query head h reads key/value head h / (q_heads / kv_heads)"
    )]
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },
    #[error("scale {0} is not a finite number")]
    BadScale(f32),
    #[error("softcap {0} must be a finite number >= 0 (0 = off)")]
    BadSoftcap(f32),
    #[error(
        "{what} has shape {got:?}, which does not broadcast to [B, Hq, Lq, Lk]: expected [1 or {batch}, 1 or {heads}, Lq, Lk]"
    )]
    BadBroadcast {
        what: &'static str,
        got: [usize; 4],
        batch: usize,
        heads: usize,
    },
    #[error("{what} has {got} elements, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what}: the problem declares it {}, but it was {}", if *declared { "present" } else { "absent" }, if *given { "given" } else { "not given" })]
    Presence {
        what: &'static str,
        declared: bool,
        given: bool,
    },
    #[error("{what}[{index}] = {value} is out of range: expected 0..={max}")]
    SeqlenOutOfRange {
        what: &'static str,
        index: usize,
        value: i32,
        max: usize,
    },
    #[error("{what}: {detail}")]
    BadValue { what: &'static str, detail: String },
    #[error("{what} has {elems} elements, more than the 2^32 - 1 a single tensor may hold")]
    TooLarge { what: &'static str, elems: usize },
    #[error("{what} of dimensions {dims:?} has more elements than this machine can count")]
    Overflow {
        what: &'static str,
        dims: Vec<usize>,
    },
}
