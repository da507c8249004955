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
//!
//! `stats.json` also records `lens_passes`: the GPU passes its numbers took (one: the statistics
//! and the maps of every head come from one [`Engine::lens`] call). With `--html`, one
//! self-contained page for every `--prefix` (see [`crate::report`]).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::lens::positional_profile;
use spotlight::{Engine, LensOptions, lens_passes};

use crate::draw;
use crate::report::{self, HeadReport, LayerReport};
use spotlight_cli::run::{Loaded, ProblemArgs, load};

#[derive(Args)]
pub struct LensArgs {
    #[command(flatten)]
    problem: ProblemArgs,
    /// Folder for stats.json and the PNGs (created if missing); with several `--prefix` values,
    /// one subfolder per prefix.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also write one self-contained HTML report (every prefix a layer of it).
    #[arg(long)]
    html: Option<PathBuf>,
    /// In the HTML report, maps are block-averaged to at most this many cells a side.
    #[arg(long, default_value_t = 160)]
    html_cells: usize,
    /// Bins of the positional profile.
    #[arg(long, default_value_t = 16)]
    bins: usize,
    /// Heatmaps are block-averaged to at most this many cells a side.
    #[arg(long, default_value_t = 256)]
    max_cells: usize,
    /// Query rows START:END of the maps (default: all rows when Hq·Lq·Lk ≤ 4M, else as many
    /// of the last rows as keep Hq·rows·Lk ≤ 4M).
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
    if a.bins == 0 || a.max_cells == 0 || a.html_cells == 0 {
        bail!("--bins, --max-cells and --html-cells must be at least 1");
    }
    if a.out_dir.is_none() && a.html.is_none() {
        bail!("say where to write: --out-dir DIR (stats.json and PNGs) and/or --html REPORT.html");
    }
    let prefixes: Vec<String> = if a.problem.prefix.is_empty() {
        vec![String::new()]
    } else {
        a.problem.prefix.clone()
    };
    // Everything is read and checked before any GPU work.
    let mut loaded = Vec::new();
    for pre in &prefixes {
        let mut one = a.problem.clone();
        one.prefix = vec![pre.clone()];
        loaded.push(load(&one).with_context(|| format!("--prefix '{pre}'"))?);
    }
    let engine = Engine::new()?;
    let mut layers = Vec::new();
    let mut tokens_all = None;
    for (pre, l) in prefixes.iter().zip(&loaded) {
        let dir = a.out_dir.as_ref().map(|d| {
            if prefixes.len() > 1 {
                d.join(layer_name(pre))
            } else {
                d.clone()
            }
        });
        let (layer, tokens) = one_layer(a, pre, l, &engine, dir.as_deref())?;
        tokens_all = tokens_all.or(tokens);
        layers.push(layer);
    }
    if let Some(path) = &a.html {
        let title = a
            .problem
            .input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let page = report::html(&title, tokens_all.as_deref(), &layers, a.html_cells);
        report::write(path, &page)?;
        println!(
            "lens: wrote {} ({} layer(s), {} bytes)",
            path.display(),
            layers.len(),
            page.len()
        );
    }
    Ok(())
}

fn layer_name(prefix: &str) -> String {
    prefix.trim_end_matches(['.', '_', '/']).to_string()
}

/// The lens of one prefix: one pass on the GPU for the statistics and the maps of every head;
/// stats.json and PNGs into `dir` when given; the numbers for the HTML report.
fn one_layer(
    a: &LensArgs,
    prefix: &str,
    l: &Loaded,
    engine: &Engine,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<(LayerReport, Option<Vec<String>>)> {
    let p = &l.problem;
    const CELLS: usize = 4 << 20;
    let per_row = p.q_heads.saturating_mul(p.kv_len).max(1);
    let rows = match &a.rows {
        Some(s) => parse_rows(s, p.q_len)?,
        None if p.q_len.saturating_mul(per_row) <= CELLS => 0..p.q_len,
        None => p.q_len.saturating_sub((CELLS / per_row).max(1))..p.q_len,
    };
    let tokens: Option<Vec<String>> = l
        .metadata
        .get("tokens")
        .and_then(|t| serde_json::from_str(t).ok());
    let t0 = std::time::Instant::now();
    let passes_before = lens_passes();
    // One pass: the statistics and the maps of every head.
    let opts = LensOptions {
        algorithm: a.problem.algorithm,
        map: Some((0..p.q_heads, rows.clone())),
    };
    let s = engine.lens(p, &l.inputs(), &opts)?;
    let passes = lens_passes() - passes_before;
    let all_maps = s.map.clone().expect("maps were asked for");
    let map_len = rows.len() * p.kv_len;
    let maps: Vec<&[f32]> = (0..p.q_heads)
        .map(|h| &all_maps[h * map_len..(h + 1) * map_len])
        .collect();
    let gpu_secs = t0.elapsed().as_secs_f64();

    let kv_lens: Vec<usize> = (0..p.batch)
        .map(|b| {
            l.data
                .kv_seqlens
                .as_ref()
                .map_or(p.kv_len, |x| x[b] as usize)
        })
        .collect();
    let has: Vec<bool> = s.entropy.iter().map(|x| x.is_finite()).collect();
    let received64: Vec<f64> = s.received.iter().map(|&x| x as f64).collect();
    let profile = positional_profile(p, &received64, &has, &kv_lens, a.bins);
    let mut heads = Vec::new();
    let mut head_reports = Vec::new();
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
        let valid0 = rows_of(&s.entropy, 0)
            .iter()
            .filter(|x| x.is_finite())
            .count();
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
        let [prev, same, next] = report::diagonal_means(maps[h], &rows, p.q_len, p.kv_len);
        head_reports.push(HeadReport {
            head: h,
            normalized_entropy: ne_mean,
            entropy: e_mean,
            max_weight: mw_mean,
            first: received
                .first()
                .map_or(f64::NAN, |&x| x as f64 / valid0.max(1) as f64),
            prev,
            same,
            next,
            received: received.iter().map(|&x| x as f64).collect(),
            profile: profile[h].clone(),
            map: maps[h].to_vec(),
        });
    }
    let layer = LayerReport {
        name: layer_name(prefix),
        lq: p.q_len,
        lk: p.kv_len,
        rows: rows.clone(),
        heads: head_reports,
    };
    let Some(out_dir) = dir else {
        return Ok((layer, tokens));
    };
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let mut images = Vec::new();
    for (h, map) in maps.iter().enumerate() {
        let (v, r, c, f) = draw::downsample(map, rows.len(), p.kv_len, a.max_cells);
        let name = layer_name(prefix);
        let title = if name.is_empty() {
            format!("HEAD {h} ATTENTION")
        } else {
            format!("{name} HEAD {h}")
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
        draw::heatmap(&v, r, c, &title, &xlab, &ylab).save(&out_dir.join(&name))?;
        images.push(name);
    }
    let rec0 = &s.received[..p.q_heads * p.kv_len];
    let (v, r, c, _) = draw::downsample(rec0, p.q_heads, p.kv_len, a.max_cells);
    draw::heatmap(&v, r, c, "RECEIVED ATTENTION", "KEY", "HEAD")
        .save(&out_dir.join("received.png"))?;
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
    .save(&out_dir.join("profile.png"))?;
    images.push("profile.png".into());

    let doc = serde_json::json!({
        "adapter": engine.describe(),
        "problem": {"B": p.batch, "Lq": p.q_len, "Lk": p.kv_len, "Hq": p.q_heads, "Hkv": p.kv_heads,
                    "D": p.head_dim, "Dv": p.v_head_dim, "causal": p.causal, "layout": p.layout.name(),
                    "scale": p.effective_scale()},
        "prefix": prefix, "tokens": tokens, "bins": a.bins, "map_rows": [rows.start, rows.end],
        "gpu_seconds": gpu_secs, "lens_passes": passes, "heads": heads, "images": images,
    });
    let path = out_dir.join("stats.json");
    spotlight_cli::files::write_file_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    println!(
        "lens: {} heads, Lq={} Lk={}, {:.2} s ({passes} pass) on {}; wrote stats.json and {} images to {}",
        p.q_heads,
        p.q_len,
        p.kv_len,
        gpu_secs,
        engine.describe(),
        images.len(),
        out_dir.display()
    );
    Ok((layer, tokens))
}
