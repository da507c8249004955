//! The WGSL kernels: their sources (embedded at compile time from `shaders/`), the variants the
//! engine builds (override constants), and the pipeline cache.
//!
//! A variant is named from its configuration, e.g. `flash_q-f32_k-f16_v-f16_d64_dv64_bq32_bk32_tpr8`;
//! the same name keys the cache and labels the GPU objects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spotlight_reference::DType;

pub use crate::coop::CoopTiles;

/// Raw sources, one per file in `shaders/`.
pub mod source {
    pub const COMMON: &str = include_str!("../../../shaders/common.wgsl");
    pub const LOGITS: &str = include_str!("../../../shaders/logits.wgsl");
    pub const QK_TILE: &str = include_str!("../../../shaders/qk_tile.wgsl");
    pub const SCORES: &str = include_str!("../../../shaders/scores.wgsl");
    pub const SOFTMAX: &str = include_str!("../../../shaders/softmax.wgsl");
    pub const SOFTMAX_RULES: &str = include_str!("../../../shaders/softmax_rules.wgsl");
    pub const PV: &str = include_str!("../../../shaders/pv.wgsl");
    pub const FLASH: &str = include_str!("../../../shaders/flash.wgsl");
    pub const FLASH_ROWS: &str = include_str!("../../../shaders/flash_rows.wgsl");
    pub const FUSED_UNITS: &str = include_str!("../../../shaders/fused_units.wgsl");
    pub const ROW_LOADS: &str = include_str!("../../../shaders/row_loads.wgsl");
    pub const PACK: &str = include_str!("../../../shaders/pack.wgsl");
    pub const MERGE: &str = include_str!("../../../shaders/merge.wgsl");
    pub const STREAM: &str = include_str!("../../../shaders/stream.wgsl");
    pub const LENS: &str = include_str!("../../../shaders/lens.wgsl");
    pub const FLASH_COOP: &str = include_str!("../../../shaders/flash_coop.wgsl");
    pub const LINEAR: &str = include_str!("../../../shaders/linear.wgsl");

    /// Every file, by name, for tests that check each one.
    pub const FILES: &[(&str, &str)] = &[
        ("common.wgsl", COMMON),
        ("logits.wgsl", LOGITS),
        ("qk_tile.wgsl", QK_TILE),
        ("scores.wgsl", SCORES),
        ("softmax.wgsl", SOFTMAX),
        ("softmax_rules.wgsl", SOFTMAX_RULES),
        ("pv.wgsl", PV),
        ("flash.wgsl", FLASH),
        ("flash_rows.wgsl", FLASH_ROWS),
        ("fused_units.wgsl", FUSED_UNITS),
        ("row_loads.wgsl", ROW_LOADS),
        ("pack.wgsl", PACK),
        ("merge.wgsl", MERGE),
        ("stream.wgsl", STREAM),
        ("lens.wgsl", LENS),
        ("flash_coop.wgsl", FLASH_COOP),
        ("linear.wgsl", LINEAR),
        ("backward_common.wgsl", crate::backward::source::COMMON),
        ("backward_pre.wgsl", crate::backward::source::PRE),
        ("backward_kv.wgsl", crate::backward::source::KEY_VALUE),
        ("backward_q.wgsl", crate::backward::source::QUERY),
        ("backward_reduce.wgsl", crate::backward::source::REDUCE),
        (
            "backward_kv_rows.wgsl",
            crate::backward::source::KEY_VALUE_ROWS,
        ),
        ("backward_q_rows.wgsl", crate::backward::source::QUERY_ROWS),
        ("backward_dq_rows.wgsl", crate::backward::source::DQ_ROWS),
        (
            "query_rows.wgsl",
            crate::backward::source::QUERY_ROWS_COMMON,
        ),
    ];
}

/// One compiled kernel (a WGSL module made of one or more files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    /// Three-pass, pass 1: logits.
    Scores,
    /// Three-pass, pass 2: softmax and LSE.
    Softmax,
    /// Three-pass, pass 3: P·V.
    Pv,
    /// The fused flash kernel.
    Flash,
    /// The fused kernel with one query row per invocation, for CPU adapters.
    FlashRows,
    /// f32 → f16/bf16 packing of outputs.
    Pack,
    /// Merge of partial (O, LSE) results over disjoint key sets.
    Merge,
    /// A plain streaming read (the bandwidth yardstick of the decode benchmark).
    Stream,
    /// Attention statistics (entropy, max weight, received mass, selected maps) from the LSE.
    Lens,
    /// The fused kernel on matrix units (cooperative matrices, 16x16x16 or 8x8x8 f16 -> f32).
    FlashCoop,
    /// The layer's projections: tiled `X·Wᵀ + b` with the rotary epilogue (`layer.rs`).
    Linear,
    /// A pass of the backward (see `crate::backward`).
    Backward(crate::backward::BackwardPass),
}

/// How a kernel binds a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    Read,
    ReadWrite,
}

impl Shader {
    pub const ALL: [Shader; 18] = [
        Shader::Scores,
        Shader::Softmax,
        Shader::Pv,
        Shader::Flash,
        Shader::FlashRows,
        Shader::Pack,
        Shader::Merge,
        Shader::Stream,
        Shader::Lens,
        Shader::FlashCoop,
        Shader::Linear,
        Shader::Backward(crate::backward::BackwardPass::Pre),
        Shader::Backward(crate::backward::BackwardPass::KeyValue),
        Shader::Backward(crate::backward::BackwardPass::Query),
        Shader::Backward(crate::backward::BackwardPass::Reduce),
        Shader::Backward(crate::backward::BackwardPass::KeyValueRows),
        Shader::Backward(crate::backward::BackwardPass::QueryRows),
        Shader::Backward(crate::backward::BackwardPass::QueryFromGradients),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shader::Scores => "scores",
            Shader::Softmax => "softmax",
            Shader::Pv => "pv",
            Shader::Flash => "flash",
            Shader::FlashRows => "flash_rows",
            Shader::Pack => "pack",
            Shader::Merge => "merge",
            Shader::Stream => "stream",
            Shader::Lens => "lens",
            Shader::FlashCoop => "flash_coop",
            Shader::Linear => "linear",
            Shader::Backward(pass) => pass.name(),
        }
    }

    /// The full module source: shared files first, then the kernel's own; valid WGSL at the
    /// overrides' defaults (flash-coop's numbered blocks expanded for them: [`Variant::source`]
    /// expands them for its own head dims and tiles).
    pub fn source(self) -> String {
        let src = self.template();
        if self == Shader::FlashCoop {
            // HEAD_DIM = V_DIM = 64, BK = 32, EDGE = 16 (flash_coop.wgsl's defaults).
            return expand_marked(&src, &[("DQ", 4), ("DO", 4), ("KQ", 2)]);
        }
        src
    }

    /// The module source before flash-coop's numbered blocks are expanded.
    pub fn template(self) -> String {
        use source::*;
        match self {
            Shader::Scores => [COMMON, LOGITS, QK_TILE, SCORES].concat(),
            Shader::Softmax => [COMMON, SOFTMAX_RULES, SOFTMAX].concat(),
            Shader::Pv => [COMMON, PV].concat(),
            Shader::Flash => [COMMON, LOGITS, SOFTMAX_RULES, FUSED_UNITS, FLASH].concat(),
            Shader::FlashRows => [
                COMMON,
                LOGITS,
                SOFTMAX_RULES,
                FUSED_UNITS,
                ROW_LOADS,
                FLASH_ROWS,
            ]
            .concat(),
            Shader::Pack => PACK.to_string(),
            Shader::Merge => [COMMON, SOFTMAX_RULES, MERGE].concat(),
            Shader::Stream => STREAM.to_string(),
            Shader::Linear => LINEAR.to_string(),
            Shader::Lens => [COMMON, LOGITS, QK_TILE, SOFTMAX_RULES, LENS].concat(),
            Shader::FlashCoop => [
                "enable f16;\nenable wgpu_cooperative_matrix;\n",
                COMMON,
                LOGITS,
                SOFTMAX_RULES,
                FLASH_COOP,
            ]
            .concat(),
            Shader::Backward(pass) => pass.source(),
        }
    }

    /// The bindings of group 0, in binding order.
    pub fn bindings(self) -> &'static [(u32, Binding)] {
        use Binding::*;
        match self {
            Shader::Scores => &[
                (0, Uniform),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, Read),
                (6, ReadWrite),
            ],
            Shader::Softmax => &[(0, Uniform), (4, ReadWrite), (5, ReadWrite)],
            Shader::Pv => &[
                (0, Uniform),
                (1, Read),
                (4, Read),
                (5, Read),
                (6, ReadWrite),
                (7, Uniform),
            ],
            Shader::Flash | Shader::FlashRows | Shader::FlashCoop => &[
                (0, Uniform),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, Read),
                (6, Read),
                (7, ReadWrite),
                (8, ReadWrite),
            ],
            Shader::Pack => &[(0, Uniform), (1, Read), (2, ReadWrite)],
            Shader::Linear => &[
                (0, Uniform),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, ReadWrite),
                (6, ReadWrite),
                (7, ReadWrite),
            ],
            Shader::Merge => &[
                (0, Uniform),
                (4, Read),
                (5, Read),
                (6, ReadWrite),
                (7, ReadWrite),
            ],
            Shader::Stream => &[(0, Uniform), (1, Read), (2, ReadWrite)],
            Shader::Backward(pass) => pass.bindings(),
            Shader::Lens => &[
                (0, Uniform),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, Read),
                (6, Read),
                (7, ReadWrite),
                (8, Uniform),
            ],
        }
    }
}

/// Numeric code of a storage dtype in the shaders (`Q_DT` and friends).
pub fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
    }
}

/// Which fused scalar kernel a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashLayout {
    /// `flash.wgsl`: K/V tiles in workgroup memory, a 4×4 block of S per thread (GPUs).
    Tiled,
    /// `flash_rows.wgsl`: one query row per invocation, K/V read at uniform addresses straight
    /// from the buffers, no workgroup memory (CPU adapters).
    Rows,
}

impl FlashLayout {
    pub fn name(self) -> &'static str {
        match self {
            FlashLayout::Tiled => "tiled",
            FlashLayout::Rows => "rows",
        }
    }
}

impl std::str::FromStr for FlashLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiled" => Ok(FlashLayout::Tiled),
            "rows" => Ok(FlashLayout::Rows),
            _ => Err(format!(
                "unknown flash layout '{s}': expected tiled or rows"
            )),
        }
    }
}

/// Tile configuration of the flash kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashTiles {
    /// Query rows per workgroup.
    pub bq: u32,
    /// Keys per tile.
    pub bk: u32,
    /// Threads per query row.
    pub tpr: u32,
    /// The kernel.
    pub layout: FlashLayout,
}

impl FlashTiles {
    /// Query rows (or, in the backward's key/value pass, keys) per workgroup of the row kernels
    /// (their `const R`, rewritten per pipeline from the `ROWS` constant): 8, or 16 for large
    /// problems ([`FlashTiles::row_count`]).
    pub const ROWS_R: [u32; 2] = [8, 16];
    /// Logits (B·Hq·Lq·Lk) from which the row kernels own 16 rows per workgroup.
    ///
    /// Why a threshold: 16 rows make every K/V vector a lane loads feed twice the FMAs
    /// (lavapipe, 1,1024,2,64 f32: forward 3.1-3.4 → 4.7-4.9 GFLOP/s; backward 590 → 321 ms), but
    /// the unrolled kernel takes 2-2.5× as long to compile (forward first call ~2 → ~4.8 s at
    /// D = 64; backward ~9.5 → ~23 s), which only a long run pays back (and which made the test
    /// suite, mostly small problems, 17 minutes slower when every problem used 16).
    pub const ROWS_LARGE_LOGITS: u64 = 1 << 19;

    /// The rows per workgroup of the row kernels for a problem of `logits` logits whose
    /// workgroups own rows out of `rows` (query rows of a unit, or keys): 16 for large problems
    /// with at least 64 such rows, else 8 (decoding, with a few rows per unit, keeps 8).
    pub fn row_count(logits: u64, rows: usize) -> u32 {
        if logits >= Self::ROWS_LARGE_LOGITS && rows >= 64 {
            Self::ROWS_R[1]
        } else {
            Self::ROWS_R[0]
        }
    }
    /// Keys per lane per block of `flash_rows.wgsl` (its `const KBL`).
    pub const ROWS_KBL: u32 = 4;

    /// Largest head dims (D and Dv) the row kernel takes: its unrolled P·V loop grows with Dv
    /// and so does the compile (larger dims run the tiled kernel).
    pub const ROWS_MAX_DIM: u32 = 256;

    /// Whether these tiles take head dims `d`, `dv` within `workgroup_memory` bytes.
    pub fn fits(&self, d: u32, dv: u32, workgroup_memory: u32) -> bool {
        let dims = match self.layout {
            FlashLayout::Rows => d <= Self::ROWS_MAX_DIM && dv <= Self::ROWS_MAX_DIM,
            FlashLayout::Tiled => dv.div_ceil(4).div_ceil(self.tpr) <= Self::MAX_NC,
        };
        dims && self.workgroup_bytes(d, dv) <= workgroup_memory as u64
    }

    /// The row kernel's configuration for subgroups of `lanes` invocations (one subgroup per
    /// workgroup): `rows` query rows (one of [`FlashTiles::ROWS_R`]), blocks of
    /// `ROWS_KBL · lanes` keys; `tpr` is the lanes.
    pub fn rows(lanes: u32, rows: u32) -> Self {
        FlashTiles {
            bq: rows,
            bk: Self::ROWS_KBL * lanes,
            tpr: lanes,
            layout: FlashLayout::Rows,
        }
    }

    /// Most output vec4 columns one thread accumulates in registers (`NC` in `flash.wgsl`).
    pub const MAX_NC: u32 = 64;

    /// Bytes of workgroup memory the flash kernel needs: Q, K and V tiles as vec4 rows padded
    /// by one vec4, the weights, and two vec4 per thread for row reductions.
    pub fn workgroup_bytes(&self, d: u32, dv: u32) -> u64 {
        if self.layout == FlashLayout::Rows {
            // q_s: R rows of ceil(ceil(D / 4) / lanes) · lanes vec4.
            let lanes = self.tpr as u64;
            return 16 * self.bq as u64 * (d.div_ceil(4) as u64).div_ceil(lanes) * lanes;
        }
        let (d4, dv4) = (d.div_ceil(4) as u64 + 1, dv.div_ceil(4) as u64 + 1);
        let (bq, bk) = (self.bq as u64, self.bk as u64);
        16 * (bq * d4 + bk * d4 + bk * dv4 + bq * self.tpr as u64 + 2 * self.threads() as u64)
    }

    /// Threads per workgroup: `bq / 4` row groups of `tpr` threads.
    pub fn threads(&self) -> u32 {
        if self.layout == FlashLayout::Rows {
            return self.tpr;
        }
        self.bq / 4 * self.tpr
    }

    /// Picks tiles that fit the adapter, or `None` when none does. Every thread computes a 4×4
    /// block of S and the matching 4 rows of O (see `flash.wgsl`), so `bq` is a multiple of 4
    /// and a key tile is `bk = 4 · tpr` keys.
    ///
    /// Reasons, measured or structural:
    /// - Each thread keeps `4 · ceil(ceil(Dv / 4) / tpr) <= 4 · 64` vec4 accumulators (the
    ///   `MAX_NC`), so large Dv needs a larger `tpr`.
    /// - Candidates go from preferred to small; the first that fits the workgroup memory wins.
    ///   lavapipe (32 KiB, subgroups of 8), measured 2026-11-28 with `spotlight bench --config
    ///   1,512,2,64 --algorithm flash` on a loaded 2-core machine: 32×8 (64 threads, 32-key
    ///   tiles), 64×4, 32×4 and 16×8 all took 715–800 ms, within the noise; 32×8 is first
    ///   because it has the fewest barriers per key among them and `tpr = 8` fills one SIMD-8
    ///   row group. D=128 gets 16×8 there; D=256 8×4.
    /// - NVIDIA (48 KiB, subgroups of 32; not measured, no GPU this session): D=64 gets 32×8,
    ///   D=128 32×4 (32 threads: small; to be tuned when a GPU is lent).
    /// - Workgroups stay within `max_invocations` (256 by default in WebGPU).
    /// - `max_rows` caps `bq` (rounded up to a multiple of 4): a decode step has only
    ///   `Lq · Hq/Hkv` rows per key/value head, and empty rows waste threads.
    pub fn choose(
        d: u32,
        dv: u32,
        workgroup_memory: u32,
        max_invocations: u32,
        max_rows: u32,
    ) -> Option<Self> {
        const CANDIDATES: [(u32, u32); 16] = [
            (32, 8),
            (64, 4),
            (32, 4),
            (16, 8),
            (16, 4),
            (64, 2),
            (32, 2),
            (16, 2),
            (8, 8),
            (8, 4),
            (8, 2),
            (4, 8),
            (4, 4),
            (4, 2),
            (8, 1),
            (4, 1),
        ];
        let max_bq = max_rows.clamp(4, 64).next_multiple_of(4);
        CANDIDATES
            .iter()
            .map(|&(bq, tpr)| FlashTiles {
                bq,
                bk: 4 * tpr,
                tpr,
                layout: FlashLayout::Tiled,
            })
            .find(|t| {
                t.bq <= max_bq
                    && dv.div_ceil(4).div_ceil(t.tpr) <= Self::MAX_NC
                    && t.threads() <= max_invocations
                    && t.workgroup_bytes(d, dv) <= workgroup_memory as u64
            })
    }
}

/// A kernel variant: the shader, its override constants, and whether f16 tensors are read
/// natively.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub shader: Shader,
    /// Override constants, in a fixed order.
    pub constants: Vec<(&'static str, u32)>,
    /// Read f16 tensors as `array<f16>` (needs `SHADER_F16`) instead of unpacking u32 words.
    /// The one text substitution in the kernels: it changes an element type, which an
    /// `override` cannot.
    pub native_f16: bool,
}

impl Variant {
    pub fn scores(q: DType, k: DType) -> Self {
        Variant {
            shader: Shader::Scores,
            native_f16: false,
            constants: vec![("Q_DT", dtype_code(q)), ("K_DT", dtype_code(k))],
        }
    }

    pub fn softmax() -> Self {
        Variant {
            shader: Shader::Softmax,
            native_f16: false,
            constants: vec![("WG", 128)],
        }
    }

    pub fn pv(v: DType) -> Self {
        Variant {
            shader: Shader::Pv,
            native_f16: false,
            constants: vec![("V_DT", dtype_code(v))],
        }
    }

    /// The fused kernel; `pack_gqa` and `paged` select the decode modes (see `flash.wgsl`).
    pub fn flash(
        dtypes: [DType; 3],
        d: u32,
        dv: u32,
        tiles: FlashTiles,
        pack_gqa: bool,
        paged: bool,
    ) -> Self {
        if tiles.layout == FlashLayout::Rows {
            return Variant {
                shader: Shader::FlashRows,
                native_f16: false,
                constants: vec![
                    ("Q_DT", dtype_code(dtypes[0])),
                    ("K_DT", dtype_code(dtypes[1])),
                    ("V_DT", dtype_code(dtypes[2])),
                    ("HEAD_DIM", d),
                    ("V_DIM", dv),
                    ("WG", tiles.tpr),
                    ("ROWS", tiles.bq),
                    ("PACK_GQA", pack_gqa as u32),
                    ("PAGED", paged as u32),
                    ("VEC4_KV", 0),
                ],
            };
        }
        Variant {
            shader: Shader::Flash,
            native_f16: false,
            constants: vec![
                ("Q_DT", dtype_code(dtypes[0])),
                ("K_DT", dtype_code(dtypes[1])),
                ("V_DT", dtype_code(dtypes[2])),
                ("HEAD_DIM", d),
                ("V_DIM", dv),
                ("BQ", tiles.bq),
                ("BK", tiles.bk),
                ("TPR", tiles.tpr),
                ("PACK_GQA", pack_gqa as u32),
                ("PAGED", paged as u32),
                ("SUBGROUP_ROWS", 0),
            ],
        }
    }

    pub fn merge() -> Self {
        Variant {
            shader: Shader::Merge,
            native_f16: false,
            constants: vec![("WG", 64)],
        }
    }

    /// The cooperative-matrix kernel with its tiles (matrix edge, subgroup size, subgroups per
    /// workgroup, keys per tile: [`CoopTiles`]).
    pub fn flash_coop(dtypes: [DType; 3], d: u32, dv: u32, tiles: CoopTiles) -> Self {
        Variant {
            shader: Shader::FlashCoop,
            native_f16: false,
            constants: vec![
                ("Q_DT", dtype_code(dtypes[0])),
                ("K_DT", dtype_code(dtypes[1])),
                ("V_DT", dtype_code(dtypes[2])),
                ("HEAD_DIM", d),
                ("V_DIM", dv),
                ("WG", tiles.wg),
                ("NS", tiles.ns),
                ("BK", tiles.bk),
                ("EDGE", tiles.edge),
                ("STAGE", tiles.stage_len(d, dv)),
            ],
        }
    }

    pub fn lens(q: DType, k: DType) -> Self {
        Variant {
            shader: Shader::Lens,
            native_f16: false,
            constants: vec![("Q_DT", dtype_code(q)), ("K_DT", dtype_code(k))],
        }
    }

    /// The layer's projection `X·Wᵀ + b` (X and W in any storage dtype, read packed).
    pub fn linear(x: DType, w: DType) -> Self {
        Variant {
            shader: Shader::Linear,
            native_f16: false,
            constants: vec![("X_DT", dtype_code(x)), ("W_DT", dtype_code(w))],
        }
    }

    pub fn stream() -> Self {
        Variant {
            shader: Shader::Stream,
            native_f16: false,
            constants: vec![],
        }
    }

    pub fn pack(out: DType) -> Self {
        Variant {
            shader: Shader::Pack,
            native_f16: false,
            constants: vec![("OUT_DT", dtype_code(out))],
        }
    }

    /// The value of override constant `name` (0 when the variant has none).
    fn constant(&self, name: &str) -> u32 {
        self.constants
            .iter()
            .find(|c| c.0 == name)
            .map_or(0, |c| c.1)
    }

    /// Tensors (`q`, `k`, `v`) this variant stores as f16.
    fn f16_tensors(&self) -> Vec<&'static str> {
        self.constants
            .iter()
            .filter(|&&(k, v)| v == 1 && matches!(k, "Q_DT" | "K_DT" | "V_DT"))
            // Wide loads read packed words (no native f16 binding).
            .filter(|&&(k, _)| {
                self.constant("VEC4_KV") == 0
                    || !self
                        .row_kernel()
                        .is_some_and(|spec| spec.wide.iter().any(|w| w.1 == k))
            })
            .map(|&(k, _)| match k {
                "Q_DT" => "q",
                "K_DT" => "k",
                _ => "v",
            })
            .collect()
    }

    /// Row reductions of the fused kernel through subgroup shuffles (callers check that every
    /// subgroup size is a multiple of the tiles' `tpr`). No effect on other kernels.
    pub fn subgroup_rows(mut self, on: bool) -> Self {
        for c in self.constants.iter_mut().filter(|c| c.0 == "SUBGROUP_ROWS") {
            c.1 = on as u32;
        }
        self
    }

    /// The row kernel reading K and V four elements per load: only where every K and V row
    /// starts at a multiple of 4 elements and both head dims are multiples of 4 (callers check).
    pub fn vec4_kv(mut self, on: bool) -> Self {
        for c in self.constants.iter_mut().filter(|c| c.0 == "VEC4_KV") {
            c.1 = on as u32;
        }
        self
    }

    fn uses_subgroups(&self) -> bool {
        self.constants.contains(&("SUBGROUP_ROWS", 1))
    }

    /// What the row-kernel rewrite does to this variant (`None`: not a row kernel).
    fn row_kernel(&self) -> Option<RowKernel> {
        use crate::backward::BackwardPass;
        let wg = self.constant("WG").max(1);
        let cols = |dim: &str| self.constant(dim).div_ceil(4).div_ceil(wg).max(1);
        type Wide = &'static [(&'static str, &'static str, &'static str)];
        const KV: Wide = &[("k", "K_DT", "HEAD_DIM"), ("v", "V_DT", "V_DIM")];
        const QO: Wide = &[("q", "Q_DT", "HEAD_DIM"), ("dout", "DO_DT", "V_DIM")];
        const K: Wide = &[("k", "K_DT", "HEAD_DIM")];
        let (registers, wide): (_, Wide) = match self.shader {
            Shader::FlashRows => (vec![("NV8", "// register columns", cols("V_DIM"))], KV),
            Shader::Backward(BackwardPass::QueryRows) => {
                (vec![("NK8", "// register columns k", cols("HEAD_DIM"))], KV)
            }
            Shader::Backward(BackwardPass::KeyValueRows) => (
                vec![
                    ("NK8", "// register columns k", cols("HEAD_DIM")),
                    ("NV8", "// register columns v", cols("V_DIM")),
                ],
                QO,
            ),
            Shader::Backward(BackwardPass::QueryFromGradients) => {
                (vec![("NK8", "// register columns k", cols("HEAD_DIM"))], K)
            }
            _ => return None,
        };
        Some(RowKernel {
            lanes: wg,
            rows: self.constant("ROWS"),
            registers,
            wide,
        })
    }

    /// Reads f16 tensors natively when `native` and the variant has any (else unchanged).
    pub fn native_f16(mut self, native: bool) -> Self {
        self.native_f16 = native && !self.f16_tensors().is_empty();
        self
    }

    /// The module source of this variant: the shader's, with the element type and loads of
    /// f16 tensors rewritten when they are read natively.
    pub fn source(&self) -> String {
        let mut src = self.shader.template();
        if self.constants.contains(&("EDGE", 8)) {
            // A cooperative-matrix type cannot be overridden: the 8x8 variant is spelled so.
            src = src.replace("coop_mat16x16", "coop_mat8x8");
        }
        if self.shader == Shader::FlashCoop {
            // One line per Q fragment and O accumulator (see flash_coop.wgsl).
            let e = self.constant("EDGE").max(1);
            src = expand_marked(
                &src,
                &[
                    ("DQ", self.constant("HEAD_DIM") / e),
                    ("DO", self.constant("V_DIM") / e),
                    ("KQ", self.constant("BK") / e),
                ],
            );
        }
        if self.shader == Shader::Flash {
            // The accumulator array sized for this variant (see its line in flash.wgsl).
            let nc = self
                .constant("V_DIM")
                .div_ceil(4)
                .div_ceil(self.constant("TPR").max(1))
                .max(1);
            let tag = "// register columns";
            let line = src
                .lines()
                .find(|l| l.starts_with("const NC: u32 = ") && l.ends_with(tag))
                .expect("flash.wgsl declares `const NC`")
                .to_string();
            src = src.replace(&line, &format!("const NC: u32 = {nc}u; {tag}"));
        }
        if let Some(spec) = self.row_kernel() {
            src = row_kernel_source(src, self, &spec);
        }
        if self.uses_subgroups() {
            for (name, op) in [
                ("row_max", "y = max(y, subgroupShuffleXor(y, o));"),
                ("row_add", "y += subgroupShuffleXor(y, o);"),
            ] {
                let stub = format!(
                    "fn {name}(x: vec4<f32>) -> vec4<f32> {{ return x; }} // subgroup {name}"
                );
                assert!(
                    src.contains(&stub),
                    "{}: no {name} stub",
                    self.shader.name()
                );
                let body = format!(
                    "fn {name}(x: vec4<f32>) -> vec4<f32> {{ var y = x; for (var o = TPR / 2u; o > 0u; o >>= 1u) {{ {op} }} return y; }}"
                );
                src = src.replace(&stub, &body);
            }
            // No `enable subgroups;`: naga 30 rejects the directive and gates the builtins on
            // the device's SUBGROUP feature instead.
        }
        if !self.native_f16 {
            return src;
        }
        for t in self.f16_tensors() {
            let packed = format!("array<u32>; // tensor {t}");
            assert!(
                src.contains(&packed),
                "{}: no binding for tensor {t}",
                self.shader.name()
            );
            src = src.replace(&packed, &format!("array<f16>; // tensor {t}"));
            let start = src
                .find(&format!("fn load_{t}(idx: u32)"))
                .expect("every kernel defines its loads");
            let end = start + src[start..].find('\n').expect("a load is one line");
            src.replace_range(
                start..end,
                &format!("fn load_{t}(idx: u32) -> f32 {{ return f32({t}[idx]); }}"),
            );
        }
        if src.starts_with("enable f16;") {
            src
        } else {
            format!("enable f16;\n{src}")
        }
    }

    /// The variant's name, used as the cache key's label on the GPU.
    pub fn name(&self) -> String {
        let mut name = self.shader.name().to_string();
        for (k, v) in &self.constants {
            let part = match *k {
                "Q_DT" | "K_DT" | "V_DT" | "OUT_DT" | "X_DT" | "W_DT" => {
                    let dt = ["f32", "f16", "bf16"][*v as usize % 3];
                    format!("{}-{dt}", k.trim_end_matches("_DT").to_ascii_lowercase())
                }
                "PACK_GQA" | "PAGED" | "SUBGROUP_ROWS" | "VEC4_KV" if *v == 0 => continue,
                "VEC4_KV" => "vec4".to_string(),
                "PACK_GQA" => "gqa".to_string(),
                "PAGED" => "paged".to_string(),
                "SUBGROUP_ROWS" => "sg".to_string(),
                "HEAD_DIM" => format!("d{v}"),
                "V_DIM" => format!("dv{v}"),
                other => format!("{}{v}", other.to_ascii_lowercase()),
            };
            name.push('_');
            name.push_str(&part);
        }
        if self.native_f16 {
            name.push_str("_nativef16");
        }
        name
    }

    /// The constants as wgpu takes them.
    pub fn wgpu_constants(&self) -> Vec<(&'static str, f64)> {
        self.constants.iter().map(|&(k, v)| (k, v as f64)).collect()
    }
}

/// The text rewrite of a row kernel (`flash_rows.wgsl`, `backward_q_rows.wgsl`,
/// `backward_kv_rows.wgsl`; see the first's header for why).
struct RowKernel {
    /// Lanes of the subgroup (the workgroup).
    lanes: u32,
    /// Rows (query rows or keys) one workgroup owns: the kernel's `const R`.
    rows: u32,
    /// Register arrays sized per variant: the `const NAME: u32 = ..; TAG` line and its value.
    registers: Vec<(&'static str, &'static str, u32)>,
    /// The tensors each lane streams: (binding, dtype constant, dim constant), read four
    /// elements per load when the variant's `VEC4_KV` is on.
    wide: &'static [(&'static str, &'static str, &'static str)],
}

/// Sizes the register arrays of a row kernel, rewrites its streamed tensors' loads as wide loads
/// where the variant asks (`VEC4_KV`), then unrolls its marked loops.
fn row_kernel_source(mut src: String, variant: &Variant, spec: &RowKernel) -> String {
    let name = variant.shader.name();
    let registers = [("R", "// rows per workgroup", spec.rows)];
    for &(reg, tag, value) in registers.iter().chain(&spec.registers) {
        let line = src
            .lines()
            .find(|l| l.starts_with(&format!("const {reg}: u32 = ")) && l.ends_with(tag))
            .unwrap_or_else(|| panic!("{name}: no `const {reg}` line"))
            .to_string();
        src = src.replace(&line, &format!("const {reg}: u32 = {value}u; {tag}"));
    }
    if variant.constant("VEC4_KV") == 1 {
        for &(t, dt_name, dim) in spec.wide {
            let dt = variant.constant(dt_name);
            let (word, wide) = if dt == 0 {
                ("vec4<u32>", format!("wide_f32({t}[(base + d0) / 4u])"))
            } else {
                (
                    "vec2<u32>",
                    format!("wide_half({t}[(base + d0) / 4u], {dt}u)"),
                )
            };
            // Zero past the row, like the scalar loads (the dims are multiples of 4).
            let wide = format!("select(vec4<f32>(0.0), {wide}, d0 < {dim})");
            let binding = format!("array<u32>; // tensor {t}");
            assert!(src.contains(&binding), "{name}: no tensor {t}");
            src = src.replace(&binding, &format!("array<{word}>; // tensor {t}"));
            let load = format!("fn load_{t}(idx: u32)");
            let start = src.find(&load).expect("row kernels define their loads");
            let end = start + src[start..].find('\n').expect("one line");
            src.replace_range(start..end, "");
            let scalar = format!("fn {t}4_scalar(");
            let start = src.find(&scalar).expect("row kernels: scalar loads");
            let end = start + src[start..].find("\n}\n").expect("a function") + 3;
            src.replace_range(start..end, "");
            let line = format!(
                "fn {t}4(base: u32, d0: u32) -> vec4<f32> {{ return {t}4_scalar(base, d0); }} // load {t}4"
            );
            assert!(src.contains(&line), "{name}: no {t}4 line");
            src = src.replace(
                &line,
                &format!("fn {t}4(base: u32, d0: u32) -> vec4<f32> {{ return {wide}; }}"),
            );
        }
    }
    let (r, kbl) = (spec.rows, FlashTiles::ROWS_KBL);
    let products: Vec<(String, u32)> = spec
        .registers
        .iter()
        .map(|&(reg, _, v)| (format!("R * {reg}"), r * v))
        .collect();
    let mut bounds: Vec<(&str, u32)> = vec![
        ("4u", 4),
        ("R", r),
        ("KBL", kbl),
        ("R * KBL", r * kbl),
        ("WG", spec.lanes),
        ("NVW", (r * kbl).div_ceil(32)),
    ];
    bounds.extend(spec.registers.iter().map(|&(reg, _, v)| (reg, v)));
    bounds.extend(products.iter().map(|(k, v)| (k.as_str(), *v)));
    unroll_marked(&src, &bounds)
}

/// Unrolls, in the text, every loop whose header line is
/// `for (var X = 0u; X < N; X++) { // unroll` with `N` a name in `bounds` (or `4u`): the body is
/// repeated N times, each copy a block that starts with `let X = <i>u;`. The WGSL stays valid
/// (and means the same) either way; unrolled, every index by X is a constant. Nested marked loops
/// are unrolled too. Bodies must not `break` or `continue`.
pub fn unroll_marked(src: &str, bounds: &[(&str, u32)]) -> String {
    let mut lines: Vec<String> = src.lines().map(str::to_string).collect();
    while let Some(at) = lines
        .iter()
        .position(|l| l.trim_end().ends_with("{ // unroll"))
    {
        let header = lines[at].trim().to_string();
        let indent = &lines[at][..lines[at].len() - lines[at].trim_start().len()];
        let indent = indent.to_string();
        let inner = header
            .strip_prefix("for (var ")
            .and_then(|h| h.strip_suffix(") { // unroll"))
            .unwrap_or_else(|| panic!("not an unrollable loop header: {header}"));
        let parts: Vec<&str> = inner.split(';').map(str::trim).collect();
        let name = parts[0]
            .strip_suffix(" = 0u")
            .unwrap_or_else(|| panic!("loop must start at 0u: {header}"));
        let bound = parts
            .get(1)
            .and_then(|c| c.strip_prefix(&format!("{name} < ")))
            .unwrap_or_else(|| panic!("loop must test {name} < N: {header}"));
        assert_eq!(parts.get(2).copied(), Some(format!("{name}++").as_str()));
        let n = bounds
            .iter()
            .find(|b| b.0 == bound)
            .unwrap_or_else(|| panic!("no bound for {bound}: {header}"))
            .1;
        // The body: up to the brace that closes the header's.
        let mut depth = 1i32;
        let mut end = at + 1;
        loop {
            let code = lines[end].split("//").next().unwrap_or("");
            depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
            if depth == 0 {
                break;
            }
            end += 1;
        }
        assert_eq!(
            lines[end].trim(),
            "}",
            "loop body must close on its own line"
        );
        let body = &lines[at + 1..end];
        assert!(
            !body
                .iter()
                .any(|l| l.contains("break;") || l.contains("continue;")),
            "an unrolled loop cannot break or continue: {header}"
        );
        let mut out = Vec::with_capacity(body.len() * n as usize + 2 * n as usize);
        for i in 0..n {
            out.push(format!("{indent}{{ const {name} = {i}u;"));
            out.extend(body.iter().cloned());
            out.push(format!("{indent}}}"));
        }
        lines.splice(at..=end, out);
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Expands, in the text, every block between a line `// each X < N {` (N a name in `bounds`) and
/// the line `// } each X`: its lines are repeated N times, with `{X}` replaced by 0, 1, ...
/// Unlike [`unroll_marked`], the copies share the enclosing scope, so they can declare numbered
/// variables (`var acc_{X}`) that later blocks use: how a kernel holds a number of values the
/// language cannot put in an array (cooperative matrices). Blocks nest (with different names;
/// the outer is expanded first, so inner lines may use both).
pub fn expand_marked(src: &str, bounds: &[(&str, u32)]) -> String {
    let mut lines: Vec<String> = src.lines().map(str::to_string).collect();
    while let Some(at) = lines.iter().position(|l| {
        let t = l.trim();
        t.starts_with("// each ") && t.ends_with(" {")
    }) {
        let header = lines[at].trim().to_string();
        let spec = &header["// each ".len()..header.len() - " {".len()];
        let (name, bound) = spec
            .split_once(" < ")
            .unwrap_or_else(|| panic!("not an expandable block: {header}"));
        let n = bounds
            .iter()
            .find(|b| b.0 == bound)
            .unwrap_or_else(|| panic!("no bound for {bound}: {header}"))
            .1;
        let end_marker = format!("// }} each {name}");
        let end = at
            + lines[at..]
                .iter()
                .position(|l| l.trim() == end_marker)
                .unwrap_or_else(|| panic!("{header}: no closing `{end_marker}`"));
        let key = format!("{{{name}}}");
        let mut copies = Vec::with_capacity((end - at) * n as usize);
        for i in 0..n {
            let i = i.to_string();
            copies.extend(lines[at + 1..end].iter().map(|l| l.replace(&key, &i)));
        }
        lines.splice(at..=end, copies);
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// A built pipeline and its bind group layout.
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub name: String,
}

/// Builds each variant once and hands out shared references. Building happens under the lock,
/// so two threads asking for the same variant at once build it exactly once.
#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<Variant, Arc<Kernel>>>,
    builds: std::sync::atomic::AtomicUsize,
}

impl PipelineCache {
    /// How many pipelines were built so far (for tests of the cache).
    pub fn builds(&self) -> usize {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The kernel for `variant`, building it on first use.
    pub fn get(&self, device: &wgpu::Device, variant: &Variant) -> crate::Result<Arc<Kernel>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(variant) {
            return Ok(k.clone());
        }
        let kernel = Arc::new(build(device, variant)?);
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(variant.clone(), kernel.clone());
        Ok(kernel)
    }
}

fn build(device: &wgpu::Device, variant: &Variant) -> crate::Result<Kernel> {
    let name = variant.name();
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&name),
        source: wgpu::ShaderSource::Wgsl(variant.source().into()),
    });
    let entries: Vec<wgpu::BindGroupLayoutEntry> = variant
        .shader
        .bindings()
        .iter()
        .map(|&(binding, kind)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match kind {
                    Binding::Uniform => wgpu::BufferBindingType::Uniform,
                    Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&name),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&name),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let constants = variant.wgpu_constants();
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&name),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    if let Some(err) = pollster::block_on(scope.pop()) {
        return Err(crate::Error::Pipeline {
            name,
            reason: err.to_string(),
        });
    }
    Ok(Kernel {
        pipeline,
        layout,
        name,
    })
}
