//! Validation without a GPU: every inconsistent problem is rejected with a message that says what
//! was wrong and what was expected, before any GPU work.

use spotlight::reference::{self, Broadcast, Inputs, Problem, ProblemError, TensorRef};

fn expect_err<'a>(p: &Problem, mutate: impl FnOnce(&mut Inputs<'a>), phrase: &str) {
    let leak = |n: usize| -> &'a [f32] { Box::leak(vec![0.5f32; n].into_boxed_slice()) };
    let mut inputs = Inputs::new(
        TensorRef::F32(leak(p.q_elems())),
        TensorRef::F32(leak(p.k_elems())),
        TensorRef::F32(leak(p.v_elems())),
    );
    mutate(&mut inputs);
    let err = reference::attention(p, &inputs).unwrap_err();
    assert!(err.to_string().contains(phrase), "'{err}' lacks '{phrase}'");
}

#[test]
fn shapes_and_options_are_validated() {
    let ok = Problem::new(2, 4, 6, 4, 2, 8);
    ok.validate().unwrap();
    let cases: Vec<(Problem, &str)> = vec![
        (Problem::new(0, 4, 6, 4, 2, 8), "batch is 0"),
        (Problem::new(2, 4, 0, 4, 2, 8), "kv_len is 0"),
        (Problem::new(2, 4, 6, 4, 2, 0), "head_dim is 0"),
        (Problem::new(2, 4, 6, 4, 3, 8), "not a multiple of kv_heads"),
        (
            Problem {
                softcap: Some(-1.0),
                ..ok.clone()
            },
            "softcap -1",
        ),
        (
            Problem {
                scale: Some(f32::NAN),
                ..ok.clone()
            },
            "not a finite",
        ),
        (
            Problem {
                bias: Some(Broadcast { batch: 3, heads: 1 }),
                ..ok.clone()
            },
            "does not broadcast",
        ),
        (
            Problem {
                mask: Some(Broadcast { batch: 1, heads: 2 }),
                ..ok.clone()
            },
            "expected [1 or 2, 1 or 4",
        ),
    ];
    for (p, phrase) in cases {
        let err = p.validate().unwrap_err();
        assert!(err.to_string().contains(phrase), "'{err}' lacks '{phrase}'");
    }
}

#[test]
fn inputs_are_validated_against_the_problem() {
    let p = Problem::new(2, 4, 6, 4, 2, 8);
    let short = vec![0.0f32; 3];
    expect_err(
        &p,
        |i| i.q = TensorRef::F32(&short),
        "q has 3 elements, expected 256",
    );
    let bias = vec![0.0f32; 24];
    expect_err(
        &p,
        |i| i.bias = Some(&bias),
        "bias: the problem declares it absent",
    );
    let p_alibi = Problem {
        alibi: true,
        ..p.clone()
    };
    let slopes = vec![0.5f32; 3];
    expect_err(
        &p_alibi,
        |i| i.alibi_slopes = Some(&slopes),
        "alibi_slopes has 3 elements, expected 4",
    );
    let p_len = Problem {
        kv_seqlens: true,
        ..p.clone()
    };
    let lens = [6, 7];
    expect_err(
        &p_len,
        |i| i.kv_seqlens = Some(&lens),
        "kv_seqlens[1] = 7 is out of range: expected 0..=6",
    );
    let neg = [-1, 2];
    let p_q = Problem {
        q_seqlens: true,
        ..p.clone()
    };
    expect_err(
        &p_q,
        |i| i.q_seqlens = Some(&neg),
        "q_seqlens[0] = -1 is out of range",
    );
    expect_err(
        &p_q,
        |_| {},
        "q_seqlens: the problem declares it present, but it was not given",
    );
    let p_mask = Problem {
        mask: Some(Broadcast { batch: 1, heads: 1 }),
        ..p.clone()
    };
    let mask = vec![1u8; 5];
    expect_err(
        &p_mask,
        |i| i.mask = Some(&mask),
        "mask has 5 elements, expected 24",
    );
}

#[test]
fn the_gpu_path_rejects_bad_input_before_any_gpu_work() {
    let Some(engine) = crate::common::engine() else {
        return;
    };
    let p = Problem::new(1, 4, 4, 3, 2, 8);
    let x = vec![0.1f32; 96];
    let err = engine
        .attention(
            &p,
            &Inputs::new(TensorRef::F32(&x), TensorRef::F32(&x), TensorRef::F32(&x)),
            &Default::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            spotlight::Error::Problem(ProblemError::HeadsNotDivisible { .. })
        ),
        "{err}"
    );
    // The engine is still usable afterwards.
    let good = Problem::new(1, 4, 4, 2, 2, 8);
    let y = vec![0.1f32; 64];
    let out = engine
        .attention(
            &good,
            &Inputs::new(TensorRef::F32(&y), TensorRef::F32(&y), TensorRef::F32(&y)),
            &Default::default(),
        )
        .unwrap();
    assert!(out.out.to_f32_vec().iter().all(|v| (v - 0.1).abs() < 1e-6));
}
