//! End-to-end tests of the `spotlight` binary: results against an independent NumPy
//! implementation (`scripts/independent_attention.py`), and bad inputs that must fail cleanly
//! (non-zero exit, a message saying what was wrong, no output file).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::Dtype;
use spotlight::reference::random::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_spotlight");

fn in_ci() -> bool {
    spotlight::testing::in_ci()
}

/// True when a GPU adapter exists; with CI=true its absence fails the test.
fn have_gpu() -> bool {
    spotlight::testing::engine_or_skip("this GPU test").is_some()
}

/// Whether python3 with NumPy exists for the independent implementation. Missing, the test
/// FAILS with how to install it (`./scripts/test` installs it), so a comparison that did not run
/// never counts as a pass; only an explicit `SPOTLIGHT_SKIP_NUMPY=1` (never honoured with
/// CI=true) turns that into a loud SKIPPED.
fn have_numpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    numpy_rule(
        ok,
        in_ci(),
        std::env::var("SPOTLIGHT_SKIP_NUMPY").is_ok_and(|v| v == "1"),
    )
}

/// The rule of [`have_numpy`], separate so it can be tested: `Ok(true)` run, `Ok(false)` skipped
/// on request, panics otherwise.
fn numpy_rule(present: bool, ci: bool, skip_asked: bool) -> bool {
    if present {
        return true;
    }
    if skip_asked && !ci {
        eprintln!(
            "SKIPPED (not a pass): python3 with numpy is missing and SPOTLIGHT_SKIP_NUMPY=1; the comparison with the independent implementation did not run"
        );
        return false;
    }
    panic!(
        "python3 with numpy is missing, so the comparison with the independent implementation cannot run: \
         install it (python3 -m pip install numpy; ./scripts/test and .ci/run do), or set SPOTLIGHT_SKIP_NUMPY=1 \
         outside CI to skip it explicitly"
    );
}

#[test]
fn a_missing_numpy_fails_unless_skipping_is_asked_for_outside_ci() {
    assert!(numpy_rule(true, true, false));
    assert!(!numpy_rule(false, false, true));
    for (ci, skip) in [(false, false), (true, false), (true, true)] {
        let r = std::panic::catch_unwind(|| numpy_rule(false, ci, skip));
        assert!(r.is_err(), "ci={ci} skip={skip}: a missing numpy must fail");
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spotlight-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32s(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: bytemuck::cast_slice(v).to_vec(),
    }
}

fn typed(name: &str, shape: &[usize], v: &[f32], dtype: Dtype) -> T {
    let bytes = match dtype {
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F32 => bytemuck::cast_slice(v).to_vec(),
        Dtype::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        Dtype::U8 | Dtype::BOOL => v.iter().map(|&x| x as u8).collect(),
        _ => unreachable!(),
    };
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

fn write(path: &Path, ts: &[T]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = ts
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        Dtype::F32 => bytemuck::pod_collect_to_vec(t.data()),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(t.data())
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(t.data())
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn spotlight(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or("vulkan".into()),
        )
        .output()
        .unwrap()
}

/// Relative Frobenius error over entries finite in `want`; -inf must match exactly; NaN never.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(!g.is_nan(), "NaN in output");
        if w.is_finite() {
            num += (g as f64 - w as f64).powi(2);
            den += (w as f64).powi(2);
        } else {
            assert_eq!(g, w, "non-finite value differs");
        }
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// One case: shapes (B, Lq, Lk, Hq, Hkv, D, Dv), options, dtype and which optional tensors.
struct Case {
    name: &'static str,
    dims: [usize; 7],
    flags: Vec<&'static str>,
    dtype: Dtype,
    layout: &'static str,
    extras: &'static [&'static str],
}

fn run_case(c: &Case, dir: &Path, rng: &mut Rng) {
    let [b, lq, lk, hq, hkv, d, dv] = c.dims;
    let shape = |l: usize, h: usize, dd: usize| {
        if c.layout == "bshd" {
            vec![b, l, h, dd]
        } else {
            vec![b, h, l, dd]
        }
    };
    let mut ts = vec![
        typed("q", &shape(lq, hq, d), &rng.vec(b * lq * hq * d), c.dtype),
        typed("k", &shape(lk, hkv, d), &rng.vec(b * lk * hkv * d), c.dtype),
        typed(
            "v",
            &shape(lk, hkv, dv),
            &rng.vec(b * lk * hkv * dv),
            c.dtype,
        ),
        f32s("unrelated", &[3], &[1.0, 2.0, 3.0]),
    ];
    for &e in c.extras {
        ts.push(match e {
            "bias" => f32s("bias", &[1, hq, lq, lk], &rng.vec(hq * lq * lk)),
            "mask" => {
                let m: Vec<f32> = (0..b * lq * lk)
                    .map(|_| rng.chance(0.7) as u8 as f32)
                    .collect();
                typed("mask", &[b, 1, lq, lk], &m, Dtype::BOOL)
            }
            "alibi_slopes" => f32s(
                "alibi_slopes",
                &[hq],
                &(0..hq)
                    .map(|h| 0.5f32.powi(h as i32 + 1))
                    .collect::<Vec<_>>(),
            ),
            "q_seqlens" => typed(
                "q_seqlens",
                &[b],
                &(0..b)
                    .map(|x| (lq - x.min(lq - 1)) as f32)
                    .collect::<Vec<_>>(),
                Dtype::I32,
            ),
            "kv_seqlens" => typed(
                "kv_seqlens",
                &[b],
                &(0..b)
                    .map(|x| {
                        if x == 1 {
                            0.0
                        } else {
                            (lk - x.min(lk - 1)) as f32
                        }
                    })
                    .collect::<Vec<_>>(),
                Dtype::I32,
            ),
            other => panic!("unknown extra {other}"),
        });
    }
    let input = dir.join(format!("{}.in.safetensors", c.name));
    let ours = dir.join(format!("{}.ours.safetensors", c.name));
    let theirs = dir.join(format!("{}.numpy.safetensors", c.name));
    write(&input, &ts);
    let mut args = vec![
        "run",
        input.to_str().unwrap(),
        "-o",
        ours.to_str().unwrap(),
        "--lse",
        "--layout",
        c.layout,
    ];
    args.extend(&c.flags);
    let out = spotlight(&args);
    assert!(
        out.status.success(),
        "{}: spotlight failed: {}",
        c.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut py = Command::new("python3");
    py.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/independent_attention.py"
    ))
    .args([
        input.to_str().unwrap(),
        theirs.to_str().unwrap(),
        "--layout",
        c.layout,
    ])
    .args(&c.flags);
    let py = py.output().unwrap();
    assert!(
        py.status.success(),
        "{}: numpy failed: {}",
        c.name,
        String::from_utf8_lossy(&py.stderr)
    );
    let budget = if c.dtype == Dtype::F32 { 1e-4 } else { 2e-2 };
    for t in ["out", "lse"] {
        let e = rel_err(&read_f32(&ours, t), &read_f32(&theirs, t));
        assert!(
            e <= budget,
            "{}: {t} relative error {e:.3e} > {budget:.0e}",
            c.name
        );
    }
}

#[test]
fn run_reproduces_an_independent_implementation() {
    if !have_gpu() || !have_numpy() {
        return;
    }
    let dir = tmpdir("independent");
    let mut rng = Rng::new(77);
    let f = Dtype::F32;
    let cases = [
        Case {
            name: "plain",
            dims: [2, 33, 33, 4, 4, 64, 64],
            flags: vec![],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "cross",
            dims: [1, 7, 100, 2, 2, 40, 40],
            flags: vec![],
            dtype: f,
            layout: "bhsd",
            extras: &[],
        },
        Case {
            name: "gqa",
            dims: [2, 20, 57, 8, 2, 32, 32],
            flags: vec![],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "mqa",
            dims: [1, 17, 17, 6, 1, 80, 80],
            flags: vec!["--causal"],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "causal_lq_lt_lk",
            dims: [2, 7, 33, 2, 1, 16, 16],
            flags: vec!["--causal"],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "causal_lq_gt_lk",
            dims: [1, 33, 7, 2, 1, 16, 16],
            flags: vec!["--causal"],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "lq1",
            dims: [3, 1, 257, 4, 2, 96, 96],
            flags: vec!["--causal"],
            dtype: f,
            layout: "bshd",
            extras: &[],
        },
        Case {
            name: "odd_dims",
            dims: [1, 13, 29, 3, 3, 40, 24],
            flags: vec!["--scale", "0.3"],
            dtype: f,
            layout: "bhsd",
            extras: &[],
        },
        Case {
            name: "everything",
            dims: [3, 19, 31, 4, 2, 32, 48],
            flags: vec!["--causal", "--window=8,-1", "--softcap", "5"],
            dtype: f,
            layout: "bshd",
            extras: &["bias", "mask", "alibi_slopes", "q_seqlens", "kv_seqlens"],
        },
        Case {
            name: "window_both",
            dims: [2, 40, 40, 2, 2, 16, 16],
            flags: vec!["--window", "3,2"],
            dtype: f,
            layout: "bhsd",
            extras: &["mask"],
        },
        Case {
            name: "three_pass",
            dims: [2, 19, 31, 4, 2, 32, 32],
            flags: vec!["--algorithm", "three-pass", "--softcap", "2"],
            dtype: f,
            layout: "bshd",
            extras: &["bias", "alibi_slopes", "kv_seqlens"],
        },
        Case {
            name: "split_k",
            dims: [2, 2, 1500, 8, 2, 64, 64],
            flags: vec!["--causal", "--algorithm", "split-k"],
            dtype: f,
            layout: "bshd",
            extras: &["kv_seqlens"],
        },
        Case {
            name: "f16",
            dims: [2, 24, 40, 4, 2, 64, 64],
            flags: vec!["--causal"],
            dtype: Dtype::F16,
            layout: "bshd",
            extras: &["mask", "kv_seqlens"],
        },
        Case {
            name: "bf16",
            dims: [1, 24, 40, 4, 4, 64, 64],
            flags: vec!["--window=-1,4"],
            dtype: Dtype::BF16,
            layout: "bhsd",
            extras: &["bias"],
        },
    ];
    for c in &cases {
        run_case(c, &dir, &mut rng);
    }
}

#[test]
fn prefix_selects_tensors_and_outputs_have_documented_shapes() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("prefix");
    let mut rng = Rng::new(3);
    let input = dir.join("in.safetensors");
    let output = dir.join("out.safetensors");
    write(
        &input,
        &[
            f32s("layer1.q", &[1, 5, 2, 8], &rng.vec(80)),
            f32s("layer1.k", &[1, 6, 1, 8], &rng.vec(48)),
            f32s("layer1.v", &[1, 6, 1, 8], &rng.vec(48)),
        ],
    );
    let out = spotlight(&[
        "run",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--prefix",
        "layer1.",
        "--lse",
        "--probs",
        "--stats",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("stats: device bytes") && stdout.contains("pieces 1"),
        "{stdout}"
    );
    let bytes = std::fs::read(&output).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("out").unwrap().shape(), [1, 5, 2, 8]);
    assert_eq!(st.tensor("lse").unwrap().shape(), [1, 2, 5]);
    assert_eq!(st.tensor("probs").unwrap().shape(), [1, 2, 5, 6]);
    let probs = read_f32(&output, "probs");
    for row in probs.chunks(6) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "probability row sums to {s}");
    }
}

/// Each bad input: (what, tensors or raw bytes, extra flags, a phrase the error must contain).
#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let dir = tmpdir("bad");
    let mut rng = Rng::new(5);
    let q =
        |l: usize, h: usize, d: usize, rng: &mut Rng| f32s("q", &[1, l, h, d], &rng.vec(l * h * d));
    let kv = |n: &str, l: usize, h: usize, d: usize, rng: &mut Rng| {
        f32s(n, &[1, l, h, d], &rng.vec(l * h * d))
    };
    let good = |rng: &mut Rng| {
        vec![
            q(4, 2, 8, rng),
            kv("k", 6, 1, 8, rng),
            kv("v", 6, 1, 8, rng),
        ]
    };
    let mut cases: Vec<(&str, Vec<T>, Vec<&str>, &str)> = vec![
        (
            "missing v",
            vec![q(4, 2, 8, &mut rng), kv("k", 6, 1, 8, &mut rng)],
            vec![],
            "no tensor 'v'",
        ),
        (
            "k head dim differs",
            vec![
                q(4, 2, 8, &mut rng),
                kv("k", 6, 1, 4, &mut rng),
                kv("v", 6, 1, 8, &mut rng),
            ],
            vec![],
            "head dims differ",
        ),
        (
            "v seq differs",
            vec![
                q(4, 2, 8, &mut rng),
                kv("k", 6, 1, 8, &mut rng),
                kv("v", 5, 1, 8, &mut rng),
            ],
            vec![],
            "must agree",
        ),
        (
            "heads not divisible",
            vec![
                q(4, 3, 8, &mut rng),
                kv("k", 6, 2, 8, &mut rng),
                kv("v", 6, 2, 8, &mut rng),
            ],
            vec![],
            "not a multiple",
        ),
        (
            "zero length",
            vec![
                f32s("q", &[1, 0, 2, 8], &[]),
                kv("k", 6, 1, 8, &mut rng),
                kv("v", 6, 1, 8, &mut rng),
            ],
            vec![],
            "is 0",
        ),
        (
            "integer q",
            vec![
                typed("q", &[1, 4, 2, 8], &rng.vec(64), Dtype::I32),
                kv("k", 6, 1, 8, &mut rng),
                kv("v", 6, 1, 8, &mut rng),
            ],
            vec![],
            "expected F32, F16 or BF16",
        ),
        (
            "rank 3 q",
            vec![
                f32s("q", &[4, 2, 8], &rng.vec(64)),
                kv("k", 6, 1, 8, &mut rng),
                kv("v", 6, 1, 8, &mut rng),
            ],
            vec![],
            "expected 4 dimensions",
        ),
        (
            "negative softcap",
            good(&mut rng),
            vec!["--softcap", "-1"],
            "softcap",
        ),
        (
            "bad window",
            good(&mut rng),
            vec!["--window", "3"],
            "LEFT,RIGHT",
        ),
        (
            "flash with probs",
            good(&mut rng),
            vec!["--algorithm", "flash", "--probs"],
            "probability map",
        ),
        (
            "flash-coop without matrix units",
            good(&mut rng),
            vec!["--algorithm", "flash-coop"],
            "flash-coop",
        ),
    ];
    let mut with = |extra: T, phrase: &'static str, name: &'static str, rng: &mut Rng| {
        let mut ts = good(rng);
        ts.push(extra);
        cases.push((name, ts, vec![], phrase));
    };
    with(
        f32s("bias", &[1, 2, 4, 5], &rng.vec(40)),
        "expected [B|1, Hq|1, 4, 6]",
        "bias shape",
        &mut rng,
    );
    with(
        f32s("bias", &[3, 1, 4, 6], &rng.vec(72)),
        "broadcast",
        "bias batch",
        &mut rng,
    );
    with(
        typed("mask", &[1, 1, 4, 6], &rng.vec(24), Dtype::F32),
        "expected U8 or BOOL",
        "mask dtype",
        &mut rng,
    );
    with(
        f32s("alibi_slopes", &[3], &[0.5, 0.25, 0.125]),
        "expected [2]",
        "slopes length",
        &mut rng,
    );
    with(
        typed("kv_seqlens", &[1], &[7.0], Dtype::I32),
        "out of range",
        "kv_seqlens range",
        &mut rng,
    );
    with(
        typed("q_seqlens", &[1], &[-1.0], Dtype::I32),
        "out of range",
        "q_seqlens negative",
        &mut rng,
    );
    with(
        typed("q_seqlens", &[2], &[1.0, 1.0], Dtype::I32),
        "expected [1]",
        "q_seqlens length",
        &mut rng,
    );

    for (what, ts, flags, phrase) in cases {
        let input = dir.join("in.safetensors");
        let output = dir.join("out.safetensors");
        let _ = std::fs::remove_file(&output);
        write(&input, &ts);
        let mut args = vec![
            "run",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ];
        args.extend(&flags);
        let out = spotlight(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: succeeded");
        assert!(
            err.contains(phrase),
            "{what}: message lacks '{phrase}': {err}"
        );
        assert!(!err.contains("panicked"), "{what}: panicked: {err}");
        assert!(!output.exists(), "{what}: output file left behind");
    }

    // Malformed files: random bytes, a truncated file, a header that lies about offsets.
    let input = dir.join("in.safetensors");
    write(&input, &good(&mut rng));
    let valid = std::fs::read(&input).unwrap();
    let mut lying = valid.clone();
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&valid[8..8 + n]).replace("[0,", "[99999999,");
    lying.splice(
        8..8 + n,
        header
            .bytes()
            .chain(std::iter::repeat_n(b' ', n.saturating_sub(header.len())))
            .take(n.max(header.len())),
    );
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            (0..200).map(|_| rng.next_u64() as u8).collect(),
        ),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("empty", vec![]),
        (
            "huge header length",
            [u64::MAX.to_le_bytes().to_vec(), valid[8..].to_vec()].concat(),
        ),
        ("lying offsets", lying),
    ];
    for (what, bytes) in malformed {
        let output = dir.join("out.safetensors");
        std::fs::write(&input, bytes).unwrap();
        let out = spotlight(&[
            "run",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: succeeded");
        assert!(
            err.contains("not a valid safetensors file"),
            "{what}: {err}"
        );
        assert!(!output.exists(), "{what}: output file left behind");
    }
    let out = spotlight(&[
        "run",
        dir.join("nope.safetensors").to_str().unwrap(),
        "-o",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
}

#[test]
fn demo_runs_and_checks_itself() {
    if !have_gpu() {
        return;
    }
    let out = spotlight(&[
        "demo",
        "--seq-len",
        "96",
        "--heads",
        "2",
        "--head-dim",
        "40",
        "--repeats",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phrase in [
        "Adapter:",
        "Algorithm: flash",
        "TFLOP/s",
        "Error vs reference",
        "OK: within",
    ] {
        assert!(
            text.contains(phrase),
            "demo output lacks '{phrase}':\n{text}"
        );
    }
}

/// `bench --backward`: one row per configuration with the forward's and backward's times, their
/// ratio, the backward's FLOP rate and both first calls (kernel builds included), all numbers.
#[test]
fn bench_backward_reports_times_and_first_calls() {
    if !have_gpu() {
        return;
    }
    let out = spotlight(&[
        "bench",
        "--backward",
        "--config",
        "1,40,2,16",
        "--config",
        "2,24,2,8,1",
        "--repeats",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = text
        .lines()
        .find(|l| l.starts_with("config |"))
        .unwrap_or_else(|| panic!("no header: {text}"));
    assert!(
        header.ends_with("| first forward ms | first backward ms"),
        "{header}"
    );
    for config in ["1,40,2,16", "2,24,2,8,1"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{config} |")))
            .unwrap_or_else(|| panic!("no row for {config}: {text}"));
        let cells: Vec<f64> = row
            .split('|')
            .skip(1)
            .map(|c| c.trim().parse().unwrap_or_else(|_| panic!("{row}")))
            .collect();
        assert_eq!(cells.len(), 6, "{row}");
        assert!(cells.iter().all(|x| x.is_finite() && *x >= 0.0), "{row}");
        // Both first calls were measured.
        assert!(cells[4] > 0.0 && cells[5] > 0.0, "{row}");
        // And one more backward per pass: the backward's kernels with their GPU times (or
        // `untimed` on an adapter without timestamp queries).
        let prefix = format!("{config} backward passes=");
        let passes = text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no passes for {config}: {text}"));
        if passes != "untimed" {
            // (`untimed:N` counts passes the timer could not measure: not a kernel.)
            let names: Vec<&str> = passes
                .split(',')
                .filter(|part| !part.starts_with("untimed:"))
                .map(|part| {
                    let (name, ms) = part.split_once(':').unwrap_or_else(|| panic!("{passes}"));
                    let ms: f64 = ms
                        .split("ms")
                        .next()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or_else(|| panic!("{passes}"));
                    assert!(ms > 0.0 && ms.is_finite(), "{passes}");
                    name
                })
                .collect();
            assert!(names.iter().all(|n| n.starts_with("backward_")), "{passes}");
            assert!(names.contains(&"backward_pre"), "{passes}");
            assert!(names.len() >= 3, "{passes}");
        }
    }
}

#[test]
fn bench_prints_validated_numbers_and_json() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("bench");
    let json = dir.join("bench.json");
    let out = spotlight(&[
        "bench",
        "--config",
        "1,96,2,32,0",
        "--config",
        "2,64,2,40,1",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (text, lines) = bench_lines(&out, "spotlight flash ");
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        for key in [
            "ms=",
            "first_call_ms=",
            "tflops=",
            "gbps=",
            "err=",
            "timer=",
            "plan=flash/",
            "pieces=1",
            "passes=flash",
        ] {
            assert!(l.contains(key), "line lacks {key}: {l}");
        }
        assert!(!l.contains("INVALID"), "{l}");
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["valid"], true);
        assert!(r["ms"].as_f64().unwrap() > 0.0);
        assert!(r["rel_error"].as_f64().unwrap() <= 1e-5);
        let plan = r["plan"].as_str().unwrap();
        assert!(
            plan.starts_with("flash/") && plan.contains("/chunks"),
            "{plan}"
        );
        // One profiled call: the fused kernel's GPU time (or every pass untimed).
        let passes = r["passes"].as_array().unwrap();
        let untimed = r["untimed_passes"].as_u64().unwrap();
        assert!(passes.len() + untimed as usize >= 1, "{r}");
        for k in passes {
            assert!(k["kernel"].as_str().unwrap().starts_with("flash"), "{r}");
            assert!(k["ms"].as_f64().unwrap() >= 0.0 && k["count"].as_u64().unwrap() >= 1);
        }
    }
    assert_eq!(results[1]["causal"], true);
    assert_eq!(results[1]["D"], 40);
    // The first call of the process builds its kernels: longer than a timed call's GPU time.
    assert!(doc["engine_ms"].as_f64().unwrap() > 0.0, "{doc}");
    let first = results[0]["first_call_ms"].as_f64().unwrap();
    assert!(first > results[0]["ms"].as_f64().unwrap(), "{doc}");
    assert!(results[1]["first_call_ms"].as_f64().unwrap() > 0.0, "{doc}");

    // A --json path that cannot be written is refused before any GPU work, and nothing is
    // left behind.
    let out = spotlight(&[
        "bench",
        "--config",
        "1,96,2,32,0",
        "--json",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a directory"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("spotlight flash"));
    let missing = dir.join("no-such-dir").join("b.json");
    let out = spotlight(&[
        "bench",
        "--config",
        "1,96,2,32,0",
        "--json",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(!missing.exists());
}

/// A bench run's stdout and its lines that start with `prefix`; fails the test, with both
/// streams, when the run failed.
fn bench_lines(out: &std::process::Output, prefix: &str) -> (String, Vec<String>) {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect();
    (text, lines)
}

#[test]
fn bench_decode_reports_bandwidth_beside_a_streaming_read() {
    if !have_gpu() {
        return;
    }
    let out = spotlight(&[
        "bench",
        "--decode",
        "--heads",
        "8/2",
        "--dims",
        "64",
        "--cache-lens",
        "300,1200",
        "--batches",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]);
    let (text, lines) = bench_lines(&out, "spotlight split-k ");
    assert!(
        text.lines()
            .any(|l| l.starts_with("spotlight stream-read ") && l.contains("gbps=")),
        "{text}"
    );
    assert_eq!(lines.len(), 2, "{text}");
    for l in lines {
        assert!(
            l.contains("Lq=1 ") && l.contains("of_stream=") && l.contains("dtype=f16"),
            "{l}"
        );
        assert!(!l.contains("INVALID"), "{l}");
    }
}

/// `bench --decode --paged N`: decoding through the paged KV cache (two sequences whose pages
/// interleave, a partial last page), validated against the reference on every line; without
/// `--decode` it is refused with a message that says what to add.
#[test]
fn bench_decode_through_the_paged_cache_is_validated() {
    if !have_gpu() {
        return;
    }
    let out = spotlight(&[
        "bench",
        "--decode",
        "--paged",
        "16",
        "--heads",
        "8/2",
        "--dims",
        "64",
        "--cache-lens",
        "300",
        "--batches",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]);
    let (text, lines) = bench_lines(&out, "spotlight decode-cache page=16 ");
    assert_eq!(lines.len(), 1, "{text}");
    let l = &lines[0];
    assert!(
        l.contains(" B=2 ") && l.contains(" Lk=300 ") && l.contains("wall_ms="),
        "{l}"
    );
    let err: f64 = l
        .split_whitespace()
        .find_map(|w| w.strip_prefix("err="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no err= in {l}"));
    assert!(err.is_finite() && err < 2e-3, "{l}");
    assert!(!l.contains("INVALID"), "{l}");

    let out = spotlight(&["bench", "--paged", "16", "--config", "1,64,1,64"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--paged") && err.contains("--decode"), "{err}");
}

/// Decodes a PNG into (width, height, RGB bytes).
fn decode_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

#[test]
fn lens_draws_a_diagonal_mask_where_it_should_be() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("lens-diag");
    let n = 24;
    let mut rng = Rng::new(11);
    let diag: Vec<f32> = (0..n * n).map(|x| (x / n == x % n) as u8 as f32).collect();
    let input = dir.join("in.safetensors");
    write(
        &input,
        &[
            f32s("x.q", &[1, n, 2, 16], &rng.vec(n * 32)),
            f32s("x.k", &[1, n, 2, 16], &rng.vec(n * 32)),
            f32s("x.v", &[1, n, 2, 16], &rng.vec(n * 32)),
            typed("x.mask", &[n, n], &diag, Dtype::U8),
        ],
    );
    let out_dir = dir.join("out");
    let out = spotlight(&[
        "lens",
        input.to_str().unwrap(),
        "--prefix",
        "x.",
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--bins",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Documented layout: cell size s = 384 / 24 = 16; margins 64 left, 96 right, 32 top, 48 bottom.
    let (w, h, px) = decode_png(&out_dir.join("map_head1.png"));
    assert_eq!((w, h), (64 + 24 * 16 + 96, 32 + 24 * 16 + 48));
    let at = |c: usize, r: usize| {
        let (x, y) = (64 + c * 16 + 8, 32 + r * 16 + 8);
        let o = (y * w + x) * 3;
        [px[o], px[o + 1], px[o + 2]]
    };
    for i in 0..n {
        assert_eq!(
            at(i, i),
            [253, 231, 37],
            "diagonal cell ({i}, {i}) is the top of the scale"
        );
        assert_eq!(
            at((i + 5) % n, i),
            [68, 1, 84],
            "off-diagonal cell is the bottom of the scale"
        );
    }
    for name in ["map_head0.png", "received.png", "profile.png"] {
        let (w, h, _) = decode_png(&out_dir.join(name));
        assert!(w > 100 && h > 100, "{name}: {w}x{h}");
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("stats.json")).unwrap()).unwrap();
    let heads = stats["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 2);
    // Issue 12 item 15: the statistics and both heads' maps come from one GPU pass (it was one
    // full pass per head), counted by the library itself.
    assert_eq!(stats["lens_passes"], 1, "{}", stats["lens_passes"]);
    for h in heads {
        // One visible key per row: a certain distribution.
        assert!(h["entropy_max"].as_f64().unwrap().abs() < 1e-6, "{h}");
        assert!(
            (h["max_weight_mean"].as_f64().unwrap() - 1.0).abs() < 1e-6,
            "{h}"
        );
        let received = h["received"].as_array().unwrap();
        assert_eq!(received.len(), n);
        assert!(
            received
                .iter()
                .all(|x| (x.as_f64().unwrap() - 1.0).abs() < 1e-5)
        );
        let profile: f64 = h["positional_profile"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((profile - 1.0).abs() < 1e-5, "profile sums to {profile}");
    }
}

#[test]
fn lens_runs_on_the_real_minilm_example() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("lens-minilm");
    let input = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/minilm/code.safetensors"
    );
    let t = std::time::Instant::now();
    let out = spotlight(&[
        "lens",
        input,
        "--prefix",
        "layer1.",
        "--out-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.elapsed().as_secs() < 60, "lens took {:?}", t.elapsed());
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["heads"].as_array().unwrap().len(), 12);
    assert_eq!(stats["tokens"].as_array().unwrap().len(), 81);
    assert_eq!(stats["tokens"][0], "[CLS]");
    for h in stats["heads"].as_array().unwrap() {
        let e = h["entropy_mean"].as_f64().unwrap();
        assert!(
            e > 0.0 && e < (81f64).ln() + 1e-9,
            "entropy {e} outside (0, ln 81]"
        );
    }
    for h in 0..12 {
        assert!(dir.join(format!("map_head{h}.png")).exists());
    }
}

/// A small valid input file for the file-path tests.
fn small_input(dir: &Path) -> PathBuf {
    let input = dir.join("in.safetensors");
    let shape = [1, 16, 4, 32];
    let v: Vec<f32> = (0..16 * 4 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    write(
        &input,
        &[
            f32s("q", &shape, &v),
            f32s("k", &shape, &v),
            f32s("v", &shape, &v),
        ],
    );
    input
}

/// Files in `dir` whose names mark them as Spotlight's temporary outputs.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".spotlight-") && n.ends_with(".tmp"))
        .collect()
}

/// Issue 12 item 5: a write that fails part-way (here: the file size limit of the process,
/// `ulimit -f`, as a full disk would) leaves no temporary file and no output behind.
#[test]
fn a_failed_write_leaves_no_partial_file() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("full");
    let input = small_input(&dir);
    let out = dir.join("out.safetensors");
    // A limit of one block (512 or 1024 bytes by shell): the 8 KiB output does not fit.
    // SIGXFSZ is ignored so the write fails with EFBIG instead of killing the process.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 1; exec \"{BIN}\" run \"{}\" -o \"{}\" --lse",
            input.display(),
            out.display()
        ))
        .output()
        .unwrap();
    assert!(!status.status.success(), "the write should have failed");
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("cannot write"), "{err}");
    assert!(!out.exists(), "an output was left behind");
    assert!(
        temp_files(&dir).is_empty(),
        "temporary files left: {:?}",
        temp_files(&dir)
    );
}

/// Issue 12 item 6: `-o` writes through a symbolic link to its target, keeps an existing file's
/// permissions, and refuses a directory, a device or a FIFO before any GPU work.
#[test]
fn output_paths_links_permissions_and_special_files() {
    use std::os::unix::fs::PermissionsExt;
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("paths");
    let input = small_input(&dir);
    let run =
        |out: &Path| spotlight(&["run", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    // A link: the target is replaced, the link stays a link.
    let target = dir.join("target.safetensors");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink("target.safetensors", &link).unwrap();
    let o = run(&link);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(read_f32(&target, "out").len(), 16 * 4 * 32);
    // A dangling link: the file it names is created.
    let dangling = dir.join("dangling.safetensors");
    std::os::unix::fs::symlink("created.safetensors", &dangling).unwrap();
    assert!(run(&dangling).status.success());
    assert!(dir.join("created.safetensors").is_file());
    assert!(
        std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Permissions of a replaced file are kept.
    let private = dir.join("private.safetensors");
    std::fs::write(&private, b"old").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(run(&private).status.success());
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Not regular files: refused with what was wrong and what was expected; nothing changes.
    let fifo = dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let subdir = dir.join("a-directory");
    std::fs::create_dir_all(&subdir).unwrap();
    for (path, what) in [
        (Path::new("/dev/null"), "a device"),
        (fifo.as_path(), "a FIFO"),
        (subdir.as_path(), "a directory"),
    ] {
        let o = run(path);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: accepted", path.display());
        assert!(
            err.contains(what) && err.contains("expected a file path"),
            "{}: {err}",
            path.display()
        );
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // A missing directory is refused too.
    let o = run(&dir.join("no-such-dir/out.safetensors"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    assert!(temp_files(&dir).is_empty());
}

/// `spotlight grad`: GPU gradients equal the `--reference` ones (f64) for a causal, soft-capped,
/// biased GQA problem; a file without `dout` fails cleanly and leaves no output.
#[test]
fn grad_matches_reference_and_fails_cleanly() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("grad");
    let mut rng = Rng::new(16);
    let input = dir.join("in.safetensors");
    let mut ts = vec![
        f32s("q", &[2, 5, 4, 16], &rng.vec(2 * 5 * 4 * 16)),
        f32s("k", &[2, 9, 2, 16], &rng.vec(2 * 9 * 2 * 16)),
        f32s("v", &[2, 9, 2, 8], &rng.vec(2 * 9 * 2 * 8)),
        f32s("bias", &[4, 5, 9], &rng.vec(4 * 5 * 9)),
    ];
    write(&dir.join("no-dout.safetensors"), &ts);
    ts.push(f32s("dout", &[2, 5, 4, 8], &rng.vec(2 * 5 * 4 * 8)));
    write(&input, &ts);
    let (gpu, cpu) = (dir.join("gpu.safetensors"), dir.join("cpu.safetensors"));
    let args = ["--causal", "--softcap", "5"];
    for (out, extra) in [(&gpu, None), (&cpu, Some("--reference"))] {
        let mut a = vec!["grad", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
        a.extend(args);
        a.extend(extra);
        let o = spotlight(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for name in ["dq", "dk", "dv", "dbias"] {
        let e = rel_err(&read_f32(&gpu, name), &read_f32(&cpu, name));
        assert!(e < 1e-4, "{name}: rel {e:e}");
    }
    let bad = dir.join("bad.safetensors");
    let no_dout = dir.join("no-dout.safetensors");
    let o = spotlight(&[
        "grad",
        no_dout.to_str().unwrap(),
        "-o",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("dout"));
    assert!(!bad.exists());
}

/// The training example learns: on held-out sequences the loss falls and recall (argmax of the
/// attention at the right key position) rises from chance to most rows; the first step's
/// gradients were checked against the CPU reference inside the command. It writes its pictures
/// and curves; bad arguments fail before any GPU work.
#[test]
fn train_learns_associative_recall_and_draws_it() {
    if !have_gpu() {
        return;
    }
    let dir = tmpdir("train");
    let out_dir = dir.join("out");
    let out = spotlight(&[
        "train",
        "--steps",
        "150",
        "--batch",
        "8",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("train.json")).unwrap()).unwrap();
    let h = &json["held_out"];
    let (l0, l1) = (
        h["loss_before"].as_f64().unwrap(),
        h["loss_after"].as_f64().unwrap(),
    );
    let (r0, r1) = (
        h["recall_before"].as_f64().unwrap(),
        h["recall_after"].as_f64().unwrap(),
    );
    assert!(
        l1 < 0.5 * l0,
        "held-out loss {l0} -> {l1}: did not halve\n{text}"
    );
    assert!(r1 >= 0.9 && r1 > r0, "held-out recall {r0} -> {r1}\n{text}");
    assert_eq!(json["loss"].as_array().unwrap().len(), 150);
    for png in ["loss.png", "map-before.png", "map-after.png"] {
        let (w, h, _) = decode_png(&out_dir.join(png));
        assert!(w > 100 && h > 100, "{png}: {w}x{h}");
    }
    let bad = spotlight(&["train", "--pairs", "1"]);
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(msg.contains("--pairs at least 2"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
