//! A legacy per-agent push (spec §3.5, §4.2) as one ready request.
//!
//! The deliverer claims a `webhook_deliveries` row (the store's
//! `deliveries::claim_legacy`), fills a [`LegacyPayload`] from it, builds a
//! [`LegacyRequest`] with [`LegacyRequest::new`] and sends it with
//! [`WebhookClient::send_legacy_request`](crate::WebhookClient::send_legacy_request)
//! (or [`WebhookClient::post`](crate::WebhookClient::post) with its parts),
//! with no transaction open.
//!
//! On the wire (§4.2):
//! * `POST` to the agent's `webhook_url`;
//! * `Content-Type: application/json`, `User-Agent: e2a-webhooks/1`,
//!   `X-E2A-Deprecation` and `Sunset` verbatim from the original, and every
//!   stored `X-E2A-Auth-*` header with its value verbatim — the same map
//!   that is the body's `auth_headers`, so headers and body cannot disagree;
//! * **no signature** of its own (no `X-E2A-Signature`): the
//!   `X-E2A-Auth-Signature` among the auth headers covers the verdicts;
//! * the body of [`LegacyPayload`]: `message_id`, `conversation_id`,
//!   `from`, `to` (may be `null`), `cc`, `reply_to`, `recipient`,
//!   `raw_message` (standard base64 with padding), `auth_headers`,
//!   `received_at` (RFC 3339 UTC with nanoseconds, Go's `RFC3339Nano`);
//!   empty optional fields left out.

use reqwest::header::HeaderMap;

use crate::body::{Body, LegacyPayload};
use crate::headers::{HeaderError, legacy_headers};

/// The headers and body of one legacy push, ready for
/// [`WebhookClient::post`](crate::WebhookClient::post). Building it is
/// pure (no I/O); the same request may be sent again on a retry, though the
/// deliverer rebuilds it from the claimed row each time.
#[derive(Debug, Clone)]
pub struct LegacyRequest {
    headers: HeaderMap,
    body: Body,
}

impl LegacyRequest {
    /// The request for `payload`: the §4.2 body, and its headers with every
    /// entry of `payload.auth_headers` as a header.
    ///
    /// Fails — and nothing should be sent; record a permanent failure —
    /// when a stored auth header could not be sent safely: a name outside
    /// the `X-E2A-Auth-` family or not an HTTP token, or a value with CR,
    /// LF, NUL or another control character ([`HeaderError`]).
    pub fn new(payload: &LegacyPayload<'_>) -> Result<Self, HeaderError> {
        let headers = legacy_headers(
            payload
                .auth_headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        )?;
        Ok(Self {
            headers,
            body: Body::from_legacy(payload),
        })
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The JSON body.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// Headers and body, for [`WebhookClient::post`](crate::WebhookClient::post).
    pub fn into_parts(self) -> (HeaderMap, Body) {
        (self.headers, self.body)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::{Value, json};

    use super::*;
    use crate::headers::{DEPRECATION_VALUE, SUNSET_VALUE};
    use crate::signature::SIGNATURE_HEADER;

    fn auth() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("X-E2A-Auth-Verified".to_owned(), "true".to_owned()),
            (
                "X-E2A-Auth-Domain-Check".to_owned(),
                "spf=pass; dkim=none".to_owned(),
            ),
            ("X-E2A-Auth-Signature".to_owned(), "ab12".to_owned()),
        ])
    }

    #[test]
    fn headers_are_the_spec_set_plus_every_auth_header_and_no_signature() {
        let auth = auth();
        let to = ["bot@agents.example".to_owned()];
        let payload = LegacyPayload {
            message_id: "msg_1",
            conversation_id: "cnv_1",
            from: "a@example.com",
            to: Some(&to),
            cc: &[],
            reply_to: &[],
            recipient: "bot@agents.example",
            raw_message: b"x",
            auth_headers: &auth,
            received_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        let req = LegacyRequest::new(&payload).unwrap();
        let h = req.headers();
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "content-type",
                "sunset",
                "user-agent",
                "x-e2a-auth-domain-check",
                "x-e2a-auth-signature",
                "x-e2a-auth-verified",
                "x-e2a-deprecation",
            ]
        );
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(
            h["x-e2a-deprecation"],
            "agent_identities.webhook_url is deprecated; use /api/v1/webhooks. Sunset target: 2026-12-01."
        );
        assert_eq!(h["x-e2a-deprecation"], DEPRECATION_VALUE);
        assert_eq!(h["sunset"], "Tue, 01 Dec 2026 00:00:00 GMT");
        assert_eq!(h["sunset"], SUNSET_VALUE);
        assert_eq!(h["x-e2a-auth-domain-check"], "spf=pass; dkim=none");
        assert_eq!(h["x-e2a-auth-signature"], "ab12");
        assert!(!h.contains_key(SIGNATURE_HEADER));
        // The body carries the same auth headers.
        let body: Value = serde_json::from_slice(req.body().as_bytes()).unwrap();
        assert_eq!(
            body["auth_headers"],
            json!({
                "X-E2A-Auth-Domain-Check": "spf=pass; dkim=none",
                "X-E2A-Auth-Signature": "ab12",
                "X-E2A-Auth-Verified": "true",
            })
        );
        let (headers, body_again) = req.clone().into_parts();
        assert_eq!(&headers, req.headers());
        assert_eq!(&body_again, req.body());
    }

    #[test]
    fn body_is_the_spec_shape() {
        let auth = auth();
        let raw = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\xff\r\n";
        let to = ["bot@agents.example".to_owned(), "c@example.org".to_owned()];
        let cc = ["d@example.org".to_owned()];
        let reply_to = ["r@example.com".to_owned()];
        let at = time::macros::datetime!(2026-03-04 05:06:07.000123400 UTC);
        let payload = LegacyPayload {
            message_id: "msg_0123",
            conversation_id: "cnv_0456",
            from: "r@example.com",
            to: Some(&to),
            cc: &cc,
            reply_to: &reply_to,
            recipient: "bot@agents.example",
            raw_message: raw,
            auth_headers: &auth,
            received_at: at,
        };
        let req = LegacyRequest::new(&payload).unwrap();
        let body: Value = serde_json::from_slice(req.body().as_bytes()).unwrap();
        assert_eq!(
            body,
            json!({
                "message_id": "msg_0123",
                "conversation_id": "cnv_0456",
                "from": "r@example.com",
                "to": ["bot@agents.example", "c@example.org"],
                "cc": ["d@example.org"],
                "reply_to": ["r@example.com"],
                "recipient": "bot@agents.example",
                "raw_message": "RnJvbTogYUBleGFtcGxlLmNvbQ0KU3ViamVjdDogaGkNCg0KaGVsbG//DQo=",
                "auth_headers": {
                    "X-E2A-Auth-Domain-Check": "spf=pass; dkim=none",
                    "X-E2A-Auth-Signature": "ab12",
                    "X-E2A-Auth-Verified": "true",
                },
                "received_at": "2026-03-04T05:06:07.0001234Z",
            })
        );
        use base64::Engine as _;
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(body["raw_message"].as_str().unwrap())
                .unwrap(),
            raw
        );

        // Empty optional fields are left out; a missing To list is null.
        let bare = LegacyPayload {
            message_id: "",
            conversation_id: "",
            to: None,
            cc: &[],
            reply_to: &[],
            ..payload
        };
        let body: Value =
            serde_json::from_slice(LegacyRequest::new(&bare).unwrap().body().as_bytes()).unwrap();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "auth_headers",
                "from",
                "raw_message",
                "received_at",
                "recipient",
                "to"
            ]
        );
        assert_eq!(body["to"], Value::Null);
    }

    #[test]
    fn an_unsendable_stored_header_refuses_the_request() {
        for (name, value, want) in [
            (
                "X-E2A-Auth-Verified",
                "true\r\nX-Injected: 1",
                HeaderError::InvalidValue("X-E2A-Auth-Verified".into()),
            ),
            (
                "Host",
                "internal.example",
                HeaderError::NotAuthHeader("Host".into()),
            ),
            (
                "X-E2A-Auth-A b",
                "v",
                HeaderError::InvalidName("X-E2A-Auth-A b".into()),
            ),
        ] {
            let auth = BTreeMap::from([(name.to_owned(), value.to_owned())]);
            let payload = LegacyPayload {
                message_id: "msg_1",
                conversation_id: "",
                from: "a@example.com",
                to: None,
                cc: &[],
                reply_to: &[],
                recipient: "bot@agents.example",
                raw_message: b"x",
                auth_headers: &auth,
                received_at: time::OffsetDateTime::UNIX_EPOCH,
            };
            assert_eq!(LegacyRequest::new(&payload).unwrap_err(), want, "{name:?}");
        }
    }
}
