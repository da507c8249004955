//! # spotlight
//!
//! GPU attention for Rust through wgpu and WGSL compute shaders:
//! `O = softmax(scale · Q·Kᵀ + bias, masked) · V`, per batch and head, on any adapter wgpu
//! reaches (Vulkan, Metal, DX12, GL, and software adapters such as lavapipe).
//!
//! - [`Engine`] holds the adapter, device, queue, capabilities and a pipeline cache.
//! - [`Engine::attention`] runs a problem on host slices (upload, compute, download).
//! - [`Engine::attention_on_buffers`] runs it on GPU buffers the caller owns.
//! - The problem description and the CPU reference live in [`spotlight_reference`], re-exported
//!   as [`reference`](mod@reference); the semantics are defined there.
//!
//! ```no_run
//! use spotlight::{Engine, RunOptions};
//! use spotlight::reference::{Inputs, Problem, TensorRef};
//! let engine = Engine::new()?;
//! let p = Problem::new(1, 128, 128, 8, 8, 64).causal(true);
//! let (q, k, v) = (vec![0.1f32; p.q_elems()], vec![0.2f32; p.k_elems()], vec![0.3f32; p.v_elems()]);
//! let inputs = Inputs::new(TensorRef::F32(&q), TensorRef::F32(&k), TensorRef::F32(&v));
//! let out = engine.attention(&p, &inputs, &RunOptions::default())?;
//! assert_eq!(out.out.len(), p.o_elems());
//! # Ok::<(), spotlight::Error>(())
//! ```

mod attention;
mod backward;
mod cache;
mod context;
mod coop;
mod error;
pub mod kernels;
mod layer;
mod lens;
mod merge;
mod options;
#[doc(hidden)]
pub mod params;
mod pieces;
mod plan;
mod record;
#[doc(hidden)]
pub mod testing;
mod timing;

pub use backward::{
    BackwardConfig, BackwardOptions, BackwardPass, BackwardTiles, DQ_FROM_GRADIENTS_BYTES,
    GpuForward, GpuGradients, Gradients,
};
pub use cache::{DecodeOptions, KvCache, KvCacheConfig, SeqId};
pub use context::{Capabilities, Engine, EngineOptions, adapter_report};
pub use error::{Error, Result};
pub use layer::{AttentionLayer, LayerTimings};
pub use lens::{LensOptions, LensStats, lens_passes};
pub use options::{Algorithm, FlashLayout, GpuInputs, GpuOutputs, Output, Resident, RunOptions};
pub use pieces::{Estimate, Split};
pub use spotlight_reference as reference;
pub use spotlight_reference::{
    Broadcast, DType, Inputs, Layout, Problem, Tensor, TensorRef, Window,
};
pub use spotlight_reference::{LayerConfig, LayerExtras, LayerWeights, Rope, RopeStyle};
pub use timing::{PASS_QUERIES, PassTime, Profile, TimerSource, Timing};
pub use wgpu;
