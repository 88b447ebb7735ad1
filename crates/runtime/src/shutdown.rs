//! Graceful shutdown: the first SIGINT, SIGTERM or SIGHUP cancels a
//! [`CancellationToken`] that every task watches; services then drain
//! in-flight work within the grace period. A second signal exits at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT/SIGTERM/SIGHUP. Must be called
/// inside a Tokio runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancel first: logging can fail (closed pipe) and must never keep
        // the service from draining.
        trigger.cancel();
        tracing::info!("shutdown signal received; draining");
        wait_for_signal().await;
        tracing::warn!("second shutdown signal; exiting immediately");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        // SIGHUP too: a closed terminal (or `cargo xtask dev` losing its
        // session) must stop the service, not orphan it.
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = hangup.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves `grace` after `token` is cancelled: race it against a service's
/// future to enforce the drain deadline.
pub async fn drain_deadline(token: CancellationToken, grace: Duration) {
    token.cancelled().await;
    tokio::time::sleep(grace).await;
}
