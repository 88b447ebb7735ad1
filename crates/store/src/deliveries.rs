//! Webhook deliveries: subscriber deliveries (one per event and matching
//! webhook, test sends, replays — `webhook_subscriber_deliveries`) and
//! legacy per-agent pushes (`webhook_deliveries`): the subscriber queue
//! ([`claim`] → POST with no transaction open → [`record`]), retention,
//! test sends ([`send_test`]) and a webhook's delivery log ([`list`]).
//! The legacy queue itself is [`crate::legacy_deliveries`].

use deadpool_postgres::GenericClient;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use crate::{
    error::{Result, StoreError},
    ids::{DeliveryId, EventId, UserId, WebhookId},
};

/// Deletes up to `batch` subscriber deliveries past their `expires_at`
/// (90 days after creation: far beyond the last retry); returns how many.
/// `SKIP LOCKED`: a delivery a worker holds is left for the next pass.
pub async fn delete_expired_subscriber(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM webhook_subscriber_deliveries WHERE id IN ( \
               SELECT id FROM webhook_subscriber_deliveries WHERE expires_at <= now() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

/// Deletes up to `batch` legacy per-agent deliveries past their
/// `expires_at` ([`crate::legacy_deliveries::LEGACY_TTL`], 72 hours: a day
/// past the last retry), whatever their status; returns how many.
pub async fn delete_expired_legacy(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM webhook_deliveries WHERE message_id IN ( \
               SELECT message_id FROM webhook_deliveries WHERE expires_at <= now() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

/// Terminal failures within [`AUTO_DISABLE_WINDOW`] (and no success there)
/// that disable a webhook (spec §3.6).
pub const AUTO_DISABLE_THRESHOLD: i64 = 10;

/// The window of the auto-disable rule, on attempt times.
pub const AUTO_DISABLE_WINDOW: time::Duration = time::Duration::hours(72);

/// A delivery held by one worker until it records the outcome (or the
/// lease runs out).
#[derive(Clone)]
pub struct Claimed {
    /// `whd_…`
    pub id: String,
    /// The webhook it goes to.
    pub webhook_id: String,
    /// The webhook's owner.
    pub user_id: UserId,
    /// Where to POST.
    pub url: String,
    /// The signing secret, and the previous one while it is still valid
    /// (rotation window).
    pub secret: String,
    /// See [`Claimed::secret`].
    pub previous_secret: Option<String>,
    /// The event delivered; `None` for a test send.
    pub event_id: Option<String>,
    /// Its type.
    pub event_type: String,
    /// What to send: the test send's envelope, or the event rendered
    /// ([`crate::events::rendered`]: an `email.received` with its raw
    /// message); `None` when the event no longer exists.
    pub envelope: Option<Value>,
    /// Attempts including this one.
    pub attempts: i32,
    /// The last attempt allowed.
    pub max_attempts: i32,
    /// The lease token to record the outcome with.
    pub lease_token: String,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("webhook_id", &self.webhook_id)
            .field("event_id", &self.event_id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Claims up to `batch` due deliveries for `lease`, **at most one per
/// webhook, and none of a webhook that already has a delivery in flight on
/// any replica**.
///
/// One round trip (the function `e2a_claim_subscriber_deliveries`, V20,
/// returning the body to send since V22):
/// due webhooks are taken from `webhooks_next_due_idx` with `FOR UPDATE
/// SKIP LOCKED` (concurrent claimers split them) and **then**, in a
/// statement with a newer snapshot, their deliveries are read — so a
/// delivery committed before the lock is never missed when the webhook is
/// marked idle; each one's
/// oldest due delivery is leased and the webhook marked in flight with the
/// same token until [`record`] (or the lease's end: a crashed worker's
/// delivery becomes claimable again, its attempt counted). Disabled
/// webhooks are skipped: their deliveries wait. A delivery whose last
/// attempt was claimed but never recorded is failed here. The attempt is
/// counted at the claim, so a delivery that crashes its worker cannot loop.
///
/// The claim commits **asynchronously** (`synchronous_commit = off` for
/// this statement's transaction only): a lease is worth nothing after a
/// database crash, so waiting for its WAL flush buys nothing. If the
/// database crashes before the claim reaches disk, the delivery is simply
/// claimable again (delivered at least once, as after a worker crash); the
/// [`record`] that follows commits durably, and its flush covers the claim.
pub async fn claim(
    c: &impl GenericClient,
    batch: i64,
    lease: std::time::Duration,
) -> Result<Vec<Claimed>> {
    let token = format!("lease_{}", crate::secret::random_hex::<16>());
    let stmt = c
        .prepare_cached(
            "SELECT id, webhook_id, user_id, url, signing_secret, prev, event_id, event_type, \
                    envelope, raw_message, attempts, max_attempts \
               FROM e2a_claim_subscriber_deliveries($1, $2, $3)",
        )
        .await?;
    let rows = c
        .query(&stmt, &[&batch, &lease.as_secs_f64(), &token])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            id: r.get(0),
            webhook_id: r.get(1),
            user_id: r.get(2),
            url: r.get(3),
            secret: r.get(4),
            previous_secret: r.get(5),
            event_id: r.get(6),
            envelope: r.get::<_, Option<Value>>(8).map(|envelope| {
                if r.get::<_, Option<&str>>(6).is_some() {
                    crate::events::rendered(r.get(7), envelope, r.get(9))
                } else {
                    envelope
                }
            }),
            event_type: r.get(7),
            attempts: r.get(10),
            max_attempts: r.get(11),
            lease_token: token.clone(),
        })
        .collect())
}

/// How an attempt ended, as the caller classified it.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// 2xx.
    Delivered {
        /// The status code.
        status: i32,
    },
    /// A retryable failure: try again at `at` (a failure of the last
    /// allowed attempt is recorded as final instead).
    Retry {
        /// The status code, 0 without a response.
        status: i32,
        /// What went wrong, short and without secrets.
        error: &'a str,
        /// When to try again.
        at: OffsetDateTime,
    },
    /// A permanent failure.
    Failed {
        /// The status code, 0 without a response.
        status: i32,
        /// What went wrong.
        error: &'a str,
    },
}

/// What [`record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The outcome is stored; `failed` when the delivery ended failed, and
    /// `auto_disabled` when that failure disabled the webhook.
    Stored {
        /// The delivery ended failed.
        failed: bool,
        /// The webhook was disabled by this failure.
        auto_disabled: bool,
    },
    /// The lease had passed to another worker: nothing was written (that
    /// worker's outcome counts).
    LeaseLost,
}

/// Records the outcome of the attempt leased with `token`, in **one
/// round trip and one commit** (the function
/// `e2a_record_subscriber_delivery`, V21): the delivery's state (guarded
/// by its lease token, so a worker past its lease cannot overwrite the one
/// that took over — flaw 7), the webhook's in-flight mark released and its
/// `next_due_at` (computed after locking the webhook, so a concurrent
/// fan-out's delivery is never missed), success and failure counters, and the auto-disable rule
/// (spec §3.6: at least [`AUTO_DISABLE_THRESHOLD`] failed deliveries and no
/// delivered one among those attempted in the last
/// [`AUTO_DISABLE_WINDOW`], this one included) decided right here rather
/// than by a later sweep. Commits durably: once this returns, the outcome
/// survives a database crash.
pub async fn record(
    c: &impl GenericClient,
    id: &str,
    token: &str,
    attempt: Attempt<'_>,
) -> Result<Recorded> {
    let (status_code, error, retry_at, kind): (i32, &str, Option<OffsetDateTime>, &str) =
        match attempt {
            Attempt::Delivered { status } => (status, "", None, "delivered"),
            Attempt::Retry { status, error, at } => (status, error, Some(at), "retry"),
            Attempt::Failed { status, error } => (status, error, None, "failed"),
        };
    let error: String = error.chars().take(1000).collect();
    let window = AUTO_DISABLE_WINDOW.whole_seconds() as f64;
    let stmt = c
        .prepare_cached(
            "SELECT status, auto_disabled FROM e2a_record_subscriber_delivery($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[
                &id,
                &token,
                &kind,
                &retry_at,
                &status_code,
                &error,
                &AUTO_DISABLE_THRESHOLD,
                &window,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Recorded::LeaseLost);
    };
    let final_status: &str = row.get(0);
    Ok(Recorded::Stored {
        failed: final_status == "failed",
        auto_disabled: row.get(1),
    })
}

/// One outcome for [`record_batch`].
#[derive(Debug, Clone, Copy)]
pub struct RecordItem<'a> {
    /// The delivery.
    pub id: &'a str,
    /// Its lease token.
    pub token: &'a str,
    /// What happened.
    pub attempt: Attempt<'a>,
}

/// [`record`] for several attempts in **one** transaction (their calls
/// pipelined on one connection, one durable commit for all): what a
/// deliverer whose workers finish together spends one commit on instead of
/// one each. Each item is guarded by its own lease token exactly as in
/// [`record`] ([`Recorded::LeaseLost`] for that item, nothing written for
/// it). Rows are locked in the items' order: pass them sorted by webhook so
/// that concurrent batches lock webhooks in one order. All or nothing: an
/// error rolls every item back (serialization failures and deadlocks are
/// retried whole); the caller may then record the items one by one to
/// isolate a failing one. Results are in the items' order.
pub async fn record_batch(store: &crate::Store, items: &[RecordItem<'_>]) -> Result<Vec<Recorded>> {
    store
        .transaction(items, |tx, items| {
            Box::pin(async move {
                futures::future::try_join_all(
                    items.iter().map(|i| record(tx, i.id, i.token, i.attempt)),
                )
                .await
            })
        })
        .await
}

/// The subscriber queue at a glance (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueDepth {
    /// Pending deliveries due now and not in flight.
    pub due: i64,
    /// Pending deliveries waiting for a later retry.
    pub scheduled: i64,
    /// Deliveries leased to a worker right now.
    pub in_flight: i64,
    /// Events not fanned out yet.
    pub events_pending: i64,
    /// Seconds the oldest due delivery has been due (0 when none).
    pub oldest_due_secs: f64,
    /// Age in seconds of the oldest pending event (0 when none).
    pub oldest_event_secs: f64,
}

/// Counts the queue: one statement over the pending partial indexes (cost
/// grows with the backlog, not with the history; sample it, do not call it
/// per delivery).
pub async fn queue_depth(c: &impl GenericClient) -> Result<QueueDepth> {
    let stmt = c
        .prepare_cached(
            "SELECT d.due, d.scheduled, d.in_flight, d.oldest_due, e.pending, e.oldest FROM \
               (SELECT count(*) FILTER (WHERE NOT busy AND next_retry_at <= now()) AS due, \
                       count(*) FILTER (WHERE NOT busy AND next_retry_at > now()) AS scheduled, \
                       count(*) FILTER (WHERE busy) AS in_flight, \
                       COALESCE(EXTRACT(EPOCH FROM now() - min(next_retry_at) \
                                FILTER (WHERE NOT busy AND next_retry_at <= now())), 0)::float8 AS oldest_due \
                  FROM (SELECT next_retry_at, COALESCE(leased_until > now(), false) AS busy \
                          FROM webhook_subscriber_deliveries WHERE status = 'pending') p) d, \
               (SELECT count(*) AS pending, \
                       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest \
                  FROM webhook_events WHERE status = 'pending') e",
        )
        .await?;
    let r = c.query_one(&stmt, &[]).await?;
    Ok(QueueDepth {
        due: r.get(0),
        scheduled: r.get(1),
        in_flight: r.get(2),
        oldest_due_secs: r.get(3),
        events_pending: r.get(4),
        oldest_event_secs: r.get(5),
    })
}

// ---------------------------------------------------------------------------
// Test sends and the delivery log of a webhook (the API's side of the
// queue).

/// Where a subscriber delivery stands (the column's CHECK allows exactly
/// these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for an attempt (possibly a retry, possibly in flight).
    Pending,
    /// A 2xx was received.
    Delivered,
    /// Given up: a permanent failure or the last attempt failed.
    Failed,
}

impl Status {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
        }
    }

    /// The status stored (or asked for) as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Status::Pending,
            "delivered" => Status::Delivered,
            "failed" => Status::Failed,
            _ => return None,
        })
    }
}

/// A delivery as the webhook's owner sees it (no payload, no lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `whd_…`
    pub id: DeliveryId,
    /// The event it carries (`None` for a test send).
    pub event_id: Option<EventId>,
    /// The event's type.
    pub event_type: String,
    /// Where it stands.
    pub status: Status,
    /// Attempts made so far (an attempt in flight included).
    pub attempts: i32,
    /// What went wrong last; empty when nothing did.
    pub last_error: String,
    /// The last HTTP status (0: no response).
    pub last_status_code: Option<i32>,
    /// When the last attempt started.
    pub last_attempt_at: Option<OffsetDateTime>,
    /// When the next attempt is due (for a pending delivery).
    pub next_retry_at: OffsetDateTime,
    /// When it was queued.
    pub created_at: OffsetDateTime,
}

/// A place in the `(created_at, id)` order of a webhook's deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// `created_at` of the row.
    pub created_at: OffsetDateTime,
    /// Its id.
    pub id: DeliveryId,
}

/// One page of [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Newest first.
    pub items: Vec<Delivery>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Position>,
}

/// Largest page of [`list`].
pub const MAX_PAGE: i64 = 100;
/// Most deliveries one [`list`] call with a status filter examines.
pub const SCAN_BUDGET: i64 = 1000;

const DELIVERY_COLUMNS: &str = "s.id, s.event_id, s.event_type, s.status, s.attempts, s.last_error, \
     s.last_status_code, s.last_attempt_at, s.next_retry_at, s.created_at";

fn delivery_from_row(r: &tokio_postgres::Row) -> Delivery {
    Delivery {
        id: r.get(0),
        event_id: r.get(1),
        event_type: r.get(2),
        // The column's CHECK admits only the three statuses.
        status: Status::parse(r.get(3)).unwrap_or(Status::Pending),
        attempts: r.get(4),
        last_error: r.get(5),
        last_status_code: r.get(6),
        last_attempt_at: r.get(7),
        next_retry_at: r.get(8),
        created_at: r.get(9),
    }
}

/// The statement of [`list`] for these arguments (after the ownership
/// check) and its parameters: `webhook_subscriber_deliveries_webhook_created_idx`
/// walked from the cursor in `(created_at DESC, id DESC)` order (V18: the
/// index order), `LIMIT limit + 1`; with a status filter the walk is cut at
/// [`SCAN_BUDGET`] rows examined and the status only decides `hit`.
fn list_query<'a>(
    webhook_id: &'a WebhookId,
    status: Option<Status>,
    after: Option<&'a Position>,
    fetch: i64,
    budget: i64,
) -> (String, Vec<&'a (dyn ToSql + Sync)>) {
    let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![webhook_id];
    let mut scope = String::from("s.webhook_id = $1");
    if let Some(pos) = after {
        params.push(&pos.created_at);
        params.push(&pos.id);
        scope.push_str(" AND s.created_at <= $2 AND (s.created_at, s.id) < ($2, $3)");
    }
    let order = "ORDER BY s.created_at DESC, s.id DESC";
    // The limits are literals (computed integers, never client text): a
    // `LIMIT $n` makes Postgres re-plan the statement on every execution.
    match status {
        None => (
            format!(
                "SELECT {DELIVERY_COLUMNS}, true AS hit, 0::int8 AS rn \
                 FROM webhook_subscriber_deliveries s WHERE {scope} {order} LIMIT {fetch}"
            ),
            params,
        ),
        Some(status) => {
            let outer = DELIVERY_COLUMNS.replace("s.", "w.");
            (
                format!(
                    "SELECT {outer}, w.hit, w.rn FROM ( \
                       SELECT {DELIVERY_COLUMNS}, s.status = '{}' AS hit, \
                              row_number() OVER ({order}) AS rn \
                       FROM webhook_subscriber_deliveries s WHERE {scope} {order} LIMIT {budget}) w \
                     WHERE w.hit OR w.rn = {budget} \
                     ORDER BY w.created_at DESC, w.id DESC LIMIT {fetch}",
                    status.as_str(),
                ),
                params,
            )
        }
    }
}

/// One page of the deliveries of the user's webhook `webhook_id`, newest
/// first (`created_at DESC, id DESC`), optionally only those in `status`,
/// starting strictly after `after` (the previous page's [`Page::next`]).
///
/// [`StoreError::NotFound`] for a malformed id, a missing webhook and
/// another user's — checked first, so another user's deliveries are never
/// read. Then one statement walks the webhook's deliveries in page order
/// and stops at `limit + 1` rows; with `status`, also at [`SCAN_BUDGET`]
/// rows examined, and then [`Page::next`] is the last row examined (a page
/// may be short or empty with more to come; only `next: None` is the end).
/// `limit` is clamped to `1..=`[`MAX_PAGE`]. Two statements.
pub async fn list(
    c: &impl GenericClient,
    user_id: &UserId,
    webhook_id: &str,
    status: Option<Status>,
    after: Option<&Position>,
    limit: i64,
) -> Result<Page> {
    let Some(webhook_id) = WebhookId::parse(webhook_id) else {
        return Err(StoreError::NotFound);
    };
    let owned = c
        .prepare_cached("SELECT 1 FROM webhooks WHERE id = $1 AND user_id = $2")
        .await?;
    if c.query_opt(&owned, &[&webhook_id, user_id])
        .await?
        .is_none()
    {
        return Err(StoreError::NotFound);
    }
    let limit = limit.clamp(1, MAX_PAGE);
    let (fetch, budget) = (limit + 1, SCAN_BUDGET);
    let (sql, params) = list_query(&webhook_id, status, after, fetch, budget);
    let rows = c.query(&c.prepare_cached(&sql).await?, &params).await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut stopped_at = None;
    for row in &rows {
        if row.get::<_, bool>(10) {
            items.push(delivery_from_row(row));
        }
        if status.is_some() && row.get::<_, i64>(11) == budget {
            stopped_at = Some(Position {
                created_at: row.get(9),
                id: row.get(0),
            });
        }
    }
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|d| Position {
            created_at: d.created_at,
            id: d.id.clone(),
        })
    } else {
        stopped_at
    };
    Ok(Page { items, next })
}

/// The plan of exactly the page statement [`list`] runs for these
/// arguments (without its ownership check), executed: `EXPLAIN (ANALYZE,
/// BUFFERS, FORMAT JSON)`. For tests and diagnosis; it only reads.
pub async fn explain_list(
    c: &impl GenericClient,
    webhook_id: &WebhookId,
    status: Option<Status>,
    after: Option<&Position>,
    limit: i64,
) -> Result<Value> {
    let (fetch, budget) = (limit.clamp(1, MAX_PAGE) + 1, SCAN_BUDGET);
    let (sql, params) = list_query(webhook_id, status, after, fetch, budget);
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}");
    Ok(c.query_one(&sql, &params).await?.get(0))
}

/// Why a test send was refused.
#[derive(Debug, thiserror::Error)]
pub enum TestSendError {
    /// No such webhook of this user.
    #[error("webhook not found")]
    NotFound,
    /// The webhook is disabled: the delivery would never go out.
    #[error("webhook is disabled; enable it first")]
    Disabled,
    /// An event type outside [`crate::events::CATALOG`].
    #[error("unknown event type {0:?}")]
    InvalidEventType(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for TestSendError {
    fn from(e: tokio_postgres::Error) -> Self {
        TestSendError::Store(e.into())
    }
}

/// Queues a synthetic delivery to the user's webhook `webhook_id` (`POST
/// /v1/webhooks/{id}/test`): the envelope `{"event": event_type, "id":
/// <fresh evt_…>, "created_at": now, "data": data}` (built by
/// [`crate::events::envelope`]) is stored as the delivery's payload — a
/// test send has no event row to reference — pending now; the deliverer
/// POSTs it like any delivery, signed, with retries. Returns its id.
///
/// `event_type` must be in [`crate::events::CATALOG`] (the webhook need
/// not subscribe to it). [`TestSendError::NotFound`] for a malformed,
/// missing or foreign webhook, [`TestSendError::Disabled`] for a disabled
/// one. One `INSERT … SELECT` guarded by the webhook's owner and `enabled`
/// (a follow-up read only names the refusal).
pub async fn send_test(
    c: &impl GenericClient,
    user_id: &UserId,
    webhook_id: &str,
    event_type: &str,
    data: serde_json::Map<String, Value>,
) -> Result<DeliveryId, TestSendError> {
    let Some(webhook_id) = WebhookId::parse(webhook_id) else {
        return Err(TestSendError::NotFound);
    };
    if !crate::events::CATALOG.contains(&event_type) {
        return Err(TestSendError::InvalidEventType(event_type.to_owned()));
    }
    let envelope = crate::events::envelope(
        event_type,
        &EventId::new(),
        OffsetDateTime::now_utc(),
        Value::Object(data),
    );
    let id = DeliveryId::new();
    let stmt = c
        .prepare_cached(
            "INSERT INTO webhook_subscriber_deliveries \
               (id, user_id, webhook_id, event_type, event_payload) \
             SELECT $1, w.user_id, w.id, $4, $5 FROM webhooks w \
              WHERE w.id = $2 AND w.user_id = $3 AND w.enabled",
        )
        .await?;
    if c.execute(&stmt, &[&id, &webhook_id, user_id, &event_type, &envelope])
        .await?
        == 1
    {
        return Ok(id);
    }
    let stmt = c
        .prepare_cached("SELECT enabled FROM webhooks WHERE id = $1 AND user_id = $2")
        .await?;
    match c.query_opt(&stmt, &[&webhook_id, user_id]).await? {
        None => Err(TestSendError::NotFound),
        // `enabled` here only if a concurrent PATCH enabled it since the
        // insert: this send was still refused.
        Some(_) => Err(TestSendError::Disabled),
    }
}
