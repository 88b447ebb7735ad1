//! The request headers of both webhook kinds (spec §4.1, §4.2).
//!
//! Every name and value that ends up on the wire passes through
//! [`HeaderName`] / [`HeaderValue`] validation here, and values carrying CR,
//! LF or NUL are refused outright, so no stored string can inject a header
//! or split the request.

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};

use crate::signature::{SIGNATURE_HEADER, Secrets, sign};

/// `User-Agent` of every webhook request.
pub const USER_AGENT_VALUE: &str = "e2a-webhooks/1";
/// `Content-Type` of every webhook request.
pub const CONTENT_TYPE_VALUE: &str = "application/json";
/// The deprecation notice on legacy per-agent pushes (§4.2), verbatim.
pub const DEPRECATION_HEADER: &str = "X-E2A-Deprecation";
/// Value of [`DEPRECATION_HEADER`], verbatim from the original.
pub const DEPRECATION_VALUE: &str =
    "agent_identities.webhook_url is deprecated; use /api/v1/webhooks. Sunset target: 2026-12-01.";
/// RFC 8594 `Sunset` header on legacy pushes.
pub const SUNSET_HEADER: &str = "Sunset";
/// Value of [`SUNSET_HEADER`], verbatim from the original.
pub const SUNSET_VALUE: &str = "Tue, 01 Dec 2026 00:00:00 GMT";
/// Prefix (case-insensitive) of the stored verdict headers forwarded on
/// legacy pushes.
pub const AUTH_HEADER_PREFIX: &str = "X-E2A-Auth-";

/// A stored header that may not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The name does not start with [`AUTH_HEADER_PREFIX`] (or is only it).
    #[error("header {0:?} is not an X-E2A-Auth-* header")]
    NotAuthHeader(String),
    /// The name is not an HTTP token.
    #[error("header name {0:?} is not a valid HTTP header name")]
    InvalidName(String),
    /// The value holds CR, LF, NUL or another byte HTTP forbids.
    #[error("value of header {0:?} contains a forbidden character (CR, LF or a control)")]
    InvalidValue(String),
}

fn base() -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(8);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_VALUE));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    headers
}

/// The headers of a subscriber POST (§4.1): `Content-Type`, `User-Agent`
/// and `X-E2A-Signature` over `body` at `timestamp`.
pub fn subscriber_headers(secrets: &Secrets<'_>, timestamp: i64, body: &[u8]) -> HeaderMap {
    let mut headers = base();
    let signature = sign(secrets, timestamp, body);
    let value = HeaderValue::try_from(signature)
        .expect("a signature is `t=`, digits, `,v1=` and hex: always a valid header value");
    headers.insert(HeaderName::from_static("x-e2a-signature"), value);
    debug_assert!(headers.contains_key(SIGNATURE_HEADER));
    headers
}

/// The headers of a legacy per-agent push (§4.2): `Content-Type`,
/// `User-Agent`, `X-E2A-Deprecation`, `Sunset`, and every stored
/// `X-E2A-Auth-*` header with its value verbatim. The legacy push carries no
/// `X-E2A-Signature` of its own (the `X-E2A-Auth-Signature` covers the
/// verdicts).
///
/// Refuses (rather than skips) a name outside the `X-E2A-Auth-` family, a
/// name that is not an HTTP token, and a value with CR, LF, NUL or another
/// control character: nothing stored can add a header or split the request.
pub fn legacy_headers<'a>(
    auth_headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HeaderMap, HeaderError> {
    let mut headers = base();
    headers.insert(
        HeaderName::from_static("x-e2a-deprecation"),
        HeaderValue::from_static(DEPRECATION_VALUE),
    );
    headers.insert(
        HeaderName::from_static("sunset"),
        HeaderValue::from_static(SUNSET_VALUE),
    );
    for (name, value) in auth_headers {
        let is_auth = name.len() > AUTH_HEADER_PREFIX.len()
            && name.as_bytes()[..AUTH_HEADER_PREFIX.len()]
                .eq_ignore_ascii_case(AUTH_HEADER_PREFIX.as_bytes());
        if !is_auth {
            return Err(HeaderError::NotAuthHeader(name.to_owned()));
        }
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| HeaderError::InvalidName(name.to_owned()))?;
        if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(HeaderError::InvalidValue(name.to_owned()));
        }
        let header_value =
            HeaderValue::from_str(value).map_err(|_| HeaderError::InvalidValue(name.to_owned()))?;
        headers.insert(header_name, header_value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_headers_are_the_three() {
        let h = subscriber_headers(&Secrets::new("whsec_x"), 1, b"{}");
        assert_eq!(h.len(), 3);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["user-agent"], "e2a-webhooks/1");
        assert_eq!(
            h[SIGNATURE_HEADER],
            sign(&Secrets::new("whsec_x"), 1, b"{}")
        );
    }

    #[test]
    fn legacy_headers_verbatim() {
        let h = legacy_headers([
            ("X-E2A-Auth-Verified", "true"),
            ("X-E2A-Auth-Sender", "Ünï@example.com"),
            ("x-e2a-auth-domain-check", "spf=pass; dkim=none"),
        ])
        .unwrap();
        assert_eq!(
            h["x-e2a-deprecation"],
            "agent_identities.webhook_url is deprecated; use /api/v1/webhooks. Sunset target: 2026-12-01."
        );
        assert_eq!(h["sunset"], "Tue, 01 Dec 2026 00:00:00 GMT");
        assert_eq!(h["x-e2a-auth-verified"], "true");
        assert_eq!(
            h["x-e2a-auth-sender"].as_bytes(),
            "Ünï@example.com".as_bytes()
        );
        assert_eq!(h["x-e2a-auth-domain-check"], "spf=pass; dkim=none");
        assert!(!h.contains_key(SIGNATURE_HEADER));
    }

    #[test]
    fn header_injection_is_refused() {
        for value in [
            "true\r\nX-Injected: 1",
            "true\nX-Injected: 1",
            "true\r",
            "a\0b",
            "a\x07b",
        ] {
            assert_eq!(
                legacy_headers([("X-E2A-Auth-Verified", value)]),
                Err(HeaderError::InvalidValue("X-E2A-Auth-Verified".into())),
                "{value:?}"
            );
        }
        for name in [
            "X-E2A-Auth-A\r\nX-Injected",
            "X-E2A-Auth-A: b",
            "X-E2A-Auth-é",
        ] {
            assert_eq!(
                legacy_headers([(name, "v")]),
                Err(HeaderError::InvalidName(name.into())),
                "{name:?}"
            );
        }
        for name in [
            "Host",
            "X-E2A-Auth-",
            "X-E2A-Signature",
            "Transfer-Encoding",
        ] {
            assert_eq!(
                legacy_headers([(name, "v")]),
                Err(HeaderError::NotAuthHeader(name.into())),
                "{name:?}"
            );
        }
    }
}
