//! `spotlight lens`: where a model looks. Computes the attention statistics on the GPU
//! (entropy, maximum weight, received mass, positional profile) and writes `stats.json` and PNG
//! pictures to an output folder.
//!
//! Files written:
//! - `stats.json`: the problem, the tokens (when the input's metadata has a `tokens` list), and
//!   `heads`: one object per query head with `entropy_mean`, `entropy_min`, `entropy_max` (nats,
//!   over the valid query rows of all batch entries), `normalized_entropy_mean` (entropy / ln Lk_b:
//!   1 = uniform over every key), `max_weight_mean`, `received` (Lk numbers: Σ_i P[i, j] of batch
//!   entry 0), `positional_profile` (`--bins` numbers, see `spotlight_reference::lens`) and
//!   `top_received` (the five keys receiving most, with their tokens);
//! - `map_head{H}.png`: the attention map of head H, batch entry 0 (rows = queries, columns =
//!   keys), block-averaged to at most `--max-cells` cells a side;
//! - `received.png`: received mass per head (rows) and key (columns), batch entry 0;
//! - `profile.png`: the positional profile of every head as lines.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::lens::positional_profile;
use spotlight::{Engine, LensOptions};

use crate::draw;
use spotlight_cli::run::{ProblemArgs, load};

#[derive(Args)]
pub struct LensArgs {
    #[command(flatten)]
    problem: ProblemArgs,
    /// Folder for stats.json and the PNGs (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
    /// Bins of the positional profile.
    #[arg(long, default_value_t = 16)]
    bins: usize,
    /// Heatmaps are block-averaged to at most this many cells a side.
    #[arg(long, default_value_t = 256)]
    max_cells: usize,
    /// Query rows START:END of the maps (default: all rows when Lq·Lk ≤ 4M, else the last 256).
    #[arg(long)]
    rows: Option<String>,
}

fn parse_rows(s: &str, lq: usize) -> anyhow::Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once(':').context("--rows must be START:END")?;
    let (a, b): (usize, usize) = (
        a.trim().parse().context("--rows START")?,
        b.trim().parse().context("--rows END")?,
    );
    if a >= b || b > lq {
        bail!("--rows {a}:{b} must satisfy START < END <= Lq = {lq}");
    }
    Ok(a..b)
}

fn mean_min_max(v: impl Iterator<Item = f32>) -> (f64, f64, f64, usize) {
    let (mut s, mut lo, mut hi, mut n) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY, 0usize);
    for x in v.filter(|x| x.is_finite()) {
        let x = x as f64;
        s += x;
        lo = lo.min(x);
        hi = hi.max(x);
        n += 1;
    }
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN, 0);
    }
    (s / n as f64, lo, hi, n)
}

fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

pub fn main(a: &LensArgs) -> anyhow::Result<()> {
    let l = load(&a.problem)?;
    let p = &l.problem;
    if a.bins == 0 || a.max_cells == 0 {
        bail!("--bins and --max-cells must be at least 1");
    }
    let rows = match &a.rows {
        Some(s) => parse_rows(s, p.q_len)?,
        None if p.q_len * p.kv_len <= 4 << 20 => 0..p.q_len,
        None => p.q_len.saturating_sub(256)..p.q_len,
    };
    let tokens: Option<Vec<String>> = l
        .metadata
        .get("tokens")
        .and_then(|t| serde_json::from_str(t).ok());
    let engine = Engine::new()?;
    let t0 = std::time::Instant::now();
    // Maps one head at a time keep the buffer at rows × Lk.
    let mut maps = Vec::new();
    let mut stats = None;
    for h in 0..p.q_heads {
        let opts = LensOptions {
            algorithm: a.problem.algorithm,
            map: Some((h..h + 1, rows.clone())),
        };
        let s = engine.lens(p, &l.inputs(), &opts)?;
        maps.push(s.map.clone().expect("map was asked for"));
        stats.get_or_insert(s);
    }
    let s = stats.expect("at least one head");
    let gpu_secs = t0.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("cannot create {}", a.out_dir.display()))?;

    let kv_lens: Vec<usize> = (0..p.batch)
        .map(|b| l.lens[1].as_ref().map_or(p.kv_len, |x| x[b] as usize))
        .collect();
    let has: Vec<bool> = s.entropy.iter().map(|x| x.is_finite()).collect();
    let received64: Vec<f64> = s.received.iter().map(|&x| x as f64).collect();
    let profile = positional_profile(p, &received64, &has, &kv_lens, a.bins);
    let mut heads = Vec::new();
    for h in 0..p.q_heads {
        let rows_of = |v: &[f32], b: usize| v[(b * p.q_heads + h) * p.q_len..][..p.q_len].to_vec();
        let ent: Vec<f32> = (0..p.batch).flat_map(|b| rows_of(&s.entropy, b)).collect();
        let norm: Vec<f32> = (0..p.batch)
            .flat_map(|b| {
                let ln_lk = (kv_lens[b].max(2) as f32).ln();
                rows_of(&s.entropy, b).into_iter().map(move |e| e / ln_lk)
            })
            .collect();
        let mw: Vec<f32> = (0..p.batch)
            .flat_map(|b| rows_of(&s.max_weight, b))
            .collect();
        let (e_mean, e_min, e_max, n) = mean_min_max(ent.into_iter());
        let (ne_mean, ..) = mean_min_max(norm.into_iter());
        let (mw_mean, ..) = mean_min_max(mw.into_iter());
        let received = &s.received[h * p.kv_len..(h + 1) * p.kv_len];
        let mut order: Vec<usize> = (0..p.kv_len).collect();
        order.sort_by(|&x, &y| received[y].total_cmp(&received[x]));
        let top: Vec<serde_json::Value> = order
            .iter()
            .take(5)
            .map(|&j| serde_json::json!({"key": j, "token": tokens.as_ref().and_then(|t| t.get(j)), "mass": received[j]}))
            .collect();
        heads.push(serde_json::json!({
            "head": h, "valid_rows": n,
            "entropy_mean": num(e_mean), "entropy_min": num(e_min), "entropy_max": num(e_max),
            "normalized_entropy_mean": num(ne_mean), "max_weight_mean": num(mw_mean),
            "received": received, "positional_profile": profile[h], "top_received": top,
        }));
    }

    let mut images = Vec::new();
    for (h, map) in maps.iter().enumerate() {
        let (v, r, c, f) = draw::downsample(map, rows.len(), p.kv_len, a.max_cells);
        let layer = a.problem.prefix.trim_end_matches(['.', '_', '/']);
        let title = if layer.is_empty() {
            format!("HEAD {h} ATTENTION")
        } else {
            format!("{layer} HEAD {h}")
        };
        let ylab = if f > 1 {
            format!("QUERY {}..{} (/{f})", rows.start, rows.end)
        } else {
            format!("QUERY {}..{}", rows.start, rows.end)
        };
        let xlab = if f > 1 {
            format!("KEY (MEAN OF {f}X{f} BLOCKS)")
        } else {
            "KEY".to_string()
        };
        let name = format!("map_head{h}.png");
        draw::heatmap(&v, r, c, &title, &xlab, &ylab).save(&a.out_dir.join(&name))?;
        images.push(name);
    }
    let rec0 = &s.received[..p.q_heads * p.kv_len];
    let (v, r, c, _) = draw::downsample(rec0, p.q_heads, p.kv_len, a.max_cells);
    draw::heatmap(&v, r, c, "RECEIVED ATTENTION", "KEY", "HEAD")
        .save(&a.out_dir.join("received.png"))?;
    images.push("received.png".into());
    let series: Vec<(String, Vec<f64>)> = profile
        .iter()
        .enumerate()
        .map(|(h, v)| (format!("H{h}"), v.clone()))
        .collect();
    draw::line_chart(
        &series,
        "POSITIONAL PROFILE",
        "KEY POSITION IN CONTEXT",
        "MASS PER ROW",
    )
    .save(&a.out_dir.join("profile.png"))?;
    images.push("profile.png".into());

    let doc = serde_json::json!({
        "adapter": engine.describe(),
        "problem": {"B": p.batch, "Lq": p.q_len, "Lk": p.kv_len, "Hq": p.q_heads, "Hkv": p.kv_heads,
                    "D": p.head_dim, "Dv": p.v_head_dim, "causal": p.causal, "layout": p.layout.name(),
                    "scale": p.effective_scale()},
        "tokens": tokens, "bins": a.bins, "map_rows": [rows.start, rows.end],
        "gpu_seconds": gpu_secs, "heads": heads, "images": images,
    });
    let path = a.out_dir.join("stats.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "lens: {} heads, Lq={} Lk={}, {:.2} s on {}; wrote stats.json and {} images to {}",
        p.q_heads,
        p.q_len,
        p.kv_len,
        gpu_secs,
        engine.describe(),
        images.len(),
        a.out_dir.display()
    );
    Ok(())
}
