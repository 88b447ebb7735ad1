//! Outbound mail, queue-first: [`accept`] stores what an agent sends, in
//! the caller's **one transaction**, and nothing is submitted here.
//!
//! The original sent over SMTP inside the HTTP request and wrote the
//! message row and `email.sent` afterwards, non-atomically (its flaws 5 and
//! 12). Here the API validates and composes, then in one transaction:
//!
//! * the outbound message row (`queued`, or `sent` when every recipient is
//!   an agent of this gateway), with the RFC 5322 Message-ID minted at
//!   accept as its `provider_message_id` — the id the response carries and
//!   every retry sends;
//! * for recipients outside the gateway, one mail-outbox delivery
//!   ([`crate::mail_outbox::enqueue`]: payload, delivery, recipients) that
//!   the deliverer submits later;
//! * for recipients that are agents of this gateway (**loopback**), an
//!   inbound copy each, threaded in the recipient's mailbox, with its
//!   `email.received` event ([`inbound::ingest_in`]) — such mail never
//!   leaves the gateway;
//! * when nothing leaves the gateway, `email.sent` (method `loopback`).
//!
//! The caller adds the idempotency record's completion to the same
//! transaction, commits, and then calls [`Accepted::wake`]. A crash
//! anywhere before the commit leaves nothing; after it, everything.
//!
//! Statuses of an outbound message (`messages.status`, V3): `queued` →
//! `sending` (claimed by a deliverer) → `sent` (with `email.sent`) or
//! `failed` (dead-lettered, with `email.failed`); a temporary failure puts
//! it back to `queued` until the next attempt.

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    Store,
    error::Result,
    events,
    ids::{MailDeliveryId, MessageId, UserId},
    inbound::{self, MESSAGE_TTL},
    mail_outbox::{self, Enqueue, RecipientKind},
};

/// `email.sent`: an outbound message reached every recipient's server (or
/// mailbox, for loopback).
pub const EMAIL_SENT: &str = "email.sent";
/// `email.failed`: an outbound message was given up (dead-lettered).
pub const EMAIL_FAILED: &str = "email.failed";
/// The mail-outbox template of an agent's own message (its idempotency
/// keys are `agent_message:<msg_id>`, never colliding with notifications').
pub const AGENT_MESSAGE_TEMPLATE: &str = "agent_message";

/// What kind of outbound message (`messages.message_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A new thread.
    Send,
    /// A reply to an inbound message.
    Reply,
    /// A forward of an inbound message.
    Forward,
    /// `POST /v1/agents/{address}/test`.
    Test,
}

impl MessageType {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Send => "send",
            MessageType::Reply => "reply",
            MessageType::Forward => "forward",
            MessageType::Test => "test",
        }
    }
}

/// Inbound copies for recipients that are agents of this gateway.
#[derive(Debug, Clone)]
pub struct Loopback<'a> {
    /// The message as each recipient receives it (raw bytes, threading
    /// ids, verdicts).
    pub mail: inbound::InboundMail<'a>,
    /// One copy per recipient agent.
    pub copies: &'a [inbound::Delivery],
}

/// One message to accept.
#[derive(Debug, Clone)]
pub struct OutboundMail<'a> {
    /// Its id, minted by the caller.
    pub message_id: &'a MessageId,
    /// The sending agent's owner.
    pub user_id: &'a UserId,
    /// The sending agent.
    pub agent_id: &'a str,
    /// Send, reply, forward or test.
    pub message_type: MessageType,
    /// The RFC 5322 Message-ID, bare (no angle brackets), minted at accept.
    pub rfc_message_id: &'a str,
    /// For a reply or forward: the parent's Message-ID, bare; else empty.
    pub parent_email_message_id: &'a str,
    /// Subject as sent.
    pub subject: &'a str,
    /// Canonical To, Cc and Bcc (every recipient, local or not).
    pub to: &'a [String],
    /// Cc.
    pub cc: &'a [String],
    /// Bcc.
    pub bcc: &'a [String],
    /// The conversation the message belongs to (never empty).
    pub conversation_id: &'a str,
    /// The composed MIME message (unsigned; the deliverer DKIM-signs it).
    pub raw: &'a [u8],
    /// Envelope sender (`MAIL FROM`).
    pub mail_from: &'a str,
    /// DKIM signing domain (the From domain), or empty to send unsigned.
    pub dkim_domain: &'a str,
    /// Recipients outside the gateway, with their kind: they get one
    /// mail-outbox delivery. Empty when every recipient is local.
    pub external: &'a [(String, RecipientKind)],
    /// Inbound copies for local recipients.
    pub loopback: Option<Loopback<'a>>,
    /// Attempts the delivery gets before it is dead-lettered.
    pub max_attempts: i32,
    /// Hold the message for review instead of sending it (the agent has
    /// human-in-the-loop review on): nothing is enqueued and no loopback
    /// copy is made until a reviewer approves.
    pub hold: Option<Hold<'a>>,
}

impl<'a> OutboundMail<'a> {
    /// `messages.recipient` of an outbound row: the first To, else the
    /// first Cc.
    pub(crate) fn first_recipient(&self) -> &str {
        self.to
            .first()
            .or(self.cc.first())
            .map_or("", String::as_str)
    }

    /// The facts of its `email.sent` / `email.failed` / `email.approved`.
    pub(crate) fn facts(&self, method: &'a str) -> MessageFacts<'_> {
        MessageFacts {
            message_id: self.message_id.as_str(),
            agent_id: self.agent_id,
            rfc_message_id: self.rfc_message_id,
            method,
            to: self.to,
            cc: self.cc,
            bcc: self.bcc,
            subject: self.subject,
            message_type: self.message_type.as_str(),
            conversation_id: self.conversation_id,
        }
    }
}

/// A message held for review (`pending_approval`): the parts a reviewer's
/// decision needs to compose it again, kept on the message row until the
/// decision.
#[derive(Debug, Clone)]
pub struct Hold<'a> {
    /// When the hold expires (the agent's TTL from now).
    pub expires_at: OffsetDateTime,
    /// Text body.
    pub body_text: &'a str,
    /// HTML body.
    pub body_html: Option<&'a str>,
    /// `[{filename, content_type, data(base64)}]`, or `None`.
    pub attachments_json: Option<&'a Value>,
    /// The References chain the message threads with (its In-Reply-To is
    /// the parent's Message-ID, `parent_email_message_id`).
    pub thread_refs: &'a [String],
}

/// What [`accept`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `queued` (something goes out through the outbox), `sent` (every
    /// recipient was local and has its copy) or `pending_approval` (held).
    pub status: &'static str,
    /// `smtp` or `loopback`.
    pub method: &'static str,
    /// The outbox delivery, when something goes out.
    pub delivery_id: Option<MailDeliveryId>,
    /// What happened to each loopback copy.
    pub loopback: Vec<inbound::Outcome>,
}

impl Accepted {
    /// After the commit: wakes the deliverer (one coalesced `NOTIFY` for
    /// the events and the outbox delivery this accept wrote; their
    /// per-commit `NOTIFY`s were deferred, V11 and V24).
    pub fn wake(&self, store: &Store) {
        events::wake_deliverer(store);
    }
}

/// The `data` of `email.sent` (spec §4.3, plus `failed_recipients` when
/// some recipients were refused) and of `email.failed` (plus `error`).
#[derive(Debug, Clone)]
pub struct MessageFacts<'a> {
    /// The `msg_` id.
    pub message_id: &'a str,
    /// The sending agent (`from`).
    pub agent_id: &'a str,
    /// The Message-ID, bare.
    pub rfc_message_id: &'a str,
    /// `smtp` or `loopback`.
    pub method: &'a str,
    /// Recipients.
    pub to: &'a [String],
    /// Cc.
    pub cc: &'a [String],
    /// Bcc.
    pub bcc: &'a [String],
    /// Subject.
    pub subject: &'a str,
    /// Message type (`send`, …).
    pub message_type: &'a str,
    /// Conversation.
    pub conversation_id: &'a str,
}

impl MessageFacts<'_> {
    /// The event's data object; `extra` fields are merged in.
    pub fn data(&self, extra: Value) -> Value {
        let mut data = json!({
            "message_id": self.message_id,
            "provider_message_id": angle(self.rfc_message_id),
            "method": self.method,
            "from": self.agent_id,
            "to": self.to,
            "cc": self.cc,
            "bcc": self.bcc,
            "subject": self.subject,
            "type": self.message_type,
            "conversation_id": self.conversation_id,
        });
        if let (Some(d), Value::Object(extra)) = (data.as_object_mut(), extra) {
            d.extend(extra);
        }
        data
    }

    /// Appends `event_type` (`email.sent`, `email.failed`, `email.approved`) for this
    /// message, with a deterministic id (message id, type): appending it
    /// twice is a no-op.
    pub async fn append(
        &self,
        c: &impl GenericClient,
        user_id: &UserId,
        event_type: &'static str,
        extra: Value,
    ) -> Result<bool> {
        events::MessageEvent {
            user_id,
            message_id: self.message_id,
            agent_id: self.agent_id,
            conversation_id: self.conversation_id,
            event_type,
        }
        .append(c, OffsetDateTime::now_utc(), self.data(extra))
        .await
    }
}

/// `<id>`: a bare Message-ID in the angle brackets of its header form.
pub fn angle(id: &str) -> String {
    format!("<{id}>")
}

/// Stores `mail` (see the module docs). Run it in the caller's transaction
/// together with the idempotency record's completion; after the commit call
/// [`Accepted::wake`]. Nothing here talks to anything but Postgres.
///
/// Errors: any database error (the caller's transaction rolls back and
/// nothing is stored). A recipient both local and external is the caller's
/// mistake ([`crate::StoreError::Invalid`]).
pub async fn accept(c: &impl GenericClient, mail: &OutboundMail<'_>) -> Result<Accepted> {
    // A NOTIFY in the committing transaction would serialise every send's
    // commit; [`Accepted::wake`] sends one after it instead.
    events::defer_notify(c).await?;
    if let Some(hold) = &mail.hold {
        return accept_held(c, mail, hold).await;
    }
    let (status, method) = route(mail)?;
    insert_message(c, mail, status, Some(method), None).await?;
    dispatch(c, mail, method).await
}

/// How `mail` leaves: `queued` by SMTP when some recipient is outside the
/// gateway, else `sent` by loopback. Invalid without any recipient.
pub(crate) fn route(mail: &OutboundMail<'_>) -> Result<(&'static str, &'static str)> {
    let copies = mail.loopback.as_ref().map_or(0, |l| l.copies.len());
    if mail.external.is_empty() && copies == 0 {
        return Err(crate::StoreError::Invalid(
            "an outbound message needs at least one recipient".into(),
        ));
    }
    Ok(if mail.external.is_empty() {
        ("sent", "loopback")
    } else {
        ("queued", "smtp")
    })
}

/// Everything after the message row, for a message that goes out now (a
/// direct send, or a held one a reviewer or the expiry released): its
/// mail-outbox delivery for recipients outside the gateway, the inbound
/// copies of local recipients, and `email.sent` when nothing leaves the
/// gateway. In the caller's transaction.
pub(crate) async fn dispatch(
    c: &impl GenericClient,
    mail: &OutboundMail<'_>,
    method: &'static str,
) -> Result<Accepted> {
    let goes_out = !mail.external.is_empty();
    let delivery_id = if goes_out {
        let key = format!("{AGENT_MESSAGE_TEMPLATE}:{}", mail.message_id);
        mail_outbox::enqueue(
            c,
            &Enqueue {
                user_id: mail.user_id,
                message_id: Some(mail.message_id),
                template_id: AGENT_MESSAGE_TEMPLATE,
                idempotency_key: &key,
                subject: mail.subject,
                body: mail.raw,
                mail_from: mail.mail_from,
                dkim_domain: mail.dkim_domain,
                recipients: mail.external,
                max_attempts: mail.max_attempts,
            },
        )
        .await?
    } else {
        None
    };

    let loopback = match &mail.loopback {
        Some(l) => inbound::ingest_in(c, &l.mail, l.copies).await?,
        None => Vec::new(),
    };
    if !goes_out {
        mail.facts(method)
            .append(c, mail.user_id, EMAIL_SENT, Value::Null)
            .await?;
    }
    Ok(Accepted {
        status: if goes_out { "queued" } else { "sent" },
        method,
        delivery_id,
        loopback,
    })
}

/// Inserts the outbound row of `mail` in `status`, sent by `method` (none
/// while held), with the `hold`'s expiry and bodies when held. Returns its
/// creation time. One statement.
async fn insert_message(
    c: &impl GenericClient,
    mail: &OutboundMail<'_>,
    status: &str,
    method: Option<&str>,
    hold: Option<&Hold<'_>>,
) -> Result<OffsetDateTime> {
    let now = OffsetDateTime::now_utc();
    let mut expires_at = now + MESSAGE_TTL;
    if let Some(hold) = hold {
        // Kept at least until the hold is decided.
        expires_at = expires_at.max(hold.expires_at + time::Duration::days(1));
    }
    let stmt = c
        .prepare_cached(
            "INSERT INTO messages (id, user_id, agent_id, direction, status, recipient, subject, \
               email_message_id, provider_message_id, method, message_type, conversation_id, \
               to_recipients, cc, bcc, created_at, expires_at, approval_expires_at, \
               body_text, body_html, attachments_json, thread_refs) \
             VALUES ($1, $2, $3, 'outbound', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
               $16, $17, $18, $19, $20, $21)",
        )
        .await?;
    c.execute(
        &stmt,
        &[
            mail.message_id,
            mail.user_id,
            &mail.agent_id,
            &status,
            &mail.first_recipient(),
            &mail.subject,
            &mail.parent_email_message_id,
            &mail.rfc_message_id,
            &method,
            &mail.message_type.as_str(),
            &mail.conversation_id,
            &mail.to,
            &mail.cc,
            &mail.bcc,
            &now,
            &expires_at,
            &hold.map(|h| h.expires_at),
            &hold.map(|h| h.body_text),
            &hold.and_then(|h| h.body_html),
            &hold.and_then(|h| h.attachments_json),
            &hold.map(|h| h.thread_refs),
        ],
    )
    .await?;
    Ok(now)
}

/// The held variant of [`accept`]: the message row `pending_approval` with
/// its expiry and bodies, and `email.pending_approval` — nothing else.
async fn accept_held(
    c: &impl GenericClient,
    mail: &OutboundMail<'_>,
    hold: &Hold<'_>,
) -> Result<Accepted> {
    let now = insert_message(c, mail, "pending_approval", None, Some(hold)).await?;
    let data = json!({
        "message_id": mail.message_id,
        "from": mail.agent_id,
        "to": mail.to,
        "cc": mail.cc,
        "bcc": mail.bcc,
        "subject": mail.subject,
        "type": mail.message_type.as_str(),
        "conversation_id": mail.conversation_id,
        "approval_expires_at": hold
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    });
    events::MessageEvent {
        user_id: mail.user_id,
        message_id: mail.message_id.as_str(),
        agent_id: mail.agent_id,
        conversation_id: mail.conversation_id,
        event_type: "email.pending_approval",
    }
    .append(c, now, data)
    .await?;
    Ok(Accepted {
        status: "pending_approval",
        method: "",
        delivery_id: None,
        loopback: Vec::new(),
    })
}

/// The inbound message a reply or forward answers.
#[derive(Debug, Clone)]
pub struct Parent {
    /// Its raw bytes (for threading ids and the quoted original).
    pub raw: Vec<u8>,
    /// Display sender (first Reply-To, else From, else envelope).
    pub sender: String,
    /// Subject.
    pub subject: String,
    /// Its Message-ID, bare, or empty.
    pub email_message_id: String,
    /// Its conversation.
    pub conversation_id: String,
    /// To.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Reply-To.
    pub reply_to: Vec<String>,
    /// When it arrived.
    pub created_at: OffsetDateTime,
}

/// The inbound message `id` of the user's agent `agent_id`, unless it is
/// missing, outbound, expired, another agent's or another tenant's — all
/// [`crate::StoreError::NotFound`] alike.
pub async fn parent(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_id: &str,
    id: &MessageId,
) -> Result<Parent> {
    let stmt = c
        .prepare_cached(
            "SELECT COALESCE(raw_message, ''::bytea), sender, subject, email_message_id, conversation_id, \
                    COALESCE(to_recipients, '{}'), COALESCE(cc, '{}'), COALESCE(reply_to, '{}'), created_at \
               FROM messages \
              WHERE id = $1 AND user_id = $2 AND agent_id = $3 AND direction = 'inbound' \
                AND expires_at > now()",
        )
        .await?;
    c.query_opt(&stmt, &[id, user_id, &agent_id])
        .await?
        .map(|r| Parent {
            raw: r.get(0),
            sender: r.get(1),
            subject: r.get(2),
            email_message_id: r.get(3),
            conversation_id: r.get(4),
            to: r.get(5),
            cc: r.get(6),
            reply_to: r.get(7),
            created_at: r.get(8),
        })
        .ok_or(crate::StoreError::NotFound)
}

/// Which cap a send would break, if any: the monthly message cap first,
/// then storage (spec §7.1, 402), against the user's `account_limits` row
/// or `defaults`. One statement.
pub async fn over_quota(
    c: &impl GenericClient,
    user_id: &UserId,
    defaults: &crate::account_limits::Limits,
) -> Result<Option<(crate::agents::Quota, i64)>> {
    let stmt = c
        .prepare_cached(
            "SELECT u.messages_month, COALESCE(l.max_messages_month::int8, $2::int8), \
                    u.storage_bytes, COALESCE(l.max_storage_bytes, $3::int8) \
               FROM e2a_account_usage($1) AS u LEFT JOIN account_limits l ON l.user_id = $1",
        )
        .await?;
    let r = c
        .query_one(
            &stmt,
            &[
                user_id,
                &i64::from(defaults.max_messages_month),
                &defaults.max_storage_bytes,
            ],
        )
        .await?;
    let (month, max_month, bytes, max_bytes): (i64, i64, i64, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    Ok(if month >= max_month {
        Some((crate::agents::Quota::MonthlyMessages, max_month))
    } else if bytes >= max_bytes {
        Some((crate::agents::Quota::Storage, max_bytes))
    } else {
        None
    })
}
