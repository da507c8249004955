//! Recording the backward: its scratch buffers and the four passes in one encoder.

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Problem};

use crate::context::Engine;
use crate::error::Result;
use crate::kernels::Variant;
use crate::options::GpuInputs;
use crate::params::Params;
use crate::plan::plain_logits;

use super::plan::BackwardPlan;
use super::{GpuForward, GpuGradients};
use crate::record::padded;

impl Engine {
    pub(super) fn storage_scratch(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded(bytes),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    pub(super) fn uniform_words(&self, label: &str, words: [u32; 4]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_backward(
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
                .plain_logits(plain_logits(p))
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
                .plain_logits(plain_logits(p))
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
