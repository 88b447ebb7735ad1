//! The sweeps. Each deletes in batches of at most `batch` rows and repeats
//! while a full batch was deleted, so a sweep ends when its queue is empty
//! and no statement runs long. Rows are claimed with `FOR UPDATE SKIP
//! LOCKED` by the store, so several janitor replicas never wait on (or
//! double-count) each other.
//!
//! This build has one sweep: expired or revoked dashboard sessions. Message
//! TTL, webhook deliveries, events and idempotency keys come in later issues.

use e2a_store::{Store, StoreError, sessions};
use tokio_util::sync::CancellationToken;

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired or revoked `user_sessions` rows deleted.
    pub sessions_deleted: u64,
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
    let mut report = SweepReport::default();
    loop {
        let deleted = sessions::delete_expired(&client, batch).await?;
        report.sessions_deleted += deleted;
        metrics::counter!("e2a_janitor_deleted_total", "kind" => "sessions").increment(deleted);
        if deleted < batch as u64 || shutdown.is_cancelled() {
            break;
        }
    }
    Ok(report)
}
