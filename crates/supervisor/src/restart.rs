//! The restart policy: exponential backoff between restarts of a child that keeps dying,
//! reset once it has stayed up for `reset_after_s`.
//!
//! ```
//! use std::time::Duration;
//! use forkless_supervisor::{config::RestartConfig, restart::Backoff};
//! let mut backoff = Backoff::new(&RestartConfig { backoff_initial_ms: 100, backoff_max_ms: 400, reset_after_s: 10.0 });
//! let quick = Duration::from_millis(5);
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(100));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(200));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
//! assert_eq!(backoff.after_exit(quick), Duration::from_millis(400));
//! assert_eq!(backoff.after_exit(Duration::from_secs(60)), Duration::from_millis(100));
//! ```

use std::time::Duration;

use crate::config::RestartConfig;

/// Delay before the next restart of one child slot.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(config: &RestartConfig) -> Self {
        let initial = Duration::from_millis(config.backoff_initial_ms);
        Backoff {
            initial,
            max: Duration::from_millis(config.backoff_max_ms),
            reset_after: Duration::from_secs_f64(config.reset_after_s),
            next: initial,
        }
    }

    /// The delay before restarting a child that exited after running for `uptime`.
    pub fn after_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}
