//! Conversations: not a table but the set of one agent's non-expired
//! messages sharing a non-empty `conversation_id` (every inbound message
//! gets one, see [`crate::inbound`]). Conversations are per agent: the same
//! id under two agents is two conversations.
//!
//! Tenancy: every query filters by owner **and** agent; another user's
//! conversation is [`StoreError::NotFound`] / absent, exactly like a missing
//! one. Read-only: nothing here changes a message (no read-on-get).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;

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

/// The owner's conversations of `agent_id`, most recently active first
/// (`last_message_at DESC, conversation_id DESC`), optionally only those
/// whose last message is at or after `since` and before `until`.
///
/// `limit` is clamped to `1..=`[`MAX_LIST`] (the original's behaviour). One
/// statement. An unknown or foreign agent yields an empty list.
pub async fn list(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    limit: i64,
) -> Result<Vec<ConversationSummary>> {
    let sql = format!(
        "SELECT conversation_id, {} FROM messages \
         WHERE agent_id = $1 AND user_id = $2 AND conversation_id <> '' AND expires_at > now() \
         GROUP BY conversation_id \
         HAVING ($3::timestamptz IS NULL OR max(created_at) >= $3) \
            AND ($4::timestamptz IS NULL OR max(created_at) < $4) \
         ORDER BY max(created_at) DESC, conversation_id DESC LIMIT $5",
        aggregates()
    );
    let stmt = c.prepare_cached(&sql).await?;
    let limit = limit.clamp(1, MAX_LIST);
    let rows = c
        .query(&stmt, &[&agent_id, user_id, &since, &until, &limit])
        .await?;
    Ok(rows.iter().map(summary_from_row).collect())
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
         ORDER BY m.created_at, m.id LIMIT $4",
        messages::SUMMARY_COLUMNS
    );
    let stmt = c.prepare_cached(&members).await?;
    let rows = c
        .query(
            &stmt,
            &[&agent_id, user_id, &conversation_id, &MAX_DETAIL_MESSAGES],
        )
        .await?;
    Ok(ConversationDetail {
        summary,
        participants,
        labels,
        messages: rows.iter().map(messages::summary_from_row).collect(),
    })
}
