//! Recording the layer's passes: the projections (with the rotary table) and the buffers they
//! read and write.

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, TensorRef};

use crate::context::Engine;
use crate::error::Result;
use crate::kernels::Variant;

use super::{AttentionLayer, LinParams, TILE, padded_bytes};

impl AttentionLayer {
    /// Records `Y = X·Wᵀ + b` (with the rotary epilogue when `rope` is given) for `m` rows,
    /// scattering columns `[0, n_q)` to `outs[0]`, `[n_q, n_q + n_k)` to `outs[1]`, the rest
    /// to `outs[2]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_linear(
        &self,
        engine: &Engine,
        enc: &mut wgpu::CommandEncoder,
        x: (&wgpu::Buffer, DType),
        m: usize,
        w: (&wgpu::Buffer, DType),
        bias: Option<&wgpu::Buffer>,
        shape: [usize; 4], // n, k, n_q, n_k
        rope: Option<&wgpu::Buffer>,
        outs: [&wgpu::Buffer; 3],
    ) -> Result<()> {
        let [n, k, n_q, n_k] = shape;
        let lp = LinParams {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            n_q: n_q as u32,
            n_k: n_k as u32,
            head_dim: self.cfg.head_dim as u32,
            rot_half: match (rope, self.cfg.rope) {
                (Some(_), Some(r)) => (r.rotary_dim / 2) as u32,
                _ => 0,
            },
            flags: bias.is_some() as u32,
        };
        let dev = engine.device();
        let params = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("linear params"),
            contents: bytemuck::bytes_of(&lp),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let dummy = engine.scratch("unused", 4);
        let kernel = engine.cache.get(dev, &Variant::linear(x.1, w.1))?;
        let binds = [
            (0, &params),
            (1, x.0),
            (2, w.0),
            (3, bias.unwrap_or(&dummy)),
            (4, rope.unwrap_or(&dummy)),
            (5, outs[0]),
            (6, outs[1]),
            (7, outs[2]),
        ];
        let groups = (m as u64).div_ceil(TILE) * (n as u64).div_ceil(TILE);
        engine.dispatch(enc, &kernel, &binds, groups)
    }

    /// The rotary table of `positions` as a buffer (None without rotary embeddings).
    pub(super) fn rope_table(&self, engine: &Engine, positions: &[u32]) -> Option<wgpu::Buffer> {
        self.cfg.rope.map(|r| {
            let table = r.table(positions);
            engine
                .device()
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("rope table"),
                    contents: &padded_bytes(bytemuck::cast_slice(&table).to_vec()),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        })
    }

    pub(super) fn upload_x(&self, engine: &Engine, x: TensorRef<'_>) -> wgpu::Buffer {
        engine
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("layer x"),
                contents: &padded_bytes(x.as_bytes().to_vec()),
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    pub(super) fn poisoned(engine: &Engine, label: &str, n: usize) -> wgpu::Buffer {
        engine
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(&vec![f32::NAN; n.max(1)]),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_qkv(
        &self,
        engine: &Engine,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        x_dtype: DType,
        m: usize,
        rope: Option<&wgpu::Buffer>,
        outs: [&wgpu::Buffer; 3],
    ) -> Result<()> {
        let c = &self.cfg;
        self.encode_linear(
            engine,
            enc,
            (x, x_dtype),
            m,
            (&self.qkv, self.qkv_dtype),
            self.qkv_bias.as_ref(),
            [c.qkv_dim(), c.hidden, c.q_dim(), c.kv_dim()],
            rope,
            outs,
        )
    }

    pub(super) fn encode_out(
        &self,
        engine: &Engine,
        enc: &mut wgpu::CommandEncoder,
        o: &wgpu::Buffer,
        m: usize,
        y: &wgpu::Buffer,
    ) -> Result<()> {
        let c = &self.cfg;
        let dummy = engine.scratch("unused", 4);
        self.encode_linear(
            engine,
            enc,
            (o, DType::F32),
            m,
            (&self.wo, self.wo_dtype),
            self.bo.as_ref(),
            [c.hidden, c.q_dim(), c.hidden, 0],
            None,
            [y, &dummy, &dummy],
        )
    }
}
