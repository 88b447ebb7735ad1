//! Request extraction that fails with the contract's JSON error body
//! instead of axum's plain-text rejections, plus the small parsing helpers
//! the `/v1` handlers share (query strings, timestamps).
//!
//! * [`ApiJson`]: wrong or missing `Content-Type` → 415
//!   `unsupported_media_type`; a body over the limit → 413
//!   `payload_too_large`; malformed JSON, wrong types and unknown fields
//!   (request types use `deny_unknown_fields` where the contract says
//!   `additionalProperties: false`) → 400 `invalid_request`.
//! * [`ApiPath`]: an undecodable path segment → 404 `not_found` (a path
//!   names a resource; one that cannot even be decoded does not exist).

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Path, Request, rejection::JsonRejection},
    http::{StatusCode, request::Parts},
};
use serde::de::DeserializeOwned;
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

use crate::error::ApiError;

/// A JSON request body whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

/// A JSON request body that may also be absent: an empty body (with or
/// without a `Content-Type`) is `T::default()`; anything else is read
/// exactly like [`ApiJson`] (same errors). For operations whose every
/// field is optional (`POST /v1/events/{id}/redeliver`, `POST
/// /v1/webhooks/{id}/test`): a client need not send `{}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJsonOrEmpty<T>(pub T);

impl<T, S> FromRequest<S> for ApiJsonOrEmpty<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        // The body limit layer caps what this can read.
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|_| payload_too_large())?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrEmpty(T::default()));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        let ApiJson(value) = ApiJson::<T>::from_request(req, state).await?;
        Ok(ApiJsonOrEmpty(value))
    }
}

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "request body is too large",
    )
}

/// Maps axum's JSON rejection to the contract's error codes.
pub fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        _ => ApiError::bad_request("invalid_request", rejection.body_text()),
    }
}

/// Path parameters whose rejections are 404 `not_found`.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(_) => Err(ApiError::not_found("resource")),
        }
    }
}

/// Decodes an `application/x-www-form-urlencoded` query string into its
/// pairs, in order (repeated keys are kept). `None` when a pair is not
/// valid percent-encoded UTF-8.
pub fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A timestamp as the contract prints it: RFC 3339, UTC, whole seconds
/// (`2026-05-01T12:00:00Z`); empty for an instant UTC cannot represent
/// (never one read from the database or parsed by [`parse_rfc3339`]).
pub fn rfc3339_seconds(t: OffsetDateTime) -> String {
    let Some(t) = t.checked_to_offset(UtcOffset::UTC) else {
        return String::new();
    };
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Parses an RFC 3339 timestamp from a request and returns it in UTC.
///
/// `None` also for an instant that has no RFC 3339 form in UTC: the offset
/// can carry a valid local time out of the years 0000–9999
/// (`9999-12-31T23:59:59-01:00` is in year 10000 in UTC). Such a value used
/// to reach the UTC conversion of the database driver and panic (a 500);
/// every timestamp this returns converts, formats and binds safely.
pub fn parse_rfc3339(s: &str) -> Option<OffsetDateTime> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let utc = t.checked_to_offset(UtcOffset::UTC)?;
    (0..=9999).contains(&utc.year()).then_some(utc)
}

/// 400 `invalid_filter`: a list query the route cannot serve.
pub fn invalid_filter(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_filter", message)
}

/// The `since`/`until` filters of a list query: each absent or an RFC 3339
/// timestamp, and `since` strictly before `until`. 400 `invalid_filter`
/// otherwise.
pub fn time_window(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(Option<OffsetDateTime>, Option<OffsetDateTime>), ApiError> {
    let time = |k: &str, v: Option<&str>| {
        v.map(|v| {
            parse_rfc3339(v)
                .ok_or_else(|| invalid_filter(format!("{k} must be an RFC 3339 timestamp")))
        })
        .transpose()
    };
    let (since, until) = (time("since", since)?, time("until", until)?);
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(invalid_filter("since must be before until"));
    }
    Ok((since, until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_decode_and_keep_repeats() {
        assert_eq!(
            query_pairs("labels=a&labels=b%3Ac&from=x+y%40z&&empty").unwrap(),
            vec![
                ("labels".into(), "a".into()),
                ("labels".into(), "b:c".into()),
                ("from".into(), "x y@z".into()),
                ("empty".into(), String::new()),
            ]
        );
        assert!(query_pairs("a=%zz").is_none());
        assert!(query_pairs("a=%e").is_none());
        assert!(query_pairs("a=%ff").is_none(), "not UTF-8");
    }

    #[test]
    fn timestamps_print_in_utc_seconds() {
        let t = parse_rfc3339("2026-05-01T14:00:00.123456+02:00").unwrap();
        assert_eq!(rfc3339_seconds(t), "2026-05-01T12:00:00Z");
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn timestamps_outside_utc_years_0_to_9999_are_refused() {
        for bad in [
            "9999-12-31T23:59:59-01:00",
            "9999-12-31T23:00:00.5-23:59",
            "0000-01-01T00:00:00+00:01",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
        let edge = parse_rfc3339("9999-12-31T23:59:59.999999999+00:00").unwrap();
        assert_eq!(rfc3339_seconds(edge), "9999-12-31T23:59:59Z");
        let shifted = parse_rfc3339("0000-01-01T00:00:00-01:00").unwrap();
        assert_eq!(shifted.offset(), UtcOffset::UTC);
        assert_eq!(rfc3339_seconds(shifted), "0000-01-01T01:00:00Z");
        let err = time_window(None, Some("9999-12-31T23:59:59-01:00")).unwrap_err();
        assert_eq!(err.code, "invalid_filter");
    }
}
