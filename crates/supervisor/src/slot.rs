//! A slot: one owner or worker position, kept filled for as long as the supervisor runs.
//!
//! The slot starts its child and waits for it to become ready (`[workers] start_timeout_s`;
//! a child that is not ready by then is killed and counts as a failed start). Then it waits
//! for whichever comes first:
//! - the child exits: [`ExitKind`] decides — a planned exit (status 0, e.g. recycled after
//!   `max_requests`) restarts at once; 78 stops the supervisor with the child's last words;
//!   75 (resources not free yet) retries with backoff; anything else is a crash, restarted
//!   with backoff and counted against the restart intensity;
//! - the child hangs (a ready worker's heartbeats stop for `[workers] timeout_s`): it is
//!   killed (SIGTERM, SIGKILL after a short grace) and restarted, as a crash;
//! - a replace command (rolling restart, `supervisor restart`): a new child is started beside
//!   the old one, and only once it is ready is the old one stopped gracefully, so the slot
//!   never stops serving;
//! - stop: the child is stopped gracefully and the slot ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::children::{launch, Context, Running};
use crate::events::Event;
use crate::restart::{jittered, Backoff, ExitKind, Intensity};
use crate::spawn::ChildLabel;

/// How long a hung child gets between SIGTERM and SIGKILL.
const HUNG_GRACE: Duration = Duration::from_secs(2);

/// A running slot: its task, and how to talk to it.
#[derive(Debug)]
pub struct Slot {
    pub label: ChildLabel,
    stop: CancellationToken,
    commands: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    task: JoinHandle<()>,
}

impl Slot {
    pub fn spawn(ctx: Arc<Context>, label: ChildLabel) -> Slot {
        let stop = CancellationToken::new();
        let (commands, inbox) = mpsc::unbounded_channel();
        let task = tokio::spawn(supervise(ctx, label, stop.clone(), inbox));
        Slot { label, stop, commands, task }
    }

    /// A handle that can ask this slot for replacements (for rolling restarts).
    pub fn replacer(&self) -> Replacer {
        Replacer { label: self.label, commands: self.commands.clone() }
    }

    /// Stops the child gracefully and ends the slot.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Asks one slot to replace its child.
#[derive(Debug, Clone)]
pub struct Replacer {
    pub label: ChildLabel,
    commands: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl Replacer {
    pub async fn replace(&self) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let gone = || format!("{} is stopping", self.label);
        self.commands.send(reply).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// How a started child's start-up ended.
enum Startup {
    Ready,
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Stopped,
}

/// What ended a ready child's run.
enum Ending {
    Exited(std::io::Result<std::process::ExitStatus>),
    Hung,
    Replace(oneshot::Sender<Result<(), String>>),
    Stop,
}

async fn wait_ready(running: &mut Running, timeout: Duration, stop: &CancellationToken) -> Startup {
    tokio::select! {
        ready = &mut running.ready => match ready {
            Ok(()) => Startup::Ready,
            // The bus connection ended without readiness: the child is dying; collect its status.
            Err(_) => Startup::Exited(running.child.wait().await),
        },
        status = running.child.wait() => Startup::Exited(status),
        _ = tokio::time::sleep(timeout) => Startup::TimedOut,
        _ = stop.cancelled() => Startup::Stopped,
    }
}

struct SlotLoop {
    ctx: Arc<Context>,
    label: ChildLabel,
    stop: CancellationToken,
    backoff: Backoff,
    intensity: Intensity,
}

impl SlotLoop {
    fn name(&self) -> String {
        self.label.to_string()
    }

    /// The GPU to take out of service instead of stopping everything, when this slot is a
    /// worker of a service on several GPUs with `[cuda] on_device_failure = "degrade"`.
    fn degradable_device(&self) -> Option<u32> {
        let degrade = self.ctx.config().cuda.on_device_failure == crate::config::DeviceFailure::Degrade;
        let several = self.ctx.bus.devices.len() > 1;
        (degrade && several && self.label.role == forkless_bus::Role::Worker)
            .then(|| self.ctx.bus.device_of(self.label.index))
            .flatten()
    }

    fn start_timeout(&self) -> Duration {
        self.ctx.config().workers.start_timeout()
    }

    /// Starts a child and waits for readiness; `Err` carries what to do about the failure.
    async fn start(&mut self) -> Result<Running, Failure> {
        let mut running = launch(&self.ctx, self.label).await.map_err(Failure::Spawn)?;
        match wait_ready(&mut running, self.start_timeout(), &self.stop).await {
            Startup::Ready => Ok(running),
            Startup::Stopped => {
                let _ = running.stop(self.ctx.grace()).await;
                Err(Failure::Stopped)
            }
            Startup::TimedOut => {
                let reason = format!("was not ready within {:?}", self.start_timeout());
                let (_, tail) = running.stop(HUNG_GRACE).await;
                Err(Failure::Crash { reason, tail, uptime: Duration::ZERO })
            }
            Startup::Exited(status) => {
                let uptime = running.started.elapsed();
                let (status, tail) = running.reaped(status).await;
                Err(Failure::before_ready(status, tail, uptime))
            }
        }
    }
}

/// Why a child is not running (any more).
enum Failure {
    Spawn(std::io::Error),
    Stopped,
    Planned,
    Fatal { tail: String },
    Temporary { reason: String },
    Crash { reason: String, tail: String, uptime: Duration },
}

impl Failure {
    /// A start that ends before the child was ready is a failed start, whatever its status:
    /// status 0 too (a program that exits at once would otherwise restart in a tight loop),
    /// so backoff and restart intensity apply. Statuses 78 and 75 keep their meaning.
    fn before_ready(status: std::io::Result<std::process::ExitStatus>, tail: String, uptime: Duration) -> Failure {
        match Failure::from_exit(status, tail, uptime) {
            Failure::Planned => Failure::Crash {
                reason: "exited with status 0 before it was ready (a failed start)".into(),
                tail: String::new(),
                uptime,
            },
            other => other,
        }
    }

    fn from_exit(status: std::io::Result<std::process::ExitStatus>, tail: String, uptime: Duration) -> Failure {
        let reason = describe(&status);
        match ExitKind::of(&status) {
            ExitKind::Planned => Failure::Planned,
            ExitKind::Fatal => Failure::Fatal { tail },
            ExitKind::Temporary => Failure::Temporary { reason },
            ExitKind::Crash => Failure::Crash { reason, tail, uptime },
        }
    }
}

/// Runs one slot until `stop` (then stops its child gracefully) or a fatal failure.
pub async fn supervise(
    ctx: Arc<Context>,
    label: ChildLabel,
    stop: CancellationToken,
    mut commands: mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
) {
    let restart = ctx.config().restart.clone();
    ctx.bus.processes.open_slot(label);
    let mut slot = SlotLoop { ctx, label, stop, backoff: Backoff::new(&restart), intensity: Intensity::new(&restart) };
    let mut next: Option<Running> = None;
    loop {
        if slot.stop.is_cancelled() {
            if let Some(running) = next.take() {
                let _ = running.stop(slot.ctx.grace()).await;
            }
            break;
        }
        let started = match next.take() {
            Some(running) => Ok(running),
            None => slot.start().await,
        };
        let failure = match started {
            Ok(running) => match run_ready(&mut slot, running, &mut commands).await {
                Continue::Next(running) => {
                    next = Some(*running);
                    continue;
                }
                Continue::Failed(failure) => failure,
            },
            Err(failure) => failure,
        };
        if !handle_failure(&mut slot, failure).await {
            break;
        }
    }
    slot.ctx.bus.processes.remove(label);
    let _ = slot.ctx.events.send(Event::SlotEnded { label });
}

enum Continue {
    /// Run this (replacement) child next.
    Next(Box<Running>),
    Failed(Failure),
}

/// Watches a ready child until it ends, hangs, is replaced or is stopped.
async fn run_ready(
    slot: &mut SlotLoop,
    mut running: Running,
    commands: &mut mpsc::UnboundedReceiver<oneshot::Sender<Result<(), String>>>,
) -> Continue {
    let ending = tokio::select! {
        status = running.child.wait() => Ending::Exited(status),
        _ = running.hung.cancelled() => Ending::Hung,
        Some(reply) = commands.recv() => Ending::Replace(reply),
        _ = slot.stop.cancelled() => Ending::Stop,
    };
    let uptime = running.started.elapsed();
    let pid = running.pid;
    match ending {
        Ending::Stop => {
            let (status, _) = running.stop(slot.ctx.grace()).await;
            tracing::info!("{} (pid {pid}) stopped: {}", slot.name(), describe(&status));
            Continue::Failed(Failure::Stopped)
        }
        Ending::Hung => {
            let (_, tail) = running.stop(HUNG_GRACE).await;
            let reason = format!(
                "hung (no heartbeat for {:?})",
                slot.ctx.heartbeat_timeout(slot.label.role).unwrap_or_default()
            );
            Continue::Failed(Failure::Crash { reason, tail, uptime })
        }
        Ending::Exited(status) => {
            let (status, tail) = running.reaped(status).await;
            Continue::Failed(Failure::from_exit(status, tail, uptime))
        }
        Ending::Replace(reply) => match slot.start().await {
            Ok(replacement) => {
                tracing::info!("{}: pid {} is ready; stopping pid {pid}", slot.name(), replacement.pid);
                let (status, _) = running.stop(slot.ctx.grace()).await;
                tracing::info!("{} (pid {pid}) replaced: {}", slot.name(), describe(&status));
                let _ = reply.send(Ok(()));
                Continue::Next(Box::new(replacement))
            }
            Err(failure) => {
                let why = match &failure {
                    Failure::Crash { reason, .. } => reason.clone(),
                    Failure::Spawn(e) => e.to_string(),
                    Failure::Stopped => "the slot is stopping".into(),
                    _ => "the replacement exited".into(),
                };
                let _ = reply.send(Err(format!("replacement for {} failed: {why}", slot.name())));
                tracing::warn!("replacement for {} failed: {why}; pid {pid} keeps serving", slot.name());
                // The old child keeps serving; watch it again.
                Box::pin(run_ready(slot, running, commands)).await
            }
        },
    }
}

/// Applies the restart policy to a failure. Returns false when the slot must end.
async fn handle_failure(slot: &mut SlotLoop, failure: Failure) -> bool {
    let name = slot.name();
    let delay = match failure {
        Failure::Stopped => return false,
        Failure::Planned => {
            tracing::info!("{name} exited on its own (status 0): starting a fresh one");
            metrics::counter!("forkless_restarts_total", "role" => slot.label.role_name(), "reason" => "planned")
                .increment(1);
            Duration::ZERO
        }
        Failure::Fatal { tail } => {
            let reason = format!(
                "{name} failed and will not be restarted (exit status {}); its last words:\n{tail}",
                crate::children::EXIT_FATAL
            );
            let _ = slot.ctx.events.send(Event::Fatal(reason));
            return false;
        }
        Failure::Spawn(e) if cannot_ever_start(&e) => {
            let _ = slot.ctx.events.send(Event::Fatal(format!("cannot start {name}: {e}")));
            return false;
        }
        Failure::Spawn(e) => {
            // EAGAIN, EMFILE, ENOMEM...: a bad moment, not a broken config.
            let delay = slot.backoff.after_exit(Duration::ZERO);
            tracing::error!("cannot start {name}: {e}; retrying in {delay:?}");
            delay
        }
        Failure::Temporary { reason } => {
            let delay = slot.backoff.after_exit(Duration::ZERO);
            tracing::warn!(
                "{name} {reason}: resources are not free yet; retrying in {delay:?} (not counted as a crash)"
            );
            delay
        }
        Failure::Crash { reason, tail, uptime } => {
            slot.ctx.bus.processes.crashed(slot.label);
            let _ = slot.ctx.events.send(Event::Crashed { label: slot.label });
            metrics::counter!("forkless_restarts_total", "role" => slot.label.role_name(), "reason" => "crash")
                .increment(1);
            if let Err(count) = slot.intensity.record(Instant::now()) {
                let reason = format!(
                    "{name} kept dying ({count} restarts within {:?}; last: {reason}); giving up. Its last words:\n{tail}",
                    slot.intensity.window()
                );
                let event = match slot.degradable_device() {
                    Some(device) => Event::DeviceFailed { device, reason },
                    None => Event::Fatal(reason),
                };
                let _ = slot.ctx.events.send(event);
                return false;
            }
            let delay = slot.backoff.after_exit(uptime);
            tracing::warn!("{name} {reason}; restarting in {delay:?}");
            delay
        }
    };
    let delay = jittered(delay);
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = slot.stop.cancelled() => false,
    }
}

fn describe(status: &std::io::Result<std::process::ExitStatus>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::test_support::context;
    use forkless_bus::Role;

    /// What a slot reports once its child has crashed more often than `[restart]` allows
    /// (`max_restarts = 0`: the first crash).
    async fn give_up(cuda: &str, devices: &[u32], role: Role, index: u32) -> Event {
        let (ctx, mut events) = context(&format!("[restart]\nmax_restarts = 0\n[cuda]\n{cuda}\n"), devices);
        let restart = ctx.config().restart.clone();
        let mut slot = SlotLoop {
            ctx,
            label: ChildLabel { role, index },
            stop: CancellationToken::new(),
            backoff: Backoff::new(&restart),
            intensity: Intensity::new(&restart),
        };
        let crash =
            Failure::Crash { reason: "exited with status 1".into(), tail: String::new(), uptime: Duration::ZERO };
        assert!(!handle_failure(&mut slot, crash).await, "the slot ends instead of restarting");
        assert!(matches!(events.try_recv(), Ok(Event::Crashed { label }) if label == slot.label));
        let verdict = events.try_recv().expect("a verdict");
        assert!(events.try_recv().is_err(), "one verdict only");
        verdict
    }

    /// `on_device_failure = "degrade"` on several GPUs turns a worker's crash loop into its
    /// device's failure (worker i is on devices[i % n]); `stop`, a single GPU, or the owner
    /// stop the service, as any crash loop does.
    #[tokio::test]
    async fn a_crash_loop_takes_the_workers_device_out_only_when_degrading() {
        let degrade = "devices = [0, 1]\non_device_failure = \"degrade\"";
        let stop = "devices = [0, 1]\non_device_failure = \"stop\"";
        let one = "devices = [3]\non_device_failure = \"degrade\"";
        match give_up(degrade, &[0, 1], Role::Worker, 3).await {
            Event::DeviceFailed { device, reason } => {
                assert_eq!(device, 1, "worker 3 of 2 devices is on device 1");
                assert!(reason.contains("worker 3 kept dying") && reason.contains("status 1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(give_up(degrade, &[0, 1], Role::Worker, 2).await, Event::DeviceFailed { device: 0, .. }));
        for (cuda, devices, role) in [
            (stop, &[0, 1][..], Role::Worker),
            (one, &[3][..], Role::Worker),
            (degrade, &[0, 1][..], Role::Owner),
            (degrade, &[][..], Role::Worker),
        ] {
            match give_up(cuda, devices, role, 1).await {
                Event::Fatal(reason) => assert!(reason.contains("kept dying"), "{reason}"),
                other => panic!("{cuda} on {devices:?}, {role:?}: {other:?}"),
            }
        }
    }
}
