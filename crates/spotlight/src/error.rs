//! Typed errors of the library. Anything the caller controls is checked before GPU work and
//! reported here with what was wrong and what was expected.

use spotlight_reference::ProblemError;

use crate::options::Algorithm;

/// Everything that can go wrong in Spotlight.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The problem or its inputs are inconsistent.
    #[error("invalid problem: {0}")]
    Problem(#[from] ProblemError),
    /// No adapter matched the request.
    #[error(
        "no GPU adapter found{detail}. For a software adapter on Linux install Mesa's lavapipe (apt-get install mesa-vulkan-drivers libvulkan1) and set WGPU_BACKEND=vulkan"
    )]
    NoAdapter { detail: String },
    /// The adapter refused to create a device.
    #[error("could not create a device on '{adapter}': {reason}")]
    RequestDevice { adapter: String, reason: String },
    /// The requested algorithm cannot run this problem on this adapter.
    #[error("algorithm {algorithm} cannot run this problem here: {reason}")]
    Unsupported {
        algorithm: Algorithm,
        reason: String,
    },
    /// The backward pass cannot run this problem here (or was given a forward without LSE).
    #[error("the backward pass cannot run this problem here: {reason}")]
    BackwardUnsupported { reason: String },
    /// A buffer would exceed one of the device's limits. [`Engine::attention`] runs a problem
    /// whose Q, K or V pass the limits in pieces; this comes back only for what pieces cannot cut
    /// (`what` says which) and from the calls that do not split (`attention_on_buffers`,
    /// `upload`, a KV cache's pools, `merge`).
    ///
    /// [`Engine::attention`]: crate::Engine::attention
    #[error("{what} needs {bytes} bytes, over the device limit {limit_name} = {limit} bytes")]
    LimitExceeded {
        what: String,
        bytes: u64,
        limit_name: &'static str,
        limit: u64,
    },
    /// A pass would launch more workgroups than the device allows, even folded into two
    /// dimensions (`max_compute_workgroups_per_dimension` squared).
    #[error(
        "{what} needs {workgroups} workgroups, over the device limit max_compute_workgroups_per_dimension squared = {limit}"
    )]
    GridTooLarge {
        what: String,
        workgroups: u64,
        limit: u64,
    },
    /// A caller-owned buffer is smaller than the problem needs, or lacks a usage flag.
    #[error("buffer {what}: {detail}")]
    BadBuffer { what: &'static str, detail: String },
    /// A pipeline failed to build (shader name and configuration attached).
    #[error("pipeline {name} failed to build: {reason}")]
    Pipeline { name: String, reason: String },
    /// The device ran out of memory for this problem (the engine stays usable).
    #[error("the GPU ran out of memory: {0}")]
    OutOfMemory(String),
    /// The GPU reported an error (validation, out of memory) while running.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A KV cache operation was refused (unknown sequence, out of pages, bad rows).
    #[error("kv cache: {0}")]
    Cache(String),
    /// The device was lost; build a new engine.
    #[error("the GPU device was lost ({0}); create a new Engine")]
    DeviceLost(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
