//! The public types of a run: which algorithm, the options, the output, and GPU buffers a
//! caller owns or had uploaded ([`Resident`]).

use spotlight_reference::{DType, Tensor};

use crate::error::Result;
pub use crate::kernels::FlashLayout;

/// Which kernel computes the attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Split-k for decoding (Lq ≤ 16 against Lk ≥ 1024), flash-coop for f16 inputs on hardware
    /// matrix units once its self-test passed (`Engine::with_auto_matrix_units`), flash
    /// otherwise; three-pass when the probability map is asked for or the fused kernels do not
    /// fit the adapter.
    #[default]
    Auto,
    /// Scores, softmax and P·V as three passes through an `[B, Hq, Lq, Lk]` buffer.
    ThreePass,
    /// One fused kernel with an online softmax; extra memory O(B·Hq·Lq).
    Flash,
    /// The fused kernel for decoding: all query heads of a key/value group share each K/V tile,
    /// and the key range is split across workgroups (flash-decoding), merged by LSE.
    SplitK,
    /// The fused kernel on matrix units (cooperative matrices, f16 products, f32 accumulation).
    FlashCoop,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::ThreePass => "three-pass",
            Algorithm::Flash => "flash",
            Algorithm::SplitK => "split-k",
            Algorithm::FlashCoop => "flash-coop",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Algorithm::Auto),
            "three-pass" | "threepass" => Ok(Algorithm::ThreePass),
            "flash" => Ok(Algorithm::Flash),
            "split-k" | "splitk" => Ok(Algorithm::SplitK),
            "flash-coop" => Ok(Algorithm::FlashCoop),
            _ => Err(format!(
                "unknown algorithm '{s}': expected auto, three-pass, flash, split-k or flash-coop"
            )),
        }
    }
}

/// What to compute and how.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub algorithm: Algorithm,
    /// Also return the LSE `[B, Hq, Lq]`.
    pub lse: bool,
    /// Also return the probabilities `[B, Hq, Lq, Lk]` (three-pass only).
    pub probs: bool,
    /// Output dtype; `None` means the dtype of Q.
    pub out_dtype: Option<DType>,
    /// Fused path: stream at most this many keys per workgroup, splitting the key range into
    /// chunks merged exactly by their LSE (rounded down to whole key tiles, at least one). Bounds
    /// the work of one workgroup, e.g. under a desktop watchdog. `None`: the adapter decides.
    pub max_chunk_keys: Option<u32>,
    /// Lets the matrix-unit kernel round f32 inputs to f16 (f16 and bf16 inputs need no leave).
    pub allow_reduced_precision: bool,
    /// Fused scalar path (flash, split-K): which kernel runs. `None`: the adapter decides, the
    /// row kernel on CPU adapters, the tiled kernel elsewhere, and for split-k on GPUs the decode
    /// kernel when a unit has at most 16 query rows ([`FlashLayout`]).
    pub flash_layout: Option<FlashLayout>,
    /// Row kernel: query rows per workgroup, 8, 16 or 32 (`None`: by the problem's size,
    /// [`FlashTiles::row_count`](crate::kernels::FlashTiles::row_count)). Other kernels ignore it; other values are refused everywhere.
    pub rows_per_workgroup: Option<u32>,
}

/// The result of [`Engine::attention`](crate::Engine::attention).
#[derive(Clone, Debug)]
pub struct Output {
    /// `[B, Lq, Hq, Dv]` in the problem's layout.
    pub out: Tensor,
    pub lse: Option<Vec<f32>>,
    pub probs: Option<Vec<f32>>,
    /// The algorithm that ran.
    pub algorithm: Algorithm,
}

/// Inputs already on the GPU. Q, K and V hold their dtype's little-endian elements (f16/bf16
/// packed two per word), the bias f32, the mask one byte per element, slopes f32 and sequence
/// lengths i32. Buffers need `STORAGE`; slopes and sequence lengths also `COPY_SRC`.
#[derive(Clone, Copy, Debug)]
pub struct GpuInputs<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    /// Storage dtypes of Q, K and V.
    pub dtypes: [DType; 3],
    pub bias: Option<&'a wgpu::Buffer>,
    pub mask: Option<&'a wgpu::Buffer>,
    pub alibi_slopes: Option<&'a wgpu::Buffer>,
    pub q_seqlens: Option<&'a wgpu::Buffer>,
    pub kv_seqlens: Option<&'a wgpu::Buffer>,
}

impl<'a> GpuInputs<'a> {
    /// Q, K and V buffers holding `dtypes` elements, no optional inputs; add those with the
    /// setters (each must match the [`Problem`](crate::Problem)'s declaration, checked when run).
    pub fn new(
        q: &'a wgpu::Buffer,
        k: &'a wgpu::Buffer,
        v: &'a wgpu::Buffer,
        dtypes: [DType; 3],
    ) -> Self {
        GpuInputs {
            q,
            k,
            v,
            dtypes,
            bias: None,
            mask: None,
            alibi_slopes: None,
            q_seqlens: None,
            kv_seqlens: None,
        }
    }

    /// The additive f32 bias.
    pub fn bias(mut self, b: &'a wgpu::Buffer) -> Self {
        self.bias = Some(b);
        self
    }

    /// The mask, one byte per element (nonzero = visible).
    pub fn mask(mut self, b: &'a wgpu::Buffer) -> Self {
        self.mask = Some(b);
        self
    }

    /// ALiBi slopes, f32 `[Hq]` (`COPY_SRC`).
    pub fn alibi_slopes(mut self, b: &'a wgpu::Buffer) -> Self {
        self.alibi_slopes = Some(b);
        self
    }

    /// Valid query lengths, i32 `[B]` (`COPY_SRC`); clamped to `[0, Lq]` on the GPU.
    pub fn q_seqlens(mut self, b: &'a wgpu::Buffer) -> Self {
        self.q_seqlens = Some(b);
        self
    }

    /// Valid key lengths, i32 `[B]` (`COPY_SRC`); clamped to `[0, Lk]` on the GPU.
    pub fn kv_seqlens(mut self, b: &'a wgpu::Buffer) -> Self {
        self.kv_seqlens = Some(b);
        self
    }
}

impl<'a> GpuOutputs<'a> {
    /// The output buffer, holding `out_dtype` elements; no LSE or probabilities.
    pub fn new(out: &'a wgpu::Buffer, out_dtype: DType) -> Self {
        GpuOutputs {
            out,
            out_dtype,
            lse: None,
            probs: None,
        }
    }

    /// Also write the LSE `[B, Hq, Lq]` (f32) here; set `RunOptions::lse` too.
    pub fn lse(mut self, b: &'a wgpu::Buffer) -> Self {
        self.lse = Some(b);
        self
    }

    /// Also write the probabilities `[B, Hq, Lq, Lk]` (f32) here; set `RunOptions::probs` too.
    pub fn probs(mut self, b: &'a wgpu::Buffer) -> Self {
        self.probs = Some(b);
        self
    }
}

/// Output buffers on the GPU (`STORAGE`). `out` holds `out_dtype` elements, the others f32.
#[derive(Clone, Copy, Debug)]
pub struct GpuOutputs<'a> {
    pub out: &'a wgpu::Buffer,
    pub out_dtype: DType,
    pub lse: Option<&'a wgpu::Buffer>,
    pub probs: Option<&'a wgpu::Buffer>,
}

/// A problem's buffers on the GPU, made by [`Engine::upload`](crate::Engine::upload).
#[derive(Debug)]
pub struct Resident {
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub dtypes: [DType; 3],
    pub bias: Option<wgpu::Buffer>,
    pub mask: Option<wgpu::Buffer>,
    pub alibi_slopes: Option<wgpu::Buffer>,
    pub q_seqlens: Option<wgpu::Buffer>,
    pub kv_seqlens: Option<wgpu::Buffer>,
    pub out: wgpu::Buffer,
    pub out_dtype: DType,
    pub lse: Option<wgpu::Buffer>,
    pub probs: Option<wgpu::Buffer>,
}

impl Resident {
    pub fn inputs(&self) -> GpuInputs<'_> {
        GpuInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            dtypes: self.dtypes,
            bias: self.bias.as_ref(),
            mask: self.mask.as_ref(),
            alibi_slopes: self.alibi_slopes.as_ref(),
            q_seqlens: self.q_seqlens.as_ref(),
            kv_seqlens: self.kv_seqlens.as_ref(),
        }
    }

    pub fn outputs(&self) -> GpuOutputs<'_> {
        GpuOutputs {
            out: &self.out,
            out_dtype: self.out_dtype,
            lse: self.lse.as_ref(),
            probs: self.probs.as_ref(),
        }
    }
}
