//! The contract's error body and the one place store errors become HTTP
//! statuses.
//!
//! Every `/v1` error is `{"error": {"code", "message", "details"?,
//! "request_id"}}`. The request id comes from the request-id middleware via
//! a task-local, so handlers never thread it through by hand.
//!
//! Every `503` carries `Retry-After` ([`RETRY_AFTER_SECS`] unless the
//! response already names one): the database is down, refused our login
//! (a rotated password) or cancelled a statement for time. A store error
//! never becomes a `500` merely because the database is unreachable.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use e2a_store::StoreError;
use serde::Serialize;

/// `Retry-After` of a `503`, in seconds: long enough for a pool to open a
/// new connection or a statement to stop competing, short enough that a
/// client waiting it out does not notice a brief outage.
pub const RETRY_AFTER_SECS: u32 = 5;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The current request id, or an empty string outside a request.
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// An error answered to an API client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// Human-readable message (never contains secrets).
    pub message: String,
    /// Optional structured details.
    pub details: Option<serde_json::Value>,
    /// For 429s: the limit's decision, sent as `Retry-After` and
    /// `RateLimit-*` headers.
    pub rate_limit: Option<e2a_store::rate_limits::Decision>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
    request_id: String,
}

impl ApiError {
    /// An error with an explicit status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            rate_limit: None,
        }
    }

    /// 429 `rate_limited` for a refused request, with
    /// `details.retry_after_seconds` and the limit's headers.
    pub fn rate_limited(d: &e2a_store::rate_limits::Decision) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("rate limit exceeded; retry in {} s", d.retry_after_secs),
        )
        .with_details(serde_json::json!({ "retry_after_seconds": d.retry_after_secs }));
        e.rate_limit = Some(*d);
        e
    }

    /// 400 `bad_request`-style errors with a specific code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid API key",
        )
    }

    /// 404 `not_found` — also the answer for another tenant's resource.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 503 with `code` (and `Retry-After`): the database is unreachable,
    /// refused our login or cancelled the statement; the client should
    /// retry.
    pub fn unavailable(code: &'static str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "service temporarily unavailable; retry shortly",
        )
    }

    /// 500 `internal_error`; the cause is logged here, once, not sent.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %e2a_runtime::error_chain(cause), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// The default code for a status, as the original's framework chose it.
pub fn default_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "unprocessable_entity",
        429 => "rate_limited",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::not_found("resource"),
            StoreError::Conflict { what } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::LimitExceeded { what, limit } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "limit_exceeded",
                format!("your plan allows at most {limit} {what}"),
            )
            .with_details(serde_json::json!({ "resource": what, "limit": limit })),
            StoreError::HasDependents { what } => ApiError::bad_request(
                if what == "agents" {
                    "domain_has_agents"
                } else {
                    "has_dependents"
                },
                format!("still in use by {what}; delete them first"),
            ),
            StoreError::Invalid(msg) => ApiError::bad_request("invalid_request", msg),
            e @ StoreError::Unavailable(_) => {
                tracing::warn!(error = %e2a_runtime::error_chain(&e), "database unavailable");
                ApiError::unavailable("service_unavailable")
            }
            e @ StoreError::Database(_) => ApiError::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope {
            error: Body {
                code: self.code,
                message: &self.message,
                details: self.details.as_ref(),
                request_id: current_request_id(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(d) = &self.rate_limit {
            crate::ratelimit::set_headers(response.headers_mut(), d);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="e2a""#),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        // Any error that says when to come back (a cooldown, a limit) says
        // it in the header too, for clients that only read headers.
        if let Some(secs) = self
            .details
            .as_ref()
            .and_then(|d| d.get("retry_after_seconds"))
            .and_then(serde_json::Value::as_u64)
        {
            response
                .headers_mut()
                .entry(header::RETRY_AFTER)
                .or_insert(HeaderValue::from(secs));
        }
        response
    }
}
