//! The worker side of forkless, as a library any service can embed.
//!
//! A worker is a process the supervisor `exec`s with the bus socket, its index and (systemd
//! convention, `LISTEN_FDS`) an already-bound listening socket in its environment.
//! [`Worker::from_env`] ties the process to the supervisor (`PR_SET_PDEATHSIG`), attaches the
//! current generation of weights read-only, and arms SIGTERM/SIGINT handling. The service then
//! takes the inherited listener, warms up, calls [`Worker::ready`], and serves until
//! [`Worker::shutdown_token`] fires: stop accepting, finish in-flight requests, exit.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let mut worker = forkless_worker::Worker::from_env().await?;
//! let generation = worker.generation();
//! let weight: &[f32] = generation.tensor::<f32>("weight")?;
//! let listeners = forkless_worker::inherited_listeners()?;
//! // ... build the service around `weight`, warm it up ...
//! worker.ready().await?;
//! let stop = worker.shutdown_token();
//! stop.cancelled().await; // axum: serve(listener, app).with_graceful_shutdown(stop.cancelled_owned())
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod generation;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use forkless_bus::channel::{RecvError, SendError};
use forkless_bus::host::{ArenaMap, MapError};
use forkless_bus::manifest::ManifestError;
use forkless_bus::{BusStream, Manifest, Message, Role};
use forkless_owner::model_file::{LoadError, ModelFile};
use tokio_util::sync::CancellationToken;

pub use forkless_bus::wire::AttachTiming;
pub use forkless_gpu::{DeviceView, Gpu};
pub use forkless_owner::cuda::CudaSettings;
use generation::MappedArena;
pub use generation::{Element, Generation, Generations, ViewError};

/// Why a worker could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0} is not set: workers are started by `supervisor run`, which sets it")]
    Env(&'static str),
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
    #[error("supervisor sent {0} where a generation was expected")]
    Unexpected(&'static str),
    #[error("received an invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("cannot map arena {arena}: {source}")]
    Map { arena: u32, source: MapError },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Settings(#[from] forkless_owner::OwnerError),
    #[error("GPU {device}: {source}")]
    Gpu { device: u32, source: forkless_gpu::GpuError },
    #[error("arena {arena} is on GPU {found}, but this worker runs {configured}: the supervisor's backend and the owner disagree; restart the supervisor")]
    WrongPlace { arena: u32, found: String, configured: String },
}

impl AttachError {
    /// The exit status that tells the supervisor what to do: [`EXIT_FATAL`] (restarting cannot
    /// help), [`forkless_bus::child::EXIT_TEMPORARY`] (out of memory for now: retry later) or 1.
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

    /// True when restarting the worker would fail the same way (exit with
    /// [`forkless_bus::child::EXIT_FATAL`] so the supervisor reports instead of restarting).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AttachError::Env(_)
                | AttachError::Orphan(_)
                | AttachError::Load(_)
                | AttachError::Manifest(_)
                | AttachError::Settings(_)
                | AttachError::WrongPlace { .. }
        )
    }
}

pub use forkless_bus::child::EXIT_FATAL;

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
#[derive(Debug, Clone)]
pub struct Requests {
    served: Arc<std::sync::atomic::AtomicU64>,
    limit: Option<u64>,
    shutdown: CancellationToken,
}

impl Requests {
    /// Call once per finished request.
    pub fn finished(&self) {
        let served = self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if Some(served) == self.limit {
            tracing::info!("served {served} requests (max_requests): draining to be recycled");
            self.shutdown.cancel();
        }
    }

    /// Requests finished so far.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
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

/// How [`Worker::attach`] ties the process to the supervisor; the default is what
/// [`Worker::from_env`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOptions {
    /// Who this process's parent must be.
    pub parent: Parent,
    /// Whether SIGTERM/SIGINT fire [`Worker::shutdown_token`] (the default). A worker embedded
    /// in a server that owns its signals (a Python WSGI/ASGI server) turns this off: the server
    /// drains on TERM, and the token still fires for `max_requests` and a vanished supervisor.
    pub signal_handlers: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions { parent: Parent::Supervisor, signal_handlers: true }
    }
}

/// An attached worker.
#[derive(Debug)]
pub struct Worker {
    bus: Option<BusStream>,
    generations: Generations,
    /// The GPU this worker maps weights on (backend `cuda`).
    gpu: Option<Gpu>,
    /// Numbers of generations this process has unmapped; drained by the link after `ready`.
    released: Option<tokio::sync::mpsc::UnboundedReceiver<u64>>,
    release_notice: tokio::sync::mpsc::UnboundedSender<u64>,
    index: u32,
    attach: AttachTiming,
    shutdown: CancellationToken,
    requests: Requests,
}

fn env(name: &'static str) -> Result<String, AttachError> {
    std::env::var(name).map_err(|_| AttachError::Env(name))
}

impl Worker {
    /// Attaches to the supervisor named in the environment and maps the current generation.
    pub async fn from_env() -> Result<Self, AttachError> {
        Self::attach(AttachOptions::default()).await
    }

    /// [`Worker::from_env`] with options: for a worker whose parent is a launcher rather than
    /// the supervisor, or whose server owns SIGTERM/SIGINT (the Python binding uses both).
    pub async fn attach(options: AttachOptions) -> Result<Self, AttachError> {
        match options.parent {
            Parent::Supervisor => forkless_bus::child::die_with_supervisor()?,
            Parent::Launcher => forkless_bus::child::die_with_launcher()?,
        }
        let index = env(forkless_bus::ENV_INDEX)?.parse().map_err(|_| AttachError::Env(forkless_bus::ENV_INDEX))?;
        let private_model = match std::env::var(forkless_bus::ENV_SHARING).as_deref() {
            Ok("none") => Some(PathBuf::from(env(forkless_bus::ENV_MODEL)?)),
            _ => None,
        };
        // The CUDA context (~0.3 s, once per process) is not part of attaching to a generation.
        let gpu = open_gpu()?;
        let (started, cpu_started) = (Instant::now(), forkless_bus::child::thread_cpu_time());
        let mut bus = forkless_bus::child::connect_to_supervisor(Role::Worker).await?;
        let generation = match private_model {
            Some(path) => load_private_copy(&path, gpu.as_ref())?,
            None => receive_generation(&mut bus, gpu.as_ref()).await?,
        };
        let attach = AttachTiming {
            wall_us: started.elapsed().as_micros() as u64,
            cpu_us: (forkless_bus::child::thread_cpu_time() - cpu_started).as_micros() as u64,
        };
        let shutdown = CancellationToken::new();
        if options.signal_handlers {
            spawn_signal_handler(shutdown.clone());
        }
        tracing::debug!(index, generation = generation.number(), ?attach, "attached");
        let (release_notice, released) = tokio::sync::mpsc::unbounded_channel();
        let generation = Arc::new(generation.notify_release(release_notice.clone()));
        Ok(Worker {
            bus: Some(bus),
            generations: Generations::new(generation),
            gpu,
            released: Some(released),
            release_notice,
            index,
            attach,
            requests: Requests {
                served: Arc::default(),
                limit: std::env::var(forkless_bus::ENV_MAX_REQUESTS)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0),
                shutdown: shutdown.clone(),
            },
            shutdown,
        })
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

    /// The request counter to call [`Requests::finished`] on.
    pub fn requests(&self) -> Requests {
        self.requests.clone()
    }

    /// Cancelled on SIGTERM/SIGINT or when the supervisor goes away: stop accepting, drain, exit.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Tells the supervisor this worker has warmed up and holds its listener. Call once.
    pub async fn ready(&mut self) -> Result<(), ReadyError> {
        let mut bus = self.bus.take().ok_or(ReadyError::AlreadyReady)?;
        let generation = self.generations.current().number();
        bus.send(&Message::Ready { generation, attach: self.attach }, &[]).await?;
        let (notice, released) = (self.release_notice.clone(), self.released.take().ok_or(ReadyError::AlreadyReady)?);
        let heartbeat = std::env::var(forkless_bus::ENV_HEARTBEAT_MS)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&ms: &u64| ms > 0)
            .map(std::time::Duration::from_millis);
        let link = SupervisorLink {
            gpu: self.gpu.clone(),
            heartbeat,
            requests: self.requests.clone(),
            bus,
            generations: self.generations.clone(),
            notice,
            released,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(link.run());
        Ok(())
    }
}

/// The GPU settings the supervisor gave this process (`[cuda]`: device, stack limit, kernel
/// cache), or `None` on the host backend. A service that prepares its GPU work while
/// [`Worker::from_env`] attaches (as the demo's engine does) reads them here.
pub fn cuda_settings() -> Result<Option<CudaSettings>, AttachError> {
    if std::env::var(forkless_bus::ENV_BACKEND).as_deref() != Ok("cuda") {
        return Ok(None);
    }
    Ok(Some(forkless_owner::cuda_settings_from_env()?))
}

/// With the `cuda` backend (`FORKLESS_BACKEND=cuda`), opens the configured GPU and shrinks
/// its context to the configured stack limit; `None` on the host backend.
fn open_gpu() -> Result<Option<Gpu>, AttachError> {
    let Some(settings) = cuda_settings()? else { return Ok(None) };
    let device = settings.device;
    let gpu = Gpu::open(device as usize).map_err(|source| AttachError::Gpu { device, source })?;
    if let Some(bytes) = settings.stack_limit {
        gpu.set_stack_limit(bytes).map_err(|source| AttachError::Gpu { device, source })?;
    }
    Ok(Some(gpu))
}

/// Receives the generation the supervisor pushes right behind its welcome.
async fn receive_generation(bus: &mut BusStream, gpu: Option<&Gpu>) -> Result<Generation, AttachError> {
    match bus.recv().await? {
        (Message::Generation { manifest }, fds) => map_generation(manifest, fds, gpu),
        (Message::Refused { reason }, _) => Err(AttachError::Refused(reason)),
        (other, _) => Err(AttachError::Unexpected(other.kind())),
    }
}

/// Validates the manifest, then maps each arena's fd: host memory after checking it is sealed
/// and sized, GPU memory read-only on this worker's GPU.
fn map_generation(manifest: Manifest, fds: Vec<OwnedFd>, gpu: Option<&Gpu>) -> Result<Generation, AttachError> {
    manifest.validate()?;
    let arenas =
        manifest.arenas.iter().zip(fds).map(|(arena, fd)| map_arena(arena, fd, gpu)).collect::<Result<Vec<_>, _>>()?;
    Ok(Generation::new(manifest, arenas, gpu.cloned()))
}

fn map_arena(
    arena: &forkless_bus::manifest::ArenaDesc,
    fd: OwnedFd,
    gpu: Option<&Gpu>,
) -> Result<MappedArena, AttachError> {
    use forkless_bus::manifest::MemoryKind;
    let place = |gpu: Option<&Gpu>| gpu.map_or("the host backend".to_string(), |g| format!("GPU {}", g.ordinal()));
    match (arena.kind, gpu) {
        (MemoryKind::Host, None) => ArenaMap::map(fd, arena.size)
            .map(MappedArena::Host)
            .map_err(|source| AttachError::Map { arena: arena.id, source }),
        (MemoryKind::CudaVmm { device }, Some(gpu)) if gpu.ordinal() == device as usize => {
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
    use forkless_owner::cuda::{fill_arena, FillError};
    let filled = fill_arena(file, gpu).map_err(|e| match e {
        FillError::Read(source) => AttachError::Load(LoadError::Read { path: file.path().into(), source }),
        FillError::Gpu(source) => AttachError::Gpu { device: gpu.ordinal() as u32, source },
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

/// After ready, the bus carries hot swaps in (new generations) and releases out; its closing
/// means the supervisor is gone, and the worker drains.
struct SupervisorLink {
    gpu: Option<Gpu>,
    heartbeat: Option<std::time::Duration>,
    requests: Requests,
    bus: BusStream,
    generations: Generations,
    notice: tokio::sync::mpsc::UnboundedSender<u64>,
    released: tokio::sync::mpsc::UnboundedReceiver<u64>,
    shutdown: CancellationToken,
}

impl SupervisorLink {
    async fn run(mut self) {
        let mut beat = self.heartbeat.map(tokio::time::interval);
        loop {
            let tick = async {
                match beat.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick => {
                    let requests = self.requests.served();
                    if let Err(e) = self.bus.send(&Message::Heartbeat { requests }, &[]).await {
                        return self.end(&format!("bus error: {e}"));
                    }
                }
                received = self.bus.recv() => match received {
                    Ok((Message::Generation { manifest }, fds)) => self.switch(manifest, fds),
                    Ok((msg, _)) => return self.end(&format!("unexpected {} from the supervisor", msg.kind())),
                    Err(RecvError::Closed) => return self.end("the supervisor closed the bus"),
                    Err(e) => return self.end(&format!("bus error: {e}")),
                },
                Some(generation) = self.released.recv() => {
                    tracing::info!(generation, "generation {generation} released");
                    if let Err(e) = self.bus.send(&Message::Released { generation }, &[]).await {
                        return self.end(&format!("bus error: {e}"));
                    }
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Maps a pushed generation and makes it current; requests already running finish on the
    /// old one, which is unmapped (and reported released) when the last of them ends. A
    /// generation that cannot be mapped is reported released at once, so it never pins memory.
    fn switch(&mut self, manifest: Manifest, fds: Vec<OwnedFd>) {
        let number = manifest.generation;
        match map_generation(manifest, fds, self.gpu.as_ref()) {
            Ok(next) => {
                let previous = self.generations.replace(Arc::new(next.notify_release(self.notice.clone())));
                tracing::info!(generation = number, previous = previous.number(), "switched to generation {number}");
            }
            Err(e) => {
                tracing::error!("cannot attach generation {number}: {e}; still serving the current one");
                let _ = self.notice.send(number);
            }
        }
    }

    fn end(&self, why: &str) {
        tracing::warn!("{why}: draining");
        self.shutdown.cancel();
    }
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
        assert_eq!(AttachError::Env("X").exit_code(), EXIT_FATAL);
        assert_eq!(AttachError::Refused("no".into()).exit_code(), 1);
    }
}
