//! Bounds on what other processes can make the supervisor hold: open connections on the
//! control and bus sockets, log lines about refused ones, and the descriptor limit itself.
//!
//! ```
//! use forkless_supervisor::limits::{ConnectionSlots, RateLimitedLog};
//! let slots = ConnectionSlots::new(1);
//! let first = slots.admit().unwrap();
//! let second = slots.admit().unwrap(); // the first was idle: it is closed to make room
//! assert!(first.evicted().is_cancelled());
//! second.busy();
//! assert!(slots.admit().is_none(), "no idle connection left to close: the new one is refused");
//! let log = RateLimitedLog::new(std::time::Duration::from_secs(1));
//! assert!(log.admit().is_some());
//! assert!(log.admit().is_none());
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Raises the soft limit on open descriptors to the hard limit (as systemd does for its
/// services), so bursts of connections cannot starve restarts of fds. Returns the limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit).ok()?;
    }
    limit.current
}

/// Connections allowed to be open at once, for a socket whose clients each send one request.
/// When all are taken, the oldest connection that has not yet sent its request (an idle one) is
/// closed to make room, so idle connections can never lock out a real command; when none is
/// idle, the new connection is closed at once.
#[derive(Debug, Clone)]
pub struct ConnectionSlots {
    cap: usize,
    inner: Arc<Mutex<Slots>>,
}

#[derive(Debug, Default)]
struct Slots {
    open: usize,
    next_id: u64,
    /// Connections still waiting for their request, oldest first.
    idle: VecDeque<(u64, CancellationToken)>,
}

/// One admitted connection; frees its slot when dropped.
#[derive(Debug)]
pub struct Admitted {
    id: u64,
    evicted: CancellationToken,
    inner: Arc<Mutex<Slots>>,
}

impl ConnectionSlots {
    pub fn new(cap: usize) -> Self {
        ConnectionSlots { cap: cap.max(1), inner: Arc::default() }
    }

    /// A slot for a new connection (idle until [`Admitted::busy`]), or `None`: close it.
    pub fn admit(&self) -> Option<Admitted> {
        let mut slots = self.inner.lock().expect("slots poisoned");
        if slots.open >= self.cap {
            let (_, oldest) = slots.idle.pop_front()?;
            oldest.cancel();
            slots.open -= 1;
        }
        slots.open += 1;
        slots.next_id += 1;
        let (id, evicted) = (slots.next_id, CancellationToken::new());
        slots.idle.push_back((id, evicted.clone()));
        Some(Admitted { id, evicted, inner: self.inner.clone() })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.lock().expect("slots poisoned").open
    }
}

impl Admitted {
    /// Cancelled when this connection was closed to make room for a newer one.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    /// The request arrived: this connection is working, and is no longer closed for room.
    pub fn busy(&self) {
        self.inner.lock().expect("slots poisoned").idle.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut slots = self.inner.lock().expect("slots poisoned");
        // An evicted connection's slot was already given back when it was evicted.
        if !self.evicted.is_cancelled() {
            slots.open -= 1;
        }
        slots.idle.retain(|(id, _)| *id != self.id);
    }
}

/// At most one log line per period for a kind of event that a stranger can repeat at will
/// (refused connections): 1,000 connects a second must not write a megabyte of log.
#[derive(Debug)]
pub struct RateLimitedLog {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new(period: Duration) -> Self {
        RateLimitedLog { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line may be written now (with how many were left out since the
    /// last one), `None` when this one is to be left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("log limiter poisoned");
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(suppressed)
            }
        }
    }

    /// Logs `message()` as a warning, if this period has not had its line yet.
    pub fn warn(&self, message: impl FnOnce() -> String) {
        match self.admit() {
            Some(0) => tracing::warn!("{}", message()),
            Some(n) => tracing::warn!("{} ({n} more like it since the last such line were not logged)", message()),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_free_up_and_busy_connections_are_never_evicted() {
        let slots = ConnectionSlots::new(2);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        a.busy();
        let c = slots.admit().unwrap();
        assert!(b.evicted().is_cancelled() && !a.evicted().is_cancelled());
        assert_eq!(slots.open(), 2);
        drop(b);
        assert_eq!(slots.open(), 2, "an evicted connection's slot was already counted out");
        c.busy();
        assert!(slots.admit().is_none());
        drop(a);
        assert_eq!(slots.open(), 1);
        assert!(slots.admit().is_some());
    }

    #[test]
    fn the_log_counts_what_it_left_out() {
        let log = RateLimitedLog::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(log.admit_at(start), Some(0));
        for ms in [1, 500, 999] {
            assert_eq!(log.admit_at(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.admit_at(start + Duration::from_millis(1000)), Some(3));
        assert_eq!(log.admit_at(start + Duration::from_millis(2500)), Some(0));
    }
}
