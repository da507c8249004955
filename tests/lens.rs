//! The attention lens: GPU statistics against the reference on the differential suite's
//! problems, and the map of selected heads and rows.

use spotlight::reference::lens as lens_ref;
use spotlight::reference::random::Rng;
use spotlight::reference::{self, Broadcast, compare};
use spotlight::{Algorithm, DType, LensOptions, Problem};

use crate::common::{Data, engine};
use crate::differential::random_problem;

fn check_stats(p: &Problem, d: &Data, alg: Algorithm) -> Result<(), String> {
    let engine = engine().expect("engine");
    let want = reference::attention(p, &d.inputs()).map_err(|e| e.to_string())?;
    let want = lens_ref::lens(p, &want);
    let got = engine
        .lens(
            p,
            &d.inputs(),
            &LensOptions {
                algorithm: alg,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
    let mut msg = String::new();
    for (what, g, w) in [
        ("entropy", &got.entropy, &want.entropy),
        ("max weight", &got.max_weight, &want.max_weight),
        ("received", &got.received, &want.received),
    ] {
        let e = compare::compare(g, w);
        // A relative error means nothing against a zero reference (every row with one visible
        // key has entropy 0, where the GPU's exp(s - LSE) rounds to 1 ± 6e-8 because it
        // recomputes s in another summation order than the attention pass that made the LSE):
        // there an absolute error of 1e-6 (entropy is on the scale of ln Lk) is the budget.
        let tiny = e.non_finite_mismatches == 0 && e.max_abs <= 1e-6;
        if !e.within(1e-5) && !tiny {
            msg += &format!("{what}: {e}; ");
        }
    }
    if msg.is_empty() { Ok(()) } else { Err(msg) }
}

#[test]
fn statistics_match_the_reference_on_random_problems() {
    if engine().is_none() {
        return;
    }
    let mut failures = Vec::new();
    for seed in 0..60u64 {
        let (p, d, _) = random_problem(0x1E45_0000 + seed);
        let alg = [Algorithm::Flash, Algorithm::ThreePass, Algorithm::SplitK][seed as usize % 3];
        if let Err(e) = check_stats(&p, &d, alg) {
            failures.push(format!("seed={} {p:?}: {e}", 0x1E45_0000 + seed));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn statistics_of_a_long_key_range_accumulate_over_dispatches() {
    if engine().is_none() {
        return;
    }
    // D = 256: on llvmpipe each dispatch takes 1664 keys, so 3000 keys take two.
    let p = Problem::new(1, 20, 3000, 2, 1, 256).causal(true);
    let d = Data::random(&p, [DType::F32; 3], 2.0, &mut Rng::new(5));
    check_stats(&p, &d, Algorithm::Auto).unwrap();
}

#[test]
fn the_map_of_selected_heads_and_rows_is_the_probability_map() {
    let Some(engine) = engine() else { return };
    let mut p = Problem::new(2, 30, 40, 4, 2, 32).causal(true);
    p.mask = Some(Broadcast { batch: 2, heads: 1 });
    let mut rng = Rng::new(9);
    let mut d = Data::random(&p, [DType::F16; 3], 1.0, &mut rng);
    d.mask = Some((0..2 * 30 * 40).map(|_| rng.chance(0.8) as u8).collect());
    let want = reference::attention(&p, &d.inputs()).unwrap();
    let (heads, rows) = (1..3, 5..25);
    let got = engine
        .lens(
            &p,
            &d.inputs(),
            &LensOptions {
                map: Some((heads.clone(), rows.clone())),
                ..Default::default()
            },
        )
        .unwrap();
    let map = got.map.unwrap();
    let mut expected = Vec::new();
    for h in heads {
        for i in rows.clone() {
            let row = h * p.q_len + i; // batch entry 0
            expected.extend_from_slice(&want.probs[row * p.kv_len..(row + 1) * p.kv_len]);
        }
    }
    let e = compare::compare(&map, &expected);
    assert!(e.within(1e-5), "map {e}");
    let bad = engine.lens(
        &p,
        &d.inputs(),
        &LensOptions {
            map: Some((0..5, 0..1)),
            ..Default::default()
        },
    );
    assert!(bad.unwrap_err().to_string().contains("must lie within"));
}

#[test]
fn positional_profile_sums_to_one_per_head_and_sees_the_first_token() {
    let p = Problem::new(2, 10, 16, 2, 2, 8);
    let mut rng = Rng::new(4);
    let mut d = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
    // A bias that sends most weight to key 0 in head 0 only.
    let p = Problem {
        bias: Some(Broadcast { batch: 1, heads: 2 }),
        ..p
    };
    d.bias = Some(
        (0..2 * 10 * 16)
            .map(|x| if x < 160 && x % 16 == 0 { 8.0 } else { 0.0 })
            .collect(),
    );
    let r = reference::attention(&p, &d.inputs()).unwrap();
    let s = lens_ref::lens(&p, &r);
    let has: Vec<bool> = s.entropy.iter().map(|x| x.is_finite()).collect();
    let prof = lens_ref::positional_profile(&p, &s.received, &has, &[16, 16], 4);
    for (h, head) in prof.iter().enumerate() {
        let total: f64 = head.iter().sum();
        assert!(
            (total - 1.0).abs() < 1e-12,
            "head {h} profile sums to {total}"
        );
    }
    assert!(
        prof[0][0] > 0.9,
        "head 0 looks at the first token: {:?}",
        prof[0]
    );
    assert!(prof[1][0] < 0.5, "head 1 does not: {:?}", prof[1]);
}
