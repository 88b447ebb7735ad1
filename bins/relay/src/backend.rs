//! What a session asks of the rest of the system: is this recipient ours,
//! and store this message. [`Session`](crate::session::Session) is generic
//! over [`Backend`], so its tests use an in-memory backend and production
//! uses [`crate::gateway::Gateway`] (the store plus SPF/DKIM/DMARC).

use std::{future::Future, net::IpAddr};

use e2a_store::address::EmailAddress;

/// The answer to `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientCheck<R> {
    /// A mailbox we deliver to.
    Accept(R),
    /// No such agent (or its domain is not verified): `550 5.1.1`.
    Unknown,
    /// The agent's account is at its monthly message or storage cap:
    /// `552 5.2.2 mailbox quota exceeded` (spec §6.2).
    OverQuota,
    /// We cannot tell right now (database down): `451 4.3.0`.
    TempFail,
}

/// The answer to the end of `DATA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Stored (or already stored: an MTA retry) — `250`, only after commit.
    Accepted {
        /// An id for the `250` line (the first stored message id).
        id: String,
    },
    /// Not stored; the sender should retry: `451 4.3.0`.
    TempFail,
    /// Not stored for a reason of policy that may pass (e.g. DMARC cannot
    /// be evaluated right now); the sender should retry. Answered as given
    /// (a 4xx) and not counted as a client error.
    Deferred {
        /// SMTP code (4xx).
        code: u16,
        /// Enhanced status code.
        esc: [u8; 3],
        /// Human-readable text.
        message: String,
    },
    /// Refused for good (e.g. DMARC failure for an agent that opted in).
    Reject {
        /// SMTP code (5xx).
        code: u16,
        /// Enhanced status code.
        esc: [u8; 3],
        /// Human-readable text.
        message: String,
    },
}

/// The envelope of one mail transaction.
#[derive(Debug, Clone)]
pub struct Envelope<R> {
    /// The connecting client's address, if known.
    pub remote_ip: Option<IpAddr>,
    /// The EHLO/HELO name (untrusted).
    pub helo: String,
    /// The reverse path of MAIL FROM, without brackets; empty for `<>`.
    pub mail_from: String,
    /// Accepted recipients, in RCPT order, without duplicates.
    pub recipients: Vec<(EmailAddress, R)>,
}

/// The relay's view of the gateway.
pub trait Backend: Send + Sync + 'static {
    /// What `RCPT` resolves an address to.
    type Recipient: Clone + PartialEq + Send + Sync + 'static;

    /// Checks one recipient (already normalised).
    fn recipient(
        &self,
        address: &EmailAddress,
    ) -> impl Future<Output = RecipientCheck<Self::Recipient>> + Send;

    /// Authenticates and stores `message` for the envelope's recipients.
    /// Must return [`DeliveryOutcome::Accepted`] only once the message is
    /// durably stored.
    fn deliver(
        &self,
        envelope: &Envelope<Self::Recipient>,
        message: Vec<u8>,
    ) -> impl Future<Output = DeliveryOutcome> + Send;
}
