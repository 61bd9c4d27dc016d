//! The requester's side inside one process: submitting, and delivering completions.
//!
//! Why one completion thread per process rather than a futex wait per request: a request waiting
//! on its own slot's futex needs a thread blocked per request in flight (64 connections → 64
//! blocked threads, or `spawn_blocking` hops) and the holder one wake syscall per request. With
//! one waiter per process, the holder bumps and wakes one futex word per *process* per pass,
//! and the completion thread hands each finished request to its ticket (a tokio waker, or a
//! condvar for blocking callers). The demultiplexing costs a scan of this process's requests in
//! flight, which is cheaper than a syscall per request.
//!
//! The completion thread also *is* the process's registration: it locks the process's entry
//! (a robust mutex) in the lane and holds it until the lane is dropped, so its death is the
//! process's death as far as the lane is concerned, and it unregisters only once no ticket or
//! reply of this process is left.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::{futex_wait, futex_wake_all, Lane, LaneMapError, Outcome, Owner, Region};

/// How long the completion thread sleeps before looking again without a wake (only a lost
/// wake or a stop request would need it; both are handled, so this is a backstop).
const COMPLETION_BACKSTOP: Duration = Duration::from_millis(200);

/// Why a request could not be submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("input of {len} bytes exceeds the lane's {capacity}-byte input capacity: create the lane with a larger input_capacity")]
    TooLarge { len: usize, capacity: usize },
    #[error("all {slots} slots of the lane are in use: shed load (answer 503) or create the lane with more slots")]
    Full { slots: u32 },
    #[error("this process's lane completion thread has stopped: no answer could be delivered; map the lane again")]
    Closed,
    #[error("the lane refused a protocol step ({0}): another process broke the protocol")]
    Protocol(String),
}

/// Why a submitted request has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The service's pass failed it, or recovery gave up on it.
    #[error("the pass failed this request: {0}")]
    Failed(String),
    /// Nothing within the timeout; the request was withdrawn (or, if a pass already took it,
    /// its answer will be discarded).
    #[error("no answer within {0:?}; the request was withdrawn")]
    TimedOut(Duration),
    #[error("the lane reclaimed this request's slot: another process broke the lane protocol")]
    Lost,
    #[error("this process's lane completion thread has stopped; map the lane again")]
    Closed,
}

/// A request in flight, as the completion thread tracks it.
struct Pending {
    /// Where to deliver the outcome; `None` once the ticket was dropped while the request was
    /// already taken: the completion thread then just frees the slot when it finishes.
    cell: Option<Arc<Cell>>,
}

/// One request's outcome, handed from the completion thread to its ticket.
struct Cell {
    state: Mutex<CellState>,
    ready: Condvar,
}

enum CellState {
    Waiting(Option<Waker>),
    /// `Ok(len)`: the slot is `Done` with `len` output bytes and belongs to the ticket.
    Ready(Result<usize, WaitError>),
    Consumed,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical section
    // is a few assignments), so poisoning is ignored.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cell {
    fn new() -> Arc<Cell> {
        Arc::new(Cell { state: Mutex::new(CellState::Waiting(None)), ready: Condvar::new() })
    }

    /// Delivers the outcome; returns the waker to wake (outside every lock).
    fn fill(&self, outcome: Result<usize, WaitError>) -> Option<Waker> {
        let mut state = lock(&self.state);
        let waker = match std::mem::replace(&mut *state, CellState::Ready(outcome)) {
            CellState::Waiting(waker) => waker,
            other => {
                *state = other;
                None
            }
        };
        self.ready.notify_all();
        waker
    }

    fn take_ready(state: &mut CellState) -> Option<Result<usize, WaitError>> {
        match std::mem::replace(state, CellState::Consumed) {
            CellState::Ready(outcome) => Some(outcome),
            other => {
                *state = other;
                None
            }
        }
    }
}

/// Process-local state shared by the lane handle, its tickets and the completion thread.
pub(crate) struct Shared {
    pub(crate) region: Region,
    owner: OnceLock<Owner>,
    pending: Mutex<HashMap<u32, Pending>>,
    stop: AtomicBool,
    /// Cleared when the completion thread ends: nothing can be delivered any more.
    running: AtomicBool,
    /// Where the next claim starts scanning, so processes do not all race for slot 0.
    claim_hint: AtomicU32,
}

/// Owns the completion thread: dropped (and the thread stopped) with the last handle, ticket
/// or reply of this process.
pub(crate) struct Inner {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for Inner {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Shared {
    pub(crate) fn owner(&self) -> Owner {
        *self.owner.get().expect("the completion thread registers before Lane::map returns")
    }

    fn wake_completion_thread(&self) {
        let word = self.region.completions(self.owner().index);
        word.fetch_add(1, Ordering::Release);
        futex_wake_all(word);
    }
}

impl Inner {
    pub(crate) fn start(region: Region) -> Result<Arc<Inner>, LaneMapError> {
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        let shared = Arc::new(Shared {
            region,
            owner: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(true),
            claim_hint: AtomicU32::new(pid.wrapping_mul(0x9E37_79B9)),
        });
        let (registered_tx, registered_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lane-completions".into())
            .spawn(move || {
                let shared = thread_shared;
                let owner = match shared.region.register() {
                    Ok(owner) => owner,
                    Err(e) => {
                        let _ = registered_tx.send(Err(e));
                        return;
                    }
                };
                let _ = shared.owner.set(owner);
                let _ = registered_tx.send(Ok(()));
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| completion_loop(&shared, owner)));
                if result.is_err() {
                    tracing::error!("lane: the completion thread panicked; this process's requests fail until the lane is mapped again");
                    close_all(&shared);
                    // Keep the registration until the lane is dropped: replies still alive
                    // borrow `Done` slots, which a sweep must not reclaim under them.
                    let word = shared.region.completions(owner.index);
                    while !shared.stop.load(Ordering::Acquire) {
                        let seen = word.load(Ordering::Acquire);
                        futex_wait(word, seen, COMPLETION_BACKSTOP);
                    }
                }
                shared.region.unregister(&owner);
            })
            .map_err(LaneMapError::Thread)?;
        let registered = registered_rx.recv().unwrap_or_else(|_| {
            Err(LaneMapError::Thread(std::io::Error::other("the lane completion thread ended before registering")))
        });
        match registered {
            Ok(()) => Ok(Arc::new(Inner { shared, thread: Some(thread) })),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if self.shared.owner.get().is_some() {
            self.shared.wake_completion_thread();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits on this process's completion word and delivers every finished request.
fn completion_loop(shared: &Shared, owner: Owner) {
    let word = shared.region.completions(owner.index);
    let mut wakers = Vec::new();
    loop {
        // Read the word *before* scanning: a completion after the scan changes it, and the
        // futex wait then returns at once instead of sleeping on a finished request.
        let seen = word.load(Ordering::Acquire);
        let stopping = shared.stop.load(Ordering::Acquire);
        {
            let mut pending = lock(&shared.pending);
            pending.retain(|&slot, request| {
                let Some(outcome) = shared.region.outcome(slot, &owner) else { return true };
                deliver(shared, &owner, slot, request, outcome, &mut wakers);
                false
            });
        }
        wakers.drain(..).for_each(Waker::wake);
        if stopping {
            break;
        }
        futex_wait(word, seen, COMPLETION_BACKSTOP);
    }
    close_all(shared);
}

fn deliver(shared: &Shared, owner: &Owner, slot: u32, request: &Pending, outcome: Outcome, wakers: &mut Vec<Waker>) {
    let result = match outcome {
        Outcome::Done(len) => Ok(len),
        Outcome::Failed(reason) => {
            shared.region.collect(slot, owner);
            Err(WaitError::Failed(reason))
        }
        Outcome::Lost => Err(WaitError::Lost),
    };
    match &request.cell {
        Some(cell) => wakers.extend(cell.fill(result)),
        // Its ticket is gone: nobody reads the answer.
        None if result.is_ok() => shared.region.collect(slot, owner),
        None => {}
    }
}

/// Fails every request still in flight with `Closed` (their slots are left to the sweep).
fn close_all(shared: &Shared) {
    shared.running.store(false, Ordering::Release);
    let mut wakers = Vec::new();
    for (_, request) in lock(&shared.pending).drain() {
        if let Some(cell) = request.cell {
            wakers.extend(cell.fill(Err(WaitError::Closed)));
        }
    }
    wakers.into_iter().for_each(Waker::wake);
}

impl Lane {
    /// Queues `input` for the next pass. Never blocks: a full lane is [`SubmitError::Full`].
    /// Await the returned [`Ticket`] (async) or call [`Ticket::wait`] (blocking); dropping it
    /// withdraws the request.
    pub fn submit(&self, input: &[u8]) -> Result<Ticket, SubmitError> {
        self.submit_with(input.len(), |area| area.copy_from_slice(input))
    }

    /// Like [`Lane::submit`], but `fill` writes the `len` input bytes straight into the lane
    /// (no intermediate buffer). If `fill` panics the slot is given back.
    pub fn submit_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<Ticket, SubmitError> {
        let inner = &self.inner;
        let region = &inner.region;
        let capacity = region.layout().input_capacity as usize;
        if len > capacity {
            return Err(SubmitError::TooLarge { len, capacity });
        }
        if !inner.running.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        let owner = inner.owner();
        let start = inner.claim_hint.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = region.claim(&owner, start) else {
            region.count_rejected();
            return Err(SubmitError::Full { slots: region.slots() });
        };

        /// Gives the claimed slot back if `fill` unwinds.
        struct AbortOnUnwind<'a>(&'a Region, u32, &'a Owner, bool);
        impl Drop for AbortOnUnwind<'_> {
            fn drop(&mut self) {
                if self.3 {
                    self.0.abort(self.1, self.2);
                }
            }
        }
        let mut guard = AbortOnUnwind(region, slot, &owner, true);
        let seq = region.write_request(slot, &owner, len, fill);
        guard.3 = false;

        // Tracked before it is visible to runners, so its completion cannot be missed.
        let cell = Cell::new();
        lock(&inner.pending).insert(slot, Pending { cell: Some(cell.clone()) });
        if let Err(e) = region.publish(slot, &owner) {
            lock(&inner.pending).remove(&slot);
            return Err(SubmitError::Protocol(e.to_string()));
        }
        Ok(Ticket { inner: inner.clone(), slot, seq, cell, settled: false })
    }
}

/// A submitted request. `.await` it, or [`Ticket::wait`] for it on a blocking thread; dropping
/// it before the answer withdraws the request (a queued request never runs; a taken one's
/// answer is discarded).
#[must_use = "dropping a ticket withdraws its request"]
pub struct Ticket {
    inner: Arc<Inner>,
    slot: u32,
    seq: u64,
    cell: Arc<Cell>,
    /// The outcome was handed out (as a reply or an error): nothing left to withdraw.
    settled: bool,
}

impl Ticket {
    /// The request's lane-wide sequence number (its place in the FIFO).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot the request occupies.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Blocks until the answer, at most `timeout` (then the request is withdrawn).
    pub fn wait(mut self, timeout: Duration) -> Result<Reply, WaitError> {
        let deadline = Instant::now() + timeout;
        let cell = self.cell.clone();
        let mut state = lock(&cell.state);
        loop {
            if let Some(outcome) = Cell::take_ready(&mut state) {
                drop(state);
                return self.settle(outcome);
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                return Err(WaitError::TimedOut(timeout));
            }
            state = cell.ready.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn settle(&mut self, outcome: Result<usize, WaitError>) -> Result<Reply, WaitError> {
        self.settled = true;
        outcome.map(|len| Reply { inner: self.inner.clone(), slot: self.slot, len })
    }
}

impl Future for Ticket {
    type Output = Result<Reply, WaitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.settled {
            return Poll::Ready(Err(WaitError::Closed));
        }
        let cell = self.cell.clone();
        let mut state = lock(&cell.state);
        if let Some(outcome) = Cell::take_ready(&mut state) {
            drop(state);
            return Poll::Ready(self.settle(outcome));
        }
        if let CellState::Waiting(waker) = &mut *state {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let region = &self.inner.region;
        let mut pending = lock(&self.inner.pending);
        if let Some(request) = pending.get_mut(&self.slot) {
            // Not finished yet: withdraw it if no pass took it; otherwise let the completion
            // thread free the slot when the pass finishes.
            if region.cancel(self.slot, &self.inner.owner()) {
                pending.remove(&self.slot);
            } else {
                request.cell = None;
            }
        } else if let Some(Ok(_)) = Cell::take_ready(&mut lock(&self.cell.state)) {
            // Finished, delivered, never read: the `Done` slot is ours to free.
            region.collect(self.slot, &self.inner.owner());
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("slot", &self.slot).field("seq", &self.seq).finish()
    }
}

/// A request's answer, read in place from the lane (no copy); frees the slot when dropped, so
/// keep it only as long as it takes to answer (or copy it with `to_vec()`).
pub struct Reply {
    inner: Arc<Inner>,
    slot: u32,
    len: usize,
}

impl std::ops::Deref for Reply {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the completion thread saw this slot `Done` with `len` output bytes and handed
        // it to this reply, which alone collects it (on drop). Until then no holder writes the
        // slot (it is not `Taken`) and no sweep reclaims it: this process's registration lives
        // at least as long as `self.inner`.
        unsafe { self.inner.region.output(self.slot, self.len) }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.inner.region.collect(self.slot, &self.inner.owner());
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("slot", &self.slot).field("len", &self.len).finish()
    }
}
