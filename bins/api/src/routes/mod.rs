//! The HTTP routes and the layers around them.

pub mod account;
pub mod agents;
pub mod conversations;
pub mod cursor;
pub mod domains;
pub mod events;
pub mod health;
pub mod hitl;
pub mod info;
pub mod magic;
pub mod messages;
pub mod outbound;
pub mod reviews;
pub mod signing_secrets;
pub mod webhook_deliveries;
pub mod webhooks;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::StatusCode,
    middleware::{from_fn, from_fn_with_state},
    routing::{get, patch, post},
};
use tower_http::{catch_panic::CatchPanicLayer, limit::RequestBodyLimitLayer};

use crate::{AppState, Config, error::ApiError, ratelimit};

/// All routes with their middleware. Unknown paths answer 404 and wrong
/// methods 405, both with the JSON error body.
pub fn router(state: AppState, config: &Config) -> Router {
    Router::new()
        .route("/api/health", get(health::health).head(health::health))
        .route("/v1/info", get(info::get_info))
        // The notification mail's links: GET shows, POST acts.
        .route(
            "/api/v1/approve",
            get(magic::approve_page).post(magic::approve),
        )
        .route(
            "/api/v1/reject",
            get(magic::reject_page).post(magic::reject),
        )
        .route("/v1/account", get(account::get_account))
        .route("/v1/domains", get(domains::list).post(domains::create))
        .route(
            "/v1/domains/{domain}",
            get(domains::get)
                .patch(domains::update)
                .delete(domains::delete),
        )
        .route("/v1/domains/{domain}/verify", post(domains::verify))
        .route(
            "/v1/agents",
            post(agents::create)
                .layer(from_fn_with_state(
                    state.clone(),
                    ratelimit::agent_create_limit,
                ))
                .get(agents::list),
        )
        .route(
            "/v1/agents/{address}",
            get(agents::get)
                .patch(agents::update)
                .delete(agents::delete),
        )
        .route(
            "/api/v1/users/me/signing-secrets",
            get(signing_secrets::list).post(signing_secrets::create),
        )
        .route(
            "/api/v1/users/me/signing-secrets/{id}",
            axum::routing::delete(signing_secrets::delete),
        )
        .route("/v1/webhooks/{id}/rotate-secret", post(webhooks::rotate))
        .route("/v1/webhooks/{id}/test", post(webhook_deliveries::test))
        .route("/v1/events", get(events::list))
        .route("/v1/events/{id}", get(events::get))
        .route("/v1/events/{id}/redeliver", post(events::redeliver))
        .merge(poll_limited(state.clone()))
        // Every route but the send routes keeps the small body limit.
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes as usize))
        .merge(sending(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Innermost first: a panic becomes a 500, a request past the
        // deadline a 503 `timeout`, over-long bodies a 413; request_context
        // (outermost) gives all of them the JSON error body and a request id.
        // (Requests shed for load never get here: see middleware::overloaded.)
        .layer(CatchPanicLayer::new())
        .layer(from_fn_with_state(
            config.request_timeout(),
            crate::middleware::deadline,
        ))
        .layer(from_fn(crate::middleware::request_context))
}

/// The send routes: bodies up to [`outbound::MAX_SEND_BODY_BYTES`], at
/// most `E2A_HTTP_MAX_CONCURRENT_SENDS` in progress per replica
/// ([`crate::middleware::send_slot`], taken before the body is read).
fn sending(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/agents/{address}/messages", post(outbound::send))
        .route(
            "/v1/agents/{address}/messages/{id}/reply",
            post(outbound::reply),
        )
        .route(
            "/v1/agents/{address}/messages/{id}/forward",
            post(outbound::forward),
        )
        .route("/v1/agents/{address}/test", post(outbound::test))
        // An approval may carry edited bodies and attachments.
        .route(
            "/v1/agents/{address}/messages/{id}/approve",
            post(hitl::approve),
        )
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(outbound::MAX_SEND_BODY_BYTES))
        .layer(from_fn_with_state(state, crate::middleware::send_slot))
}

/// The poll-limited reads (spec §5.3): an agent's messages and
/// conversations, listed or fetched, webhooks, listed or fetched, and a
/// webhook's delivery log. (The events API is not poll-limited, as in the
/// original.) The
/// label update and the webhook writes share those paths but are not
/// polls, so they are routed around the limit.
///
/// The reviewer's views (`GET /api/v1/pending`, `GET /api/v1/messages/{id}`)
/// are limited too, although the original did not limit them: they are
/// polled the same way (a review screen refreshing, an agent waiting for
/// its draft's decision), and they are the most expensive reads there are
/// — a page of up to 100 drafts, a detail with up to 25 MiB of held body
/// and attachments. They share the caller's one poll budget.
fn poll_limited(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/pending", get(reviews::pending))
        .route("/api/v1/messages/{id}", get(reviews::get))
        .route("/v1/agents/{address}/messages", get(messages::list))
        .route("/v1/agents/{address}/messages/{id}", get(messages::get))
        .route(
            "/v1/agents/{address}/conversations",
            get(conversations::list),
        )
        .route(
            "/v1/agents/{address}/conversations/{id}",
            get(conversations::get),
        )
        .route("/v1/webhooks", get(webhooks::list))
        .route("/v1/webhooks/{id}", get(webhooks::get))
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(webhook_deliveries::list),
        )
        .route_layer(from_fn_with_state(state, ratelimit::poll_limit))
        .route("/v1/webhooks", post(webhooks::create))
        .route(
            "/v1/webhooks/{id}",
            patch(webhooks::update).delete(webhooks::delete),
        )
        .route(
            "/v1/agents/{address}/messages/{id}",
            patch(messages::update_labels),
        )
        .route(
            "/api/v1/agents/{address}/messages/{id}",
            patch(messages::update_labels),
        )
        .route(
            "/v1/agents/{address}/messages/{id}/reject",
            post(hitl::reject),
        )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
