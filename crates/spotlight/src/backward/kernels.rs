//! The backward's kernels: their WGSL sources and bind-group tables ([`BackwardPass`]), their
//! tiles ([`BackwardTiles`]) and the typed configuration each variant is built from
//! ([`BackwardConfig`]).

use spotlight_reference::DType;

use crate::kernels::{
    Binding, Config, FlashLayout, FlashTiles, RowKernel, Variant, cols, dtype_code,
};

/// The WGSL sources of the backward passes.
pub mod source {
    pub const COMMON: &str = include_str!("../../../../shaders/backward_common.wgsl");
    pub const PRE: &str = include_str!("../../../../shaders/backward_pre.wgsl");
    pub const KEY_VALUE: &str = include_str!("../../../../shaders/backward_kv.wgsl");
    pub const QUERY: &str = include_str!("../../../../shaders/backward_q.wgsl");
    pub const REDUCE: &str = include_str!("../../../../shaders/backward_reduce.wgsl");
    pub const KEY_VALUE_ROWS: &str = include_str!("../../../../shaders/backward_kv_rows.wgsl");
    pub const QUERY_ROWS: &str = include_str!("../../../../shaders/backward_q_rows.wgsl");
    pub const DQ_ROWS: &str = include_str!("../../../../shaders/backward_dq_rows.wgsl");
    pub const QUERY_ROWS_COMMON: &str = include_str!("../../../../shaders/query_rows.wgsl");
    pub const ROW_SCATTER: &str = include_str!("../../../../shaders/row_scatter.wgsl");
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
                source::ROW_SCATTER,
                source::KEY_VALUE_ROWS,
            ]
            .concat(),
            BackwardPass::QueryRows => [
                C,
                LOGITS,
                RULES,
                source::COMMON,
                ROW_LOADS,
                source::ROW_SCATTER,
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
    /// [`FlashTiles::BACKWARD_ROWS_R`]), streamed in blocks of `ROWS_KBL · lanes` rows or keys (the
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

    /// Loop iterations one key/value-pass invocation runs per query tile and head (an estimate
    /// that counts every loop trip, for adapters that bound them).
    pub(super) fn kv_iterations(&self, d: u32, dv: u32) -> u64 {
        let n = self.kv_bk * self.tpr;
        let (bq, tpr) = (self.kv_bq, self.tpr);
        let cols = |x: u32| x.div_ceil(tpr);
        (bq.div_ceil(n) + (bq * d).div_ceil(n) + (bq * dv).div_ceil(n)) as u64
            + (bq.div_ceil(tpr) * (d + dv + 1)) as u64
            + ((cols(d) + cols(dv)) * (bq + 1)) as u64
    }

    /// Loop iterations one query-pass invocation runs per key tile.
    pub(super) fn q_iterations(&self, d: u32, dv: u32) -> u64 {
        let n = self.q_bq * self.tpr;
        let (bk, tpr) = (self.q_bk, self.tpr);
        ((bk * d).div_ceil(n) + (bk * dv).div_ceil(n)) as u64
            + (bk.div_ceil(tpr) * (d + dv + 1)) as u64
            + (d.div_ceil(tpr) * (bk + 1)) as u64
    }
}

/// Loop trips one invocation may run where the adapter bounds them (llvmpipe): the forward's
/// measured-safe 64 tiles of 32 keys at D = 64 count about 38 000 trips by the same estimate.
pub(super) const LOOP_BUDGET_BOUNDED: u64 = 38_000;

/// The configuration of one backward kernel (the backward arm of
/// [`crate::kernels::Config`]): what its override constants and text rewrites need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackwardConfig {
    /// `D_i = rowsum(dO ∘ O)`: the dtypes of O and dO, and Dv.
    Pre { out: DType, d_out: DType, dv: u32 },
    /// The key/value (`query = false`) or query pass, tiled or row kernels per `tiles.layout`;
    /// `write_ds` (query passes and the key/value row pass) also writes the logit gradients.
    Main {
        query: bool,
        dtypes: [DType; 3],
        d_out: DType,
        d: u32,
        dv: u32,
        tiles: BackwardTiles,
        write_ds: bool,
        vec4_kv: bool,
        /// Row kernels: compiled without the general per-logit path (`PLAIN_LOGITS`), for
        /// problems without mask, bias, ALiBi or soft cap.
        plain_logits: bool,
    },
    /// dQ = g·K from the gradients the key/value row pass stored.
    QueryFromGradients {
        k: DType,
        d: u32,
        dv: u32,
        tiles: BackwardTiles,
        vec4_kv: bool,
    },
    /// dBias from dS.
    Reduce,
}

impl BackwardConfig {
    pub fn pass(&self) -> BackwardPass {
        match *self {
            BackwardConfig::Pre { .. } => BackwardPass::Pre,
            BackwardConfig::Reduce => BackwardPass::Reduce,
            BackwardConfig::QueryFromGradients { .. } => BackwardPass::QueryFromGradients,
            BackwardConfig::Main { query, tiles, .. } => {
                match (query, tiles.layout == FlashLayout::Rows) {
                    (true, true) => BackwardPass::QueryRows,
                    (false, true) => BackwardPass::KeyValueRows,
                    (true, false) => BackwardPass::Query,
                    (false, false) => BackwardPass::KeyValue,
                }
            }
        }
    }

    /// The override constants, in a fixed order.
    pub fn constants(&self) -> Vec<(&'static str, u32)> {
        match *self {
            BackwardConfig::Pre { out, d_out, dv } => vec![
                ("O_DT", dtype_code(out)),
                ("DO_DT", dtype_code(d_out)),
                ("V_DIM", dv),
            ],
            BackwardConfig::Reduce => vec![],
            BackwardConfig::QueryFromGradients {
                k,
                d,
                dv,
                tiles,
                vec4_kv,
            } => vec![
                ("K_DT", dtype_code(k)),
                ("HEAD_DIM", d),
                ("V_DIM", dv),
                ("WG", tiles.tpr),
                ("ROWS", tiles.q_bq),
                ("VEC4_KV", vec4_kv as u32),
            ],
            BackwardConfig::Main {
                query,
                dtypes,
                d_out,
                d,
                dv,
                tiles,
                write_ds,
                vec4_kv,
                plain_logits,
            } => {
                let mut c = vec![
                    ("Q_DT", dtype_code(dtypes[0])),
                    ("K_DT", dtype_code(dtypes[1])),
                    ("V_DT", dtype_code(dtypes[2])),
                    ("DO_DT", dtype_code(d_out)),
                    ("HEAD_DIM", d),
                    ("V_DIM", dv),
                ];
                let pass = self.pass();
                match pass {
                    BackwardPass::KeyValueRows | BackwardPass::QueryRows => {
                        c.extend([("WG", tiles.tpr), ("ROWS", tiles.kv_bk)])
                    }
                    BackwardPass::Query => {
                        c.extend([("BQ", tiles.q_bq), ("BK", tiles.q_bk), ("TPR", tiles.tpr)])
                    }
                    _ => c.extend([("BQ", tiles.kv_bq), ("BK", tiles.kv_bk), ("TPR", tiles.tpr)]),
                }
                if query || pass == BackwardPass::KeyValueRows {
                    c.push(("WRITE_DS", write_ds as u32));
                }
                if tiles.layout == FlashLayout::Rows {
                    c.push(("VEC4_KV", vec4_kv as u32));
                    c.push(("PLAIN_LOGITS", plain_logits as u32));
                }
                c
            }
        }
    }

    /// The storage dtypes of Q, K and V where the kernel binds them.
    pub(crate) fn qkv_dtypes(&self) -> [Option<DType>; 3] {
        match *self {
            BackwardConfig::Main { dtypes, .. } => dtypes.map(Some),
            BackwardConfig::QueryFromGradients { k, .. } => [None, Some(k), None],
            _ => [None; 3],
        }
    }

    /// Wide loads in the row kernels (no effect on the others).
    pub(crate) fn set_vec4_kv(&mut self, on: bool) {
        match self {
            BackwardConfig::Main { tiles, vec4_kv, .. }
            | BackwardConfig::QueryFromGradients { tiles, vec4_kv, .. }
                if tiles.layout == FlashLayout::Rows =>
            {
                *vec4_kv = on
            }
            _ => {}
        }
    }

    /// The row kernels without their general per-logit path (no effect on the others).
    pub(crate) fn set_plain_logits(&mut self, on: bool) {
        if let BackwardConfig::Main {
            tiles,
            plain_logits,
            ..
        } = self
            && tiles.layout == FlashLayout::Rows
        {
            *plain_logits = on
        }
    }

    /// What the row-kernel rewrite does to this pass (`None`: not a row kernel).
    pub(crate) fn row_kernel(&self) -> Option<RowKernel> {
        let (d, dv, tiles, vec4, dtypes) = match *self {
            BackwardConfig::Main {
                d,
                dv,
                tiles,
                vec4_kv,
                dtypes,
                d_out,
                ..
            } => (
                d,
                dv,
                tiles,
                vec4_kv,
                [dtypes[0], dtypes[1], dtypes[2], d_out],
            ),
            BackwardConfig::QueryFromGradients {
                k,
                d,
                dv,
                tiles,
                vec4_kv,
            } => (d, dv, tiles, vec4_kv, [k; 4]),
            _ => return None,
        };
        let lanes = tiles.tpr;
        let k_cols = ("NK8", "// register columns k", cols(d, lanes));
        let v_cols = ("NV8", "// register columns v", cols(dv, lanes));
        // The column-owning row kernels' reduce-scatter (row_scatter.wgsl): lanes, partial sums
        // per lane (one per owned key or row, at least one per lane) and keys or rows per lane.
        let sums = tiles.kv_bk.max(lanes);
        let scatter = vec![
            k_cols,
            v_cols,
            ("LW", "// lanes", lanes),
            ("RS", "// partial sums", sums),
            ("OPL", "// owned per lane", sums / lanes),
        ];
        let (rows, registers, wide) = match self.pass() {
            BackwardPass::QueryRows => (
                tiles.kv_bk,
                scatter,
                vec![("k", dtypes[1], "HEAD_DIM"), ("v", dtypes[2], "V_DIM")],
            ),
            BackwardPass::KeyValueRows => (
                tiles.kv_bk,
                scatter,
                vec![("q", dtypes[0], "HEAD_DIM"), ("dout", dtypes[3], "V_DIM")],
            ),
            BackwardPass::QueryFromGradients => {
                (tiles.q_bq, vec![k_cols], vec![("k", dtypes[1], "HEAD_DIM")])
            }
            _ => return None,
        };
        Some(RowKernel {
            lanes,
            rows,
            registers,
            wide,
            vec4,
        })
    }
}

impl Variant {
    pub fn backward_pre(out: DType, d_out: DType, dv: u32) -> Self {
        Config::Backward(BackwardConfig::Pre { out, d_out, dv }).into()
    }

    /// The key/value (`query = false`) or query pass; `write_ds` also writes the logit
    /// gradients: dS for dBias (query pass), g for [`Variant::backward_dq_rows`] (key/value row
    /// pass); the tiled key/value pass ignores it.
    pub fn backward_main(
        query: bool,
        dtypes: [DType; 3],
        d_out: DType,
        d: u32,
        dv: u32,
        tiles: BackwardTiles,
        write_ds: bool,
    ) -> Self {
        let writes = query || tiles.layout == FlashLayout::Rows;
        Config::Backward(BackwardConfig::Main {
            query,
            dtypes,
            d_out,
            d,
            dv,
            tiles,
            write_ds: write_ds && writes,
            vec4_kv: false,
            plain_logits: false,
        })
        .into()
    }

    /// dQ = g·K from the gradients the key/value row pass wrote (`tiles` are row tiles).
    pub fn backward_dq_rows(dtypes: [DType; 3], d: u32, dv: u32, tiles: BackwardTiles) -> Self {
        Config::Backward(BackwardConfig::QueryFromGradients {
            k: dtypes[1],
            d,
            dv,
            tiles,
            vec4_kv: false,
        })
        .into()
    }

    pub fn backward_reduce() -> Self {
        Config::Backward(BackwardConfig::Reduce).into()
    }
}
