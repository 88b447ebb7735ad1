//! The `X-E2A-Signature` header (spec §4.1): signing for the deliverer and
//! verification for tests and receivers.
//!
//! Format: `t=<unix seconds>,v1=<hex>[,v1=<hex>]` — comma-joined, no spaces,
//! the current secret's signature first and the previous secret's second
//! (only during a rotation window). Each `v1` is the lowercase hex of
//! HMAC-SHA256 keyed by the **whole secret string as UTF-8 bytes** (the
//! `whsec_` / `wsec_` prefix included, the hex part not decoded) over
//! `"<t>." + body`, where `body` is exactly the bytes sent.

use std::fmt;
use std::time::Duration;

use ring::hmac;

use crate::hex;

/// The header name as the spec writes it. (HTTP/1.1 sends it title-cased,
/// `X-E2a-Signature`, like the Go original; receivers match names
/// case-insensitively.)
pub const SIGNATURE_HEADER: &str = "X-E2A-Signature";

/// How far a signed timestamp may be from the receiver's clock, either way:
/// 300 s, the default of the official SDKs.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// The secrets a request is signed with: the webhook's current secret and,
/// inside a rotation window, the previous one.
///
/// `Debug` never shows the secrets.
#[derive(Clone, Copy)]
pub struct Secrets<'a> {
    current: &'a str,
    previous: Option<&'a str>,
}

impl<'a> Secrets<'a> {
    /// Signs with `current` only.
    pub fn new(current: &'a str) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// Also signs with `previous` (second `v1=`); `None` or an empty string
    /// means no previous secret, as in the original. Whether the rotation
    /// window is still open is the caller's decision.
    pub fn with_previous(mut self, previous: Option<&'a str>) -> Self {
        self.previous = previous.filter(|p| !p.is_empty());
        self
    }

    /// The secrets in header order: current first.
    fn iter(&self) -> impl Iterator<Item = &'a str> {
        std::iter::once(self.current).chain(self.previous)
    }
}

impl fmt::Debug for Secrets<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.map(|_| "<redacted>"))
            .finish()
    }
}

/// The `X-E2A-Signature` value for `body` sent at `timestamp` (unix seconds).
///
/// Pure and deterministic; sign the very bytes that go on the wire
/// ([`crate::Body`] guarantees that for the client's own requests).
pub fn sign(secrets: &Secrets<'_>, timestamp: i64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets.iter() {
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac(secret, timestamp, body).as_ref()));
    }
    header
}

fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

fn signed_payload(timestamp: i64, body: &[u8]) -> Vec<u8> {
    let t = timestamp.to_string();
    let mut msg = Vec::with_capacity(t.len() + 1 + body.len());
    msg.extend_from_slice(t.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    msg
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(&key(secret));
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.sign()
}

/// Why a signature header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not `key=value` pairs separated by commas, no `t`, a repeated `t`
    /// or a `t` that is not an integer.
    #[error("malformed signature header")]
    Malformed,
    /// No `v1=` value in the header.
    #[error("no v1 signature in the header")]
    NoSignature,
    /// The timestamp is further than the tolerance from `now`.
    #[error("signature timestamp is {age_secs} s from now, outside the tolerance")]
    OutsideTolerance {
        /// `now - t` in seconds (negative: from the future).
        age_secs: i64,
    },
    /// No `v1=` value matches any of the candidate secrets.
    #[error("no signature matches")]
    Mismatch,
}

/// Checks an `X-E2A-Signature` header against `body` and candidate
/// `secrets` (any may match; a receiver in a rotation passes both).
///
/// Accepts any number of `v1=` values (any may match), ignores unknown keys
/// (room for future schemes) and whitespace around items, and requires
/// `|now - t| <= tolerance`. The comparison is constant-time
/// (`ring::hmac::verify`).
pub fn verify(
    header: &str,
    secrets: &[&str],
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let (k, v) = item.trim().split_once('=').ok_or(VerifyError::Malformed)?;
        match k.trim() {
            "t" => {
                let t = v
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| VerifyError::Malformed)?;
                if timestamp.replace(t).is_some() {
                    return Err(VerifyError::Malformed);
                }
            }
            // A value that is not hex can never match; keep looking.
            "v1" => signatures.extend(hex::decode(v.trim())),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(VerifyError::Malformed)?;
    if signatures.is_empty() {
        return Err(VerifyError::NoSignature);
    }
    let age_secs = now.saturating_sub(timestamp);
    if age_secs.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::OutsideTolerance { age_secs });
    }
    let msg = signed_payload(timestamp, body);
    let matched = secrets.iter().any(|secret| {
        let key = key(secret);
        signatures
            .iter()
            .any(|sig| hmac::verify(&key, &msg, sig).is_ok())
    });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fixed vector, computed independently with Python's hmac module:
    //   python3 -c 'import hmac,hashlib; print(hmac.new(KEY.encode(),
    //       b"1767225600." + BODY, hashlib.sha256).hexdigest())'
    // for each KEY below (the whole secret string, prefix included).
    const BODY: &[u8] = br#"{"created_at":"2026-01-01T00:00:00Z","data":{"test":true},"event":"email.received","id":"evt_00000000000000000000000000000001"}"#;
    const TS: i64 = 1_767_225_600;
    const CURRENT: &str = "whsec_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const CURRENT_MAC: &str = "fc9fe45ef7054d014b41deb01fbe3bcb4e145a24c95d6a6baa739e111d5ef79e";
    const PREVIOUS: &str = "whsec_fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const PREVIOUS_MAC: &str = "a1eb422db8c0a3ffd91cbbdad275409801f663dad9a4582c0f67ee31ae7d5dc2";
    const USER_SECRET: &str =
        "wsec_00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const USER_SECRET_MAC: &str =
        "aaeb8a1d4ed0979520d7e6ea683b5f0cc4e17cf99895f47fcc3518903af344c7";
    // The same HMAC with the hex part decoded as the key — what the spec
    // says we must NOT do.
    const DECODED_KEY_MAC: &str =
        "c841873e30f3762bad1697b20cc95a370d6b214bdb25629c84fd8640efd4e20a";

    #[test]
    fn known_vector_single_secret() {
        let header = sign(&Secrets::new(CURRENT), TS, BODY);
        assert_eq!(header, format!("t=1767225600,v1={CURRENT_MAC}"));
        assert_ne!(CURRENT_MAC, DECODED_KEY_MAC);
    }

    #[test]
    fn known_vector_rotation_current_first_no_spaces() {
        let header = sign(
            &Secrets::new(CURRENT).with_previous(Some(PREVIOUS)),
            TS,
            BODY,
        );
        assert_eq!(
            header,
            format!("t=1767225600,v1={CURRENT_MAC},v1={PREVIOUS_MAC}")
        );
    }

    #[test]
    fn user_secret_is_used_verbatim() {
        let header = sign(&Secrets::new(USER_SECRET), TS, BODY);
        assert_eq!(header, format!("t=1767225600,v1={USER_SECRET_MAC}"));
    }

    #[test]
    fn empty_previous_is_no_previous() {
        let header = sign(&Secrets::new(CURRENT).with_previous(Some("")), TS, BODY);
        assert_eq!(header.matches("v1=").count(), 1);
    }

    #[test]
    fn debug_hides_secrets() {
        let s = format!("{:?}", Secrets::new(CURRENT).with_previous(Some(PREVIOUS)));
        assert!(!s.contains("whsec_"), "{s}");
    }

    #[test]
    fn verify_accepts_either_secret() {
        let header = sign(
            &Secrets::new(CURRENT).with_previous(Some(PREVIOUS)),
            TS,
            BODY,
        );
        for secrets in [&[CURRENT][..], &[PREVIOUS], &["nope", PREVIOUS]] {
            assert_eq!(
                verify(&header, secrets, BODY, TS, DEFAULT_TOLERANCE),
                Ok(())
            );
        }
        assert_eq!(
            verify(&header, &["whsec_other"], BODY, TS, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn verify_rejects_changed_body_and_timestamp() {
        let header = sign(&Secrets::new(CURRENT), TS, BODY);
        let mut body = BODY.to_vec();
        body.push(b' ');
        assert_eq!(
            verify(&header, &[CURRENT], &body, TS, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        let shifted = header.replace("t=1767225600", "t=1767225601");
        assert_eq!(
            verify(&shifted, &[CURRENT], BODY, TS, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn verify_tolerance_both_ways() {
        let header = sign(&Secrets::new(CURRENT), TS, BODY);
        let ok = |now| verify(&header, &[CURRENT], BODY, now, DEFAULT_TOLERANCE);
        assert_eq!(ok(TS + 300), Ok(()));
        assert_eq!(ok(TS - 300), Ok(()));
        assert_eq!(
            ok(TS + 301),
            Err(VerifyError::OutsideTolerance { age_secs: 301 })
        );
        assert_eq!(
            ok(TS - 301),
            Err(VerifyError::OutsideTolerance { age_secs: -301 })
        );
    }

    #[test]
    fn verify_parsing() {
        let v = |h: &str| verify(h, &[CURRENT], BODY, TS, DEFAULT_TOLERANCE);
        assert_eq!(v(""), Err(VerifyError::Malformed));
        assert_eq!(v("v1=00"), Err(VerifyError::Malformed));
        assert_eq!(v("t=abc,v1=00"), Err(VerifyError::Malformed));
        assert_eq!(v("t=1,t=2,v1=00"), Err(VerifyError::Malformed));
        assert_eq!(v("t=1767225600"), Err(VerifyError::NoSignature));
        // Whitespace, unknown schemes and junk v1 values are tolerated.
        assert_eq!(
            v(&format!(
                "t=1767225600, v0=abc, v1=not-hex, v1={}",
                CURRENT_MAC.to_uppercase()
            )),
            Ok(())
        );
    }
}
