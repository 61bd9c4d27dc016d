//! Child slots: one task per owner or worker position, which starts the child, forwards its
//! output line by line (tagged with role, index and pid), waits for it, and restarts it with
//! backoff when it dies, until asked to stop. Stopping is SIGTERM to the child's process
//! group, then SIGKILL after the graceful timeout.
//!
//! An exit status of [`EXIT_FATAL`] (78, sysexits' `EX_CONFIG`), or a program that cannot be
//! started at all, is reported as [`Event::Fatal`] instead of being restarted forever.
//!
//! ```no_run
//! # async fn f(ctx: std::sync::Arc<forkless_supervisor::children::Context>) {
//! use forkless_supervisor::{children::supervise, spawn::ChildLabel};
//! let stop = tokio_util::sync::CancellationToken::new();
//! supervise(ctx, ChildLabel { role: forkless_bus::Role::Worker, index: 0 }, stop).await;
//! # }
//! ```

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkless_bus::Role;
use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus_server::{serve_child, BusState};
use crate::config::{resolve_program, Config, Sharing};
use crate::events::Event;
use crate::listeners::Listeners;
use crate::restart::Backoff;
use crate::spawn::{ChildLabel, ChildSpec, PidTable, Spawner};

pub use forkless_bus::child::EXIT_FATAL;
/// Stderr lines kept per child, quoted when it fails fatally.
const STDERR_TAIL: usize = 20;

/// What every slot shares.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub spawner: Spawner,
    pub pids: PidTable,
    pub listeners: Listeners,
    pub bus_socket: PathBuf,
    pub bus: BusState,
    pub events: mpsc::UnboundedSender<Event>,
}

impl Context {
    fn spec(&self, label: ChildLabel) -> std::io::Result<ChildSpec> {
        let mut spec = match label.role {
            Role::Owner => {
                // Not current_exe(): after an in-place upgrade that path names the new binary
                // (or nothing); /proc/self/exe is always the supervisor that is running.
                let mut spec = ChildSpec::new(PathBuf::from("/proc/self/exe"));
                spec.args = vec!["owner".into()];
                spec
            }
            Role::Worker => {
                let command = &self.config.workers.command;
                let mut spec = ChildSpec::new(resolve_program(&command[0], self.config.base_dir()));
                spec.args = command[1..].to_vec();
                spec.env.extend(
                    self.config
                        .workers
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
                spec.listeners = self.listeners.duplicate()?;
                spec
            }
        };
        let sharing = match self.config.model.sharing {
            Sharing::Shared => "shared",
            Sharing::None => "none",
        };
        spec.env.extend([
            (
                forkless_bus::ENV_BUS.into(),
                self.bus_socket.display().to_string(),
            ),
            (forkless_bus::ENV_ROLE.into(), role_name(label.role).into()),
            (forkless_bus::ENV_INDEX.into(), label.index.to_string()),
            (
                forkless_bus::ENV_SUPERVISOR_PID.into(),
                std::process::id().to_string(),
            ),
            (
                forkless_bus::ENV_MODEL.into(),
                self.config.model.path.display().to_string(),
            ),
            (forkless_bus::ENV_SHARING.into(), sharing.into()),
        ]);
        spec.label = Some((self.pids.clone(), label));
        Ok(spec)
    }

    fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.config.supervisor.graceful_timeout_s)
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Worker => "worker",
    }
}

/// Runs one slot until `stop` is cancelled (then stops its child gracefully) or a fatal failure.
pub async fn supervise(ctx: Arc<Context>, label: ChildLabel, stop: CancellationToken) {
    let mut backoff = Backoff::new(&ctx.config.restart);
    let name = role_name(label.role);
    while !stop.is_cancelled() {
        let mut child = match start_child(&ctx, label).await {
            Ok(child) => child,
            Err(e) if cannot_ever_start(&e) => {
                let _ = ctx.events.send(Event::Fatal(format!(
                    "cannot start {name} {}: {e}",
                    label.index
                )));
                return;
            }
            Err(e) => {
                // EAGAIN, EMFILE, ENOMEM...: a bad moment, not a broken config.
                let delay = backoff.after_exit(Duration::ZERO);
                tracing::error!(
                    "cannot start {name} {}: {e}; retrying in {delay:?}",
                    label.index
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let pid = child.id().unwrap_or(0);
        let started = Instant::now();
        tracing::info!("started {name} {} (pid {pid})", label.index);
        let output = Output::forward(&mut child, label, pid);
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.cancelled() => stop_child(&mut child, pid, ctx.grace()).await,
        };
        ctx.pids.remove(pid);
        if !stop.is_cancelled() {
            // Whatever the dead child started (its process group) goes with it: no orphans
            // holding its pipes, its sockets or its memory.
            signal_group(pid, Signal::KILL);
        }
        let tail = output.finish().await;
        if stop.is_cancelled() {
            tracing::info!(
                "{name} {} (pid {pid}) stopped: {}",
                label.index,
                describe(&status)
            );
            return;
        }
        let _ = ctx.events.send(Event::Exited { label, pid });
        if matches!(&status, Ok(s) if s.code() == Some(EXIT_FATAL)) {
            let reason = format!(
                "{name} {} (pid {pid}) failed and will not be restarted (exit status {EXIT_FATAL}); its last words:\n{tail}",
                label.index
            );
            let _ = ctx.events.send(Event::Fatal(reason));
            return;
        }
        let delay = backoff.after_exit(started.elapsed());
        tracing::warn!(
            "{name} {} (pid {pid}) {}; restarting in {delay:?}",
            label.index,
            describe(&status)
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (_, Some(sig)) => format!("was killed by signal {sig}"),
            _ => format!("ended: {s}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

/// A program that is missing, not executable or not a program will not start next time either.
fn cannot_ever_start(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{InvalidInput, NotFound, PermissionDenied};
    matches!(e.kind(), NotFound | PermissionDenied | InvalidInput)
}

/// Longest wait for the welcome and generation to be queued before spawning anyway (only a
/// manifest larger than the socket buffer needs the child reading before it is all written).
const QUEUE_WAIT: Duration = Duration::from_millis(50);

/// Spawns a child with a fresh bus socketpair. The welcome and the generation are queued on
/// the socket before the child is exec'd, so its attach waits for nobody. If the spawn fails,
/// the child's end is dropped and the serving task ends on the closed socket.
async fn start_child(ctx: &Context, label: ChildLabel) -> std::io::Result<Child> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut spec = ctx.spec(label)?;
    spec.bus = Some(theirs.into());
    let bus = forkless_bus::BusStream::from_std(ours)?;
    let (queued, is_queued) = tokio::sync::oneshot::channel();
    tokio::spawn(serve_child(bus, label, ctx.bus.clone(), queued));
    let _ = tokio::time::timeout(QUEUE_WAIT, is_queued).await;
    ctx.spawner.spawn(spec).await
}

/// SIGTERM to the child's process group; SIGKILL if it is still there after `grace`.
async fn stop_child(child: &mut Child, pid: u32, grace: Duration) -> std::io::Result<ExitStatus> {
    signal_group(pid, Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!("pid {pid} still running {grace:?} after SIGTERM: SIGKILL");
            signal_group(pid, Signal::KILL);
            child.wait().await
        }
    }
}

pub(crate) fn signal_group(pid: u32, signal: Signal) {
    if let Some(pgid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // ESRCH means the group is already gone, which is what we wanted.
        let _ = kill_process_group(pgid, signal);
    }
}

/// The tasks forwarding a child's stdout and stderr, and the last lines of stderr.
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
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    span: tracing::Span,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
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
