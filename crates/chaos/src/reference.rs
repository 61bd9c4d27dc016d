//! The answers the service must give, computed here, independently: the weights are read
//! with the `safetensors` crate straight from the file (not through forkless), and `y = W x + b`
//! is accumulated in f64. An answer that disagrees beyond float rounding is wrong: corrupted
//! memory, a mixed generation, a bad attach.
//!
//! ```no_run
//! let reference = forkless_chaos::reference::Reference::load("weights.safetensors".as_ref(), &[1, 2, 3]).unwrap();
//! assert!(reference.expected(2).is_some());
//! ```

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context as _};

#[path = "../../../examples/linear/seeded.rs"]
#[allow(dead_code)]
pub(crate) mod seeded;

/// Expected `y_sum` and `y_head` per request seed.
#[derive(Debug, Clone)]
pub struct Reference {
    answers: HashMap<u64, Expected>,
}

#[derive(Debug, Clone)]
pub struct Expected {
    pub y_sum: f64,
    pub y_head: Vec<f64>,
}

impl Reference {
    /// Reads `W` ("weight", `[out, in]`) and `b` ("bias") from `path` and computes the answers
    /// for `seeds` (inputs drawn by the demo's documented SplitMix64 generator).
    pub fn load(path: &Path, seeds: &[u64]) -> anyhow::Result<Reference> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read weights file {}", path.display()))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let weight = tensors.tensor("weight").context("the weights file has no tensor \"weight\"")?;
        let bias = tensors.tensor("bias").context("the weights file has no tensor \"bias\"")?;
        let (outputs, inputs) = match weight.shape() {
            [o, i] => (*o, *i),
            shape => bail!("weight has shape {shape:?}, expected [out, in]"),
        };
        if bias.shape() != [outputs]
            || weight.dtype() != safetensors::Dtype::F32
            || bias.dtype() != safetensors::Dtype::F32
        {
            bail!("expected fp32 weight [out, in] and bias [out]");
        }
        let w = f32s(weight.data());
        let b = f32s(bias.data());
        let answers = seeds.iter().map(|&seed| (seed, answer(&w, &b, inputs, seed))).collect();
        Ok(Reference { answers })
    }

    pub fn expected(&self, seed: u64) -> Option<&Expected> {
        self.answers.get(&seed)
    }

    /// Checks one answer; `Err` says what is wrong.
    pub fn check(&self, seed: u64, y_sum: f64, y_head: &[f64]) -> Result<(), String> {
        let expected = self.expected(seed).ok_or_else(|| format!("no reference for seed {seed}"))?;
        let close = |got: f64, want: f64, scale: f64| (got - want).abs() <= 1e-4 * scale.max(1.0);
        let head_scale = expected.y_head.iter().fold(0f64, |m, v| m.max(v.abs()));
        if !close(y_sum, expected.y_sum, expected.y_sum.abs() + head_scale * 100.0) {
            return Err(format!("seed {seed}: y_sum {y_sum} but the reference says {}", expected.y_sum));
        }
        if y_head.len() != expected.y_head.len()
            || y_head.iter().zip(&expected.y_head).any(|(g, w)| !close(*g, *w, head_scale))
        {
            return Err(format!("seed {seed}: y_head {y_head:?} but the reference says {:?}", expected.y_head));
        }
        Ok(())
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn answer(w: &[f32], b: &[f32], inputs: usize, seed: u64) -> Expected {
    let x = seeded::input_from_seed(seed, inputs);
    let y: Vec<f64> = w
        .chunks_exact(inputs)
        .zip(b)
        .map(|(row, bias)| {
            row.iter().zip(&x).map(|(w, x)| f64::from(*w) * f64::from(*x)).sum::<f64>() + f64::from(*bias)
        })
        .collect();
    Expected { y_sum: y.iter().sum(), y_head: y.iter().take(8).copied().collect() }
}
