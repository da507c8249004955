//! Limits and guarantees: problems past the binding limit (split and merged exactly), dispatch
//! grids past 65 535 workgroups, many threads on one engine (and short runs beside a long one),
//! bit-for-bit determinism, and non-finite inputs.

use std::sync::Arc;

use spotlight::reference::random::Rng;
use spotlight::reference::{self, compare};
use spotlight::{Algorithm, DType, Engine, Error, FlashLayout, Problem, RunOptions, Tensor};

use crate::common::{ALGORITHMS, Data, check, check_opts, engine};
use crate::differential::random_problem;

#[test]
fn keys_past_the_binding_limit_are_split_and_merged_exactly() {
    let Some(engine) = engine() else { return };
    // One query row against 300 000 keys, 4 heads, D = 32: K and V are 153.6 MB each in f32,
    // past lavapipe's 128 MiB storage bindings.
    let mut p = Problem::new(1, 1, 300_000, 4, 4, 32).causal(true);
    p.kv_seqlens = true;
    let mut d = Data::random(&p, [DType::F32; 3], 2.0, &mut Rng::new(71));
    d.kv_seqlens = Some(vec![299_999]);
    let limit = engine.capabilities().max_storage_binding;
    let opts = RunOptions {
        algorithm: Algorithm::Flash,
        lse: true,
        ..Default::default()
    };
    let est = engine.estimate(&p, [DType::F32; 3], &opts).unwrap();
    if (p.k_elems() * 4) as u64 > limit {
        assert!(est.pieces >= 2, "{est:?}");
    }
    assert!(est.device_bytes <= 4 * limit, "{est:?}");
    check_opts(engine, &p, &d, &opts, None).unwrap();
}

#[test]
fn random_problems_split_under_a_small_binding_limit() {
    if engine().is_none() {
        return;
    }
    let mut split = 0;
    for seed in 0..40u64 {
        // The differential suite's options on shapes with few queries and many keys, and a
        // binding limit just above one batch entry's queries: several batch groups and windows.
        let (mut p, _, out_dtype) = random_problem(0x5B11_0000 + seed);
        let mut rng = Rng::new(seed);
        p.q_len = rng.range(1, 6);
        p.kv_len = rng.range(100, 400);
        p.bias = None;
        p.mask = None;
        let dtypes = [DType::F32, rng.pick(&[DType::F32, DType::F16]), DType::F32];
        let mut d = Data::random(&p, dtypes, 1.0, &mut rng);
        crate::differential::random_lengths_and_slopes(&p, &mut d, &mut rng);
        let per_b = (p.q_len * p.q_heads * p.head_dim.max(p.v_head_dim) * 4) as u64;
        let small = Engine::new().unwrap().with_binding_limit(per_b.max(4096));
        // Odd seeds also run split-k on the decode kernel (what GPUs get) where a group fits it.
        let decode = seed % 2 == 1 && p.q_len * p.group_size() <= 16;
        let runs = [
            (Algorithm::Flash, None),
            (Algorithm::SplitK, None),
            (Algorithm::SplitK, Some(FlashLayout::Decode)),
        ];
        for (alg, flash_layout) in runs.into_iter().take(if decode { 3 } else { 2 }) {
            let opts = RunOptions {
                algorithm: alg,
                out_dtype,
                flash_layout,
                ..Default::default()
            };
            let est = small.estimate(&p, d.inputs().dtypes(), &opts).unwrap();
            split += (est.pieces > 1) as usize;
            check_opts(&small, &p, &d, &opts, None)
                .unwrap_or_else(|e| panic!("seed={} {p:?} {est:?}: {e}", 0x5B11_0000 + seed));
        }
    }
    assert!(split >= 60, "only {split} of 80 runs were split");
}

#[test]
fn what_cannot_be_split_is_refused_with_the_numbers() {
    if engine().is_none() {
        return;
    }
    let small = Engine::new().unwrap().with_binding_limit(16 << 10);
    let mut p = Problem::new(1, 64, 128, 2, 2, 16);
    p.bias = Some(spotlight::reference::Broadcast { batch: 1, heads: 2 });
    let err = small
        .estimate(&p, [DType::F32; 3], &RunOptions::default())
        .unwrap_err();
    match &err {
        Error::LimitExceeded { bytes, limit, .. } => assert!(bytes > limit, "{err}"),
        other => panic!("expected LimitExceeded, got {other}"),
    }
    assert!(err.to_string().contains("bias"), "{err}");
    let three = RunOptions {
        algorithm: Algorithm::ThreePass,
        ..Default::default()
    };
    let p = Problem::new(1, 200, 200, 2, 2, 16);
    assert!(
        small
            .estimate(&p, [DType::F32; 3], &three)
            .unwrap_err()
            .to_string()
            .contains("score matrix")
    );
}

#[test]
fn more_than_65535_query_tiles_run_in_a_folded_grid() {
    let Some(engine) = engine() else { return };
    // D = 4 takes 64-row tiles: 60 heads x ceil(70000 / 64) = 65 640 workgroups.
    let p = Problem::new(1, 70_000, 8, 60, 4, 4).causal(true);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(72));
    let opts = RunOptions {
        algorithm: Algorithm::Flash,
        ..Default::default()
    };
    check_opts(engine, &p, &d, &opts, None).unwrap();
}

#[test]
fn eight_threads_fifty_mixed_problems_each_on_one_engine() {
    let Some(shared) = engine() else { return };
    let _ = shared;
    let engine = Arc::new(Engine::new().unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for n in 0..50u64 {
                    let seed = 0x7777_0000 + t * 1000 + n;
                    let (mut p, mut d, out_dtype) = random_problem(seed);
                    // Keep lavapipe's time in check: short sequences, the random options.
                    p.q_len = p.q_len.min(8);
                    p.kv_len = p.kv_len.min(48);
                    p.q_seqlens = false;
                    p.kv_seqlens = false;
                    let mut rng = Rng::new(seed);
                    d = Data::random(&p, d.inputs().dtypes(), 1.0, &mut rng);
                    if p.alibi {
                        d.alibi_slopes = Some((0..p.q_heads).map(|h| 0.25 * h as f32).collect());
                    }
                    if let Some(b) = p.bias {
                        d.bias = Some(rng.vec(b.batch * b.heads * p.q_len * p.kv_len));
                    }
                    if let Some(b) = p.mask {
                        d.mask = Some(
                            (0..b.batch * b.heads * p.q_len * p.kv_len)
                                .map(|x| (x % 3 != 0) as u8)
                                .collect(),
                        );
                    }
                    let alg = ALGORITHMS[(n % 3) as usize];
                    let opts = RunOptions {
                        algorithm: alg,
                        out_dtype,
                        ..Default::default()
                    };
                    if let Err(e) = check_opts(&engine, &p, &d, &opts, None) {
                        failures.push(format!("thread {t} seed {seed}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_path_is_bit_for_bit_deterministic() {
    let Some(engine) = engine() else { return };
    for seed in [1u64, 2, 3] {
        let (p, d, out_dtype) = random_problem(0xDE7E_0000 + seed);
        // Every algorithm, and flash on the decode kernel where the problem's rows fit it.
        let decode = (p.q_len <= 16).then_some((Algorithm::Flash, Some(FlashLayout::Decode)));
        let runs = ALGORITHMS.iter().map(|&a| (a, None)).chain(decode);
        for (alg, flash_layout) in runs {
            let opts = RunOptions {
                algorithm: alg,
                lse: true,
                out_dtype,
                flash_layout,
                ..Default::default()
            };
            let first = engine.attention(&p, &d.inputs(), &opts).unwrap();
            for _ in 0..2 {
                let again = engine.attention(&p, &d.inputs(), &opts).unwrap();
                let bits = |t: &Tensor| {
                    t.to_f32_vec()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(&first.out),
                    bits(&again.out),
                    "{alg:?} O differs between runs"
                );
                let lb = |v: &Option<Vec<f32>>| {
                    v.as_ref()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    lb(&first.lse),
                    lb(&again.lse),
                    "{alg:?} LSE differs between runs"
                );
            }
        }
    }
}

#[test]
fn non_finite_inputs_propagate_to_their_rows_only() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 6, 10, 1, 1, 8);
    let mut rng = Rng::new(73);
    let mut q = rng.vec(p.q_elems());
    q[2 * 8 + 3] = f32::NAN; // row 2
    q[4 * 8] = f32::INFINITY; // row 4
    let (k, v) = (rng.vec(p.k_elems()), rng.vec(p.v_elems()));
    let inputs = reference::Inputs::new(
        spotlight::TensorRef::F32(&q),
        spotlight::TensorRef::F32(&k),
        spotlight::TensorRef::F32(&v),
    );
    for alg in ALGORITHMS {
        let opts = RunOptions {
            algorithm: alg,
            lse: true,
            ..Default::default()
        };
        let out = engine.attention(&p, &inputs, &opts).unwrap();
        let o = out.out.to_f32_vec();
        for i in 0..6 {
            let row = &o[i * 8..(i + 1) * 8];
            if i == 2 || i == 4 {
                assert!(
                    row.iter().any(|x| x.is_nan()),
                    "{alg:?}: row {i} should carry NaN: {row:?}"
                );
            } else {
                assert!(
                    row.iter().all(|x| x.is_finite()),
                    "{alg:?}: row {i} is not finite: {row:?}"
                );
            }
        }
        let want = reference::attention(&p, &inputs).unwrap();
        let finite: Vec<f64> = want
            .out
            .iter()
            .map(|&x| if x.is_finite() { x } else { f64::NAN })
            .collect();
        let e = compare::compare(&o, &finite);
        assert!(e.within(1e-5), "{alg:?}: {e}");
    }
}

/// A visible key whose f32 weight underflows to exactly 0 is skipped like a hidden one (README,
/// Semantics): NaN in its V row leaves every output row finite, on every algorithm and both fused
/// layouts. The key sits in the first block of keys, which every row sees whole (the row kernel's
/// clean blocks once multiplied such a weight anyway: 0 · NaN), and 128 query rows give the row
/// kernel its 32-row variant.
#[test]
fn a_visible_key_whose_weight_underflows_is_skipped_like_a_hidden_one() {
    let Some(engine) = engine() else { return };
    let (lq, lk, d) = (128, 64, 8);
    let p = Problem::new(1, lq, lk, 1, 1, d);
    let mut rng = Rng::new(0x0F10);
    // Every query points along the first axis; key 0 points 400 units the other way: its logit
    // is about 140 below the others' (|logit| < 1), and exp(-140) underflows f32 to 0.
    let q: Vec<f32> = (0..lq * d)
        .map(|x| if x % d == 0 { 1.0 } else { 0.0 })
        .collect();
    let mut k = rng.vec(p.k_elems());
    k[..d].fill(0.0);
    k[0] = -400.0;
    let mut v = rng.vec(p.v_elems());
    v[..d].fill(f32::NAN);
    // The reference multiplies the tiny weight (f64 does not underflow there): with key 0's V
    // at 0 instead of NaN it gives what skipping the key gives, to f64 rounding.
    let mut v0 = v.clone();
    v0[..d].fill(0.0);
    let t = spotlight::TensorRef::F32;
    let want = reference::attention(&p, &reference::Inputs::new(t(&q), t(&k), t(&v0))).unwrap();
    let inputs = reference::Inputs::new(t(&q), t(&k), t(&v));
    let mut runs = vec![];
    for alg in ALGORITHMS {
        runs.push((alg, None));
    }
    runs.push((Algorithm::Flash, Some(FlashLayout::Tiled)));
    runs.push((Algorithm::Flash, Some(FlashLayout::Rows)));
    // The matrix units where the adapter has them (f32 inputs, staged as f16: reduced precision).
    if engine.capabilities().coop_edge > 0 {
        runs.push((Algorithm::FlashCoop, None));
    }
    for (algorithm, flash_layout) in runs {
        let coop = algorithm == Algorithm::FlashCoop;
        let opts = RunOptions {
            algorithm,
            flash_layout,
            allow_reduced_precision: coop,
            ..Default::default()
        };
        let out = match engine.attention(&p, &inputs, &opts) {
            Ok(out) => out,
            // A layout this adapter does not have (the row kernel needs subgroups).
            Err(Error::Unsupported { .. }) if flash_layout.is_some() => continue,
            Err(e) => panic!("{algorithm:?} {flash_layout:?}: {e}"),
        };
        let o = out.out.to_f32_vec();
        assert!(
            o.iter().all(|x| x.is_finite()),
            "{algorithm:?} {flash_layout:?}: a row took the NaN of a key whose weight is 0"
        );
        let e = compare::compare(&o, &want.out);
        let budget = if coop { 1e-2 } else { 1e-5 };
        assert!(e.within(budget), "{algorithm:?} {flash_layout:?}: {e}");
    }
}

/// One thread's long run must not make another thread's calls fail. wgpu's GL backend keeps one GL
/// context behind a lock that panics after 6 s of waiting, and a readback holds it until the GPU
/// is done, so on GL the engine queues its operations instead (`Engine::exclusive`). The long
/// problem is sized to hold the GPU well past 6 s on Mesa's GL llvmpipe (~0.8 GFLOP/s: 6.4 GFLOP,
/// about 8 s); elsewhere it is 6x smaller and the test checks concurrent results only.
#[test]
fn a_long_run_on_one_thread_does_not_fail_another_threads_calls() {
    let Some(engine) = engine() else { return };
    let gl = engine.adapter_info().backend == spotlight::wgpu::Backend::Gl;
    let heads = if gl { 6 } else { 1 };
    let long = Problem::new(1, 2048, 2048, heads, heads, 64);
    let long_data = Data::random(&long, [DType::F32; 3], 1.0, &mut Rng::new(0x10E6));
    let opts = RunOptions {
        algorithm: Algorithm::Flash,
        lse: true,
        ..Default::default()
    };
    let started = std::sync::Barrier::new(2);
    let (long_out, short_failures) = std::thread::scope(|s| {
        let long_run = s.spawn(|| {
            started.wait();
            engine.attention(&long, &long_data.inputs(), &opts)
        });
        let short_runs = s.spawn(|| {
            started.wait();
            // Let the long run reach the GPU first, then keep calling while it runs.
            std::thread::sleep(std::time::Duration::from_millis(500));
            let mut failures = Vec::new();
            for seed in 0..4u64 {
                let (p, d, out_dtype) = random_problem(0x5407_0000 + seed);
                let opts = RunOptions {
                    algorithm: ALGORITHMS[seed as usize % 3],
                    out_dtype,
                    ..Default::default()
                };
                if let Err(e) = check_opts(engine, &p, &d, &opts, None) {
                    failures.push(format!("seed {seed}: {e}"));
                }
            }
            failures
        });
        (long_run.join().unwrap(), short_runs.join().unwrap())
    });
    assert!(short_failures.is_empty(), "{}", short_failures.join("\n"));
    // The long run: a sample of its rows against the reference.
    let out = long_out.expect("long run");
    let rows: Vec<(usize, usize, usize)> = (0..16)
        .map(|n| (0, n % heads, (n * 131 + 7) % long.q_len))
        .collect();
    let lse = out.lse.expect("lse");
    let e = compare::compare_rows(
        &long,
        &long_data.inputs(),
        &out.out.to_f32_vec(),
        &lse,
        &rows,
    )
    .unwrap();
    assert!(e.within(1e-5), "long run vs reference: {e}");
}

/// The three-pass path over key ranges longer than one invocation may loop on llvmpipe (whose
/// loops end silently after about 65 535 iterations): P·V is split over dispatches (1.1 M keys
/// went wrong before), and past what the softmax pass can take the engine refuses clearly.
#[test]
fn three_pass_over_a_million_keys_matches_the_reference_or_is_refused() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 2, 1_100_000, 1, 1, 4).causal(true);
    let d = Data::random(&p, [DType::F32; 3], 4.0, &mut Rng::new(0x3_0000));
    check(engine, &p, &d, Algorithm::ThreePass, true, None, None).unwrap();
    if engine.capabilities().max_key_tiles_per_workgroup.is_some() {
        let p = Problem::new(1, 1, 3_600_001, 1, 1, 4);
        let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(1));
        let opts = RunOptions {
            algorithm: Algorithm::Auto,
            probs: true,
            ..Default::default()
        };
        match engine.attention(&p, &d.inputs(), &opts) {
            Err(Error::Unsupported { algorithm, reason }) => {
                assert_eq!(algorithm, Algorithm::ThreePass);
                assert!(reason.contains("3600000 keys per row"), "{reason}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("3 600 001 keys with the probability map ran on llvmpipe"),
        }
    }
}
