//! The event outbox (`webhook_events`): the durable log of customer-visible
//! events. A row is appended **in the same transaction** as the change it
//! announces; the table's `AFTER INSERT` trigger NOTIFYs
//! `webhook_events_new` at commit, and the deliverer fans it out to
//! webhooks.

use base64::Engine;
use deadpool_postgres::GenericClient;
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    Store,
    error::Result,
    ids::{EventId, UserId},
    secret,
};

/// `email.received`: inbound mail stored for an agent.
pub const EMAIL_RECEIVED: &str = "email.received";
/// The event types webhooks may subscribe to.
pub const CATALOG: &[&str] = &[
    EMAIL_RECEIVED,
    "email.sent",
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
pub async fn append(c: &impl GenericClient, event: &NewEvent<'_>) -> Result<bool> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, message_id, labels) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
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
    let event_type: &str = row.get(0);
    let mut envelope: Value = row.get(1);
    if event_type == EMAIL_RECEIVED {
        let raw: Option<Vec<u8>> = row.get(2);
        if let Some(data) = envelope.get_mut("data").and_then(Value::as_object_mut) {
            data.insert(
                "raw_message".into(),
                raw.map_or(Value::Null, |raw| {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
                }),
            );
        }
    }
    Ok(Some(envelope))
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
