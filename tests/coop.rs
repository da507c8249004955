//! The matrix-unit kernel (`flash-coop`) against the f64 reference, where the adapter offers
//! cooperative matrices (Mesa >= 26 lavapipe at the 8x8 edge in CI: `scripts/test`'s Mesa 26
//! stage sets `SPOTLIGHT_EXPECT_COOP=8`, so a missing configuration fails there instead of
//! skipping). Elsewhere the tests that need matrix units say SKIPPED loudly.

use spotlight::reference::random::Rng;
use spotlight::reference::{self, compare};
use spotlight::{Algorithm, DType, Engine, Error, Problem, RunOptions, Tensor};

use crate::common::{Budget, Data, assert_all_passed, check_opts, engine, kernels_run};
use crate::differential::random_problem;

/// The engine when it has matrix units; `SPOTLIGHT_EXPECT_COOP=E` makes their absence (or
/// another edge) a failure.
fn coop_engine(test: &str) -> Option<&'static Engine> {
    let engine = engine()?;
    let edge = engine.capabilities().coop_edge;
    if let Ok(want) = std::env::var("SPOTLIGHT_EXPECT_COOP") {
        let want: u32 = want.parse().expect("SPOTLIGHT_EXPECT_COOP must be 8 or 16");
        assert_eq!(
            edge,
            want,
            "SPOTLIGHT_EXPECT_COOP={want} but {} offers edge {edge} (0 = no cooperative matrices)",
            engine.describe()
        );
    }
    if edge == 0 {
        eprintln!(
            "SKIPPED {test}: {} has no cooperative matrices",
            engine.describe()
        );
        return None;
    }
    Some(engine)
}

fn forced(reduced: bool) -> RunOptions {
    RunOptions {
        algorithm: Algorithm::FlashCoop,
        allow_reduced_precision: reduced,
        ..Default::default()
    }
}

/// f16 inputs: the products are exact in f32; what is rounded is P (to f16).
fn coop_budget(out: DType, f32_inputs: bool) -> Budget {
    let b = Budget::for_output(out);
    let (o, l) = if f32_inputs {
        (1e-2, 5e-3)
    } else {
        (5e-3, 1e-3)
    };
    Budget {
        out: b.out.max(o),
        lse: b.lse.max(l),
        probs: b.probs,
    }
}

/// Awkward lengths both ways (partial row tiles, partial key tiles, one key, more queries than
/// keys), causal or not, GQA, head dims that are multiples of the edge.
#[test]
fn flash_coop_awkward_shapes_f16() {
    let Some(engine) = coop_engine("flash_coop_awkward_shapes_f16") else {
        return;
    };
    let edge = engine.capabilities().coop_edge as usize;
    let lens = [1usize, 7, 33, 100, 257];
    let dims: Vec<usize> = [8usize, 16, 64, 128, 256]
        .into_iter()
        .filter(|d| d.is_multiple_of(edge))
        .collect();
    let mut rng = Rng::new(0xC00B_0001);
    let mut failures = Vec::new();
    let mut n = 0;
    for (a, &lq) in lens.iter().enumerate() {
        for (b, &lk) in lens.iter().enumerate() {
            let causal = (a + b) % 2 == 1;
            let d = dims[(a * lens.len() + b) % dims.len()];
            let (hq, hkv) = if d >= 128 { (2, 1) } else { (4, 2) };
            let p = Problem::new(1 + b % 2, lq, lk, hq, hkv, d).causal(causal);
            let data = Data::random(&p, [DType::F16; 3], 2.0, &mut rng);
            let opts = RunOptions {
                out_dtype: Some(DType::F32),
                ..forced(false)
            };
            n += 1;
            if let Err(e) = check_opts(
                engine,
                &p,
                &data,
                &opts,
                Some(coop_budget(DType::F32, false)),
            ) {
                failures.push(format!("{p:?}: {e}"));
            }
        }
    }
    assert!(n >= 25, "ran only {n} cases");
    assert_all_passed(&failures, Some(n));
}

/// The property suite's random problems (every option: masks, bias, window, ALiBi, softcap,
/// GQA, seqlens, layouts, output dtypes, key chunks) forced onto the matrix units: f16 inputs,
/// and every fourth problem f32 inputs with `allow_reduced_precision`. `SPOTLIGHT_COOP_CASES`
/// sets the count (default 48).
#[test]
fn flash_coop_random_problems_every_option() {
    let Some(engine) = coop_engine("flash_coop_random_problems_every_option") else {
        return;
    };
    let edge = engine.capabilities().coop_edge as usize;
    let cases: u64 = std::env::var("SPOTLIGHT_COOP_CASES")
        .ok()
        .map(|s| s.parse().expect("SPOTLIGHT_COOP_CASES must be a number"))
        .unwrap_or(48);
    let mut failures = Vec::new();
    let mut ran = 0;
    for seed in 0xC00B_0000..0xC00B_0000 + cases {
        let (p, mut data, out_dtype) = random_problem(seed);
        if !p.head_dim.is_multiple_of(edge) || !p.v_head_dim.is_multiple_of(edge) {
            continue;
        }
        let f32_inputs = seed % 4 == 3;
        let dt = if f32_inputs { DType::F32 } else { DType::F16 };
        for t in [&mut data.q, &mut data.k, &mut data.v] {
            *t = Tensor::from_f32(&t.to_f32_vec(), dt);
        }
        let opts = RunOptions {
            out_dtype,
            max_chunk_keys: (seed % 3 == 0).then_some(8 + (seed % 5) as u32 * 8),
            ..forced(f32_inputs)
        };
        ran += 1;
        let budget = coop_budget(out_dtype.unwrap_or(dt), f32_inputs);
        if let Err(e) = check_opts(engine, &p, &data, &opts, Some(budget)) {
            failures.push(format!("seed={seed} {dt:?} out={out_dtype:?} {p:?}: {e}"));
        }
    }
    assert!(ran * 2 >= cases, "ran only {ran} of {cases}");
    assert_all_passed(&failures, Some(ran as usize));
}

/// A key a row cannot see contributes nothing, even when its V row holds NaN or inf; rows that
/// see it get inf (p · inf) or NaN, as the reference's arithmetic gives.
#[test]
fn flash_coop_invisible_nonfinite_values_contribute_nothing() {
    let Some(engine) = coop_engine("flash_coop_invisible_nonfinite_values_contribute_nothing")
    else {
        return;
    };
    let d = 16;
    let p = Problem::new(1, 40, 40, 1, 1, d).causal(true);
    let mut rng = Rng::new(0xC00B_0002);
    let clean = Data::random(&p, [DType::F16; 3], 1.0, &mut rng);
    let mut v = clean.v.to_f32_vec();
    v[20 * d + 3] = f32::INFINITY; // key 20, column 3
    for x in &mut v[30 * d..31 * d] {
        *x = f32::NAN; // key 30, every column
    }
    let mut dirty = Data::random(&p, [DType::F16; 3], 1.0, &mut rng);
    dirty.q = clean.q.clone();
    dirty.k = clean.k.clone();
    dirty.v = Tensor::from_f32(&v, DType::F16);
    let opts = RunOptions {
        out_dtype: Some(DType::F32),
        ..forced(false)
    };
    let got = engine.attention(&p, &dirty.inputs(), &opts).unwrap();
    let got = got.out.to_f32_vec();
    let want = reference::attention(&p, &clean.inputs()).unwrap();
    // Rows 0..20 see neither key: equal to the clean reference.
    let e = compare::compare(&got[..20 * d], &want.out[..20 * d]);
    assert!(e.within(5e-3), "rows that see no bad key: {e}");
    for i in 20..30 {
        for c in 0..d {
            let o = got[i * d + c];
            if c == 3 {
                assert_eq!(o, f32::INFINITY, "row {i} sees V[20][3] = inf");
            } else {
                assert!(o.is_finite(), "row {i} column {c}: {o}");
            }
        }
    }
    for (n, o) in got[30 * d..].iter().enumerate() {
        assert!(o.is_nan(), "row {} sees the NaN row: {o}", 30 + n / d);
    }
}

/// Range: values beyond f16's (bf16 and f32 can hold them) never reach the matrix units. `auto`
/// runs them exactly on flash; a forced flash-coop refuses them clearly before GPU work.
#[test]
fn flash_coop_values_beyond_f16_range_fall_back_or_are_refused() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 24, 40, 2, 1, 16);
    for dt in [DType::Bf16, DType::F32] {
        let mut rng = Rng::new(0xC00B_0003);
        let mut data = Data::random(&p, [dt; 3], 1.0, &mut rng);
        let v: Vec<f32> = data.v.to_f32_vec().iter().map(|x| x * 3.0e5).collect();
        data.v = Tensor::from_f32(&v, dt);
        let auto = RunOptions {
            allow_reduced_precision: true,
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        let got = engine.attention(&p, &data.inputs(), &auto).unwrap();
        assert_ne!(
            got.algorithm,
            Algorithm::FlashCoop,
            "{dt:?}: auto chose flash-coop"
        );
        check_opts(
            engine,
            &p,
            &data,
            &auto,
            Some(Budget::for_output(DType::F32)),
        )
        .unwrap_or_else(|e| panic!("{dt:?}: {e}"));
        let err = engine
            .attention(&p, &data.inputs(), &forced(true))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unsupported {
                    algorithm: Algorithm::FlashCoop,
                    ..
                }
            ) && err.to_string().contains("65504"),
            "{dt:?}: {err}"
        );
    }
}

/// `auto` takes the matrix units for f16 inputs once the self-test (values that f16 must round,
/// logits that grow along the keys) passed, where the engine lets it: by default only on
/// hardware matrix units, so on a CPU adapter (lavapipe here, where they are emulated and the
/// scalar row kernel is faster) `auto` stays on flash unless asked.
#[test]
fn flash_coop_auto_takes_it_for_f16_after_the_self_test() {
    let Some(shared) = coop_engine("flash_coop_auto_takes_it_for_f16_after_the_self_test") else {
        return;
    };
    let p = Problem::new(1, 64, 96, 2, 2, 64).causal(true);
    let data = Data::random(&p, [DType::F16; 3], 1.0, &mut Rng::new(0xC00B_0004));
    let by_default = shared
        .attention(&p, &data.inputs(), &RunOptions::default())
        .unwrap();
    let cpu = shared.adapter_info().device_type == spotlight::wgpu::DeviceType::Cpu;
    assert_eq!(shared.auto_matrix_units(), !cpu, "{}", shared.describe());
    let want = if cpu {
        Algorithm::Flash
    } else {
        Algorithm::FlashCoop
    };
    assert_eq!(by_default.algorithm, want, "{}", shared.describe());
    // An engine that lets auto use them (on this same adapter).
    let engine = Engine::new().unwrap().with_auto_matrix_units(true);
    // The self-test builds (and checks) both of the kernel's epilogues, O in f32 and O in f16,
    // before the first call that may use it: a run with O in f32, then one with the default
    // (f16) output, build nothing more.
    let before = engine.pipelines_built();
    let f32_out = RunOptions {
        out_dtype: Some(DType::F32),
        ..Default::default()
    };
    let got = engine.attention(&p, &data.inputs(), &f32_out).unwrap();
    assert_eq!(got.algorithm, Algorithm::FlashCoop);
    assert_eq!(
        engine.pipelines_built() - before,
        2,
        "{}",
        engine.describe()
    );
    let got = engine
        .attention(&p, &data.inputs(), &RunOptions::default())
        .unwrap();
    assert_eq!(got.algorithm, Algorithm::FlashCoop);
    assert_eq!(
        engine.pipelines_built() - before,
        2,
        "{}",
        engine.describe()
    );
    check_opts(
        &engine,
        &p,
        &data,
        &RunOptions::default(),
        Some(coop_budget(DType::F16, false)),
    )
    .unwrap();
    // And one that does not.
    let engine = engine.with_auto_matrix_units(false);
    let got = engine
        .attention(&p, &data.inputs(), &RunOptions::default())
        .unwrap();
    assert_ne!(got.algorithm, Algorithm::FlashCoop);
}

/// A half output dtype: the matrix-unit kernel writes it itself (no f32 copy of O and no pack
/// pass) in a run without key chunks, and the merge writes it after a split run; both layouts
/// of O, Dv ≠ D, masks and bias or causal; against the reference and the passes that ran.
#[test]
fn flash_coop_writes_half_outputs_itself() {
    let Some(engine) = coop_engine("flash_coop_writes_half_outputs_itself") else {
        return;
    };
    let edge = engine.capabilities().coop_edge as usize;
    let mut rng = Rng::new(0xC00B_0005);
    let mut failures = Vec::new();
    let mut n = 0;
    for (case, (out, layout, split)) in [
        (DType::F16, spotlight::Layout::Bshd, false),
        (DType::Bf16, spotlight::Layout::Bhsd, false),
        (DType::Bf16, spotlight::Layout::Bshd, false),
        (DType::F16, spotlight::Layout::Bhsd, true),
    ]
    .into_iter()
    .enumerate()
    {
        let masked = case % 2 == 1;
        // The split run: keys in chunks of one 64-key tile.
        let lk = if split { 150 } else { 50 };
        let mut p = Problem::new(2, 37, lk, 4, 2, 4 * edge)
            .v_head_dim(2 * edge)
            .layout(layout)
            .causal(!masked);
        let mut data = Data::random(&p, [DType::F16; 3], 1.0, &mut rng);
        if masked {
            let all = spotlight::Broadcast { batch: 1, heads: 4 };
            p.mask = Some(all);
            p.bias = Some(all);
            let cells = 4 * 37 * lk;
            data.bias = Some((0..cells).map(|_| rng.uniform(-2.0, 2.0)).collect());
            data.mask = Some((0..cells).map(|_| rng.chance(0.7) as u8).collect());
        }
        let opts = RunOptions {
            out_dtype: Some(out),
            max_chunk_keys: Some(if split { 64 } else { 4096 }),
            ..forced(false)
        };
        let what = format!("{out:?} {layout:?} split {split}");
        n += 1;
        if let Err(e) = check_opts(engine, &p, &data, &opts, Some(coop_budget(out, false))) {
            failures.push(format!("{what}: {e}"));
        }
        let est = engine.estimate(&p, [DType::F16; 3], &opts).unwrap();
        assert_eq!(
            est.plan.ends_with("chunks1"),
            !split,
            "{what}: {}",
            est.plan
        );
        let names = kernels_run(engine, &p, &data.inputs(), &opts);
        // lavapipe (where CI runs this) has timestamp queries: the pass list is checked there.
        let cpu = engine.adapter_info().device_type == spotlight::wgpu::DeviceType::Cpu;
        assert!(names.is_some() || !cpu, "{}", engine.describe());
        if let Some(names) = names {
            let expected = if split {
                vec!["flash_coop", "merge"]
            } else {
                vec!["flash_coop"]
            };
            assert_eq!(names, expected, "{what}");
        }
    }
    assert_all_passed(&failures, Some(n));
}
