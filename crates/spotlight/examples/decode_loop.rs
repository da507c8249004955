//! A toy decoding loop: a prompt goes into a paged KV cache, then each step appends one new
//! token's K and V per sequence and attends its query to the whole cache (random weights; the
//! point is the cache and the attention, not the model). Reports tokens per second.
//!
//! ```text
//! cargo run --release -p spotlight --example decode_loop -- [BATCH] [PROMPT] [STEPS]
//! ```

use std::time::Instant;

use spotlight::reference::random::Rng;
use spotlight::{DType, DecodeOptions, Engine, KvCache, KvCacheConfig, TensorRef};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let batch = args.first().copied().unwrap_or(2);
    let prompt = args.get(1).copied().unwrap_or(256);
    let steps = args.get(2).copied().unwrap_or(32);
    let (q_heads, kv_heads, dim, page) = (32, 8, 128, 64);

    let engine = Engine::new()?;
    println!("adapter: {}", engine.describe());
    let pages_per_seq = (prompt + steps).div_ceil(page);
    let cfg = KvCacheConfig::paged(kv_heads, dim, DType::F16, page, batch * pages_per_seq);
    let mut cache = KvCache::new(&engine, cfg)?;
    let mut rng = Rng::new(7);
    let seqs: Vec<_> = (0..batch).map(|_| cache.add_sequence()).collect();
    for &s in &seqs {
        // Prompts of different lengths, as in a real batch.
        let n = prompt - s * prompt / (2 * batch);
        let (k, v) = (rng.vec(n * kv_heads * dim), rng.vec(n * kv_heads * dim));
        cache.append(&engine, s, TensorRef::F32(&k), TensorRef::F32(&v))?;
    }
    let opts = DecodeOptions::default();
    let start = Instant::now();
    let mut checksum = 0.0f64;
    for step in 0..steps {
        for &s in &seqs {
            let (k, v) = (rng.vec(kv_heads * dim), rng.vec(kv_heads * dim));
            cache.append(&engine, s, TensorRef::F32(&k), TensorRef::F32(&v))?;
        }
        let q = rng.vec(batch * q_heads * dim);
        let out = engine.decode(&cache, &seqs, TensorRef::F32(&q), 1, q_heads, &opts)?;
        let o = out.out.to_f32_vec();
        assert!(
            o.iter().all(|x| x.is_finite()),
            "non-finite output at step {step}"
        );
        checksum += o.iter().map(|&x| x as f64).sum::<f64>();
    }
    let secs = start.elapsed().as_secs_f64();
    let lens: Vec<usize> = seqs
        .iter()
        .map(|&s| cache.len(s))
        .collect::<Result<_, _>>()?;
    println!(
        "{steps} steps x {batch} sequences (final lengths {lens:?}), Hq/Hkv = {q_heads}/{kv_heads}, D = {dim}, f16 cache"
    );
    println!(
        "{:.1} tokens/s ({:.2} ms per step, wall clock incl. upload and readback), checksum {checksum:.4}",
        (steps * batch) as f64 / secs,
        secs * 1e3 / steps as f64
    );
    Ok(())
}
