//! `spotlight train`: the training example. One attention layer learns associative recall with
//! Spotlight's forward and backward passes on the GPU.
//!
//! Task: each sequence holds `pairs` (key symbol, value symbol) pairs; its query rows ask for the
//! keys again, in another order, and the right output is the value paired with the asked key.
//! Symbols have fixed random unit embeddings (dimension `dim`). The model is
//! `O = softmax(scale · (Xq·Wq)·(Xk·Wk)ᵀ) · V` with V the value embeddings, so the only way to
//! answer is to attend from each query to the position holding its key: the learned map is
//! exactly that permutation. Trainable: `Wq`, `Wk` (`dim × dim`). Loss: mean squared error of O.
//! Each step: forward (with LSE) and backward on the GPU, `dWq = Xqᵀ·dQ` and `dWk = Xkᵀ·dK` on the
//! CPU (small), Adam. The first step's gradients are checked against the CPU reference's (f64)
//! before training starts, so a wrong backward cannot train silently.
//!
//! Writes, with `--out-dir`: `loss.png` (loss and recall accuracy per step), `map-before.png`
//! and `map-after.png` (the attention map of one held-out sequence: rows are queries, columns key
//! positions; the correct position of each row is where the map should light up) and
//! `train.json` (the curves and final numbers).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::random::Rng;
use spotlight::reference::{self, compare};
use spotlight::reference::{Inputs, Problem, TensorRef};
use spotlight::{BackwardOptions, Engine, RunOptions};

use crate::draw;

#[derive(Args)]
pub struct TrainArgs {
    /// Directory for loss.png, map-before.png, map-after.png and train.json (created if missing).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// (key, value) pairs per sequence (= query rows and key positions).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Embedding and head dimension.
    #[arg(long, default_value_t = 16)]
    dim: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Random seed (data and initial weights).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Symbols in each vocabulary (keys and values).
const SYMBOLS: usize = 32;

struct Batch {
    /// `[B, L, E]` embeddings of the asked keys (query rows).
    xq: Vec<f32>,
    /// `[B, L, E]` embeddings of the keys at each position.
    xk: Vec<f32>,
    /// `[B, L, E]` value embeddings at each position (V).
    v: Vec<f32>,
    /// `[B, L, E]` the right output of each query row.
    target: Vec<f32>,
    /// `[B, L]` the position holding each query's key.
    answer: Vec<usize>,
}

fn embeddings(rng: &mut Rng, e: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; SYMBOLS * e];
    for row in t.chunks_mut(e) {
        for x in row.iter_mut() {
            // Sum of uniforms: close enough to Gaussian for random directions.
            *x = (0..4).map(|_| rng.uniform(-1.0, 1.0)).sum();
        }
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        row.iter_mut().for_each(|x| *x /= n);
    }
    t
}

fn batch(rng: &mut Rng, keys: &[f32], vals: &[f32], b: usize, l: usize, e: usize) -> Batch {
    let mut out = Batch {
        xq: vec![0.0; b * l * e],
        xk: vec![0.0; b * l * e],
        v: vec![0.0; b * l * e],
        target: vec![0.0; b * l * e],
        answer: vec![0; b * l],
    };
    for s in 0..b {
        // l distinct key symbols at the positions, each with a random value symbol.
        let mut syms: Vec<usize> = (0..SYMBOLS).collect();
        for i in 0..l {
            let j = rng.range(i, SYMBOLS - 1);
            syms.swap(i, j);
        }
        let valsym: Vec<usize> = (0..l).map(|_| rng.range(0, SYMBOLS - 1)).collect();
        // Queries ask for the positions in a random order.
        let mut order: Vec<usize> = (0..l).collect();
        for i in 0..l {
            let j = rng.range(i, l - 1);
            order.swap(i, j);
        }
        for pos in 0..l {
            let at = (s * l + pos) * e;
            out.xk[at..at + e].copy_from_slice(&keys[syms[pos] * e..][..e]);
            out.v[at..at + e].copy_from_slice(&vals[valsym[pos] * e..][..e]);
        }
        for (row, &pos) in order.iter().enumerate() {
            let at = (s * l + row) * e;
            out.xq[at..at + e].copy_from_slice(&keys[syms[pos] * e..][..e]);
            out.target[at..at + e].copy_from_slice(&vals[valsym[pos] * e..][..e]);
            out.answer[s * l + row] = pos;
        }
    }
    out
}

/// `X·W` for `X` of `rows × e` and `W` of `e × d`.
fn matmul(x: &[f32], w: &[f32], rows: usize, e: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * d];
    for r in 0..rows {
        for k in 0..e {
            let a = x[r * e + k];
            for c in 0..d {
                y[r * d + c] += a * w[k * d + c];
            }
        }
    }
    y
}

/// `Xᵀ·G` for `X` of `rows × e` and `G` of `rows × d`.
fn matmul_tn(x: &[f32], g: &[f32], rows: usize, e: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; e * d];
    for r in 0..rows {
        for k in 0..e {
            let a = x[r * e + k];
            for c in 0..d {
                y[k * d + c] += a * g[r * d + c];
            }
        }
    }
    y
}

struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32) {
        let (b1, b2) = (0.9f32, 0.999f32);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for i in 0..w.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            w[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

/// One step's numbers on a batch: loss, recall accuracy (argmax of P at the right position),
/// dWq, dWk, and the attention map of sequence 0.
struct StepResult {
    loss: f64,
    accuracy: f64,
    dwq: Vec<f32>,
    dwk: Vec<f32>,
    map: Vec<f32>,
}

fn step(
    engine: &Engine,
    p: &Problem,
    data: &Batch,
    wq: &[f32],
    wk: &[f32],
    check: bool,
) -> anyhow::Result<StepResult> {
    let (b, l, e) = (p.batch, p.q_len, p.head_dim);
    let rows = b * l;
    let q = matmul(&data.xq, wq, rows, e, e);
    let k = matmul(&data.xk, wk, rows, e, e);
    let inputs = Inputs::new(
        TensorRef::F32(&q),
        TensorRef::F32(&k),
        TensorRef::F32(&data.v),
    );
    let fwd = engine.attention(
        p,
        &inputs,
        &RunOptions {
            lse: true,
            ..Default::default()
        },
    )?;
    let o = fwd.out.to_f32_vec();
    let n = (rows * e) as f64;
    let mut loss = 0.0f64;
    let d_out: Vec<f32> = o
        .iter()
        .zip(&data.target)
        .map(|(&o, &t)| {
            let d = (o - t) as f64;
            loss += d * d;
            (2.0 * d / n) as f32
        })
        .collect();
    loss /= n;
    let g = engine.attention_backward(
        p,
        &inputs,
        &fwd,
        TensorRef::F32(&d_out),
        &BackwardOptions::default(),
    )?;
    if check {
        let want = reference::attention(p, &inputs)?;
        let rg = reference::attention_backward(p, &inputs, &want, TensorRef::F32(&d_out))?;
        for (what, got, want) in [("dq", &g.dq, &rg.dq), ("dk", &g.dk, &rg.dk)] {
            let err = compare::compare(got, want);
            if !err.within(1e-4) {
                bail!("the GPU's {what} differs from the reference's: {err}");
            }
        }
    }
    // P from the LSE (what the forward normalised with), for the accuracy and the map.
    let lse = fwd.lse.as_ref().context("the forward returned no LSE")?;
    let scale = p.effective_scale();
    let mut correct = 0usize;
    let mut map = vec![0.0f32; l * l];
    for s in 0..b {
        for i in 0..l {
            let qi = &q[(s * l + i) * e..][..e];
            let mut best = (f32::NEG_INFINITY, 0usize);
            for j in 0..l {
                let kj = &k[(s * l + j) * e..][..e];
                let logit = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
                let pij = (logit - lse[s * l + i]).exp();
                if s == 0 {
                    map[i * l + j] = pij;
                }
                if logit > best.0 {
                    best = (logit, j);
                }
            }
            correct += (best.1 == data.answer[s * l + i]) as usize;
        }
    }
    Ok(StepResult {
        loss,
        accuracy: correct as f64 / rows as f64,
        dwq: matmul_tn(&data.xq, &g.dq, rows, e, e),
        dwk: matmul_tn(&data.xk, &g.dk, rows, e, e),
        map,
    })
}

pub fn main(a: &TrainArgs) -> anyhow::Result<()> {
    if a.steps == 0 || a.batch == 0 || a.pairs < 2 || a.dim == 0 {
        bail!(
            "--steps, --batch and --dim must be at least 1 and --pairs at least 2 (got {}, {}, {}, {})",
            a.steps,
            a.batch,
            a.dim,
            a.pairs
        );
    }
    if a.pairs > SYMBOLS {
        bail!("--pairs {} exceeds the {SYMBOLS} key symbols", a.pairs);
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be a positive finite number (got {})", a.lr);
    }
    if let Some(dir) = &a.out_dir
        && dir.exists()
        && !dir.is_dir()
    {
        bail!("--out-dir {} exists and is not a directory", dir.display());
    }
    let engine = Engine::new()?;
    let (b, l, e) = (a.batch, a.pairs, a.dim);
    let p = Problem::new(b, l, l, 1, 1, e);
    let mut rng = Rng::new(a.seed);
    let keys = embeddings(&mut rng, e);
    let vals = embeddings(&mut rng, e);
    let mut wq: Vec<f32> = (0..e * e).map(|_| rng.uniform(-0.1, 0.1)).collect();
    let mut wk: Vec<f32> = (0..e * e).map(|_| rng.uniform(-0.1, 0.1)).collect();
    let held_out = batch(&mut Rng::new(a.seed ^ 0xE7A1), &keys, &vals, b, l, e);
    let before = step(&engine, &p, &held_out, &wq, &wk, true)?;
    let (mut opt_q, mut opt_k) = (Adam::new(e * e), Adam::new(e * e));
    let mut losses = Vec::with_capacity(a.steps);
    let mut accs = Vec::with_capacity(a.steps);
    let t0 = std::time::Instant::now();
    for s in 0..a.steps {
        let data = batch(&mut rng, &keys, &vals, b, l, e);
        let r = step(&engine, &p, &data, &wq, &wk, false)?;
        if !r.loss.is_finite() {
            bail!("the loss became {} at step {s}", r.loss);
        }
        opt_q.step(&mut wq, &r.dwq, a.lr);
        opt_k.step(&mut wk, &r.dwk, a.lr);
        losses.push(r.loss);
        accs.push(r.accuracy);
        if s % 50 == 0 || s + 1 == a.steps {
            println!(
                "spotlight train step={s} loss={:.5} recall={:.3}",
                r.loss, r.accuracy
            );
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = step(&engine, &p, &held_out, &wq, &wk, true)?;
    println!(
        "spotlight train held-out: loss {:.5} -> {:.5}, recall {:.3} -> {:.3}; {} steps in {secs:.1} s ({})",
        before.loss,
        after.loss,
        before.accuracy,
        after.accuracy,
        a.steps,
        engine.adapter_info().name
    );
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let n = losses.len().max(1) as f64;
        let first = losses[0].max(1e-12);
        draw::line_chart(
            &[
                (
                    "loss (rel.)".to_string(),
                    losses.iter().map(|x| x / first).collect(),
                ),
                ("recall".to_string(), accs.clone()),
            ],
            &format!("Associative recall, {} steps", a.steps),
            "step",
            "",
        )
        .save(&dir.join("loss.png"))?;
        for (name, r, title) in [
            ("map-before.png", &before, "Attention before training"),
            ("map-after.png", &after, "Attention after training"),
        ] {
            draw::heatmap(&r.map, l, l, title, "key position", "query row")
                .save(&dir.join(name))?;
        }
        let json = serde_json::json!({
            "steps": a.steps,
            "batch": b,
            "pairs": l,
            "dim": e,
            "lr": a.lr,
            "seed": a.seed,
            "seconds": secs,
            "adapter": engine.adapter_info().name,
            "loss": losses,
            "recall": accs,
            "held_out": {
                "loss_before": before.loss,
                "loss_after": after.loss,
                "recall_before": before.accuracy,
                "recall_after": after.accuracy,
                "answers": held_out.answer[..l].to_vec(),
            },
            "steps_per_second": n / secs.max(1e-9),
        });
        let path = dir.join("train.json");
        spotlight_cli::files::write_file_atomic(&path, &serde_json::to_vec_pretty(&json)?)?;
        println!(
            "spotlight train wrote loss.png, map-before.png, map-after.png, train.json to {}",
            dir.display()
        );
    }
    Ok(())
}
