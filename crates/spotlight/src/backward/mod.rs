//! The backward pass: gradients of attention on the GPU, FlashAttention-2's algorithm without
//! atomics.
//!
//! Four passes, recorded in one encoder:
//! 1. `backward_pre.wgsl`: per query row, `D_i = rowsum(dO ∘ O)` (and the row's LSE, −inf for
//!    padded rows), appended to the aux buffer the other passes read;
//! 2. `backward_kv.wgsl`: one workgroup per tile of keys of one (batch, key/value head), looping
//!    over the query tiles (and the query heads of the group) that can see its keys; it
//!    recomputes `P = exp(s − LSE)` from Q, K and the forward's LSE (no `Lq×Lk` buffer) and
//!    accumulates dK and dV in registers;
//! 3. `backward_q.wgsl`: one workgroup per tile of query rows, looping over the key tiles its rows
//!    can see, accumulating dQ in registers (a second pass instead of atomics, so every element
//!    is written by one thread in a fixed order: bit-for-bit deterministic); with a bias it also
//!    writes the logit gradient dS;
//! 4. `backward_reduce.wgsl` (bias only): dBias = dS summed over the bias's broadcast dims.
//!
//! The semantics (including fully masked rows, padding and NaN) are those of
//! [`spotlight_reference::attention_backward`]; see the README's "Semantics of gradients".
//!
//! Modules: `kernels` (the WGSL passes, their tiles and typed variant configurations), `plan`
//! (what one problem runs on this adapter, checked before GPU work), `record` (scratch buffers
//! and the passes in one encoder); the entry points and their checks are here.

mod kernels;
mod plan;
mod record;

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Inputs, Problem, TensorRef};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::FlashLayout;
use crate::options::{GpuInputs, Output};

use crate::attention::{check_caller_buffers, check_presence};
use crate::record::padded;
pub use kernels::{BackwardConfig, BackwardPass, BackwardTiles, source};

/// How to run the backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackwardOptions {
    /// Split each pass's loop over query tiles (key/value pass) or key tiles (query pass) into
    /// dispatches of at most this many tiles, each adding to the previous ones in a fixed order.
    /// The adapter bounds it where loops are bounded (llvmpipe); `None`: the adapter decides.
    pub max_tiles_per_dispatch: Option<u32>,
    /// Force the tiled or the row kernels (`None`: the row kernels on CPU adapters with
    /// subgroups of one fixed size, as the forward chooses; the tiled ones elsewhere).
    pub layout: Option<FlashLayout>,
    /// Row kernels: keys or query rows per workgroup, 8 or 16 (`None`: by the problem's size,
    /// [`FlashTiles::backward_row_count`](crate::kernels::FlashTiles::backward_row_count)). The tiled kernels ignore it; other values are refused.
    pub rows_per_workgroup: Option<u32>,
    /// Row kernels without a bias: the key/value pass stores the logit gradients
    /// `[B, Hq, Lq, ceil(Lk/4)·4]` (f32, beside dK and dV in one binding) and dQ is their product
    /// with K (`true`), or the query pass recomputes them (`false`; needs no O(L²) memory, does
    /// three products per logit instead of one). `None`: stored when they fit
    /// [`DQ_FROM_GRADIENTS_BYTES`] and the adapter's binding and buffer limits. `Some(true)`
    /// where they cannot be stored is refused.
    pub dq_from_gradients: Option<bool>,
}

/// The most bytes of stored logit gradients the backward allocates on its own
/// ([`BackwardOptions::dq_from_gradients`]).
pub const DQ_FROM_GRADIENTS_BYTES: u64 = 256 << 20;

/// Gradients returned by [`Engine::attention_backward`], f32, each in its input's layout.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// `[B, Lq, Hq, D]`, layout of Q.
    pub dq: Vec<f32>,
    /// `[B, Lk, Hkv, D]`, layout of K.
    pub dk: Vec<f32>,
    /// `[B, Lk, Hkv, Dv]`, layout of V.
    pub dv: Vec<f32>,
    /// `[B|1, Hq|1, Lq, Lk]` like the bias, when the problem has one.
    pub dbias: Option<Vec<f32>>,
}

/// The forward's results on the GPU: O (`out_dtype` elements in the problem's layout) and its
/// LSE `[B, Hq, Lq]` (f32), as [`Engine::attention_on_buffers`] writes them.
#[derive(Clone, Copy, Debug)]
pub struct GpuForward<'a> {
    pub out: &'a wgpu::Buffer,
    pub out_dtype: DType,
    pub lse: &'a wgpu::Buffer,
}

/// Gradient buffers on the GPU (f32, `COPY_DST`): dQ, dK, dV in the layouts of Q, K, V, and
/// dBias (`[B|1, Hq|1, Lq, Lk]`) exactly when the problem has a bias.
#[derive(Clone, Copy, Debug)]
pub struct GpuGradients<'a> {
    pub dq: &'a wgpu::Buffer,
    pub dk: &'a wgpu::Buffer,
    pub dv: &'a wgpu::Buffer,
    pub dbias: Option<&'a wgpu::Buffer>,
}

impl Engine {
    /// Gradients of attention on host data: given the problem, its inputs, the forward's result
    /// (with its LSE: run the forward with `RunOptions { lse: true, .. }`) and `dO = ∂L/∂O`
    /// (`[B, Lq, Hq, Dv]` in the problem's layout, any storage dtype), returns dQ, dK, dV and,
    /// with a bias, dBias, in f32. Everything is checked before GPU work; outputs are filled with
    /// NaN first, so an element a kernel failed to write cannot look valid.
    pub fn attention_backward(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        forward: &Output,
        d_out: TensorRef<'_>,
        opts: &BackwardOptions,
    ) -> Result<Gradients> {
        let _gl = self.exclusive();
        let lse =
            forward.lse.as_deref().ok_or_else(|| {
                Error::BackwardUnsupported {
            reason:
                "the forward result has no LSE: run the forward with RunOptions { lse: true, .. }"
                    .into(),
        }
            })?;
        spotlight_reference::check_backward_inputs(
            p,
            inputs,
            forward.out.len(),
            lse.len(),
            d_out.len(),
        )?;
        let plan = self.backward_plan(p, opts)?;
        self.scoped(|| {
            self.check_health()?;
            let dev = &self.device;
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            let upload = |label: &str, bytes: &[u8]| {
                let mut data = bytes.to_vec();
                data.resize(padded(bytes.len() as u64) as usize, 0);
                dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &data,
                    usage,
                })
            };
            let q = upload("q", inputs.q.as_bytes());
            let k = upload("k", inputs.k.as_bytes());
            let v = upload("v", inputs.v.as_bytes());
            let bias = inputs.bias.map(|b| upload("bias", bytemuck::cast_slice(b)));
            let mask = inputs.mask.map(|m| upload("mask", m));
            let slopes = inputs
                .alibi_slopes
                .map(|s| upload("alibi_slopes", bytemuck::cast_slice(s)));
            let q_lens = inputs
                .q_seqlens
                .map(|s| upload("q_seqlens", bytemuck::cast_slice(s)));
            let kv_lens = inputs
                .kv_seqlens
                .map(|s| upload("kv_seqlens", bytemuck::cast_slice(s)));
            let out = upload("forward out", forward.out.as_ref().as_bytes());
            let lse_buf = upload("forward lse", bytemuck::cast_slice(lse));
            let dout = upload("d_out", d_out.as_bytes());
            let poisoned =
                |label: &str, n: usize| upload(label, bytemuck::cast_slice(&vec![f32::NAN; n]));
            let dq = poisoned("dq", p.q_elems());
            let dk = poisoned("dk", p.k_elems());
            let dv = poisoned("dv", p.v_elems());
            let dbias = p
                .bias
                .map(|b| poisoned("dbias", b.batch * b.heads * p.q_len * p.kv_len));
            let gi = GpuInputs {
                q: &q,
                k: &k,
                v: &v,
                dtypes: inputs.dtypes(),
                bias: bias.as_ref(),
                mask: mask.as_ref(),
                alibi_slopes: slopes.as_ref(),
                q_seqlens: q_lens.as_ref(),
                kv_seqlens: kv_lens.as_ref(),
            };
            let fw = GpuForward {
                out: &out,
                out_dtype: forward.out.dtype(),
                lse: &lse_buf,
            };
            let grads = GpuGradients {
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dbias: dbias.as_ref(),
            };
            let mut enc = dev.create_command_encoder(&Default::default());
            self.encode_backward(&mut enc, p, plan, &gi, &fw, (&dout, d_out.dtype()), &grads)?;
            self.queue.submit([enc.finish()]);
            Ok(Gradients {
                dq: self.read_f32(&dq, p.q_elems())?,
                dk: self.read_f32(&dk, p.k_elems())?,
                dv: self.read_f32(&dv, p.v_elems())?,
                dbias: match (&dbias, p.bias) {
                    (Some(buf), Some(b)) => {
                        Some(self.read_f32(buf, b.batch * b.heads * p.q_len * p.kv_len)?)
                    }
                    _ => None,
                },
            })
        })
    }

    /// Records the backward on caller-owned GPU buffers into `encoder`; the caller submits it.
    /// `d_out` holds `d_out_dtype` elements `[B, Lq, Hq, Dv]` in the problem's layout (`STORAGE`);
    /// the forward's buffers need `STORAGE`; gradient buffers `COPY_DST`. Sizes, usages and
    /// limits are checked first.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_on_buffers(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        p: &Problem,
        inputs: &GpuInputs<'_>,
        forward: &GpuForward<'_>,
        d_out: &wgpu::Buffer,
        d_out_dtype: DType,
        grads: &GpuGradients<'_>,
        opts: &BackwardOptions,
    ) -> Result<()> {
        let _gl = self.exclusive();
        let plan = self.backward_plan(p, opts)?;
        self.check_backward_buffers(p, inputs, forward, (d_out, d_out_dtype), grads)?;
        self.check_health()?;
        self.encode_backward(
            encoder,
            p,
            plan,
            inputs,
            forward,
            (d_out, d_out_dtype),
            grads,
        )
    }

    fn check_backward_buffers(
        &self,
        p: &Problem,
        i: &GpuInputs<'_>,
        f: &GpuForward<'_>,
        d_out: (&wgpu::Buffer, DType),
        g: &GpuGradients<'_>,
    ) -> Result<()> {
        use wgpu::BufferUsages as U;
        let presence = [
            ("bias", p.bias.is_some(), i.bias.is_some()),
            ("mask", p.mask.is_some(), i.mask.is_some()),
            ("alibi_slopes", p.alibi, i.alibi_slopes.is_some()),
            ("q_seqlens", p.q_seqlens, i.q_seqlens.is_some()),
            ("kv_seqlens", p.kv_seqlens, i.kv_seqlens.is_some()),
            ("dbias", p.bias.is_some(), g.dbias.is_some()),
        ];
        check_presence(&presence)?;
        let bcast = |b: Option<spotlight_reference::Broadcast>| {
            b.map_or(0, |b| p.broadcast_elems(&b) as u64)
        };
        let e = |n: usize, dt: DType| (n * dt.size()) as u64;
        let need: [(&'static str, Option<&wgpu::Buffer>, u64, U); 15] = [
            ("q", Some(i.q), e(p.q_elems(), i.dtypes[0]), U::STORAGE),
            ("k", Some(i.k), e(p.k_elems(), i.dtypes[1]), U::STORAGE),
            ("v", Some(i.v), e(p.v_elems(), i.dtypes[2]), U::STORAGE),
            ("bias", i.bias, bcast(p.bias) * 4, U::STORAGE),
            ("mask", i.mask, bcast(p.mask), U::STORAGE),
            (
                "alibi_slopes",
                i.alibi_slopes,
                p.q_heads as u64 * 4,
                U::COPY_SRC,
            ),
            ("q_seqlens", i.q_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            ("kv_seqlens", i.kv_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            (
                "forward out",
                Some(f.out),
                e(p.o_elems(), f.out_dtype),
                U::STORAGE,
            ),
            (
                "forward lse",
                Some(f.lse),
                p.lse_elems() as u64 * 4,
                U::STORAGE,
            ),
            ("d_out", Some(d_out.0), e(p.o_elems(), d_out.1), U::STORAGE),
            ("dq", Some(g.dq), p.q_elems() as u64 * 4, U::COPY_DST),
            ("dk", Some(g.dk), p.k_elems() as u64 * 4, U::COPY_DST),
            ("dv", Some(g.dv), p.v_elems() as u64 * 4, U::COPY_DST),
            ("dbias", g.dbias, bcast(p.bias) * 4, U::COPY_DST),
        ];
        check_caller_buffers(&need, &["dq", "dk", "dv", "dbias"])
    }
}
