//! The worker side of forkless, as a library any service can embed: the SDK.
//!
//! A worker is a process the supervisor `exec`s with the bus socket, its index and (systemd
//! convention, `LISTEN_FDS`) already-bound listening sockets in its environment.
//! [`Worker::builder`] declares what the service needs from the weights ([`Expect`], or any
//! check); [`WorkerBuilder::attach`] ties the process to the supervisor (`PR_SET_PDEATHSIG`),
//! maps the current generation read-only, checks it, and arms SIGTERM/SIGINT handling. With the
//! `http` feature (default), [`serve`] does the rest for an axum router: the inherited
//! listeners, readiness, HTTP limits against hostile clients, request counting for
//! `max_requests`, graceful drain, exit codes. docs/WORKERS.md is the guide.
//!
//! ```no_run
//! use axum::{extract::State, routing::post, Router};
//! use forkless_worker::{Expect, Generations, Worker};
//!
//! async fn sum(State(generations): State<Generations>) -> String {
//!     let generation = generations.current(); // one generation for the whole request
//!     let bias: &[f32] = generation.tensor("bias").expect("accepted at attach");
//!     format!("{}", bias.iter().sum::<f32>())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     forkless_worker::logging::init();
//!     forkless_worker::run(async {
//!         let worker = match Worker::builder().accept(Expect::new().tensor::<f32>("bias", ["out"])).attach().await {
//!             Ok(worker) => worker,
//!             Err(e) => return e.exit(),
//!         };
//!         let app = Router::new().route("/sum", post(sum)).with_state(worker.generations());
//!         forkless_worker::serve(worker, app).await
//!     })
//! }
//! ```
#![forbid(unsafe_code)]

mod accept;
mod generation;
#[cfg(feature = "http")]
pub mod http;
pub mod lane;
mod link;
pub mod logging;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use forkless_bus::channel::{RecvError, SendError};
use forkless_bus::child_env::{ChildEnv, ChildEnvError, Sharing};
use forkless_bus::host::ArenaMap;
use forkless_bus::{BusStream, Message};
use forkless_weights::model_file::ModelFile;

pub use accept::{Acceptance, Dim, Expect, Shape};
pub use forkless_bus::child::{EXIT_FATAL, EXIT_TEMPORARY};
pub use forkless_bus::host::MapError;
pub use forkless_bus::manifest::ManifestError;
pub use forkless_bus::wire::{AttachTiming, LaneSettings};
pub use forkless_bus::{Dtype, Manifest, TensorEntry};
pub use forkless_gpu::GpuError;
pub use forkless_gpu::{DeviceView, Gpu};
pub use forkless_weights::cuda::CudaSettings;
pub use forkless_weights::LoadError;
pub use generation::{Element, Generation, Generations, ViewError};
/// The half-precision element types (`half::f16`, `half::bf16`) of F16/BF16 tensors.
pub use half;
#[cfg(feature = "http")]
pub use http::{readiness_route, serve};
pub use tokio_util::sync::CancellationToken;

use accept::Checks;
use generation::MappedArena;

/// Why a worker could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Env(#[from] ChildEnvError),
    #[error(transparent)]
    Orphan(#[from] forkless_bus::child::OrphanError),
    #[error(transparent)]
    Connect(#[from] forkless_bus::child::ConnectError),
    #[error("bus: {0}")]
    Send(#[from] SendError),
    #[error("bus: {0}")]
    Recv(#[from] RecvError),
    #[error("supervisor refused this worker: {0}")]
    Refused(String),
    #[error("cannot map the generation's batch lane: {0}")]
    Lane(#[from] forkless_bus::lane::LaneMapError),
    #[error("supervisor sent {0} where a generation was expected")]
    Unexpected(&'static str),
    #[error("received an invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("cannot map arena {arena}: {source}")]
    Map { arena: u32, source: MapError },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("GPU {device}: {source}")]
    Gpu { device: u32, source: forkless_gpu::GpuError },
    #[error("arena {arena} is on GPU {found}, but this worker runs {configured}: the supervisor's backend and the owner disagree; restart the supervisor")]
    WrongPlace { arena: u32, found: String, configured: String },
    #[error("this service cannot use the weights of generation {generation} ({file}): {reason}; point [model] path at weights it accepts")]
    NotAccepted { generation: u64, file: String, reason: String },
}

impl AttachError {
    /// The exit status that tells the supervisor what to do: [`EXIT_FATAL`] (restarting cannot
    /// help), [`EXIT_TEMPORARY`] (out of memory for now: retry later) or 1.
    pub fn exit_code(&self) -> i32 {
        let out_of_memory = match self {
            AttachError::Map { source: forkless_bus::host::MapError::Mmap(e), .. } => {
                forkless_bus::child::is_out_of_memory(e)
            }
            AttachError::Gpu { source, .. } => source.cu_result() == Some(forkless_gpu::CuResult(2)),
            _ => false,
        };
        forkless_bus::child::exit_status(out_of_memory, self.is_fatal())
    }

    /// True when restarting the worker would fail the same way (exit with [`EXIT_FATAL`] so
    /// the supervisor reports instead of restarting).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AttachError::Env(_)
                | AttachError::Orphan(_)
                | AttachError::Load(_)
                | AttachError::Manifest(_)
                | AttachError::WrongPlace { .. }
                | AttachError::NotAccepted { .. }
        )
    }

    /// Logs the error (stderr, which the supervisor shows when it stops on a fatal exit) and
    /// returns the exit status to end the process with.
    pub fn exit(&self) -> std::process::ExitCode {
        tracing::error!("cannot attach: {self}");
        std::process::ExitCode::from(self.exit_code() as u8)
    }
}

/// Why the inherited listener is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("no usable listening socket was inherited: {0}")]
    Inherit(#[from] forkless_bus::child::InheritError),
    #[error("cannot register the inherited listener with tokio: {0}")]
    Register(std::io::Error),
}

/// Why readiness could not be reported.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("ready() was already called")]
    AlreadyReady,
    #[error("bus: {0}")]
    Send(#[from] SendError),
}

/// Counts a worker's finished requests: reported in heartbeats, and the trigger for
/// `max_requests` recycling (the worker drains and exits 0; the supervisor starts a fresh one).
/// `serve` counts every request itself (the `http::count_requests` layer); a service that serves
/// some other way calls [`Requests::finished`] once per request.
#[derive(Debug, Clone)]
pub struct Requests {
    served: Arc<std::sync::atomic::AtomicU64>,
    limit: Option<u64>,
    shutdown: CancellationToken,
}

impl Requests {
    /// Call once per finished request.
    pub fn finished(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if Some(served) == self.limit {
            tracing::info!("served {served} requests (max_requests): draining to be recycled");
            self.shutdown.cancel();
        }
    }

    /// Requests finished so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// Who started a worker process: the check that ties its life to the supervisor's depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Parent {
    /// The supervisor exec'd this process (every worker written in Rust).
    #[default]
    Supervisor,
    /// A launcher the supervisor exec'd forked this process: the master process of a WSGI
    /// server with one worker (`python -m forkless.gunicorn`), whose pid is in
    /// `FORKLESS_LAUNCHER_PID`. The launcher ties itself to the supervisor, this process to the
    /// launcher ([`forkless_bus::child::die_with_launcher`]).
    Launcher,
}

/// Whether this worker should get traffic: true from [`Worker::ready`] until it starts
/// draining. A worker only ever serves generations its service accepted (at attach, and each
/// offer of a hot swap before it is committed), so "ready" always means "serving weights it
/// accepted". Cheap to clone, for a health route.
#[derive(Debug, Clone)]
pub struct Readiness {
    reported: Arc<AtomicBool>,
    generations: Generations,
    shutdown: CancellationToken,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.reported.load(Ordering::Relaxed) && !self.shutdown.is_cancelled()
    }

    /// The generation requests are served from now.
    pub fn generation(&self) -> u64 {
        self.generations.current().number()
    }
}

/// Declares what the service needs before attaching: see [`Worker::builder`].
#[derive(Debug)]
pub struct WorkerBuilder {
    checks: Checks,
    parent: Parent,
    signal_handlers: bool,
    lane_pass: Option<lane::PassFactory>,
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        WorkerBuilder { checks: Checks::default(), parent: Parent::Supervisor, signal_handlers: true, lane_pass: None }
    }
}

impl WorkerBuilder {
    /// How this service runs one pass of the batch lane (see [`lane`]): `make` is called once
    /// per generation, on the runner thread, and returns the function that answers a batch.
    /// Without it this worker only submits to the lane, never runs passes.
    pub fn lane_pass(
        mut self,
        make: impl Fn(&Generation) -> Result<lane::PassFn, String> + Send + Sync + 'static,
    ) -> Self {
        self.lane_pass = Some(lane::PassFactory::new(make));
        self
    }

    /// [`WorkerBuilder::lane_pass`] for a language binding: see [`lane::MakeSharedPass`].
    pub fn lane_pass_shared(
        mut self,
        make: impl Fn(&Arc<Generation>) -> Result<Option<lane::PassFn>, String> + Send + Sync + 'static,
    ) -> Self {
        self.lane_pass = Some(lane::PassFactory(Arc::new(make)));
        self
    }

    /// Who this process's parent is: the supervisor (the default), or a launcher it exec'd
    /// that forked this process (a WSGI server's master; the Python binding says so).
    pub fn parent(mut self, parent: Parent) -> Self {
        self.parent = parent;
        self
    }

    /// Whether SIGTERM/SIGINT fire [`Worker::shutdown_token`] (the default). A worker embedded
    /// in a server that owns its signals (a Python WSGI/ASGI server) turns this off: the server
    /// drains on TERM, and the token still fires for `max_requests` and a vanished supervisor.
    pub fn signal_handlers(mut self, on: bool) -> Self {
        self.signal_handlers = on;
        self
    }

    /// Adds a check every generation must pass before this worker serves it: an [`Expect`]
    /// or any `Fn(&Generation) -> Result<(), String>`. Several checks must all pass.
    pub fn accept(mut self, check: impl Acceptance) -> Self {
        self.checks.push(check);
        self
    }

    /// Attaches to the supervisor named in the environment, maps the current generation and
    /// checks it. A generation the checks refuse is [`AttachError::NotAccepted`] (fatal: exit
    /// with [`AttachError::exit`]).
    pub async fn attach(self) -> Result<Worker, AttachError> {
        let env = ChildEnv::from_env()?;
        match self.parent {
            Parent::Supervisor => forkless_bus::child::die_with_supervisor(&env)?,
            Parent::Launcher => forkless_bus::child::die_with_launcher()?,
        }
        let index = env.index;
        let private_model = (env.sharing == Sharing::None).then(|| env.model.clone());
        // The CUDA context (~0.3 s, once per process) is not part of attaching to a generation.
        let gpu = open_gpu(&env)?;
        let (started, cpu_started) = (Instant::now(), forkless_bus::child::thread_cpu_time());
        let mut bus = forkless_bus::child::connect_to_supervisor(&env).await?;
        let generation = match private_model {
            Some(path) => load_private_copy(&path, gpu.as_ref())?,
            None => receive_generation(&mut bus, gpu.as_ref()).await?,
        };
        self.checks.check(&generation).map_err(|reason| AttachError::NotAccepted {
            generation: generation.number(),
            file: generation.manifest().source.clone(),
            reason,
        })?;
        let attach = AttachTiming {
            wall_us: started.elapsed().as_micros() as u64,
            cpu_us: (forkless_bus::child::thread_cpu_time() - cpu_started).as_micros() as u64,
        };
        let shutdown = CancellationToken::new();
        if self.signal_handlers {
            spawn_signal_handler(shutdown.clone());
        }
        tracing::debug!(index, generation = generation.number(), ?attach, "attached");
        let (release_notice, released) = tokio::sync::mpsc::unbounded_channel();
        let generation = Arc::new(generation.notify_release(release_notice.clone()));
        lane::spawn_runner(&generation, self.lane_pass.as_ref());
        Ok(Worker {
            bus: Some(bus),
            generations: Generations::new(generation),
            checks: Arc::new(self.checks),
            lane_pass: self.lane_pass,
            gpu,
            released: Some(released),
            release_notice,
            index,
            attach,
            requests: Requests { served: Arc::default(), limit: env.max_requests, shutdown: shutdown.clone() },
            reported_ready: Arc::default(),
            fault: Arc::default(),
            shutdown,
            heartbeat: env.heartbeat,
        })
    }
}

/// An attached worker.
#[derive(Debug)]
pub struct Worker {
    /// How this service runs lane passes, for every generation it takes up.
    lane_pass: Option<lane::PassFactory>,
    bus: Option<BusStream>,
    generations: Generations,
    checks: Arc<Checks>,
    /// The GPU this worker maps weights on (backend `cuda`).
    gpu: Option<Gpu>,
    /// Numbers of generations this process has unmapped; drained by the link after `ready`.
    released: Option<tokio::sync::mpsc::UnboundedReceiver<u64>>,
    release_notice: tokio::sync::mpsc::UnboundedSender<u64>,
    index: u32,
    attach: AttachTiming,
    shutdown: CancellationToken,
    requests: Requests,
    reported_ready: Arc<AtomicBool>,
    /// Why the link to the supervisor broke the protocol, if it did (the worker then exits 1).
    fault: Arc<OnceLock<String>>,
    /// How often to tell the supervisor this worker is alive (`None`: no hang detection).
    heartbeat: Option<std::time::Duration>,
}

impl Worker {
    /// Starts declaring what this service needs from the weights:
    /// `Worker::builder().accept(Expect::new().tensor::<f32>("weight", [8192, 2048])).attach().await`.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// Attaches with no acceptance check (any generation is served).
    pub async fn from_env() -> Result<Self, AttachError> {
        Worker::builder().attach().await
    }

    /// The generation this worker serves right now.
    pub fn generation(&self) -> Arc<Generation> {
        self.generations.current()
    }

    /// The slot holding the generation to serve; after a hot swap it holds the new one.
    /// Services take `generations().current()` once per request.
    pub fn generations(&self) -> Generations {
        self.generations.clone()
    }

    /// The GPU (with its context) this worker maps the weights on; `None` on the host backend.
    pub fn gpu(&self) -> Option<&Gpu> {
        self.gpu.as_ref()
    }

    /// This worker's index among its siblings (0..N-1).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Time from connecting to the bus to having the generation mapped and verified.
    pub fn attach_timing(&self) -> AttachTiming {
        self.attach
    }

    /// The request counter ([`serve`] counts by itself).
    pub fn requests(&self) -> Requests {
        self.requests.clone()
    }

    /// Cancelled on SIGTERM/SIGINT, after `max_requests`, or when the supervisor goes away:
    /// stop accepting, drain, exit.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether this worker should get traffic, for a health route.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            reported: self.reported_ready.clone(),
            generations: self.generations.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Why the link to the supervisor failed, if it did: the process should exit non-zero.
    pub fn fault(&self) -> Option<String> {
        self.fault.get().cloned()
    }

    /// Tells the supervisor this worker has warmed up and holds its listener, and starts the
    /// link that takes hot swaps. Call once ([`serve`] does).
    pub async fn ready(&mut self) -> Result<(), ReadyError> {
        let mut bus = self.bus.take().ok_or(ReadyError::AlreadyReady)?;
        let generation = self.generations.current().number();
        bus.send(&Message::Ready { generation, attach: self.attach }, &[]).await?;
        let released = self.released.take().ok_or(ReadyError::AlreadyReady)?;
        let link = link::SupervisorLink {
            gpu: self.gpu.clone(),
            checks: self.checks.clone(),
            heartbeat: self.heartbeat,
            requests: self.requests.clone(),
            bus,
            generations: self.generations.clone(),
            notice: self.release_notice.clone(),
            released,
            offered: None,
            shutdown: self.shutdown.clone(),
            fault: self.fault.clone(),
            lane_pass: self.lane_pass.clone(),
        };
        self.reported_ready.store(true, Ordering::Relaxed);
        tokio::spawn(link.run());
        Ok(())
    }
}

/// The GPU settings the supervisor gave this process (`[cuda]`: device, stack limit, kernel
/// cache), or `None` on the host backend. A service that prepares its GPU work while
/// [`WorkerBuilder::attach`] runs (as the demo's engine does) reads them here.
pub fn cuda_settings() -> Result<Option<CudaSettings>, AttachError> {
    Ok(ChildEnv::from_env()?.cuda().map(CudaSettings::from))
}

/// Runs a worker's `main` future on a multi-threaded tokio runtime (one thread per core) and
/// returns its exit status: `fn main() -> ExitCode { forkless_worker::run(service()) }`.
pub fn run(main: impl std::future::Future<Output = std::process::ExitCode>) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            std::process::ExitCode::from(EXIT_TEMPORARY as u8)
        }
    }
}

/// The weights file of the service (`[model] path`): set for workers and for the
/// `make_if_missing` command, which writes it there.
pub fn model_path() -> Option<PathBuf> {
    std::env::var_os(forkless_bus::ENV_MODEL).map(PathBuf::from)
}

/// With the `cuda` backend (`FORKLESS_BACKEND=cuda`), opens the configured GPU and shrinks
/// its context to the configured stack limit; `None` on the host backend.
fn open_gpu(env: &ChildEnv) -> Result<Option<Gpu>, AttachError> {
    let Some(settings) = env.cuda().map(CudaSettings::from) else { return Ok(None) };
    let device = settings.device;
    let ordinal = settings.ordinal.unwrap_or(device);
    let gpu = Gpu::open_as(ordinal as usize, device as usize).map_err(|source| AttachError::Gpu { device, source })?;
    if let Some(bytes) = settings.stack_limit {
        gpu.set_stack_limit(bytes).map_err(|source| AttachError::Gpu { device, source })?;
    }
    Ok(Some(gpu))
}

/// Receives the generation the supervisor pushes right behind its welcome.
async fn receive_generation(bus: &mut BusStream, gpu: Option<&Gpu>) -> Result<Generation, AttachError> {
    match bus.recv().await? {
        (Message::Generation { manifest, lane }, fds) => map_generation(manifest, fds, lane, gpu),
        (Message::Refused { reason }, _) => Err(AttachError::Refused(reason)),
        (other, _) => Err(AttachError::Unexpected(other.kind())),
    }
}

/// Validates the manifest, then maps each arena's fd: host memory after checking it is sealed
/// and sized, GPU memory read-only on this worker's GPU.
pub(crate) fn map_generation(
    manifest: Manifest,
    mut fds: Vec<OwnedFd>,
    lane: Option<LaneSettings>,
    gpu: Option<&Gpu>,
) -> Result<Generation, AttachError> {
    manifest.validate()?;
    // The channel checked the count: one fd per arena, then the lane's when there is one.
    let lane = match (lane, fds.len() > manifest.arenas.len()) {
        (Some(settings), true) => {
            let fd = fds.pop().expect("one more fd than arenas");
            Some((forkless_bus::lane::Lane::map(fd)?, settings))
        }
        _ => None,
    };
    let arenas =
        manifest.arenas.iter().zip(fds).map(|(arena, fd)| map_arena(arena, fd, gpu)).collect::<Result<Vec<_>, _>>()?;
    Ok(Generation::new(manifest, arenas, gpu.cloned()).with_lane(lane))
}

fn map_arena(
    arena: &forkless_bus::manifest::ArenaDesc,
    fd: OwnedFd,
    gpu: Option<&Gpu>,
) -> Result<MappedArena, AttachError> {
    use forkless_bus::manifest::MemoryKind;
    let place =
        |gpu: Option<&Gpu>| gpu.map_or("the host backend".to_string(), |g| format!("GPU {}", g.service_device()));
    match (arena.kind, gpu) {
        (MemoryKind::Host, None) => ArenaMap::map(fd, arena.size)
            .map(MappedArena::Host)
            .map_err(|source| AttachError::Map { arena: arena.id, source }),
        (MemoryKind::CudaVmm { device }, Some(gpu)) if gpu.service_device() == device as usize => {
            forkless_gpu::ImportedArena::import(gpu, fd, arena.size, forkless_gpu::Access::ReadOnly)
                .map(MappedArena::Device)
                .map_err(|source| AttachError::Gpu { device, source })
        }
        (kind, gpu) => Err(AttachError::WrongPlace {
            arena: arena.id,
            found: match kind {
                MemoryKind::Host => "host memory".into(),
                MemoryKind::CudaVmm { device } => format!("GPU {device}"),
            },
            configured: place(gpu),
        }),
    }
}

/// Reads a safetensors file into a private, read-only host copy of this process, as generation
/// 0: the views a worker gets, without a supervisor (tests, tools, notebooks).
pub fn load_private(path: &Path) -> Result<Generation, AttachError> {
    load_private_copy(path, None)
}

/// The `sharing = none` baseline: this process reads its own copy of the weights, into host
/// memory or onto its GPU.
fn load_private_copy(path: &Path, gpu: Option<&Gpu>) -> Result<Generation, AttachError> {
    let file = ModelFile::open(path)?;
    if let Some(gpu) = gpu {
        return load_private_gpu_copy(&file, gpu);
    }
    let (arena, tensors) = file.layout();
    let mut copied = Ok(());
    let map = ArenaMap::private(arena.size, |bytes| {
        copied = file.copy_into(&tensors, |offset, chunk| {
            bytes[offset as usize..][..chunk.len()].copy_from_slice(chunk);
            Ok(())
        });
    })
    .map_err(|source| AttachError::Map { arena: 0, source })?;
    copied?;
    let manifest = Manifest::new(path.display().to_string(), vec![arena], tensors);
    manifest.validate()?;
    Ok(Generation::new(manifest, vec![MappedArena::Host(map)], None))
}

fn load_private_gpu_copy(file: &ModelFile, gpu: &Gpu) -> Result<Generation, AttachError> {
    use forkless_weights::cuda::{fill_arena, FillError};
    let filled = fill_arena(file, gpu).map_err(|e| match e {
        FillError::Read(source) => AttachError::Load(LoadError::Read { path: file.path().into(), source }),
        FillError::Gpu(source) => AttachError::Gpu { device: gpu.service_device() as u32, source },
    })?;
    let manifest = Manifest::new(file.path().display().to_string(), vec![filled.desc], filled.tensors);
    manifest.validate()?;
    Ok(Generation::new(manifest, vec![MappedArena::PrivateDevice(filled.arena)], Some(gpu.clone())))
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install SIGTERM/SIGINT handlers; stopping");
            shutdown.cancel();
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancel();
    });
}

/// The listening sockets the supervisor bound and passed as fds 3.. (`LISTEN_FDS`), in config
/// order, ready for tokio. Call once.
pub fn inherited_listeners() -> Result<Vec<tokio::net::TcpListener>, ListenerError> {
    forkless_bus::child::take_inherited_listeners()?
        .into_iter()
        .map(|listener| {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        })
        .collect::<Result<_, _>>()
        .map_err(ListenerError::Register)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_memory_on_a_host_worker_is_a_fatal_mismatch() {
        use forkless_bus::manifest::{ArenaDesc, MemoryKind};
        let (fd, _other) = rustix::pipe::pipe().unwrap();
        let desc = ArenaDesc { id: 0, kind: MemoryKind::CudaVmm { device: 0 }, size: 2 << 20, checksum: 0 };
        let err = map_arena(&desc, fd, None).unwrap_err();
        assert!(matches!(err, AttachError::WrongPlace { .. }), "{err}");
        assert_eq!(err.exit_code(), EXIT_FATAL);
        let text = err.to_string();
        assert!(text.contains("GPU 0") && text.contains("host backend") && text.contains("restart"), "{text}");
    }

    #[test]
    fn exit_codes_tell_the_supervisor_what_to_do() {
        let enomem = std::io::Error::from_raw_os_error(rustix::io::Errno::NOMEM.raw_os_error());
        let oom = AttachError::Map { arena: 0, source: forkless_bus::host::MapError::Mmap(enomem) };
        assert_eq!(oom.exit_code(), forkless_bus::child::EXIT_TEMPORARY);
        assert_eq!(AttachError::Env(ChildEnvError::Missing("X")).exit_code(), EXIT_FATAL);
        assert_eq!(AttachError::Refused("no".into()).exit_code(), 1);
    }
}
