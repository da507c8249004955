//! An attention layer on the GPU: projections, rotary embeddings, attention, output projection,
//! and decoding through a [`KvCache`]. The semantics are those of
//! [`spotlight_reference::layer`]; the weights are uploaded once.
//!
//! ```no_run
//! use spotlight::{AttentionLayer, Engine, LayerConfig, LayerExtras, LayerWeights, RunOptions, TensorRef};
//! let engine = Engine::new()?;
//! let cfg = LayerConfig::new(64, 4, 2, 16);
//! let (wq, wk, wo) = (vec![0.01f32; 64 * 64], vec![0.01f32; 32 * 64], vec![0.01f32; 64 * 64]);
//! let w = LayerWeights::new(TensorRef::F32(&wq), TensorRef::F32(&wk), TensorRef::F32(&wk), TensorRef::F32(&wo));
//! let layer = AttentionLayer::new(&engine, cfg, &w)?;
//! let x = vec![0.5f32; 10 * 64]; // [B = 1, L = 10, hidden = 64]
//! let p = cfg.problem(1, 10).causal(true);
//! let y = layer.forward(&engine, TensorRef::F32(&x), &p, None, &LayerExtras::default(), &RunOptions::default())?;
//! assert_eq!(y.len(), 10 * 64);
//! # Ok::<(), spotlight::Error>(())
//! ```
//!
//! How it runs: one tiled matrix product (`shaders/linear.wgsl`) computes Q, K and V from a fused
//! `[(Hq + 2·Hkv)·D, hidden]` weight and rotates Q and K in its epilogue (no extra pass over
//! them), attention runs on those buffers, and a second product applies `Wo`; everything is
//! recorded into one submission. The rotary epilogue rotates adjacent column pairs, so for the
//! rotate-half convention the rows of `Wq`/`Wk` (and their biases) are permuted at upload to put
//! each rotated pair `(i, i + R/2)` side by side. That permutes the head dims of Q and K alike,
//! which leaves every `q·k` and so the attention unchanged; the KV cache of [`AttentionLayer::decode`]
//! holds K in this internal order (use it through the layer).

mod decode;
mod record;

use wgpu::util::DeviceExt;

use spotlight_reference::layer::{LayerConfig, LayerExtras, LayerWeights, positions_or_default};
use spotlight_reference::{DType, Problem, ProblemError, RopeStyle, Tensor, TensorRef};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{GpuInputs, GpuOutputs, RunOptions};
use crate::timing::TimerSource;

crate::params::uniform_block! {
/// The uniform block of `shaders/linear.wgsl` (checked against it by `tests/shaders.rs`).
pub(crate) struct LinParams {
    m: u32,
    n: u32,
    k: u32,
    n_q: u32,
    n_k: u32,
    head_dim: u32,
    rot_half: u32,
    flags: u32,
}
}

/// Output rows and columns of one workgroup of the projection kernel.
const TILE: u64 = 64;

/// An attention layer whose weights live on the GPU.
pub struct AttentionLayer {
    cfg: LayerConfig,
    qkv: wgpu::Buffer,
    qkv_dtype: DType,
    qkv_bias: Option<wgpu::Buffer>,
    wo: wgpu::Buffer,
    wo_dtype: DType,
    bo: Option<wgpu::Buffer>,
}

/// Where the time of a layer forward goes, from [`AttentionLayer::profile`] (medians, seconds).
#[derive(Clone, Copy, Debug)]
pub struct LayerTimings {
    /// The QKV projection with the rotary epilogue.
    pub qkv: f64,
    /// Attention.
    pub attention: f64,
    /// The output projection.
    pub output: f64,
    pub source: TimerSource,
}

/// The source dim of internal dim `d` of a Q/K head (see the module docs).
fn source_dim(cfg: &LayerConfig, d: usize) -> usize {
    match cfg.rope {
        Some(r) if r.style == RopeStyle::RotateHalf && d < r.rotary_dim => {
            if d.is_multiple_of(2) {
                d / 2
            } else {
                d / 2 + r.rotary_dim / 2
            }
        }
        _ => d,
    }
}

fn padded_bytes(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(b.len().div_ceil(4).max(1) * 4, 0);
    b
}

/// A scratch buffer the cache's rows can be copied from.
fn copyable(engine: &Engine, label: &str, bytes: u64) -> wgpu::Buffer {
    engine.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.div_ceil(4).max(1) * 4,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

fn too_large(what: &'static str, elems: usize) -> Error {
    ProblemError::TooLarge { what, elems }.into()
}

/// `a · b` as a count that must fit the kernels' u32 indices.
fn elems(what: &'static str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(n) if n <= u32::MAX as usize => Ok(n),
        _ => Err(too_large(what, a.saturating_mul(b))),
    }
}

impl AttentionLayer {
    /// Checks the weights against `cfg` and uploads them (once). `Wq`, `Wk`, `Wv` are stored as
    /// one fused QKV matrix in their dtype (f32 when they differ), `Wo` in its own; biases as f32.
    pub fn new(engine: &Engine, cfg: LayerConfig, w: &LayerWeights<'_>) -> Result<Self> {
        let _gl = engine.exclusive();
        w.check(&cfg)?;
        let h = cfg.hidden;
        elems("the QKV weight", cfg.qkv_dim(), h)?;
        let same = w.wq.dtype() == w.wk.dtype() && w.wq.dtype() == w.wv.dtype();
        let qkv_dtype = if same { w.wq.dtype() } else { DType::F32 };
        let widened: Vec<Tensor>;
        let parts: [TensorRef<'_>; 3] = if same {
            [w.wq, w.wk, w.wv]
        } else {
            widened = [w.wq, w.wk, w.wv]
                .iter()
                .map(|t| Tensor::F32(t.to_f32_vec()))
                .collect();
            [
                widened[0].as_ref(),
                widened[1].as_ref(),
                widened[2].as_ref(),
            ]
        };
        let es = qkv_dtype.size();
        let d = cfg.head_dim;
        let mut qkv = Vec::with_capacity(cfg.qkv_dim() * h * es);
        let mut bias = Vec::with_capacity(cfg.qkv_dim());
        let biases = [w.bq, w.bk, w.bv];
        for (n, (t, b)) in parts.iter().zip(biases).enumerate() {
            let bytes = t.as_bytes();
            let heads = if n == 0 { cfg.q_heads } else { cfg.kv_heads };
            let rotated = n < 2;
            for head in 0..heads {
                for dd in 0..d {
                    let src = head * d + if rotated { source_dim(&cfg, dd) } else { dd };
                    qkv.extend_from_slice(&bytes[src * h * es..(src + 1) * h * es]);
                    bias.push(b.map_or(0.0, |b| b.get(src)));
                }
            }
        }
        let has_bias = biases.iter().any(Option::is_some);
        let caps = engine.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer_size);
        for (what, bytes) in [
            ("the fused QKV weight", qkv.len() as u64),
            ("the output weight", w.wo.as_bytes().len() as u64),
        ] {
            if bytes > limit {
                return Err(Error::LimitExceeded {
                    what: what.into(),
                    bytes,
                    limit_name: "max_storage_buffer_binding_size",
                    limit,
                });
            }
        }
        let dev = engine.device();
        let init = |label: &str, bytes: Vec<u8>| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded_bytes(bytes),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        engine.scoped(|| {
            Ok(AttentionLayer {
                cfg,
                qkv: init("layer wqkv", qkv),
                qkv_dtype,
                qkv_bias: has_bias
                    .then(|| init("layer bqkv", bytemuck::cast_slice(&bias).to_vec())),
                wo: init("layer wo", w.wo.as_bytes().to_vec()),
                wo_dtype: w.wo.dtype(),
                bo: w
                    .bo
                    .map(|b| init("layer bo", bytemuck::cast_slice(&b.to_f32_vec()).to_vec())),
            })
        })
    }

    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// Checks the sizes of a call on `m` token rows against the kernels' indices and the
    /// device's binding limit.
    fn check_rows(&self, engine: &Engine, m: usize) -> Result<()> {
        let c = &self.cfg;
        elems("the hidden states", m, c.hidden)?;
        elems("the projected QKV", m, c.qkv_dim())?;
        let caps = engine.capabilities();
        let limit = caps.max_storage_binding.min(caps.max_buffer_size);
        for (what, n) in [
            ("the hidden states", c.hidden),
            ("the projected Q", c.q_dim()),
        ] {
            let bytes = (m * n * 4) as u64;
            if bytes > limit {
                return Err(Error::LimitExceeded {
                    what: format!("{what} ({m} token rows)"),
                    bytes,
                    limit_name: "max_storage_buffer_binding_size",
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Checks a forward call before any GPU work; returns the positions.
    fn check_forward(
        &self,
        engine: &Engine,
        x: TensorRef<'_>,
        p: &Problem,
        positions: Option<&[u32]>,
        extras: &LayerExtras<'_>,
    ) -> Result<Vec<u32>> {
        let c = &self.cfg;
        let (b, l) = (p.batch, p.q_len);
        c.check_problem(p, b, l)?;
        let m = b
            .checked_mul(l)
            .ok_or_else(|| too_large("the token rows", usize::MAX))?;
        self.check_rows(engine, m)?;
        if x.len() != m * c.hidden {
            return Err(ProblemError::LengthMismatch {
                what: "x",
                got: x.len(),
                expected: m * c.hidden,
            }
            .into());
        }
        // The optional inputs, checked as attention checks them (Q, K and V stand in with one
        // element per head and token: only their presence and the options matter here).
        let mut shape = p.clone();
        shape.head_dim = 1;
        shape.v_head_dim = 1;
        shape.scale = None;
        let (qs, ks) = (vec![0.0f32; shape.q_elems()], vec![0.0f32; shape.k_elems()]);
        shape.check_inputs(&extras.inputs(
            TensorRef::F32(&qs),
            TensorRef::F32(&ks),
            TensorRef::F32(&ks),
        ))?;
        Ok(positions_or_default(positions, b, l)?)
    }

    /// Runs the layer on hidden states `x` `[B, L, hidden]` (any dtype): returns
    /// `[B, L, hidden]` f32. `p` is the attention problem ([`LayerConfig::problem`] with any
    /// options: causal, window, scale, softcap, bias, mask, ALiBi, sequence lengths), `extras`
    /// its optional tensors, `positions` `[B·L]` each token's rotary position (default `t`), and
    /// `opts` picks the attention algorithm (its `lse`, `probs` and `out_dtype` are not used).
    pub fn forward(
        &self,
        engine: &Engine,
        x: TensorRef<'_>,
        p: &Problem,
        positions: Option<&[u32]>,
        extras: &LayerExtras<'_>,
        opts: &RunOptions,
    ) -> Result<Vec<f32>> {
        let _gl = engine.exclusive();
        let positions = self.check_forward(engine, x, p, positions, extras)?;
        let c = &self.cfg;
        let m = p.batch * p.q_len;
        engine.scoped(|| {
            let dev = engine.device();
            let xb = self.upload_x(engine, x);
            let rope = self.rope_table(engine, &positions);
            let q = engine.scratch("layer q", (m * c.q_dim() * 4) as u64);
            let k = engine.scratch("layer k", (m * c.kv_dim() * 4) as u64);
            let v = engine.scratch("layer v", (m * c.kv_dim() * 4) as u64);
            let o = engine.scratch("layer attention out", (m * c.q_dim() * 4) as u64);
            let y = Self::poisoned(engine, "layer out", m * c.hidden);
            let init = |label: &str, bytes: &[u8]| {
                dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &padded_bytes(bytes.to_vec()),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                })
            };
            let bias = extras.bias.map(|b| init("bias", bytemuck::cast_slice(b)));
            let mask = extras.mask.map(|b| init("mask", b));
            let slopes = extras
                .alibi_slopes
                .map(|b| init("alibi_slopes", bytemuck::cast_slice(b)));
            let ql = extras
                .q_seqlens
                .map(|b| init("q_seqlens", bytemuck::cast_slice(b)));
            let kl = extras
                .kv_seqlens
                .map(|b| init("kv_seqlens", bytemuck::cast_slice(b)));
            let mut enc = dev.create_command_encoder(&Default::default());
            self.encode_qkv(
                engine,
                &mut enc,
                &xb,
                x.dtype(),
                m,
                rope.as_ref(),
                [&q, &k, &v],
            )?;
            let inputs = GpuInputs {
                q: &q,
                k: &k,
                v: &v,
                dtypes: [DType::F32; 3],
                bias: bias.as_ref(),
                mask: mask.as_ref(),
                alibi_slopes: slopes.as_ref(),
                q_seqlens: ql.as_ref(),
                kv_seqlens: kl.as_ref(),
            };
            let outputs = GpuOutputs {
                out: &o,
                out_dtype: DType::F32,
                lse: None,
                probs: None,
            };
            engine.attention_on_buffers(&mut enc, p, &inputs, &outputs, opts)?;
            self.encode_out(engine, &mut enc, &o, m, &y)?;
            engine.queue().submit([enc.finish()]);
            engine.read_f32(&y, m * c.hidden)
        })
    }

    /// Times the three parts of a forward on `x` (uploaded once): the QKV projection with its
    /// rotary epilogue, attention, and the output projection, each the median of `repeats`
    /// runs after a warm-up (GPU timestamps where the adapter has them). Also returns the
    /// layer's output of the last run.
    pub fn profile(
        &self,
        engine: &Engine,
        x: TensorRef<'_>,
        p: &Problem,
        opts: &RunOptions,
        repeats: usize,
    ) -> Result<(LayerTimings, Vec<f32>)> {
        let _gl = engine.exclusive();
        let extras = LayerExtras::default();
        let positions = self.check_forward(engine, x, p, None, &extras)?;
        let c = &self.cfg;
        let m = p.batch * p.q_len;
        engine.scoped(|| {
            let xb = self.upload_x(engine, x);
            let rope = self.rope_table(engine, &positions);
            let q = engine.scratch("layer q", (m * c.q_dim() * 4) as u64);
            let k = engine.scratch("layer k", (m * c.kv_dim() * 4) as u64);
            let v = engine.scratch("layer v", (m * c.kv_dim() * 4) as u64);
            let o = engine.scratch("layer attention out", (m * c.q_dim() * 4) as u64);
            let y = Self::poisoned(engine, "layer out", m * c.hidden);
            let inputs = GpuInputs {
                q: &q,
                k: &k,
                v: &v,
                dtypes: [DType::F32; 3],
                bias: None,
                mask: None,
                alibi_slopes: None,
                q_seqlens: None,
                kv_seqlens: None,
            };
            let outputs = GpuOutputs {
                out: &o,
                out_dtype: DType::F32,
                lse: None,
                probs: None,
            };
            let mut times = [Vec::new(), Vec::new(), Vec::new()];
            let mut source = TimerSource::WallClock;
            for _ in 0..repeats.max(1) + 1 {
                let t = engine.time(|enc| {
                    self.encode_qkv(engine, enc, &xb, x.dtype(), m, rope.as_ref(), [&q, &k, &v])
                })?;
                times[0].push(t.seconds);
                let t = engine.time(|enc| {
                    engine
                        .attention_on_buffers(enc, p, &inputs, &outputs, opts)
                        .map(|_| ())
                })?;
                times[1].push(t.seconds);
                let t = engine.time(|enc| self.encode_out(engine, enc, &o, m, &y))?;
                times[2].push(t.seconds);
                source = t.source;
            }
            let median = |v: &mut Vec<f64>| {
                v.remove(0);
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let [mut a, mut b2, mut d] = times;
            let timings = LayerTimings {
                qkv: median(&mut a),
                attention: median(&mut b2),
                output: median(&mut d),
                source,
            };
            Ok((timings, engine.read_f32(&y, m * c.hidden)?))
        })
    }
}
