//! The model on the GPU: one engine thread per worker owns the CUDA stream, cuBLAS and the
//! kernels, and serves requests in **dynamic batches**: whatever requests are queued when the
//! GPU is free (up to `max_batch`, waiting at most `max_wait` after the first for more) share
//! one pass over the weights, which is what the cost is made of (2 GB read per pass).
//!
//! Scratch buffers come from plain `cuMemAlloc` ([`DeviceBuffer`]), not cudarc's pool, which
//! would reserve 32 MiB per worker for 8 MiB of use.
//!
//! Per batch: the inputs of `{"seed": n}` requests are generated on the GPU
//! (`seeded_inputs`), explicit `x` rows are copied in, `Y = X Wᵀ` is one cuBLAS SGEMM reading
//! `W` in place from the shared, read-only arena, and `bias_add_rowsum` adds the bias, sums
//! each row in f64 and gathers the first values; two small copies bring the answers back.
//! A batch uses one generation from start to end (taken once per batch), so a hot swap never
//! mixes two in one answer, and the old one is unmapped after the last batch that used it.
//!
//! The engine thread starts before the worker has attached ([`GpuEngine::prepare`]): opening
//! the GPU, loading the kernels and creating the cuBLAS handle overlap with the owner loading the
//! weights; [`PendingEngine::start`] then only checks the generation and runs one warm-up batch.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let settings = BatchSettings { max_batch: 32, max_wait: std::time::Duration::from_micros(500), workspace: None };
//! let pending = GpuEngine::prepare(settings); // while attaching
//! let worker = forkless_worker::Worker::from_env().await?;
//! let engine = pending.start(worker.generations())?;
//! let answer = engine.infer(Input::Seed(7)).await?;
//! println!("y_sum = {} (batch stats: {:?})", answer.y_sum, engine.stats());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkless_gpu::cudarc::driver::CudaStream;
use forkless_gpu::{Blas, DeviceBuffer, Kernels};
use forkless_worker::{Generation, Generations};
use tokio::sync::oneshot;

/// How many first values of `y` an answer carries (`y_head`).
pub const HEAD: usize = 8;

/// Dynamic batching knobs (`linear-worker --max-batch N --max-wait-us U`).
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// At most this many requests share one pass over the weights.
    pub max_batch: usize,
    /// After the first request of a batch, wait at most this long for more (0: take only what
    /// is already queued; under load, requests queue while the GPU runs the previous batch).
    pub max_wait: Duration,
    /// cuBLAS workspace in bytes (`None`: cuBLAS's own default, 32 MiB on Hopper).
    pub workspace: Option<usize>,
}

/// One request's input.
#[derive(Debug)]
pub enum Input {
    Seed(u64),
    X(Vec<f32>),
}

/// One request's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub y_sum: f64,
    pub y_head: Vec<f32>,
    pub generation: u64,
}

/// Why the engine could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the weights are not on a GPU: start the worker with the cuda backend")]
    NotOnGpu,
    #[error("GPU: {0}")]
    Gpu(#[from] forkless_gpu::GpuError),
    #[error("GPU kernels: {0}")]
    Kernels(#[from] forkless_gpu::KernelError),
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("the weights are not a linear layer: {0}")]
    Model(String),
    #[error("the GPU engine thread stopped: {0}")]
    Stopped(String),
}

fn driver(e: forkless_gpu::cudarc::driver::DriverError) -> EngineError {
    EngineError::Driver(format!("{e:?}"))
}

struct Job {
    input: Input,
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// Counts of batch sizes seen, for `/healthz` and the drain log.
#[derive(Debug, Default)]
pub struct BatchStats {
    sizes: Mutex<BTreeMap<usize, u64>>,
}

impl BatchStats {
    fn record(&self, size: usize) {
        *self.sizes.lock().expect("stats lock").entry(size).or_default() += 1;
    }

    /// `{size: passes}` so far.
    pub fn histogram(&self) -> BTreeMap<usize, u64> {
        self.sizes.lock().expect("stats lock").clone()
    }

    /// Passes, requests and the mean batch size.
    pub fn summary(&self) -> serde_json::Value {
        let sizes = self.histogram();
        let passes: u64 = sizes.values().sum();
        let requests: u64 = sizes.iter().map(|(size, n)| *size as u64 * n).sum();
        serde_json::json!({
            "passes": passes,
            "requests": requests,
            "mean": if passes > 0 { requests as f64 / passes as f64 } else { 0.0 },
            "max": sizes.keys().next_back().copied().unwrap_or(0),
            "sizes": sizes,
        })
    }
}

/// The handle services use; cheap to clone.
#[derive(Clone)]
pub struct GpuEngine {
    jobs: Sender<Job>,
    stats: Arc<BatchStats>,
}

/// An engine thread that is preparing the GPU, waiting for the worker's generations.
pub struct PendingEngine {
    jobs: Sender<Job>,
    stats: Arc<BatchStats>,
    generations: std::sync::mpsc::SyncSender<Generations>,
    started: Receiver<Result<(), EngineError>>,
}

impl PendingEngine {
    /// Hands the engine the worker's generations and waits until it has run its warm-up batch
    /// (the first cuBLAS call picks and loads its kernel), or failed.
    pub fn start(self, generations: Generations) -> Result<GpuEngine, EngineError> {
        let stopped = || EngineError::Stopped("it exited while starting".into());
        self.generations.send(generations).map_err(|_| stopped())?;
        self.started.recv().map_err(|_| stopped())??;
        Ok(GpuEngine { jobs: self.jobs, stats: self.stats })
    }
}

/// The engine's GPU state (context, kernels, stream, cuBLAS, scratch), prepared on one thread
/// and then used on one thread at a time: the engine thread of [`GpuEngine`], or the batch
/// lane's runner thread ([`LaneEngine::run`]).
pub struct LaneEngine(Engine);

impl LaneEngine {
    /// Opens the GPU named by the supervisor, loads the kernels, creates a stream and cuBLAS.
    pub fn prepare(settings: BatchSettings) -> Result<LaneEngine, EngineError> {
        Engine::prepare(settings, Arc::new(BatchStats::default())).map(LaneEngine)
    }

    /// Answers `inputs` in one pass over `generation`'s weights.
    pub fn run(&mut self, generation: &Generation, inputs: &[&Input]) -> Result<Vec<Answer>, EngineError> {
        self.0.stats.record(inputs.len());
        self.0.run_inputs(generation, inputs)
    }
}

impl GpuEngine {
    /// Spawns the engine thread, which at once opens the GPU named by the supervisor
    /// (`FORKLESS_CUDA_DEVICE`, with its stack limit), loads the kernels (from the supervisor's
    /// cache when there) and creates the cuBLAS handle, then waits for [`PendingEngine::start`].
    pub fn prepare(settings: BatchSettings) -> PendingEngine {
        let (jobs, queue) = std::sync::mpsc::channel();
        let (generations, generations_rx) = std::sync::mpsc::sync_channel(1);
        let (started, started_rx) = std::sync::mpsc::sync_channel(1);
        let stats = Arc::new(BatchStats::default());
        let thread_stats = stats.clone();
        let spawned = std::thread::Builder::new().name("gpu-engine".into()).spawn(move || {
            let prepared = Engine::prepare(settings, thread_stats);
            let Ok(generations) = generations_rx.recv() else { return };
            match prepared.and_then(|engine| engine.attach(generations)) {
                Ok(engine) => {
                    let _ = started.send(Ok(()));
                    engine.run(queue);
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                }
            }
        });
        if let Err(e) = spawned {
            // `start` then finds the engine gone and says so.
            tracing::error!("cannot spawn the GPU engine thread: {e}");
        }
        PendingEngine { jobs, stats, generations, started: started_rx }
    }

    /// Queues one request and waits for its answer.
    pub async fn infer(&self, input: Input) -> Result<Answer, String> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { input, reply }).map_err(|_| "the GPU engine has stopped".to_string())?;
        answer.await.map_err(|_| "the GPU engine dropped the request".to_string())?
    }

    /// Batch sizes seen so far.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }
}

/// Device buffers for one batch shape, reused across batches.
struct Scratch {
    inputs: usize,
    outputs: usize,
    seeds: DeviceBuffer<u64>,
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    y_sum: DeviceBuffer<f64>,
    y_head: DeviceBuffer<f32>,
}

impl Scratch {
    fn new(stream: &Arc<CudaStream>, inputs: usize, outputs: usize, max_batch: usize) -> Result<Scratch, EngineError> {
        Ok(Scratch {
            inputs,
            outputs,
            seeds: DeviceBuffer::zeroed(stream, max_batch)?,
            x: DeviceBuffer::zeroed(stream, max_batch * inputs)?,
            y: DeviceBuffer::zeroed(stream, max_batch * outputs)?,
            y_sum: DeviceBuffer::zeroed(stream, max_batch)?,
            y_head: DeviceBuffer::zeroed(stream, max_batch * HEAD)?,
        })
    }
}

/// Everything the engine thread owns.
struct Engine {
    gpu: forkless_gpu::Gpu,
    /// The worker's generation slot; `None` until attached.
    generations: Option<Generations>,
    settings: BatchSettings,
    stats: Arc<BatchStats>,
    stream: Arc<CudaStream>,
    blas: Blas,
    kernels: Kernels,
    scratch: Option<Scratch>,
}

/// This process's GPU memory in MiB, as NVML reports it (for the start-up breakdown log).
fn own_gpu_mib() -> Option<u64> {
    forkless_gpu::nvml::snapshot()?.per_process.get(&std::process::id()).map(|bytes| bytes >> 20)
}

impl Engine {
    /// Everything that needs no weights: the GPU context, the kernels, a stream, cuBLAS.
    fn prepare(settings: BatchSettings, stats: Arc<BatchStats>) -> Result<Engine, EngineError> {
        let started = Instant::now();
        let cuda = forkless_worker::cuda_settings()
            .map_err(|e| EngineError::Model(e.to_string()))?
            .ok_or(EngineError::NotOnGpu)?;
        let gpu = forkless_gpu::Gpu::open(cuda.device as usize)?;
        if let Some(bytes) = cuda.stack_limit {
            gpu.set_stack_limit(bytes)?;
        }
        let context_mib = own_gpu_mib();
        let kernels = Kernels::load(&gpu, cuda.kernel_cache.as_deref())?;
        let stream = gpu.context().new_stream().map_err(driver)?;
        let blas = match settings.workspace {
            Some(bytes) => Blas::with_workspace(stream.clone(), bytes)?,
            None => Blas::new(stream.clone())?,
        };
        tracing::info!(
            kernels = %kernels.loaded_from(),
            kernels_ms = format!("{:.1}", kernels.compile_time().as_secs_f64() * 1e3),
            prepare_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            context_mib,
            with_cublas_mib = own_gpu_mib(),
            max_batch = settings.max_batch,
            max_wait_us = settings.max_wait.as_micros() as u64,
            "GPU engine prepared on {} ({})",
            gpu.info().name,
            kernels.arch()
        );
        Ok(Engine { gpu, generations: None, settings, stats, stream, blas, kernels, scratch: None })
    }

    /// Takes the worker's generations (on this engine's GPU) and runs one warm-up batch.
    fn attach(mut self, generations: Generations) -> Result<Engine, EngineError> {
        let current = generations.current();
        let on_this_gpu = current.gpu().is_some_and(|g| g.ordinal() == self.gpu.ordinal());
        if !current.on_gpu() || !on_this_gpu {
            return Err(EngineError::NotOnGpu);
        }
        let (reply, _) = oneshot::channel();
        self.run_batch(&current, &[Job { input: Input::Seed(0), reply }])?;
        tracing::info!(gpu_mib = own_gpu_mib(), "GPU engine warmed up");
        drop(current);
        self.generations = Some(generations);
        Ok(self)
    }

    /// Serves batches until every sender is gone (the service stopped).
    fn run(mut self, queue: Receiver<Job>) {
        let Some(generations) = self.generations.clone() else { return };
        while let Some(batch) = next_batch(&queue, self.settings) {
            self.stats.record(batch.len());
            let generation = generations.current();
            match self.run_batch(&generation, &batch) {
                Ok(answers) => {
                    for (job, answer) in batch.into_iter().zip(answers) {
                        let _ = job.reply.send(Ok(answer));
                    }
                }
                Err(e) => {
                    tracing::error!("GPU batch of {} failed: {e}", batch.len());
                    for job in batch {
                        let _ = job.reply.send(Err(format!("GPU batch failed: {e}")));
                    }
                }
            }
        }
        tracing::info!(batches = %self.stats.summary(), "GPU engine stopped");
    }

    fn run_batch(&mut self, generation: &Generation, batch: &[Job]) -> Result<Vec<Answer>, EngineError> {
        let inputs: Vec<&Input> = batch.iter().map(|job| &job.input).collect();
        self.run_inputs(generation, &inputs)
    }

    /// One pass: the inputs (at most `max_batch`) through `generation`'s weights.
    fn run_inputs(&mut self, generation: &Generation, batch: &[&Input]) -> Result<Vec<Answer>, EngineError> {
        let (outputs, inputs) = match generation.shape("weight").map_err(|e| EngineError::Model(e.to_string()))? {
            [o, i] => (*o as usize, *i as usize),
            other => return Err(EngineError::Model(format!("weight has shape {other:?}, expected [out, in]"))),
        };
        let w = generation.device_tensor::<f32>("weight").map_err(|e| EngineError::Model(e.to_string()))?;
        let bias = generation.device_tensor::<f32>("bias").map_err(|e| EngineError::Model(e.to_string()))?;
        if bias.len() != outputs {
            return Err(EngineError::Model(format!("bias has {} elements, weight {outputs} rows", bias.len())));
        }
        let scratch = match self.scratch.take() {
            Some(s) if s.inputs == inputs && s.outputs == outputs => s,
            _ => Scratch::new(&self.stream, inputs, outputs, self.settings.max_batch)?,
        };
        let scratch = self.scratch.insert(scratch);
        let stream = &self.stream;
        let n = batch.len();
        let seeds: Vec<u64> = batch.iter().map(|input| if let Input::Seed(s) = input { *s } else { 0 }).collect();
        stream.memcpy_htod(&seeds, &mut scratch.seeds.slice_mut(0..n)).map_err(driver)?;
        self.kernels.seeded_inputs(stream, &mut *scratch.x, &*scratch.seeds, n, inputs)?;
        for (row, input) in batch.iter().enumerate() {
            if let Input::X(x) = input {
                if x.len() != inputs {
                    return Err(EngineError::Model(format!("x has {} elements; the model takes {inputs}", x.len())));
                }
                stream.memcpy_htod(x, &mut scratch.x.slice_mut(row * inputs..(row + 1) * inputs)).map_err(driver)?;
            }
        }
        // Small batches (the lane's, at low concurrency) on forkless's own kernel at the HBM
        // limit; larger ones, and shapes it does not take, on cuBLAS.
        if !self.kernels.linear_small(stream, w, outputs, inputs, &*scratch.x, &mut *scratch.y, n)? {
            self.blas.linear(w, outputs, inputs, &*scratch.x, &mut *scratch.y, n)?;
        }
        let head = HEAD.min(outputs);
        self.kernels.bias_add_rowsum(
            stream,
            &mut *scratch.y,
            bias,
            &mut *scratch.y_sum,
            &mut *scratch.y_head,
            n,
            head,
        )?;
        let sums = stream.clone_dtoh(&scratch.y_sum.slice(0..n)).map_err(driver)?;
        let heads = stream.clone_dtoh(&scratch.y_head.slice(0..n * head)).map_err(driver)?;
        stream.synchronize().map_err(driver)?;
        let number = generation.number();
        Ok((0..n)
            .map(|row| Answer { y_sum: sums[row], y_head: heads[row * head..][..head].to_vec(), generation: number })
            .collect())
    }
}

/// Waits for a first job, then gathers what is queued (and what arrives within `max_wait`)
/// up to `max_batch`. `None` once the service has dropped every sender.
fn next_batch(queue: &Receiver<Job>, settings: BatchSettings) -> Option<Vec<Job>> {
    let first = queue.recv().ok()?;
    let deadline = Instant::now() + settings.max_wait;
    let mut batch = vec![first];
    while batch.len() < settings.max_batch.max(1) {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match queue.recv_timeout(left) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seed: u64) -> (Job, oneshot::Receiver<Result<Answer, String>>) {
        let (reply, rx) = oneshot::channel();
        (Job { input: Input::Seed(seed), reply }, rx)
    }

    #[test]
    fn batches_take_what_is_queued_up_to_max_batch() {
        let (tx, rx) = std::sync::mpsc::channel();
        let _replies: Vec<_> = (0..5)
            .map(|s| {
                let (j, r) = job(s);
                tx.send(j).unwrap();
                r
            })
            .collect();
        let settings = BatchSettings { max_batch: 3, max_wait: Duration::ZERO, workspace: None };
        assert_eq!(next_batch(&rx, settings).unwrap().len(), 3);
        assert_eq!(next_batch(&rx, settings).unwrap().len(), 2);
        drop(tx);
        assert!(next_batch(&rx, settings).is_none());
    }

    #[test]
    fn max_wait_gathers_late_arrivals() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (first, _r1) = job(1);
        tx.send(first).unwrap();
        let late = std::thread::spawn(move || {
            let (second, r2) = job(2);
            tx.send(second).unwrap();
            r2
        });
        let _r2 = late.join().unwrap(); // sent before the batch is taken: always within the wait
        let settings = BatchSettings { max_batch: 8, max_wait: Duration::from_secs(30), workspace: None };
        // The sender is gone after the late job, so the wait ends there instead of at 30 s.
        assert_eq!(next_batch(&rx, settings).unwrap().len(), 2);
    }

    #[test]
    fn stats_summarise_batch_sizes() {
        let stats = BatchStats::default();
        for size in [1, 4, 4] {
            stats.record(size);
        }
        let summary = stats.summary();
        assert_eq!(summary["passes"], 3);
        assert_eq!(summary["requests"], 9);
        assert_eq!(summary["max"], 4);
    }
}
