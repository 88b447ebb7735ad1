//! Fan-out: the transition of an event in the outbox (`webhook_events`,
//! `pending`) into one subscriber delivery per matching enabled webhook
//! (`webhook_subscriber_deliveries`), committed **with** the event's new
//! status (`processed` with the matched webhook ids, or `no_match`).
//!
//! The match rule (spec §4.3, typed filters of V16), evaluated in SQL for
//! every enabled webhook of the event's owner — however many there are (the
//! original stopped at a page of webhooks, flaw 8):
//!
//! ```text
//! e.type = ANY (w.events)
//! AND (cardinality(w.filter_agent_ids) = 0 OR e.agent_id = ANY (w.filter_agent_ids))
//! AND (cardinality(w.filter_conversation_ids) = 0 OR e.conversation_id = ANY (w.filter_conversation_ids))
//! AND (cardinality(w.filter_labels) = 0 OR e.labels && w.filter_labels)
//! ```
//!
//! Labels are the event's own (copied when it was appended), so a label
//! filter matches (flaw 9). Disabled webhooks are not matched: an event that
//! happens while a webhook is off is not queued for it.

use deadpool_postgres::GenericClient;

use crate::error::Result;

/// Events one [`fan_out`] call handles at most, by default.
pub const DEFAULT_BATCH: i64 = 100;

/// What one [`fan_out`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FannedOut {
    /// Events that left `pending` (processed or no_match).
    pub events: u64,
    /// Deliveries created.
    pub deliveries: u64,
}

/// The statement. `$1` batch size, `$2` one event id or NULL for "any due".
///
/// * `e` takes due pending events in order with `FOR UPDATE SKIP LOCKED`,
///   so replicas running this concurrently split the events and never wait
///   for each other;
/// * `m` matches them against the owner's enabled webhooks;
/// * `ins` writes one delivery per match — ids sort by time, then by the
///   event's position, so one webhook's deliveries are claimed in event
///   order — and `ON CONFLICT (event_id, webhook_id) … DO NOTHING` makes a
///   repeated fan-out of the same event harmless;
/// * the final `UPDATE` moves every taken event out of `pending`, recording
///   the matched webhook ids.
///
/// One statement, so one atomic unit: the deliveries exist if and only if
/// the event is no longer pending. It commits **asynchronously**
/// (`synchronous_commit = off` for its own transaction): the event it reads
/// was committed durably by its producer, and a fan-out lost in a database
/// crash is lost whole — the event is pending again and is fanned out
/// anew. Nothing that depends on it can survive without it either: WAL is
/// flushed in order, so a durable commit of a delivery's outcome also
/// flushes the fan-out that created the delivery. The deliveries' insert triggers pull each
/// webhook's `next_due_at` forward and `NOTIFY webhook_deliveries_new` at
/// commit.
const FAN_OUT_SQL: &str = "WITH quiet AS MATERIALIZED ( \
       SELECT set_config('synchronous_commit', 'off', true) AS sync), \
     e AS MATERIALIZED ( \
       SELECT v.id, v.user_id, v.type, v.agent_id, v.conversation_id, v.labels, v.created_at \
         FROM quiet, webhook_events v \
        WHERE quiet.sync = 'off' AND v.status = 'pending' AND v.next_poll_at <= now() \
          AND ($2::text IS NULL OR v.id = $2) \
        ORDER BY v.next_poll_at, v.created_at, v.id LIMIT $1 FOR UPDATE OF v SKIP LOCKED), \
     m AS MATERIALIZED ( \
       SELECT e.id AS event_id, w.id AS webhook_id, e.user_id, e.type, \
              row_number() OVER (ORDER BY e.created_at, e.id, w.id) AS n \
         FROM e JOIN webhooks w ON w.user_id = e.user_id AND w.enabled \
        WHERE e.type = ANY (w.events) \
          AND (cardinality(w.filter_agent_ids) = 0 OR e.agent_id = ANY (w.filter_agent_ids)) \
          AND (cardinality(w.filter_conversation_ids) = 0 \
               OR e.conversation_id = ANY (w.filter_conversation_ids)) \
          AND (cardinality(w.filter_labels) = 0 OR e.labels && w.filter_labels)), \
     ins AS ( \
       INSERT INTO webhook_subscriber_deliveries \
              (id, user_id, webhook_id, event_type, event_id) \
       SELECT 'whd_' || lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') \
                     || lpad(to_hex(m.n % 65536), 4, '0') \
                     || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16), \
              m.user_id, m.webhook_id, m.type, m.event_id \
         FROM m ORDER BY m.webhook_id, m.n \
       ON CONFLICT (event_id, webhook_id) WHERE event_id IS NOT NULL AND replay_id IS NULL \
       DO NOTHING RETURNING 1), \
     upd AS ( \
       UPDATE webhook_events ev \
          SET status = CASE WHEN g.ids IS NULL THEN 'no_match' ELSE 'processed' END, \
              matched_webhook_ids = COALESCE(g.ids, '{}'), processed_at = now(), \
              leased_until = NULL, lease_token = NULL \
         FROM e LEFT JOIN ( \
                SELECT event_id, array_agg(webhook_id ORDER BY webhook_id) AS ids \
                  FROM m GROUP BY event_id) g ON g.event_id = e.id \
        WHERE ev.id = e.id \
       RETURNING 1) \
     SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM ins)";

/// Fans out up to `batch` due pending events, oldest first; see the module
/// docs. **Atomic** (one statement): each event taken leaves `pending` in
/// the same commit that creates its deliveries. **Idempotent**: a delivery
/// of the same (event, webhook) is never created twice. **Never blocks on
/// another replica**: events being fanned out elsewhere are skipped.
///
/// Returns what was done; `events < batch` means nothing more is due right
/// now. On an error nothing was changed: call [`fan_out_one_by_one`] to
/// isolate the event at fault.
pub async fn fan_out(c: &impl GenericClient, batch: i64) -> Result<FannedOut> {
    run(c, batch, None).await
}

async fn run(c: &impl GenericClient, batch: i64, event_id: Option<&str>) -> Result<FannedOut> {
    let stmt = c.prepare_cached(FAN_OUT_SQL).await?;
    let row = c.query_one(&stmt, &[&batch, &event_id]).await?;
    let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    Ok(FannedOut {
        events: count(0),
        deliveries: count(1),
    })
}

/// The slow path after [`fan_out`] failed: fans out up to `batch` due
/// events one statement each, so one event that cannot be fanned out does
/// not hold back the others. An event whose statement fails gets its
/// attempt counted, the error recorded and its next try pushed back a
/// minute; after the event's `max_attempts` (50) it becomes `failed`,
/// kept for inspection and swept after its TTL. Returns what was fanned
/// out. Run it on a pooled client, not inside a transaction: each event
/// commits (or fails) on its own.
pub async fn fan_out_one_by_one(c: &impl GenericClient, batch: i64) -> Result<FannedOut> {
    let due = c
        .query(
            &c.prepare_cached(
                "SELECT id FROM webhook_events WHERE status = 'pending' AND next_poll_at <= now() \
                 ORDER BY next_poll_at, created_at, id LIMIT $1",
            )
            .await?,
            &[&batch],
        )
        .await?;
    let mut total = FannedOut::default();
    for row in due {
        let id: String = row.get(0);
        match run(c, 1, Some(&id)).await {
            Ok(done) => {
                total.events += done.events;
                total.deliveries += done.deliveries;
            }
            Err(e) => {
                let error: String = crate::error::chain(&e).chars().take(4000).collect();
                tracing::warn!(event_id = %id, error = %error, "fan-out of one event failed");
                c.execute(
                    &c.prepare_cached(
                        "UPDATE webhook_events \
                            SET attempts = LEAST(attempts + 1, max_attempts), last_error = $2, \
                                next_poll_at = now() + interval '60 seconds', \
                                status = CASE WHEN attempts + 1 >= max_attempts THEN 'failed' ELSE status END \
                          WHERE id = $1 AND status = 'pending'",
                    )
                    .await?,
                    &[&id, &error],
                )
                .await?;
            }
        }
    }
    Ok(total)
}
