//! `spotlight grad`: gradients of attention for tensors from a safetensors file.
//!
//! Reads what `run` reads plus `dout` (`∂L/∂O`, the shape of the output), runs the forward (with
//! its LSE) and the backward, and writes `dq`, `dk`, `dv` (f32, in the layouts of q, k, v) and
//! `dbias` (the shape of the bias) when the file has a bias. Everything is checked before GPU work
//! and the output is written atomically.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference;
use spotlight::{Algorithm, BackwardOptions, DType, Engine, Layout, RunOptions, Tensor};
use spotlight_cli::files::{self, OutTensor, Tensors};
use spotlight_cli::run::{self, ProblemArgs};

#[derive(Args)]
pub struct GradArgs {
    #[command(flatten)]
    problem: ProblemArgs,
    /// Output safetensors file (tensors dq, dk, dv, and dbias with a bias).
    #[arg(short, long)]
    output: PathBuf,
    /// Compute the exact gradients on the CPU reference (f64) instead of the GPU.
    #[arg(long)]
    reference: bool,
    /// Split the backward's loops into dispatches of at most this many tiles.
    #[arg(long)]
    max_tiles_per_dispatch: Option<u32>,
}

pub fn main(a: &GradArgs) -> anyhow::Result<()> {
    let bytes = files::read(&a.problem.input)?;
    let l = run::load_bytes(&bytes, &a.problem)?;
    let p = &l.problem;
    let t = Tensors::parse(
        &bytes,
        &a.problem.input,
        crate::run::single_prefix(&a.problem)?,
    )?;
    let (name, view) = t.require("dout")?;
    let want = match p.layout {
        Layout::Bshd => vec![p.batch, p.q_len, p.q_heads, p.v_head_dim],
        Layout::Bhsd => vec![p.batch, p.q_heads, p.q_len, p.v_head_dim],
    };
    if view.shape() != want.as_slice() {
        bail!(
            "tensor {name} has shape {:?}; expected {want:?} (the shape of the attention output)",
            view.shape()
        );
    }
    let d_out = files::float_tensor(&name, &view)?;
    let inputs = l.inputs();
    let (dq, dk, dv, dbias) = if a.reference {
        if a.problem.algorithm != Algorithm::Auto {
            bail!("--reference computes on the CPU; it does not take --algorithm");
        }
        let fwd = reference::attention(p, &inputs)?;
        let g = reference::attention_backward(p, &inputs, &fwd, d_out.as_ref())?;
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        (f(&g.dq), f(&g.dk), f(&g.dv), g.dbias.as_deref().map(f))
    } else {
        let engine = Engine::new()?;
        let opts = RunOptions {
            algorithm: a.problem.algorithm,
            lse: true,
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        let fwd = engine
            .attention(p, &inputs, &opts)
            .with_context(|| format!("running attention on {}", engine.describe()))?;
        let bopts = BackwardOptions {
            max_tiles_per_dispatch: a.max_tiles_per_dispatch,
            layout: None,
            rows_per_workgroup: None,
            dq_from_gradients: None,
        };
        let g = engine
            .attention_backward(p, &inputs, &fwd, d_out.as_ref(), &bopts)
            .with_context(|| format!("running the backward on {}", engine.describe()))?;
        (g.dq, g.dk, g.dv, g.dbias)
    };
    let shape = |heads: usize, len: usize, dim: usize| match p.layout {
        Layout::Bshd => vec![p.batch, len, heads, dim],
        Layout::Bhsd => vec![p.batch, heads, len, dim],
    };
    let mut outs = vec![
        OutTensor::from_tensor(
            "dq",
            shape(p.q_heads, p.q_len, p.head_dim),
            &Tensor::F32(dq),
        ),
        OutTensor::from_tensor(
            "dk",
            shape(p.kv_heads, p.kv_len, p.head_dim),
            &Tensor::F32(dk),
        ),
        OutTensor::from_tensor(
            "dv",
            shape(p.kv_heads, p.kv_len, p.v_head_dim),
            &Tensor::F32(dv),
        ),
    ];
    if let (Some(db), Some((_, view))) = (dbias, t.get("bias")) {
        outs.push(OutTensor::from_tensor(
            "dbias",
            view.shape().to_vec(),
            &Tensor::F32(db),
        ));
    }
    files::write_atomic(&a.output, &outs)
}
