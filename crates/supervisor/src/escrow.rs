//! The escrow: the supervisor holds the file descriptors of every generation in memory, and
//! decides which one workers serve.
//!
//! A memfd (like a CUDA VMM allocation exported as an fd) lives as long as any fd or mapping of
//! it exists. Because the supervisor — which never maps the weights and never touches CUDA —
//! keeps one fd per arena, the weights outlive the owner that made them, and a worker started
//! while no owner runs still attaches from here.
//!
//! Every deposit is validated before a generation number is assigned and workers can see it:
//! the manifest's invariants, and each fd against its arena's declared memory kind
//! ([`HeldArena::adopt`]: a host arena must be a sealed memfd of the declared size; a CUDA
//! arena must be an open fd that is not a file — a memfd published as device memory is refused).
//!
//! **Generations are a state machine** (every transition is one step under one lock):
//!
//! | state | meaning | leaves for |
//! |---|---|---|
//! | live | what workers serve, and what a new worker attaches | retiring, when an offer is committed while workers still map it; gone, when committed past unheld |
//! | offered | published for a hot swap: every worker maps and checks it, none serves it | live, once every worker connection accepted it; gone, on the first rejection, a timeout or [`Escrow::abort`] |
//! | retiring | replaced, but some worker still finishes requests on it | gone, when its last holder releases it |
//!
//! The first generation goes live at once (no worker serves anything yet). At most two
//! generations are ever held: the live one and one offered or retiring; a deposit beyond that
//! is refused ([`DepositError::SwapInProgress`]). A worker connection counts as a holder of
//! each generation it was sent ([`Escrow::acquire_live`] and [`Escrow::acquire_offer`] take the
//! hold in the same step as they read, so no generation is freed between a read and a hold)
//! until it reports it released or closes.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use forkless_bus::{host::ArenaWriter, manifest::{Dtype, LayoutBuilder, Manifest}};
//! use std::os::fd::OwnedFd;
//! let mut layout = LayoutBuilder::default();
//! layout.push("w", Dtype::F32, vec![2]);
//! let (arena, tensors) = layout.finish();
//! let sealed = ArenaWriter::create("doc", arena.size).unwrap().seal().unwrap();
//! let fd: OwnedFd = sealed.fd().try_clone_to_owned().unwrap();
//! let escrow = forkless_supervisor::escrow::Escrow::default();
//! let manifest = Manifest::new("doc".into(), vec![arena], tensors);
//! assert_eq!(escrow.deposit(manifest, vec![fd]).unwrap(), forkless_supervisor::escrow::Deposited::Live(1));
//! assert_eq!(escrow.wait_live().await.manifest.generation, 1);
//! # });
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use forkless_bus::arena::{AdoptError, HeldArena};
use forkless_bus::lane::{Lane, LaneFd, LaneLayout};
use forkless_bus::manifest::ManifestError;
use forkless_bus::Manifest;
use tokio::sync::watch;

/// Why a published generation was refused.
#[derive(Debug, thiserror::Error)]
pub enum DepositError {
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("arena {arena}: {source}")]
    Arena { arena: u32, source: AdoptError },
    #[error("{fds} fds for {arenas} arenas")]
    FdCount { fds: usize, arenas: usize },
    #[error(
        "generation {generation} is still {state}: at most two generations are held at once; try again once it is done"
    )]
    SwapInProgress { generation: u64, state: &'static str },
    #[error("cannot make the generation's batch lane: {0}")]
    Lane(#[from] forkless_bus::lane::LaneCreateError),
}

/// One generation held in escrow: its manifest, one fd per arena and replica (in the
/// manifest's fd order), and, when `[lane]` is on, one batch lane per device (one on the host),
/// which live exactly as long as the generation.
#[derive(Debug)]
pub struct EscrowedGeneration {
    pub manifest: Manifest,
    pub arenas: Vec<HeldArena>,
    /// Lanes in the order of [`Manifest::devices`] (a host generation has one).
    pub lanes: Vec<LaneFd>,
}

impl EscrowedGeneration {
    pub fn number(&self) -> u64 {
        self.manifest.generation
    }

    /// The view a worker on `device` is sent (`None`: the host), with that view's arena fds
    /// and its device's lane.
    pub fn for_device(&self, device: Option<u32>) -> Option<(Manifest, &HeldArena, Option<&LaneFd>)> {
        let (view, index) = self.manifest.for_device(device)?;
        let lane = match device {
            None => self.lanes.first(),
            Some(d) => self.manifest.devices().iter().position(|&x| x == d).and_then(|i| self.lanes.get(i)),
        };
        Some((view, &self.arenas[index], lane))
    }

    /// What the generation's batch lanes have done so far (read through read-only mappings),
    /// one entry per lane, in device order.
    pub fn lane_status(&self) -> Vec<LaneStatus> {
        let devices = self.manifest.devices();
        self.lanes
            .iter()
            .enumerate()
            .filter_map(|(i, lane)| self.one_lane_status(lane, devices.get(i).copied()))
            .collect()
    }

    fn one_lane_status(&self, lane: &LaneFd, device: Option<u32>) -> Option<LaneStatus> {
        let stats = forkless_bus::lane::LaneMonitor::map(lane.fd()).ok()?.stats();
        let bounds = forkless_bus::lane::batch_bucket_bounds();
        let mut lower = 1;
        let batch_sizes = bounds
            .iter()
            .zip(stats.batch_sizes)
            .map(|(&upper, passes)| {
                let bucket = match (lower, upper) {
                    (l, usize::MAX) => format!("{l}+"),
                    (l, u) if l == u => l.to_string(),
                    (l, u) => format!("{l}-{u}"),
                };
                lower = upper.saturating_add(1);
                (bucket, passes)
            })
            .collect();
        Some(LaneStatus {
            generation: self.number(),
            device,
            passes: stats.passes,
            served: stats.served,
            failed: stats.failed,
            rejected: stats.rejected,
            recoveries: stats.recoveries,
            requeued: stats.requeued,
            leader_pid: stats.leader_pid,
            takeover_pass_ns: stats.takeover_pass_ns,
            mean_batch: stats.mean_batch(),
            mean_pass_us: stats.mean_pass_us(),
            mean_workers_per_pass: stats.mean_processes_per_pass(),
            batch_sizes,
            workers_per_pass: stats.processes_per_pass.to_vec(),
        })
    }
}

/// A generation's batch lane, as `status` and the metrics show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LaneStatus {
    pub generation: u64,
    /// The GPU whose workers share this lane (`None` on the host).
    pub device: Option<u32>,
    /// Passes run, requests answered, failed by a pass, refused (lane full).
    pub passes: u64,
    pub served: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Pass runners found dead by the next one, and requests they had taken, run again.
    pub recoveries: u64,
    pub requeued: u64,
    /// The worker that last took the lease (it runs the passes).
    pub leader_pid: u32,
    /// `CLOCK_MONOTONIC` ns at which the first pass after the last takeover from a dead pass
    /// runner started (0: none yet).
    pub takeover_pass_ns: u64,
    pub mean_batch: f64,
    /// Mean time of one pass (the service's pass function: on the GPU, the batch's kernels and
    /// copies), in microseconds.
    #[serde(default)]
    pub mean_pass_us: f64,
    /// How many workers' requests one pass served, on average.
    pub mean_workers_per_pass: f64,
    /// Passes by batch size bucket ("1", "2", "3-4", …).
    pub batch_sizes: Vec<(String, u64)>,
    /// Passes by the number of workers they served (index 0: one worker; the last: 16 or more).
    pub workers_per_pass: Vec<u64>,
}

/// What became of a deposit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deposited {
    /// The first generation: live at once.
    Live(u64),
    /// A hot swap: offered to the workers, live once every one of them accepts it.
    Offered(u64),
}

impl Deposited {
    pub fn generation(self) -> u64 {
        match self {
            Deposited::Live(g) | Deposited::Offered(g) => g,
        }
    }
}

/// How an offer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every worker accepted it: it is live.
    Committed,
    /// It was dropped, for this reason (a worker's refusal, names the worker).
    Aborted(String),
}

/// A worker's bus connection, as the escrow tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerConn {
    pub index: u32,
    /// Tells apart two connections of the same slot (a replacement and its predecessor).
    pub id: u64,
}

impl std::fmt::Display for WorkerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {}", self.index)
    }
}

/// What every worker connection watches: what to serve, what to check, what was decided.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub live: Option<Arc<EscrowedGeneration>>,
    pub offer: Option<Arc<EscrowedGeneration>>,
    /// The most recent decisions on offers, by generation (a few are kept).
    pub decisions: BTreeMap<u64, Decision>,
}

/// The generations in escrow. Cheap to clone; every clone is the same escrow.
#[derive(Debug, Clone)]
pub struct Escrow {
    view: watch::Sender<View>,
    held: Arc<Mutex<Held>>,
    /// Each generation gets a batch lane of this layout (`[lane]` on), or none.
    lane: Option<LaneLayout>,
}

#[derive(Debug, Default)]
struct Held {
    retiring: Option<Arc<EscrowedGeneration>>,
    /// How many worker connections hold each generation.
    holders: HashMap<u64, usize>,
    /// Worker connections that must accept an offer before it goes live.
    workers: BTreeSet<WorkerConn>,
    /// Who accepted the current offer.
    accepted: BTreeSet<WorkerConn>,
    last_number: u64,
}

/// Decisions kept in the view for late readers (a connection that was busy sending).
const DECISIONS_KEPT: usize = 8;

impl Default for Escrow {
    fn default() -> Self {
        Escrow::new(None)
    }
}

impl Escrow {
    /// An empty escrow whose generations each get a batch lane of `lane`, if given.
    pub fn new(lane: Option<LaneLayout>) -> Self {
        Escrow { view: watch::Sender::new(View::default()), held: Arc::default(), lane }
    }

    /// Validates and stores a generation: live at once if it is the first, else offered to
    /// the workers. Refused while another one is offered or retiring.
    pub fn deposit(&self, mut manifest: Manifest, fds: Vec<OwnedFd>) -> Result<Deposited, DepositError> {
        let arenas = adopt_arenas(&manifest, fds)?;
        let mut held = self.lock();
        self.refuse_if_busy(&held)?;
        let number = held.last_number + 1;
        let lanes = self.make_lanes(number, &manifest)?;
        held.last_number = number;
        manifest.generation = number;
        let generation = Arc::new(EscrowedGeneration { manifest, arenas, lanes });
        let mut deposited = Deposited::Live(number);
        self.view.send_modify(|view| match view.live {
            None => view.live = Some(generation),
            Some(_) => {
                view.offer = Some(generation);
                deposited = Deposited::Offered(number);
            }
        });
        held.accepted.clear();
        if deposited == Deposited::Offered(number) {
            self.decide_if_complete(&mut held);
        }
        Ok(deposited)
    }

    /// One lane per device of the generation (one for host memory), when lanes are on.
    fn make_lanes(&self, number: u64, manifest: &Manifest) -> Result<Vec<LaneFd>, DepositError> {
        let Some(layout) = self.lane else { return Ok(Vec::new()) };
        let devices = manifest.devices();
        let names: Vec<String> = match devices.is_empty() {
            true => vec![format!("forkless-lane-{number}")],
            false => devices.iter().map(|d| format!("forkless-lane-{number}-gpu{d}")).collect(),
        };
        Ok(names.iter().map(|name| Lane::create(name, layout)).collect::<Result<_, _>>()?)
    }

    fn refuse_if_busy(&self, held: &Held) -> Result<(), DepositError> {
        if let Some(offer) = &self.view.borrow().offer {
            return Err(DepositError::SwapInProgress { generation: offer.number(), state: "offered to the workers" });
        }
        if let Some(retiring) = &held.retiring {
            return Err(DepositError::SwapInProgress { generation: retiring.number(), state: "in use by workers" });
        }
        Ok(())
    }

    /// The live generation, if any was published.
    pub fn live(&self) -> Option<Arc<EscrowedGeneration>> {
        self.view.borrow().live.clone()
    }

    /// The offered generation, if a hot swap is being decided.
    pub fn offer(&self) -> Option<Arc<EscrowedGeneration>> {
        self.view.borrow().offer.clone()
    }

    /// The older generation still in use, if a hot swap finished while workers used it.
    pub fn retiring(&self) -> Option<u64> {
        self.lock().retiring.as_ref().map(|g| g.number())
    }

    /// Waits until a generation is live and returns it (without holding it).
    pub async fn wait_live(&self) -> Arc<EscrowedGeneration> {
        let mut view = self.view.subscribe();
        let view = view.wait_for(|v| v.live.is_some()).await.expect("the sender lives in self");
        view.live.clone().expect("waited for it")
    }

    /// Notified at every change of the live generation, the offer or a decision.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Waits until a generation is live, and takes a hold on it in the same step.
    pub async fn acquire_live(&self) -> Arc<EscrowedGeneration> {
        let mut view = self.view.subscribe();
        loop {
            {
                let mut held = self.lock();
                if let Some(live) = self.live() {
                    *held.holders.entry(live.number()).or_default() += 1;
                    return live;
                }
            }
            view.changed().await.expect("the sender lives in self");
        }
    }

    /// Takes a hold on the offered generation `number`, if it is still offered.
    pub fn acquire_offer(&self, number: u64) -> Option<Arc<EscrowedGeneration>> {
        let mut held = self.lock();
        let offer = self.offer().filter(|o| o.number() == number)?;
        *held.holders.entry(number).or_default() += 1;
        Some(offer)
    }

    /// A worker connection no longer maps `generation`. Returns it when that was the last
    /// holder of a retiring generation: its fds are closed now, and its memory freed.
    pub fn release(&self, generation: u64) -> Option<u64> {
        let mut held = self.lock();
        let count = held.holders.entry(generation).or_default();
        *count = count.saturating_sub(1);
        if *count > 0 {
            return None;
        }
        held.holders.remove(&generation);
        let retiring = held.retiring.as_ref().map(|g| g.number());
        (retiring == Some(generation)).then(|| {
            held.retiring = None;
            generation
        })
    }

    /// A worker connection that will have to accept offers.
    pub fn join(&self, worker: WorkerConn) {
        self.lock().workers.insert(worker);
    }

    /// A worker connection closed: it no longer has a say in offers (its replacement will
    /// attach whatever is live). May complete the offer.
    pub fn leave(&self, worker: WorkerConn) {
        let mut held = self.lock();
        held.workers.remove(&worker);
        held.accepted.remove(&worker);
        self.decide_if_complete(&mut held);
    }

    /// A worker's verdict on the offered generation `number`. A refusal aborts the offer; the
    /// last acceptance commits it. Verdicts on anything but the current offer are ignored.
    pub fn answer(&self, worker: WorkerConn, number: u64, verdict: Result<(), String>) {
        let mut held = self.lock();
        if self.offer().is_none_or(|o| o.number() != number) {
            return;
        }
        match verdict {
            Ok(()) => {
                held.accepted.insert(worker);
                self.decide_if_complete(&mut held);
            }
            Err(reason) => self.decide(&mut held, Decision::Aborted(format!("{worker} refused it: {reason}"))),
        }
    }

    /// Withdraws the offered generation `number` (e.g. workers did not answer in time).
    pub fn abort(&self, number: u64, reason: String) {
        let mut held = self.lock();
        if self.offer().is_some_and(|o| o.number() == number) {
            self.decide(&mut held, Decision::Aborted(reason));
        }
    }

    /// The workers that have not yet answered the current offer.
    pub fn undecided(&self) -> Vec<WorkerConn> {
        let held = self.lock();
        held.workers.difference(&held.accepted).copied().collect()
    }

    /// Waits for the decision on offer `number`.
    pub async fn decision(&self, number: u64) -> Decision {
        let mut view = self.view.subscribe();
        let view = view.wait_for(|v| v.decisions.contains_key(&number)).await.expect("the sender lives in self");
        view.decisions[&number].clone()
    }

    fn decide_if_complete(&self, held: &mut Held) {
        if self.offer().is_some() && held.workers.is_subset(&held.accepted) {
            self.decide(held, Decision::Committed);
        }
    }

    /// Applies a decision on the current offer: commit makes it live (the old live one retires
    /// while held), abort drops it (workers that mapped it unmap it when told).
    fn decide(&self, held: &mut Held, decision: Decision) {
        let mut previous = None;
        self.view.send_modify(|view| {
            let Some(offer) = view.offer.take() else { return };
            if decision == Decision::Committed {
                previous = view.live.replace(offer.clone());
            }
            view.decisions.insert(offer.number(), decision);
            while view.decisions.len() > DECISIONS_KEPT {
                view.decisions.pop_first();
            }
        });
        held.accepted.clear();
        if let Some(previous) = previous.filter(|p| held.holders.get(&p.number()).copied().unwrap_or(0) > 0) {
            held.retiring = Some(previous);
        }
    }

    /// Bytes of all generations in escrow (live, offered, retiring): memory that the arenas'
    /// fds hold whether or not any process maps it.
    pub fn bytes_held(&self) -> u64 {
        let bytes = |g: &Option<Arc<EscrowedGeneration>>| g.as_ref().map_or(0, |g| g.manifest.total_bytes());
        // (Lanes are not weights: their memory is shown with their stats.)
        let (live, offer) = {
            let view = self.view.borrow();
            (bytes(&view.live), bytes(&view.offer))
        };
        live + offer + bytes(&self.lock().retiring)
    }

    /// Bytes held per GPU (live, offered and retiring generations), for status per device.
    pub fn bytes_by_device(&self) -> BTreeMap<u32, u64> {
        let mut generations = Vec::new();
        {
            let view = self.view.borrow();
            generations.extend(view.live.clone());
            generations.extend(view.offer.clone());
        }
        generations.extend(self.lock().retiring.clone());
        let mut bytes = BTreeMap::new();
        for generation in generations {
            for arena in generation.manifest.all_arenas() {
                if let forkless_bus::manifest::MemoryKind::CudaVmm { device } = arena.kind {
                    *bytes.entry(device).or_default() += arena.size;
                }
            }
        }
        bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("escrow poisoned")
    }
}

fn adopt_arenas(manifest: &Manifest, fds: Vec<OwnedFd>) -> Result<Vec<HeldArena>, DepositError> {
    manifest.validate()?;
    let arenas = manifest.all_arenas().count();
    if fds.len() != arenas {
        return Err(DepositError::FdCount { fds: fds.len(), arenas });
    }
    manifest
        .all_arenas()
        .zip(fds)
        .map(|(arena, fd)| {
            HeldArena::adopt(arena, fd).map_err(|source| DepositError::Arena { arena: arena.id, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::{Dtype, LayoutBuilder, MemoryKind};

    fn publish(escrow: &Escrow) -> Result<Deposited, DepositError> {
        let sealed = ArenaWriter::create("test", 4096).unwrap().seal().unwrap();
        publish_as(escrow, MemoryKind::Host, sealed.fd().try_clone_to_owned().unwrap())
    }

    fn publish_as(escrow: &Escrow, kind: MemoryKind, fd: OwnedFd) -> Result<Deposited, DepositError> {
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![2]);
        let (mut arena, tensors) = layout.finish();
        arena.kind = kind;
        escrow.deposit(Manifest::new("t".into(), vec![arena], tensors), vec![fd])
    }

    const W0: WorkerConn = WorkerConn { index: 0, id: 100 };
    const W1: WorkerConn = WorkerConn { index: 1, id: 101 };

    #[test]
    fn cuda_arenas_are_held_and_memfds_posing_as_them_refused() {
        let escrow = Escrow::default();
        let kind = MemoryKind::CudaVmm { device: 0 };
        let (pipe, _writer) = rustix::pipe::pipe().unwrap(); // stands in for an exported VMM handle
        assert_eq!(publish_as(&escrow, kind, pipe).unwrap(), Deposited::Live(1));
        assert_eq!(escrow.live().unwrap().arenas[0].kind(), kind);
        let memfd = ArenaWriter::create("test", 4096).unwrap().seal().unwrap().fd().try_clone_to_owned().unwrap();
        let err = publish_as(&escrow, kind, memfd).unwrap_err();
        assert!(matches!(err, DepositError::Arena { arena: 0, .. }), "{err}");
    }

    #[test]
    fn the_first_generation_goes_live_and_later_ones_are_offered() {
        let escrow = Escrow::default();
        escrow.join(W0);
        assert_eq!(publish(&escrow).unwrap(), Deposited::Live(1));
        assert_eq!(publish(&escrow).unwrap(), Deposited::Offered(2));
        assert_eq!(escrow.live().unwrap().number(), 1);
        assert!(matches!(publish(&escrow), Err(DepositError::SwapInProgress { generation: 2, .. })));
    }

    #[test]
    fn an_offer_goes_live_when_every_worker_accepted_it() {
        let escrow = Escrow::default();
        escrow.join(W0);
        escrow.join(W1);
        publish(&escrow).unwrap();
        assert_eq!(publish(&escrow).unwrap(), Deposited::Offered(2));
        escrow.answer(W0, 2, Ok(()));
        assert_eq!(escrow.live().unwrap().number(), 1, "one worker has not answered");
        assert_eq!(escrow.undecided(), vec![W1]);
        escrow.answer(W1, 2, Ok(()));
        assert_eq!(escrow.live().unwrap().number(), 2);
        assert_eq!(escrow.subscribe().borrow().decisions[&2], Decision::Committed);
        assert!(escrow.offer().is_none());
    }

    #[test]
    fn one_refusal_drops_the_offer_and_the_live_generation_stays() {
        let escrow = Escrow::default();
        escrow.join(W0);
        escrow.join(W1);
        publish(&escrow).unwrap();
        publish(&escrow).unwrap();
        escrow.answer(W0, 2, Ok(()));
        escrow.answer(W1, 2, Err("no tensor \"weight\" (pid 7)".into()));
        assert_eq!(escrow.live().unwrap().number(), 1);
        let decision = escrow.subscribe().borrow().decisions[&2].clone();
        let Decision::Aborted(reason) = decision else { panic!("{decision:?}") };
        assert!(reason.contains("worker 1 refused it") && reason.contains("weight"), "{reason}");
        assert_eq!(publish(&escrow).unwrap(), Deposited::Offered(3), "numbers are never reused");
    }

    #[test]
    fn a_worker_that_dies_has_no_say_and_late_verdicts_are_ignored() {
        let escrow = Escrow::default();
        escrow.join(W0);
        escrow.join(W1);
        publish(&escrow).unwrap();
        publish(&escrow).unwrap();
        escrow.answer(W0, 2, Ok(()));
        escrow.leave(W1);
        assert_eq!(escrow.live().unwrap().number(), 2);
        escrow.answer(W1, 2, Err("too late".into()));
        assert_eq!(escrow.live().unwrap().number(), 2);
        escrow.answer(W0, 7, Err("not offered".into()));
        assert_eq!(escrow.live().unwrap().number(), 2);
    }

    #[test]
    fn with_no_worker_an_offer_commits_at_once() {
        let escrow = Escrow::default();
        publish(&escrow).unwrap();
        publish(&escrow).unwrap();
        assert_eq!(escrow.live().unwrap().number(), 2);
    }

    #[test]
    fn a_held_generation_retires_until_its_last_holder_lets_go() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let escrow = Escrow::default();
        escrow.join(W0);
        publish(&escrow).unwrap();
        let first = runtime.block_on(escrow.acquire_live());
        let again = runtime.block_on(escrow.acquire_live());
        assert_eq!((first.number(), again.number()), (1, 1));
        publish(&escrow).unwrap();
        assert!(escrow.acquire_offer(2).is_some());
        assert!(escrow.acquire_offer(3).is_none());
        escrow.answer(W0, 2, Ok(()));
        assert_eq!(escrow.retiring(), Some(1));
        assert!(matches!(publish(&escrow), Err(DepositError::SwapInProgress { generation: 1, .. })));
        assert_eq!(escrow.release(1), None);
        assert_eq!(escrow.release(1), Some(1));
        assert_eq!(escrow.retiring(), None);
        assert_eq!(publish(&escrow).unwrap(), Deposited::Offered(3));
    }

    #[test]
    fn an_aborted_offer_is_freed_when_its_holders_let_go() {
        let escrow = Escrow::default();
        escrow.join(W0);
        publish(&escrow).unwrap();
        publish(&escrow).unwrap();
        let offer = escrow.acquire_offer(2).unwrap();
        escrow.abort(2, "timed out".into());
        assert!(escrow.offer().is_none());
        assert_eq!(escrow.retiring(), None, "an aborted offer never retires");
        assert_eq!(escrow.release(2), None);
        assert_eq!(Arc::strong_count(&offer), 1, "the escrow let go of it; the last mapping frees it");
    }
}

#[cfg(test)]
mod lane_tests {
    use super::*;
    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::{Dtype, LayoutBuilder};

    #[test]
    fn every_generation_gets_a_lane_of_its_own() {
        let escrow = Escrow::new(Some(LaneLayout::new(8, 64, 64)));
        let deposit = || {
            let mut layout = LayoutBuilder::default();
            layout.push("w", Dtype::F32, vec![2]);
            let (arena, tensors) = layout.finish();
            let fd = ArenaWriter::create("t", arena.size).unwrap().seal().unwrap().fd().try_clone_to_owned().unwrap();
            escrow.deposit(Manifest::new("t".into(), vec![arena], tensors), vec![fd]).unwrap()
        };
        deposit();
        let first = escrow.live().unwrap();
        deposit();
        let second = escrow.live().unwrap();
        assert_eq!(second.number(), 2);
        let (a, b) = (&first.lanes[0], &second.lanes[0]);
        let inode = |lane: &LaneFd| rustix::fs::fstat(lane.fd()).unwrap().st_ino;
        assert_ne!(inode(a), inode(b));
        assert!(Escrow::default().lane.is_none());
        assert_eq!(second.lane_status()[0].generation, 2);
    }
}

/// Generations with one arena per GPU. The read end of a pipe stands in for each device's
/// exported VMM handle (the escrow only holds and duplicates it, and a pipe is not a file, as
/// a handle must not be); both ends of a pipe share one inode, which tells which device's fd
/// went where, and a write to the other end fails (EPIPE) once the escrow closed its end.
#[cfg(test)]
mod device_tests {
    use super::*;
    use forkless_bus::host::ArenaWriter;
    use forkless_bus::manifest::{ArenaDesc, Dtype, LayoutBuilder, MemoryKind};
    use std::os::fd::{AsFd, BorrowedFd};

    const W0: WorkerConn = WorkerConn { index: 0, id: 100 };

    /// Deposits a generation on `devices` (arena 0 on the first, replicas on the others) and
    /// returns the write ends of the pipes, in the same order, and the arena's size.
    fn deposit_on(escrow: &Escrow, devices: &[u32]) -> (Deposited, Vec<OwnedFd>, u64) {
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![3000]);
        let (mut arena, tensors) = layout.finish();
        arena.kind = MemoryKind::CudaVmm { device: devices[0] };
        arena.checksum = 7;
        let replicas = devices[1..]
            .iter()
            .enumerate()
            .map(|(i, &device)| ArenaDesc { id: 1 + i as u32, kind: MemoryKind::CudaVmm { device }, ..arena.clone() })
            .collect();
        let size = arena.size;
        let manifest = Manifest::new("t".into(), vec![arena], tensors).with_replicas(replicas);
        let (readers, writers): (Vec<OwnedFd>, Vec<OwnedFd>) =
            devices.iter().map(|_| rustix::pipe::pipe().unwrap()).unzip();
        (escrow.deposit(manifest, readers).unwrap(), writers, size)
    }

    fn inode(fd: impl AsFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    fn held_fd(arena: &HeldArena) -> BorrowedFd<'_> {
        match arena {
            HeldArena::CudaVmm { fd, .. } => fd.as_fd(),
            HeldArena::Host(_) => panic!("a host arena"),
        }
    }

    /// Whether the escrow still holds the read end of the pipe whose write end is `writer`.
    fn still_held(writer: &OwnedFd) -> bool {
        match rustix::io::write(writer, b"x") {
            Ok(_) => true,
            Err(rustix::io::Errno::PIPE) => false,
            Err(e) => panic!("{e}"),
        }
    }

    fn by_device(pairs: &[(u32, u64)]) -> BTreeMap<u32, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_worker_is_given_its_own_devices_arena_and_lane() {
        let escrow = Escrow::new(Some(LaneLayout::new(8, 64, 64)));
        let (deposited, writers, _) = deposit_on(&escrow, &[0, 1]);
        assert_eq!(deposited, Deposited::Live(1));
        let live = escrow.live().unwrap();
        assert_eq!((live.arenas.len(), live.lanes.len()), (2, 2), "one arena and one lane per device");
        assert_ne!(inode(live.lanes[0].fd()), inode(live.lanes[1].fd()));
        for (index, device) in [(0, 0), (1, 1)] {
            let (view, arena, lane) = live.for_device(Some(device)).unwrap();
            assert_eq!(view.arenas.len(), 1);
            assert!(view.replicas.is_empty(), "a worker sees its own copy only");
            assert_eq!(view.arenas[0].kind, MemoryKind::CudaVmm { device });
            view.validate().unwrap();
            assert_eq!(arena.kind(), MemoryKind::CudaVmm { device });
            assert_eq!(inode(held_fd(arena)), inode(&writers[index]), "device {device}'s own fd");
            assert_eq!(inode(lane.unwrap().fd()), inode(live.lanes[index].fd()), "device {device}'s own lane");
        }
        assert!(live.for_device(Some(7)).is_none(), "no copy on device 7");
        assert!(live.for_device(None).is_none(), "a GPU generation has no host view");
        let lanes: Vec<Option<u32>> = live.lane_status().iter().map(|l| l.device).collect();
        assert_eq!(lanes, [Some(0), Some(1)]);

        let unlaned = Escrow::default();
        deposit_on(&unlaned, &[0, 1]);
        let live = unlaned.live().unwrap();
        let (_, arena, lane) = live.for_device(Some(1)).unwrap();
        assert_eq!(arena.kind(), MemoryKind::CudaVmm { device: 1 });
        assert!(lane.is_none(), "[lane] off: no lane");
    }

    #[test]
    fn bytes_are_counted_per_device_across_generations() {
        let escrow = Escrow::default();
        escrow.join(W0); // keeps the second generation offered
        let (_, _w1, size) = deposit_on(&escrow, &[0, 1]);
        assert_eq!(escrow.bytes_by_device(), by_device(&[(0, size), (1, size)]));
        assert_eq!(escrow.bytes_held(), 2 * size);
        let (deposited, _w2, _) = deposit_on(&escrow, &[1, 2]);
        assert_eq!(deposited, Deposited::Offered(2));
        assert_eq!(escrow.bytes_by_device(), by_device(&[(0, size), (1, 2 * size), (2, size)]));
        assert_eq!(escrow.bytes_held(), 4 * size);
        escrow.abort(2, "test".into());
        assert_eq!(escrow.bytes_by_device(), by_device(&[(0, size), (1, size)]), "an aborted offer no longer counts");

        let host = Escrow::default();
        let fd = ArenaWriter::create("t", 4096).unwrap().seal().unwrap().fd().try_clone_to_owned().unwrap();
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![2]);
        let (arena, tensors) = layout.finish();
        host.deposit(Manifest::new("t".into(), vec![arena], tensors), vec![fd]).unwrap();
        assert!(host.bytes_by_device().is_empty(), "host memory is on no device");
    }

    #[test]
    fn a_hot_swap_keeps_each_devices_arenas_apart_and_retiring_closes_them_all() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let escrow = Escrow::new(Some(LaneLayout::new(8, 64, 64)));
        escrow.join(W0);
        let (_, old, size) = deposit_on(&escrow, &[0, 1]);
        let held = runtime.block_on(escrow.acquire_live()); // W0 serves generation 1
        let (deposited, new, _) = deposit_on(&escrow, &[0, 1]);
        assert_eq!(deposited, Deposited::Offered(2));
        let offer = escrow.acquire_offer(2).unwrap();
        escrow.answer(W0, 2, Ok(()));
        assert_eq!((escrow.live().unwrap().number(), escrow.retiring()), (2, Some(1)));

        let live = escrow.live().unwrap();
        for device in [0, 1] {
            let index = device as usize;
            let (_, now, now_lane) = live.for_device(Some(device)).unwrap();
            let (_, before, before_lane) = held.for_device(Some(device)).unwrap();
            assert_eq!(inode(held_fd(now)), inode(&new[index]), "generation 2 on device {device}");
            assert_eq!(inode(held_fd(before)), inode(&old[index]), "generation 1 on device {device}");
            assert_ne!(inode(now_lane.unwrap().fd()), inode(before_lane.unwrap().fd()), "a lane per generation");
        }
        assert_eq!(escrow.bytes_by_device(), by_device(&[(0, 2 * size), (1, 2 * size)]));
        assert!(old.iter().chain(&new).all(still_held));

        drop((held, offer, live));
        assert_eq!(escrow.release(1), Some(1), "W0 let go of generation 1: it is freed");
        assert_eq!(escrow.retiring(), None);
        assert!(!old.iter().any(still_held), "every device's fd of generation 1 is closed");
        assert!(new.iter().all(still_held), "generation 2 is untouched");
        assert_eq!(escrow.bytes_by_device(), by_device(&[(0, size), (1, size)]));
    }
}
