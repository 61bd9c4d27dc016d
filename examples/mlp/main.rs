//! `mlp-worker`: the worked example of docs/WORKERS.md, a 2-layer MLP (256 → 1024, ReLU,
//! → 16) served by a forkless worker, written with the SDK alone.
//!
//! - `POST /predict {"x": [256 floats]}` or `{"seed": n}` → `{"y": [16 floats], "generation": G, "worker": pid}`
//! - `mlp-worker make-weights [--seed S] [PATH]`: the weights file (PATH defaults to `$FORKLESS_MODEL`)
//! - `mlp-worker reference --seeds A..B PATH`: the expected `y` per seed, in f64, as JSON (for
//!   `chaos`; computed from the file with the safetensors crate, not with the service's code)
#![forbid(unsafe_code)]

/// The linear demo's generator: SplitMix64, inputs of `{"seed": n}`, the fixed-order dot.
#[path = "../linear/seeded.rs"]
#[allow(dead_code)] // this example uses the generator and `dot`, not the linear layer
mod seeded;
mod service;
#[path = "../weights_file.rs"]
mod weights_file;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sizes: in → hidden → out.
pub const IN: usize = 256;
pub const HIDDEN: usize = 1024;
pub const OUT: usize = 16;

#[derive(Parser)]
#[command(name = "mlp-worker", about = "The forkless MLP example: 256 → 1024 (ReLU) → 16 over HTTP")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve under `supervisor run` (the default).
    Serve,
    /// Write deterministic weights (docs/WORKERS.md: the order of draws).
    MakeWeights {
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output file; defaults to $FORKLESS_MODEL.
        path: Option<PathBuf>,
    },
    /// Print `{"SEED": [16 floats], ...}` for the seeds A..B, from the weights file, in f64.
    Reference {
        #[arg(long, default_value = "0..64")]
        seeds: String,
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    forkless_worker::logging::init();
    let result = match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => return forkless_worker::run(service::serve()),
        Command::MakeWeights { seed, path } => make_weights(seed, path),
        Command::Reference { seeds, path } => reference(&seeds, &path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlp-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One SplitMix64 stream seeded with `seed`: fc1.weight row by row (u/√256), fc1.bias (u/10),
/// fc2.weight row by row (u/√1024), fc2.bias (u/10).
pub fn make_tensors(seed: u64) -> [(&'static str, Vec<usize>, Vec<f32>); 4] {
    let mut rng = seeded::SplitMix64::new(seed);
    let mut draw = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.uniform() * scale).collect() };
    let fc1_weight = draw(HIDDEN * IN, 1.0 / (IN as f32).sqrt());
    let fc1_bias = draw(HIDDEN, 0.1);
    let fc2_weight = draw(OUT * HIDDEN, 1.0 / (HIDDEN as f32).sqrt());
    let fc2_bias = draw(OUT, 0.1);
    [
        ("fc1.weight", vec![HIDDEN, IN], fc1_weight),
        ("fc1.bias", vec![HIDDEN], fc1_bias),
        ("fc2.weight", vec![OUT, HIDDEN], fc2_weight),
        ("fc2.bias", vec![OUT], fc2_bias),
    ]
}

fn make_weights(seed: u64, path: Option<PathBuf>) -> Result<(), String> {
    let path = path.or_else(forkless_worker::model_path).ok_or("give a PATH or set FORKLESS_MODEL")?;
    let tensors = make_tensors(seed);
    let views: Vec<_> = tensors.iter().map(|(name, shape, values)| (*name, shape.clone(), values.as_slice())).collect();
    weights_file::write_f32(&path, &views)?;
    tracing::info!("wrote {} (MLP {IN} → {HIDDEN} → {OUT}, seed {seed})", path.display());
    Ok(())
}

/// The chaos harness's reference: f64 throughout, weights read with the safetensors crate.
fn reference(seeds: &str, path: &std::path::Path) -> Result<(), String> {
    let (from, to) = seeds.split_once("..").ok_or("--seeds A..B")?;
    let (from, to): (u64, u64) = (from.parse().map_err(|_| "--seeds A..B")?, to.parse().map_err(|_| "--seeds A..B")?);
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let tensor = |name: &str| -> Result<Vec<f64>, String> {
        let view = file.tensor(name).map_err(|e| format!("{}: {name}: {e}", path.display()))?;
        Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect())
    };
    let (w1, b1, w2, b2) = (tensor("fc1.weight")?, tensor("fc1.bias")?, tensor("fc2.weight")?, tensor("fc2.bias")?);
    let layer = |w: &[f64], b: &[f64], x: &[f64]| -> Vec<f64> {
        w.chunks_exact(x.len()).zip(b).map(|(row, b)| row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>() + b).collect()
    };
    let answers: serde_json::Map<String, serde_json::Value> = (from..to)
        .map(|seed| {
            let x: Vec<f64> = seeded::input_from_seed(seed, IN).into_iter().map(f64::from).collect();
            let hidden: Vec<f64> = layer(&w1, &b1, &x).into_iter().map(|h| h.max(0.0)).collect();
            (seed.to_string(), serde_json::json!(layer(&w2, &b2, &hidden)))
        })
        .collect();
    println!("{}", serde_json::Value::Object(answers));
    Ok(())
}
