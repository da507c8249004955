//! Criterion benchmarks of the GPU kernels at CI-friendly sizes. Each sample is the GPU time of
//! one run from timestamp queries (`Engine::time`), on data resident on the GPU.
//!
//! `cargo bench -p spotlight-benches` measures; `cargo test` runs each benchmark once as a test.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use spotlight::reference::random::Rng;
use spotlight::{Algorithm, DType, Engine, Inputs, Problem, RunOptions, Tensor};

fn engine() -> Option<Engine> {
    spotlight::testing::engine_or_skip("the benchmarks")
}

fn kernels(c: &mut Criterion) {
    let Some(engine) = engine() else { return };
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for (len, dim, causal) in [(128, 64, false), (128, 64, true), (256, 32, true)] {
        let p = Problem::new(1, len, len, 2, 2, dim).causal(causal);
        let mut rng = Rng::new(len as u64);
        let q = Tensor::from_f32(&rng.vec(p.q_elems()), DType::F32);
        let k = Tensor::from_f32(&rng.vec(p.k_elems()), DType::F32);
        let v = Tensor::from_f32(&rng.vec(p.v_elems()), DType::F32);
        let inputs = Inputs::new(q.as_ref(), k.as_ref(), v.as_ref());
        for alg in [Algorithm::Flash, Algorithm::ThreePass] {
            let opts = RunOptions {
                algorithm: alg,
                ..Default::default()
            };
            let resident = engine.upload(&p, &inputs, &opts).expect("upload");
            let id = BenchmarkId::new(alg.name(), format!("L{len}_D{dim}_causal{}", causal as u8));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = engine
                            .time(|enc| {
                                engine.attention_on_buffers(
                                    enc,
                                    &p,
                                    &resident.inputs(),
                                    &resident.outputs(),
                                    &opts,
                                )?;
                                Ok(())
                            })
                            .expect("run");
                        total += Duration::from_secs_f64(t.seconds);
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
