//! The outbound mail outbox (V6, V23; design from seed 003): deliveries the
//! deliverer submits over SMTP, their recipients, attempts and dead
//! letters, and the exactly-once send gate (`send_attempts`).
//!
//! Life of a delivery (`mail_deliveries.status`):
//!
//! ```text
//! pending | retrying --claim--> sending --record--> sent
//!                                        --record--> retrying       temporary failure, next_attempt_at set
//!                                        --record--> dead_lettered  permanent failure, or the last attempt
//! dead_lettered | retrying | pending --resend (operator)--> pending (attempts = 0)
//! ```
//!
//! * [`enqueue`] runs inside the producer's transaction (the API's accept,
//!   a HITL decision); a key already enqueued is reported, not an error,
//!   and never rolls that transaction back.
//! * [`claim`] is one short committed transaction (a function, V23): due
//!   rows `FOR UPDATE SKIP LOCKED`, each through the **send gate**, leased
//!   to the caller. SMTP happens after it, with no transaction open.
//! * [`record`] writes one attempt's outcome in one transaction, guarded by
//!   the lease token: the attempt row, each recipient's answer, the
//!   delivery, the gate, the message's status and its event
//!   (`email.sent` / `email.failed`) commit together or not at all.
//!
//! **Payloads that carry secrets do not outlive their delivery.** A
//! reviewer notification ([`HITL_NOTIFICATION_TEMPLATE`]) holds single-use
//! magic-link tokens in its body. When such a delivery becomes `sent` or
//! `dead_lettered`, the same statement of [`record`] that finishes it
//! replaces its `mail_payloads.body` by an empty bytea (subject, recipients
//! and attempts stay, for operators). While it is `pending`, `retrying` or
//! `sending` the body is kept: a retry needs it. [`resend`] refuses a
//! delivery whose body was scrubbed ([`ResendError::Scrubbed`]) rather than
//! submit an empty mail; a fresh notification has to be produced instead.
//!
//! **The gate** (`send_attempts`, spec §3.2, keyed by delivery since V23)
//! is what makes a submission happen at most once even when two deliverers
//! race or one dies: the claim takes it (`attempting`) in the same
//! transaction as the lease, and only a gate that `failed`, or has been
//! `attempting` for longer than the stale window, can be taken again. The
//! deliverer checks at start-up that its lease and the stale window exceed
//! the worst-case SMTP submission time (the original's flaw 12). The gate
//! row is removed only with its delivery: deleting the message or its
//! agent, or the message TTL sweep, leaves it in place.
//!
//! The one window no gate can close: a deliverer killed after the server's
//! `250` and before [`record`] commits. After the stale window the message
//! is submitted again, with the same Message-ID, so receivers that drop
//! duplicates by Message-ID see it once.

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    error::{Result, StoreError},
    ids::{MailDeliveryId, MessageId, UserId},
    outbound::{EMAIL_FAILED, EMAIL_SENT, MessageFacts},
    secret,
};

/// Attempts a delivery gets before it is dead-lettered (the column
/// default).
pub const DEFAULT_MAX_ATTEMPTS: i32 = 8;

/// The template of a reviewer notification (HITL): idempotency key
/// `hitl_notification:<msg_id>`, no `message_id`. Its body carries
/// single-use magic-link tokens, so it is scrubbed once the delivery is
/// finished (see [`SCRUBBED_TEMPLATES`]).
pub const HITL_NOTIFICATION_TEMPLATE: &str = "hitl_notification";

/// Templates whose payload body [`record`] replaces by an empty one when
/// their delivery becomes `sent` or `dead_lettered`: mail that carries
/// secrets (magic-link tokens) which must not outlive the delivery in the
/// database. Such a delivery cannot be re-sent ([`ResendError::Scrubbed`]).
pub const SCRUBBED_TEMPLATES: &[&str] = &[HITL_NOTIFICATION_TEMPLATE];

/// Where a recipient appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientKind {
    /// To.
    To,
    /// Cc.
    Cc,
    /// Bcc (envelope only).
    Bcc,
}

impl RecipientKind {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            RecipientKind::To => "to",
            RecipientKind::Cc => "cc",
            RecipientKind::Bcc => "bcc",
        }
    }
}

/// A delivery to enqueue.
#[derive(Debug, Clone)]
pub struct Enqueue<'a> {
    /// The owner.
    pub user_id: &'a UserId,
    /// The message it delivers (`None` for mail that is not an agent's
    /// message, e.g. a reviewer notification).
    pub message_id: Option<&'a MessageId>,
    /// What kind of mail (`agent_message`, `hitl_notification`, …).
    pub template_id: &'a str,
    /// Unique per owner; prefix it with the template so different kinds of
    /// mail about one message never collide.
    pub idempotency_key: &'a str,
    /// Subject (for listings).
    pub subject: &'a str,
    /// The MIME message to submit (unsigned).
    pub body: &'a [u8],
    /// Envelope sender.
    pub mail_from: &'a str,
    /// DKIM signing domain, or empty.
    pub dkim_domain: &'a str,
    /// Envelope recipients.
    pub recipients: &'a [(String, RecipientKind)],
    /// Attempts before dead-lettering.
    pub max_attempts: i32,
}

/// Enqueues `mail`, pending now. Recipients keep the order given (their
/// ids sort in it; the SMTP envelope follows it). Returns the new delivery's id, or `None`
/// when the owner already has a delivery with this idempotency key (then
/// nothing is left behind and the caller's transaction is **not** aborted:
/// the conflict is an `ON CONFLICT DO NOTHING`, and the payload written
/// for it is deleted again). Two statements at most; run it in the
/// producer's transaction. The `mail_outbox_new` NOTIFY goes out at commit.
pub async fn enqueue(c: &impl GenericClient, mail: &Enqueue<'_>) -> Result<Option<MailDeliveryId>> {
    if mail.recipients.is_empty() {
        return Err(StoreError::Invalid(
            "a mail delivery needs recipients".into(),
        ));
    }
    let delivery_id = MailDeliveryId::new();
    let payload_id = format!("mpl_{}", secret::random_hex::<16>());
    let (addresses, kinds): (Vec<&str>, Vec<&str>) = mail
        .recipients
        .iter()
        .map(|(a, k)| (a.as_str(), k.as_str()))
        .unzip();
    let stmt = c
        .prepare_cached(
            "WITH p AS ( \
               INSERT INTO mail_payloads (payload_id, user_id, content_type, subject, body) \
               VALUES ($2, $3, 'message/rfc822', $6, $7) RETURNING payload_id), \
             d AS ( \
               INSERT INTO mail_deliveries (delivery_id, user_id, message_id, template_id, idempotency_key, \
                 payload_id, mail_from, dkim_domain, max_attempts) \
               SELECT $1, $3, $4, $5, $8, p.payload_id, $9, $10, $11 FROM p \
               ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING delivery_id), \
             r AS ( \
               INSERT INTO mail_recipients (recipient_id, user_id, delivery_id, address, kind) \
               SELECT d.delivery_id || '-' || lpad(x.n::text, 4, '0'), $3, d.delivery_id, x.address, x.kind \
                 FROM d, unnest($12::text[], $13::text[]) WITH ORDINALITY AS x(address, kind, n) \
               ON CONFLICT (delivery_id, kind, address) DO NOTHING) \
             SELECT delivery_id FROM d",
        )
        .await?;
    let inserted = c
        .query_opt(
            &stmt,
            &[
                &delivery_id,
                &payload_id,
                mail.user_id,
                &mail.message_id,
                &mail.template_id,
                &mail.subject,
                &mail.body,
                &mail.idempotency_key,
                &mail.mail_from,
                &mail.dkim_domain,
                &mail.max_attempts,
                &addresses,
                &kinds,
            ],
        )
        .await?;
    if inserted.is_some() {
        return Ok(Some(delivery_id));
    }
    let orphan = c
        .prepare_cached("DELETE FROM mail_payloads WHERE payload_id = $1")
        .await?;
    c.execute(&orphan, &[&payload_id]).await?;
    Ok(None)
}

/// What the send gate said about a claimed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// This claim holds the gate: submit, then [`record`].
    Acquired,
    /// An earlier attempt submitted it and recorded so in the gate: record
    /// it sent without submitting again.
    AlreadySent,
}

/// A claimed delivery: everything needed to sign, submit and record it.
#[derive(Clone)]
pub struct ClaimedMail {
    /// The delivery.
    pub delivery_id: MailDeliveryId,
    /// Its owner.
    pub user_id: UserId,
    /// The lease token [`record`] must present.
    pub lease_token: String,
    /// The send gate's answer.
    pub gate: Gate,
    /// Attempts already made in this cycle.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Envelope sender.
    pub mail_from: String,
    /// DKIM signing domain ('' = unsigned).
    pub dkim_domain: String,
    /// The MIME message.
    pub body: Vec<u8>,
    /// Recipients not yet accepted or refused for good.
    pub recipients: Vec<String>,
    /// The message it delivers, while it still exists.
    pub message: Option<ClaimedMessage>,
}

impl std::fmt::Debug for ClaimedMail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedMail")
            .field("delivery_id", &self.delivery_id)
            .field("gate", &self.gate)
            .field("attempts", &self.attempts)
            .field("recipients", &self.recipients.len())
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The facts of the message a delivery carries (for its events).
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    /// `msg_` id.
    pub message_id: String,
    /// Sending agent.
    pub agent_id: String,
    /// Message type.
    pub message_type: String,
    /// Subject.
    pub subject: String,
    /// Conversation.
    pub conversation_id: String,
    /// Message-ID, bare.
    pub rfc_message_id: String,
    /// To.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// Bcc.
    pub bcc: Vec<String>,
}

impl ClaimedMessage {
    /// Its event facts.
    pub fn facts(&self) -> MessageFacts<'_> {
        MessageFacts {
            message_id: &self.message_id,
            agent_id: &self.agent_id,
            rfc_message_id: &self.rfc_message_id,
            method: "smtp",
            to: &self.to,
            cc: &self.cc,
            bcc: &self.bcc,
            subject: &self.subject,
            message_type: &self.message_type,
            conversation_id: &self.conversation_id,
        }
    }
}

/// Claims up to `max` due deliveries (see the module docs and V23's
/// `e2a_claim_mail_deliveries`): one statement, committed on its own (run
/// it on a pooled client, not in a transaction you keep open). Leases last
/// `lease`; a gate `attempting` for longer than `gate_stale` is taken over.
pub async fn claim(
    c: &impl GenericClient,
    max: usize,
    lease: std::time::Duration,
    gate_stale: std::time::Duration,
) -> Result<Vec<ClaimedMail>> {
    let token = secret::random_hex::<16>();
    let stmt = c
        .prepare_cached(
            "SELECT delivery_id, user_id, message_id, gate, attempts, max_attempts, mail_from, \
                    dkim_domain, body, rcpt_addresses, agent_id, message_type, subject, \
                    conversation_id, provider_message_id, to_recipients, cc, bcc \
               FROM e2a_claim_mail_deliveries($1, $2, $3, $4)",
        )
        .await?;
    let max = i32::try_from(max).unwrap_or(i32::MAX);
    let rows = c
        .query(
            &stmt,
            &[
                &max,
                &lease.as_secs_f64(),
                &token,
                &gate_stale.as_secs_f64(),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let message_id: Option<String> = r.get("message_id");
            let agent_id: Option<String> = r.get("agent_id");
            let message = match (message_id, agent_id) {
                (Some(message_id), Some(agent_id)) => Some(ClaimedMessage {
                    message_id,
                    agent_id,
                    message_type: r
                        .get::<_, Option<String>>("message_type")
                        .unwrap_or_default(),
                    subject: r.get::<_, Option<String>>("subject").unwrap_or_default(),
                    conversation_id: r
                        .get::<_, Option<String>>("conversation_id")
                        .unwrap_or_default(),
                    rfc_message_id: r
                        .get::<_, Option<String>>("provider_message_id")
                        .unwrap_or_default(),
                    to: r
                        .get::<_, Option<Vec<String>>>("to_recipients")
                        .unwrap_or_default(),
                    cc: r.get::<_, Option<Vec<String>>>("cc").unwrap_or_default(),
                    bcc: r.get::<_, Option<Vec<String>>>("bcc").unwrap_or_default(),
                }),
                _ => None,
            };
            ClaimedMail {
                delivery_id: r.get("delivery_id"),
                user_id: r.get("user_id"),
                lease_token: token.clone(),
                gate: if r.get::<_, &str>("gate") == "acquired" {
                    Gate::Acquired
                } else {
                    Gate::AlreadySent
                },
                attempts: r.get("attempts"),
                max_attempts: r.get("max_attempts"),
                mail_from: r.get("mail_from"),
                dkim_domain: r.get("dkim_domain"),
                body: r.get("body"),
                recipients: r.get("rcpt_addresses"),
                message,
            }
        })
        .collect())
}

/// One recipient's answer in an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientAnswer {
    /// The address.
    pub address: String,
    /// Accepted, refused for good, or still to retry.
    pub state: RecipientState,
    /// SMTP reply code, when the server answered.
    pub code: Option<u16>,
    /// SMTP reply text (bounded by the caller).
    pub reply: String,
}

/// A recipient's state after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    /// The server took the message for it.
    Sent,
    /// Refused for good (5xx).
    Failed,
    /// Not done yet (4xx, or the attempt ended before it).
    Pending,
}

/// How an attempt ended, as the deliverer decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server accepted the message (for at least one recipient; the
    /// others are in `recipients`). No recipient is left pending.
    Sent {
        /// Final reply code (250).
        code: u16,
        /// Final reply text.
        reply: String,
    },
    /// Try again at `at`: a temporary failure, or some recipients still
    /// pending after a partly successful attempt.
    Retry {
        /// When.
        at: OffsetDateTime,
        /// Reply code, when the server answered.
        code: Option<u16>,
        /// What went wrong.
        error: String,
    },
    /// Give up: a permanent failure, or a temporary one on the last
    /// attempt. Nothing was accepted for any recipient.
    DeadLetter {
        /// Reply code, when the server answered.
        code: Option<u16>,
        /// Why.
        error: String,
    },
}

/// What [`record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Written, the delivery is now in this state.
    Done(&'static str),
    /// The lease passed to another worker (it expired): nothing written.
    LeaseLost,
}

/// The longest SMTP reply or error text kept per attempt or recipient.
pub const MAX_REPLY_CHARS: usize = 1000;

fn bounded(s: &str) -> String {
    s.chars().take(MAX_REPLY_CHARS).collect()
}

/// Records the outcome of the attempt `job` was claimed for, in one
/// transaction of its own, guarded by the lease token (another worker that
/// took the delivery over after the lease lapsed wins: [`Recorded::LeaseLost`]
/// and nothing is written). Together: the delivery's new state, the
/// `mail_attempts` row (code and reply text), each recipient's answer, the
/// send gate (`sent`, or `failed` so the next attempt may take it), the
/// message's status, and `email.sent` (on [`Outcome::Sent`]) or
/// `email.failed` (on [`Outcome::DeadLetter`], with a `mail_dead_letters`
/// row). A delivery of a template in [`SCRUBBED_TEMPLATES`] that ends
/// `sent` or `dead_lettered` has its payload body emptied in the same
/// statement, so no committed state has it finished with its secrets still
/// stored. Retries the transaction on a serialization failure or deadlock.
pub async fn record(
    store: &crate::Store,
    job: &ClaimedMail,
    started_at: OffsetDateTime,
    outcome: &Outcome,
    recipients: &[RecipientAnswer],
) -> Result<Recorded> {
    let recorded = store
        .transaction(
            &(job, started_at, outcome, recipients),
            |tx, (job, started_at, outcome, recipients)| {
                Box::pin(record_in(tx, job, *started_at, outcome, recipients))
            },
        )
        .await?;
    if matches!(recorded, Recorded::Done("sent" | "dead_lettered")) && job.message.is_some() {
        crate::events::wake_deliverer(store);
    }
    Ok(recorded)
}

/// One outcome for [`record_batch`].
#[derive(Debug, Clone, Copy)]
pub struct RecordItem<'a> {
    /// The claimed delivery.
    pub job: &'a ClaimedMail,
    /// When the attempt started.
    pub started_at: OffsetDateTime,
    /// What happened.
    pub outcome: &'a Outcome,
    /// Each recipient's answer.
    pub recipients: &'a [RecipientAnswer],
}

/// [`record`] for several attempts in **one** transaction (their
/// statements pipelined on one connection, one commit for all): what a
/// deliverer with many workers finishing at once spends one durable commit
/// on instead of one each. Each item is guarded by its own lease token
/// exactly as in [`record`] (a lost lease is [`Recorded::LeaseLost`] for
/// that item and writes nothing for it). All or nothing: an error rolls
/// every item back (serialization failures and deadlocks are retried
/// whole); the caller may then record the items one by one to isolate a
/// failing one. Results are in the items' order.
pub async fn record_batch(store: &crate::Store, items: &[RecordItem<'_>]) -> Result<Vec<Recorded>> {
    let recorded = store
        .transaction(items, |tx, items| {
            Box::pin(async move {
                futures::future::try_join_all(
                    items
                        .iter()
                        .map(|i| record_in(tx, i.job, i.started_at, i.outcome, i.recipients)),
                )
                .await
            })
        })
        .await?;
    let woke = items.iter().zip(&recorded).any(|(i, r)| {
        matches!(r, Recorded::Done("sent" | "dead_lettered")) && i.job.message.is_some()
    });
    if woke {
        crate::events::wake_deliverer(store);
    }
    Ok(recorded)
}

/// The main statement of [`record_in`]: V24's `defer_notify` (the event's
/// wake-up is sent after the commit, coalesced), the delivery guarded by
/// the lease token (`d`; nothing else happens without it), the attempt
/// row, the send gate, the message's status and, for a dead letter, its
/// `mail_dead_letters` row and the recipients still pending given up, and
/// (`s`) the payload body of a finished delivery of a template in
/// [`SCRUBBED_TEMPLATES`] replaced by an empty one — one round trip. `$1`
/// delivery, `$2` token, `$3` status, `$4` next attempt, `$5` error or
/// reply text, `$6` owner, `$7` started, `$8` attempt outcome, `$9` SMTP
/// code, `$10` error, `$11` reply, `$12` gate status, `$13` provider id,
/// `$14` message id, `$15` message status, `$16` the scrubbed templates.
const RECORD_SQL: &str = "WITH quiet AS MATERIALIZED ( \
       SELECT set_config('e2a.defer_notify', 'on', true) AS deferred), \
     d AS ( \
       UPDATE mail_deliveries SET status = $3, attempts = attempts + 1, \
         next_attempt_at = $4, leased_until = NULL, lease_token = NULL, updated_at = now(), \
         last_error = CASE WHEN $3 = 'sent' THEN '' ELSE $5 END, \
         sent_at = CASE WHEN $3 = 'sent' THEN now() ELSE sent_at END, \
         dead_lettered_at = CASE WHEN $3 = 'dead_lettered' THEN now() ELSE dead_lettered_at END \
        FROM quiet \
       WHERE quiet.deferred = 'on' AND delivery_id = $1 AND lease_token = $2 AND status = 'sending' \
       RETURNING delivery_id, payload_id, template_id), \
     s AS ( \
       UPDATE mail_payloads p SET body = ''::bytea FROM d \
        WHERE p.payload_id = d.payload_id AND d.template_id = ANY($16::text[]) \
          AND $3 IN ('sent', 'dead_lettered')), \
     a AS ( \
       INSERT INTO mail_attempts (attempt_id, user_id, delivery_id, attempt_no, started_at, \
         finished_at, outcome, smtp_code, error, reply) \
       SELECT gen_random_uuid()::text, $6, d.delivery_id, \
              COALESCE((SELECT max(attempt_no) FROM mail_attempts WHERE delivery_id = $1), 0) + 1, \
              $7, now(), $8, $9, $10, $11 \
         FROM d), \
     g AS ( \
       UPDATE send_attempts SET status = $12, completed_at = now(), error = $10, \
         method = 'smtp', provider_message_id = $13 \
        WHERE delivery_id = $1 AND status IN ('attempting', 'sent') \
          AND EXISTS (SELECT 1 FROM d)), \
     m AS ( \
       UPDATE messages SET status = $15 \
        WHERE id = $14 AND user_id = $6 AND direction = 'outbound' AND EXISTS (SELECT 1 FROM d)), \
     dl AS ( \
       INSERT INTO mail_dead_letters (dead_letter_id, user_id, delivery_id, reason) \
       SELECT gen_random_uuid()::text, $6, d.delivery_id, $5 FROM d WHERE $3 = 'dead_lettered') \
     SELECT count(*) FROM d";

async fn record_in(
    c: &impl GenericClient,
    job: &ClaimedMail,
    started_at: OffsetDateTime,
    outcome: &Outcome,
    recipients: &[RecipientAnswer],
) -> Result<Recorded> {
    let (status, attempt_outcome, next_at, code, text): (
        &'static str,
        &str,
        Option<OffsetDateTime>,
        Option<u16>,
        String,
    ) = match outcome {
        Outcome::Sent { code, reply } => ("sent", "sent", None, Some(*code), bounded(reply)),
        Outcome::Retry { at, code, error } => (
            "retrying",
            "temporary_failure",
            Some(*at),
            *code,
            bounded(error),
        ),
        Outcome::DeadLetter { code, error } => (
            "dead_lettered",
            "permanent_failure",
            None,
            *code,
            bounded(error),
        ),
    };
    let attempt_outcome = if job.gate == Gate::AlreadySent {
        "already_sent"
    } else {
        attempt_outcome
    };
    let smtp_code = code.map(i32::from);
    let (error, reply) = if status == "sent" {
        (String::new(), text.clone())
    } else {
        (text.clone(), String::new())
    };
    let gate_status = if status == "sent" { "sent" } else { "failed" };
    let provider = job
        .message
        .as_ref()
        .map(|m| crate::outbound::angle(&m.rfc_message_id))
        .unwrap_or_default();
    let message_id = job.message.as_ref().map(|m| m.message_id.as_str());
    let message_status = match status {
        "sent" => "sent",
        "dead_lettered" => "failed",
        _ => "queued",
    };
    let stmt = c.prepare_cached(RECORD_SQL).await?;
    let recorded: i64 = c
        .query_one(
            &stmt,
            &[
                &job.delivery_id,
                &job.lease_token,
                &status,
                &next_at,
                &text,
                &job.user_id,
                &started_at,
                &attempt_outcome,
                &smtp_code,
                &error,
                &reply,
                &gate_status,
                &provider,
                &message_id,
                &message_status,
                &SCRUBBED_TEMPLATES,
            ],
        )
        .await?
        .get(0);
    if recorded == 0 {
        return Ok(Recorded::LeaseLost);
    }

    if !recipients.is_empty() || status == "dead_lettered" {
        let (mut addresses, mut states, mut codes, mut replies) = (vec![], vec![], vec![], vec![]);
        for r in recipients {
            addresses.push(r.address.as_str());
            states.push(match r.state {
                RecipientState::Sent => "sent",
                RecipientState::Failed => "failed",
                // A dead letter gives up whoever is still pending.
                RecipientState::Pending if status == "dead_lettered" => "failed",
                RecipientState::Pending => "pending",
            });
            codes.push(r.code.map(i32::from));
            replies.push(bounded(&r.reply));
        }
        // Each answer, then (for a dead letter) whatever is still pending
        // given up with the delivery.
        let stmt = c
            .prepare_cached(
                "WITH x AS ( \
                   UPDATE mail_recipients r SET status = x.status, smtp_code = x.code, reply = x.reply \
                     FROM unnest($2::text[], $3::text[], $4::int4[], $5::text[]) AS x(address, status, code, reply) \
                    WHERE r.delivery_id = $1 AND r.address = x.address AND r.status = 'pending' \
                   RETURNING r.recipient_id) \
                 UPDATE mail_recipients r SET status = 'failed' \
                  WHERE $6 AND r.delivery_id = $1 AND r.status = 'pending' \
                    AND NOT EXISTS (SELECT 1 FROM x WHERE x.recipient_id = r.recipient_id)",
            )
            .await?;
        c.execute(
            &stmt,
            &[
                &job.delivery_id,
                &addresses,
                &states,
                &codes,
                &replies,
                &(status == "dead_lettered"),
            ],
        )
        .await?;
    }

    if let Some(m) = &job.message {
        let any_refused = recipients.iter().any(|r| r.state == RecipientState::Failed);
        match outcome {
            Outcome::Sent { .. } => {
                let extra = if any_refused {
                    json!({ "failed_recipients": refused_recipients(c, &job.delivery_id).await? })
                } else {
                    Value::Null
                };
                m.facts().append(c, &job.user_id, EMAIL_SENT, extra).await?;
            }
            Outcome::DeadLetter { code, .. } => {
                let extra = json!({
                    "error": text,
                    "smtp_code": code,
                    "attempts": job.attempts + 1,
                    "failed_recipients": refused_recipients(c, &job.delivery_id).await?,
                });
                m.facts()
                    .append(c, &job.user_id, EMAIL_FAILED, extra)
                    .await?;
            }
            Outcome::Retry { .. } => {}
        }
    }
    Ok(Recorded::Done(status))
}

/// The recipients of a delivery refused for good, as event data.
async fn refused_recipients(
    c: &impl GenericClient,
    delivery_id: &MailDeliveryId,
) -> Result<Vec<Value>> {
    let stmt = c
        .prepare_cached(
            "SELECT address, smtp_code, reply FROM mail_recipients \
              WHERE delivery_id = $1 AND status = 'failed' ORDER BY recipient_id",
        )
        .await?;
    Ok(c.query(&stmt, &[delivery_id])
        .await?
        .iter()
        .map(|r| {
            json!({
                "address": r.get::<_, String>(0),
                "smtp_code": r.get::<_, Option<i32>>(1),
                "reply": r.get::<_, String>(2),
            })
        })
        .collect())
}

/// One delivery as operators see it (`cargo xtask outbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRow {
    /// The delivery.
    pub delivery_id: String,
    /// Owner.
    pub user_id: String,
    /// Message delivered, while it exists.
    pub message_id: Option<String>,
    /// Template.
    pub template_id: String,
    /// Status.
    pub status: String,
    /// Attempts in this cycle / allowed.
    pub attempts: i32,
    /// Allowed attempts.
    pub max_attempts: i32,
    /// Next attempt, when scheduled.
    pub next_attempt_at: Option<OffsetDateTime>,
    /// Last error.
    pub last_error: String,
    /// Subject.
    pub subject: String,
    /// Created.
    pub created_at: OffsetDateTime,
}

const DELIVERY_COLUMNS: &str = "d.delivery_id, d.user_id, d.message_id, d.template_id, d.status, \
     d.attempts, d.max_attempts, d.next_attempt_at, d.last_error, COALESCE(p.subject, ''), d.created_at";

fn delivery_row(r: &tokio_postgres::Row) -> DeliveryRow {
    DeliveryRow {
        delivery_id: r.get(0),
        user_id: r.get(1),
        message_id: r.get(2),
        template_id: r.get(3),
        status: r.get(4),
        attempts: r.get(5),
        max_attempts: r.get(6),
        next_attempt_at: r.get(7),
        last_error: r.get(8),
        subject: r.get(9),
        created_at: r.get(10),
    }
}

/// The newest `limit` deliveries, optionally of one status only (every
/// owner: an operator's view).
pub async fn list(
    c: &impl GenericClient,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DeliveryRow>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM mail_deliveries d \
               JOIN mail_payloads p ON p.payload_id = d.payload_id \
              WHERE ($1::text IS NULL OR d.status = $1) \
              ORDER BY d.created_at DESC, d.delivery_id DESC LIMIT $2"
        ))
        .await?;
    Ok(c.query(&stmt, &[&status, &limit])
        .await?
        .iter()
        .map(delivery_row)
        .collect())
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    /// 1, 2, … (keeps growing across operator re-sends).
    pub attempt_no: i32,
    /// Started.
    pub started_at: OffsetDateTime,
    /// Finished.
    pub finished_at: Option<OffsetDateTime>,
    /// `sent`, `temporary_failure`, `permanent_failure`, …
    pub outcome: String,
    /// SMTP code.
    pub smtp_code: Option<i32>,
    /// Error text.
    pub error: String,
    /// Reply text of a success.
    pub reply: String,
}

/// A recipient of a delivery and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRow {
    /// Address.
    pub address: String,
    /// to, cc, bcc.
    pub kind: String,
    /// pending, sent, failed.
    pub status: String,
    /// Last SMTP code for it.
    pub smtp_code: Option<i32>,
    /// Last reply for it.
    pub reply: String,
}

/// A delivery with its recipients, attempts and send gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryDetail {
    /// The delivery.
    pub delivery: DeliveryRow,
    /// Its recipients.
    pub recipients: Vec<RecipientRow>,
    /// Its attempts, oldest first.
    pub attempts: Vec<AttemptRow>,
    /// The send gate's status (`attempting`, `sent`, `failed`), if taken.
    pub gate: Option<String>,
}

/// One delivery in detail; [`StoreError::NotFound`] when there is none.
pub async fn show(c: &impl GenericClient, delivery_id: &str) -> Result<DeliveryDetail> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM mail_deliveries d \
               JOIN mail_payloads p ON p.payload_id = d.payload_id WHERE d.delivery_id = $1"
        ))
        .await?;
    let delivery = c
        .query_opt(&stmt, &[&delivery_id])
        .await?
        .map(|r| delivery_row(&r))
        .ok_or(StoreError::NotFound)?;
    let stmt = c
        .prepare_cached(
            "SELECT address, kind, status, smtp_code, reply FROM mail_recipients \
              WHERE delivery_id = $1 ORDER BY recipient_id",
        )
        .await?;
    let recipients = c
        .query(&stmt, &[&delivery_id])
        .await?
        .iter()
        .map(|r| RecipientRow {
            address: r.get(0),
            kind: r.get(1),
            status: r.get(2),
            smtp_code: r.get(3),
            reply: r.get(4),
        })
        .collect();
    let stmt = c
        .prepare_cached(
            "SELECT attempt_no, started_at, finished_at, outcome, smtp_code, error, reply \
               FROM mail_attempts WHERE delivery_id = $1 ORDER BY attempt_no",
        )
        .await?;
    let attempts = c
        .query(&stmt, &[&delivery_id])
        .await?
        .iter()
        .map(|r| AttemptRow {
            attempt_no: r.get(0),
            started_at: r.get(1),
            finished_at: r.get(2),
            outcome: r.get(3),
            smtp_code: r.get(4),
            error: r.get(5),
            reply: r.get(6),
        })
        .collect();
    let stmt = c
        .prepare_cached("SELECT status FROM send_attempts WHERE delivery_id = $1")
        .await?;
    let gate = c.query_opt(&stmt, &[&delivery_id]).await?.map(|r| r.get(0));
    Ok(DeliveryDetail {
        delivery,
        recipients,
        attempts,
        gate,
    })
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// The delivery.
    pub delivery_id: String,
    /// Owner.
    pub user_id: String,
    /// When it was dead-lettered.
    pub archived_at: OffsetDateTime,
    /// Why.
    pub reason: String,
    /// The delivery's status now (`pending` again after a re-send).
    pub status: String,
}

/// The newest `limit` dead letters (kept as history after a re-send).
pub async fn dead_letters(c: &impl GenericClient, limit: i64) -> Result<Vec<DeadLetterRow>> {
    let stmt = c
        .prepare_cached(
            "SELECT l.delivery_id, l.user_id, l.archived_at, l.reason, d.status \
               FROM mail_dead_letters l JOIN mail_deliveries d ON d.delivery_id = l.delivery_id \
              ORDER BY l.archived_at DESC, l.dead_letter_id DESC LIMIT $1",
        )
        .await?;
    Ok(c.query(&stmt, &[&limit])
        .await?
        .iter()
        .map(|r| DeadLetterRow {
            delivery_id: r.get(0),
            user_id: r.get(1),
            archived_at: r.get(2),
            reason: r.get(3),
            status: r.get(4),
        })
        .collect())
}

/// Why [`resend`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// No such delivery.
    #[error("no such delivery")]
    NotFound,
    /// It was sent; sending it again would duplicate it.
    #[error("the delivery was sent; it is not sent again")]
    AlreadySent,
    /// A deliverer is working on it right now.
    #[error("the delivery is being sent right now")]
    Sending,
    /// Its payload body was scrubbed when it finished (a template in
    /// [`SCRUBBED_TEMPLATES`], e.g. a reviewer notification whose
    /// magic-link tokens must not stay stored): there is nothing left to
    /// send.
    #[error(
        "the delivery's body was scrubbed when it finished (it carried single-use links); \
         it cannot be re-sent, a fresh notification must be produced instead"
    )]
    Scrubbed,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The operator's re-send (seed 003 `ResendNonSent`): a dead-lettered,
/// retrying or pending delivery goes back to `pending` now with a fresh
/// cycle of attempts (`attempts = 0`); its recipients refused for good are
/// pending again; its message is `queued` again; the dead-letter rows stay
/// as history. Refused for a `sent` delivery (the gate would refuse to
/// send it anyway), one `sending` right now, and one whose payload body is
/// empty (scrubbed when it finished, see [`SCRUBBED_TEMPLATES`]: sending
/// it would submit an empty mail). One transaction; the update NOTIFYs the
/// deliverer.
pub async fn resend(store: &crate::Store, delivery_id: &str) -> Result<(), ResendError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let stmt = tx
        .prepare_cached(
            "SELECT d.status, d.message_id, d.user_id, octet_length(p.body) = 0 \
               FROM mail_deliveries d JOIN mail_payloads p ON p.payload_id = d.payload_id \
              WHERE d.delivery_id = $1 FOR UPDATE OF d",
        )
        .await
        .map_err(StoreError::from)?;
    let row = tx
        .query_opt(&stmt, &[&delivery_id])
        .await
        .map_err(StoreError::from)?
        .ok_or(ResendError::NotFound)?;
    let status: &str = row.get(0);
    match status {
        "sent" => return Err(ResendError::AlreadySent),
        "sending" => return Err(ResendError::Sending),
        _ if row.get::<_, bool>(3) => return Err(ResendError::Scrubbed),
        _ => {}
    }
    let message_id: Option<String> = row.get(1);
    let user_id: String = row.get(2);
    tx.execute(
        "UPDATE mail_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now(), \
           dead_lettered_at = NULL, last_error = '', updated_at = now() WHERE delivery_id = $1",
        &[&delivery_id],
    )
    .await
    .map_err(StoreError::from)?;
    tx.execute(
        "UPDATE mail_recipients SET status = 'pending' WHERE delivery_id = $1 AND status = 'failed'",
        &[&delivery_id],
    )
    .await
    .map_err(StoreError::from)?;
    if let Some(message_id) = message_id {
        tx.execute(
            "UPDATE messages SET status = 'queued' WHERE id = $1 AND user_id = $2 AND status = 'failed'",
            &[&message_id, &user_id],
        )
        .await
        .map_err(StoreError::from)?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

/// Queue gauges: deliveries per status (every status present, 0 when
/// none) and the age in seconds of the oldest delivery that is due and
/// not yet claimed (0 when none). One statement.
pub async fn depth(c: &impl GenericClient) -> Result<(Vec<(&'static str, i64)>, f64)> {
    const STATUSES: [&str; 5] = ["pending", "retrying", "sending", "sent", "dead_lettered"];
    let stmt = c
        .prepare_cached(
            "SELECT (SELECT COALESCE(json_object_agg(status, n), '{}') FROM \
                       (SELECT status, count(*) AS n FROM mail_deliveries GROUP BY status) s), \
                    (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(next_attempt_at)), 0)::float8 \
                       FROM mail_deliveries \
                      WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now())",
        )
        .await?;
    let row = c.query_one(&stmt, &[]).await?;
    let counts: Value = row.get(0);
    let by_status = STATUSES
        .iter()
        .map(|s| (*s, counts.get(*s).and_then(Value::as_i64).unwrap_or(0)))
        .collect();
    Ok((by_status, row.get::<_, f64>(1).max(0.0)))
}

/// Deletes up to `batch` finished deliveries (sent or dead-lettered) past
/// their `expires_at` (30 days after creation), oldest first: the payload
/// goes and, by cascade, the delivery, its recipients, attempts, dead
/// letters and send gate. A delivery still pending, retrying or sending is
/// never deleted, however old. Rows are taken `FOR UPDATE SKIP LOCKED`
/// (janitor replicas split the work). Returns how many deliveries.
pub async fn delete_expired(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM mail_payloads WHERE payload_id IN ( \
               SELECT payload_id FROM mail_deliveries \
                WHERE expires_at < now() AND status IN ('sent', 'dead_lettered') \
                ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}
