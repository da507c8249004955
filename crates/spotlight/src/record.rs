//! Recording GPU work: scratch buffers, dispatches (with grids folded past 65 535 workgroups),
//! the passes of each algorithm into one encoder, the uniform block and the f32 -> f16/bf16 pack.
//! Shared by attention, the lens, the cache's decode and the layer.

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Problem};

use crate::cache::Paging;
use crate::context::Engine;
use crate::error::{Error, Result};
use crate::kernels::{FlashLayout, Kernel, Variant};
use crate::options::{GpuInputs, GpuOutputs};
use crate::params::{PackParams, Params};
use crate::plan::{Plan, Run, plain_logits, wide_kv_rows};

/// Bindings 0..=8 of the fused kernels, in binding order.
fn fused_bindings(b: [&wgpu::Buffer; 9]) -> [(u32, &wgpu::Buffer); 9] {
    std::array::from_fn(|n| (n as u32, b[n]))
}

/// The scratch `encode` records into, by role. Each is written and read only inside one
/// recording of `encode` (one submission's passes, in order), so recordings may share them: any
/// number of encoders, submitted in any order, each find the data they wrote themselves (wgpu
/// orders the passes and submissions that use a buffer). Reusing them saves each call the
/// allocations and wgpu's zero-fill of fresh buffers, which on the decode path cost more than the
/// merge itself. Never given to a caller, never bound twice in one dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    /// Bound where a kernel's optional input (bias, mask) is absent.
    Unused,
    /// `[q_seqlens][kv_seqlens][slopes][block table]` (`params_and_aux`).
    Aux,
    /// O in f32 before the pack to a half output dtype.
    Out32,
    /// The LSE when the caller did not ask for it.
    Lse,
    /// Split-key partial O and LSE, before the merge.
    PartialOut,
    PartialLse,
}

/// Pooled scratch buffers up to this size are kept for reuse; larger ones are allocated per call
/// (their zero-fill is small beside the work that needs them) so that one large problem does not
/// pin its scratch for the engine's lifetime. Kept: at most 6 × 32 MiB per engine.
const POOL_MAX_BYTES: u64 = 32 << 20;

/// The engine's reusable scratch, one buffer per [`Slot`], grown (to a power of two) on demand.
#[derive(Default)]
pub(crate) struct ScratchPool {
    buffers: parking_lot::Mutex<std::collections::HashMap<Slot, wgpu::Buffer>>,
}

impl ScratchPool {
    /// Forgets every buffer (after an operation failed: one of them may be invalid).
    pub(crate) fn clear(&self) {
        self.buffers.lock().clear();
    }
}

/// P·V key tiles per dispatch where loops are bounded (see `Engine::pv_keys_per_dispatch`).
const PV_TILES_PER_DISPATCH_BOUNDED: usize = 2048;

/// A buffer size rounded up to whole words, at least one.
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

impl Engine {
    /// Keys one P·V dispatch of the three-pass path covers: all of them, except where the adapter
    /// bounds how long an invocation may loop (llvmpipe: measured, one P·V loop over 1.1 M keys
    /// went wrong silently; 2048 tiles of 16 keys stay far inside the bound).
    pub(crate) fn pv_keys_per_dispatch(&self, p: &Problem) -> usize {
        match self.capabilities().max_key_tiles_per_workgroup {
            Some(_) => PV_TILES_PER_DISPATCH_BOUNDED * 16,
            None => p.kv_len.max(1),
        }
    }

    pub(crate) fn scratch(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: padded(bytes),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A scratch buffer for `slot` of at least `bytes`, reused across calls (see [`Slot`]). A new
    /// pooled buffer is created inside its own out-of-memory scope and kept only once it exists,
    /// so no other call (thread) is ever handed a buffer whose allocation failed.
    pub(crate) fn pooled(&self, slot: Slot, bytes: u64) -> Result<wgpu::Buffer> {
        let label = match slot {
            Slot::Unused => "unused",
            Slot::Aux => "aux",
            Slot::Out32 => "out f32",
            Slot::Lse => "lse",
            Slot::PartialOut => "partial out",
            Slot::PartialLse => "partial lse",
        };
        let size = padded(bytes);
        if size > POOL_MAX_BYTES {
            return Ok(self.scratch(label, size));
        }
        let mut pool = self.scratch_pool.buffers.lock();
        if let Some(b) = pool.get(&slot)
            && b.size() >= size
        {
            return Ok(b.clone());
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let b = self.scratch(label, size.next_power_of_two().min(POOL_MAX_BYTES));
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        pool.insert(slot, b.clone());
        Ok(b)
    }

    /// Drops the scratch buffers the engine keeps for reuse across calls (one per role: the key
    /// split's partial outputs and LSEs, the f32 output before conversion, the LSE when not asked
    /// for, the sequence-length/block-table block; each at most 32 MiB, rounded up to a power of
    /// two). Calls allocate them again when next needed. For an application that ran a large
    /// problem once and wants the memory back; never needed for correctness.
    pub fn release_scratch(&self) {
        self.scratch_pool.clear();
    }

    pub(crate) fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        buffers: &[(u32, &wgpu::Buffer)],
        groups: u64,
    ) -> Result<()> {
        let (x, y) = self.fold(groups).ok_or_else(|| Error::GridTooLarge {
            what: format!("the {} dispatch", kernel.name),
            workgroups: groups,
            limit: (self.capabilities().max_workgroups_per_dim as u64).pow(2),
        })?;
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let stamps = self.pass_timestamps(kernel.shader.name());
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&kernel.name),
            timestamp_writes: stamps
                .as_ref()
                .map(|(set, at)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(*at),
                    end_of_pass_write_index: Some(at + 1),
                }),
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        Ok(())
    }

    pub(crate) fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Problem,
        plan: Plan,
        i: &GpuInputs<'_>,
        o: &GpuOutputs<'_>,
        paging: Option<&Paging<'_>>,
    ) -> Result<()> {
        let dev = &self.device;
        let mut uniform = Params::new(p);
        uniform.num_chunks = plan.chunks().count;
        uniform.chunk_keys = plan.chunks().keys;
        if let Some((base, total)) = plan.window {
            uniform.key_base = base;
            uniform.kv_total = total;
        }
        let (params, aux) = self.params_and_aux(enc, p, uniform, i, paging, true)?;
        let dummy = self.pooled(Slot::Unused, 4)?;
        let bias = i.bias.unwrap_or(&dummy);
        let mask = i.mask.unwrap_or(&dummy);
        let chunks = plan.chunks().count as u64;
        // A half output dtype: the fused kernel (tiled, rows, decode or on matrix units) of a
        // run without key chunks writes it itself where Dv is even (rows then start at even
        // elements: O's strides are multiples of Dv), the merge of a split run likewise;
        // otherwise (an odd Dv, the three-pass algorithm) O goes through f32 and the pack.
        let half_out =
            (o.out_dtype != DType::F32 && p.v_head_dim.is_multiple_of(2)).then_some(o.out_dtype);
        let fused_half = match plan.run {
            Run::Flash { .. } | Run::SplitK { .. } | Run::Coop { .. } if chunks == 1 => half_out,
            _ => None,
        };
        // The fused kernels: one variant, then (when the key range is cut into chunks) partial O
        // and LSE to scratch, merged by their LSE.
        let fused = match plan.run {
            Run::Flash { tiles, .. } | Run::SplitK { tiles, .. } => Some(
                Variant::flash(
                    i.dtypes,
                    p.head_dim as u32,
                    p.v_head_dim as u32,
                    tiles,
                    matches!(plan.run, Run::SplitK { .. }),
                    paging.is_some(),
                )
                .vec4_kv(wide_kv_rows(p))
                .plain_logits(plain_logits(p))
                .finite_v_branch(self.finite_v_branch())
                .out_half(fused_half)
                .native_f16(self.native_f16())
                .subgroup_rows(match tiles.layout {
                    // The decode kernel's tile max takes any subgroup size (num_subgroups).
                    FlashLayout::Decode => self.uses_subgroups(),
                    _ => self.subgroup_rows(tiles.tpr),
                }),
            ),
            Run::Coop { tiles, .. } => Some(
                Variant::flash_coop(i.dtypes, p.head_dim as u32, p.v_head_dim as u32, tiles)
                    .out_half(fused_half)
                    .native_f16(self.native_f16()),
            ),
            Run::ThreePass => None,
        };
        let merged = fused.is_some() && chunks > 1;
        let direct = fused_half.is_some() || (merged && half_out.is_some());
        let out_scratch = (o.out_dtype != DType::F32 && !direct)
            .then(|| self.pooled(Slot::Out32, p.o_elems() as u64 * 4))
            .transpose()?;
        let out32 = out_scratch.as_ref().unwrap_or(o.out);
        let lse_scratch = o
            .lse
            .is_none()
            .then(|| self.pooled(Slot::Lse, p.lse_elems() as u64 * 4))
            .transpose()?;
        let lse = o.lse.or(lse_scratch.as_ref()).expect("lse buffer");
        // The fused kernels' bindings (flash.wgsl and flash_coop.wgsl share them).
        let fused_binds = |o, l| fused_bindings([&params, &aux, bias, mask, i.q, i.k, i.v, o, l]);
        let grids = self.grids(p, plan);
        match fused {
            Some(variant) => {
                let kernel = self.cache.get(dev, &variant)?;
                let split = match merged {
                    true => Some((
                        self.pooled(Slot::PartialOut, chunks * p.o_elems() as u64 * 4)?,
                        self.pooled(Slot::PartialLse, chunks * p.lse_elems() as u64 * 4)?,
                    )),
                    false => None,
                };
                let (o_dst, lse_dst) = match &split {
                    Some((po, pl)) => (po, pl),
                    None => (out32, lse),
                };
                self.dispatch(enc, &kernel, &fused_binds(o_dst, lse_dst), grids[0].1)?;
                if let Some((po, pl)) = &split {
                    let merge_dtype = if out_scratch.is_some() {
                        DType::F32
                    } else {
                        o.out_dtype
                    };
                    let merge = self.cache.get(dev, &Variant::merge(merge_dtype))?;
                    let binds = [(0, &params), (4, po), (5, pl), (6, out32), (7, lse)];
                    self.dispatch(enc, &merge, &binds, grids[1].1)?;
                }
            }
            None => {
                let probs_scratch = o
                    .probs
                    .is_none()
                    .then(|| self.scratch("scores", p.probs_elems() as u64 * 4));
                let probs = o.probs.or(probs_scratch.as_ref()).expect("probs buffer");
                let scores = self.cache.get(
                    dev,
                    &Variant::scores(i.dtypes[0], i.dtypes[1]).native_f16(self.native_f16()),
                )?;
                let softmax = self.cache.get(dev, &Variant::softmax())?;
                let pv = self
                    .cache
                    .get(dev, &Variant::pv(i.dtypes[2]).native_f16(self.native_f16()))?;
                let binds = [
                    (0, &params),
                    (1, &aux),
                    (2, bias),
                    (3, mask),
                    (4, i.q),
                    (5, i.k),
                    (6, probs),
                ];
                self.dispatch(enc, &scores, &binds, grids[0].1)?;
                self.dispatch(
                    enc,
                    &softmax,
                    &[(0, &params), (4, probs), (5, lse)],
                    grids[1].1,
                )?;
                // P·V over key ranges one invocation may loop over (all keys but on llvmpipe),
                // each dispatch adding its part to O in key order (so still deterministic).
                let step = self.pv_keys_per_dispatch(p);
                for (n, begin) in (0..p.kv_len.max(1)).step_by(step).enumerate() {
                    let range: [u32; 4] = [
                        begin as u32,
                        (begin + step).min(p.kv_len) as u32,
                        (n > 0) as u32,
                        0,
                    ];
                    let range = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("pv key range"),
                        contents: bytemuck::cast_slice(&range),
                        usage: wgpu::BufferUsages::UNIFORM,
                    });
                    let binds = [
                        (0, &params),
                        (1, &aux),
                        (4, probs),
                        (5, i.v),
                        (6, out32),
                        (7, &range),
                    ];
                    self.dispatch(enc, &pv, &binds, grids[2].1)?;
                }
            }
        }
        if let Some(src) = &out_scratch {
            self.pack(enc, src, o.out, o.out_dtype, p.o_elems())?;
        }
        Ok(())
    }

    /// The uniform block and the aux buffer every attention kernel binds (0 and 1). aux is
    /// `[q_seqlens: B][kv_seqlens: B][alibi slopes: Hq][block table]`, gathered on the GPU from
    /// the caller's buffers. `pooled`: aux is the engine's reusable [`Slot::Aux`] (only for a
    /// caller whose aux is dead once its recording ends, as `encode`'s is).
    pub(crate) fn params_and_aux(
        &self,
        enc: &mut wgpu::CommandEncoder,
        p: &Problem,
        mut uniform: Params,
        i: &GpuInputs<'_>,
        paging: Option<&Paging<'_>>,
        pooled: bool,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer)> {
        let aux_words = (2 * p.batch + p.q_heads) as u64;
        if let Some(pg) = paging {
            uniform.page_size = pg.page_size;
            uniform.table_off = aux_words as u32;
            uniform.table_stride = pg.table_stride;
        }
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::bytes_of(&uniform),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let b4 = p.batch as u64 * 4;
        let table_bytes = paging.map_or(0, |pg| p.batch as u64 * pg.table_stride as u64 * 4);
        let aux_bytes = aux_words * 4 + table_bytes;
        let aux = if pooled {
            self.pooled(Slot::Aux, aux_bytes)?
        } else {
            self.scratch("aux", aux_bytes)
        };
        for (src, offset, size) in [
            (i.q_seqlens, 0, b4),
            (i.kv_seqlens, b4, b4),
            (i.alibi_slopes, 2 * b4, p.q_heads as u64 * 4),
            (paging.map(|pg| pg.table), aux_words * 4, table_bytes),
        ] {
            if let Some(src) = src {
                enc.copy_buffer_to_buffer(src, 0, &aux, offset, size);
            }
        }
        Ok((params, aux))
    }

    /// Converts `count` f32 values in `src` to packed `dtype` in `dst`.
    pub(crate) fn pack(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        dtype: DType,
        count: usize,
    ) -> Result<()> {
        let words = count.div_ceil(2) as u32;
        let pp = PackParams {
            count: count as u32,
            words,
            pad0: 0,
            pad1: 0,
        };
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("pack params"),
                contents: bytemuck::bytes_of(&pp),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let kernel = self.cache.get(&self.device, &Variant::pack(dtype))?;
        let groups = (words as u64).div_ceil(256);
        self.dispatch(enc, &kernel, &[(0, &params), (1, src), (2, dst)], groups)
    }
}
