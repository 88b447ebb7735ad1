//! Conversations: the set of one agent's non-expired messages sharing a
//! non-empty `conversation_id` (every inbound message gets one, see
//! [`crate::inbound`]). Conversations are per agent: the same id under two
//! agents is two conversations.
//!
//! **Listing costs a page, not a mailbox**: the table
//! `conversation_summaries` (V14) holds each conversation's counts, time
//! span and newest member, kept by triggers on `messages` in the writing
//! statement's transaction, and [`list`] reads one page of its index
//! `(agent_id, last_message_at DESC, conversation_id DESC)`. Only a
//! summary with a member past its TTL that the janitor has not deleted yet
//! is recomputed from the visible members, so expired messages stay
//! invisible here too. [`get`] aggregates one conversation's members
//! directly (the conversation index).
//!
//! Tenancy: every query filters by owner **and** agent; another user's
//! conversation is [`StoreError::NotFound`] / absent, exactly like a missing
//! one. Read-only: nothing here changes a message (no read-on-get).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::{Row, types::ToSql};

use crate::{
    error::{Result, StoreError},
    ids::UserId,
    messages::{self, MessageSummary},
};

/// One conversation as lists show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The id.
    pub conversation_id: String,
    /// Oldest member's `created_at`.
    pub first_message_at: OffsetDateTime,
    /// Newest member's `created_at`.
    pub last_message_at: OffsetDateTime,
    /// Members.
    pub message_count: i64,
    /// Inbound members.
    pub inbound_count: i64,
    /// Outbound members.
    pub outbound_count: i64,
    /// Whether any inbound member is unread.
    pub has_unread: bool,
    /// Subject of the newest member.
    pub latest_subject: String,
    /// Sender of the newest member (the agent itself for outbound mail).
    pub latest_sender: String,
}

/// One conversation with its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationDetail {
    /// The aggregate fields.
    pub summary: ConversationSummary,
    /// Sorted, deduplicated union of every member's sender, recipient, To,
    /// Cc and Bcc (empty values dropped).
    pub participants: Vec<String>,
    /// Sorted, deduplicated union of the members' labels.
    pub labels: Vec<String>,
    /// Members oldest first (`created_at, id`), at most
    /// [`MAX_DETAIL_MESSAGES`] (the oldest ones).
    pub messages: Vec<MessageSummary>,
}

/// Most conversations [`list`] returns.
pub const MAX_LIST: i64 = 100;
/// Most members [`get`] returns; the counts still cover all of them.
pub const MAX_DETAIL_MESSAGES: i64 = 1000;

/// `sender`, or the agent for outbound rows without one.
const FROM_EXPR: &str =
    "CASE WHEN direction = 'outbound' AND sender = '' THEN agent_id ELSE sender END";

fn aggregates() -> String {
    format!(
        "min(created_at), max(created_at), count(*), \
         count(*) FILTER (WHERE direction = 'inbound'), count(*) FILTER (WHERE direction = 'outbound'), \
         COALESCE(bool_or(inbox_status = 'unread'), false), \
         (array_agg(subject ORDER BY created_at DESC, id DESC))[1], \
         (array_agg({FROM_EXPR} ORDER BY created_at DESC, id DESC))[1]"
    )
}

/// Reads `conversation_id` then the [`aggregates`] columns.
fn summary_from_row(r: &Row) -> ConversationSummary {
    ConversationSummary {
        conversation_id: r.get(0),
        first_message_at: r.get(1),
        last_message_at: r.get(2),
        message_count: r.get(3),
        inbound_count: r.get(4),
        outbound_count: r.get(5),
        has_unread: r.get(6),
        latest_subject: r.get(7),
        latest_sender: r.get(8),
    }
}

/// The statement [`list`] runs and its parameters. Since and until are
/// index conditions on `last_message_at`, so a window costs a page too.
fn list_query<'a>(
    user_id: &'a UserId,
    agent_id: &'a &'a str,
    since: &'a Option<OffsetDateTime>,
    until: &'a Option<OffsetDateTime>,
    limit: i64,
) -> (String, Vec<&'a (dyn ToSql + Sync)>) {
    let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![agent_id, user_id];
    let mut window = String::new();
    if let Some(since) = since {
        params.push(since);
        window.push_str(&format!(" AND c.last_message_at >= ${}", params.len()));
    }
    if let Some(until) = until {
        params.push(until);
        window.push_str(&format!(" AND c.last_message_at < ${}", params.len()));
    }
    // The limit is a literal (a computed integer, never client text): a
    // `LIMIT $n` makes Postgres re-plan the statement on every execution.
    // The live aggregate runs only for a summary with an expired member
    // (its gating qual is false otherwise) and then wins over the stored
    // values; HAVING drops its row when nothing is visible.
    let sql = format!(
        "SELECT s.conversation_id, \
           COALESCE(l.first_at, s.first_message_at), COALESCE(l.last_at, s.last_message_at), \
           COALESCE(l.n, s.message_count), COALESCE(l.n_in, s.inbound_count), \
           COALESCE(l.n_out, s.outbound_count), COALESCE(l.n_unread, s.unread_count) > 0, \
           COALESCE(l.subject, s.latest_subject), COALESCE(l.sender, s.latest_sender) \
         FROM ( \
           SELECT c.conversation_id, c.agent_id, c.first_message_at, c.last_message_at, \
                  c.message_count, c.inbound_count, c.outbound_count, c.unread_count, \
                  c.latest_subject, c.latest_sender, c.min_expires_at \
           FROM conversation_summaries c \
           WHERE c.agent_id = $1 AND c.user_id = $2 AND c.max_expires_at > now(){window} \
           ORDER BY c.last_message_at DESC, c.conversation_id DESC LIMIT {limit}) s \
         LEFT JOIN LATERAL ( \
           SELECT min(created_at) AS first_at, max(created_at) AS last_at, count(*) AS n, \
                  count(*) FILTER (WHERE direction = 'inbound') AS n_in, \
                  count(*) FILTER (WHERE direction = 'outbound') AS n_out, \
                  count(*) FILTER (WHERE inbox_status = 'unread') AS n_unread, \
                  (array_agg(subject ORDER BY created_at DESC, id DESC))[1] AS subject, \
                  (array_agg({FROM_EXPR} ORDER BY created_at DESC, id DESC))[1] AS sender \
           FROM messages m \
           WHERE s.min_expires_at <= now() AND m.agent_id = s.agent_id \
             AND m.conversation_id = s.conversation_id AND m.conversation_id <> '' \
             AND m.expires_at > now() \
           HAVING count(*) > 0) l ON true \
         ORDER BY s.last_message_at DESC, s.conversation_id DESC"
    );
    (sql, params)
}

/// The owner's conversations of `agent_id`, most recently active first
/// (`last_message_at DESC, conversation_id DESC`), optionally only those
/// whose last message is at or after `since` and before `until`.
///
/// `limit` is clamped to `1..=`[`MAX_LIST`] (the original's behaviour). One
/// statement reading one page of the summary index — its cost does not grow
/// with the mailbox — plus, for a summary with a member past its TTL that
/// the janitor has not deleted yet, that conversation's visible members.
/// The order and the window then still use the stored `last_message_at`,
/// which differs from the visible one only if the newest member expired
/// before an older one. An unknown or foreign agent yields an empty list.
pub async fn list(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    limit: i64,
) -> Result<Vec<ConversationSummary>> {
    let limit = limit.clamp(1, MAX_LIST);
    let (sql, params) = list_query(user_id, &agent_id, &since, &until, limit);
    let stmt = c.prepare_cached(&sql).await?;
    let rows = c.query(&stmt, &params).await?;
    Ok(rows.iter().map(summary_from_row).collect())
}

/// The plan of exactly the statement [`list`] runs, executed: `EXPLAIN
/// (ANALYZE, BUFFERS, FORMAT JSON)`. For tests and diagnosis; read-only.
pub async fn explain_list(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    limit: i64,
) -> Result<serde_json::Value> {
    let limit = limit.clamp(1, MAX_LIST);
    let (sql, params) = list_query(user_id, &agent_id, &since, &until, limit);
    let row = c
        .query_one(
            &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"),
            &params,
        )
        .await?;
    Ok(row.get(0))
}

/// The owner's conversation `conversation_id` of `agent_id` with its
/// participants, labels and members (see [`ConversationDetail`]).
///
/// [`StoreError::NotFound`] when it has no visible member (missing,
/// expired, another agent's or another user's). Two statements; run it in a
/// transaction when the aggregates and the member list must come from one
/// snapshot.
pub async fn get(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    conversation_id: &str,
) -> Result<ConversationDetail> {
    if conversation_id.is_empty() {
        return Err(StoreError::NotFound);
    }
    let sql = format!(
        "WITH conv AS ( \
           SELECT id, direction, sender, agent_id, recipient, to_recipients, cc, bcc, labels, inbox_status, \
                  subject, created_at \
           FROM messages \
           WHERE agent_id = $1 AND user_id = $2 AND conversation_id = $3 AND expires_at > now()) \
         SELECT $3::text, {}, \
           ARRAY(SELECT DISTINCT p FROM conv, \
                   unnest(ARRAY[{FROM_EXPR}, recipient] || COALESCE(to_recipients, '{{}}') \
                          || COALESCE(cc, '{{}}') || COALESCE(bcc, '{{}}')) AS u(p) \
                 WHERE p <> '' ORDER BY p), \
           ARRAY(SELECT DISTINCT l FROM conv, unnest(labels) AS v(l) ORDER BY l) \
         FROM conv",
        aggregates()
    );
    let stmt = c.prepare_cached(&sql).await?;
    let row = c
        .query_one(&stmt, &[&agent_id, user_id, &conversation_id])
        .await?;
    if row.get::<_, i64>(3) == 0 {
        return Err(StoreError::NotFound);
    }
    let summary = summary_from_row(&row);
    let participants: Vec<String> = row.get(9);
    let labels: Vec<String> = row.get(10);

    let members = format!(
        "SELECT {} FROM messages m \
         WHERE m.agent_id = $1 AND m.user_id = $2 AND m.conversation_id = $3 AND m.expires_at > now() \
         ORDER BY m.created_at, m.id LIMIT {MAX_DETAIL_MESSAGES}",
        messages::SUMMARY_COLUMNS
    );
    let stmt = c.prepare_cached(&members).await?;
    let rows = c
        .query(&stmt, &[&agent_id, user_id, &conversation_id])
        .await?;
    Ok(ConversationDetail {
        summary,
        participants,
        labels,
        messages: rows.iter().map(messages::summary_from_row).collect(),
    })
}
