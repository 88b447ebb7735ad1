//! The signed `X-E2A-Auth-*` verdict headers (spec §4.4), with our fix:
//! `X-E2A-Auth-Verified` is `true` iff DMARC passed, and
//! `X-E2A-Auth-Domain-Check` carries `spf=<s>; dkim=<s>; dmarc=<s>`.
//!
//! Canonical string = the eight values `verified, sender, entity_type,
//! domain_check, delegation ("" when absent), timestamp, message_id,
//! body_hash` joined with `\n`; signature = lowercase hex
//! HMAC-SHA256(key, canonical). Verification checks the signature against
//! any candidate key in constant time and the timestamp age within
//! [-30 s, +5 min].

use ring::hmac;
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{Duration, OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::auth::AuthVerdict;

pub const VERIFIED: &str = "X-E2A-Auth-Verified";
pub const SENDER: &str = "X-E2A-Auth-Sender";
pub const ENTITY_TYPE: &str = "X-E2A-Auth-Entity-Type";
pub const DOMAIN_CHECK: &str = "X-E2A-Auth-Domain-Check";
pub const TIMESTAMP: &str = "X-E2A-Auth-Timestamp";
pub const MESSAGE_ID: &str = "X-E2A-Auth-Message-Id";
pub const BODY_HASH: &str = "X-E2A-Auth-Body-Hash";
pub const DELEGATION: &str = "X-E2A-Auth-Delegation";
pub const SIGNATURE: &str = "X-E2A-Auth-Signature";

/// The only entity type the relay asserts.
pub const ENTITY_HUMAN: &str = "human";

/// How far in the past a timestamp may be and still verify.
pub const MAX_AGE: Duration = Duration::minutes(5);
/// How far in the future a timestamp may be (clock skew) and still verify.
pub const MAX_SKEW: Duration = Duration::seconds(30);

const TIMESTAMP_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// The values the headers assert about one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeaderInput {
    /// DMARC pass ([`AuthVerdict::verified`]).
    pub verified: bool,
    /// The `From` header address (not Reply-To; envelope sender if none).
    pub sender: String,
    /// `spf=<s>; dkim=<s>; dmarc=<s>` ([`AuthVerdict::domain_check`]).
    pub domain_check: String,
    /// Signing time; rendered in UTC with second precision.
    pub timestamp: OffsetDateTime,
    /// The internal `msg_…` id.
    pub message_id: String,
    /// Lowercase hex SHA-256 of the raw message ([`body_sha256`]).
    pub body_sha256: String,
    /// `agent=<id>;human=<id>`; the relay never sets it.
    pub delegation: Option<String>,
}

impl AuthHeaderInput {
    /// Builds the input for a message from its verdict. `body_sha256` is the
    /// raw message's digest ([`body_sha256`]), computed once by the caller
    /// however many copies it signs.
    pub fn from_verdict(
        verdict: &AuthVerdict,
        sender: impl Into<String>,
        timestamp: OffsetDateTime,
        message_id: impl Into<String>,
        body_sha256: impl Into<String>,
    ) -> Self {
        AuthHeaderInput {
            verified: verdict.verified(),
            sender: sender.into(),
            domain_check: verdict.domain_check(),
            timestamp,
            message_id: message_id.into(),
            body_sha256: body_sha256.into(),
            delegation: None,
        }
    }
}

/// Lowercase hex SHA-256 of the raw message bytes (`X-E2A-Auth-Body-Hash`).
pub fn body_sha256(raw: &[u8]) -> String {
    crate::hex::sha256(raw)
}

/// RFC 3339 UTC with second precision, e.g. `2025-07-01T08:52:37Z`.
pub fn format_timestamp(ts: OffsetDateTime) -> String {
    let utc = ts.to_offset(UtcOffset::UTC);
    utc.format(TIMESTAMP_FORMAT)
        .unwrap_or_else(|_| utc.unix_timestamp().to_string())
}

fn parse_timestamp(value: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(value.trim(), TIMESTAMP_FORMAT)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// Header values may not break the header block nor the canonical string:
/// CR and LF become spaces, and outer whitespace (which header transport
/// does not preserve, and [`verify`] ignores) is trimmed.
fn clean(value: &str) -> String {
    value.replace(['\r', '\n'], " ").trim().to_string()
}

fn canonical(values: &HeaderValues) -> String {
    [
        values.verified.as_str(),
        values.sender.as_str(),
        values.entity_type.as_str(),
        values.domain_check.as_str(),
        values.delegation.as_str(),
        values.timestamp.as_str(),
        values.message_id.as_str(),
        values.body_hash.as_str(),
    ]
    .join("\n")
}

struct HeaderValues {
    verified: String,
    sender: String,
    entity_type: String,
    domain_check: String,
    delegation: String,
    timestamp: String,
    message_id: String,
    body_hash: String,
}

/// The signed header set, in the spec's order: Verified, Sender,
/// Entity-Type, Domain-Check, Timestamp, Message-Id, Body-Hash, Delegation
/// (only when set), Signature. Values have CR/LF replaced by spaces and are
/// trimmed before they are signed, so what is emitted is exactly what is
/// signed and what [`verify`] checks.
pub fn sign(input: &AuthHeaderInput, key: &[u8]) -> Vec<(String, String)> {
    let values = HeaderValues {
        verified: if input.verified { "true" } else { "false" }.to_string(),
        sender: clean(&input.sender),
        entity_type: ENTITY_HUMAN.to_string(),
        domain_check: clean(&input.domain_check),
        delegation: input.delegation.as_deref().map(clean).unwrap_or_default(),
        timestamp: format_timestamp(input.timestamp),
        message_id: clean(&input.message_id),
        body_hash: clean(&input.body_sha256),
    };
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        canonical(&values).as_bytes(),
    );
    let signature = crate::hex::encode(tag.as_ref());
    let mut out = vec![
        (VERIFIED.to_string(), values.verified),
        (SENDER.to_string(), values.sender),
        (ENTITY_TYPE.to_string(), values.entity_type),
        (DOMAIN_CHECK.to_string(), values.domain_check),
        (TIMESTAMP.to_string(), values.timestamp),
        (MESSAGE_ID.to_string(), values.message_id),
        (BODY_HASH.to_string(), values.body_hash),
    ];
    if !values.delegation.is_empty() {
        out.push((DELEGATION.to_string(), values.delegation));
    }
    out.push((SIGNATURE.to_string(), signature));
    out
}

/// Why a header set does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the X-E2A-Auth-Signature header is missing")]
    MissingSignature,
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the X-E2A-Auth-Timestamp header is not RFC 3339 UTC")]
    BadTimestamp,
    #[error("the X-E2A-Auth-Timestamp is older than 5 minutes or more than 30 s ahead")]
    TimestampOutOfRange,
    #[error("no key matches the signature")]
    BadSignature,
}

/// A `(name, value)` header pair, owned or borrowed, so [`verify`] takes a
/// `Vec<(String, String)>`, a `&[(String, String)]` or a `&HashMap` alike.
pub trait HeaderPair {
    fn name(&self) -> &str;
    fn value(&self) -> &str;
}

impl<K: AsRef<str>, V: AsRef<str>> HeaderPair for (K, V) {
    fn name(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &str {
        self.1.as_ref()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> HeaderPair for &(K, V) {
    fn name(&self) -> &str {
        self.0.as_ref()
    }
    fn value(&self) -> &str {
        self.1.as_ref()
    }
}

/// Verifies a header set produced by [`sign`] against candidate keys.
///
/// Accepts any iterator of `(name, value)` pairs (a `Vec`, a slice, a map);
/// names match case-insensitively, the first occurrence wins. Succeeds iff
/// the signature is present, the timestamp is within [-30 s, +5 min] of
/// `now`, and some key's HMAC matches (compared in constant time by `ring`).
pub fn verify<I>(headers: I, keys: &[&[u8]], now: OffsetDateTime) -> Result<(), VerifyError>
where
    I: IntoIterator,
    I::Item: HeaderPair,
{
    let mut found: [Option<String>; 9] = Default::default();
    const NAMES: [&str; 9] = [
        VERIFIED,
        SENDER,
        ENTITY_TYPE,
        DOMAIN_CHECK,
        TIMESTAMP,
        MESSAGE_ID,
        BODY_HASH,
        DELEGATION,
        SIGNATURE,
    ];
    for pair in headers {
        let name = pair.name().trim();
        if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(name))
            && found[i].is_none()
        {
            found[i] = Some(pair.value().trim().to_string());
        }
    }
    let [
        verified,
        sender,
        entity_type,
        domain_check,
        timestamp,
        message_id,
        body_hash,
        delegation,
        signature,
    ] = found;
    let signature = signature.ok_or(VerifyError::MissingSignature)?;
    let require = |v: Option<String>, name: &'static str| v.ok_or(VerifyError::MissingHeader(name));
    let values = HeaderValues {
        verified: require(verified, VERIFIED)?,
        sender: require(sender, SENDER)?,
        entity_type: require(entity_type, ENTITY_TYPE)?,
        domain_check: require(domain_check, DOMAIN_CHECK)?,
        delegation: delegation.unwrap_or_default(),
        timestamp: require(timestamp, TIMESTAMP)?,
        message_id: require(message_id, MESSAGE_ID)?,
        body_hash: require(body_hash, BODY_HASH)?,
    };

    let signed_at = parse_timestamp(&values.timestamp).ok_or(VerifyError::BadTimestamp)?;
    let age = now - signed_at;
    if age > MAX_AGE || age < -MAX_SKEW {
        return Err(VerifyError::TimestampOutOfRange);
    }

    let tag = crate::hex::decode(&signature).ok_or(VerifyError::BadSignature)?;
    let message = canonical(&values);
    let matches = keys.iter().any(|key| {
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, key),
            message.as_bytes(),
            &tag,
        )
        .is_ok()
    });
    if matches {
        Ok(())
    } else {
        Err(VerifyError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use time::macros::datetime;

    const KEY: &[u8] = b"whsec_test_key_0123456789";

    fn input() -> AuthHeaderInput {
        AuthHeaderInput {
            verified: true,
            sender: "alice@example.com".into(),
            domain_check: "spf=pass; dkim=pass; dmarc=pass".into(),
            timestamp: datetime!(2025-07-01 10:52:37.987 +02:00),
            message_id: "msg_01J0000000000000000000000".into(),
            body_sha256: body_sha256(b"raw message"),
            delegation: None,
        }
    }

    #[test]
    fn signs_in_spec_order_with_an_independent_hmac() {
        let headers = sign(&input(), KEY);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                VERIFIED,
                SENDER,
                ENTITY_TYPE,
                DOMAIN_CHECK,
                TIMESTAMP,
                MESSAGE_ID,
                BODY_HASH,
                SIGNATURE
            ]
        );
        assert_eq!(headers[4].1, "2025-07-01T08:52:37Z");
        assert_eq!(headers[2].1, "human");

        // The canonical string built by hand, HMAC computed directly.
        let body_hash = crate::hex::encode(
            ring::digest::digest(&ring::digest::SHA256, b"raw message").as_ref(),
        );
        assert_eq!(headers[6].1, body_hash);
        let canonical = format!(
            "true\nalice@example.com\nhuman\nspf=pass; dkim=pass; dmarc=pass\n\n\
             2025-07-01T08:52:37Z\nmsg_01J0000000000000000000000\n{body_hash}"
        );
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, KEY),
            canonical.as_bytes(),
        );
        assert_eq!(headers[7].1, crate::hex::encode(expected.as_ref()));
    }

    #[test]
    fn fixed_vector() {
        // A fixed input and key give a fixed signature (computed once with
        // `printf '%s' "$canonical" | openssl dgst -sha256 -hmac key`).
        let input = AuthHeaderInput {
            verified: false,
            sender: "a@b.c".into(),
            domain_check: "spf=none; dkim=none; dmarc=none".into(),
            timestamp: datetime!(2024-01-02 03:04:05 UTC),
            message_id: "msg_1".into(),
            body_sha256: "00".repeat(32),
            delegation: Some("agent=a1;human=h1".into()),
        };
        let headers = sign(&input, b"key");
        assert_eq!(
            headers[7],
            (DELEGATION.to_string(), "agent=a1;human=h1".into())
        );
        assert_eq!(headers[8].1, FIXED_SIGNATURE);
    }

    const FIXED_SIGNATURE: &str =
        "682f7461cfe1e8f140881b27458e42d07ff77f1d50e96ab26072f9bdcc9b59f9";

    #[test]
    fn round_trip_verifies_with_any_matching_key() {
        let input = input();
        let headers = sign(&input, KEY);
        let now = input.timestamp + Duration::seconds(10);
        assert_eq!(verify(headers.clone(), &[KEY], now), Ok(()));
        assert_eq!(verify(headers.clone(), &[b"old-key", KEY], now), Ok(()));
        assert_eq!(
            verify(headers.clone(), &[b"other-key"], now),
            Err(VerifyError::BadSignature)
        );
        // As a map with lower-case names.
        let map: HashMap<String, String> = headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        assert_eq!(verify(&map, &[KEY], now), Ok(()));
    }

    #[test]
    fn tampering_any_value_breaks_verification() {
        let input = input();
        let headers = sign(&input, KEY);
        let now = input.timestamp;
        for i in 0..headers.len() - 1 {
            let mut tampered = headers.clone();
            if i == 4 {
                // a different but in-range timestamp
                tampered[i].1 = format_timestamp(input.timestamp + Duration::seconds(1));
            } else {
                tampered[i].1.push('x');
            }
            assert_eq!(
                verify(tampered, &[KEY], now),
                Err(VerifyError::BadSignature),
                "tampering {} went unnoticed",
                headers[i].0
            );
        }
        // Adding a delegation that was not signed.
        let mut added = headers.clone();
        added.push((DELEGATION.into(), "agent=x;human=y".into()));
        assert_eq!(verify(added, &[KEY], now), Err(VerifyError::BadSignature));
        // A bit flip in the signature.
        let mut flipped = headers.clone();
        let last = flipped.len() - 1;
        let sig = &mut flipped[last].1;
        let first = if sig.starts_with('0') { "1" } else { "0" };
        sig.replace_range(0..1, first);
        assert_eq!(verify(flipped, &[KEY], now), Err(VerifyError::BadSignature));
    }

    #[test]
    fn timestamps_outside_the_window_are_rejected() {
        let input = input();
        let headers = sign(&input, KEY);
        // What was signed is the timestamp truncated to the second.
        let ts = input.timestamp.replace_nanosecond(0).unwrap();
        assert_eq!(verify(headers.clone(), &[KEY], ts + MAX_AGE), Ok(()));
        assert_eq!(
            verify(headers.clone(), &[KEY], ts + MAX_AGE + Duration::seconds(1)),
            Err(VerifyError::TimestampOutOfRange)
        );
        assert_eq!(verify(headers.clone(), &[KEY], ts - MAX_SKEW), Ok(()));
        assert_eq!(
            verify(
                headers.clone(),
                &[KEY],
                ts - MAX_SKEW - Duration::seconds(1)
            ),
            Err(VerifyError::TimestampOutOfRange)
        );
    }

    #[test]
    fn missing_or_malformed_headers_are_errors() {
        let input = input();
        let headers = sign(&input, KEY);
        let now = input.timestamp;
        let without = |name: &str| -> Vec<(String, String)> {
            headers.iter().filter(|(n, _)| n != name).cloned().collect()
        };
        assert_eq!(
            verify(without(SIGNATURE), &[KEY], now),
            Err(VerifyError::MissingSignature)
        );
        assert_eq!(
            verify(without(SENDER), &[KEY], now),
            Err(VerifyError::MissingHeader(SENDER))
        );
        let mut bad_ts = headers.clone();
        bad_ts[4].1 = "yesterday".into();
        assert_eq!(verify(bad_ts, &[KEY], now), Err(VerifyError::BadTimestamp));
        let mut bad_hex = headers.clone();
        let last = bad_hex.len() - 1;
        bad_hex[last].1 = "zz".into();
        assert_eq!(verify(bad_hex, &[KEY], now), Err(VerifyError::BadSignature));
    }

    proptest::proptest! {
        #[test]
        fn any_values_round_trip(
            verified: bool,
            sender in ".{0,64}",
            domain_check in ".{0,64}",
            message_id in ".{0,40}",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            delegation in proptest::option::of(".{0,40}"),
            secs in 0i64..4_000_000_000,
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            let input = AuthHeaderInput {
                verified,
                sender,
                domain_check,
                timestamp: OffsetDateTime::from_unix_timestamp(secs).unwrap(),
                message_id,
                body_sha256: body_sha256(&body),
                delegation,
            };
            let headers = sign(&input, &key);
            proptest::prop_assert!(headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])));
            proptest::prop_assert_eq!(verify(&headers, &[&key], input.timestamp), Ok(()));
        }
    }

    #[test]
    fn crlf_in_values_cannot_inject_headers() {
        let mut input = input();
        input.sender = "evil@example.com\r\nX-E2A-Auth-Verified: true".into();
        let headers = sign(&input, KEY);
        assert!(headers.iter().all(|(_, v)| !v.contains(['\r', '\n'])));
        assert_eq!(verify(headers, &[KEY], input.timestamp), Ok(()));
    }
}
