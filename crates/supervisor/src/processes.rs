//! The supervisor's view of its children, one entry per slot (the owner, worker 0..N-1): what
//! runs there, in what state, since when, how often it was restarted, what it reported.
//! `supervisor status` and the metrics read it; slots and bus connections write it.
//!
//! ```
//! use forkless_supervisor::processes::{ProcessTable, State};
//! use forkless_supervisor::spawn::ChildLabel;
//! let table = ProcessTable::default();
//! let label = ChildLabel { role: forkless_bus::Role::Worker, index: 0 };
//! table.started(label, 4242);
//! table.set_state(label, State::Ready);
//! assert_eq!(table.snapshot()[0].state, State::Ready);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkless_bus::Role;
use serde::{Deserialize, Serialize};

use crate::spawn::ChildLabel;

/// Where a slot's child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Exec'd, not ready yet (attaching, loading, warming up).
    Starting,
    /// Serving (a worker) or holding a published generation (the owner).
    Ready,
    /// Asked to stop, draining.
    Stopping,
    /// Dead; waiting out the restart backoff.
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

/// One slot, as `status` shows it.
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
struct Entry {
    pid: Option<u32>,
    state: State,
    restarts: u32,
    started: Option<Instant>,
    generation: Option<u64>,
    requests: u64,
}

/// Shared table of slots, keyed by (role, index).
#[derive(Debug, Clone, Default)]
pub struct ProcessTable(Arc<Mutex<BTreeMap<(u8, u32), Entry>>>);

fn key(label: ChildLabel) -> (u8, u32) {
    (if label.role == Role::Owner { 0 } else { 1 }, label.index)
}

impl ProcessTable {
    fn with<R>(&self, label: ChildLabel, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut table = self.0.lock().expect("process table poisoned");
        let entry = table.entry(key(label)).or_insert(Entry {
            pid: None,
            state: State::Starting,
            restarts: 0,
            started: None,
            generation: None,
            requests: 0,
        });
        f(entry)
    }

    /// A new process now runs in this slot.
    pub fn started(&self, label: ChildLabel, pid: u32) {
        self.with(label, |e| {
            *e = Entry {
                pid: Some(pid),
                state: State::Starting,
                started: Some(Instant::now()),
                generation: None,
                requests: 0,
                ..*e
            }
        });
    }

    pub fn set_state(&self, label: ChildLabel, state: State) {
        self.with(label, |e| e.state = state);
    }

    /// The slot's process is ready and serves `generation`.
    pub fn ready(&self, label: ChildLabel, generation: Option<u64>) {
        self.with(label, |e| {
            e.state = State::Ready;
            e.generation = generation.or(e.generation);
        });
    }

    pub fn set_generation(&self, label: ChildLabel, generation: u64) {
        self.with(label, |e| e.generation = Some(generation));
    }

    pub fn set_requests(&self, label: ChildLabel, requests: u64) {
        self.with(label, |e| e.requests = requests);
    }

    /// Counts an unplanned restart; the process is gone.
    pub fn crashed(&self, label: ChildLabel) {
        self.with(label, |e| {
            e.restarts += 1;
            e.pid = None;
            e.state = State::Backoff;
        });
    }

    /// The process exited as planned (recycled, replaced).
    pub fn exited(&self, label: ChildLabel, pid: u32) {
        self.with(label, |e| {
            if e.pid == Some(pid) {
                e.pid = None;
                e.state = State::Starting;
            }
        });
    }

    /// The slot is gone (scaled down or stopped).
    pub fn remove(&self, label: ChildLabel) {
        self.0.lock().expect("process table poisoned").remove(&key(label));
    }

    /// Workers currently ready.
    pub fn ready_workers(&self) -> usize {
        let table = self.0.lock().expect("process table poisoned");
        table.iter().filter(|((role, _), e)| *role == 1 && e.state == State::Ready).count()
    }

    /// Every slot, owner first, with memory read now.
    pub fn snapshot(&self) -> Vec<ProcessInfo> {
        let table = self.0.lock().expect("process table poisoned");
        table
            .iter()
            .map(|(&(role, index), e)| ProcessInfo {
                role: if role == 0 { "owner" } else { "worker" }.into(),
                index,
                pid: e.pid,
                state: e.state,
                restarts: e.restarts,
                uptime_s: e.started.filter(|_| e.pid.is_some()).map(|t| t.elapsed().as_secs_f64()),
                rss_bytes: None,
                gpu_bytes: None,
                generation: e.generation,
                requests: e.requests,
            })
            .collect()
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
