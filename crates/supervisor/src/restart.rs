//! The restart policy: the first restart is immediate (as supervisord and Erlang/OTP do; for
//! the owner that is what keeps recovery in milliseconds). A child that dies again before it
//! has stayed up `reset_after_s` waits `backoff_initial_ms`, then twice that, and so on up to
//! `backoff_max_ms`; staying up that long makes it healthy again. The slot spreads each delay
//! by ±20 % ([`jittered`]).

use std::time::Duration;

use crate::config::RestartConfig;

/// Delay before the next restart of one child slot.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    /// Deaths since the child last stayed up for `reset_after`.
    quick_deaths: u32,
}

impl Backoff {
    pub fn new(config: &RestartConfig) -> Self {
        Backoff {
            initial: Duration::from_millis(config.backoff_initial_ms),
            max: Duration::from_millis(config.backoff_max_ms),
            reset_after: config.reset_after(),
            quick_deaths: 0,
        }
    }

    /// The delay before restarting a child that exited after running for `uptime`.
    pub fn after_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.reset_after {
            self.quick_deaths = 0;
        }
        let delay = match self.quick_deaths {
            0 => Duration::ZERO,
            n => self.initial.saturating_mul(1 << (n - 1).min(31)).min(self.max),
        };
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        delay
    }
}

/// Spreads a delay by ±20 % so that processes that died together do not restart in lockstep
/// (a thundering herd on the GPU, the disk or the listener). Zero stays zero.
pub fn jittered(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let mut x = u64::from(nanos) ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let factor = 0.8 + 0.4 * (x >> 11) as f64 / (1u64 << 53) as f64;
    delay.mul_f64(factor)
}

/// Restart intensity, as Erlang/OTP supervisors count it: more than `max_restarts` unplanned
/// restarts within `within` means the failure is not transient, and restarting on is a loop.
#[derive(Debug)]
pub struct Intensity {
    max_restarts: u32,
    within: Duration,
    recent: std::collections::VecDeque<std::time::Instant>,
}

impl Intensity {
    pub fn new(config: &RestartConfig) -> Self {
        Intensity { max_restarts: config.max_restarts, within: config.within(), recent: Default::default() }
    }

    /// Records one restart now; `Err` with the count when the limit is exceeded.
    pub fn record(&mut self, now: std::time::Instant) -> Result<(), u32> {
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|&t| now.duration_since(t) > self.within) {
            self.recent.pop_front();
        }
        match u32::try_from(self.recent.len()) {
            Ok(n) if n <= self.max_restarts => Ok(()),
            Ok(n) => Err(n),
            Err(_) => Err(u32::MAX),
        }
    }

    pub fn window(&self) -> Duration {
        self.within
    }
}

/// What a child's exit means for its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit status 0: it stopped on its own terms (e.g. recycled after `max_requests`).
    /// Restarted at once; not a failure.
    Planned,
    /// Exit status 78 (`EX_CONFIG`): restarting cannot help; the supervisor stops.
    Fatal,
    /// Exit status 75 (`EX_TEMPFAIL`): a resource (memory, GPU memory) is not free yet, e.g.
    /// while a dead process's memory is reclaimed. Retried with backoff; not a crash.
    Temporary,
    /// Anything else (a signal, another status): a crash, counted against the intensity.
    Crash,
}

pub use forkless_bus::child::EXIT_TEMPORARY;

impl ExitKind {
    pub fn of(status: &std::io::Result<std::process::ExitStatus>) -> ExitKind {
        match status.as_ref().ok().and_then(|s| s.code()) {
            Some(0) => ExitKind::Planned,
            Some(forkless_bus::child::EXIT_FATAL) => ExitKind::Fatal,
            Some(EXIT_TEMPORARY) => ExitKind::Temporary,
            _ => ExitKind::Crash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn intensity_trips_only_within_the_window() {
        let config = RestartConfig { max_restarts: 2, within_s: 10.0, ..RestartConfig::default() };
        let mut intensity = Intensity::new(&config);
        let t0 = Instant::now();
        assert_eq!(intensity.record(t0), Ok(()));
        assert_eq!(intensity.record(t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(intensity.record(t0 + Duration::from_secs(2)), Err(3));
        let mut intensity = Intensity::new(&config);
        for s in [0, 11, 22, 33] {
            assert_eq!(intensity.record(t0 + Duration::from_secs(s)), Ok(()));
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200), "{d:?}");
        }
    }

    #[test]
    fn exits_are_classified_by_status() {
        use std::os::unix::process::ExitStatusExt;
        let status = |raw| Ok(std::process::ExitStatus::from_raw(raw));
        assert_eq!(ExitKind::of(&status(0)), ExitKind::Planned);
        assert_eq!(ExitKind::of(&status(78 << 8)), ExitKind::Fatal);
        assert_eq!(ExitKind::of(&status(75 << 8)), ExitKind::Temporary);
        assert_eq!(ExitKind::of(&status(1 << 8)), ExitKind::Crash);
        assert_eq!(ExitKind::of(&status(9)), ExitKind::Crash);
    }
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        use crate::{config::RestartConfig, restart::Backoff};
        use std::time::Duration;
        let config =
            RestartConfig { backoff_initial_ms: 100, backoff_max_ms: 400, reset_after_s: 10.0, ..Default::default() };
        let mut backoff = Backoff::new(&config);
        let quick = Duration::from_millis(5);
        assert_eq!(backoff.after_exit(quick), Duration::ZERO);
        assert_eq!(backoff.after_exit(quick), Duration::from_millis(100));
        assert_eq!(backoff.after_exit(quick), Duration::from_millis(200));
        assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
        assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
        assert_eq!(backoff.after_exit(Duration::from_secs(60)), Duration::ZERO);
    }
}
