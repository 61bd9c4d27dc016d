//! The supervisor's end of the bus.
//!
//! Every child gets its connection ready-made: one end of a socketpair, inherited at a fixed
//! fd ([`serve_child`] serves the other end), so no one else can reach it and the welcome and
//! generation are queued before the child runs. The path-based socket in the private runtime
//! folder ([`BusServer`]) serves any other process, and only after checking it is one of the
//! supervisor's own children (`SO_PEERCRED`: same uid, pid in the [`PidTable`], claimed role
//! matching).
//!
//! After the handshake: the owner's publishes go into escrow, workers receive the current
//! generation (pushed) and report readiness. A connection that breaks the protocol is logged
//! with its reason and closed; no other connection notices.
//!
//! ```no_run
//! # async fn f(server: forkless_supervisor::bus_server::BusServer) {
//! server.serve().await;
//! # }
//! ```

use std::os::fd::AsFd;

use forkless_bus::channel::{RecvError, SendError};
use forkless_bus::wire::PROTOCOL_VERSION;
use forkless_bus::{BusStream, Message, Role};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixListener;

use tokio::sync::{mpsc, oneshot, watch};

use crate::events::Event;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::escrow::{Escrow, EscrowedGeneration};
use crate::limits::{Admitted, ConnectionSlots, RateLimitedLog};
use crate::processes::ProcessTable;
use crate::spawn::{ChildLabel, PidTable};

/// Why one connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ConnError {
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
}

/// Path-based bus connections open at once (children use inherited socketpairs; this socket
/// is a fallback, so a few suffice).
pub const MAX_PATH_CONNECTIONS: usize = 64;

/// What every bus connection shares.
#[derive(Debug, Clone)]
pub struct BusState {
    pub escrow: Escrow,
    pub events: mpsc::UnboundedSender<Event>,
    /// Push the current generation to workers (false with `sharing = "none"`).
    pub push_generation: bool,
    /// The weights file an owner loads when nothing is in escrow.
    pub model_path: String,
    /// The connected owner's request queue (for hot swaps), while one is connected.
    pub owner: Arc<Mutex<Option<mpsc::UnboundedSender<LoadRequest>>>>,
    pub processes: ProcessTable,
}

/// A request for the owner to load a weights file as a new generation.
#[derive(Debug)]
pub struct LoadRequest {
    pub path: String,
    pub reply: oneshot::Sender<Result<u64, String>>,
}

impl BusState {
    pub fn new(
        escrow: Escrow,
        events: mpsc::UnboundedSender<Event>,
        push_generation: bool,
        model_path: String,
    ) -> Self {
        BusState {
            escrow,
            events,
            push_generation,
            model_path,
            owner: Arc::default(),
            processes: ProcessTable::default(),
        }
    }

    /// Hot swap: has the running owner load `path` beside the live generation, and returns the
    /// new generation's number once it is in escrow (workers then switch between requests).
    pub async fn load_new_generation(&self, path: String) -> Result<u64, String> {
        if let Some(generation) = self.escrow.retiring() {
            return Err(format!(
                "generation {generation} is still in use by workers: at most two generations live at once; try again shortly"
            ));
        }
        let owner = self.owner.lock().expect("owner slot poisoned").clone();
        let owner = owner.ok_or("no owner is running right now (it may be restarting): try again")?;
        let (reply, answer) = oneshot::channel();
        owner.send(LoadRequest { path, reply }).map_err(|_| "the owner went away: try again")?;
        answer.await.map_err(|_| "the owner went away before answering: try again".to_string())?
    }

    fn set_owner(&self, sender: Option<mpsc::UnboundedSender<LoadRequest>>) {
        *self.owner.lock().expect("owner slot poisoned") = sender;
    }

    /// Forgets the owner's queue, unless a newer owner has already put its own there.
    fn clear_owner(&self, ours: &mpsc::UnboundedSender<LoadRequest>) {
        let mut slot = self.owner.lock().expect("owner slot poisoned");
        if slot.as_ref().is_some_and(|s| s.same_channel(ours)) {
            *slot = None;
        }
    }

    /// A worker let go of `generation`; if it was the last user of a retiring one, say so.
    fn release(&self, generation: u64) {
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
    /// Cancelled when a ready worker sends nothing (no heartbeat) for `heartbeat_timeout`.
    pub hung: CancellationToken,
    pub heartbeat_timeout: Option<Duration>,
}

/// Serves a child's inherited connection until it closes.
pub async fn serve_child(bus: BusStream, label: ChildLabel, state: BusState, link: ChildLink) {
    let conn = Connection { bus, state, link };
    if let Err(e) = conn.run(label).await {
        tracing::warn!("bus connection of {} {} closed: {e}", crate::children::role_name(label.role), label.index);
    }
}

/// The accept loop of the path-based bus socket.
pub struct BusServer {
    pub listener: UnixListener,
    pub pids: PidTable,
    pub state: BusState,
    pub stop: CancellationToken,
}

impl BusServer {
    /// Accepts until `stop`; waits for open connections to finish before returning. At most
    /// [`MAX_PATH_CONNECTIONS`] are open at once (beyond: closed at once, the oldest one not yet
    /// authenticated first), and refusals are logged at most once a second, with a count.
    pub async fn serve(self) {
        let tracker = TaskTracker::new();
        let slots = ConnectionSlots::new(MAX_PATH_CONNECTIONS);
        let refusals = Arc::new(RateLimitedLog::new(Duration::from_secs(1)));
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning on the error.
                        refusals.warn(|| format!("bus accept failed: {e}"));
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = self.stop.cancelled() => break,
            };
            let Some(slot) = slots.admit() else {
                refusals.warn(|| format!("bus connection refused: {MAX_PATH_CONNECTIONS} connections are open"));
                continue;
            };
            let conn =
                Connection { bus: BusStream::new(stream), state: self.state.clone(), link: ChildLink::default() };
            let (stop, pids, refusals) = (self.stop.clone(), self.pids.clone(), refusals.clone());
            tracker.spawn(async move {
                tokio::select! {
                    result = conn.authenticate_and_run(&pids, &slot) => match result {
                        Err(e @ ConnError::Stranger(_)) => refusals.warn(|| format!("bus connection {e}")),
                        Err(e) => tracing::warn!("bus connection closed: {e}"),
                        Ok(()) => {}
                    },
                    () = slot.evicted().cancelled() => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

struct Connection {
    bus: BusStream,
    state: BusState,
    link: ChildLink,
}

impl Connection {
    async fn authenticate_and_run(mut self, pids: &PidTable, slot: &Admitted) -> Result<(), ConnError> {
        match self.authenticate(pids).await {
            Ok(label) => {
                slot.busy();
                self.run(label).await
            }
            Err(ConnError::Refused(reason)) => {
                let _ = self.bus.send(&Message::Refused { reason: reason.clone() }, &[]).await;
                Err(ConnError::Stranger(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// Welcome (and generation) first, so an inherited socket has them queued at once; then
    /// the child's hello, which must match what it was started as.
    async fn run(mut self, label: ChildLabel) -> Result<(), ConnError> {
        self.bus.send(&Message::Welcome { version: PROTOCOL_VERSION }, &[]).await?;
        let pushed = match label.role {
            Role::Worker if self.state.push_generation => Some(self.push_first_generation().await?),
            Role::Worker => None,
            Role::Owner => {
                self.send_assignment().await?;
                None
            }
        };
        if let Some(queued) = self.link.queued.take() {
            let _ = queued.send(());
        }
        let result = match self.expect_hello(label).await {
            Ok(pid) => match label.role {
                Role::Owner => self.serve_owner(label).await,
                Role::Worker => self.serve_worker(label, pid, pushed).await,
            },
            Err(e) => Err(e),
        };
        match result {
            Err(ConnError::Recv(RecvError::Closed)) => Ok(()),
            Err(ConnError::Refused(reason)) => {
                // Tell the child why, so it can report it (and not just see a closed socket).
                let _ = self.bus.send(&Message::Refused { reason: reason.clone() }, &[]).await;
                Err(ConnError::Refused(reason))
            }
            other => other,
        }
    }

    /// Returns the pid the child reports (for logs; its connection already identifies it).
    async fn expect_hello(&mut self, label: ChildLabel) -> Result<u32, ConnError> {
        let (hello, _) = self.bus.recv().await?;
        let (role, pid) = hello.check_hello().map_err(|e| ConnError::Refused(e.to_string()))?;
        if role != label.role {
            return Err(ConnError::Refused(format!("started as {:?} but says it is {role:?}", label.role)));
        }
        Ok(pid)
    }

    /// For path-based connections: the kernel's word on who is calling.
    async fn authenticate(&mut self, pids: &PidTable) -> Result<ChildLabel, ConnError> {
        let cred = self.bus.peer_cred().map_err(ConnError::Cred)?;
        let my_uid = rustix::process::getuid().as_raw();
        if cred.uid() != my_uid {
            return Err(ConnError::Refused(format!("uid {} is not the supervisor's uid {my_uid}", cred.uid())));
        }
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        pids.get(pid).ok_or_else(|| ConnError::Refused(format!("pid {pid} is not a child of this supervisor")))
    }

    async fn serve_owner(&mut self, label: ChildLabel) -> Result<(), ConnError> {
        let (sender, mut requests) = mpsc::unbounded_channel();
        self.state.set_owner(Some(sender.clone()));
        let result = self.owner_loop(label, &mut requests).await;
        self.state.clear_owner(&sender);
        result
    }

    async fn owner_loop(
        &mut self,
        label: ChildLabel,
        requests: &mut mpsc::UnboundedReceiver<LoadRequest>,
    ) -> Result<(), ConnError> {
        let mut pending: Option<oneshot::Sender<Result<u64, String>>> = None;
        loop {
            tokio::select! {
                Some(request) = requests.recv() => {
                    if pending.is_some() {
                        let _ = request.reply.send(Err("another model load is in progress".into()));
                        continue;
                    }
                    self.bus.send(&Message::Load { request: 2, path: request.path }, &[]).await?;
                    pending = Some(request.reply);
                }
                received = self.bus.recv() => match received? {
                                        (Message::Publish { manifest, .. }, fds) => {
                        if let Some(generation) = self.on_publish(manifest, fds, pending.take()).await? {
                            self.owner_ready(label, generation);
                        }
                    }
                    (Message::LoadFailed { reason, .. }, _) => match pending.take() {
                        Some(reply) => { let _ = reply.send(Err(reason)); }
                        None => return Err(ConnError::Refused(format!("load failed: {reason}"))),
                    },
                    (Message::Adopted { generation, .. }, _) => {
                        let current = self.state.escrow.current().map(|g| g.manifest.generation);
                        if current != Some(generation) {
                            return Err(ConnError::Refused(format!(
                                "owner adopted generation {generation}, but escrow holds {current:?}"
                            )));
                        }
                                                let _ = self.state.events.send(Event::Adopted { generation });
                        self.owner_ready(label, generation);
                    }
                    (other, _) => {
                        return Err(ConnError::Refused(format!("owner sent unexpected {}", other.kind())))
                    }
                },
            }
        }
    }

    /// A publish at start is the service's first generation: refusing it ends the owner. A
    /// publish for a hot swap that cannot be taken is refused to whoever asked, and the owner
    /// (told `LoadFailed`-style through `Refused`) drops its new arena and carries on.
    async fn on_publish(
        &mut self,
        manifest: forkless_bus::Manifest,
        fds: Vec<std::os::fd::OwnedFd>,
        reply: Option<oneshot::Sender<Result<u64, String>>>,
    ) -> Result<Option<u64>, ConnError> {
        let (source, bytes) = (manifest.source.clone(), manifest.total_bytes());
        match self.state.escrow.deposit(manifest, fds) {
            Ok(generation) => {
                self.bus.send(&Message::Published { request: 1, generation }, &[]).await?;
                let _ = self.state.events.send(Event::Published { generation, source, bytes });
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(generation));
                }
                Ok(Some(generation))
            }
            Err(e) => match reply {
                Some(reply) => {
                    let reason = format!("generation refused: {e}");
                    self.bus.send(&Message::NotPublished { request: 1, reason: reason.clone() }, &[]).await?;
                    let _ = reply.send(Err(reason));
                    Ok(None)
                }
                None => Err(ConnError::Refused(format!("publish refused: {e}"))),
            },
        }
    }

    /// The owner holds a generation (published or adopted): it is ready.
    fn owner_ready(&mut self, label: ChildLabel, generation: u64) {
        self.state.processes.ready(label, Some(generation));
        if let Some(ready) = self.link.ready.take() {
            let _ = ready.send(());
        }
    }

    /// Serves a worker after its first generation was pushed: newer generations are pushed as
    /// they are published; what the worker holds is counted in the escrow until it says it
    /// released it (or its connection closes).
    async fn serve_worker(&mut self, label: ChildLabel, pid: u32, pushed: Option<Pushed>) -> Result<(), ConnError> {
        let (mut current, mut held) = match pushed {
            Some(Pushed { current, generation }) => (Some(current), BTreeSet::from([generation])),
            None => (None, BTreeSet::new()),
        };
        // Armed once the worker is ready (before that, the slot's start timeout applies), and
        // pushed back by every message the worker sends.
        let mut silent_until: Option<tokio::time::Instant> = None;
        let result = loop {
            let changed = async {
                match current.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            };
            let silence = async {
                match silent_until {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Ok(()) = changed => {
                    let newest = current.as_mut().and_then(|rx| rx.borrow_and_update().clone());
                    if let Some(generation) = newest.filter(|g| !held.contains(&g.manifest.generation)) {
                        if let Err(e) = self.send_generation(&generation).await {
                            break Err(e);
                        }
                        held.insert(generation.manifest.generation);
                        self.state.processes.set_generation(label, generation.manifest.generation);
                    }
                }
                () = silence => {
                    let timeout = self.link.heartbeat_timeout.unwrap_or_default();
                    tracing::error!("worker {} (pid {pid}) sent no heartbeat for {timeout:?}: it is hung", label.index);
                    self.link.hung.cancel();
                    break Ok(());
                }
                received = self.bus.recv() => {
                    if let (Ok(_), Some(timeout)) = (&received, self.link.heartbeat_timeout) {
                        if silent_until.is_some() {
                            silent_until = Some(tokio::time::Instant::now() + timeout);
                        }
                    }
                    match received {
                        Ok((Message::Ready { generation, attach }, _)) => {
                            self.state.processes.ready(label, Some(generation));
                            let _ = self.state.events.send(Event::WorkerReady { index: label.index, pid, generation, attach });
                            if let Some(ready) = self.link.ready.take() {
                                let _ = ready.send(());
                            }
                            silent_until = self.link.heartbeat_timeout.map(|t| tokio::time::Instant::now() + t);
                        }
                        Ok((Message::Heartbeat { requests }, _)) => self.state.processes.set_requests(label, requests),
                        Ok((Message::Released { generation }, _)) => {
                            if held.remove(&generation) {
                                self.state.release(generation);
                            }
                        }
                        Ok((other, _)) => {
                            break Err(ConnError::Refused(format!("worker sent unexpected {}", other.kind())))
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
            }
        };
        for generation in held {
            self.state.release(generation);
        }
        result
    }

    /// Tells a (re)started owner what to do: adopt the generation in escrow, or load from disk.
    async fn send_assignment(&mut self) -> Result<(), ConnError> {
        let Some(generation) = self.state.escrow.current() else {
            let path = self.state.model_path.clone();
            self.bus.send(&Message::Load { request: 1, path }, &[]).await?;
            return Ok(());
        };
        let fds = generation.arenas.iter().map(|a| a.reader_fd()).collect::<Result<Vec<_>, _>>()?;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        self.bus.send(&Message::Adopt { request: 1, manifest: generation.manifest.clone() }, &borrowed).await?;
        Ok(())
    }

    /// Pushes the current generation (waiting until one exists) and counts the worker as its
    /// holder. Subscribing first means no later generation can slip by unseen.
    async fn push_first_generation(&mut self) -> Result<Pushed, ConnError> {
        let mut current = self.state.escrow.subscribe();
        let generation = current
            .wait_for(Option::is_some)
            .await
            .expect("the escrow outlives its connections")
            .clone()
            .expect("waited for Some");
        self.send_generation(&generation).await?;
        Ok(Pushed { current, generation: generation.manifest.generation })
    }

    /// Sends `generation` with fresh reader fds (read-only for host memory; CUDA memory is
    /// mapped read-only by the worker), counting this worker as a holder.
    async fn send_generation(&mut self, generation: &EscrowedGeneration) -> Result<(), ConnError> {
        let fds = generation.arenas.iter().map(|a| a.reader_fd()).collect::<Result<Vec<_>, _>>()?;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        self.state.escrow.hold(generation.manifest.generation);
        let sent = self.bus.send(&Message::Generation { manifest: generation.manifest.clone() }, &borrowed).await;
        if let Err(e) = sent {
            self.state.release(generation.manifest.generation);
            return Err(e.into());
        }
        Ok(())
    }
}

/// The generation pushed to a worker right after its welcome, and the escrow subscription
/// that brings the next ones.
struct Pushed {
    current: watch::Receiver<Option<Arc<EscrowedGeneration>>>,
    generation: u64,
}
