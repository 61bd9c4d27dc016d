//! Per-connection deadlines for the two waits hyper does not bound separately: reading a
//! request's headers and waiting idle between requests. (hyper's own `header_read_timeout`
//! starts as soon as a connection waits for a request, so it also cuts idle keep-alive
//! connections at the same value; here the idle wait and the header read each have their own.)
//!
//! A connection is in one of two phases, tracked by [`ConnClock`]:
//! - waiting for a request: from the accept (header timeout) or from the last response (idle
//!   timeout); the first byte of a request on an idle connection switches to the header timeout;
//! - busy: from the end of the headers until the response is ready. The body has its own
//!   timeout, enforced where it is read (`body.rs`); the handler's time is the service's own.
//!
//! [`DeadlineIo`] wraps the socket: a read or write that would wait past the deadline fails
//! with `TimedOut`, and hyper closes the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::limits::{Alarms, HttpLimits};

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for (the rest of) a request's headers until `deadline`; `idle`: no byte of it yet.
    Waiting {
        deadline: Instant,
        idle: bool,
    },
    Busy,
}

/// The phase of one connection, shared by its socket wrapper and its request handler.
#[derive(Debug)]
pub(crate) struct ConnClock {
    phase: Mutex<Phase>,
    limits: HttpLimits,
    /// The task that last waited on the socket: woken when the deadline moves, because hyper
    /// does not read again after a response until something wakes it.
    waiter: Mutex<Option<std::task::Waker>>,
}

impl ConnClock {
    /// A freshly accepted connection: its first request's headers are due within the header
    /// timeout.
    pub(crate) fn new(limits: HttpLimits) -> Self {
        let deadline = Instant::now() + limits.header_timeout;
        ConnClock { phase: Mutex::new(Phase::Waiting { deadline, idle: false }), limits, waiter: Mutex::new(None) }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().expect("connection clock lock")
    }

    /// The headers of a request are in: no deadline until its response is ready.
    pub(crate) fn busy(&self) {
        *self.phase() = Phase::Busy;
    }

    /// The response is ready: the connection may now sit idle for the idle timeout.
    pub(crate) fn idle(&self) {
        *self.phase() = Phase::Waiting { deadline: Instant::now() + self.limits.idle_timeout, idle: true };
        if let Some(waiter) = self.waiter.lock().expect("connection waker lock").take() {
            waiter.wake();
        }
    }

    /// Bytes arrived: on an idle connection they start a request, whose headers are now due.
    fn bytes_arrived(&self) {
        let mut phase = self.phase();
        if let Phase::Waiting { idle: true, .. } = *phase {
            *phase = Phase::Waiting { deadline: Instant::now() + self.limits.header_timeout, idle: false };
        }
    }

    fn deadline(&self) -> Option<(Instant, bool)> {
        match *self.phase() {
            Phase::Waiting { deadline, idle } => Some((deadline, idle)),
            Phase::Busy => None,
        }
    }
}

/// A socket whose reads and writes fail once the connection's deadline has passed.
pub(crate) struct DeadlineIo<T> {
    inner: T,
    clock: Arc<ConnClock>,
    alarms: Arc<Alarms>,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
}

impl<T> DeadlineIo<T> {
    pub(crate) fn new(inner: T, clock: Arc<ConnClock>, alarms: Arc<Alarms>) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(tokio::time::Instant::now()));
        DeadlineIo { inner, clock, alarms, timer, armed: None }
    }

    /// Called when the socket would wait: `Ready(error)` once the deadline has passed, else
    /// `Pending` with the timer armed to wake this task at the deadline.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        *self.clock.waiter.lock().expect("connection waker lock") = Some(cx.waker().clone());
        loop {
            let Some((deadline, idle)) = self.clock.deadline() else { return Poll::Pending };
            if self.armed != Some(deadline) {
                self.timer.as_mut().reset(deadline.into());
                self.armed = Some(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.clock.deadline() != Some((deadline, idle)) {
                continue; // the phase moved on while the timer ran: arm the new deadline
            }
            let limits = &self.clock.limits;
            return Poll::Ready(if idle {
                let after = limits.idle_timeout;
                self.alarms.idle_timeout.fire(|| format!("closed a keep-alive connection idle for {after:?}"));
                io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
            } else {
                let after = limits.header_timeout;
                self.alarms.header_timeout.fire(|| {
                    format!("closed a connection whose request headers were not complete after {after:?} (a slow or stalled client)")
                });
                io::Error::new(io::ErrorKind::TimedOut, "header timeout")
            });
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.clock.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.poll_deadline(cx).map(Err),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.poll_deadline(cx).map(Err),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.poll_deadline(cx).map(Err),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
