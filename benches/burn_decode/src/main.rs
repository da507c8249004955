//! Peer benchmark for issue 15's decode target: burn 0.22's attention on its wgpu backend (cubecl
//! WGSL, default autotune + fusion) for one query row against a cache, the shapes of
//! `spotlight bench --decode --cache-lens L.. --batches B.. --heads HQ/HKV --dims D --dtype f16`.
//!
//! burn's `attention` takes equal query and key/value head counts, so K and V (`[B, HKV, L, D]`)
//! are expanded to `[B, HQ, L, D]` once per configuration, outside the timed calls (a user would
//! keep the expanded cache; burn then reads HQ/HKV times the bytes Spotlight reads). Reported:
//! median wall clock per call (`call + sync`) after warm-up, first call, the f64 reference error
//! of the output, and the rate in bytes of the un-expanded K and V per second (the unit of
//! `spotlight bench --decode`, so the two compare as ratios of time).
//!
//! usage: burn_decode [--cache-lens 2048,8192] [--batches 1,4] [--heads 32/8] [--dim 128]
//!                    [--dtype f16|f32] [--iters 10] [--warmup 2]

use std::time::Instant;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, DeviceKind, FloatDType, Tensor, TensorData};

struct Args {
    lens: Vec<usize>,
    batches: Vec<usize>,
    hq: usize,
    hkv: usize,
    d: usize,
    f16: bool,
    iters: usize,
    warmup: usize,
}

fn list(s: &str, what: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{what} '{s}': {e}"))
        })
        .collect()
}

fn parse() -> Args {
    let mut a = Args {
        lens: vec![2048, 8192],
        batches: vec![1, 4],
        hq: 32,
        hkv: 8,
        d: 128,
        f16: true,
        iters: 10,
        warmup: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--cache-lens" => a.lens = list(&v, "--cache-lens"),
            "--batches" => a.batches = list(&v, "--batches"),
            "--heads" => {
                let h = list(&v.replace('/', ","), "--heads");
                assert!(
                    h.len() == 2 && h[1] > 0 && h[0] % h[1] == 0,
                    "--heads HQ/HKV"
                );
                (a.hq, a.hkv) = (h[0], h[1]);
            }
            "--dim" => a.d = list(&v, "--dim")[0],
            "--dtype" => {
                a.f16 = match v.as_str() {
                    "f16" => true,
                    "f32" => false,
                    o => panic!("--dtype {o}: f16 or f32"),
                }
            }
            "--iters" => a.iters = list(&v, "--iters")[0].max(1),
            "--warmup" => a.warmup = list(&v, "--warmup")[0],
            o => panic!("unknown argument {o} (see the header of src/main.rs)"),
        }
        i += 2;
    }
    a
}

/// Deterministic values in [-1, 1) (xorshift), rounded to f16 when the run is f16.
fn values(n: usize, seed: u64, f16: bool) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if f16 { round_f16(x) } else { x }
        })
        .collect()
}

/// Round to the nearest f16 value (ties to even) for |x| < 1 (normal range only).
fn round_f16(x: f32) -> f32 {
    if x == 0.0 || x.abs() < 6.1e-5 {
        return 0.0;
    }
    let e = x.abs().log2().floor();
    let step = 2f32.powf(e - 10.0);
    let q = x / step;
    let r = q.round();
    let r = if (q - q.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - q.signum()
    } else {
        r
    };
    r * step
}

fn main() {
    let a = parse();
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let _ = Tensor::<1>::zeros([1], &device).into_data();
    println!(
        "burn_decode burn=0.22.1 device={:?} dtype={} heads={}/{} D={} iters={} warmup={}",
        device.identity().map(|i| i.name).unwrap_or_default(),
        if a.f16 { "f16" } else { "f32" },
        a.hq,
        a.hkv,
        a.d,
        a.iters,
        a.warmup
    );
    let group = a.hq / a.hkv;
    let opts = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: false,
    };
    for &b in &a.batches {
        for &l in &a.lens {
            let (hq, hkv, d) = (a.hq, a.hkv, a.d);
            let q = values(b * hq * d, 1 + l as u64, a.f16);
            let k = values(b * hkv * l * d, 2 + l as u64, a.f16);
            let v = values(b * hkv * l * d, 3 + l as u64, a.f16);
            let cast = |t: Tensor<4>| if a.f16 { t.cast(FloatDType::F16) } else { t };
            let tq = cast(Tensor::<4>::from_data(
                TensorData::new(q.clone(), [b, hq, 1, d]),
                &device,
            ));
            // [B, HKV, L, D] -> [B, HKV, G, L, D] -> [B, HQ, L, D]: query head h reads kv head h / G.
            let expand = |x: &[f32]| {
                let t =
                    Tensor::<5>::from_data(TensorData::new(x.to_vec(), [b, hkv, 1, l, d]), &device);
                cast(t.expand([b, hkv, group, l, d]).reshape([b, hq, l, d]))
            };
            let (tk, tv) = (expand(&k), expand(&v));
            device.sync().expect("sync");
            let t0 = Instant::now();
            let out = attention(tq.clone(), tk.clone(), tv.clone(), None, None, opts);
            let got = out.cast(FloatDType::F32).into_data();
            let first_call_s = t0.elapsed().as_secs_f64();
            let got: Vec<f32> = got.as_slice::<f32>().expect("f32 output").to_vec();
            // f64 reference of the first batch entry.
            let scale = 1.0 / (d as f64).sqrt();
            let (mut num, mut den) = (0f64, 0f64);
            for h in 0..hq {
                let kh = h / group;
                let qr = &q[h * d..(h + 1) * d];
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        let kr = &k[(kh * l + j) * d..(kh * l + j + 1) * d];
                        qr.iter()
                            .zip(kr)
                            .map(|(x, y)| *x as f64 * *y as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for x in 0..d {
                    let o: f64 = (0..l)
                        .map(|j| w[j] * v[(kh * l + j) * d + x] as f64)
                        .sum::<f64>()
                        / z;
                    let e = got[h * d + x] as f64 - o;
                    num += e * e;
                    den += o * o;
                }
            }
            let rel = (num / den.max(1e-300)).sqrt();
            for _ in 0..a.warmup {
                let o = attention(tq.clone(), tk.clone(), tv.clone(), None, None, opts);
                device.sync().expect("sync");
                drop(o);
            }
            let mut wall = Vec::new();
            for _ in 0..a.iters {
                let t = Instant::now();
                let o = attention(tq.clone(), tk.clone(), tv.clone(), None, None, opts);
                device.sync().expect("sync");
                wall.push(t.elapsed().as_secs_f64());
                drop(o);
            }
            wall.sort_by(f64::total_cmp);
            let ms = wall[wall.len() / 2] * 1e3;
            let bytes = (2 * b * hkv * l * d * if a.f16 { 2 } else { 4 }) as f64;
            println!(
                "burn decode B={b} L={l} wall_ms={ms:.3} kv_gb_per_s={:.3} first_call_s={first_call_s:.2} rel_err={rel:.2e}",
                bytes / (ms * 1e-3) / 1e9
            );
        }
    }
}
