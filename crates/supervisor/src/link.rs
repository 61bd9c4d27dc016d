//! What every bus connection shares ([`BusState`]), what a slot learns from its child's
//! connection ([`ChildLink`]), and why a connection ends ([`ConnError`]). The protocols
//! themselves live in [`crate::owner_link`] and [`crate::worker_link`]; the accept loop and the
//! handshake in [`crate::bus_server`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkless_bus::channel::{RecvError, SendError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::escrow::Escrow;
use crate::events::Event;
use crate::processes::ProcessTable;
use crate::spawn::PidTable;

/// Why one connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot read peer credentials: {0}")]
    Cred(std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
    /// A path-based connection from a process that is not one of our children.
    #[error("refused: {0}")]
    Stranger(String),
    #[error(transparent)]
    Recv(#[from] RecvError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("cannot make an arena fd for the reader: {0}")]
    ReaderFd(#[from] forkless_bus::arena::ReaderFdError),
    #[error("cannot duplicate the batch lane's fd: {0}")]
    LaneFd(std::io::Error),
}

/// A hot swap's request for the owner: load `path` as a new generation. The answer is the
/// generation's number once it is in escrow (offered to the workers), or why not.
#[derive(Debug)]
pub struct LoadRequest {
    pub path: String,
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// What every bus connection shares.
#[derive(Debug, Clone)]
pub struct BusState {
    pub escrow: Escrow,
    pub events: mpsc::UnboundedSender<Event>,
    /// Push the live generation to workers (false with `sharing = "none"`).
    pub push_generation: bool,
    /// The weights file an owner loads when nothing is in escrow.
    pub model_path: String,
    /// How long a hot swap's load may take before it fails (`[model] load_timeout_s`).
    pub load_timeout: Duration,
    /// What workers' pass runners are told when generations have a batch lane (`[lane]`).
    pub lane: Option<forkless_bus::wire::LaneSettings>,
    /// The GPUs workers are placed on, in turn (worker i on `devices[i % n]`); empty on the host.
    pub devices: Vec<u32>,
    /// The connected owner's request queue, while one is connected.
    owner: Arc<Mutex<Option<mpsc::UnboundedSender<LoadRequest>>>>,
    pub processes: ProcessTable,
    /// Live children by pid: only they are served on the path-based bus socket.
    pub pids: PidTable,
}

impl BusState {
    pub fn new(
        escrow: Escrow,
        events: mpsc::UnboundedSender<Event>,
        push_generation: bool,
        model_path: String,
        load_timeout: Duration,
        lane: Option<forkless_bus::wire::LaneSettings>,
    ) -> Self {
        BusState {
            escrow,
            events,
            push_generation,
            model_path,
            load_timeout,
            lane,
            devices: Vec::new(),
            owner: Arc::default(),
            processes: ProcessTable::default(),
            pids: PidTable::default(),
        }
    }

    /// The GPU worker `index` runs on (`None` on the host backend).
    pub fn device_of(&self, index: u32) -> Option<u32> {
        (!self.devices.is_empty()).then(|| self.devices[index as usize % self.devices.len()])
    }

    /// Asks the connected owner to load `path`; the answer comes on `reply` (or an error at
    /// once when no owner is connected).
    pub fn ask_owner(&self, request: LoadRequest) -> Result<(), (LoadRequest, String)> {
        let owner = self.owner.lock().expect("owner slot poisoned").clone();
        let Some(owner) = owner else {
            return Err((request, "no owner is running right now (it may be restarting): try again".into()));
        };
        owner.send(request).map_err(|e| (e.0, "the owner went away: try again".into()))
    }

    pub(crate) fn set_owner(&self, sender: mpsc::UnboundedSender<LoadRequest>) {
        *self.owner.lock().expect("owner slot poisoned") = Some(sender);
    }

    /// Forgets the owner's queue, unless a newer owner has already put its own there.
    pub(crate) fn clear_owner(&self, ours: &mpsc::UnboundedSender<LoadRequest>) {
        let mut slot = self.owner.lock().expect("owner slot poisoned");
        if slot.as_ref().is_some_and(|s| s.same_channel(ours)) {
            *slot = None;
        }
    }

    /// A connection let go of `generation`; if it was the last user of a retiring one, say so.
    pub(crate) fn release(&self, generation: u64) {
        if let Some(freed) = self.escrow.release(generation) {
            let _ = self.events.send(Event::Freed { generation: freed });
        }
    }
}

/// What a slot learns from its child's bus connection.
#[derive(Debug, Default)]
pub struct ChildLink {
    /// Fires once the welcome (and a worker's generation) are written to the socket.
    pub queued: Option<oneshot::Sender<()>>,
    /// Fires when the child is ready: a worker's `Ready`, the owner's first publish or adoption.
    pub ready: Option<oneshot::Sender<()>>,
    /// Cancelled when the child must be replaced although it runs: a ready worker silent for
    /// `heartbeat_timeout`, an owner whose hot-swap load outlived `[model] load_timeout_s`.
    pub hung: CancellationToken,
    pub heartbeat_timeout: Option<Duration>,
    /// The pid the supervisor started, set by the spawner right after the fork (inherited
    /// connections); the process table is keyed by it, not by the pid the child reports.
    pub spawned: Option<tokio::sync::watch::Receiver<Option<u32>>>,
}

impl ChildLink {
    /// Tells the slot its child is ready (once).
    pub fn mark_ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn bus_on(devices: &[u32]) -> BusState {
        let (events, _) = mpsc::unbounded_channel();
        let mut bus = BusState::new(Escrow::default(), events, true, "m".into(), Duration::from_secs(1), None);
        bus.devices = devices.to_vec();
        bus
    }

    fn config(cuda: &str) -> Config {
        let text = format!(
            "[model]\npath = \"m\"\n[workers]\ncommand = [\"w\"]\ncount = 5\nlisten = [\"127.0.0.1:0\"]\n[cuda]\n{cuda}\n"
        );
        Config::parse(&text, std::path::Path::new("/etc/forkless/config.toml")).unwrap()
    }

    /// Worker i runs on the i-th device of the list, mod n; with `workers_per_device` every
    /// device gets exactly that many.
    #[test]
    fn workers_take_the_devices_in_turn() {
        for (devices, per_device) in [(&[0, 1][..], 3), (&[0, 1, 2, 3][..], 2), (&[2, 0, 3][..], 1)] {
            let config = config(&format!("devices = {devices:?}\nworkers_per_device = {per_device}"));
            let bus = bus_on(devices);
            let count = config.worker_count(bus.devices.len());
            assert_eq!(count, per_device * devices.len() as u32, "[workers] count gives way");
            let placed: Vec<u32> = (0..count).map(|i| bus.device_of(i).unwrap()).collect();
            let expected: Vec<u32> = devices.iter().copied().cycle().take(count as usize).collect();
            assert_eq!(placed, expected);
            for device in devices {
                let on = placed.iter().filter(|&d| d == device).count();
                assert_eq!(on, per_device as usize, "device {device} of {devices:?}");
            }
        }
    }

    #[test]
    fn without_workers_per_device_the_count_spreads_and_the_host_has_no_device() {
        let spread = config("devices = [0, 1]");
        let bus = bus_on(&[0, 1]);
        assert_eq!(spread.worker_count(2), 5);
        assert_eq!((0..5).map(|i| bus.device_of(i).unwrap()).collect::<Vec<_>>(), [0, 1, 0, 1, 0]);
        let host = bus_on(&[]);
        assert_eq!(spread.worker_count(0), 5);
        assert_eq!(host.device_of(0), None);
        assert_eq!(host.device_of(7), None);
        let per_device = config("devices = [0, 1]\nworkers_per_device = 4");
        assert_eq!(per_device.worker_count(0), 5, "on the host workers_per_device means nothing");
    }
}
