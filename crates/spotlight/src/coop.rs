//! When the matrix-unit (cooperative-matrix) kernel may run, its tiles, and the self-test that
//! guards it.
//!
//! The kernel is generic over the matrix edge: 16x16x16 (NVIDIA, AMD, Intel) or 8x8x8 (Apple's
//! simdgroup matrices, Mesa >= 26 lavapipe), f16 x f16 -> f32, the larger where both exist.
//!
//! Precision and range (decision): the matrix units multiply f16, so Q, K and V are staged as
//! f16. f16 inputs lose nothing there; f32 and bf16 inputs are rounded, and finite values beyond
//! f16's range (|x| > 65504) would become infinite. Therefore `auto` picks `flash-coop` only for
//! f16 inputs; a forced `flash-coop` on f32 or bf16 needs `allow_reduced_precision`, and on host
//! inputs ([`Engine::attention`]) it refuses values beyond f16's range with a clear error before
//! any GPU work (on buffers the caller promised the range by asking for reduced precision).
//! Scaling instead (a power of two per Q row and K row, exact) would keep Q·Kᵀ in range but not
//! P·V without a pre-pass over V; `flash` handles every range exactly in f32, so it is the answer.
//!
//! `auto` takes the matrix units only where they are hardware: on CPU adapters they are emulated,
//! and on Mesa 26.2 lavapipe the scalar row kernel ran the same f16 problems 3-5x faster
//! (`Engine::with_auto_matrix_units` overrides either way).
//!
//! `auto` also needs a self-test of that configuration on this device (a small random problem
//! against the f64 reference, with values that f16 must round and logits that grow along the
//! keys so the lazy rescale runs) to pass; a failed self-test is logged and remembered, and `auto`
//! uses `flash` instead.

use spotlight_reference::{
    self as reference, DType, Inputs, Problem, Tensor, TensorRef, compare, random::Rng,
};

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{Algorithm, RunOptions};
use crate::plan::{Chunks, Target};

/// Relative error the self-test accepts (f16 products, f32 accumulation, f16 P).
const SELF_TEST_BUDGET: f64 = 5e-3;

/// Largest finite f16.
const F16_MAX: f32 = 65504.0;

/// The edge of the square f16 x f16 -> f32 configuration to use from an adapter's list: 16, else
/// 8, else 0 (none). WGSL spells only these two (`coop_mat16x16`, `coop_mat8x8`).
pub(crate) fn coop_edge(props: &[wgpu::CooperativeMatrixProperties]) -> u32 {
    let has = |e: u32| {
        props.iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (e, e, e)
                && c.ab_type == wgpu::CooperativeScalarType::F16
                && c.cr_type == wgpu::CooperativeScalarType::F32
        })
    };
    [16, 8].into_iter().find(|&e| has(e)).unwrap_or(0)
}

/// Tile configuration of the matrix-unit kernel (shaders/flash_coop.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopTiles {
    /// Matrix edge (8 or 16).
    pub edge: u32,
    /// Subgroup size (lanes per subgroup).
    pub wg: u32,
    /// Subgroups per workgroup; each owns `edge` query rows.
    pub ns: u32,
    /// Keys per staged K/V tile (a multiple of `edge`).
    pub bk: u32,
}

impl CoopTiles {
    /// Query rows per workgroup.
    pub fn rows(&self) -> u32 {
        self.ns * self.edge
    }

    /// f16 elements of the staging memory (flash_coop.wgsl's `STAGE`): Q's rows at the start,
    /// then each tile's K and V rows in the same memory, padded strides of 8 f16 per row.
    pub fn stage_len(&self, d: u32, dv: u32) -> u32 {
        let (bq, bk) = (self.rows(), self.bk);
        (bq * (d + 8)).max(bk * (d + 8) + bk * (dv + 8))
    }

    /// Workgroup memory the kernel declares for head dims `d`, `dv` (the padded strides of
    /// flash_coop.wgsl: 8 f16 or 4 f32 per row).
    pub fn bytes(&self, d: u32, dv: u32) -> u32 {
        let (bq, bk) = (self.rows(), self.bk);
        let f16s = self.stage_len(d, dv) + bq * (bk + 8);
        // S, O, and per row: reference max, rescale factor, final sum, fix-up flag; a flag per
        // subgroup and one for the workgroup.
        let f32s = bq * (bk + 4) + bq * (dv + 4) + 4 * bq + self.ns + 1;
        2 * f16s + 4 * f32s
    }

    /// The largest tile that fits: most query rows × keys per workgroup (both amortise the
    /// staging and the barriers), ties to more rows (more subgroups share each K/V tile). Up to 4
    /// subgroups (64 rows at edge 16) and 64 keys.
    pub fn choose(edge: u32, wg: u32, d: u32, dv: u32, max_mem: u32, max_inv: u32) -> Option<Self> {
        let mut best: Option<CoopTiles> = None;
        for ns in [4, 2, 1] {
            for bk in [64, 32, 16, 8] {
                let t = CoopTiles { edge, wg, ns, bk };
                if bk % edge != 0 || ns * wg > max_inv || t.bytes(d, dv) > max_mem {
                    continue;
                }
                let size = |t: &CoopTiles| t.rows() * t.bk;
                if best.is_none_or(|b| size(&t) > size(&b)) {
                    best = Some(t);
                }
            }
        }
        best
    }
}

impl Target {
    /// The matrix-unit kernel's tiles for `p` here, or why it cannot run `p`.
    pub(crate) fn coop_tiles(&self, p: &Problem) -> std::result::Result<CoopTiles, String> {
        let c = &self.caps;
        let e = c.coop_edge;
        if e == 0 {
            return Err("the adapter offers no 16x16x16 or 8x8x8 f16 -> f32 cooperative matrices (or the engine was made from an application's device)".into());
        }
        if !(c.subgroups
            && c.subgroup_min_size == c.subgroup_max_size
            && c.subgroup_max_size <= c.max_invocations)
        {
            return Err("the kernel needs one fixed subgroup size per workgroup".into());
        }
        for (name, d) in [("D", p.head_dim), ("Dv", p.v_head_dim)] {
            if d % e as usize != 0 || d > 256 {
                return Err(format!(
                    "{name}={d} must be a multiple of {e} (the matrix edge) up to 256"
                ));
            }
        }
        let (d, dv) = (p.head_dim as u32, p.v_head_dim as u32);
        CoopTiles::choose(
            e,
            c.subgroup_max_size,
            d,
            dv,
            c.max_workgroup_memory,
            c.max_invocations,
        )
        .ok_or_else(|| {
            let least = CoopTiles {
                edge: e,
                wg: c.subgroup_max_size,
                ns: 1,
                bk: e,
            };
            format!(
                "needs {} bytes of workgroup memory at D={d} Dv={dv}, {} available",
                least.bytes(d, dv),
                c.max_workgroup_memory
            )
        })
    }

    /// Key chunks for the matrix-unit kernel (merged by LSE like flash's): where the adapter
    /// bounds the key tiles one workgroup may stream (llvmpipe) or the caller bounds the keys.
    /// Returns `(chunks, keys per chunk)`, `(1, 0)` when unsplit.
    pub(crate) fn coop_chunks(&self, p: &Problem, t: CoopTiles, opts: &RunOptions) -> Chunks {
        Chunks::of(p.kv_len as u32, self.key_limit(t.bk, opts))
    }
}

impl Engine {
    /// The matrix-unit kernel's tiles for `p` here, or why it cannot run `p` ([`Target::coop_tiles`]).
    pub(crate) fn coop_tiles(&self, p: &Problem) -> std::result::Result<CoopTiles, String> {
        self.target().coop_tiles(p)
    }

    /// Why the cooperative-matrix kernel cannot run `p` here, or `None`.
    pub(crate) fn coop_unavailable(&self, p: &Problem, _opts: &RunOptions) -> Option<String> {
        self.coop_tiles(p).err()
    }

    /// The options to run with: `auto` becomes `flash-coop` where it may (see the module docs);
    /// a forced `flash-coop` on f32 or bf16 inputs needs `allow_reduced_precision`.
    pub(crate) fn resolve_coop(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> Result<RunOptions> {
        let all_f16 = dtypes.iter().all(|&d| d == DType::F16);
        match opts.algorithm {
            Algorithm::FlashCoop if !all_f16 && !opts.allow_reduced_precision => {
                Err(Error::Unsupported {
                    algorithm: Algorithm::FlashCoop,
                    reason: "f32 and bf16 inputs would be rounded to f16 on the matrix units (and values beyond ±65504 would overflow): set allow_reduced_precision (--reduced-precision)".into(),
                })
            }
            Algorithm::Auto
                if all_f16
                    && self.auto_matrix_units
                    && !opts.probs
                    && !(p.q_len <= 16 && p.kv_len >= 1024)
                    && self.coop_unavailable(p, opts).is_none()
                    && self.coop_self_test(p.head_dim, p.v_head_dim, dtypes) =>
            {
                Ok(RunOptions {
                    algorithm: Algorithm::FlashCoop,
                    ..*opts
                })
            }
            _ => Ok(*opts),
        }
    }

    /// A forced `flash-coop` on host inputs: refuses finite values that f16 cannot hold (they
    /// would become infinite on the matrix units). f16 inputs always pass.
    pub(crate) fn coop_check_range(&self, inputs: &Inputs<'_>, opts: &RunOptions) -> Result<()> {
        if opts.algorithm != Algorithm::FlashCoop {
            return Ok(());
        }
        for (name, t) in [("Q", inputs.q), ("K", inputs.k), ("V", inputs.v)] {
            let worst = match t {
                TensorRef::F32(x) => x
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .fold(0.0f32, |m, x| m.max(x.abs())),
                TensorRef::Bf16(x) => x
                    .iter()
                    .map(|b| b.to_f32())
                    .filter(|x| x.is_finite())
                    .fold(0.0f32, |m, x| m.max(x.abs())),
                TensorRef::F16(_) => 0.0,
            };
            if worst > F16_MAX {
                return Err(Error::Unsupported {
                    algorithm: Algorithm::FlashCoop,
                    reason: format!(
                        "{name} holds {worst:e}, beyond f16's range (±65504) that the matrix units multiply in; use flash or auto"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs the cooperative-matrix kernel on a small random problem with these head dims and
    /// dtypes, once with O in f32 and once in f16, and checks both against the reference; the
    /// answer is cached.
    pub(crate) fn coop_self_test(&self, d: usize, dv: usize, dtypes: [DType; 3]) -> bool {
        let key = (d, dv, dtypes);
        if let Some(&ok) = self
            .coop_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return ok;
        }
        // Several key tiles, a partial row tile, GQA and causal; values that f16 must round (not
        // f16-exact), K growing along the keys so each tile raises the row max past the lazy
        // rescale's threshold and the rescale runs.
        let p = Problem::new(1, 40, 150, 2, 1, d)
            .v_head_dim(dv)
            .causal(true);
        let mut rng = Rng::new(0xC00B);
        let q: Vec<f32> = rng.vec(p.q_elems()).iter().map(|x| 2.0 * x).collect();
        let k: Vec<f32> = rng
            .vec(p.k_elems())
            .iter()
            .enumerate()
            .map(|(n, x)| x * (1.0 + 6.0 * (n / d) as f32 / p.kv_len as f32))
            .collect();
        let v = rng.vec(p.v_elems());
        let (q, k, v) = (
            Tensor::from_f32(&q, dtypes[0]),
            Tensor::from_f32(&k, dtypes[1]),
            Tensor::from_f32(&v, dtypes[2]),
        );
        let inputs = Inputs::new(q.as_ref(), k.as_ref(), v.as_ref());
        let want = reference::attention(&p, &inputs).expect("the self-test problem is valid");
        // Both of the kernel's epilogues: O in f32, and O in half words written by the kernel
        // itself (what an f16 problem's default output runs; flash_coop.wgsl, half_out.wgsl).
        // A bf16 output runs the latter with bf16 rounding (half_pack.wgsl, which every
        // scalar kernel's tests check).
        let ok = [DType::F32, DType::F16].into_iter().all(|out| {
            let opts = RunOptions {
                algorithm: Algorithm::FlashCoop,
                lse: true,
                out_dtype: Some(out),
                allow_reduced_precision: true,
                ..Default::default()
            };
            match self.attention(&p, &inputs, &opts) {
                Ok(got) => {
                    let e = compare::compare(&got.out.to_f32_vec(), &want.out);
                    let el = compare::compare(got.lse.as_deref().unwrap_or(&[]), &want.lse);
                    let ok = e.within(SELF_TEST_BUDGET) && el.within(SELF_TEST_BUDGET);
                    if !ok {
                        log::warn!(
                            "flash-coop self-test failed for D={d} Dv={dv} {dtypes:?} (O in {out:?}): O {e}, LSE {el}; auto uses flash"
                        );
                    }
                    ok
                }
                Err(e) => {
                    log::warn!(
                        "flash-coop self-test could not run (O in {out:?}: {e}); auto uses flash"
                    );
                    false
                }
            }
        });
        self.coop_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ok);
        ok
    }
}
