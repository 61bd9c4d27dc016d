//! The owner's side of the owner protocol (the table in [`forkless_bus::wire`]) as an explicit
//! state machine: which message the owner may receive in which phase, and what it then does.
//! The I/O (loading, publishing, verifying) is [`crate::run`]'s; this module only decides, so
//! every transition, legal or not, is unit-tested here.
//!
//! | phase | receives | does | next phase |
//! |---|---|---|---|
//! | awaiting assignment | `Load{r}` | load, `Publish{r}` (a failure is fatal: nothing to serve) | awaiting deposit (first) |
//! | awaiting assignment | `Adopt{r}` | verify; `Adopted{r}`, or load and `Publish{r}` | idle, or awaiting deposit (first) |
//! | awaiting deposit | `Published{r}` / `NotPublished{r}` of its own request | log (a refused first publish is fatal) | idle |
//! | idle | `Load{r}` (hot swap) | load, `Publish{r}`, or `LoadFailed{r}` | awaiting deposit, or idle |
//! | any | anything else | exit 1: the supervisor broke the protocol; it restarts the owner, which re-adopts | — |
//!
//! ```
//! use forkless_bus::Message;
//! use forkless_owner::protocol::{Incoming, OwnerProtocol};
//! let mut protocol = OwnerProtocol::default();
//! let load = Message::Load { request: 1, path: "m.safetensors".into() };
//! assert!(matches!(protocol.receive(load, vec![]), Ok(Incoming::Load { request: 1, first: true, .. })));
//! protocol.sent_publish(1);
//! let published = Message::Published { request: 1, generation: 1 };
//! assert!(matches!(protocol.receive(published, vec![]), Ok(Incoming::Deposited { first: true, .. })));
//! ```

use std::os::fd::OwnedFd;

use forkless_bus::wire::RequestId;
use forkless_bus::{Manifest, Message};

/// Where the owner is in its conversation with the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Connected; the first assignment (`Load` or `Adopt`) has not arrived yet.
    #[default]
    AwaitingAssignment,
    /// Sent `Publish` for `request`; the supervisor's answer to it has not arrived yet.
    AwaitingDeposit { request: RequestId, first: bool },
    /// Holds a generation (published or adopted); waits for a hot swap.
    Idle,
}

/// What a received message asks of the owner.
#[derive(Debug)]
pub enum Incoming {
    /// Load `path` and publish it as `request` (`first`: the service has nothing else).
    Load { request: RequestId, path: String, first: bool },
    /// Verify the escrowed generation and adopt it (or load the file again and publish).
    Adopt { request: RequestId, manifest: Manifest, fds: Vec<OwnedFd> },
    /// The supervisor's answer to a publish: `Ok(generation)` or why it was refused.
    Deposited { request: RequestId, result: Result<u64, String>, first: bool },
    /// The supervisor refused this owner (and closes the connection).
    Refused(String),
}

/// The supervisor sent something the protocol does not allow now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the supervisor sent {received} while the owner was {phase}: protocol violation")]
pub struct ProtocolError {
    pub received: &'static str,
    pub phase: &'static str,
}

/// The owner's protocol state.
#[derive(Debug, Default)]
pub struct OwnerProtocol {
    phase: Phase,
}

impl OwnerProtocol {
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Checks `message` against the phase and moves on; `Err` ends the owner.
    pub fn receive(&mut self, message: Message, fds: Vec<OwnedFd>) -> Result<Incoming, ProtocolError> {
        let violation = |phase: Phase, message: &Message| ProtocolError {
            received: message.kind(),
            phase: match phase {
                Phase::AwaitingAssignment => "waiting for its first assignment",
                Phase::AwaitingDeposit { .. } => "waiting for the answer to its publish",
                Phase::Idle => "idle",
            },
        };
        match (self.phase, message) {
            (_, Message::Refused { reason }) => Ok(Incoming::Refused(reason)),
            (Phase::AwaitingAssignment, Message::Load { request, path }) => {
                Ok(Incoming::Load { request, path, first: true })
            }
            (Phase::Idle, Message::Load { request, path }) => Ok(Incoming::Load { request, path, first: false }),
            (Phase::AwaitingAssignment, Message::Adopt { request, manifest }) => {
                Ok(Incoming::Adopt { request, manifest, fds })
            }
            (Phase::AwaitingDeposit { request, first }, Message::Published { request: answered, generation })
                if answered == request =>
            {
                self.phase = Phase::Idle;
                Ok(Incoming::Deposited { request, result: Ok(generation), first })
            }
            (Phase::AwaitingDeposit { request, first }, Message::NotPublished { request: answered, reason })
                if answered == request =>
            {
                self.phase = Phase::Idle;
                Ok(Incoming::Deposited { request, result: Err(reason), first })
            }
            (phase, message) => Err(violation(phase, &message)),
        }
    }

    /// The owner sent `Publish` for `request` (after a `Load`, or after an `Adopt` whose
    /// generation failed its check).
    pub fn sent_publish(&mut self, request: RequestId) {
        let first = self.phase == Phase::AwaitingAssignment;
        self.phase = Phase::AwaitingDeposit { request, first };
    }

    /// The owner adopted the escrowed generation, or answered a hot swap with `LoadFailed`.
    pub fn settled(&mut self) {
        self.phase = Phase::Idle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(request: RequestId) -> Message {
        Message::Load { request, path: "m".into() }
    }

    fn manifest() -> Manifest {
        Manifest::new("m".into(), vec![], vec![])
    }

    #[test]
    fn the_first_load_is_published_and_answered() {
        let mut protocol = OwnerProtocol::default();
        assert!(matches!(protocol.receive(load(1), vec![]), Ok(Incoming::Load { first: true, .. })));
        protocol.sent_publish(1);
        assert_eq!(protocol.phase(), Phase::AwaitingDeposit { request: 1, first: true });
        let answer = protocol.receive(Message::Published { request: 1, generation: 4 }, vec![]).unwrap();
        assert!(matches!(answer, Incoming::Deposited { result: Ok(4), first: true, .. }));
        assert_eq!(protocol.phase(), Phase::Idle);
    }

    #[test]
    fn a_hot_swap_load_is_accepted_only_when_idle() {
        let mut protocol = OwnerProtocol::default();
        protocol.receive(Message::Adopt { request: 1, manifest: manifest() }, vec![]).unwrap();
        protocol.settled();
        assert!(matches!(protocol.receive(load(2), vec![]), Ok(Incoming::Load { first: false, .. })));
        protocol.sent_publish(2);
        // Issue #10 item 1: a load while the owner waits for the answer to its own publish.
        let err = protocol.receive(load(3), vec![]).unwrap_err();
        assert_eq!(err.phase, "waiting for the answer to its publish");
        assert_eq!(err.received, "load");
    }

    #[test]
    fn answers_to_another_request_are_violations() {
        let mut protocol = OwnerProtocol::default();
        protocol.receive(load(1), vec![]).unwrap();
        protocol.sent_publish(1);
        assert!(protocol.receive(Message::Published { request: 2, generation: 1 }, vec![]).is_err());
        assert!(protocol.receive(Message::NotPublished { request: 0, reason: "x".into() }, vec![]).is_err());
    }

    #[test]
    fn nothing_but_an_assignment_comes_first() {
        for message in [
            Message::Published { request: 1, generation: 1 },
            Message::Commit { generation: 1 },
            Message::Welcome { version: forkless_bus::wire::PROTOCOL_VERSION },
        ] {
            assert!(OwnerProtocol::default().receive(message, vec![]).is_err());
        }
        let mut idle = OwnerProtocol::default();
        idle.receive(load(1), vec![]).unwrap();
        idle.sent_publish(1);
        idle.receive(Message::NotPublished { request: 1, reason: "bad".into() }, vec![]).unwrap();
        assert!(idle.receive(Message::Adopt { request: 2, manifest: manifest() }, vec![]).is_err(), "adopt only first");
    }

    #[test]
    fn a_refusal_is_reported_in_any_phase() {
        let mut protocol = OwnerProtocol::default();
        assert!(matches!(protocol.receive(Message::Refused { reason: "no".into() }, vec![]), Ok(Incoming::Refused(_))));
    }
}
