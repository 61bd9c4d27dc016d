//! The running service: the owner's and workers' slots, and the job API that acts on them,
//! named as systemctl and gunicorn users expect. Requests come from the control socket
//! (`supervisor status|scale|restart|reload|stop`) and from signals:
//!
//! Every command, from the control socket or a signal, is handled by this one task, so no
//! two of them race; long work (a rolling restart, a hot swap waiting for the workers' verdict)
//! runs in a task it spawns, which replies when done.
//!
//! | signal | effect |
//! |---|---|
//! | TERM, INT | graceful stop: workers drain, then the owner stops; exit 0; a second one: fast |
//! | QUIT | fast stop: no grace |
//! | HUP | reload the config, then a rolling restart of the workers, one at a time, each replacement ready before its predecessor stops |
//! | TTIN / TTOU | one worker more / less |
//!
//! ```no_run
//! # async fn f(commands: tokio::sync::mpsc::UnboundedSender<forkless_supervisor::service::Command>) {
//! use forkless_supervisor::service::{Command, RestartTarget};
//! let (reply, answer) = tokio::sync::oneshot::channel();
//! commands.send(Command::Restart { target: RestartTarget::Workers, reply }).unwrap();
//! println!("{:?}", answer.await);
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkless_bus::Role;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::ResolvedBackend;
use crate::children::Context;
use crate::config::{Config, Sharing};
use crate::escrow::Decision;
use crate::events::Event;
use crate::link::LoadRequest;
use crate::processes::ProcessInfo;
use crate::shutdown::Stop;
use crate::slot::Slot;
use crate::spawn::ChildLabel;

const OWNER: ChildLabel = ChildLabel { role: Role::Owner, index: 0 };

/// What `restart` applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartTarget {
    Owner,
    /// Every worker, one at a time (rolling).
    Workers,
    /// One worker, by index.
    #[serde(untagged)]
    Worker(u32),
}

impl std::str::FromStr for RestartTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "owner" => Ok(RestartTarget::Owner),
            "workers" => Ok(RestartTarget::Workers),
            n => n
                .parse()
                .map(RestartTarget::Worker)
                .map_err(|_| format!("{text:?} is not owner, workers or a worker index")),
        }
    }
}

/// A reply: a human sentence on success, the reason on failure.
pub type Reply = oneshot::Sender<Result<String, String>>;

/// How long workers get to check an offered generation before the hot swap is aborted.
const OFFER_TIMEOUT_FLOOR: Duration = Duration::from_secs(30);

/// A request to the running service.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<StatusReport>),
    Scale {
        workers: u32,
        reply: Reply,
    },
    /// One worker more (+1) or less (-1): TTIN/TTOU.
    ScaleBy(i64),
    Restart {
        target: RestartTarget,
        reply: Reply,
    },
    /// Re-read the config and restart the workers on it, rolling (HUP).
    Reload {
        reply: Option<Reply>,
    },
    /// Hot swap: the owner loads `path` (default: `[model] path`); live once every worker
    /// accepted it. Replies with the new generation's number, or why not.
    ReloadModel {
        path: Option<String>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Stop gracefully (like TERM), or at once (`now`: no grace, even for a stop under way).
    Stop {
        now: bool,
    },
    /// Puts a GPU taken out of service (`on_device_failure = "degrade"`) back: its workers
    /// start again, with fresh restart budgets.
    RestoreDevice {
        device: u32,
        reply: Reply,
    },
}

/// `supervisor status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub supervisor_pid: u32,
    pub config: String,
    pub bus_socket: String,
    pub uptime_s: f64,
    /// Where the weights live: `{"kind": "host"}` or `{"kind": "cuda", "device": 0, "name": …}`.
    #[serde(default)]
    pub backend: ResolvedBackend,
    /// The generation workers are given now, an older one still in use, and one offered to
    /// the workers by a hot swap that is being decided, if any.
    pub generation: Option<u64>,
    pub retiring_generation: Option<u64>,
    #[serde(default)]
    pub offered_generation: Option<u64>,
    /// The live generation's batch lanes (`[lane]` on; one per device): passes, batch sizes,
    /// workers per pass.
    #[serde(default)]
    pub lanes: Vec<crate::escrow::LaneStatus>,
    /// Per GPU, when the weights are on GPUs: what is escrowed there, its workers, its memory.
    #[serde(default)]
    pub devices: Vec<DeviceStatus>,
    /// Bytes of weights held in escrow (memory no process may show as its own).
    pub escrow_bytes: u64,
    /// GPU memory in use that no process accounts for (escrowed arenas, the driver's own);
    /// `None` without a GPU.
    pub gpu_unattributed_bytes: Option<u64>,
    /// Why the memory columns are empty, when they could not be read in time (a hung NVML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_unknown: Option<String>,
    pub workers_wanted: u32,
    pub processes: Vec<ProcessInfo>,
}

/// One GPU of the service, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceStatus {
    pub device: u32,
    /// Bytes of the generations in escrow that live on this device.
    pub escrow_bytes: u64,
    /// Worker slots placed on this device, and how many of them serve.
    pub workers: u32,
    pub ready_workers: u32,
    /// GPU memory in use on the device (NVML), filled in with the memory columns.
    pub gpu_used_bytes: Option<u64>,
    /// Why the device was taken out of service (`on_device_failure = "degrade"`).
    pub failed: Option<String>,
}

/// Liveness and readiness, for `/livez` and `/readyz`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// The supervisor's loop runs.
    pub live: bool,
    /// A generation exists (or none is needed) and at least one worker serves.
    pub ready: bool,
}

/// TTIN/TTOU/HUP become commands.
pub fn forward_signals(commands: mpsc::UnboundedSender<Command>) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut ttin = signal(SignalKind::from_raw(rustix::process::Signal::TTIN.as_raw()))?;
    let mut ttou = signal(SignalKind::from_raw(rustix::process::Signal::TTOU.as_raw()))?;
    tokio::spawn(async move {
        loop {
            let command = tokio::select! {
                _ = hup.recv() => Command::Reload { reply: None },
                _ = ttin.recv() => Command::ScaleBy(1),
                _ = ttou.recv() => Command::ScaleBy(-1),
            };
            if commands.send(command).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The main loop's state.
pub struct Service {
    pub ctx: Arc<Context>,
    pub started: Instant,
    pub stop: Stop,
    pub health: watch::Sender<Health>,
    owner: Option<Slot>,
    workers: BTreeMap<u32, Slot>,
    workers_wanted: u32,
    announced: bool,
    /// Workers whose readiness this loop has reported (and not seen die since).
    reported_ready: std::collections::BTreeSet<u32>,
    /// GPUs taken out of service (`on_device_failure = "degrade"`), with why.
    failed_devices: BTreeMap<u32, String>,

    owner_lost_at: Option<Instant>,
}

impl Service {
    pub fn new(ctx: Arc<Context>, stop: Stop, health: watch::Sender<Health>) -> Self {
        let workers_wanted = ctx.config().worker_count(ctx.bus.devices.len());
        Service {
            ctx,
            started: Instant::now(),
            stop,
            health,
            owner: None,
            workers: BTreeMap::new(),
            workers_wanted,
            announced: false,
            reported_ready: Default::default(),
            failed_devices: BTreeMap::new(),

            owner_lost_at: None,
        }
    }

    /// Counts the cold start (`all N workers ready`, `cold_start_ms`) from `started` (the
    /// supervisor's own start, before it probed for a GPU) instead of from now.
    pub fn counting_from(mut self, started: Instant) -> Self {
        self.started = started;
        self
    }

    /// Runs until stopped (`None`) or a fatal failure (`Some(reason)`), then stops the children
    /// in the reverse order of their start: workers drain first, then the owner.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Option<String> {
        self.health.send_replace(Health { live: true, ready: false });
        if self.ctx.config().model.sharing == Sharing::Shared {
            self.owner = Some(Slot::spawn(self.ctx.clone(), OWNER));
        }
        self.reconcile();
        let failure = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Fatal(reason)) => break Some(reason),
                    Some(event) => self.on_event(event),
                    None => break None,
                },
                Some(command) = commands.recv() => self.on_command(command),
                () = self.stop.requested() => break None,
            }
            self.reconcile();
            self.update_health();
        };
        crate::sd_notify::notify("STOPPING=1");
        self.health.send_replace(Health { live: true, ready: false });
        let workers = std::mem::take(&mut self.workers);
        let owner = self.owner.take();
        let stopping = async move {
            let draining: Vec<_> = workers.into_values().map(|slot| tokio::spawn(slot.stop())).collect();
            for worker in draining {
                let _ = worker.await;
            }
            if let Some(owner) = owner {
                owner.stop().await;
            }
        };
        tokio::pin!(stopping);
        // Still the one place commands go: a stop can be hurried (`stop --now`) and status read.
        loop {
            tokio::select! {
                () = &mut stopping => break,
                Some(command) = commands.recv() => self.on_command_while_stopping(command),
            }
        }
        failure
    }

    fn on_command_while_stopping(&mut self, command: Command) {
        let stopping = || "the supervisor is stopping".to_string();
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Stop { now } => self.stop.request(now),
            Command::Scale { reply, .. } | Command::Restart { reply, .. } | Command::RestoreDevice { reply, .. } => {
                let _ = reply.send(Err(stopping()));
            }
            Command::Reload { reply } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(stopping()));
                }
            }
            Command::ReloadModel { reply, .. } => {
                let _ = reply.send(Err(stopping()));
            }
            Command::ScaleBy(_) => {}
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Published { generation, source, bytes, live: true } => {
                tracing::info!(generation, bytes, "generation {generation} of {source} is in escrow");
                metrics::gauge!("forkless_generation").set(generation as f64);
            }
            Event::Published { generation, source, bytes, live: false } => {
                tracing::info!(
                    generation,
                    bytes,
                    "generation {generation} of {source} is in escrow, offered to the workers"
                );
            }
            Event::WorkerReady { index, pid, generation, attach } => {
                let (attach_us, attach_cpu_us) = (attach.wall_us, attach.cpu_us);
                tracing::info!(index, pid, generation, attach_us, attach_cpu_us, "worker {index} ready");
                // Counted from the events this loop has logged, so "all N ready" always comes
                // after the N-th worker's own line.
                self.reported_ready.insert(index);
                self.announce_if_all_ready();
            }
            Event::Crashed { label } => match label.role {
                Role::Owner => self.owner_lost_at = Some(Instant::now()),
                Role::Worker => {
                    self.reported_ready.remove(&label.index);
                }
            },
            Event::SlotEnded { label } => {
                if label.role == Role::Worker {
                    self.reported_ready.remove(&label.index);
                }
            }
            Event::Freed { generation } => {
                tracing::info!(
                    generation,
                    "generation {generation} is no longer used by any worker: its memory is freed"
                );
            }
            Event::Adopted { generation } => {
                let recovered_ms = self.owner_lost_at.take().map(|t| t.elapsed().as_secs_f64() * 1e3);
                tracing::info!(
                    generation,
                    recovered_ms,
                    "owner re-adopted generation {generation} from escrow without reading the weights file"
                );
            }
            Event::DeviceFailed { device, reason } => self.take_out(device, reason),
            Event::Fatal(_) => unreachable!("handled by the caller"),
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Scale { workers, reply } => {
                let _ = reply.send(self.scale(workers));
            }
            Command::ScaleBy(delta) => {
                let workers = (i64::from(self.workers_wanted) + delta).clamp(0, i64::from(crate::config::MAX_WORKERS));
                match self.scale(workers as u32) {
                    Ok(message) => tracing::info!("{message}"),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            Command::Restart { target, reply } => self.restart(target, reply),
            Command::Reload { reply } => self.reload(reply),
            Command::ReloadModel { path, reply } => self.reload_model(path, reply),
            Command::Stop { now } => self.stop.request(now),
            Command::RestoreDevice { device, reply } => {
                let _ = reply.send(self.restore_device(device));
            }
        }
    }

    /// Whether workers may run now: once a generation is live. With the weights on a GPU,
    /// workers start with the owner instead: a GPU worker spends ~0.5 s on its CUDA context,
    /// cuBLAS and kernels before it needs the weights, which then overlaps the owner's load
    /// (it waits for the generation on its bus). On the host a worker starts in milliseconds,
    /// and a bad weights file should stop the supervisor before any worker runs.
    fn workers_may_run(&self) -> bool {
        self.ctx.config().model.sharing == Sharing::None
            || self.ctx.backend.resolved != crate::backend::ResolvedBackend::Host
            || self.ctx.bus.escrow.live().is_some()
    }

    /// Makes the running slots match what is wanted. A level, not an edge: called after every
    /// event and command, so no missed or reordered event can leave the service without
    /// workers while a generation is live.
    fn reconcile(&mut self) {
        if self.stop.is_requested() || !self.workers_may_run() {
            return;
        }
        for index in 0..self.workers_wanted {
            if !self.workers.contains_key(&index) && !self.on_failed_device(index) {
                let label = ChildLabel { role: Role::Worker, index };
                self.workers.insert(index, Slot::spawn(self.ctx.clone(), label));
            }
        }
        let surplus: Vec<u32> = self.workers.range(self.workers_wanted..).map(|(&index, _)| index).collect();
        for index in surplus {
            if let Some(slot) = self.workers.remove(&index) {
                // Stopping a slot also cancels a start still in progress.
                tokio::spawn(slot.stop());
            }
        }
    }

    /// Once every worker that can run is ready (those on a device taken out cannot): the cold
    /// start's log line and systemd's READY=1, once.
    fn announce_if_all_ready(&mut self) {
        let placeable: Vec<u32> = (0..self.workers_wanted).filter(|&i| !self.on_failed_device(i)).collect();
        let all_ready = !placeable.is_empty() && placeable.iter().all(|i| self.reported_ready.contains(i));
        if all_ready && !self.announced {
            self.announced = true;
            let cold_start_ms = self.started.elapsed().as_millis() as u64;
            tracing::info!(cold_start_ms, "all {} workers ready", placeable.len());
            crate::sd_notify::notify("READY=1");
        }
    }

    fn on_failed_device(&self, index: u32) -> bool {
        self.ctx.bus.device_of(index).is_some_and(|device| self.failed_devices.contains_key(&device))
    }

    /// A device whose workers kept failing, with `on_device_failure = "degrade"`: its workers
    /// stop and stay stopped; the other devices keep serving. With no device left, the service
    /// stops as it would have.
    fn take_out(&mut self, device: u32, reason: String) {
        tracing::error!(device, "GPU {device} is taken out of service, the others keep serving: {reason}");
        metrics::gauge!("forkless_device_failed", "device" => device.to_string()).set(1.0);
        self.failed_devices.insert(device, reason);
        let on_device: Vec<u32> = self.workers.keys().copied().filter(|&i| self.on_failed_device(i)).collect();
        for index in on_device {
            if let Some(slot) = self.workers.remove(&index) {
                tokio::spawn(slot.stop());
            }
        }
        if self.ctx.bus.devices.iter().all(|d| self.failed_devices.contains_key(d)) {
            let _ = self.ctx.events.send(Event::Fatal("every GPU of the service failed".into()));
        } else {
            // The workers of the other devices may all be ready already.
            self.announce_if_all_ready();
        }
    }

    /// The way back from [`Service::take_out`], once the operator repaired the GPU (or wants
    /// to try it again): `supervisor restore-device N`.
    fn restore_device(&mut self, device: u32) -> Result<String, String> {
        let devices = &self.ctx.bus.devices;
        if devices.is_empty() {
            return Err("this service holds its weights in host memory: it has no GPU to restore".into());
        }
        if !devices.contains(&device) {
            return Err(format!("GPU {device} is not one of the service's devices {devices:?}"));
        }
        let Some(reason) = self.failed_devices.remove(&device) else {
            return Err(format!("GPU {device} is in service: there is nothing to restore"));
        };
        tracing::warn!(device, "GPU {device} is back in service (it was taken out: {reason})");
        metrics::gauge!("forkless_device_failed", "device" => device.to_string()).set(0.0);
        let bus = &self.ctx.bus;
        // Ready only once the new workers say so (the old ones may not have ended yet).
        self.reported_ready.retain(|&i| bus.device_of(i) != Some(device));
        let before = self.workers.len();
        self.announced = false;
        self.reconcile();
        let started = self.workers.len() - before;
        Ok(format!(
            "GPU {device} is back in service: {started} worker slot{} placed on it",
            if started == 1 { "" } else { "s" }
        ))
    }

    fn scale(&mut self, workers: u32) -> Result<String, String> {
        let max = crate::config::MAX_WORKERS;
        if workers == 0 {
            return Err("a service needs at least one worker".into());
        }
        if workers > max {
            return Err(format!("{workers} workers is more than {max}, the limit of [workers] count"));
        }
        let before = self.workers_wanted;
        self.workers_wanted = workers;
        if workers > before {
            self.announced = false;
        }
        metrics::gauge!("forkless_workers_wanted").set(f64::from(workers));
        self.reconcile();
        if !self.workers_may_run() {
            return Ok(format!("{workers} workers will start once the first generation is live"));
        }
        Ok(format!("scaled from {before} to {workers} workers"))
    }

    /// Hot swap: asks the owner to load `path`; once the new generation is in escrow, waits
    /// (in a task of its own) for every worker's verdict and replies with the outcome.
    fn reload_model(&mut self, path: Option<String>, reply: oneshot::Sender<Result<u64, String>>) {
        if self.ctx.config().model.sharing == Sharing::None {
            let _ = reply.send(Err(
                "[model] sharing = \"none\": every worker loads its own copy; restart the workers instead".into(),
            ));
            return;
        }
        let path = path.unwrap_or_else(|| self.ctx.bus.model_path.clone());
        tracing::info!("hot swap requested: loading {path}");
        let (loaded, answer) = oneshot::channel();
        if let Err((_, reason)) = self.ctx.bus.ask_owner(LoadRequest { path: path.clone(), reply: loaded }) {
            let _ = reply.send(Err(reason));
            return;
        }
        let escrow = self.ctx.bus.escrow.clone();
        let patience = self.offer_timeout();
        tokio::spawn(async move {
            let generation = match answer.await {
                Ok(Ok(generation)) => generation,
                Ok(Err(reason)) => {
                    tracing::error!("hot swap of {path} failed: {reason}");
                    let _ = reply.send(Err(reason));
                    return;
                }
                Err(_) => {
                    let _ = reply.send(Err(format!("the owner went away while loading {path}: try again")));
                    return;
                }
            };
            let result = match tokio::time::timeout(patience, escrow.decision(generation)).await {
                Ok(Decision::Committed) => Ok(generation),
                Ok(Decision::Aborted(reason)) => Err(reason),
                Err(_) => {
                    let silent: Vec<String> = escrow.undecided().iter().map(ToString::to_string).collect();
                    let reason = format!("{} did not answer within {patience:?}", silent.join(", "));
                    escrow.abort(generation, reason.clone());
                    Err(reason)
                }
            };
            match &result {
                Ok(_) => {
                    tracing::info!(generation, "generation {generation} of {path} is live: every worker accepted it")
                }
                Err(reason) => tracing::error!(
                    generation,
                    "hot swap to generation {generation} of {path} aborted, the live generation keeps serving: {reason}"
                ),
            }
            let _ = reply.send(result.map_err(|reason| {
                format!("generation {generation} ({path}) was not taken: {reason}; the live generation keeps serving")
            }));
        });
    }

    /// How long workers get to check an offered generation: as long as a start may take.
    fn offer_timeout(&self) -> Duration {
        let start = Duration::try_from_secs_f64(self.ctx.config().workers.start_timeout_s).unwrap_or(Duration::MAX);
        start.max(OFFER_TIMEOUT_FLOOR)
    }

    fn restart(&mut self, target: RestartTarget, reply: Reply) {
        let replacers = match target {
            RestartTarget::Owner => match &self.owner {
                Some(owner) => vec![owner.replacer()],
                None => {
                    let _ = reply.send(Err("there is no owner (sharing = \"none\")".into()));
                    return;
                }
            },
            RestartTarget::Workers => self.workers.values().map(Slot::replacer).collect(),
            RestartTarget::Worker(index) => match self.workers.get(&index) {
                Some(slot) => vec![slot.replacer()],
                None => {
                    let _ =
                        reply.send(Err(format!("there is no worker {index} (workers: 0..{})", self.workers_wanted)));
                    return;
                }
            },
        };
        tokio::spawn(async move {
            let _ = reply.send(roll(replacers).await);
        });
    }

    /// Re-reads the config file and restarts the workers on it, one at a time.
    fn reload(&mut self, reply: Option<Reply>) {
        let current = self.ctx.config();
        let result = Config::load(&current.source).map_err(|e| e.to_string()).and_then(|fresh| {
            if fresh.workers.listen != current.workers.listen {
                return Err("[workers] listen changed: listening sockets are kept across reloads; restart the supervisor to change them".into());
            }
            if fresh.model.sharing != current.model.sharing {
                return Err("[model] sharing changed: restart the supervisor to change it".into());
            }
            if let Some(warning) = self.ctx.backend.reload_warning(&fresh) {
                tracing::warn!("{warning}");
            }
            Ok(fresh)
        });
        let fresh = match result {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!("reload refused, keeping the running config: {e}");
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
                return;
            }
        };
        let count = fresh.worker_count(self.ctx.bus.devices.len());
        tracing::info!("reloaded {}: rolling restart of the workers", current.source.display());
        self.ctx.set_config(fresh);
        let replacers: Vec<_> = self.workers.values().map(Slot::replacer).collect();
        if let Err(e) = self.scale(count) {
            tracing::warn!("reload: {e}");
        }
        tokio::spawn(async move {
            let result = roll(replacers).await;
            match &result {
                Ok(message) => tracing::info!("reload done: {message}"),
                Err(e) => tracing::error!("reload: {e}"),
            }
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        });
    }

    fn status(&self) -> StatusReport {
        // Memory is filled in by the control connection (crate::processes::MemoryMeter), off
        // this loop: a hung NVML must not stall the service.
        let processes = self.ctx.bus.processes.snapshot();
        let escrow = &self.ctx.bus.escrow;
        StatusReport {
            supervisor_pid: std::process::id(),
            config: self.ctx.config().source.display().to_string(),
            bus_socket: self.ctx.bus_socket.display().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            backend: self.ctx.backend.resolved.clone(),
            generation: escrow.live().map(|g| g.number()),
            retiring_generation: escrow.retiring(),
            offered_generation: escrow.offer().map(|g| g.number()),
            lanes: escrow.live().map(|g| g.lane_status()).unwrap_or_default(),
            devices: self.device_status(&processes),
            escrow_bytes: escrow.bytes_held(),
            gpu_unattributed_bytes: None,
            memory_unknown: None,
            workers_wanted: self.workers_wanted,
            processes,
        }
    }

    fn device_status(&self, processes: &[ProcessInfo]) -> Vec<DeviceStatus> {
        let devices = &self.ctx.bus.devices;
        let escrowed = self.ctx.bus.escrow.bytes_by_device();
        devices
            .iter()
            .map(|&device| {
                let placed = |p: &&ProcessInfo| p.role == "worker" && self.ctx.bus.device_of(p.index) == Some(device);
                let workers: std::collections::BTreeSet<u32> =
                    processes.iter().filter(placed).map(|p| p.index).collect();
                let ready: std::collections::BTreeSet<u32> = processes
                    .iter()
                    .filter(placed)
                    .filter(|p| p.state == crate::processes::State::Ready)
                    .map(|p| p.index)
                    .collect();
                DeviceStatus {
                    device,
                    escrow_bytes: escrowed.get(&device).copied().unwrap_or(0),
                    workers: workers.len() as u32,
                    ready_workers: ready.len() as u32,
                    gpu_used_bytes: None,
                    failed: self.failed_devices.get(&device).cloned(),
                }
            })
            .collect()
    }

    fn update_health(&self) {
        let generation_ok = self.ctx.config().model.sharing == Sharing::None || self.ctx.bus.escrow.live().is_some();
        let ready = generation_ok && self.ctx.bus.processes.ready_workers() > 0;
        self.health.send_if_modified(|health| {
            let changed = health.ready != ready;
            health.ready = ready;
            changed
        });
    }
}

/// Replaces each slot's child in turn; a replacement is ready before its predecessor stops.
async fn roll(replacers: Vec<crate::slot::Replacer>) -> Result<String, String> {
    let count = replacers.len();
    for replacer in replacers {
        replacer.replace().await?;
    }
    Ok(format!("restarted {count} process{}", if count == 1 { "" } else { "es" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::test_support::context;

    fn workers(service: &Service) -> Vec<u32> {
        service.workers.keys().copied().collect()
    }

    /// Two GPUs, two workers each, `degrade`.
    const TWO_DEGRADING: &str = "[cuda]\ndevices = [0, 1]\nworkers_per_device = 2\non_device_failure = \"degrade\"";

    /// The runtime the tests enter: slots are created on it, but never run.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A service on `devices` with the `[cuda]` table `cuda` (call inside `runtime().enter()`).
    fn service_on(cuda: &str, devices: &[u32]) -> (Service, mpsc::UnboundedReceiver<Event>) {
        let (ctx, events) = context(cuda, devices);
        (Service::new(ctx, Stop::default(), watch::channel(Health::default()).0), events)
    }

    fn ready(index: u32) -> Event {
        Event::WorkerReady { index, pid: 100 + index, generation: 1, attach: Default::default() }
    }

    /// Degrading, without processes: the slots the service keeps are checked right after each
    /// step, before the runtime ever runs a slot's task (the worker program does not exist
    /// anyway), so no child is started.
    #[test]
    fn a_failed_device_gets_no_workers_and_the_others_keep_serving() {
        let runtime = runtime();
        let _entered = runtime.enter();
        let (mut service, mut events) = service_on(TWO_DEGRADING, &[0, 1]);
        assert_eq!(service.workers_wanted, 4, "workers_per_device × devices");
        service.reconcile();
        assert_eq!(workers(&service), [0, 1, 2, 3]);

        service.on_event(Event::DeviceFailed { device: 1, reason: "worker 1 kept dying".into() });
        assert_eq!(workers(&service), [0, 2], "device 1's workers (1 and 3) are stopped");
        service.reconcile();
        assert_eq!(workers(&service), [0, 2], "and not started again");
        service.scale(6).unwrap();
        assert_eq!(workers(&service), [0, 2, 4], "a new slot on device 1 (5) is not placed either");
        let devices = service.status().devices;
        assert_eq!(
            devices.iter().map(|d| (d.device, d.failed.clone())).collect::<Vec<_>>(),
            [(0, None), (1, Some("worker 1 kept dying".to_string()))]
        );
        assert!(events.try_recv().is_err(), "one device left: the service keeps running");

        service.on_event(Event::DeviceFailed { device: 0, reason: "worker 0 kept dying".into() });
        assert_eq!(workers(&service), [] as [u32; 0]);
        match events.try_recv() {
            Ok(Event::Fatal(reason)) => assert!(reason.contains("every GPU"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    /// `supervisor restore-device`: the device's slots come back with fresh budgets, "all
    /// workers ready" waits for them, and only a device that was taken out can be restored.
    #[test]
    fn a_restored_device_gets_its_workers_back() {
        let runtime = runtime();
        let _entered = runtime.enter();
        let (mut service, _events) = service_on(TWO_DEGRADING, &[0, 1]);
        service.reconcile();
        for index in 0..4 {
            service.on_event(ready(index));
        }
        assert!(service.announced);
        assert!(service.restore_device(1).unwrap_err().contains("in service"));
        assert!(service.restore_device(7).unwrap_err().contains("not one of the service's devices"));

        service.on_event(Event::DeviceFailed { device: 1, reason: "worker 1 kept dying".into() });
        assert_eq!(workers(&service), [0, 2]);
        let message = service.restore_device(1).unwrap();
        assert!(message.contains("GPU 1 is back in service: 2 worker slots"), "{message}");
        assert_eq!(workers(&service), [0, 1, 2, 3]);
        assert!(service.status().devices.iter().all(|d| d.failed.is_none()));
        assert!(!service.announced, "workers 1 and 3 are new: not ready yet");
        service.on_event(ready(1));
        assert!(!service.announced, "worker 3's old readiness does not count");
        service.on_event(ready(3));
        assert!(service.announced);
        assert!(service.restore_device(1).is_err(), "restored once");
    }

    /// With a device taken out before its workers were ready, "all workers
    /// ready" (and systemd's READY=1) must still come once the other devices' workers are.
    #[test]
    fn readiness_is_announced_without_the_workers_of_a_device_taken_out() {
        let runtime = runtime();
        let _entered = runtime.enter();
        let (mut service, _events) = service_on(TWO_DEGRADING, &[0, 1]);
        service.reconcile();
        service.on_event(ready(0));
        service.on_event(ready(2));
        assert!(!service.announced, "workers 1 and 3 (device 1) are not ready yet");
        service.on_event(Event::DeviceFailed { device: 1, reason: "worker 1 kept dying".into() });
        assert!(service.announced, "every worker that can run (0 and 2) is ready");

        // Before any device fails, all four are needed.
        let (mut service, _events) = service_on(TWO_DEGRADING, &[0, 1]);
        service.reconcile();
        for index in [0, 1, 2] {
            service.on_event(ready(index));
        }
        assert!(!service.announced);
        service.on_event(ready(3));
        assert!(service.announced);
    }

    /// On one GPU or on the host, placement does not depend on devices at all.
    #[test]
    fn without_several_devices_every_slot_is_placed() {
        let runtime = runtime();
        let _entered = runtime.enter();
        let (mut service, _events) = service_on("[cuda]\nworkers_per_device = 3", &[5]);
        service.reconcile();
        assert_eq!(workers(&service), [0, 1, 2]);
        let (mut service, _events) = service_on("", &[]);
        assert_eq!(service.workers_wanted, 1, "[workers] count on the host");
        assert!(!service.workers_may_run(), "host memory: workers wait for a live generation");
        service.reconcile();
        assert_eq!(workers(&service), [] as [u32; 0]);
    }
}
