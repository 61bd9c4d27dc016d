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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

/// Fills in `rss_bytes` from the kernel's current figures (sysinfo) and `gpu_bytes` from NVML
/// when there is a GPU. Returns the GPU memory that no process accounts for (escrowed arenas
/// held only by fds, and the driver's own), or `None` without NVML.
pub fn measure_memory(infos: &mut [ProcessInfo]) -> Option<u64> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pids: Vec<Pid> = infos.iter().filter_map(|i| i.pid).map(Pid::from_u32).collect();
    let mut system = System::new();
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&pids),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let gpu = forkless_gpu::nvml::snapshot();
    for info in infos {
        info.rss_bytes = info.pid.and_then(|pid| system.process(Pid::from_u32(pid))).map(|p| p.memory());
        info.gpu_bytes = gpu.as_ref().and_then(|g| info.pid.map(|pid| g.per_process.get(&pid).copied().unwrap_or(0)));
    }
    gpu.map(|g| g.unattributed)
}
