//! Group commit of received messages.
//!
//! Every accepted message is one durable transaction, and with fsync and
//! synchronous commit on, a busy relay pays per message what does not
//! depend on its rows: a commit, a plan, the constraints of five tables set
//! up for one statement. So the sessions hand their messages to a
//! [`Recorder`] of [`Ingests`]: each of its [`Ingests::TASKS`] tasks takes
//! the messages waiting at that moment (at most [`MAX_BATCH_BYTES`] of raw
//! message, and [`e2a_runtime::group_commit::MAX_BATCH`] messages) and
//! stores them with one statement ([`inbound::ingest_batch`]). Nothing
//! waits to fill a batch: an idle relay stores each message at once.
//!
//! Every message keeps its guarantees: its session answers `250` only after
//! the commit that stored it; a batch that fails as a whole (one message's
//! agent deleted meanwhile) is stored again one message at a time, so the
//! others are still accepted and only the failing one gets `451`.

use e2a_runtime::group_commit::{Recorder, Records};
use e2a_store::{
    Store, StoreError,
    inbound::{self, Arrival, Delivery, InboundMail, Outcome},
};

/// Most bytes of raw message stored by one batch's statement (a larger
/// message is stored on its own).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// A received message waiting to be stored: everything of an
/// [`InboundMail`], owned (it crosses to a recording task), and its copies.
#[derive(Debug)]
pub struct Received {
    /// The raw message as received.
    pub raw: Vec<u8>,
    /// See [`InboundMail::body_sha256`].
    pub body_sha256: String,
    /// See [`InboundMail::email_message_id`].
    pub email_message_id: String,
    /// See [`InboundMail::sender`].
    pub sender: String,
    /// See [`InboundMail::subject`].
    pub subject: String,
    /// See [`InboundMail::to`].
    pub to: Vec<String>,
    /// See [`InboundMail::cc`].
    pub cc: Vec<String>,
    /// See [`InboundMail::reply_to`].
    pub reply_to: Vec<String>,
    /// See [`InboundMail::thread_refs`].
    pub thread_refs: Vec<String>,
    /// See [`InboundMail::trusted_conversation_id`].
    pub trusted_conversation_id: Option<String>,
    /// See [`InboundMail::spf`].
    pub spf: &'static str,
    /// See [`InboundMail::dkim`].
    pub dkim: &'static str,
    /// See [`InboundMail::dmarc`].
    pub dmarc: &'static str,
    /// One copy per recipient agent.
    pub deliveries: Vec<Delivery>,
}

impl Received {
    /// The message as the store takes it.
    pub fn mail(&self) -> InboundMail<'_> {
        InboundMail {
            raw: &self.raw,
            body_sha256: &self.body_sha256,
            email_message_id: &self.email_message_id,
            sender: &self.sender,
            subject: &self.subject,
            to: &self.to,
            cc: &self.cc,
            reply_to: &self.reply_to,
            thread_refs: &self.thread_refs,
            trusted_conversation_id: self.trusted_conversation_id.as_deref(),
            spf: self.spf,
            dkim: self.dkim,
            dmarc: self.dmarc,
        }
    }
}

/// Received messages are stored by [`inbound::ingest_batch`].
#[derive(Debug)]
pub struct Ingests;

impl Records for Ingests {
    type Item = Received;
    type Recorded = Vec<Outcome>;
    const BATCH_METRIC: &'static str = "e2a_smtp_ingest_batch_size";
    const TASKS: usize = 2;
    const MAX_BATCH_WEIGHT: usize = MAX_BATCH_BYTES;

    fn weight(item: &Received) -> usize {
        item.raw.len()
    }

    async fn record_batch(
        store: &Store,
        items: &[Received],
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let mails: Vec<InboundMail<'_>> = items.iter().map(Received::mail).collect();
        let batch: Vec<Arrival<'_>> = mails
            .iter()
            .zip(items)
            .map(|(mail, item)| Arrival {
                mail,
                deliveries: &item.deliveries,
            })
            .collect();
        inbound::ingest_batch(store, &batch).await
    }

    async fn record_one(store: &Store, item: &Received) -> Result<Vec<Outcome>, StoreError> {
        inbound::ingest(store, &item.mail(), &item.deliveries).await
    }

    /// The batch's statement orders every copy itself (by owner, agent).
    fn lock_order(_item: &Received) -> &str {
        ""
    }
}

/// The relay's recorder of received messages.
pub type Ingester = Recorder<Ingests>;
