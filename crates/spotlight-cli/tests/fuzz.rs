//! A seeded mutation fuzzer for the CLI's input handling, in-process: valid safetensors files
//! (every optional tensor, every dtype) are corrupted in many ways (bit flips, truncation,
//! headers with absurd shapes, offsets and dtypes, garbage appended) and loaded. Every input must
//! end in a clean error or a checked problem: no panic, no huge allocation, no hang.
//!
//! `SPOTLIGHT_FUZZ_CASES` sets the count (default 10 000); `SPOTLIGHT_FUZZ_SEED` the seed:
//! `SPOTLIGHT_FUZZ_CASES=1000000 cargo test --release -p spotlight-cli --test fuzz`.

use std::path::PathBuf;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use spotlight::reference::random::Rng;
use spotlight::{Algorithm, Layout};
use spotlight_cli::run::{ProblemArgs, load_bytes};

fn serialize(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A few valid files covering every tensor the loader reads.
fn seeds(rng: &mut Rng) -> Vec<Vec<u8>> {
    let f32b = |n: usize, rng: &mut Rng| -> Vec<u8> {
        rng.vec(n).iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    let f16b = |n: usize, rng: &mut Rng| -> Vec<u8> {
        rng.vec(n)
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let (b, lq, lk, hq, hkv, d) = (2usize, 5usize, 7usize, 4usize, 2usize, 8usize);
    let full = vec![
        (
            "q",
            Dtype::F32,
            vec![b, lq, hq, d],
            f32b(b * lq * hq * d, rng),
        ),
        (
            "k",
            Dtype::F16,
            vec![b, lk, hkv, d],
            f16b(b * lk * hkv * d, rng),
        ),
        (
            "v",
            Dtype::BF16,
            vec![b, lk, hkv, d],
            f16b(b * lk * hkv * d, rng),
        ),
        (
            "bias",
            Dtype::F32,
            vec![1, hq, lq, lk],
            f32b(hq * lq * lk, rng),
        ),
        (
            "mask",
            Dtype::BOOL,
            vec![b, 1, lq, lk],
            vec![1u8; b * lq * lk],
        ),
        ("alibi_slopes", Dtype::F32, vec![hq], f32b(hq, rng)),
        (
            "q_seqlens",
            Dtype::I32,
            vec![b],
            [5i32, 3].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        (
            "kv_seqlens",
            Dtype::I32,
            vec![b],
            [7i32, 0].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ];
    let plain = full[..3].to_vec();
    vec![serialize(&full), serialize(&plain)]
}

/// One corruption of `base`.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut x = base.to_vec();
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&base[8..8 + n]).into_owned();
    match rng.range(0, 9) {
        0 => {
            for _ in 0..rng.range(1, 8) {
                let i = rng.range(0, x.len() - 1);
                x[i] ^= 1 << rng.range(0, 7);
            }
        }
        1 => x.truncate(rng.range(0, x.len())),
        2 => {
            let i = rng.range(8, 8 + n - 1);
            x[i] = rng.pick(b"{}[]\",:0123456789-e.aZ \\\x00\xff");
        }
        3 | 4 => {
            // Rewrite one number in the header: shapes and offsets become absurd.
            let digits: Vec<usize> = header
                .match_indices(|c: char| c.is_ascii_digit())
                .map(|(i, _)| i)
                .collect();
            let at = digits[rng.range(0, digits.len() - 1)];
            let end = header[at..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(header.len(), |e| at + e);
            let big = rng.pick(&[
                "0",
                "1",
                "18446744073709551615",
                "4294967296",
                "9999999999999",
                "99999999",
            ]);
            let h = format!("{}{}{}", &header[..at], big, &header[end..]);
            x = [
                (h.len() as u64).to_le_bytes().to_vec(),
                h.into_bytes(),
                base[8 + n..].to_vec(),
            ]
            .concat();
        }
        5 => {
            let dts = [
                "F32", "F16", "BF16", "I32", "U8", "BOOL", "I64", "F64", "U16", "F8_E4M3", "XYZ",
            ];
            let mut h = header.clone();
            for dt in dts {
                if rng.chance(0.3) {
                    h = h.replacen(&format!("\"{dt}\""), &format!("\"{}\"", rng.pick(&dts)), 1);
                }
            }
            x = [
                (h.len() as u64).to_le_bytes().to_vec(),
                h.into_bytes(),
                base[8 + n..].to_vec(),
            ]
            .concat();
        }
        6 => {
            // Header length that lies.
            let lie = rng.pick(&[0u64, 1, 7, n as u64 + 1, n as u64 - 1, u64::MAX, 1 << 40]);
            x[..8].copy_from_slice(&lie.to_le_bytes());
        }
        7 => x.extend((0..rng.range(1, 64)).map(|_| rng.next_u64() as u8)),
        8 => {
            // Rename a tensor (a missing q, k or v, or an unknown one).
            let names = ["\"q\"", "\"k\"", "\"v\"", "\"mask\"", "\"bias\""];
            let h = header.replacen(rng.pick(&names), "\"zz\"", 1);
            x = [
                (h.len() as u64).to_le_bytes().to_vec(),
                h.into_bytes(),
                base[8 + n..].to_vec(),
            ]
            .concat();
        }
        _ => {
            x = (0..rng.range(0, 300))
                .map(|_| rng.next_u64() as u8)
                .collect()
        }
    }
    x
}

#[test]
fn ten_thousand_malformed_inputs_end_in_clean_errors() {
    let cases: usize = std::env::var("SPOTLIGHT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("SPOTLIGHT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xF022);
    let mut rng = Rng::new(seed);
    let bases = seeds(&mut rng);
    for base in &bases {
        let args = args(false);
        load_bytes(base, &args).expect("the unmutated seed files are valid");
    }
    let (mut ok, mut refused) = (0usize, 0usize);
    let start = std::time::Instant::now();
    for case in 0..cases {
        let base = &bases[case % bases.len()];
        let input = mutate(base, &mut rng);
        let args = args(case % 3 == 0);
        let result =
            std::panic::catch_unwind(|| load_bytes(&input, &args).map(|l| l.problem.clone()));
        match result {
            Ok(Ok(p)) => {
                // Accepted: then it is a consistent problem of modest size.
                p.validate().unwrap();
                assert!(
                    p.q_elems() < 1 << 20,
                    "case {case}: accepted an absurd problem {p:?}"
                );
                ok += 1;
            }
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty(), "case {case}: empty error");
                refused += 1;
            }
            Err(_) => panic!("case {case} (seed {seed}) panicked"),
        }
    }
    assert_eq!(ok + refused, cases);
    assert!(
        refused > cases / 2,
        "too few refusals: {refused} of {cases}"
    );
    eprintln!(
        "fuzz: {cases} inputs, {refused} refused cleanly, {ok} accepted, {:?}",
        start.elapsed()
    );
}

fn args(bhsd: bool) -> ProblemArgs {
    ProblemArgs {
        input: PathBuf::from("fuzz.safetensors"),
        prefix: Vec::new(),
        causal: bhsd,
        window: None,
        scale: None,
        softcap: None,
        layout: if bhsd { Layout::Bhsd } else { Layout::Bshd },
        algorithm: Algorithm::Auto,
    }
}
