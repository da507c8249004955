//! The fused scalar kernels' tiles: which kernel ([`FlashLayout`]) and its tile sizes
//! ([`FlashTiles`]), chosen from the adapter's workgroup memory and invocation limits.

/// Which fused scalar kernel a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashLayout {
    /// `flash.wgsl`: K/V tiles in workgroup memory, a 4×4 block of S per thread (GPUs).
    Tiled,
    /// `flash_rows.wgsl`: one query row per invocation, K/V read at uniform addresses straight
    /// from the buffers, no workgroup memory (CPU adapters).
    Rows,
    /// `flash_decode.wgsl`: every query row of a unit (at most [`FlashTiles::DECODE_MAX_ROWS`])
    /// in one workgroup whose threads own keys for Q·Kᵀ and output columns for P·V, K/V read
    /// straight from the buffers (short queries, i.e. decoding, on GPUs).
    Decode,
}

impl FlashLayout {
    pub fn name(self) -> &'static str {
        match self {
            FlashLayout::Tiled => "tiled",
            FlashLayout::Rows => "rows",
            FlashLayout::Decode => "decode",
        }
    }
}

impl std::str::FromStr for FlashLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiled" => Ok(FlashLayout::Tiled),
            "rows" => Ok(FlashLayout::Rows),
            "decode" => Ok(FlashLayout::Decode),
            _ => Err(format!(
                "unknown flash layout '{s}': expected tiled, rows or decode"
            )),
        }
    }
}

/// Tile configuration of the flash kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashTiles {
    /// Query rows per workgroup.
    pub bq: u32,
    /// Keys per tile.
    pub bk: u32,
    /// Threads per query row.
    pub tpr: u32,
    /// The kernel.
    pub layout: FlashLayout,
}

impl FlashTiles {
    /// Query rows per workgroup of the forward row kernel (its `const R`, rewritten per pipeline
    /// from the `ROWS` constant): 8, or 16 or 32 where a unit has enough rows
    /// ([`FlashTiles::row_count`]).
    pub const ROWS_R: [u32; 3] = [8, 16, 32];
    /// Query rows or keys per workgroup of the backward's row kernels: 8 or 16
    /// ([`FlashTiles::backward_row_count`]).
    pub const BACKWARD_ROWS_R: [u32; 2] = [8, 16];
    /// Logits (B·Hq·Lq·Lk) from which the backward's row kernels own 16 rows per workgroup and
    /// the forward's 32 ([`FlashTiles::row_count`]).
    ///
    /// Why a threshold: 16 rows make every K/V vector a lane loads feed twice the FMAs
    /// (lavapipe, 1,1024,2,64 f32: backward 590 → 321 ms), but the backward's 16-row kernels
    /// still take twice as long to compile (forward and backward first call at 1,256,2,64,
    /// Mesa's cache off: 3.0 s with 8 rows, 6.0 s with 16), which only a long run pays back.
    pub const ROWS_LARGE_LOGITS: u64 = 1 << 19;

    /// The forward row kernel's rows per workgroup where a unit (a head's query rows, or with
    /// split-K a key/value group's) has `rows` rows, each of `lanes` lanes owns
    /// `ceil(ceil(dv / 4) / lanes)` output vec4 columns per row and the problem has `logits`
    /// logits: 32 from 128 rows where that is at most 2 (Dv ≤ 64 on 8 lanes) and the problem is
    /// large, 16 from 64 rows, else 8 (decoding, with a few rows per unit, keeps 8). Measured on lavapipe (Mesa 22.3.6, 2026-11-29; README, Performance):
    /// - no size threshold: since the stores are written once (`flash_rows.wgsl`'s last loop)
    ///   and plain problems compile without the general logit path, 16 rows compile about as fast
    ///   as 8 at D = 64 (whole first process 0.7 s each) and run faster at every size measured
    ///   (1,64,2,64 0.26 → 0.23 ms, 1,256,2,64 causal 1.45 → 1.04, 1,256,2,64 2.20 → 1.68);
    /// - 32 rows: every K/V vector a lane loads feeds twice the FMAs again, 15-25% faster than
    ///   16 at D = 64 (1,1024,2,64 22.5 → 17.2 ms, 4,256,2,64 6.07 → 4.86) for a first call of
    ///   1.6 s; with 4 output columns (D = 128) the registers spill: slower (1,512,2,128 10.2 →
    ///   12.6 ms) and 2.9 s to compile, so wider rows keep 16. 64 rows ran no faster than 32 and
    ///   took 6 s to compile.
    /// - and 32 only from [`FlashTiles::ROWS_LARGE_LOGITS`] logits (B·Hq·Lq·Lk, causal or not):
    ///   the 32-row kernel takes twice as long to build as the 16-row one (the process's first
    ///   call 1.3-1.6 s against 0.6-1.0 s at D = 64, 2026-12-06), which a small problem never
    ///   pays back, and at 1,256,2,64 causal (131 072 logits) 16 rows even ran as fast (best GPU
    ///   time 0.72 against 0.87 ms; four alternations) with twice the workgroups.
    pub fn row_count(rows: usize, dv: u32, lanes: u32, logits: u64) -> u32 {
        let columns = dv.div_ceil(4).div_ceil(lanes.max(1));
        if rows >= 128 && columns <= 2 && logits >= Self::ROWS_LARGE_LOGITS {
            Self::ROWS_R[2]
        } else if rows >= 64 {
            Self::ROWS_R[1]
        } else {
            Self::ROWS_R[0]
        }
    }

    /// The backward row kernels' rows per workgroup for a problem of `logits` logits whose
    /// workgroups own rows out of `rows` (query rows, or keys): 16 from
    /// [`FlashTiles::ROWS_LARGE_LOGITS`] logits with at least 64 such rows, else 8.
    pub fn backward_row_count(logits: u64, rows: usize) -> u32 {
        if logits >= Self::ROWS_LARGE_LOGITS && rows >= 64 {
            Self::BACKWARD_ROWS_R[1]
        } else {
            Self::BACKWARD_ROWS_R[0]
        }
    }
    /// Keys per lane per block of `flash_rows.wgsl` (its `const KBL`).
    pub const ROWS_KBL: u32 = 4;

    /// Most q vec4 chunks (ceil(ceil(D / 4) / lanes): 4 is D = 128 on 8 lanes) the forward row
    /// kernel keeps in registers; wider heads stage Q in workgroup memory
    /// ([`FlashTiles::rows_q_staged`]). Measured on lavapipe (Mesa 22.3.6, 2026-12-06, AVX-512
    /// EPYC): Q in registers instead of staged behind a barrier and re-read every block made
    /// 1,1024,2,64 18 → 13.5 ms and 4,256,2,64 4.8 → 3.8 ms, the first call unchanged at D = 64
    /// and 1.1 → 1.4 s at D = 128; at D = 256 (8 chunks, each unrolled) it ran 14% faster but
    /// the first call took 3.0 s instead of 2.0.
    pub const ROWS_Q_REGISTER_COLUMNS: u32 = 4;

    /// Whether the forward row kernel stages Q in workgroup memory for head dim `d` (more than
    /// [`FlashTiles::ROWS_Q_REGISTER_COLUMNS`] chunks of q vec4 columns per lane).
    pub fn rows_q_staged(&self, d: u32) -> bool {
        super::variant::cols(d, self.tpr) > Self::ROWS_Q_REGISTER_COLUMNS
    }

    /// Most output vec4 columns per lane (4: Dv = 128 on 8 lanes) for which the forward row
    /// kernel's P·V adds the 4 keys of a lane in one accumulator update (lavapipe, 2026-12-06:
    /// 1,1024,2,64 13.5 → 12 ms, 4,256,2,64 3.9 → 3.5; at Dv = 256 its unrolled copies cost 1 s
    /// of first call for about 9%, one run).
    pub const ROWS_PV_GROUPED_COLUMNS: u32 = 4;

    /// Whether the forward row kernel's P·V takes one key per accumulator update for value head
    /// dim `dv` (more than [`FlashTiles::ROWS_PV_GROUPED_COLUMNS`] output vec4 columns per lane;
    /// `flash_rows.wgsl`).
    pub fn rows_pv_by_key(&self, dv: u32) -> bool {
        super::variant::cols(dv, self.tpr) > Self::ROWS_PV_GROUPED_COLUMNS
    }

    /// Largest head dims (D and Dv) the row kernel takes: its unrolled P·V loop grows with Dv
    /// and so does the compile (larger dims run the tiled kernel).
    pub const ROWS_MAX_DIM: u32 = 256;

    /// Whether these tiles take head dims `d`, `dv` within `workgroup_memory` bytes.
    pub fn fits(&self, d: u32, dv: u32, workgroup_memory: u32) -> bool {
        let dims = match self.layout {
            FlashLayout::Rows => d <= Self::ROWS_MAX_DIM && dv <= Self::ROWS_MAX_DIM,
            FlashLayout::Tiled => dv.div_ceil(4).div_ceil(self.tpr) <= Self::MAX_NC,
            // One output vec4 column per thread of a key subset.
            FlashLayout::Decode => dv.div_ceil(4) <= self.tpr,
        };
        dims && self.workgroup_bytes(d, dv) <= workgroup_memory as u64
    }

    /// The row kernel's configuration for subgroups of `lanes` invocations (one subgroup per
    /// workgroup): `rows` query rows (one of [`FlashTiles::ROWS_R`]), blocks of
    /// `ROWS_KBL · lanes` keys; `tpr` is the lanes.
    pub fn rows(lanes: u32, rows: u32) -> Self {
        FlashTiles {
            bq: rows,
            bk: Self::ROWS_KBL * lanes,
            tpr: lanes,
            layout: FlashLayout::Rows,
        }
    }

    /// Most query rows of a unit the decode kernel holds (its `const R`: per-row registers).
    pub const DECODE_MAX_ROWS: u32 = 16;
    /// Threads of a decode workgroup (keys per tile): a power of two of at least
    /// `ceil(Dv / 4)` (one output column per thread of a key subset).
    pub const DECODE_THREADS: u32 = 128;

    /// The decode kernel's configuration for units of `rows` query rows (at most
    /// [`Self::DECODE_MAX_ROWS`]): all of them in one workgroup of `threads` threads, which is
    /// also the keys of a tile (`bk`); `tpr` is the threads.
    pub fn decode(rows: u32, threads: u32) -> Self {
        FlashTiles {
            bq: rows,
            bk: threads,
            tpr: threads,
            layout: FlashLayout::Decode,
        }
    }

    /// Most output vec4 columns one thread accumulates in registers (`NC` in `flash.wgsl`).
    pub const MAX_NC: u32 = 64;

    /// Bytes of workgroup memory the flash kernel needs: Q, K and V tiles as vec4 rows padded
    /// by one vec4, the weights, and two vec4 per thread for row reductions.
    pub fn workgroup_bytes(&self, d: u32, dv: u32) -> u64 {
        if self.layout == FlashLayout::Decode {
            // q_s (R·D4 vec4), s_s and red_s (R·WG f32 each), o_s (R·DV4 vec4), l_s (R f32).
            let (r, n) = (self.bq as u64, self.tpr as u64);
            let (d4, dv4) = (d.div_ceil(4) as u64, dv.div_ceil(4) as u64);
            return 16 * r * d4 + 8 * r * n + 16 * r * dv4 + 4 * r;
        }
        if self.layout == FlashLayout::Rows {
            // Q staged (R rows of ceil(ceil(D / 4) / lanes) · lanes vec4) only for wide heads;
            // otherwise it lives in registers and the array has one vec4 (flash_rows.wgsl).
            let lanes = self.tpr as u64;
            if !self.rows_q_staged(d) {
                return 16;
            }
            return 16 * self.bq as u64 * (d.div_ceil(4) as u64).div_ceil(lanes) * lanes;
        }
        let (d4, dv4) = (d.div_ceil(4) as u64 + 1, dv.div_ceil(4) as u64 + 1);
        let (bq, bk) = (self.bq as u64, self.bk as u64);
        16 * (bq * d4 + bk * d4 + bk * dv4 + bq * self.tpr as u64 + 2 * self.threads() as u64)
    }

    /// Threads per workgroup: `bq / 4` row groups of `tpr` threads.
    pub fn threads(&self) -> u32 {
        if self.layout != FlashLayout::Tiled {
            return self.tpr;
        }
        self.bq / 4 * self.tpr
    }

    /// Picks tiles that fit the adapter, or `None` when none does. Every thread computes a 4×4
    /// block of S and the matching 4 rows of O (see `flash.wgsl`), so `bq` is a multiple of 4
    /// and a key tile is `bk = 4 · tpr` keys.
    ///
    /// Reasons, measured or structural:
    /// - Each thread keeps `4 · ceil(ceil(Dv / 4) / tpr) <= 4 · 64` vec4 accumulators (the
    ///   `MAX_NC`), so large Dv needs a larger `tpr`.
    /// - Candidates go from preferred to small; the first that fits the workgroup memory wins.
    ///   lavapipe (32 KiB, subgroups of 8), measured 2026-11-28 with `spotlight bench --config
    ///   1,512,2,64 --algorithm flash` on a loaded 2-core machine: 32×8 (64 threads, 32-key
    ///   tiles), 64×4, 32×4 and 16×8 all took 715–800 ms, within the noise; 32×8 is first
    ///   because it has the fewest barriers per key among them and `tpr = 8` fills one SIMD-8
    ///   row group. D=128 gets 16×8 there; D=256 8×4.
    /// - NVIDIA (48 KiB, subgroups of 32; not measured, no GPU this session): D=64 gets 32×8,
    ///   D=128 32×4 (32 threads: small; to be tuned when a GPU is lent).
    /// - Workgroups stay within `max_invocations` (256 by default in WebGPU).
    /// - `max_rows` caps `bq` (rounded up to a multiple of 4): a decode step has only
    ///   `Lq · Hq/Hkv` rows per key/value head, and empty rows waste threads.
    pub fn choose(
        d: u32,
        dv: u32,
        workgroup_memory: u32,
        max_invocations: u32,
        max_rows: u32,
    ) -> Option<Self> {
        const CANDIDATES: [(u32, u32); 16] = [
            (32, 8),
            (64, 4),
            (32, 4),
            (16, 8),
            (16, 4),
            (64, 2),
            (32, 2),
            (16, 2),
            (8, 8),
            (8, 4),
            (8, 2),
            (4, 8),
            (4, 4),
            (4, 2),
            (8, 1),
            (4, 1),
        ];
        let max_bq = max_rows.clamp(4, 64).next_multiple_of(4);
        CANDIDATES
            .iter()
            .map(|&(bq, tpr)| FlashTiles {
                bq,
                bk: 4 * tpr,
                tpr,
                layout: FlashLayout::Tiled,
            })
            .find(|t| {
                t.bq <= max_bq
                    && dv.div_ceil(4).div_ceil(t.tpr) <= Self::MAX_NC
                    && t.threads() <= max_invocations
                    && t.workgroup_bytes(d, dv) <= workgroup_memory as u64
            })
    }
}
