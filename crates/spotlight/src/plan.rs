//! Planning a run: which algorithm with which tiles and key chunks, whether it fits the
//! adapter's limits (bindings, buffer sizes, grids), and what it will allocate. Nothing here
//! records GPU work. (Over 500 lines because its unit tests live here too: the planning itself
//! ends where `mod tests` starts.)

use spotlight_reference::{DType, Problem};

use crate::context::{Capabilities, Engine};
use crate::error::{Error, Result};
use crate::kernels::{CoopTiles, FlashTiles};
use crate::options::{Algorithm, FlashLayout, RunOptions};

/// Everything planning reads about an engine, as plain data: the adapter's capabilities, whether
/// it is a CPU adapter (lavapipe, llvmpipe, WARP, SwiftShader: the row kernels are the default
/// there) and whether the engine uses subgroups ([`Engine::without_subgroups`]). Planning is a
/// pure function of it and the problem, so its decisions are unit-tested without a GPU for the
/// adapter profiles in this module's tests.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) caps: Capabilities,
    pub(crate) cpu: bool,
    pub(crate) subgroups: bool,
}

/// How a fused kernel's key range is cut: `count` chunks of `keys` keys each, merged by their
/// LSE afterwards; `Chunks::WHOLE` when not cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunks {
    pub(crate) count: u32,
    pub(crate) keys: u32,
}

impl Chunks {
    pub(crate) const WHOLE: Chunks = Chunks { count: 1, keys: 0 };

    /// `keys` keys per chunk when a limit cuts `lk` keys, else whole.
    pub(crate) fn of(lk: u32, limit: Option<u32>) -> Self {
        match limit {
            Some(keys) if lk > keys => Chunks {
                count: lk.div_ceil(keys),
                keys,
            },
            _ => Chunks::WHOLE,
        }
    }
}

/// The kernels of a resolved algorithm, each with exactly what it needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Run {
    /// Scores, softmax, P·V (no tiles to choose, no key chunks).
    ThreePass,
    /// The fused scalar kernel, a tile of one head's query rows per workgroup.
    Flash { tiles: FlashTiles, chunks: Chunks },
    /// The fused scalar kernel with a key/value group's query rows packed into one unit.
    SplitK { tiles: FlashTiles, chunks: Chunks },
    /// The fused kernel on matrix units.
    Coop { tiles: CoopTiles, chunks: Chunks },
}

/// A resolved plan: the kernels, and the key window when the problem is a piece of a larger one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) run: Run,
    /// A key window of a split problem: `(key_base, kv_total)`; `None` when unsplit.
    pub(crate) window: Option<(u32, u32)>,
}

impl Plan {
    pub(crate) fn new(run: Run) -> Self {
        Plan { run, window: None }
    }

    pub(crate) fn three_pass() -> Self {
        Plan::new(Run::ThreePass)
    }

    /// The algorithm that runs.
    pub(crate) fn algorithm(&self) -> Algorithm {
        match self.run {
            Run::ThreePass => Algorithm::ThreePass,
            Run::Flash { .. } => Algorithm::Flash,
            Run::SplitK { .. } => Algorithm::SplitK,
            Run::Coop { .. } => Algorithm::FlashCoop,
        }
    }

    /// The plan in one word for logs and benchmarks, e.g. `flash/rows/bq32/bk32/tpr8/chunks1`
    /// or `flash-coop/edge8/rows32/bk32/chunks1`.
    pub(crate) fn describe(&self) -> String {
        let c = self.chunks().count;
        match self.run {
            Run::ThreePass => "three-pass".into(),
            Run::Flash { tiles: t, .. } | Run::SplitK { tiles: t, .. } => format!(
                "{}/{}/bq{}/bk{}/tpr{}/chunks{c}",
                self.algorithm().name(),
                t.layout.name(),
                t.bq,
                t.bk,
                t.tpr
            ),
            Run::Coop { tiles: t, .. } => format!(
                "flash-coop/edge{}/rows{}/bk{}/chunks{c}",
                t.edge,
                t.rows(),
                t.bk
            ),
        }
    }

    /// The key chunks of a fused kernel (whole for three-pass).
    pub(crate) fn chunks(&self) -> Chunks {
        match self.run {
            Run::ThreePass => Chunks::WHOLE,
            Run::Flash { chunks, .. } | Run::SplitK { chunks, .. } | Run::Coop { chunks, .. } => {
                chunks
            }
        }
    }
}

/// The reason inside an `Unsupported` error, or the error's text.
fn unsupported_reason(e: &Error) -> String {
    match e {
        Error::Unsupported { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Keys per row the three-pass softmax takes where loops are bounded: each of its 128 threads
/// loops twice over a row's keys. Measured on lavapipe: 3.6 M keys right, 6 M silently wrong.
const THREE_PASS_MAX_KEYS_BOUNDED: usize = 3_600_000;

/// Whether only bands (causal, window) and lengths hide keys: no mask, bias, ALiBi or soft cap,
/// so the row kernel may run without its general per-logit path (`PLAIN_LOGITS`). (A validated
/// soft cap is finite and >= 0, so `<= 0` is the kernel's `!(softcap > 0)`.)
pub(crate) fn plain_logits(p: &Problem) -> bool {
    p.mask.is_none() && p.bias.is_none() && !p.alibi && p.effective_softcap() <= 0.0
}

/// Whether every K and V row starts at a multiple of 4 elements (so the row kernel may read
/// them four elements per load): head dims and every stride (batch, sequence, head; with a paged
/// cache the same strides inside a page) are multiples of 4.
pub(crate) fn wide_kv_rows(p: &Problem) -> bool {
    let (k, v) = (p.k_strides(), p.v_strides());
    [
        p.head_dim,
        p.v_head_dim,
        k.batch,
        k.seq,
        k.head,
        v.batch,
        v.seq,
        v.head,
    ]
    .iter()
    .all(|x| x % 4 == 0)
}

impl Target {
    /// Flash tiles for this problem on this adapter, or why there are none. `rows` caps the
    /// query rows of a tiled workgroup (see [`FlashTiles::choose`]); `unit_rows` is the number of
    /// query rows one unit holds (a head's, or with split-K a key/value group's), which the row
    /// kernel's row count depends on.
    pub(crate) fn flash_tiles(
        &self,
        p: &Problem,
        rows: usize,
        unit_rows: usize,
        opts: &RunOptions,
    ) -> std::result::Result<FlashTiles, String> {
        let layout = opts.flash_layout;
        let caps = &self.caps;
        if caps.max_storage_buffers_per_stage < 8 {
            return Err(format!(
                "the fused kernel binds 8 storage buffers per shader stage; this device allows {} ({} short)",
                caps.max_storage_buffers_per_stage,
                8 - caps.max_storage_buffers_per_stage
            ));
        }
        let r = Engine::row_count(
            opts.rows_per_workgroup,
            &FlashTiles::ROWS_R,
            FlashTiles::row_count(
                unit_rows,
                p.v_head_dim as u32,
                self.row_lanes().unwrap_or(8),
                p.probs_elems() as u64,
            ),
        )?;
        let fitting = |r: u32| {
            self.row_lanes().filter(|&n| {
                FlashTiles::rows(n, r).fits(
                    p.head_dim as u32,
                    p.v_head_dim as u32,
                    caps.max_workgroup_memory,
                )
            })
        };
        // The kernel's own choice steps down to fewer rows where the adapter's workgroup memory
        // does not hold it (only heads wide enough to stage Q use any; a forced count is taken
        // or refused as it is).
        let (r, lanes) = match opts.rows_per_workgroup {
            Some(_) => (r, fitting(r)),
            None => FlashTiles::ROWS_R
                .iter()
                .rev()
                .filter(|&&c| c <= r)
                .find_map(|&c| fitting(c).map(|n| (c, Some(n))))
                .unwrap_or((r, None)),
        };
        let cpu = self.cpu;
        match (layout, lanes) {
            (Some(FlashLayout::Rows), None) => {
                return Err(self.row_kernel_refusal(p.head_dim, p.v_head_dim));
            }
            (Some(FlashLayout::Rows), Some(lanes)) => return Ok(FlashTiles::rows(lanes, r)),
            (None, Some(lanes)) if cpu => return Ok(FlashTiles::rows(lanes, r)),
            _ => {}
        }
        FlashTiles::choose(
            p.head_dim as u32,
            p.v_head_dim as u32,
            caps.max_workgroup_memory,
            caps.max_invocations,
            rows.min(64) as u32,
        )
        .ok_or_else(|| {
            format!(
                "head dims D={} Dv={} need more than the {} bytes of workgroup memory (or Dv > 512)",
                p.head_dim, p.v_head_dim, caps.max_workgroup_memory
            )
        })
    }

    /// The decode kernel's tiles for units of `unit_rows` query rows, or why it cannot run them:
    /// every row of a unit in one workgroup (their count rounded up to a power of two, which
    /// bounds the variants), [`FlashTiles::DECODE_THREADS`] threads (fewer where the adapter
    /// allows fewer invocations), at least one per output vec4 column.
    pub(crate) fn decode_tiles(
        &self,
        p: &Problem,
        unit_rows: usize,
    ) -> std::result::Result<FlashTiles, String> {
        let caps = &self.caps;
        if caps.max_storage_buffers_per_stage < 8 {
            return Err(format!(
                "the fused kernels bind 8 storage buffers per shader stage; this device allows {}",
                caps.max_storage_buffers_per_stage
            ));
        }
        let max_rows = FlashTiles::DECODE_MAX_ROWS as usize;
        if unit_rows > max_rows {
            return Err(format!(
                "the decode layout holds at most {max_rows} query rows per workgroup (Lq·Hq/Hkv \
                 for split-k, Lq for flash); this problem has {unit_rows}"
            ));
        }
        let (d, dv) = (p.head_dim as u32, p.v_head_dim as u32);
        let rows = (unit_rows.max(1) as u32).next_power_of_two();
        let mut threads = FlashTiles::DECODE_THREADS;
        // Fewer threads where the adapter allows fewer invocations, or where the per-row
        // weights of a tile do not fit its workgroup memory (lavapipe's 32 KiB at 16 rows of
        // D = 128), down to one thread per output vec4 column.
        while threads > caps.max_invocations
            || (threads / 2 >= dv.div_ceil(4)
                && !FlashTiles::decode(rows, threads).fits(d, dv, caps.max_workgroup_memory))
        {
            threads /= 2;
        }
        let tiles = FlashTiles::decode(rows, threads);
        if !tiles.fits(d, dv, caps.max_workgroup_memory) {
            return Err(format!(
                "the decode layout needs {} bytes of workgroup memory and one of its {threads} \
                 threads per output vec4 column for D={d} Dv={dv}; this device offers {} bytes",
                tiles.workgroup_bytes(d, dv),
                caps.max_workgroup_memory
            ));
        }
        Ok(tiles)
    }

    /// The fused plan. Flash gives each workgroup a tile of query rows of one head and streams
    /// every key; split-K packs the query rows of all heads of a key/value group into one unit
    /// and splits the key range into enough chunks to fill the GPU. Either way, when the adapter
    /// or the caller bounds the keys one workgroup may stream, the range is split into chunks
    /// that a merge pass combines exactly by their LSE.
    pub(crate) fn fused_plan(
        &self,
        p: &Problem,
        algorithm: Algorithm,
        opts: &RunOptions,
    ) -> Result<Plan> {
        let split_k = algorithm == Algorithm::SplitK;
        let (rows, unit_rows) = if split_k {
            (p.q_len * p.group_size(), p.q_len * p.group_size())
        } else {
            (64, p.q_len)
        };
        // The decode kernel: where forced, or for split-k on a GPU when the unit's rows fit it
        // (on CPU adapters the row kernel reads K and V at a lane-uniform address, faster there).
        let decode = match opts.flash_layout {
            Some(FlashLayout::Decode) => Some(
                self.decode_tiles(p, unit_rows)
                    .map_err(|reason| Error::Unsupported { algorithm, reason })?,
            ),
            None if split_k && !self.cpu => self.decode_tiles(p, unit_rows).ok(),
            _ => None,
        };
        let tiles = match decode {
            Some(t) => t,
            None => self
                .flash_tiles(p, rows, unit_rows, opts)
                .map_err(|reason| Error::Unsupported { algorithm, reason })?,
        };
        let lk = p.kv_len as u32;
        let mut limit = self.key_limit(tiles.bk, opts);
        if split_k {
            // Enough workgroups to fill the GPU: about 512 on a discrete or integrated GPU (an
            // H100 has 132 SMs, a few workgroups each), 16 on a CPU adapter; each chunk keeps at
            // least 4 key tiles so the merge stays cheap.
            let target: u64 = if self.cpu { 16 } else { 512 };
            let units = (p.batch * p.kv_heads) as u64 * rows.div_ceil(tiles.bq as usize) as u64;
            let want_chunks = target.div_ceil(units.max(1)).max(1) as u32;
            let min_keys = 4 * tiles.bk;
            let keys = lk.div_ceil(want_chunks).div_ceil(tiles.bk) * tiles.bk;
            let keys = keys.max(min_keys);
            limit = Some(limit.map_or(keys, |l| l.min(keys)));
        }
        let chunks = Chunks::of(lk, limit);
        Ok(Plan::new(if split_k {
            Run::SplitK { tiles, chunks }
        } else {
            Run::Flash { tiles, chunks }
        }))
    }

    /// The plan for `p` with Q, K and V stored as `dtypes`.
    pub(crate) fn plan(&self, p: &Problem, dtypes: [DType; 3], opts: &RunOptions) -> Result<Plan> {
        self.plan_impl(p, dtypes, opts, false)
    }

    /// The plan; `paged`: K and V live in a paged cache (whose pools were checked against the
    /// limits when the cache was made).
    pub(crate) fn plan_impl(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Result<Plan> {
        p.validate()?;
        // A row count the row kernel does not have is the caller's mistake on every algorithm
        // (auto must not fall back to three-pass over it).
        Engine::row_count(opts.rows_per_workgroup, &FlashTiles::ROWS_R, 8).map_err(|reason| {
            Error::Unsupported {
                algorithm: opts.algorithm,
                reason,
            }
        })?;
        if opts.probs
            && matches!(
                opts.algorithm,
                Algorithm::Flash | Algorithm::SplitK | Algorithm::FlashCoop
            )
        {
            return Err(Error::Unsupported {
                algorithm: opts.algorithm,
                reason: "the fused kernel never materialises the probability map; use three-pass or auto".into(),
            });
        }
        let plan = match opts.algorithm {
            Algorithm::FlashCoop => {
                let tiles = self.coop_tiles(p).map_err(|reason| Error::Unsupported {
                    algorithm: Algorithm::FlashCoop,
                    reason,
                })?;
                let chunks = self.coop_chunks(p, tiles, opts);
                Plan::new(Run::Coop { tiles, chunks })
            }
            Algorithm::ThreePass => Plan::three_pass(),
            Algorithm::Flash | Algorithm::SplitK => self.fused_plan(p, opts.algorithm, opts)?,
            Algorithm::Auto if opts.probs => Plan::three_pass(),
            Algorithm::Auto => {
                // Split-K for decoding (a few query rows against a long key range), flash else;
                // three-pass when the fused kernel cannot take the head dims or the adapter's
                // limits; and when nothing fits, say why for each.
                let decode = p.q_len <= 16 && p.kv_len >= 1024;
                let first = if decode {
                    Algorithm::SplitK
                } else {
                    Algorithm::Flash
                };
                match self
                    .fused_plan(p, first, opts)
                    .or_else(|_| self.fused_plan(p, Algorithm::Flash, opts))
                {
                    Ok(plan) => plan,
                    Err(fused) => {
                        if let Err(three) = self.check_bindings(Algorithm::ThreePass) {
                            return Err(Error::Unsupported {
                                algorithm: Algorithm::Auto,
                                reason: format!(
                                    "no algorithm fits this adapter: flash: {}; three-pass: {}",
                                    unsupported_reason(&fused),
                                    unsupported_reason(&three)
                                ),
                            });
                        }
                        Plan::three_pass()
                    }
                }
            }
        };
        self.check_bindings(plan.algorithm())?;
        if plan.algorithm() == Algorithm::ThreePass
            && self.caps.max_key_tiles_per_workgroup.is_some()
            && p.kv_len > THREE_PASS_MAX_KEYS_BOUNDED
        {
            return Err(Error::Unsupported {
                algorithm: Algorithm::ThreePass,
                reason: format!(
                    "{} keys: on this adapter (llvmpipe, whose loops end silently after about 65 535 \
                     iterations) the softmax pass takes at most {THREE_PASS_MAX_KEYS_BOUNDED} keys per row; \
                     use flash (without the probability map)",
                    p.kv_len
                ),
            });
        }
        self.check_limits(p, plan, dtypes, opts, paged)?;
        Ok(plan)
    }

    /// Whether the adapter lets every pass of `algorithm` bind what it binds: storage buffers per
    /// shader stage, uniform buffers per stage, and the invocations of its fixed-size workgroups.
    /// Checked at planning time, so a downlevel device gets a clear refusal instead of a
    /// pipeline error.
    pub(crate) fn check_bindings(&self, algorithm: Algorithm) -> Result<()> {
        let caps = &self.caps;
        // (pass, storage buffers, uniform buffers, invocations per workgroup), from the @binding
        // lists and workgroup sizes of each shader.
        let passes: &[(&str, u32, u32, u32)] = match algorithm {
            Algorithm::ThreePass => &[
                ("scores", 6, 1, 256),
                ("softmax", 2, 1, 128),
                ("pv", 4, 2, 256),
                ("pack", 2, 1, 256),
            ],
            Algorithm::Flash | Algorithm::SplitK | Algorithm::FlashCoop => {
                &[("fused", 8, 1, 0), ("merge", 4, 1, 64), ("pack", 2, 1, 256)]
            }
            Algorithm::Auto => &[],
        };
        for &(pass, storage, uniform, invocations) in passes {
            let short = [
                (
                    "storage buffers per shader stage (max_storage_buffers_per_shader_stage)",
                    storage,
                    caps.max_storage_buffers_per_stage,
                ),
                (
                    "uniform buffers per shader stage (max_uniform_buffers_per_shader_stage)",
                    uniform,
                    caps.max_uniform_buffers_per_stage,
                ),
                (
                    "invocations per workgroup (max_compute_invocations_per_workgroup)",
                    invocations,
                    caps.max_invocations,
                ),
            ];
            for (what, need, have) in short {
                if need > have {
                    return Err(Error::Unsupported {
                        algorithm,
                        reason: format!(
                            "its {pass} pass needs {need} {what}; this device allows {have} \
                             ({} short)",
                            need - have
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Every device buffer a plan allocates or binds, with its size in bytes: inputs in their
    /// storage dtypes (f16/bf16 two bytes an element), outputs in theirs, and every scratch
    /// buffer (the f32 output before packing, the LSE when not asked for, the key split's partial
    /// results, the three-pass score matrix).
    pub(crate) fn plan_buffers(
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Vec<(String, u64)> {
        let n = |elems: usize, size: usize| elems as u64 * size as u64;
        let out_dtype = opts.out_dtype.unwrap_or(dtypes[0]);
        let mut buffers: Vec<(String, u64)> = vec![
            ("q".into(), n(p.q_elems(), dtypes[0].size())),
            ("k".into(), n(p.k_elems(), dtypes[1].size())),
            ("v".into(), n(p.v_elems(), dtypes[2].size())),
            ("out".into(), n(p.o_elems(), out_dtype.size())),
            ("lse".into(), n(p.lse_elems(), 4)),
        ];
        if out_dtype != DType::F32 {
            buffers.push(("the f32 output before conversion".into(), n(p.o_elems(), 4)));
        }
        if paged {
            buffers.retain(|(what, _)| what != "k" && what != "v");
        }
        if let Some(b) = p.bias {
            buffers.push(("bias".into(), n(p.broadcast_elems(&b), 4)));
        }
        if let Some(b) = p.mask {
            buffers.push(("mask".into(), n(p.broadcast_elems(&b), 1)));
        }
        if plan.chunks().count > 1 {
            let c = plan.chunks().count as u64;
            buffers.push((
                "the partial outputs of the key split".into(),
                c * p.o_elems() as u64 * 4,
            ));
            buffers.push((
                "the partial LSEs of the key split".into(),
                c * p.lse_elems() as u64 * 4,
            ));
        }
        if plan.algorithm() == Algorithm::ThreePass {
            buffers.push((
                format!(
                    "the three-pass score matrix [B={}, Hq={}, Lq={}, Lk={}]",
                    p.batch, p.q_heads, p.q_len, p.kv_len
                ),
                p.probs_elems() as u64 * 4,
            ));
        }
        buffers
    }

    /// Bytes of device memory a plan uses (inputs, outputs, scratch).
    pub(crate) fn plan_bytes(
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> u64 {
        let aux = (2 * p.batch + p.q_heads) as u64 * 4 + 128;
        Self::plan_buffers(p, plan, dtypes, opts, false)
            .iter()
            .map(|(_, b)| b)
            .sum::<u64>()
            + aux
    }

    /// Every buffer the plan binds must fit the binding and buffer limits, and every grid the
    /// workgroup-count limit (after folding into two dimensions).
    pub(crate) fn check_limits(
        &self,
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
        paged: bool,
    ) -> Result<()> {
        let caps = &self.caps;
        let buffers = Self::plan_buffers(p, plan, dtypes, opts, paged);
        let limits = [
            ("max_storage_buffer_binding_size", caps.max_storage_binding),
            ("max_buffer_size", caps.max_buffer_size),
        ];
        for (what, bytes) in buffers {
            if let Some((limit_name, limit)) = limits.into_iter().find(|&(_, l)| bytes > l) {
                return Err(Error::LimitExceeded {
                    what,
                    bytes,
                    limit_name,
                    limit,
                });
            }
        }
        for (what, groups) in self.grids(p, plan) {
            self.fold(groups).ok_or_else(|| Error::GridTooLarge {
                what: format!("the {what} pass"),
                workgroups: groups,
                limit: (caps.max_workgroups_per_dim as u64).pow(2),
            })?;
        }
        Ok(())
    }

    /// Workgroup counts of each pass.
    pub(crate) fn grids(&self, p: &Problem, plan: Plan) -> Vec<(&'static str, u64)> {
        let bh = (p.batch * p.q_heads) as u64;
        let t16 = |n: usize| n.div_ceil(16) as u64;
        let merge = ("merge", bh * p.q_len as u64);
        match plan.run {
            Run::Flash { tiles, chunks } | Run::SplitK { tiles, chunks } => {
                // Split-k's unit is a key/value group with its query heads' rows packed.
                let (units, rows) = match plan.run {
                    Run::SplitK { .. } => ((p.batch * p.kv_heads) as u64, p.q_len * p.group_size()),
                    _ => (bh, p.q_len),
                };
                let groups = units * rows.div_ceil(tiles.bq as usize) as u64;
                vec![("flash", groups * chunks.count as u64), merge]
            }
            Run::Coop { tiles, chunks } => {
                let groups = bh * p.q_len.div_ceil(tiles.rows() as usize) as u64;
                vec![("flash-coop", groups * chunks.count as u64), merge]
            }
            Run::ThreePass => vec![
                ("scores", bh * t16(p.q_len) * t16(p.kv_len)),
                ("softmax", bh * p.q_len as u64),
                ("pv", bh * t16(p.q_len) * t16(p.v_head_dim)),
            ],
        }
    }

    /// Folds a 1-D workgroup count into (x, y) within the per-dimension limit.
    pub(crate) fn fold(&self, groups: u64) -> Option<(u32, u32)> {
        let max = self.caps.max_workgroups_per_dim as u64;
        let x = groups.clamp(1, max);
        let y = groups.div_ceil(x).max(1);
        (y <= max).then_some((x as u32, y as u32))
    }
}

impl Target {
    /// Keys one fused workgroup may stream, in whole tiles of `bk` keys: where the adapter bounds
    /// the key tiles per workgroup (llvmpipe) or the caller bounds the keys
    /// (`max_chunk_keys`); `None` = no bound.
    pub(crate) fn key_limit(&self, bk: u32, opts: &RunOptions) -> Option<u32> {
        let mut limit = self.caps.max_key_tiles_per_workgroup.map(|t| t * bk);
        if let Some(k) = opts.max_chunk_keys {
            let k = (k / bk).max(1) * bk;
            limit = Some(limit.map_or(k, |l| l.min(k)));
        }
        limit
    }

    /// The lanes of the row kernels (`flash_rows.wgsl` and the backward's): their workgroup is
    /// one subgroup, so the device must use subgroups of one fixed size, 4 to 64.
    pub(crate) fn row_lanes(&self) -> Option<u32> {
        let c = &self.caps;
        (self.subgroups
            && c.subgroups
            && c.subgroup_min_size == c.subgroup_max_size
            && (4..=64).contains(&c.subgroup_min_size))
        .then_some(c.subgroup_min_size)
    }

    /// Why the row kernels cannot run head dims `d`, `dv` here (for a caller that forced them).
    pub(crate) fn row_kernel_refusal(&self, d: usize, dv: usize) -> String {
        let c = &self.caps;
        format!(
            "the row kernels need head dims D, Dv <= {} and subgroups of one fixed size between 4 \
             and 64; this problem has D={d} Dv={dv}, this device's subgroups: {}",
            FlashTiles::ROWS_MAX_DIM,
            if c.subgroups && self.subgroups {
                format!("sizes {}..={}", c.subgroup_min_size, c.subgroup_max_size)
            } else {
                "none (or they are turned off)".to_string()
            }
        )
    }
}

/// The engine's planning is its [`Target`]'s.
impl Engine {
    /// What planning reads of this engine.
    pub(crate) fn target(&self) -> Target {
        Target {
            caps: self.capabilities().clone(),
            cpu: self.is_cpu(),
            subgroups: self.uses_subgroups(),
        }
    }

    /// The plan for `p` with Q, K and V stored as `dtypes`.
    pub(crate) fn plan(&self, p: &Problem, dtypes: [DType; 3], opts: &RunOptions) -> Result<Plan> {
        self.target().plan(p, dtypes, opts)
    }

    /// A plan for K and V in a paged cache (whose pools were checked against the limits when
    /// the cache was made).
    pub(crate) fn plan_paged(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> Result<Plan> {
        self.target().plan_impl(p, dtypes, opts, true)
    }

    /// Bytes of device memory a plan uses (inputs, outputs, scratch).
    pub(crate) fn plan_bytes(
        &self,
        p: &Problem,
        plan: Plan,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> u64 {
        Target::plan_bytes(p, plan, dtypes, opts)
    }

    /// Workgroup counts of each pass.
    pub(crate) fn grids(&self, p: &Problem, plan: Plan) -> Vec<(&'static str, u64)> {
        self.target().grids(p, plan)
    }

    /// Folds a 1-D workgroup count into (x, y) within the per-dimension limit.
    pub(crate) fn fold(&self, groups: u64) -> Option<(u32, u32)> {
        self.target().fold(groups)
    }
}

/// Planning decisions pinned for adapter profiles, without a GPU (`cargo test -p spotlight`).
#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn caps() -> Capabilities {
        Capabilities {
            shader_f16: true,
            subgroups: true,
            subgroup_min_size: 32,
            subgroup_max_size: 32,
            cooperative_matrix: false,
            timestamp_query: true,
            max_storage_binding: 2048 * MIB,
            max_buffer_size: 4096 * MIB,
            max_workgroup_memory: 48 * 1024,
            max_invocations: 1024,
            max_workgroups_per_dim: 65535,
            max_storage_buffers_per_stage: 16,
            max_uniform_buffers_per_stage: 12,
            coop_edge: 0,
            max_key_tiles_per_workgroup: None,
        }
    }

    /// Debian 12's lavapipe (Mesa 22.3): subgroups of 8, 32 KiB, 128 MiB bindings, bounded loops.
    fn lavapipe() -> Target {
        Target {
            caps: Capabilities {
                subgroup_min_size: 8,
                subgroup_max_size: 8,
                max_storage_binding: 128 * MIB,
                max_workgroup_memory: 32 * 1024,
                max_key_tiles_per_workgroup: Some(64),
                ..caps()
            },
            cpu: true,
            subgroups: true,
        }
    }

    /// An NVIDIA GPU through Vulkan (the H200 as wgpu reports it): 16x16 matrix units.
    fn nvidia() -> Target {
        Target {
            caps: Capabilities {
                cooperative_matrix: true,
                coop_edge: 16,
                ..caps()
            },
            cpu: false,
            subgroups: true,
        }
    }

    /// An Apple-like GPU: subgroups of 32, 32 KiB, 8x8 matrix units.
    fn apple() -> Target {
        Target {
            caps: Capabilities {
                max_workgroup_memory: 32 * 1024,
                cooperative_matrix: true,
                coop_edge: 8,
                ..caps()
            },
            cpu: false,
            subgroups: true,
        }
    }

    /// A downlevel device: 4 storage buffers per stage, no subgroups, 16 KiB, small grids.
    fn downlevel() -> Target {
        Target {
            caps: Capabilities {
                shader_f16: false,
                subgroups: false,
                subgroup_min_size: 0,
                subgroup_max_size: 0,
                max_storage_buffers_per_stage: 4,
                max_workgroup_memory: 16 * 1024,
                max_invocations: 256,
                ..caps()
            },
            cpu: false,
            subgroups: false,
        }
    }

    const F32: [DType; 3] = [DType::F32; 3];

    fn plan(t: &Target, p: &Problem, opts: &RunOptions) -> Result<Plan> {
        t.plan(p, F32, opts)
    }

    /// The fused scalar kernel's tiles of a plan (panics for another plan).
    fn fused(plan: &Plan) -> FlashTiles {
        match plan.run {
            Run::Flash { tiles, .. } | Run::SplitK { tiles, .. } => tiles,
            other => panic!("not a fused plan: {other:?}"),
        }
    }

    fn auto() -> RunOptions {
        RunOptions::default()
    }

    fn forced(algorithm: Algorithm) -> RunOptions {
        RunOptions {
            algorithm,
            ..Default::default()
        }
    }

    #[test]
    fn only_bands_and_lengths_leave_the_logits_plain() {
        use spotlight_reference::{Broadcast, Window};
        let p = || Problem::new(2, 64, 64, 2, 2, 64);
        let all = Broadcast { batch: 2, heads: 2 };
        let window = Window {
            left: Some(3),
            right: Some(0),
        };
        // Causal, windows and lengths are the band path's: plain.
        let mut banded = p().q_seqlens(true).kv_seqlens(true).softcap(Some(0.0));
        banded.causal = true;
        banded.window = Some(window);
        assert!(plain_logits(&p()) && plain_logits(&banded));
        // Each of mask, bias, ALiBi and a soft cap needs the general path.
        for general in [
            p().mask(Some(all)),
            p().bias(Some(all)),
            p().alibi(true),
            p().softcap(Some(30.0)),
        ] {
            assert!(!plain_logits(&general), "{general:?}");
        }
    }

    #[test]
    fn lavapipe_runs_the_row_kernel_with_16_or_32_rows_where_a_unit_has_64_or_128() {
        let t = lavapipe();
        let big = plan(&t, &Problem::new(1, 1024, 1024, 2, 2, 64), &auto()).unwrap();
        assert_eq!(big.algorithm(), Algorithm::Flash);
        let tiles = fused(&big);
        assert_eq!(tiles.layout, FlashLayout::Rows);
        assert_eq!((tiles.bq, tiles.tpr, tiles.bk), (32, 8, 32));
        // Wider value rows (4 output vec4 columns per lane) keep 16.
        let wide = plan(&t, &Problem::new(1, 1024, 1024, 2, 2, 128), &auto()).unwrap();
        assert_eq!(fused(&wide).bq, 16);
        // Where 32 rows of a D = 256 query do not fit the workgroup memory (16 KiB), 16 do.
        let small_memory = Target {
            caps: Capabilities {
                max_workgroup_memory: 16 * 1024,
                ..lavapipe().caps
            },
            ..lavapipe()
        };
        let deep = Problem::new(1, 1024, 1024, 1, 1, 256).v_head_dim(64);
        let tiles = fused(&plan(&small_memory, &deep, &auto()).unwrap());
        assert_eq!((tiles.layout, tiles.bq), (FlashLayout::Rows, 16));
        // Any size from 64 query rows per head; fewer keep 8.
        let small = plan(&t, &Problem::new(1, 64, 64, 1, 1, 64), &auto()).unwrap();
        assert_eq!(fused(&small).bq, 16);
        let short = plan(&t, &Problem::new(4, 63, 4096, 2, 2, 64), &auto()).unwrap();
        assert_eq!(fused(&short).bq, 8);
        // The caller may force either count, and nothing else.
        let eight = RunOptions {
            rows_per_workgroup: Some(8),
            ..auto()
        };
        let forced8 = plan(&t, &Problem::new(1, 1024, 1024, 2, 2, 64), &eight).unwrap();
        assert_eq!(fused(&forced8).bq, 8);
        let twelve = RunOptions {
            rows_per_workgroup: Some(12),
            ..auto()
        };
        let e = plan(&t, &Problem::new(1, 64, 64, 1, 1, 64), &twelve).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        // Without subgroups (the engine turned them off) the tiled kernel runs.
        let off = Target {
            subgroups: false,
            ..lavapipe()
        };
        let tiled = plan(&off, &Problem::new(1, 1024, 1024, 2, 2, 64), &auto()).unwrap();
        assert_eq!(fused(&tiled).layout, FlashLayout::Tiled);
    }

    #[test]
    fn plans_describe_themselves_in_one_word() {
        let p = Problem::new(1, 1024, 1024, 2, 2, 64);
        let d = plan(&lavapipe(), &p, &auto()).unwrap().describe();
        assert_eq!(d, "flash/rows/bq32/bk32/tpr8/chunks1");
        let q = Problem::new(1, 256, 256, 2, 2, 128);
        let coop = forced(Algorithm::FlashCoop);
        let d = plan(&nvidia(), &q, &coop).unwrap().describe();
        assert_eq!(d, "flash-coop/edge16/rows32/bk32/chunks1");
        assert_eq!(Plan::three_pass().describe(), "three-pass");
    }

    #[test]
    fn lavapipe_splits_long_key_ranges_into_chunks_of_64_tiles() {
        let t = lavapipe();
        let p = Problem::new(1, 64, 100_000, 1, 1, 64);
        let pl = plan(&t, &p, &forced(Algorithm::Flash)).unwrap();
        let bk = fused(&pl).bk;
        assert_eq!(pl.chunks().keys, 64 * bk);
        assert_eq!(pl.chunks().count, 100_000u32.div_ceil(64 * bk));
        // No such bound on a GPU: one chunk.
        let gpu = plan(&nvidia(), &p, &forced(Algorithm::Flash)).unwrap();
        assert_eq!(gpu.chunks().count, 1);
        // The caller's bound applies everywhere, in whole tiles.
        let capped = RunOptions {
            max_chunk_keys: Some(1000),
            ..forced(Algorithm::Flash)
        };
        let c = plan(&nvidia(), &p, &capped).unwrap();
        let bk = fused(&c).bk;
        assert_eq!(c.chunks().keys, (1000 / bk) * bk);
        assert_eq!(c.chunks().count, 100_000u32.div_ceil(c.chunks().keys));
    }

    #[test]
    fn decoding_takes_split_k_with_enough_chunks_to_fill_the_adapter() {
        // One query row against 32k keys, 32/8 heads: 8 units of 4 rows.
        let p = Problem::new(1, 1, 32768, 32, 8, 128);
        let gpu = plan(&nvidia(), &p, &auto()).unwrap();
        assert_eq!(gpu.algorithm(), Algorithm::SplitK);
        assert!(gpu.chunks().count >= 32, "{gpu:?}");
        // On a GPU, the decode kernel: the 4 rows of a group in one workgroup of 128 threads,
        // chunks of whole 128-key tiles.
        assert_eq!(fused(&gpu), FlashTiles::decode(4, 128));
        assert_eq!(gpu.chunks().keys % 128, 0, "{gpu:?}");
        assert_eq!(
            fused(&plan(&lavapipe(), &p, &auto()).unwrap()).layout,
            FlashLayout::Rows
        );
        let cpu = plan(&lavapipe(), &p, &auto()).unwrap();
        assert_eq!(cpu.algorithm(), Algorithm::SplitK);
        assert!(
            cpu.chunks().count >= 2 && cpu.chunks().count < gpu.chunks().count,
            "{cpu:?}"
        );
        // A prefill of the same heads stays on flash.
        let prefill = plan(&nvidia(), &Problem::new(1, 512, 512, 32, 8, 128), &auto()).unwrap();
        assert_eq!(prefill.algorithm(), Algorithm::Flash);
        assert_eq!(fused(&prefill).layout, FlashLayout::Tiled);
    }

    #[test]
    fn the_decode_kernel_takes_units_of_up_to_sixteen_rows() {
        let forced = RunOptions {
            algorithm: Algorithm::SplitK,
            flash_layout: Some(FlashLayout::Decode),
            ..Default::default()
        };
        // 4 query rows × 4 heads per group = 16 rows: taken, also on a CPU adapter when forced;
        // lavapipe's 32 KiB at D = 128 gets 64 threads.
        let p = Problem::new(1, 4, 4096, 16, 4, 128);
        assert_eq!(
            fused(&plan(&nvidia(), &p, &forced).unwrap()),
            FlashTiles::decode(16, 128)
        );
        assert_eq!(
            fused(&plan(&lavapipe(), &p, &forced).unwrap()),
            FlashTiles::decode(16, 64)
        );
        // 5 × 4 = 20 rows: refused when forced, the tiled kernel under auto.
        let p = Problem::new(1, 5, 4096, 16, 4, 128);
        let e = plan(&nvidia(), &p, &forced).unwrap_err();
        assert!(e.to_string().contains("at most 16 query rows"), "{e}");
        let split = RunOptions {
            algorithm: Algorithm::SplitK,
            ..Default::default()
        };
        assert_eq!(
            fused(&plan(&nvidia(), &p, &split).unwrap()).layout,
            FlashLayout::Tiled
        );
        // Flash's unit is one head: Lq rows.
        let p = Problem::new(2, 3, 700, 8, 8, 64);
        let flash = RunOptions {
            algorithm: Algorithm::Flash,
            flash_layout: Some(FlashLayout::Decode),
            ..Default::default()
        };
        assert_eq!(
            fused(&plan(&nvidia(), &p, &flash).unwrap()),
            FlashTiles::decode(4, 128)
        );
    }

    #[test]
    fn the_matrix_units_follow_the_adapter_edge() {
        let p = Problem::new(1, 256, 256, 2, 2, 128);
        let coop = forced(Algorithm::FlashCoop);
        assert_eq!(
            plan(&nvidia(), &p, &coop).unwrap().algorithm(),
            Algorithm::FlashCoop
        );
        match plan(&nvidia(), &p, &coop).unwrap().run {
            Run::Coop { tiles, chunks } => {
                assert_eq!(tiles, nvidia().coop_tiles(&p).unwrap());
                assert_eq!(chunks, Chunks::WHOLE);
            }
            other => panic!("expected the matrix-unit kernel, got {other:?}"),
        }
        // D = 128: Q's staging memory is the K/V tiles' (CoopTiles::stage_len), so 48 KiB holds
        // 32 rows x 32 keys at the 16 edge, 32 KiB 32 rows x 16 keys at the 8 edge.
        let t = nvidia().coop_tiles(&p).unwrap();
        assert_eq!((t.edge, t.rows(), t.bk), (16, 32, 32));
        let t = apple().coop_tiles(&p).unwrap();
        assert_eq!((t.edge, t.rows(), t.bk), (8, 32, 16));
        let e = plan(&lavapipe(), &p, &coop).unwrap_err();
        assert!(e.to_string().contains("cooperative"), "{e}");
        // Head dims the edge does not divide are refused with the reason.
        let odd = Problem::new(1, 64, 64, 1, 1, 72);
        let e = nvidia().coop_tiles(&odd).unwrap_err();
        assert!(e.contains("multiple of 16"), "{e}");
    }

    #[test]
    fn a_downlevel_device_gets_clear_refusals() {
        let t = downlevel();
        let p = Problem::new(1, 64, 64, 1, 1, 64);
        let e = plan(&t, &p, &forced(Algorithm::Flash)).unwrap_err();
        assert!(e.to_string().contains("8 storage buffers"), "{e}");
        // auto: flash cannot bind, three-pass cannot either (scores binds 6): both reasons.
        let e = plan(&t, &p, &auto()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("flash:") && text.contains("three-pass:"),
            "{text}"
        );
    }

    #[test]
    fn the_probability_map_is_three_pass_only() {
        let p = Problem::new(1, 64, 64, 1, 1, 64);
        let probs = RunOptions {
            probs: true,
            ..auto()
        };
        assert_eq!(
            plan(&nvidia(), &p, &probs).unwrap().algorithm(),
            Algorithm::ThreePass
        );
        for a in [Algorithm::Flash, Algorithm::SplitK, Algorithm::FlashCoop] {
            let e = plan(
                &nvidia(),
                &p,
                &RunOptions {
                    algorithm: a,
                    ..probs
                },
            )
            .unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{a:?}: {e}");
        }
    }

    #[test]
    fn limits_name_the_buffer_or_grid_that_does_not_fit() {
        // 300 MiB of f32 Q on a 128 MiB binding.
        let p = Problem::new(1, 9600, 64, 64, 1, 128);
        match plan(&lavapipe(), &p, &auto()).unwrap_err() {
            Error::LimitExceeded {
                what,
                limit_name,
                limit,
                ..
            } => {
                assert_eq!(what, "q");
                assert_eq!(limit_name, "max_storage_buffer_binding_size");
                assert_eq!(limit, 128 * MIB);
            }
            e => panic!("expected LimitExceeded, got {e}"),
        }
        // A grid past max_workgroups_per_dim squared, folded.
        let tiny = Target {
            caps: Capabilities {
                max_workgroups_per_dim: 4,
                ..caps()
            },
            ..nvidia()
        };
        let p = Problem::new(4, 1024, 64, 4, 4, 64);
        match plan(&tiny, &p, &forced(Algorithm::Flash)).unwrap_err() {
            Error::GridTooLarge {
                workgroups, limit, ..
            } => {
                assert!(workgroups > limit, "{workgroups} vs {limit}");
                assert_eq!(limit, 16);
            }
            e => panic!("expected GridTooLarge, got {e}"),
        }
        assert_eq!(tiny.fold(16), Some((4, 4)));
        assert_eq!(tiny.fold(17), None);
    }

    #[test]
    fn plan_bytes_count_inputs_outputs_and_scratch() {
        let p = Problem::new(1, 128, 256, 2, 2, 64);
        let three = Target::plan_bytes(&p, Plan::three_pass(), F32, &auto());
        let flash = plan(&nvidia(), &p, &forced(Algorithm::Flash)).unwrap();
        let fused = Target::plan_bytes(&p, flash, F32, &auto());
        // The three-pass path holds the score matrix on top.
        assert_eq!(three - fused, (2 * 128 * 256 * 4) as u64);
    }
}
