//! The kill schedule: which process dies when, drawn from a seeded generator so a run can be
//! repeated exactly. `--kill owner,worker --every 3` kills one of them every 3 s (alternating
//! at random); `--kill owner@5,worker@3` gives each target its own period; `workers` (or
//! `workers:2`) kills several workers at once.
//!
//! ```
//! use forkless_chaos::schedule::{parse_plans, Target};
//! let plans = parse_plans("owner@5,worker@3,workers:2", 4.0).unwrap();
//! assert_eq!(plans[0].target, Target::Owner);
//! assert_eq!(plans[2].target, Target::Workers(2));
//! ```

use std::time::Duration;

/// What a kill aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Owner,
    /// One worker, chosen at random.
    Worker,
    /// This many workers at once.
    Workers(usize),
    /// The worker that runs the batch lane's passes right now (its lease holder).
    Leader,
}

/// One target and how often it is hit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub target: Target,
    pub every: Duration,
}

/// Parses `--kill` (`owner`, `worker`, `workers[:N]`, each with an optional `@SECS`; or
/// `none` for a load run without kills, a benchmark).
pub fn parse_plans(text: &str, default_every: f64) -> Result<Vec<Plan>, String> {
    if text.trim() == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, every) = match item.split_once('@') {
                Some((name, secs)) => (name, secs.parse::<f64>().map_err(|_| format!("bad period in {item:?}"))?),
                None => (item, default_every),
            };
            let every = Duration::try_from_secs_f64(every)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("the period in {item:?} must be a positive number of seconds"))?;
            let target = match name.split_once(':') {
                None if name == "owner" => Target::Owner,
                None if name == "worker" => Target::Worker,
                None if name == "workers" => Target::Workers(2),
                None if name == "leader" => Target::Leader,
                Some(("workers", n)) => Target::Workers(n.parse().map_err(|_| format!("bad count in {item:?}"))?),
                _ => return Err(format!("unknown kill target {item:?}: use owner, worker, workers[:N] or leader")),
            };
            Ok(Plan { target, every })
        })
        .collect()
}

/// The seeded generator behind every random choice of a run (the demo's SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(crate::reference::seeded::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(crate::reference::seeded::SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A period jittered by ±20 %, so kills do not fall into lockstep with anything.
    pub fn jitter(&mut self, every: Duration) -> Duration {
        let factor = 0.8 + 0.4 * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        every.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_means_no_kills() {
        assert!(parse_plans("none", 3.0).unwrap().is_empty());
        assert!(parse_plans("none,owner", 3.0).is_err());
    }

    #[test]
    fn plans_parse_and_reject() {
        let plans = parse_plans("owner,worker@2.5", 3.0).unwrap();
        assert_eq!(
            plans,
            vec![
                Plan { target: Target::Owner, every: Duration::from_secs(3) },
                Plan { target: Target::Worker, every: Duration::from_millis(2500) },
            ]
        );
        assert!(parse_plans("janitor", 1.0).is_err());
        assert!(parse_plans("owner@-1", 1.0).is_err());
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.below(5), b.below(5));
        }
        let d = Rng::new(1).jitter(Duration::from_secs(10));
        assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12));
    }
}
