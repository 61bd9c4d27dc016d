//! The batch lane in a worker: one pass over the weights for the requests of every worker.
//!
//! When the supervisor runs a lane (`[lane] enabled = true`), every generation comes with one
//! ([`Generation::lane`]): a queue in shared memory that all workers of the generation (on one
//! device) submit to. A request handler submits its input and awaits its output:
//!
//! ```no_run
//! # async fn handler(generation: std::sync::Arc<forkless_worker::Generation>, input: Vec<u8>) -> Result<(), String> {
//! let lane = generation.lane().ok_or("this service runs without [lane]")?;
//! let output = lane.submit(&input).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
//! println!("{} bytes of answer", output.len());
//! # Ok(()) }
//! ```
//!
//! How a batch is computed is the service's own function, declared with
//! [`crate::WorkerBuilder::lane_pass`]: a factory called once per generation on a thread of its
//! own (so a GPU service creates its stream, cuBLAS handle and buffers there), returning the
//! function that runs each pass. Each worker runs one such **pass runner** per generation it
//! holds; at any moment one of them, in any worker, holds the lane's lease and runs the passes
//! for everybody (see `forkless_bus::lane` and docs/LANE.md). A runner ends once its worker no
//! longer uses the generation (a hot swap moved on and the last request on it finished); the
//! other workers' runners serve what is left.

use std::sync::Arc;

use forkless_bus::lane::RunnerConfig;
pub use forkless_bus::lane::{Batch, Lane, LaneStats, Reply, SubmitError, Ticket, WaitError};
use forkless_bus::wire::LaneSettings;

use crate::Generation;

/// A service's pass: the generation the lane belongs to, and the batch of requests (from any
/// worker) to answer ([`Batch::input`], [`Batch::set_output`] or [`Batch::fail`] for each).
pub type PassFn = Box<dyn FnMut(&Generation, &mut Batch<'_>) + Send>;

/// Makes a [`PassFn`] for one generation, on the runner thread; `Err` says why this worker
/// cannot run passes (the other workers still can).
pub type MakePass = dyn Fn(&Generation) -> Result<PassFn, String> + Send + Sync;

/// Like [`MakePass`], for a binding that hands the generation to another runtime on each pass
/// (Python): it gets the runner's `Arc`, to keep only as a `Weak` ([`std::sync::Arc::downgrade`];
/// a strong clone kept past a pass would keep the runner, and the generation, alive for good).
/// `Ok(None)`: this worker declared no pass for it and only submits (no error logged).
pub type MakeSharedPass = dyn Fn(&Arc<Generation>) -> Result<Option<PassFn>, String> + Send + Sync;

/// A service's pass factory, shared by every runner this worker starts.
#[derive(Clone)]
pub(crate) struct PassFactory(pub(crate) Arc<MakeSharedPass>);

impl PassFactory {
    pub(crate) fn new(make: impl Fn(&Generation) -> Result<PassFn, String> + Send + Sync + 'static) -> Self {
        PassFactory(Arc::new(move |generation: &Arc<Generation>| make(generation).map(Some)))
    }
}

impl std::fmt::Debug for PassFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassFactory")
    }
}

/// The runner settings the supervisor sent with the generation.
pub(crate) fn runner_config(settings: LaneSettings) -> RunnerConfig {
    RunnerConfig {
        max_batch: settings.max_batch as usize,
        max_wait: std::time::Duration::from_micros(settings.max_wait_us),
        linger: std::time::Duration::from_micros(settings.linger_us),
        ..RunnerConfig::default()
    }
}

/// Starts this worker's pass runner for `generation`'s lane, if it has one and the service
/// declared a pass. The runner holds the generation while it runs, and stops once it is the
/// only holder left: the worker serves another generation and no request uses this one.
pub(crate) fn spawn_runner(generation: &Arc<Generation>, factory: Option<&PassFactory>) {
    let (Some(factory), Some((lane, settings))) = (factory, generation.lane_parts()) else { return };
    let (lane, factory, generation) = (lane.clone(), factory.clone(), generation.clone());
    let number = generation.number();
    let spawned = std::thread::Builder::new().name(format!("lane-{number}")).spawn(move || {
        let mut pass = match (factory.0)(&generation) {
            Ok(Some(pass)) => pass,
            Ok(None) => {
                tracing::debug!(generation = number, "no lane pass declared here: this worker only submits");
                return;
            }
            Err(reason) => {
                tracing::error!(generation = number, "cannot run lane passes here: {reason}; other workers will");
                return;
            }
        };
        let only_holder = || Arc::strong_count(&generation) == 1;
        let config = runner_config(settings);
        match lane.run_passes(&only_holder, &config, |batch| pass(&generation, batch)) {
            Ok(report) => tracing::debug!(
                generation = number,
                passes = report.passes,
                served = report.served,
                recoveries = report.recoveries,
                "lane runner of generation {number} done"
            ),
            Err(e) => tracing::error!(generation = number, "lane runner of generation {number} failed: {e}"),
        }
    });
    if let Err(e) = spawned {
        tracing::error!(generation = number, "cannot start a lane runner thread: {e}; other workers will run passes");
    }
}
