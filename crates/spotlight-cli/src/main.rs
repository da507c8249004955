//! `spotlight`: GPU attention from the command line.
//!
//! - `spotlight info`: every adapter wgpu sees, the one chosen and why, its capabilities.
//! - `spotlight demo`: a realistic problem on the GPU, checked against the CPU reference.
//! - `spotlight run IN.safetensors -o OUT.safetensors [options]`: attention on tensors from a file.
//! - `spotlight lens IN.safetensors --out-dir DIR [--html REPORT.html]`: attention statistics,
//!   pictures and an interactive report.
//! - `spotlight layer WEIGHTS IN -o OUT --heads H`: an attention layer with projections.
//! - `spotlight grad IN.safetensors -o OUT.safetensors`: gradients dq, dk, dv (+ dbias) given dout.
//! - `spotlight train [--out-dir DIR]`: the training example (associative recall), loss curve and
//!   learned attention map.
//! - `spotlight bench`: validated timings, side by side with `torch_sdpa.py`'s output format.

use spotlight_cli::run;

mod bench;
mod bench_backward;
mod bench_cache;
mod demo;
mod draw;
mod grad;
mod info;
mod layer;
mod lens;
mod report;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "spotlight",
    version,
    about = "GPU attention through wgpu and WGSL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List adapters, the chosen one and why, and its capabilities and limits.
    Info,
    /// Run a realistic problem on the GPU and check it against the CPU reference.
    Demo(demo::DemoArgs),
    /// Run attention on tensors q, k, v (and optional ones) from a safetensors file.
    Run(run::RunArgs),
    /// Validated GPU timings of the kernels (TFLOP/s, GB/s), optionally as JSON.
    Bench(bench::BenchArgs),
    /// Where the model looks: attention statistics on the GPU, stats.json and PNG pictures.
    Lens(lens::LensArgs),
    /// An attention layer (projections, rotary, attention, Wo) on hidden states from a file.
    Layer(layer::LayerArgs),
    /// Gradients dq, dk, dv (and dbias) for tensors q, k, v, dout (and optional ones) from a file.
    Grad(grad::GradArgs),
    /// The training example: one attention layer learns associative recall on the GPU (forward
    /// and backward), with its loss curve and learned map as PNG.
    Train(train::TrainArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info::main(),
        Command::Demo(args) => demo::main(&args),
        Command::Run(args) => run::main(&args),
        Command::Bench(args) => bench::main(&args),
        Command::Lens(args) => lens::main(&args),
        Command::Layer(args) => layer::main(&args),
        Command::Grad(args) => grad::main(&args),
        Command::Train(args) => train::main(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotlight: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
