//! # spotlight-reference
//!
//! The CPU reference for Spotlight: plain loops with f64 accumulation that define, executably,
//! what attention means on every path. It also owns the problem description ([`Problem`]), its
//! validation, and the helpers that compare a result with the reference ([`compare`]) and make
//! random inputs ([`random`]).
//!
//! ```
//! use spotlight_reference::{attention, Inputs, Problem, TensorRef};
//! let p = Problem::new(1, 3, 5, 2, 1, 4).causal(true);
//! let q = vec![0.5f32; p.q_elems()];
//! let k = vec![0.25f32; p.k_elems()];
//! let v: Vec<f32> = (0..p.v_elems()).map(|i| i as f32).collect();
//! let out = attention(&p, &Inputs::new(TensorRef::F32(&q), TensorRef::F32(&k), TensorRef::F32(&v))).unwrap();
//! assert_eq!(out.out.len(), p.o_elems());
//! ```

mod backward;
pub mod compare;
mod error;
pub mod layer;
pub mod lens;
mod problem;
pub mod random;
mod reference;
pub mod rope;
mod tensor;

pub use backward::{Gradients, attention_backward, check_backward_inputs};
pub use error::ProblemError;
pub use layer::{LayerConfig, LayerExtras, LayerWeights};
pub use problem::{Broadcast, Inputs, Layout, OwnedInputs, Problem, Strides, Window};
pub use reference::{Reference, Row, attention, attention_rows, check_parts, merge};
pub use rope::{Rope, RopeStyle};
pub use tensor::{DType, Tensor, TensorRef};
