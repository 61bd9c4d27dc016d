//! The supervisor's side of the owner protocol (the table in [`forkless_bus::wire`]), as an
//! explicit state machine ([`OwnerProtocol`]) and the connection loop that drives it.
//!
//! | phase | may send | accepts from the owner | next |
//! |---|---|---|---|
//! | assigning(r) | nothing | `Publish{r}` (deposited: live, or offered after a failed adoption), `Adopted{r}` of the live generation | idle |
//! | idle | `Load{r'}` for a hot swap | nothing | loading(r') |
//! | loading(r) | nothing | `Publish{r}` (offered to the workers), `LoadFailed{r}` | idle |
//!
//! Anything else from the owner is a protocol violation: the connection closes and the owner is
//! restarted (it re-adopts the escrowed generation). A hot swap asked while the owner is still
//! assigning, or already loading, is **refused** with a message saying why (not queued: the
//! caller can retry, and a queue would hide a stuck load). A load that outlives
//! `[model] load_timeout_s` fails the swap with that reason, and the owner is replaced.

use std::os::fd::{AsFd, OwnedFd};

use forkless_bus::wire::RequestId;
use forkless_bus::{BusStream, Manifest, Message};
use tokio::sync::{mpsc, oneshot};

use crate::escrow::Deposited;
use crate::events::Event;
use crate::link::{BusState, ChildLink, ConnError, LoadRequest};
use crate::spawn::ChildLabel;

/// Where the supervisor is in its conversation with one owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The first assignment (`Load` or `Adopt`) is out, unanswered.
    Assigning { request: RequestId },
    /// The owner holds a generation and has nothing to do.
    Idle,
    /// A hot swap's `Load` of `path` is out, unanswered.
    Loading { request: RequestId, path: String },
}

/// What a message from the owner asks of the supervisor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromOwner {
    /// Deposit this publish; `first` when it answers the first assignment.
    Publish { request: RequestId, first: bool },
    /// The owner adopted `generation` from escrow.
    Adopted { generation: u64 },
    /// The hot swap's load failed.
    LoadFailed { reason: String },
}

/// The owner protocol's state, supervisor side.
#[derive(Debug)]
pub(crate) struct OwnerProtocol {
    phase: Phase,
    last_request: RequestId,
}

impl OwnerProtocol {
    /// A new connection: its first assignment is request 1.
    pub fn assigning() -> (OwnerProtocol, RequestId) {
        (OwnerProtocol { phase: Phase::Assigning { request: 1 }, last_request: 1 }, 1)
    }

    #[cfg(test)]
    fn phase(&self) -> &Phase {
        &self.phase
    }

    /// A hot swap wants `path` loaded: the request id to send, or why not now.
    pub fn start_load(&mut self, path: &str) -> Result<RequestId, String> {
        match &self.phase {
            Phase::Idle => {
                self.last_request += 1;
                let request = self.last_request;
                self.phase = Phase::Loading { request, path: path.into() };
                Ok(request)
            }
            Phase::Assigning { .. } => Err(
                "the owner is still loading (or adopting) the service's first generation: try again once it is ready"
                    .into(),
            ),
            Phase::Loading { path: busy, .. } => {
                Err(format!("a model load of {busy} is in progress: try again once it is done"))
            }
        }
    }

    /// Checks a message from the owner against the phase and moves on.
    pub fn receive(&mut self, message: &Message) -> Result<FromOwner, String> {
        let step = match (&self.phase, message) {
            (Phase::Assigning { request }, Message::Publish { request: r, .. }) if r == request => {
                FromOwner::Publish { request: *r, first: true }
            }
            (Phase::Assigning { request }, Message::Adopted { request: r, generation }) if r == request => {
                FromOwner::Adopted { generation: *generation }
            }
            (Phase::Loading { request, .. }, Message::Publish { request: r, .. }) if r == request => {
                FromOwner::Publish { request: *r, first: false }
            }
            (Phase::Loading { request, .. }, Message::LoadFailed { request: r, reason }) if r == request => {
                FromOwner::LoadFailed { reason: reason.clone() }
            }
            (phase, message) => {
                return Err(format!(
                    "owner sent {} while the supervisor was {}",
                    describe(message),
                    describe_phase(phase)
                ))
            }
        };
        self.phase = Phase::Idle;
        Ok(step)
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Publish { request, .. } | Message::Adopted { request, .. } | Message::LoadFailed { request, .. } => {
            format!("{} for request {request}", message.kind())
        }
        other => other.kind().to_string(),
    }
}

fn describe_phase(phase: &Phase) -> String {
    match phase {
        Phase::Assigning { request } => format!("waiting for the answer to its first assignment (request {request})"),
        Phase::Idle => "not waiting for anything".into(),
        Phase::Loading { request, path } => format!("waiting for the load of {path} (request {request})"),
    }
}

/// Sends a new owner its first assignment: adopt the live generation if there is one, else
/// load the configured weights file. Queued before the owner runs.
pub(crate) async fn assign(bus: &mut BusStream, state: &BusState) -> Result<OwnerProtocol, ConnError> {
    let (protocol, request) = OwnerProtocol::assigning();
    match state.escrow.live() {
        Some(live) => {
            // Every device's copy: the owner verifies each before it adopts the generation.
            let fds = live.arenas.iter().map(|a| a.reader_fd()).collect::<Result<Vec<_>, _>>()?;
            let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
            bus.send(&Message::Adopt { request, manifest: live.manifest.clone() }, &borrowed).await?;
        }
        None => bus.send(&Message::Load { request, path: state.model_path.clone() }, &[]).await?,
    }
    Ok(protocol)
}

/// A hot swap in flight: who asked, and until when the owner may load.
struct Pending {
    reply: oneshot::Sender<Result<u64, String>>,
    path: String,
    deadline: tokio::time::Instant,
}

/// Serves an owner after its first assignment until the connection ends.
pub(crate) async fn serve(
    bus: &mut BusStream,
    state: &BusState,
    link: &mut ChildLink,
    label: ChildLabel,
    pid: u32,
    mut protocol: OwnerProtocol,
) -> Result<(), ConnError> {
    let (sender, mut requests) = mpsc::unbounded_channel();
    state.set_owner(sender.clone());
    let mut pending: Option<Pending> = None;
    let result = loop {
        let deadline = pending.as_ref().map(|p| p.deadline);
        let timed_out = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(request) = requests.recv() => {
                if let Err(e) = start_load(bus, state, &mut protocol, &mut pending, request).await {
                    break Err(e);
                }
            }
            () = timed_out => {
                let pending = pending.take().expect("a deadline means a pending load");
                let reason = format!(
                    "loading {} did not finish within {:?} ([model] load_timeout_s): the owner is replaced; the live generation keeps serving",
                    pending.path, state.load_timeout
                );
                tracing::error!("{reason}");
                let _ = pending.reply.send(Err(reason));
                link.hung.cancel();
                break Ok(());
            }
            received = bus.recv() => {
                let (message, fds) = match received {
                    Ok(frame) => frame,
                    Err(e) => break Err(e.into()),
                };
                let step = match protocol.receive(&message) {
                    Ok(step) => step,
                    Err(violation) => break Err(ConnError::Refused(violation)),
                };
                let child = (label, pid);
                if let Err(e) = on_step(bus, state, link, child, step, message, fds, &mut pending).await {
                    break Err(e);
                }
            }
        }
    };
    state.clear_owner(&sender);
    if let Some(pending) = pending {
        let _ = pending.reply.send(Err(format!("the owner died while loading {}: try again", pending.path)));
    }
    result
}

async fn start_load(
    bus: &mut BusStream,
    state: &BusState,
    protocol: &mut OwnerProtocol,
    pending: &mut Option<Pending>,
    request: LoadRequest,
) -> Result<(), ConnError> {
    match protocol.start_load(&request.path) {
        Ok(id) => {
            bus.send(&Message::Load { request: id, path: request.path.clone() }, &[]).await?;
            let deadline = tokio::time::Instant::now() + state.load_timeout;
            *pending = Some(Pending { reply: request.reply, path: request.path, deadline });
        }
        Err(busy) => {
            let _ = request.reply.send(Err(busy));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one call site; the arguments are the connection's parts
async fn on_step(
    bus: &mut BusStream,
    state: &BusState,
    link: &mut ChildLink,
    child: (ChildLabel, u32),
    step: FromOwner,
    message: Message,
    fds: Vec<OwnedFd>,
    pending: &mut Option<Pending>,
) -> Result<(), ConnError> {
    match step {
        FromOwner::Publish { request, first } => {
            let Message::Publish { manifest, .. } = message else { unreachable!("checked by the protocol") };
            let deposited = deposit(bus, state, request, manifest, fds).await?;
            let reply = pending.take().map(|p| p.reply);
            match (&deposited, first) {
                (Ok(generation), true) => owner_ready(state, link, child, generation.generation()),
                (Err(reason), true) => return Err(ConnError::Refused(format!("first publish refused: {reason}"))),
                (_, false) => {}
            }
            if let Some(reply) = reply {
                let _ = reply.send(deposited.map(Deposited::generation));
            }
        }
        FromOwner::Adopted { generation } => {
            let live = state.escrow.live().map(|g| g.number());
            if live != Some(generation) {
                return Err(ConnError::Refused(format!(
                    "owner adopted generation {generation}, but the live generation is {live:?}"
                )));
            }
            let _ = state.events.send(Event::Adopted { generation });
            owner_ready(state, link, child, generation);
        }
        FromOwner::LoadFailed { reason } => {
            if let Some(pending) = pending.take() {
                let _ = pending.reply.send(Err(reason));
            }
        }
    }
    Ok(())
}

/// Puts a publish into escrow and answers the owner; `Err` carries why it was refused.
async fn deposit(
    bus: &mut BusStream,
    state: &BusState,
    request: RequestId,
    manifest: Manifest,
    fds: Vec<OwnedFd>,
) -> Result<Result<Deposited, String>, ConnError> {
    let (source, bytes) = (manifest.source.clone(), manifest.total_bytes());
    match state.escrow.deposit(manifest, fds) {
        Ok(deposited) => {
            let generation = deposited.generation();
            bus.send(&Message::Published { request, generation }, &[]).await?;
            let _ = state.events.send(Event::Published {
                generation,
                source,
                bytes,
                live: deposited == Deposited::Live(generation),
            });
            Ok(Ok(deposited))
        }
        Err(e) => {
            let reason = format!("generation refused: {e}");
            bus.send(&Message::NotPublished { request, reason: reason.clone() }, &[]).await?;
            Ok(Err(reason))
        }
    }
}

/// The owner holds a generation (published or adopted): it is ready.
fn owner_ready(state: &BusState, link: &mut ChildLink, (label, pid): (ChildLabel, u32), generation: u64) {
    state.processes.ready(label, pid, Some(generation));
    link.mark_ready();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(request: RequestId) -> Message {
        Message::Publish { request, manifest: Manifest::new("m".into(), vec![], vec![]) }
    }

    #[test]
    fn nothing_is_asked_of_an_owner_before_its_first_assignment_is_answered() {
        // Issue #10 item 1: a hot swap asked during the first load.
        let (mut protocol, request) = OwnerProtocol::assigning();
        let refusal = protocol.start_load("new.safetensors").unwrap_err();
        assert!(refusal.contains("first generation"), "{refusal}");
        assert_eq!(protocol.receive(&publish(request)), Ok(FromOwner::Publish { request, first: true }));
        assert_eq!(protocol.phase(), &Phase::Idle);
        assert_eq!(protocol.start_load("new.safetensors"), Ok(2));
    }

    #[test]
    fn one_load_at_a_time_and_answers_must_name_it() {
        let (mut protocol, _) = OwnerProtocol::assigning();
        protocol.receive(&Message::Adopted { request: 1, generation: 3 }).unwrap();
        let request = protocol.start_load("a").unwrap();
        assert!(protocol.start_load("b").unwrap_err().contains("load of a is in progress"));
        assert!(protocol.receive(&publish(request + 1)).is_err(), "an answer to another request");
        let failed = Message::LoadFailed { request, reason: "no such file".into() };
        assert_eq!(protocol.receive(&failed), Ok(FromOwner::LoadFailed { reason: "no such file".into() }));
        assert!(protocol.start_load("b").is_ok());
    }

    #[test]
    fn an_idle_owner_may_say_nothing() {
        let (mut protocol, request) = OwnerProtocol::assigning();
        protocol.receive(&publish(request)).unwrap();
        for message in
            [publish(request), Message::Adopted { request, generation: 1 }, Message::Heartbeat { requests: 0 }]
        {
            let violation = protocol.receive(&message).unwrap_err();
            assert!(violation.contains("not waiting for anything"), "{violation}");
        }
    }

    #[test]
    fn a_load_failure_answers_only_a_hot_swap() {
        let (mut protocol, request) = OwnerProtocol::assigning();
        assert!(protocol.receive(&Message::LoadFailed { request, reason: "x".into() }).is_err());
    }
}
