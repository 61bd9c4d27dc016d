//! The forkless supervisor: reads `config.toml`, binds the listeners and the bus, `exec`s one
//! owner and N workers, keeps the weights' file descriptors in escrow, restarts whatever dies,
//! and stops everything, workers first, on SIGTERM/SIGINT. It never maps the weights and never
//! touches CUDA, so it can never be the process a fork breaks.
//!
//! Where things live: the restart policy in [`restart`], the escrow in [`escrow`], spawning
//! (one long-lived thread, `PR_SET_PDEATHSIG`-safe) in [`spawn`], child slots in [`children`],
//! the bus protocol's server side in [`bus_server`].
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let config = forkless_supervisor::config::Config::load("examples/linear/config.toml".as_ref())?;
//! forkless_supervisor::run(config).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod bus_server;
pub mod children;
pub mod config;
pub mod control;
pub mod escrow;
pub mod events;
pub mod listeners;
pub mod logging;
pub mod restart;
pub mod runtime_dir;
pub mod shutdown;
pub mod spawn;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use forkless_bus::Role;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus_server::{BusServer, BusState};
use crate::children::{supervise, Context};
use crate::config::{Config, Sharing};
use crate::escrow::Escrow;
use crate::events::Event;
use crate::listeners::Listeners;
use crate::runtime_dir::RuntimeDir;
use crate::spawn::{ChildLabel, ChildSpec, PidTable, Spawner};

const OWNER: ChildLabel = ChildLabel {
    role: Role::Owner,
    index: 0,
};

/// Runs the supervisor until a stop signal (`Ok`) or a fatal failure (`Err` with the reason).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let spawner = Spawner::start(tokio::runtime::Handle::current());
    let stop = CancellationToken::new();
    shutdown::on_signals(stop.clone()).context("cannot install signal handlers")?;
    let control =
        control::ControlSocket::bind(&control::socket_path(&config), &config.source).await?;
    ensure_model(&config, &spawner, &stop).await?;
    let runtime_dir = RuntimeDir::create(config.supervisor.runtime_dir.as_deref())?;
    let listeners = Listeners::bind(&config.workers.listen, config.workers.backlog)?;
    let addrs: Vec<String> = listeners
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    let bus_socket = runtime_dir.bus_socket();
    let bus_listener = UnixListener::bind(&bus_socket)
        .with_context(|| format!("cannot create bus socket {}", bus_socket.display()))?;
    tracing::info!(
        workers = config.workers.count,
        sharing = ?config.model.sharing,
        addrs = addrs.join(","),
        bus = %bus_socket.display(),
        "forkless supervisor {} listening on {}",
        std::process::id(),
        addrs.join(", "),
    );

    let (events, mut inbox) = mpsc::unbounded_channel();
    let escrow = Escrow::default();
    let pids = PidTable::default();
    let bus_stop = CancellationToken::new();
    let bus_state = BusState::new(
        escrow.clone(),
        events.clone(),
        config.model.sharing == Sharing::Shared,
        config.model.path.display().to_string(),
    );
    let bus = BusServer {
        listener: bus_listener,
        pids: pids.clone(),
        state: bus_state.clone(),
        stop: bus_stop.clone(),
    };
    let bus_task = tokio::spawn(bus.serve());
    let control_task = tokio::spawn(control.serve(bus_state.clone(), bus_stop.clone()));
    let count = config.workers.count;
    let sharing = config.model.sharing;
    let ctx = Arc::new(Context {
        config,
        spawner,
        pids,
        listeners,
        bus_socket,
        bus: bus_state,
        events,
    });

    let owner_stop = CancellationToken::new();
    let owner_task = (sharing == Sharing::Shared)
        .then(|| tokio::spawn(supervise(ctx.clone(), OWNER, owner_stop.clone())));
    let workers = TaskTracker::new();
    let workers_stop = CancellationToken::new();
    let mut state = MainLoop {
        count,
        started,
        ready: BTreeSet::new(),
        announced: false,
        workers_started: false,
        owner_lost_at: None,
    };
    if sharing == Sharing::None {
        state.start_workers(&ctx, &workers, &workers_stop);
    }
    let failure = loop {
        tokio::select! {
            event = inbox.recv() => match event {
                Some(Event::Fatal(reason)) => break Some(reason),
                Some(event) => state.on_event(event, &ctx, &workers, &workers_stop),
                None => break None,
            },
            _ = stop.cancelled() => break None,
        }
    };

    // Stop in the reverse order of start: workers drain first, then the owner, then the bus.
    workers_stop.cancel();
    workers.close();
    workers.wait().await;
    owner_stop.cancel();
    if let Some(task) = owner_task {
        let _ = task.await;
    }
    bus_stop.cancel();
    let _ = bus_task.await;
    let _ = control_task.await;
    drop(runtime_dir);
    match failure {
        Some(reason) => bail!(reason),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// The main loop's bookkeeping: which workers are ready, whether they were started.
struct MainLoop {
    count: u32,
    started: Instant,
    ready: BTreeSet<u32>,
    announced: bool,
    workers_started: bool,
    /// When the owner last died, until a new one adopts the escrow (for the recovery time).
    owner_lost_at: Option<Instant>,
}

impl MainLoop {
    fn on_event(
        &mut self,
        event: Event,
        ctx: &Arc<Context>,
        workers: &TaskTracker,
        stop: &CancellationToken,
    ) {
        match event {
            Event::Published {
                generation,
                source,
                bytes,
            } => {
                tracing::info!(
                    generation,
                    bytes,
                    "generation {generation} of {source} is in escrow"
                );
                self.start_workers(ctx, workers, stop);
            }
            Event::WorkerReady {
                index,
                pid,
                generation,
                attach,
            } => {
                let (attach_us, attach_cpu_us) = (attach.wall_us, attach.cpu_us);
                tracing::info!(
                    index,
                    pid,
                    generation,
                    attach_us,
                    attach_cpu_us,
                    "worker {index} ready"
                );
                self.ready.insert(index);
                if self.ready.len() == self.count as usize && !self.announced {
                    self.announced = true;
                    let cold_start_ms = self.started.elapsed().as_millis() as u64;
                    tracing::info!(cold_start_ms, "all {} workers ready", self.count);
                }
            }
            Event::Exited { label, .. } => match label.role {
                Role::Worker => {
                    self.ready.remove(&label.index);
                }
                Role::Owner => self.owner_lost_at = Some(Instant::now()),
            },
            Event::Freed { generation } => {
                tracing::info!(
                    generation,
                    "generation {generation} is no longer used by any worker: its memory is freed"
                );
            }
            Event::Adopted { generation } => {
                let recovered_ms = self
                    .owner_lost_at
                    .take()
                    .map(|t| t.elapsed().as_secs_f64() * 1e3);
                tracing::info!(
                    generation,
                    recovered_ms,
                    "owner re-adopted generation {generation} from escrow without reading the weights file"
                );
            }
            Event::Fatal(_) => unreachable!("handled by the caller"),
        }
    }

    /// Workers start once, after the first generation exists (or at once with sharing = none).
    fn start_workers(
        &mut self,
        ctx: &Arc<Context>,
        workers: &TaskTracker,
        stop: &CancellationToken,
    ) {
        if self.workers_started {
            return;
        }
        self.workers_started = true;
        for index in 0..self.count {
            let label = ChildLabel {
                role: Role::Worker,
                index,
            };
            workers.spawn(supervise(ctx.clone(), label, stop.clone()));
        }
    }
}

/// Makes sure the weights file exists before anything starts: a missing file is a clear
/// error naming it, not a restart loop of owners that cannot load it.
async fn ensure_model(
    config: &Config,
    spawner: &Spawner,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let path = &config.model.path;
    if path.exists() {
        return Ok(());
    }
    let Some(command) = &config.model.make_if_missing else {
        bail!(
            "weights file {} ([model] path in {}) does not exist: create it, or set [model] make_if_missing to a command that does",
            path.display(),
            config.source.display()
        );
    };
    tracing::info!(
        "weights file {} is missing: running {:?}",
        path.display(),
        command
    );
    let mut spec = ChildSpec::new(config::resolve_program(&command[0], config.base_dir()));
    spec.args = command[1..].to_vec();
    spec.env
        .push((forkless_bus::ENV_MODEL.into(), path.display().to_string()));
    let mut child = spawner
        .spawn(spec)
        .await
        .with_context(|| format!("[model] make_if_missing in {}", config.source.display()))?;
    let mut stderr = child.stderr.take().expect("spawned with piped stderr");
    let collect = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = stop.cancelled() => {
            let pid = child.id().unwrap_or(0);
            children::signal_group(pid, rustix::process::Signal::KILL);
            let _ = child.wait().await;
            bail!("stopped while [model] make_if_missing was writing {}", path.display());
        }
    };
    let stderr = collect.await.unwrap_or_default();
    if !status.success() || !path.exists() {
        bail!(
            "[model] make_if_missing {:?} ({}) did not create {}: {}",
            command,
            status,
            path.display(),
            stderr.trim()
        );
    }
    Ok(())
}
