//! Stop requests: SIGTERM and SIGINT cancel one token that the whole supervisor watches.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! let stop = tokio_util::sync::CancellationToken::new();
//! forkless_supervisor::shutdown::on_signals(stop.clone())?;
//! stop.cancelled().await;
//! # Ok(()) }
//! ```

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `stop` on the first SIGTERM or SIGINT.
pub fn on_signals(stop: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully"),
            _ = int.recv() => tracing::info!("SIGINT: stopping gracefully"),
            _ = stop.cancelled() => return,
        }
        stop.cancel();
    });
    Ok(())
}
