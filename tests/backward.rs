//! The backward pass on the GPU against the exact f64 gradients of the reference: random problems
//! with every option and dtype, awkward shapes and GQA ratios, NaN/padding rules, and bitwise
//! determinism. Gradient buffers are filled with NaN before every run (the host API does it).

use spotlight::reference::random::Rng;
use spotlight::reference::{self, Broadcast, compare};
use spotlight::{BackwardOptions, DType, Engine, FlashLayout, Problem, RunOptions, Tensor};

use crate::common::{Data, assert_all_passed, engine, packed_engine};
use crate::differential::random_problem;

/// Relative Frobenius budget of every gradient, by the storage dtype of the forward output the
/// backward reads (D_i = rowsum(dO ∘ O) carries O's rounding).
fn budget(out: DType) -> f64 {
    match out {
        DType::F32 => 2e-4,
        DType::F16 => 5e-3,
        DType::Bf16 => 4e-2,
    }
}

/// Runs forward (with LSE) and backward on the GPU and compares dQ, dK, dV, dBias with the
/// reference gradients. Returns a description of what failed.
fn check_grads(
    engine: &Engine,
    p: &Problem,
    data: &Data,
    d_out: &Tensor,
    out_dtype: DType,
    opts: &BackwardOptions,
) -> Result<(), String> {
    check_grads_with(engine, p, data, d_out, out_dtype, opts, false)
}

/// [`check_grads`]; with `reference_forward` the backward is given the reference's O and LSE
/// (rounded to f32) instead of the GPU forward's, to judge the backward alone.
fn check_grads_with(
    engine: &Engine,
    p: &Problem,
    data: &Data,
    d_out: &Tensor,
    out_dtype: DType,
    opts: &BackwardOptions,
    reference_forward: bool,
) -> Result<(), String> {
    let inputs = data.inputs();
    let fwd_ref = reference::attention(p, &inputs).map_err(|e| format!("reference: {e}"))?;
    let want = reference::attention_backward(p, &inputs, &fwd_ref, d_out.as_ref())
        .map_err(|e| format!("reference backward: {e}"))?;
    let run = RunOptions {
        lse: true,
        out_dtype: Some(out_dtype),
        ..Default::default()
    };
    let mut fwd = engine
        .attention(p, &inputs, &run)
        .map_err(|e| format!("forward: {e}"))?;
    if reference_forward {
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        fwd.out = Tensor::F32(f(&fwd_ref.out));
        fwd.lse = Some(f(&fwd_ref.lse));
    }
    let got = engine
        .attention_backward(p, &inputs, &fwd, d_out.as_ref(), opts)
        .map_err(|e| format!("backward: {e}"))?;
    let b = budget(out_dtype);
    let mut msg = String::new();
    // Where a true gradient is 0 up to cancellation (one visible key: dS = P·(dP − D) = 0), the
    // relative error is meaningless; such entries are judged by their absolute error against the
    // size of dV (never degenerate: Pᵀ·dO).
    let scale = want
        .dv
        .iter()
        .filter(|x| x.is_finite())
        .fold(1e-3f64, |m, x| m.max(x.abs()));
    let mut judge = |name: &str, g: &[f32], w: &[f64]| {
        let e = compare::compare(g, w);
        if !(e.within(b) || (e.non_finite_mismatches == 0 && e.max_abs <= b * scale)) {
            msg += &format!("{name}: {e} (budget {b:.0e}); ");
        }
    };
    judge("dq", &got.dq, &want.dq);
    judge("dk", &got.dk, &want.dk);
    judge("dv", &got.dv, &want.dv);
    match (&got.dbias, &want.dbias) {
        (Some(g), Some(w)) => judge("dbias", g, w),
        (None, None) => {}
        _ => msg += "dbias presence differs; ",
    }
    if msg.is_empty() { Ok(()) } else { Err(msg) }
}

/// Random problems combining every option (causal, window, mask, broadcast bias, ALiBi,
/// softcap, scale, GQA, padding with q/kv seqlens, Dv ≠ D, both layouts), every dtype of Q, K, V,
/// dO and the forward output; every third one splits the passes' loops into dispatches of a few
/// tiles. `SPOTLIGHT_BACKWARD_CASES` raises the count (default 16). Two tests, even and odd
/// seeds (odd ones read f16 through the packed fallback, on its own engine), which run side by
/// side.
#[test]
fn backward_random_problems_match_reference_gradients_even_seeds() {
    random_problems_match_reference_gradients(0);
}

#[test]
fn backward_random_problems_match_reference_gradients_odd_seeds() {
    random_problems_match_reference_gradients(1);
}

fn random_problems_match_reference_gradients(parity: u64) {
    let Some(engine) = engine() else { return };
    let cases: u64 = std::env::var("SPOTLIGHT_BACKWARD_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut failures = Vec::new();
    let half: Vec<u64> = (parity..cases).step_by(2).collect();
    assert!(
        !half.is_empty(),
        "SPOTLIGHT_BACKWARD_CASES={cases} leaves this half no seed (at least 2)"
    );
    for &c in &half {
        let seed = 0xBAC0_0000 + c;
        let (p, data, _) = random_problem(seed);
        let mut rng = Rng::new(seed ^ 0xD0);
        let do_dt = rng.pick(&[DType::F32, DType::F32, DType::F16, DType::Bf16]);
        let d_out = Tensor::from_f32(&rng.vec(p.o_elems()), do_dt);
        let out_dtype = rng.pick(&[DType::F32, DType::F32, DType::F16, DType::Bf16]);
        let opts = BackwardOptions {
            max_tiles_per_dispatch: (seed % 3 == 0).then_some(1 + (seed % 2) as u32),
            // A quarter of the problems run the tiled kernels where the row kernels are the
            // default (CPU adapters); elsewhere the default already is the tiled one.
            layout: (seed % 4 == 3).then_some(FlashLayout::Tiled),
            // And one in 16 the row kernels with 16 rows per workgroup (large problems' choice).
            rows_per_workgroup: (seed % 16 == 1).then_some(16),
            // The row kernels take dQ from the stored logit gradients where they fit and there
            // is no bias; one in five problems recomputes them instead.
            dq_from_gradients: (seed % 5 == 2).then_some(false),
        };
        let e = if seed % 2 == 1 {
            packed_engine().expect("engine")
        } else {
            engine
        };
        if let Err(e) = check_grads(e, &p, &data, &d_out, out_dtype, &opts) {
            failures.push(format!(
                "seed={seed:#x} dtypes={:?} dO={do_dt:?} O={out_dtype:?} {p:?}: {e}",
                data.inputs().dtypes()
            ));
        }
    }
    assert_all_passed(&failures, Some(half.len()));
}

/// Awkward shapes and GQA ratios 1, 4 and all-to-one (MQA), causal with Lq ≠ Lk both ways.
#[test]
fn backward_awkward_shapes_and_gqa() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(0x6A0);
    let mut failures = Vec::new();
    let shapes = [
        (1, 1, 1, 1, 1, 8, 8),
        (2, 33, 7, 4, 1, 40, 24),
        (1, 7, 100, 8, 2, 64, 64),
        (1, 65, 65, 6, 6, 16, 72),
        (2, 17, 50, 4, 4, 128, 32),
        // Wide heads: more than four vec4 columns per lane on 8-lane subgroups (lavapipe with
        // 256-bit vectors, CI's): the dQ row pass's one-key updates.
        (1, 9, 40, 2, 1, 256, 40),
    ];
    for (n, &(b, lq, lk, hq, hkv, d, dv)) in shapes.iter().enumerate() {
        for causal in [false, true] {
            let p = Problem::new(b, lq, lk, hq, hkv, d)
                .v_head_dim(dv)
                .causal(causal);
            let data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
            let d_out = Tensor::from_f32(&rng.vec(p.o_elems()), DType::F32);
            if let Err(e) = check_grads(engine, &p, &data, &d_out, DType::F32, &Default::default())
            {
                failures.push(format!("shape {n} causal={causal} {p:?}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rows that see nothing and padded rows get zero gradient; NaN in what no row sees (masked and
/// padded keys, padded query rows, dO of rows that see nothing) does not leak; a NaN in dO of a
/// row reaches exactly the gradients the reference says (compared with NaN matching NaN). With a
/// bias (dQ recomputed), and without one, dQ from the stored logit gradients and recomputed.
#[test]
fn backward_nan_and_padding_rules() {
    let Some(engine) = engine() else { return };
    nan_and_padding_rules(engine, true, &Default::default());
    for stored in [true, false] {
        let opts = BackwardOptions {
            dq_from_gradients: Some(stored),
            ..Default::default()
        };
        nan_and_padding_rules(engine, false, &opts);
    }
}

/// Problems without mask, bias, ALiBi or soft cap run the row kernels' band path
/// (`PLAIN_LOGITS` in backward_kv_rows.wgsl and backward_q_rows.wgsl), every block through it:
/// causal with more keys than queries and with fewer (rows that see nothing), a window with
/// padded query and key lengths, GQA; dQ from the stored gradients and recomputed (the query
/// row pass), 8 and 16 rows per workgroup; each against the reference gradients.
#[test]
fn backward_plain_problems_take_the_band_path() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(0xBA4D);
    let mut failures = Vec::new();
    let mut n = 0;
    let window = spotlight::reference::Window {
        left: Some(6),
        right: Some(2),
    };
    let problems = [
        (Problem::new(2, 37, 50, 4, 2, 40).causal(true), None),
        (Problem::new(1, 50, 33, 2, 2, 16).causal(true), None),
        (
            Problem::new(2, 45, 45, 2, 1, 24).window(Some(window)),
            Some((vec![45, 20], vec![45, 30])),
        ),
    ];
    for (p, lens) in problems {
        let mut p = p;
        p.q_seqlens = lens.is_some();
        p.kv_seqlens = lens.is_some();
        let mut data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
        if let Some((q, kv)) = &lens {
            data.q_seqlens = Some(q.clone());
            data.kv_seqlens = Some(kv.clone());
        }
        let d_out = Tensor::from_f32(&rng.vec(p.o_elems()), DType::F32);
        for stored in [true, false] {
            for rows in [8, 16] {
                let opts = BackwardOptions {
                    dq_from_gradients: Some(stored),
                    rows_per_workgroup: Some(rows),
                    ..Default::default()
                };
                n += 1;
                if let Err(e) = check_grads(engine, &p, &data, &d_out, DType::F32, &opts) {
                    failures.push(format!("stored={stored} rows={rows} {p:?}: {e}"));
                }
            }
        }
    }
    assert_eq!(n, 12);
    assert_all_passed(&failures, Some(n));
}

fn nan_and_padding_rules(engine: &Engine, with_bias: bool, opts: &BackwardOptions) {
    let mut p = Problem::new(2, 6, 9, 2, 1, 8).causal(true);
    p.q_seqlens = true;
    p.kv_seqlens = true;
    p.mask = Some(Broadcast { batch: 1, heads: 1 });
    p.bias = with_bias.then_some(Broadcast { batch: 1, heads: 2 });
    let mut rng = Rng::new(0x4A4);
    let mut data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    data.q_seqlens = Some(vec![4, 6]);
    data.kv_seqlens = Some(vec![7, 3]);
    let mut mask = vec![1u8; 6 * 9];
    for i in 0..6 {
        mask[i * 9 + 2] = 0; // key 2 hidden from every row
    }
    mask[0..9].fill(0); // row 0 sees nothing
    data.mask = Some(mask);
    let bias = rng.vec(2 * 6 * 9);
    data.bias = with_bias.then_some(bias);
    let s = p.k_strides();
    let mut k = data.k.to_f32_vec();
    let mut v = data.v.to_f32_vec();
    let mut q = data.q.to_f32_vec();
    for d in 0..8 {
        for (b, j) in [(0, 2), (0, 8), (1, 5)] {
            k[s.index(b, j, 0, d)] = f32::NAN; // masked or padded keys
            v[s.index(b, j, 0, d)] = f32::NAN;
        }
        q[p.q_strides().index(0, 5, 1, d)] = f32::NAN; // padded row of batch 0
    }
    data.k = Tensor::F32(k);
    data.v = Tensor::F32(v);
    data.q = Tensor::F32(q);
    let mut d_out = rng.vec(p.o_elems());
    let o = p.o_strides();
    d_out[o.index(0, 0, 0, 3)] = f32::NAN; // row 0 sees nothing
    d_out[o.index(0, 5, 1, 0)] = f32::NAN; // padded row
    let d_out_t = Tensor::F32(d_out.clone());
    // The backward is given the reference forward: the fused forward itself lets a NaN in V of
    // a masked key reach O (0·NaN), which is the forward's matter, not the backward's.
    check_grads_with(engine, &p, &data, &d_out_t, DType::F32, opts, true).expect("finite case");
    let fwd_ref = reference::attention(&p, &data.inputs()).unwrap();
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let fwd = spotlight::Output {
        out: Tensor::F32(f(&fwd_ref.out)),
        lse: Some(f(&fwd_ref.lse)),
        probs: None,
        algorithm: spotlight::Algorithm::Flash,
    };
    let g = engine
        .attention_backward(&p, &data.inputs(), &fwd, d_out_t.as_ref(), opts)
        .unwrap();
    for (name, t) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
        assert!(
            t.iter().all(|x| x.is_finite()),
            "{name} has a non-finite value"
        );
    }
    assert_eq!(g.dbias.is_some(), with_bias);
    assert!(g.dbias.iter().flatten().all(|x| x.is_finite()));
    let qs = p.q_strides();
    for h in 0..2 {
        for d in 0..8 {
            assert_eq!(g.dq[qs.index(0, 0, h, d)], 0.0, "row 0 sees nothing");
            assert_eq!(g.dq[qs.index(0, 5, h, d)], 0.0, "padded row");
        }
    }
    for d in 0..8 {
        assert_eq!(g.dk[s.index(0, 8, 0, d)], 0.0, "padded key");
        assert_eq!(g.dk[s.index(0, 2, 0, d)], 0.0, "masked key");
    }
    // A NaN in dO of a live row: NaN exactly where the reference has it.
    d_out[o.index(1, 4, 0, 1)] = f32::NAN;
    check_grads_with(
        engine,
        &p,
        &data,
        &Tensor::F32(d_out),
        DType::F32,
        opts,
        true,
    )
    .expect("NaN case");
}

/// A visible key whose logit gradient is exactly 0 still multiplies its K into dQ: with a softcap
/// a key with K = +inf has a finite logit (cap·tanh(inf) = cap) and ∂s/∂dot = 0, so dQ gets 0·inf
/// = NaN in that column, as in the reference, while an invisible (masked) key with inf in K adds
/// nothing. Every way of computing dQ: stored gradients (their encoding tells a visible 0 from an
/// invisible key), recomputed ones, the tiled passes.
#[test]
fn backward_zero_gradient_of_a_visible_key_meets_its_k() {
    let Some(engine) = engine() else { return };
    let mut p = Problem::new(1, 5, 7, 2, 1, 8).softcap(Some(5.0));
    p.mask = Some(Broadcast { batch: 1, heads: 1 });
    let mut rng = Rng::new(0x2E0);
    let mut data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    let mut mask = vec![1u8; 5 * 7];
    for i in 0..5 {
        mask[i * 7 + 4] = 0; // key 4 hidden from every row
    }
    data.mask = Some(mask);
    let (qs, ks) = (p.q_strides(), p.k_strides());
    let mut q = data.q.to_f32_vec();
    let mut k = data.k.to_f32_vec();
    for i in 0..5 {
        for h in 0..2 {
            q[qs.index(0, i, h, 3)] = 1.0; // q·k_2 = +inf, never NaN
        }
    }
    k[ks.index(0, 2, 0, 3)] = f32::INFINITY; // visible to every row
    k[ks.index(0, 4, 0, 5)] = f32::INFINITY; // masked
    data.q = Tensor::F32(q);
    data.k = Tensor::F32(k);
    let d_out = Tensor::F32(rng.vec(p.o_elems()));
    let want = {
        let fwd = reference::attention(&p, &data.inputs()).unwrap();
        reference::attention_backward(&p, &data.inputs(), &fwd, d_out.as_ref()).unwrap()
    };
    assert!(
        (0..5).all(|i| want.dq[qs.index(0, i, 0, 3)].is_nan()),
        "the reference's dQ column 3 is 0·inf"
    );
    assert!(
        want.dq[qs.index(0, 0, 0, 5)].is_finite(),
        "a masked key adds nothing"
    );
    for opts in [
        BackwardOptions::default(),
        BackwardOptions {
            dq_from_gradients: Some(true),
            ..Default::default()
        },
        BackwardOptions {
            dq_from_gradients: Some(false),
            ..Default::default()
        },
        BackwardOptions {
            layout: Some(FlashLayout::Tiled),
            ..Default::default()
        },
    ] {
        check_grads_with(engine, &p, &data, &d_out, DType::F32, &opts, true)
            .unwrap_or_else(|e| panic!("{opts:?}: {e}"));
    }
}

/// Stored logit gradients that do not fit the binding limit: `auto` recomputes them (right
/// gradients), asking for them is a typed limit error (row kernels; the tiled ones ignore it).
#[test]
fn backward_stored_gradients_follow_the_binding_limit() {
    if engine().is_none() {
        return;
    }
    let small = Engine::new().unwrap().with_binding_limit(8 << 10);
    let p = Problem::new(1, 64, 64, 1, 1, 8);
    let mut rng = Rng::new(0xB1D);
    let data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    let d_out = Tensor::F32(rng.vec(p.o_elems()));
    check_grads_with(
        &small,
        &p,
        &data,
        &d_out,
        DType::F32,
        &Default::default(),
        true,
    )
    .expect("auto recomputes the gradients");
    let rows = BackwardOptions {
        layout: Some(FlashLayout::Rows),
        dq_from_gradients: Some(true),
        ..Default::default()
    };
    match check_grads_with(&small, &p, &data, &d_out, DType::F32, &rows, true) {
        Err(e) if e.contains("row kernels") => {} // adapter without them
        Err(e) => assert!(
            e.contains("logit gradients") && e.contains("max_storage_buffer_binding_size"),
            "{e}"
        ),
        Ok(()) => panic!("20 KiB of dK, dV and gradients stored under an 8 KiB binding limit"),
    }
}

/// The same inputs give bit-identical gradients on three runs (no atomics, fixed order), also
/// with the loops split into dispatches; with a bias, and without one (dQ from the stored
/// logit gradients on CPU adapters).
#[test]
fn backward_is_bitwise_deterministic() {
    let Some(engine) = engine() else { return };
    deterministic(engine, true);
    deterministic(engine, false);
}

fn deterministic(engine: &Engine, with_bias: bool) {
    let mut p = Problem::new(2, 70, 90, 4, 2, 64).causal(true);
    p.bias = with_bias.then_some(Broadcast { batch: 1, heads: 1 });
    let mut rng = Rng::new(0xDE7);
    let mut data = Data::random(&p, [DType::F16, DType::Bf16, DType::F32], 2.0, &mut rng);
    data.bias = with_bias.then(|| rng.vec(70 * 90));
    let d_out = Tensor::from_f32(&rng.vec(p.o_elems()), DType::F32);
    let run = RunOptions {
        lse: true,
        ..Default::default()
    };
    let fwd = engine.attention(&p, &data.inputs(), &run).unwrap();
    for opts in [
        BackwardOptions::default(),
        BackwardOptions {
            max_tiles_per_dispatch: Some(1),
            ..Default::default()
        },
        BackwardOptions {
            layout: Some(FlashLayout::Tiled),
            ..Default::default()
        },
    ] {
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let g = engine
                    .attention_backward(&p, &data.inputs(), &fwd, d_out.as_ref(), &opts)
                    .unwrap();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
                (
                    bits(&g.dq),
                    bits(&g.dk),
                    bits(&g.dv),
                    bits(&g.dbias.unwrap_or_default()),
                )
            })
            .collect();
        assert!(
            runs[0] == runs[1] && runs[1] == runs[2],
            "bias {with_bias} {opts:?}"
        );
    }
}

/// A forward result without its LSE, and dO of the wrong length, are refused with typed errors.
#[test]
fn backward_refuses_bad_input() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 4, 4, 1, 1, 8);
    let mut rng = Rng::new(1);
    let data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    let fwd = engine
        .attention(&p, &data.inputs(), &RunOptions::default())
        .unwrap();
    let d_out = Tensor::F32(rng.vec(p.o_elems()));
    let e = engine
        .attention_backward(
            &p,
            &data.inputs(),
            &fwd,
            d_out.as_ref(),
            &Default::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("LSE"), "{e}");
    let fwd_lse = engine
        .attention(
            &p,
            &data.inputs(),
            &RunOptions {
                lse: true,
                ..Default::default()
            },
        )
        .unwrap();
    let e = engine
        .attention_backward(
            &p,
            &data.inputs(),
            &fwd_lse,
            d_out.as_ref(),
            &BackwardOptions {
                rows_per_workgroup: Some(3),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("rows_per_workgroup = 3"), "{e}");
    // The decode layout is a forward kernel: refused by name.
    let e = engine
        .attention_backward(
            &p,
            &data.inputs(),
            &fwd_lse,
            d_out.as_ref(),
            &BackwardOptions {
                layout: Some(FlashLayout::Decode),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, spotlight::Error::BackwardUnsupported { .. })
            && e.to_string().contains("decode layout"),
        "{e}"
    );
    // dQ from stored logit gradients takes no bias: refused with the row kernels, ignored by the
    // tiled ones (adapters without the row kernels refuse those instead).
    let mut pb = p.clone();
    pb.bias = Some(Broadcast { batch: 1, heads: 1 });
    let bias = rng.vec(16);
    let mut with_bias = data.inputs();
    with_bias.bias = Some(&bias);
    let run = RunOptions {
        lse: true,
        ..Default::default()
    };
    let fwd_b = engine.attention(&pb, &with_bias, &run).unwrap();
    let e = engine
        .attention_backward(
            &pb,
            &with_bias,
            &fwd_b,
            d_out.as_ref(),
            &BackwardOptions {
                layout: Some(FlashLayout::Rows),
                dq_from_gradients: Some(true),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, spotlight::Error::BackwardUnsupported { .. }),
        "{e}"
    );
    let rows_refused = e.to_string().contains("row kernel");
    assert!(
        rows_refused || e.to_string().contains("dq_from_gradients"),
        "{e}"
    );
    let tiled = BackwardOptions {
        layout: Some(FlashLayout::Tiled),
        dq_from_gradients: Some(true),
        ..Default::default()
    };
    engine
        .attention_backward(&pb, &with_bias, &fwd_b, d_out.as_ref(), &tiled)
        .expect("the tiled kernels ignore dq_from_gradients");
    let fwd = engine
        .attention(
            &p,
            &data.inputs(),
            &RunOptions {
                lse: true,
                ..Default::default()
            },
        )
        .unwrap();
    let short = Tensor::F32(vec![0.0; 3]);
    let e = engine
        .attention_backward(
            &p,
            &data.inputs(),
            &fwd,
            short.as_ref(),
            &Default::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("d_out"), "{e}");
}
