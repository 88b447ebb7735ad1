//! `e2a-janitor`: periodic retention sweeps.
//!
//! [`run`] boots (connect, migrate), serves the ops endpoints, and sweeps
//! each [`sweep::Schedule`] on its own: once at start, then every
//! `E2A_JANITOR_INTERVAL_SECS` (retention) and every
//! `E2A_JANITOR_FAST_INTERVAL_SECS` (the 5-minute jobs, which never wait
//! for a long retention pass), until the shutdown token is cancelled. A failed sweep (database down, timeout) is
//! logged and retried at the next interval; the loop never exits on a
//! store error. Sweeps ([`sweep`]): messages past their TTL,
//! expired/revoked sessions, expired pending domain claims, idle rate-limit
//! keys, expired previous webhook secrets, handled events and deliveries
//! past their retention, idempotency keys past 24 hours. On a third
//! schedule (`E2A_HITL_EXPIRY_INTERVAL_SECS`, 60 s) it decides held
//! outbound mail whose approval window has passed ([`expiry`]).
//! `main.rs` only calls
//! [`e2a_runtime::main`] with [`serve`]; tests call [`run`] or
//! [`sweep_once`] directly.

pub mod config;
pub mod expiry;
pub mod sweep;

use std::time::Duration;

use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::Store;
use tokio::{net::TcpListener, time::MissedTickBehavior};

pub use config::Config;
pub use sweep::{SweepReport, sweep_once};

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

/// Connects and migrates, then sweeps at start and every interval until
/// `shutdown` is cancelled. A sweep in progress stops at its next batch
/// boundary; then `run` returns `Ok`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let Some(store) =
        e2a_runtime::boot::connect_and_migrate("janitor", &config.common, &shutdown).await?
    else {
        return Ok(());
    };
    tracing::info!(
        ops = %listeners.ops.local_addr()?,
        interval_secs = config.janitor_interval_secs,
        fast_interval_secs = config.janitor_fast_interval_secs,
        batch = config.janitor_batch,
        hitl_expiry_interval_secs = config.hitl_expiry_interval_secs,
        "janitor started (sweeps: expired messages, sessions, domain claims, idle rate-limit keys, webhook previous secrets, events, deliveries, idempotency keys, finished mail deliveries, magic-link tokens; expiry of held mail every E2A_HITL_EXPIRY_INTERVAL_SECS)"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(
        listeners.ops,
        "janitor",
        store.clone(),
        &config.common.http,
        shutdown.clone(),
    );
    tokio::join!(
        sweep_loop(
            &store,
            sweep::Schedule::Retention,
            config.interval(),
            config.janitor_batch,
            &shutdown
        ),
        sweep_loop(
            &store,
            sweep::Schedule::Fast,
            config.fast_interval(),
            config.janitor_batch,
            &shutdown
        ),
        expiry_loop(&store, &config, &shutdown),
    );
    ops.stop(&shutdown).await?;
    Ok(())
}

/// Decides expired holds now and every `E2A_HITL_EXPIRY_INTERVAL_SECS`
/// until cancelled, surviving errors.
async fn expiry_loop(store: &Store, config: &Config, shutdown: &CancellationToken) {
    let settings = config.outbound_settings();
    let defaults = config.limits.limits();
    let interval = config.hitl_expiry_interval();
    let (settings, defaults) = (&settings, &defaults);
    every(interval, shutdown, || async move {
        match expiry::expire_once(
            store,
            settings,
            defaults,
            config.hitl_expiry_batch,
            shutdown,
        )
        .await
        {
            Ok(report) => {
                if report != expiry::ExpiryReport::default() {
                    tracing::info!(
                        approved = report.approved,
                        rejected = report.rejected,
                        "expired holds decided"
                    );
                }
            }
            Err(e) => {
                metrics::counter!("e2a_janitor_sweeps_total", "outcome" => "error").increment(1);
                let chain = e2a_runtime::error_chain(&e);
                tracing::warn!(error = %chain, retry_in_secs = interval.as_secs(), "hold expiry failed; retrying at the next interval");
            }
        }
    })
    .await;
}

/// Runs the sweeps of `schedule` now and every `interval` until cancelled,
/// surviving errors.
async fn sweep_loop(
    store: &Store,
    schedule: sweep::Schedule,
    interval: Duration,
    batch: i64,
    shutdown: &CancellationToken,
) {
    every(interval, shutdown, || async {
        let started = tokio::time::Instant::now();
        match sweep::sweep_scheduled(store, batch, shutdown, schedule).await {
            Ok(report) => {
                metrics::counter!("e2a_janitor_sweeps_total", "outcome" => "ok").increment(1);
                tracing::info!(
                    schedule = ?schedule,
                    messages_deleted = report.messages_deleted,
                    sessions_deleted = report.sessions_deleted,
                    domain_claims_deleted = report.domain_claims_deleted,
                    rate_limits_deleted = report.rate_limits_deleted,
                    webhook_secrets_cleared = report.webhook_secrets_cleared,
                    events_deleted = report.events_deleted,
                    deliveries_deleted = report.deliveries_deleted,
                    idempotency_keys_deleted = report.idempotency_keys_deleted,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "sweep done"
                );
            }
            Err(e) => {
                metrics::counter!("e2a_janitor_sweeps_total", "outcome" => "error").increment(1);
                let chain = e2a_runtime::error_chain(&e);
                tracing::warn!(error = %chain, retry_in_secs = interval.as_secs(), "sweep failed; retrying at the next interval");
            }
        }
    })
    .await;
}

/// Runs `pass` now and then every `interval` (a late pass delays the next
/// one rather than bunching them) until `shutdown` is cancelled.
async fn every<F, Fut>(interval: Duration, shutdown: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        pass().await;
    }
}
