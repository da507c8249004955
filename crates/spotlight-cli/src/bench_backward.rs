//! `spotlight bench --backward`: the backward pass's FLOP rate (FlashAttention's count: 2.5× the
//! forward's FLOPs) and its time beside the forward's on the same inputs, in the same run.

use anyhow::{Context, bail};
use spotlight::reference::random::Rng;
use spotlight::wgpu;
use spotlight::{
    BackwardOptions, DType, Engine, FlashLayout, GpuForward, GpuGradients, Inputs, Problem,
    RunOptions, TensorRef,
};

/// Times forward (flash, with LSE) and backward for each `B,L,H,D[,causal]` configuration
/// (default 1,1024,2,64), f32, median of `repeats` after one warm-up each. `layout` forces the
/// tiled or the row kernels for both directions (`--flash-layout`; default: the adapter decides),
/// `rows_per_workgroup` their rows per workgroup, `dq_from_gradients` how the row kernels get dQ
/// ([`BackwardOptions::dq_from_gradients`]). After each configuration's row, a line with one more
/// backward's GPU time per pass (`passes=`, as `spotlight bench` prints the forward's).
pub fn main(
    configs: &[String],
    repeats: Option<usize>,
    layout: Option<FlashLayout>,
    rows_per_workgroup: Option<u32>,
    dq_from_gradients: Option<bool>,
) -> anyhow::Result<()> {
    let engine = Engine::new()?;
    let configs = if configs.is_empty() {
        vec!["1,1024,2,64".to_string()]
    } else {
        configs.to_vec()
    };
    let repeats = repeats.unwrap_or(3).max(1);
    println!("adapter: {}", engine.describe());
    println!(
        "config | forward ms | backward ms | backward/forward | backward GFLOP/s (2.5x fwd FLOPs) | first forward ms | first backward ms"
    );
    for c in &configs {
        let v: Vec<usize> = c
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--config {c}: expected B,L,H,D[,causal]"))?;
        if !(4..=5).contains(&v.len()) {
            bail!("--config {c}: expected B,L,H,D[,causal]");
        }
        let p = Problem::new(v[0], v[1], v[1], v[2], v[2], v[3]).causal(v.get(4) == Some(&1));
        let mut rng = Rng::new(1);
        let (q, k, vv) = (
            rng.vec(p.q_elems()),
            rng.vec(p.k_elems()),
            rng.vec(p.v_elems()),
        );
        let d_out = rng.vec(p.o_elems());
        let inputs = Inputs::new(TensorRef::F32(&q), TensorRef::F32(&k), TensorRef::F32(&vv));
        let opts = RunOptions {
            algorithm: spotlight::Algorithm::Flash,
            lse: true,
            out_dtype: Some(DType::F32),
            flash_layout: layout,
            rows_per_workgroup,
            ..Default::default()
        };
        let bopts = BackwardOptions {
            layout,
            rows_per_workgroup,
            dq_from_gradients,
            ..Default::default()
        };
        let r = engine.upload(&p, &inputs, &opts)?;
        let dev = engine.device();
        use spotlight::wgpu::util::DeviceExt;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let dout = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("d_out"),
            contents: bytemuck::cast_slice(&d_out),
            usage: storage,
        });
        let grad = |n: usize| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("grad"),
                size: (n * 4) as u64,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let (dq, dk, dv) = (grad(p.q_elems()), grad(p.k_elems()), grad(p.v_elems()));
        let forward = || {
            engine.time(|enc| {
                engine
                    .attention_on_buffers(enc, &p, &r.inputs(), &r.outputs(), &opts)
                    .map(|_| ())
            })
        };
        let record_backward = |enc: &mut wgpu::CommandEncoder| {
            let f = GpuForward {
                out: &r.out,
                out_dtype: r.out_dtype,
                lse: r.lse.as_ref().expect("lse"),
            };
            let g = GpuGradients {
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dbias: None,
            };
            engine.attention_backward_on_buffers(
                enc,
                &p,
                &r.inputs(),
                &f,
                &dout,
                DType::F32,
                &g,
                &bopts,
            )
        };
        let backward = || engine.time(record_backward);
        // The first calls in the process: any kernel not built yet is built here (on a CPU
        // adapter the LLVM compile of each is most of it).
        let start = std::time::Instant::now();
        forward()?;
        let first_forward = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        backward()?;
        let first_backward = start.elapsed().as_secs_f64();
        let median = |mut t: Vec<f64>| {
            t.sort_by(|a, b| a.total_cmp(b));
            t[t.len() / 2]
        };
        let mut tf = Vec::new();
        let mut tb = Vec::new();
        for _ in 0..repeats {
            tf.push(forward()?.seconds);
            tb.push(backward()?.seconds);
        }
        let (f, b) = (median(tf), median(tb));
        // One more backward, profiled per pass: where its time goes.
        let profile = engine.time_passes(record_backward)?;
        println!(
            "{c} | {:.1} | {:.1} | {:.2} | {:.3} | {:.0} | {:.0}",
            f * 1e3,
            b * 1e3,
            b / f,
            2.5 * p.flops() / b / 1e9,
            first_forward * 1e3,
            first_backward * 1e3,
        );
        println!(
            "{c} backward passes={}",
            crate::bench::passes_text(&profile)
        );
    }
    Ok(())
}
