//! What the engine builds: one typed configuration per kernel family ([`Config`]), which yields
//! the override constants, the name that labels the GPU objects, and the text rewrites of the
//! module source. The pipeline cache is keyed by the [`Variant`] (the configuration plus the
//! native-f16 choice), never by strings. (About 500 lines: every kernel family's constants and
//! rewrites are one `match` each, so a new arm shows everything it must say in one file.)

use spotlight_reference::DType;

use super::marked::{expand_marked, unroll_marked};
use super::{CoopTiles, FlashLayout, FlashTiles, Shader, dtype_code};
use crate::backward::BackwardConfig;

/// The configuration of one kernel variant, one arm per kernel family, carrying exactly the
/// values its override constants and text rewrites need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Config {
    /// Three-pass logits (`scores.wgsl`).
    Scores { q: DType, k: DType },
    /// Three-pass softmax and LSE (`softmax.wgsl`).
    Softmax,
    /// Three-pass P·V (`pv.wgsl`).
    Pv { v: DType },
    /// The fused scalar kernels (`flash.wgsl`, `flash_rows.wgsl`: `tiles.layout` picks).
    Flash(FlashConfig),
    /// The fused kernel on matrix units (`flash_coop.wgsl`).
    FlashCoop(CoopConfig),
    /// The LSE merge of partial results (`merge.wgsl`), writing O in `out`.
    Merge { out: DType },
    /// The attention lens (`lens.wgsl`).
    Lens { q: DType, k: DType },
    /// The layer's projection (`linear.wgsl`).
    Linear { x: DType, w: DType },
    /// The streaming-read yardstick (`stream.wgsl`).
    Stream,
    /// f32 → storage dtype packing (`pack.wgsl`).
    Pack { out: DType },
    /// A pass of the backward (see `crate::backward`).
    Backward(BackwardConfig),
}

/// The fused scalar kernels' configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// Storage dtypes of Q, K, V.
    pub dtypes: [DType; 3],
    /// Head dims of Q/K and of V.
    pub d: u32,
    pub dv: u32,
    pub tiles: FlashTiles,
    /// All query heads of a key/value group in one workgroup (decoding; see `flash.wgsl`).
    pub pack_gqa: bool,
    /// K/V rows read through a page table (the KV cache).
    pub paged: bool,
    /// Row reductions through subgroup operations (tiled and decode layouts).
    pub subgroup_rows: bool,
    /// K and V read four elements per load (callers check that every row is 4-aligned).
    pub vec4_kv: bool,
    /// The problem has no mask, bias, ALiBi or soft cap: the row kernel compiles without its
    /// general per-logit path (row layout only; see `flash_rows.wgsl`).
    pub plain_logits: bool,
    /// The kernel writes O in this half dtype itself, two elements per word (any layout; runs
    /// without key chunks, Dv even; `None`: O in f32).
    pub out_half: Option<DType>,
    /// P·V skips its zero-weight selects in steps whose V is finite, behind a uniform branch
    /// (row layout only; `FINITE_V_BRANCH` in `flash_rows.wgsl`, [`crate::Engine::finite_v_branch`]).
    pub finite_v_branch: bool,
}

/// The matrix-unit kernel's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    pub dtypes: [DType; 3],
    pub d: u32,
    pub dv: u32,
    pub tiles: CoopTiles,
    /// O written in this half dtype by the kernel itself, as [`FlashConfig::out_half`].
    pub out_half: Option<DType>,
}

/// A kernel variant: its configuration, and whether f16 tensors are read natively.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub config: Config,
    /// Read f16 tensors as `array<f16>` (needs `SHADER_F16`) instead of unpacking u32 words.
    /// The one element-type substitution in the kernels: it changes a type, which an
    /// `override` cannot.
    pub native_f16: bool,
}

/// The three attention tensors' override names, with the tensor each one types.
const QKV: [(&str, &str); 3] = [("Q_DT", "q"), ("K_DT", "k"), ("V_DT", "v")];

fn qkv_constants(dtypes: [DType; 3]) -> [(&'static str, u32); 3] {
    [0, 1, 2].map(|i| (QKV[i].0, dtype_code(dtypes[i])))
}

impl From<Config> for Variant {
    fn from(config: Config) -> Self {
        Variant {
            config,
            native_f16: false,
        }
    }
}

impl Variant {
    pub fn scores(q: DType, k: DType) -> Self {
        Config::Scores { q, k }.into()
    }

    pub fn softmax() -> Self {
        Config::Softmax.into()
    }

    pub fn pv(v: DType) -> Self {
        Config::Pv { v }.into()
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
        Config::Flash(FlashConfig {
            dtypes,
            d,
            dv,
            tiles,
            pack_gqa,
            paged,
            subgroup_rows: false,
            vec4_kv: false,
            plain_logits: false,
            out_half: None,
            finite_v_branch: false,
        })
        .into()
    }

    /// The LSE merge of split-key parts, writing O in `out` (a half dtype only where Dv is even:
    /// `merge.wgsl` writes two halves per word).
    pub fn merge(out: DType) -> Self {
        Config::Merge { out }.into()
    }

    /// The cooperative-matrix kernel with its tiles (matrix edge, subgroup size, subgroups per
    /// workgroup, keys per tile: [`CoopTiles`]).
    pub fn flash_coop(dtypes: [DType; 3], d: u32, dv: u32, tiles: CoopTiles) -> Self {
        Config::FlashCoop(CoopConfig {
            dtypes,
            d,
            dv,
            tiles,
            out_half: None,
        })
        .into()
    }

    pub fn lens(q: DType, k: DType) -> Self {
        Config::Lens { q, k }.into()
    }

    /// The layer's projection `X·Wᵀ + b` (X and W in any storage dtype, read packed).
    pub fn linear(x: DType, w: DType) -> Self {
        Config::Linear { x, w }.into()
    }

    pub fn stream() -> Self {
        Config::Stream.into()
    }

    pub fn pack(out: DType) -> Self {
        Config::Pack { out }.into()
    }

    /// The module this variant compiles.
    pub fn shader(&self) -> Shader {
        match self.config {
            Config::Scores { .. } => Shader::Scores,
            Config::Softmax => Shader::Softmax,
            Config::Pv { .. } => Shader::Pv,
            Config::Flash(f) => match f.tiles.layout {
                FlashLayout::Rows => Shader::FlashRows,
                FlashLayout::Decode => Shader::FlashDecode,
                FlashLayout::Tiled => Shader::Flash,
            },
            Config::FlashCoop(_) => Shader::FlashCoop,
            Config::Merge { .. } => Shader::Merge,
            Config::Lens { .. } => Shader::Lens,
            Config::Linear { .. } => Shader::Linear,
            Config::Stream => Shader::Stream,
            Config::Pack { .. } => Shader::Pack,
            Config::Backward(b) => Shader::Backward(b.pass()),
        }
    }

    /// The override constants, in a fixed order (the name lists them in this order).
    pub fn constants(&self) -> Vec<(&'static str, u32)> {
        match self.config {
            Config::Scores { q, k } | Config::Lens { q, k } => {
                vec![("Q_DT", dtype_code(q)), ("K_DT", dtype_code(k))]
            }
            Config::Softmax => vec![("WG", 128)],
            Config::Pv { v } => vec![("V_DT", dtype_code(v))],
            Config::Merge { out } => vec![("WG", 128), ("OUT_DT", dtype_code(out))],
            Config::Linear { x, w } => vec![("X_DT", dtype_code(x)), ("W_DT", dtype_code(w))],
            Config::Stream => vec![],
            Config::Pack { out } => vec![("OUT_DT", dtype_code(out))],
            Config::Flash(f) => {
                let mut c = qkv_constants(f.dtypes).to_vec();
                c.extend([("HEAD_DIM", f.d), ("V_DIM", f.dv)]);
                if f.tiles.layout != FlashLayout::Tiled {
                    c.extend([
                        ("WG", f.tiles.tpr),
                        ("ROWS", f.tiles.bq),
                        ("PACK_GQA", f.pack_gqa as u32),
                        ("PAGED", f.paged as u32),
                        ("VEC4_KV", f.vec4_kv as u32),
                    ]);
                    if f.tiles.layout == FlashLayout::Decode {
                        c.push(("SUBGROUP_ROWS", f.subgroup_rows as u32));
                    }
                    if f.tiles.layout == FlashLayout::Rows {
                        c.push(("PLAIN_LOGITS", f.plain_logits as u32));
                        c.push(("Q_STAGED", f.tiles.rows_q_staged(f.d) as u32));
                        c.push(("PV_BY_KEY", f.tiles.rows_pv_by_key(f.dv) as u32));
                        c.push(("FINITE_V_BRANCH", f.finite_v_branch as u32));
                    }
                } else {
                    c.extend([
                        ("BQ", f.tiles.bq),
                        ("BK", f.tiles.bk),
                        ("TPR", f.tiles.tpr),
                        ("PACK_GQA", f.pack_gqa as u32),
                        ("PAGED", f.paged as u32),
                        ("SUBGROUP_ROWS", f.subgroup_rows as u32),
                        ("VEC4_KV", f.vec4_kv as u32),
                    ]);
                }
                if let Some(out) = f.out_half {
                    c.push(("OUT_DT", dtype_code(out)));
                }
                c
            }
            Config::FlashCoop(c) => {
                let mut out = qkv_constants(c.dtypes).to_vec();
                out.extend([
                    ("HEAD_DIM", c.d),
                    ("V_DIM", c.dv),
                    ("WG", c.tiles.wg),
                    ("NS", c.tiles.ns),
                    ("BK", c.tiles.bk),
                    ("EDGE", c.tiles.edge),
                    ("STAGE", c.tiles.stage_len(c.d, c.dv)),
                ]);
                if let Some(o) = c.out_half {
                    out.push(("OUT_DT", dtype_code(o)));
                }
                out
            }
            Config::Backward(b) => b.constants(),
        }
    }

    /// Tensors (`q`, `k`, `v`) stored as f16 that the kernel reads element by element (wide
    /// loads read packed words: no native f16 binding for them).
    fn f16_tensors(&self) -> Vec<&'static str> {
        let (dtypes, wide): ([Option<DType>; 3], Vec<&str>) = match self.config {
            Config::Scores { q, k } | Config::Lens { q, k } => ([Some(q), Some(k), None], vec![]),
            Config::Pv { v } => ([None, None, Some(v)], vec![]),
            Config::Flash(f) => (f.dtypes.map(Some), self.wide_tensors()),
            Config::FlashCoop(c) => (c.dtypes.map(Some), vec![]),
            Config::Backward(b) => (b.qkv_dtypes(), self.wide_tensors()),
            _ => ([None; 3], vec![]),
        };
        (0..3)
            .filter(|&i| dtypes[i] == Some(DType::F16) && !wide.contains(&QKV[i].1))
            .map(|i| QKV[i].1)
            .collect()
    }

    /// Tensors this variant reads four elements per load.
    fn wide_tensors(&self) -> Vec<&'static str> {
        self.wide().iter().map(|w| w.0).collect()
    }

    /// The streamed tensors read four elements per load (binding, dtype, dim name): K and V of
    /// the fused kernels, a row kernel's streamed tensors, where the variant's `vec4_kv` is on.
    fn wide(&self) -> Vec<(&'static str, DType, &'static str)> {
        match self.config {
            Config::Flash(f) if f.vec4_kv => {
                vec![("k", f.dtypes[1], "HEAD_DIM"), ("v", f.dtypes[2], "V_DIM")]
            }
            _ => self
                .row_kernel()
                .filter(|spec| spec.vec4)
                .map(|spec| spec.wide)
                .unwrap_or_default(),
        }
    }

    /// Row reductions of the fused kernel through subgroup operations: the tiled layout's row
    /// max and sum by shuffles (callers check that every subgroup size is a multiple of the
    /// tiles' `tpr`), the decode layout's tile max by subgroupMax (callers check that the
    /// device has subgroups). No effect on other kernels.
    pub fn subgroup_rows(mut self, on: bool) -> Self {
        if let Config::Flash(f) = &mut self.config
            && matches!(f.tiles.layout, FlashLayout::Tiled | FlashLayout::Decode)
        {
            f.subgroup_rows = on;
        }
        self
    }

    /// The fused scalar kernels reading K and V (the backward's row kernels, their streamed
    /// tensors) four elements per load: only where every such row starts at a multiple of 4
    /// elements and the head dims are multiples of 4 (callers check). No effect on other
    /// kernels.
    pub fn vec4_kv(mut self, on: bool) -> Self {
        match &mut self.config {
            Config::Flash(f) => f.vec4_kv = on,
            Config::Backward(b) => b.set_vec4_kv(on),
            _ => {}
        }
        self
    }

    /// The row kernels (forward, and the backward's key/value and query passes) compiled for
    /// problems without mask, bias, ALiBi or soft cap, which the caller guarantees
    /// (`PLAIN_LOGITS` in `flash_rows.wgsl`, `backward_kv_rows.wgsl`, `backward_q_rows.wgsl`).
    /// No effect on other kernels.
    pub fn plain_logits(mut self, on: bool) -> Self {
        match &mut self.config {
            Config::Flash(f) if f.tiles.layout == FlashLayout::Rows => f.plain_logits = on,
            Config::Backward(b) => b.set_plain_logits(on),
            _ => {}
        }
        self
    }

    /// The row kernel's P·V skips its zero-weight selects where a step's V is finite, behind a
    /// uniform branch (`flash_rows.wgsl`'s `FINITE_V_BRANCH`). No effect on other kernels.
    pub fn finite_v_branch(mut self, on: bool) -> Self {
        if let Config::Flash(f) = &mut self.config
            && f.tiles.layout == FlashLayout::Rows
        {
            f.finite_v_branch = on;
        }
        self
    }

    /// The fused kernel (scalar, any layout: tiled, rows, decode; or on matrix units) writing O
    /// in the half dtype `out` itself, two elements per u32 word (`half_out.wgsl`): only for
    /// runs without key chunks (the partial outputs stay f32) and an even Dv (callers check
    /// both). `None` or another kernel: unchanged.
    pub fn out_half(mut self, out: Option<DType>) -> Self {
        let out = out.filter(|d| *d != DType::F32);
        match &mut self.config {
            Config::Flash(f) => f.out_half = out,
            Config::FlashCoop(c) => c.out_half = out,
            _ => {}
        }
        self
    }

    fn writes_half(&self) -> bool {
        match self.config {
            Config::Flash(f) => f.out_half.is_some(),
            Config::FlashCoop(c) => c.out_half.is_some(),
            _ => false,
        }
    }

    fn uses_subgroups(&self) -> bool {
        matches!(self.config, Config::Flash(f) if f.subgroup_rows)
    }

    /// What the row-kernel rewrite does to this variant (`None`: not a row kernel).
    fn row_kernel(&self) -> Option<RowKernel> {
        match self.config {
            Config::Flash(f) if f.tiles.layout != FlashLayout::Tiled => {
                let lanes = f.tiles.tpr;
                // The decode kernel's threads own one output column each: no column array.
                let registers = match f.tiles.layout {
                    FlashLayout::Rows => {
                        // Q in registers, or staged in workgroup memory (flash_rows.wgsl).
                        let (nq, staged) = (cols(f.d, lanes), f.tiles.rows_q_staged(f.d));
                        let qs = if staged { f.tiles.bq * nq * lanes } else { 1 };
                        vec![
                            ("NV8", "// register columns", cols(f.dv, lanes)),
                            ("NQ8", "// register columns q", if staged { 1 } else { nq }),
                            ("QS", "// staged q", qs),
                        ]
                    }
                    _ => vec![],
                };
                Some(RowKernel {
                    lanes,
                    rows: f.tiles.bq,
                    registers,
                    wide: vec![("k", f.dtypes[1], "HEAD_DIM"), ("v", f.dtypes[2], "V_DIM")],
                    vec4: f.vec4_kv,
                })
            }
            Config::Backward(b) => b.row_kernel(),
            _ => None,
        }
    }

    /// Reads f16 tensors natively when `native` and the variant has any (else unchanged).
    pub fn native_f16(mut self, native: bool) -> Self {
        self.native_f16 = native && !self.f16_tensors().is_empty();
        self
    }

    /// The module source of this variant: the shader's, with its per-variant text rewrites
    /// (matrix edge, numbered fragments, register arrays, wide and native-f16 loads, subgroup
    /// reductions).
    pub fn source(&self) -> String {
        let shader = self.shader();
        let mut src = shader.template();
        if let Config::FlashCoop(c) = self.config {
            if c.tiles.edge == 8 {
                // A cooperative-matrix type cannot be overridden: the 8x8 variant is spelled so.
                src = src.replace("coop_mat16x16", "coop_mat8x8");
            }
            // One line per Q fragment and O accumulator (see flash_coop.wgsl).
            let e = c.tiles.edge.max(1);
            src = expand_marked(
                &src,
                &[("DQ", c.d / e), ("DO", c.dv / e), ("KQ", c.tiles.bk / e)],
            );
        }
        if let Config::Flash(f) = self.config
            && f.tiles.layout == FlashLayout::Tiled
        {
            // The accumulator array sized for this variant (see its line in flash.wgsl).
            let nc = cols(f.dv, f.tiles.tpr);
            let tag = "// register columns";
            let line = src
                .lines()
                .find(|l| l.starts_with("const NC: u32 = ") && l.ends_with(tag))
                .expect("flash.wgsl declares `const NC`")
                .to_string();
            src = src.replace(&line, &format!("const NC: u32 = {nc}u; {tag}"));
            if f.vec4_kv {
                src = wide_loads(src, shader.name(), &self.wide());
            }
        }
        if self.writes_half() {
            // O as half words: the binding and half_out.wgsl's store in place of the f32 one.
            let binding = "@group(0) @binding(7) var<storage, read_write> out: array<f32>;";
            assert_eq!(
                src.matches(binding).count(),
                1,
                "{}: no f32 O",
                shader.name()
            );
            src = src.replace(binding, &binding.replace("array<f32>", "array<u32>"));
            let head = "fn store_o(e: u32, col: u32, o: vec4<f32>) {";
            let start = src.find(head).expect("fused_io.wgsl defines store_o");
            let end = start + src[start..].find("\n}\n").expect("store_o ends") + 3;
            src.replace_range(start..end, super::source::HALF_OUT);
        }
        if let Some(spec) = self.row_kernel() {
            src = row_kernel_source(src, shader.name(), &spec);
        }
        if self.uses_subgroups() && shader == Shader::FlashDecode {
            // The tile max of flash_decode.wgsl: the stub and the ids become subgroup builtins.
            let stub = "fn sg_max(x: f32) -> f32 { return x; } // subgroup sg_max";
            let ids = "    let sg_lane = 0u; let sg_id = 0u; let n_sg = 1u; let sg_size = 1u; // subgroup ids\n";
            let entry = "    @builtin(local_invocation_index) lid: u32,\n";
            for text in [stub, ids, entry] {
                assert!(
                    src.matches(text).count() == 1,
                    "flash_decode: no single `{text}`"
                );
            }
            src = src
                .replace(stub, "fn sg_max(x: f32) -> f32 { return subgroupMax(x); }")
                .replace(ids, "")
                .replace(
                    entry,
                    &format!(
                        "{entry}    @builtin(subgroup_invocation_id) sg_lane: u32,\n    @builtin(subgroup_id) sg_id: u32,\n    @builtin(num_subgroups) n_sg: u32,\n    @builtin(subgroup_size) sg_size: u32,\n"
                    ),
                );
        } else if self.uses_subgroups() {
            for (name, op) in [
                ("row_max", "y = max(y, subgroupShuffleXor(y, o));"),
                ("row_add", "y += subgroupShuffleXor(y, o);"),
            ] {
                let stub = format!(
                    "fn {name}(x: vec4<f32>) -> vec4<f32> {{ return x; }} // subgroup {name}"
                );
                assert!(src.contains(&stub), "{}: no {name} stub", shader.name());
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
                shader.name()
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

    /// The variant's name: the shader's, then each override constant (dtypes as `q-f16`, flags
    /// only when on), e.g. `flash_q-f32_k-f16_v-f16_d64_dv64_bq32_bk32_tpr8`. It labels the
    /// GPU objects and pipeline errors.
    pub fn name(&self) -> String {
        let mut name = self.shader().name().to_string();
        for (k, v) in self.constants() {
            let part = match k {
                "Q_DT" | "K_DT" | "V_DT" | "O_DT" | "DO_DT" | "OUT_DT" | "X_DT" | "W_DT" => {
                    let dt = ["f32", "f16", "bf16"][v as usize % 3];
                    format!("{}-{dt}", k.trim_end_matches("_DT").to_ascii_lowercase())
                }
                "PACK_GQA" | "PAGED" | "SUBGROUP_ROWS" | "VEC4_KV" | "WRITE_DS"
                | "PLAIN_LOGITS" | "FINITE_V_BRANCH"
                    if v == 0 =>
                {
                    continue;
                }
                // Functions of the head dims and lanes already in the name.
                "Q_STAGED" | "PV_BY_KEY" => continue,
                "VEC4_KV" => "vec4".to_string(),
                "PACK_GQA" => "gqa".to_string(),
                "PAGED" => "paged".to_string(),
                "SUBGROUP_ROWS" => "sg".to_string(),
                "PLAIN_LOGITS" => "plain".to_string(),
                "FINITE_V_BRANCH" => "fvb".to_string(),
                "WRITE_DS" => "ds".to_string(),
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
        self.constants()
            .into_iter()
            .map(|(k, v)| (k, v as f64))
            .collect()
    }
}

/// Register columns of `dim` values spread over `lanes` threads, four per vec4.
pub(crate) fn cols(dim: u32, lanes: u32) -> u32 {
    dim.div_ceil(4).div_ceil(lanes.max(1)).max(1)
}

/// The text rewrite of a row kernel (`flash_rows.wgsl`, `backward_q_rows.wgsl`,
/// `backward_kv_rows.wgsl`, `backward_dq_rows.wgsl`; see the first's header for why).
pub(crate) struct RowKernel {
    /// Lanes of the subgroup (the workgroup).
    pub lanes: u32,
    /// Rows (query rows or keys) one workgroup owns: the kernel's `const R`.
    pub rows: u32,
    /// Register arrays sized per variant: the `const NAME: u32 = ..; TAG` line and its value.
    pub registers: Vec<(&'static str, &'static str, u32)>,
    /// The tensors each lane streams: (binding, storage dtype, the WGSL name of its dim).
    pub wide: Vec<(&'static str, DType, &'static str)>,
    /// Read the streamed tensors four elements per load.
    pub vec4: bool,
}

/// Sizes the register arrays of a row kernel, rewrites its streamed tensors' loads as wide loads
/// where the variant asks (`vec4`), then unrolls its marked loops.
fn row_kernel_source(mut src: String, name: &str, spec: &RowKernel) -> String {
    let registers = [("R", "// rows per workgroup", spec.rows)];
    for &(reg, tag, value) in registers.iter().chain(&spec.registers) {
        let line = src
            .lines()
            .find(|l| l.starts_with(&format!("const {reg}: u32 = ")) && l.ends_with(tag))
            .unwrap_or_else(|| panic!("{name}: no `const {reg}` line"))
            .to_string();
        src = src.replace(&line, &format!("const {reg}: u32 = {value}u; {tag}"));
    }
    if spec.vec4 {
        src = wide_loads(src, name, &spec.wide);
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
        ("R - 1u", r - 1),
        ("KBL", kbl),
        ("R * KBL", r * kbl),
        ("WG", spec.lanes),
        ("NVW", (r * kbl).div_ceil(32)),
    ];
    bounds.extend(spec.registers.iter().map(|&(reg, _, v)| (reg, v)));
    bounds.extend(products.iter().map(|(k, v)| (k.as_str(), *v)));
    unroll_marked(&src, &bounds)
}

/// Rewrites the loads of the streamed tensors `wide` (binding, storage dtype, the WGSL name of
/// its dim) as one wide load of four elements each: the binding becomes vec4 (f32) or vec2
/// (packed f16/bf16) words and the kernel's `fn t4(..) // load t4` line reads one word (see
/// kv_loads.wgsl). Only where every row starts at a multiple of 4 elements (callers check).
fn wide_loads(mut src: String, name: &str, wide: &[(&'static str, DType, &'static str)]) -> String {
    for &(t, dtype, dim) in wide {
        let (word, wide) = if dtype == DType::F32 {
            ("vec4<u32>", format!("wide_f32({t}[(base + d0) / 4u])"))
        } else {
            let dt = dtype_code(dtype);
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
    src
}
