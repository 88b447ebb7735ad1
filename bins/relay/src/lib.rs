//! `e2a-relay`: the inbound SMTP service.
//!
//! [`run`] serves SMTP sessions ([`session`]) on the SMTP listener and the
//! ops endpoints on the ops listener until the shutdown token is cancelled,
//! then drains open sessions. `main.rs` only calls [`e2a_runtime::main`]
//! with [`serve`]; tests call [`run`] with port-0 listeners and their own
//! token.
//!
//! Accepted mail goes through [`gateway::Gateway`]: authenticated, signed,
//! threaded and stored (one transaction, shared by the messages of the
//! sessions that finish DATA at the same moment: [`ingests`]) before the
//! session answers `250`.

pub mod backend;
pub mod config;
pub mod gateway;
pub mod ingests;
pub mod lines;
pub mod recipients;
pub mod server;
pub mod session;
pub mod tls;

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
/// every open session has answered `421 4.3.0` and closed. SPF/DKIM/DMARC
/// use the system resolver or none, per `E2A_SMTP_AUTH_DNS`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let authenticator = match config.smtp_auth_dns {
        config::AuthDns::System => Some(
            e2a_mail::auth::Authenticator::system(std::time::Duration::from_millis(config.smtp_dns_timeout_ms))
                .map_err(|e| format!("cannot set up DNS for SPF/DKIM/DMARC (E2A_SMTP_AUTH_DNS=disabled skips it): {e}"))?,
        ),
        config::AuthDns::Disabled => None,
    };
    run_with(config, listeners, shutdown, authenticator).await
}

/// [`run`] with an explicit authenticator (`None`: no DNS checks), e.g. one
/// answering from recorded DNS records in tests.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    authenticator: Option<e2a_mail::auth::Authenticator>,
) -> Result<(), BoxError> {
    let Some(store) =
        e2a_runtime::boot::connect_and_migrate("relay", &config.common, &shutdown).await?
    else {
        return Ok(());
    };
    tracing::info!(
        smtp = %listeners.smtp.local_addr()?,
        ops = %listeners.ops.local_addr()?,
        domain = %config.smtp_domain,
        max_connections = config.smtp_max_connections,
        auth_dns = ?config.smtp_auth_dns,
        "relay listening"
    );
    let trusted = config
        .smtp_trusted_signing_domains
        .iter()
        .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    let gateway = Arc::new(gateway::Gateway::new(
        store.clone(),
        authenticator,
        config.smtp_domain.clone(),
        trusted,
        config.limits.limits(),
        std::time::Duration::from_millis(config.smtp_recipient_cache_ms),
    ));
    let ops = e2a_runtime::ops::OpsServer::spawn(
        listeners.ops,
        "relay",
        store,
        &config.common.http,
        shutdown.clone(),
    );
    server::serve(
        listeners.smtp,
        Arc::new(config.session_config()?),
        gateway,
        server::ConnectionLimits {
            total: config.smtp_max_connections as usize,
            per_ip: config.smtp_max_connections_per_ip as usize,
        },
        shutdown.clone(),
    )
    .await;
    ops.stop(&shutdown).await?;
    Ok(())
}
