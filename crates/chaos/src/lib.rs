//! The chaos harness: starts the real supervisor, drives load at it, kills its processes on a
//! seeded schedule, checks every answer against an independent reference, and reports what
//! broke and how fast it healed. It exits non-zero when an invariant fails:
//! - no wrong answer, ever;
//! - no failure caused by killing the owner (workers never depend on it once attached);
//! - a SIGKILLed worker fails at most the requests that were in flight on it; a SIGTERMed one
//!   fails none (it drains); no failure that no kill explains;
//! - every victim is replaced and serving again;
//! - after shutdown nothing is left: no process, no arena memfd, no `/dev/shm` entry, no
//!   runtime folder or control socket (and, with a GPU, no extra VRAM).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let options = forkless_chaos::Options::new("examples/linear/config.toml".into());
//! let report = forkless_chaos::run(options).await?;
//! assert!(report.passed());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod check;
pub mod load;
pub mod reference;
pub mod report;
pub mod schedule;
mod supervisor;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use forkless_supervisor::config::Config;
use tokio_util::sync::CancellationToken;

use crate::load::{request, Connection, Outcome};
use crate::reference::Reference;
use crate::report::{Kill, Report};
use crate::schedule::{Plan, Rng, Target};
use crate::supervisor::SupervisorProcess;

/// Seeds of the requests: a fixed set, so the reference is computed once per seed.
pub const SEEDS: u64 = 64;
/// The window after a kill whose latencies are reported apart.
pub const AFTER_KILL: Duration = Duration::from_secs(2);

/// Which signal the kills send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KillSignal {
    #[serde(rename = "KILL")]
    Kill,
    #[serde(rename = "TERM")]
    Term,
    /// SIGSTOP: the process hangs; the supervisor must notice (`[workers] timeout_s`).
    #[serde(rename = "STOP")]
    Stop,
}

impl KillSignal {
    fn raw(self) -> rustix::process::Signal {
        match self {
            KillSignal::Kill => rustix::process::Signal::KILL,
            KillSignal::Term => rustix::process::Signal::TERM,
            KillSignal::Stop => rustix::process::Signal::STOP,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub duration: Duration,
    /// Keep-alive connections, each with one request outstanding.
    pub connections: usize,
    /// Requests per second across all connections; `None`: as fast as answers come.
    pub rate: Option<f64>,
    pub plans: Vec<Plan>,
    pub signal: KillSignal,
    pub seed: u64,
    /// The `supervisor` executable (default: beside this one).
    pub supervisor: PathBuf,
    /// Where to copy the supervisor's whole log (JSON lines), e.g. for workers' batch stats.
    pub supervisor_log: Option<PathBuf>,
}

impl Options {
    pub fn new(config: PathBuf) -> Options {
        let supervisor = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("supervisor")))
            .unwrap_or_else(|| "supervisor".into());
        Options {
            config,
            duration: Duration::from_secs(30),
            connections: 8,
            rate: None,
            plans: schedule::parse_plans("owner,worker", 3.0).expect("valid"),
            signal: KillSignal::Kill,
            seed: 1,
            supervisor,
            supervisor_log: None,
        }
    }
}

/// Connection state the kill scheduler reads: which worker each connection talks to, and
/// whether a request is outstanding on it.
#[derive(Debug, Clone, Copy, Default)]
struct ConnState {
    worker: Option<u32>,
    in_flight: bool,
}

/// Runs one chaos scenario and returns its report.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let config = Config::load(&options.config)?;
    let check = Arc::new(check::CheckSpec::from_table(config.check.as_ref())?);
    let baseline = report::LeakBaseline::take();
    let mut sup = SupervisorProcess::start(&options.supervisor, &options.config, options.supervisor_log.as_deref())?;
    let addr: SocketAddr = sup.wait_ready().await?;
    tracing::info!(
        "service ready on {addr}; the reference answers for {}: {:?}",
        config.model.path.display(),
        check.reference
    );
    let seeds: Vec<u64> = (0..SEEDS).collect();
    let reference = Arc::new(Reference::for_service(&check, &config, &seeds)?);
    let supervisor_fds_before = report::fd_count(sup.pid());

    let started = Instant::now();
    let stop = CancellationToken::new();
    let states = Arc::new(Mutex::new(vec![ConnState::default(); options.connections.max(1)]));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut load = tokio::task::JoinSet::new();
    for index in 0..options.connections.max(1) {
        let pace = options.rate.and_then(|r| Duration::try_from_secs_f64(options.connections.max(1) as f64 / r).ok());
        let worker = LoadWorker {
            addr,
            index,
            pace,
            seed: options.seed.wrapping_add(index as u64),
            check: check.clone(),
            states: states.clone(),
            outcomes: outcomes.clone(),
            stop: stop.clone(),
            started,
        };
        load.spawn(worker.run());
    }
    let kills = Arc::new(Mutex::new(Vec::<Kill>::new()));
    let mut killers = tokio::task::JoinSet::new();
    for (n, plan) in options.plans.iter().enumerate() {
        let killer = Killer {
            config: config.clone(),
            plan: *plan,
            signal: options.signal,
            rng: Rng::new(options.seed.wrapping_mul(31).wrapping_add(n as u64)),
            states: states.clone(),
            kills: kills.clone(),
            stop: stop.clone(),
            started,
        };
        killers.spawn(killer.run());
    }

    let deadline = started + options.duration;
    while Instant::now() < deadline {
        sup.pump_events(&kills, started);
        if let Some(status) = sup.exited() {
            stop.cancel();
            anyhow::bail!("the supervisor exited during the run ({status}); its log:\n{}", sup.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    while killers.join_next().await.is_some() {}
    while load.join_next().await.is_some() {}
    let load_ended = started.elapsed();
    // Give the last victims time to come back before judging recovery.
    let settle = Instant::now() + Duration::from_secs(15);
    while Instant::now() < settle && kills.lock().expect("kills").iter().any(|k| k.recovered_s.is_none()) {
        sup.pump_events(&kills, started);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let supervisor_fds_after = report::fd_count(sup.pid());
    let pids_seen = sup.pids_seen();
    // What the batch lanes did over the run (mean batch, workers per pass), before they go.
    let lanes = supervisor::status(&config).await.map(|s| s.lanes).unwrap_or_default();
    let shutdown = sup.stop().await;
    let leaks = baseline.check(&pids_seen, &sup.leftover_paths());

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let kills = std::mem::take(&mut *kills.lock().expect("kills"));
    let mut report = Report::build(report::Inputs {
        options: &options,
        outcomes,
        kills,
        reference: &reference,
        load_ended,
        shutdown,
        leaks,
        supervisor_fd_growth: supervisor_fds_after as i64 - supervisor_fds_before as i64,
    });
    report.lanes = lanes;
    Ok(report)
}

/// One closed-loop connection.
struct LoadWorker {
    addr: SocketAddr,
    index: usize,
    pace: Option<Duration>,
    seed: u64,
    check: Arc<check::CheckSpec>,
    states: Arc<Mutex<Vec<ConnState>>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: CancellationToken,
    started: Instant,
}

impl LoadWorker {
    async fn run(self) {
        let mut rng = Rng::new(self.seed);
        let mut connection: Option<Connection> = None;
        let mut next = Instant::now();
        while !self.stop.is_cancelled() {
            if let Some(pace) = self.pace {
                tokio::time::sleep_until(next.into()).await;
                next += pace;
            }
            let seed = rng.below(SEEDS as usize) as u64;
            let on_worker = {
                let mut states = self.states.lock().expect("states");
                states[self.index].in_flight = true;
                states[self.index].worker
            };
            let mut outcome = request(self.addr, &mut connection, &self.check, seed, self.started).await;
            if outcome.result.is_err() {
                outcome.worker = on_worker;
            }
            if outcome.retried {
                outcome.retried_from = on_worker;
            }
            {
                let mut states = self.states.lock().expect("states");
                let state = &mut states[self.index];
                state.in_flight = false;
                state.worker = if connection.is_some() { outcome.worker } else { None };
            }
            self.outcomes.lock().expect("outcomes").push(outcome);
        }
    }
}

/// Kills on one plan's schedule.
struct Killer {
    config: Config,
    plan: Plan,
    signal: KillSignal,
    rng: Rng,
    states: Arc<Mutex<Vec<ConnState>>>,
    kills: Arc<Mutex<Vec<Kill>>>,
    stop: CancellationToken,
    started: Instant,
}

impl Killer {
    async fn run(mut self) {
        loop {
            let wait = self.rng.jitter(self.plan.every);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return,
            }
            if let Err(e) = self.strike().await {
                tracing::warn!("kill skipped: {e:#}");
            }
        }
    }

    async fn strike(&mut self) -> anyhow::Result<()> {
        let status = supervisor::status(&self.config).await?;
        let ready = |role: &str| -> Vec<(u32, u32)> {
            status
                .processes
                .iter()
                .filter(|p| p.role == role && p.state == forkless_supervisor::processes::State::Ready)
                .filter_map(|p| p.pid.map(|pid| (p.index, pid)))
                .collect()
        };
        let leader = status.lanes.first().map(|lane| lane.leader_pid).filter(|&pid| pid != 0);
        let (role, mut candidates) = match self.plan.target {
            Target::Owner => ("owner", ready("owner")),
            Target::Worker | Target::Workers(_) => ("worker", ready("worker")),
            Target::Leader => ("worker", ready("worker").into_iter().filter(|&(_, pid)| Some(pid) == leader).collect()),
        };
        let count = match self.plan.target {
            Target::Workers(n) => n.min(candidates.len().saturating_sub(1)).max(1),
            _ => 1,
        };
        if candidates.is_empty() {
            anyhow::bail!("no ready {role} to kill right now");
        }
        for _ in 0..count {
            if candidates.is_empty() {
                break;
            }
            let (index, pid) = candidates.swap_remove(self.rng.below(candidates.len()));
            let in_flight = {
                let states = self.states.lock().expect("states");
                states.iter().filter(|s| s.in_flight && s.worker == Some(pid)).count()
            };
            let at_s = self.started.elapsed().as_secs_f64();
            let target = rustix::process::Pid::from_raw(pid as i32).context("bad pid")?;
            let killed_ns = monotonic_ns();
            rustix::process::kill_process(target, self.signal.raw()).with_context(|| format!("kill {pid}"))?;

            tracing::info!(
                "t={at_s:.2}s: {:?} → {role} {index} (pid {pid}), {in_flight} requests in flight on it",
                self.signal
            );
            self.kills.lock().expect("kills").push(Kill {
                role: role.into(),
                index,
                pid,
                signal: self.signal,
                at_s,
                in_flight,
                recovered_s: None,
                failures: 0,
                retried: 0,
                next_pass_ms: None,
            });
            if self.plan.target == Target::Leader {
                let index = self.kills.lock().expect("kills").len() - 1;
                tokio::spawn(time_next_pass(self.config.clone(), self.kills.clone(), index, killed_ns));
            }
        }
        Ok(())
    }
}

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// Waits (at most 10 s) until the lane records the first pass after a takeover that began
/// after `killed_ns`, and notes the gap on kill `index`. Both clocks are CLOCK_MONOTONIC, so
/// the gap is the lane's own, not this poll's.
async fn time_next_pass(config: Config, kills: Arc<Mutex<Vec<Kill>>>, index: usize, killed_ns: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(status) = supervisor::status(&config).await {
            let takeover = status.lanes.first().map_or(0, |lane| lane.takeover_pass_ns);
            if takeover > killed_ns {
                if let Some(kill) = kills.lock().expect("kills").get_mut(index) {
                    kill.next_pass_ms = Some((takeover - killed_ns) as f64 / 1e6);
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts per cause, for the report.
pub type Counts = BTreeMap<String, u64>;
