//! The restart policy: the first restart is immediate (as supervisord and Erlang/OTP do; for
//! the owner that is what keeps recovery in milliseconds). A child that dies again before it
//! has stayed up `reset_after_s` waits `backoff_initial_ms`, then twice that, and so on up to
//! `backoff_max_ms`; staying up that long makes it healthy again.
//!
//! ```
//! use std::time::Duration;
//! use forkless_supervisor::{config::RestartConfig, restart::Backoff};
//! let mut backoff = Backoff::new(&RestartConfig { backoff_initial_ms: 100, backoff_max_ms: 400, reset_after_s: 10.0 });
//! let quick = Duration::from_millis(5);
//! assert_eq!(backoff.after_exit(quick), Duration::ZERO);
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(100));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(200));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
//! assert_eq!(backoff.after_exit(Duration::from_secs(60)), Duration::ZERO);
//! ```

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
            reset_after: Duration::from_secs_f64(config.reset_after_s),
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
            n => self
                .initial
                .saturating_mul(1 << (n - 1).min(31))
                .min(self.max),
        };
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        delay
    }
}
