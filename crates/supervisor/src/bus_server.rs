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
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::events::Event;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::escrow::Escrow;
use crate::spawn::{ChildLabel, PidTable};

/// Why one connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("cannot read peer credentials: {0}")]
    Cred(std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Recv(#[from] RecvError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("cannot reopen arena read-only: {0}")]
    Reopen(#[from] forkless_bus::host::ArenaError),
}

/// What every bus connection shares.
#[derive(Debug, Clone)]
pub struct BusState {
    pub escrow: Escrow,
    pub events: mpsc::UnboundedSender<Event>,
    /// Push the current generation to workers (false with `sharing = "none"`).
    pub push_generation: bool,
}

/// Serves a child's inherited connection until it closes.
/// `queued` fires once the welcome (and a worker's generation) are written to the socket.
pub async fn serve_child(
    bus: BusStream,
    label: ChildLabel,
    state: BusState,
    queued: tokio::sync::oneshot::Sender<()>,
) {
    let conn = Connection { bus, state };
    if let Err(e) = conn.run(label, Some(queued)).await {
        tracing::warn!(
            "bus connection of {} {} closed: {e}",
            crate::children::role_name(label.role),
            label.index
        );
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
    /// Accepts until `stop`; waits for open connections to finish before returning.
    pub async fn serve(self) {
        let tracker = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning on the error.
                        tracing::warn!("bus accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = self.stop.cancelled() => break,
            };
            let conn = Connection {
                bus: BusStream::new(stream),
                state: self.state.clone(),
            };
            let (stop, pids) = (self.stop.clone(), self.pids.clone());
            tracker.spawn(async move {
                tokio::select! {
                    result = conn.authenticate_and_run(&pids) => if let Err(e) = result {
                        tracing::warn!("bus connection closed: {e}");
                    },
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
}

impl Connection {
    async fn authenticate_and_run(mut self, pids: &PidTable) -> Result<(), ConnError> {
        match self.authenticate(pids).await {
            Ok(label) => self.run(label, None).await,
            Err(ConnError::Refused(reason)) => {
                let _ = self
                    .bus
                    .send(
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                        &[],
                    )
                    .await;
                Err(ConnError::Refused(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// Welcome (and generation) first, so an inherited socket has them queued at once; then
    /// the child's hello, which must match what it was started as.
    async fn run(
        mut self,
        label: ChildLabel,
        queued: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), ConnError> {
        self.bus
            .send(
                &Message::Welcome {
                    version: PROTOCOL_VERSION,
                },
                &[],
            )
            .await?;
        match label.role {
            Role::Worker if self.state.push_generation => self.push_generation().await?,
            Role::Worker => {}
            Role::Owner => self.send_assignment().await?,
        }
        if let Some(queued) = queued {
            let _ = queued.send(());
        }
        let result = match self.expect_hello(label).await {
            Ok(pid) => match label.role {
                Role::Owner => self.serve_owner().await,
                Role::Worker => self.serve_worker(label.index, pid).await,
            },
            Err(e) => Err(e),
        };
        match result {
            Err(ConnError::Recv(RecvError::Closed)) => Ok(()),
            Err(ConnError::Refused(reason)) => {
                // Tell the child why, so it can report it (and not just see a closed socket).
                let _ = self
                    .bus
                    .send(
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                        &[],
                    )
                    .await;
                Err(ConnError::Refused(reason))
            }
            other => other,
        }
    }

    /// Returns the pid the child reports (for logs; its connection already identifies it).
    async fn expect_hello(&mut self, label: ChildLabel) -> Result<u32, ConnError> {
        let (hello, _) = self.bus.recv().await?;
        let (role, pid) = hello
            .check_hello()
            .map_err(|e| ConnError::Refused(e.to_string()))?;
        if role != label.role {
            return Err(ConnError::Refused(format!(
                "started as {:?} but says it is {role:?}",
                label.role
            )));
        }
        Ok(pid)
    }

    /// For path-based connections: the kernel's word on who is calling.
    async fn authenticate(&mut self, pids: &PidTable) -> Result<ChildLabel, ConnError> {
        let cred = self.bus.peer_cred().map_err(ConnError::Cred)?;
        let my_uid = rustix::process::getuid().as_raw();
        if cred.uid() != my_uid {
            return Err(ConnError::Refused(format!(
                "uid {} is not the supervisor's uid {my_uid}",
                cred.uid()
            )));
        }
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        pids.get(pid).ok_or_else(|| {
            ConnError::Refused(format!("pid {pid} is not a child of this supervisor"))
        })
    }

    async fn serve_owner(&mut self) -> Result<(), ConnError> {
        loop {
            match self.bus.recv().await? {
                (Message::Publish { manifest }, fds) => {
                    let (source, bytes) = (manifest.source.clone(), manifest.total_bytes());
                    match self.state.escrow.deposit(manifest, fds) {
                        Ok(generation) => {
                            self.bus
                                .send(&Message::Published { generation }, &[])
                                .await?;
                            let _ = self.state.events.send(Event::Published {
                                generation,
                                source,
                                bytes,
                            });
                        }
                        Err(e) => return Err(ConnError::Refused(format!("publish refused: {e}"))),
                    }
                }
                (Message::Adopted { generation }, _) => {
                    let current = self.state.escrow.current().map(|g| g.manifest.generation);
                    if current != Some(generation) {
                        return Err(ConnError::Refused(format!(
                            "owner adopted generation {generation}, but escrow holds {current:?}"
                        )));
                    }
                    let _ = self.state.events.send(Event::Adopted { generation });
                }
                (other, _) => {
                    return Err(ConnError::Refused(format!(
                        "owner sent unexpected {}",
                        other.kind()
                    )))
                }
            }
        }
    }

    async fn serve_worker(&mut self, index: u32, pid: u32) -> Result<(), ConnError> {
        loop {
            match self.bus.recv().await? {
                (Message::Ready { generation, attach }, _) => {
                    let _ = self.state.events.send(Event::WorkerReady {
                        index,
                        pid,
                        generation,
                        attach,
                    });
                }
                (other, _) => {
                    return Err(ConnError::Refused(format!(
                        "worker sent unexpected {}",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Tells a (re)started owner what to do: adopt the generation in escrow, or load from disk.
    async fn send_assignment(&mut self) -> Result<(), ConnError> {
        let Some(generation) = self.state.escrow.current() else {
            self.bus.send(&Message::Load, &[]).await?;
            return Ok(());
        };
        let fds = generation
            .arenas
            .iter()
            .map(|a| a.read_only_fd())
            .collect::<Result<Vec<_>, _>>()?;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let msg = Message::Adopt {
            manifest: generation.manifest.clone(),
        };
        self.bus.send(&msg, &borrowed).await?;
        Ok(())
    }

    /// Sends the current generation with fresh read-only fds (waits if none exists yet).
    async fn push_generation(&mut self) -> Result<(), ConnError> {
        let generation = self.state.escrow.wait_current().await;
        let fds = generation
            .arenas
            .iter()
            .map(|a| a.read_only_fd())
            .collect::<Result<Vec<_>, _>>()?;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let msg = Message::Generation {
            manifest: generation.manifest.clone(),
        };
        self.bus.send(&msg, &borrowed).await?;
        Ok(())
    }
}
