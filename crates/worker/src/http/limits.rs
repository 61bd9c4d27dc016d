//! The HTTP limits a worker serves with (`[workers.http]` in config.toml), and the rate-limited
//! log lines that say when one fires.
//!
//! The supervisor passes them in ONE variable, `FORKLESS_HTTP`, as `key=value` pairs:
//! `header_timeout_ms=10000,body_timeout_ms=30000,idle_timeout_ms=75000,max_body_bytes=2097152,max_connections=1024`.
//! A key left out keeps its default; an unknown key or a bad value is a fatal configuration
//! error (exit 78), since restarting would not fix it.
//!
//! ```
//! let limits = forkless_worker::http::HttpLimits::parse("header_timeout_ms=500,max_connections=64").unwrap();
//! assert_eq!(limits.header_timeout, std::time::Duration::from_millis(500));
//! assert_eq!(limits.max_body_bytes, 2 << 20); // the default
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable that carries the limits.
pub use forkless_bus::ENV_HTTP;

/// Limits against slow, idle and oversized clients. Defaults are what a production service
/// behind a load balancer ships with (docs/WORKERS.md says why each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From a connection's accept, or from the first byte of a request on a kept-alive one, to
    /// the end of the request's headers (slowloris).
    pub header_timeout: Duration,
    /// From the end of the headers to the end of the body (a stalled or trickled upload).
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Largest request body; a larger one gets 413.
    pub max_body_bytes: usize,
    /// Connections this worker serves at once; the next ones get a fast 503 and are closed.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_body_bytes: 2 << 20,
            max_connections: 1024,
        }
    }
}

/// `FORKLESS_HTTP` is not readable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ENV_HTTP}={value:?}: {problem}; it is set by `supervisor run` from [workers.http]")]
pub struct LimitsError {
    pub value: String,
    pub problem: String,
}

impl HttpLimits {
    /// The limits the supervisor set, or the defaults outside `supervisor run`.
    pub fn from_env() -> Result<HttpLimits, LimitsError> {
        match std::env::var(ENV_HTTP) {
            Ok(value) => HttpLimits::parse(&value),
            Err(_) => Ok(HttpLimits::default()),
        }
    }

    /// Parses the `FORKLESS_HTTP` encoding.
    pub fn parse(value: &str) -> Result<HttpLimits, LimitsError> {
        let bad = |problem: String| LimitsError { value: value.into(), problem };
        let mut limits = HttpLimits::default();
        for pair in value.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, number) = pair.split_once('=').ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
            let number: u64 = number.trim().parse().map_err(|_| bad(format!("{key}: {number:?} is not a number")))?;
            let positive = |what: &str| match number {
                0 => Err(bad(format!("{what} must be at least 1"))),
                n => Ok(n),
            };
            match key.trim() {
                "header_timeout_ms" => limits.header_timeout = Duration::from_millis(positive(key)?),
                "body_timeout_ms" => limits.body_timeout = Duration::from_millis(positive(key)?),
                "idle_timeout_ms" => limits.idle_timeout = Duration::from_millis(positive(key)?),
                "max_body_bytes" => limits.max_body_bytes = positive(key)? as usize,
                "max_connections" => limits.max_connections = positive(key)? as usize,
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(limits)
    }

    /// The `FORKLESS_HTTP` encoding of these limits.
    pub fn to_env_value(&self) -> String {
        format!(
            "header_timeout_ms={},body_timeout_ms={},idle_timeout_ms={},max_body_bytes={},max_connections={}",
            self.header_timeout.as_millis(),
            self.body_timeout.as_millis(),
            self.idle_timeout.as_millis(),
            self.max_body_bytes,
            self.max_connections
        )
    }
}

/// One kind of event worth a log line, but not one line per occurrence: under attack a limit
/// fires thousands of times a second. At most one line per second per kind, with the count.
#[derive(Debug)]
pub(crate) struct Alarm {
    what: &'static str,
    since_last: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Alarm {
    pub(crate) const fn new(what: &'static str) -> Alarm {
        Alarm { what, since_last: AtomicU64::new(0), last: Mutex::new(None) }
    }

    /// Records one occurrence; logs (warn) if a second has passed since the last line.
    pub(crate) fn fire(&self, detail: impl FnOnce() -> String) {
        let count = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().expect("alarm lock");
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        self.since_last.store(0, Ordering::Relaxed);
        tracing::warn!(limit = self.what, count, "{} ({count} since the last report)", detail());
    }
}

/// The alarms of one worker, one per limit.
#[derive(Debug)]
pub(crate) struct Alarms {
    pub(crate) header_timeout: Alarm,
    pub(crate) idle_timeout: Alarm,
    pub(crate) body_timeout: Alarm,
    pub(crate) body_too_large: Alarm,
    pub(crate) connection_limit: Alarm,
    pub(crate) accept_failed: Alarm,
}

impl Default for Alarms {
    fn default() -> Self {
        Alarms {
            header_timeout: Alarm::new("header_timeout"),
            idle_timeout: Alarm::new("idle_timeout"),
            body_timeout: Alarm::new("body_timeout"),
            body_too_large: Alarm::new("max_body_bytes"),
            connection_limit: Alarm::new("max_connections"),
            accept_failed: Alarm::new("accept"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_keys() {
        let limits = HttpLimits {
            header_timeout: Duration::from_millis(250),
            body_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(3),
            max_body_bytes: 10,
            max_connections: 20,
        };
        assert_eq!(HttpLimits::parse(&limits.to_env_value()).unwrap(), limits);
        assert_eq!(HttpLimits::parse("").unwrap(), HttpLimits::default());
        for (bad, needle) in [
            ("header_timeout=5", "unknown key \"header_timeout\""),
            ("max_connections=0", "at least 1"),
            ("max_body_bytes=lots", "not a number"),
            ("idle", "not key=value"),
        ] {
            let err = HttpLimits::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("[workers.http]"), "{bad}: {err}");
        }
    }
}
