//! The attention lens: where a model looks, measured on the GPU without storing the map.
//!
//! [`Engine::lens`] runs the attention (any algorithm; the fused one by default) for O and the
//! LSE, then `shaders/lens.wgsl` recomputes each logit exactly and turns it into its probability
//! with the final LSE, accumulating per-row entropy and maximum weight, per-key received mass,
//! and, on request, the map of selected heads and rows of batch entry 0. The definitions are in
//! [`spotlight_reference::lens`].

use std::ops::Range;

use wgpu::util::DeviceExt;

use spotlight_reference::{Inputs, Problem, Tensor};

use crate::attention::{Algorithm, RunOptions};
use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::Variant;
use crate::params::Params;

/// What [`Engine::lens`] computes besides the statistics.
#[derive(Clone, Debug, Default)]
pub struct LensOptions {
    /// Algorithm of the attention pass that gives O and the LSE.
    pub algorithm: Algorithm,
    /// The attention map of these query heads and query rows of batch entry 0.
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LensParams {
    key_begin: u32,
    key_end: u32,
    first: u32,
    col_off: u32,
    map_off: u32,
    map_head0: u32,
    map_heads: u32,
    map_row0: u32,
    map_rows: u32,
    pad: [u32; 3],
}

impl Engine {
    /// Attention statistics of `p` on the GPU (see the module docs).
    pub fn lens(&self, p: &Problem, inputs: &Inputs<'_>, opts: &LensOptions) -> Result<LensStats> {
        let _gl = self.exclusive();
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
        let attn = self.attention(p, inputs, &run)?;
        let lse = attn.lse.clone().expect("lse was asked for");
        let r = self.upload(p, inputs, &RunOptions::default())?;
        let n_rows = p.lse_elems();
        let tiles_i = p.q_len.div_ceil(16);
        let col_off = 2 * n_rows;
        let map_off = col_off + p.batch * p.q_heads * tiles_i * p.kv_len;
        let map_len = heads.len() * rows.len() * p.kv_len;
        let stats_bytes = (map_off + map_len) as u64 * 4;
        let caps = self.capabilities();
        if stats_bytes > caps.max_storage_binding {
            return Err(Error::LimitExceeded {
                what: "the lens statistics (and the requested map)".into(),
                bytes: stats_bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: caps.max_storage_binding,
            });
        }
        let dev = self.device();
        let lse_buf = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lens lse"),
            contents: bytemuck::cast_slice(&lse),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let stats = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("lens stats"),
            contents: bytemuck::cast_slice(&vec![f32::NAN; map_off + map_len]),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        });
        let kernel = self.cache.get(
            dev,
            &Variant::lens(r.dtypes[0], r.dtypes[1]).native_f16(self.native_f16()),
        )?;
        // Key ranges per dispatch: llvmpipe ends loops after ~65535 iterations per invocation,
        // and each key tile costs about D + 32 of them here.
        let chunk = match caps.max_key_tiles_per_workgroup {
            Some(_) => (16 * (30_000 / (p.head_dim + 32)).max(1)).max(16),
            None => p.kv_len.div_ceil(16) * 16,
        };
        let dummy = self.scratch("unused", 4);
        let gin = r.inputs();
        let mut enc = dev.create_command_encoder(&Default::default());
        let (params, aux) = self.params_and_aux(&mut enc, p, Params::new(p), &gin, None);
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
                pad: [0; 3],
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
                (6, &lse_buf),
                (7, &stats),
                (8, &lp_buf),
            ];
            self.dispatch(&mut enc, &kernel, &binds, groups)?;
        }
        self.queue().submit([enc.finish()]);
        let all = self.read_f32(&stats, map_off + map_len)?;
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
    }
}
