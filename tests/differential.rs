//! GPU against the f64 reference: a table of awkward shapes (every algorithm), and seeded random
//! problems combining every option. A failure prints a one-line reproduction.

use spotlight::reference::random::Rng;
use spotlight::reference::{Broadcast, Layout, Window};
use spotlight::{Algorithm, DType, FlashLayout, Problem, RunOptions};

use crate::common::{
    Budget, Data, assert_all_passed, check, check_opts, engine, kernels_run, packed_engine,
};

// Lq, Lk in {1, 7, 33, 100, 257} both ways; D, head ratios, causal and layout rotate so each
// value meets many others. Every problem runs on every algorithm (one test each).
per_algorithm!(awkward_shapes_f32, super::awkward_shapes_f32);

fn awkward_shapes_f32(alg: Algorithm) {
    let Some(engine) = engine() else { return };
    let lens = [1usize, 7, 33, 100, 257];
    let dims = [16usize, 40, 64, 80, 96, 128, 256];
    let heads = [(1usize, 1usize), (4, 4), (8, 2), (6, 1)];
    let mut rng = Rng::new(0x5EED_0002);
    let mut failures = Vec::new();
    let mut n = 0;
    for (a, &lq) in lens.iter().enumerate() {
        for (b, &lk) in lens.iter().enumerate() {
            for causal in [false, true] {
                let k = a * lens.len() + b;
                let d = dims[(k + causal as usize * 3) % dims.len()];
                let (hq, hkv) = heads[(k + causal as usize) % heads.len()];
                let batch = 1 + (k % 2);
                let layout = if k.is_multiple_of(3) {
                    Layout::Bhsd
                } else {
                    Layout::Bshd
                };
                // Keep lavapipe's time in check: fewer heads on the largest shapes.
                let (hq, hkv) = if lq * lk * d > 257 * 100 * 64 {
                    (hq.min(2), hkv.min(2).min(hq.min(2)))
                } else {
                    (hq, hkv)
                };
                let p = Problem::new(batch, lq, lk, hq, hkv, d)
                    .causal(causal)
                    .layout(layout);
                let data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
                n += 1;
                if let Err(e) = check(
                    engine,
                    &p,
                    &data,
                    alg,
                    alg == Algorithm::ThreePass,
                    None,
                    Some(Budget::strict()),
                ) {
                    failures.push(format!("{p:?}: {e}"));
                }
            }
        }
    }
    assert!(n >= 50, "ran only {n} cases");
    assert_all_passed(&failures, Some(n));
}

/// A random problem with random options, described by its seed.
pub fn random_problem(seed: u64) -> (Problem, Data, Option<DType>) {
    let mut rng = Rng::new(seed);
    let batch = rng.range(1, 3);
    let lq = if rng.chance(0.2) { 1 } else { rng.range(1, 70) };
    let lk = if rng.chance(0.1) { 1 } else { rng.range(1, 90) };
    let kv_heads = rng.range(1, 3);
    let q_heads = kv_heads * rng.pick(&[1, 2, 3, 4]);
    let d = rng.pick(&[8, 16, 24, 32, 40, 64, 80, 96, 128]);
    let dv = if rng.chance(0.3) {
        rng.pick(&[8, 16, 48, 64, 72])
    } else {
        d
    };
    let mut p = Problem::new(batch, lq, lk, q_heads, kv_heads, d).v_head_dim(dv);
    p.layout = if rng.chance(0.5) {
        Layout::Bshd
    } else {
        Layout::Bhsd
    };
    p.causal = rng.chance(0.4);
    if rng.chance(0.3) {
        p.scale = Some(rng.uniform(0.05, 1.0));
    }
    if rng.chance(0.3) {
        p.window = Some(Window {
            left: rng.chance(0.7).then(|| rng.range(0, 40) as u32),
            right: rng.chance(0.5).then(|| rng.range(0, 40) as u32),
        });
    }
    if rng.chance(0.25) {
        p.softcap = Some(rng.uniform(1.0, 30.0));
    }
    let bcast = |rng: &mut Rng| Broadcast {
        batch: if rng.chance(0.5) { 1 } else { batch },
        heads: if rng.chance(0.5) { 1 } else { q_heads },
    };
    if rng.chance(0.3) {
        p.bias = Some(bcast(&mut rng));
    }
    if rng.chance(0.3) {
        p.mask = Some(bcast(&mut rng));
    }
    p.alibi = rng.chance(0.2);
    p.q_seqlens = rng.chance(0.25);
    p.kv_seqlens = rng.chance(0.3);
    let dtypes = [0, 1, 2].map(|_| rng.pick(&[DType::F32, DType::F32, DType::F16, DType::Bf16]));
    let amp = rng.pick(&[0.5f32, 1.0, 4.0]);
    let mut data = Data::random(&p, dtypes, amp, &mut rng);
    let n_b = |b: &Broadcast| b.batch * b.heads * lq * lk;
    if let Some(b) = p.bias {
        data.bias = Some((0..n_b(&b)).map(|_| rng.uniform(-2.0, 2.0)).collect());
    }
    if let Some(b) = p.mask {
        let keep = rng.uniform(0.3, 0.95) as f64;
        data.mask = Some((0..n_b(&b)).map(|_| rng.chance(keep) as u8).collect());
    }
    random_lengths_and_slopes(&p, &mut data, &mut rng);
    let out_dtype = rng
        .chance(0.2)
        .then(|| rng.pick(&[DType::F32, DType::F16, DType::Bf16]));
    (p, data, out_dtype)
}

/// The ALiBi slopes and random valid lengths (0..=Lq-1, 0..=Lk-1) that `p`'s flags ask for, for a
/// problem whose lengths a test changed after [`random_problem`] drew it (which calls this too).
pub fn random_lengths_and_slopes(p: &Problem, data: &mut Data, rng: &mut Rng) {
    if p.alibi {
        data.alibi_slopes = Some((0..p.q_heads).map(|h| 0.5f32.powi(h as i32 + 1)).collect());
    }
    if p.q_seqlens {
        data.q_seqlens = Some((0..p.batch).map(|_| rng.range(0, p.q_len) as i32).collect());
    }
    if p.kv_seqlens {
        data.kv_seqlens = Some(
            (0..p.batch)
                .map(|_| rng.range(0, p.kv_len) as i32)
                .collect(),
        );
    }
}

// Property test: random problems with random combinations of every option, on every algorithm
// (one test each: `differential::random_problems::flash` ...). `SPOTLIGHT_PROPTEST_CASES` sets
// the count (default 320); `SPOTLIGHT_PROPTEST_SEED` picks the base seed. A failure prints
// `seed=…` to rerun it alone with `SPOTLIGHT_PROPTEST_ONLY=seed`.
per_algorithm!(random_problems, super::random_problems_every_option);

fn random_problems_every_option(alg: Algorithm) {
    let Some(engine) = engine() else { return };
    // An explicit count is taken as asked (scripts/test runs fewer on the GL backend, where each
    // new kernel variant costs a GLSL compile); without one, at least 300 run.
    let asked: Option<u64> = std::env::var("SPOTLIGHT_PROPTEST_CASES").ok().map(|s| {
        s.parse()
            .expect("SPOTLIGHT_PROPTEST_CASES must be a number")
    });
    let cases = asked.unwrap_or(320);
    let base: u64 = std::env::var("SPOTLIGHT_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xA77E_0000);
    let seeds: Vec<u64> = match std::env::var("SPOTLIGHT_PROPTEST_ONLY")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(one) => vec![one],
        None => (0..cases).map(|c| base + c).collect(),
    };
    let mut failures = Vec::new();
    for &seed in &seeds {
        let (p, data, out_dtype) = random_problem(seed);
        {
            let probs = alg == Algorithm::ThreePass && seed % 2 == 0;
            // Every third problem splits the fused path's key range into small chunks, so the
            // LSE merge meets every option too.
            let max_chunk_keys = (seed % 3 == 0).then_some(8 + (seed % 5) as u32 * 8);
            // Every fourth problem runs the tiled fused kernel where the adapter's default is the
            // row kernel (CPU adapters with subgroups), so both meet every option.
            let flash_layout = (seed % 4 == 3).then_some(FlashLayout::Tiled);
            // Every 64th runs the row kernel with 16 rows per workgroup and every 64th with 32
            // (what units of 64 and 128 query rows or more get; these small ones would get 8).
            let rows_per_workgroup = match seed % 64 {
                1 => Some(16),
                33 => Some(32),
                _ => None,
            };
            let opts = RunOptions {
                algorithm: alg,
                probs,
                out_dtype,
                max_chunk_keys,
                flash_layout,
                rows_per_workgroup,
                ..Default::default()
            };
            // Odd seeds read f16 through the packed fallback even where SHADER_F16 exists.
            let e = if seed % 2 == 1 {
                packed_engine().expect("engine")
            } else {
                engine
            };
            if let Err(e) = check_opts(e, &p, &data, &opts, None) {
                failures.push(format!(
                    "seed={seed} (SPOTLIGHT_PROPTEST_ONLY={seed}, {}) dtypes={:?} out={out_dtype:?} {p:?}: {e}",
                    alg.name(),
                    data.inputs().dtypes()
                ));
            }
        }
    }
    assert!(
        seeds.len() >= 300 || seeds.len() == 1 || asked.is_some_and(|n| n > 0),
        "too few cases: {}",
        seeds.len()
    );
    assert_all_passed(&failures, Some(seeds.len()));
}

/// The row kernel's other P·V form (`Engine::with_finite_v_branch`: the one the shared engines
/// do not take on this adapter) on random problems with every option, flash and split-k
/// alternating, every third with small key chunks and every 16th with 16 or 32 rows per
/// workgroup: 48 problems (`SPOTLIGHT_PROPTEST_CASES` lowers it). Where the adapter has no row
/// kernel (GL: no subgroups) it says SKIPPED; on Vulkan with CI=true that fails.
#[test]
fn random_problems_other_p_v_form() {
    let Some(shared) = engine() else { return };
    let other = spotlight::Engine::new()
        .expect("adapter")
        .with_finite_v_branch(!shared.finite_v_branch());
    let rows = RunOptions {
        algorithm: Algorithm::Flash,
        flash_layout: Some(FlashLayout::Rows),
        ..Default::default()
    };
    let (p0, d0, _) = random_problem(1);
    if !row_kernel_offered(&other, &p0, &d0, &rows, "random_problems_other_p_v_form") {
        return;
    }
    let cases: u64 = std::env::var("SPOTLIGHT_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(48, |n: u64| n.min(48));
    let mut failures = Vec::new();
    for c in 0..cases {
        let seed = 0xF1_7E00 + c;
        let (p, data, out_dtype) = random_problem(seed);
        let alg = if c % 2 == 0 {
            Algorithm::Flash
        } else {
            Algorithm::SplitK
        };
        let opts = RunOptions {
            algorithm: alg,
            out_dtype,
            max_chunk_keys: (c % 3 == 0).then_some(8 + (c % 5) as u32 * 8),
            flash_layout: Some(FlashLayout::Rows),
            rows_per_workgroup: match c % 16 {
                5 => Some(16),
                13 => Some(32),
                _ => None,
            },
            ..Default::default()
        };
        if let Err(e) = check_opts(&other, &p, &data, &opts, None) {
            failures.push(format!("seed={seed} ({}) {p:?}: {e}", alg.name()));
        }
    }
    assert!(cases > 0, "no cases ran");
    assert_all_passed(&failures, Some(cases as usize));
}

/// Whether the adapter offers the row kernel for `opts` (it needs subgroups, which wgpu's GL
/// backend lacks). Where it does not, the test says SKIPPED (`what`) and stops; CI's Vulkan
/// adapter must offer it, so there the test fails instead.
pub(crate) fn row_kernel_offered(
    engine: &spotlight::Engine,
    p: &Problem,
    data: &Data,
    opts: &RunOptions,
    what: &str,
) -> bool {
    let Err(spotlight::Error::Unsupported { .. }) = engine.attention(p, &data.inputs(), opts)
    else {
        return true;
    };
    let vulkan = std::env::var("WGPU_BACKEND").is_ok_and(|b| b == "vulkan");
    assert!(
        !(vulkan && spotlight::testing::in_ci()),
        "the row kernel is not offered on CI's Vulkan adapter"
    );
    eprintln!("SKIPPED (not a pass) {what}: no subgroups here");
    false
}

// The row kernel's two layouts per side (flash_rows.wgsl): Q in registers up to 4 vec4 chunks per
// lane and staged in workgroup memory above (D > 128 on 8 lanes), P·V by groups of keys up to 4
// output vec4 columns per lane and one key per update above (Dv > 128), in every combination,
// with partial last chunks (D = 130, 200; Dv = 136, 160), the general logit path (mask and bias)
// and the band path (causal), at forced rows per workgroup of 8, 16 and 32 (D = 256, Dv = 32 at
// 32 rows stages all 32 KiB of lavapipe's workgroup memory); flash and split-k (query heads of a
// group packed). Where the adapter has no row kernel (no subgroups: GL) it says SKIPPED; on
// Vulkan with CI=true that fails.
#[test]
fn row_kernel_wide_heads_either_side() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(0x5EED_0256);
    let mut failures = Vec::new();
    let mut n = 0;
    // (D, Dv, rows when masked, rows when causal).
    let dims = [
        (32usize, 256usize, 32u32, 16u32),
        (256, 32, 32, 8),
        (256, 256, 16, 8),
        (128, 128, 8, 32),
        (200, 160, 16, 8),
        (130, 136, 8, 16),
    ];
    for (d, dv, rows_masked, rows_causal) in dims {
        for (lq, lk, masked, rows) in [
            (70usize, 45usize, true, rows_masked),
            (40, 70, false, rows_causal),
        ] {
            let mut p = Problem::new(1, lq, lk, 2, 1, d)
                .v_head_dim(dv)
                .causal(!masked);
            if masked {
                let all = Broadcast { batch: 1, heads: 2 };
                p.mask = Some(all);
                p.bias = Some(all);
            }
            let mut data = Data::random(&p, [DType::F32; 3], 1.0, &mut rng);
            if masked {
                let cells = 2 * lq * lk;
                data.bias = Some((0..cells).map(|_| rng.uniform(-2.0, 2.0)).collect());
                data.mask = Some((0..cells).map(|_| rng.chance(0.7) as u8).collect());
            }
            for algorithm in [Algorithm::Flash, Algorithm::SplitK] {
                let opts = RunOptions {
                    algorithm,
                    flash_layout: Some(FlashLayout::Rows),
                    rows_per_workgroup: Some(rows),
                    ..Default::default()
                };
                if n == 0 && !row_kernel_offered(engine, &p, &data, &opts, "the row kernel test") {
                    return;
                }
                n += 1;
                if let Err(e) = check_opts(engine, &p, &data, &opts, Some(Budget::strict())) {
                    failures.push(format!("{algorithm:?} rows={rows} {p:?}: {e}"));
                }
            }
        }
    }
    assert_eq!(n, 24);
    assert_all_passed(&failures, Some(n));
}

// The scalar fused kernels write a half output dtype themselves (half_out.wgsl: two elements per
// word, no f32 copy of O, no pack pass) where Dv is even and the run has no key chunks: the row
// kernel (flash and split-k), the tiled kernel (flash and split-k) and the decode kernel (split-k,
// 5 query rows per head); f16 and bf16, both layouts of O, Dv 64 and 30 (a partial last vec4
// column), causal or masked with bias (f16 Q and bf16 K, so both loads); Dv 33 still goes
// through the pack. Checked against the reference, then which passes ran. Where the row kernel
// is not offered (no subgroups: GL), its runs say SKIPPED and the others still run.
#[test]
fn fused_kernels_write_half_outputs_themselves() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(0x4A1F_0007);
    let mut failures = Vec::new();
    let mut n = 0;
    let mut rows_offered = None;
    let runs = [
        (FlashLayout::Rows, Algorithm::Flash, "flash_rows"),
        (FlashLayout::Rows, Algorithm::SplitK, "flash_rows"),
        (FlashLayout::Tiled, Algorithm::Flash, "flash"),
        (FlashLayout::Tiled, Algorithm::SplitK, "flash"),
        (FlashLayout::Decode, Algorithm::SplitK, "flash_decode"),
    ];
    for (case, (dv, out, layout)) in [
        (64usize, DType::F16, Layout::Bshd),
        (30, DType::Bf16, Layout::Bhsd),
        (30, DType::F16, Layout::Bshd),
        (64, DType::Bf16, Layout::Bhsd),
        (33, DType::F16, Layout::Bshd),
    ]
    .into_iter()
    .enumerate()
    {
        let masked = case % 2 == 1;
        for (flash_layout, algorithm, kernel) in runs {
            let lq = if flash_layout == FlashLayout::Decode {
                5
            } else {
                37
            };
            let mut p = Problem::new(2, lq, 50, 4, 2, 40)
                .v_head_dim(dv)
                .layout(layout)
                .causal(!masked);
            if masked {
                let all = Broadcast { batch: 1, heads: 4 };
                p.mask = Some(all);
                p.bias = Some(all);
            }
            let dtypes = [DType::F16, DType::Bf16, DType::F32];
            let mut data = Data::random(&p, dtypes, 1.0, &mut rng);
            if masked {
                let cells = 4 * lq * 50;
                data.bias = Some((0..cells).map(|_| rng.uniform(-2.0, 2.0)).collect());
                data.mask = Some((0..cells).map(|_| rng.chance(0.7) as u8).collect());
            }
            let opts = RunOptions {
                algorithm,
                out_dtype: Some(out),
                flash_layout: Some(flash_layout),
                max_chunk_keys: Some(4096),
                ..Default::default()
            };
            let e = engine;
            if flash_layout == FlashLayout::Rows
                && !*rows_offered.get_or_insert_with(|| {
                    row_kernel_offered(e, &p, &data, &opts, "the half-output row kernel runs")
                })
            {
                continue;
            }
            n += 1;
            let what = format!("{flash_layout:?} {algorithm:?} Dv {dv} {out:?} {layout:?}");
            if let Err(err) = check_opts(e, &p, &data, &opts, None) {
                failures.push(format!("{what}: {err}"));
            }
            // Which passes ran: the fused kernel alone, or with the pack where Dv is odd.
            let est = e.estimate(&p, dtypes, &opts).unwrap();
            assert!(est.plan.ends_with("chunks1"), "{what}: {}", est.plan);
            if let Some(names) = kernels_run(e, &p, &data.inputs(), &opts) {
                let expected: Vec<&str> = if dv % 2 == 0 {
                    vec![kernel]
                } else {
                    vec![kernel, "pack"]
                };
                assert_eq!(names, expected, "{what}");
            }
        }
    }
    let expected = if rows_offered == Some(true) { 25 } else { 15 };
    assert_eq!(n, expected);
    assert_all_passed(&failures, Some(n));
}
