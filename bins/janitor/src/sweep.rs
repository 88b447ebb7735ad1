//! The sweeps. Each deletes in batches of at most `batch` rows and repeats
//! while a full batch was deleted, so a sweep ends when its queue is empty
//! and no statement runs long. Rows are claimed with `FOR UPDATE SKIP
//! LOCKED` by the store, so several janitor replicas never wait on (or
//! double-count) each other.
//!
//! Sweeps in this build: messages past their TTL (`expires_at`, 10 days;
//! held messages still pending approval are kept), then expired or revoked
//! dashboard sessions, then domain claims left unverified past
//! `domains::PENDING_CLAIM_TTL` (7 days), rate-limit keys whose bucket is
//! full again (they say nothing a missing row would not), webhook signing
//! secrets past their 24 h rotation grace (signing already ignores them;
//! this only removes dead keys), events past their 30 days that are no
//! longer pending, subscriber deliveries past their 90 days, legacy
//! pushes past their 48 hours, and idempotency keys claimed more than
//! 24 hours ago (`idempotency::TTL`; completed or abandoned).

use e2a_store::{
    Store, StoreError, deliveries, domains, events, idempotency, messages, rate_limits, sessions,
    webhooks,
};
use tokio_util::sync::CancellationToken;

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Messages past their TTL deleted.
    pub messages_deleted: u64,
    /// Expired or revoked `user_sessions` rows deleted.
    pub sessions_deleted: u64,
    /// Expired pending domain claims deleted.
    pub domain_claims_deleted: u64,
    /// Rate-limit keys back to a full bucket deleted.
    pub rate_limits_deleted: u64,
    /// Expired previous webhook signing secrets cleared.
    pub webhook_secrets_cleared: u64,
    /// Expired, no longer pending events deleted.
    pub events_deleted: u64,
    /// Expired subscriber and legacy deliveries deleted.
    pub deliveries_deleted: u64,
    /// Idempotency keys past their 24 hours deleted.
    pub idempotency_keys_deleted: u64,
}

/// Runs every sweep until its queue is empty ("run until the queue is
/// empty": tests and operators get a deterministic end state).
///
/// Not atomic as a whole: each batch commits on its own, so an error part
/// way keeps what was already deleted and the next pass continues.
pub async fn sweep_once(store: &Store, batch: i64) -> Result<SweepReport, StoreError> {
    sweep(store, batch, &CancellationToken::new()).await
}

/// [`sweep_once`], stopping early (between batches) once `shutdown` is
/// cancelled.
pub async fn sweep(
    store: &Store,
    batch: i64,
    shutdown: &CancellationToken,
) -> Result<SweepReport, StoreError> {
    let batch = batch.max(1);
    let client = store.client().await?;
    let messages_deleted = drain("messages", batch, shutdown, || {
        messages::delete_expired(&client, batch)
    })
    .await?;
    let sessions_deleted = if shutdown.is_cancelled() {
        0
    } else {
        drain("sessions", batch, shutdown, || {
            sessions::delete_expired(&client, batch)
        })
        .await?
    };
    let domain_claims_deleted = if shutdown.is_cancelled() {
        0
    } else {
        drain("domain_claims", batch, shutdown, || {
            domains::delete_expired_claims(&client, batch)
        })
        .await?
    };
    let rate_limits_deleted = if shutdown.is_cancelled() {
        0
    } else {
        drain("rate_limits", batch, shutdown, || {
            rate_limits::sweep(&client, batch)
        })
        .await?
    };
    let webhook_secrets_cleared = if shutdown.is_cancelled() {
        0
    } else {
        drain("webhook_previous_secrets", batch, shutdown, || {
            webhooks::clear_expired_previous_secrets(&client, batch)
        })
        .await?
    };
    let events_deleted = if shutdown.is_cancelled() {
        0
    } else {
        drain("events", batch, shutdown, || {
            events::delete_expired(&client, batch)
        })
        .await?
    };
    let mut deliveries_deleted = 0;
    if !shutdown.is_cancelled() {
        deliveries_deleted += drain("deliveries", batch, shutdown, || {
            deliveries::delete_expired_subscriber(&client, batch)
        })
        .await?;
    }
    if !shutdown.is_cancelled() {
        deliveries_deleted += drain("legacy_deliveries", batch, shutdown, || {
            deliveries::delete_expired_legacy(&client, batch)
        })
        .await?;
    }
    let idempotency_keys_deleted = if shutdown.is_cancelled() {
        0
    } else {
        drain("idempotency_keys", batch, shutdown, || {
            idempotency::sweep(&client, batch)
        })
        .await?
    };
    Ok(SweepReport {
        messages_deleted,
        sessions_deleted,
        domain_claims_deleted,
        rate_limits_deleted,
        webhook_secrets_cleared,
        events_deleted,
        deliveries_deleted,
        idempotency_keys_deleted,
    })
}

/// Attempts of one batch that ends in a deadlock or serialization failure
/// (SQLSTATE 40P01/40001: the batch rolled back, nothing was deleted) before
/// the sweep gives up until its next pass.
const BATCH_ATTEMPTS: u32 = 5;

/// Repeats one batched delete while it deletes a full batch (and we are not
/// shutting down); returns the total. A batch that loses a deadlock (e.g.
/// against an ingest holding the same account's usage counter) rolled back
/// whole and is simply run again, after a short pause.
async fn drain<F, Fut>(
    kind: &'static str,
    batch: i64,
    shutdown: &CancellationToken,
    mut delete: F,
) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    let mut attempt = 1;
    loop {
        let deleted = match delete().await {
            Ok(deleted) => deleted,
            Err(e) if e.is_retryable_conflict() && attempt < BATCH_ATTEMPTS => {
                tracing::info!(kind, attempt, error = %e, "sweep batch lost a lock conflict; retrying");
                metrics::counter!("e2a_janitor_batch_retries_total", "kind" => kind).increment(1);
                tokio::time::sleep(std::time::Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        attempt = 1;
        total += deleted;
        metrics::counter!("e2a_janitor_deleted_total", "kind" => kind).increment(deleted);
        if deleted < batch as u64 || shutdown.is_cancelled() {
            return Ok(total);
        }
    }
}
