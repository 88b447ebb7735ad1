//! `e2a-runtime`: what every e2a service binary shares.
//!
//! * [`config`] — `E2A_*` environment configuration parsed with clap, so
//!   every binary has `--help` and invalid values fail start-up clearly.
//! * [`telemetry`] — tracing (human-readable by default, JSON with
//!   `E2A_LOG_FORMAT=json`, filtered by `RUST_LOG`).
//! * [`shutdown`] — SIGINT/SIGTERM to a [`CancellationToken`] with a drain
//!   deadline.
//! * [`ops`] — the ops listener: `/healthz`, `/readyz`, `/metrics`.
//! * [`serve`] — the HTTP server under every listener: header-read and idle
//!   timeouts, a connection cap, load shedding, graceful drain.
//! * [`boot`] — connect to Postgres with a bounded retry and migrate per
//!   `E2A_MIGRATION_MODE`.
//! * [`group_commit`] — many tasks' writes recorded in one transaction
//!   (the deliverer's outcomes, the relay's received messages).
//! * [`main`] — the few lines each `main.rs` calls.

pub mod boot;
pub mod config;
pub mod group_commit;
pub mod ops;
pub mod serve;
pub mod shutdown;
pub mod telemetry;

mod entry;

pub use entry::{BoxError, Service, error_chain, main};
pub use tokio_util::sync::CancellationToken;

/// Binds a listener, naming the variable that configures it in the error
/// (`cannot listen on 0.0.0.0:8080 (E2A_HTTP_ADDR): Address in use`).
pub async fn bind(
    addr: std::net::SocketAddr,
    variable: &str,
) -> Result<tokio::net::TcpListener, BoxError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({variable}): {e}").into())
}

/// Binds the ops listener: `E2A_OPS_ADDR`, else `0.0.0.0:<default_port>`.
pub async fn bind_ops(
    common: &config::CommonArgs,
    default_port: u16,
) -> Result<tokio::net::TcpListener, BoxError> {
    bind(common.ops_addr_or(default_port), "E2A_OPS_ADDR").await
}

/// Installs rustls' `ring` crypto provider as the process default, once.
/// Every binary calls this at start (reqwest and tokio-rustls need it).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; keep that one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
