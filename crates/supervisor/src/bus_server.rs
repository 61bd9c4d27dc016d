//! The supervisor's end of the bus.
//!
//! Every child gets its connection ready-made: one end of a socketpair, inherited at a fixed
//! fd ([`serve_child`] serves the other end), so no one else can reach it and the welcome and
//! generation are queued before the child runs. The path-based socket in the private runtime
//! folder ([`BusServer`]) serves any other process, and only after checking it is one of the
//! supervisor's own children (`SO_PEERCRED`: same uid, pid in the [`PidTable`], claimed role
//! matching).
//!
//! After the handshake each connection speaks its role's protocol: [`crate::owner_link`] for
//! the owner, [`crate::worker_link`] for workers. A connection that breaks the protocol is
//! logged with its reason and closed; no other connection notices.
//!

use std::sync::Arc;
use std::time::Duration;

use forkless_bus::channel::RecvError;
use forkless_bus::wire::PROTOCOL_VERSION;
use forkless_bus::{BusStream, Message, Role};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::{Admitted, ConnectionSlots, RateLimitedLog};
use crate::link::{BusState, ChildLink, ConnError};
use crate::spawn::{ChildLabel, PidTable};
use crate::{owner_link, worker_link};

/// Path-based bus connections open at once (children use inherited socketpairs; this socket
/// is a fallback, so a few suffice).
pub const MAX_PATH_CONNECTIONS: usize = 64;

/// Serves a child's inherited connection until it closes.
pub(crate) async fn serve_child(bus: BusStream, label: ChildLabel, state: BusState, link: ChildLink) {
    let conn = Connection { bus, state, link };
    if let Err(e) = conn.run(label).await {
        tracing::warn!("bus connection of {label} closed: {e}");
    }
}

/// The accept loop of the path-based bus socket.
pub(crate) struct BusServer {
    pub listener: UnixListener,
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
            let (stop, pids, refusals) = (self.stop.clone(), self.state.pids.clone(), refusals.clone());
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

/// What was queued for a child before it said hello.
enum Opening {
    Owner(owner_link::OwnerProtocol),
    Worker(Option<worker_link::Session>),
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

    /// Welcome and first assignment (or generation) first, so an inherited socket has them
    /// queued at once; then the child's hello, which must match what it was started as.
    async fn run(mut self, label: ChildLabel) -> Result<(), ConnError> {
        self.bus.send(&Message::Welcome { version: PROTOCOL_VERSION }, &[]).await?;
        let opening = match label.role {
            Role::Owner => Opening::Owner(owner_link::assign(&mut self.bus, &self.state).await?),
            Role::Worker if self.state.push_generation => {
                Opening::Worker(Some(worker_link::push_first(&mut self.bus, &self.state, label.index).await?))
            }
            Role::Worker => Opening::Worker(None),
        };
        if let Some(queued) = self.link.queued.take() {
            let _ = queued.send(());
        }
        let (bus, state, link) = (&mut self.bus, &self.state, &mut self.link);
        let hello = match expect_hello(bus, label).await {
            Ok(reported) => spawned_pid(link, reported).await,
            Err(e) => Err(e),
        };
        let result = match (hello, opening) {
            (Ok(pid), Opening::Owner(protocol)) => owner_link::serve(bus, state, link, label, pid, protocol).await,
            (Ok(pid), Opening::Worker(session)) => worker_link::serve(bus, state, link, label, pid, session).await,
            (Err(e), _) => Err(e),
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

    /// For path-based connections: the kernel's word on who is calling.
    async fn authenticate(&mut self, pids: &PidTable) -> Result<ChildLabel, ConnError> {
        let cred = self.bus.peer_cred().map_err(ConnError::Cred)?;
        let my_uid = rustix::process::getuid().as_raw();
        if cred.uid() != my_uid {
            return Err(ConnError::Refused(format!("uid {} is not the supervisor's uid {my_uid}", cred.uid())));
        }
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let label =
            pids.get(pid).ok_or_else(|| ConnError::Refused(format!("pid {pid} is not a child of this supervisor")))?;
        // The kernel's word, not the hello's, names this child in the process table.
        self.link.spawned = Some(tokio::sync::watch::channel(Some(pid)).1);
        Ok(label)
    }
}

/// The pid the process table knows this child by: the one the supervisor started (set by the
/// spawner right after the fork), which is not the reporting process when a launcher forked
/// the worker; on a path-based connection, the authenticated peer's.
async fn spawned_pid(link: &mut ChildLink, reported: u32) -> Result<u32, ConnError> {
    let Some(spawned) = link.spawned.as_mut() else { return Ok(reported) };
    let pid = spawned
        .wait_for(Option::is_some)
        .await
        .map_err(|_| ConnError::Refused("the child was never started".into()))?;
    Ok(pid.unwrap_or(reported))
}

/// Returns the pid the child reports (its connection already identifies it).
async fn expect_hello(bus: &mut BusStream, label: ChildLabel) -> Result<u32, ConnError> {
    let (hello, _) = bus.recv().await?;
    let (role, pid) = hello.check_hello().map_err(|e| ConnError::Refused(e.to_string()))?;
    if role != label.role {
        return Err(ConnError::Refused(format!("started as {:?} but says it is {role:?}", label.role)));
    }
    Ok(pid)
}
