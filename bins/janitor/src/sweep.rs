//! The sweeps. Each deletes in batches of at most `batch` rows and repeats
//! while a full batch was deleted, so a sweep ends when its queue is empty
//! and no statement runs long. Rows are claimed with `FOR UPDATE SKIP
//! LOCKED` by the store, so several janitor replicas never wait on (or
//! double-count) each other.
//!
//! Each sweep runs on its own [`Schedule`]. Sweeps in this build: messages past their TTL (`expires_at`, 10 days;
//! held messages still pending approval are kept), then expired or revoked
//! dashboard sessions, then domain claims left unverified past
//! `domains::PENDING_CLAIM_TTL` (7 days), rate-limit keys whose bucket is
//! full again (they say nothing a missing row would not), webhook signing
//! secrets past their 24 h rotation grace (signing already ignores them;
//! this only removes dead keys), events past their 30 days that are no
//! longer pending, subscriber deliveries past their 90 days, legacy
//! pushes past their 72 hours, idempotency keys claimed more than
//! 24 hours ago (`idempotency::TTL`; completed or abandoned), and
//! magic-link tokens a day past their expiry (counted with the keys).

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

/// How often a sweep runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Every `E2A_JANITOR_INTERVAL_SECS` (hourly): retention of data.
    Retention,
    /// Every `E2A_JANITOR_FAST_INTERVAL_SECS` (5 minutes): keys whose
    /// staying around has a cost right away (the spec's 5-minute jobs),
    /// never waiting for the hourly pass.
    Fast,
}

/// One sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Messages past their TTL.
    Messages,
    /// Expired or revoked dashboard sessions.
    Sessions,
    /// Domain claims left unverified.
    DomainClaims,
    /// Rate-limit keys back to a full bucket.
    RateLimits,
    /// Webhook signing secrets past their rotation grace.
    WebhookPreviousSecrets,
    /// Handled events past their TTL.
    Events,
    /// Subscriber deliveries past their TTL.
    Deliveries,
    /// Legacy per-agent pushes past their TTL.
    LegacyDeliveries,
    /// Idempotency keys past their TTL.
    IdempotencyKeys,
    /// Finished (sent or dead-lettered) mail-outbox deliveries past their
    /// retention, with their payload, recipients, attempts and send gate.
    MailDeliveries,
    /// Magic-link tokens a day past their expiry (used or not).
    ApprovalTokens,
}

impl Job {
    /// Every sweep, in the order a pass runs them.
    pub const ALL: [Job; 11] = [
        Job::Messages,
        Job::Sessions,
        Job::DomainClaims,
        Job::RateLimits,
        Job::WebhookPreviousSecrets,
        Job::Events,
        Job::Deliveries,
        Job::LegacyDeliveries,
        Job::IdempotencyKeys,
        Job::MailDeliveries,
        Job::ApprovalTokens,
    ];

    /// The `kind` label of its metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Job::Messages => "messages",
            Job::Sessions => "sessions",
            Job::DomainClaims => "domain_claims",
            Job::RateLimits => "rate_limits",
            Job::WebhookPreviousSecrets => "webhook_previous_secrets",
            Job::Events => "events",
            Job::Deliveries => "deliveries",
            Job::LegacyDeliveries => "legacy_deliveries",
            Job::IdempotencyKeys => "idempotency_keys",
            Job::MailDeliveries => "mail_deliveries",
            Job::ApprovalTokens => "approval_tokens",
        }
    }

    /// When it runs.
    pub fn schedule(self) -> Schedule {
        match self {
            Job::RateLimits | Job::WebhookPreviousSecrets => Schedule::Fast,
            _ => Schedule::Retention,
        }
    }

    /// One batch: deletes (or clears) up to `batch` rows; returns how many.
    async fn batch(self, c: &e2a_store::Client, batch: i64) -> Result<u64, StoreError> {
        match self {
            Job::Messages => messages::delete_expired(c, batch).await,
            Job::Sessions => sessions::delete_expired(c, batch).await,
            Job::DomainClaims => domains::delete_expired_claims(c, batch).await,
            Job::RateLimits => rate_limits::sweep(c, batch).await,
            Job::WebhookPreviousSecrets => webhooks::clear_expired_previous_secrets(c, batch).await,
            Job::Events => events::delete_expired(c, batch).await,
            Job::Deliveries => deliveries::delete_expired_subscriber(c, batch).await,
            Job::LegacyDeliveries => deliveries::delete_expired_legacy(c, batch).await,
            Job::IdempotencyKeys => idempotency::sweep(c, batch).await,
            Job::MailDeliveries => e2a_store::mail_outbox::delete_expired(c, batch).await,
            Job::ApprovalTokens => {
                e2a_store::approval_tokens::delete_expired(c, APPROVAL_TOKEN_KEEP, batch).await
            }
        }
    }

    /// Its counter in a [`SweepReport`].
    fn slot(self, report: &mut SweepReport) -> &mut u64 {
        match self {
            Job::Messages => &mut report.messages_deleted,
            Job::Sessions => &mut report.sessions_deleted,
            Job::DomainClaims => &mut report.domain_claims_deleted,
            Job::RateLimits => &mut report.rate_limits_deleted,
            Job::WebhookPreviousSecrets => &mut report.webhook_secrets_cleared,
            Job::Events => &mut report.events_deleted,
            Job::Deliveries | Job::LegacyDeliveries | Job::MailDeliveries => {
                &mut report.deliveries_deleted
            }
            Job::IdempotencyKeys | Job::ApprovalTokens => &mut report.idempotency_keys_deleted,
        }
    }
}

/// How long a magic-link token is kept past its expiry, so that a late
/// click says "expired" rather than "unknown link".
const APPROVAL_TOKEN_KEEP: time::Duration = time::Duration::days(1);

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
    let mut report = sweep_scheduled(store, batch, shutdown, Schedule::Retention).await?;
    let fast = sweep_scheduled(store, batch, shutdown, Schedule::Fast).await?;
    report.rate_limits_deleted = fast.rate_limits_deleted;
    report.webhook_secrets_cleared = fast.webhook_secrets_cleared;
    Ok(report)
}

/// Runs the sweeps of one [`Schedule`] (the others report 0), stopping
/// early (between batches) once `shutdown` is cancelled.
pub async fn sweep_scheduled(
    store: &Store,
    batch: i64,
    shutdown: &CancellationToken,
    schedule: Schedule,
) -> Result<SweepReport, StoreError> {
    let batch = batch.max(1);
    let client = store.client().await?;
    let mut report = SweepReport::default();
    for job in Job::ALL.into_iter().filter(|j| j.schedule() == schedule) {
        if shutdown.is_cancelled() {
            break;
        }
        let c = &client;
        let deleted = drain(job.kind(), batch, shutdown, || job.batch(c, batch)).await?;
        *job.slot(&mut report) += deleted;
    }
    Ok(report)
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
