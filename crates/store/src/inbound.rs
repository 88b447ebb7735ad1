//! Inbound mail: [`ingest`] stores one received message for each recipient
//! agent, threads it, and appends its `email.received` events — in **one
//! transaction**. The relay answers `250` only after it returns `Ok`.
//! [`ingest_batch`] does the same for several messages in one statement
//! (the relay's group commit); everything below holds for each message of
//! a batch.
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
//! * **Legacy per-agent push (spec §3.5):** for a copy whose
//!   [`Delivery::legacy_push`] is set (a cloud agent with a `webhook_url`),
//!   the same statement also enqueues its `webhook_deliveries` row —
//!   pending, [`LEGACY_MAX_ATTEMPTS`] attempts, kept [`LEGACY_TTL`] — so
//!   the push commits or rolls back with the message. Nothing is POSTed
//!   here: the deliverer claims the row later
//!   ([`crate::legacy_deliveries::claim_legacy`]) and reads the message,
//!   its `X-E2A-Auth-*` headers (`messages.auth_headers`) and its raw bytes
//!   from the message row; the delivery row copies none of them. Mail with
//!   no flagged copy runs the statement it ran before legacy pushes existed
//!   (the SMTP ingest benchmark's case): the push is a separate variant of
//!   the statement, chosen in Rust, not a filter evaluated for every row.
//! * **Accounting (V28):** the same statement upserts the conversation
//!   summaries and the owners' usage counters of the copies it inserted
//!   (its `cs` and `u` parts); the accounting trigger on `messages` stands
//!   aside for that statement only.
//! * **Wake-up:** the events' per-commit NOTIFY is deferred (V11) and sent
//!   coalesced after the commit ([`events::wake_deliverer`]): a NOTIFY in
//!   the committing transaction would serialise every ingest commit on the
//!   notification-queue lock.
//! * **Lock order:** copies are written in (owner, agent) order whatever the
//!   RCPT order (then by dedupe key, for the copies of a batch to one
//!   agent), so two messages — or two batches — to the same agents cannot
//!   deadlock each other on the counters or rows they lock.

use deadpool_postgres::GenericClient;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    error::Result,
    events,
    ids::{MessageId, UserId},
    legacy_deliveries::{LEGACY_MAX_ATTEMPTS, LEGACY_TTL},
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
    /// Also enqueue a legacy per-agent push of this copy (spec §3.5): set
    /// it from [`crate::agents::Recipient::legacy_push`] (a cloud agent with
    /// a `webhook_url`). A copy that turns out to be a duplicate enqueues
    /// nothing, like its event.
    pub legacy_push: bool,
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

/// The common part of [`INGEST_SQL`] and [`INGEST_LEGACY_SQL`]: V11
/// `defer_notify` and V28 `messages_accounted`, then every copy (`m`), its
/// event (`e`), its conversation summary (`cs`) and its owner's usage
/// counters (`u`). `$1`–`$7` and `$21` are per-copy arrays in lock order
/// (message id, owner, agent, signed headers, conversation, event id,
/// envelope; the copy's message as a 1-based index); `$8`–`$18` are
/// per-message arrays (what all copies of one message share — its raw
/// bytes travel once however many recipients it has), read by subscript;
/// `$19`/`$20` the batch's `created_at`/`expires_at`; `$22` is a
/// `lock_timeout` to set for the statement, or NULL.
///
/// `owners` reads `quiet` in a one-time filter, so `quiet` (and with it
/// `lock_timeout`) is set before the statement waits for any lock.
///
/// `quiet` runs before the rows are produced and the triggers fire at the
/// end of the statement, so they see both settings: the event trigger sends
/// no NOTIFY, and the accounting trigger on messages (V28) leaves the
/// summaries and counters to `cs` and `u` and clears the flag (so a later
/// INSERT in the same transaction is accounted by it as usual). Both are
/// local to the transaction.
///
/// `owners` share-locks the recipient agents (owner, agent order) before
/// any row is written: the foreign key of `messages` checks (and locks)
/// them only at the end of the statement, after `cs` and `u` hold their
/// summary and usage rows, and an agent being deleted meanwhile (its
/// delete holds the agent and then recomputes those summaries and
/// counters) would otherwise wait for this statement while it waits for
/// the delete: a deadlock. Taken first, the lock makes the ingest wait
/// for the delete before it holds anything the delete needs; once the
/// agent is gone the insert fails its foreign key and nothing is stored.
///
/// `cs` and `u` count only the copies actually inserted (`m`), so a
/// duplicate counts nothing. They write exactly what the trigger would for
/// these rows (inbound, unread; the latest by (created_at, id) gives a
/// summary's subject and sender): `cs` upserts one summary
/// per (agent, conversation) in key order, `u` one usage row per owner on
/// this connection's slot in owner order — and `u` runs after `cs` (it
/// reads `cs`'s count), keeping the order every writer locks in: summaries
/// before usage rows.
macro_rules! ingest_ctes {
    () => {
        "WITH quiet AS MATERIALIZED ( \
           SELECT set_config('e2a.defer_notify', 'on', true) AS deferred, \
                  set_config('e2a.messages_accounted', 'on', true) AS accounted, \
                  CASE WHEN $22::text IS NOT NULL THEN set_config('lock_timeout', $22::text, true) END \
                    AS lock_timeout), \
         d AS MATERIALIZED ( \
           SELECT d.id, d.user_id, d.agent_id, d.auth_headers, d.conversation_id, d.event_id, d.envelope, \
                  d.mail, d.n \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[], $6::text[], $7::jsonb[], \
                         $21::int4[]) \
             WITH ORDINALITY AS d(id, user_id, agent_id, auth_headers, conversation_id, event_id, envelope, mail, n)), \
         owners AS MATERIALIZED ( \
           SELECT count(*) AS n FROM ( \
             SELECT 1 FROM agents a \
              WHERE (a.id, a.user_id) IN (SELECT d.agent_id, d.user_id FROM d) \
                AND (SELECT q.deferred FROM quiet q) = 'on' \
              ORDER BY a.user_id, a.id \
                FOR KEY SHARE OF a) locked), \
         m AS ( \
           INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, email_message_id, \
             raw_message, body_sha256, auth_headers, spf_result, dkim_result, dmarc_result, conversation_id, \
             inbox_status, to_recipients, cc, reply_to, created_at, expires_at) \
           SELECT d.id, d.user_id, d.agent_id, 'inbound', ($8::text[])[d.mail], d.agent_id, \
             ($9::text[])[d.mail], ($10::text[])[d.mail], ($11::bytea[])[d.mail], ($12::text[])[d.mail], \
             d.auth_headers, ($13::text[])[d.mail], ($14::text[])[d.mail], ($15::text[])[d.mail], \
             d.conversation_id, 'unread', ($16::text[])[d.mail]::text[], ($17::text[])[d.mail]::text[], \
             ($18::text[])[d.mail]::text[], $19, $20 \
             FROM quiet, owners, d \
            WHERE quiet.deferred = 'on' AND quiet.accounted = 'on' AND owners.n >= 0 ORDER BY d.n \
           ON CONFLICT (agent_id, email_message_id, body_sha256) WHERE direction = 'inbound' DO NOTHING \
           RETURNING id, user_id, agent_id, conversation_id, created_at, expires_at, subject, sender, \
             e2a_message_stored_bytes(raw_message, body_text, body_html, attachments_json) AS bytes), \
         e AS ( \
           INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, message_id, labels) \
           SELECT d.event_id, d.user_id, 'email.received', d.envelope, d.agent_id, d.conversation_id, d.id, '{}' \
             FROM d JOIN m ON m.id = d.id ORDER BY d.n \
           ON CONFLICT (id) DO NOTHING), \
         cs AS ( \
           INSERT INTO conversation_summaries AS c (agent_id, user_id, conversation_id, first_message_at, \
             last_message_at, last_message_id, message_count, inbound_count, outbound_count, unread_count, \
             latest_subject, latest_sender, min_expires_at, max_expires_at) \
           SELECT m.agent_id, m.user_id, m.conversation_id, min(m.created_at), max(m.created_at), \
             (array_agg(m.id ORDER BY m.created_at DESC, m.id DESC))[1], count(*), count(*), 0, count(*), \
             (array_agg(m.subject ORDER BY m.created_at DESC, m.id DESC))[1], \
             (array_agg(m.sender ORDER BY m.created_at DESC, m.id DESC))[1], \
             min(m.expires_at), max(m.expires_at) \
             FROM m WHERE m.conversation_id <> '' \
            GROUP BY m.agent_id, m.user_id, m.conversation_id \
            ORDER BY m.agent_id, m.conversation_id \
           ON CONFLICT (agent_id, conversation_id) DO UPDATE \
             SET first_message_at = LEAST(c.first_message_at, EXCLUDED.first_message_at), \
                 last_message_at = GREATEST(c.last_message_at, EXCLUDED.last_message_at), \
                 last_message_id = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id) \
                                             > (c.last_message_at, c.last_message_id) \
                                        THEN EXCLUDED.last_message_id ELSE c.last_message_id END, \
                 latest_subject = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id) \
                                            > (c.last_message_at, c.last_message_id) \
                                       THEN EXCLUDED.latest_subject ELSE c.latest_subject END, \
                 latest_sender = CASE WHEN (EXCLUDED.last_message_at, EXCLUDED.last_message_id) \
                                           > (c.last_message_at, c.last_message_id) \
                                      THEN EXCLUDED.latest_sender ELSE c.latest_sender END, \
                 message_count = c.message_count + EXCLUDED.message_count, \
                 inbound_count = c.inbound_count + EXCLUDED.inbound_count, \
                 outbound_count = c.outbound_count + EXCLUDED.outbound_count, \
                 unread_count = c.unread_count + EXCLUDED.unread_count, \
                 min_expires_at = LEAST(c.min_expires_at, EXCLUDED.min_expires_at), \
                 max_expires_at = GREATEST(c.max_expires_at, EXCLUDED.max_expires_at) \
           RETURNING 1), \
         u AS ( \
           INSERT INTO account_usage AS u (user_id, slot, storage_bytes, month_start, messages_month, updated_at) \
           SELECT m.user_id, e2a_usage_slot(), sum(m.bytes), \
             (date_trunc('month', now() AT TIME ZONE 'UTC'))::date, count(*), now() \
             FROM m CROSS JOIN (SELECT count(*) FROM cs) AS summaries_first \
            GROUP BY m.user_id \
            ORDER BY m.user_id \
           ON CONFLICT (user_id, slot) DO UPDATE \
             SET storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes, \
                 messages_month = CASE WHEN u.month_start = EXCLUDED.month_start \
                                       THEN u.messages_month + EXCLUDED.messages_month \
                                       ELSE EXCLUDED.messages_month END, \
                 month_start = EXCLUDED.month_start, \
                 updated_at = now()) "
    };
}

/// The one statement of [`ingest`] when no copy asks for a legacy push
/// (the common case, and the one the SMTP ingest benchmark measures): every
/// copy and its event ([`ingest_ctes`]). Returns the ids actually inserted
/// (a copy already stored is skipped by the dedupe index, and so is its
/// event).
const INGEST_SQL: &str = concat!(ingest_ctes!(), "SELECT id FROM m");

/// [`INGEST_SQL`] plus the legacy per-agent push (`l`) of every inserted
/// copy whose id is in `$23`, with `$24` attempts and expiring at `$25`. A
/// separate statement so that mail without a cloud recipient pays nothing
/// for it: not even the opening of `webhook_deliveries` and its indexes.
const INGEST_LEGACY_SQL: &str = concat!(
    ingest_ctes!(),
    ", l AS ( \
       INSERT INTO webhook_deliveries (message_id, user_id, max_attempts, expires_at) \
       SELECT d.id, d.user_id, $24, $25 \
         FROM d JOIN m ON m.id = d.id WHERE d.id = ANY($23::text[]) ORDER BY d.n) \
     SELECT id FROM m"
);

/// One received message and its recipient agents' copies: an element of
/// the batch [`ingest_batch`] stores.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The message.
    pub mail: &'a InboundMail<'a>,
    /// Its copies (one per recipient agent).
    pub deliveries: &'a [Delivery],
}

/// Stores `mail` once per delivery, atomically; see the module docs.
/// Returns one [`Outcome`] per delivery, in the order given. Any error
/// means nothing was stored (the caller answers 451).
///
/// The threading lookups run first (reads; READ COMMITTED would read the
/// same inside a transaction), then every copy, its event, its legacy push
/// (flagged copies only) and the usage counters are written by **one
/// statement** — atomic on its own, one round trip whatever the number of
/// recipients, retried as a whole on a serialization failure or deadlock.
///
/// After the commit the deliverer is woken on `webhook_events_new`
/// ([`events::wake_deliverer`]); every legacy push is committed together
/// with its copy's `email.received` event, so that one wake-up covers both
/// queues.
pub async fn ingest(
    store: &Store,
    mail: &InboundMail<'_>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>> {
    let mut outcomes = ingest_batch(store, &[Arrival { mail, deliveries }]).await?;
    Ok(outcomes.pop().unwrap_or_default())
}

/// [`ingest`] of several messages at once, as **one statement**: every
/// copy of every message, their events, legacy pushes, summaries and usage
/// counters commit together or not at all (group commit: one commit, one
/// plan, one constraint setup for the whole batch instead of one per
/// message). Returns each arrival's outcomes, in the order given.
///
/// What holds for one message holds for each message of a batch: copies
/// are written in one global (owner, agent, dedupe key) lock order across
/// the batch; a message already stored for an agent — before the batch or
/// earlier in it — is a [`Outcome::Duplicate`] and writes nothing; every
/// summary and counter ends exactly as if the messages had been ingested
/// one by one.
/// A message of the batch is not threaded onto another message of the same
/// batch (the lookups run before the statement), as with two messages
/// committed at the same moment by two sessions.
///
/// A batch of more than one message waits at most [`BATCH_LOCK_TIMEOUT`]
/// for any one row lock (`lock_timeout`, local to its statement): a row
/// held for long — an agent being deleted with its whole mailbox — must
/// not hold up the other messages of the batch; one message alone waits as
/// long as it takes.
///
/// An error from the statement means nothing of the batch was stored: one
/// message that cannot be stored (its agent deleted meanwhile, a lock
/// timeout) fails the others too, so a caller batching independent
/// messages should retry them one by one — safe in every case, since an
/// error after the commit (the duplicates' lookup, a connection lost
/// before the answer) leaves messages the retry finds as
/// [`Outcome::Duplicate`]s.
pub async fn ingest_batch(store: &Store, batch: &[Arrival<'_>]) -> Result<Vec<Vec<Outcome>>> {
    let messages = batch.iter().filter(|a| !a.deliveries.is_empty()).count();
    if messages == 0 {
        return Ok(vec![Vec::new(); batch.len()]);
    }
    let lock_timeout = (messages > 1).then_some(BATCH_LOCK_TIMEOUT);
    let client = store.client().await?;
    let mut attempt = 1;
    let result = loop {
        match ingest_on(&client, batch, lock_timeout).await {
            Err(e) if e.is_retryable_conflict() && attempt < crate::TX_MAX_ATTEMPTS => {
                crate::store::conflict_backoff(attempt).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    // An error may come after the commit (see above): wake the deliverer
    // then too (a wake-up with nothing new costs one empty claim).
    if result.as_ref().map_or(true, |outcomes| {
        outcomes
            .iter()
            .flatten()
            .any(|o| matches!(o, Outcome::Stored { .. }))
    }) {
        events::wake_deliverer(store);
    }
    result
}

/// How long the statement of a batch of several messages waits for one
/// row lock ([`ingest_batch`]); PostgreSQL `lock_timeout` syntax.
pub const BATCH_LOCK_TIMEOUT: &str = "1s";

/// [`ingest`] on `c`, once: the threading lookups, then the one statement
/// (copies, events, legacy pushes). Inside the caller's transaction it
/// commits or rolls back with it (outbound loopback, [`crate::outbound`]);
/// the statement turns the events' per-commit `NOTIFY` off for the rest of
/// that transaction, so the caller must call [`events::wake_deliverer`]
/// after its commit. No retry here: a serialization failure or deadlock is
/// returned for the caller's transaction to retry.
pub async fn ingest_in(
    c: &impl GenericClient,
    mail: &InboundMail<'_>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>> {
    let mut outcomes = ingest_batch_in(c, &[Arrival { mail, deliveries }]).await?;
    Ok(outcomes.pop().unwrap_or_default())
}

/// [`ingest_batch`] on `c`, once, without retry or wake-up (see
/// [`ingest_in`]), and waiting for row locks as long as the connection's
/// `lock_timeout` allows.
pub async fn ingest_batch_in(
    c: &impl GenericClient,
    batch: &[Arrival<'_>],
) -> Result<Vec<Vec<Outcome>>> {
    ingest_on(c, batch, None).await
}

/// The threading lookups, the one statement (with `lock_timeout` set for
/// the rest of the transaction when given), the duplicates' lookup.
async fn ingest_on(
    c: &impl GenericClient,
    batch: &[Arrival<'_>],
    lock_timeout: Option<&str>,
) -> Result<Vec<Vec<Outcome>>> {
    // Every copy as (arrival, delivery), in the one global lock order: by
    // owner, agent, then the dedupe key (so two batches holding the same
    // two messages for one agent insert them in the same order), then
    // arrival (so the order is total).
    let mut order: Vec<(usize, usize)> = batch
        .iter()
        .enumerate()
        .flat_map(|(a, arrival)| (0..arrival.deliveries.len()).map(move |i| (a, i)))
        .collect();
    if order.is_empty() {
        return Ok(vec![Vec::new(); batch.len()]);
    }
    order.sort_by_key(|&(a, i)| {
        let (mail, d) = (batch[a].mail, &batch[a].deliveries[i]);
        (
            &d.user_id,
            &d.agent_id,
            mail.email_message_id,
            mail.body_sha256,
            a,
        )
    });

    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let received_at = now.format(&Rfc3339).unwrap_or_default();

    // The threading lookups of every copy, pipelined on the connection.
    let threads = futures::future::try_join_all(order.iter().map(|&(a, i)| {
        let mail = batch[a].mail;
        let agent = batch[a].deliveries[i].agent_id.as_str();
        async move {
            match mail.trusted_conversation_id {
                Some(id) => Ok(Some(id.to_owned())),
                None => thread_of(c, agent, mail.thread_refs).await,
            }
        }
    }))
    .await?;

    let mut conversations: Vec<Vec<String>> = batch
        .iter()
        .map(|a| vec![String::new(); a.deliveries.len()])
        .collect();
    let n = order.len();
    let (mut ids, mut users, mut agents, mut headers, mut convs, mut event_ids, mut envelopes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut mail_of: Vec<i32> = Vec::with_capacity(n);
    let mut legacy: Vec<&str> = Vec::new();
    for (&(a, i), thread) in order.iter().zip(threads) {
        let mail = batch[a].mail;
        let d = &batch[a].deliveries[i];
        let conversation_id = thread.unwrap_or_else(mint_conversation_id);
        let event_id = events::deterministic_id(&[d.message_id.as_str(), events::EMAIL_RECEIVED]);
        let reply_to: Option<&[String]> = (!mail.reply_to.is_empty()).then_some(mail.reply_to);
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
            "received_at": received_at,
        });
        envelopes.push(events::envelope(
            events::EMAIL_RECEIVED,
            &event_id,
            OffsetDateTime::now_utc(),
            data,
        ));
        ids.push(d.message_id.as_str());
        users.push(d.user_id.as_str());
        agents.push(d.agent_id.as_str());
        headers.push(&d.auth_headers);
        // 1-based subscript into the per-message arrays below.
        mail_of.push(i32::try_from(a + 1).unwrap_or(i32::MAX));
        if d.legacy_push {
            legacy.push(d.message_id.as_str());
        }
        event_ids.push(event_id.as_str().to_owned());
        convs.push(conversation_id.clone());
        conversations[a][i] = conversation_id;
    }

    // The per-message arrays, indexed by `mail_of`. Lists travel as array
    // literals (one text per message: PostgreSQL arrays of arrays must be
    // rectangular).
    let senders: Vec<&str> = batch.iter().map(|a| a.mail.sender).collect();
    let subjects: Vec<&str> = batch.iter().map(|a| a.mail.subject).collect();
    let message_ids: Vec<&str> = batch.iter().map(|a| a.mail.email_message_id).collect();
    let raws: Vec<&[u8]> = batch.iter().map(|a| a.mail.raw).collect();
    let digests: Vec<&str> = batch.iter().map(|a| a.mail.body_sha256).collect();
    let spfs: Vec<&str> = batch.iter().map(|a| a.mail.spf).collect();
    let dkims: Vec<&str> = batch.iter().map(|a| a.mail.dkim).collect();
    let dmarcs: Vec<&str> = batch.iter().map(|a| a.mail.dmarc).collect();
    let tos: Vec<String> = batch
        .iter()
        .map(|a| text_array_literal(a.mail.to))
        .collect();
    let ccs: Vec<String> = batch
        .iter()
        .map(|a| text_array_literal(a.mail.cc))
        .collect();
    let reply_tos: Vec<Option<String>> = batch
        .iter()
        .map(|a| (!a.mail.reply_to.is_empty()).then(|| text_array_literal(a.mail.reply_to)))
        .collect();

    let (sql, n_params) = if legacy.is_empty() {
        (INGEST_SQL, 22)
    } else {
        (INGEST_LEGACY_SQL, 25)
    };
    let stmt = c.prepare_cached(sql).await?;
    let legacy_expires_at = now + LEGACY_TTL;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 25] = [
        &ids,
        &users,
        &agents,
        &headers,
        &convs,
        &event_ids,
        &envelopes,
        &senders,
        &subjects,
        &message_ids,
        &raws,
        &digests,
        &spfs,
        &dkims,
        &dmarcs,
        &tos,
        &ccs,
        &reply_tos,
        &now,
        &(now + MESSAGE_TTL),
        &mail_of,
        &lock_timeout,
        &legacy,
        &LEGACY_MAX_ATTEMPTS,
        &legacy_expires_at,
    ];
    let rows = c.query(&stmt, &params[..n_params]).await?;
    let inserted: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();

    // The existing row of every copy the dedupe index skipped: one lookup
    // for all of them.
    let (mut dup_agents, mut dup_message_ids, mut dup_digests) = (vec![], vec![], vec![]);
    for arrival in batch {
        for d in arrival.deliveries {
            if !inserted.contains(d.message_id.as_str()) {
                dup_agents.push(d.agent_id.as_str());
                dup_message_ids.push(arrival.mail.email_message_id);
                dup_digests.push(arrival.mail.body_sha256);
            }
        }
    }
    let mut existing = std::collections::HashMap::new();
    if !dup_agents.is_empty() {
        let stmt = c.prepare_cached(DUPLICATES_SQL).await?;
        for row in c
            .query(&stmt, &[&dup_agents, &dup_message_ids, &dup_digests])
            .await?
        {
            let (agent, message_id, digest, id): (String, String, String, MessageId) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            existing.insert((agent, message_id, digest), id);
        }
    }

    let mut outcomes = Vec::with_capacity(batch.len());
    for (arrival, conversations) in batch.iter().zip(conversations) {
        let mut these = Vec::with_capacity(arrival.deliveries.len());
        for (d, conversation_id) in arrival.deliveries.iter().zip(conversations) {
            if inserted.contains(d.message_id.as_str()) {
                these.push(Outcome::Stored {
                    message_id: d.message_id.clone(),
                    conversation_id,
                });
                continue;
            }
            let key = (
                d.agent_id.clone(),
                arrival.mail.email_message_id.to_owned(),
                arrival.mail.body_sha256.to_owned(),
            );
            let message_id = existing.get(&key).cloned().ok_or_else(|| {
                crate::StoreError::Unavailable(
                    "a copy skipped as a duplicate has no stored row".into(),
                )
            })?;
            these.push(Outcome::Duplicate { message_id });
        }
        outcomes.push(these);
    }
    Ok(outcomes)
}

/// The stored inbound rows with these (agent, Message-ID, SHA-256) keys —
/// the dedupe index's key, one index lookup each.
const DUPLICATES_SQL: &str = "SELECT m.agent_id, m.email_message_id, m.body_sha256, m.id \
       FROM unnest($1::text[], $2::text[], $3::text[]) AS k(agent_id, email_message_id, body_sha256) \
       JOIN messages m ON m.agent_id = k.agent_id AND m.email_message_id = k.email_message_id \
        AND m.body_sha256 = k.body_sha256 AND m.direction = 'inbound'";

/// `items` as a PostgreSQL array literal (`{"a","b\"c"}`): every element
/// quoted, `\` and `"` escaped, so no address can change the array's shape.
fn text_array_literal(items: &[String]) -> String {
    let mut out = String::with_capacity(2 + items.iter().map(|s| s.len() + 3).sum::<usize>());
    out.push('{');
    for (k, item) in items.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in item.chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
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
