//! DKIM signing of outbound mail (spec §7.3, RFC 6376) with `mail-auth` on
//! `ring`: RSA-SHA256, relaxed/relaxed canonicalisation.
//!
//! [`DkimKey`] is a domain's key parsed once (parsing and checking an RSA
//! key costs far more than signing a small message): a sender keeps one per
//! signing domain and calls [`DkimKey::sign`] per message. [`sign`] is the
//! one-shot form.
//!
//! The signature covers the [`SIGNED_HEADERS`] — the spec's list plus
//! [`CONVERSATION_HEADER`](crate::compose::CONVERSATION_HEADER), because
//! [`crate::conversation::trusted_conversation_id`] trusts that header on
//! mail coming back only when a passing signature covers it. Every listed
//! name goes into `h=` whether or not the message has that header, so a
//! header added in transit (say a second `References`, or a `Reply-To`)
//! breaks the signature. `t=` is the caller's clock; there is no `x=`, `l=`
//! or `i=`.
//!
//! Hashing is linear in the message: for a large message run it off the
//! async executor (`cpu::run_for(raw.len(), || key.sign(raw, now))`).

use mail_auth::AuthenticatedMessage;
use mail_auth::common::crypto::{RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderStream, HeaderWriter, Writable, Writer};
use mail_auth::dkim::canonicalize::CanonicalHeaders;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done, Signature};
use time::OffsetDateTime;

use crate::dkim_keys::{self, KeyError};

/// The header fields a signature covers, in `h=` order for those present.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
    crate::compose::CONVERSATION_HEADER,
];

/// Longest domain name accepted for `d=` (RFC 1035).
const MAX_DOMAIN_LEN: usize = 253;

/// Why a key cannot be prepared or a message signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signing domain is not a plain domain name (letters, digits, `-`,
    /// `_`, dot-separated non-empty labels). It is written into `d=`.
    #[error("the DKIM signing domain is not a valid domain name")]
    InvalidDomain,
    /// The selector is not a plain domain label sequence. It is written into
    /// `s=`.
    #[error("the DKIM selector is not a valid selector")]
    InvalidSelector,
    /// The stored private key cannot be loaded.
    #[error("the DKIM private key cannot be loaded")]
    Key(#[source] KeyError),
    /// The message has no header block, or no `From` header, which a
    /// signature must cover (RFC 6376 §5.4).
    #[error("the message has no From header to sign")]
    NoFrom,
    /// The RSA operation failed.
    #[error("DKIM signing failed")]
    Sign(#[source] mail_auth::Error),
}

/// A domain's DKIM private key, parsed once, with its `d=` and `s=`.
///
/// `Send + Sync`: share one (in an `Arc`) between all senders for the
/// domain. Its `Debug` output never shows the key.
pub struct DkimKey {
    signer: DkimSigner<RsaKey<Sha256>, Done>,
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKey")
            .field("domain", &self.domain())
            .field("selector", &self.selector())
            .finish_non_exhaustive()
    }
}

impl DkimKey {
    /// Loads `private_key_der` (PKCS#1 DER, as [`dkim_keys`] stores it) for
    /// signing as `domain` with `selector`. Both are checked here, since they
    /// are written into the signature header verbatim.
    pub fn new(domain: &str, selector: &str, private_key_der: &[u8]) -> Result<Self, SignError> {
        if domain.len() > MAX_DOMAIN_LEN || !is_dns_name(domain) {
            return Err(SignError::InvalidDomain);
        }
        if selector.len() > MAX_DOMAIN_LEN || !is_dns_name(selector) {
            return Err(SignError::InvalidSelector);
        }
        let key = dkim_keys::signing_key(private_key_der).map_err(SignError::Key)?;
        let signer = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(SIGNED_HEADERS.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(DkimKey { signer })
    }

    /// The signing domain (`d=`).
    pub fn domain(&self) -> &str {
        &self.signer.template.d
    }

    /// The selector (`s=`).
    pub fn selector(&self) -> &str {
        &self.signer.template.s
    }

    /// `raw` with a `DKIM-Signature:` header prepended, `t=` set to `now`
    /// (unix seconds; omitted before 1970).
    ///
    /// Fails only when the message has no `From` header or the RSA operation
    /// fails; never panics. The input is not modified, so it must already be
    /// in its final form with CRLF line endings ([`crate::compose::compose`]
    /// output is).
    pub fn sign(&self, raw: &[u8], now: OffsetDateTime) -> Result<Vec<u8>, SignError> {
        let header = self.signature_header(raw, now)?;
        let mut signed = Vec::with_capacity(header.len() + raw.len());
        signed.extend_from_slice(header.as_bytes());
        signed.extend_from_slice(raw);
        Ok(signed)
    }

    /// The `DKIM-Signature: …\r\n` header field for `raw`, for a caller that
    /// writes it ahead of the message itself (no copy of the message). Same
    /// contract as [`DkimKey::sign`].
    pub fn signature_header(&self, raw: &[u8], now: OffsetDateTime) -> Result<String, SignError> {
        // The header fields as mail-auth's verifier reads them.
        let message = AuthenticatedMessage::parse(raw).ok_or(SignError::NoFrom)?;
        if !message
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(b"From"))
        {
            return Err(SignError::NoFrom);
        }
        let fields = Fields {
            headers: message.headers.iter(),
            body: raw.get(message.body_offset as usize..).unwrap_or_default(),
        };
        let template = &self.signer.template;
        let key = &self.signer.key;
        // What `DkimSigner::sign` does, with the caller's clock for `t=`
        // (mail-auth 0.13 reads the system clock there).
        let (_, headers, signed_headers, body) = template.canonicalize(fields);
        let mut signature = template.clone();
        signature.bh = key.hash(body).as_ref().to_vec();
        signature.t = u64::try_from(now.unix_timestamp()).unwrap_or(0);
        signature.h = signed_headers;
        signature.b = key
            .sign(SignedData {
                headers,
                signature: &signature,
            })
            .map_err(SignError::Sign)?;
        Ok(signature.to_header())
    }
}

/// A parsed message as the input of `Signature::canonicalize`.
struct Fields<'a, 'x> {
    headers: std::slice::Iter<'a, (&'x [u8], &'x [u8])>,
    body: &'x [u8],
}

impl<'x> HeaderStream<'x> for Fields<'_, 'x> {
    fn next_header(&mut self) -> Option<(&'x [u8], &'x [u8])> {
        self.headers.next().copied()
    }

    fn body(&mut self) -> &'x [u8] {
        self.body
    }
}

/// What the RSA signature covers (RFC 6376 §3.7): the canonical signed
/// headers, then the canonical `DKIM-Signature` header with `b=` empty and
/// no trailing CRLF.
struct SignedData<'a> {
    headers: CanonicalHeaders<'a>,
    signature: &'a Signature,
}

impl Writable for SignedData<'_> {
    fn write(self, writer: &mut impl Writer) {
        self.headers.write(writer);
        self.signature.write(writer, false);
    }
}

/// Signs `raw` once as `domain`/`selector` with a PKCS#1 DER key: a
/// [`DkimKey::new`] followed by [`DkimKey::sign`]. A caller signing many
/// messages for one domain should keep the [`DkimKey`] instead.
pub fn sign(
    raw: &[u8],
    domain: &str,
    selector: &str,
    private_key_der: &[u8],
    now: OffsetDateTime,
) -> Result<Vec<u8>, SignError> {
    DkimKey::new(domain, selector, private_key_der)?.sign(raw, now)
}

/// Dot-separated, non-empty labels of ASCII letters, digits, `-` and `_`
/// (underscore for selectors and `_domainkey`-style names); one trailing dot
/// is not allowed.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_selectors_are_checked_before_the_key() {
        for bad in [
            "",
            "a..b",
            "a.b.",
            "ex ample.com",
            "a;b",
            "a\r\nb",
            "é.com",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(DkimKey::new(bad, "s1", b""), Err(SignError::InvalidDomain)),
                "{bad:?}"
            );
            assert!(
                matches!(
                    DkimKey::new("example.com", bad, b""),
                    Err(SignError::InvalidSelector)
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            DkimKey::new("mail.example.com", "e2a202507", b"not a key"),
            Err(SignError::Key(_))
        ));
        assert!(is_dns_name("e2a_202507.sub-domain.example"));
    }

    #[test]
    fn dkim_key_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<DkimKey>();
    }
}
