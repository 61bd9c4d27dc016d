//! The bus protocol: every message exchanged between the supervisor and its children, with its
//! direction, when it is sent and what answers it. This table is the contract; both sides
//! implement it as explicit state machines (the owner's in `forkless-owner`, the supervisor's
//! in its `owner_link` and `bus_server` modules, the worker's in `forkless-worker`).
//!
//! A connection starts with [`Message::Hello`] from the child (magic, protocol version, role,
//! pid). The supervisor sends [`Message::Welcome`] (or [`Message::Refused`] and closes); both
//! sides check the other's version. On a child's inherited socketpair the welcome (and the
//! first assignment) are already queued before the child runs, so attaching waits for nobody.
//!
//! **Owner** (requests carry a [`RequestId`] chosen by the supervisor; every answer names it):
//!
//! | dir | message | when | answered by |
//! |---|---|---|---|
//! | S→O | `Load{request, path}` | first assignment when the escrow is empty; later a hot swap | `Publish` or `LoadFailed` |
//! | S→O | `Adopt{request, manifest}` + 1 fd/arena | first assignment when the escrow holds a generation | `Adopted`, or (check failed) `Publish`/`LoadFailed` |
//! | O→S | `Publish{request, manifest}` + 1 fd/arena | the load of `request` finished | `Published` or `NotPublished` |
//! | O→S | `LoadFailed{request, reason}` | the load of `request` failed; the owner keeps what it had | — |
//! | O→S | `Adopted{request, generation}` | the escrowed generation checked out | — |
//! | S→O | `Published{request, generation}` | the publish is in escrow as `generation` | — |
//! | S→O | `NotPublished{request, reason}` | the publish was refused; the owner drops it | — |
//!
//! The supervisor sends an owner nothing but its first assignment until that assignment is
//! answered, and at most one `Load` at a time: an owner never sees a request while it waits for
//! the answer to its own publish.
//!
//! **Worker**:
//!
//! | dir | message | when | answered by |
//! |---|---|---|---|
//! | S→W | `Generation{manifest, lane}` + 1 read-only fd/arena (+ the lane's fd) | right behind the welcome: the generation to serve | `Ready` (or exit 78 if the service refuses it) |
//! | W→S | `Ready{generation, attach}` | mapped, checked, warmed up, listening | — |
//! | S→W | `Offer{manifest, lane}` + fds | hot swap: map and check this generation, do not serve it yet | `Accepted` or `Rejected` |
//! | W→S | `Accepted{generation}` / `Rejected{generation, reason}` | the service's check of an offer | — |
//! | S→W | `Commit{generation}` | every worker accepted the offer: serve it from the next request on | `Released` of the old one, later |
//! | S→W | `Abort{generation, reason}` | some worker rejected it (or died, or timed out): drop it | `Released{generation}` |
//! | W→S | `Released{generation}` | nothing in this worker maps `generation` any more | — |
//! | W→S | `Heartbeat{requests}` | every `FORKLESS_HEARTBEAT_MS` after `Ready` | — |
//!
//! Which messages carry descriptors, and how many, is decided here by [`Message::fd_count`], so
//! a frame that arrives with a different number of fds is refused rather than guessed at.
//!
//! ```
//! use forkless_bus::wire::{Message, Role};
//! let hello = Message::hello(Role::Worker, 42);
//! assert_eq!(hello.fd_count(), 0);
//! assert!(hello.check_hello().is_ok());
//! ```

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Bump when a message changes shape; peers with another version are refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 3;
/// First bytes of every hello, so a stray client is recognised at once.
pub const MAGIC: [u8; 8] = *b"FRKLSBUS";

/// Numbers one request of the supervisor to the owner; the owner's answer carries it back, so
/// an answer can never be taken for the answer to another request.
pub type RequestId = u64;

/// How the workers of a generation share one pass over the weights: the generation's batch
/// lane ([`crate::lane`]) travels as one more fd behind the arenas' (read-write: it holds
/// requests, never weights), with the settings its pass runners use.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneSettings {
    /// At most this many requests per pass.
    pub max_batch: u32,
    /// A pass that is not full waits up to this long after its oldest request.
    pub max_wait_us: u64,
    /// A pass that is not full also waits up to this long after the previous pass, for its
    /// requests to come back (0: off; see [`crate::lane::batcher`]).
    pub linger_us: u64,
}

/// What a child is to the supervisor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    Worker,
}

/// One frame's payload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Message {
    Hello {
        magic: [u8; 8],
        version: u32,
        role: Role,
        pid: u32,
    },
    Welcome {
        version: u32,
    },
    Refused {
        reason: String,
    },
    /// Supervisor → owner: load this weights file into a new arena and publish it (the first
    /// assignment when nothing is in escrow, and every hot swap).
    Load {
        request: RequestId,
        path: String,
    },
    /// Owner → supervisor: the `Load` of `request` failed (the owner keeps running and keeps
    /// what it had).
    LoadFailed {
        request: RequestId,
        reason: String,
    },
    /// Supervisor → owner: the generation in escrow (one read-only fd per arena): verify it
    /// (layout hash, arena checksums) and adopt it instead of reading the disk.
    Adopt {
        request: RequestId,
        manifest: Manifest,
    },
    /// Owner → supervisor: the escrowed generation checked out and is adopted.
    Adopted {
        request: RequestId,
        generation: u64,
    },
    /// Owner → supervisor: the generation loaded for `request`; carries one fd per arena.
    Publish {
        request: RequestId,
        manifest: Manifest,
    },
    /// Supervisor → owner: the publish of `request` is in escrow as `generation`.
    Published {
        request: RequestId,
        generation: u64,
    },
    /// Supervisor → owner: the publish of `request` was refused; the owner drops its arena.
    NotPublished {
        request: RequestId,
        reason: String,
    },
    /// Supervisor → worker: the generation to serve, pushed right behind the welcome; carries
    /// one read-only fd per arena, then the batch lane's fd when `lane` is set.
    Generation {
        manifest: Manifest,
        lane: Option<LaneSettings>,
    },
    /// Supervisor → worker (hot swap): a new generation to map and check, not to serve yet;
    /// carries one read-only fd per arena (and the lane's). Answered by `Accepted` or `Rejected`.
    Offer {
        manifest: Manifest,
        lane: Option<LaneSettings>,
    },
    /// Worker → supervisor: the service's check accepted the offered `generation`.
    Accepted {
        generation: u64,
    },
    /// Worker → supervisor: the service's check refused the offered `generation`.
    Rejected {
        generation: u64,
        reason: String,
    },
    /// Supervisor → worker: every worker accepted `generation`: serve it from the next request.
    Commit {
        generation: u64,
    },
    /// Supervisor → worker: the offer of `generation` is withdrawn (a worker rejected it, died
    /// or did not answer): drop it and keep serving the current one.
    Abort {
        generation: u64,
        reason: String,
    },
    /// Worker → supervisor: mapped, verified, warmed up, listening.
    Ready {
        generation: u64,
        attach: AttachTiming,
    },
    /// Worker → supervisor, every `FORKLESS_HEARTBEAT_MS`: alive, and how many requests it has
    /// served so far. A worker silent past `[workers] timeout_s` is killed and replaced.
    Heartbeat {
        requests: u64,
    },
    /// Worker → supervisor: nothing in this worker uses the generation any more (its last
    /// request finished and it is unmapped); once no worker holds it, its memory is freed.
    Released {
        generation: u64,
    },
}

/// How long a worker took to attach its generation (bus handshake, manifest, validation, mmap).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachTiming {
    /// Wall-clock time, waiting included (on a busy machine, mostly waiting for a CPU).
    pub wall_us: u64,
    /// CPU time the attaching thread spent.
    pub cpu_us: u64,
}

/// Why a hello was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("the first message was not a hello")]
    NotHello,
    #[error("bad magic: this peer does not speak the forkless bus")]
    BadMagic,
    #[error("protocol version {theirs} is not {PROTOCOL_VERSION}: rebuild the child against this forkless")]
    Version { theirs: u32 },
}

impl Message {
    /// The hello a child of `role` opens its connection with.
    pub fn hello(role: Role, pid: u32) -> Message {
        Message::Hello { magic: MAGIC, version: PROTOCOL_VERSION, role, pid }
    }

    /// Checks magic and version of a hello; returns the role and pid it claims.
    pub fn check_hello(&self) -> Result<(Role, u32), HandshakeError> {
        match self {
            Message::Hello { magic, .. } if *magic != MAGIC => Err(HandshakeError::BadMagic),
            Message::Hello { version, .. } if *version != PROTOCOL_VERSION => {
                Err(HandshakeError::Version { theirs: *version })
            }
            Message::Hello { role, pid, .. } => Ok((*role, *pid)),
            _ => Err(HandshakeError::NotHello),
        }
    }

    /// Number of file descriptors that travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Publish { manifest, .. } | Message::Adopt { manifest, .. } => manifest.all_arenas().count(),
            Message::Generation { manifest, lane } | Message::Offer { manifest, lane } => {
                manifest.arenas.len() + usize::from(lane.is_some())
            }
            _ => 0,
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Refused { .. } => "refused",
            Message::Publish { .. } => "publish",
            Message::Load { .. } => "load",
            Message::LoadFailed { .. } => "load failed",
            Message::Released { .. } => "released",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Adopt { .. } => "adopt",
            Message::Adopted { .. } => "adopted",
            Message::Published { .. } => "published",
            Message::NotPublished { .. } => "not published",
            Message::Offer { .. } => "offer",
            Message::Accepted { .. } => "accepted",
            Message::Rejected { .. } => "rejected",
            Message::Commit { .. } => "commit",
            Message::Abort { .. } => "abort",
            Message::Generation { .. } => "generation",
            Message::Ready { .. } => "ready",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_checks_magic_and_version() {
        assert_eq!(Message::hello(Role::Owner, 7).check_hello(), Ok((Role::Owner, 7)));
        let bad_magic = Message::Hello { magic: *b"HTTP/1.1", version: 1, role: Role::Owner, pid: 1 };
        assert_eq!(bad_magic.check_hello(), Err(HandshakeError::BadMagic));
        let bad_version = Message::Hello { magic: MAGIC, version: 99, role: Role::Owner, pid: 1 };
        assert_eq!(bad_version.check_hello(), Err(HandshakeError::Version { theirs: 99 }));
        assert_eq!(Message::Published { request: 1, generation: 1 }.check_hello(), Err(HandshakeError::NotHello));
    }
}
