//! The answers the service must give. For the linear demo they are computed here,
//! independently: the weights are read with the `safetensors` crate straight from the file (not
//! through forkless), and `y = W x + b` is accumulated in f64. Any other service declares its
//! check in `[check]` ([`crate::check`]): a reference command it ships (run once on the weights
//! file), or "every worker agrees per seed and generation". An answer that disagrees beyond
//! float rounding is wrong: corrupted memory, a mixed generation, a bad attach.
//!
//! ```no_run
//! let reference = forkless_chaos::reference::Reference::load("weights.safetensors".as_ref(), &[1, 2, 3]).unwrap();
//! assert!(reference.expected(2).is_some());
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::check::{CheckSpec, ReferenceSpec};
use crate::load::Answer;

#[path = "../../../examples/linear/seeded.rs"]
#[allow(dead_code)]
pub(crate) mod seeded;

/// The check of every answer of a run.
#[derive(Debug)]
pub struct Reference {
    /// The linear demo's expected `y_sum` and `y_head` per seed (empty for other checks).
    answers: HashMap<u64, Expected>,
    other: Option<Other>,
}

/// A check declared in `[check]`, on the JSON field `field`.
#[derive(Debug)]
enum Other {
    /// What the service's reference command printed, per seed.
    Expected { field: String, answers: HashMap<u64, Vec<f64>> },
    /// The first answer seen per (seed, generation); every later one must equal it.
    Agree { field: String, first: Mutex<HashMap<(u64, u64), Vec<f64>>> },
}

#[derive(Debug, Clone)]
pub struct Expected {
    pub y_sum: f64,
    pub y_head: Vec<f64>,
}

impl Reference {
    /// Reads `W` ("weight", `[out, in]`) and `b` ("bias") from `path` and computes the answers
    /// for `seeds` (inputs drawn by the demo's documented SplitMix64 generator).
    ///
    /// The file is read once and `W` is used in place (no converted copy: the full-size model
    /// is 1.9 GiB). Seeds are shared out among the available cores; each core reads `W` once,
    /// row by row, for all its seeds.
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
        if inputs == 0 {
            bail!("weight has shape [{outputs}, 0]: a layer needs at least one input");
        }
        if bias.shape() != [outputs]
            || weight.dtype() != safetensors::Dtype::F32
            || bias.dtype() != safetensors::Dtype::F32
        {
            bail!("expected fp32 weight [out, in] and bias [out]");
        }
        let layer = Layer { w: weight.data(), b: &f32s(bias.data()), inputs };
        Ok(Reference { answers: layer.answers(seeds), other: None })
    }

    /// The check `[check]` declares for the service of `config`, for `seeds`.
    pub fn for_service(
        spec: &CheckSpec,
        config: &forkless_supervisor::config::Config,
        seeds: &[u64],
    ) -> anyhow::Result<Reference> {
        let field = spec.answer.clone().unwrap_or_default();
        let other = match &spec.reference {
            ReferenceSpec::Named(name) if name == "linear" => return Reference::load(&config.model.path, seeds),
            ReferenceSpec::Named(_) => Other::Agree { field, first: Mutex::default() },
            ReferenceSpec::Command(command) => {
                Other::Expected { field, answers: run_reference(command, config, seeds)? }
            }
        };
        Ok(Reference { answers: HashMap::new(), other: Some(other) })
    }

    /// Checks one answer; `Err` says what is wrong.
    pub fn check_answer(&self, answer: &Answer) -> Result<(), String> {
        let seed = answer.seed;
        let (field, want) = match &self.other {
            None => {
                let y_sum = answer.body["y_sum"].as_f64().ok_or("no number y_sum in the answer")?;
                let y_head = numbers(&answer.body["y_head"]).ok_or("no array y_head in the answer")?;
                return self.check(seed, y_sum, &y_head);
            }
            Some(Other::Expected { field, answers }) => {
                (field, answers.get(&seed).cloned().ok_or_else(|| format!("no reference for seed {seed}"))?)
            }
            Some(Other::Agree { field, first }) => {
                let got = numbers(&answer.body[field.as_str()]).ok_or_else(|| format!("no numbers in {field:?}"))?;
                let mut first = first.lock().expect("agreement lock");
                let want = first.entry((seed, answer.generation)).or_insert_with(|| got.clone());
                if *want != got {
                    return Err(format!(
                        "seed {seed}: {field} {got:?}, but another answer of generation {} was {want:?}",
                        answer.generation
                    ));
                }
                return Ok(());
            }
        };
        let got = numbers(&answer.body[field.as_str()]).ok_or_else(|| format!("no numbers in {field:?}"))?;
        let close = |g: &f64, w: &f64| (g - w).abs() <= 1e-4 * (1.0 + w.abs());
        if got.len() != want.len() || !got.iter().zip(&want).all(|(g, w)| close(g, w)) {
            return Err(format!("seed {seed}: {field} {got:?} but the reference says {want:?}"));
        }
        Ok(())
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

/// A number or an array of numbers, as f64s.
fn numbers(value: &Value) -> Option<Vec<f64>> {
    match value {
        Value::Number(n) => Some(vec![n.as_f64()?]),
        Value::Array(items) => items.iter().map(Value::as_f64).collect(),
        _ => None,
    }
}

/// Runs the service's reference command on the weights file; it prints `{"SEED": answer}`.
fn run_reference(
    command: &[String],
    config: &forkless_supervisor::config::Config,
    seeds: &[u64],
) -> anyhow::Result<HashMap<u64, Vec<f64>>> {
    let (program, args) = command.split_first().context("[check] reference is an empty command")?;
    let program = forkless_supervisor::config::resolve_program(program, config.base_dir());
    let weights = config.model.path.display().to_string();
    let args: Vec<String> = args.iter().map(|a| a.replace("{weights}", &weights)).collect();
    let output = std::process::Command::new(&program)
        .args(&args)
        .output()
        .with_context(|| format!("cannot run the [check] reference {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "the [check] reference {} failed ({}): {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let printed: HashMap<String, Value> = serde_json::from_slice(&output.stdout).with_context(|| {
        format!("the [check] reference {} did not print {{\"SEED\": answer}} JSON", program.display())
    })?;
    let mut answers = HashMap::new();
    for (seed, value) in printed {
        let seed: u64 = seed.parse().with_context(|| format!("[check] reference: {seed:?} is not a seed"))?;
        answers
            .insert(seed, numbers(&value).with_context(|| format!("[check] reference: seed {seed} has no numbers"))?);
    }
    if let Some(missing) = seeds.iter().find(|s| !answers.contains_key(s)) {
        bail!(
            "the [check] reference {} printed no answer for seed {missing} (the harness uses seeds 0..{})",
            program.display(),
            seeds.len()
        );
    }
    Ok(answers)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `y = W x + b` with `W` as little-endian f32 bytes, `[b.len(), inputs]` row-major.
struct Layer<'a> {
    w: &'a [u8],
    b: &'a [f32],
    inputs: usize,
}

impl Layer<'_> {
    /// The answers for `seeds`, computed on every available core.
    fn answers(&self, seeds: &[u64]) -> HashMap<u64, Expected> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = seeds.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let running: Vec<_> =
                seeds.chunks(chunk).map(|seeds| scope.spawn(move || self.answer_all(seeds))).collect();
            running.into_iter().flat_map(|thread| thread.join().expect("a reference thread panicked")).collect()
        })
    }

    /// One pass over `W` for several seeds: each row is decoded once and dotted with every
    /// seed's input. Each dot product still adds its terms one by one, in index order, from the
    /// same start as `Iterator::sum` (so the answers equal a plain per-seed loop bit for bit);
    /// keeping one accumulator per seed lets those additions run side by side.
    fn answer_all(&self, seeds: &[u64]) -> Vec<(u64, Expected)> {
        let n = seeds.len();
        // Inputs transposed, `x[k * n + s]`, so the innermost loop reads them contiguously.
        let mut x = vec![0f64; self.inputs * n];
        for (s, &seed) in seeds.iter().enumerate() {
            for (k, v) in seeded::input_from_seed(seed, self.inputs).into_iter().enumerate() {
                x[k * n + s] = f64::from(v);
            }
        }
        let zero: f64 = std::iter::empty::<f64>().sum();
        let mut sums = vec![zero; n];
        let mut heads = vec![Vec::with_capacity(HEAD); n];
        let mut row = vec![0f32; self.inputs];
        let mut acc = vec![zero; n];
        for (row_bytes, bias) in self.w.chunks_exact(self.inputs * 4).zip(self.b) {
            decode_into(row_bytes, &mut row);
            acc.fill(zero);
            for (w, xs) in row.iter().zip(x.chunks_exact(n)) {
                let w = f64::from(*w);
                for (a, x) in acc.iter_mut().zip(xs) {
                    *a += w * x;
                }
            }
            for s in 0..n {
                let y = acc[s] + f64::from(*bias);
                sums[s] += y;
                if heads[s].len() < HEAD {
                    heads[s].push(y);
                }
            }
        }
        let expected = sums.into_iter().zip(heads).map(|(y_sum, y_head)| Expected { y_sum, y_head });
        seeds.iter().copied().zip(expected).collect()
    }
}

/// How many leading outputs an answer carries (`y_head`).
const HEAD: usize = 8;

fn decode_into(bytes: &[u8], out: &mut [f32]) {
    for (v, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward reference: one seed at a time, `W` converted to f32 first.
    fn answer_serially(w: &[f32], b: &[f32], inputs: usize, seed: u64) -> Expected {
        let x = seeded::input_from_seed(seed, inputs);
        let y: Vec<f64> = w
            .chunks_exact(inputs)
            .zip(b)
            .map(|(row, bias)| {
                row.iter().zip(&x).map(|(w, x)| f64::from(*w) * f64::from(*x)).sum::<f64>() + f64::from(*bias)
            })
            .collect();
        Expected { y_sum: y.iter().sum(), y_head: y.iter().take(HEAD).copied().collect() }
    }

    #[test]
    fn parallel_answers_equal_serial_ones_bit_for_bit() {
        let (inputs, outputs) = (37, 21);
        let (w, b) = seeded::make_weights(inputs, outputs, 5);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let seeds: Vec<u64> = (0..13).chain([u64::MAX]).collect();
        let layer = Layer { w: &bytes, b: &b, inputs };
        let answers = layer.answers(&seeds);
        assert_eq!(answers.len(), seeds.len());
        for &seed in &seeds {
            let (got, want) = (&answers[&seed], answer_serially(&w, &b, inputs, seed));
            assert_eq!(got.y_sum.to_bits(), want.y_sum.to_bits(), "seed {seed}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.y_head), bits(&want.y_head), "seed {seed}");
        }
        assert!(layer.answers(&[]).is_empty());
    }

    fn answer(seed: u64, generation: u64, y: &[f64]) -> Answer {
        Answer { seed, body: serde_json::json!({ "y": y }), generation, worker: 1 }
    }

    #[test]
    fn agreement_is_per_seed_and_generation() {
        let reference = Reference {
            answers: HashMap::new(),
            other: Some(Other::Agree { field: "y".into(), first: Mutex::default() }),
        };
        assert!(reference.check_answer(&answer(1, 1, &[1.0, 2.0])).is_ok());
        assert!(reference.check_answer(&answer(1, 1, &[1.0, 2.0])).is_ok());
        assert!(reference.check_answer(&answer(1, 2, &[5.0, 2.0])).is_ok(), "another generation may differ");
        let err = reference.check_answer(&answer(1, 1, &[1.0, 2.5])).unwrap_err();
        assert!(err.contains("seed 1") && err.contains("generation 1"), "{err}");
        assert!(reference.check_answer(&Answer { body: serde_json::json!({}), ..answer(2, 1, &[]) }).is_err());
    }

    #[test]
    fn expected_answers_allow_float_rounding_only() {
        let reference = Reference {
            answers: HashMap::new(),
            other: Some(Other::Expected { field: "y".into(), answers: HashMap::from([(3, vec![1.0, -2.0])]) }),
        };
        assert!(reference.check_answer(&answer(3, 1, &[1.000001, -2.000001])).is_ok());
        assert!(reference.check_answer(&answer(3, 1, &[1.01, -2.0])).unwrap_err().contains("reference says"));
        assert!(reference.check_answer(&answer(3, 1, &[1.0])).is_err());
        assert!(reference.check_answer(&answer(4, 1, &[1.0, -2.0])).unwrap_err().contains("no reference"));
    }

    #[test]
    fn load_reads_a_safetensors_file() {
        let (inputs, outputs) = (16, 4);
        let (w, b) = seeded::make_weights(inputs, outputs, 9);
        let as_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (w_bytes, b_bytes) = (as_bytes(&w), as_bytes(&b));
        let tensors = [
            (
                "weight",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![outputs, inputs], &w_bytes).unwrap(),
            ),
            ("bias", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![outputs], &b_bytes).unwrap()),
        ];
        let file = tempfile::NamedTempFile::new().unwrap();
        safetensors::serialize_to_file(tensors, None, file.path()).unwrap();
        let reference = Reference::load(file.path(), &[1, 2]).unwrap();
        let want = answer_serially(&w, &b, inputs, 2);
        assert_eq!(reference.expected(2).unwrap().y_sum, want.y_sum);
        assert!(reference.check(2, want.y_sum, &want.y_head).is_ok());
        assert!(reference.expected(3).is_none());
    }
}
