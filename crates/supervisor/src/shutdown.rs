//! Stop requests: SIGTERM and SIGINT ask for a graceful stop (workers drain up to
//! `graceful_timeout_s`, then the owner stops, exit 0); SIGQUIT for a fast one (no grace).
//! A second TERM/INT during a graceful stop (or `supervisor stop --now`) turns it into a fast
//! one: children still in their grace period are killed at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A stop request, graceful or fast, shared by everything that must react to it.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    fast: CancellationToken,
}

impl Stop {
    /// Asks for a graceful stop (or a fast one; a fast one may follow a graceful one).
    pub fn request(&self, fast: bool) {
        if fast {
            self.fast.cancel();
        }
        self.token.cancel();
    }

    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn is_fast(&self) -> bool {
        self.fast.is_cancelled()
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Cancelled when the stop becomes fast: whatever waits out a grace period stops waiting.
    pub fn fast_token(&self) -> CancellationToken {
        self.fast.clone()
    }
}

/// TERM/INT → graceful stop (a second one → fast); QUIT → fast stop.
pub fn on_signals(stop: Stop) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    tokio::spawn(async move {
        loop {
            let fast = tokio::select! {
                _ = term.recv() => stop.is_requested(),
                _ = int.recv() => stop.is_requested(),
                _ = quit.recv() => true,
            };
            if fast {
                tracing::warn!("fast stop: children get no grace");
            } else {
                tracing::info!("stopping gracefully (send SIGQUIT, or the signal again, to stop at once)");
            }
            stop.request(fast);
        }
    });
    Ok(())
}
