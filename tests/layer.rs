//! The attention layer: projections, rotary embeddings (both conventions, partial, positions
//! with gaps), every dtype, decoding through the KV cache, typed errors, and the real model
//! (all-MiniLM-L6-v2's six attention layers on two texts). Every output is compared with the
//! f64 reference on the same (rounded) weights; GPU outputs are poisoned (NaN) before each run.

use spotlight::reference::layer::{self as rl, LayerConfig, LayerExtras, LayerWeights};
use spotlight::reference::random::Rng;
use spotlight::reference::{Broadcast, Window, compare};
use spotlight::{
    AttentionLayer, DType, DecodeOptions, Engine, Error, KvCache, KvCacheConfig, Problem, Rope,
    RopeStyle, RunOptions, Tensor, TensorRef,
};

use crate::common::engine;

/// Random weights of a layer in `dt` (biases when `biases`), scaled like a trained layer's
/// (`1/sqrt(fan_in)`), so projections stay O(1).
struct Weights {
    w: [Tensor; 4],
    b: [Option<Tensor>; 4],
}

impl Weights {
    fn random(cfg: &LayerConfig, dt: DType, biases: bool, rng: &mut Rng) -> Self {
        let h = cfg.hidden;
        let dims = [
            (cfg.q_dim(), h),
            (cfg.kv_dim(), h),
            (cfg.kv_dim(), h),
            (h, cfg.q_dim()),
        ];
        let w = dims.map(|(o, i)| {
            let s = 1.0 / (i as f32).sqrt();
            let v: Vec<f32> = rng.vec(o * i).iter().map(|x| x * s * 1.7).collect();
            Tensor::from_f32(&v, dt)
        });
        let b = dims.map(|(o, _)| biases.then(|| Tensor::from_f32(&rng.vec(o), dt)));
        Weights { w, b }
    }

    fn refs(&self) -> LayerWeights<'_> {
        LayerWeights {
            wq: self.w[0].as_ref(),
            wk: self.w[1].as_ref(),
            wv: self.w[2].as_ref(),
            wo: self.w[3].as_ref(),
            bq: self.b[0].as_ref().map(Tensor::as_ref),
            bk: self.b[1].as_ref().map(Tensor::as_ref),
            bv: self.b[2].as_ref().map(Tensor::as_ref),
            bo: self.b[3].as_ref().map(Tensor::as_ref),
        }
    }
}

/// Runs the layer on the GPU and the reference; returns the relative error and the reference.
#[allow(clippy::too_many_arguments)]
fn run_both(
    engine: &Engine,
    cfg: &LayerConfig,
    w: &LayerWeights<'_>,
    x: TensorRef<'_>,
    p: &Problem,
    positions: Option<&[u32]>,
    extras: &LayerExtras<'_>,
    opts: &RunOptions,
) -> (compare::Error, Vec<f64>) {
    let layer = AttentionLayer::new(engine, *cfg, w).expect("upload");
    let got = layer
        .forward(engine, x, p, positions, extras, opts)
        .expect("gpu forward");
    let want = rl::layer(cfg, w, x, p, positions, extras).expect("reference");
    (compare::compare(&got, &want.out), want.out)
}

#[test]
fn rotary_embeddings_match_the_reference_in_both_conventions_partial_and_with_gaps() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(1701);
    let (b, l) = (2, 9);
    let cases = [
        Rope::new(RopeStyle::RotateHalf, 10_000.0, 16),
        Rope::new(RopeStyle::Interleaved, 10_000.0, 16),
        Rope::with_fraction(RopeStyle::RotateHalf, 10_000.0, 16, 0.5),
        Rope::with_fraction(RopeStyle::Interleaved, 500.0, 16, 0.25),
    ];
    for (n, rope) in cases.into_iter().enumerate() {
        let cfg = LayerConfig::new(48, 4, 2, 16).rope(rope);
        let wts = Weights::random(&cfg, DType::F32, true, &mut rng);
        let w = wts.refs();
        let x = rng.vec(b * l * cfg.hidden);
        // Positions with gaps, different per batch entry, up to a few thousand (large angles).
        let mut positions = Vec::new();
        for _ in 0..b {
            let mut p = rng.range(0, 3000) as u32;
            for _ in 0..l {
                positions.push(p);
                p += rng.range(1, 40) as u32;
            }
        }
        let p = cfg.problem(b, l).causal(n % 2 == 0);
        let extras = LayerExtras::default();
        let (e, want) = run_both(
            engine,
            &cfg,
            &w,
            TensorRef::F32(&x),
            &p,
            Some(&positions),
            &extras,
            &RunOptions::default(),
        );
        assert!(e.within(1e-5), "{rope:?}: {e}");
        // The check can fail: the same layer without rotation (or at default positions) gives a
        // result far outside the budget.
        let plain = LayerConfig { rope: None, ..cfg };
        let no_rope = rl::layer(&plain, &w, TensorRef::F32(&x), &p, None, &extras).unwrap();
        let at_default = rl::layer(&cfg, &w, TensorRef::F32(&x), &p, None, &extras).unwrap();
        for other in [&no_rope.out, &at_default.out] {
            let got: Vec<f32> = other.iter().map(|&v| v as f32).collect();
            let d = compare::compare(&got, &want);
            assert!(
                !d.within(1e-3),
                "{rope:?}: rotation made no difference ({d})"
            );
        }
    }
}

#[test]
fn rotary_reference_rotates_as_defined() {
    // Position 1, one pair (R = 2): (1, 0) becomes (cos 1, sin 1) in either convention; pairs
    // are (i, i + R/2) for rotate-half and (2i, 2i + 1) for interleaved.
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        let r = Rope::new(style, 10_000.0, 2);
        let mut x = vec![1.0, 0.0, 5.0];
        r.apply(&mut x, &[1], 1, 3);
        assert!((x[0] - 1f64.cos()).abs() < 1e-15 && (x[1] - 1f64.sin()).abs() < 1e-15);
        assert_eq!(x[2], 5.0, "dims past R pass through");
    }
    let half = Rope::new(RopeStyle::RotateHalf, 100.0, 4);
    let inter = Rope::new(RopeStyle::Interleaved, 100.0, 4);
    assert_eq!(half.pair(1), (1, 3));
    assert_eq!(inter.pair(1), (2, 3));
    // Pair 1 turns by pos · 100^(-2/4) = pos / 10.
    assert!((half.angle(7, 1) - 0.7).abs() < 1e-12);
    assert_eq!(
        Rope::with_fraction(RopeStyle::RotateHalf, 1e4, 64, 0.25).rotary_dim,
        16
    );
    assert!(
        Rope::new(RopeStyle::RotateHalf, 1e4, 3)
            .validate(8)
            .is_err()
    );
    assert!(
        Rope::new(RopeStyle::RotateHalf, -1.0, 4)
            .validate(8)
            .is_err()
    );
    assert!(
        Rope::new(RopeStyle::RotateHalf, 1e4, 10)
            .validate(8)
            .is_err()
    );
}

#[test]
fn layer_matches_the_reference_for_every_dtype_and_option() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(4242);
    let dts = [DType::F32, DType::F16, DType::Bf16];
    let (b, l) = (2, 11);
    for (n, &wdt) in dts.iter().enumerate() {
        for (m, &xdt) in dts.iter().enumerate() {
            let case = n * 3 + m;
            let (hq, hkv, d) = [(4, 2, 16), (6, 6, 8), (4, 1, 12)][case % 3];
            let mut cfg = LayerConfig::new(40 + 8 * (case % 4), hq, hkv, d);
            if case % 2 == 0 {
                let style = [RopeStyle::RotateHalf, RopeStyle::Interleaved][case / 2 % 2];
                cfg = cfg.rope(Rope::with_fraction(style, 10_000.0, d, 0.5));
            }
            let wts = Weights::random(&cfg, wdt, case % 4 != 3, &mut rng);
            let x = Tensor::from_f32(&rng.vec(b * l * cfg.hidden), xdt);
            let mut p = cfg.problem(b, l);
            let mut bias = None;
            let mut mask = None;
            let mut slopes = None;
            let mut lens = None;
            // One attention option per case, so every option passes through the layer.
            match case {
                0 => p.causal = true,
                1 => p.window = Some(Window::parse("3,1").unwrap()),
                2 => p.softcap = Some(2.0),
                3 => {
                    p.bias = Some(Broadcast {
                        batch: 1,
                        heads: hq,
                    });
                    bias = Some(rng.vec(hq * l * l));
                }
                4 => {
                    p.mask = Some(Broadcast { batch: b, heads: 1 });
                    mask = Some(
                        (0..b * l * l)
                            .map(|_| rng.chance(0.7) as u8)
                            .collect::<Vec<_>>(),
                    );
                }
                5 => {
                    p.alibi = true;
                    slopes = Some(
                        (0..hq)
                            .map(|h| 0.5f32.powi(h as i32 + 1))
                            .collect::<Vec<_>>(),
                    );
                    p.causal = true;
                }
                6 => {
                    p.q_seqlens = true;
                    p.kv_seqlens = true;
                    lens = Some(vec![l as i32, 6]);
                }
                7 => p.scale = Some(0.3),
                _ => p.causal = true,
            }
            let extras = LayerExtras {
                bias: bias.as_deref(),
                mask: mask.as_deref(),
                alibi_slopes: slopes.as_deref(),
                q_seqlens: lens.as_deref(),
                kv_seqlens: lens.as_deref(),
            };
            let algorithm =
                [spotlight::Algorithm::Flash, spotlight::Algorithm::ThreePass][case % 2];
            let opts = RunOptions {
                algorithm,
                ..Default::default()
            };
            let (e, _) = run_both(
                engine,
                &cfg,
                &wts.refs(),
                x.as_ref(),
                &p,
                None,
                &extras,
                &opts,
            );
            assert!(
                e.within(1e-5),
                "weights {wdt:?}, x {xdt:?}, case {case} ({cfg:?}): {e}"
            );
        }
    }
}

#[test]
fn a_fused_qkv_weight_gives_the_same_layer() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(77);
    let cfg = LayerConfig::new(32, 4, 2, 8).rope(Rope::new(RopeStyle::RotateHalf, 1e4, 8));
    let wts = Weights::random(&cfg, DType::F16, true, &mut rng);
    let w = wts.refs();
    let cat =
        |ts: [TensorRef<'_>; 3]| -> Vec<f32> { ts.iter().flat_map(|t| t.to_f32_vec()).collect() };
    let wqkv = Tensor::from_f32(&cat([w.wq, w.wk, w.wv]), DType::F16);
    let bqkv = Tensor::from_f32(
        &cat([w.bq.unwrap(), w.bk.unwrap(), w.bv.unwrap()]),
        DType::F16,
    );
    let fused = LayerWeights::fused(&cfg, wqkv.as_ref(), Some(bqkv.as_ref()), w.wo, w.bo).unwrap();
    let x = rng.vec(2 * 7 * cfg.hidden);
    let p = cfg.problem(2, 7).causal(true);
    let extras = LayerExtras::default();
    let (e, want) = run_both(
        engine,
        &cfg,
        &fused,
        TensorRef::F32(&x),
        &p,
        None,
        &extras,
        &RunOptions::default(),
    );
    assert!(e.within(1e-5), "{e}");
    let separate = rl::layer(&cfg, &w, TensorRef::F32(&x), &p, None, &extras).unwrap();
    assert_eq!(
        separate.out, want,
        "fused and separate weights define the same layer"
    );
    let short = Tensor::from_f32(&[0.0; 10], DType::F16);
    assert!(LayerWeights::fused(&cfg, short.as_ref(), None, w.wo, None).is_err());
}

/// Decoding: a prompt per sequence, then single-token steps, two sequences of different lengths
/// per call, pages crossed; each step's output equals the full forward's rows at those positions.
#[test]
fn decode_after_many_appends_equals_the_full_forward() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(9001);
    // Cache dtype = weight dtype; the f16/bf16 caches round K and V, hence their budgets.
    for (dt, budget) in [(DType::F32, 1e-5), (DType::F16, 3e-3), (DType::Bf16, 2e-2)] {
        let cfg = LayerConfig::new(32, 4, 2, 8).rope(Rope::with_fraction(
            RopeStyle::RotateHalf,
            10_000.0,
            8,
            0.5,
        ));
        let wts = Weights::random(&cfg, dt, true, &mut rng);
        let w = wts.refs();
        let layer = AttentionLayer::new(engine, cfg, &w).unwrap();
        let mut cache = KvCache::new(engine, KvCacheConfig::paged(2, 8, dt, 4, 16)).unwrap();
        let seqs = [cache.add_sequence(), cache.add_sequence()];
        let prompts = [5usize, 3];
        let steps = 6;
        let total: Vec<usize> = prompts.iter().map(|p| p + steps).collect();
        let xs: Vec<Vec<f32>> = total.iter().map(|&t| rng.vec(t * cfg.hidden)).collect();
        let h = cfg.hidden;
        // Reference: each sequence's full causal forward.
        let want: Vec<Vec<f64>> = (0..2)
            .map(|s| {
                let p = cfg.problem(1, total[s]).causal(true);
                rl::layer(
                    &cfg,
                    &w,
                    TensorRef::F32(&xs[s]),
                    &p,
                    None,
                    &LayerExtras::default(),
                )
                .unwrap()
                .out
            })
            .collect();
        let check = |s: usize, from: usize, got: &[f32], what: &str| {
            let e = compare::compare(got, &want[s][from * h..from * h + got.len()]);
            assert!(e.within(budget), "{dt:?} {what}, sequence {s}: {e}");
        };
        // Prompts (one sequence per call: their lengths differ).
        for s in 0..2 {
            let x = &xs[s][..prompts[s] * h];
            let got = layer
                .decode(
                    engine,
                    &mut cache,
                    &[seqs[s]],
                    TensorRef::F32(x),
                    None,
                    &DecodeOptions::default(),
                )
                .unwrap();
            check(s, 0, &got, "prompt");
        }
        for step in 0..steps {
            let mut x = Vec::new();
            for s in 0..2 {
                let t = prompts[s] + step;
                x.extend_from_slice(&xs[s][t * h..(t + 1) * h]);
            }
            let opts = DecodeOptions {
                algorithm: [spotlight::Algorithm::SplitK, spotlight::Algorithm::Flash][step % 2],
                ..Default::default()
            };
            let got = layer
                .decode(engine, &mut cache, &seqs, TensorRef::F32(&x), None, &opts)
                .unwrap();
            for s in 0..2 {
                check(s, prompts[s] + step, &got[s * h..(s + 1) * h], "step");
            }
        }
        assert_eq!(cache.len(seqs[0]).unwrap(), total[0]);
        assert_eq!(cache.len(seqs[1]).unwrap(), total[1]);
    }
}

#[test]
fn bad_layer_input_is_refused_with_typed_errors_before_gpu_work() {
    let Some(engine) = engine() else { return };
    let mut rng = Rng::new(5);
    let cfg = LayerConfig::new(32, 4, 2, 8);
    let wts = Weights::random(&cfg, DType::F32, false, &mut rng);
    let w = wts.refs();
    // Weights of the wrong size; heads that do not divide; an odd rotary dim.
    let mut bad = w;
    bad.wk = w.wq;
    assert!(matches!(
        AttentionLayer::new(engine, cfg, &bad),
        Err(Error::Problem(_))
    ));
    assert!(matches!(
        AttentionLayer::new(engine, LayerConfig::new(32, 3, 2, 8), &w),
        Err(Error::Problem(_))
    ));
    let odd = cfg.rope(Rope::new(RopeStyle::Interleaved, 1e4, 5));
    assert!(matches!(
        AttentionLayer::new(engine, odd, &w),
        Err(Error::Problem(_))
    ));
    let layer = AttentionLayer::new(engine, cfg, &w).unwrap();
    let x = rng.vec(3 * cfg.hidden);
    let ex = LayerExtras::default();
    let o = RunOptions::default();
    // x of the wrong length, a problem of another shape, positions of the wrong length, a bias
    // the problem does not declare.
    let p = cfg.problem(1, 3);
    assert!(
        layer
            .forward(engine, TensorRef::F32(&x[..40]), &p, None, &ex, &o)
            .is_err()
    );
    assert!(
        layer
            .forward(
                engine,
                TensorRef::F32(&x),
                &cfg.problem(1, 4),
                None,
                &ex,
                &o
            )
            .is_err()
    );
    let wrong_heads = Problem::new(1, 3, 3, 2, 2, 8);
    assert!(
        layer
            .forward(engine, TensorRef::F32(&x), &wrong_heads, None, &ex, &o)
            .is_err()
    );
    assert!(
        layer
            .forward(engine, TensorRef::F32(&x), &p, Some(&[0, 1]), &ex, &o)
            .is_err()
    );
    let bias = vec![0.0f32; 9];
    let with_bias = LayerExtras {
        bias: Some(&bias),
        ..ex
    };
    assert!(matches!(
        layer.forward(engine, TensorRef::F32(&x), &p, None, &with_bias, &o),
        Err(Error::Problem(_))
    ));
    // Decode: a cache of another shape, a sequence twice, no free pages (nothing appended).
    let mut other = KvCache::new(engine, KvCacheConfig::paged(2, 4, DType::F32, 4, 4)).unwrap();
    let s = other.add_sequence();
    let d = DecodeOptions::default();
    assert!(matches!(
        layer.decode(engine, &mut other, &[s], TensorRef::F32(&x[..32]), None, &d),
        Err(Error::Cache(_))
    ));
    let mut cache = KvCache::new(engine, KvCacheConfig::paged(2, 8, DType::F32, 2, 1)).unwrap();
    let s = cache.add_sequence();
    assert!(matches!(
        layer.decode(
            engine,
            &mut cache,
            &[s, s],
            TensorRef::F32(&x[..64]),
            None,
            &d
        ),
        Err(Error::Cache(_))
    ));
    assert!(matches!(
        layer.decode(engine, &mut cache, &[s], TensorRef::F32(&x), None, &d),
        Err(Error::Cache(_))
    ));
    assert_eq!(cache.len(s).unwrap(), 0, "a refused decode appends nothing");
    assert_eq!(cache.free_pages(), 1);
    assert!(
        layer
            .decode(engine, &mut cache, &[s], TensorRef::F32(&x[..64]), None, &d)
            .is_ok()
    );
    assert_eq!(cache.len(s).unwrap(), 2);
}

/// The MiniLM data: `SPOTLIGHT_MINILM_DIR`, else `../shared/data/minilm` beside the workspace.
pub fn minilm_dir() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("SPOTLIGHT_MINILM_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/minilm"),
    };
    if dir.join("minilm-attention-weights.safetensors").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "the MiniLM data is not at {} (set SPOTLIGHT_MINILM_DIR to the folder with minilm-attention-weights.safetensors)",
        dir.display()
    );
    spotlight::testing::require("the MiniLM tests", Some(msg)).and(None)
}

fn f32s(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    (bytemuck::pod_collect_to_vec(t.data()), t.shape().to_vec())
}

#[test]
fn minilm_attention_layers_reproduce_the_model() {
    let Some(engine) = engine() else { return };
    let Some(dir) = minilm_dir() else { return };
    let wbytes = std::fs::read(dir.join("minilm-attention-weights.safetensors")).unwrap();
    let wst = safetensors::SafeTensors::deserialize(&wbytes).unwrap();
    let cfg = LayerConfig::new(384, 12, 12, 32);
    let mut worst = 0.0f64;
    let layers: Vec<AttentionLayer> = (0..6)
        .map(|l| {
            let g = |n: &str| f32s(&wst, &format!("layer{l}.{n}")).0;
            let (wq, wk, wv, wo) = (g("wq"), g("wk"), g("wv"), g("wo"));
            let (bq, bk, bv, bo) = (g("bq"), g("bk"), g("bv"), g("bo"));
            let w = LayerWeights {
                wq: TensorRef::F32(&wq),
                wk: TensorRef::F32(&wk),
                wv: TensorRef::F32(&wv),
                wo: TensorRef::F32(&wo),
                bq: Some(TensorRef::F32(&bq)),
                bk: Some(TensorRef::F32(&bk)),
                bv: Some(TensorRef::F32(&bv)),
                bo: Some(TensorRef::F32(&bo)),
            };
            AttentionLayer::new(engine, cfg, &w).unwrap()
        })
        .collect();
    for text in ["contract", "code"] {
        let bytes = std::fs::read(dir.join(format!("{text}-layers.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (l, layer) in layers.iter().enumerate() {
            let (x, shape) = f32s(&st, &format!("layer{l}.x"));
            let (want, _) = f32s(&st, &format!("layer{l}.attn"));
            let (b, len) = (shape[0], shape[1]);
            let p = cfg.problem(b, len);
            let got = layer
                .forward(
                    engine,
                    TensorRef::F32(&x),
                    &p,
                    None,
                    &LayerExtras::default(),
                    &RunOptions::default(),
                )
                .unwrap();
            let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let e = compare::compare(&got, &want64);
            worst = worst.max(e.rel_frobenius);
            assert!(e.within(1e-4), "{text} layer {l}: {e}");
        }
    }
    eprintln!("minilm: worst relative error over 12 layer runs {worst:.2e}");
}
