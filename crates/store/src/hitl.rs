//! Human in the loop: the decisions on a held outbound message.
//!
//! An agent with review on has its mail stored `pending_approval` by
//! [`crate::outbound::accept`] (with `email.pending_approval`, and the
//! reviewer's notification). It leaves that state exactly once, by one
//! guarded `UPDATE … WHERE status = 'pending_approval'` in a transaction
//! that also writes everything the decision implies — so of two deciders
//! racing (a reviewer and the expiry, two reviewers, two janitors) exactly
//! one wins and the other sees [`Decided::NotPending`]:
//!
//! * [`approve`] (a reviewer through the API or a magic link, or the
//!   expiry with the agent's action `approve`): the row takes the
//!   (possibly edited) subject and recipients, the reviewer, `edited`,
//!   and status `approved` / `expired_approved` when something goes out
//!   through the mail outbox (the deliverer then moves it on to `sending`
//!   and `sent` or `failed`), or `sent` at once when every recipient is an
//!   agent of this gateway; the mail-outbox delivery or loopback copies;
//!   `email.approved` (and `email.sent` for loopback).
//! * [`reject`] (a reviewer, or the expiry with the action `reject` or an
//!   approval that cannot go out): `rejected` / `expired_rejected` with the
//!   reason, and `email.rejected`.
//!
//! Every decision scrubs the held copy (`body_text`, `body_html`,
//! `attachments_json`, `thread_refs`): on approval the message lives on in
//! the mail-outbox payload, which delivery needs; the storage counters
//! follow through the row's UPDATE trigger (V3; the original's flaw 18).
//! Every decision also uses up the message's magic-link tokens and records
//! how it was made (`decided_via`); the events carry that too, so magic
//! links and the expiry are no longer silent (the original's flaw 10).
//!
//! A human decision is refused once the hold's time has passed, even before
//! the janitor has expired it: what a reviewer sees as pending until its
//! expiry is what they may decide.

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    error::Result,
    events,
    ids::{MessageId, UserId},
    outbound::{self, Accepted, MessageType, OutboundMail},
};

/// `email.approved`.
pub const EMAIL_APPROVED: &str = "email.approved";
/// `email.rejected`.
pub const EMAIL_REJECTED: &str = "email.rejected";
/// The rejection reason of a hold that expired with the action `reject`.
pub const REASON_TTL_EXPIRED: &str = "ttl_expired";
/// The rejection reason when the expiry would approve a message whose
/// agent's domain is not verified (spec §3.1).
pub const REASON_DOMAIN_NOT_VERIFIED: &str = "auto-approve failed: agent domain not verified";

/// Who or what made a decision (`messages.decided_via`, V25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /v1/agents/{address}/messages/{id}/approve|reject`.
    Api,
    /// The confirmation page of a link in the notification mail.
    MagicLink,
    /// The janitor, when the hold expired.
    Expiry,
}

impl Via {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Api => "api",
            Via::MagicLink => "magic_link",
            Via::Expiry => "expiry",
        }
    }
}

/// The outcome of a guarded transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided<T> {
    /// This call decided the message.
    Done(T),
    /// The message is not (or no longer) pending: `status` is its status,
    /// or `expired` for a hold whose time has passed that the janitor has
    /// not expired yet (a human may no longer decide it).
    NotPending {
        /// Its status, or `expired`.
        status: String,
    },
}

/// A held message as a decision needs it.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its id.
    pub id: MessageId,
    /// Owner.
    pub user_id: UserId,
    /// The sending agent.
    pub agent_id: String,
    /// `pending_approval`, or where a decision took it.
    pub status: String,
    /// Send, reply, forward or test.
    pub message_type: MessageType,
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
    /// The parent's Message-ID (reply, forward), bare, or empty.
    pub parent_email_message_id: String,
    /// The Message-ID minted at the hold, bare: the one it is sent with.
    pub rfc_message_id: String,
    /// The References chain (reply).
    pub thread_refs: Vec<String>,
    /// Text body (held copy; `None` once decided).
    pub body_text: Option<String>,
    /// HTML body.
    pub body_html: Option<String>,
    /// `[{filename, content_type, data(base64)}]`.
    pub attachments_json: Option<Value>,
    /// When the hold expires.
    pub approval_expires_at: Option<OffsetDateTime>,
    /// Whether a reviewer changed it.
    pub edited: bool,
}

impl Held {
    /// Why a reviewer may not decide it now: its status when it is not
    /// pending, `expired` when the hold's time has passed (the janitor
    /// decides it); `None` when a reviewer may. The decision's guarded
    /// UPDATE checks the same and stays the authority.
    pub fn undecidable(&self) -> Option<&str> {
        if self.status != "pending_approval" {
            Some(&self.status)
        } else if self
            .approval_expires_at
            .is_some_and(|at| at <= OffsetDateTime::now_utc())
        {
            Some("expired")
        } else {
            None
        }
    }
}

/// The columns of a [`Held`], of `messages m`.
const HELD_COLUMNS: &str = "m.id, m.user_id, m.agent_id, m.status, COALESCE(m.message_type, 'send'), \
     m.subject, COALESCE(m.to_recipients, '{}'), COALESCE(m.cc, '{}'), COALESCE(m.bcc, '{}'), \
     m.conversation_id, m.email_message_id, m.provider_message_id, COALESCE(m.thread_refs, '{}'), \
     m.body_text, m.body_html, m.attachments_json, m.approval_expires_at, m.edited";

fn held_from_row(r: &tokio_postgres::Row) -> Held {
    let message_type = match r.get::<_, &str>(4) {
        "reply" => MessageType::Reply,
        "forward" => MessageType::Forward,
        "test" => MessageType::Test,
        _ => MessageType::Send,
    };
    Held {
        id: r.get(0),
        user_id: r.get(1),
        agent_id: r.get(2),
        status: r.get(3),
        message_type,
        subject: r.get(5),
        to: r.get(6),
        cc: r.get(7),
        bcc: r.get(8),
        conversation_id: r.get(9),
        parent_email_message_id: r.get(10),
        rfc_message_id: r.get(11),
        thread_refs: r.get(12),
        body_text: r.get(13),
        body_html: r.get(14),
        attachments_json: r.get(15),
        approval_expires_at: r.get(16),
        edited: r.get(17),
    }
}

/// The user's outbound message `id` (any status), or
/// [`crate::StoreError::NotFound`] when it is missing, inbound or another
/// tenant's. `agent_id`, when given, must be its agent (else not found
/// too). A plain read: the decision's guarded UPDATE is the authority.
pub async fn held(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: Option<&str>,
    id: &MessageId,
) -> Result<Held> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {HELD_COLUMNS} FROM messages m \
              WHERE m.id = $1 AND m.user_id = $2 AND m.direction = 'outbound' \
                AND ($3::text IS NULL OR m.agent_id = $3)"
        ))
        .await?;
    c.query_opt(&stmt, &[id, user_id, &agent_id])
        .await?
        .map(|r| held_from_row(&r))
        .ok_or(crate::StoreError::NotFound)
}

/// Why `id` is not pending (after a guarded UPDATE found nothing):
/// [`Decided::NotPending`] with its status (`expired` for a pending hold
/// past its time), or [`crate::StoreError::NotFound`].
async fn not_pending<T>(
    c: &impl GenericClient,
    user_id: &UserId,
    id: &MessageId,
) -> Result<Decided<T>> {
    let stmt = c
        .prepare_cached(
            "SELECT CASE WHEN status = 'pending_approval' THEN 'expired' ELSE status END \
               FROM messages WHERE id = $1 AND user_id = $2 AND direction = 'outbound'",
        )
        .await?;
    match c.query_opt(&stmt, &[id, user_id]).await? {
        Some(r) => Ok(Decided::NotPending { status: r.get(0) }),
        None => Err(crate::StoreError::NotFound),
    }
}

/// An approval.
#[derive(Debug, Clone)]
pub struct Approval<'a> {
    /// The message as it goes out (its `message_id` and `user_id` name the
    /// held row; subject and recipients may be a reviewer's edits), with
    /// `hold: None`.
    pub mail: &'a OutboundMail<'a>,
    /// The reviewer, `None` for the expiry.
    pub reviewer: Option<&'a UserId>,
    /// How the decision was made.
    pub via: Via,
    /// A reviewer changed something (spec §3.1's rule); or-ed into the
    /// row's `edited`.
    pub edited: bool,
}

/// What [`approve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    /// The message's new status: `approved` / `expired_approved` (queued
    /// in the mail outbox) or `sent` (every recipient was local).
    pub status: &'static str,
    /// `edited` after the decision.
    pub edited: bool,
    /// What was dispatched.
    pub accepted: Accepted,
}

/// Approves the held message `approval.mail.message_id` in the caller's
/// transaction (see the module docs): one guarded UPDATE of the row (from
/// `pending_approval` only, before its expiry for a human and after it
/// for [`Via::Expiry`]) that also uses up its magic-link tokens, then the
/// delivery or loopback copies, then `email.approved` (and `email.sent`
/// for loopback). [`Decided::NotPending`] writes nothing. After the commit
/// call [`Accepted::wake`].
pub async fn approve(c: &impl GenericClient, approval: &Approval<'_>) -> Result<Decided<Approved>> {
    events::defer_notify(c).await?;
    let mail = approval.mail;
    let (queued_or_sent, method) = outbound::route(mail)?;
    let status = match (queued_or_sent, approval.via) {
        ("sent", _) => "sent",
        (_, Via::Expiry) => "expired_approved",
        _ => "approved",
    };
    let stmt = c
        .prepare_cached(
            "WITH m AS ( \
               UPDATE messages SET status = $3, subject = $4, to_recipients = $5, cc = $6, bcc = $7, \
                 recipient = $8, edited = edited OR $9, reviewed_at = now(), \
                 reviewed_by_user_id = $10, decided_via = $11, method = $12, \
                 body_text = NULL, body_html = NULL, attachments_json = NULL, thread_refs = NULL \
                WHERE id = $1 AND user_id = $2 AND direction = 'outbound' \
                  AND status = 'pending_approval' \
                  AND CASE WHEN $11 = 'expiry' THEN approval_expires_at <= now() \
                           ELSE approval_expires_at > now() END \
               RETURNING id, user_id, edited), \
             t AS ( \
               UPDATE approval_tokens a SET used_at = now() FROM m \
                WHERE a.message_id = m.id AND a.user_id = m.user_id AND a.used_at IS NULL) \
             SELECT edited FROM m",
        )
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[
                mail.message_id,
                mail.user_id,
                &status,
                &mail.subject,
                &mail.to,
                &mail.cc,
                &mail.bcc,
                &mail.first_recipient(),
                &approval.edited,
                &approval.reviewer,
                &approval.via.as_str(),
                &method,
            ],
        )
        .await?;
    let Some(row) = row else {
        return not_pending(c, mail.user_id, mail.message_id).await;
    };
    let edited: bool = row.get(0);
    let accepted = outbound::dispatch(c, mail, method).await?;
    let decision = json!({
        "edited": edited,
        "reviewed_by_user_id": approval.reviewer,
        "decided_via": approval.via.as_str(),
    });
    mail.facts(method)
        .append(c, mail.user_id, EMAIL_APPROVED, decision)
        .await?;
    Ok(Decided::Done(Approved {
        status,
        edited,
        accepted,
    }))
}

/// A rejection.
#[derive(Debug, Clone)]
pub struct Rejection<'a> {
    /// Owner.
    pub user_id: &'a UserId,
    /// The held message.
    pub message_id: &'a MessageId,
    /// The reviewer, `None` for the expiry.
    pub reviewer: Option<&'a UserId>,
    /// How the decision was made.
    pub via: Via,
    /// Why (may be empty).
    pub reason: &'a str,
}

/// What [`reject`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `rejected` or `expired_rejected`.
    pub status: &'static str,
    /// The reason recorded (`None` when empty).
    pub reason: Option<String>,
}

/// Rejects the held message in the caller's transaction: one guarded
/// UPDATE (as [`approve`]'s) that records reviewer and reason, scrubs the
/// held copy and uses up its magic-link tokens, then `email.rejected`.
/// [`Decided::NotPending`] writes nothing.
pub async fn reject(c: &impl GenericClient, r: &Rejection<'_>) -> Result<Decided<Rejected>> {
    events::defer_notify(c).await?;
    let status = if r.via == Via::Expiry {
        "expired_rejected"
    } else {
        "rejected"
    };
    let reason = Some(r.reason).filter(|s| !s.is_empty());
    let stmt = c
        .prepare_cached(
            "WITH m AS ( \
               UPDATE messages SET status = $3, rejection_reason = $4, reviewed_at = now(), \
                 reviewed_by_user_id = $5, decided_via = $6, \
                 body_text = NULL, body_html = NULL, attachments_json = NULL, thread_refs = NULL \
                WHERE id = $1 AND user_id = $2 AND direction = 'outbound' \
                  AND status = 'pending_approval' \
                  AND CASE WHEN $6 = 'expiry' THEN approval_expires_at <= now() \
                           ELSE approval_expires_at > now() END \
               RETURNING id, user_id, agent_id, conversation_id, COALESCE(message_type, 'send') AS message_type), \
             t AS ( \
               UPDATE approval_tokens a SET used_at = now() FROM m \
                WHERE a.message_id = m.id AND a.user_id = m.user_id AND a.used_at IS NULL) \
             SELECT agent_id, conversation_id, message_type FROM m",
        )
        .await?;
    let row = c
        .query_opt(
            &stmt,
            &[
                r.message_id,
                r.user_id,
                &status,
                &reason,
                &r.reviewer,
                &r.via.as_str(),
            ],
        )
        .await?;
    let Some(row) = row else {
        return not_pending(c, r.user_id, r.message_id).await;
    };
    let (agent_id, conversation_id, message_type): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    let data = json!({
        "message_id": r.message_id,
        "type": message_type,
        "rejection_reason": reason,
        "reviewed_by_user_id": r.reviewer,
        "decided_via": r.via.as_str(),
        "from": agent_id,
        "conversation_id": conversation_id,
    });
    events::MessageEvent {
        user_id: r.user_id,
        message_id: r.message_id.as_str(),
        agent_id: &agent_id,
        conversation_id: &conversation_id,
        event_type: EMAIL_REJECTED,
    }
    .append(c, OffsetDateTime::now_utc(), data)
    .await?;
    Ok(Decided::Done(Rejected {
        status,
        reason: reason.map(str::to_owned),
    }))
}

/// An expired hold the janitor decides, with what its agent says.
#[derive(Debug, Clone)]
pub struct Expired {
    /// The held message.
    pub held: Held,
    /// The agent's `hitl_expiration_action` is `approve`.
    pub approve: bool,
    /// The agent's domain is verified (an approval needs it).
    pub domain_verified: bool,
}

/// Up to `limit` holds past their expiry, oldest first, locked `FOR UPDATE
/// SKIP LOCKED` in the caller's transaction: N janitors take disjoint
/// batches, and a reviewer's decision on one of them waits for this
/// transaction and then finds it decided. Decide each with [`approve`] or
/// [`reject`] (`Via::Expiry`) in the same transaction.
pub async fn claim_expired(c: &impl GenericClient, limit: i64) -> Result<Vec<Expired>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {HELD_COLUMNS}, a.hitl_expiration_action = 'approve', d.verified \
               FROM messages m \
               JOIN agents a ON a.id = m.agent_id AND a.user_id = m.user_id \
               JOIN domains d ON d.owned_domain = a.domain \
              WHERE m.status = 'pending_approval' AND m.approval_expires_at <= now() \
              ORDER BY m.approval_expires_at, m.id \
              LIMIT $1 \
                FOR UPDATE OF m SKIP LOCKED"
        ))
        .await?;
    Ok(c.query(&stmt, &[&limit])
        .await?
        .iter()
        .map(|r| Expired {
            held: held_from_row(r),
            approve: r.get(18),
            domain_verified: r.get(19),
        })
        .collect())
}
