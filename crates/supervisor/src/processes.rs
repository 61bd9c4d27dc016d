//! The supervisor's view of its children: one entry per slot (the owner, worker 0..N-1), and
//! in it one record per live process of that slot (two during a rolling replacement). The
//! slots, the bus connections and `supervisor status` all read and write it.
//!
//! A process's state only moves forward, **starting → ready → stopping**, and its record is
//! removed when it is gone; every update names the pid, so a late event about an old process
//! (or an early one about a new process, such as its bus connection reporting `Ready` before
//! the spawner recorded the start) can never move a record backwards or touch another process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkless_bus::Role;
use serde::{Deserialize, Serialize};

use crate::spawn::ChildLabel;

/// Where a process, or a slot without one, is in its life. Ordered: a process only moves
/// forward through `Starting < Ready < Stopping`; `Backoff` describes a slot with no process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Exec'd, not ready yet (attaching, loading, warming up).
    Starting,
    /// Serving (a worker) or holding a published generation (the owner).
    Ready,
    /// Asked to stop, draining.
    Stopping,
    /// No process: waiting out the restart backoff.
    Backoff,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Stopping => "stopping",
            State::Backoff => "backoff",
        };
        f.pad(name)
    }
}

/// One process (or one empty slot), as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub role: String,
    pub index: u32,
    pub pid: Option<u32>,
    pub state: State,
    /// Restarts of this slot that nobody asked for (crashes, hangs, failed starts).
    pub restarts: u32,
    pub uptime_s: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// GPU memory of the process (NVML); `None` on the host path.
    pub gpu_bytes: Option<u64>,
    pub generation: Option<u64>,
    /// Requests served by this process, as its heartbeats report them.
    pub requests: u64,
}

#[derive(Debug)]
struct Process {
    state: State,
    started: Instant,
    generation: Option<u64>,
    requests: u64,
}

#[derive(Debug, Default)]
struct SlotEntry {
    restarts: u32,
    processes: BTreeMap<u32, Process>,
}

/// Shared table of slots, keyed by (role, index).
#[derive(Debug, Clone, Default)]
pub struct ProcessTable(Arc<Mutex<BTreeMap<(u8, u32), SlotEntry>>>);

fn key(label: ChildLabel) -> (u8, u32) {
    (if label.role == Role::Owner { 0 } else { 1 }, label.index)
}

impl ProcessTable {
    /// A slot exists from [`Self::open_slot`] to [`Self::remove`]; an update about a slot that
    /// is gone (a late message from a worker scaled away) changes nothing.
    fn with_slot(&self, label: ChildLabel, f: impl FnOnce(&mut SlotEntry)) {
        if let Some(slot) = self.0.lock().expect("process table poisoned").get_mut(&key(label)) {
            f(slot)
        }
    }

    /// The slot starts: it shows (in backoff, with no process) until its first process runs.
    pub fn open_slot(&self, label: ChildLabel) {
        self.0.lock().expect("process table poisoned").entry(key(label)).or_default();
    }

    fn with_process(&self, label: ChildLabel, pid: u32, f: impl FnOnce(&mut Process)) {
        self.with_slot(label, |slot| {
            let process = slot.processes.entry(pid).or_insert_with(|| Process {
                state: State::Starting,
                started: Instant::now(),
                generation: None,
                requests: 0,
            });
            f(process)
        })
    }

    /// A process now runs in this slot (a no-op if its record exists already).
    pub fn spawned(&self, label: ChildLabel, pid: u32) {
        self.with_process(label, pid, |_| {});
    }

    /// Moves a process forward to `state`; an update that would move it back is ignored.
    pub fn advance(&self, label: ChildLabel, pid: u32, state: State) {
        self.with_process(label, pid, |p| p.state = p.state.max(state));
    }

    /// The process is ready and serves `generation`.
    pub fn ready(&self, label: ChildLabel, pid: u32, generation: Option<u64>) {
        self.with_process(label, pid, |p| {
            p.state = p.state.max(State::Ready);
            p.generation = generation.or(p.generation);
        });
    }

    pub fn set_generation(&self, label: ChildLabel, pid: u32, generation: u64) {
        self.with_process(label, pid, |p| p.generation = Some(generation));
    }

    pub fn set_requests(&self, label: ChildLabel, pid: u32, requests: u64) {
        self.with_process(label, pid, |p| p.requests = requests);
    }

    /// The process is gone (exited, killed, reaped).
    pub fn gone(&self, label: ChildLabel, pid: u32) {
        self.with_slot(label, |slot| {
            slot.processes.remove(&pid);
        });
    }

    /// Counts an unplanned restart of this slot.
    pub fn crashed(&self, label: ChildLabel) {
        self.with_slot(label, |slot| slot.restarts += 1);
    }

    /// The slot is gone (scaled down or stopped).
    pub fn remove(&self, label: ChildLabel) {
        self.0.lock().expect("process table poisoned").remove(&key(label));
    }

    /// Workers with at least one ready process.
    pub fn ready_workers(&self) -> usize {
        let table = self.0.lock().expect("process table poisoned");
        table
            .iter()
            .filter(|((role, _), slot)| *role == 1 && slot.processes.values().any(|p| p.state == State::Ready))
            .count()
    }

    /// Every process, owner first; a slot with none shows as one row in backoff.
    pub fn snapshot(&self) -> Vec<ProcessInfo> {
        let table = self.0.lock().expect("process table poisoned");
        let mut rows = Vec::new();
        for (&(role, index), slot) in table.iter() {
            let row = |pid, state, process: Option<&Process>| ProcessInfo {
                role: if role == 0 { "owner" } else { "worker" }.into(),
                index,
                pid,
                state,
                restarts: slot.restarts,
                uptime_s: process.map(|p| p.started.elapsed().as_secs_f64()),
                rss_bytes: None,
                gpu_bytes: None,
                generation: process.and_then(|p| p.generation),
                requests: process.map_or(0, |p| p.requests),
            };
            if slot.processes.is_empty() {
                rows.push(row(None, State::Backoff, None));
            }
            for (&pid, process) in &slot.processes {
                rows.push(row(Some(pid), process.state, Some(process)));
            }
        }
        rows
    }
}

/// The longest `status` (or a metrics refresh) waits for memory figures. NVML is a driver
/// call that can hang (a wedged GPU, a driver upgrade in progress), and `/proc` reads can block
/// on a process stuck in the kernel: neither may stall the control socket or the service.
pub const MEASURE_TIMEOUT: Duration = Duration::from_secs(2);

/// Memory figures read now: RSS by pid (sysinfo), and GPU memory (NVML) when there is a GPU.
#[derive(Debug, Default)]
pub struct Measured {
    pub rss: HashMap<u32, u64>,
    pub gpu: Option<forkless_gpu::nvml::GpuMemory>,
}

impl Measured {
    /// Fills in `rss_bytes` and `gpu_bytes`; returns the GPU memory no process accounts for
    /// (escrowed arenas held only by fds, and the driver's own), or `None` without NVML.
    pub fn apply(&self, infos: &mut [ProcessInfo]) -> Option<u64> {
        for info in infos {
            info.rss_bytes = info.pid.and_then(|pid| self.rss.get(&pid).copied());
            info.gpu_bytes =
                self.gpu.as_ref().and_then(|g| info.pid.map(|pid| g.per_process.get(&pid).copied().unwrap_or(0)));
        }
        self.gpu.as_ref().map(|g| g.unattributed)
    }

    /// GPU memory in use on `device`, when NVML answered.
    pub fn device_used(&self, device: u32) -> Option<u64> {
        self.gpu.as_ref().and_then(|g| g.per_device.get(&device).copied())
    }
}

type Job = (Vec<u32>, tokio::sync::oneshot::Sender<Measured>);

/// Measures memory on a thread of its own, off the async runtime, and gives up waiting after
/// [`MEASURE_TIMEOUT`]: a hung NVML then costs that thread, never the service. While the thread
/// is stuck, further requests are answered at once with the reason.
#[derive(Debug, Clone)]
pub struct MemoryMeter {
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// When the measurement in progress started (none in progress: `None`).
    busy_since: Arc<Mutex<Option<Instant>>>,
}

impl MemoryMeter {
    /// Starts the measuring thread.
    pub fn start() -> std::io::Result<Self> {
        let (jobs, inbox) = std::sync::mpsc::sync_channel::<Job>(1);
        let busy_since: Arc<Mutex<Option<Instant>>> = Arc::default();
        let busy = busy_since.clone();
        std::thread::Builder::new().name("forkless-meter".into()).spawn(move || {
            for (pids, reply) in inbox {
                *busy.lock().expect("meter poisoned") = Some(Instant::now());
                let measured = measure_now(&pids);
                *busy.lock().expect("meter poisoned") = None;
                let _ = reply.send(measured);
            }
        })?;
        Ok(MemoryMeter { jobs, busy_since })
    }

    /// Memory of `pids` now, or why it is unknown (the measurement did not come in time).
    pub async fn measure(&self, pids: Vec<u32>) -> Result<Measured, String> {
        let stuck = || {
            let since = self.busy_since.lock().expect("meter poisoned").map(|t| t.elapsed()).unwrap_or_default();
            format!(
                "memory unknown: reading it (NVML, /proc) has not answered for {:.0} s; the GPU driver may hang (check nvidia-smi)",
                since.as_secs_f64().max(MEASURE_TIMEOUT.as_secs_f64())
            )
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.try_send((pids, reply)).is_err() {
            return Err(stuck());
        }
        match tokio::time::timeout(MEASURE_TIMEOUT, answer).await {
            Ok(Ok(measured)) => Ok(measured),
            Ok(Err(_)) => Err("memory unknown: the measuring thread is gone".into()),
            Err(_) => Err(stuck()),
        }
    }
}

/// Reads RSS from the kernel's current figures (sysinfo) and GPU memory from NVML. Blocking:
/// only the meter's thread calls this.
fn measure_now(pids: &[u32]) -> Measured {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pids: Vec<Pid> = pids.iter().copied().map(Pid::from_u32).collect();
    let mut system = System::new();
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&pids),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let rss = pids.iter().filter_map(|&pid| Some((pid.as_u32(), system.process(pid)?.memory()))).collect();
    Measured { rss, gpu: forkless_gpu::nvml::snapshot() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W0: ChildLabel = ChildLabel { role: Role::Worker, index: 0 };

    #[test]
    fn a_process_never_moves_back() {
        let table = ProcessTable::default();
        table.open_slot(W0);
        table.spawned(W0, 10);
        table.advance(W0, 10, State::Stopping);
        table.ready(W0, 10, Some(1));
        table.advance(W0, 10, State::Starting);
        let row = &table.snapshot()[0];
        assert_eq!((row.pid, row.state, row.generation), (Some(10), State::Stopping, Some(1)));
    }

    #[test]
    fn a_replacement_and_its_predecessor_are_two_rows() {
        let table = ProcessTable::default();
        table.open_slot(W0);
        table.ready(W0, 10, Some(1));
        table.spawned(W0, 11);
        assert_eq!(table.ready_workers(), 1, "the old one still serves");
        let states: Vec<_> = table.snapshot().iter().map(|r| (r.pid, r.state)).collect();
        assert_eq!(states, vec![(Some(10), State::Ready), (Some(11), State::Starting)]);
        table.gone(W0, 10);
        table.ready(W0, 11, Some(1));
        table.gone(W0, 12); // a pid this slot never had: nothing happens
        assert_eq!(table.snapshot().len(), 1);
        assert_eq!(table.ready_workers(), 1);
    }

    #[test]
    fn an_empty_slot_is_in_backoff_with_its_restarts() {
        let table = ProcessTable::default();
        table.open_slot(W0);
        table.ready(W0, 10, None);
        table.gone(W0, 10);
        table.crashed(W0);
        let row = &table.snapshot()[0];
        assert_eq!((row.pid, row.state, row.restarts), (None, State::Backoff, 1));
        assert_eq!(table.ready_workers(), 0);
    }

    #[test]
    fn a_slot_that_is_gone_does_not_come_back() {
        let table = ProcessTable::default();
        table.open_slot(W0);
        table.remove(W0);
        table.ready(W0, 10, Some(1));
        assert!(table.snapshot().is_empty());
    }
}

#[cfg(test)]
mod module_example {
    #[test]
    fn a_late_spawn_record_does_not_move_a_ready_process_back() {
        use crate::processes::{ProcessTable, State};
        use crate::spawn::ChildLabel;
        let table = ProcessTable::default();
        let label = ChildLabel { role: forkless_bus::Role::Worker, index: 0 };
        table.open_slot(label);
        table.advance(label, 4242, State::Ready);
        table.spawned(label, 4242); // late: does not move it back to starting
        assert_eq!(table.snapshot()[0].state, State::Ready);
    }
}
