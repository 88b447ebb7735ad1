//! The request body: the exact bytes that are both signed and sent.
//!
//! A [`Body`] is immutable and cheap to clone ([`Bytes`]); the client signs
//! `body.as_bytes()` and sends the same buffer, so what a receiver hashes is
//! what we hashed. Subscriber bodies are the stored event envelope (§4.1);
//! legacy per-agent bodies are a [`LegacyPayload`] (§4.2).

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;

/// A JSON body ready to sign and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body(Bytes);

/// A body that is not a JSON object.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not valid JSON.
    #[error("webhook body is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// Valid JSON, but not an object (`{…}`).
    #[error("webhook body is not a JSON object")]
    NotAnObject,
}

impl Body {
    /// Serialises a stored envelope (`webhook_subscriber_deliveries.
    /// event_payload` as read back, or an event rendered at delivery)
    /// compactly: no whitespace, keys in the order of the `serde_json::Map`
    /// (sorted, unless the `preserve_order` feature is on somewhere in the
    /// build). PostgreSQL `jsonb` does not keep the original bytes either;
    /// receivers verify the signature over what they receive, so only
    /// sign-what-you-send matters, and this type guarantees it.
    pub fn from_envelope(envelope: &serde_json::Value) -> Result<Self, BodyError> {
        if !envelope.is_object() {
            return Err(BodyError::NotAnObject);
        }
        serde_json::to_vec(envelope)
            .map(|v| Self(Bytes::from(v)))
            .map_err(BodyError::Json)
    }

    /// Takes already serialised envelope bytes verbatim after checking they
    /// are one JSON object (surrounding whitespace allowed).
    pub fn from_json_bytes(bytes: impl Into<Bytes>) -> Result<Self, BodyError> {
        let bytes = bytes.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(BodyError::Json)?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BodyError::NotAnObject);
        }
        Ok(Self(bytes))
    }

    /// The legacy per-agent push body (§4.2).
    pub fn from_legacy(payload: &LegacyPayload<'_>) -> Self {
        Self(Bytes::from(serde_json::to_vec(payload).expect(
            "LegacyPayload has only string keys and infallible fields",
        )))
    }

    /// The bytes sent and signed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes sent and signed, shared.
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a valid body; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The body of a legacy per-agent push (§4.2):
/// `{"message_id"?, "conversation_id"?, "from", "to", "cc"?, "reply_to"?,
/// "recipient", "raw_message", "auth_headers", "received_at"}` where `?`
/// fields are left out when empty, `to` may be `null`, `raw_message` is
/// standard base64 with padding, `auth_headers` keys are sorted and
/// `received_at` is RFC 3339 in UTC with the fraction's trailing zeros cut
/// (Go's `RFC3339Nano`).
#[derive(Debug, Clone, Serialize)]
pub struct LegacyPayload<'a> {
    /// The stored message id; left out when empty.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub message_id: &'a str,
    /// Left out when empty.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub conversation_id: &'a str,
    /// Sender address.
    pub from: &'a str,
    /// The parsed `To:` list; `None` is sent as `null`.
    pub to: Option<&'a [String]>,
    /// Left out when empty.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub cc: &'a [String],
    /// Left out when empty.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub reply_to: &'a [String],
    /// This delivery's agent address.
    pub recipient: &'a str,
    /// The raw MIME message.
    #[serde(serialize_with = "base64_std")]
    pub raw_message: &'a [u8],
    /// The stored `X-E2A-Auth-*` verdict headers.
    pub auth_headers: &'a BTreeMap<String, String>,
    /// When the message arrived.
    #[serde(serialize_with = "rfc3339_nano")]
    pub received_at: OffsetDateTime,
}

fn base64_std<S: serde::Serializer>(raw: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(raw))
}

fn rfc3339_nano<S: serde::Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339_nano(*at))
}

/// Go's `time.RFC3339Nano` of `at` in UTC: `2026-01-02T03:04:05.12Z`
/// (fraction only when non-zero, trailing zeros removed).
pub(crate) fn format_rfc3339_nano(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let mut out = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    let nanos = at.nanosecond();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_is_compact_and_exact() {
        let env =
            json!({"event": "email.received", "id": "evt_1", "data": {"b": 1, "a": [true, null]}});
        let body = Body::from_envelope(&env).unwrap();
        let text = std::str::from_utf8(body.as_bytes()).unwrap();
        assert!(!text.contains(' ') && !text.contains('\n'), "{text}");
        // Whatever the key order, the bytes parse back to the same value.
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(body.as_bytes()).unwrap(),
            env
        );
        assert!(matches!(
            Body::from_envelope(&json!([1])),
            Err(BodyError::NotAnObject)
        ));
    }

    #[test]
    fn raw_bytes_are_kept_verbatim() {
        let raw = &b" {\"event\" : \"x\"}\n"[..];
        assert_eq!(Body::from_json_bytes(raw).unwrap().as_bytes(), raw);
        assert!(matches!(
            Body::from_json_bytes(&b"[1]"[..]),
            Err(BodyError::NotAnObject)
        ));
        assert!(matches!(
            Body::from_json_bytes(&b"{"[..]),
            Err(BodyError::Json(_))
        ));
        assert!(matches!(
            Body::from_json_bytes(&b"{} {}"[..]),
            Err(BodyError::Json(_))
        ));
    }

    #[test]
    fn legacy_payload_shape() {
        let mut auth = BTreeMap::new();
        auth.insert("X-E2A-Auth-Verified".to_owned(), "true".to_owned());
        auth.insert("X-E2A-Auth-Body-Hash".to_owned(), "ab".to_owned());
        let at = time::macros::datetime!(2026-01-02 03:04:05.120 +01:00);
        let p = LegacyPayload {
            message_id: "msg_1",
            conversation_id: "",
            from: "a@example.com",
            to: None,
            cc: &[],
            reply_to: &["r@example.com".to_owned()],
            recipient: "bot@agents.example",
            raw_message: b"hi",
            auth_headers: &auth,
            received_at: at,
        };
        let body = Body::from_legacy(&p);
        assert_eq!(
            std::str::from_utf8(body.as_bytes()).unwrap(),
            r#"{"message_id":"msg_1","from":"a@example.com","to":null,"reply_to":["r@example.com"],"recipient":"bot@agents.example","raw_message":"aGk=","auth_headers":{"X-E2A-Auth-Body-Hash":"ab","X-E2A-Auth-Verified":"true"},"received_at":"2026-01-02T02:04:05.12Z"}"#
        );
    }

    #[test]
    fn rfc3339_nano_like_go() {
        use time::macros::datetime;
        assert_eq!(
            format_rfc3339_nano(datetime!(2026-01-02 03:04:05 UTC)),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(
            format_rfc3339_nano(datetime!(2026-01-02 03:04:05.000000001 UTC)),
            "2026-01-02T03:04:05.000000001Z"
        );
        assert_eq!(
            format_rfc3339_nano(datetime!(2026-01-02 03:04:05.5 UTC)),
            "2026-01-02T03:04:05.5Z"
        );
    }
}
