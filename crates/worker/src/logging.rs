//! A worker's log output: `tracing` to stderr, with no timestamps or colours, because the
//! supervisor re-emits every line of a child with its own timestamp, role, index and pid (as
//! text, or as JSON with `supervisor run --log-format json`). `RUST_LOG` sets the level
//! (default `info`; `[workers] env = { RUST_LOG = "debug" }` in the config).
//!
//! ```no_run
//! forkless_worker::logging::init();
//! tracing::info!("this line reaches the supervisor's log with this worker's index and pid");
//! ```

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
}
