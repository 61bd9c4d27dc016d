//! Log output: the supervisor's own events and every child's lines, through `tracing`, as
//! human-readable text (default) or one JSON object per line (`--log-format json`).
//!
//! ```no_run
//! forkless_supervisor::logging::init(forkless_supervisor::logging::LogFormat::Human);
//! ```

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.with_ansi(use_color()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Logging for the owner process (`supervisor owner`): no timestamps or colours, since the
/// supervisor re-emits each line with its own timestamp, role, index and pid. (Workers log
/// through `forkless_worker::logging`.)
pub fn init_owner() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
}

fn use_color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
}
