//! The mail library of e2a: everything the relay needs to understand an
//! inbound message and everything the sender needs to write an outbound one,
//! with no SQL and no knowledge of the database.
//!
//! Inbound:
//!
//! - [`parse`](mod@parse): best-effort MIME parsing into the fields the API
//!   returns; never panics, never fails.
//! - [`auth`]: SPF (on the envelope), DKIM (every signature) and DMARC (with
//!   alignment) behind a resolver the caller injects.
//! - [`headers`]: the signed `X-E2A-Auth-*` verdict headers.
//! - [`conversation`]: when the `X-E2A-Conversation-Id` header may be trusted,
//!   and minting new conversation ids.
//! - [`dkim_keys`]: per-domain RSA-2048 DKIM key pairs and their DNS records.
//! - [`cpu`]: CPU-heavy work kept off the async executor.
//!
//! Outbound:
//!
//! - [`compose`]: an outgoing message to RFC 5322 bytes; header values with
//!   line breaks are refused, never stripped.
//! - [`dkim_sign`]: RSA-SHA256 relaxed/relaxed DKIM signatures with a key
//!   parsed once per domain.
//! - [`draft`]: the reply and forward rules: subjects, threading headers,
//!   recipients, the quoted forward body.
//! - [`notification`]: the reviewer's notification of a message held for
//!   human-in-the-loop review (no body; approve, reject and dashboard
//!   links), with everything the agent controls made one line and escaped.
//! - [`submit`](mod@submit): SMTP submission of a composed message to the
//!   outbound relay, bounded in time, with every reply classified (sent,
//!   temporary, permanent; per recipient too).

pub mod auth;
pub mod compose;
pub mod conversation;
pub mod cpu;
pub mod dkim_keys;
pub mod dkim_sign;
pub mod draft;
pub mod headers;
pub mod notification;
pub mod parse;
pub mod submit;

mod hex;

pub use auth::{
    AuthInput, AuthVerdict, Authenticator, DkimPass, DkimResult, DmarcPolicy, DmarcResult,
    RecordCache, SpfResult,
};
pub use compose::{Attachment, ComposeError, OutgoingMessage, compose};
pub use dkim_sign::{DkimKey, SignError};
pub use parse::{AttachmentInfo, Mailbox, ParsedMessage, parse};
pub use submit::{
    Envelope, Outcome, RecipientResult, RecipientStatus, SmtpConfig, Submission, TlsMode, submit,
};
