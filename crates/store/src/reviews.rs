//! Reviewer views of outbound mail (human-in-the-loop, issue 11): the
//! owner's held drafts across all their agents ([`pending`]) and one
//! outbound message in detail ([`outbound`]). Read-only; the decisions
//! themselves (approve, reject, expire) live in the `hitl` aggregate.
//!
//! Tenancy: every statement filters by the owner (`user_id`), so another
//! tenant's message is [`StoreError::NotFound`] (or absent from the list),
//! exactly like a missing one. An inbound message is not an outbound
//! message: [`outbound`] answers [`StoreError::NotFound`] for it too.
//!
//! Bodies: a held draft keeps `body_text`, `body_html` and
//! `attachments_json` on its row until a decision scrubs them (V3); these
//! views hand them out as stored. The list never carries attachment data,
//! only each attachment's name, type and decoded size, computed in SQL so a
//! page of drafts never ships their attachments to the caller.

use deadpool_postgres::GenericClient;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{
    error::{Result, StoreError},
    ids::{MessageId, UserId},
};

/// Most drafts [`pending`] returns.
pub const MAX_PENDING: i64 = 100;

/// An attachment of a held draft, without its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    /// File name, as the agent gave it.
    pub filename: String,
    /// MIME type, as the agent gave it.
    pub content_type: String,
    /// Size of the decoded data in octets.
    pub size_bytes: i64,
}

/// A draft waiting for review, as the reviewer's list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMessage {
    /// `msg_…`
    pub id: MessageId,
    /// The sending agent.
    pub agent_id: String,
    /// `send`, `reply`, `forward` or `test`.
    pub message_type: Option<String>,
    /// Subject as it would be sent.
    pub subject: String,
    /// To.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Bcc.
    pub bcc: Vec<String>,
    /// Conversation.
    pub conversation_id: String,
    /// When the agent sent it.
    pub created_at: OffsetDateTime,
    /// When the hold expires (the agent's expiration action then decides).
    pub approval_expires_at: OffsetDateTime,
    /// The held text body.
    pub body_text: Option<String>,
    /// The held HTML body.
    pub body_html: Option<String>,
    /// The held attachments, in order, without their data.
    pub attachments: Vec<AttachmentInfo>,
}

/// The inbound message a reply or forward answers, as the detail shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentInbound {
    /// Display sender.
    pub sender: String,
    /// Subject.
    pub subject: String,
    /// When it arrived.
    pub created_at: OffsetDateTime,
    /// Its signed `X-E2A-Auth-*` header map.
    pub auth_headers: Option<Value>,
}

/// One outbound message in detail, in any status.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// `msg_…`
    pub id: MessageId,
    /// The sending agent.
    pub agent_id: String,
    /// `messages.status` (`pending_approval`, `approved`, `rejected`,
    /// `expired_approved`, `expired_rejected`, `queued`, `sending`, `sent`,
    /// `failed`).
    pub status: String,
    /// As stored (outbound rows never set it: empty).
    pub sender: String,
    /// First To, else first Cc.
    pub recipient: String,
    /// Subject.
    pub subject: String,
    /// To.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Bcc.
    pub bcc: Vec<String>,
    /// Conversation.
    pub conversation_id: String,
    /// For a reply or forward: the parent's Message-ID, bare; else empty.
    pub email_message_id: String,
    /// The Message-ID minted at accept, bare.
    pub provider_message_id: String,
    /// `smtp` or `loopback`; `None` while held.
    pub method: Option<String>,
    /// `send`, `reply`, `forward` or `test`.
    pub message_type: Option<String>,
    /// When the agent sent it.
    pub created_at: OffsetDateTime,
    /// When the row is deleted.
    pub expires_at: OffsetDateTime,
    /// When the hold expires (held mail only).
    pub approval_expires_at: Option<OffsetDateTime>,
    /// When it was decided.
    pub reviewed_at: Option<OffsetDateTime>,
    /// Who decided (`None` for an expiry, or a deleted reviewer).
    pub reviewed_by_user_id: Option<UserId>,
    /// The reviewer's name (`users.name`), when there is a reviewer.
    pub reviewed_by_name: Option<String>,
    /// Why it was rejected.
    pub rejection_reason: Option<String>,
    /// A reviewer changed it before approving.
    pub edited: bool,
    /// The held text body (`None` once decided).
    pub body_text: Option<String>,
    /// The held HTML body (`None` once decided).
    pub body_html: Option<String>,
    /// The held attachments `[{filename, content_type, data}]`, data
    /// included (`None` once decided, or when there were none).
    pub attachments: Option<Value>,
    /// The inbound message a reply or forward answers, while it exists.
    pub parent: Option<ParentInbound>,
}

/// The decoded size of one stored attachment (alias `a`), from its
/// base64 text: the API stores only canonical, padded standard base64
/// (it refuses anything else), so four characters are three octets less
/// the padding. No decoding, no copy of the data leaves the database.
const DECODED_SIZE: &str = "(octet_length(COALESCE(a.v->>'data', '')) / 4) * 3 \
     - (octet_length(COALESCE(a.v->>'data', '')) - octet_length(rtrim(COALESCE(a.v->>'data', ''), '=')))";

/// The owner's drafts waiting for review across all their agents, the
/// first to expire first (`approval_expires_at ASC, id ASC`), at most
/// [`MAX_PENDING`]. A draft past its expiry that the expiry worker has not
/// decided yet is still listed: its status is the truth.
///
/// One statement, read-only. The scan walks the partial index
/// `messages_user_pending_idx (user_id, approval_expires_at) WHERE status
/// = 'pending_approval'` (the status is a literal so every plan matches
/// it), and the attachments of the page only are summarised.
pub async fn pending(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<PendingMessage>> {
    let stmt = c.prepare_cached(&pending_sql()).await?;
    let rows = c.query(&stmt, &[user_id, &MAX_PENDING]).await?;
    Ok(rows.iter().map(pending_from_row).collect())
}

/// The plan of exactly the statement [`pending`] runs, executed:
/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`. For tests and diagnosis;
/// like [`pending`] it only reads.
pub async fn explain_pending(c: &impl GenericClient, user_id: &UserId) -> Result<Value> {
    let sql = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", pending_sql());
    let row = c.query_one(&sql, &[user_id, &MAX_PENDING]).await?;
    Ok(row.get(0))
}

/// The statement of [`pending`]: `$1` owner, `$2` limit. The page is
/// chosen first (on the partial index), then only its rows' attachments
/// are summarised.
fn pending_sql() -> String {
    format!(
        "SELECT m.id, m.agent_id, m.message_type, m.subject, COALESCE(m.to_recipients, '{{}}'), \
                COALESCE(m.cc, '{{}}'), COALESCE(m.bcc, '{{}}'), m.conversation_id, m.created_at, \
                m.approval_expires_at, m.body_text, m.body_html, \
                att.names, att.types, att.sizes \
           FROM (SELECT id, agent_id, message_type, subject, to_recipients, cc, bcc, \
                        conversation_id, created_at, approval_expires_at, body_text, body_html, \
                        attachments_json \
                   FROM messages \
                  WHERE user_id = $1 AND status = 'pending_approval' \
                  ORDER BY approval_expires_at, id LIMIT $2) m \
           LEFT JOIN LATERAL ( \
                SELECT array_agg(COALESCE(a.v->>'filename', '') ORDER BY a.n) AS names, \
                       array_agg(COALESCE(a.v->>'content_type', '') ORDER BY a.n) AS types, \
                       array_agg(({DECODED_SIZE})::int8 ORDER BY a.n) AS sizes \
                  FROM jsonb_array_elements(m.attachments_json) WITH ORDINALITY AS a(v, n)) att ON true \
          ORDER BY m.approval_expires_at, m.id"
    )
}

fn pending_from_row(r: &Row) -> PendingMessage {
    let names: Vec<String> = r.get::<_, Option<Vec<String>>>(12).unwrap_or_default();
    let types: Vec<String> = r.get::<_, Option<Vec<String>>>(13).unwrap_or_default();
    let sizes: Vec<i64> = r.get::<_, Option<Vec<i64>>>(14).unwrap_or_default();
    let attachments = names
        .into_iter()
        .zip(types)
        .zip(sizes)
        .map(|((filename, content_type), size_bytes)| AttachmentInfo {
            filename,
            content_type,
            size_bytes,
        })
        .collect();
    PendingMessage {
        id: r.get(0),
        agent_id: r.get(1),
        message_type: r.get(2),
        subject: r.get(3),
        to: r.get(4),
        cc: r.get(5),
        bcc: r.get(6),
        conversation_id: r.get(7),
        created_at: r.get(8),
        approval_expires_at: r.get(9),
        body_text: r.get(10),
        body_html: r.get(11),
        attachments,
    }
}

/// The owner's outbound message `id`, in any status, with its review
/// fields, its held bodies (while held) and, for a reply or forward, the
/// inbound message it answers — found by the agent and the parent's
/// Message-ID (`email_message_id`), the oldest unexpired copy, absent once
/// it expired or was deleted.
///
/// [`StoreError::NotFound`] when the message is missing, expired, inbound
/// or another tenant's. One statement, read-only: the reviewer's name is a
/// join on `users`, the parent a lateral lookup on the index
/// `messages_agent_email_message_id_idx`.
pub async fn outbound(
    c: &impl GenericClient,
    user_id: &UserId,
    id: &MessageId,
) -> Result<OutboundMessage> {
    let stmt = c
        .prepare_cached(
            "SELECT m.id, m.agent_id, m.status, m.sender, m.recipient, m.subject, \
                    COALESCE(m.to_recipients, '{}'), COALESCE(m.cc, '{}'), COALESCE(m.bcc, '{}'), \
                    m.conversation_id, m.email_message_id, m.provider_message_id, m.method, \
                    m.message_type, m.created_at, m.expires_at, m.approval_expires_at, \
                    m.reviewed_at, m.reviewed_by_user_id, u.name, m.rejection_reason, m.edited, \
                    m.body_text, m.body_html, m.attachments_json, \
                    p.sender, p.subject, p.created_at, p.auth_headers \
               FROM messages m \
               LEFT JOIN users u ON u.id = m.reviewed_by_user_id \
               LEFT JOIN LATERAL ( \
                    SELECT i.sender, i.subject, i.created_at, i.auth_headers FROM messages i \
                     WHERE i.agent_id = m.agent_id AND i.user_id = m.user_id \
                       AND i.email_message_id = m.email_message_id AND i.email_message_id <> '' \
                       AND i.direction = 'inbound' AND i.expires_at > now() \
                       AND m.message_type IN ('reply', 'forward') \
                     ORDER BY i.created_at, i.id LIMIT 1) p ON true \
              WHERE m.id = $1 AND m.user_id = $2 AND m.direction = 'outbound' \
                AND m.expires_at > now()",
        )
        .await?;
    let row = c
        .query_opt(&stmt, &[id, user_id])
        .await?
        .ok_or(StoreError::NotFound)?;
    let parent = row
        .get::<_, Option<OffsetDateTime>>(27)
        .map(|created_at| ParentInbound {
            sender: row.get(25),
            subject: row.get(26),
            created_at,
            auth_headers: row.get(28),
        });
    Ok(OutboundMessage {
        id: row.get(0),
        agent_id: row.get(1),
        status: row.get(2),
        sender: row.get(3),
        recipient: row.get(4),
        subject: row.get(5),
        to: row.get(6),
        cc: row.get(7),
        bcc: row.get(8),
        conversation_id: row.get(9),
        email_message_id: row.get(10),
        provider_message_id: row.get(11),
        method: row.get(12),
        message_type: row.get(13),
        created_at: row.get(14),
        expires_at: row.get(15),
        approval_expires_at: row.get(16),
        reviewed_at: row.get(17),
        reviewed_by_user_id: row.get(18),
        reviewed_by_name: row.get(19),
        rejection_reason: row.get(20),
        edited: row.get(21),
        body_text: row.get(22),
        body_html: row.get(23),
        attachments: row.get(24),
        parent,
    })
}
