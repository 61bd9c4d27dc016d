//! `linear-worker`: the seed's model (`y = W x + b`) served over HTTP by a forkless worker.
//!
//! - `POST /infer` with `{"seed": n}` or `{"x": [f32; in]}` →
//!   `{"y_sum": f64, "y_head": [first 8 of y], "generation": G, "worker": pid}`
//! - `GET /healthz` → `{"status": "ok", "generation": G, "worker": pid, "backend": ..., "batches": ...}`
//! - With the weights on a GPU (`supervisor run --backend cuda`), requests are answered in
//!   dynamic batches by cuBLAS and the kernels of `kernels/` ([`gpu`]):
//!   `linear-worker serve --max-batch 32 --max-wait-us 500`.
//! - `linear-worker make-weights --in I --out O --seed S [PATH]` writes the weights file
//!   (PATH defaults to `$FORKLESS_MODEL`, as set by `[model] make_if_missing`).
#![forbid(unsafe_code)]

mod gpu;
mod lane;
mod model;
mod seeded;
mod service;
#[path = "../weights_file.rs"]
mod weights_file;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "linear-worker", about = "The forkless demo worker: y = W x + b over HTTP")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve under `supervisor run` (the default).
    Serve(ServeArgs),
    /// Write deterministic weights (see model.rs for the generator).
    MakeWeights {
        #[arg(long = "in", default_value_t = 2048)]
        inputs: usize,
        #[arg(long = "out", default_value_t = 8192)]
        outputs: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output file; defaults to $FORKLESS_MODEL.
        path: Option<PathBuf>,
    },
}

/// Dynamic batching on the GPU backend (ignored on the host backend).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct ServeArgs {
    /// At most this many requests share one pass over the weights.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// After a batch's first request, wait at most this many microseconds for more (0: take
    /// only what is queued). Measured on an H100 with 16 connections over 4 workers: 500 µs
    /// doubles the mean batch (2 → 4) and the throughput, and lowers p99 (docs/BENCHMARKS.md).
    #[arg(long, default_value_t = 500)]
    max_wait_us: u64,
    /// cuBLAS workspace in KiB (default: cuBLAS's own, 32 MiB per worker on Hopper).
    #[arg(long)]
    cublas_workspace_kib: Option<usize>,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs { max_batch: 32, max_wait_us: 500, cublas_workspace_kib: None }
    }
}

impl ServeArgs {
    fn batching(self) -> gpu::BatchSettings {
        gpu::BatchSettings {
            max_batch: self.max_batch as usize,
            max_wait: std::time::Duration::from_micros(self.max_wait_us),
            workspace: self.cublas_workspace_kib.map(|kib| kib << 10),
        }
    }
}

fn main() -> ExitCode {
    forkless_worker::logging::init();
    match Cli::parse().command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => service::main(args.batching()),
        Command::MakeWeights { inputs, outputs, seed, path } => make_weights(inputs, outputs, seed, path),
    }
}

fn make_weights(inputs: usize, outputs: usize, seed: u64, path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path.or_else(forkless_worker::model_path) else {
        eprintln!("make-weights: give a PATH or set FORKLESS_MODEL");
        return ExitCode::from(2);
    };
    let (w, b) = seeded::make_weights(inputs, outputs, seed);
    let tensors = [("weight", vec![outputs, inputs], w.as_slice()), ("bias", vec![outputs], b.as_slice())];
    match weights_file::write_f32(&path, &tensors) {
        Ok(()) => {
            tracing::info!("wrote {} (in={inputs}, out={outputs}, seed={seed})", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-weights: {e}");
            ExitCode::FAILURE
        }
    }
}
