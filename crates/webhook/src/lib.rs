//! The webhook delivery library of e2a: everything one delivery attempt
//! needs, with no SQL and no knowledge of the database (the deliverer claims
//! rows, calls this crate with no transaction open, and records the
//! [`Outcome`]).
//!
//! - [`signature`]: `X-E2A-Signature: t=<unix>,v1=<hex>[,v1=<hex>]`
//!   (spec §4.1) — [`sign`] for the deliverer, [`verify`] (constant-time,
//!   several `v1`, 300 s tolerance) for tests and receivers.
//! - [`headers`]: the exact request headers of subscriber deliveries and of
//!   legacy per-agent pushes (§4.2), with stored header names and values
//!   validated so nothing can inject a header.
//! - [`body`]: [`Body`], the bytes that are both signed and sent.
//! - [`legacy`]: [`LegacyRequest`], the headers and body of a legacy
//!   per-agent push (§4.2) built from a [`LegacyPayload`].
//! - [`retry`]: [`RetrySchedule::SUBSCRIBER`] — 8 attempts whose base delays
//!   span exactly 72 h (the original promised ~72 h and delivered ~53 h,
//!   flaw 6), upward-only bounded jitter, `Retry-After` honoured within
//!   bounds; [`RetrySchedule::LEGACY`] — 7 attempts over exactly 24 h for
//!   legacy per-agent pushes.
//! - [`outcome`]: [`Outcome`] — status (0 = no response), class, short error
//!   text without secrets or URL, retryable or not, parsed `Retry-After`.
//! - [`policy`] and [`client`]: [`check_url`] for registration-time
//!   validation, and [`WebhookClient`], which refuses non-public
//!   destinations on the addresses it actually connects to.
//!
//! # Guarantees
//!
//! * **Sign what is sent.** The client signs `body.as_bytes()` and sends the
//!   same buffer.
//! * **No SSRF through a webhook URL.** Unless `allow_private` (development
//!   and tests only) a request never connects to a loopback, private, CGNAT,
//!   link-local, unique-local, multicast, broadcast, unspecified, reserved or
//!   documentation address, and never (even with `allow_private`) to a
//!   cloud-metadata address — whether the URL names it literally, in a
//!   disguised form (`2130706433`, `0x7f.1`, `::ffff:127.0.0.1`, NAT64,
//!   6to4), or through a DNS name (checked after resolution, on the
//!   addresses connected to). Redirects are not followed and proxies are not
//!   used, so neither can lead elsewhere.
//! * **Bounded.** One attempt takes at most the configured timeout (15 s by
//!   default) and reads at most 64 KiB of response body; nothing of the
//!   response is kept.
//! * **Nothing secret in errors.** [`Outcome::error`] never contains a
//!   secret, the URL, or the response body; [`Secrets`]'s `Debug` is
//!   redacted.
//! * **At most one POST per call.** reqwest's own retries are off; the retry
//!   decision belongs to the deliverer, through [`RetrySchedule`].

pub mod body;
pub mod client;
pub mod headers;
pub mod legacy;
pub mod outcome;
pub mod policy;
pub mod retry;
pub mod signature;

mod hex;

pub use body::{Body, BodyError, LegacyPayload};
pub use client::{BuildError, ClientConfig, Lookup, LookupFuture, SystemLookup, WebhookClient};
pub use headers::{HeaderError, legacy_headers, subscriber_headers};
pub use legacy::LegacyRequest;
pub use outcome::{Outcome, OutcomeKind};
pub use policy::{RefusedAddress, UrlError, UrlPolicy, check_ip, check_url};
pub use retry::{RETRY_AFTER_MAX, RetrySchedule, parse_retry_after};
pub use signature::{DEFAULT_TOLERANCE, SIGNATURE_HEADER, Secrets, VerifyError, sign, verify};

/// The environment variable the deliverer and the API read to set
/// [`UrlPolicy::allow_private`]: `1` allows private destinations. Off by
/// default; never for production.
pub const ALLOW_PRIVATE_ENV: &str = "E2A_ALLOW_PRIVATE_WEBHOOKS";
