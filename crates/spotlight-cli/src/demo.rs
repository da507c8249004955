//! `spotlight demo`: the newcomer's first run.

use std::time::Instant;

use clap::Args;
use spotlight::reference::{self, compare, random::Rng};
use spotlight::{Algorithm, DType, Engine, Inputs, Problem, RunOptions, Tensor};

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Turn the causal mask off.
    #[arg(long)]
    no_causal: bool,
    /// Storage dtype of Q, K and V.
    #[arg(long, default_value = "f32")]
    dtype: DType,
    #[arg(long, default_value = "auto")]
    algorithm: Algorithm,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

pub fn main(a: &DemoArgs) -> anyhow::Result<()> {
    let p = Problem::new(a.batch, a.seq_len, a.seq_len, a.heads, a.heads, a.head_dim)
        .causal(!a.no_causal);
    p.validate()?;
    let mut rng = Rng::new(42);
    let q = Tensor::from_f32(&rng.vec(p.q_elems()), a.dtype);
    let k = Tensor::from_f32(&rng.vec(p.k_elems()), a.dtype);
    let v = Tensor::from_f32(&rng.vec(p.v_elems()), a.dtype);
    let inputs = Inputs::new(q.as_ref(), k.as_ref(), v.as_ref());
    println!(
        "Problem: B={} Lq=Lk={} Hq=Hkv={} D={} causal={} dtype={} layout=bshd ({:.3} GFLOP)",
        p.batch,
        p.q_len,
        p.q_heads,
        p.head_dim,
        p.causal,
        a.dtype.name(),
        p.flops() / 1e9
    );

    let engine = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            println!("No GPU adapter: {e}");
            println!("Running the problem on the CPU reference instead (f64 accumulation).");
            let t = Instant::now();
            let r = reference::attention(&p, &inputs)?;
            let secs = t.elapsed().as_secs_f64();
            let finite = r.out.iter().all(|x| x.is_finite());
            println!(
                "CPU reference: {:.3} s, {:.4} GFLOP/s, outputs finite: {finite}",
                secs,
                p.flops() / secs / 1e9
            );
            return Ok(());
        }
    };
    println!("Adapter: {}", engine.describe());
    let opts = RunOptions {
        algorithm: a.algorithm,
        lse: true,
        ..Default::default()
    };
    // Warm-up (builds the pipelines) and the result we check.
    let out = engine.attention(&p, &inputs, &opts)?;
    println!("Algorithm: {}", out.algorithm.name());

    let resident = engine.upload(&p, &inputs, &opts)?;
    let mut times = Vec::new();
    for _ in 0..a.repeats.max(1) {
        let t = Instant::now();
        let mut enc = engine.device().create_command_encoder(&Default::default());
        engine.attention_on_buffers(
            &mut enc,
            &p,
            &resident.inputs(),
            &resident.outputs(),
            &opts,
        )?;
        engine.queue().submit([enc.finish()]);
        engine.wait()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "GPU time: {:.2} ms (median of {}, wall clock, data resident on the GPU), {:.4} TFLOP/s",
        median * 1e3,
        times.len(),
        p.flops() / median / 1e12
    );

    let t = Instant::now();
    let want = reference::attention(&p, &inputs)?;
    let cpu = t.elapsed().as_secs_f64();
    let e_out = compare::compare(&out.out.to_f32_vec(), &want.out);
    let e_lse = compare::compare(out.lse.as_deref().unwrap_or(&[]), &want.lse);
    println!("CPU reference: {:.2} s", cpu);
    println!("Error vs reference: O {e_out}");
    println!("                    LSE {e_lse}");
    let budget = if a.dtype == DType::F32 { 1e-5 } else { 1e-3 };
    if !e_out.within(budget) || !e_lse.within(1e-5) {
        anyhow::bail!("the GPU result is outside the error budget ({budget:.0e} relative)");
    }
    println!("OK: within the error budget ({budget:.0e} relative).");
    Ok(())
}
