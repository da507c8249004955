//! `spotlight bench`: validated GPU timings of the attention kernels. (Over 500 lines: the
//! command's options, its grid, the timing loop and both output forms, line and JSON, which must
//! stay in step; the decode-cache and backward benchmarks are `bench_cache.rs` and
//! `bench_backward.rs`.)
//!
//! For each configuration: upload rotating input sets (together larger than a GPU's L2 cache),
//! validate one run against the reference (on sampled rows when the problem is large), warm up,
//! then time repeats with GPU timestamp queries (wall clock where the adapter has none, and the
//! output says so). Prints one line per configuration in the same `key=value` form as
//! `../shared/bench/torch_sdpa.py`, and writes JSON with `--json`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use spotlight::reference::{self, compare, random::Rng};
use spotlight::{
    Algorithm, DType, Engine, FlashLayout, Inputs, Problem, RunOptions, Tensor, TimerSource,
};

#[derive(Args)]
pub struct BenchArgs {
    /// Explicit configurations `B,L,H,D[,causal]` (repeatable); without them, the grid below.
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Grid: tokens per batch B·L (FlashAttention convention; default 16384, 1024 on a CPU adapter).
    #[arg(long)]
    tokens: Option<usize>,
    /// Grid: Hq·D (default 2048, 128 on a CPU adapter).
    #[arg(long)]
    width: Option<usize>,
    /// Grid: sequence lengths (default 512..16384, 256..1024 on a CPU adapter).
    #[arg(long, value_delimiter = ',')]
    lens: Option<Vec<usize>>,
    /// Grid: head dims (default 64,128; 64 on a CPU adapter).
    #[arg(long, value_delimiter = ',')]
    dims: Option<Vec<usize>>,
    /// Grid: causal off/on (default 0,1).
    #[arg(long, value_delimiter = ',')]
    causal: Option<Vec<u8>>,
    /// Storage dtype of Q, K, V and O (default f32; f16 with --decode).
    #[arg(long)]
    dtype: Option<DType>,
    /// auto, three-pass, flash or split-k (default flash; split-k with --decode).
    #[arg(long)]
    algorithm: Option<Algorithm>,
    /// Decoding grid instead: one query row against a KV cache, reported as bytes of K and V
    /// read per second, beside a plain streaming read of the same adapter.
    #[arg(long)]
    decode: bool,
    /// With --decode: decode through the KV cache API (`KvCache` + `Engine::decode`, as an
    /// inference loop does) with pages of N rows, the sequences' pages interleaved in the pool;
    /// 0 = one contiguous page per sequence through the same API. Wall clock per call (query
    /// upload, attention, merge, read-back of O). See bench_cache.rs.
    #[arg(long, value_name = "N")]
    paged: Option<usize>,
    /// A whole attention layer instead (hidden 2048, 32/8 heads, D = 128, rotary; shrunk on a
    /// CPU adapter): time of the projections vs attention. Takes --lens, --repeats (see
    /// `layer.rs`).
    #[arg(long)]
    layer: bool,
    /// Decode grid: cache lengths (default 1k..128k; 512,2048 on a CPU adapter).
    #[arg(long, value_delimiter = ',')]
    cache_lens: Option<Vec<usize>>,
    /// Decode grid: batch sizes (default 1,4,16; 1,2 on a CPU adapter).
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// Decode grid: query heads / key-value heads (default 32/8).
    #[arg(long, default_value = "32/8")]
    heads: String,
    /// Backward pass instead: its FLOP rate and its time beside the forward's (bench_backward.rs).
    #[arg(long)]
    backward: bool,
    /// Fused scalar kernels (forward and, with --backward, backward): tiled or rows, and for the
    /// forward decode (a unit's <= 16 query rows in one workgroup) (default: the adapter decides:
    /// rows on a CPU adapter, decode for split-k elsewhere when it fits, else tiled).
    #[arg(long)]
    flash_layout: Option<FlashLayout>,
    /// Row kernels: rows per workgroup, 8, 16 or 32 (the backward: 8 or 16) (default: by the problem's size).
    #[arg(long)]
    rows_per_workgroup: Option<u32>,
    /// With --backward, row kernels: dQ from the logit gradients the key/value pass stores
    /// (true) or recomputing them (false) (default: stored where they fit, no bias).
    #[arg(long)]
    dq_from_gradients: Option<bool>,
    /// Timed repetitions (the median is reported).
    #[arg(long)]
    repeats: Option<usize>,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Skip validation against the reference.
    #[arg(long)]
    no_validate: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Config {
    batch: usize,
    len: usize,
    heads: usize,
    dim: usize,
    causal: bool,
}

impl Config {
    fn problem(&self) -> Problem {
        Problem::new(
            self.batch, self.len, self.len, self.heads, self.heads, self.dim,
        )
        .causal(self.causal)
    }
}

/// Decode problems: one query row against caches of each length, for each batch size.
fn decode_grid(a: &BenchArgs, software: bool) -> anyhow::Result<Vec<Problem>> {
    let (hq, hkv) = a
        .heads
        .split_once('/')
        .and_then(|(q, k)| Some((q.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
        .with_context(|| format!("--heads '{}': expected HQ/HKV, e.g. 32/8", a.heads))?;
    let lens = a.cache_lens.clone().unwrap_or(if software {
        vec![512, 2048]
    } else {
        vec![1024, 4096, 16384, 32768, 65536, 131072]
    });
    let batches = a
        .batches
        .clone()
        .unwrap_or(if software { vec![1, 2] } else { vec![1, 4, 16] });
    let dims = a.dims.clone().unwrap_or(vec![128]);
    let mut out = Vec::new();
    for &d in &dims {
        for &b in &batches {
            for &l in &lens {
                let p = Problem::new(b, 1, l, hq, hkv, d);
                p.validate()?;
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn parse_config(s: &str) -> anyhow::Result<Config> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("config '{s}': expected B,L,H,D[,causal] as integers"))?;
    match v[..] {
        [batch, len, heads, dim] | [batch, len, heads, dim, 0] => Ok(Config {
            batch,
            len,
            heads,
            dim,
            causal: false,
        }),
        [batch, len, heads, dim, 1] => Ok(Config {
            batch,
            len,
            heads,
            dim,
            causal: true,
        }),
        _ => bail!("config '{s}': expected B,L,H,D[,causal] with causal 0 or 1"),
    }
}

fn grid(a: &BenchArgs, software: bool) -> anyhow::Result<Vec<Config>> {
    if !a.configs.is_empty() {
        return a.configs.iter().map(|s| parse_config(s)).collect();
    }
    let tokens = a.tokens.unwrap_or(if software { 1024 } else { 16384 });
    let width = a.width.unwrap_or(if software { 128 } else { 2048 });
    let lens = a.lens.clone().unwrap_or(if software {
        vec![256, 512, 1024]
    } else {
        vec![512, 1024, 2048, 4096, 8192, 16384]
    });
    let dims = a
        .dims
        .clone()
        .unwrap_or(if software { vec![64] } else { vec![64, 128] });
    let causal = a.causal.clone().unwrap_or(vec![0, 1]);
    let mut out = Vec::new();
    for &dim in &dims {
        for &len in &lens {
            for &c in &causal {
                if !width.is_multiple_of(dim) {
                    bail!("width {width} is not a multiple of head dim {dim}");
                }
                out.push(Config {
                    batch: (tokens / len).max(1),
                    len,
                    heads: width / dim,
                    dim,
                    causal: c != 0,
                });
            }
        }
    }
    Ok(out)
}

/// `x` with three significant digits at any scale (0.000412, 4.12, 4120), for FLOP rates that
/// span CPU adapters and GPUs.
fn sig3(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return format!("{x}");
    }
    let digits = 2 - x.abs().log10().floor() as i32;
    format!("{:.*}", digits.max(0) as usize, x)
}

/// Peak resident memory of this process (Linux), for the memory claims of the fused path.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Checks one run against the reference: every row when the problem is small, else 48 rows
/// spread over batches, heads and positions (first and last rows included). The reference is
/// computed on a second thread while the GPU call runs (on a CPU adapter the first call is
/// mostly one thread compiling the kernel). Also returns the seconds of the GPU call alone
/// (upload, any kernel not built yet, run, read-back).
fn validate(
    engine: &Engine,
    p: &Problem,
    inputs: &Inputs<'_>,
    opts: &RunOptions,
) -> anyhow::Result<(f64, f64)> {
    let whole = p.flops() < 2e8;
    let mut rows = Vec::new();
    if !whole {
        let mut rng = Rng::new(99);
        rows = vec![(0, 0, 0), (p.batch - 1, p.q_heads - 1, p.q_len - 1)];
        while rows.len() < 48 {
            rows.push((
                rng.range(0, p.batch - 1),
                rng.range(0, p.q_heads - 1),
                rng.range(0, p.q_len - 1),
            ));
        }
    }
    let (got, call, want) = std::thread::scope(|scope| {
        let rows = &rows;
        let want = scope.spawn(move || {
            if whole {
                reference::attention(p, inputs).map(Expected::Whole)
            } else {
                reference::attention_rows(p, inputs, rows).map(Expected::Rows)
            }
        });
        let start = std::time::Instant::now();
        let got = engine.attention(p, inputs, &RunOptions { lse: true, ..*opts });
        let call = start.elapsed().as_secs_f64();
        let want = want
            .join()
            .map_err(|_| anyhow::anyhow!("the CPU reference panicked"));
        (got, call, want)
    });
    let got = got?;
    let want = want??;
    let out = got.out.to_f32_vec();
    let lse = got.lse.unwrap_or_default();
    let err = match want {
        Expected::Whole(want) => {
            let e = compare::compare(&out, &want.out);
            let el = compare::compare(&lse, &want.lse);
            if el.non_finite_mismatches > 0 {
                bail!("LSE mismatch: {el}");
            }
            e.rel_frobenius.max(if e.non_finite_mismatches > 0 {
                f64::INFINITY
            } else {
                0.0
            })
        }
        Expected::Rows(want) => {
            let e = compare::compare_computed_rows(p, &out, &lse, &rows, &want)?;
            if e.non_finite_mismatches > 0 {
                let row = rows[e.worst_index / (p.v_head_dim + 1)];
                eprintln!("spotlight: validation mismatch at row (b, h, i) = {row:?} ({e})");
                f64::INFINITY
            } else {
                e.rel_frobenius
            }
        }
    };
    Ok((err, call))
}

/// The reference `validate` compares with: the whole problem, or the sampled rows.
enum Expected {
    Whole(reference::Reference),
    Rows(Vec<reference::Row>),
}

/// One measured configuration.
struct Measured {
    seconds: f64,
    /// Median wall clock per call (record, submit, wait), comparable with peers that time so.
    wall_seconds: f64,
    err: f64,
    sets: usize,
    timer: &'static str,
    algorithm: Algorithm,
    /// One more call, profiled per pass after the timed ones (`Engine::time_passes`).
    profile: spotlight::Profile,
    /// Wall clock of this configuration's first call in the process: with validation the
    /// checked call (upload, build of any kernel not built yet, run, read-back of O), else the
    /// first run on resident buffers (build, run, wait).
    first_call_seconds: f64,
}

/// Uploads rotating input sets, validates the first, warms up, and returns the median time.
fn measure(
    engine: &Engine,
    p: &Problem,
    dtype: DType,
    run: &RunOptions,
    repeats: usize,
    warmup: usize,
    check: bool,
) -> anyhow::Result<Measured> {
    let algorithm = run.algorithm;
    let opts = RunOptions { lse: true, ..*run };
    let set_bytes =
        (p.q_elems() + p.k_elems() + p.v_elems() + p.o_elems()) as u64 * dtype.size() as u64;
    // Rotate sets so that together they pass 128 MiB, more than any GPU's L2 cache.
    let sets = (128u64 << 20).div_ceil(set_bytes.max(1)).clamp(1, 8) as usize;
    let mut rng = Rng::new(1234 + p.kv_len as u64);
    let mut resident = Vec::new();
    let mut err = f64::NAN;
    let mut first_call = None;
    for s in 0..sets {
        let q = Tensor::from_f32(&rng.vec(p.q_elems()), dtype);
        let k = Tensor::from_f32(&rng.vec(p.k_elems()), dtype);
        let v = Tensor::from_f32(&rng.vec(p.v_elems()), dtype);
        let inputs = Inputs::new(q.as_ref(), k.as_ref(), v.as_ref());
        if s == 0 && check {
            let (e, call) = validate(engine, p, &inputs, &opts)?;
            err = e;
            first_call = Some(call);
        }
        resident.push(engine.upload(p, &inputs, &opts)?);
    }
    let mut ran = algorithm;
    let mut run = |r: &spotlight::Resident| {
        engine.time(|enc| {
            ran = engine.attention_on_buffers(enc, p, &r.inputs(), &r.outputs(), &opts)?;
            Ok(())
        })
    };
    for w in 0..warmup {
        let start = std::time::Instant::now();
        run(&resident[w % sets])?;
        first_call.get_or_insert(start.elapsed().as_secs_f64());
    }
    let mut times = Vec::new();
    let mut walls = Vec::new();
    let mut source = TimerSource::WallClock;
    for r in 0..repeats {
        let start = std::time::Instant::now();
        let t = run(&resident[r % sets])?;
        walls.push(start.elapsed().as_secs_f64());
        first_call.get_or_insert(walls[0]);
        times.push(t.seconds);
        source = t.source;
    }
    times.sort_by(f64::total_cmp);
    walls.sort_by(f64::total_cmp);
    let profile = engine.time_passes(|enc| {
        engine.attention_on_buffers(
            enc,
            p,
            &resident[0].inputs(),
            &resident[0].outputs(),
            &opts,
        )?;
        Ok(())
    })?;
    Ok(Measured {
        profile,
        first_call_seconds: first_call.unwrap_or(f64::NAN),
        seconds: times[times.len() / 2],
        wall_seconds: walls[walls.len() / 2],
        err,
        sets,
        timer: if source == TimerSource::GpuTimestamps {
            "gpu"
        } else {
            "wall"
        },
        algorithm: ran,
    })
}

/// One profiled call's GPU time per kernel, e.g. `flash_rows:3.10ms,merge:0.212ms`
/// (`x4` after a kernel that ran four passes), or `untimed` without timestamp queries.
pub(crate) fn passes_text(profile: &spotlight::Profile) -> String {
    if profile.kernels.is_empty() {
        return "untimed".into();
    }
    let mut parts: Vec<String> = profile
        .kernels
        .iter()
        .map(|k| {
            let count = if k.passes > 1 {
                format!("x{}", k.passes)
            } else {
                String::new()
            };
            format!("{}:{}ms{count}", k.kernel, sig3(k.seconds * 1e3))
        })
        .collect();
    if profile.untimed_passes > 0 {
        parts.push(format!("untimed:{}", profile.untimed_passes));
    }
    parts.join(",")
}

pub fn main(a: &BenchArgs) -> anyhow::Result<()> {
    if a.layer {
        return crate::layer::bench(a.lens.as_deref(), a.repeats, true);
    }
    if a.backward {
        return crate::bench_backward::main(
            &a.configs,
            a.repeats,
            a.flash_layout,
            a.rows_per_workgroup,
            a.dq_from_gradients,
        );
    }
    // The JSON path is checked before any GPU work (a directory or a missing parent fails now,
    // not after the run).
    let json_target = a
        .json
        .as_deref()
        .map(spotlight_cli::files::check_output)
        .transpose()?;
    let engine_start = std::time::Instant::now();
    let engine = Engine::new()?;
    let engine_ms = engine_start.elapsed().as_secs_f64() * 1e3;
    let info = engine.adapter_info();
    let software = info.device_type == spotlight::wgpu::DeviceType::Cpu;
    let configs = grid(a, software)?;
    let repeats = a.repeats.unwrap_or(if software { 3 } else { 20 }).max(1);
    println!(
        "spotlight device {} backend={:?} type={:?} engine_ms={}",
        info.name.replace(' ', "_"),
        info.backend,
        info.device_type,
        sig3(engine_ms)
    );
    if !engine.capabilities().timestamp_query {
        println!(
            "spotlight note: no timestamp queries on this adapter; times are wall clock around submit+wait"
        );
    }
    if software {
        println!("spotlight note: software adapter; the default grid is shrunk (see --help)");
    }
    let dtype = a
        .dtype
        .unwrap_or(if a.decode { DType::F16 } else { DType::F32 });
    let algorithm = a.algorithm.unwrap_or(if a.decode {
        Algorithm::SplitK
    } else {
        Algorithm::Flash
    });
    let problems: Vec<Problem> = if a.decode {
        decode_grid(a, software)?
    } else {
        configs.iter().map(Config::problem).collect()
    };
    let stream_gbps = if a.decode {
        let bytes = if software { 64 << 20 } else { 1 << 30 };
        let t = engine.stream_read(bytes, repeats)?;
        let gbps = bytes as f64 / t.seconds / 1e9;
        println!(
            "spotlight stream-read bytes={bytes} ms={:.4} gbps={gbps:.3}",
            t.seconds * 1e3
        );
        Some(gbps)
    } else {
        None
    };
    let budget = if dtype == DType::F32 { 1e-5 } else { 2e-3 };
    let mut records = Vec::new();
    let mut failures = 0;
    if a.paged.is_some() && !a.decode {
        bail!("--paged N measures decoding through the KV cache: add --decode");
    }
    for p in &problems {
        if let Some(page) = a.paged {
            let (ms, err, ran) = crate::bench_cache::measure(
                &engine,
                p,
                dtype,
                page,
                algorithm,
                &crate::bench_cache::Timing {
                    repeats,
                    warmup: a.warmup,
                    check: !a.no_validate,
                    flash_layout: a.flash_layout,
                },
            )?;
            let ok = a.no_validate || err <= budget;
            failures += usize::from(!ok);
            let bytes = (p.k_elems() + p.v_elems()) as f64 * dtype.size() as f64;
            let gbps = bytes / ms / 1e6;
            let page_name = if page == 0 {
                "contiguous".to_string()
            } else {
                page.to_string()
            };
            println!(
                "spotlight decode-cache page={page_name} {} B={} Hq={} Hkv={} Lk={} D={} dtype={} wall_ms={} gbps={} err={err:.2e}{}",
                ran.name(),
                p.batch,
                p.q_heads,
                p.kv_heads,
                p.kv_len,
                p.head_dim,
                dtype.name(),
                sig3(ms),
                sig3(gbps),
                if ok { "" } else { " INVALID" }
            );
            records.push(serde_json::json!({
                "path": "kv-cache", "page_size": page, "algorithm": ran.name(), "B": p.batch,
                "Hq": p.q_heads, "Hkv": p.kv_heads, "Lq": 1, "Lk": p.kv_len, "D": p.head_dim,
                "dtype": dtype.name(), "wall_ms": ms, "gbps": gbps,
                "rel_error": if err.is_finite() { serde_json::json!(err) } else { serde_json::Value::Null },
                "valid": ok, "timer": "wall", "repeats": repeats,
            }));
            continue;
        }
        let r = measure(
            &engine,
            p,
            dtype,
            &RunOptions {
                algorithm,
                flash_layout: a.flash_layout,
                rows_per_workgroup: a.rows_per_workgroup,
                ..Default::default()
            },
            repeats,
            a.warmup,
            !a.no_validate,
        )?;
        let ok = a.no_validate || r.err <= budget;
        if !ok {
            failures += 1;
        }
        // The kernels that ran (auto resolved to the algorithm that ran), in one word.
        let est = engine.estimate(
            p,
            [dtype; 3],
            &RunOptions {
                algorithm: r.algorithm,
                flash_layout: a.flash_layout,
                rows_per_workgroup: a.rows_per_workgroup,
                ..Default::default()
            },
        )?;
        // Decoding is memory-bound: report bytes of K and V read; prefill: Q, K, V and O.
        let elem = dtype.size() as f64;
        let bytes = if a.decode {
            (p.k_elems() + p.v_elems()) as f64 * elem
        } else {
            (p.q_elems() + p.k_elems() + p.v_elems() + p.o_elems()) as f64 * elem
        };
        let secs = r.seconds;
        let (ms, tflops, gbps) = (secs * 1e3, p.flops() / secs / 1e12, bytes / secs / 1e9);
        let wall_ms = r.wall_seconds * 1e3;
        let first_call_ms = r.first_call_seconds * 1e3;
        let gflops = p.flops() / secs / 1e9;
        let gflops_wall = p.flops() / r.wall_seconds / 1e9;
        let of_stream = stream_gbps.map(|s| gbps / s);
        println!(
            "spotlight {} B={} Hq={} Hkv={} Lq={} Lk={} D={} causal={} dtype={} ms={ms:.4} wall_ms={} first_call_ms={} gflops={} gflops_wall={} tflops={tflops:.4} gbps={gbps:.3}{} err={:.2e} sets={} timer={} plan={} pieces={} passes={}{}",
            r.algorithm.name(),
            p.batch,
            p.q_heads,
            p.kv_heads,
            p.q_len,
            p.kv_len,
            p.head_dim,
            p.causal as u8,
            dtype.name(),
            sig3(wall_ms),
            sig3(first_call_ms),
            sig3(gflops),
            sig3(gflops_wall),
            of_stream.map_or(String::new(), |f| format!(" of_stream={f:.3}")),
            r.err,
            r.sets,
            r.timer,
            est.plan,
            est.pieces,
            passes_text(&r.profile),
            if ok { "" } else { " INVALID" }
        );
        records.push(serde_json::json!({
            "algorithm": r.algorithm.name(), "B": p.batch, "Hq": p.q_heads, "Hkv": p.kv_heads,
            "Lq": p.q_len, "Lk": p.kv_len, "D": p.head_dim, "causal": p.causal,
            "dtype": dtype.name(), "ms": ms, "wall_ms": wall_ms, "first_call_ms": first_call_ms,
            "gflops": gflops,
            "gflops_wall": gflops_wall, "tflops": tflops, "gbps": gbps,
            "fraction_of_stream_read": of_stream,
            "rel_error": if r.err.is_finite() { serde_json::json!(r.err) } else { serde_json::Value::Null },
            "valid": ok, "timer": r.timer, "repeats": repeats, "sets": r.sets,
            "plan": est.plan, "pieces": est.pieces,
            "passes": r.profile.kernels.iter().map(|k| serde_json::json!({
                "kernel": k.kernel, "ms": k.seconds * 1e3, "count": k.passes,
            })).collect::<Vec<_>>(),
            "untimed_passes": r.profile.untimed_passes,
        }));
    }
    let peak = peak_rss_bytes();
    if let Some(b) = peak {
        println!("spotlight peak_rss_mib={:.1}", b as f64 / (1 << 20) as f64);
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "adapter": info.name, "backend": format!("{:?}", info.backend),
            "driver": format!("{} {}", info.driver, info.driver_info),
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "peak_rss_bytes": peak, "stream_read_gbps": stream_gbps, "engine_ms": engine_ms,
            "results": records,
        });
        spotlight_cli::files::write_bytes_atomic(
            json_target.as_ref().expect("checked with --json"),
            serde_json::to_string_pretty(&doc)?.as_bytes(),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failures > 0 {
        bail!("{failures} configuration(s) failed validation (budget {budget:.0e} relative)");
    }
    Ok(())
}
