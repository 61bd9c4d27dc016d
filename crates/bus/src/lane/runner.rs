//! The pass runner: contends for the lease, recovers after a dead holder, forms batches and
//! hands them to the service's pass function.
//!
//! Every worker runs [`Lane::run_passes`] on the thread that owns its engine (on a GPU, the
//! thread with the CUDA context). One of them holds the lease and runs passes; the others wait
//! in `pthread_mutex_timedlock`, woken by the kernel the moment the holder dies or lets go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::io::Errno;

use super::batcher::{self, Candidate, Plan, Policy, PreviousPass};
use super::{monotonic_ns, realtime_deadline, Lane, Liveness, Locked, Region, Requester};

/// How a runner forms passes and shares the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// At most this many requests per pass (clamped to 1..=slots).
    pub max_batch: usize,
    /// A pass that is not full waits until this long after its oldest request was submitted
    /// (0: take what is queued at once; under load requests queue while a pass runs anyway).
    pub max_wait: Duration,
    /// A pass that is not full also waits up to this long after the previous pass answered,
    /// for as many requests as that pass carried to come back (closed-loop clients; see
    /// [`batcher`](super::batcher)). Zero, the default, turns it off.
    pub linger: Duration,
    /// The holder lets go of the lease after this long without work, so another process may
    /// take over, and then leaves it alone for as long unless work arrives.
    pub idle_release: Duration,
    /// How often a waiting runner looks at `stop` (a dead holder wakes it at once regardless).
    pub poll: Duration,
    /// How often the holder sweeps for slots of dead requesters while it keeps the lease.
    pub sweep_interval: Duration,
    /// A request whose holder died this many times fails instead of being queued again, so a
    /// request that crashes the pass cannot kill every worker in turn.
    pub max_crashes: u32,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            max_batch: 32,
            max_wait: Duration::from_micros(500),
            linger: Duration::ZERO,
            idle_release: Duration::from_secs(1),
            poll: Duration::from_millis(50),
            sweep_interval: Duration::from_millis(100),
            max_crashes: 3,
        }
    }
}

/// What one call of [`Lane::run_passes`] did, for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerReport {
    /// Times this runner took the lease.
    pub terms: u64,
    /// Of those, times it found the previous holder dead.
    pub recoveries: u64,
    pub passes: u64,
    pub served: u64,
    pub failed: u64,
}

/// What [`Lane::run_passes`] asks between passes (and at least every `poll`) to know whether to
/// stop: a flag another thread sets, or a condition the runner evaluates itself.
pub trait StopSignal {
    fn stopped(&self) -> bool;
}

impl StopSignal for AtomicBool {
    fn stopped(&self) -> bool {
        self.load(Ordering::Acquire)
    }
}

impl<S: StopSignal + ?Sized> StopSignal for std::sync::Arc<S> {
    fn stopped(&self) -> bool {
        (**self).stopped()
    }
}

impl<F: Fn() -> bool> StopSignal for F {
    fn stopped(&self) -> bool {
        self()
    }
}

/// Why [`Lane::run_passes`] stopped before `stop` was set.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the lane's lease mutex failed ({0}): the lane is corrupt; the supervisor must create a new one")]
    Lease(Errno),
}

/// An output longer than the lane's output areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("output of {len} bytes exceeds the lane's {capacity}-byte output capacity: create the lane with a larger output_capacity")]
pub struct OutputTooLarge {
    pub len: usize,
    pub capacity: usize,
}

/// The requests of one pass, from any number of processes. For each request `i` the pass
/// reads [`Batch::input`] and answers with [`Batch::set_output`] (or writes in place with
/// [`Batch::output_mut`]) or [`Batch::fail`]; a request left unanswered fails.
pub struct Batch<'a> {
    region: &'a Region,
    items: Vec<Item>,
}

struct Item {
    slot: u32,
    owner: Requester,
    answer: Answer,
}

enum Answer {
    None,
    Output(usize),
    Failed(String),
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Request `i`'s input, read in place from the lane (map it for the GPU, or copy it).
    pub fn input(&self, i: usize) -> &[u8] {
        // SAFETY: the slot is Taken by this pass until the batch is finished, which happens
        // only after the pass function returned and this borrow of `self` ended.
        unsafe { self.region.input(self.items[i].slot) }
    }

    /// Largest output a request may have.
    pub fn output_capacity(&self) -> usize {
        self.region.layout().output_capacity as usize
    }

    /// Answers request `i` with `bytes`.
    pub fn set_output(&mut self, i: usize, bytes: &[u8]) -> Result<(), OutputTooLarge> {
        self.output_mut(i, bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    /// Answers request `i` with `len` bytes written in place: the returned area holds stale
    /// bytes; the pass must overwrite all of it.
    pub fn output_mut(&mut self, i: usize, len: usize) -> Result<&mut [u8], OutputTooLarge> {
        Ok(self.input_and_output(i, len)?.1)
    }

    /// Request `i`'s input and its `len`-byte output area at once (they never overlap).
    pub fn input_and_output(&mut self, i: usize, len: usize) -> Result<(&[u8], &mut [u8]), OutputTooLarge> {
        let capacity = self.output_capacity();
        if len > capacity {
            return Err(OutputTooLarge { len, capacity });
        }
        let item = &mut self.items[i];
        item.answer = Answer::Output(len);
        let slot = item.slot;
        // SAFETY: Taken by this pass until the batch is finished (see `input`); the output area
        // is borrowed mutably through `&mut self`, so no other reference to it exists.
        unsafe { Ok((self.region.input(slot), self.region.output_area(slot, len))) }
    }

    /// Fails request `i` with a short reason (its waiter gets [`super::WaitError::Failed`]).
    pub fn fail(&mut self, i: usize, reason: &str) {
        self.items[i].answer = Answer::Failed(reason.to_owned());
    }

    /// The lane process index of request `i`'s requester (requests of one process share it).
    pub fn requester(&self, i: usize) -> u32 {
        self.items[i].owner.index as u32
    }
}

/// Holds the lease; unlocks when dropped, also when the pass function unwinds (its taken
/// requests are then requeued by the next holder, as after a crash).
struct LeaseGuard<'a>(&'a Region);

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        self.0.lease().unlock();
    }
}

impl Lane {
    /// Runs passes whenever this process holds the lease, until `stop` is set (checked at least
    /// every `config.poll`). Call it on the thread that owns the engine; `pass` is called with
    /// each batch on this thread. Returns what it did, or an error if the lease mutex is broken.
    pub fn run_passes<S, F>(&self, stop: &S, config: &RunnerConfig, mut pass: F) -> Result<RunnerReport, RunError>
    where
        S: StopSignal + ?Sized,
        F: FnMut(&mut Batch<'_>),
    {
        let region = &self.inner.region;
        let policy = Policy {
            max_batch: config.max_batch.clamp(1, region.slots() as usize),
            max_wait_ns: duration_ns(config.max_wait),
            linger_ns: duration_ns(config.linger),
        };
        let poll_ns = duration_ns(config.poll).max(1);
        let idle_ns = duration_ns(config.idle_release);
        let mut report = RunnerReport::default();
        let mut live = Liveness::new(region);
        let mut queued = Vec::with_capacity(region.slots() as usize);
        // After letting go of the lease for idleness: leave it to others until work arrives.
        let mut resting: Option<(u32, u64)> = None;

        while !stop.stopped() {
            if let Some((seen, until)) = resting {
                let now = monotonic_ns();
                if region.work_seen() == seen && now < until {
                    region.wait_for_work(seen, ns_duration((until - now).min(poll_ns)));
                    continue;
                }
                resting = None;
            }
            let locked = match region.lease().lock_until(&realtime_deadline(config.poll)) {
                Ok(Some(locked)) => locked,
                Ok(None) => continue,
                Err(e) => return Err(RunError::Lease(e)),
            };
            let _lease = LeaseGuard(region);
            let previous_died = locked == Locked::OwnerDied;
            if previous_died {
                // Every acquisition sweeps below, so the mark has served its purpose (if we die
                // during the sweep, our own death marks the lease again).
                region.lease().make_consistent().map_err(RunError::Lease)?;
                tracing::warn!("lane: the previous pass runner died; recovering its requests");
                report.recoveries += 1;
            }
            let epoch = region.begin_term(previous_died);
            report.terms += 1;
            sweep(region, epoch, config.max_crashes, &mut live);
            let mut last_sweep = monotonic_ns();
            let mut last_work = last_sweep;
            let mut previous_pass = None;
            let mut takeover = previous_died;

            loop {
                if stop.stopped() {
                    break;
                }
                let seen = region.work_seen();
                queued.clear();
                region.queued(&mut queued);
                let now = monotonic_ns();
                match batcher::plan(&mut queued, now, previous_pass, &policy) {
                    Plan::Take => {
                        if std::mem::take(&mut takeover) {
                            region.record_takeover_pass();
                        }
                        let PassDone { done, failed, answered_ns } =
                            run_pass(region, epoch, &queued, &mut live, &mut pass);
                        if done + failed > 0 {
                            report.passes += 1;
                            report.served += done;
                            report.failed += failed;
                            let size = (done + failed) as usize;
                            previous_pass = Some(PreviousPass { answered_ns, size });
                        }
                        last_work = monotonic_ns();
                    }
                    Plan::WaitUntil(deadline) => {
                        region.wait_for_work(seen, ns_duration((deadline - now).min(poll_ns)));
                    }
                    Plan::Idle => {
                        let idle = now.saturating_sub(last_work);
                        if idle >= idle_ns {
                            resting = Some((seen, now.saturating_add(idle_ns)));
                            break;
                        }
                        region.wait_for_work(seen, ns_duration((idle_ns - idle).min(poll_ns)));
                    }
                }
                if monotonic_ns().saturating_sub(last_sweep) >= duration_ns(config.sweep_interval) {
                    sweep(region, epoch, config.max_crashes, &mut live);
                    last_sweep = monotonic_ns();
                }
            }
        }
        Ok(report)
    }
}

/// Recovery and garbage collection over every slot (see [`Region::sweep_slot`]).
fn sweep(region: &Region, epoch: u32, max_crashes: u32, live: &mut Liveness) {
    live.forget();
    for slot in 0..region.slots() {
        region.sweep_slot(slot, epoch, max_crashes, live);
    }
}

/// Takes the planned requests, runs the pass over them, publishes the answers and wakes their
/// processes.
fn run_pass<F>(region: &Region, epoch: u32, planned: &[Candidate], live: &mut Liveness, pass: &mut F) -> PassDone
where
    F: FnMut(&mut Batch<'_>),
{
    live.forget();
    let mut batch = Batch { region, items: Vec::with_capacity(planned.len()) };
    for candidate in planned {
        if region.drop_if_orphaned(candidate.slot, epoch, live) {
            continue;
        }
        // Fails only if its requester withdrew it since the scan.
        if let Ok(owner) = region.take(candidate.slot, epoch) {
            batch.items.push(Item { slot: candidate.slot, owner, answer: Answer::None });
        }
    }
    if batch.items.is_empty() {
        return PassDone::default();
    }
    let started = std::time::Instant::now();
    pass(&mut batch);
    let took = started.elapsed();
    // Before the first answer is published: a request submitted after this instant may come
    // from a client that got its answer, one submitted before it cannot.
    let answered_ns = monotonic_ns();

    let (mut done, mut failed) = (0, 0);
    let mut owners: Vec<u32> = Vec::with_capacity(4);
    let mut distinct: Vec<Requester> = Vec::with_capacity(4);
    for item in &batch.items {
        let result = match &item.answer {
            Answer::Output(len) => Ok(*len),
            Answer::Failed(reason) => Err(reason.as_str()),
            Answer::None => Err("the service's pass left this request unanswered"),
        };
        match region.finish(item.slot, epoch, result) {
            Ok(()) if result.is_ok() => done += 1,
            Ok(()) => failed += 1,
            Err(e) => tracing::warn!(slot = item.slot, %e, "lane: cannot finish a taken request"),
        }
        if !distinct.contains(&item.owner) {
            distinct.push(item.owner);
        }
        if !owners.contains(&(item.owner.index as u32)) {
            owners.push(item.owner.index as u32);
        }
    }
    for &owner in &owners {
        region.notify(owner);
    }
    region.record_pass(done, failed, distinct.len(), took);
    PassDone { done, failed, answered_ns }
}

/// What [`run_pass`] did.
#[derive(Debug, Default, Clone, Copy)]
struct PassDone {
    done: u64,
    failed: u64,
    /// `CLOCK_MONOTONIC` ns just before its answers were published (0: no pass ran).
    answered_ns: u64,
}

fn duration_ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn ns_duration(ns: u64) -> Duration {
    Duration::from_nanos(ns)
}
