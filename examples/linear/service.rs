//! The HTTP service around [`Linear`]: attach (accepting only a linear layer), warm up, and
//! hand the router to `forkless_worker::serve`, which reports ready, serves and drains.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use forkless_worker::{Expect, Generation, Generations, Worker, EXIT_FATAL};
use serde::{Deserialize, Serialize};

use crate::gpu::{BatchSettings, GpuEngine, Input};
use crate::model::Linear;
use crate::seeded::input_from_seed;

/// Body of `POST /infer`: exactly one of the two fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    seed: Option<u64>,
    x: Option<Vec<f32>>,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    y_sum: f64,
    y_head: Vec<f32>,
    generation: u64,
    worker: u32,
}

struct AppState {
    generations: Generations,
    pid: u32,
    /// The GPU engine, when the weights are on a GPU; `None` computes on the CPU.
    engine: Option<GpuEngine>,
}

impl AppState {
    /// The model of the current generation. One request uses one `Linear` (and so one
    /// generation) from start to end, whatever hot swap happens meanwhile.
    fn model(&self) -> Result<Linear, Box<Response>> {
        Linear::new(self.generations.current()).map_err(|e| {
            let message = format!("the current weights are not a linear layer: {e}");
            Box::new((StatusCode::INTERNAL_SERVER_ERROR, message).into_response())
        })
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn infer(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request: InferRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return bad_request(format!("invalid JSON body: {e}")),
    };
    let model = match state.model() {
        Ok(model) => model,
        Err(response) => return *response,
    };
    let inputs = model.inputs;
    let input = match (request.seed, request.x) {
        (Some(seed), None) => Input::Seed(seed),
        (None, Some(x)) if x.len() == inputs => Input::X(x),
        (None, Some(x)) => return bad_request(format!("x has {} elements; this model takes {inputs}", x.len())),
        _ => return bad_request("give exactly one of {\"seed\": u64} or {\"x\": [f32]}".into()),
    };
    let answer = match (model.generation_ref().lane().is_some(), &state.engine) {
        (true, _) => match through_lane(&model, &input).await {
            Ok(answer) => Ok(answer),
            Err(LaneFailure::Full(e)) => return (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
            Err(LaneFailure::Failed(e)) => Err(e),
        },
        (false, Some(engine)) => {
            drop(model); // the engine takes the generation per batch
            engine.infer(input).await
        }
        (false, None) => forward_on_cpu(model, input).await,
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("inference failed: {e}")).into_response(),
    };
    Json(InferResponse { y_sum: answer.y_sum, y_head: answer.y_head, generation: answer.generation, worker: state.pid })
        .into_response()
}

enum LaneFailure {
    /// Every slot of the lane is in use: the service is overloaded (503).
    Full(String),
    Failed(String),
}

/// One request through the generation's batch lane: one pass serves the requests of every
/// worker, run by whichever worker holds the lane's lease (see `crate::lane`).
async fn through_lane(model: &Linear, input: &Input) -> Result<crate::gpu::Answer, LaneFailure> {
    use forkless_worker::lane::SubmitError;
    let generation = model.generation_ref();
    let lane = generation.lane().expect("checked by the caller");
    let ticket = match lane.submit(&crate::lane::encode_input(input)) {
        Ok(ticket) => ticket,
        Err(e @ SubmitError::Full { .. }) => return Err(LaneFailure::Full(e.to_string())),
        Err(e) => return Err(LaneFailure::Failed(e.to_string())),
    };
    let reply = ticket.await.map_err(|e| LaneFailure::Failed(e.to_string()))?;
    crate::lane::decode_answer(&reply, generation.number()).map_err(LaneFailure::Failed)
}

/// The host backend: the matrix-vector product is CPU-bound, so it runs off the async threads.
async fn forward_on_cpu(model: Linear, input: Input) -> Result<crate::gpu::Answer, String> {
    let generation = model.generation();
    let x = match input {
        Input::Seed(seed) => input_from_seed(seed, model.inputs),
        Input::X(x) => x,
    };
    let y = tokio::task::spawn_blocking(move || model.forward(&x)).await.map_err(|e| e.to_string())?;
    Ok(crate::gpu::Answer {
        y_sum: y.iter().map(|&v| v as f64).sum(),
        y_head: y.iter().take(crate::gpu::HEAD).copied().collect(),
        generation,
    })
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let model = match state.model() {
        Ok(model) => model,
        Err(response) => return *response,
    };
    Json(serde_json::json!({
        "status": "ok",
        "generation": model.generation(),
        "worker": state.pid,
        "model": { "in": model.inputs, "out": model.outputs },
        "backend": if model.on_gpu() { "cuda" } else { "host" },
        "batches": state.engine.as_ref().map(|engine| engine.stats().summary()),
    }))
    .into_response()
}

pub fn main(batching: BatchSettings) -> ExitCode {
    forkless_worker::run(serve(batching))
}

fn fail(message: impl std::fmt::Display, fatal: bool) -> ExitCode {
    tracing::error!("{message}");
    ExitCode::from(if fatal { EXIT_FATAL as u8 } else { 1 })
}

/// What this service needs: `weight [out, in]` and `bias [out]`, fp32, any size. A hot swap to
/// anything else (other names, a bias of another length) is refused before it is served.
pub fn linear_layer() -> Expect {
    Expect::new().tensor::<f32>("weight", ["out", "in"]).tensor::<f32>("bias", ["out"])
}

/// Clients send `x` of the size the service started with: a hot swap may change the weights
/// and the number of outputs, not the number of inputs (that takes a restart).
fn same_inputs(started_with: Arc<OnceLock<usize>>) -> impl Fn(&Generation) -> Result<(), String> + Send + Sync {
    move |generation| {
        let (Some(&inputs), Ok([_, offered])) = (started_with.get(), generation.shape("weight")) else {
            return Ok(()); // at attach, nothing to compare with (shapes are linear_layer()'s job)
        };
        match *offered as usize == inputs {
            true => Ok(()),
            false => Err(format!(
                "weight takes {offered} inputs, but this service's clients send {inputs}: a new input size needs a restart with the new [model] path"
            )),
        }
    }
}

async fn serve(batching: BatchSettings) -> ExitCode {
    // On the GPU, the engine prepares (context, kernels, cuBLAS) while the worker attaches.
    let on_gpu = matches!(forkless_worker::cuda_settings(), Ok(Some(_)));
    let pending = on_gpu.then(|| GpuEngine::prepare(batching));
    let inputs = Arc::new(OnceLock::new());
    let builder = Worker::builder().accept(linear_layer()).accept(same_inputs(inputs.clone()));
    let worker = match builder.lane_pass(move |generation| crate::lane::make_pass(generation, batching)).attach().await
    {
        Ok(worker) => worker,
        Err(e) => return e.exit(),
    };
    let model = match Linear::new(worker.generation()) {
        Ok(model) => model,
        Err(e) => return fail(format!("weights do not hold a linear layer: {e}"), true),
    };
    let _ = inputs.set(model.inputs);
    // Warm-up: one pass touches every weight page (or, on the GPU, loads the kernels and picks
    // cuBLAS's), so the first request is not the slow one. It consumes `model`: holding the
    // generation here would keep it mapped after a swap.
    let on_lane = model.generation_ref().lane().is_some();
    let engine = if on_lane {
        // One pass for every worker: the lane's runner (crate::lane) computes, not an engine
        // of this worker's own; its warm-up is the runner's first pass.
        drop((model, pending));
        None
    } else if let Some(pending) = pending.filter(|_| model.on_gpu()) {
        drop(model);
        let generations = worker.generations();
        match tokio::task::spawn_blocking(move || pending.start(generations)).await {
            Ok(Ok(engine)) => Some(engine),
            Ok(Err(e)) => return fail(format!("cannot start the GPU engine: {e}"), false),
            Err(e) => return fail(format!("cannot start the GPU engine: {e}"), false),
        }
    } else if model.on_gpu() {
        return fail("the weights are on a GPU, but FORKLESS_BACKEND is not cuda", true);
    } else {
        let _ = tokio::task::spawn_blocking(move || model.forward(&input_from_seed(0, model.inputs))).await;
        None
    };
    let engine_stats = engine.clone();
    let state = Arc::new(AppState { generations: worker.generations(), pid: std::process::id(), engine });
    let app = Router::new().route("/infer", post(infer)).route("/healthz", get(healthz)).with_state(state);
    let code = forkless_worker::serve(worker, app).await;
    if let Some(engine) = engine_stats {
        tracing::info!(batches = %engine.stats().summary(), "drained; exiting (GPU batch sizes)");
    }
    code
}
