//! Running attention: algorithm choice, limit checks, buffer set-up and the passes.
//!
//! Two entry points share one encoder path: [`Engine::attention`] on host slices, and
//! [`Engine::attention_on_buffers`] on GPU buffers the caller owns.

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Inputs, Problem, Tensor};

use crate::context::Engine;
use crate::error::{Error, Result};
pub use crate::kernels::FlashLayout;
use crate::kernels::{FlashTiles, Kernel, Variant};
use crate::params::{PackParams, Params};

/// Which kernel computes the attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Flash unless the probability map is asked for (or the problem does not fit flash).
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
    /// row kernel on CPU adapters and the tiled kernel elsewhere ([`FlashLayout`]).
    pub flash_layout: Option<FlashLayout>,
    /// Row kernel: query rows per workgroup, 8 or 16 (`None`: by the problem's size,
    /// [`FlashTiles::row_count`]). Other kernels ignore it; other values are refused everywhere.
    pub rows_per_workgroup: Option<u32>,
}

/// The result of [`Engine::attention`].
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
    /// setters (each must match the [`Problem`]'s declaration, checked when run).
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

/// A problem's buffers on the GPU, made by [`Engine::upload`].
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

/// K and V read through a block table (a paged KV cache): key `j` of batch entry `b` is row
/// `j % page_size` of page `table[b * table_stride + j / page_size]`.
pub(crate) struct Paging<'a> {
    pub table: &'a wgpu::Buffer,
    pub page_size: u32,
    pub table_stride: u32,
}

/// A resolved algorithm and its configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    algorithm: Algorithm,
    tiles: Option<FlashTiles>,
    /// Chunks the fused kernel splits the key range into (1 = not split) and keys per chunk.
    chunks: u32,
    chunk_keys: u32,
    /// A key window of a split problem: `(key_base, kv_total)`; `None` when unsplit.
    pub(crate) window: Option<(u32, u32)>,
}

impl Plan {
    fn three_pass() -> Self {
        Plan {
            algorithm: Algorithm::ThreePass,
            tiles: None,
            chunks: 1,
            chunk_keys: 0,
            window: None,
        }
    }
}

/// The reason inside an `Unsupported` error, or the error's text.
fn unsupported_reason(e: &Error) -> String {
    match e {
        Error::Unsupported { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Bindings 0..=8 of the fused kernels, in binding order.
fn fused_bindings(b: [&wgpu::Buffer; 9]) -> [(u32, &wgpu::Buffer); 9] {
    std::array::from_fn(|n| (n as u32, b[n]))
}

/// P·V key tiles per dispatch where loops are bounded (see `Engine::pv_keys_per_dispatch`).
const PV_TILES_PER_DISPATCH_BOUNDED: usize = 2048;

/// Keys per row the three-pass softmax takes where loops are bounded: each of its 128 threads
/// loops twice over a row's keys. Measured on lavapipe: 3.6 M keys right, 6 M silently wrong.
const THREE_PASS_MAX_KEYS_BOUNDED: usize = 3_600_000;

/// Whether every K and V row starts at a multiple of 4 elements (so the row kernel may read
/// them four elements per load): head dims and every stride (batch, sequence, head; with a paged
/// cache the same strides inside a page) are multiples of 4.
pub(crate) fn wide_kv_rows(p: &Problem) -> bool {
    let (k, v) = (p.k_strides(), p.v_strides());
    [
        p.head_dim,
        p.v_head_dim,
        k.batch,
        k.seq,
        k.head,
        v.batch,
        v.seq,
        v.head,
    ]
    .iter()
    .all(|x| x % 4 == 0)
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

impl Engine {
    /// Flash tiles for this problem on this adapter, or why there are none. `rows` caps the
    /// query rows of a tiled workgroup (see [`FlashTiles::choose`]); `unit_rows` is the number of
    /// query rows one unit holds (a head's, or with split-K a key/value group's), which the row
    /// kernel's row count depends on.
    fn flash_tiles(
        &self,
        p: &Problem,
        rows: usize,
        unit_rows: usize,
        opts: &RunOptions,
    ) -> std::result::Result<FlashTiles, String> {
        let layout = opts.flash_layout;
        let caps = self.capabilities();
        if caps.max_storage_buffers_per_stage < 8 {
            return Err(format!(
                "the fused kernel binds 8 storage buffers per shader stage; this device allows {} ({} short)",
                caps.max_storage_buffers_per_stage,
                8 - caps.max_storage_buffers_per_stage
            ));
        }
        let r = Engine::row_count(opts.rows_per_workgroup, p.probs_elems(), unit_rows)?;
        let lanes = self.row_lanes().filter(|&n| {
            FlashTiles::rows(n, r).fits(
                p.head_dim as u32,
                p.v_head_dim as u32,
                caps.max_workgroup_memory,
            )
        });
        let cpu = self.is_cpu();
        match (layout, lanes) {
            (Some(FlashLayout::Rows), None) => {
                return Err(self.row_kernel_refusal(p.head_dim, p.v_head_dim));
            }
            (Some(FlashLayout::Rows), Some(lanes)) => return Ok(FlashTiles::rows(lanes, r)),
            (None, Some(lanes)) if cpu => return Ok(FlashTiles::rows(lanes, r)),
            _ => {}
        }
        FlashTiles::choose(
            p.head_dim as u32,
            p.v_head_dim as u32,
            caps.max_workgroup_memory,
            caps.max_invocations,
            rows.min(64) as u32,
        )
        .ok_or_else(|| {
            format!(
                "head dims D={} Dv={} need more than the {} bytes of workgroup memory (or Dv > 512)",
                p.head_dim, p.v_head_dim, caps.max_workgroup_memory
            )
        })
    }

    /// The fused plan. Flash gives each workgroup a tile of query rows of one head and streams
    /// every key; split-K packs the query rows of all heads of a key/value group into one unit
    /// and splits the key range into enough chunks to fill the GPU. Either way, when the adapter
    /// or the caller bounds the keys one workgroup may stream, the range is split into chunks
    /// that a merge pass combines exactly by their LSE.
    fn fused_plan(&self, p: &Problem, algorithm: Algorithm, opts: &RunOptions) -> Result<Plan> {
        let name = algorithm.name();
        let split_k = algorithm == Algorithm::SplitK;
        let (rows, unit_rows) = if split_k {
            (p.q_len * p.group_size(), p.q_len * p.group_size())
        } else {
            (64, p.q_len)
        };
        let tiles = self
            .flash_tiles(p, rows, unit_rows, opts)
            .map_err(|reason| Error::Unsupported {
                algorithm: name,
                reason,
            })?;
        let lk = p.kv_len as u32;
        let mut limit = self
            .capabilities()
            .max_key_tiles_per_workgroup
            .map(|t| t * tiles.bk);
        if let Some(k) = opts.max_chunk_keys {
            let k = (k / tiles.bk).max(1) * tiles.bk;
            limit = Some(limit.map_or(k, |l| l.min(k)));
        }
        if split_k {
            // Enough workgroups to fill the GPU: about 512 on a discrete or integrated GPU (an
            // H100 has 132 SMs, a few workgroups each), 16 on a CPU adapter; each chunk keeps at
            // least 4 key tiles so the merge stays cheap.
            let target: u64 = match self.adapter_info().device_type {
                wgpu::DeviceType::Cpu => 16,
                _ => 512,
            };
            let units = (p.batch * p.kv_heads) as u64 * rows.div_ceil(tiles.bq as usize) as u64;
            let want_chunks = target.div_ceil(units.max(1)).max(1) as u32;
            let min_keys = 4 * tiles.bk;
            let keys = lk.div_ceil(want_chunks).div_ceil(tiles.bk) * tiles.bk;
            let keys = keys.max(min_keys);
            limit = Some(limit.map_or(keys, |l| l.min(keys)));
        }
        let (chunks, chunk_keys) = match limit {
            Some(keys) if lk > keys => (lk.div_ceil(keys), keys),
            _ => (1, 0),
        };
        Ok(Plan {
            algorithm,
            tiles: Some(tiles),
            chunks,
            chunk_keys,
            window: None,
        })
    }

    /// The plan for `p` with Q, K and V stored as `dtypes`.
    pub(crate) fn plan(&self, p: &Problem, dtypes: [DType; 3], opts: &RunOptions) -> Result<Plan> {
        self.plan_impl(p, dtypes, opts, false)
    }

    /// A plan for K and V in a paged cache (whose pools were checked against the limits when
    /// the cache was made).
    pub(crate) fn plan_paged(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> Result<Plan> {
        self.plan_impl(p, dtypes, opts, true)
    }

    fn plan_impl(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Result<Plan> {
        p.validate()?;
        // A row count the row kernel does not have is the caller's mistake on every algorithm
        // (auto must not fall back to three-pass over it).
        Engine::row_count(opts.rows_per_workgroup, 0, 0).map_err(|reason| Error::Unsupported {
            algorithm: opts.algorithm.name(),
            reason,
        })?;
        if opts.probs
            && matches!(
                opts.algorithm,
                Algorithm::Flash | Algorithm::SplitK | Algorithm::FlashCoop
            )
        {
            return Err(Error::Unsupported {
                algorithm: opts.algorithm.name(),
                reason: "the fused kernel never materialises the probability map; use three-pass or auto".into(),
            });
        }
        let plan = match opts.algorithm {
            Algorithm::FlashCoop => {
                let tiles = self.coop_tiles(p).map_err(|reason| Error::Unsupported {
                    algorithm: "flash-coop",
                    reason,
                })?;
                let (chunks, chunk_keys) = self.coop_chunks(p, tiles, opts);
                Plan {
                    algorithm: Algorithm::FlashCoop,
                    tiles: None,
                    chunks,
                    chunk_keys,
                    window: None,
                }
            }
            Algorithm::ThreePass => Plan::three_pass(),
            Algorithm::Flash | Algorithm::SplitK => self.fused_plan(p, opts.algorithm, opts)?,
            Algorithm::Auto if opts.probs => Plan::three_pass(),
            Algorithm::Auto => {
                // Split-K for decoding (a few query rows against a long key range), flash else;
                // three-pass when the fused kernel cannot take the head dims or the adapter's
                // limits; and when nothing fits, say why for each.
                let decode = p.q_len <= 16 && p.kv_len >= 1024;
                let first = if decode {
                    Algorithm::SplitK
                } else {
                    Algorithm::Flash
                };
                match self
                    .fused_plan(p, first, opts)
                    .or_else(|_| self.fused_plan(p, Algorithm::Flash, opts))
                {
                    Ok(plan) => plan,
                    Err(fused) => {
                        if let Err(three) = self.check_bindings(Algorithm::ThreePass) {
                            return Err(Error::Unsupported {
                                algorithm: "auto",
                                reason: format!(
                                    "no algorithm fits this adapter: flash: {}; three-pass: {}",
                                    unsupported_reason(&fused),
                                    unsupported_reason(&three)
                                ),
                            });
                        }
                        Plan::three_pass()
                    }
                }
            }
        };
        self.check_bindings(plan.algorithm)?;
        if plan.algorithm == Algorithm::ThreePass
            && self.capabilities().max_key_tiles_per_workgroup.is_some()
            && p.kv_len > THREE_PASS_MAX_KEYS_BOUNDED
        {
            return Err(Error::Unsupported {
                algorithm: "three-pass",
                reason: format!(
                    "{} keys: on this adapter (llvmpipe, whose loops end silently after about 65 535 \
                     iterations) the softmax pass takes at most {THREE_PASS_MAX_KEYS_BOUNDED} keys per row; \
                     use flash (without the probability map)",
                    p.kv_len
                ),
            });
        }
        self.check_limits(p, plan, dtypes, opts, paged)?;
        Ok(plan)
    }

    /// Whether the adapter lets every pass of `algorithm` bind what it binds: storage buffers per
    /// shader stage, uniform buffers per stage, and the invocations of its fixed-size workgroups.
    /// Checked at planning time, so a downlevel device gets a clear refusal instead of a
    /// pipeline error.
    pub(crate) fn check_bindings(&self, algorithm: Algorithm) -> Result<()> {
        let caps = self.capabilities();
        // (pass, storage buffers, uniform buffers, invocations per workgroup), from the @binding
        // lists and workgroup sizes of each shader.
        let passes: &[(&str, u32, u32, u32)] = match algorithm {
            Algorithm::ThreePass => &[
                ("scores", 6, 1, 256),
                ("softmax", 2, 1, 128),
                ("pv", 4, 2, 256),
                ("pack", 2, 1, 256),
            ],
            Algorithm::Flash | Algorithm::SplitK | Algorithm::FlashCoop => {
                &[("fused", 8, 1, 0), ("merge", 4, 1, 64), ("pack", 2, 1, 256)]
            }
            Algorithm::Auto => &[],
        };
        for &(pass, storage, uniform, invocations) in passes {
            let short = [
                (
                    "storage buffers per shader stage (max_storage_buffers_per_shader_stage)",
                    storage,
                    caps.max_storage_buffers_per_stage,
                ),
                (
                    "uniform buffers per shader stage (max_uniform_buffers_per_shader_stage)",
                    uniform,
                    caps.max_uniform_buffers_per_stage,
                ),
                (
                    "invocations per workgroup (max_compute_invocations_per_workgroup)",
                    invocations,
                    caps.max_invocations,
                ),
            ];
            for (what, need, have) in short {
                if need > have {
                    return Err(Error::Unsupported {
                        algorithm: algorithm.name(),
                        reason: format!(
                            "its {pass} pass needs {need} {what}; this device allows {have} \
                             ({} short)",
                            need - have
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Every device buffer a plan allocates or binds, with its size in bytes: inputs in their
    /// storage dtypes (f16/bf16 two bytes an element), outputs in theirs, and every scratch
    /// buffer (the f32 output before packing, the LSE when not asked for, the key split's partial
    /// results, the three-pass score matrix).
    pub(crate) fn plan_buffers(
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Vec<(String, u64)> {
        let n = |elems: usize, size: usize| elems as u64 * size as u64;
        let out_dtype = opts.out_dtype.unwrap_or(dtypes[0]);
        let mut buffers: Vec<(String, u64)> = vec![
            ("q".into(), n(p.q_elems(), dtypes[0].size())),
            ("k".into(), n(p.k_elems(), dtypes[1].size())),
            ("v".into(), n(p.v_elems(), dtypes[2].size())),
            ("out".into(), n(p.o_elems(), out_dtype.size())),
            ("lse".into(), n(p.lse_elems(), 4)),
        ];
        if out_dtype != DType::F32 {
            buffers.push(("the f32 output before conversion".into(), n(p.o_elems(), 4)));
        }
        if paged {
            buffers.retain(|(what, _)| what != "k" && what != "v");
        }
        if let Some(b) = p.bias {
            buffers.push(("bias".into(), n(p.broadcast_elems(&b), 4)));
        }
        if let Some(b) = p.mask {
            buffers.push(("mask".into(), n(p.broadcast_elems(&b), 1)));
        }
        if plan.chunks > 1 {
            let c = plan.chunks as u64;
            buffers.push((
                "the partial outputs of the key split".into(),
                c * p.o_elems() as u64 * 4,
            ));
            buffers.push((
                "the partial LSEs of the key split".into(),
                c * p.lse_elems() as u64 * 4,
            ));
        }
        if plan.algorithm == Algorithm::ThreePass {
            buffers.push((
                format!(
                    "the three-pass score matrix [B={}, Hq={}, Lq={}, Lk={}]",
                    p.batch, p.q_heads, p.q_len, p.kv_len
                ),
                p.probs_elems() as u64 * 4,
            ));
        }
        buffers
    }

    /// Bytes of device memory a plan uses (inputs, outputs, scratch).
    pub(crate) fn plan_bytes(
        &self,
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> u64 {
        let aux = (2 * p.batch + p.q_heads) as u64 * 4 + 128;
        Self::plan_buffers(p, plan, dtypes, opts, false)
            .iter()
            .map(|(_, b)| b)
            .sum::<u64>()
            + aux
    }

    /// Every buffer the plan binds must fit the binding and buffer limits, and every grid the
    /// workgroup-count limit (after folding into two dimensions).
    fn check_limits(
        &self,
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Result<()> {
        let caps = self.capabilities();
        let buffers = Self::plan_buffers(p, plan, dtypes, opts, paged);
        for (what, bytes) in buffers {
            if bytes > caps.max_storage_binding {
                return Err(Error::LimitExceeded {
                    what,
                    bytes,
                    limit_name: "max_storage_buffer_binding_size",
                    limit: caps.max_storage_binding,
                });
            }
            if bytes > caps.max_buffer_size {
                return Err(Error::LimitExceeded {
                    what,
                    bytes,
                    limit_name: "max_buffer_size",
                    limit: caps.max_buffer_size,
                });
            }
        }
        for (what, groups) in self.grids(p, plan) {
            self.fold(groups).ok_or_else(|| Error::GridTooLarge {
                what: format!("the {what} pass"),
                workgroups: groups,
                limit: (caps.max_workgroups_per_dim as u64).pow(2),
            })?;
        }
        Ok(())
    }

    /// Workgroup counts of each pass.
    fn grids(&self, p: &Problem, plan: Plan) -> Vec<(&'static str, u64)> {
        let bh = (p.batch * p.q_heads) as u64;
        let t16 = |n: usize| n.div_ceil(16) as u64;
        match plan.algorithm {
            Algorithm::Flash | Algorithm::SplitK => {
                let bq = plan.tiles.map_or(1, |t| t.bq) as usize;
                let (units, rows) = if plan.algorithm == Algorithm::SplitK {
                    ((p.batch * p.kv_heads) as u64, p.q_len * p.group_size())
                } else {
                    (bh, p.q_len)
                };
                let flash = units * rows.div_ceil(bq) as u64 * plan.chunks as u64;
                vec![("flash", flash), ("merge", bh * p.q_len as u64)]
            }
            Algorithm::FlashCoop => {
                let bq = self.coop_tiles(p).map_or(16, |t| t.rows()) as usize;
                let groups = bh * p.q_len.div_ceil(bq) as u64 * plan.chunks as u64;
                vec![("flash-coop", groups), ("merge", bh * p.q_len as u64)]
            }
            _ => vec![
                ("scores", bh * t16(p.q_len) * t16(p.kv_len)),
                ("softmax", bh * p.q_len as u64),
                ("pv", bh * t16(p.q_len) * t16(p.v_head_dim)),
            ],
        }
    }

    /// Folds a 1-D workgroup count into (x, y) within the per-dimension limit.
    fn fold(&self, groups: u64) -> Option<(u32, u32)> {
        let max = self.capabilities().max_workgroups_per_dim as u64;
        let x = groups.clamp(1, max);
        let y = groups.div_ceil(x).max(1);
        (y <= max).then_some((x as u32, y as u32))
    }

    /// Uploads a problem's inputs and creates its output buffers (filled with NaN), ready for
    /// [`Engine::attention_on_buffers`] as many times as needed (benchmarks, repeated runs).
    pub fn upload(&self, p: &Problem, inputs: &Inputs<'_>, opts: &RunOptions) -> Result<Resident> {
        let _gl = self.exclusive();
        p.check_inputs(inputs)?;
        self.plan(p, inputs.dtypes(), opts)?;
        Ok(self.upload_unchecked(p, inputs, opts))
    }

    /// [`Engine::upload`] for inputs already checked (pieces of a split problem carry global
    /// sequence lengths that the piece's own shape would reject).
    pub(crate) fn upload_unchecked(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        opts: &RunOptions,
    ) -> Resident {
        let dev = &self.device;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let upload = |label: &str, bytes: &[u8]| {
            let mut data = bytes.to_vec();
            data.resize(padded(bytes.len() as u64) as usize, 0);
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &data,
                usage: storage,
            })
        };
        let out_dtype = opts.out_dtype.unwrap_or(inputs.q.dtype());
        let (out, lse, probs) = self.poisoned_outputs(p, out_dtype, opts);
        Resident {
            q: upload("q", inputs.q.as_bytes()),
            k: upload("k", inputs.k.as_bytes()),
            v: upload("v", inputs.v.as_bytes()),
            dtypes: inputs.dtypes(),
            bias: inputs.bias.map(|b| upload("bias", bytemuck::cast_slice(b))),
            mask: inputs.mask.map(|m| upload("mask", m)),
            alibi_slopes: inputs
                .alibi_slopes
                .map(|s| upload("alibi_slopes", bytemuck::cast_slice(s))),
            q_seqlens: inputs
                .q_seqlens
                .map(|s| upload("q_seqlens", bytemuck::cast_slice(s))),
            kv_seqlens: inputs
                .kv_seqlens
                .map(|s| upload("kv_seqlens", bytemuck::cast_slice(s))),
            out,
            out_dtype,
            lse,
            probs,
        }
    }

    /// Runs attention on host data: validates, uploads, computes, downloads. Output buffers are
    /// filled with NaN before the run, so an element a kernel failed to write cannot look valid.
    ///
    /// A problem whose tensors pass the device's binding or buffer limits is cut into pieces
    /// (groups of batch entries × windows of keys) that run one after another and are merged
    /// exactly by their LSE; see [`Engine::estimate`].
    pub fn attention(&self, p: &Problem, inputs: &Inputs<'_>, opts: &RunOptions) -> Result<Output> {
        let _gl = self.exclusive();
        p.check_inputs(inputs)?;
        let opts = self.resolve_coop(p, inputs.dtypes(), opts)?;
        self.coop_check_range(inputs, &opts)?;
        self.scoped(|| self.attention_checked(p, inputs, &opts))
    }

    fn attention_checked(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        opts: &RunOptions,
    ) -> Result<Output> {
        match self.plan(p, inputs.dtypes(), opts) {
            Ok(plan) => {
                let r = self.upload_unchecked(p, inputs, opts);
                self.run_into(p, plan, &r.inputs(), &r.outputs(), None)
            }
            Err(e @ (Error::LimitExceeded { .. } | Error::GridTooLarge { .. })) => {
                // Pieces never run three-pass: say what passes the limit, not that it can't split.
                if opts.probs || opts.algorithm == Algorithm::ThreePass {
                    return Err(e);
                }
                let split = self.split(p, inputs.dtypes(), opts)?;
                self.attention_in_pieces(p, inputs, opts, split)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates poisoned outputs, records and submits the plan, and reads the results back.
    /// Output buffers for `p`, filled with NaN: `(out, lse, probs)`.
    fn poisoned_outputs(
        &self,
        p: &Problem,
        out_dtype: DType,
        opts: &RunOptions,
    ) -> (wgpu::Buffer, Option<wgpu::Buffer>, Option<wgpu::Buffer>) {
        let poisoned = |label: &str, bytes: u64| {
            let words = (padded(bytes) / 4) as usize;
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(&vec![f32::NAN; words]),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                })
        };
        (
            poisoned("out", (p.o_elems() * out_dtype.size()) as u64),
            opts.lse.then(|| poisoned("lse", p.lse_elems() as u64 * 4)),
            opts.probs
                .then(|| poisoned("probs", p.probs_elems() as u64 * 4)),
        )
    }

    /// Creates poisoned outputs, records and submits the plan, and reads the results back.
    pub(crate) fn run_and_read(
        &self,
        p: &Problem,
        plan: Plan,
        inputs: &GpuInputs<'_>,
        out_dtype: DType,
        opts: &RunOptions,
        paging: Option<&Paging<'_>>,
    ) -> Result<Output> {
        let (out, lse, probs) = self.poisoned_outputs(p, out_dtype, opts);
        let outputs = GpuOutputs {
            out: &out,
            out_dtype,
            lse: lse.as_ref(),
            probs: probs.as_ref(),
        };
        self.run_into(p, plan, inputs, &outputs, paging)
    }

    /// Records and submits the plan into `outputs`, and reads them back.
    pub(crate) fn run_into(
        &self,
        p: &Problem,
        plan: Plan,
        inputs: &GpuInputs<'_>,
        outputs: &GpuOutputs<'_>,
        paging: Option<&Paging<'_>>,
    ) -> Result<Output> {
        self.check_health()?;
        let (out, out_dtype, lse, probs) =
            (outputs.out, outputs.out_dtype, outputs.lse, outputs.probs);
        let out_bytes = (p.o_elems() * out_dtype.size()) as u64;
        let mut enc = self.device.create_command_encoder(&Default::default());
        self.encode(&mut enc, p, plan, inputs, outputs, paging)?;
        self.queue.submit([enc.finish()]);
        let bytes = self.read_bytes(out, out_bytes)?;
        let out = match out_dtype {
            DType::F32 => Tensor::F32(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F16 => Tensor::F16(bytemuck::pod_collect_to_vec(&bytes)),
            DType::Bf16 => Tensor::Bf16(bytemuck::pod_collect_to_vec(&bytes)),
        };
        let lse = lse
            .as_ref()
            .map(|b| self.read_f32(b, p.lse_elems()))
            .transpose()?;
        let probs = probs
            .as_ref()
            .map(|b| self.read_f32(b, p.probs_elems()))
            .transpose()?;
        Ok(Output {
            out,
            lse,
            probs,
            algorithm: plan.algorithm,
        })
    }

    /// Records attention on caller-owned GPU buffers into `encoder`; the caller submits it.
    /// Returns the algorithm chosen.
    ///
    /// Checked before anything is recorded: the problem, that the buffers given match what it
    /// declares (presence), their sizes and usages, that no output buffer is also an input or
    /// another output, that `opts.lse` / `opts.probs` / `opts.out_dtype` agree with the output
    /// buffers given, and the device's limits. Not checked (they live on the GPU): the values.
    /// Sequence lengths are clamped to `[0, Lq]` / `[0, Lk]` in the kernels (negative = 0), and
    /// non-finite Q, K, V, bias or slopes follow the semantics (they poison the rows they reach).
    pub fn attention_on_buffers(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        p: &Problem,
        inputs: &GpuInputs<'_>,
        outputs: &GpuOutputs<'_>,
        opts: &RunOptions,
    ) -> Result<Algorithm> {
        let _gl = self.exclusive();
        // The options and the buffers must say the same thing: no silent override.
        for (what, asked, given) in [
            ("lse", opts.lse, outputs.lse.is_some()),
            ("probs", opts.probs, outputs.probs.is_some()),
        ] {
            if asked != given {
                return Err(Error::BadBuffer {
                    what,
                    detail: format!(
                        "RunOptions::{what} is {asked} but {} buffer was given: pass both or neither",
                        if given { "a" } else { "no" }
                    ),
                });
            }
        }
        if let Some(d) = opts.out_dtype
            && d != outputs.out_dtype
        {
            return Err(Error::BadBuffer {
                what: "out",
                detail: format!(
                    "RunOptions::out_dtype is {} but GpuOutputs::out_dtype is {}",
                    d.name(),
                    outputs.out_dtype.name()
                ),
            });
        }
        let opts = RunOptions {
            out_dtype: Some(outputs.out_dtype),
            ..*opts
        };
        self.check_buffers(p, inputs, outputs)?;
        let opts = self.resolve_coop(p, inputs.dtypes, &opts)?;
        let plan = self.plan(p, inputs.dtypes, &opts)?;
        self.check_health()?;
        self.encode(encoder, p, plan, inputs, outputs, None)?;
        Ok(plan.algorithm)
    }

    fn check_buffers(&self, p: &Problem, i: &GpuInputs<'_>, o: &GpuOutputs<'_>) -> Result<()> {
        use wgpu::BufferUsages as U;
        let presence = [
            ("bias", p.bias.is_some(), i.bias.is_some()),
            ("mask", p.mask.is_some(), i.mask.is_some()),
            ("alibi_slopes", p.alibi, i.alibi_slopes.is_some()),
            ("q_seqlens", p.q_seqlens, i.q_seqlens.is_some()),
            ("kv_seqlens", p.kv_seqlens, i.kv_seqlens.is_some()),
        ];
        for (what, declared, given) in presence {
            if declared != given {
                return Err(spotlight_reference::ProblemError::Presence {
                    what,
                    declared,
                    given,
                }
                .into());
            }
        }
        let bcast = |b: Option<spotlight_reference::Broadcast>| {
            b.map_or(0, |b| p.broadcast_elems(&b) as u64)
        };
        let need: [(&'static str, Option<&wgpu::Buffer>, u64, U); 11] = [
            (
                "q",
                Some(i.q),
                (p.q_elems() * i.dtypes[0].size()) as u64,
                U::STORAGE,
            ),
            (
                "k",
                Some(i.k),
                (p.k_elems() * i.dtypes[1].size()) as u64,
                U::STORAGE,
            ),
            (
                "v",
                Some(i.v),
                (p.v_elems() * i.dtypes[2].size()) as u64,
                U::STORAGE,
            ),
            ("bias", i.bias, bcast(p.bias) * 4, U::STORAGE),
            ("mask", i.mask, bcast(p.mask), U::STORAGE),
            (
                "alibi_slopes",
                i.alibi_slopes,
                p.q_heads as u64 * 4,
                U::COPY_SRC,
            ),
            ("q_seqlens", i.q_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            ("kv_seqlens", i.kv_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            (
                "out",
                Some(o.out),
                (p.o_elems() * o.out_dtype.size()) as u64,
                U::STORAGE,
            ),
            ("lse", o.lse, p.lse_elems() as u64 * 4, U::STORAGE),
            ("probs", o.probs, p.probs_elems() as u64 * 4, U::STORAGE),
        ];
        // An output bound where an input (or another output) is bound would be read and written
        // in one dispatch: wgpu refuses that later, at submission or in the app's
        // `encoder.finish()`. Say it here instead.
        let bound: Vec<(&'static str, &wgpu::Buffer)> = need
            .iter()
            .filter_map(|&(what, buf, _, _)| buf.map(|b| (what, b)))
            .collect();
        for (n, &(what, buf)) in bound.iter().enumerate() {
            if !matches!(what, "out" | "lse" | "probs") {
                continue;
            }
            if let Some(&(other, _)) = bound.iter().enumerate().find_map(|(m, x)| {
                (m != n && x.1 == buf && (m < n || !matches!(x.0, "out" | "lse" | "probs")))
                    .then_some(x)
            }) {
                return Err(Error::BadBuffer {
                    what,
                    detail: format!(
                        "is the same buffer as {other}: an output must not alias an input or another output"
                    ),
                });
            }
        }
        for (what, buf, bytes, usage) in need {
            let Some(buf) = buf else { continue };
            if buf.size() < padded(bytes) {
                return Err(Error::BadBuffer {
                    what,
                    detail: format!(
                        "has {} bytes, needs at least {} (rounded up to a multiple of 4)",
                        buf.size(),
                        padded(bytes)
                    ),
                });
            }
            if !buf.usage().contains(usage) {
                return Err(Error::BadBuffer {
                    what,
                    detail: format!("needs usage {usage:?}, has {:?}", buf.usage()),
                });
            }
        }
        Ok(())
    }

    /// Keys one P·V dispatch of the three-pass path covers: all of them, except where the adapter
    /// bounds how long an invocation may loop (llvmpipe: measured, one P·V loop over 1.1 M keys
    /// went wrong silently; 2048 tiles of 16 keys stay far inside the bound).
    fn pv_keys_per_dispatch(&self, p: &Problem) -> usize {
        match self.capabilities().max_key_tiles_per_workgroup {
            Some(_) => PV_TILES_PER_DISPATCH_BOUNDED * 16,
            None => p.kv_len.max(1),
        }
    }

    pub(crate) fn scratch(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded(bytes),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    pub(crate) fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        buffers: &[(u32, &wgpu::Buffer)],
        groups: u64,
    ) -> Result<()> {
        let (x, y) = self.fold(groups).ok_or_else(|| Error::GridTooLarge {
            what: format!("the {} dispatch", kernel.name),
            workgroups: groups,
            limit: (self.capabilities().max_workgroups_per_dim as u64).pow(2),
        })?;
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&kernel.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }

    pub(crate) fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Problem,
        plan: Plan,
        i: &GpuInputs<'_>,
        o: &GpuOutputs<'_>,
        paging: Option<&Paging<'_>>,
    ) -> Result<()> {
        let dev = &self.device;
        let mut uniform = Params::new(p);
        uniform.num_chunks = plan.chunks;
        uniform.chunk_keys = plan.chunk_keys;
        if let Some((base, total)) = plan.window {
            uniform.key_base = base;
            uniform.kv_total = total;
        }
        let (params, aux) = self.params_and_aux(enc, p, uniform, i, paging);
        let dummy = self.scratch("unused", 4);
        let bias = i.bias.unwrap_or(&dummy);
        let mask = i.mask.unwrap_or(&dummy);
        let out_scratch =
            (o.out_dtype != DType::F32).then(|| self.scratch("out f32", p.o_elems() as u64 * 4));
        let out32 = out_scratch.as_ref().unwrap_or(o.out);
        let lse_scratch = o
            .lse
            .is_none()
            .then(|| self.scratch("lse", p.lse_elems() as u64 * 4));
        let lse = o.lse.or(lse_scratch.as_ref()).expect("lse buffer");
        // The fused kernels' bindings (flash.wgsl and flash_coop.wgsl share them).
        let fused_binds = |o, l| fused_bindings([&params, &aux, bias, mask, i.q, i.k, i.v, o, l]);
        let grids = self.grids(p, plan);
        match plan.algorithm {
            Algorithm::Flash | Algorithm::SplitK => {
                let tiles = plan.tiles.expect("fused plan has tiles");
                let variant = Variant::flash(
                    i.dtypes,
                    p.head_dim as u32,
                    p.v_head_dim as u32,
                    tiles,
                    plan.algorithm == Algorithm::SplitK,
                    paging.is_some(),
                )
                .vec4_kv(wide_kv_rows(p))
                .native_f16(self.native_f16())
                .subgroup_rows(self.subgroup_rows(tiles.tpr));
                let kernel = self.cache.get(dev, &variant)?;
                let split = (plan.chunks > 1).then(|| {
                    let c = plan.chunks as u64;
                    (
                        self.scratch("partial out", c * p.o_elems() as u64 * 4),
                        self.scratch("partial lse", c * p.lse_elems() as u64 * 4),
                    )
                });
                let (o_dst, lse_dst) = match &split {
                    Some((po, pl)) => (po, pl),
                    None => (out32, lse),
                };
                self.dispatch(enc, &kernel, &fused_binds(o_dst, lse_dst), grids[0].1)?;
                if let Some((po, pl)) = &split {
                    let merge = self.cache.get(dev, &Variant::merge())?;
                    let binds = [(0, &params), (4, po), (5, pl), (6, out32), (7, lse)];
                    self.dispatch(enc, &merge, &binds, grids[1].1)?;
                }
            }
            Algorithm::FlashCoop => {
                let tiles = self.coop_tiles(p).map_err(|reason| Error::Unsupported {
                    algorithm: "flash-coop",
                    reason,
                })?;
                let variant =
                    Variant::flash_coop(i.dtypes, p.head_dim as u32, p.v_head_dim as u32, tiles)
                        .native_f16(self.native_f16());
                let kernel = self.cache.get(dev, &variant)?;
                // Split over the key range (llvmpipe's loop bound, max_chunk_keys): partial O
                // and LSE to scratch, merged like flash's.
                let split = (plan.chunks > 1).then(|| {
                    let c = plan.chunks as u64;
                    (
                        self.scratch("partial out", c * p.o_elems() as u64 * 4),
                        self.scratch("partial lse", c * p.lse_elems() as u64 * 4),
                    )
                });
                let (o_dst, lse_dst) = match &split {
                    Some((po, pl)) => (po, pl),
                    None => (out32, lse),
                };
                self.dispatch(enc, &kernel, &fused_binds(o_dst, lse_dst), grids[0].1)?;
                if let Some((po, pl)) = &split {
                    let merge = self.cache.get(dev, &Variant::merge())?;
                    let binds = [(0, &params), (4, po), (5, pl), (6, out32), (7, lse)];
                    self.dispatch(enc, &merge, &binds, grids[1].1)?;
                }
            }
            _ => {
                let probs_scratch = o
                    .probs
                    .is_none()
                    .then(|| self.scratch("scores", p.probs_elems() as u64 * 4));
                let probs = o.probs.or(probs_scratch.as_ref()).expect("probs buffer");
                let scores = self.cache.get(
                    dev,
                    &Variant::scores(i.dtypes[0], i.dtypes[1]).native_f16(self.native_f16()),
                )?;
                let softmax = self.cache.get(dev, &Variant::softmax())?;
                let pv = self
                    .cache
                    .get(dev, &Variant::pv(i.dtypes[2]).native_f16(self.native_f16()))?;
                let binds = [
                    (0, &params),
                    (1, &aux),
                    (2, bias),
                    (3, mask),
                    (4, i.q),
                    (5, i.k),
                    (6, probs),
                ];
                self.dispatch(enc, &scores, &binds, grids[0].1)?;
                self.dispatch(
                    enc,
                    &softmax,
                    &[(0, &params), (4, probs), (5, lse)],
                    grids[1].1,
                )?;
                // P·V over key ranges one invocation may loop over (all keys but on llvmpipe),
                // each dispatch adding its part to O in key order (so still deterministic).
                let step = self.pv_keys_per_dispatch(p);
                for (n, begin) in (0..p.kv_len.max(1)).step_by(step).enumerate() {
                    let range: [u32; 4] = [
                        begin as u32,
                        (begin + step).min(p.kv_len) as u32,
                        (n > 0) as u32,
                        0,
                    ];
                    let range = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("pv key range"),
                        contents: bytemuck::cast_slice(&range),
                        usage: wgpu::BufferUsages::UNIFORM,
                    });
                    let binds = [
                        (0, &params),
                        (1, &aux),
                        (4, probs),
                        (5, i.v),
                        (6, out32),
                        (7, &range),
                    ];
                    self.dispatch(enc, &pv, &binds, grids[2].1)?;
                }
            }
        }
        if let Some(src) = &out_scratch {
            self.pack(enc, src, o.out, o.out_dtype, p.o_elems())?;
        }
        Ok(())
    }

    /// The uniform block and the aux buffer every attention kernel binds (0 and 1). aux is
    /// `[q_seqlens: B][kv_seqlens: B][alibi slopes: Hq][block table]`, gathered on the GPU from
    /// the caller's buffers.
    pub(crate) fn params_and_aux(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Problem,
        mut uniform: Params,
        i: &GpuInputs<'_>,
        paging: Option<&Paging<'_>>,
    ) -> (wgpu::Buffer, wgpu::Buffer) {
        let aux_words = (2 * p.batch + p.q_heads) as u64;
        if let Some(pg) = paging {
            uniform.page_size = pg.page_size;
            uniform.table_off = aux_words as u32;
            uniform.table_stride = pg.table_stride;
        }
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(&uniform),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let b4 = p.batch as u64 * 4;
        let table_bytes = paging.map_or(0, |pg| p.batch as u64 * pg.table_stride as u64 * 4);
        let aux = self.scratch("aux", aux_words * 4 + table_bytes);
        for (src, offset, size) in [
            (i.q_seqlens, 0, b4),
            (i.kv_seqlens, b4, b4),
            (i.alibi_slopes, 2 * b4, p.q_heads as u64 * 4),
            (paging.map(|pg| pg.table), aux_words * 4, table_bytes),
        ] {
            if let Some(src) = src {
                enc.copy_buffer_to_buffer(src, 0, &aux, offset, size);
            }
        }
        (params, aux)
    }

    /// Converts `count` f32 values in `src` to packed `dtype` in `dst`.
    pub(crate) fn pack(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        dtype: DType,
        count: usize,
    ) -> Result<()> {
        let words = count.div_ceil(2) as u32;
        let pp = PackParams {
            count: count as u32,
            words,
            pad0: 0,
            pad1: 0,
        };
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("pack params"),
                contents: bytemuck::bytes_of(&pp),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let kernel = self.cache.get(&self.device, &Variant::pack(dtype))?;
        let groups = (words as u64).div_ceil(256);
        self.dispatch(enc, &kernel, &[(0, &params), (1, src), (2, dst)], groups)
    }
}

impl Engine {
    /// Merges partial results over disjoint key sets on the GPU (see
    /// [`spotlight_reference::merge`] for the definition): the operation that lets attention be
    /// split across dispatches, devices or time and still be exact. Returns `(O, LSE)`.
    pub fn merge(&self, p: &Problem, parts: &[(&[f32], &[f32])]) -> Result<(Vec<f32>, Vec<f32>)> {
        let _gl = self.exclusive();
        spotlight_reference::check_parts(p, parts)?;
        self.check_health()?;
        // Inside error scopes like `attention`: an allocation failure is `OutOfMemory`.
        self.scoped(|| self.merge_checked(p, parts))
    }

    fn merge_checked(
        &self,
        p: &Problem,
        parts: &[(&[f32], &[f32])],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let o = p.o_strides();
        let (rows, dv) = (p.lse_elems(), p.v_head_dim);
        // Partial O as [part][row][Dv], row = (b * Hq + h) * Lq + i.
        let mut part_o = Vec::with_capacity(parts.len() * rows * dv);
        let mut part_lse = Vec::with_capacity(parts.len() * rows);
        for (po, pl) in parts {
            for b in 0..p.batch {
                for h in 0..p.q_heads {
                    for i in 0..p.q_len {
                        part_o.extend((0..dv).map(|d| po[o.index(b, i, h, d)]));
                    }
                }
            }
            part_lse.extend_from_slice(pl);
        }
        let caps = self.capabilities();
        let bytes = part_o.len() as u64 * 4;
        if bytes > caps.max_storage_binding {
            return Err(Error::LimitExceeded {
                what: "the partial outputs to merge".into(),
                bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: caps.max_storage_binding,
            });
        }
        let dev = &self.device;
        let init = |label: &str, data: &[f32], usage: wgpu::BufferUsages| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(data),
                usage,
            })
        };
        let mut uniform = Params::new(p);
        uniform.num_chunks = parts.len() as u32;
        let params = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("merge params"),
            contents: bytemuck::bytes_of(&uniform),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let po = init("partial out", &part_o, storage);
        let pl = init("partial lse", &part_lse, storage);
        let out = init("out", &vec![f32::NAN; p.o_elems()], storage);
        let lse = init("lse", &vec![f32::NAN; rows], storage);
        let kernel = self.cache.get(dev, &Variant::merge())?;
        let mut enc = dev.create_command_encoder(&Default::default());
        let binds = [(0, &params), (4, &po), (5, &pl), (6, &out), (7, &lse)];
        self.dispatch(&mut enc, &kernel, &binds, rows as u64)?;
        self.queue.submit([enc.finish()]);
        Ok((
            self.read_f32(&out, p.o_elems())?,
            self.read_f32(&lse, rows)?,
        ))
    }
}
