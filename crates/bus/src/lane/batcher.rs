//! Batch formation, without I/O: which queued requests the next pass takes, or how long to wait.
//!
//! The rule: take the oldest queued requests (by their lane-wide sequence number, so requests
//! of every process are served first come, first served) up to `max_batch`. If fewer than
//! `max_batch` are queued, wait until `max_wait` after the oldest one was submitted, then take
//! whatever is there. Under load the queue fills while the previous pass runs, so passes start
//! full without waiting; at low load a lone request waits at most `max_wait`.
//!
//! **Linger** (`linger`, off by default) is for closed-loop clients, which send their next
//! request when the answer to the last one arrives. Without it such clients settle into two
//! cohorts: the requests queued during a pass have waited long enough when it ends, so the next
//! pass leaves at once without the answers of the pass that just ended, whose requests come back
//! a round trip later and wait a whole pass. Each pass then carries half the clients and still
//! reads every weight (docs/LANE.md, "Cohorts"). With `linger`, a pass that is not full also
//! waits, up to `linger` after the previous pass answered, until as many requests were submitted
//! since then as that pass carried. Open-loop traffic pays up to `linger` per pass for nothing,
//! hence off by default.
//!
//! Submission times come from shared memory, so they are untrusted: a time in the future is
//! read as "now", which bounds every wait by `max_wait` (or `linger` after a pass) whatever
//! another process wrote.
//!
//! ```
//! use forkless_bus::lane::batcher::{plan, Candidate, Plan, Policy};
//! let policy = Policy { max_batch: 2, max_wait_ns: 1_000, linger_ns: 0 };
//! let mut queued = vec![
//!     Candidate { slot: 7, seq: 12, submitted_ns: 100 },
//!     Candidate { slot: 3, seq: 10, submitted_ns: 90 },
//! ];
//! assert_eq!(plan(&mut queued, 95, None, &policy), Plan::Take);
//! assert_eq!(queued.iter().map(|c| c.slot).collect::<Vec<_>>(), [3, 7], "oldest first");
//! queued.truncate(1);
//! assert_eq!(plan(&mut queued, 95, None, &policy), Plan::WaitUntil(1_090));
//! ```

/// How passes are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// At most this many requests share one pass (at least 1).
    pub max_batch: usize,
    /// A pass that is not full waits until this long after its oldest request was submitted.
    pub max_wait_ns: u64,
    /// A pass that is not full also waits until this long after the previous pass ended, unless
    /// as many requests as that pass carried were submitted since (0: off).
    pub linger_ns: u64,
}

/// The pass before the one being planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousPass {
    /// `CLOCK_MONOTONIC` nanoseconds just before its answers were published: requests submitted
    /// since may be its clients coming back. (Taken after publishing instead, a quick client's
    /// next request would look older than the pass, and the next pass would wait out `linger`
    /// for a client that is already queued: seen in CI on a loaded machine.)
    pub answered_ns: u64,
    /// How many requests it carried.
    pub size: usize,
}

/// A queued request as the runner saw it while scanning the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Slot index.
    pub slot: u32,
    /// Lane-wide submission order (smaller is older).
    pub seq: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when it was submitted (system-wide, so comparable across
    /// processes).
    pub submitted_ns: u64,
}

/// What the runner does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing is queued: wait for a submission.
    Idle,
    /// Run a pass now over the candidates left in the vector (sorted oldest first, at most
    /// `max_batch`).
    Take,
    /// Not full and not old enough: wait for more submissions until this `CLOCK_MONOTONIC`
    /// instant (ns), then plan again.
    WaitUntil(u64),
}

/// Decides the next pass over the `queued` requests at time `now_ns`, after `previous` (the
/// runner's last pass in this term, if any). On [`Plan::Take`] the vector holds exactly the
/// requests to take, oldest first; otherwise its order is unspecified.
pub fn plan(queued: &mut Vec<Candidate>, now_ns: u64, previous: Option<PreviousPass>, policy: &Policy) -> Plan {
    if queued.is_empty() {
        return Plan::Idle;
    }
    let max_batch = policy.max_batch.max(1);
    queued.sort_unstable_by_key(|c| (c.seq, c.slot));
    if queued.len() >= max_batch {
        queued.truncate(max_batch);
        return Plan::Take;
    }
    let oldest = queued.iter().map(|c| c.submitted_ns.min(now_ns)).min().unwrap_or(now_ns);
    let mut deadline = oldest.saturating_add(policy.max_wait_ns);
    if let Some(previous) = previous.filter(|_| policy.linger_ns > 0) {
        let answered = previous.answered_ns.min(now_ns);
        let returned = queued.iter().filter(|c| c.submitted_ns.min(now_ns) >= answered).count();
        if returned < previous.size {
            deadline = deadline.max(answered.saturating_add(policy.linger_ns));
        }
    }
    if now_ns >= deadline {
        Plan::Take
    } else {
        Plan::WaitUntil(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec((0u64..1_000, 0u64..2_000), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (seq, t))| Candidate { slot: i as u32, seq: seq * 64 + i as u64, submitted_ns: t })
                .collect()
        })
    }

    #[test]
    fn empty_queue_is_idle() {
        assert_eq!(plan(&mut Vec::new(), 5, None, &policy(4, 10, 0)), Plan::Idle);
    }

    #[test]
    fn zero_wait_takes_at_once() {
        let mut q = vec![Candidate { slot: 0, seq: 0, submitted_ns: 100 }];
        assert_eq!(plan(&mut q, 100, None, &policy(4, 0, 0)), Plan::Take);
    }

    #[test]
    fn submission_times_in_the_future_cannot_extend_the_wait() {
        let mut q = vec![Candidate { slot: 0, seq: 0, submitted_ns: u64::MAX }];
        assert_eq!(plan(&mut q, 100, None, &policy(4, 10, 0)), Plan::WaitUntil(110));
        let future_end = Some(PreviousPass { answered_ns: u64::MAX, size: 4 });
        assert_eq!(plan(&mut q, 100, future_end, &policy(4, 10, 50)), Plan::WaitUntil(150), "nor a pass end");
    }

    fn policy(max_batch: usize, max_wait_ns: u64, linger_ns: u64) -> Policy {
        Policy { max_batch, max_wait_ns, linger_ns }
    }

    /// Two cohorts of closed-loop clients: B queued during the pass that carried A. Without
    /// linger B leaves at once; with it B waits for A to come back, and the pass fills.
    #[test]
    fn linger_waits_for_the_previous_pass_to_come_back() {
        let at = |slot: u32, t: u64| Candidate { slot, seq: slot as u64, submitted_ns: t };
        let cohort_b = vec![at(0, 100), at(1, 200)];
        let previous = Some(PreviousPass { answered_ns: 1_000, size: 2 });
        assert_eq!(plan(&mut cohort_b.clone(), 1_000, previous, &policy(4, 100, 0)), Plan::Take, "no linger");
        let lingering = policy(4, 100, 300);
        assert_eq!(plan(&mut cohort_b.clone(), 1_000, previous, &lingering), Plan::WaitUntil(1_300));
        // One of A is back: still short of the two that left.
        let mut one_back = [cohort_b.clone(), vec![at(2, 1_150)]].concat();
        assert_eq!(plan(&mut one_back, 1_150, previous, &lingering), Plan::WaitUntil(1_300));
        // Both are back: go, though not full.
        let mut both_back = [cohort_b.clone(), vec![at(2, 1_150), at(3, 1_160)]].concat();
        assert_eq!(plan(&mut both_back, 1_160, previous, &policy(5, 100, 300)), Plan::Take);
        // They never come back: go at the linger's end.
        assert_eq!(plan(&mut cohort_b.clone(), 1_300, previous, &lingering), Plan::Take);
        // The first pass of a term, or a lone request long after the last pass: max_wait only.
        assert_eq!(plan(&mut vec![at(0, 900)], 950, None, &lingering), Plan::WaitUntil(1_000));
        let long_ago = Some(PreviousPass { answered_ns: 0, size: 2 });
        assert_eq!(plan(&mut vec![at(0, 5_000)], 5_000, long_ago, &lingering), Plan::WaitUntil(5_100));
    }

    proptest! {
        #[test]
        fn takes_the_oldest_and_never_more_than_max_batch(
            queued in candidates(), now in 0u64..3_000, max_batch in 1usize..10, max_wait in 0u64..1_500,
            linger in prop_oneof![Just(0u64), 0u64..1_500],
            previous in proptest::option::of((0u64..4_000, 0usize..40)),
        ) {
            let policy = Policy { max_batch, max_wait_ns: max_wait, linger_ns: linger };
            let previous = previous.map(|(answered_ns, size)| PreviousPass { answered_ns, size });
            let mut taken = queued.clone();
            let decision = plan(&mut taken, now, previous, &policy);
            match decision {
                Plan::Idle => prop_assert!(queued.is_empty()),
                Plan::Take => {
                    prop_assert!(!taken.is_empty() && taken.len() <= max_batch);
                    // FIFO: nothing left behind is older than anything taken.
                    let newest_taken = taken.iter().map(|c| c.seq).max().unwrap();
                    let left = queued.iter().filter(|c| !taken.contains(c));
                    for c in left {
                        prop_assert!(c.seq > newest_taken);
                    }
                    prop_assert!(taken.windows(2).all(|w| w[0].seq <= w[1].seq));
                    if taken.len() < max_batch {
                        prop_assert_eq!(taken.len(), queued.len(), "a pass that is not full takes all");
                        let oldest = queued.iter().map(|c| c.submitted_ns.min(now)).min().unwrap();
                        prop_assert!(now >= oldest.saturating_add(max_wait));
                        if let Some(p) = previous.filter(|_| linger > 0) {
                            let ended = p.answered_ns.min(now);
                            let back = queued.iter().filter(|c| c.submitted_ns.min(now) >= ended).count();
                            prop_assert!(back >= p.size || now >= ended + linger, "lingered for the returners");
                        }
                    }
                }
                Plan::WaitUntil(deadline) => {
                    prop_assert!(queued.len() < max_batch);
                    let longest = max_wait.max(if previous.is_some() { linger } else { 0 });
                    prop_assert!(deadline > now && deadline <= now + longest, "waits at most max_wait or linger");
                }
            }
        }
    }
}
