//! `spotlight bench --decode --paged N`: decoding through the KV cache API (`KvCache` +
//! `Engine::decode`), what an inference loop calls, with pages of N rows (`--paged 0`: one
//! contiguous page per sequence, the same API).
//!
//! Each sequence's rows are appended in chunks of one page, round-robin over the sequences, so
//! a sequence's pages are interleaved with the others' in the pool (as when sequences grow
//! together), not one contiguous run. One call is validated against the f64 reference on the
//! same K/V; then wall-clock time per call (upload of the one query row, the attention, the
//! merge, the read-back of O) after warm-up, the median of the repeats.

use anyhow::{Context, bail};
use spotlight::reference::{self, compare, random::Rng};
use spotlight::{
    Algorithm, DType, DecodeOptions, Engine, Inputs, KvCache, KvCacheConfig, Problem, Tensor,
};

/// How many calls to time and warm up, and whether to validate one.
pub struct Timing {
    pub repeats: usize,
    pub warmup: usize,
    pub check: bool,
    /// `--flash-layout` (`None`: the adapter decides).
    pub flash_layout: Option<spotlight::FlashLayout>,
}

/// One decode problem through the cache. Returns `(ms per call, relative error, algorithm)`.
pub fn measure(
    engine: &Engine,
    p: &Problem,
    dtype: DType,
    page_size: usize,
    algorithm: Algorithm,
    t: &Timing,
) -> anyhow::Result<(f64, f64, Algorithm)> {
    let Timing {
        repeats,
        warmup,
        check,
        flash_layout,
    } = *t;
    if p.q_len != 1 {
        bail!(
            "decode through the cache takes one query row (Lq = {})",
            p.q_len
        );
    }
    let (b, lk, hkv, d) = (p.batch, p.kv_len, p.kv_heads, p.head_dim);
    let page = if page_size == 0 { lk } else { page_size };
    let pages_per_seq = lk.div_ceil(page);
    let cfg = KvCacheConfig::paged(hkv, d, dtype, page, b * pages_per_seq);
    let mut cache = KvCache::new(engine, cfg).context("KV cache for the bench")?;
    let seqs: Vec<_> = (0..b).map(|_| cache.add_sequence()).collect();
    let mut rng = Rng::new(4321 + lk as u64);
    // K and V as [B, Lk, Hkv, D] (BSHD), the reference's view; rows go to the cache a page at
    // a time, round-robin over the sequences.
    let k = Tensor::from_f32(&rng.vec(p.k_elems()), dtype);
    let v = Tensor::from_f32(&rng.vec(p.v_elems()), dtype);
    let q = Tensor::from_f32(&rng.vec(p.q_elems()), dtype);
    let row = hkv * d;
    for start in (0..lk).step_by(page) {
        let n = page.min(lk - start);
        for (s, &id) in seqs.iter().enumerate() {
            let at = (s * lk + start) * row;
            let (kr, vr) = (k.as_ref(), v.as_ref());
            cache.append(
                engine,
                id,
                kr.slice(at..at + n * row),
                vr.slice(at..at + n * row),
            )?;
        }
    }
    let opts = DecodeOptions {
        causal: false,
        algorithm,
        flash_layout,
        out_dtype: Some(DType::F32),
        ..Default::default()
    };
    let mut err = f64::NAN;
    let mut ran = algorithm;
    if check {
        let got = engine.decode(&cache, &seqs, q.as_ref(), 1, p.q_heads, &opts)?;
        ran = got.algorithm;
        let want = reference::attention(p, &Inputs::new(q.as_ref(), k.as_ref(), v.as_ref()))?;
        let e = compare::compare(&got.out.to_f32_vec(), &want.out);
        err = if e.non_finite_mismatches > 0 {
            f64::INFINITY
        } else {
            e.rel_frobenius
        };
    }
    for _ in 0..warmup {
        engine.decode(&cache, &seqs, q.as_ref(), 1, p.q_heads, &opts)?;
    }
    let mut walls = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = std::time::Instant::now();
        let got = engine.decode(&cache, &seqs, q.as_ref(), 1, p.q_heads, &opts)?;
        walls.push(start.elapsed().as_secs_f64());
        ran = got.algorithm;
    }
    walls.sort_by(f64::total_cmp);
    Ok((walls[walls.len() / 2] * 1e3, err, ran))
}
