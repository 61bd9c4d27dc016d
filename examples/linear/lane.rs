//! The linear layer on the batch lane (`[lane] enabled = true`): requests of every worker join
//! one pass over the weights (see `forkless_worker::lane`).
//!
//! A request travels through the lane as bytes: `[0] + seed (u64 LE)` or `[1] + x (f32 LE)`; its
//! answer as `y_sum (f64 LE)` followed by the first values of `y` (f32 LE). The pass runs on
//! the runner thread of whichever worker holds the lane's lease: on the GPU, one cuBLAS pass
//! for the whole batch ([`LaneEngine`], created on that thread); on the host, the same
//! `y = W x + b` as a request without the lane, so every answer is bit-identical either way.

use forkless_worker::lane::{Batch, PassFn};
use forkless_worker::Generation;

use crate::gpu::{Answer, BatchSettings, Input, LaneEngine, HEAD};
use crate::seeded::{input_from_seed, linear_forward};

const SEED: u8 = 0;
const X: u8 = 1;

/// A request's input as lane bytes.
pub fn encode_input(input: &Input) -> Vec<u8> {
    match input {
        Input::Seed(seed) => std::iter::once(SEED).chain(seed.to_le_bytes()).collect(),
        Input::X(x) => std::iter::once(X).chain(x.iter().flat_map(|v| v.to_le_bytes())).collect(),
    }
}

/// Lane bytes back into an input (a request of another worker: checked, not trusted).
pub fn decode_input(bytes: &[u8], inputs: usize) -> Result<Input, String> {
    match bytes.split_first() {
        Some((&SEED, seed)) => {
            seed.try_into().map(|b| Input::Seed(u64::from_le_bytes(b))).map_err(|_| "bad seed".into())
        }
        Some((&X, x)) if x.len() == inputs * 4 => {
            Ok(Input::X(x.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()))
        }
        Some((&X, x)) => Err(format!("x has {} elements; this model takes {inputs}", x.len() / 4)),
        _ => Err("not a linear-worker request".into()),
    }
}

/// An answer as lane bytes.
pub fn encode_answer(y_sum: f64, y_head: &[f32]) -> Vec<u8> {
    y_sum.to_le_bytes().into_iter().chain(y_head.iter().flat_map(|v| v.to_le_bytes())).collect()
}

/// Lane bytes back into an answer of `generation`.
pub fn decode_answer(bytes: &[u8], generation: u64) -> Result<Answer, String> {
    let (sum, head) = bytes.split_first_chunk::<8>().ok_or("a lane answer shorter than 8 bytes")?;
    let y_head = head.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    Ok(Answer { y_sum: f64::from_le_bytes(*sum), y_head, generation })
}

/// The pass for `generation`: a GPU engine made on this (runner) thread, or the host forward.
pub fn make_pass(generation: &Generation, settings: BatchSettings) -> Result<PassFn, String> {
    if generation.on_gpu() {
        // Scratch for the largest pass the lane forms, whatever `--max-batch` says.
        let lane_batch = generation.lane_settings().map_or(0, |lane| lane.max_batch as usize);
        let settings = BatchSettings { max_batch: settings.max_batch.max(lane_batch), ..settings };
        let mut engine = LaneEngine::prepare(settings).map_err(|e| e.to_string())?;
        return Ok(Box::new(move |generation, batch| gpu_pass(&mut engine, generation, batch)));
    }
    Ok(Box::new(host_pass))
}

fn inputs_of(generation: &Generation) -> Result<usize, String> {
    match generation.shape("weight").map_err(|e| e.to_string())? {
        [_, inputs] => Ok(*inputs as usize),
        other => Err(format!("weight has shape {other:?}, expected [out, in]")),
    }
}

fn host_pass(generation: &Generation, batch: &mut Batch<'_>) {
    let weights = inputs_of(generation).and_then(|inputs| {
        let w = generation.tensor::<f32>("weight").map_err(|e| e.to_string())?;
        let b = generation.tensor::<f32>("bias").map_err(|e| e.to_string())?;
        Ok((inputs, w, b))
    });
    let (inputs, w, b) = match weights {
        Ok(weights) => weights,
        Err(reason) => return fail_all(batch, &reason),
    };
    for i in 0..batch.len() {
        let x = match decode_input(batch.input(i), inputs) {
            Ok(Input::Seed(seed)) => input_from_seed(seed, inputs),
            Ok(Input::X(x)) => x,
            Err(reason) => {
                batch.fail(i, &reason);
                continue;
            }
        };
        let y = linear_forward(w, b, &x);
        let head = &y[..HEAD.min(y.len())];
        let answer = encode_answer(y.iter().map(|&v| f64::from(v)).sum(), head);
        if let Err(e) = batch.set_output(i, &answer) {
            batch.fail(i, &e.to_string());
        }
    }
}

fn gpu_pass(engine: &mut LaneEngine, generation: &Generation, batch: &mut Batch<'_>) {
    let inputs = match inputs_of(generation) {
        Ok(inputs) => inputs,
        Err(reason) => return fail_all(batch, &reason),
    };
    let decoded: Vec<Result<Input, String>> = (0..batch.len()).map(|i| decode_input(batch.input(i), inputs)).collect();
    let rows: Vec<(usize, &Input)> =
        decoded.iter().enumerate().filter_map(|(i, d)| Some((i, d.as_ref().ok()?))).collect();
    let refs: Vec<&Input> = rows.iter().map(|(_, input)| *input).collect();
    let answers = match engine.run(generation, &refs) {
        Ok(answers) => answers,
        Err(e) => return fail_all(batch, &format!("GPU pass failed: {e}")),
    };
    for ((i, _), answer) in rows.iter().zip(answers) {
        if let Err(e) = batch.set_output(*i, &encode_answer(answer.y_sum, &answer.y_head)) {
            batch.fail(*i, &e.to_string());
        }
    }
    for (i, d) in decoded.iter().enumerate() {
        if let Err(reason) = d {
            batch.fail(i, reason);
        }
    }
}

fn fail_all(batch: &mut Batch<'_>, reason: &str) {
    for i in 0..batch.len() {
        batch.fail(i, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_and_answers_round_trip_and_garbage_is_refused() {
        let seed = decode_input(&encode_input(&Input::Seed(u64::MAX - 3)), 4).unwrap();
        assert!(matches!(seed, Input::Seed(s) if s == u64::MAX - 3));
        let x = decode_input(&encode_input(&Input::X(vec![1.5, -2.0, 0.0, 3.25])), 4).unwrap();
        assert!(matches!(x, Input::X(v) if v == vec![1.5, -2.0, 0.0, 3.25]));
        assert!(decode_input(&encode_input(&Input::X(vec![1.0; 3])), 4).unwrap_err().contains("3 elements"));
        assert!(decode_input(&[], 4).is_err());
        assert!(decode_input(&[0, 1, 2], 4).is_err());
        let answer = decode_answer(&encode_answer(-30.5, &[0.25, -1.0]), 7).unwrap();
        assert_eq!((answer.y_sum, answer.y_head, answer.generation), (-30.5, vec![0.25, -1.0], 7));
        assert!(decode_answer(&[1, 2, 3], 1).is_err());
    }
}
