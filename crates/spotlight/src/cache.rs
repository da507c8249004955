//! A paged KV cache on the GPU, and decoding against it.
//!
//! K and V live in two pools of fixed-size pages (`page_size` token rows of `[Hkv, D]` each).
//! Every sequence owns a list of pages (its block table); appending writes only the new rows, and
//! freeing a sequence returns its pages to the pool, so sequences grow and end independently. A
//! contiguous cache is the special case of one page per sequence
//! ([`KvCacheConfig::contiguous`]).
//!
//! ```no_run
//! use spotlight::{Engine, KvCache, KvCacheConfig, DecodeOptions, DType, TensorRef};
//! let engine = Engine::new()?;
//! let mut cache = KvCache::new(&engine, KvCacheConfig::paged(8, 128, DType::F16, 256, 64))?;
//! let seq = cache.add_sequence();
//! let (k, v) = (vec![0.1f32; 5 * 8 * 128], vec![0.2f32; 5 * 8 * 128]);
//! cache.append(&engine, seq, TensorRef::F32(&k), TensorRef::F32(&v))?;
//! let q = vec![0.3f32; 32 * 128]; // one new token, 32 query heads
//! let out = engine.decode(&cache, &[seq], TensorRef::F32(&q), 1, 32, &DecodeOptions::default())?;
//! # Ok::<(), spotlight::Error>(())
//! ```

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Problem, Tensor, TensorRef, Window};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{Algorithm, GpuInputs, Output, RunOptions};

/// Identifies a sequence in a [`KvCache`].
/// K and V read through a block table (a paged KV cache): key `j` of batch entry `b` is row
/// `j % page_size` of page `table[b * table_stride + j / page_size]`.
pub(crate) struct Paging<'a> {
    pub table: &'a wgpu::Buffer,
    pub page_size: u32,
    pub table_stride: u32,
}

pub type SeqId = usize;

/// Shape and storage of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheConfig {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
    pub dtype: DType,
    /// Token rows per page.
    pub page_size: usize,
    /// Pages in the pool (shared by all sequences).
    pub num_pages: usize,
}

impl KvCacheConfig {
    /// A paged cache: `num_pages` pages of `page_size` rows, `Dv = D`.
    pub fn paged(
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        page_size: usize,
        num_pages: usize,
    ) -> Self {
        KvCacheConfig {
            kv_heads,
            head_dim,
            v_head_dim: head_dim,
            dtype,
            page_size,
            num_pages,
        }
    }

    /// A contiguous cache: one page of `capacity` rows for each of `max_sequences` sequences.
    pub fn contiguous(
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        max_sequences: usize,
        capacity: usize,
    ) -> Self {
        Self::paged(kv_heads, head_dim, dtype, capacity, max_sequences)
    }

    fn row_elems(&self, dim: usize) -> usize {
        self.kv_heads * dim
    }
}

#[derive(Clone, Debug, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

/// A paged K/V cache for one attention layer. Its pools live on the device of the engine that
/// made it: every call checks that it is given that engine and returns [`Error::Cache`] otherwise.
pub struct KvCache {
    cfg: KvCacheConfig,
    engine_id: u64,
    pub(crate) k: wgpu::Buffer,
    pub(crate) v: wgpu::Buffer,
    free: Vec<u32>,
    seqs: Vec<Option<Sequence>>,
}

fn cache_err(reason: impl Into<String>) -> Error {
    Error::Cache(reason.into())
}

impl KvCache {
    /// Allocates the page pools. Checks the configuration and the device limits first.
    pub fn new(engine: &Engine, cfg: KvCacheConfig) -> Result<Self> {
        let _gl = engine.exclusive();
        let c = &cfg;
        for (name, v) in [
            ("kv_heads", c.kv_heads),
            ("head_dim", c.head_dim),
            ("v_head_dim", c.v_head_dim),
            ("page_size", c.page_size),
            ("num_pages", c.num_pages),
        ] {
            if v == 0 {
                return Err(cache_err(format!("{name} is 0: it must be at least 1")));
            }
        }
        for (name, dim) in [("K", c.head_dim), ("V", c.v_head_dim)] {
            let Some(row_bytes) = c
                .kv_heads
                .checked_mul(dim)
                .and_then(|e| e.checked_mul(c.dtype.size()))
            else {
                return Err(cache_err(format!(
                    "a {name} row of kv_heads = {} x dim = {dim} values overflows",
                    c.kv_heads
                )));
            };
            if !row_bytes.is_multiple_of(4) {
                return Err(cache_err(format!(
                    "a {name} row (kv_heads x dim = {} {} values) is not a whole number of 4-byte words; use an even kv_heads x dim",
                    c.row_elems(dim),
                    c.dtype.name()
                )));
            }
        }
        let caps = engine.capabilities();
        let mut pools = Vec::new();
        for (name, dim) in [("K", c.head_dim), ("V", c.v_head_dim)] {
            let limit = caps.max_storage_binding.min(caps.max_buffer_size);
            // Checked: absurd configurations are refused, never wrapped (or a debug panic).
            let elems = [c.num_pages, c.page_size, c.kv_heads, dim]
                .iter()
                .try_fold(1usize, |a, &x| a.checked_mul(x));
            let bytes = elems
                .and_then(|e| e.checked_mul(c.dtype.size()))
                .map_or(u64::MAX, |b| b as u64);
            if bytes > limit || elems.is_none_or(|e| e > u32::MAX as usize) {
                return Err(Error::LimitExceeded {
                    what: format!("the {name} page pool"),
                    bytes,
                    limit_name: "max_storage_buffer_binding_size",
                    limit,
                });
            }
            pools.push(engine.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(if name == "K" {
                    "kv cache K"
                } else {
                    "kv cache V"
                }),
                size: bytes.max(4),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }));
        }
        let v = pools.pop().expect("V pool");
        let k = pools.pop().expect("K pool");
        Ok(KvCache {
            cfg,
            engine_id: engine.id(),
            k,
            v,
            free: (0..c.num_pages as u32).rev().collect(),
            seqs: Vec::new(),
        })
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// Refuses an engine other than the one that made this cache: its pools are buffers of that
    /// engine's device, which another device cannot bind.
    pub(crate) fn check_engine(&self, engine: &Engine) -> Result<()> {
        if engine.id() != self.engine_id {
            return Err(cache_err(
                "this cache was made by another Engine; use the engine that created it (its pages live on that engine's device)",
            ));
        }
        Ok(())
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        self.seqs.push(Some(Sequence::default()));
        self.seqs.len() - 1
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(id)
            .and_then(Option::as_ref)
            .ok_or_else(|| cache_err(format!("sequence {id} does not exist (or was freed)")))
    }

    /// Tokens stored for sequence `id`.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// Pages not owned by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Ends sequence `id` and returns its pages to the pool.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.seq(id)?;
        let s = self.seqs[id].take().expect("checked above");
        self.free.extend(s.pages.iter().rev());
        Ok(())
    }

    /// Appends `n` token rows to sequence `id`: `k` is `[n, Hkv, D]`, `v` is `[n, Hkv, Dv]`, in any
    /// dtype (converted to the cache's). Only the new rows are written to the GPU. Fails without
    /// changing anything when the pool has too few free pages.
    pub fn append(
        &mut self,
        engine: &Engine,
        id: SeqId,
        k: TensorRef<'_>,
        v: TensorRef<'_>,
    ) -> Result<()> {
        let _gl = engine.exclusive();
        self.check_engine(engine)?;
        let c = self.cfg;
        let (kr, vr) = (c.row_elems(c.head_dim), c.row_elems(c.v_head_dim));
        let n = k.len() / kr;
        if k.len() != n * kr || v.len() != n * vr {
            return Err(cache_err(format!(
                "append: k has {} values and v {}; expected n x {kr} and n x {vr} (rows of [Hkv, D] and [Hkv, Dv])",
                k.len(),
                v.len()
            )));
        }
        let len = self.seq(id)?.len;
        let pages_needed = (len + n).div_ceil(c.page_size) - len.div_ceil(c.page_size);
        if pages_needed > self.free.len() {
            return Err(cache_err(format!(
                "out of pages: appending {n} rows to sequence {id} needs {pages_needed} new pages, {} are free",
                self.free.len()
            )));
        }
        let convert = |t: TensorRef<'_>| match t.dtype() == c.dtype {
            true => None,
            false => Some(Tensor::from_f32(&t.to_f32_vec(), c.dtype)),
        };
        let (k_conv, v_conv) = (convert(k), convert(v));
        let k_bytes = k_conv
            .as_ref()
            .map_or(k, |t| t.as_ref())
            .as_bytes()
            .to_vec();
        let v_bytes = v_conv
            .as_ref()
            .map_or(v, |t| t.as_ref())
            .as_bytes()
            .to_vec();
        let mut free = std::mem::take(&mut self.free);
        let seq = self.seqs[id].as_mut().expect("checked above");
        for _ in 0..pages_needed {
            seq.pages.push(free.pop().expect("counted above"));
        }
        self.free = free;
        let size = c.dtype.size();
        let mut row = 0;
        while row < n {
            let pos = seq.len + row;
            let page = seq.pages[pos / c.page_size] as usize;
            let within = pos % c.page_size;
            let count = (c.page_size - within).min(n - row);
            let slot = page * c.page_size + within;
            for (buf, bytes, re) in [(&self.k, &k_bytes, kr), (&self.v, &v_bytes, vr)] {
                let src = &bytes[row * re * size..(row + count) * re * size];
                engine
                    .queue()
                    .write_buffer(buf, (slot * re * size) as u64, src);
            }
            row += count;
        }
        seq.len += n;
        Ok(())
    }
}

impl KvCache {
    /// The pages of sequence `id`, in order (for the layer's decode, which appends on the GPU).
    pub(crate) fn pages(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.pages)
    }

    /// New pages sequence `id` needs to grow by `n` rows.
    pub(crate) fn pages_needed(&self, id: SeqId, n: usize) -> Result<usize> {
        let (len, ps) = (self.seq(id)?.len, self.cfg.page_size);
        Ok((len + n).div_ceil(ps) - len.div_ceil(ps))
    }

    /// Grows sequence `id` by `n` rows without writing them: returns the `(first slot, rows)`
    /// spans (slot = page · page_size + row) the caller must fill. Refused, changing nothing,
    /// when the pool has too few free pages. Undo with [`KvCache::truncate`].
    pub(crate) fn reserve(&mut self, id: SeqId, n: usize) -> Result<Vec<(usize, usize)>> {
        let needed = self.pages_needed(id, n)?;
        if needed > self.free.len() {
            return Err(cache_err(format!(
                "out of pages: appending {n} rows to sequence {id} needs {needed} new pages, {} are free",
                self.free.len()
            )));
        }
        let ps = self.cfg.page_size;
        let mut free = std::mem::take(&mut self.free);
        let seq = self.seqs[id].as_mut().expect("checked above");
        for _ in 0..needed {
            seq.pages.push(free.pop().expect("counted above"));
        }
        self.free = free;
        let mut spans = Vec::new();
        let mut row = 0;
        while row < n {
            let pos = seq.len + row;
            let count = (ps - pos % ps).min(n - row);
            spans.push((seq.pages[pos / ps] as usize * ps + pos % ps, count));
            row += count;
        }
        seq.len += n;
        Ok(spans)
    }

    /// Shrinks sequence `id` back to `len` rows, returning pages it no longer needs.
    pub(crate) fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        self.seq(id)?;
        let keep = len.div_ceil(self.cfg.page_size);
        let seq = self.seqs[id].as_mut().expect("checked above");
        seq.len = seq.len.min(len);
        while seq.pages.len() > keep {
            self.free.push(seq.pages.pop().expect("non-empty"));
        }
        Ok(())
    }
}

/// Options of [`Engine::decode`]; the semantics are those of [`Problem`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeOptions {
    pub causal: bool,
    pub window: Option<Window>,
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    pub lse: bool,
    pub out_dtype: Option<DType>,
    /// `Auto` (the default: split-k, or flash where split-k cannot run), `SplitK` or `Flash`;
    /// all read the pages directly.
    pub algorithm: Algorithm,
    /// The fused kernel, as [`RunOptions::flash_layout`] (`None`: the adapter decides).
    pub flash_layout: Option<crate::FlashLayout>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            causal: true,
            window: None,
            scale: None,
            softcap: None,
            lse: false,
            out_dtype: None,
            algorithm: Algorithm::Auto,
            flash_layout: None,
        }
    }
}

impl Engine {
    /// Attends `q_len` new query rows of each sequence in `seqs` (Q is `[B, q_len, q_heads, D]`,
    /// BSHD, B = `seqs.len()`) to everything the cache holds for it. Causal alignment is
    /// bottom-right per sequence, so the new rows are the last `q_len` positions. Returns O
    /// `[B, q_len, q_heads, Dv]` (and the LSE when asked).
    pub fn decode(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q: TensorRef<'_>,
        q_len: usize,
        q_heads: usize,
        opts: &DecodeOptions,
    ) -> Result<Output> {
        let _gl = self.exclusive();
        cache.check_engine(self)?;
        self.scoped(|| self.decode_checked(cache, seqs, q, q_len, q_heads, opts))
    }

    fn decode_checked(
        &self,
        cache: &KvCache,
        seqs: &[SeqId],
        q: TensorRef<'_>,
        q_len: usize,
        q_heads: usize,
        opts: &DecodeOptions,
    ) -> Result<Output> {
        let c = cache.config();
        let lens: Vec<i32> = seqs
            .iter()
            .map(|&s| cache.len(s).map(|l| l as i32))
            .collect::<Result<_>>()?;
        let max_len = lens.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut p = Problem::new(seqs.len(), q_len, max_len, q_heads, c.kv_heads, c.head_dim)
            .v_head_dim(c.v_head_dim)
            .causal(opts.causal);
        p.window = opts.window;
        p.scale = opts.scale;
        p.softcap = opts.softcap;
        p.kv_seqlens = true;
        p.validate()?;
        if q.len() != p.q_elems() {
            return Err(spotlight_reference::ProblemError::LengthMismatch {
                what: "q",
                got: q.len(),
                expected: p.q_elems(),
            }
            .into());
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
        let dtypes = [q.dtype(), c.dtype, c.dtype];
        let plan_for = |algorithm| {
            let run = RunOptions {
                algorithm,
                lse: opts.lse,
                out_dtype: opts.out_dtype,
                flash_layout: opts.flash_layout,
                ..Default::default()
            };
            self.plan_paged(&p, dtypes, &run).map(|plan| (plan, run))
        };
        let (plan, run) = match opts.algorithm {
            // Auto: split-k (query heads of a group share each K/V tile, keys split across
            // workgroups), else flash.
            Algorithm::Auto => {
                plan_for(Algorithm::SplitK).or_else(|_| plan_for(Algorithm::Flash))?
            }
            a => plan_for(a)?,
        };
        let stride = seqs
            .iter()
            .map(|&s| cache.seq(s).map(|x| x.pages.len()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0)
            .max(1);
        let mut table = vec![0u32; seqs.len() * stride];
        for (b, &s) in seqs.iter().enumerate() {
            let pages = &cache.seq(s)?.pages;
            table[b * stride..b * stride + pages.len()].copy_from_slice(pages);
        }
        let dev = self.device();
        let init = |label: &str, bytes: &[u8]| {
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
        };
        let mut q_bytes = q.as_bytes().to_vec();
        q_bytes.resize(q_bytes.len().div_ceil(4) * 4, 0);
        let q_buf = init("q", &q_bytes);
        let lens_buf = init("kv_seqlens", bytemuck::cast_slice(&lens));
        let table_buf = init("block table", bytemuck::cast_slice(&table));
        let paging = Paging {
            table: &table_buf,
            page_size: c.page_size as u32,
            table_stride: stride as u32,
        };
        let inputs = GpuInputs {
            q: &q_buf,
            k: &cache.k,
            v: &cache.v,
            dtypes,
            bias: None,
            mask: None,
            alibi_slopes: None,
            q_seqlens: None,
            kv_seqlens: Some(&lens_buf),
        };
        let out_dtype = opts.out_dtype.unwrap_or(q.dtype());
        self.run_and_read(&p, plan, &inputs, out_dtype, &run, Some(&paging))
    }
}
