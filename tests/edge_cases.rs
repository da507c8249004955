//! Named edge cases of the semantics, each on every algorithm, each checked against the reference
//! and with explicit assertions on what the README promises (zeros and -inf for empty rows, no NaN).

use spotlight::reference::random::Rng;
use spotlight::reference::{self, Broadcast, Window};
use spotlight::{Algorithm, DType, Problem, RunOptions};

use crate::common::{ALGORITHMS, Budget, Data, check, engine};

/// Runs `p` on every algorithm against the reference, then returns each algorithm's (O, LSE).
fn run_all(p: &Problem, data: &Data) -> Vec<(Algorithm, Vec<f32>, Vec<f32>)> {
    let Some(engine) = engine() else {
        return vec![];
    };
    let mut results = Vec::new();
    for alg in ALGORITHMS {
        check(
            engine,
            p,
            data,
            alg,
            alg == Algorithm::ThreePass,
            None,
            None,
        )
        .unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let opts = RunOptions {
            algorithm: alg,
            lse: true,
            ..Default::default()
        };
        let out = engine.attention(p, &data.inputs(), &opts).expect("run");
        let o = out.out.to_f32_vec();
        assert!(
            o.iter().all(|x| x.is_finite()),
            "{alg:?}: non-finite output"
        );
        results.push((alg, o, out.lse.expect("lse")));
    }
    results
}

fn data(p: &Problem, seed: u64) -> Data {
    Data::random(p, [DType::F32; 3], 1.0, &mut Rng::new(seed))
}

#[test]
fn every_row_fully_masked_gives_zeros_and_neg_inf() {
    let mut p = Problem::new(2, 9, 13, 4, 2, 32);
    p.mask = Some(Broadcast { batch: 1, heads: 1 });
    let mut d = data(&p, 1);
    d.mask = Some(vec![0; 9 * 13]);
    for (alg, o, lse) in run_all(&p, &d) {
        assert!(o.iter().all(|&x| x == 0.0), "{alg:?}: O not all zero");
        assert!(
            lse.iter().all(|&x| x == f32::NEG_INFINITY),
            "{alg:?}: LSE not all -inf"
        );
    }
}

#[test]
fn only_the_last_key_visible_copies_its_value() {
    let mut p = Problem::new(1, 5, 11, 2, 1, 16);
    p.mask = Some(Broadcast { batch: 1, heads: 1 });
    let mut d = data(&p, 2);
    d.mask = Some((0..5 * 11).map(|x| (x % 11 == 10) as u8).collect());
    let v = d.v.to_f32_vec();
    let vs = p.v_strides();
    let os = p.o_strides();
    for (alg, o, _) in run_all(&p, &d) {
        for i in 0..5 {
            for h in 0..2 {
                for c in 0..16 {
                    let want = v[vs.index(0, 10, 0, c)];
                    let got = o[os.index(0, i, h, c)];
                    assert!(
                        (got - want).abs() <= 1e-6,
                        "{alg:?}: row {i} head {h} col {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn window_wider_than_the_sequence_equals_no_window() {
    let base = Problem::new(1, 20, 20, 2, 2, 24);
    let mut wide = base.clone();
    wide.window = Some(Window {
        left: Some(1000),
        right: Some(1000),
    });
    let d = data(&base, 3);
    let a = run_all(&base, &d);
    let b = run_all(&wide, &d);
    for ((alg, o1, l1), (_, o2, l2)) in a.iter().zip(&b) {
        assert_eq!(o1, o2, "{alg:?}: O differs");
        assert_eq!(l1, l2, "{alg:?}: LSE differs");
    }
}

#[test]
fn kv_seqlens_of_one_and_zero() {
    let mut p = Problem::new(3, 6, 10, 2, 1, 16);
    p.kv_seqlens = true;
    let mut d = data(&p, 4);
    d.kv_seqlens = Some(vec![1, 0, 10]);
    let lse_index = |b: usize, h: usize, i: usize| (b * 2 + h) * 6 + i;
    for (alg, o, lse) in run_all(&p, &d) {
        let os = p.o_strides();
        for h in 0..2 {
            for i in 0..6 {
                assert_eq!(
                    lse[lse_index(1, h, i)],
                    f32::NEG_INFINITY,
                    "{alg:?}: kv_len 0 row"
                );
                assert!(lse[lse_index(0, h, i)].is_finite(), "{alg:?}: kv_len 1 row");
                for c in 0..16 {
                    assert_eq!(o[os.index(1, i, h, c)], 0.0, "{alg:?}: kv_len 0 output");
                }
            }
        }
    }
}

#[test]
fn single_query_row_with_causal_sees_every_key() {
    let p = Problem::new(2, 1, 37, 4, 4, 64).causal(true);
    let d = data(&p, 5);
    let non_causal = Problem {
        causal: false,
        ..p.clone()
    };
    let a = run_all(&p, &d);
    let b = run_all(&non_causal, &d);
    for ((alg, o1, _), (_, o2, _)) in a.iter().zip(&b) {
        assert_eq!(
            o1, o2,
            "{alg:?}: Lq = 1 causal must see all keys (bottom-right alignment)"
        );
    }
}

#[test]
fn causal_with_more_queries_than_keys_leaves_top_rows_empty() {
    let p = Problem::new(1, 12, 5, 1, 1, 16).causal(true);
    let d = data(&p, 6);
    for (alg, _, lse) in run_all(&p, &d) {
        // off = 5 - 12 = -7: rows 0..7 see no key.
        for (i, &l) in lse.iter().enumerate() {
            assert_eq!(l == f32::NEG_INFINITY, i < 7, "{alg:?}: row {i} lse {l}");
        }
    }
}

#[test]
fn very_large_logits_stay_finite() {
    let mut p = Problem::new(1, 17, 23, 2, 2, 16);
    p.scale = Some(1.0);
    let mut rng = Rng::new(7);
    let mut d = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    // |q·k| reaches about 1e4.
    let q: Vec<f32> = rng.vec(p.q_elems()).iter().map(|x| x * 50.0).collect();
    let k: Vec<f32> = rng.vec(p.k_elems()).iter().map(|x| x * 50.0).collect();
    d.q = spotlight::Tensor::F32(q);
    d.k = spotlight::Tensor::F32(k);
    let want = reference::attention(&p, &d.inputs()).unwrap();
    let max_lse = want.lse.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(
        max_lse > 1e3,
        "test does not reach large logits ({max_lse})"
    );
    for (alg, _, lse) in run_all(&p, &d) {
        assert!(lse.iter().all(|x| x.is_finite()), "{alg:?}: LSE not finite");
    }
}

#[test]
fn negative_infinity_bias_works_as_a_mask() {
    let mut with_bias = Problem::new(2, 8, 19, 2, 1, 32);
    with_bias.bias = Some(Broadcast { batch: 2, heads: 1 });
    let mut with_mask = Problem::new(2, 8, 19, 2, 1, 32);
    with_mask.mask = Some(Broadcast { batch: 2, heads: 1 });
    let mut rng = Rng::new(8);
    let visible: Vec<u8> = (0..2 * 8 * 19)
        .map(|x| (x % 8 == 0 || rng.chance(0.6)) as u8)
        .collect();
    let mut d = data(&with_bias, 9);
    d.bias = Some(
        visible
            .iter()
            .map(|&m| if m != 0 { 0.0 } else { f32::NEG_INFINITY })
            .collect(),
    );
    let a = run_all(&with_bias, &d);
    d.bias = None;
    d.mask = Some(visible);
    let b = run_all(&with_mask, &d);
    for ((alg, o1, l1), (_, o2, l2)) in a.iter().zip(&b) {
        let e = reference::compare::compare(o1, &o2.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(e.within(1e-6), "{alg:?}: O {e}");
        let e = reference::compare::compare(l1, &l2.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(e.within(1e-6), "{alg:?}: LSE {e}");
    }
}

#[test]
fn half_precision_output_is_rounded_from_f32() {
    let Some(engine) = engine() else { return };
    let p = Problem::new(1, 33, 40, 2, 1, 40);
    for dt in [DType::F16, DType::Bf16] {
        let d = Data::random(&p, [dt; 3], 1.0, &mut Rng::new(10));
        for alg in ALGORITHMS {
            check(
                engine,
                &p,
                &d,
                alg,
                false,
                None,
                Some(Budget::for_output(dt)),
            )
            .unwrap_or_else(|e| panic!("{dt:?}: {e}"));
            let opts = RunOptions {
                algorithm: alg,
                ..Default::default()
            };
            let out = engine.attention(&p, &d.inputs(), &opts).unwrap();
            assert_eq!(out.out.dtype(), dt, "output dtype follows Q");
        }
    }
}

#[test]
fn native_and_packed_f16_reads_agree_bit_for_bit() {
    let Some(native) = engine() else { return };
    // The same settings but the f16 reads (subgroup use would change the summation order).
    let packed = spotlight::Engine::new().unwrap().with_packed_f16();
    assert!(!packed.native_f16());
    let p = Problem::new(2, 19, 45, 4, 2, 40).causal(true);
    let d = Data::random(
        &p,
        [DType::F16, DType::F16, DType::Bf16],
        1.0,
        &mut Rng::new(12),
    );
    let bits = |t: &[f32]| t.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for alg in ALGORITHMS {
        let opts = RunOptions {
            algorithm: alg,
            lse: true,
            ..Default::default()
        };
        let a = native.attention(&p, &d.inputs(), &opts).unwrap();
        let b = packed.attention(&p, &d.inputs(), &opts).unwrap();
        let (oa, ob) = (bits(&a.out.to_f32_vec()), bits(&b.out.to_f32_vec()));
        let first = oa.iter().zip(&ob).position(|(x, y)| x != y);
        assert!(
            first.is_none(),
            "{alg:?}: O differs between native and packed f16 reads at {first:?}"
        );
        assert_eq!(
            bits(a.lse.as_deref().unwrap()),
            bits(b.lse.as_deref().unwrap()),
            "{alg:?}: LSE"
        );
    }
    eprintln!("native f16 reads: {}", native.native_f16());
}
