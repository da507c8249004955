//! The backward pass: gradients of attention on the GPU, FlashAttention-2's algorithm without
//! atomics.
//!
//! Four passes, recorded in one encoder:
//! 1. `backward_pre.wgsl`: per query row, `D_i = rowsum(dO ∘ O)` (and the row's LSE, −inf for
//!    padded rows), appended to the aux buffer the other passes read;
//! 2. `backward_kv.wgsl`: one workgroup per tile of keys of one (batch, key/value head), looping
//!    over the query tiles (and the query heads of the group) that can see its keys; it
//!    recomputes `P = exp(s − LSE)` from Q, K and the forward's LSE (no `Lq×Lk` buffer) and
//!    accumulates dK and dV in registers;
//! 3. `backward_q.wgsl`: one workgroup per tile of query rows, looping over the key tiles its rows
//!    can see, accumulating dQ in registers (a second pass instead of atomics, so every element
//!    is written by one thread in a fixed order: bit-for-bit deterministic); with a bias it also
//!    writes the logit gradient dS;
//! 4. `backward_reduce.wgsl` (bias only): dBias = dS summed over the bias's broadcast dims.
//!
//! The semantics (including fully masked rows, padding and NaN) are those of
//! [`spotlight_reference::attention_backward`]; see the README's "Semantics of gradients".

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Inputs, Problem, TensorRef};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::{Binding, FlashLayout, FlashTiles, Variant, dtype_code};
use crate::options::{GpuInputs, Output};
use crate::params::Params;

/// The WGSL sources of the backward passes.
pub mod source {
    pub const COMMON: &str = include_str!("../../../shaders/backward_common.wgsl");
    pub const PRE: &str = include_str!("../../../shaders/backward_pre.wgsl");
    pub const KEY_VALUE: &str = include_str!("../../../shaders/backward_kv.wgsl");
    pub const QUERY: &str = include_str!("../../../shaders/backward_q.wgsl");
    pub const REDUCE: &str = include_str!("../../../shaders/backward_reduce.wgsl");
    pub const KEY_VALUE_ROWS: &str = include_str!("../../../shaders/backward_kv_rows.wgsl");
    pub const QUERY_ROWS: &str = include_str!("../../../shaders/backward_q_rows.wgsl");
    pub const DQ_ROWS: &str = include_str!("../../../shaders/backward_dq_rows.wgsl");
    pub const QUERY_ROWS_COMMON: &str = include_str!("../../../shaders/query_rows.wgsl");
}

/// One pass of the backward (a kernel of [`crate::kernels::Shader::Backward`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackwardPass {
    /// `D_i = rowsum(dO ∘ O)` and the rows' LSE.
    Pre,
    /// dK and dV over key tiles.
    KeyValue,
    /// dQ (and dS for the bias) over query tiles.
    Query,
    /// dBias from dS, summed over broadcast dims.
    Reduce,
    /// dK and dV for CPU adapters: one subgroup per workgroup (`backward_kv_rows.wgsl`).
    KeyValueRows,
    /// dQ (and dS) for CPU adapters: one subgroup per workgroup (`backward_q_rows.wgsl`).
    QueryRows,
    /// dQ = dS·K for CPU adapters from the logit gradients the key/value row pass stored
    /// (`backward_dq_rows.wgsl`).
    QueryFromGradients,
}

impl BackwardPass {
    pub fn name(self) -> &'static str {
        match self {
            BackwardPass::Pre => "backward_pre",
            BackwardPass::KeyValue => "backward_kv",
            BackwardPass::Query => "backward_q",
            BackwardPass::Reduce => "backward_reduce",
            BackwardPass::KeyValueRows => "backward_kv_rows",
            BackwardPass::QueryRows => "backward_q_rows",
            BackwardPass::QueryFromGradients => "backward_dq_rows",
        }
    }

    pub fn source(self) -> String {
        use crate::kernels::source::{COMMON as C, LOGITS, ROW_LOADS, SOFTMAX_RULES as RULES};
        match self {
            BackwardPass::Pre => [C, source::PRE].concat(),
            BackwardPass::KeyValue => {
                [C, LOGITS, RULES, source::COMMON, source::KEY_VALUE].concat()
            }
            BackwardPass::Query => [C, LOGITS, RULES, source::COMMON, source::QUERY].concat(),
            BackwardPass::Reduce => [C, source::REDUCE].concat(),
            BackwardPass::KeyValueRows => [
                C,
                LOGITS,
                RULES,
                source::COMMON,
                ROW_LOADS,
                source::KEY_VALUE_ROWS,
            ]
            .concat(),
            BackwardPass::QueryRows => [
                C,
                LOGITS,
                RULES,
                source::COMMON,
                ROW_LOADS,
                source::QUERY_ROWS_COMMON,
                source::QUERY_ROWS,
            ]
            .concat(),
            BackwardPass::QueryFromGradients => [
                C,
                LOGITS,
                RULES,
                source::COMMON,
                ROW_LOADS,
                source::QUERY_ROWS_COMMON,
                source::DQ_ROWS,
            ]
            .concat(),
        }
    }

    pub fn bindings(self) -> &'static [(u32, Binding)] {
        use Binding::*;
        match self {
            BackwardPass::Pre => &[
                (0, Uniform),
                (1, Read),
                (4, Read),
                (5, Read),
                (6, Read),
                (7, ReadWrite),
            ],
            BackwardPass::KeyValue
            | BackwardPass::Query
            | BackwardPass::KeyValueRows
            | BackwardPass::QueryRows => &[
                (0, Uniform),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, Read),
                (6, Read),
                (7, Read),
                (8, ReadWrite),
                (12, Uniform),
            ],
            BackwardPass::Reduce => &[(0, Uniform), (4, Read), (5, ReadWrite), (13, Uniform)],
            BackwardPass::QueryFromGradients => &[
                (0, Uniform),
                (1, Read),
                (5, Read),
                (7, Read),
                (8, ReadWrite),
                (12, Uniform),
            ],
        }
    }
}

/// Tile sizes of the two main backward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackwardTiles {
    /// Key/value pass: keys per workgroup and query rows per streamed tile.
    pub kv_bk: u32,
    pub kv_bq: u32,
    /// Query pass: query rows per workgroup and keys per streamed tile.
    pub q_bq: u32,
    pub q_bk: u32,
    /// Threads per key (key/value pass) or per query row (query pass); the lanes of the
    /// subgroup for the row kernels.
    pub tpr: u32,
    /// The tiled kernels (`backward_kv.wgsl`, `backward_q.wgsl`) or the row kernels for CPU
    /// adapters (`backward_kv_rows.wgsl`, `backward_q_rows.wgsl`).
    pub layout: FlashLayout,
}

impl BackwardTiles {
    /// Workgroup bytes of the key/value pass.
    pub fn kv_bytes(bk: u32, bq: u32, d: u32, dv: u32) -> u64 {
        4 * (bq * d + bq * dv + bk * d + bk * dv + 2 * bk * bq + 2 * bq) as u64
    }

    /// Workgroup bytes of the query pass.
    pub fn q_bytes(bq: u32, bk: u32, d: u32, dv: u32) -> u64 {
        4 * (bq * d + bq * dv + bk * d + bk * dv + 2 * bq * bk) as u64
    }

    /// The largest tiles that fit the adapter's workgroup memory and invocation limit, or `None`.
    /// Each thread keeps `ceil(D / tpr)` (and `ceil(Dv / tpr)`) accumulators, at most 32 (the
    /// kernels' `MAX_COLS`): `tpr = 8` up to 256, 16 up to 512. On lavapipe (32 KiB) D = 64
    /// gets 32 keys × 16 rows for the key/value pass and 32 rows × 16 keys for the query pass.
    pub fn choose(d: u32, dv: u32, workgroup_memory: u32, max_invocations: u32) -> Option<Self> {
        let widest = d.max(dv);
        let tpr = if widest <= 256 {
            8
        } else if widest <= 512 {
            16
        } else {
            return None;
        };
        const CANDIDATES: [(u32, u32); 9] = [
            (32, 32),
            (32, 16),
            (16, 32),
            (16, 16),
            (16, 8),
            (8, 8),
            (8, 4),
            (4, 4),
            (2, 2),
        ];
        let mem = workgroup_memory as u64;
        let fits = |rows: u32| rows * tpr <= max_invocations;
        let (kv_bk, kv_bq) = CANDIDATES
            .iter()
            .copied()
            .find(|&(bk, bq)| fits(bk) && Self::kv_bytes(bk, bq, d, dv) <= mem)?;
        let (q_bq, q_bk) = CANDIDATES
            .iter()
            .copied()
            .find(|&(bq, bk)| fits(bq) && Self::q_bytes(bq, bk, d, dv) <= mem)?;
        Some(BackwardTiles {
            kv_bk,
            kv_bq,
            q_bq,
            q_bk,
            tpr,
            layout: FlashLayout::Tiled,
        })
    }

    /// The row kernels' tiles for subgroups of `lanes` invocations (one subgroup per
    /// workgroup): `r` keys (key/value pass) or query rows (query pass) per workgroup (one of
    /// [`FlashTiles::ROWS_R`]), streamed in blocks of `ROWS_KBL · lanes` rows or keys (the
    /// forward row kernel's shape).
    pub fn rows(lanes: u32, r: u32) -> Self {
        let block = FlashTiles::ROWS_KBL * lanes;
        BackwardTiles {
            kv_bk: r,
            kv_bq: block,
            q_bq: r,
            q_bk: block,
            tpr: lanes,
            layout: FlashLayout::Rows,
        }
    }

    /// Workgroup bytes of the row kernels (the larger of the two): the R staged rows of
    /// ceil(ceil(dim / 4) / lanes) · lanes vec4 for both dims.
    pub fn rows_bytes(&self, d: u32, dv: u32) -> u64 {
        let staged = |dim: u32| dim.div_ceil(4).div_ceil(self.tpr) * self.tpr;
        16 * (self.kv_bk * (staged(d) + staged(dv))) as u64
    }

    /// Loop iterations one key/value-pass invocation runs per query tile and head (an estimate
    /// that counts every loop trip, for adapters that bound them).
    fn kv_iterations(&self, d: u32, dv: u32) -> u64 {
        let n = self.kv_bk * self.tpr;
        let (bq, tpr) = (self.kv_bq, self.tpr);
        let cols = |x: u32| x.div_ceil(tpr);
        (bq.div_ceil(n) + (bq * d).div_ceil(n) + (bq * dv).div_ceil(n)) as u64
            + (bq.div_ceil(tpr) * (d + dv + 1)) as u64
            + ((cols(d) + cols(dv)) * (bq + 1)) as u64
    }

    /// Loop iterations one query-pass invocation runs per key tile.
    fn q_iterations(&self, d: u32, dv: u32) -> u64 {
        let n = self.q_bq * self.tpr;
        let (bk, tpr) = (self.q_bk, self.tpr);
        ((bk * d).div_ceil(n) + (bk * dv).div_ceil(n)) as u64
            + (bk.div_ceil(tpr) * (d + dv + 1)) as u64
            + (d.div_ceil(tpr) * (bk + 1)) as u64
    }
}

/// Loop trips one invocation may run where the adapter bounds them (llvmpipe): the forward's
/// measured-safe 64 tiles of 32 keys at D = 64 count about 38 000 trips by the same estimate.
const LOOP_BUDGET_BOUNDED: u64 = 38_000;

impl Variant {
    pub fn backward_pre(out: DType, d_out: DType, dv: u32) -> Self {
        Variant {
            shader: crate::kernels::Shader::Backward(BackwardPass::Pre),
            native_f16: false,
            constants: vec![
                ("O_DT", dtype_code(out)),
                ("DO_DT", dtype_code(d_out)),
                ("V_DIM", dv),
            ],
        }
    }

    /// The key/value (`query = false`) or query pass; `write_ds` also writes the logit
    /// gradients: dS for dBias (query pass), g for [`Variant::backward_dq_rows`] (key/value row
    /// pass).
    pub fn backward_main(
        query: bool,
        dtypes: [DType; 3],
        d_out: DType,
        d: u32,
        dv: u32,
        tiles: BackwardTiles,
        write_ds: bool,
    ) -> Self {
        let mut constants = vec![
            ("Q_DT", dtype_code(dtypes[0])),
            ("K_DT", dtype_code(dtypes[1])),
            ("V_DT", dtype_code(dtypes[2])),
            ("DO_DT", dtype_code(d_out)),
            ("HEAD_DIM", d),
            ("V_DIM", dv),
        ];
        let pass = if tiles.layout == FlashLayout::Rows {
            constants.extend([("WG", tiles.tpr), ("ROWS", tiles.kv_bk)]);
            if query {
                BackwardPass::QueryRows
            } else {
                BackwardPass::KeyValueRows
            }
        } else if query {
            constants.extend([("BQ", tiles.q_bq), ("BK", tiles.q_bk), ("TPR", tiles.tpr)]);
            BackwardPass::Query
        } else {
            constants.extend([("BQ", tiles.kv_bq), ("BK", tiles.kv_bk), ("TPR", tiles.tpr)]);
            BackwardPass::KeyValue
        };
        if query || pass == BackwardPass::KeyValueRows {
            constants.push(("WRITE_DS", write_ds as u32));
        }
        if tiles.layout == FlashLayout::Rows {
            constants.push(("VEC4_KV", 0));
        }
        Variant {
            shader: crate::kernels::Shader::Backward(pass),
            native_f16: false,
            constants,
        }
    }

    /// dQ = g·K from the gradients the key/value row pass wrote (`tiles` are row tiles).
    pub fn backward_dq_rows(dtypes: [DType; 3], d: u32, dv: u32, tiles: BackwardTiles) -> Self {
        Variant {
            shader: crate::kernels::Shader::Backward(BackwardPass::QueryFromGradients),
            native_f16: false,
            constants: vec![
                ("K_DT", dtype_code(dtypes[1])),
                ("HEAD_DIM", d),
                ("V_DIM", dv),
                ("WG", tiles.tpr),
                ("ROWS", tiles.q_bq),
                ("VEC4_KV", 0),
            ],
        }
    }

    pub fn backward_reduce() -> Self {
        Variant {
            shader: crate::kernels::Shader::Backward(BackwardPass::Reduce),
            native_f16: false,
            constants: vec![],
        }
    }
}

/// How to run the backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackwardOptions {
    /// Split each pass's loop over query tiles (key/value pass) or key tiles (query pass) into
    /// dispatches of at most this many tiles, each adding to the previous ones in a fixed order.
    /// The adapter bounds it where loops are bounded (llvmpipe); `None`: the adapter decides.
    pub max_tiles_per_dispatch: Option<u32>,
    /// Force the tiled or the row kernels (`None`: the row kernels on CPU adapters with
    /// subgroups of one fixed size, as the forward chooses; the tiled ones elsewhere).
    pub layout: Option<FlashLayout>,
    /// Row kernels: keys or query rows per workgroup, 8 or 16 (`None`: by the problem's size,
    /// [`FlashTiles::row_count`]). The tiled kernels ignore it; other values are refused.
    pub rows_per_workgroup: Option<u32>,
    /// Row kernels without a bias: the key/value pass stores the logit gradients
    /// `[B, Hq, Lq, ceil(Lk/4)·4]` (f32, beside dK and dV in one binding) and dQ is their product
    /// with K (`true`), or the query pass recomputes them (`false`; needs no O(L²) memory, does
    /// three products per logit instead of one). `None`: stored when they fit
    /// [`DQ_FROM_GRADIENTS_BYTES`] and the adapter's binding and buffer limits. `Some(true)`
    /// where they cannot be stored is refused.
    pub dq_from_gradients: Option<bool>,
}

/// The most bytes of stored logit gradients the backward allocates on its own
/// ([`BackwardOptions::dq_from_gradients`]).
pub const DQ_FROM_GRADIENTS_BYTES: u64 = 256 << 20;

/// Gradients returned by [`Engine::attention_backward`], f32, each in its input's layout.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// `[B, Lq, Hq, D]`, layout of Q.
    pub dq: Vec<f32>,
    /// `[B, Lk, Hkv, D]`, layout of K.
    pub dk: Vec<f32>,
    /// `[B, Lk, Hkv, Dv]`, layout of V.
    pub dv: Vec<f32>,
    /// `[B|1, Hq|1, Lq, Lk]` like the bias, when the problem has one.
    pub dbias: Option<Vec<f32>>,
}

/// The forward's results on the GPU: O (`out_dtype` elements in the problem's layout) and its
/// LSE `[B, Hq, Lq]` (f32), as [`Engine::attention_on_buffers`] writes them.
#[derive(Clone, Copy, Debug)]
pub struct GpuForward<'a> {
    pub out: &'a wgpu::Buffer,
    pub out_dtype: DType,
    pub lse: &'a wgpu::Buffer,
}

/// Gradient buffers on the GPU (f32, `COPY_DST`): dQ, dK, dV in the layouts of Q, K, V, and
/// dBias (`[B|1, Hq|1, Lq, Lk]`) exactly when the problem has a bias.
#[derive(Clone, Copy, Debug)]
pub struct GpuGradients<'a> {
    pub dq: &'a wgpu::Buffer,
    pub dk: &'a wgpu::Buffer,
    pub dv: &'a wgpu::Buffer,
    pub dbias: Option<&'a wgpu::Buffer>,
}

/// What the backward of one problem will run.
#[derive(Clone, Copy, Debug)]
struct BackwardPlan {
    tiles: BackwardTiles,
    /// Row kernels: the query pass reads K and V, the key/value pass Q and dO, four elements
    /// per load (every row 4-aligned).
    wide_kv: bool,
    wide_qo: bool,
    /// Query tiles per key/value-pass dispatch and key tiles per query-pass dispatch.
    kv_step: u32,
    q_step: u32,
    /// Elements before the stored logit gradients in the key/value pass's output (a multiple
    /// of 4) and how many there are: `Some` exactly when dQ is computed from them.
    gradients: Option<(u64, u64)>,
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

impl Engine {
    /// Checks what the backward of `p` needs against the adapter and picks its tiles.
    fn backward_plan(&self, p: &Problem, opts: &BackwardOptions) -> Result<BackwardPlan> {
        p.validate()?;
        let caps = self.capabilities();
        let unsupported = |reason: String| Error::Unsupported {
            algorithm: "backward",
            reason,
        };
        if caps.max_storage_buffers_per_stage < 8 {
            return Err(unsupported(format!(
                "the backward binds 8 storage buffers per pass; this adapter allows {}",
                caps.max_storage_buffers_per_stage
            )));
        }
        let (d, dv) = (p.head_dim as u32, p.v_head_dim as u32);
        // The row kernels, as the forward chooses them: on CPU adapters whose subgroups have one
        // fixed size, for head dims up to FlashTiles::ROWS_MAX_DIM.
        let r = Engine::row_count(
            opts.rows_per_workgroup,
            p.probs_elems(),
            p.q_len.min(p.kv_len),
        )
        .map_err(unsupported)?;
        let rows = self
            .row_lanes()
            .map(|n| BackwardTiles::rows(n, r))
            .filter(|t| {
                d.max(dv) <= FlashTiles::ROWS_MAX_DIM
                    && t.rows_bytes(d, dv) <= caps.max_workgroup_memory as u64
            });
        let tiles = match (opts.layout, rows) {
            (Some(FlashLayout::Rows), None) => {
                return Err(unsupported(
                    self.target().row_kernel_refusal(p.head_dim, p.v_head_dim),
                ));
            }
            (Some(FlashLayout::Rows), Some(t)) => t,
            (None, Some(t)) if self.is_cpu() => t,
            _ => BackwardTiles::choose(d, dv, caps.max_workgroup_memory, caps.max_invocations)
                .ok_or_else(|| {
                    unsupported(format!(
                        "head dims D={d} Dv={dv} need more than the {} bytes of workgroup \
                         memory (or exceed 512)",
                        caps.max_workgroup_memory
                    ))
                })?,
        };
        let (qs, os) = (p.q_strides(), p.o_strides());
        let wide_qo = [
            p.head_dim,
            p.v_head_dim,
            qs.batch,
            qs.seq,
            qs.head,
            os.batch,
            os.seq,
            os.head,
        ]
        .iter()
        .all(|x| x % 4 == 0);
        let rows = p.lse_elems() as u64;
        let ds = p.bias.map_or(0, |_| p.probs_elems() as u64);
        // dQ from stored logit gradients: row kernels, no bias (its dS is another quantity),
        // [dK][dV][g] in one binding.
        let g_at = (p.k_elems() + p.v_elems()).div_ceil(4) as u64 * 4;
        let g_elems = (p.batch * p.q_heads * p.q_len * p.kv_len.div_ceil(4) * 4) as u64;
        let g_bytes = (g_at + g_elems) * 4;
        let g_fits = g_bytes <= caps.max_storage_binding.min(caps.max_buffer_size);
        let gradients = match opts.dq_from_gradients {
            _ if tiles.layout != FlashLayout::Rows => None,
            Some(false) => None,
            Some(true) if p.bias.is_some() => {
                return Err(unsupported(
                    "dQ from stored logit gradients does not take a bias (its dBias needs the \
                     query pass's dS); leave dq_from_gradients unset or false"
                        .to_string(),
                ));
            }
            Some(true) if !g_fits => {
                let limit = caps.max_storage_binding.min(caps.max_buffer_size);
                return Err(Error::LimitExceeded {
                    what: format!(
                        "the backward's dK, dV and logit gradients [B={}, Hq={}, Lq={}, Lk={}] \
                         in one binding (dq_from_gradients)",
                        p.batch, p.q_heads, p.q_len, p.kv_len
                    ),
                    bytes: g_bytes,
                    limit_name: "max_storage_buffer_binding_size",
                    limit,
                });
            }
            Some(true) => Some((g_at, g_elems)),
            None if p.bias.is_none() && g_fits && g_elems * 4 <= DQ_FROM_GRADIENTS_BYTES => {
                Some((g_at, g_elems))
            }
            None => None,
        };
        let bcast = |b: Option<spotlight_reference::Broadcast>| {
            b.map_or(0, |b| (b.batch * b.heads * p.q_len * p.kv_len) as u64)
        };
        let buffers = [
            ("q (as f32)".to_string(), p.q_elems() as u64 * 4),
            ("k (as f32)".to_string(), p.k_elems() as u64 * 4),
            ("v (as f32)".to_string(), p.v_elems() as u64 * 4),
            ("out and d_out (as f32)".to_string(), p.o_elems() as u64 * 4),
            ("bias".to_string(), bcast(p.bias) * 4),
            ("mask".to_string(), bcast(p.mask)),
            (
                "the aux buffer with the row statistics".to_string(),
                (2 * p.batch as u64 + p.q_heads as u64 + 2 * rows) * 4,
            ),
            (
                "dK and dV together".to_string(),
                (p.k_elems() + p.v_elems()) as u64 * 4,
            ),
            (
                format!(
                    "dQ and, for dBias, the logit gradients [B={}, Hq={}, Lq={}, Lk={}]",
                    p.batch, p.q_heads, p.q_len, p.kv_len
                ),
                (p.q_elems() as u64 + ds) * 4,
            ),
        ];
        for (what, bytes) in buffers {
            for (limit_name, limit) in [
                ("max_storage_buffer_binding_size", caps.max_storage_binding),
                ("max_buffer_size", caps.max_buffer_size),
            ] {
                if bytes > limit {
                    return Err(Error::LimitExceeded {
                        what: format!("the backward's {what}"),
                        bytes,
                        limit_name,
                        limit,
                    });
                }
            }
        }
        let max = caps.max_workgroups_per_dim as u64;
        let grids = [
            ("pre", rows.div_ceil(64)),
            (
                "key/value",
                (p.batch * p.kv_heads) as u64 * p.kv_len.div_ceil(tiles.kv_bk as usize) as u64,
            ),
            (
                "query",
                (p.batch * p.q_heads) as u64 * p.q_len.div_ceil(tiles.q_bq as usize) as u64,
            ),
            ("reduce", bcast(p.bias).div_ceil(64)),
        ];
        for (what, groups) in grids {
            if groups > max * max {
                return Err(Error::GridTooLarge {
                    what: format!("the backward's {what} pass"),
                    workgroups: groups,
                    limit: max * max,
                });
            }
        }
        let q_tiles = p.q_len.div_ceil(tiles.kv_bq as usize) as u32;
        let k_tiles = p.kv_len.div_ceil(tiles.q_bk as usize) as u32;
        let (mut kv_step, mut q_step) = (q_tiles.max(1), k_tiles.max(1));
        if caps.max_key_tiles_per_workgroup.is_some() {
            let group = p.group_size() as u64;
            let kv = LOOP_BUDGET_BOUNDED / (tiles.kv_iterations(d, dv) * group);
            let q = LOOP_BUDGET_BOUNDED / tiles.q_iterations(d, dv);
            kv_step = kv_step.min(kv.max(1) as u32);
            q_step = q_step.min(q.max(1) as u32);
        }
        if let Some(n) = opts.max_tiles_per_dispatch {
            kv_step = kv_step.min(n.max(1));
            q_step = q_step.min(n.max(1));
        }
        Ok(BackwardPlan {
            tiles,
            wide_kv: crate::plan::wide_kv_rows(p),
            wide_qo,
            kv_step,
            q_step,
            gradients,
        })
    }

    /// Gradients of attention on host data: given the problem, its inputs, the forward's result
    /// (with its LSE: run the forward with `RunOptions { lse: true, .. }`) and `dO = ∂L/∂O`
    /// (`[B, Lq, Hq, Dv]` in the problem's layout, any storage dtype), returns dQ, dK, dV and,
    /// with a bias, dBias, in f32. Everything is checked before GPU work; outputs are filled with
    /// NaN first, so an element a kernel failed to write cannot look valid.
    pub fn attention_backward(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        forward: &Output,
        d_out: TensorRef<'_>,
        opts: &BackwardOptions,
    ) -> Result<Gradients> {
        let _gl = self.exclusive();
        let lse = forward.lse.as_deref().ok_or_else(|| Error::Unsupported {
            algorithm: "backward",
            reason:
                "the forward result has no LSE: run the forward with RunOptions { lse: true, .. }"
                    .into(),
        })?;
        spotlight_reference::check_backward_inputs(
            p,
            inputs,
            forward.out.len(),
            lse.len(),
            d_out.len(),
        )?;
        let plan = self.backward_plan(p, opts)?;
        self.scoped(|| {
            self.check_health()?;
            let dev = &self.device;
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            let upload = |label: &str, bytes: &[u8]| {
                let mut data = bytes.to_vec();
                data.resize(padded(bytes.len() as u64) as usize, 0);
                dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &data,
                    usage,
                })
            };
            let q = upload("q", inputs.q.as_bytes());
            let k = upload("k", inputs.k.as_bytes());
            let v = upload("v", inputs.v.as_bytes());
            let bias = inputs.bias.map(|b| upload("bias", bytemuck::cast_slice(b)));
            let mask = inputs.mask.map(|m| upload("mask", m));
            let slopes = inputs
                .alibi_slopes
                .map(|s| upload("alibi_slopes", bytemuck::cast_slice(s)));
            let q_lens = inputs
                .q_seqlens
                .map(|s| upload("q_seqlens", bytemuck::cast_slice(s)));
            let kv_lens = inputs
                .kv_seqlens
                .map(|s| upload("kv_seqlens", bytemuck::cast_slice(s)));
            let out = upload("forward out", forward.out.as_ref().as_bytes());
            let lse_buf = upload("forward lse", bytemuck::cast_slice(lse));
            let dout = upload("d_out", d_out.as_bytes());
            let poisoned =
                |label: &str, n: usize| upload(label, bytemuck::cast_slice(&vec![f32::NAN; n]));
            let dq = poisoned("dq", p.q_elems());
            let dk = poisoned("dk", p.k_elems());
            let dv = poisoned("dv", p.v_elems());
            let dbias = p
                .bias
                .map(|b| poisoned("dbias", b.batch * b.heads * p.q_len * p.kv_len));
            let gi = GpuInputs {
                q: &q,
                k: &k,
                v: &v,
                dtypes: inputs.dtypes(),
                bias: bias.as_ref(),
                mask: mask.as_ref(),
                alibi_slopes: slopes.as_ref(),
                q_seqlens: q_lens.as_ref(),
                kv_seqlens: kv_lens.as_ref(),
            };
            let fw = GpuForward {
                out: &out,
                out_dtype: forward.out.dtype(),
                lse: &lse_buf,
            };
            let grads = GpuGradients {
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dbias: dbias.as_ref(),
            };
            let mut enc = dev.create_command_encoder(&Default::default());
            self.encode_backward(&mut enc, p, plan, &gi, &fw, (&dout, d_out.dtype()), &grads)?;
            self.queue.submit([enc.finish()]);
            Ok(Gradients {
                dq: self.read_f32(&dq, p.q_elems())?,
                dk: self.read_f32(&dk, p.k_elems())?,
                dv: self.read_f32(&dv, p.v_elems())?,
                dbias: match (&dbias, p.bias) {
                    (Some(buf), Some(b)) => {
                        Some(self.read_f32(buf, b.batch * b.heads * p.q_len * p.kv_len)?)
                    }
                    _ => None,
                },
            })
        })
    }

    /// Records the backward on caller-owned GPU buffers into `encoder`; the caller submits it.
    /// `d_out` holds `d_out_dtype` elements `[B, Lq, Hq, Dv]` in the problem's layout (`STORAGE`);
    /// the forward's buffers need `STORAGE`; gradient buffers `COPY_DST`. Sizes, usages and
    /// limits are checked first.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_on_buffers(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        p: &Problem,
        inputs: &GpuInputs<'_>,
        forward: &GpuForward<'_>,
        d_out: &wgpu::Buffer,
        d_out_dtype: DType,
        grads: &GpuGradients<'_>,
        opts: &BackwardOptions,
    ) -> Result<()> {
        let _gl = self.exclusive();
        let plan = self.backward_plan(p, opts)?;
        self.check_backward_buffers(p, inputs, forward, (d_out, d_out_dtype), grads)?;
        self.check_health()?;
        self.encode_backward(
            encoder,
            p,
            plan,
            inputs,
            forward,
            (d_out, d_out_dtype),
            grads,
        )
    }

    fn check_backward_buffers(
        &self,
        p: &Problem,
        i: &GpuInputs<'_>,
        f: &GpuForward<'_>,
        d_out: (&wgpu::Buffer, DType),
        g: &GpuGradients<'_>,
    ) -> Result<()> {
        use wgpu::BufferUsages as U;
        let presence = [
            ("bias", p.bias.is_some(), i.bias.is_some()),
            ("mask", p.mask.is_some(), i.mask.is_some()),
            ("alibi_slopes", p.alibi, i.alibi_slopes.is_some()),
            ("q_seqlens", p.q_seqlens, i.q_seqlens.is_some()),
            ("kv_seqlens", p.kv_seqlens, i.kv_seqlens.is_some()),
            ("dbias", p.bias.is_some(), g.dbias.is_some()),
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
            b.map_or(0, |b| (b.batch * b.heads * p.q_len * p.kv_len) as u64)
        };
        let e = |n: usize, dt: DType| (n * dt.size()) as u64;
        let need: [(&'static str, Option<&wgpu::Buffer>, u64, U); 15] = [
            ("q", Some(i.q), e(p.q_elems(), i.dtypes[0]), U::STORAGE),
            ("k", Some(i.k), e(p.k_elems(), i.dtypes[1]), U::STORAGE),
            ("v", Some(i.v), e(p.v_elems(), i.dtypes[2]), U::STORAGE),
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
                "forward out",
                Some(f.out),
                e(p.o_elems(), f.out_dtype),
                U::STORAGE,
            ),
            (
                "forward lse",
                Some(f.lse),
                p.lse_elems() as u64 * 4,
                U::STORAGE,
            ),
            ("d_out", Some(d_out.0), e(p.o_elems(), d_out.1), U::STORAGE),
            ("dq", Some(g.dq), p.q_elems() as u64 * 4, U::COPY_DST),
            ("dk", Some(g.dk), p.k_elems() as u64 * 4, U::COPY_DST),
            ("dv", Some(g.dv), p.v_elems() as u64 * 4, U::COPY_DST),
            ("dbias", g.dbias, bcast(p.bias) * 4, U::COPY_DST),
        ];
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

    fn storage_scratch(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded(bytes),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn uniform_words(&self, label: &str, words: [u32; 4]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Problem,
        plan: BackwardPlan,
        i: &GpuInputs<'_>,
        f: &GpuForward<'_>,
        d_out: (&wgpu::Buffer, DType),
        g: &GpuGradients<'_>,
    ) -> Result<()> {
        let dev = &self.device;
        let (d, dv) = (p.head_dim as u32, p.v_head_dim as u32);
        let rows = p.lse_elems() as u64;
        let aux_words = (2 * p.batch + p.q_heads) as u64;
        let mut uniform = Params::new(p);
        uniform.table_off = aux_words as u32;
        let params = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("backward params"),
            contents: bytemuck::bytes_of(&uniform),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        // aux: [q_seqlens: B][kv_seqlens: B][slopes: Hq][LSE: rows][D: rows].
        let aux = self.storage_scratch("backward aux", (aux_words + 2 * rows) * 4);
        let b4 = p.batch as u64 * 4;
        for (src, offset, size) in [
            (i.q_seqlens, 0, b4),
            (i.kv_seqlens, b4, b4),
            (i.alibi_slopes, 2 * b4, p.q_heads as u64 * 4),
        ] {
            if let Some(src) = src {
                enc.copy_buffer_to_buffer(src, 0, &aux, offset, size);
            }
        }

        // 1. D_i and the rows' LSE, then appended to aux.
        let stats = self.storage_scratch("backward row stats", 2 * rows * 4);
        let pre = self
            .cache
            .get(dev, &Variant::backward_pre(f.out_dtype, d_out.1, dv))?;
        let binds = [
            (0, &params),
            (1, &aux),
            (4, f.out),
            (5, d_out.0),
            (6, f.lse),
            (7, &stats),
        ];
        self.dispatch(enc, &pre, &binds, rows.div_ceil(64))?;
        enc.copy_buffer_to_buffer(&stats, 0, &aux, aux_words * 4, 2 * rows * 4);
        let aux_full = &aux;

        let dummy = self.storage_scratch("unused", 4);
        let bias = i.bias.unwrap_or(&dummy);
        let mask = i.mask.unwrap_or(&dummy);
        let t = plan.tiles;

        // 2. dK and dV over key tiles, the query tiles split into dispatches of kv_step.
        //    With plan.gradients the pass also stores g after dV (zero where nothing is written).
        let (k_bytes, v_bytes) = (p.k_elems() as u64 * 4, p.v_elems() as u64 * 4);
        let dkv = match plan.gradients {
            Some((at, n)) => {
                let dkv = self.storage_scratch("dk dv g", (at + n) * 4);
                enc.clear_buffer(&dkv, at * 4, Some(n * 4));
                dkv
            }
            None => self.storage_scratch("dk dv", k_bytes + v_bytes),
        };
        let kv = self.cache.get(
            dev,
            &Variant::backward_main(false, i.dtypes, d_out.1, d, dv, t, plan.gradients.is_some())
                .vec4_kv(plan.wide_qo)
                .native_f16(self.native_f16()),
        )?;
        let kv_groups = (p.batch * p.kv_heads) as u64 * p.kv_len.div_ceil(t.kv_bk as usize) as u64;
        let q_tiles = p.q_len.div_ceil(t.kv_bq as usize) as u32;
        for begin in (0..q_tiles.max(1)).step_by(plan.kv_step as usize) {
            let range = self.uniform_words(
                "backward range",
                [
                    begin,
                    (begin + plan.kv_step).min(q_tiles),
                    (begin > 0) as u32,
                    p.k_elems() as u32,
                ],
            );
            let binds = [
                (0, &params),
                (1, aux_full),
                (2, bias),
                (3, mask),
                (4, i.q),
                (5, i.k),
                (6, i.v),
                (7, d_out.0),
                (8, &dkv),
                (12, &range),
            ];
            self.dispatch(enc, &kv, &binds, kv_groups)?;
        }

        // 3. dQ (and dS) over query tiles, the key tiles split into dispatches of q_step: from the
        //    stored gradients, or recomputing them.
        let q_groups = (p.batch * p.q_heads) as u64 * p.q_len.div_ceil(t.q_bq as usize) as u64;
        let k_tiles = p.kv_len.div_ceil(t.q_bk as usize) as u32;
        if let Some((at, _)) = plan.gradients {
            let dq = self.storage_scratch("dq", p.q_elems() as u64 * 4);
            let pass = self.cache.get(
                dev,
                &Variant::backward_dq_rows(i.dtypes, d, dv, t)
                    .vec4_kv(plan.wide_kv)
                    .native_f16(self.native_f16()),
            )?;
            for begin in (0..k_tiles.max(1)).step_by(plan.q_step as usize) {
                let range = self.uniform_words(
                    "backward range",
                    [
                        begin,
                        (begin + plan.q_step).min(k_tiles),
                        (begin > 0) as u32,
                        (at / 4) as u32,
                    ],
                );
                let binds = [
                    (0, &params),
                    (1, aux_full),
                    (5, i.k),
                    (7, &dkv),
                    (8, &dq),
                    (12, &range),
                ];
                self.dispatch(enc, &pass, &binds, q_groups)?;
            }
            enc.copy_buffer_to_buffer(&dkv, 0, g.dk, 0, k_bytes);
            enc.copy_buffer_to_buffer(&dkv, k_bytes, g.dv, 0, v_bytes);
            enc.copy_buffer_to_buffer(&dq, 0, g.dq, 0, p.q_elems() as u64 * 4);
            return Ok(());
        }
        let ds_elems = p.bias.map_or(0, |_| p.probs_elems() as u64);
        let q_bytes = p.q_elems() as u64 * 4;
        let dqs = self.storage_scratch("dq ds", q_bytes + ds_elems * 4);
        if ds_elems > 0 {
            enc.clear_buffer(&dqs, q_bytes, Some(ds_elems * 4));
        }
        let qk = self.cache.get(
            dev,
            &Variant::backward_main(true, i.dtypes, d_out.1, d, dv, t, ds_elems > 0)
                .vec4_kv(plan.wide_kv)
                .native_f16(self.native_f16()),
        )?;
        for begin in (0..k_tiles.max(1)).step_by(plan.q_step as usize) {
            let range = self.uniform_words(
                "backward range",
                [
                    begin,
                    (begin + plan.q_step).min(k_tiles),
                    (begin > 0) as u32,
                    p.q_elems() as u32,
                ],
            );
            let binds = [
                (0, &params),
                (1, aux_full),
                (2, bias),
                (3, mask),
                (4, i.q),
                (5, i.k),
                (6, i.v),
                (7, d_out.0),
                (8, &dqs),
                (12, &range),
            ];
            self.dispatch(enc, &qk, &binds, q_groups)?;
        }

        // 4. dBias: dS summed over the bias's broadcast dims.
        if let (Some(b), Some(dbias)) = (p.bias, g.dbias) {
            let n = (b.batch * b.heads * p.q_len * p.kv_len) as u64;
            let out = self.storage_scratch("dbias", n * 4);
            let dims = self.uniform_words(
                "backward reduce dims",
                [b.batch as u32, b.heads as u32, p.q_elems() as u32, 0],
            );
            let reduce = self.cache.get(dev, &Variant::backward_reduce())?;
            let binds = [(0, &params), (4, &dqs), (5, &out), (13, &dims)];
            self.dispatch(enc, &reduce, &binds, n.div_ceil(64))?;
            enc.copy_buffer_to_buffer(&out, 0, dbias, 0, n * 4);
        }
        enc.copy_buffer_to_buffer(&dkv, 0, g.dk, 0, k_bytes);
        enc.copy_buffer_to_buffer(&dkv, k_bytes, g.dv, 0, v_bytes);
        enc.copy_buffer_to_buffer(&dqs, 0, g.dq, 0, q_bytes);
        Ok(())
    }
}
