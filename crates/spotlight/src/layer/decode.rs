//! Decoding through the layer: new tokens projected, appended to a [`KvCache`] and attended
//! against the cached keys, in one submission.

use wgpu::util::DeviceExt;

use spotlight_reference::layer::positions_or_default;
use spotlight_reference::{DType, Problem, ProblemError, TensorRef};

use crate::cache::Paging;
use crate::cache::{DecodeOptions, KvCache, SeqId};
use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{Algorithm, GpuInputs, GpuOutputs, RunOptions};

use super::{AttentionLayer, copyable, elems, too_large};

impl AttentionLayer {
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
                algorithm: opts.algorithm,
                reason: "the layer returns f32 hidden states; lse and out_dtype are not available through it".into(),
            });
        }
        if !matches!(
            opts.algorithm,
            Algorithm::Auto | Algorithm::SplitK | Algorithm::Flash
        ) {
            return Err(Error::Unsupported {
                algorithm: opts.algorithm,
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
    pub(super) fn decode_reserved(
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
}
