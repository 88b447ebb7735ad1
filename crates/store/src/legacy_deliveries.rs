//! Legacy per-agent pushes (`webhook_deliveries`, spec §3.5): the queue of
//! POSTs of inbound mail to a cloud agent's `agents.webhook_url`.
//!
//! The original POSTed inline in the SMTP session (up to 30 s per cloud
//! recipient, flaw 5) and then kept bookkeeping rows whose updates had no
//! guard (flaw 7). Here:
//!
//! * **Enqueue** — [`crate::inbound::ingest`] inserts the row in the same
//!   statement, hence the same transaction, as the message (for copies with
//!   [`crate::inbound::Delivery::legacy_push`]): pending,
//!   [`LEGACY_MAX_ATTEMPTS`] attempts, expiring after [`LEGACY_TTL`]. The
//!   row holds only queue state; the POST is built from the message row
//!   (sender, recipients, conversation, raw bytes and the signed
//!   `X-E2A-Auth-*` headers in `messages.auth_headers`) when it is claimed.
//! * **Claim** — [`claim_legacy`], in one short statement: due rows are
//!   locked `FOR UPDATE SKIP LOCKED` (concurrent deliverers split them),
//!   each leased with a fresh token, its attempt counted **at the claim**
//!   (a push that crashes its worker cannot loop for ever), and returned
//!   with everything the POST needs. No transaction stays open.
//! * **POST** — by the deliverer with `e2a_webhook::LegacyRequest` and
//!   `WebhookClient::send_legacy_request`, no transaction open.
//! * **Record** — [`record_legacy`], guarded by the lease token: a worker
//!   whose lease passed to another writes nothing
//!   ([`LegacyRecorded::LeaseLost`]).
//!
//! States: `pending` → `delivered` | `failed`. A lease is `leased_until` /
//! `lease_token` with `next_retry_at` pushed to the lease's end, so a
//! leased row is not due and a lapsed lease makes it due again.
//!
//! Retries: the deliverer schedules the next attempt with
//! `e2a_webhook::RetrySchedule::LEGACY` (1 m, 5 m, 24 m, 1 h 30 m, 6 h,
//! 16 h: 7 attempts over exactly 24 h, up to 10 % jitter, `Retry-After`
//! honoured up to 6 h) and passes the time in [`Attempt::Retry`]; the
//! attempt limit is enforced here, in SQL.
//!
//! Wake-up: every push is committed together with its message's
//! `email.received` event, and the ingest NOTIFYs `webhook_events_new`
//! after the commit, so a deliverer that runs a [`claim_legacy`] pass when
//! woken on that channel (and on its polling tick) sees new pushes at once.
//!
//! One pass of a worker, in outline (`e2a-webhook` names; the store does
//! not depend on it):
//!
//! ```text
//! for p in legacy_deliveries::claim_legacy(&pool_client, batch, lease).await? {
//!     let payload = LegacyPayload {
//!         message_id: p.message_id.as_str(), conversation_id: &p.conversation_id,
//!         from: &p.from, to: p.to.as_deref(), cc: &p.cc, reply_to: &p.reply_to,
//!         recipient: &p.recipient, raw_message: &p.raw_message,
//!         auth_headers: &p.auth_headers, received_at: p.received_at,
//!     };
//!     let attempt = match LegacyRequest::new(&payload) {
//!         Err(e) => Attempt::Failed { status: 0, error: &e.to_string() },
//!         Ok(request) => {
//!             let o = client.send_legacy_request(&p.url, &request).await; // no transaction open
//!             if o.is_success() { Attempt::Delivered { status: o.status.into() } }
//!             else if o.retryable {
//!                 let wait = RetrySchedule::LEGACY.delay(p.attempts as u32, o.retry_after);
//!                 Attempt::Retry { status: o.status.into(), error: &o.error, at: now + wait }
//!             } else { Attempt::Failed { status: o.status.into(), error: &o.error } }
//!         }
//!     };
//!     legacy_deliveries::record_legacy(&pool_client, &p.message_id, &p.lease_token, attempt).await?;
//! }
//! ```

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use serde_json::Value;
use time::{Duration, OffsetDateTime};

use crate::{
    deliveries::Attempt,
    error::Result,
    ids::{MessageId, UserId},
};

/// Attempts a legacy push gets. The original inserted `max_attempts = 2`
/// and made one more, uncounted, inline in the SMTP session: three POSTs
/// within about six minutes. 7 attempts paired with
/// `e2a_webhook::RetrySchedule::LEGACY` span exactly 24 h.
pub const LEGACY_MAX_ATTEMPTS: i32 = 7;

/// How long a legacy push row is kept; the janitor deletes it afterwards
/// whatever its status. 72 h rather than the original's 48 h: the last
/// attempt comes 24 h after the first (about 48 h at worst, when every
/// failure answers a long `Retry-After`), and the outcome stays visible for
/// at least a day after that.
pub const LEGACY_TTL: Duration = Duration::hours(72);

/// `last_error` of a push failed because its agent no longer takes pushes.
pub const AGENT_GONE_ERROR: &str =
    "the agent is no longer in cloud mode with a webhook_url; push abandoned";

/// `last_error` of a push whose last allowed attempt was claimed and never
/// recorded (its worker crashed or hung past the lease).
pub const NO_OUTCOME_ERROR: &str = "no outcome was recorded for the last attempt";

/// A legacy push leased to one worker until it records the outcome with
/// [`record_legacy`] (or the lease runs out). Everything the §4.2 POST
/// needs, read from the message row and the agent at claim time.
#[derive(Clone)]
pub struct ClaimedLegacy {
    /// The message pushed; also the delivery's key for [`record_legacy`]
    /// and the body's `message_id`.
    pub message_id: MessageId,
    /// The agent's owner.
    pub user_id: UserId,
    /// The agent (its address).
    pub agent_id: String,
    /// Where to POST: the agent's `webhook_url` as it is now. May hold a
    /// receiver's token: never log it.
    pub url: String,
    /// The body's `conversation_id`.
    pub conversation_id: String,
    /// The body's `from`: the stored display sender (first Reply-To, else
    /// From, else the envelope sender).
    pub from: String,
    /// The body's `to` (`None` is sent as `null`).
    pub to: Option<Vec<String>>,
    /// The body's `cc`.
    pub cc: Vec<String>,
    /// The body's `reply_to` (the original left it out of retries; it is
    /// always sent here).
    pub reply_to: Vec<String>,
    /// The body's `recipient`: this copy's agent address.
    pub recipient: String,
    /// The raw message as received (the body's `raw_message`, base64).
    pub raw_message: Vec<u8>,
    /// The signed `X-E2A-Auth-*` headers stored with the message: sent as
    /// headers and as the body's `auth_headers`.
    pub auth_headers: BTreeMap<String, String>,
    /// When the message was stored (the body's `received_at`).
    pub received_at: OffsetDateTime,
    /// Attempts including this one.
    pub attempts: i32,
    /// The last attempt allowed.
    pub max_attempts: i32,
    /// The lease token to record the outcome with.
    pub lease_token: String,
}

impl std::fmt::Debug for ClaimedLegacy {
    /// Leaves out the URL (it may carry a token), the raw message and the
    /// headers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedLegacy")
            .field("message_id", &self.message_id)
            .field("agent_id", &self.agent_id)
            .field("attempts", &self.attempts)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// Claims up to `batch` due legacy pushes for `lease`, oldest due first.
///
/// One statement, committed on its own (run it on a pooled client, not in a
/// longer transaction): due pending rows are locked `FOR UPDATE SKIP
/// LOCKED`, so concurrent claimers (any number of deliverer replicas) never
/// get the same row; each is then, in that statement,
/// * **leased** — attempt counted, `last_attempt_at = now()`,
///   `leased_until = next_retry_at = now() + lease`, one fresh token for
///   the batch — and returned as a [`ClaimedLegacy`]; or
/// * **failed** with [`AGENT_GONE_ERROR`] (no attempt counted) when its
///   agent is no longer in cloud mode with a non-empty `webhook_url`, so a
///   push nobody wants is not retried for ever (deleting the agent or the
///   message deletes the row itself, by cascade); or
/// * **failed** with [`NO_OUTCOME_ERROR`] when its last allowed attempt was
///   claimed and the lease ran out without an outcome.
///
/// A worker that crashes mid-POST loses nothing: when its lease ends the
/// row is due again and the next claim takes it, with the lost attempt
/// counted. `lease` must exceed the HTTP timeout plus a margin (the caller
/// checks that at start-up); the rows are not touched until it ends.
///
/// The raw message comes with each row: size `batch` for the memory it may
/// hold (messages are up to the relay's size limit each).
pub async fn claim_legacy(
    c: &impl GenericClient,
    batch: i64,
    lease: std::time::Duration,
) -> Result<Vec<ClaimedLegacy>> {
    let token = format!("lease_{}", crate::secret::random_hex::<16>());
    let stmt = c
        .prepare_cached(
            "WITH c AS ( \
               SELECT w.message_id, w.attempts >= w.max_attempts AS exhausted, \
                      COALESCE(a.agent_mode = 'cloud' AND a.webhook_url <> '', false) AS live \
                 FROM webhook_deliveries w \
                 LEFT JOIN messages m ON m.id = w.message_id AND m.user_id = w.user_id \
                 LEFT JOIN agents a ON a.id = m.agent_id AND a.user_id = m.user_id \
                WHERE w.status = 'pending' AND w.next_retry_at <= now() \
                ORDER BY w.next_retry_at LIMIT $1 \
                  FOR UPDATE OF w SKIP LOCKED), \
             gone AS ( \
               UPDATE webhook_deliveries w \
                  SET status = 'failed', leased_until = NULL, lease_token = NULL, last_error = $4 \
                 FROM c WHERE w.message_id = c.message_id AND NOT c.live), \
             exhausted AS ( \
               UPDATE webhook_deliveries w \
                  SET status = 'failed', leased_until = NULL, lease_token = NULL, last_error = $5 \
                 FROM c WHERE w.message_id = c.message_id AND c.live AND c.exhausted), \
             leased AS ( \
               UPDATE webhook_deliveries w \
                  SET attempts = w.attempts + 1, last_attempt_at = now(), \
                      leased_until = now() + make_interval(secs => $2), lease_token = $3, \
                      next_retry_at = now() + make_interval(secs => $2) \
                 FROM c WHERE w.message_id = c.message_id AND c.live AND NOT c.exhausted \
               RETURNING w.message_id, w.user_id, w.attempts, w.max_attempts) \
             SELECT l.message_id, l.user_id, m.agent_id, a.webhook_url, m.conversation_id, m.sender, \
                    m.to_recipients, m.cc, m.reply_to, m.recipient, m.raw_message, m.auth_headers, \
                    m.created_at, l.attempts, l.max_attempts \
               FROM leased l \
               JOIN messages m ON m.id = l.message_id AND m.user_id = l.user_id \
               JOIN agents a ON a.id = m.agent_id AND a.user_id = m.user_id \
              ORDER BY l.message_id",
        )
        .await?;
    let rows = c
        .query(
            &stmt,
            &[
                &batch,
                &lease.as_secs_f64(),
                &token,
                &AGENT_GONE_ERROR,
                &NO_OUTCOME_ERROR,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ClaimedLegacy {
            message_id: r.get(0),
            user_id: r.get(1),
            agent_id: r.get(2),
            url: r.get(3),
            conversation_id: r.get(4),
            from: r.get(5),
            to: r.get(6),
            cc: r.get::<_, Option<Vec<String>>>(7).unwrap_or_default(),
            reply_to: r.get::<_, Option<Vec<String>>>(8).unwrap_or_default(),
            recipient: r.get(9),
            raw_message: r.get::<_, Option<Vec<u8>>>(10).unwrap_or_default(),
            auth_headers: header_map(r.get(11)),
            received_at: r.get(12),
            attempts: r.get(13),
            max_attempts: r.get(14),
            lease_token: token.clone(),
        })
        .collect())
}

/// The stored `auth_headers` object as header name → value. The relay
/// stores strings only; anything else is kept as its JSON text rather than
/// dropped, and a missing object is an empty map.
fn header_map(stored: Option<Value>) -> BTreeMap<String, String> {
    match stored {
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (name, value)
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// What [`record_legacy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyRecorded {
    /// The push is `delivered`.
    Delivered,
    /// The push stays `pending` until the [`Attempt::Retry`] time.
    WillRetry,
    /// The push is `failed`: a permanent failure, or a retryable one on its
    /// last allowed attempt.
    Failed,
    /// The lease had passed to another worker (or the row is gone or no
    /// longer pending): nothing was written; that worker's outcome counts.
    LeaseLost,
}

/// Records the outcome of the attempt on `message_id`'s push leased with
/// `token` — one guarded `UPDATE … WHERE message_id = $1 AND lease_token =
/// $2 AND status = 'pending'`, so a worker past its lease cannot overwrite
/// the worker that took over (flaw 7), and a recorded outcome is final.
///
/// * [`Attempt::Delivered`] → `delivered`.
/// * [`Attempt::Retry`] → `pending` again, due at its `at` (from
///   `e2a_webhook::RetrySchedule::LEGACY`); `failed` instead when this was
///   the last allowed attempt.
/// * [`Attempt::Failed`] → `failed` (a 4xx other than 408/425/429, a
///   redirect, a URL the policy refuses, a stored header that cannot be
///   sent).
///
/// The status code (0 without a response) and error text (cut to 1000
/// characters; never the URL) are kept for operators; the lease is
/// released either way.
pub async fn record_legacy(
    c: &impl GenericClient,
    message_id: &MessageId,
    token: &str,
    outcome: Attempt<'_>,
) -> Result<LegacyRecorded> {
    let (status_code, error, retry_at, kind): (i32, &str, Option<OffsetDateTime>, &str) =
        match outcome {
            Attempt::Delivered { status } => (status, "", None, "delivered"),
            Attempt::Retry { status, error, at } => (status, error, Some(at), "retry"),
            Attempt::Failed { status, error } => (status, error, None, "failed"),
        };
    let error: String = error.chars().take(1000).collect();
    let stmt = c
        .prepare_cached(
            "UPDATE webhook_deliveries w \
                SET status = CASE $3::text \
                               WHEN 'delivered' THEN 'delivered' \
                               WHEN 'failed' THEN 'failed' \
                               ELSE CASE WHEN w.attempts >= w.max_attempts THEN 'failed' ELSE 'pending' END \
                             END, \
                    next_retry_at = COALESCE($4, w.next_retry_at), \
                    last_status_code = $5, last_error = $6, \
                    leased_until = NULL, lease_token = NULL \
              WHERE w.message_id = $1 AND w.lease_token = $2 AND w.status = 'pending' \
             RETURNING w.status",
        )
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[message_id, &token, &kind, &retry_at, &status_code, &error],
        )
        .await?;
    Ok(match row.as_ref().map(|r| r.get::<_, &str>(0)) {
        None => LegacyRecorded::LeaseLost,
        Some("delivered") => LegacyRecorded::Delivered,
        Some("pending") => LegacyRecorded::WillRetry,
        Some(_) => LegacyRecorded::Failed,
    })
}
