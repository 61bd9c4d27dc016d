//! The bus protocol: the messages exchanged between the supervisor and its children.
//!
//! A connection starts with [`Message::Hello`] from the child (magic, protocol version, role,
//! pid). The supervisor sends [`Message::Welcome`] (or [`Message::Refused`] and closes); both
//! sides check the other's version. After that:
//!
//! ```text
//! owner                                            ← Load{path} (escrow empty) | Adopt{manifest} + fds
//! owner  → Publish{manifest} + one fd per arena    ← Published{generation}      (after Load, or a failed check)
//! owner  → Adopted{generation}                                                   (after Adopt checked out)
//! owner                                            ← Load{path}                 (hot swap, any time later)
//! owner  → Publish{..} | LoadFailed{reason}
//! worker                                           ← Generation{manifest} + one read-only fd per arena (pushed)
//! worker → Ready{generation, attach timing}
//! worker                                           ← Generation{manifest} + fds (hot swap: a newer one)
//! worker → Released{generation}                                                  (old one unused and unmapped)
//! worker → Heartbeat{requests}                                                   (every FORKLESS_HEARTBEAT_MS)
//! ```
//!
//! The supervisor pushes the generation to a worker unasked, right behind the welcome: on the
//! socket a child inherits, both are already queued when the worker starts, so attaching
//! waits for nobody.
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
pub const PROTOCOL_VERSION: u32 = 1;
/// First bytes of every hello, so a stray client is recognised at once.
pub const MAGIC: [u8; 8] = *b"FRKLSBUS";

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
    /// Supervisor → owner: load this weights file into a new arena and publish it (at start
    /// when nothing is in escrow, and for every hot swap).
    Load {
        path: String,
    },
    /// Owner → supervisor: a `Load` failed (the owner keeps running and keeps what it had).
    LoadFailed {
        reason: String,
    },
    /// Supervisor → owner: the generation in escrow (one read-only fd per arena): verify it
    /// (layout hash, arena checksums) and adopt it instead of reading the disk.
    Adopt {
        manifest: Manifest,
    },
    /// Owner → supervisor: the escrowed generation checked out and is adopted.
    Adopted {
        generation: u64,
    },
    /// Owner → supervisor: a new generation; carries one fd per arena.
    Publish {
        manifest: Manifest,
    },
    /// Supervisor → owner: the generation number assigned to what was published.
    Published {
        generation: u64,
    },
    /// Supervisor → worker: the current generation, pushed after the welcome and again at every
    /// hot swap; carries one read-only fd per arena.
    Generation {
        manifest: Manifest,
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
            Message::Publish { manifest } | Message::Generation { manifest } | Message::Adopt { manifest } => {
                manifest.arenas.len()
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
        assert_eq!(Message::Published { generation: 1 }.check_hello(), Err(HandshakeError::NotHello));
    }
}
