//! The forkless supervisor: reads `config.toml`, binds the listeners and the bus, `exec`s one
//! owner and N workers, keeps the weights' file descriptors in escrow, restarts whatever dies,
//! and stops everything, workers first, on SIGTERM/SIGINT. It never maps the weights and never
//! touches CUDA, so it can never be the process a fork breaks.
//!
//! Where things live:
//! - the restart policy (backoff, intensity, what an exit status means): [`restart`];
//! - one slot's life (start timeout, hangs, replacement): [`slot`]; starting and stopping one
//!   child: [`children`]; spawning from one long-lived, `PR_SET_PDEATHSIG`-safe thread: [`spawn`];
//! - the job API (status, scale, restart, reload, stop) and signals: [`service`], [`shutdown`],
//!   reached through [`control`];
//! - the escrow of generations: [`escrow`]; the bus protocol's server side: [`bus_server`];
//! - which memory holds the weights (host or a GPU), resolved once at start: [`backend`].
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let config = forkless_supervisor::config::Config::load("examples/linear/config.toml".as_ref())?;
//! let (health, _) = tokio::sync::watch::channel(Default::default());
//! forkless_supervisor::run(config, forkless_supervisor::RunOptions::default(), health).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod backend;
mod bus_server;
mod children;
pub mod config;
pub mod control;
pub mod escrow;
mod events;
mod groups;
pub mod limits;
mod link;
mod listeners;
pub mod logging;
mod metrics;
mod owner_link;
pub mod processes;
mod restart;
mod runtime_dir;
mod sd_notify;
pub mod service;
mod shutdown;
mod slot;
mod spawn;
mod worker_link;

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::{ResolvedBackend, RunningBackend};
use crate::bus_server::BusServer;
use crate::children::Context;
use crate::config::{Backend, Config, Sharing};
use crate::escrow::Escrow;
use crate::link::BusState;
use crate::listeners::Listeners;
use crate::runtime_dir::RuntimeDir;
use crate::service::{Health, Service};
use crate::shutdown::Stop;
use crate::spawn::{ChildSpec, Spawner};

pub use listeners::BindError as ListenError;
pub use runtime_dir::RuntimeDirError;

/// Why `supervisor run` stopped with a failure. Each names what failed and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("cannot start the memory-measuring thread: {0}")]
    Meter(std::io::Error),
    #[error(transparent)]
    Control(#[from] control::BindError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot create the bus socket {path}: {error}")]
    BusSocket { path: std::path::PathBuf, error: std::io::Error },
    /// The weights file is missing, not a regular file, or `make_if_missing` did not make it.
    #[error("{0}")]
    Model(String),
    /// Something restarting cannot fix (a crash loop, every GPU failed, …): the reason.
    #[error("{0}")]
    Fatal(String),
}

/// What `supervisor run` was told on its command line, beside the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--backend`: overrides `[model] backend`.
    pub backend: Option<Backend>,
}

/// The executable that answers `owner` and `probe-gpu`: not `current_exe()`, since after an
/// in-place upgrade that path names the new binary (or nothing), while `/proc/self/exe` is
/// always the supervisor that is running.
const SELF_EXE: &str = "/proc/self/exe";

/// Runs the supervisor until a stop signal (`Ok`) or a fatal failure (`Err` with the reason).
/// `health` receives liveness and readiness (for `/livez` and `/readyz`).
pub async fn run(config: Config, options: RunOptions, health: watch::Sender<Health>) -> Result<(), RunError> {
    let started = std::time::Instant::now();
    let spawner = Spawner::start(tokio::runtime::Handle::current());
    let stop = Stop::default();
    shutdown::on_signals(stop.clone()).map_err(RunError::Signals)?;
    let runtime_dir = RuntimeDir::open(&config.source, config.supervisor.runtime_dir.as_deref())?;
    let meter = processes::MemoryMeter::start().map_err(RunError::Meter)?;
    let control = control::ControlSocket::bind(&runtime_dir.control_socket(), meter.clone())?;
    let requested = options.backend.unwrap_or(config.model.backend);
    let resolved = backend::resolve(requested, &config, &spawner, Path::new(SELF_EXE)).await?;
    tracing::info!(backend = resolved.env_value(), "backend {resolved}");
    ensure_model(&config, &spawner, &stop.token()).await?;
    let backend = running_backend(resolved, &config, &runtime_dir)?;
    let listeners = Listeners::bind(&config.workers.listen, config.workers.backlog)?;
    let addrs: Vec<String> = listeners.local_addrs().iter().map(ToString::to_string).collect();
    let bus_socket = runtime_dir.bus_socket();
    let bus_listener =
        UnixListener::bind(&bus_socket).map_err(|error| RunError::BusSocket { path: bus_socket.clone(), error })?;
    tracing::info!(
        workers = config.workers.count,
        sharing = ?config.model.sharing,
        addrs = addrs.join(","),
        bus = %bus_socket.display(),
        "forkless supervisor {} listening on {}",
        std::process::id(),
        addrs.join(", "),
    );

    let (events, event_inbox) = mpsc::unbounded_channel();
    let (commands, command_inbox) = mpsc::unbounded_channel();
    service::forward_signals(commands.clone()).map_err(RunError::Signals)?;
    let bus_stop = CancellationToken::new();
    let mut bus_state = BusState::new(
        Escrow::new(config.lane.layout()),
        events,
        config.model.sharing == Sharing::Shared,
        config.model.path.display().to_string(),
        config.model.load_timeout(),
        config.lane.settings(),
    );
    bus_state.devices = backend.resolved.devices();
    let bus = BusServer { listener: bus_listener, state: bus_state.clone(), stop: bus_stop.clone() };
    let bus_task = tokio::spawn(bus.serve());
    let control_task = tokio::spawn(control.serve(commands, bus_stop.clone()));
    let ctx = Context::new(config, backend, spawner, listeners, bus_socket, bus_state, stop.fast_token());
    let ctx = Arc::new(ctx.with_groups(runtime_dir.groups().clone()));
    let metrics_task = tokio::spawn(metrics::record_periodically(ctx.clone(), meter, bus_stop.clone()));

    let failure = Service::new(ctx, stop, health).counting_from(started).run(event_inbox, command_inbox).await;

    bus_stop.cancel();
    let _ = tokio::join!(bus_task, control_task, metrics_task);
    drop(runtime_dir);
    match failure {
        Some(reason) => Err(RunError::Fatal(reason)),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// The resolved backend with what its children need: for cuda, a private kernel cache.
fn running_backend(
    resolved: ResolvedBackend,
    config: &Config,
    dir: &RuntimeDir,
) -> Result<RunningBackend, RuntimeDirError> {
    let kernel_cache = match resolved {
        ResolvedBackend::Cuda { .. } => Some(dir.kernel_cache()?),
        ResolvedBackend::Host => None,
    };
    Ok(RunningBackend { resolved, configured: config.model.backend, kernel_cache })
}

/// Whether `[model] path` exists; an error if it exists but is not a regular file (a FIFO
/// would block the owner's `open` until its start timeout, again and again).
fn weights_file_exists(config: &Config) -> Result<bool, RunError> {
    let path = &config.model.path;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(true),
        Ok(meta) => Err(RunError::Model(format!(
            "weights file {} ([model] path in {}) is {}, not a regular file: point it at a safetensors file",
            path.display(),
            config.source.display(),
            file_kind(meta.file_type()),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(RunError::Model(format!(
            "cannot read weights file {} ([model] path in {}): {e}",
            path.display(),
            config.source.display()
        ))),
    }
}

fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match kind {
        k if k.is_dir() => "a directory",
        k if k.is_fifo() => "a FIFO (named pipe)",
        k if k.is_socket() => "a socket",
        k if k.is_char_device() || k.is_block_device() => "a device",
        _ => "not a regular file",
    }
}

/// Makes sure the weights file exists before anything starts: a missing file is a clear
/// error naming it, not a restart loop of owners that cannot load it.
async fn ensure_model(config: &Config, spawner: &Spawner, stop: &CancellationToken) -> Result<(), RunError> {
    let path = &config.model.path;
    if weights_file_exists(config)? {
        return Ok(());
    }
    let Some(command) = &config.model.make_if_missing else {
        return Err(RunError::Model(format!(
            "weights file {} ([model] path in {}) does not exist: create it, or set [model] make_if_missing to a command that does",
            path.display(),
            config.source.display()
        )));
    };
    tracing::info!("weights file {} is missing: running {:?}", path.display(), command);
    let mut spec = ChildSpec::new(config::resolve_program(&command[0], config.base_dir()));
    spec.args = command[1..].to_vec();
    spec.env.push((forkless_bus::ENV_MODEL.into(), path.display().to_string()));
    let make_failed =
        |e: std::io::Error| RunError::Model(format!("[model] make_if_missing in {}: {e}", config.source.display()));
    let mut child = spawner.spawn(spec).await.map_err(make_failed)?;
    let mut stderr = child.stderr.take().expect("spawned with piped stderr");
    let collect = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let status = tokio::select! {
        status = child.wait() => status.map_err(make_failed)?,
        _ = stop.cancelled() => {
            let pid = child.id().unwrap_or(0);
            children::signal_group(pid, rustix::process::Signal::KILL);
            let _ = child.wait().await;
            return Err(RunError::Model(format!(
                "stopped while [model] make_if_missing was writing {}",
                path.display()
            )));
        }
    };
    let stderr = collect.await.unwrap_or_default();
    if !status.success() || !weights_file_exists(config)? {
        return Err(RunError::Model(format!(
            "[model] make_if_missing {:?} ({}) did not create {}: {}",
            command,
            status,
            path.display(),
            stderr.trim()
        )));
    }
    Ok(())
}
