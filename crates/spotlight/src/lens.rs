//! The attention lens: where a model looks, measured on the GPU without storing the map.
//!
//! [`Engine::lens`] runs the attention (any algorithm; the fused one by default) for O and the
//! LSE, then `shaders/lens.wgsl` recomputes each logit exactly and turns it into its probability
//! with the final LSE, accumulating per-row entropy and maximum weight, per-key received mass,
//! and, on request, the map of selected heads and rows of batch entry 0. The definitions are in
//! [`spotlight_reference::lens`].

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use wgpu::util::DeviceExt;

use spotlight_reference::{Inputs, Problem, Tensor};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::Variant;
use crate::options::{Algorithm, RunOptions};
use crate::params::Params;

/// What [`Engine::lens`] computes besides the statistics.
#[derive(Clone, Debug, Default)]
pub struct LensOptions {
    /// Algorithm of the attention pass that gives O and the LSE.
    pub algorithm: Algorithm,
    /// The attention map of these query heads and query rows of batch entry 0, computed in the
    /// same pass as the statistics (ask for every head at once: one call, one pass). Its
    /// `heads × rows × Lk` floats share one storage binding with the statistics; a request that
    /// does not fit is refused with [`Error::LimitExceeded`] before any GPU work.
    pub map: Option<(Range<usize>, Range<usize>)>,
}

/// The statistics of one problem (definitions in [`spotlight_reference::lens`]).
#[derive(Clone, Debug)]
pub struct LensStats {
    /// The attention output, as [`Engine::attention`] gives it.
    pub out: Tensor,
    /// `[B, Hq, Lq]`
    pub lse: Vec<f32>,
    /// `[B, Hq, Lq]`, nats; NaN where a row has no distribution.
    pub entropy: Vec<f32>,
    /// `[B, Hq, Lq]`; NaN where a row has no distribution.
    pub max_weight: Vec<f32>,
    /// `[B, Hq, Lk]`: Σ over query rows of P.
    pub received: Vec<f32>,
    /// `[heads, rows, Lk]` for the requested heads and rows of batch entry 0.
    pub map: Option<Vec<f32>>,
}

crate::params::uniform_block! {
/// The uniform block of `shaders/lens.wgsl` (checked against it by `tests/shaders.rs`).
pub(crate) struct LensParams {
    key_begin: u32,
    key_end: u32,
    first: u32,
    col_off: u32,
    map_off: u32,
    map_head0: u32,
    map_heads: u32,
    map_row0: u32,
    map_rows: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}
}

/// Passes (one attention pass and one statistics pass each) that [`Engine::lens`] has run in
/// this process: the evidence, for tests and `spotlight lens`'s `stats.json`, that the
/// statistics and the maps of every head come from one pass.
static PASSES: AtomicUsize = AtomicUsize::new(0);

/// How many lens passes [`Engine::lens`] has run in this process (see [`LensOptions::map`]).
pub fn lens_passes() -> usize {
    PASSES.load(Ordering::Relaxed)
}

impl Engine {
    /// Attention statistics of `p` on the GPU (see the module docs), and the maps of the heads
    /// and rows in `opts.map`, all from one pass: the inputs are uploaded once, the attention
    /// writes its LSE into a GPU buffer that the statistics kernel reads in place, and every
    /// head's statistics and map come from the same dispatches. Runs inside the engine's error
    /// scopes, so an allocation failure comes back as [`Error::OutOfMemory`].
    pub fn lens(&self, p: &Problem, inputs: &Inputs<'_>, opts: &LensOptions) -> Result<LensStats> {
        let _gl = self.exclusive();
        p.check_inputs(inputs)?;
        let (heads, rows) = opts.map.clone().unwrap_or((0..0, 0..0));
        if heads.end > p.q_heads
            || rows.end > p.q_len
            || heads.start > heads.end
            || rows.start > rows.end
        {
            return Err(spotlight_reference::ProblemError::BadValue {
                what: "lens map",
                detail: format!(
                    "heads {heads:?} and rows {rows:?} must lie within 0..{} and 0..{}",
                    p.q_heads, p.q_len
                ),
            }
            .into());
        }
        // The lens turns its exact f32 logits into probabilities with this LSE, so where `auto`
        // could pick the matrix units (whose f16 P leaves the LSE about 1e-3 off) it means flash.
        let run = RunOptions {
            algorithm: match opts.algorithm {
                Algorithm::Auto if self.coop_tiles(p).is_ok() => Algorithm::Flash,
                a => a,
            },
            lse: true,
            ..Default::default()
        };
        let run = self.resolve_coop(p, inputs.dtypes(), &run)?;
        let plan = self.plan(p, inputs.dtypes(), &run)?;
        let n_rows = p.lse_elems();
        let tiles_i = p.q_len.div_ceil(16);
        let too_big = || Error::LimitExceeded {
            what: "the lens statistics (and the requested map)".into(),
            bytes: u64::MAX,
            limit_name: "max_storage_buffer_binding_size",
            limit: self.capabilities().max_storage_binding,
        };
        let map_off = p
            .batch
            .checked_mul(p.q_heads)
            .and_then(|x| x.checked_mul(tiles_i))
            .and_then(|x| x.checked_mul(p.kv_len))
            .and_then(|x| x.checked_add(n_rows.checked_mul(2)?))
            .ok_or_else(too_big)?;
        let col_off = 2 * n_rows;
        let map_len = heads
            .len()
            .checked_mul(rows.len())
            .and_then(|x| x.checked_mul(p.kv_len))
            .ok_or_else(too_big)?;
        let words = map_off.checked_add(map_len).ok_or_else(too_big)?;
        let stats_bytes = (words as u64).saturating_mul(4);
        let caps = self.capabilities();
        if stats_bytes > caps.max_storage_binding || words > u32::MAX as usize {
            return Err(Error::LimitExceeded {
                what: "the lens statistics (and the requested map)".into(),
                bytes: stats_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: caps.max_storage_binding,
            });
        }
        self.scoped(|| {
            PASSES.fetch_add(1, Ordering::Relaxed);
            let r = self.upload_unchecked(p, inputs, &run);
            let attn = self.run_into(p, plan, &r.inputs(), &r.outputs(), None)?;
            let lse = attn.lse.clone().expect("lse was asked for");
            let lse_buf = r.lse.as_ref().expect("lse buffer was asked for");
            let dev = self.device();
            let stats = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("lens stats"),
                contents: bytemuck::cast_slice(&vec![f32::NAN; words]),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            });
            let kernel = self.cache.get(
                dev,
                &Variant::lens(r.dtypes[0], r.dtypes[1]).native_f16(self.native_f16()),
            )?;
            // Key ranges per dispatch: llvmpipe ends loops after ~65535 iterations per
            // invocation, and each key tile costs about D + 32 of them here.
            let chunk = match caps.max_key_tiles_per_workgroup {
                Some(_) => (16 * (30_000 / (p.head_dim + 32)).max(1)).max(16),
                None => p.kv_len.div_ceil(16) * 16,
            };
            let dummy = self.scratch("unused", 4);
            let gin = r.inputs();
            let mut enc = dev.create_command_encoder(&Default::default());
            let (params, aux) =
                self.params_and_aux(&mut enc, p, Params::new(p), &gin, None, false)?;
            let groups = (tiles_i * p.batch * p.q_heads) as u64;
            for (n, begin) in (0..p.kv_len).step_by(chunk).enumerate() {
                let lp = LensParams {
                    key_begin: begin as u32,
                    key_end: (begin + chunk).min(p.kv_len) as u32,
                    first: (n == 0) as u32,
                    col_off: col_off as u32,
                    map_off: map_off as u32,
                    map_head0: heads.start as u32,
                    map_heads: heads.len() as u32,
                    map_row0: rows.start as u32,
                    map_rows: rows.len() as u32,
                    pad0: 0,
                    pad1: 0,
                    pad2: 0,
                };
                let lp_buf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("lens params"),
                    contents: bytemuck::bytes_of(&lp),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
                let binds = [
                    (0, &params),
                    (1, &aux),
                    (2, gin.bias.unwrap_or(&dummy)),
                    (3, gin.mask.unwrap_or(&dummy)),
                    (4, gin.q),
                    (5, gin.k),
                    (6, lse_buf),
                    (7, &stats),
                    (8, &lp_buf),
                ];
                self.dispatch(&mut enc, &kernel, &binds, groups)?;
            }
            self.queue().submit([enc.finish()]);
            let all = self.read_f32(&stats, words)?;
            let mut entropy = vec![f32::NAN; n_rows];
            let mut max_weight = vec![f32::NAN; n_rows];
            for row in 0..n_rows {
                if lse[row].is_finite() {
                    entropy[row] = all[row];
                    max_weight[row] = (all[n_rows + row] - lse[row]).exp();
                }
            }
            let mut received = vec![0.0f32; p.batch * p.q_heads * p.kv_len];
            for bh in 0..p.batch * p.q_heads {
                for ti in 0..tiles_i {
                    let part = &all[col_off + (bh * tiles_i + ti) * p.kv_len..][..p.kv_len];
                    for (acc, x) in received[bh * p.kv_len..][..p.kv_len].iter_mut().zip(part) {
                        *acc += x;
                    }
                }
            }
            Ok(LensStats {
                out: attn.out,
                lse,
                entropy,
                max_weight,
                received,
                map: opts.map.is_some().then(|| all[map_off..].to_vec()),
            })
        })
    }
}
