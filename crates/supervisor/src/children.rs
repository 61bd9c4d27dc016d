//! Starting and stopping one child: the exec (through the spawner thread) with its bus
//! socketpair, line-by-line forwarding of its output (tagged with role, index and pid), and a
//! graceful stop (SIGTERM to its process group, SIGKILL after the grace). Whatever the child
//! started dies with it: when the child exits, its process group gets SIGTERM, then SIGKILL
//! after [`GROUP_GRACE`]; the group is recorded in the runtime folder meanwhile (see
//! [`crate::groups`]). What happens around that (readiness, restarts, replacement) is the
//! slot's business, in [`crate::slot`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use forkless_bus::child_env::ChildEnv;
use forkless_bus::Role;
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{place_worker, RunningBackend};
use crate::bus_server::serve_child;
use crate::config::{resolve_program, Config, Sharing, WorkerVisibility};
use crate::events::Event;
pub(crate) use crate::groups::signal_group;
use crate::groups::ProcessGroups;
use crate::link::{BusState, ChildLink};
use crate::listeners::Listeners;
use crate::spawn::{ChildLabel, ChildSpec, PidTable, Spawner};

pub use forkless_bus::child::EXIT_FATAL;
/// Stderr lines kept per child, quoted when it fails fatally.
const STDERR_TAIL: usize = 20;
/// What a child left in its process group gets between SIGTERM and SIGKILL once the child is
/// gone (the child's own grace is `graceful_timeout_s`).
pub const GROUP_GRACE: Duration = Duration::from_secs(2);

/// What every slot shares.
#[derive(Debug)]
pub struct Context {
    /// Replaced on reload (SIGHUP); every start reads the current one.
    config: RwLock<Arc<Config>>,
    pub spawner: Spawner,
    pub listeners: Listeners,
    pub bus_socket: PathBuf,
    pub bus: BusState,
    pub events: mpsc::UnboundedSender<Event>,
    /// Resolved once at start; a reload never changes it.
    pub backend: RunningBackend,
    /// Cancelled by a fast stop (SIGQUIT, a second TERM/INT, `stop --now`): children still
    /// in their grace period are killed at once, and later stops get no grace.
    pub fast_stop: CancellationToken,
    /// Where children's process groups are recorded (the runtime folder), if anywhere.
    pub groups: Option<ProcessGroups>,
}

impl Context {
    /// Events go where the bus state sends its own ([`BusState::events`]).
    pub fn new(
        config: Config,
        backend: RunningBackend,
        spawner: Spawner,
        listeners: Listeners,
        bus_socket: PathBuf,
        bus: BusState,
        fast_stop: CancellationToken,
    ) -> Self {
        let config = RwLock::new(Arc::new(config));
        let events = bus.events.clone();
        Context { config, spawner, listeners, bus_socket, bus, events, backend, fast_stop, groups: None }
    }

    /// Records every child's process group in `groups`.
    pub fn with_groups(mut self, groups: ProcessGroups) -> Self {
        self.groups = Some(groups);
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config poisoned").clone()
    }

    /// Puts a reloaded configuration in force for every later start.
    pub fn set_config(&self, config: Config) {
        *self.config.write().expect("config poisoned") = Arc::new(config);
    }

    fn spec(&self, label: ChildLabel) -> std::io::Result<ChildSpec> {
        let config = self.config();
        let mut env = ChildEnv {
            role: label.role,
            index: label.index,
            supervisor_pid: std::process::id(),
            bus_fd: None, // the spawner knows where the socket lands
            bus_path: Some(self.bus_socket.clone()),
            model: config.model.path.clone(),
            sharing: match config.model.sharing {
                Sharing::Shared => forkless_bus::child_env::Sharing::Shared,
                Sharing::None => forkless_bus::child_env::Sharing::None,
            },
            backend: self.backend.for_children(&config, label.role),
            heartbeat: None,
            max_requests: None,
            http: None,
        };
        let mut spec = match label.role {
            Role::Owner => {
                // Not current_exe(): after an in-place upgrade that path names the new binary
                // (or nothing); /proc/self/exe is always the supervisor that is running.
                let mut spec = ChildSpec::new(PathBuf::from("/proc/self/exe"));
                spec.args = vec!["owner".into()];
                spec
            }
            Role::Worker => {
                let command = &config.workers.command;
                let mut spec = ChildSpec::new(resolve_program(&command[0], config.base_dir()));
                spec.args = command[1..].to_vec();
                spec.env.extend(config.workers.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                env.heartbeat = config.workers.heartbeat_period();
                env.max_requests = request_budget(&config, label.index);
                spec.listeners = self.listeners.duplicate()?;
                spec
            }
        };
        if label.role == Role::Worker {
            if let forkless_bus::child_env::Backend::Cuda(cuda) = &mut env.backend {
                let visibility = config.cuda.worker_visible_devices;
                let ours = std::env::var(forkless_bus::ENV_CUDA_VISIBLE_DEVICES).ok();
                place_worker(cuda, self.bus.device_of(label.index), visibility, ours.as_deref());
                if visibility == WorkerVisibility::Own && cuda.narrowed.is_none() {
                    tracing::warn!(
                        "worker {}: CUDA_VISIBLE_DEVICES={ours:?} names no device {}: it sees every GPU",
                        label.index,
                        cuda.device
                    );
                }
            }
            env.http = Some(config.workers.http.env_value());
        }
        spec.child_env = Some(env);
        spec.label = Some((self.bus.pids.clone(), label));
        Ok(spec)
    }

    /// SIGTERM → SIGKILL grace for stopping a child (none during a fast stop).
    pub fn grace(&self) -> Duration {
        if self.fast_stop.is_cancelled() {
            return Duration::ZERO;
        }
        self.config().supervisor.graceful_timeout()
    }

    /// How long a ready worker may stay silent before it counts as hung.
    pub fn heartbeat_timeout(&self, role: Role) -> Option<Duration> {
        self.config().workers.timeout().filter(|_| role == Role::Worker)
    }
}

/// A worker's request budget: `max_requests` plus a per-worker draw of the jitter (none when
/// `max_requests` is 0). Config validation keeps the sum far from overflowing.
fn request_budget(config: &Config, index: u32) -> Option<u64> {
    let jitter = match config.workers.max_requests_jitter {
        0 => 0,
        j => draw(index) % (j + 1),
    };
    (config.workers.max_requests > 0).then(|| config.workers.max_requests.saturating_add(jitter))
}

/// A cheap, varying number (no cryptographic needs: spreading recycles apart).
fn draw(index: u32) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let mut x = u64::from(nanos) ^ (u64::from(index) << 32) ^ u64::from(std::process::id());
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Longest wait for the welcome and generation to be queued before spawning anyway (only a
/// manifest larger than the socket buffer needs the child reading before it is all written).
const QUEUE_WAIT: Duration = Duration::from_millis(50);

/// A started child and what its bus connection will tell about it.
#[derive(Debug)]
pub struct Running {
    pub label: ChildLabel,
    pub child: Child,
    pub pid: u32,
    pub started: Instant,
    /// Fires when the child is ready (see [`ChildLink`]).
    pub ready: oneshot::Receiver<()>,
    /// Cancelled when a ready worker stops sending heartbeats.
    pub hung: CancellationToken,
    output: Output,
    pids: PidTable,
    processes: crate::processes::ProcessTable,
    fast_stop: CancellationToken,
    groups: Option<ProcessGroups>,
}

/// Spawns a child with a fresh bus socketpair. The welcome and the generation are queued on
/// the socket before the child is exec'd, so its attach waits for nobody. If the spawn fails,
/// the child's end is dropped and the serving task ends on the closed socket.
pub async fn launch(ctx: &Context, label: ChildLabel) -> std::io::Result<Running> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut spec = ctx.spec(label)?;
    spec.bus = Some(theirs.into());
    let bus = forkless_bus::BusStream::from_std(ours)?;
    let (queued, is_queued) = oneshot::channel();
    let (ready_tx, ready) = oneshot::channel();
    let (spawned, spawned_rx) = tokio::sync::watch::channel(None);
    spec.spawned = Some(spawned);
    let hung = CancellationToken::new();
    let link = ChildLink {
        queued: Some(queued),
        ready: Some(ready_tx),
        hung: hung.clone(),
        heartbeat_timeout: ctx.heartbeat_timeout(label.role),
        spawned: Some(spawned_rx),
    };
    tokio::spawn(serve_child(bus, label, ctx.bus.clone(), link));
    let _ = tokio::time::timeout(QUEUE_WAIT, is_queued).await;
    let mut child = ctx.spawner.spawn(spec).await?;
    let pid = child.id().unwrap_or(0);
    tracing::info!("started {label} (pid {pid})");
    ctx.bus.processes.spawned(label, pid);
    if let Some(groups) = &ctx.groups {
        groups.record(pid);
    }
    let output = Output::forward(&mut child, label, pid);
    let (pids, processes, fast_stop) = (ctx.bus.pids.clone(), ctx.bus.processes.clone(), ctx.fast_stop.clone());
    let groups = ctx.groups.clone();
    Ok(Running { label, child, pid, started: Instant::now(), ready, hung, output, pids, processes, fast_stop, groups })
}

impl Running {
    /// Stops the child (SIGTERM, then SIGKILL after `grace`, or at once when a fast stop is
    /// asked meanwhile), reaps it and anything left in its process group, and returns its
    /// status and last stderr lines.
    pub async fn stop(mut self, grace: Duration) -> (std::io::Result<ExitStatus>, String) {
        self.processes.advance(self.label, self.pid, crate::processes::State::Stopping);
        signal_group(self.pid, Signal::TERM);
        let escalation = tokio::select! {
            status = self.child.wait() => Ok(status),
            () = tokio::time::sleep(grace) => Err(format!("still running {grace:?} after SIGTERM")),
            () = self.fast_stop.cancelled() => Err("fast stop".to_string()),
        };
        let status = match escalation {
            Ok(status) => status,
            Err(why) => {
                if !grace.is_zero() {
                    tracing::warn!("{} (pid {}) {why}: SIGKILL", self.label, self.pid);
                }
                signal_group(self.pid, Signal::KILL);
                self.child.wait().await
            }
        };
        self.reaped(status).await
    }

    /// After the child exited on its own: end its process group and collect its output.
    pub async fn reaped(self, status: std::io::Result<ExitStatus>) -> (std::io::Result<ExitStatus>, String) {
        // Whatever the dead child started (its process group) goes with it: no orphans
        // holding its pipes, its sockets or its memory. SIGTERM first, so they can clean up.
        if signal_group(self.pid, Signal::TERM) {
            tokio::spawn(end_group(self.pid, self.groups.clone()));
        } else if let Some(groups) = &self.groups {
            groups.forget(self.pid);
        }
        self.pids.remove(self.pid);
        self.processes.gone(self.label, self.pid);
        let tail = self.output.finish().await;
        (status, tail)
    }
}

/// SIGKILLs what is left of group `pgid` after [`GROUP_GRACE`] (the group already had its
/// SIGTERM), then forgets its record.
async fn end_group(pgid: u32, groups: Option<ProcessGroups>) {
    let deadline = tokio::time::Instant::now() + GROUP_GRACE;
    while group_exists(pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if signal_group(pgid, Signal::KILL) {
        tracing::warn!("process group {pgid} outlived its leader by {GROUP_GRACE:?} after SIGTERM: SIGKILL");
    }
    if let Some(groups) = groups {
        groups.forget(pgid);
    }
}

fn group_exists(pgid: u32) -> bool {
    match i32::try_from(pgid).ok().and_then(Pid::from_raw) {
        Some(pgid) => rustix::process::test_kill_process_group(pgid).is_ok(),
        None => false,
    }
}

/// The tasks forwarding a child's stdout and stderr, and the last lines of stderr.
#[derive(Debug)]
struct Output {
    tasks: Vec<JoinHandle<()>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Output {
    fn forward(child: &mut Child, label: ChildLabel, pid: u32) -> Output {
        let span = match label.role {
            Role::Owner => tracing::info_span!("owner", pid),
            Role::Worker => tracing::info_span!("worker", index = label.index, pid),
        };
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let mut tasks = Vec::new();
        if let Some(out) = child.stdout.take() {
            tasks.push(tokio::spawn(forward_lines(out, span.clone(), None)));
        }
        if let Some(err) = child.stderr.take() {
            tasks.push(tokio::spawn(forward_lines(err, span, Some(tail.clone()))));
        }
        Output { tasks, tail }
    }

    /// Waits (briefly: a grandchild may hold the pipe) for the last lines, returns the tail.
    async fn finish(self) -> String {
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        let tail = self.tail.lock().expect("tail poisoned");
        tail.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
    }
}

async fn forward_lines(pipe: impl AsyncRead + Unpin, span: tracing::Span, tail: Option<Arc<Mutex<VecDeque<String>>>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "child", parent: &span, "{}", line.trim_start());
        if let Some(tail) = &tail {
            let mut tail = tail.lock().expect("tail poisoned");
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// A [`Context`] for unit tests of the slot and service logic: no runtime folder, no
/// listener, and a worker program that does not exist, so nothing a test does can start a
/// process. Needs a tokio runtime entered (the spawner thread's handle).
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::backend::ResolvedBackend;
    use crate::escrow::Escrow;

    /// A context whose config is a minimal one plus `extra` (TOML tables), with the weights
    /// on `devices` (the cuda backend; empty: host memory). Returns the receiver of the events
    /// slots and the service send.
    pub(crate) fn context(extra: &str, devices: &[u32]) -> (Arc<Context>, mpsc::UnboundedReceiver<Event>) {
        let text = format!(
            "[model]\npath = \"m.safetensors\"\n[workers]\ncommand = [\"/nonexistent/forkless-test-worker\"]\n\
             listen = [\"127.0.0.1:0\"]\n{extra}\n"
        );
        let config = Config::parse(&text, std::path::Path::new("/nonexistent/config.toml")).expect("a valid config");
        let (events, inbox) = mpsc::unbounded_channel();
        let mut bus =
            BusState::new(Escrow::default(), events, true, "m.safetensors".into(), Duration::from_secs(1), None);
        bus.devices = devices.to_vec();
        let resolved = match devices {
            [] => ResolvedBackend::Host,
            [first, ..] => ResolvedBackend::Cuda { device: *first, name: "test".into(), devices: devices.to_vec() },
        };
        let backend = RunningBackend { resolved, ..RunningBackend::default() };
        let ctx = Context::new(
            config,
            backend,
            Spawner::start(tokio::runtime::Handle::current()),
            Listeners::bind(&[], 1).expect("no listener to bind"),
            PathBuf::from("/nonexistent/bus.sock"),
            bus,
            CancellationToken::new(),
        );
        (Arc::new(ctx), inbox)
    }
}
