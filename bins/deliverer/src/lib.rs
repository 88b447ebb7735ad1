//! `e2a-deliverer`: will deliver webhook events and outbound mail.
//!
//! **Webhook and mail delivery are not implemented yet; this build only
//! waits for work.** [`run`] boots (connect, migrate), serves the ops
//! endpoints and runs [`wake::wait_for_work`] — `LISTEN` on
//! `webhook_events_new` and `mail_outbox_new` on a dedicated connection plus
//! a 1 s fallback tick — until the shutdown token is cancelled. `main.rs`
//! only calls [`e2a_runtime::main`] with [`serve`]; tests call [`run_with`]
//! with a port-0 listener, their own token and a [`Wakeups`] to observe.

pub mod config;
pub mod wake;

use std::str::FromStr;

use e2a_runtime::{BoxError, CancellationToken, config::CommonArgs};
use tokio::net::TcpListener;

pub use config::Config;
pub use wake::{WakeSource, WakeStats, Wakeups};

/// The listeners [`run`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// Binds the configured address and runs the service (what `main` calls).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), BoxError> {
    let ops = e2a_runtime::bind_ops(&config.common, config::DEFAULT_OPS_PORT).await?;
    run(config, Listeners { ops }, shutdown).await
}

/// [`run_with`] with counters nobody observes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    run_with(config, listeners, shutdown, Wakeups::new()).await
}

/// Connects and migrates, then waits for work (recording wake-ups in
/// `wakeups`) and serves the ops endpoints until `shutdown` is cancelled.
/// Returns promptly after cancellation: there is no in-flight delivery to
/// drain yet.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    wakeups: Wakeups,
) -> Result<(), BoxError> {
    let Some(store) =
        e2a_runtime::boot::connect_and_migrate("deliverer", &config.common, &shutdown).await?
    else {
        return Ok(());
    };
    let listen_config = listen_config(&config.common)?;
    tracing::info!(
        ops = %listeners.ops.local_addr()?,
        "deliverer started (webhook and mail delivery are not implemented yet; only waiting for work)"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(
        listeners.ops,
        "deliverer",
        store,
        &config.common.http,
        shutdown.clone(),
    );
    wake::wait_for_work(listen_config, wakeups, shutdown.clone()).await;
    ops.stop(&shutdown).await?;
    Ok(())
}

/// Settings of the dedicated `LISTEN` connection: the configured URL and
/// connect timeout, [`wake::LISTEN_APPLICATION_NAME`] unless the URL names
/// an application, and TCP keepalives so a dead peer is noticed.
fn listen_config(common: &CommonArgs) -> Result<tokio_postgres::Config, BoxError> {
    let mut pg = tokio_postgres::Config::from_str(common.db.url()?)?;
    pg.connect_timeout(std::time::Duration::from_millis(
        common.db.db_connect_timeout_ms,
    ));
    pg.keepalives(true);
    pg.keepalives_idle(std::time::Duration::from_secs(30));
    if pg.get_application_name().is_none() {
        pg.application_name(wake::LISTEN_APPLICATION_NAME);
    }
    Ok(pg)
}
