//! The batch lane: one queue in shared memory through which the requests of **every** worker
//! process of a generation on one device join **one** pass over the weights.
//!
//! Without it each worker batches alone and N workers time-slice the GPU, so throughput falls
//! as workers are added. With it a worker's HTTP task submits its input into the lane and
//! awaits the output; whichever worker holds the lane's *lease* takes the queued requests of
//! all workers, runs one pass (the service's own function), writes the outputs into the lane
//! and wakes each request's own process, which answers its own connection. No hop through the
//! supervisor or a server process, and no single point of failure: any worker can hold the
//! lease, and when the holder dies the next one takes over within a futex wake.
//! `docs/LANE.md` is the design note; this module is the protocol, and reads top to bottom.
//!
//! # Layout
//!
//! One memfd, created and initialised by the supervisor before anyone else sees it
//! ([`Lane::create`]), sealed against resizing (`F_SEAL_SHRINK | F_SEAL_GROW`, so a mapping can
//! never SIGBUS) but writable: every worker maps it read-write ([`Lane::map`]). It never holds
//! weights. Offsets are multiples of 64 (a cache line):
//!
//! ```text
//! header    magic, version, sizes | lease (robust pthread mutex) | epoch, leader pid,
//!           work futex, next sequence number, next incarnation | counters and histograms
//! processes `processes` × { robust mutex held by the process while it lives, incarnation,
//!           pid, completion futex }
//! slots     `slots` × { state word (futex), owner (process index, incarnation, pid), sequence,
//!           submission time, crash count, lengths, failure reason | input area | output area }
//! ```
//!
//! Every mapper validates the header against the fd's real size before touching a slot, reads
//! the sizes **once**, and from then on bounds every length read from shared memory by them:
//! a corrupt or hostile header cannot make this process read or write outside its mapping.
//!
//! # States of a slot
//!
//! One `u32` word per slot holds the state ([`SlotState`]); every change is one
//! compare-and-swap through [`transition`], so two processes can never both make a move from
//! the same state. The word also names its requester (process index and incarnation tag)
//! while the requester owns the slot, and the holder's epoch while a request is taken: a
//! liveness check and the CAS that acts on it always see the same requester, and a requester
//! can move only its own slots.
//!
//! ```text
//!  Free ─Claim─▶ Claimed(r) ─Publish─▶ Queued(r) ─Take(e)─▶ Taken(e) ─Complete(e)─▶ Done(r)
//!                    │                    │  ▲                 │  │
//!                  Abort               Cancel └─── Requeue ────┘  └─ Fail(e), GiveUp ─▶ Failed(r)
//!                    ▼                    ▼  (holder of e gone)
//!                   Free                 Free
//!
//!  Done(r), Failed(r) ─Collect (r read the answer)─▶ Free
//!  any state but Free and Taken(current epoch) ─Reclaim (r is dead)─▶ Free
//! ```
//!
//! Memory ordering: a successful CAS is `AcqRel`. The writer of a slot's contents (the
//! requester before `Publish`, the holder before `Complete`/`Fail`) stores them first and
//! publishes them with the CAS's release; the next actor's CAS (or `Acquire` load) of that
//! word acquires them. Nobody writes a slot's contents in a state they do not own: input only
//! in `Claimed` (requester), output only in `Taken(e)` (the holder of epoch `e`).
//!
//! # The lease, and crash detection
//!
//! The lease is a **robust, process-shared pthread mutex** in the header. Whoever holds it runs
//! passes; it keeps it while there is work (a sticky leader: the GPU is not handed between
//! processes every pass) and lets go after an idle period; every other runner waits in
//! `pthread_mutex_timedlock`. When a holder dies, even by SIGKILL, the kernel's robust-list
//! processing marks the mutex `OWNER_DIED` and wakes one waiter, which gets `EOWNERDEAD`:
//! no heartbeat, no polling, no timeout decides that a holder is dead.
//!
//! Each process that maps the lane also **registers**: its completion thread locks one of the
//! process table's robust mutexes for as long as the process lives and writes a fresh
//! incarnation number (unique for the lane's lifetime) beside it. Whether the requester of a
//! slot is alive is then one `pthread_mutex_trylock`, in user space: `EBUSY` with the same
//! incarnation means alive; `EOWNERDEAD`, a free entry or another incarnation means the process
//! that submitted it is gone. Pids are kept for people only; pid reuse cannot fool this.
//! Only "alive" verdicts are cached, and only for one sweep or pass: a "dead" verdict is always
//! a fresh probe, because an entry found free may be registered by a new process a moment later.
//!
//! The kernel marks a dead thread's robust mutexes only where they are still mapped: a thread
//! must never unmap the lane while it holds the lease or its registration. The borrows of
//! [`Lane::run_passes`] and the completion thread's ownership of the mapping guarantee it.
//!
//! # Recovery
//!
//! Every lease acquisition starts a new **epoch** and sweeps the slots (`Region::sweep_slot`):
//! - `Taken(e)` with `e` older: taken by a holder that is gone (it died, or panicked out of a
//!   pass). It goes back to the queue (`Requeue`) keeping its sequence number, so it is served
//!   first; after `max_crashes` holders died holding it, it fails instead (`GiveUp`), so one
//!   poisonous request cannot kill every worker in turn;
//! - any slot of a dead requester (claimed, queued, taken, done, failed but never collected)
//!   is freed (`Reclaim`): the lane cannot fill up with garbage. The holder sweeps again every
//!   `sweep_interval` while it keeps the lease, and skips queued requests of dead requesters.
//!
//! **A request never runs twice to completion**: `Done` and `Failed` are reached only by a CAS
//! from `Taken(e)` made by the holder of epoch `e`. After a holder is gone no CAS of its can
//! succeed (it is dead, or it finished its pass before letting go of the lease), and the slot
//! left `Taken(e)` the moment it was requeued, so its completion can be reached once. Outputs a
//! dead holder wrote partially are overwritten by the next holder before its `Complete`. A
//! request may *start* again after its holder died: a pass must not have side effects that
//! matter beyond its outputs.
//!
//! # Trust
//!
//! A worker is trusted with the lane: a process that ignores the protocol can corrupt other
//! workers' requests and answers, or the mutexes (whose robust-list links other processes
//! follow). It can never reach the weights (a separate, sealed, read-only mapping), and it
//! cannot make another process access memory outside its lane mapping.
//!
//! # Using it
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use std::time::Duration;
//! use forkless_bus::lane::{Lane, LaneLayout, RunnerConfig};
//!
//! // Supervisor: create once per generation and device, hand `fd` out beside the arena fds.
//! let created = Lane::create("doc-lane", LaneLayout::new(64, 256, 256)).unwrap();
//! // A worker: map it (validates), run passes on the thread that owns the engine...
//! let lane = Lane::map(created.try_clone_fd().unwrap()).unwrap();
//! let stop = AtomicBool::new(false);
//! std::thread::scope(|s| {
//!     let runner = s.spawn(|| {
//!         lane.run_passes(&stop, &RunnerConfig::default(), |batch| {
//!             for i in 0..batch.len() {
//!                 let doubled: Vec<u8> = batch.input(i).iter().map(|b| b * 2).collect();
//!                 batch.set_output(i, &doubled).unwrap();
//!             }
//!         })
//!     });
//!     // ...and submit from anywhere (`.await` the ticket in async code).
//!     let reply = lane.submit(&[1, 2, 3]).unwrap().wait(Duration::from_secs(10)).unwrap();
//!     assert_eq!(&*reply, &[2, 4, 6]);
//!     stop.store(true, std::sync::atomic::Ordering::Release);
//!     runner.join().unwrap().unwrap();
//! });
//! assert_eq!(lane.stats().served, 1);
//! ```

use std::cell::UnsafeCell;
use std::mem::{align_of, size_of, MaybeUninit};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::SealFlags;
use rustix::io::Errno;
use rustix::thread::futex;

pub mod batcher;
mod client;
mod runner;
#[cfg(test)]
mod tests;

pub use client::{Reply, SubmitError, Ticket, WaitError};
pub use runner::{Batch, OutputTooLarge, RunError, RunnerConfig, RunnerReport, StopSignal};

/// Environment variable with the number of the inherited lane fd a worker maps (unset: no lane,
/// each worker batches alone).
pub const ENV_LANE_FD: &str = "FORKLESS_LANE_FD";

/// `b"FKLANE"` and a byte order mark: a wrong fd or an uninitialised memfd is refused.
const MAGIC: u64 = u64::from_le_bytes(*b"FKLANE\x01\x02");
/// Bumped on every change of the layout or of the protocol's meaning.
pub const VERSION: u32 = 1;
/// Most slots a lane may have.
pub const MAX_SLOTS: u32 = 1 << 16;
/// Most processes that can be registered at once (the claimant's index has 8 bits in the
/// state word).
pub const MAX_PROCESSES: u32 = 256;
/// Largest input or output area of one slot.
pub const MAX_AREA: u32 = 64 << 20;
/// Bytes of a failure reason kept in the slot (longer reasons are cut at a char boundary).
pub const REASON_CAPACITY: usize = 64;
/// Batch-size histogram buckets: 1, 2, 3–4, 5–8, …, 257–512, and more.
pub const BATCH_BUCKETS: usize = 11;
/// Processes-per-pass histogram buckets: 1, 2, …, 15, and 16 or more.
pub const PROCESS_BUCKETS: usize = 16;

const LINE: usize = 64;
const PAGE: usize = 4096;
/// The epoch kept in a `Taken` state word (24 bits). Epochs are compared for equality only, and
/// every acquisition sweeps away every `Taken` slot of an older epoch, so wrapping is harmless.
const EPOCH_MASK: u32 = 0x00FF_FFFF;

// ---------------------------------------------------------------------------------------------
// Shared-memory structures. All fields are atomics (or bytes behind `UnsafeCell`): any bit
// pattern is a valid value, and another process writing one concurrently is a defined race.
// ---------------------------------------------------------------------------------------------

/// Room for one `pthread_mutex_t` (40 bytes on x86-64 glibc, 48 on aarch64), on its own line.
#[repr(C, align(64))]
struct SharedMutex(UnsafeCell<[u8; 64]>);

const _: () = assert!(size_of::<libc::pthread_mutex_t>() <= size_of::<SharedMutex>());
const _: () = assert!(align_of::<libc::pthread_mutex_t>() <= align_of::<SharedMutex>());

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    mutex_size: AtomicU32,
    slots: AtomicU32,
    processes: AtomicU32,
    input_capacity: AtomicU32,
    output_capacity: AtomicU32,
    total_size: AtomicU64,
    /// `CLOCK_MONOTONIC` ns at which the last runner that took over from a dead one started
    /// its first pass: how fast a pass runner's death is repaired, measurable from outside.
    takeover_pass_ns: AtomicU64,
    /// Nanoseconds spent inside the service's pass function, over all passes: with `passes`,
    /// the mean pass time (how much of the lane's time the GPU work takes).
    pass_ns: AtomicU64,
    _reserved: [AtomicU64; 1],
    /// The lease: held by the process running passes.
    lease: SharedMutex,
    /// Bumped by every lease acquisition; `Taken` words carry its low 24 bits.
    epoch: AtomicU32,
    /// Pid of the last lease holder (for status and for chaos to aim at).
    leader_pid: AtomicU32,
    /// Futex word bumped by every submission; runners wait on it.
    work: AtomicU32,
    /// Runners waiting on `work`: submitters skip the wake syscall when there are none.
    work_waiters: AtomicU32,
    next_seq: AtomicU64,
    next_incarnation: AtomicU64,
    stats: StatWords,
}

#[repr(C)]
struct StatWords {
    passes: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    submitted: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    acquisitions: AtomicU64,
    recoveries: AtomicU64,
    requeued: AtomicU64,
    gave_up: AtomicU64,
    reclaimed: AtomicU64,
    requester_deaths: AtomicU64,
    batch_sizes: [AtomicU64; BATCH_BUCKETS],
    processes_per_pass: [AtomicU64; PROCESS_BUCKETS],
}

/// One registered process.
#[repr(C, align(64))]
struct ProcEntry {
    /// Held by the process's completion thread for as long as it lives.
    lock: SharedMutex,
    /// Unique per registration; 0 while free.
    incarnation: AtomicU64,
    pid: AtomicU32,
    /// Futex word bumped by a holder after a pass completed requests of this process.
    completions: AtomicU32,
}

/// The fixed part of a slot; the input and output areas follow it.
#[repr(C, align(64))]
struct SlotMeta {
    state: AtomicU32,
    /// Process table index of the requester.
    owner: AtomicU32,
    pid: AtomicU32,
    /// Holders that died (or panicked) with this request taken.
    crashes: AtomicU32,
    incarnation: AtomicU64,
    seq: AtomicU64,
    submitted_ns: AtomicU64,
    taken_epoch: AtomicU32,
    input_len: AtomicU32,
    output_len: AtomicU32,
    reason_len: AtomicU32,
    reason: [AtomicU8; REASON_CAPACITY],
}

const HEADER_SIZE: usize = round_up(size_of::<Header>(), LINE);
const ENTRY_SIZE: usize = size_of::<ProcEntry>();
const META_SIZE: usize = size_of::<SlotMeta>();

const fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

// ---------------------------------------------------------------------------------------------
// Layout.
// ---------------------------------------------------------------------------------------------

/// The sizes of a lane, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaneLayout {
    /// Requests in flight at once, across all processes (queued, running or awaiting
    /// collection). A submission finding none free fails with [`SubmitError::Full`].
    pub slots: u32,
    /// Largest input of one request, in bytes.
    pub input_capacity: u32,
    /// Largest output of one request, in bytes.
    pub output_capacity: u32,
    /// Processes that can map the lane at once (workers, plus any monitor that registers).
    pub processes: u32,
}

impl LaneLayout {
    /// A layout for up to 64 processes.
    pub fn new(slots: u32, input_capacity: u32, output_capacity: u32) -> Self {
        LaneLayout { slots, input_capacity, output_capacity, processes: 64 }
    }

    /// The memfd size this layout needs, after validating it.
    pub fn size(&self) -> Result<u64, LayoutError> {
        Ok(Geometry::of(*self)?.total as u64)
    }
}

/// A layout that cannot be created or mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("a lane needs between 1 and {MAX_SLOTS} slots, not {0}")]
    Slots(u32),
    #[error("a lane needs between 1 and {MAX_PROCESSES} process entries, not {0}")]
    Processes(u32),
    #[error("input and output areas must hold between 1 and {MAX_AREA} bytes (input {input}, output {output})")]
    Capacity { input: u32, output: u32 },
}

/// Where everything is, computed from a validated layout; never re-read from shared memory.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    layout: LaneLayout,
    procs_offset: usize,
    slots_offset: usize,
    slot_stride: usize,
    input_offset: usize,
    output_offset: usize,
    total: usize,
}

impl Geometry {
    fn of(layout: LaneLayout) -> Result<Geometry, LayoutError> {
        if layout.slots == 0 || layout.slots > MAX_SLOTS {
            return Err(LayoutError::Slots(layout.slots));
        }
        if layout.processes == 0 || layout.processes > MAX_PROCESSES {
            return Err(LayoutError::Processes(layout.processes));
        }
        let area_ok = |n: u32| (1..=MAX_AREA).contains(&n);
        if !area_ok(layout.input_capacity) || !area_ok(layout.output_capacity) {
            return Err(LayoutError::Capacity { input: layout.input_capacity, output: layout.output_capacity });
        }
        // Bounded above (65536 × 2 × 64 MiB = 8 TiB < usize::MAX on 64-bit), so no overflow.
        let input = round_up(layout.input_capacity as usize, LINE);
        let output = round_up(layout.output_capacity as usize, LINE);
        let procs_offset = HEADER_SIZE;
        let slots_offset = round_up(procs_offset + layout.processes as usize * ENTRY_SIZE, PAGE);
        let slot_stride = META_SIZE + input + output;
        let total = round_up(slots_offset + layout.slots as usize * slot_stride, PAGE);
        Ok(Geometry {
            layout,
            procs_offset,
            slots_offset,
            slot_stride,
            input_offset: META_SIZE,
            output_offset: META_SIZE + input,
            total,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The state machine.
// ---------------------------------------------------------------------------------------------

/// Who a slot belongs to, as its state word says: the requester's process table index and the
/// low 16 bits of its incarnation. In the word itself, so a liveness check and the CAS that
/// acts on it see the same requester (no torn read of separate words, no ABA across requests
/// of different processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Requester {
    pub index: u8,
    pub tag: u16,
}

/// The state of one slot, as encoded in its `u32` state word: the low 8 bits are the tag, the
/// upper 24 bits a payload: the requester while it owns the slot, the epoch while a holder has
/// taken it (the requester is then in the slot's fields, which nobody but the holder changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Nobody's: a requester may claim it.
    Free,
    /// The requester is writing its input.
    Claimed(Requester),
    /// Waiting for a pass.
    Queued(Requester),
    /// In the pass of the holder of `epoch` (24 bits).
    Taken { epoch: u32 },
    /// The output is written; the requester may read it.
    Done(Requester),
    /// The pass (or recovery) failed it; the reason is in the slot.
    Failed(Requester),
}

const TAG_FREE: u32 = 0;
const TAG_CLAIMED: u32 = 1;
const TAG_QUEUED: u32 = 2;
const TAG_TAKEN: u32 = 3;
const TAG_DONE: u32 = 4;
const TAG_FAILED: u32 = 5;

impl Requester {
    fn payload(self) -> u32 {
        (self.index as u32) << 8 | (self.tag as u32) << 16
    }

    fn from_payload(word: u32) -> Requester {
        Requester { index: (word >> 8) as u8, tag: (word >> 16) as u16 }
    }
}

impl SlotState {
    /// The state word.
    pub fn encode(self) -> u32 {
        match self {
            SlotState::Free => TAG_FREE,
            SlotState::Claimed(r) => TAG_CLAIMED | r.payload(),
            SlotState::Queued(r) => TAG_QUEUED | r.payload(),
            SlotState::Taken { epoch } => TAG_TAKEN | (epoch & EPOCH_MASK) << 8,
            SlotState::Done(r) => TAG_DONE | r.payload(),
            SlotState::Failed(r) => TAG_FAILED | r.payload(),
        }
    }

    /// Reads a state word; `None` for a word no protocol step writes (a corrupt slot).
    pub fn decode(word: u32) -> Option<SlotState> {
        let requester = Requester::from_payload(word);
        match word & 0xFF {
            TAG_FREE if word == TAG_FREE => Some(SlotState::Free),
            TAG_CLAIMED => Some(SlotState::Claimed(requester)),
            TAG_QUEUED => Some(SlotState::Queued(requester)),
            TAG_TAKEN => Some(SlotState::Taken { epoch: word >> 8 }),
            TAG_DONE => Some(SlotState::Done(requester)),
            TAG_FAILED => Some(SlotState::Failed(requester)),
            _ => None,
        }
    }

    /// The requester named in the word (`None` while free or taken).
    pub fn requester(self) -> Option<Requester> {
        match self {
            SlotState::Claimed(r) | SlotState::Queued(r) | SlotState::Done(r) | SlotState::Failed(r) => Some(r),
            SlotState::Free | SlotState::Taken { .. } => None,
        }
    }
}

/// A move of the protocol. `by` is the requester making a requester's move (it may move only
/// its own slots); `of` is the requester a holder's move hands the slot back to (read from the
/// slot's fields, stable while taken). Epochs are the 24-bit ones of [`SlotState::Taken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Requester: takes a free slot to write its request into.
    Claim { by: Requester },
    /// Requester: the input is written; runners may take it.
    Publish { by: Requester },
    /// Requester: gives back a claimed slot without publishing (writing the input failed).
    Abort { by: Requester },
    /// Requester: withdraws a request nobody has taken yet (its waiter gave up).
    Cancel { by: Requester },
    /// Holder of `epoch`: takes a queued request into its pass.
    Take { epoch: u32 },
    /// Holder of `epoch`: its pass answered the request of `of`.
    Complete { epoch: u32, of: Requester },
    /// Holder of `epoch`: its pass failed the request of `of`.
    Fail { epoch: u32, of: Requester },
    /// Holder of `current`: a request taken by an earlier holder, now gone, is queued again.
    Requeue { current: u32, of: Requester },
    /// Holder of `current`: a request taken by earlier holders that all died fails for good.
    GiveUp { current: u32, of: Requester },
    /// Holder of `current`: the requester is dead; its slot is freed whatever it held.
    Reclaim { current: u32 },
    /// Requester: has read the answer (or the failure) and frees the slot.
    Collect { by: Requester },
}

/// A move the protocol does not allow from that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal lane transition: {event:?} from {from:?}")]
pub struct IllegalTransition {
    pub from: SlotState,
    pub event: Event,
}

/// The protocol: the state a slot moves to on `event`, or why it cannot.
pub fn transition(from: SlotState, event: Event) -> Result<SlotState, IllegalTransition> {
    use Event as E;
    use SlotState as S;
    let older = |epoch: u32, current: u32| epoch & EPOCH_MASK != current & EPOCH_MASK;
    let to = match (from, event) {
        (S::Free, E::Claim { by }) => S::Claimed(by),
        (S::Claimed(r), E::Publish { by }) if r == by => S::Queued(r),
        (S::Claimed(r), E::Abort { by }) if r == by => S::Free,
        (S::Queued(r), E::Cancel { by }) if r == by => S::Free,
        (S::Queued(_), E::Take { epoch }) => S::Taken { epoch: epoch & EPOCH_MASK },
        (S::Taken { epoch }, E::Complete { epoch: by, of }) if !older(epoch, by) => S::Done(of),
        (S::Taken { epoch }, E::Fail { epoch: by, of }) if !older(epoch, by) => S::Failed(of),
        (S::Taken { epoch }, E::Requeue { current, of }) if older(epoch, current) => S::Queued(of),
        (S::Taken { epoch }, E::GiveUp { current, of }) if older(epoch, current) => S::Failed(of),
        (S::Taken { epoch }, E::Reclaim { current }) if older(epoch, current) => S::Free,
        (S::Claimed(_) | S::Queued(_) | S::Done(_) | S::Failed(_), E::Reclaim { .. }) => S::Free,
        (S::Done(r) | S::Failed(r), E::Collect { by }) if r == by => S::Free,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

/// Why a move on a slot did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MoveError {
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The word changed under us (another actor moved first), or was never `expected`.
    #[error("slot state changed concurrently (found word {found:#x})")]
    Raced { found: u32 },
    #[error("slot state word {0:#x} is not a state: the lane is corrupt")]
    Corrupt(u32),
}

// ---------------------------------------------------------------------------------------------
// Robust, process-shared mutexes.
// ---------------------------------------------------------------------------------------------

/// A successful lock: `OwnerDied` means the previous holder died holding it; the new holder
/// must repair what it protected and call [`SharedMutex::make_consistent`] before unlocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locked {
    Acquired,
    OwnerDied,
}

impl SharedMutex {
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.0.get().cast()
    }

    /// Initialises a robust, process-shared mutex.
    ///
    /// # Safety
    /// Nobody else may use the mutex during the call: only [`Lane::create`] calls it, on a memfd
    /// no other process or thread has yet.
    unsafe fn init(&self) -> Result<(), Errno> {
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        let check = |rc: i32| if rc == 0 { Ok(()) } else { Err(Errno::from_raw_os_error(rc)) };
        // SAFETY: `attr` is initialised by pthread_mutexattr_init before any other use and
        // destroyed after; `self.raw()` points to 64 writable, aligned bytes of our mapping that
        // nobody else uses yet (the caller's contract).
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let result = check(libc::pthread_mutexattr_setpshared(attr.as_mut_ptr(), libc::PTHREAD_PROCESS_SHARED))
                .and_then(|()| check(libc::pthread_mutexattr_setrobust(attr.as_mut_ptr(), libc::PTHREAD_MUTEX_ROBUST)))
                .and_then(|()| check(libc::pthread_mutex_init(self.raw(), attr.as_ptr())));
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            result
        }
    }

    /// `pthread_mutex_trylock`: `None` when another live thread holds it. User space only.
    fn try_lock(&self) -> Result<Option<Locked>, Errno> {
        // SAFETY: the mutex lives in our mapping for as long as `self` is borrowed, and was
        // initialised as robust and process-shared by the lane's creator (a corrupted one is
        // the documented trust model: workers are trusted with the lane).
        let rc = unsafe { libc::pthread_mutex_trylock(self.raw()) };
        match rc {
            0 => Ok(Some(Locked::Acquired)),
            libc::EOWNERDEAD => Ok(Some(Locked::OwnerDied)),
            libc::EBUSY => Ok(None),
            rc => Err(Errno::from_raw_os_error(rc)),
        }
    }

    /// `pthread_mutex_timedlock` until `deadline` (CLOCK_REALTIME): `None` on timeout.
    fn lock_until(&self, deadline: &libc::timespec) -> Result<Option<Locked>, Errno> {
        // SAFETY: as in `try_lock`; `deadline` is a valid timespec for the duration of the call.
        let rc = unsafe { libc::pthread_mutex_timedlock(self.raw(), deadline) };
        match rc {
            0 => Ok(Some(Locked::Acquired)),
            libc::EOWNERDEAD => Ok(Some(Locked::OwnerDied)),
            libc::ETIMEDOUT => Ok(None),
            rc => Err(Errno::from_raw_os_error(rc)),
        }
    }

    /// After `OwnerDied`: the protected state is repaired; the mutex stays usable.
    fn make_consistent(&self) -> Result<(), Errno> {
        // SAFETY: as in `try_lock`; the calling thread holds the mutex (after `OwnerDied`).
        match unsafe { libc::pthread_mutex_consistent(self.raw()) } {
            0 => Ok(()),
            rc => Err(Errno::from_raw_os_error(rc)),
        }
    }

    /// Unlocks; the calling thread must hold it (glibc checks this for robust mutexes and
    /// returns EPERM otherwise, which is ignored: there is nothing to undo).
    fn unlock(&self) {
        // SAFETY: as in `try_lock`.
        let rc = unsafe { libc::pthread_mutex_unlock(self.raw()) };
        if rc != 0 {
            tracing::warn!(rc, "lane: pthread_mutex_unlock failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time and futexes.
// ---------------------------------------------------------------------------------------------

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine.
pub(crate) fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// `CLOCK_REALTIME` + `after`, for `pthread_mutex_timedlock` (which takes only that clock).
fn realtime_deadline(after: Duration) -> libc::timespec {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let nanos = now.tv_nsec as u64 + u64::from(after.subsec_nanos());
    libc::timespec {
        tv_sec: (now.tv_sec as libc::time_t)
            .saturating_add(after.as_secs().min(i32::MAX as u64) as libc::time_t)
            .saturating_add((nanos / 1_000_000_000) as libc::time_t),
        tv_nsec: (nanos % 1_000_000_000) as _,
    }
}

/// Sleeps while `word == expected`, at most `timeout` (spurious wake-ups are fine: every
/// caller re-checks its condition). Shared, not `FUTEX_PRIVATE_FLAG`: the wakers are other
/// processes.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout =
        futex::Timespec { tv_sec: timeout.as_secs().min(i32::MAX as u64) as _, tv_nsec: timeout.subsec_nanos() as _ };
    // EAGAIN (the word already changed), ETIMEDOUT and EINTR all mean "look again".
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&timeout));
}

pub(crate) fn futex_wake_all(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

// ---------------------------------------------------------------------------------------------
// Creating a lane (the supervisor).
// ---------------------------------------------------------------------------------------------

/// Seals a lane memfd carries: its size can never change, so no mapping can fault.
const LANE_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// Why a lane could not be created.
#[derive(Debug, thiserror::Error)]
pub enum LaneCreateError {
    #[error("invalid lane layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("cannot create lane memfd {name:?}: {source}")]
    Memfd { name: String, source: memfd::Error },
    #[error("cannot size lane memfd to {size} bytes (is /dev/shm or memory short?): {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map the new lane: {0}")]
    Map(std::io::Error),
    #[error("cannot initialise the lane's robust mutexes: {0} (this libc has no robust process-shared mutexes?)")]
    Mutex(Errno),
    #[error("cannot seal the lane memfd against resizing: {0}")]
    Seal(memfd::Error),
}

/// A created, initialised lane memfd: the supervisor keeps it for the generation's lifetime
/// and hands each worker a clone of its fd; its memory is freed with the last fd and mapping.
#[derive(Debug)]
pub struct LaneFd {
    fd: OwnedFd,
    layout: LaneLayout,
    size: u64,
}

impl LaneFd {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Another fd of the same lane (close-on-exec), to send to a worker.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    pub fn layout(&self) -> LaneLayout {
        self.layout
    }

    /// Bytes of the memfd.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

// ---------------------------------------------------------------------------------------------
// The mapped region and the protocol's primitive moves.
// ---------------------------------------------------------------------------------------------

/// Why a lane fd could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum LaneMapError {
    #[error("cannot inspect the lane fd: {0}")]
    Stat(std::io::Error),
    #[error("the lane fd is not a memfd sealed against resizing (seals {found:?}): create lanes with Lane::create")]
    NotSealed { found: Option<SealFlags> },
    #[error("the lane fd holds {size} bytes, too few for a lane header: wrong fd?")]
    TooSmall { size: u64 },
    #[error("the lane fd does not start with the lane magic: wrong fd, or a lane not initialised by Lane::create")]
    Magic,
    #[error("lane version {found}, this build speaks {VERSION}: run workers of the supervisor's build")]
    Version { found: u32 },
    #[error("the lane was made with {found}-byte pthread mutexes, this process has {expected}: mixed builds or architectures")]
    MutexSize { found: u32, expected: u32 },
    #[error("the lane header holds an invalid layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("the lane header says {expected} bytes but the fd holds {actual}: corrupt lane")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("cannot map the lane: {0}")]
    Map(std::io::Error),
    #[error("all {processes} process entries of the lane are held by live processes: create the lane with more")]
    TableFull { processes: u32 },
    #[error("cannot start the lane's completion thread: {0}")]
    Thread(std::io::Error),
}

/// A process's mapping of a lane, with the protocol's primitive moves. Every method that reads
/// a length or an index from shared memory bounds it by the geometry validated at map time.
pub(crate) struct Region {
    map: MmapRaw,
    geo: Geometry,
}

/// A registered process, as written into the slots it claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub index: u32,
    pub incarnation: u64,
    pub pid: u32,
}

impl Owner {
    /// How the state words of this process's slots name it.
    pub(crate) fn requester(&self) -> Requester {
        Requester { index: self.index as u8, tag: self.incarnation as u16 }
    }
}

/// What the holder's sweep did to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Swept {
    Nothing,
    Requeued,
    GaveUp,
    Reclaimed,
}

/// Whether requesters live, as one holder's sweep or pass judges them.
///
/// Only "alive" verdicts are cached: a process found alive may die a moment later, and then a
/// later sweep reclaims its slots, which is merely late. A "dead" verdict always comes from a
/// fresh probe at the moment of the decision: an entry found free can be registered by a new
/// process right after, and that process's slots must never be judged by the old verdict.
pub(crate) struct Liveness {
    /// Per process entry: the incarnation last found alive there (0: none known).
    alive: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Registered and alive, with this incarnation.
    Alive(u64),
    /// Nobody lives at that entry.
    Gone,
    /// The entry's mutex answered with an error: corrupt; never reclaim on that evidence.
    Unknown,
}

impl Liveness {
    pub(crate) fn new(region: &Region) -> Liveness {
        Liveness { alive: vec![0; region.geo.layout.processes as usize] }
    }

    pub(crate) fn forget(&mut self) {
        self.alive.iter_mut().for_each(|k| *k = 0);
    }

    /// Is `requester` (from a state word or a taken slot's fields) a live process?
    pub(crate) fn alive(&mut self, region: &Region, requester: Requester) -> bool {
        // An index outside the table comes only from a corrupt word: nobody lives there.
        let Some(cached) = self.alive.get_mut(requester.index as usize) else { return false };
        if *cached != 0 && *cached as u16 == requester.tag {
            return true;
        }
        match region.probe(requester.index as usize) {
            Probe::Alive(incarnation) => {
                *cached = incarnation;
                incarnation != 0 && incarnation as u16 == requester.tag
            }
            Probe::Gone => {
                *cached = 0;
                false
            }
            Probe::Unknown => true,
        }
    }
}

/// How a slot ended, as its requester reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done with an output of this many bytes.
    Done(usize),
    Failed(String),
    /// The slot is free: reclaimed by a holder that believed this process dead (cannot happen
    /// while the process's registration lives, unless another process broke the protocol).
    Lost,
}

impl Region {
    /// Maps and validates a lane fd. `writable: false` maps it read-only (monitors).
    pub(crate) fn map(fd: BorrowedFd<'_>, writable: bool) -> Result<Region, LaneMapError> {
        let seals = rustix::fs::fcntl_get_seals(fd).ok();
        if !seals.is_some_and(|s| s.contains(LANE_SEALS)) {
            return Err(LaneMapError::NotSealed { found: seals });
        }
        let size = rustix::fs::fstat(fd).map_err(|e| LaneMapError::Stat(e.into()))?.st_size as u64;
        if size < HEADER_SIZE as u64 || size > isize::MAX as u64 {
            return Err(LaneMapError::TooSmall { size });
        }
        let mut options = MmapOptions::new();
        options.len(size as usize);
        let map =
            if writable { options.map_raw(&fd) } else { options.map_raw_read_only(&fd) }.map_err(LaneMapError::Map)?;
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked above), page-aligned, and
        // cannot shrink (sealed); Header is made of atomics and UnsafeCell, valid for any bits.
        let header = unsafe { &*(map.as_ptr() as *const Header) };
        if header.magic.load(Ordering::Acquire) != MAGIC {
            return Err(LaneMapError::Magic);
        }
        let found = header.version.load(Ordering::Relaxed);
        if found != VERSION {
            return Err(LaneMapError::Version { found });
        }
        let expected = size_of::<libc::pthread_mutex_t>() as u32;
        let found = header.mutex_size.load(Ordering::Relaxed);
        if found != expected {
            return Err(LaneMapError::MutexSize { found, expected });
        }
        let layout = LaneLayout {
            slots: header.slots.load(Ordering::Relaxed),
            input_capacity: header.input_capacity.load(Ordering::Relaxed),
            output_capacity: header.output_capacity.load(Ordering::Relaxed),
            processes: header.processes.load(Ordering::Relaxed),
        };
        let geo = Geometry::of(layout)?;
        let declared = header.total_size.load(Ordering::Relaxed);
        if geo.total as u64 != size || declared != size {
            return Err(LaneMapError::SizeMismatch { expected: geo.total as u64, actual: size });
        }
        Ok(Region { map, geo })
    }

    pub(crate) fn layout(&self) -> LaneLayout {
        self.geo.layout
    }

    pub(crate) fn slots(&self) -> u32 {
        self.geo.layout.slots
    }

    fn header(&self) -> &Header {
        // SAFETY: validated in `map`: the mapping holds a header, lives as long as `self`.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn entry(&self, index: usize) -> &ProcEntry {
        assert!(index < self.geo.layout.processes as usize, "process index {index} out of range");
        // SAFETY: index < processes, so the entry lies inside the mapping (Geometry::of); the
        // offset is a multiple of 64 on a page-aligned base; any bits are a valid ProcEntry.
        unsafe { &*(self.map.as_ptr().add(self.geo.procs_offset + index * ENTRY_SIZE) as *const ProcEntry) }
    }

    fn slot_base(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.geo.layout.slots, "slot {slot} out of range");
        // SAFETY: slot < slots, so the slot lies inside the mapping (Geometry::of).
        unsafe { self.map.as_mut_ptr().add(self.geo.slots_offset + slot as usize * self.geo.slot_stride) }
    }

    fn meta(&self, slot: u32) -> &SlotMeta {
        // SAFETY: slot_base checks the index; 64-aligned; any bits are a valid SlotMeta.
        unsafe { &*(self.slot_base(slot) as *const SlotMeta) }
    }

    fn input_ptr(&self, slot: u32) -> *mut u8 {
        // SAFETY: the input area (input_capacity bytes) lies inside the slot.
        unsafe { self.slot_base(slot).add(self.geo.input_offset) }
    }

    fn output_ptr(&self, slot: u32) -> *mut u8 {
        // SAFETY: the output area (output_capacity bytes) lies inside the slot.
        unsafe { self.slot_base(slot).add(self.geo.output_offset) }
    }

    fn stats_words(&self) -> &StatWords {
        &self.header().stats
    }

    pub(crate) fn state(&self, slot: u32) -> u32 {
        self.meta(slot).state.load(Ordering::Acquire)
    }

    /// The one way a slot changes state: `expected` must be the word last read, `event` a legal
    /// move from it; the CAS fails if anyone moved first.
    pub(crate) fn apply(&self, slot: u32, expected: u32, event: Event) -> Result<SlotState, MoveError> {
        let from = SlotState::decode(expected).ok_or(MoveError::Corrupt(expected))?;
        let to = transition(from, event)?;
        self.meta(slot)
            .state
            .compare_exchange(expected, to.encode(), Ordering::AcqRel, Ordering::Acquire)
            .map_err(|found| MoveError::Raced { found })?;
        Ok(to)
    }

    // --- the process table --------------------------------------------------------------------

    /// Registers the calling thread's process: locks a free (or dead) entry and gives it a fresh
    /// incarnation. The calling thread must keep living, holding the entry, until
    /// [`Region::unregister`]: its death is how other processes learn this one is gone.
    pub(crate) fn register(&self) -> Result<Owner, LaneMapError> {
        let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
        for index in 0..self.geo.layout.processes as usize {
            let entry = self.entry(index);
            match entry.lock.try_lock() {
                Ok(Some(Locked::Acquired)) => {}
                Ok(Some(Locked::OwnerDied)) => {
                    // Its previous process died; its slots carry the old incarnation, which no
                    // longer matches, and the holder's next sweep reclaims them.
                    self.stats_words().requester_deaths.fetch_add(1, Ordering::Relaxed);
                    if entry.lock.make_consistent().is_err() {
                        continue;
                    }
                }
                Ok(None) | Err(_) => continue,
            }
            let incarnation = self.header().next_incarnation.fetch_add(1, Ordering::Relaxed).wrapping_add(1).max(1);
            entry.pid.store(pid, Ordering::Relaxed);
            entry.incarnation.store(incarnation, Ordering::Release);
            return Ok(Owner { index: index as u32, incarnation, pid });
        }
        Err(LaneMapError::TableFull { processes: self.geo.layout.processes })
    }

    /// Leaves the process table; call on the thread that registered. Slots still carrying this
    /// owner (requests taken when it stopped waiting) are reclaimed by the holder's sweep.
    pub(crate) fn unregister(&self, owner: &Owner) {
        let entry = self.entry(owner.index as usize);
        entry.incarnation.store(0, Ordering::Release);
        entry.pid.store(0, Ordering::Relaxed);
        entry.lock.unlock();
    }

    /// Is anybody alive at process entry `index`, and with which incarnation?
    fn probe(&self, index: usize) -> Probe {
        let entry = self.entry(index);
        match entry.lock.try_lock() {
            Ok(None) => Probe::Alive(entry.incarnation.load(Ordering::Acquire)),
            Ok(Some(locked)) => {
                if locked == Locked::OwnerDied {
                    self.stats_words().requester_deaths.fetch_add(1, Ordering::Relaxed);
                    entry.incarnation.store(0, Ordering::Release);
                    entry.pid.store(0, Ordering::Relaxed);
                    if let Err(e) = entry.lock.make_consistent() {
                        tracing::warn!(index, %e, "lane: cannot make a dead process's entry consistent");
                    }
                }
                entry.lock.unlock();
                Probe::Gone
            }
            Err(e) => {
                tracing::warn!(index, %e, "lane: process entry mutex is unusable; keeping its slots");
                Probe::Unknown
            }
        }
    }

    /// The completion futex word of process entry `index`.
    pub(crate) fn completions(&self, index: u32) -> &AtomicU32 {
        &self.entry(index as usize).completions
    }

    // --- requester moves ----------------------------------------------------------------------

    /// Claims a free slot, scanning from `start`: one CAS. `None` when every slot is in use.
    pub(crate) fn claim(&self, owner: &Owner, start: u32) -> Option<u32> {
        let slots = self.geo.layout.slots;
        let event = Event::Claim { by: owner.requester() };
        (0..slots).map(|i| (start % slots + i) % slots).find(|&slot| {
            let meta = self.meta(slot);
            meta.state.load(Ordering::Relaxed) == TAG_FREE && self.apply(slot, TAG_FREE, event).is_ok()
        })
    }

    /// Writes a claimed slot's request: its owner, a fresh sequence number and the input that
    /// `fill` writes into the first `len` bytes (`len` ≤ input capacity). Invisible to
    /// everybody until [`Region::publish`]. Returns the sequence number.
    pub(crate) fn write_request(&self, slot: u32, owner: &Owner, len: usize, fill: impl FnOnce(&mut [u8])) -> u64 {
        assert!(len <= self.geo.layout.input_capacity as usize, "input longer than the lane's capacity");
        let meta = self.meta(slot);
        debug_assert_eq!(
            SlotState::decode(meta.state.load(Ordering::Relaxed)),
            Some(SlotState::Claimed(owner.requester()))
        );
        // SAFETY: the area is `len` ≤ input_capacity bytes inside our mapping; the slot is
        // Claimed by this process, and in that state no other process reads or writes its input
        // area (runners read it only once Taken; the sweep never touches contents), so this is
        // the only reference to those bytes.
        fill(unsafe { std::slice::from_raw_parts_mut(self.input_ptr(slot), len) });
        let seq = self.header().next_seq.fetch_add(1, Ordering::Relaxed);
        meta.owner.store(owner.index, Ordering::Relaxed);
        meta.incarnation.store(owner.incarnation, Ordering::Relaxed);
        meta.pid.store(owner.pid, Ordering::Relaxed);
        meta.seq.store(seq, Ordering::Relaxed);
        meta.crashes.store(0, Ordering::Relaxed);
        meta.input_len.store(len as u32, Ordering::Relaxed);
        meta.submitted_ns.store(monotonic_ns(), Ordering::Relaxed);
        seq
    }

    /// Queues a written request (the CAS releases its contents) and wakes a waiting runner.
    pub(crate) fn publish(&self, slot: u32, owner: &Owner) -> Result<(), MoveError> {
        let word = self.state(slot);
        self.apply(slot, word, Event::Publish { by: owner.requester() })?;
        self.stats_words().submitted.fetch_add(1, Ordering::Relaxed);
        // Dekker with the runner (`wait_for_work`): we bump `work` then read `work_waiters`; it
        // bumps `work_waiters` then sleeps only while `work` is unchanged. SeqCst on all four
        // makes at least one of us see the other, so a submission never sleeps in the queue.
        let header = self.header();
        header.work.fetch_add(1, Ordering::SeqCst);
        if header.work_waiters.load(Ordering::SeqCst) != 0 {
            futex_wake_all(&header.work);
        }
        Ok(())
    }

    /// Gives back a claimed slot that will not be published.
    pub(crate) fn abort(&self, slot: u32, owner: &Owner) {
        let word = self.state(slot);
        if let Err(e) = self.apply(slot, word, Event::Abort { by: owner.requester() }) {
            tracing::warn!(slot, %e, "lane: cannot abort a claimed slot");
        }
    }

    /// Withdraws a queued request: true if nobody had taken it yet (it will never run).
    pub(crate) fn cancel(&self, slot: u32, owner: &Owner) -> bool {
        let by = owner.requester();
        let cancelled = self.apply(slot, SlotState::Queued(by).encode(), Event::Cancel { by }).is_ok();
        if cancelled {
            self.stats_words().cancelled.fetch_add(1, Ordering::Relaxed);
        }
        cancelled
    }

    /// How `owner`'s request in `slot` ended, or `None` while it is not finished.
    pub(crate) fn outcome(&self, slot: u32, owner: &Owner) -> Option<Outcome> {
        let meta = self.meta(slot);
        let me = owner.requester();
        match SlotState::decode(meta.state.load(Ordering::Acquire)) {
            Some(SlotState::Done(r)) if r == me => {
                let len =
                    (meta.output_len.load(Ordering::Relaxed) as usize).min(self.geo.layout.output_capacity as usize);
                Some(Outcome::Done(len))
            }
            Some(SlotState::Failed(r)) if r == me => Some(Outcome::Failed(self.reason(slot))),
            Some(SlotState::Claimed(r) | SlotState::Queued(r)) if r == me => None,
            Some(SlotState::Taken { .. }) => None,
            // Free, someone else's, or corrupt: not ours any more.
            _ => Some(Outcome::Lost),
        }
    }

    /// The output of a `Done` slot.
    ///
    /// # Safety
    /// The slot must be `Done` with an output of `len` bytes (as [`Region::outcome`] said), owned
    /// by the caller's process and not yet collected, for as long as the slice lives: only then
    /// does nobody write its output area (only the owner collects it; only a holder of the
    /// epoch that took it writes it, before `Done`).
    pub(crate) unsafe fn output(&self, slot: u32, len: usize) -> &[u8] {
        let len = len.min(self.geo.layout.output_capacity as usize);
        // SAFETY: in bounds (clamped to the area); immutable per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.output_ptr(slot), len) }
    }

    /// Frees a `Done` or `Failed` slot after its requester read it.
    pub(crate) fn collect(&self, slot: u32, owner: &Owner) {
        let word = self.state(slot);
        if let Err(e) = self.apply(slot, word, Event::Collect { by: owner.requester() }) {
            tracing::warn!(slot, %e, "lane: cannot free a collected slot");
        }
    }

    fn reason(&self, slot: u32) -> String {
        let meta = self.meta(slot);
        let len = (meta.reason_len.load(Ordering::Relaxed) as usize).min(REASON_CAPACITY);
        let bytes: Vec<u8> = meta.reason[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn write_reason(&self, slot: u32, reason: &str) {
        let meta = self.meta(slot);
        let mut len = reason.len().min(REASON_CAPACITY);
        while !reason.is_char_boundary(len) {
            len -= 1;
        }
        for (cell, &byte) in meta.reason.iter().zip(&reason.as_bytes()[..len]) {
            cell.store(byte, Ordering::Relaxed);
        }
        meta.reason_len.store(len as u32, Ordering::Relaxed);
    }

    // --- holder moves -------------------------------------------------------------------------

    /// The lease mutex.
    fn lease(&self) -> &SharedMutex {
        &self.header().lease
    }

    /// Starts the term of a new lease holder: a new epoch (the 24 bits a `Taken` word carries).
    pub(crate) fn begin_term(&self, previous_died: bool) -> u32 {
        let header = self.header();
        let stats = self.stats_words();
        stats.acquisitions.fetch_add(1, Ordering::Relaxed);
        if previous_died {
            stats.recoveries.fetch_add(1, Ordering::Relaxed);
        }
        header.leader_pid.store(rustix::process::getpid().as_raw_nonzero().get() as u32, Ordering::Relaxed);
        header.epoch.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & EPOCH_MASK
    }

    /// Recovery and garbage collection for one slot; run by the holder of `epoch` between
    /// passes (so no `Taken(epoch)` slot exists).
    pub(crate) fn sweep_slot(&self, slot: u32, epoch: u32, max_crashes: u32, live: &mut Liveness) -> Swept {
        let meta = self.meta(slot);
        let word = meta.state.load(Ordering::Acquire);
        let reclaim = Event::Reclaim { current: epoch };
        let moved = |event: Event, swept: Swept| match self.apply(slot, word, event) {
            Ok(_) => swept,
            Err(_) => Swept::Nothing,
        };
        let swept = match SlotState::decode(word) {
            None => {
                // A word no protocol step writes: a process broke the protocol. The slot is
                // lost either way; freeing it keeps the lane from filling up.
                tracing::warn!(slot, word, "lane: corrupt slot state; freeing the slot");
                match meta.state.compare_exchange(word, TAG_FREE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => Swept::Reclaimed,
                    Err(_) => Swept::Nothing,
                }
            }
            Some(SlotState::Free) => Swept::Nothing,
            Some(SlotState::Claimed(r) | SlotState::Queued(r) | SlotState::Done(r) | SlotState::Failed(r)) => {
                if live.alive(self, r) {
                    Swept::Nothing
                } else {
                    moved(reclaim, Swept::Reclaimed)
                }
            }
            Some(SlotState::Taken { epoch: taken }) if taken != epoch & EPOCH_MASK => {
                // Its holder is gone, and only we, the lane's holder now, may move it: its
                // fields are stable.
                let of = self.taken_by(slot);
                if !live.alive(self, of) {
                    moved(reclaim, Swept::Reclaimed)
                } else {
                    let crashes = meta.crashes.load(Ordering::Relaxed).saturating_add(1);
                    meta.crashes.store(crashes, Ordering::Relaxed);
                    if crashes >= max_crashes {
                        self.write_reason(slot, &format!("{crashes} pass runners died running this request"));
                        moved(Event::GiveUp { current: epoch, of }, Swept::GaveUp)
                    } else {
                        moved(Event::Requeue { current: epoch, of }, Swept::Requeued)
                    }
                }
            }
            Some(SlotState::Taken { .. }) => Swept::Nothing,
        };
        let stats = self.stats_words();
        match swept {
            Swept::Nothing => {}
            Swept::Requeued => _ = stats.requeued.fetch_add(1, Ordering::Relaxed),
            Swept::GaveUp => _ = stats.gave_up.fetch_add(1, Ordering::Relaxed),
            Swept::Reclaimed => _ = stats.reclaimed.fetch_add(1, Ordering::Relaxed),
        }
        swept
    }

    /// The requester of a taken slot, from the fields it wrote before publishing (stable while
    /// the slot is taken: only the holder moves it then).
    fn taken_by(&self, slot: u32) -> Requester {
        let meta = self.meta(slot);
        Requester {
            index: meta.owner.load(Ordering::Relaxed) as u8,
            tag: meta.incarnation.load(Ordering::Relaxed) as u16,
        }
    }

    /// Appends every queued request to `out` (one pass over the state words).
    pub(crate) fn queued(&self, out: &mut Vec<batcher::Candidate>) {
        for slot in 0..self.geo.layout.slots {
            let meta = self.meta(slot);
            if meta.state.load(Ordering::Acquire) & 0xFF == TAG_QUEUED {
                out.push(batcher::Candidate {
                    slot,
                    seq: meta.seq.load(Ordering::Relaxed),
                    submitted_ns: meta.submitted_ns.load(Ordering::Relaxed),
                });
            }
        }
    }

    /// Frees a queued request whose requester is dead instead of running it.
    pub(crate) fn drop_if_orphaned(&self, slot: u32, epoch: u32, live: &mut Liveness) -> bool {
        let word = self.state(slot);
        let orphaned = matches!(SlotState::decode(word), Some(SlotState::Queued(r)) if !live.alive(self, r));
        if !orphaned {
            return false;
        }
        let dropped = self.apply(slot, word, Event::Reclaim { current: epoch }).is_ok();
        if dropped {
            self.stats_words().reclaimed.fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Takes a queued request into the pass of `epoch`: one CAS. Returns its requester.
    pub(crate) fn take(&self, slot: u32, epoch: u32) -> Result<Requester, MoveError> {
        let word = self.state(slot);
        let to = self.apply(slot, word, Event::Take { epoch })?;
        debug_assert_eq!(to, SlotState::Taken { epoch: epoch & EPOCH_MASK });
        self.meta(slot).taken_epoch.store(epoch, Ordering::Relaxed);
        SlotState::decode(word).and_then(SlotState::requester).ok_or(MoveError::Corrupt(word))
    }

    /// The input of a slot taken by the caller.
    ///
    /// # Safety
    /// The slot must be `Taken` by the caller's pass for as long as the slice lives: then
    /// nobody writes its input area (the requester wrote it before publishing and cannot
    /// cancel a taken request; claimants need it `Free`).
    pub(crate) unsafe fn input(&self, slot: u32) -> &[u8] {
        let len =
            (self.meta(slot).input_len.load(Ordering::Relaxed) as usize).min(self.geo.layout.input_capacity as usize);
        // SAFETY: in bounds (clamped to the area); immutable per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.input_ptr(slot), len) }
    }

    /// The output area of a slot taken by the caller, `len` ≤ output capacity bytes long.
    ///
    /// # Safety
    /// The slot must be `Taken` by the caller's pass for as long as the slice lives, and the
    /// caller must hold no other reference to this output area: then nobody else reads or
    /// writes it (its requester reads it only once `Done`).
    #[allow(clippy::mut_from_ref)] // shared memory: exclusivity comes from the slot's state
    pub(crate) unsafe fn output_area(&self, slot: u32, len: usize) -> &mut [u8] {
        assert!(len <= self.geo.layout.output_capacity as usize, "output longer than the lane's capacity");
        // SAFETY: in bounds; exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.output_ptr(slot), len) }
    }

    /// Ends a taken request: `Ok(len)` → `Done` with the `len` output bytes already written,
    /// `Err(reason)` → `Failed`. The CAS releases the output (or the reason).
    pub(crate) fn finish(&self, slot: u32, epoch: u32, result: Result<usize, &str>) -> Result<(), MoveError> {
        let meta = self.meta(slot);
        let of = self.taken_by(slot);
        let event = match result {
            Ok(len) => {
                meta.output_len.store(len as u32, Ordering::Relaxed);
                Event::Complete { epoch, of }
            }
            Err(reason) => {
                self.write_reason(slot, reason);
                Event::Fail { epoch, of }
            }
        };
        self.apply(slot, SlotState::Taken { epoch }.encode(), event).map(|_| ())
    }

    /// Tells process `index` that some of its requests finished.
    pub(crate) fn notify(&self, index: u32) {
        if index < self.geo.layout.processes {
            let word = self.completions(index);
            word.fetch_add(1, Ordering::Release);
            futex_wake_all(word);
        }
    }

    /// Counts a pass in the statistics.
    /// The first pass after taking over from a dead holder starts now.
    pub(crate) fn record_takeover_pass(&self) {
        self.header().takeover_pass_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    pub(crate) fn record_pass(&self, done: u64, failed: u64, processes: usize, took: Duration) {
        let stats = self.stats_words();
        self.header().pass_ns.fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        let size = (done + failed) as usize;
        stats.passes.fetch_add(1, Ordering::Relaxed);
        stats.served.fetch_add(done, Ordering::Relaxed);
        stats.failed.fetch_add(failed, Ordering::Relaxed);
        stats.batch_sizes[batch_bucket(size)].fetch_add(1, Ordering::Relaxed);
        stats.processes_per_pass[processes.clamp(1, PROCESS_BUCKETS) - 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Runners: the `work` word to wait on, read *before* scanning for work.
    pub(crate) fn work_seen(&self) -> u32 {
        self.header().work.load(Ordering::SeqCst)
    }

    /// Runners: sleep until a submission after `seen`, or `timeout`.
    pub(crate) fn wait_for_work(&self, seen: u32, timeout: Duration) {
        let header = self.header();
        header.work_waiters.fetch_add(1, Ordering::SeqCst);
        if header.work.load(Ordering::SeqCst) == seen {
            futex_wait(&header.work, seen, timeout);
        }
        header.work_waiters.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn count_rejected(&self) {
        self.stats_words().rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the counters and of the slots' states.
    pub(crate) fn stats(&self) -> LaneStats {
        let header = self.header();
        let s = &header.stats;
        let load = |w: &AtomicU64| w.load(Ordering::Relaxed);
        let mut slot_states = SlotCounts::default();
        for slot in 0..self.geo.layout.slots {
            match SlotState::decode(self.meta(slot).state.load(Ordering::Relaxed)) {
                Some(SlotState::Free) => slot_states.free += 1,
                Some(SlotState::Claimed(_)) => slot_states.claimed += 1,
                Some(SlotState::Queued(_)) => slot_states.queued += 1,
                Some(SlotState::Taken { .. }) => slot_states.taken += 1,
                Some(SlotState::Done(_) | SlotState::Failed(_)) => slot_states.finished += 1,
                None => slot_states.corrupt += 1,
            }
        }
        LaneStats {
            layout: self.geo.layout,
            epoch: header.epoch.load(Ordering::Relaxed),
            leader_pid: header.leader_pid.load(Ordering::Relaxed),
            passes: load(&s.passes),
            served: load(&s.served),
            failed: load(&s.failed),
            submitted: load(&s.submitted),
            rejected: load(&s.rejected),
            cancelled: load(&s.cancelled),
            acquisitions: load(&s.acquisitions),
            recoveries: load(&s.recoveries),
            requeued: load(&s.requeued),
            gave_up: load(&s.gave_up),
            reclaimed: load(&s.reclaimed),
            requester_deaths: load(&s.requester_deaths),
            takeover_pass_ns: load(&header.takeover_pass_ns),
            pass_ns: load(&header.pass_ns),
            batch_sizes: std::array::from_fn(|i| load(&s.batch_sizes[i])),
            processes_per_pass: std::array::from_fn(|i| load(&s.processes_per_pass[i])),
            slots: slot_states,
        }
    }
}

/// Bucket of a batch of `size` requests: 1, 2, 3–4, 5–8, … (powers of two).
fn batch_bucket(size: usize) -> usize {
    (size.max(1).next_power_of_two().trailing_zeros() as usize).min(BATCH_BUCKETS - 1)
}

/// Upper bound of each batch-size bucket (`usize::MAX` for the last), for labels.
pub fn batch_bucket_bounds() -> [usize; BATCH_BUCKETS] {
    std::array::from_fn(|i| if i + 1 == BATCH_BUCKETS { usize::MAX } else { 1 << i })
}

// ---------------------------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------------------------

/// Slots by state at the moment of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotCounts {
    pub free: u32,
    pub claimed: u32,
    pub queued: u32,
    pub taken: u32,
    /// Done or failed, not yet collected by their requester.
    pub finished: u32,
    pub corrupt: u32,
}

/// What the lane has done, for status and metrics. Counters are read one by one (relaxed), so a
/// snapshot taken during a pass may be off by that pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaneStats {
    pub layout: LaneLayout,
    /// Lease acquisitions so far (24 bits kept in slots).
    pub epoch: u32,
    /// Pid of the process that last took the lease (it may have died since).
    pub leader_pid: u32,
    pub passes: u64,
    /// Requests answered (`Done`).
    pub served: u64,
    /// Requests failed by a pass (including "the pass left it unanswered" and panics).
    pub failed: u64,
    pub submitted: u64,
    /// Submissions refused because every slot was in use.
    pub rejected: u64,
    /// Requests withdrawn by their waiter before any pass took them.
    pub cancelled: u64,
    pub acquisitions: u64,
    /// Acquisitions that found the previous holder dead.
    pub recoveries: u64,
    /// Requests put back in the queue after their holder died.
    pub requeued: u64,
    /// Requests failed because `max_crashes` holders died running them.
    pub gave_up: u64,
    /// Slots freed because their requester died.
    pub reclaimed: u64,
    /// Registered processes found dead (by a sweep or by a new registrant).
    pub requester_deaths: u64,
    /// `CLOCK_MONOTONIC` ns of the start of the first pass after the last takeover from a dead
    /// pass runner (0: none yet). A chaos run that notes when it killed the runner (same
    /// clock, any process) gets the time to the next pass from it.
    pub takeover_pass_ns: u64,
    /// Nanoseconds inside the service's pass function, over all passes.
    pub pass_ns: u64,
    /// Passes by number of requests: buckets 1, 2, 3–4, 5–8, … ([`batch_bucket_bounds`]).
    pub batch_sizes: [u64; BATCH_BUCKETS],
    /// Passes by number of distinct processes served: 1, 2, …, 15, 16 or more.
    pub processes_per_pass: [u64; PROCESS_BUCKETS],
    pub slots: SlotCounts,
}

impl LaneStats {
    /// Mean time of one pass (the service's pass function), in microseconds.
    pub fn mean_pass_us(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            self.pass_ns as f64 / self.passes as f64 / 1e3
        }
    }

    /// Mean requests per pass.
    pub fn mean_batch(&self) -> f64 {
        if self.passes == 0 {
            0.0
        } else {
            (self.served + self.failed) as f64 / self.passes as f64
        }
    }

    /// Mean distinct processes served per pass (16+ counted as 16).
    pub fn mean_processes_per_pass(&self) -> f64 {
        let passes: u64 = self.processes_per_pass.iter().sum();
        let weighted: u64 = self.processes_per_pass.iter().enumerate().map(|(i, n)| (i as u64 + 1) * n).sum();
        if passes == 0 {
            0.0
        } else {
            weighted as f64 / passes as f64
        }
    }
}

/// A read-only view of a lane for the supervisor's status and metrics: maps the fd `PROT_READ`,
/// registers nothing, runs nothing.
pub struct LaneMonitor {
    region: Region,
}

impl LaneMonitor {
    pub fn map(fd: BorrowedFd<'_>) -> Result<LaneMonitor, LaneMapError> {
        Ok(LaneMonitor { region: Region::map(fd, false)? })
    }

    pub fn stats(&self) -> LaneStats {
        // Only loads of ≤ 64-bit atomics, which are plain loads on read-only memory.
        self.region.stats()
    }
}

// ---------------------------------------------------------------------------------------------
// The handle a worker holds.
// ---------------------------------------------------------------------------------------------

/// A worker's handle on a lane: submit requests ([`Lane::submit`]), run passes
/// ([`Lane::run_passes`]), read statistics. Cheap to clone; `Send + Sync`.
///
/// Mapping a lane starts one **completion thread** in this process: it registers the process
/// (holding its entry's robust mutex for as long as the lane is mapped), sleeps on the
/// process's completion futex, and when a holder's pass finishes some of this process's
/// requests it wakes their tickets (a tokio waker or a blocked thread). One futex wake per
/// process per pass, whatever the number of requests, and no thread per request.
#[derive(Clone)]
pub struct Lane {
    inner: Arc<client::Inner>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("layout", &self.inner.region.layout()).finish()
    }
}

impl Lane {
    /// Creates and initialises a lane memfd (close-on-exec, sealed against resizing). Only the
    /// creator initialises: nobody else can map the memfd before this returns, so the mutexes'
    /// initialisation cannot race.
    pub fn create(name: &str, layout: LaneLayout) -> Result<LaneFd, LaneCreateError> {
        let geo = Geometry::of(layout)?;
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|source| LaneCreateError::Memfd { name: name.into(), source })?;
        let size = geo.total as u64;
        memfd.as_file().set_len(size).map_err(|source| LaneCreateError::Resize { size, source })?;
        {
            let map = MmapOptions::new().len(geo.total).map_raw(memfd.as_file()).map_err(LaneCreateError::Map)?;
            // SAFETY: the fresh mapping is `total` ≥ HEADER_SIZE zeroed bytes, page-aligned.
            let header = unsafe { &*(map.as_ptr() as *const Header) };
            header.version.store(VERSION, Ordering::Relaxed);
            header.mutex_size.store(size_of::<libc::pthread_mutex_t>() as u32, Ordering::Relaxed);
            header.slots.store(layout.slots, Ordering::Relaxed);
            header.processes.store(layout.processes, Ordering::Relaxed);
            header.input_capacity.store(layout.input_capacity, Ordering::Relaxed);
            header.output_capacity.store(layout.output_capacity, Ordering::Relaxed);
            header.total_size.store(size, Ordering::Relaxed);
            // SAFETY: nobody else has this memfd yet, so nobody uses the mutexes during init.
            unsafe { header.lease.init() }.map_err(LaneCreateError::Mutex)?;
            for index in 0..layout.processes as usize {
                // SAFETY: each entry lies inside the mapping (Geometry::of), 64-aligned; any
                // bits are valid; nobody else has the memfd yet.
                let entry = unsafe { &*(map.as_ptr().add(geo.procs_offset + index * ENTRY_SIZE) as *const ProcEntry) };
                // SAFETY: as above, no concurrent use during init.
                unsafe { entry.lock.init() }.map_err(LaneCreateError::Mutex)?;
            }
            // Slots are all zero: `Free`. The magic goes last, released: a mapper that sees it
            // sees the whole initialisation.
            header.magic.store(MAGIC, Ordering::Release);
        }
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow, memfd::FileSeal::SealSeal])
            .map_err(LaneCreateError::Seal)?;
        Ok(LaneFd { fd: memfd.into_file().into(), layout, size })
    }

    /// Maps a lane fd read-write after validating it, and registers this process (starting its
    /// completion thread). The fd may be closed afterwards.
    pub fn map(fd: OwnedFd) -> Result<Lane, LaneMapError> {
        let region = Region::map(fd.as_fd(), true)?;
        drop(fd);
        Ok(Lane { inner: client::Inner::start(region)? })
    }

    pub fn layout(&self) -> LaneLayout {
        self.inner.region.layout()
    }

    /// A snapshot of the lane's counters (the whole lane's, not this process's).
    pub fn stats(&self) -> LaneStats {
        self.inner.region.stats()
    }

    /// This process's registration: (process table index, incarnation).
    pub fn registration(&self) -> (u32, u64) {
        let owner = self.inner.owner();
        (owner.index, owner.incarnation)
    }
}
