//! Batch formation, without I/O: which queued requests the next pass takes, or how long to wait.
//!
//! The rule: take the oldest queued requests (by their lane-wide sequence number, so requests
//! of every process are served first come, first served) up to `max_batch`. If fewer than
//! `max_batch` are queued, wait until `max_wait` after the oldest one was submitted, then take
//! whatever is there. Under load the queue fills while the previous pass runs, so passes start
//! full without waiting; at low load a lone request waits at most `max_wait`.
//!
//! Submission times come from shared memory, so they are untrusted: a time in the future is
//! read as "now", which bounds every wait by `max_wait` whatever another process wrote.
//!
//! ```
//! use forkless_bus::lane::batcher::{plan, Candidate, Plan, Policy};
//! let policy = Policy { max_batch: 2, max_wait_ns: 1_000 };
//! let mut queued = vec![
//!     Candidate { slot: 7, seq: 12, submitted_ns: 100 },
//!     Candidate { slot: 3, seq: 10, submitted_ns: 90 },
//! ];
//! assert_eq!(plan(&mut queued, 95, &policy), Plan::Take);
//! assert_eq!(queued.iter().map(|c| c.slot).collect::<Vec<_>>(), [3, 7], "oldest first");
//! queued.truncate(1);
//! assert_eq!(plan(&mut queued, 95, &policy), Plan::WaitUntil(1_090));
//! ```

/// How passes are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// At most this many requests share one pass (at least 1).
    pub max_batch: usize,
    /// A pass that is not full waits until this long after its oldest request was submitted.
    pub max_wait_ns: u64,
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

/// Decides the next pass over the `queued` requests at time `now_ns`. On [`Plan::Take`] the
/// vector holds exactly the requests to take, oldest first; otherwise its order is unspecified.
pub fn plan(queued: &mut Vec<Candidate>, now_ns: u64, policy: &Policy) -> Plan {
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
    let deadline = oldest.saturating_add(policy.max_wait_ns);
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
        assert_eq!(plan(&mut Vec::new(), 5, &Policy { max_batch: 4, max_wait_ns: 10 }), Plan::Idle);
    }

    #[test]
    fn zero_wait_takes_at_once() {
        let mut q = vec![Candidate { slot: 0, seq: 0, submitted_ns: 100 }];
        assert_eq!(plan(&mut q, 100, &Policy { max_batch: 4, max_wait_ns: 0 }), Plan::Take);
    }

    #[test]
    fn submission_times_in_the_future_cannot_extend_the_wait() {
        let mut q = vec![Candidate { slot: 0, seq: 0, submitted_ns: u64::MAX }];
        assert_eq!(plan(&mut q, 100, &Policy { max_batch: 4, max_wait_ns: 10 }), Plan::WaitUntil(110));
    }

    proptest! {
        #[test]
        fn takes_the_oldest_and_never_more_than_max_batch(
            queued in candidates(), now in 0u64..3_000, max_batch in 1usize..10, max_wait in 0u64..1_500,
        ) {
            let policy = Policy { max_batch, max_wait_ns: max_wait };
            let mut taken = queued.clone();
            let decision = plan(&mut taken, now, &policy);
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
                    }
                }
                Plan::WaitUntil(deadline) => {
                    prop_assert!(queued.len() < max_batch);
                    prop_assert!(deadline > now && deadline <= now + max_wait, "waits at most max_wait");
                }
            }
        }
    }
}
