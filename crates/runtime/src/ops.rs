//! The ops listener every service runs beside its main one:
//!
//! * `GET /healthz` — liveness: the process answers; touches nothing.
//! * `GET /readyz` — readiness: a bounded `SELECT 1`; 503 when the database
//!   is unreachable or the service is draining.
//! * `GET /metrics` — Prometheus text, including database pool usage.
//!
//! It runs on [`crate::serve`] with the configured HTTP timeouts and small
//! fixed caps ([`Limits::ops`]); a shed request is answered 503
//! `{"status":"overloaded"}` with `Retry-After`.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use e2a_store::Store;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::HttpTimeoutArgs,
    serve::{Limits, Options},
};

/// `Retry-After` of a not-ready `/readyz`, in seconds.
pub const READINESS_RETRY_AFTER_SECS: &str = "5";

/// How long `/readyz` waits for the database.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (embedding);
            // then our handle renders an empty registry, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[derive(Clone)]
struct OpsState {
    service: &'static str,
    store: Store,
    shutdown: CancellationToken,
    metrics: PrometheusHandle,
}

/// The ops router for `service`.
pub fn router(service: &'static str, store: Store, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState {
            service,
            store,
            shutdown,
            metrics: metrics_handle(),
        })
}

/// A running ops server (see [`OpsServer::spawn`]).
#[derive(Debug)]
pub struct OpsServer(tokio::task::JoinHandle<()>);

impl OpsServer {
    /// Serves the ops endpoints for `service` on `listener` in a background
    /// task until `shutdown` is cancelled.
    pub fn spawn(
        listener: TcpListener,
        service: &'static str,
        store: Store,
        timeouts: &HttpTimeoutArgs,
        shutdown: CancellationToken,
    ) -> Self {
        Self(tokio::spawn(serve(
            listener,
            service,
            store,
            Limits::ops(timeouts),
            shutdown,
        )))
    }

    /// Cancels `shutdown` (if the service has not already) and waits for the
    /// ops server to drain; fails only if its task panicked.
    pub async fn stop(self, shutdown: &CancellationToken) -> Result<(), crate::BoxError> {
        shutdown.cancel();
        Ok(self.0.await?)
    }
}

/// Serves the ops router on `listener` within `limits` until `shutdown` is
/// cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    service: &'static str,
    store: Store,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let app = router(service, store, shutdown.clone());
    let options = Options {
        service,
        listener: "ops",
        limits,
        overloaded: Arc::new(overloaded),
    };
    crate::serve::serve(listener, app, options, shutdown).await;
}

/// The answer to a shed ops request (the server makes it a 503 with
/// `Retry-After`).
fn overloaded(_: &HeaderMap) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"overloaded"}"#,
    )
        .into_response()
}

async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let json = || [(header::CONTENT_TYPE, "application/json")];
    // A not-ready answer says when to look again, like every other 503.
    let unavailable = |body: &'static str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, READINESS_RETRY_AFTER_SECS)],
            json(),
            body,
        )
            .into_response()
    };
    if state.shutdown.is_cancelled() {
        return unavailable(r#"{"status":"draining"}"#);
    }
    match state.store.ping(READINESS_TIMEOUT).await {
        Ok(()) => (StatusCode::OK, json(), r#"{"status":"ready"}"#).into_response(),
        Err(e) => {
            tracing::warn!(service = state.service, error = %e, "readiness check failed");
            unavailable(r#"{"status":"database_unavailable"}"#)
        }
    }
}

async fn render_metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let pool = state.store.pool_status();
    let service = state.service;
    metrics::gauge!("e2a_db_pool_max_connections", "service" => service).set(pool.max_size as f64);
    metrics::gauge!("e2a_db_pool_connections", "service" => service).set(pool.size as f64);
    metrics::gauge!("e2a_db_pool_idle_connections", "service" => service)
        .set(pool.available as f64);
    metrics::gauge!("e2a_db_pool_waiting", "service" => service).set(pool.waiting as f64);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
