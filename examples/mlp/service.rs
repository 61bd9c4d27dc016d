//! The MLP service: what docs/WORKERS.md builds step by step.

use std::process::ExitCode;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use forkless_worker::{Expect, Generation, Generations, Worker};
use serde::{Deserialize, Serialize};

use crate::seeded::{dot, input_from_seed};
use crate::{HIDDEN, IN, OUT};

/// The weights this service can serve: PyTorch `nn.Linear` names, `[out, in]` layout.
fn mlp() -> Expect {
    Expect::new()
        .tensor::<f32>("fc1.weight", [HIDDEN as u64, IN as u64])
        .tensor::<f32>("fc1.bias", [HIDDEN as u64])
        .tensor::<f32>("fc2.weight", [OUT as u64, HIDDEN as u64])
        .tensor::<f32>("fc2.bias", [OUT as u64])
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Predict {
    x: Option<Vec<f32>>,
    seed: Option<u64>,
}

#[derive(Serialize)]
struct Prediction {
    y: Vec<f32>,
    generation: u64,
    worker: u32,
}

type Failure = (StatusCode, String);

pub async fn serve() -> ExitCode {
    let builder = Worker::builder().accept(mlp()).accept(on_host).lane_pass(|_| Ok(Box::new(lane_pass)));
    let worker = match builder.attach().await {
        Ok(worker) => worker,
        Err(e) => return e.exit(),
    };
    let app = Router::new().route("/predict", post(predict)).with_state(worker.generations());
    forkless_worker::serve(worker, app).await
}

/// This example computes on the CPU: weights on a GPU (`--backend cuda`) are refused.
fn on_host(generation: &Generation) -> Result<(), String> {
    match generation.on_gpu() {
        true => Err("mlp-worker computes on the host: run it with --backend host".into()),
        false => Ok(()),
    }
}

async fn predict(
    State(generations): State<Generations>,
    body: Bytes, // any content type: `curl -d` sends a form type
) -> Result<Json<Prediction>, Failure> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let request: Predict = serde_json::from_slice(&body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let x = match (request.x, request.seed) {
        (Some(x), None) if x.len() == IN => x,
        (Some(x), None) => return Err(bad(format!("x has {} values; this model takes {IN}", x.len()))),
        (None, Some(seed)) => input_from_seed(seed, IN),
        _ => return Err(bad("give exactly one of {\"x\": [256 floats]} or {\"seed\": n}".into())),
    };
    let generation = generations.current(); // this request's weights, whatever swaps meanwhile
    let number = generation.number();
    let y = match generation.lane() {
        Some(lane) => through_lane(lane, &x).await?,
        None => tokio::task::spawn_blocking(move || forward(&generation, &x))
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    };
    Ok(Json(Prediction { y, generation: number, worker: std::process::id() }))
}

/// With `[lane]` on: the input joins one pass with every worker's requests (as f32 LE bytes),
/// whichever worker runs it (see [`lane_pass`]).
async fn through_lane(lane: &forkless_worker::lane::Lane, x: &[f32]) -> Result<Vec<f32>, Failure> {
    use forkless_worker::lane::SubmitError;
    let ticket = lane.submit(&to_bytes(x)).map_err(|e| match e {
        SubmitError::Full { .. } => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        other => (StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    let reply = ticket.await.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(from_bytes(&reply))
}

/// One pass of the lane: each request's `x` through the layers (the same fixed-order dots as
/// without the lane, so the answers are the same bits).
fn lane_pass(generation: &Generation, batch: &mut forkless_worker::lane::Batch<'_>) {
    for i in 0..batch.len() {
        let x = from_bytes(batch.input(i));
        if x.len() != IN {
            batch.fail(i, &format!("x has {} values; this model takes {IN}", x.len()));
            continue;
        }
        match forward(generation, &x) {
            Ok(y) => {
                if let Err(e) = batch.set_output(i, &to_bytes(&y)) {
                    batch.fail(i, &e.to_string());
                }
            }
            Err(e) => batch.fail(i, &e.to_string()),
        }
    }
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// `y = fc2(relu(fc1(x)))`, each row a fixed-order dot product: every worker answers the same
/// bits.
fn forward(generation: &Generation, x: &[f32]) -> Result<Vec<f32>, forkless_worker::ViewError> {
    let linear = |w: &[f32], b: &[f32], x: &[f32]| -> Vec<f32> {
        w.chunks_exact(x.len()).zip(b).map(|(row, b)| dot(row, x) + b).collect()
    };
    let hidden = linear(generation.tensor("fc1.weight")?, generation.tensor("fc1.bias")?, x);
    let hidden: Vec<f32> = hidden.into_iter().map(|h| h.max(0.0)).collect();
    Ok(linear(generation.tensor("fc2.weight")?, generation.tensor("fc2.bias")?, &hidden))
}
