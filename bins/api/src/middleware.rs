//! Cross-cutting HTTP behaviour: request ids (`X-Request-Id` echoed or
//! minted as `req_` + 24 hex), `X-Content-Type-Options: nosniff`, one access
//! log line and request metrics per request, the request deadline, and the
//! answer to a request shed by the server. Only the method, the matched
//! route template and the status are logged — never headers, query strings
//! or bodies (they may carry keys or mail).

use std::time::{Duration, Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::Response,
};

use axum::response::IntoResponse;

use crate::error::{ApiError, REQUEST_ID, default_code};

/// The request-id header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn acceptable_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

/// The method as a bounded label: an arbitrary extension method (any token
/// is a valid HTTP method) must not mint a new metrics series per request.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The client's `X-Request-Id` when it is sane, else a fresh `req_` id.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&X_REQUEST_ID)
        .and_then(acceptable_request_id)
        .unwrap_or_else(|| format!("req_{}", e2a_store::secret::random_hex::<12>()))
}

/// Assigns the request id, runs the request inside its task-local scope and
/// decorates the response.
pub async fn request_context(req: Request, next: Next) -> Response {
    let request_id = request_id(req.headers());
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!("http", request.id = %request_id, %method, %route, user.id = tracing::field::Empty);
    let started = Instant::now();
    let mut response = {
        use tracing::Instrument;
        let work = async move { json_errors(next.run(req).await) };
        REQUEST_ID
            .scope(request_id.clone(), work)
            .instrument(span.clone())
            .await
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::info!(
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    });
    metrics::counter!("e2a_http_requests_total", "service" => "api", "method" => method, "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!("e2a_http_request_duration_seconds", "service" => "api", "route" => route)
        .record(elapsed.as_secs_f64());
    decorate(&mut response, &request_id);
    response
}

/// The headers every response carries.
fn decorate(response: &mut Response, request_id: &str) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// `Retry-After` (seconds) of a request that ran out of time.
pub const TIMEOUT_RETRY_AFTER_SECS: u32 = 1;

/// The request deadline (`E2A_HTTP_REQUEST_TIMEOUT_SECS`): a request the
/// server has not answered in time is answered 503 `timeout` with
/// `Retry-After`: the server, not the client, was too slow (408 would tell
/// the client its request was incomplete). The handler is dropped, which
/// cancels its database work. Runs inside [`request_context`], so the body
/// carries the request id.
pub async fn deadline(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                timeout_secs = timeout.as_secs(),
                "request exceeded the request timeout"
            );
            let mut response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request was not completed within {}s; retry shortly",
                    timeout.as_secs()
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(TIMEOUT_RETRY_AFTER_SECS),
            );
            response
        }
    }
}

/// The answer to a request the server sheds because too many are in flight
/// (`E2A_HTTP_MAX_IN_FLIGHT`): 503 `overloaded` with the contract's body and
/// headers. The server adds `Retry-After`. Shed requests never reach
/// [`request_context`], so they are neither logged nor counted per route;
/// `e2a_http_requests_shed_total` counts them.
pub fn overloaded(headers: &HeaderMap) -> Response {
    let request_id = request_id(headers);
    let mut response = REQUEST_ID.sync_scope(request_id.clone(), || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server is handling too many requests; retry shortly",
        )
        .into_response()
    });
    decorate(&mut response, &request_id);
    response
}

/// Gives framework-generated errors (body limit 413, panic 500, unmatched
/// method 405, …) the contract's JSON error body; a `503` gets
/// `Retry-After` from [`ApiError`] unless it named its own. An error a
/// handler rendered as an HTML page (the magic-link refusals of
/// [`crate::magic_pages`]: 400, 404, 409, 410) is kept as it is — the
/// framework never answers `text/html`.
fn json_errors(response: Response) -> Response {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let rendered =
        content_type.starts_with("application/json") || content_type.starts_with("text/html");
    if !(status.is_client_error() || status.is_server_error()) || rendered {
        return response;
    }
    let message = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase();
    let mut replaced = ApiError::new(status, default_code(status), message).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = response.headers().get(&name) {
            replaced.headers_mut().insert(name, v.clone());
        }
    }
    replaced
}

/// How long a send request waits for a free slot before it is shed.
pub const SEND_SLOT_WAIT: Duration = Duration::from_secs(5);

/// Admits a send request (bodies up to 25 MiB) only while fewer than
/// `E2A_HTTP_MAX_CONCURRENT_SENDS` are in progress on this replica, waiting
/// up to [`SEND_SLOT_WAIT`] for a slot; otherwise 503 `overloaded` with
/// `Retry-After`. The slot is taken before the body is read and held until
/// the response, so the memory large messages take is bounded by the slots
/// times the body limit (and the composed copy).
pub async fn send_slot(State(state): State<crate::AppState>, req: Request, next: Next) -> Response {
    let permit =
        tokio::time::timeout(SEND_SLOT_WAIT, state.send_slots.clone().acquire_owned()).await;
    match permit {
        Ok(Ok(permit)) => {
            let response = next.run(req).await;
            drop(permit);
            response
        }
        _ => {
            metrics::counter!("e2a_http_send_requests_shed_total").increment(1);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many messages are being sent right now; retry shortly",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn html_error_pages_are_kept_and_other_errors_become_json() {
        let page = crate::magic_pages::used();
        let kept = json_errors(page);
        assert_eq!(kept.status(), StatusCode::GONE);
        assert_eq!(
            kept.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(kept.headers()[header::REFERRER_POLICY], "no-referrer");

        let plain = (StatusCode::PAYLOAD_TOO_LARGE, "too big").into_response();
        let replaced = json_errors(plain);
        assert_eq!(replaced.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            replaced.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
    }
}
