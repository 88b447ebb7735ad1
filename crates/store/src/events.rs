//! The event outbox (`webhook_events`): the durable log of customer-visible
//! events. A row is appended **in the same transaction** as the change it
//! announces; the table's `AFTER INSERT` trigger NOTIFYs
//! `webhook_events_new` at commit, and the deliverer fans it out to
//! webhooks.

use base64::Engine;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_postgres::types::ToSql;

use crate::{
    Store,
    error::{Result, StoreError},
    idempotency,
    ids::{DeliveryId, EventId, UserId, WebhookId},
    secret,
};

/// `email.received`: inbound mail stored for an agent.
pub const EMAIL_RECEIVED: &str = "email.received";
/// The event types webhooks may subscribe to.
pub const CATALOG: &[&str] = &[
    EMAIL_RECEIVED,
    "email.sent",
    "email.failed",
    "email.pending_approval",
    "email.approved",
    "email.rejected",
];

/// `evt_` + the first 32 hex of sha256(parts joined by `|`): the same
/// inputs always give the same id, so re-appending is a no-op.
pub fn deterministic_id(parts: &[&str]) -> EventId {
    let digest = secret::sha256_hex(parts.join("|").as_bytes());
    EventId::from_hex(&digest[..32]).unwrap_or_default()
}

/// The wire envelope `{"event", "id", "created_at", "data"}`.
pub fn envelope(event_type: &str, id: &EventId, created_at: OffsetDateTime, data: Value) -> Value {
    serde_json::json!({
        "event": event_type,
        "id": id,
        "created_at": created_at.format(&Rfc3339).unwrap_or_default(),
        "data": data,
    })
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// Its id (see [`deterministic_id`]).
    pub id: &'a EventId,
    /// The owner whose webhooks may receive it.
    pub user_id: &'a UserId,
    /// One of [`CATALOG`].
    pub event_type: &'a str,
    /// The full envelope, POSTed verbatim.
    pub envelope: &'a Value,
    /// Routing: agent address.
    pub agent_id: Option<&'a str>,
    /// Routing: conversation.
    pub conversation_id: Option<&'a str>,
    /// Routing: message.
    pub message_id: Option<&'a str>,
    /// Routing: labels at the time of the event.
    pub labels: &'a [String],
}

/// Appends `event` to the outbox. Idempotent on the id: returns `false` when
/// it was already there. Run it in the transaction of the change it
/// announces.
///
/// The event references its message only while that message exists: the
/// message row (of the same owner) is share-locked for the rest of the
/// transaction, as the foreign key did before V28, so a concurrent delete
/// either finished first (the event is stored with no `message_id`) or
/// waits for this transaction and then clears the reference with the rest
/// (V28's delete trigger). Inbound ingest writes its events in its own
/// statement, next to the messages it inserts, and does not come here.
pub async fn append(c: &impl GenericClient, event: &NewEvent<'_>) -> Result<bool> {
    let stmt = c
        .prepare_cached(
            "WITH m AS MATERIALIZED ( \
               SELECT id FROM messages WHERE id = $7 AND user_id = $2 FOR KEY SHARE) \
             INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, message_id, labels) \
             VALUES ($1, $2, $3, $4, $5, $6, (SELECT id FROM m), $8) ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    let n = c
        .execute(
            &stmt,
            &[
                event.id,
                event.user_id,
                &event.event_type,
                event.envelope,
                &event.agent_id,
                &event.conversation_id,
                &event.message_id,
                &event.labels,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// An event about one message of one agent (`email.sent`,
/// `email.pending_approval`, `email.approved`, …).
#[derive(Debug, Clone, Copy)]
pub struct MessageEvent<'a> {
    /// The owner.
    pub user_id: &'a UserId,
    /// The message (`msg_…`).
    pub message_id: &'a str,
    /// Its agent.
    pub agent_id: &'a str,
    /// Its conversation (empty: none).
    pub conversation_id: &'a str,
    /// One of [`CATALOG`].
    pub event_type: &'static str,
}

impl MessageEvent<'_> {
    /// Appends it with `data`, its envelope dated `created_at`: the id is
    /// [`deterministic_id`] of (message, type), so appending it twice is a
    /// no-op (returns `false`); routed by agent, conversation (when not
    /// empty) and message. Run it in the transaction of the change it
    /// announces.
    pub async fn append(
        &self,
        c: &impl GenericClient,
        created_at: OffsetDateTime,
        data: Value,
    ) -> Result<bool> {
        let id = deterministic_id(&[self.message_id, self.event_type]);
        let envelope = envelope(self.event_type, &id, created_at, data);
        append(
            c,
            &NewEvent {
                id: &id,
                user_id: self.user_id,
                event_type: self.event_type,
                envelope: &envelope,
                agent_id: Some(self.agent_id),
                conversation_id: Some(self.conversation_id).filter(|c| !c.is_empty()),
                message_id: Some(self.message_id),
                labels: &[],
            },
        )
        .await
    }
}

/// How long a deferred wake-up may wait for more commits to share it.
pub const WAKE_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// Turns off the per-commit `NOTIFY` of the event trigger for the rest of
/// transaction `tx` (V11). The caller must call [`wake_deliverer`] after
/// the commit. One statement.
pub async fn defer_notify(tx: &impl GenericClient) -> Result<()> {
    let stmt = tx
        .prepare_cached("SELECT set_config('e2a.defer_notify', 'on', true)")
        .await?;
    tx.query_one(&stmt, &[]).await?;
    Ok(())
}

/// Wakes the deliverer for events committed with [`defer_notify`]: sends
/// `NOTIFY webhook_events_new` at most [`WAKE_WINDOW`] later, one
/// notification for every commit in that window, from a short-lived task
/// (never on the caller's path).
///
/// Guarantee: a notification is sent after every call. A call either
/// schedules the send, or finds one scheduled whose flag it saw before that
/// send clears it, and the flag is cleared before the `NOTIFY` goes out, so
/// the send happens after the caller's commit. Best effort like any NOTIFY:
/// on a database error the deliverer's own polling picks the events up.
pub fn wake_deliverer(store: &Store) {
    use std::sync::atomic::Ordering;
    if store.event_wake_pending.swap(true, Ordering::AcqRel) {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(WAKE_WINDOW).await;
        store.event_wake_pending.store(false, Ordering::Release);
        let sent = async {
            let client = store.client().await?;
            client.batch_execute("NOTIFY webhook_events_new").await?;
            Ok::<_, crate::StoreError>(())
        };
        if let Err(e) = sent.await {
            tracing::warn!(error = %crate::error::chain(&e), "waking the deliverer failed; it will poll");
        }
    });
}

/// The envelope of event `id` as it goes on the wire, or `None` when there
/// is no such event.
///
/// `email.received` envelopes are stored without the raw message (it is
/// written once, in its message row); here `data.raw_message` is filled in
/// as the standard base64 of that row's bytes — the same bytes, so the same
/// rendering, on every attempt — or `null` once the message has been deleted
/// (its 10-day TTL, or the user deleted it). Other events are returned as
/// stored. One statement.
pub async fn render(c: &impl GenericClient, id: &EventId) -> Result<Option<Value>> {
    let stmt = c
        .prepare_cached(
            "SELECT e.type, e.envelope, m.raw_message FROM webhook_events e \
             LEFT JOIN messages m ON m.id = e.message_id AND m.user_id = e.user_id \
             WHERE e.id = $1",
        )
        .await?;
    let Some(row) = c.query_opt(&stmt, &[id]).await? else {
        return Ok(None);
    };
    Ok(Some(rendered(row.get(0), row.get(1), row.get(2))))
}

/// An event's envelope as it goes on the wire: an `email.received` gets
/// `data.raw_message` from the message's stored bytes (`raw`; `null` once
/// they are gone); other events are sent as stored.
pub fn rendered(event_type: &str, mut envelope: Value, raw: Option<Vec<u8>>) -> Value {
    if event_type == EMAIL_RECEIVED
        && let Some(data) = envelope.get_mut("data")
    {
        fill_raw_message(data, raw);
    }
    envelope
}

/// Sets `data.raw_message` of an `email.received` event: the standard
/// base64 of the message's stored bytes, `null` once they are gone.
fn fill_raw_message(data: &mut Value, raw: Option<Vec<u8>>) {
    if let Some(data) = data.as_object_mut() {
        data.insert(
            "raw_message".into(),
            raw.map_or(Value::Null, |raw| {
                Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
            }),
        );
    }
}

/// Deletes up to `batch` events past their `expires_at` (30 days) that are
/// no longer pending; returns how many. A pending event is kept whatever
/// its age: it has not reached its subscribers yet. Rows are claimed with
/// `SKIP LOCKED` (janitor replicas split the work; fan-out is never waited
/// on). Deliveries keep their own retention and are not touched.
pub async fn delete_expired(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM webhook_events WHERE id IN ( \
               SELECT id FROM webhook_events \
               WHERE expires_at <= now() AND status <> 'pending' \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

// ---------------------------------------------------------------------------
// The events API: the owner's event log, one event with its delivery
// counts, and redelivery.

/// Where an event is in the outbox (the column's CHECK allows exactly these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Not fanned out yet.
    Pending,
    /// Fanned out to at least one webhook.
    Processed,
    /// Fanned out; no webhook matched.
    NoMatch,
    /// The fan-out gave up.
    Failed,
}

impl EventStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Processed => "processed",
            EventStatus::NoMatch => "no_match",
            EventStatus::Failed => "failed",
        }
    }

    /// The status stored as `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => EventStatus::Pending,
            "processed" => EventStatus::Processed,
            "no_match" => EventStatus::NoMatch,
            "failed" => EventStatus::Failed,
            _ => return None,
        })
    }
}

/// An event as its owner sees it through the API.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `evt_…`
    pub id: EventId,
    /// One of [`CATALOG`].
    pub event_type: String,
    /// Version of the envelope's shape.
    pub schema_version: i16,
    /// When it was appended.
    pub created_at: OffsetDateTime,
    /// Routing: the agent.
    pub agent_id: Option<String>,
    /// Routing: the conversation.
    pub conversation_id: Option<String>,
    /// Routing: the message (cleared when the message is deleted).
    pub message_id: Option<String>,
    /// Where it is in the outbox.
    pub status: EventStatus,
    /// The envelope's `data`. In [`list`] as stored (an `email.received`
    /// event has no `raw_message` there); [`get`] fills `raw_message` in
    /// like a delivery does ([`render`]).
    pub data: Value,
}

/// How an event's deliveries stand ([`get`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryCounts {
    /// Webhooks the fan-out matched.
    pub matched_webhooks: i64,
    /// Deliveries of the event (first ones and replays) delivered…
    pub delivered: i64,
    /// … still pending …
    pub pending: i64,
    /// … and failed.
    pub failed: i64,
}

/// One event with its delivery counts.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDetail {
    /// The event, `data.raw_message` filled in.
    pub event: Event,
    /// Its deliveries.
    pub delivery_status: DeliveryCounts,
}

/// Why an events call was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// No such event of this user (another user's is the same answer).
    #[error("event not found")]
    NotFound,
    /// The event is past its retention (`expires_at`, 30 days) but not swept
    /// yet.
    #[error("event is past its retention period")]
    Gone,
    /// The event has not been fanned out yet: it matched no webhook so far,
    /// and its first deliveries are still to come.
    #[error("event is still pending: it has not been fanned out to webhooks yet")]
    Pending,
    /// No such webhook of this user.
    #[error("webhook not found")]
    WebhookNotFound,
    /// The webhook was not among those the event was fanned out to.
    #[error("webhook {0} did not match this event")]
    WebhookNotMatched(WebhookId),
    /// The webhook is disabled: a replay would wait until it is enabled.
    #[error("webhook {0} is disabled")]
    WebhookDisabled(WebhookId),
    /// Another redelivery of the same event and webhook is being decided.
    #[error("a redelivery of this event is in progress")]
    InFlight,
    /// A stored redelivery answer could not be read back.
    #[error("stored redelivery answer is unreadable")]
    CorruptReplay(#[source] serde_json::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for EventError {
    fn from(e: tokio_postgres::Error) -> Self {
        EventError::Store(e.into())
    }
}

/// Largest page of [`list`].
pub const MAX_PAGE: i64 = 200;
/// Most events one [`list`] call examines (see there).
pub const SCAN_BUDGET: i64 = 1000;

/// What [`list`] selects (all optional, ANDed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Exactly this type.
    pub event_type: Option<String>,
    /// Exactly this agent (the normalised address).
    pub agent_id: Option<String>,
    /// Exactly this conversation.
    pub conversation_id: Option<String>,
    /// Exactly this message.
    pub message_id: Option<String>,
    /// Created at or after.
    pub since: Option<OffsetDateTime>,
    /// Created before.
    pub until: Option<OffsetDateTime>,
}

/// A place in the `(created_at, id)` order of an account's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// `created_at` of the row.
    pub created_at: OffsetDateTime,
    /// Its id.
    pub id: EventId,
}

/// One page of [`list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The events, newest first.
    pub items: Vec<Event>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Position>,
}

const LIST_COLUMNS: &str = "e.id, e.type, e.schema_version, e.created_at, e.agent_id, \
     e.conversation_id, e.message_id, e.status, e.envelope -> 'data' AS data";
const OUTER_COLUMNS: &str = "w.id, w.type, w.schema_version, w.created_at, w.agent_id, \
     w.conversation_id, w.message_id, w.status, w.data";

fn event_from_row(r: &tokio_postgres::Row) -> Event {
    Event {
        id: r.get(0),
        event_type: r.get(1),
        schema_version: r.get(2),
        created_at: r.get(3),
        agent_id: r.get(4),
        conversation_id: r.get(5),
        message_id: r.get(6),
        // The column's CHECK admits only the four statuses.
        status: EventStatus::parse(r.get(7)).unwrap_or(EventStatus::Pending),
        data: r.get::<_, Option<Value>>(8).unwrap_or(Value::Null),
    }
}

/// Appends `clause` with its `$?` replaced by the next parameter number.
fn bind<'a>(
    sql: &mut String,
    params: &mut Vec<&'a (dyn ToSql + Sync)>,
    clause: &str,
    value: &'a (dyn ToSql + Sync),
) {
    params.push(value);
    sql.push_str(&clause.replace("$?", &format!("${}", params.len())));
}

/// The statement of [`list`] and its parameters.
struct ListQuery<'a> {
    sql: String,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

/// Owns what [`ListQuery`] borrows.
struct ListArgs<'a> {
    user_id: &'a UserId,
    filter: &'a ListFilter,
    after: Option<&'a Position>,
    /// `budget` and `fetch` go into the SQL as literals (see
    /// `messages::ListArgs`: a `LIMIT $n` is re-planned on every execution).
    budget: i64,
    fetch: i64,
}

impl<'a> ListArgs<'a> {
    fn new(
        user_id: &'a UserId,
        filter: &'a ListFilter,
        after: Option<&'a Position>,
        limit: i64,
    ) -> Self {
        Self {
            user_id,
            filter,
            after,
            budget: SCAN_BUDGET,
            fetch: limit.clamp(1, MAX_PAGE) + 1,
        }
    }

    /// The walk: one index of the user's events in `(created_at DESC, id
    /// DESC)` order — the message's events when a message is named (a
    /// handful), else the agent index, else the type index, else the
    /// account's whole log (V18: each ends in the id, so no sort). Its
    /// range (owner, the indexed value, since, until, cursor) is the
    /// `WHERE` of the inner scan; every other test — the filters the index
    /// does not hold and the retention — only decides `hit`, so the scan's
    /// `LIMIT` counts every row examined.
    fn query(&'a self) -> ListQuery<'a> {
        let f = self.filter;
        let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![self.user_id];
        let mut scope = String::from("e.user_id = $1");
        let mut hit: Vec<String> = vec!["e.expires_at > now()".into()];
        let mut test = |params: &mut Vec<&'a (dyn ToSql + Sync)>,
                        clause: &str,
                        value: &'a (dyn ToSql + Sync)| {
            let mut sql = String::new();
            bind(&mut sql, params, clause, value);
            hit.push(sql);
        };
        if let Some(m) = &f.message_id {
            bind(
                &mut scope,
                &mut params,
                " AND e.message_id = $? AND e.message_id IS NOT NULL",
                m,
            );
            if let Some(a) = &f.agent_id {
                test(&mut params, "e.agent_id = $?", a);
            }
            if let Some(t) = &f.event_type {
                test(&mut params, "e.type = $?", t);
            }
        } else if let Some(a) = &f.agent_id {
            bind(
                &mut scope,
                &mut params,
                " AND e.agent_id = $? AND e.agent_id IS NOT NULL",
                a,
            );
            if let Some(t) = &f.event_type {
                test(&mut params, "e.type = $?", t);
            }
        } else if let Some(t) = &f.event_type {
            bind(&mut scope, &mut params, " AND e.type = $?", t);
        }
        if let Some(cv) = &f.conversation_id {
            test(&mut params, "e.conversation_id = $?", cv);
        }
        if let Some(since) = &f.since {
            bind(&mut scope, &mut params, " AND e.created_at >= $?", since);
        }
        if let Some(until) = &f.until {
            bind(&mut scope, &mut params, " AND e.created_at < $?", until);
        }
        if let Some(pos) = self.after {
            // The first bound is what the index range uses; the row
            // comparison drops the ties already returned.
            bind(
                &mut scope,
                &mut params,
                " AND e.created_at <= $?",
                &pos.created_at,
            );
            bind(
                &mut scope,
                &mut params,
                " AND (e.created_at, e.id) < ($?",
                &pos.created_at,
            );
            bind(&mut scope, &mut params, ", $?)", &pos.id);
        }
        let hit = format!("COALESCE({}, false)", hit.join(" AND "));
        // The window numbers rows as the index delivers them, the inner
        // LIMIT ends the scan at the budget, the outer one at `fetch` hits.
        let mut sql = format!(
            "SELECT {OUTER_COLUMNS}, w.hit, w.rn FROM ( \
               SELECT {LIST_COLUMNS}, {hit} AS hit, \
                      row_number() OVER (ORDER BY e.created_at DESC, e.id DESC) AS rn \
               FROM webhook_events e WHERE {scope} \
               ORDER BY e.created_at DESC, e.id DESC"
        );
        sql.push_str(&format!(
            " LIMIT {budget}) w WHERE w.hit OR w.rn = {budget} \
             ORDER BY w.created_at DESC, w.id DESC LIMIT {fetch}",
            budget = self.budget,
            fetch = self.fetch,
        ));
        ListQuery { sql, params }
    }
}

/// One page of the user's events matching `filter`, newest first
/// (`created_at DESC, id DESC`), starting strictly after `after` (the
/// previous page's [`Page::next`]). Events past their retention
/// (`expires_at`) are left out, as [`get`] answers them
/// [`EventError::Gone`]. `data` is the envelope's as stored (no
/// `raw_message`: a page of 200 events does not carry 200 mails).
///
/// Bounded: one statement walks one index of the user's events (see
/// `ListArgs::query`) and stops at whichever comes first — `limit + 1`
/// matching rows, [`SCAN_BUDGET`] rows examined, or the end:
///
/// * more than `limit` matches: the first `limit`, [`Page::next`] after
///   the last of them;
/// * the budget ran out first: the matches found (possibly none), and
///   [`Page::next`] is the last row *examined*, so the next call continues
///   the walk there;
/// * the end: [`Page::next`] is `None`.
///
/// `limit` is clamped to `1..=`[`MAX_PAGE`]. Another user's events are
/// never examined (the owner leads every index).
pub async fn list(
    c: &impl GenericClient,
    user_id: &UserId,
    filter: &ListFilter,
    after: Option<&Position>,
    limit: i64,
) -> Result<Page> {
    let limit = limit.clamp(1, MAX_PAGE);
    let args = ListArgs::new(user_id, filter, after, limit);
    let q = args.query();
    let stmt = c.prepare_cached(&q.sql).await?;
    let rows = c.query(&stmt, &q.params).await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut stopped_at = None;
    for row in &rows {
        if row.get::<_, bool>(9) {
            items.push(event_from_row(row));
        }
        if row.get::<_, i64>(10) == args.budget {
            stopped_at = Some(Position {
                created_at: row.get(3),
                id: row.get(0),
            });
        }
    }
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|e| Position {
            created_at: e.created_at,
            id: e.id.clone(),
        })
    } else {
        stopped_at
    };
    Ok(Page { items, next })
}

/// The plan of exactly the statement [`list`] runs for these arguments,
/// executed: `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`. For tests and
/// diagnosis; like [`list`] it only reads.
pub async fn explain_list(
    c: &impl GenericClient,
    user_id: &UserId,
    filter: &ListFilter,
    after: Option<&Position>,
    limit: i64,
) -> Result<Value> {
    let args = ListArgs::new(user_id, filter, after, limit);
    let q = args.query();
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", q.sql);
    Ok(c.query_one(&sql, &q.params).await?.get(0))
}

/// The user's event `id` with its delivery counts; `data.raw_message` of
/// an `email.received` event is filled in as for a delivery ([`render`]).
/// [`EventError::NotFound`] for a malformed id, a missing event and
/// another user's; [`EventError::Gone`] past its `expires_at` (30 days)
/// before the janitor deleted it. One statement; the counts read the
/// event's deliveries through `webhook_subscriber_deliveries_event_idx`.
pub async fn get(
    c: &impl GenericClient,
    user_id: &UserId,
    id: &str,
) -> Result<EventDetail, EventError> {
    let Some(id) = EventId::parse(id) else {
        return Err(EventError::NotFound);
    };
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {LIST_COLUMNS}, e.expires_at <= now(), m.raw_message, \
                    cardinality(e.matched_webhook_ids)::int8, d.delivered, d.pending, d.failed \
             FROM webhook_events e \
             LEFT JOIN messages m ON m.id = e.message_id AND m.user_id = e.user_id \
             CROSS JOIN LATERAL ( \
               SELECT count(*) FILTER (WHERE s.status = 'delivered') AS delivered, \
                      count(*) FILTER (WHERE s.status = 'pending') AS pending, \
                      count(*) FILTER (WHERE s.status = 'failed') AS failed \
               FROM webhook_subscriber_deliveries s \
               WHERE s.event_id = e.id AND s.user_id = e.user_id) d \
             WHERE e.id = $1 AND e.user_id = $2"
        ))
        .await?;
    let row = c
        .query_opt(&stmt, &[&id, user_id])
        .await?
        .ok_or(EventError::NotFound)?;
    if row.get::<_, bool>(9) {
        return Err(EventError::Gone);
    }
    let mut event = event_from_row(&row);
    if event.event_type == EMAIL_RECEIVED {
        fill_raw_message(&mut event.data, row.get(10));
    }
    Ok(EventDetail {
        event,
        delivery_status: DeliveryCounts {
            matched_webhooks: row.get(11),
            delivered: row.get(12),
            pending: row.get(13),
            failed: row.get(14),
        },
    })
}

/// The route of a redelivery in its request fingerprint (spec §3.3).
pub const REDELIVER_ROUTE: &str = "/v1/events/redeliver";
/// How long a redelivery answers a repeat of itself with its first answer
/// instead of scheduling again.
pub const REDELIVER_WINDOW: time::Duration = time::Duration::minutes(5);

/// The server-minted idempotency key of a redelivery of `event` to
/// `webhook` (all matched webhooks when `None`):
/// `s:replay:<event_id>:<webhook_id or "">`, replayed for
/// [`REDELIVER_WINDOW`].
pub fn replay_key(event: &EventId, webhook: Option<&WebhookId>) -> idempotency::Key {
    let webhook = webhook.map_or("", WebhookId::as_str);
    idempotency::Key::server(&format!("replay:{event}:{webhook}"), REDELIVER_WINDOW)
}

/// The status of a redelivery as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedeliveryStatus {
    /// One webhook: its delivery is queued.
    Pending,
    /// All matched webhooks: see each one's [`RedeliveryItem`].
    Scheduled,
}

/// What happened for one webhook of a redelivery to all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// A delivery is queued.
    Pending,
    /// Nothing was queued; see the reason.
    Skipped,
}

/// Why a matched webhook got no redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// It was deleted since the fan-out.
    WebhookDeleted,
    /// It is disabled (by its owner or automatically).
    WebhookDisabled,
}

/// One webhook of a redelivery to all (`RedeliverDelivery`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeliveryItem {
    /// The webhook.
    pub webhook_id: WebhookId,
    /// Its new delivery, when one was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<DeliveryId>,
    /// Queued or skipped.
    pub status: ItemStatus,
    /// Why it was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<SkipReason>,
}

/// The answer of a redelivery, field for field the contract's
/// `RedeliverView`: `{delivery_id, event_id, webhook_id, status:
/// "pending"}` for one webhook, `{event_id, status: "scheduled",
/// deliveries}` for all. It is also what the idempotency record keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redelivery {
    /// The event.
    pub event_id: EventId,
    /// See [`RedeliveryStatus`].
    pub status: RedeliveryStatus,
    /// One webhook: its new delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<DeliveryId>,
    /// One webhook: which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_id: Option<WebhookId>,
    /// All webhooks: one entry per matched webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Vec<RedeliveryItem>>,
}

/// What [`redeliver`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redelivered {
    /// The answer.
    pub redelivery: Redelivery,
    /// True when it is the stored answer of an earlier identical request
    /// within [`REDELIVER_WINDOW`]: nothing new was queued.
    pub replayed: bool,
}

/// Queues the user's event `id` again: for `webhook` only, or for every
/// webhook the fan-out matched (`webhook_events.matched_webhook_ids`).
///
/// A replay is a new delivery row that **references** the event
/// (`event_id` set, `replay_id` = its own id, no payload: the deliverer
/// renders the event at each attempt), pending now; the deliverer picks it
/// up like any other.
///
/// * [`EventError::NotFound`] for a malformed, missing or foreign event,
///   [`EventError::Gone`] past its retention, [`EventError::Pending`]
///   before the fan-out ran (its first deliveries are still to come).
/// * With `webhook`: [`EventError::WebhookNotFound`] unless it is the
///   user's, [`EventError::WebhookNotMatched`] unless the fan-out matched
///   it, [`EventError::WebhookDisabled`] while it is disabled.
/// * Without: each matched webhook gets a delivery, or is reported skipped
///   because it was deleted or is disabled.
///
/// Deduplicated: the idempotency key [`replay_key`] is claimed, the
/// deliveries inserted and the answer completed in **one transaction** (a
/// savepoint inside the caller's), so a repeat within
/// [`REDELIVER_WINDOW`] — concurrent or later — answers the first answer
/// ([`Redelivered::replayed`]) and queues nothing, and a refused or failed
/// redelivery stores nothing. The webhooks are share-locked until the
/// commit, so a concurrent delete waits rather than failing the insert.
pub async fn redeliver(
    c: &mut impl GenericClient,
    user_id: &UserId,
    id: &str,
    webhook: Option<&str>,
) -> Result<Redelivered, EventError> {
    let Some(event_id) = EventId::parse(id) else {
        return Err(EventError::NotFound);
    };
    let webhook = match webhook {
        None => None,
        Some(w) => Some(WebhookId::parse(w).ok_or(EventError::WebhookNotFound)?),
    };
    let tx = c.transaction().await?;
    let row = tx
        .query_opt(
            &tx.prepare_cached(
                "SELECT type, matched_webhook_ids, expires_at <= now(), status = 'pending' \
                 FROM webhook_events WHERE id = $1 AND user_id = $2",
            )
            .await?,
            &[&event_id, user_id],
        )
        .await?
        .ok_or(EventError::NotFound)?;
    if row.get::<_, bool>(2) {
        return Err(EventError::Gone);
    }
    if row.get::<_, bool>(3) {
        // Refused rather than answered "nothing to redeliver": that answer
        // would be replayed for the dedupe window while the fan-out, soon,
        // matches webhooks.
        return Err(EventError::Pending);
    }
    let event_type: String = row.get(0);
    let mut matched: Vec<String> = row.get(1);
    let mut seen = std::collections::HashSet::new();
    matched.retain(|w| seen.insert(w.clone()));

    let key = replay_key(&event_id, webhook.as_ref());
    let hash = idempotency::request_hash(REDELIVER_ROUTE, b"");
    let ticket = match idempotency::claim(&tx, user_id, &key, REDELIVER_ROUTE, &hash).await? {
        idempotency::Claim::Acquired(ticket) => ticket,
        idempotency::Claim::Replay(stored) => {
            let redelivery =
                serde_json::from_slice(&stored.body).map_err(EventError::CorruptReplay)?;
            tx.commit().await?;
            return Ok(Redelivered {
                redelivery,
                replayed: true,
            });
        }
        // Every redelivery of one key has the same fingerprint, so a reuse
        // cannot happen; both mean "not now".
        idempotency::Claim::InFlight | idempotency::Claim::Reuse => {
            return Err(EventError::InFlight);
        }
    };

    let candidates: Vec<String> = match &webhook {
        Some(w) => vec![w.to_string()],
        None => matched.clone(),
    };
    let enabled: std::collections::HashMap<String, bool> = tx
        .query(
            &tx.prepare_cached(
                "SELECT id, enabled FROM webhooks WHERE user_id = $1 AND id = ANY ($2) \
                 ORDER BY id FOR KEY SHARE",
            )
            .await?,
            &[user_id, &candidates],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let mut queue: Vec<(DeliveryId, String)> = Vec::new();
    let redelivery = match webhook {
        Some(w) => {
            let Some(&on) = enabled.get(w.as_str()) else {
                return Err(EventError::WebhookNotFound);
            };
            if !matched.iter().any(|m| m == w.as_str()) {
                return Err(EventError::WebhookNotMatched(w));
            }
            if !on {
                return Err(EventError::WebhookDisabled(w));
            }
            let delivery = DeliveryId::new();
            queue.push((delivery.clone(), w.to_string()));
            Redelivery {
                event_id: event_id.clone(),
                status: RedeliveryStatus::Pending,
                delivery_id: Some(delivery),
                webhook_id: Some(w),
                deliveries: None,
            }
        }
        None => {
            let items = matched
                .iter()
                .filter_map(|m| WebhookId::parse(m))
                .map(|w| match enabled.get(w.as_str()) {
                    Some(true) => {
                        let delivery = DeliveryId::new();
                        queue.push((delivery.clone(), w.to_string()));
                        RedeliveryItem {
                            webhook_id: w,
                            delivery_id: Some(delivery),
                            status: ItemStatus::Pending,
                            reason: None,
                        }
                    }
                    other => RedeliveryItem {
                        webhook_id: w,
                        delivery_id: None,
                        status: ItemStatus::Skipped,
                        reason: Some(if other.is_some() {
                            SkipReason::WebhookDisabled
                        } else {
                            SkipReason::WebhookDeleted
                        }),
                    },
                })
                .collect();
            Redelivery {
                event_id: event_id.clone(),
                status: RedeliveryStatus::Scheduled,
                delivery_id: None,
                webhook_id: None,
                deliveries: Some(items),
            }
        }
    };
    if !queue.is_empty() {
        let (ids, hooks): (Vec<DeliveryId>, Vec<String>) = queue.into_iter().unzip();
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO webhook_subscriber_deliveries \
                   (id, replay_id, user_id, webhook_id, event_id, event_type) \
                 SELECT d.id, d.id, $1, d.webhook_id, $2, $3 \
                 FROM unnest($4::text[], $5::text[]) AS d(id, webhook_id)",
            )
            .await?,
            &[user_id, &event_id, &event_type, &ids, &hooks],
        )
        .await?;
    }
    let body = serde_json::to_vec(&redelivery).map_err(EventError::CorruptReplay)?;
    idempotency::complete(&tx, &ticket, 200, &body).await?;
    tx.commit().await?;
    Ok(Redelivered {
        redelivery,
        replayed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_ids_are_stable_and_distinct() {
        let a = deterministic_id(&["msg_1", EMAIL_RECEIVED]);
        assert_eq!(a, deterministic_id(&["msg_1", EMAIL_RECEIVED]));
        assert_ne!(a, deterministic_id(&["msg_2", EMAIL_RECEIVED]));
        assert!(EventId::parse(a.as_str()).is_some());
    }
}
