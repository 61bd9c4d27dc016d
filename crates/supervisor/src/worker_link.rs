//! The supervisor's side of the worker protocol (the table in [`forkless_bus::wire`]): the
//! live generation pushed right behind the welcome, hot-swap offers and the worker's verdicts,
//! commits and aborts, readiness, heartbeats (a ready worker that falls silent is hung) and
//! releases.
//!
//! A connection follows the escrow's [`View`] as a level, not as a stream of edges: whenever
//! the view changes it compares what its worker was sent with what the view says and sends
//! what is missing (an offer not yet made, the decision on the offer it made), so no change
//! can slip by unseen, however late the connection looks.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use forkless_bus::{BusStream, Message};

use crate::escrow::{Decision, EscrowedGeneration, View, WorkerConn};
use crate::events::Event;
use crate::link::{BusState, ChildLink, ConnError};
use crate::spawn::ChildLabel;

/// What one worker connection has been sent.
#[derive(Debug)]
pub(crate) struct Session {
    conn: WorkerConn,
    /// Generations this worker may map (sent, not yet released).
    held: BTreeSet<u64>,
    /// The offer it was sent and has not been told the outcome of.
    offered: Option<u64>,
    /// The newest generation it was offered or given (never offer it anything older).
    newest: u64,
}

/// Joins the workers that vote on offers, then pushes the live generation (waiting until one
/// exists), holding it in the same step. Queued before the worker runs.
pub(crate) async fn push_first(bus: &mut BusStream, state: &BusState, index: u32) -> Result<Session, ConnError> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let conn = WorkerConn { index, id: NEXT.fetch_add(1, Ordering::Relaxed) };
    state.escrow.join(conn);
    let mut session = Session { conn, held: BTreeSet::new(), offered: None, newest: 0 };
    let live = state.escrow.acquire_live().await;
    session.held.insert(live.number());
    session.newest = live.number();
    let device = state.device_of(index);
    let generation = |manifest, lane| Message::Generation { manifest, lane };
    if let Err(e) = send_generation(bus, &live, device, generation, state.lane).await {
        end(state, session);
        return Err(e);
    }
    Ok(session)
}

/// Sends the view of `generation` for this worker's device, with a fresh reader fd of its
/// arena (read-only for host memory; CUDA memory is mapped read-only by the worker), then its
/// device's batch lane's fd, if the generation has lanes.
async fn send_generation(
    bus: &mut BusStream,
    generation: &EscrowedGeneration,
    device: Option<u32>,
    message: impl FnOnce(forkless_bus::Manifest, Option<forkless_bus::wire::LaneSettings>) -> Message,
    lane: Option<forkless_bus::wire::LaneSettings>,
) -> Result<(), ConnError> {
    let (view, arena, lane_fd) = generation.for_device(device).ok_or_else(|| {
        let place = device.map_or("host memory".to_string(), |d| format!("GPU {d}"));
        ConnError::Refused(format!("generation {} has no copy on {place}, where this worker runs", generation.number()))
    })?;
    let mut fds = vec![arena.reader_fd()?];
    let lane = match lane_fd {
        Some(lane_fd) => {
            fds.push(lane_fd.try_clone_fd().map_err(ConnError::LaneFd)?);
            lane
        }
        None => None,
    };
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    bus.send(&message(view, lane), &borrowed).await?;
    Ok(())
}

/// The connection is over: the worker has no say in offers and holds nothing any more.
fn end(state: &BusState, session: Session) {
    state.escrow.leave(session.conn);
    for generation in session.held {
        state.release(generation);
    }
}

/// Serves a worker until its connection ends. `session` is `None` with `sharing = "none"`
/// (the worker loads its own copy; there is nothing to push or offer).
pub(crate) async fn serve(
    bus: &mut BusStream,
    state: &BusState,
    link: &mut ChildLink,
    label: ChildLabel,
    pid: u32,
    mut session: Option<Session>,
) -> Result<(), ConnError> {
    let mut view = state.escrow.subscribe();
    // Armed once the worker is ready (before that, the slot's start timeout applies), and
    // pushed back by every message the worker sends.
    let mut silent_until: Option<tokio::time::Instant> = None;
    let result = loop {
        if let Some(session) = session.as_mut() {
            let snapshot = view.borrow_and_update().clone();
            if let Err(e) = follow(bus, state, (label, pid), session, &snapshot).await {
                break Err(e);
            }
        }
        let silence = async {
            match silent_until {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Ok(()) = view.changed() => {}
            () = silence => {
                let timeout = link.heartbeat_timeout.unwrap_or_default();
                tracing::error!("worker {} (pid {pid}) sent no heartbeat for {timeout:?}: it is hung", label.index);
                link.hung.cancel();
                break Ok(());
            }
            received = bus.recv() => {
                let message = match received {
                    Ok((message, _)) => message,
                    Err(e) => break Err(e.into()),
                };
                if let (Some(timeout), Some(_)) = (link.heartbeat_timeout, silent_until) {
                    silent_until = Some(tokio::time::Instant::now() + timeout);
                }
                if let Message::Ready { .. } = message {
                    silent_until = link.heartbeat_timeout.map(|t| tokio::time::Instant::now() + t);
                }
                if let Err(e) = on_message(state, link, (label, pid), session.as_mut(), message) {
                    break Err(e);
                }
            }
        }
    };
    if let Some(session) = session {
        end(state, session);
    }
    result
}

/// Sends what the worker is missing of `view`: the outcome of its offer, a new offer.
async fn follow(
    bus: &mut BusStream,
    state: &BusState,
    (label, pid): (ChildLabel, u32),
    session: &mut Session,
    view: &View,
) -> Result<(), ConnError> {
    if let Some(offered) = session.offered {
        match view.decisions.get(&offered) {
            Some(Decision::Committed) => {
                bus.send(&Message::Commit { generation: offered }, &[]).await?;
                state.processes.set_generation(label, pid, offered);
                session.offered = None;
            }
            Some(Decision::Aborted(reason)) => {
                bus.send(&Message::Abort { generation: offered, reason: reason.clone() }, &[]).await?;
                session.offered = None;
            }
            None => {}
        }
    }
    let Some(offer) = view.offer.as_ref().filter(|o| session.offered.is_none() && o.number() > session.newest) else {
        return Ok(());
    };
    session.newest = offer.number();
    if let Some(offer) = state.escrow.acquire_offer(offer.number()) {
        session.held.insert(offer.number());
        session.offered = Some(offer.number());
        let device = state.device_of(label.index);
        let message = |manifest, lane| Message::Offer { manifest, lane };
        send_generation(bus, &offer, device, message, state.lane).await?;
    }
    Ok(())
}

fn on_message(
    state: &BusState,
    link: &mut ChildLink,
    (label, pid): (ChildLabel, u32),
    session: Option<&mut Session>,
    message: Message,
) -> Result<(), ConnError> {
    match (message, session) {
        (Message::Ready { generation, attach }, _) => {
            state.processes.ready(label, pid, Some(generation));
            let _ = state.events.send(Event::WorkerReady { index: label.index, pid, generation, attach });
            link.mark_ready();
        }
        (Message::Heartbeat { requests }, _) => state.processes.set_requests(label, pid, requests),
        (Message::Released { generation }, Some(session)) => {
            if session.held.remove(&generation) {
                state.release(generation);
            }
        }
        (Message::Accepted { generation }, Some(session)) if session.offered == Some(generation) => {
            state.escrow.answer(session.conn, generation, Ok(()));
        }
        (Message::Rejected { generation, reason }, Some(session)) if session.offered == Some(generation) => {
            tracing::warn!("worker {} (pid {pid}) refused generation {generation}: {reason}", label.index);
            state.escrow.answer(session.conn, generation, Err(format!("{reason} (pid {pid})")));
        }
        // A verdict that crossed the decision on the wire: another worker's refusal (or the
        // offer timeout) decided the offer, and this worker was sent the outcome, while it was
        // still checking. Nothing to do: the Abort or Commit it is about to read settles it.
        (Message::Accepted { generation } | Message::Rejected { generation, .. }, Some(session))
            if session.offered.is_none_or(|offered| offered > generation) && generation <= session.newest =>
        {
            tracing::debug!("worker {} (pid {pid}) answered generation {generation} after it was decided", label.index);
        }
        (other, _) => return Err(ConnError::Refused(format!("worker sent unexpected {}", other.kind()))),
    }
    Ok(())
}
