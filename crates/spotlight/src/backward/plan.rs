//! What the backward of one problem runs on this adapter: tiles, wide loads, dispatch steps and
//! the dQ-from-gradients choice, all checked against the adapter before any GPU work.

use spotlight_reference::Problem;

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::{FlashLayout, FlashTiles};

use super::kernels::LOOP_BUDGET_BOUNDED;
use super::{BackwardOptions, BackwardTiles, DQ_FROM_GRADIENTS_BYTES};

/// What the backward of one problem will run.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackwardPlan {
    pub(super) tiles: BackwardTiles,
    /// Row kernels: the query pass reads K and V, the key/value pass Q and dO, four elements
    /// per load (every row 4-aligned).
    pub(super) wide_kv: bool,
    pub(super) wide_qo: bool,
    /// Query tiles per key/value-pass dispatch and key tiles per query-pass dispatch.
    pub(super) kv_step: u32,
    pub(super) q_step: u32,
    /// Elements before the stored logit gradients in the key/value pass's output (a multiple
    /// of 4) and how many there are: `Some` exactly when dQ is computed from them.
    pub(super) gradients: Option<(u64, u64)>,
}

impl Engine {
    /// Checks what the backward of `p` needs against the adapter and picks its tiles.
    pub(super) fn backward_plan(
        &self,
        p: &Problem,
        opts: &BackwardOptions,
    ) -> Result<BackwardPlan> {
        p.validate()?;
        let caps = self.capabilities();
        let unsupported = |reason: String| Error::BackwardUnsupported { reason };
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
            &FlashTiles::BACKWARD_ROWS_R,
            FlashTiles::backward_row_count(p.probs_elems() as u64, p.q_len.min(p.kv_len)),
        )
        .map_err(unsupported)?;
        let rows = self
            .row_lanes()
            .map(|n| BackwardTiles::rows(n, r))
            // No workgroup memory in any of them: registers and shuffles.
            .filter(|_| d.max(dv) <= FlashTiles::ROWS_MAX_DIM);
        let tiles = match (opts.layout, rows) {
            (Some(FlashLayout::Decode), _) => {
                return Err(unsupported(
                    "the decode layout is a forward kernel for short queries; the backward \
                     takes the tiled or the row kernels (layout tiled, rows or unset)"
                        .to_string(),
                ));
            }
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
}
