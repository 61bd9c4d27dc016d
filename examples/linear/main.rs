//! `linear-worker`: the seed's model (`y = W x + b`) served over HTTP by a forkless worker.
//!
//! - `POST /infer` with `{"seed": n}` or `{"x": [f32; in]}` →
//!   `{"y_sum": f64, "y_head": [first 8 of y], "generation": G, "worker": pid}`
//! - `GET /healthz` → `{"status": "ok", "generation": G, "worker": pid}`
//! - `linear-worker make-weights --in I --out O --seed S [PATH]` writes the weights file
//!   (PATH defaults to `$FORKLESS_MODEL`, as set by `[model] make_if_missing`).
#![forbid(unsafe_code)]

mod model;
mod seeded;
mod service;

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
    Serve,
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

fn main() -> ExitCode {
    forkless_supervisor::logging::init_child();
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => service::main(),
        Command::MakeWeights { inputs, outputs, seed, path } => make_weights(inputs, outputs, seed, path),
    }
}

fn make_weights(inputs: usize, outputs: usize, seed: u64, path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path.or_else(|| std::env::var_os(forkless_bus::ENV_MODEL).map(PathBuf::from)) else {
        eprintln!("make-weights: give a PATH or set FORKLESS_MODEL");
        return ExitCode::from(2);
    };
    let (w, b) = seeded::make_weights(inputs, outputs, seed);
    let tensors = [("weight", vec![outputs, inputs], w.as_slice()), ("bias", vec![outputs], b.as_slice())];
    // Write beside the target and rename: an interrupted run never leaves a truncated model.
    let partial = path.with_extension("partial");
    let written = forkless_owner::model_file::write_f32_safetensors(&partial, &tensors).and_then(|()| {
        std::fs::rename(&partial, &path)
            .map_err(|source| forkless_owner::model_file::LoadError::Read { path: path.clone(), source })
    });
    match written {
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
