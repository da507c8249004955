//! `spotlight run`: attention on tensors from a safetensors file.
//!
//! Everything is read and checked before any GPU work; the output file appears only when the run
//! succeeded.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::{self, Broadcast, OwnedInputs, Window};
use spotlight::{Algorithm, DType, Engine, Inputs, Layout, Problem, RunOptions, Tensor};

use crate::files::{self, OutTensor, Tensors};

/// Where the problem comes from and its options: shared by `run` and `lens`.
#[derive(Args, Clone)]
pub struct ProblemArgs {
    /// Input safetensors file with tensors q, k, v (and optionally bias, mask, alibi_slopes,
    /// q_seqlens, kv_seqlens).
    pub input: PathBuf,
    /// Read tensors PREFIXq, PREFIXk, ... instead of q, k, ... (`lens` takes several: one report
    /// with a layer each).
    #[arg(long)]
    pub prefix: Vec<String>,
    /// Causal mask, aligned to the bottom-right corner (query i sees key j iff j <= i + Lk - Lq).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT around the diagonal (-1 = unbounded on that side).
    #[arg(long, value_parser = Window::parse, allow_hyphen_values = true)]
    pub window: Option<Window>,
    /// Logit scale (default 1/sqrt(D)).
    #[arg(long, allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Logit soft-capping c·tanh(s/c) (c > 0; 0 = off).
    #[arg(long, allow_hyphen_values = true)]
    pub softcap: Option<f32>,
    /// Layout of q, k, v and out: bshd [B, L, H, D] or bhsd [B, H, L, D].
    #[arg(long, default_value = "bshd")]
    pub layout: Layout,
    /// auto, three-pass, flash, split-k or flash-coop.
    #[arg(long, default_value = "auto")]
    pub algorithm: Algorithm,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    problem: ProblemArgs,
    /// Output safetensors file (tensors out, and lse / probs when asked).
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the log-sum-exp `lse` [B, Hq, Lq].
    #[arg(long)]
    lse: bool,
    /// Also write the attention probabilities `probs` [B, Hq, Lq, Lk] (three-pass path).
    #[arg(long)]
    probs: bool,
    /// Output dtype (default: the dtype of q).
    #[arg(long)]
    out_dtype: Option<DType>,
    /// Fused path: stream at most this many keys per workgroup (the key range is split into
    /// chunks merged exactly by their LSE).
    #[arg(long)]
    max_chunk_keys: Option<u32>,
    /// Compute on the CPU reference (f64 accumulation) instead of the GPU.
    #[arg(long)]
    reference: bool,
    /// Print the device memory the run allocates and the pieces it runs in.
    #[arg(long)]
    stats: bool,
    /// Let the matrix-unit kernel (flash-coop) round f32 inputs to f16.
    #[arg(long)]
    reduced_precision: bool,
}

/// `[B, L, H, D]` of a q/k/v tensor in `layout`.
fn dims(name: &str, shape: &[usize], layout: Layout) -> anyhow::Result<[usize; 4]> {
    let [b, x, y, d] = shape else {
        bail!(
            "tensor {name} has shape {shape:?}; expected 4 dimensions ({})",
            match layout {
                Layout::Bshd => "[batch, seq, heads, dim] for --layout bshd",
                Layout::Bhsd => "[batch, heads, seq, dim] for --layout bhsd",
            }
        );
    };
    Ok(match layout {
        Layout::Bshd => [*b, *x, *y, *d],
        Layout::Bhsd => [*b, *y, *x, *d],
    })
}

/// The broadcast shape of a bias or mask of rank 2 to 4 (`[Lq, Lk]`, `[H|1, Lq, Lk]`,
/// `[B|1, H|1, Lq, Lk]`).
fn broadcast(name: &str, shape: &[usize], lq: usize, lk: usize) -> anyhow::Result<Broadcast> {
    let expected = format!("[B|1, Hq|1, {lq}, {lk}] (leading dims may be omitted)");
    if !(2..=4).contains(&shape.len()) || shape[shape.len() - 2..] != [lq, lk] {
        bail!("tensor {name} has shape {shape:?}; expected {expected}");
    }
    let mut full = [1usize; 4];
    full[4 - shape.len()..].copy_from_slice(shape);
    Ok(Broadcast {
        batch: full[0],
        heads: full[1],
    })
}

fn vector<T>(
    name: &str,
    shape: &[usize],
    data: Vec<T>,
    len: usize,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    if shape != [len] {
        bail!("tensor {name} has shape {shape:?}; expected [{len}] ({what})");
    }
    Ok(data)
}

/// A problem read from a file: its description, its data, and the file's metadata.
pub struct Loaded {
    pub problem: Problem,
    pub data: OwnedInputs,
    pub metadata: std::collections::HashMap<String, String>,
}

impl Loaded {
    pub fn inputs(&self) -> Inputs<'_> {
        self.data.inputs()
    }
}

/// Reads and checks everything before any GPU work.
pub fn load(a: &ProblemArgs) -> anyhow::Result<Loaded> {
    let bytes = files::read(&a.input)?;
    load_bytes(&bytes, a)
}

/// The one `--prefix` of a command that reads one problem ("" when none).
pub fn single_prefix(a: &ProblemArgs) -> anyhow::Result<&str> {
    match a.prefix.as_slice() {
        [] => Ok(""),
        [one] => Ok(one.as_str()),
        many => bail!(
            "--prefix given {} times; this command reads one problem (only `lens` takes several)",
            many.len()
        ),
    }
}

/// [`load`] on the bytes of a file (`a.input` names it in messages).
pub fn load_bytes(bytes: &[u8], a: &ProblemArgs) -> anyhow::Result<Loaded> {
    let t = Tensors::parse(bytes, &a.input, single_prefix(a)?)?;
    let (qn, qv) = t.require("q")?;
    let (kn, kv) = t.require("k")?;
    let (vn, vv) = t.require("v")?;
    let [b, lq, hq, d] = dims(&qn, qv.shape(), a.layout)?;
    let [kb, lk, hkv, kd] = dims(&kn, kv.shape(), a.layout)?;
    let [vb, vl, vh, dv] = dims(&vn, vv.shape(), a.layout)?;
    if kb != b || vb != b {
        bail!("batch sizes differ: {qn} has {b}, {kn} has {kb}, {vn} has {vb}; all must be equal");
    }
    if kd != d {
        bail!("head dims differ: {qn} has D={d}, {kn} has D={kd}; q and k must share D");
    }
    if vl != lk || vh != hkv {
        bail!(
            "{vn} has seq {vl} and {vh} heads but {kn} has seq {lk} and {hkv} heads; k and v must agree"
        );
    }
    let q = files::float_tensor(&qn, &qv)?;
    let k = files::float_tensor(&kn, &kv)?;
    let v = files::float_tensor(&vn, &vv)?;

    let mut p = Problem::new(b, lq, lk, hq, hkv, d)
        .v_head_dim(dv)
        .layout(a.layout);
    p.causal = a.causal;
    p.window = a.window;
    p.scale = a.scale;
    p.softcap = a.softcap;
    let mut bias = None;
    if let Some((name, view)) = t.get("bias") {
        p.bias = Some(broadcast(&name, view.shape(), lq, lk)?);
        bias = Some(files::f32_tensor(&name, &view)?);
    }
    let mut mask = None;
    if let Some((name, view)) = t.get("mask") {
        p.mask = Some(broadcast(&name, view.shape(), lq, lk)?);
        mask = Some(files::mask_tensor(&name, &view)?);
    }
    let mut slopes = None;
    if let Some((name, view)) = t.get("alibi_slopes") {
        let data = files::f32_tensor(&name, &view)?;
        slopes = Some(vector(
            &name,
            view.shape(),
            data,
            hq,
            "one slope per query head",
        )?);
        p.alibi = true;
    }
    let mut lens = [None, None];
    for (n, (key, max)) in [("q_seqlens", lq), ("kv_seqlens", lk)]
        .into_iter()
        .enumerate()
    {
        if let Some((name, view)) = t.get(key) {
            let data = files::i32_tensor(&name, &view)?;
            lens[n] = Some(vector(
                &name,
                view.shape(),
                data,
                b,
                &format!("valid lengths 0..={max} per batch entry"),
            )?);
        }
    }
    p.q_seqlens = lens[0].is_some();
    p.kv_seqlens = lens[1].is_some();
    let [q_seqlens, kv_seqlens] = lens;
    let loaded = Loaded {
        problem: p,
        data: OwnedInputs {
            q,
            k,
            v,
            bias,
            mask,
            alibi_slopes: slopes,
            q_seqlens,
            kv_seqlens,
        },
        metadata: t.metadata(),
    };
    loaded.problem.check_inputs(&loaded.inputs())?;
    Ok(loaded)
}

pub fn main(a: &RunArgs) -> anyhow::Result<()> {
    // The output path is checked before any work (see files::check_output).
    files::check_output(&a.output)?;
    let l = load(&a.problem)?;
    let (p, q, inputs) = (&l.problem, &l.data.q, l.inputs());
    let (b, lq, lk, hq, dv) = (p.batch, p.q_len, p.kv_len, p.q_heads, p.v_head_dim);
    let out_dtype = a.out_dtype.unwrap_or(q.dtype());

    let (out, lse, probs) = if a.reference {
        if a.problem.algorithm != Algorithm::Auto {
            bail!("--reference computes on the CPU; it does not take --algorithm");
        }
        let r = reference::attention(p, &inputs)?;
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        (
            Tensor::from_f32(&f(&r.out), out_dtype),
            a.lse.then(|| f(&r.lse)),
            a.probs.then(|| f(&r.probs)),
        )
    } else {
        let engine = Engine::new()?;
        let opts = RunOptions {
            algorithm: a.problem.algorithm,
            lse: a.lse,
            probs: a.probs,
            out_dtype: Some(out_dtype),
            max_chunk_keys: a.max_chunk_keys,
            allow_reduced_precision: a.reduced_precision,
            flash_layout: None,
            rows_per_workgroup: None,
        };
        if a.stats {
            let est = engine.estimate(p, inputs.dtypes(), &opts)?;
            println!(
                "stats: device bytes {} ({:.1} MiB), pieces {}{}",
                est.device_bytes,
                est.device_bytes as f64 / (1u64 << 20) as f64,
                est.pieces,
                est.split.map_or(String::new(), |s| format!(
                    " (batch groups of {}, key windows of {})",
                    s.batch_group, s.key_window
                ))
            );
        }
        let o = engine
            .attention(p, &inputs, &opts)
            .with_context(|| format!("running attention on {}", engine.describe()))?;
        log::info!("algorithm {}", o.algorithm.name());
        (o.out, o.lse, o.probs)
    };

    let out_shape = match p.layout {
        Layout::Bshd => vec![b, lq, hq, dv],
        Layout::Bhsd => vec![b, hq, lq, dv],
    };
    let mut outs = vec![OutTensor::from_tensor("out", out_shape, &out)];
    if let Some(l) = lse {
        outs.push(OutTensor::from_tensor(
            "lse",
            vec![b, hq, lq],
            &Tensor::F32(l),
        ));
    }
    if let Some(pr) = probs {
        outs.push(OutTensor::from_tensor(
            "probs",
            vec![b, hq, lq, lk],
            &Tensor::F32(pr),
        ));
    }
    files::write_atomic(&a.output, &outs)
}
