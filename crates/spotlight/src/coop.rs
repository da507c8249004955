//! When the matrix-unit (cooperative-matrix) kernel may run, and the self-test that guards it.
//!
//! `auto` picks `flash-coop` only where the adapter offers 16x16x16 f16 → f32 cooperative
//! matrices, the problem fits the kernel, the inputs are half precision (or the caller allows
//! rounding f32 to f16), and a self-test of that configuration on this device (a small random
//! problem against the f64 reference) passed. A failed self-test is logged and remembered, and
//! `auto` uses `flash` instead.

use spotlight_reference::{
    self as reference, DType, Inputs, Problem, Tensor, compare, random::Rng,
};

use crate::attention::{Algorithm, RunOptions};
use crate::context::Engine;
use crate::error::{Error, Result};

/// Relative error the self-test accepts (f16 products, f32 accumulation, f16 P).
const SELF_TEST_BUDGET: f64 = 5e-3;

impl Engine {
    /// Why the cooperative-matrix kernel cannot run `p` here, or `None`.
    pub(crate) fn coop_unavailable(&self, p: &Problem, opts: &RunOptions) -> Option<String> {
        let c = self.capabilities();
        if !c.coop_f16_16x16 {
            return Some("the adapter offers no 16x16x16 f16 -> f32 cooperative matrices (or the engine was made from an application's device)".into());
        }
        if !(c.subgroups
            && c.subgroup_min_size == c.subgroup_max_size
            && c.subgroup_max_size <= c.max_invocations)
        {
            return Some("the kernel needs one fixed subgroup size per workgroup".into());
        }
        for (name, d) in [("D", p.head_dim), ("Dv", p.v_head_dim)] {
            if d % 16 != 0 || d > 256 {
                return Some(format!("{name}={d} must be a multiple of 16 up to 256"));
            }
        }
        let bytes =
            2 * 16 * (2 * p.head_dim + p.v_head_dim) + 4 * 16 * p.v_head_dim + 1024 + 512 + 1024;
        if bytes as u32 > c.max_workgroup_memory {
            return Some(format!(
                "needs {bytes} bytes of workgroup memory, {} available",
                c.max_workgroup_memory
            ));
        }
        if opts.max_chunk_keys.is_some() {
            return Some("the kernel does not split the key range (max_chunk_keys)".into());
        }
        None
    }

    /// The options to run with: `auto` becomes `flash-coop` where it may (see the module docs);
    /// a forced `flash-coop` on f32 inputs needs `allow_reduced_precision`.
    pub(crate) fn resolve_coop(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> Result<RunOptions> {
        let half = dtypes.iter().all(|&d| d != DType::F32) || opts.allow_reduced_precision;
        match opts.algorithm {
            Algorithm::FlashCoop if !half => Err(Error::Unsupported {
                algorithm: "flash-coop",
                reason: "f32 inputs would be rounded to f16 on the matrix units: set allow_reduced_precision (--reduced-precision)".into(),
            }),
            Algorithm::Auto
                if half
                    && !opts.probs
                    && !(p.q_len <= 16 && p.kv_len >= 1024)
                    && self.coop_unavailable(p, opts).is_none()
                    && self.coop_self_test(p.head_dim, p.v_head_dim, dtypes) =>
            {
                Ok(RunOptions { algorithm: Algorithm::FlashCoop, ..*opts })
            }
            _ => Ok(*opts),
        }
    }

    /// Runs the cooperative-matrix kernel once on a small random problem with these head dims
    /// and dtypes and checks it against the reference; the answer is cached.
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
        let p = Problem::new(1, 40, 70, 2, 1, d).v_head_dim(dv).causal(true);
        let mut rng = Rng::new(0xC00B);
        // Values that f16 represents exactly, stored in each dtype.
        let mut make = |n: usize, dt: DType| {
            let v: Vec<f32> = rng
                .vec(n)
                .iter()
                .map(|&x| DType::Bf16.round(DType::F16.round(x)))
                .collect();
            Tensor::from_f32(&v, dt)
        };
        let (q, k, v) = (
            make(p.q_elems(), dtypes[0]),
            make(p.k_elems(), dtypes[1]),
            make(p.v_elems(), dtypes[2]),
        );
        let inputs = Inputs::new(q.as_ref(), k.as_ref(), v.as_ref());
        let opts = RunOptions {
            algorithm: Algorithm::FlashCoop,
            lse: true,
            out_dtype: Some(DType::F32),
            allow_reduced_precision: true,
            ..Default::default()
        };
        let ok = match self.attention(&p, &inputs, &opts) {
            Ok(got) => {
                let want =
                    reference::attention(&p, &inputs).expect("the self-test problem is valid");
                let e = compare::compare(&got.out.to_f32_vec(), &want.out);
                let el = compare::compare(got.lse.as_deref().unwrap_or(&[]), &want.lse);
                let ok = e.within(SELF_TEST_BUDGET) && el.within(SELF_TEST_BUDGET);
                if !ok {
                    log::warn!(
                        "flash-coop self-test failed for D={d} Dv={dv} {dtypes:?}: O {e}, LSE {el}; auto uses flash"
                    );
                }
                ok
            }
            Err(e) => {
                log::warn!("flash-coop self-test could not run ({e}); auto uses flash");
                false
            }
        };
        self.coop_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ok);
        ok
    }
}
