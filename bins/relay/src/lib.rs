//! `e2a-relay`: the inbound SMTP service.
//!
//! [`run`] serves SMTP sessions ([`session`]) on the SMTP listener and the
//! ops endpoints on the ops listener until the shutdown token is cancelled,
//! then drains open sessions. `main.rs` only calls [`e2a_runtime::main`]
//! with [`serve`]; tests call [`run`] with port-0 listeners and their own
//! token.
//!
//! **Mail acceptance is not enabled in this build**: sessions speak SMTP up
//! to `MAIL FROM`, which is answered with the temporary failure `451 4.3.2
//! mail acceptance is not enabled in this build; try again later`, so
//! sending servers keep their messages and retry. Nothing is stored.

pub mod config;
pub mod lines;
pub mod server;
pub mod session;

use std::sync::Arc;

use e2a_runtime::{BoxError, CancellationToken};
use tokio::net::TcpListener;

pub use config::Config;

/// The listeners [`run`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// Inbound SMTP.
    pub smtp: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// Binds the configured addresses and runs the service (what `main` calls).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), BoxError> {
    let smtp = e2a_runtime::bind(config.smtp_addr, "E2A_SMTP_ADDR").await?;
    let ops = e2a_runtime::bind_ops(&config.common, config::DEFAULT_OPS_PORT).await?;
    run(config, Listeners { smtp, ops }, shutdown).await
}

/// Connects and migrates, then serves SMTP until `shutdown` is cancelled and
/// every open session has answered `421 4.3.0` and closed.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let store = e2a_runtime::boot::connect_and_migrate("relay", &config.common).await?;
    tracing::info!(
        smtp = %listeners.smtp.local_addr()?,
        ops = %listeners.ops.local_addr()?,
        domain = %config.smtp_domain,
        max_connections = config.smtp_max_connections,
        "relay listening (mail acceptance is not enabled in this build: MAIL FROM gets 451)"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(listeners.ops, "relay", store, shutdown.clone());
    server::serve(
        listeners.smtp,
        Arc::new(config.session_config()),
        config.smtp_max_connections as usize,
        shutdown.clone(),
    )
    .await;
    ops.stop(&shutdown).await?;
    Ok(())
}
