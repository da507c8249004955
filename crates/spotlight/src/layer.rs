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

use wgpu::util::DeviceExt;

use spotlight_reference::layer::{LayerConfig, LayerExtras, LayerWeights, positions_or_default};
use spotlight_reference::{DType, Problem, ProblemError, RopeStyle, Tensor, TensorRef};

use crate::cache::Paging;
use crate::cache::{DecodeOptions, KvCache, SeqId};
use crate::context::{Engine, TimerSource};
use crate::error::{Error, Result};
use crate::kernels::Variant;
use crate::options::{Algorithm, GpuInputs, GpuOutputs, RunOptions};

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

    /// Records `Y = X·Wᵀ + b` (with the rotary epilogue when `rope` is given) for `m` rows,
    /// scattering columns `[0, n_q)` to `outs[0]`, `[n_q, n_q + n_k)` to `outs[1]`, the rest
    /// to `outs[2]`.
    #[allow(clippy::too_many_arguments)]
    fn encode_linear(
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
    fn rope_table(&self, engine: &Engine, positions: &[u32]) -> Option<wgpu::Buffer> {
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

    fn upload_x(&self, engine: &Engine, x: TensorRef<'_>) -> wgpu::Buffer {
        engine
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("layer x"),
                contents: &padded_bytes(x.as_bytes().to_vec()),
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    fn poisoned(engine: &Engine, label: &str, n: usize) -> wgpu::Buffer {
        engine
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(&vec![f32::NAN; n.max(1)]),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
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

    #[allow(clippy::too_many_arguments)]
    fn encode_qkv(
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

    fn encode_out(
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

    /// One generation step for the sequences `seqs` of `cache`: projects the new tokens `x`
    /// `[B, n, hidden]` (B = `seqs.len()`), rotates Q and K at positions `positions` `[B·n]`
    /// (default: each sequence's length in the cache, onward), appends the new K and V rows to
    /// the cache on the GPU (converted to its dtype), attends the new rows to everything the
    /// cache holds for their sequence (bottom-right causal by default, as
    /// [`Engine::decode`]) and applies `Wo`. Returns `[B, n, hidden]` f32. The cache must have
    /// the layer's Hkv and D; it holds K in the layer's internal dim order (module docs).
    /// Nothing is appended when the call is refused.
    pub fn decode(
        &self,
        engine: &Engine,
        cache: &mut KvCache,
        seqs: &[SeqId],
        x: TensorRef<'_>,
        positions: Option<&[u32]>,
        opts: &DecodeOptions,
    ) -> Result<Vec<f32>> {
        let _gl = engine.exclusive();
        let c = self.cfg;
        let cc = *cache.config();
        if (cc.kv_heads, cc.head_dim, cc.v_head_dim) != (c.kv_heads, c.head_dim, c.head_dim) {
            return Err(Error::Cache(format!(
                "the cache holds [Hkv = {}, D = {}, Dv = {}] rows; this layer needs [{}, {}, {}]",
                cc.kv_heads, cc.head_dim, cc.v_head_dim, c.kv_heads, c.head_dim, c.head_dim
            )));
        }
        if seqs.is_empty() {
            return Err(Error::Cache("decode: no sequences given".into()));
        }
        for (i, s) in seqs.iter().enumerate() {
            if seqs[..i].contains(s) {
                return Err(Error::Cache(format!(
                    "decode: sequence {s} is listed twice; each sequence appends once per step"
                )));
            }
        }
        let b = seqs.len();
        let row = elems("the hidden states", b, c.hidden)?;
        if x.is_empty() || !x.len().is_multiple_of(row) {
            return Err(ProblemError::LengthMismatch {
                what: "x",
                got: x.len(),
                expected: row,
            }
            .into());
        }
        let n = x.len() / row;
        let m = b * n;
        self.check_rows(engine, m)?;
        if opts.lse || opts.out_dtype.is_some() {
            return Err(Error::Unsupported {
                algorithm: opts.algorithm.name(),
                reason: "the layer returns f32 hidden states; lse and out_dtype are not available through it".into(),
            });
        }
        if !matches!(
            opts.algorithm,
            Algorithm::Auto | Algorithm::SplitK | Algorithm::Flash
        ) {
            return Err(Error::Unsupported {
                algorithm: opts.algorithm.name(),
                reason:
                    "decoding from a paged cache runs the fused kernel: use auto, split-k or flash"
                        .into(),
            });
        }
        cache.check_engine(engine)?;
        let before: Vec<usize> = seqs.iter().map(|&s| cache.len(s)).collect::<Result<_>>()?;
        let positions = match positions {
            Some(p) => positions_or_default(Some(p), b, n)?,
            None => before
                .iter()
                .flat_map(|&l| (l..l + n).map(|t| t as u32))
                .collect(),
        };
        let after: Vec<i32> = before
            .iter()
            .map(|&l| i32::try_from(l + n).map_err(|_| too_large("a cached sequence", l + n)))
            .collect::<Result<_>>()?;
        let max_len = *after.iter().max().expect("non-empty") as usize;
        let mut p =
            Problem::new(b, n, max_len, c.q_heads, c.kv_heads, c.head_dim).causal(opts.causal);
        p.window = opts.window;
        p.scale = opts.scale;
        p.softcap = opts.softcap;
        p.kv_seqlens = true;
        p.validate()?;
        let dtypes = [DType::F32, cc.dtype, cc.dtype];
        let plan_for = |algorithm| {
            let run = RunOptions {
                algorithm,
                ..Default::default()
            };
            engine.plan_paged(&p, dtypes, &run)
        };
        let plan = match opts.algorithm {
            // Auto: split-k, else flash (as Engine::decode).
            Algorithm::Auto => {
                plan_for(Algorithm::SplitK).or_else(|_| plan_for(Algorithm::Flash))?
            }
            a => plan_for(a)?,
        };
        let mut needed = 0;
        for &s in seqs {
            needed += cache.pages_needed(s, n)?;
        }
        if needed > cache.free_pages() {
            return Err(Error::Cache(format!(
                "out of pages: appending {n} rows to each of {b} sequences needs {needed} new pages, {} are free",
                cache.free_pages()
            )));
        }
        let mut spans = Vec::with_capacity(b);
        for &s in seqs {
            spans.push(cache.reserve(s, n)?);
        }
        let result = engine.scoped(|| {
            self.decode_reserved(engine, cache, seqs, x, &positions, &spans, &after, &p, plan)
        });
        if result.is_err() {
            for (&s, &l) in seqs.iter().zip(&before) {
                cache.truncate(s, l)?;
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_reserved(
        &self,
        engine: &Engine,
        cache: &KvCache,
        seqs: &[SeqId],
        x: TensorRef<'_>,
        positions: &[u32],
        spans: &[Vec<(usize, usize)>],
        lens: &[i32],
        p: &Problem,
        plan: crate::plan::Plan,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let cc = *cache.config();
        let (b, n) = (p.batch, p.q_len);
        let m = b * n;
        let dev = engine.device();
        let xb = self.upload_x(engine, x);
        let rope = self.rope_table(engine, positions);
        let q = engine.scratch("layer q", (m * c.q_dim() * 4) as u64);
        let k = copyable(engine, "layer k", (m * c.kv_dim() * 4) as u64);
        let v = copyable(engine, "layer v", (m * c.kv_dim() * 4) as u64);
        let o = engine.scratch("layer attention out", (m * c.q_dim() * 4) as u64);
        let y = Self::poisoned(engine, "layer out", m * c.hidden);
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
        // The new rows in the cache's dtype, then copied into their pages.
        let packed = if cc.dtype == DType::F32 {
            None
        } else {
            let bytes = (m * c.kv_dim() * cc.dtype.size()) as u64;
            let (kp, vp) = (
                copyable(engine, "new k rows", bytes),
                copyable(engine, "new v rows", bytes),
            );
            engine.pack(&mut enc, &k, &kp, cc.dtype, m * c.kv_dim())?;
            engine.pack(&mut enc, &v, &vp, cc.dtype, m * c.kv_dim())?;
            Some((kp, vp))
        };
        let (ks, vs) = match &packed {
            Some((kp, vp)) => (kp, vp),
            None => (&k, &v),
        };
        let row_bytes = (c.kv_dim() * cc.dtype.size()) as u64;
        for (bi, seq_spans) in spans.iter().enumerate() {
            let mut src_row = (bi * n) as u64;
            for &(slot, count) in seq_spans {
                for (src, dst) in [(ks, &cache.k), (vs, &cache.v)] {
                    enc.copy_buffer_to_buffer(
                        src,
                        src_row * row_bytes,
                        dst,
                        slot as u64 * row_bytes,
                        count as u64 * row_bytes,
                    );
                }
                src_row += count as u64;
            }
        }
        let stride = seqs
            .iter()
            .map(|&s| cache.pages(s).map(<[u32]>::len))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0)
            .max(1);
        let mut table = vec![0u32; b * stride];
        for (bi, &s) in seqs.iter().enumerate() {
            let pages = cache.pages(s)?;
            table[bi * stride..bi * stride + pages.len()].copy_from_slice(pages);
        }
        let init = |label: &str, bytes: &[u8]| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
        };
        let lens_buf = init("kv_seqlens", bytemuck::cast_slice(lens));
        let table_buf = init("block table", bytemuck::cast_slice(&table));
        let paging = Paging {
            table: &table_buf,
            page_size: cc.page_size as u32,
            table_stride: stride as u32,
        };
        let inputs = GpuInputs {
            q: &q,
            k: &cache.k,
            v: &cache.v,
            dtypes: [DType::F32, cc.dtype, cc.dtype],
            bias: None,
            mask: None,
            alibi_slopes: None,
            q_seqlens: None,
            kv_seqlens: Some(&lens_buf),
        };
        let outputs = GpuOutputs {
            out: &o,
            out_dtype: DType::F32,
            lse: None,
            probs: None,
        };
        engine.encode(&mut enc, p, plan, &inputs, &outputs, Some(&paging))?;
        self.encode_out(engine, &mut enc, &o, m, &y)?;
        engine.queue().submit([enc.finish()]);
        engine.read_f32(&y, m * c.hidden)
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
