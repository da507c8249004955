//! `spotlight layer`: an attention layer (projections, rotary embeddings, attention, output
//! projection) with weights from one safetensors file and hidden states from another; and the
//! layer benchmark (`spotlight bench --layer`).
//!
//! Everything is read and checked before any GPU work; the output appears only on success.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::layer::{self as rl, LayerConfig, LayerExtras, LayerWeights};
use spotlight::reference::{Window, compare, random::Rng};
use spotlight::{
    Algorithm, AttentionLayer, DType, Engine, Rope, RopeStyle, RunOptions, Tensor, TensorRef,
};

use spotlight_cli::files::{self, OutTensor, Tensors};

#[derive(Args)]
pub struct LayerArgs {
    /// Weights: PREFIXwq, PREFIXwk, PREFIXwv (or one fused PREFIXwqkv), PREFIXwo, each
    /// [out, in] (y = x·Wᵀ + b), f32/f16/bf16; optional biases PREFIXbq, bk, bv (or bqkv), bo.
    pub weights: PathBuf,
    /// Input: PREFIXx [B, L, hidden] (f32/f16/bf16); optional PREFIXpositions (i32 [B, L] or
    /// [L]), bias, mask, alibi_slopes, q_seqlens, kv_seqlens as for `spotlight run`.
    pub input: PathBuf,
    /// Output safetensors file (tensor `out` [B, L, hidden], f32).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Prefix of the tensor names in both files (e.g. `layer3.`).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Query heads Hq (the head dim is rows of Wq / Hq).
    #[arg(long)]
    pub heads: usize,
    /// Key/value heads Hkv (default Hq).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Rotary embeddings: rotate-half (GPT-NeoX/LLaMA) or interleaved (GPT-J); default none.
    #[arg(long)]
    pub rope: Option<RopeStyle>,
    /// Rotary base theta.
    #[arg(long, default_value_t = 10000.0)]
    pub rope_theta: f64,
    /// Fraction of each head's dims that rotate (partial rotary).
    #[arg(long, default_value_t = 1.0)]
    pub rotary_fraction: f64,
    /// Causal mask (bottom-right aligned).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT (-1 = unbounded on that side).
    #[arg(long, value_parser = Window::parse, allow_hyphen_values = true)]
    pub window: Option<Window>,
    /// Logit scale (default 1/sqrt(D)).
    #[arg(long, allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Logit soft-capping (0 = off).
    #[arg(long, allow_hyphen_values = true)]
    pub softcap: Option<f32>,
    /// Attention algorithm: auto, three-pass, flash, split-k or flash-coop.
    #[arg(long, default_value = "auto")]
    pub algorithm: Algorithm,
    /// Compute on the CPU reference (f64 accumulation) instead of the GPU.
    #[arg(long)]
    pub reference: bool,
}

fn rank2(name: &str, shape: &[usize], what: &str) -> anyhow::Result<[usize; 2]> {
    match shape {
        [a, b] => Ok([*a, *b]),
        _ => bail!("tensor {name} has shape {shape:?}; expected 2 dimensions {what}"),
    }
}

pub fn main(a: &LayerArgs) -> anyhow::Result<()> {
    let wbytes = files::read(&a.weights)?;
    let wt = Tensors::parse(&wbytes, &a.weights, &a.prefix)?;
    let ibytes = files::read(&a.input)?;
    let it = Tensors::parse(&ibytes, &a.input, &a.prefix)?;
    let load = |name: &str| -> anyhow::Result<(Tensor, Vec<usize>)> {
        let (full, v) = wt.require(name)?;
        Ok((files::float_tensor(&full, &v)?, v.shape().to_vec()))
    };
    let opt = |name: &str| -> anyhow::Result<Option<(Tensor, Vec<usize>)>> {
        match wt.get(name) {
            Some((full, v)) => Ok(Some((files::float_tensor(&full, &v)?, v.shape().to_vec()))),
            None => Ok(None),
        }
    };
    let (xn, xv) = it.require("x")?;
    let x = files::float_tensor(&xn, &xv)?;
    let [b, l, hidden] = match xv.shape() {
        [b, l, h] => [*b, *l, *h],
        s => bail!("tensor {xn} has shape {s:?}; expected [batch, seq, hidden]"),
    };
    let (wo, wo_shape) = load("wo")?;
    let [wo_out, q_dim] = rank2("wo", &wo_shape, "[hidden, Hq·D]")?;
    if wo_out != hidden {
        bail!("wo has {wo_out} rows but x has hidden size {hidden}; wo must be [hidden, Hq·D]");
    }
    let hq = a.heads;
    if hq == 0 || !q_dim.is_multiple_of(hq) {
        bail!("--heads {hq} does not divide wo's {q_dim} input columns (Hq·D)");
    }
    let d = q_dim / hq;
    let hkv = a.kv_heads.unwrap_or(hq);
    let mut cfg = LayerConfig::new(hidden, hq, hkv, d);
    if let Some(style) = a.rope {
        cfg = cfg.rope(Rope::with_fraction(
            style,
            a.rope_theta,
            d,
            a.rotary_fraction,
        ));
    }
    cfg.validate()?;
    let fused = wt.get("wqkv").is_some();
    let mut owned: Vec<Tensor> = Vec::new();
    let mut shapes = Vec::new();
    let names: &[&str] = if fused {
        &["wqkv"]
    } else {
        &["wq", "wk", "wv"]
    };
    for n in names {
        let (t, s) = load(n)?;
        owned.push(t);
        shapes.push(((*n).to_string(), s));
    }
    let bias_names: &[&str] = if fused {
        &["bqkv"]
    } else {
        &["bq", "bk", "bv"]
    };
    let mut biases: Vec<Option<Tensor>> = Vec::new();
    for n in bias_names {
        biases.push(opt(n)?.map(|(t, _)| t));
    }
    let bo = opt("bo")?.map(|(t, _)| t);
    for (n, s) in &shapes {
        let rows = match n.as_str() {
            "wqkv" => cfg.qkv_dim(),
            "wq" => cfg.q_dim(),
            _ => cfg.kv_dim(),
        };
        if s.as_slice() != [rows, hidden] {
            bail!(
                "tensor {n} has shape {s:?}; expected [{rows}, {hidden}] for Hq={hq}, Hkv={hkv}, D={d}, hidden={hidden}"
            );
        }
    }
    let w = if fused {
        LayerWeights::fused(
            &cfg,
            owned[0].as_ref(),
            biases[0].as_ref().map(Tensor::as_ref),
            wo.as_ref(),
            bo.as_ref().map(Tensor::as_ref),
        )?
    } else {
        LayerWeights {
            wq: owned[0].as_ref(),
            wk: owned[1].as_ref(),
            wv: owned[2].as_ref(),
            wo: wo.as_ref(),
            bq: biases[0].as_ref().map(Tensor::as_ref),
            bk: biases[1].as_ref().map(Tensor::as_ref),
            bv: biases[2].as_ref().map(Tensor::as_ref),
            bo: bo.as_ref().map(Tensor::as_ref),
        }
    };
    w.check(&cfg)?;
    // The attention options and optional tensors, as `spotlight run` reads them.
    let mut p = cfg.problem(b, l);
    p.causal = a.causal;
    p.window = a.window;
    p.scale = a.scale;
    p.softcap = a.softcap;
    let positions: Option<Vec<u32>> = match it.get("positions") {
        Some((name, v)) => {
            if v.shape() != [b, l] && v.shape() != [l] {
                bail!(
                    "tensor {name} has shape {:?}; expected [{b}, {l}] or [{l}]",
                    v.shape()
                );
            }
            let raw = files::i32_tensor(&name, &v)?;
            if let Some(bad) = raw.iter().find(|&&x| x < 0) {
                bail!("tensor {name} holds position {bad}; positions must be >= 0");
            }
            let raw: Vec<u32> = raw.iter().map(|&x| x as u32).collect();
            Some(if raw.len() == l && b > 1 {
                raw.repeat(b)
            } else {
                raw
            })
        }
        None => None,
    };
    let f = |n: &str| it.get(n);
    let bias = match f("bias") {
        Some((name, v)) => {
            p.bias = Some(broadcast(&name, v.shape(), l, l)?);
            Some(files::f32_tensor(&name, &v)?)
        }
        None => None,
    };
    let mask = match f("mask") {
        Some((name, v)) => {
            p.mask = Some(broadcast(&name, v.shape(), l, l)?);
            Some(files::mask_tensor(&name, &v)?)
        }
        None => None,
    };
    let slopes = match f("alibi_slopes") {
        Some((name, v)) => {
            p.alibi = true;
            Some(files::f32_tensor(&name, &v)?)
        }
        None => None,
    };
    let mut lens = [None, None];
    for (n, key) in ["q_seqlens", "kv_seqlens"].into_iter().enumerate() {
        if let Some((name, v)) = f(key) {
            lens[n] = Some(files::i32_tensor(&name, &v)?);
        }
    }
    p.q_seqlens = lens[0].is_some();
    p.kv_seqlens = lens[1].is_some();
    let extras = LayerExtras {
        bias: bias.as_deref(),
        mask: mask.as_deref(),
        alibi_slopes: slopes.as_deref(),
        q_seqlens: lens[0].as_deref(),
        kv_seqlens: lens[1].as_deref(),
    };
    let out: Vec<f32> = if a.reference {
        if a.algorithm != Algorithm::Auto {
            bail!("--reference computes on the CPU; it does not take --algorithm");
        }
        let r = rl::layer(&cfg, &w, x.as_ref(), &p, positions.as_deref(), &extras)?;
        r.out.iter().map(|&v| v as f32).collect()
    } else {
        let engine = Engine::new()?;
        let layer = AttentionLayer::new(&engine, cfg, &w)
            .with_context(|| format!("uploading the weights to {}", engine.describe()))?;
        let opts = RunOptions {
            algorithm: a.algorithm,
            ..Default::default()
        };
        layer
            .forward(
                &engine,
                x.as_ref(),
                &p,
                positions.as_deref(),
                &extras,
                &opts,
            )
            .with_context(|| format!("running the layer on {}", engine.describe()))?
    };
    files::write_atomic(
        &a.output,
        &[OutTensor::from_tensor(
            "out",
            vec![b, l, hidden],
            &Tensor::F32(out),
        )],
    )
}

/// `spotlight bench --layer`: a decoder-sized layer (hidden 2048, Hq/Hkv 32/8, D = 128, rotary)
/// on lengths 1k..8k on a GPU, shrunk on a CPU adapter (hidden 512, 8/2 heads, D = 64,
/// L = 256, 512): the time of the QKV projection (with its rotary epilogue), of attention and
/// of the output projection, each validated first on sampled rows against the reference.
pub fn bench(lens: Option<&[usize]>, repeats: Option<usize>, causal: bool) -> anyhow::Result<()> {
    let engine = Engine::new()?;
    let cpu = engine.adapter_info().device_type == spotlight::wgpu::DeviceType::Cpu;
    let (hidden, hq, hkv, d) = if cpu {
        (512, 8, 2, 64)
    } else {
        (2048, 32, 8, 128)
    };
    let default_lens: &[usize] = if cpu {
        &[256, 512]
    } else {
        &[1024, 2048, 4096, 8192]
    };
    let lens = lens.unwrap_or(default_lens);
    let repeats = repeats.unwrap_or(if cpu { 3 } else { 10 });
    let cfg = LayerConfig::new(hidden, hq, hkv, d).rope(Rope::new(RopeStyle::RotateHalf, 1e4, d));
    let mut rng = Rng::new(2026);
    let dims = [
        (cfg.q_dim(), hidden),
        (cfg.kv_dim(), hidden),
        (cfg.kv_dim(), hidden),
        (hidden, cfg.q_dim()),
    ];
    let ws: Vec<Tensor> = dims
        .iter()
        .map(|&(o, i)| {
            let s = 1.0 / (i as f32).sqrt();
            let v: Vec<f32> = rng.vec(o * i).iter().map(|x| x * s).collect();
            Tensor::from_f32(&v, DType::F16)
        })
        .collect();
    let w = LayerWeights::new(
        ws[0].as_ref(),
        ws[1].as_ref(),
        ws[2].as_ref(),
        ws[3].as_ref(),
    );
    let layer = AttentionLayer::new(&engine, cfg, &w)?;
    println!(
        "# layer bench on {}: hidden {hidden}, Hq/Hkv {hq}/{hkv}, D {d}, rotary, f16 weights, f32 activations, causal {causal}",
        engine.describe()
    );
    for &l in lens {
        let x = rng.vec(l * hidden);
        let p = cfg.problem(1, l).causal(causal);
        let (t, got) = layer.profile(
            &engine,
            TensorRef::F32(&x),
            &p,
            &RunOptions::default(),
            repeats,
        )?;
        // Validate: the reference on the first and last rows needs every token's K and V, so
        // it runs on the whole (small) problem only on a CPU adapter; on a GPU, rows of a
        // shorter prefix (causal: a prefix's rows are the same rows).
        let check_len = if cpu {
            l
        } else if causal {
            256.min(l)
        } else {
            0
        };
        if check_len > 0 {
            let pc = cfg.problem(1, check_len).causal(causal);
            let xr = &x[..check_len * hidden];
            let want = rl::layer(
                &cfg,
                &w,
                TensorRef::F32(xr),
                &pc,
                None,
                &LayerExtras::default(),
            )?;
            let e = compare::compare(&got[..check_len * hidden], &want.out);
            if !e.within(1e-4) {
                bail!("layer at L={l} does not match the reference: {e}");
            }
        }
        let total = t.qkv + t.attention + t.output;
        let flops_proj = 2.0 * l as f64 * hidden as f64 * (cfg.qkv_dim() + cfg.q_dim()) as f64;
        println!(
            "layer L={l} qkv_ms={:.2} attention_ms={:.2} out_ms={:.2} total_ms={:.2} projections_share={:.0}% proj_gflops={:.2} validated={} timer={:?}",
            t.qkv * 1e3,
            t.attention * 1e3,
            t.output * 1e3,
            total * 1e3,
            100.0 * (t.qkv + t.output) / total,
            flops_proj / (t.qkv + t.output) / 1e9,
            if check_len > 0 {
                format!("rows 0..{check_len}")
            } else {
                "no".into()
            },
            t.source
        );
    }
    Ok(())
}

/// The broadcast shape of a bias or mask (`[Lq, Lk]`, `[H|1, Lq, Lk]`, `[B|1, H|1, Lq, Lk]`).
fn broadcast(
    name: &str,
    shape: &[usize],
    lq: usize,
    lk: usize,
) -> anyhow::Result<spotlight::reference::Broadcast> {
    if !(2..=4).contains(&shape.len()) || shape[shape.len() - 2..] != [lq, lk] {
        bail!(
            "tensor {name} has shape {shape:?}; expected [B|1, Hq|1, {lq}, {lk}] (leading dims may be omitted)"
        );
    }
    let mut full = [1usize; 4];
    full[4 - shape.len()..].copy_from_slice(shape);
    Ok(spotlight::reference::Broadcast {
        batch: full[0],
        heads: full[1],
    })
}
