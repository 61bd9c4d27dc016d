//! Frames over a Unix stream socket, with file descriptors passed as `SCM_RIGHTS`.
//!
//! A frame is a little-endian `u32` payload length followed by the payload (see [`crate::codec`]).
//! Frames longer than [`MAX_FRAME_LEN`] are refused before anything is allocated for them.
//!
//! Descriptors are sent in the same `sendmsg` as the first byte of their frame. On a stream
//! socket a plain `read` silently discards ancillary data, so **every read here is a
//! `recvmsg`** (with `MSG_CMSG_CLOEXEC`, and `MSG_CTRUNC` treated as an error). Received fds
//! queue up in arrival order; when a frame is complete it takes exactly
//! [`Message::fd_count`] of them from the front. A frame whose fds did not arrive, or fds that
//! arrive with no frame to claim them, end the connection with an error.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use forkless_bus::{BusStream, Message, Role};
//! let (a, b) = tokio::net::UnixStream::pair().unwrap();
//! let (mut a, mut b) = (BusStream::new(a), BusStream::new(b));
//! a.send(&Message::hello(Role::Worker, 1), &[]).await.unwrap();
//! let (msg, fds) = b.recv().await.unwrap();
//! assert_eq!(msg.kind(), "hello");
//! assert!(fds.is_empty());
//! # });
//! ```

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::codec::{self, CodecError};
use crate::manifest::MAX_ARENAS;
use crate::wire::Message;

/// Runs a non-blocking socket operation at once and waits for readiness only if it would
/// block. Tokio's `async_io` always waits for the reactor first, which costs a thread wake-up
/// (on a busy machine, milliseconds) even when the data is already queued: the usual case for
/// a child reading the welcome and generation queued on its inherited socket. Tokio's
/// readiness stays correct: a later `WouldBlock` inside `async_io` clears it.
async fn io_now_or_when_ready<R>(
    stream: &UnixStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<R>,
) -> io::Result<R> {
    match op() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.async_io(interest, op).await,
        other => other,
    }
}

/// Largest payload a frame may carry (defined beside the decoder, which is bounded by it).
pub use crate::codec::MAX_FRAME_LEN;
const PREFIX: usize = 4;
const READ_CHUNK: usize = 64 * 1024;
/// More queued fds than this means the peer is sending descriptors nobody asked for.
const MAX_QUEUED_FDS: usize = 2 * MAX_FRAME_FDS;
/// Most fds one frame carries: one per arena, and a generation's batch lane.
const MAX_FRAME_FDS: usize = MAX_ARENAS + 1;

/// Failure to send a frame.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("{kind} frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte frame limit")]
    TooLarge { kind: &'static str, len: usize },
    #[error("{kind} message carries {expected} fds but {given} were given")]
    FdCount { kind: &'static str, expected: usize, given: usize },
    #[error("bus socket write failed: {0}")]
    Io(#[from] io::Error),
}

/// Failure to receive a frame. Every variant but `Io` means the peer broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("frame announces {len} bytes, more than the {MAX_FRAME_LEN}-byte limit")]
    TooLarge { len: u32 },
    #[error("malformed frame: {0}")]
    Codec(#[from] CodecError),
    #[error("ancillary data was truncated (MSG_CTRUNC): file descriptors were lost")]
    ControlTruncated,
    #[error("{kind} message needs {expected} fds but {got} arrived")]
    MissingFds { kind: &'static str, expected: usize, got: usize },
    #[error("peer sent {0} file descriptors that no frame claims")]
    UnclaimedFds(usize),
    #[error("bus socket read failed: {0}")]
    Io(#[from] io::Error),
}

/// One frame decoded by [`next_frame`]: the message, and how many bytes and queued fds it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub message: Message,
    /// Bytes of the inbox this frame used (prefix and payload).
    pub bytes: usize,
    /// Queued descriptors that belong to it, from the front of the queue.
    pub fds: usize,
}

/// The receiving side's rules, without a socket (so they can be fuzzed): given the bytes
/// received so far and how many descriptors are queued, the next complete frame, `None` if
/// more bytes are needed, or why the peer broke the protocol. A frame without its fds, or fds
/// left over once every byte is consumed, are errors: descriptors are never guessed at.
pub fn next_frame(inbox: &[u8], queued_fds: usize) -> Result<Option<Frame>, RecvError> {
    let Some(prefix) = inbox.first_chunk::<PREFIX>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*prefix);
    if len > MAX_FRAME_LEN {
        return Err(RecvError::TooLarge { len });
    }
    let end = PREFIX + len as usize;
    let Some(payload) = inbox.get(PREFIX..end) else {
        return Ok(None);
    };
    let message: Message = codec::decode(payload)?;
    let expected = message.fd_count();
    if queued_fds < expected {
        return Err(RecvError::MissingFds { kind: message.kind(), expected, got: queued_fds });
    }
    if end == inbox.len() && queued_fds > expected {
        return Err(RecvError::UnclaimedFds(queued_fds - expected));
    }
    Ok(Some(Frame { message, bytes: end, fds: expected }))
}

/// One end of a bus connection.
#[derive(Debug)]
pub struct BusStream {
    stream: UnixStream,
    inbox: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    chunk: Box<[u8]>,
}

impl BusStream {
    /// Wraps a connected socket.
    pub fn new(stream: UnixStream) -> Self {
        BusStream { stream, inbox: Vec::new(), fds: VecDeque::new(), chunk: vec![0; READ_CHUNK].into_boxed_slice() }
    }

    /// Wraps a connected std socket (e.g. one end of a socketpair); must be inside a runtime.
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self::new(UnixStream::from_std(stream)?))
    }

    /// Connects to a bus socket at `path`.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        Ok(Self::new(UnixStream::connect(path).await?))
    }

    /// Credentials of the peer process (`SO_PEERCRED`).
    pub fn peer_cred(&self) -> io::Result<tokio::net::unix::UCred> {
        self.stream.peer_cred()
    }

    /// Sends `msg` with exactly `msg.fd_count()` descriptors.
    pub async fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
        let kind = msg.kind();
        if fds.len() != msg.fd_count() {
            return Err(SendError::FdCount { kind, expected: msg.fd_count(), given: fds.len() });
        }
        let payload = codec::encode(msg)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len <= MAX_FRAME_LEN)
            .ok_or(SendError::TooLarge { kind, len: payload.len() })?;
        let mut frame = Vec::with_capacity(PREFIX + payload.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&payload);
        self.send_frame(&frame, fds).await
    }

    /// Writes the whole frame; the fds go with the first `sendmsg`, which always carries at
    /// least one byte, so they are attached to this frame's first byte.
    async fn send_frame(&self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FRAME_FDS))];
        let mut sent = 0;
        while sent < frame.len() {
            let with_fds = sent == 0 && !fds.is_empty();
            let n = io_now_or_when_ready(&self.stream, Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if with_fds && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("too many fds for one frame"));
                }
                let iov = [IoSlice::new(&frame[sent..])];
                Ok(rustix::net::sendmsg(&self.stream, &iov, &mut control, SendFlags::NOSIGNAL)?)
            })
            .await?;
            sent += n;
        }
        Ok(())
    }

    /// Receives the next message and the descriptors that came with it.
    pub async fn recv(&mut self) -> Result<(Message, Vec<OwnedFd>), RecvError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// Decodes one complete frame from the inbox, if there is one.
    fn take_frame(&mut self) -> Result<Option<(Message, Vec<OwnedFd>)>, RecvError> {
        let Some(frame) = next_frame(&self.inbox, self.fds.len())? else {
            return Ok(None);
        };
        self.inbox.drain(..frame.bytes);
        let fds: Vec<OwnedFd> = self.fds.drain(..frame.fds).collect();
        Ok(Some((frame.message, fds)))
    }

    /// One `recvmsg`: bytes go to the inbox, descriptors to the fd queue.
    async fn read_more(&mut self) -> Result<(), RecvError> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FRAME_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let (stream, chunk) = (&self.stream, &mut self.chunk);
        let received = io_now_or_when_ready(stream, Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(chunk)];
            Ok(rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?)
        })
        .await?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                self.fds.extend(fds);
            }
        }
        if received.flags.contains(ReturnFlags::CTRUNC) {
            return Err(RecvError::ControlTruncated);
        }
        if self.fds.len() > MAX_QUEUED_FDS {
            return Err(RecvError::UnclaimedFds(self.fds.len()));
        }
        if received.bytes == 0 {
            return Err(if self.inbox.is_empty() { RecvError::Closed } else { RecvError::Truncated });
        }
        self.inbox.extend_from_slice(&self.chunk[..received.bytes]);
        Ok(())
    }

    /// Writes raw bytes, bypassing framing: only for tests of the receiving side.
    #[doc(hidden)]
    pub async fn send_raw_for_tests(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Dtype, LayoutBuilder, Manifest};
    use crate::wire::Role;
    use proptest::prelude::*;
    use std::os::fd::AsFd;

    fn pair() -> (BusStream, BusStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (BusStream::new(a), BusStream::new(b))
    }

    fn manifest() -> Manifest {
        let mut layout = LayoutBuilder::default();
        layout.push("w", Dtype::F32, vec![4]);
        let (arena, tensors) = layout.finish();
        Manifest::new("x".into(), vec![arena], tensors)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn passes_fds_with_their_frame() {
        rt().block_on(async {
            let (mut a, mut b) = pair();
            let file = tempfile::tempfile().unwrap();
            let msg = Message::Publish { request: 1, manifest: manifest() };
            a.send(&Message::Published { request: 1, generation: 5 }, &[]).await.unwrap();
            a.send(&msg, &[file.as_fd()]).await.unwrap();
            a.send(&Message::Published { request: 1, generation: 5 }, &[]).await.unwrap();
            assert_eq!(b.recv().await.unwrap().1.len(), 0);
            let (got, fds) = b.recv().await.unwrap();
            assert_eq!(got, msg);
            assert_eq!(fds.len(), 1);
            let here = rustix::fs::fstat(&fds[0]).unwrap();
            let there = rustix::fs::fstat(&file).unwrap();
            assert_eq!((here.st_dev, here.st_ino), (there.st_dev, there.st_ino));
            let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "received fds are close-on-exec");
            assert_eq!(b.recv().await.unwrap().0, Message::Published { request: 1, generation: 5 });
        });
    }

    #[test]
    fn refuses_wrong_fd_count_on_send() {
        rt().block_on(async {
            let (mut a, _b) = pair();
            let err = a.send(&Message::Publish { request: 1, manifest: manifest() }, &[]).await.unwrap_err();
            assert!(matches!(err, SendError::FdCount { expected: 1, given: 0, .. }));
        });
    }

    #[test]
    fn frame_without_its_fds_is_refused() {
        rt().block_on(async {
            let (mut a, mut b) = pair();
            let payload = codec::encode(&Message::Publish { request: 1, manifest: manifest() }).unwrap();
            let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
            frame.extend(payload);
            a.send_raw_for_tests(&frame).await.unwrap();
            assert!(matches!(b.recv().await, Err(RecvError::MissingFds { expected: 1, got: 0, .. })));
        });
    }

    #[test]
    fn unclaimed_fds_are_refused() {
        rt().block_on(async {
            let (a, mut b) = pair();
            let file = tempfile::tempfile().unwrap();
            let frame = {
                let payload = codec::encode(&Message::Published { request: 1, generation: 5 }).unwrap();
                let mut f = (payload.len() as u32).to_le_bytes().to_vec();
                f.extend(payload);
                f
            };
            a.send_frame(&frame, &[file.as_fd()]).await.unwrap();
            assert!(matches!(b.recv().await, Err(RecvError::UnclaimedFds(1))));
        });
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        rt().block_on(async {
            let (mut a, mut b) = pair();
            a.send_raw_for_tests(&(MAX_FRAME_LEN + 1).to_le_bytes()).await.unwrap();
            assert!(matches!(b.recv().await, Err(RecvError::TooLarge { .. })));
        });
    }

    #[test]
    fn eof_mid_frame_is_truncated_and_eof_between_frames_is_closed() {
        rt().block_on(async {
            let (mut a, mut b) = pair();
            a.send_raw_for_tests(&[10, 0, 0, 0, 1]).await.unwrap();
            drop(a);
            assert!(matches!(b.recv().await, Err(RecvError::Truncated)));
            let (a, mut b) = pair();
            drop(a);
            assert!(matches!(b.recv().await, Err(RecvError::Closed)));
        });
    }

    #[test]
    fn large_manifest_round_trips_across_many_reads() {
        rt().block_on(async {
            let (mut a, mut b) = pair();
            let mut layout = LayoutBuilder::default();
            for i in 0..5000 {
                layout.push(format!("layer.{i}.weight"), Dtype::BF16, vec![8, 8]);
            }
            let (arena, tensors) = layout.finish();
            let m = Manifest::new("big".into(), vec![arena], tensors);
            let file = tempfile::tempfile().unwrap();
            let msg = Message::Generation { manifest: m, lane: None };
            let sender = async { a.send(&msg, &[file.as_fd()]).await.unwrap() };
            let (_, received) = tokio::join!(sender, b.recv());
            assert_eq!(received.unwrap().0, msg);
        });
    }

    proptest! {
        /// Arbitrary bytes on the wire never panic the reader: each stream ends in a clean
        /// message sequence or an error.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            rt().block_on(async {
                let (mut a, mut b) = pair();
                a.send_raw_for_tests(&bytes).await.unwrap();
                drop(a);
                for _ in 0..bytes.len() + 1 {
                    if b.recv().await.is_err() {
                        break;
                    }
                }
            });
        }

        /// Any message round-trips through a frame unchanged.
        #[test]
        fn hello_round_trips(pid in any::<u32>(), owner in any::<bool>()) {
            rt().block_on(async {
                let (mut a, mut b) = pair();
                let role = if owner { Role::Owner } else { Role::Worker };
                let msg = Message::hello(role, pid);
                a.send(&msg, &[]).await.unwrap();
                assert_eq!(b.recv().await.unwrap().0, msg);
            });
        }
    }
}
