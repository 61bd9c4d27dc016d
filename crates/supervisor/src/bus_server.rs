//! The supervisor's end of the bus: accepts connections on the private socket, checks that
//! each peer is one of its own children (`SO_PEERCRED`: same uid, pid in the [`PidTable`],
//! claimed role matching), then serves the owner's publishes and the workers' attaches.
//!
//! A connection that breaks the protocol is logged with its reason and closed; no other
//! connection notices.
//!
//! ```no_run
//! # async fn f(server: forkless_supervisor::bus_server::BusServer) {
//! server.serve().await;
//! # }
//! ```

use std::os::fd::AsFd;
use std::time::Duration;

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

/// How long a connecting pid may be missing from the pid table (the spawner records it right
/// after the fork; this only covers that instant).
const PID_LOOKUP_GRACE: Duration = Duration::from_secs(2);

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

/// The accept loop and its shared state.
pub struct BusServer {
    pub listener: UnixListener,
    pub pids: PidTable,
    pub escrow: Escrow,
    pub events: mpsc::UnboundedSender<Event>,
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
                    Err(e) => { tracing::warn!("bus accept failed: {e}"); continue; }
                },
                _ = self.stop.cancelled() => break,
            };
            let conn = Connection {
                bus: BusStream::new(stream),
                pids: self.pids.clone(),
                escrow: self.escrow.clone(),
                events: self.events.clone(),
            };
            let stop = self.stop.clone();
            tracker.spawn(async move {
                tokio::select! {
                    result = conn.run() => if let Err(e) = result {
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
    pids: PidTable,
    escrow: Escrow,
    events: mpsc::UnboundedSender<Event>,
}

impl Connection {
    async fn run(mut self) -> Result<(), ConnError> {
        let label = match self.authenticate().await {
            Ok(label) => label,
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
                return Err(ConnError::Refused(reason));
            }
            Err(e) => return Err(e),
        };
        self.bus
            .send(
                &Message::Welcome {
                    version: PROTOCOL_VERSION,
                },
                &[],
            )
            .await?;
        let result = match label.role {
            Role::Owner => self.serve_owner().await,
            Role::Worker => self.serve_worker(label.index).await,
        };
        match result {
            Err(ConnError::Recv(RecvError::Closed)) => Ok(()),
            other => other,
        }
    }

    /// Credentials first (the kernel's word), then the hello (the peer's word), which must agree.
    async fn authenticate(&mut self) -> Result<ChildLabel, ConnError> {
        let cred = self.bus.peer_cred().map_err(ConnError::Cred)?;
        let my_uid = rustix::process::getuid().as_raw();
        if cred.uid() != my_uid {
            return Err(ConnError::Refused(format!(
                "uid {} is not the supervisor's uid {my_uid}",
                cred.uid()
            )));
        }
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let label = self.lookup(pid).await.ok_or_else(|| {
            ConnError::Refused(format!("pid {pid} is not a child of this supervisor"))
        })?;
        let (hello, _) = self.bus.recv().await?;
        let (role, claimed_pid) = hello
            .check_hello()
            .map_err(|e| ConnError::Refused(e.to_string()))?;
        if role != label.role || claimed_pid != pid {
            return Err(ConnError::Refused(format!(
                "pid {pid} was started as {:?} but says it is {role:?} pid {claimed_pid}",
                label.role
            )));
        }
        Ok(label)
    }

    async fn lookup(&self, pid: u32) -> Option<ChildLabel> {
        let deadline = tokio::time::Instant::now() + PID_LOOKUP_GRACE;
        loop {
            if let Some(label) = self.pids.get(pid) {
                return Some(label);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn serve_owner(&mut self) -> Result<(), ConnError> {
        loop {
            match self.bus.recv().await? {
                (Message::Publish { manifest }, fds) => {
                    let (source, bytes) = (manifest.source.clone(), manifest.total_bytes());
                    match self.escrow.deposit(manifest, fds) {
                        Ok(generation) => {
                            self.bus
                                .send(&Message::Published { generation }, &[])
                                .await?;
                            let _ = self.events.send(Event::Published {
                                generation,
                                source,
                                bytes,
                            });
                        }
                        Err(e) => return Err(ConnError::Refused(format!("publish refused: {e}"))),
                    }
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

    async fn serve_worker(&mut self, index: u32) -> Result<(), ConnError> {
        let pid = self
            .bus
            .peer_cred()
            .map_err(ConnError::Cred)?
            .pid()
            .unwrap_or(0) as u32;
        loop {
            match self.bus.recv().await? {
                (Message::Attach, _) => self.send_generation().await?,
                (
                    Message::Ready {
                        generation,
                        attach_us,
                    },
                    _,
                ) => {
                    let _ = self.events.send(Event::WorkerReady {
                        index,
                        pid,
                        generation,
                        attach_us,
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

    /// Sends the current generation with fresh read-only fds (waits if none exists yet).
    async fn send_generation(&mut self) -> Result<(), ConnError> {
        let generation = self.escrow.wait_current().await;
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
