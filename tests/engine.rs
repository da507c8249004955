//! The engine's contracts: wrapping an application's device, caller-owned buffers (poisoned with
//! NaN first), the pipeline cache under contention, algorithm choice, limits and dispatch folding.

use std::sync::Arc;

use spotlight::reference::{self, compare, random::Rng};
use spotlight::{Algorithm, DType, Engine, Error, GpuInputs, GpuOutputs, Problem, RunOptions};
use wgpu::util::DeviceExt;

use crate::common::{Data, check, engine};

#[test]
fn engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
}

#[test]
fn works_on_a_device_the_application_owns() {
    if engine().is_none() {
        return;
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter =
        pollster::block_on(instance.request_adapter(&Default::default())).expect("adapter");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&Default::default())).expect("device");
    let app = Engine::from_device(device, queue);
    let p = Problem::new(2, 21, 34, 4, 2, 48).causal(true);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(1));
    for alg in [Algorithm::ThreePass, Algorithm::Flash] {
        check(&app, &p, &d, alg, false, None, None).unwrap();
    }
    assert_eq!(app.chosen_because(), "provided by the application");
}

#[test]
fn caller_owned_buffers_poisoned_with_nan_are_fully_written() {
    let Some(engine) = engine() else { return };
    let dev = engine.device();
    let p = Problem::new(2, 37, 50, 6, 3, 32).causal(true);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(2));
    let init = |bytes: &[u8]| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
    };
    let (q, k, v) = (
        init(d.q.as_ref().as_bytes()),
        init(d.k.as_ref().as_bytes()),
        init(d.v.as_ref().as_bytes()),
    );
    for alg in [Algorithm::ThreePass, Algorithm::Flash] {
        let out = init(bytemuck::cast_slice(&vec![f32::NAN; p.o_elems()]));
        let lse = init(bytemuck::cast_slice(&vec![f32::NAN; p.lse_elems()]));
        let gin = GpuInputs {
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
        let gout = GpuOutputs {
            out: &out,
            out_dtype: DType::F32,
            lse: Some(&lse),
            probs: None,
        };
        let mut enc = dev.create_command_encoder(&Default::default());
        let ran = engine
            .attention_on_buffers(
                &mut enc,
                &p,
                &gin,
                &gout,
                &RunOptions {
                    algorithm: alg,
                    lse: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(ran, alg);
        engine.queue().submit([enc.finish()]);
        let want = reference::attention(&p, &d.inputs()).unwrap();
        let o = engine.read_f32(&out, p.o_elems()).unwrap();
        let l = engine.read_f32(&lse, p.lse_elems()).unwrap();
        assert!(compare::compare(&o, &want.out).within(1e-5), "{alg:?} O");
        assert!(compare::compare(&l, &want.lse).within(1e-6), "{alg:?} LSE");

        let small = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let gout = GpuOutputs {
            out: &small,
            ..gout
        };
        let mut enc = dev.create_command_encoder(&Default::default());
        let err = engine
            .attention_on_buffers(
                &mut enc,
                &p,
                &gin,
                &gout,
                &RunOptions {
                    lse: true,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, Error::BadBuffer { what: "out", .. }), "{err}");
    }
}

#[test]
fn pipeline_cache_builds_each_variant_once_under_contention() {
    if engine().is_none() {
        return;
    }
    let engine = Arc::new(Engine::new().unwrap());
    let p = Problem::new(1, 9, 9, 2, 1, 24);
    let d = Arc::new(Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(3)));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (engine, p, d) = (engine.clone(), p.clone(), d.clone());
            std::thread::spawn(move || {
                let alg = if t % 2 == 0 {
                    Algorithm::Flash
                } else {
                    Algorithm::ThreePass
                };
                check(&engine, &p, &d, alg, false, None, None)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    // flash: 1 variant; three-pass: scores, softmax, pv.
    assert_eq!(engine.pipelines_built(), 4);
    check(&engine, &p, &d, Algorithm::Flash, false, None, None).unwrap();
    assert_eq!(engine.pipelines_built(), 4, "a second run must not rebuild");
}

#[test]
fn auto_picks_flash_unless_probabilities_are_asked_for() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 8, 8, 1, 1, 16);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(4));
    let run = |probs| {
        engine
            .attention(
                &p,
                &d.inputs(),
                &RunOptions {
                    probs,
                    ..Default::default()
                },
            )
            .unwrap()
            .algorithm
    };
    assert_eq!(run(false), Algorithm::Flash);
    assert_eq!(run(true), Algorithm::ThreePass);
}

#[test]
fn flash_refuses_what_it_cannot_do_and_auto_falls_back() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 3, 5, 1, 1, 1024);
    let d = Data::random(&p, [DType::F32; 3], 0.1, &mut Rng::new(5));
    let forced = RunOptions {
        algorithm: Algorithm::Flash,
        ..Default::default()
    };
    let err = engine.attention(&p, &d.inputs(), &forced).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                algorithm: Algorithm::Flash,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("D=1024"), "{err}");
    check(engine, &p, &d, Algorithm::Auto, false, None, None).unwrap();
    // A row count the row kernel does not have is refused, whatever the adapter.
    let p = Problem::new(1, 3, 5, 1, 1, 8);
    let d = Data::random(&p, [DType::F32; 3], 0.1, &mut Rng::new(5));
    let odd = RunOptions {
        algorithm: Algorithm::Flash,
        rows_per_workgroup: Some(12),
        ..Default::default()
    };
    for algorithm in [Algorithm::Flash, Algorithm::Auto, Algorithm::ThreePass] {
        let odd = RunOptions { algorithm, ..odd };
        let err = match engine.attention(&p, &d.inputs(), &odd) {
            Ok(o) => panic!(
                "{algorithm:?} with rows_per_workgroup 12 ran ({:?})",
                o.algorithm
            ),
            Err(e) => e,
        };
        assert!(
            matches!(err, Error::Unsupported { .. })
                && err.to_string().contains("rows_per_workgroup = 12"),
            "{algorithm:?}: {err}"
        );
    }
}

#[test]
fn score_matrix_over_the_binding_limit_is_a_clear_error() {
    let Some(engine) = engine() else { return };
    let limit = engine.capabilities().max_storage_binding;
    let side = ((limit / 4) as f64).sqrt() as usize + 2;
    let p = Problem::new(1, side, side, 1, 1, 1);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(6));
    let opts = RunOptions {
        algorithm: Algorithm::ThreePass,
        ..Default::default()
    };
    let err = engine.attention(&p, &d.inputs(), &opts).unwrap_err();
    match &err {
        Error::LimitExceeded {
            limit_name,
            limit: l,
            ..
        } => {
            assert_eq!(*limit_name, "max_storage_buffer_binding_size");
            assert_eq!(*l, limit);
        }
        other => panic!("expected LimitExceeded, got {other}"),
    }
    assert!(err.to_string().contains("score matrix"), "{err}");
}

#[test]
fn more_rows_than_one_dispatch_dimension_allows_are_folded() {
    let Some(engine) = engine() else { return };
    // 70 000 softmax rows: one workgroup each, more than 65 535 in x.
    let p = Problem::new(1, 70_000, 3, 1, 1, 4);
    let d = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(7));
    for alg in [Algorithm::ThreePass, Algorithm::Flash] {
        check(engine, &p, &d, alg, false, None, None).unwrap();
    }
}

#[test]
fn long_key_ranges_split_into_chunks_and_merge_exactly() {
    let Some(engine) = engine() else { return };
    // D = 256 uses 8-key tiles on lavapipe, so 2500 keys make several chunks there; the explicit
    // chunk size forces a split on every adapter.
    let mut p = Problem::new(2, 5, 2500, 4, 2, 256).causal(true);
    p.window = Some(spotlight::reference::Window {
        left: Some(1800),
        right: None,
    });
    p.kv_seqlens = true;
    let mut d = Data::random(
        &p,
        [DType::F32, DType::F16, DType::F32],
        1.0,
        &mut Rng::new(8),
    );
    d.kv_seqlens = Some(vec![2500, 1333]);
    for chunk in [None, Some(300), Some(64)] {
        let opts = RunOptions {
            algorithm: Algorithm::Flash,
            max_chunk_keys: chunk,
            ..Default::default()
        };
        crate::common::check_opts(engine, &p, &d, &opts, None)
            .unwrap_or_else(|e| panic!("chunk {chunk:?}: {e}"));
    }
}

#[test]
fn matrix_unit_kernel_is_refused_clearly_where_the_adapter_lacks_it() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 16, 32, 2, 2, 64);
    let d = Data::random(&p, [DType::F16; 3], 1.0, &mut Rng::new(9));
    let forced = RunOptions {
        algorithm: Algorithm::FlashCoop,
        ..Default::default()
    };
    let caps = engine.capabilities();
    if caps.coop_edge != 0 {
        // Matrix units: the kernel must agree with the reference within the budget of f16
        // products with P rounded to f16 (tests/coop.rs runs the full suites on it).
        let budget = crate::common::Budget {
            out: 5e-3,
            lse: 1e-3,
            probs: 0.0,
        };
        check(
            engine,
            &p,
            &d,
            Algorithm::FlashCoop,
            false,
            None,
            Some(budget),
        )
        .unwrap();
        return;
    }
    let err = engine.attention(&p, &d.inputs(), &forced).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                algorithm: Algorithm::FlashCoop,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("cooperative matrices"), "{err}");
    // f32 inputs need leave to be rounded, whatever the adapter.
    let d32 = Data::random(&p, [DType::F32; 3], 1.0, &mut Rng::new(9));
    let err = engine.attention(&p, &d32.inputs(), &forced).unwrap_err();
    assert!(err.to_string().contains("allow_reduced_precision"), "{err}");
    // auto never picks it here.
    let ran = engine
        .attention(&p, &d.inputs(), &RunOptions::default())
        .unwrap()
        .algorithm;
    assert_eq!(ran, Algorithm::Flash);
    assert_eq!(
        "flash-coop".parse::<Algorithm>().unwrap(),
        Algorithm::FlashCoop
    );
}

/// `Engine::time_passes` times each compute pass of one call and sums them per kernel, in the
/// order the kernels ran; without timestamp queries it says every pass went untimed.
#[test]
fn a_profile_times_each_kernel_of_a_call() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 64, 64, 2, 2, 32);
    let d = Data::random(&p, [DType::F16; 3], 0.5, &mut Rng::new(21));
    let opts = RunOptions {
        algorithm: Algorithm::ThreePass,
        out_dtype: Some(DType::F16),
        ..Default::default()
    };
    let resident = engine.upload(&p, &d.inputs(), &opts).unwrap();
    let profile = engine
        .time_passes(|enc| {
            engine.attention_on_buffers(enc, &p, &resident.inputs(), &resident.outputs(), &opts)?;
            Ok(())
        })
        .unwrap();
    if !engine.capabilities().timestamp_query {
        assert!(profile.kernels.is_empty());
        assert!(profile.untimed_passes >= 4, "{profile:?}");
        eprintln!("SKIPPED per-pass times: the adapter has no timestamp queries");
        return;
    }
    let names: Vec<&str> = profile.kernels.iter().map(|k| k.kernel).collect();
    assert_eq!(names, ["scores", "softmax", "pv", "pack"], "{profile:?}");
    assert_eq!(profile.untimed_passes, 0);
    let sum: f64 = profile.kernels.iter().map(|k| k.seconds).sum();
    for k in &profile.kernels {
        assert!(
            k.passes >= 1 && k.seconds.is_finite() && k.seconds >= 0.0,
            "{k:?}"
        );
    }
    assert!(sum > 0.0, "{profile:?}");
    // The passes lie between the call's own begin and end timestamps.
    assert!(sum <= profile.total.seconds * 1.01 + 1e-6, "{profile:?}");
    // The timer is disarmed afterwards: a plain call is not counted into anything.
    let again = engine
        .time_passes(|enc| {
            engine.attention_on_buffers(enc, &p, &resident.inputs(), &resident.outputs(), &opts)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(again.kernels.len(), 4, "{again:?}");
    // A call that panics while recording leaves no profile armed behind it.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.time_passes(|_| panic!("the caller's recording panics"))
    }));
    assert!(panicked.is_err());
    let after = engine
        .time_passes(|enc| {
            engine.attention_on_buffers(enc, &p, &resident.inputs(), &resident.outputs(), &opts)?;
            Ok(())
        })
        .expect("the timer was disarmed by the panic");
    assert_eq!(after.kernels.len(), 4, "{after:?}");
}
