//! `e2a-api`: the REST API service.
//!
//! [`run`] serves the `/v1` API and the legacy `/api/health` on the HTTP
//! listener and the ops endpoints on the ops listener until the shutdown
//! token is cancelled, then drains. `main.rs` only calls
//! [`e2a_runtime::main`] with [`serve`]; tests call [`run`] with port-0
//! listeners and their own token.

pub mod auth;
pub mod config;
pub mod error;
mod middleware;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::{Store, account_limits::Limits};
use tokio::net::TcpListener;

pub use config::Config;

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Deployment facts served by `GET /v1/info`.
    pub info: Arc<routes::info::DeploymentInfo>,
    /// Limits for users without an `account_limits` row.
    pub default_limits: Arc<Limits>,
}

/// The listeners [`run`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The public HTTP API.
    pub http: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// The whole HTTP application for `state`.
pub fn app(state: AppState, config: &Config) -> Router {
    routes::router(state, config)
}

/// Binds the configured addresses and runs the service (what `main` calls).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), BoxError> {
    let http = e2a_runtime::bind(config.http_addr, "E2A_HTTP_ADDR").await?;
    let ops = e2a_runtime::bind_ops(&config.common, config::DEFAULT_OPS_PORT).await?;
    run(config, Listeners { http, ops }, shutdown).await
}

/// Connects and migrates, then serves until `shutdown` is cancelled and
/// in-flight requests have finished.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let store = e2a_runtime::boot::connect_and_migrate("api", &config.common).await?;
    let state = AppState {
        store: store.clone(),
        info: Arc::new(routes::info::DeploymentInfo::from_config(&config)),
        default_limits: Arc::new(config.default_limits()),
    };
    let app = app(state, &config);
    tracing::info!(
        http = %listeners.http.local_addr()?,
        ops = %listeners.ops.local_addr()?,
        "api listening"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(listeners.ops, "api", store, shutdown.clone());
    let graceful = shutdown.clone();
    axum::serve(listeners.http, app)
        .with_graceful_shutdown(async move { graceful.cancelled().await })
        .await?;
    ops.stop(&shutdown).await?;
    Ok(())
}
