//! Merging partial results over disjoint key sets on the GPU (the exact LSE merge).

use wgpu::util::DeviceExt;

use spotlight_reference::Problem;

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::Variant;
use crate::params::Params;

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
        let kernel = self
            .cache
            .get(dev, &Variant::merge(spotlight_reference::DType::F32))?;
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
