//! What one delivery attempt came to, classified for the retry decision.
//!
//! | kind | status | retryable |
//! |---|---|---|
//! | [`Success`](OutcomeKind::Success) | 200–299 | – |
//! | [`Redirect`](OutcomeKind::Redirect) | 300–399 (never followed) | no |
//! | [`ClientError`](OutcomeKind::ClientError) | 400–499 | only 408, 425, 429 |
//! | [`ServerError`](OutcomeKind::ServerError) | 500–599 (and any other code) | yes |
//! | [`Timeout`](OutcomeKind::Timeout) | 0 | yes |
//! | [`Connect`](OutcomeKind::Connect) | 0 (DNS, refused, reset, TLS, closed early) | yes |
//! | [`Blocked`](OutcomeKind::Blocked) | 0 (URL or every resolved address refused by policy; nothing sent) | no |
//! | [`Invalid`](OutcomeKind::Invalid) | 0 (a stored header cannot be sent; nothing sent) | no |
//!
//! A 3xx is a failure: a redirect target would bypass the address policy,
//! and retrying the same URL gets the same answer. A 4xx is the receiver
//! refusing this request (conventions rule 9), except 408 Request Timeout,
//! 425 Too Early and 429 Too Many Requests, which ask to come back later.

use std::time::Duration;

/// The class of an attempt's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// 2xx.
    Success,
    /// 3xx, not followed.
    Redirect,
    /// 4xx.
    ClientError,
    /// 5xx, or a status outside 200–499.
    ServerError,
    /// No response within the timeout (connect or total).
    Timeout,
    /// No response: DNS failure, connection refused or reset, TLS failure,
    /// connection closed before a response.
    Connect,
    /// Refused by the destination policy before anything was sent.
    Blocked,
    /// The request could not be built from what is stored.
    Invalid,
}

impl OutcomeKind {
    /// The class of an HTTP status code.
    pub fn from_status(status: u16) -> Self {
        match status {
            200..=299 => Self::Success,
            300..=399 => Self::Redirect,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    /// Short lowercase name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Redirect => "redirect",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Blocked => "blocked",
            Self::Invalid => "invalid",
        }
    }
}

/// Whether a failed attempt with this HTTP status is worth repeating.
pub fn status_is_retryable(status: u16) -> bool {
    match OutcomeKind::from_status(status) {
        OutcomeKind::Success | OutcomeKind::Redirect => false,
        OutcomeKind::ClientError => matches!(status, 408 | 425 | 429),
        _ => true,
    }
}

/// Longest [`Outcome::error`] text, in bytes.
pub const MAX_ERROR_LEN: usize = 200;

/// The result of one attempt: everything the deliverer records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The class.
    pub kind: OutcomeKind,
    /// The HTTP status, or 0 when no response was received (the original's
    /// `last_status_code` convention).
    pub status: u16,
    /// Empty on success, else a short text (at most [`MAX_ERROR_LEN`]
    /// bytes) for `last_error`: `HTTP 503`, `timeout: …`, `connect: …`,
    /// `blocked: …`. Never contains the URL (its path or query may hold a
    /// receiver's token), a secret, or the response body.
    pub error: String,
    /// Whether another attempt could succeed (see the module table).
    pub retryable: bool,
    /// The response's `Retry-After`, parsed and not yet clamped (the
    /// [`RetrySchedule`](crate::RetrySchedule) clamps it).
    pub retry_after: Option<Duration>,
    /// Wall time of the attempt, including reading the response body.
    pub elapsed: Duration,
    /// True when the response body was longer than the read cap and the
    /// connection was dropped instead of read to the end.
    pub body_truncated: bool,
}

impl Outcome {
    /// True for a 2xx.
    pub fn is_success(&self) -> bool {
        self.kind == OutcomeKind::Success
    }

    /// The outcome of a received response.
    pub fn from_status(
        status: u16,
        retry_after: Option<Duration>,
        elapsed: Duration,
        body_truncated: bool,
    ) -> Self {
        let kind = OutcomeKind::from_status(status);
        let error = match kind {
            OutcomeKind::Success => String::new(),
            OutcomeKind::Redirect => format!("HTTP {status} (redirects are not followed)"),
            _ => format!("HTTP {status}"),
        };
        Self {
            kind,
            status,
            error,
            retryable: status_is_retryable(status),
            retry_after,
            elapsed,
            body_truncated,
        }
    }

    /// An attempt that got no response.
    pub(crate) fn no_response(kind: OutcomeKind, error: String, elapsed: Duration) -> Self {
        let retryable = matches!(kind, OutcomeKind::Timeout | OutcomeKind::Connect);
        Self {
            kind,
            status: 0,
            error: truncate(error),
            retryable,
            retry_after: None,
            elapsed,
            body_truncated: false,
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let o = |s| Outcome::from_status(s, None, Duration::ZERO, false);
        assert!(o(200).is_success() && o(204).is_success() && o(299).is_success());
        assert_eq!(o(200).error, "");
        assert_eq!(o(301).kind, OutcomeKind::Redirect);
        assert!(!o(302).retryable);
        assert_eq!(o(307).error, "HTTP 307 (redirects are not followed)");
        assert_eq!(o(400).kind, OutcomeKind::ClientError);
        assert!(!o(400).retryable && !o(401).retryable && !o(404).retryable && !o(410).retryable);
        assert!(o(408).retryable && o(425).retryable && o(429).retryable);
        assert_eq!(o(503).kind, OutcomeKind::ServerError);
        assert_eq!(o(503).error, "HTTP 503");
        assert!(o(500).retryable && o(502).retryable && o(503).retryable);
        assert_eq!(o(600).kind, OutcomeKind::ServerError);
    }

    #[test]
    fn error_text_is_bounded() {
        let o = Outcome::no_response(OutcomeKind::Connect, "é".repeat(300), Duration::ZERO);
        assert!(o.error.len() <= MAX_ERROR_LEN);
        assert!(o.retryable);
        assert_eq!(o.status, 0);
        let b = Outcome::no_response(OutcomeKind::Blocked, "x".into(), Duration::ZERO);
        assert!(!b.retryable);
    }
}
