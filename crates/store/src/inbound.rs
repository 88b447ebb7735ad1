//! Inbound mail: [`ingest`] stores one received message for each recipient
//! agent, threads it, and appends its `email.received` events — in **one
//! transaction**. The relay answers `250` only after it returns `Ok`.
//!
//! * **Dedupe (the original's flaw 2):** a row per agent is unique on
//!   (agent, Message-ID — possibly empty —, sha256 of the raw bytes); an MTA
//!   retrying a message it already delivered hits the unique index and gets
//!   the existing id back ([`Outcome::Duplicate`]) — no second row, no second
//!   event. This holds for mail without a Message-ID too (V8).
//! * **Threading (flaw 16):** a trusted conversation header (the caller
//!   decides trust — flaw 28), else the newest message of the same agent
//!   whose Message-ID (inbound) or upstream id (outbound) is among the
//!   In-Reply-To/References ids, else a freshly minted `cnv_…` id. Every
//!   stored message therefore has a conversation.
//! * **Inbox status (flaw 14):** every inbound row starts `unread`.
//! * **Raw bytes once:** the raw message is written once per recipient row
//!   and nowhere else; the `email.received` event carries no copy of it (its
//!   `raw_message` is filled in from the row when the event is rendered for
//!   delivery, see [`crate::events::render`]).
//! * **Wake-up:** the events' per-commit NOTIFY is deferred (V11) and sent
//!   coalesced after the commit ([`events::wake_deliverer`]): a NOTIFY in
//!   the committing transaction would serialise every ingest commit on the
//!   notification-queue lock.
//! * **Lock order:** copies are written in (owner, agent) order whatever the
//!   RCPT order, so two messages to the same agents cannot deadlock each
//!   other on the counters or rows they lock.

use deadpool_postgres::{GenericClient, Transaction};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    error::Result,
    events::{self, NewEvent},
    ids::{MessageId, UserId},
    secret,
    store::Store,
};

/// How long messages are kept (the original's `MessageTTL`).
pub const MESSAGE_TTL: Duration = Duration::days(10);

/// The `body_sha256` of [`InboundMail`]: lowercase hex SHA-256 of `raw`.
pub fn body_sha256(raw: &[u8]) -> String {
    secret::sha256_hex(raw)
}

/// Mints a new conversation id: `cnv_` + 32 lowercase hex.
pub fn mint_conversation_id() -> String {
    format!("cnv_{}", secret::random_hex::<16>())
}

/// The parts of a received message shared by all its recipients.
#[derive(Debug, Clone)]
pub struct InboundMail<'a> {
    /// The raw RFC 5322 bytes as received.
    pub raw: &'a [u8],
    /// Lowercase hex SHA-256 of `raw` (see [`body_sha256`]; the caller
    /// hashes each message once, off the async executor, and signs the same
    /// digest into `X-E2A-Auth-*`).
    pub body_sha256: &'a str,
    /// Its Message-ID without angle brackets, or empty.
    pub email_message_id: &'a str,
    /// Display sender: first Reply-To, else From, else the envelope sender.
    pub sender: &'a str,
    /// Decoded subject.
    pub subject: &'a str,
    /// To addresses.
    pub to: &'a [String],
    /// Cc addresses.
    pub cc: &'a [String],
    /// Reply-To addresses.
    pub reply_to: &'a [String],
    /// In-Reply-To then References ids, without angle brackets.
    pub thread_refs: &'a [String],
    /// A conversation id the caller has decided to trust (see `e2a-mail`).
    pub trusted_conversation_id: Option<&'a str>,
    /// SPF verdict (`pass`, `fail`, …).
    pub spf: &'a str,
    /// DKIM verdict.
    pub dkim: &'a str,
    /// DMARC verdict.
    pub dmarc: &'a str,
}

/// One recipient agent's copy.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The id to store under (minted by the caller, who signed it into
    /// `auth_headers`).
    pub message_id: MessageId,
    /// The recipient agent (its address).
    pub agent_id: String,
    /// The agent's domain.
    pub agent_domain: String,
    /// The agent's owner.
    pub user_id: UserId,
    /// The signed `X-E2A-Auth-*` headers for this copy (a JSON object).
    pub auth_headers: Value,
}

/// What happened to one [`Delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored, threaded and announced.
    Stored {
        /// The new row.
        message_id: MessageId,
        /// Its conversation.
        conversation_id: String,
    },
    /// The same message was already stored for this agent; nothing written.
    Duplicate {
        /// The existing row.
        message_id: MessageId,
    },
}

struct Ctx<'a> {
    mail: &'a InboundMail<'a>,
    deliveries: &'a [Delivery],
}

/// Stores `mail` once per delivery, atomically; see the module docs.
/// Returns one
/// [`Outcome`] per delivery, in the order given. Any error means nothing
/// was stored (the caller answers 451).
pub async fn ingest(
    store: &Store,
    mail: &InboundMail<'_>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>> {
    let ctx = Ctx { mail, deliveries };
    let outcomes = store
        .transaction(&ctx, |tx, ctx| {
            Box::pin(async move {
                events::defer_notify(tx).await?;
                // One global lock order: by owner, then agent.
                let mut order: Vec<usize> = (0..ctx.deliveries.len()).collect();
                order.sort_by_key(|&i| (&ctx.deliveries[i].user_id, &ctx.deliveries[i].agent_id));
                let mut outcomes: Vec<Option<Outcome>> = vec![None; ctx.deliveries.len()];
                for i in order {
                    outcomes[i] = Some(store_one(tx, ctx, &ctx.deliveries[i]).await?);
                }
                Ok(outcomes.into_iter().flatten().collect::<Vec<_>>())
            })
        })
        .await?;
    if outcomes.iter().any(|o| matches!(o, Outcome::Stored { .. })) {
        events::wake_deliverer(store);
    }
    Ok(outcomes)
}

async fn store_one(tx: &Transaction<'_>, ctx: &Ctx<'_>, d: &Delivery) -> Result<Outcome> {
    let mail = ctx.mail;
    let conversation_id = match mail.trusted_conversation_id {
        Some(id) => id.to_owned(),
        None => match thread_of(tx, &d.agent_id, mail.thread_refs).await? {
            Some(id) => id,
            None => mint_conversation_id(),
        },
    };
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let insert = tx
        .prepare_cached(
            "INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, email_message_id, \
               raw_message, body_sha256, auth_headers, spf_result, dkim_result, dmarc_result, conversation_id, \
               inbox_status, to_recipients, cc, reply_to, created_at, expires_at) \
             VALUES ($1, $2, $3, 'inbound', $4, $3, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'unread', $14, $15, $16, \
               $17, $18) \
             ON CONFLICT (agent_id, email_message_id, body_sha256) \
               WHERE direction = 'inbound' DO NOTHING \
             RETURNING id",
        )
        .await?;
    let reply_to: Option<&[String]> = (!mail.reply_to.is_empty()).then_some(mail.reply_to);
    let inserted = tx
        .query_opt(
            &insert,
            &[
                &d.message_id,
                &d.user_id,
                &d.agent_id,
                &mail.sender,
                &mail.subject,
                &mail.email_message_id,
                &mail.raw,
                &mail.body_sha256,
                &d.auth_headers,
                &mail.spf,
                &mail.dkim,
                &mail.dmarc,
                &conversation_id,
                &mail.to,
                &mail.cc,
                &reply_to,
                &now,
                &(now + MESSAGE_TTL),
            ],
        )
        .await?;
    if inserted.is_none() {
        let existing = tx
            .prepare_cached(
                "SELECT id FROM messages WHERE agent_id = $1 AND email_message_id = $2 AND body_sha256 = $3 \
                 AND direction = 'inbound'",
            )
            .await?;
        let row = tx
            .query_one(
                &existing,
                &[&d.agent_id, &mail.email_message_id, &mail.body_sha256],
            )
            .await?;
        return Ok(Outcome::Duplicate {
            message_id: row.get(0),
        });
    }

    let event_id = events::deterministic_id(&[d.message_id.as_str(), events::EMAIL_RECEIVED]);
    let data = json!({
        "message_id": d.message_id,
        "conversation_id": conversation_id,
        "agent": { "id": d.agent_id, "email": d.agent_id, "domain": d.agent_domain },
        "from": mail.sender,
        "to": mail.to,
        "cc": mail.cc,
        "reply_to": reply_to,
        "recipient": d.agent_id,
        "subject": mail.subject,
        "auth_headers": d.auth_headers,
        "received_at": now.format(&Rfc3339).unwrap_or_default(),
    });
    let envelope = events::envelope(
        events::EMAIL_RECEIVED,
        &event_id,
        OffsetDateTime::now_utc(),
        data,
    );
    events::append(
        tx,
        &NewEvent {
            id: &event_id,
            user_id: &d.user_id,
            event_type: events::EMAIL_RECEIVED,
            envelope: &envelope,
            agent_id: Some(&d.agent_id),
            conversation_id: Some(&conversation_id),
            message_id: Some(d.message_id.as_str()),
            labels: &[],
        },
    )
    .await?;
    Ok(Outcome::Stored {
        message_id: d.message_id.clone(),
        conversation_id,
    })
}

/// The statement of [`thread_of`] (`$1` agent, `$2` ids): one index lookup
/// per id in each of `messages_agent_email_message_id_idx` and
/// `messages_agent_provider_message_id_idx` (each branch repeats its partial
/// index's `<> ''` predicate, which a parameter's `= ANY($2)` alone does not
/// prove), and only the rows found are sorted. Written as `OR` under one
/// `ORDER BY … LIMIT 1`, the planner prefers walking the agent's whole
/// mailbox newest-first until a row matches.
pub const THREAD_OF_SQL: &str = "SELECT conversation_id FROM ( \
       SELECT conversation_id, created_at, id FROM messages \
        WHERE agent_id = $1 AND email_message_id = ANY($2) AND email_message_id <> '' \
       UNION ALL \
       SELECT conversation_id, created_at, id FROM messages \
        WHERE agent_id = $1 AND provider_message_id = ANY($2) AND provider_message_id <> '' \
     ) found WHERE conversation_id <> '' \
     ORDER BY created_at DESC, id DESC LIMIT 1";

/// The conversation of the newest message of `agent_id` whose own
/// Message-ID or upstream id is one of `refs`, if any. An index lookup per
/// id (see [`THREAD_OF_SQL`]), not a scan of the agent's mailbox.
pub async fn thread_of(
    c: &impl GenericClient,
    agent_id: &str,
    refs: &[String],
) -> Result<Option<String>> {
    if refs.is_empty() {
        return Ok(None);
    }
    let stmt = c.prepare_cached(THREAD_OF_SQL).await?;
    Ok(c.query_opt(&stmt, &[&agent_id, &refs])
        .await?
        .map(|r| r.get(0)))
}
