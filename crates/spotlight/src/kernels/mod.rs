//! The WGSL kernels: their sources (embedded at compile time from `shaders/`) and bind-group
//! tables ([`Shader`]), the variants the engine builds ([`Variant`], typed per kernel family in
//! [`Config`]: `variant.rs`), the fused kernels' tiles (`tiles.rs`), the text rewrites the
//! kernels are written for (`marked.rs`), and the pipeline cache keyed by [`Variant`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spotlight_reference::DType;

mod marked;
mod tiles;
mod variant;

pub use crate::coop::CoopTiles;
pub use marked::{expand_marked, unroll_marked};
pub use tiles::{FlashLayout, FlashTiles};
pub use variant::{Config, CoopConfig, FlashConfig, Variant};
pub(crate) use variant::{RowKernel, cols};

/// Raw sources, one per file in `shaders/`.
pub mod source {
    pub const COMMON: &str = include_str!("../../../../shaders/common.wgsl");
    pub const LOGITS: &str = include_str!("../../../../shaders/logits.wgsl");
    pub const QK_TILE: &str = include_str!("../../../../shaders/qk_tile.wgsl");
    pub const SCORES: &str = include_str!("../../../../shaders/scores.wgsl");
    pub const SOFTMAX: &str = include_str!("../../../../shaders/softmax.wgsl");
    pub const SOFTMAX_RULES: &str = include_str!("../../../../shaders/softmax_rules.wgsl");
    pub const PV: &str = include_str!("../../../../shaders/pv.wgsl");
    pub const FLASH: &str = include_str!("../../../../shaders/flash.wgsl");
    pub const FLASH_ROWS: &str = include_str!("../../../../shaders/flash_rows.wgsl");
    pub const FLASH_DECODE: &str = include_str!("../../../../shaders/flash_decode.wgsl");
    pub const FUSED_UNITS: &str = include_str!("../../../../shaders/fused_units.wgsl");
    pub const ROW_LOADS: &str = include_str!("../../../../shaders/row_loads.wgsl");
    pub const ROW_CHUNKS: &str = include_str!("../../../../shaders/row_chunks.wgsl");
    pub const KV_LOADS: &str = include_str!("../../../../shaders/kv_loads.wgsl");
    pub const FUSED_IO: &str = include_str!("../../../../shaders/fused_io.wgsl");
    pub const PACK: &str = include_str!("../../../../shaders/pack.wgsl");
    pub const HALF_PACK: &str = include_str!("../../../../shaders/half_pack.wgsl");
    pub const HALF_OUT: &str = include_str!("../../../../shaders/half_out.wgsl");
    pub const MERGE: &str = include_str!("../../../../shaders/merge.wgsl");
    pub const STREAM: &str = include_str!("../../../../shaders/stream.wgsl");
    pub const LENS: &str = include_str!("../../../../shaders/lens.wgsl");
    pub const FLASH_COOP: &str = include_str!("../../../../shaders/flash_coop.wgsl");
    pub const LINEAR: &str = include_str!("../../../../shaders/linear.wgsl");

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
        ("flash_decode.wgsl", FLASH_DECODE),
        ("fused_units.wgsl", FUSED_UNITS),
        ("row_loads.wgsl", ROW_LOADS),
        ("row_chunks.wgsl", ROW_CHUNKS),
        ("kv_loads.wgsl", KV_LOADS),
        ("fused_io.wgsl", FUSED_IO),
        ("pack.wgsl", PACK),
        ("half_pack.wgsl", HALF_PACK),
        ("half_out.wgsl", HALF_OUT),
        ("merge.wgsl", MERGE),
        ("stream.wgsl", STREAM),
        ("lens.wgsl", LENS),
        ("flash_coop.wgsl", FLASH_COOP),
        ("linear.wgsl", LINEAR),
        ("backward_common.wgsl", crate::backward::source::COMMON),
        ("backward_pre.wgsl", crate::backward::source::PRE),
        ("backward_kv.wgsl", crate::backward::source::KEY_VALUE),
        ("backward_q.wgsl", crate::backward::source::QUERY),
        ("row_scatter.wgsl", crate::backward::source::ROW_SCATTER),
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
    /// The fused kernel for short queries: a unit's rows in one workgroup (decoding on GPUs).
    FlashDecode,
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
    pub const ALL: [Shader; 19] = [
        Shader::Scores,
        Shader::Softmax,
        Shader::Pv,
        Shader::Flash,
        Shader::FlashRows,
        Shader::FlashDecode,
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
            Shader::FlashDecode => "flash_decode",
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
        // The shared files of the three scalar fused kernels, in order, before each one's own.
        const SCALAR_FUSED: [&str; 8] = [
            COMMON,
            LOGITS,
            SOFTMAX_RULES,
            FUSED_UNITS,
            ROW_LOADS,
            FUSED_IO,
            HALF_PACK,
            KV_LOADS,
        ];
        match self {
            Shader::Scores => [COMMON, LOGITS, QK_TILE, SCORES].concat(),
            Shader::Softmax => [COMMON, SOFTMAX_RULES, SOFTMAX].concat(),
            Shader::Pv => [COMMON, PV].concat(),
            Shader::Flash => [SCALAR_FUSED.concat(), FLASH.to_string()].concat(),
            Shader::FlashRows => [
                SCALAR_FUSED.concat(),
                ROW_CHUNKS.to_string(),
                FLASH_ROWS.to_string(),
            ]
            .concat(),
            Shader::FlashDecode => [SCALAR_FUSED.concat(), FLASH_DECODE.to_string()].concat(),
            Shader::Pack => [PACK, HALF_PACK].concat(),
            Shader::Merge => [COMMON, SOFTMAX_RULES, HALF_PACK, MERGE].concat(),
            Shader::Stream => STREAM.to_string(),
            Shader::Linear => LINEAR.to_string(),
            Shader::Lens => [COMMON, LOGITS, QK_TILE, SOFTMAX_RULES, LENS].concat(),
            Shader::FlashCoop => [
                "enable f16;\nenable wgpu_cooperative_matrix;\n",
                COMMON,
                LOGITS,
                SOFTMAX_RULES,
                FUSED_IO,
                HALF_PACK,
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
            Shader::Flash | Shader::FlashRows | Shader::FlashDecode | Shader::FlashCoop => &[
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

/// A built pipeline and its bind group layout.
pub struct Kernel {
    /// The module it runs (per-pass timings are summed per shader).
    pub shader: Shader,
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
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(&name),
        source: wgpu::ShaderSource::Wgsl(variant.source().into()),
    };
    // Every check wgpu offers stays on (bounds, integer division, ...) except the loop bound
    // naga adds to every loop (a 64-bit counter, its update and a break in every iteration, so
    // that an infinite loop cannot become undefined behaviour): work in every iteration of
    // every inner loop on a GPU, and on lavapipe 2-5% of the row kernel's compile (first call
    // 4,256,2,64 1247 -> 1178 ms best of 8, alternated, 2026-12-06; no run-time difference
    // there).
    // SAFETY: `force_loop_bounding: false` requires that no loop of these shaders is infinite.
    // Every loop in shaders/ is a `for` whose counter only its header moves, monotonically, to
    // a bound nothing in the loop changes: `+= step` with a step > 0 (a workgroup size, a tile
    // or a constant) up to a length or tile size, each far below the counter type's range
    // (lengths are bounded by buffer bindings, `Problem::validate` and the limits), or `>>= 1`
    // down to 0. `tests/shaders.rs` (`every_loop_moves_its_counter_towards_its_bound`) checks
    // that form on every loop of every module.
    let checks = wgpu::ShaderRuntimeChecks {
        force_loop_bounding: false,
        ..wgpu::ShaderRuntimeChecks::checked()
    };
    let module = unsafe { device.create_shader_module_trusted(desc, checks) };
    let entries: Vec<wgpu::BindGroupLayoutEntry> = variant
        .shader()
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
        shader: variant.shader(),
        pipeline,
        layout,
        name,
    })
}
