//! `/v1/webhooks`: the caller's account webhooks (spec §3.6, §3.7, §5.1;
//! contract operations listWebhooks, createWebhook, getWebhook,
//! updateWebhook, deleteWebhook, rotateWebhookSecret).
//!
//! * URLs are checked against the deployment's policy first
//!   ([`url_policy`]: `https://` to public hosts in production; `http://`
//!   and private or loopback hosts in development or with
//!   `E2A_ALLOW_PRIVATE_WEBHOOKS=1`), so an empty or refused URL is `400
//!   invalid_webhook_url` and nothing is stored (flaw 31). The rest —
//!   event types, filters, description, agent ownership, the cap and the
//!   cooldown — is the store's, in [`e2a_store::webhooks`].
//! * The signing secret is answered twice in a webhook's life: by the
//!   creation and by each rotation (both `Cache-Control: no-store`). Reads
//!   and lists never carry it, and no log line does.
//! * Another account's webhook is `404`, exactly like a missing one.

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use e2a_store::{
    account_limits, events,
    webhooks::{self, Filters, NewWebhook, Webhook, WebhookError, WebhookPatch},
};
use e2a_webhook::UrlPolicy;
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJson, ApiPath, rfc3339_seconds},
};

/// The URL policy of webhook registrations in this deployment:
/// `allow_http` outside production, `allow_private` outside production or
/// with `E2A_ALLOW_PRIVATE_WEBHOOKS=1`. Cloud-metadata addresses are
/// refused whatever the policy.
pub fn url_policy(state: &AppState) -> UrlPolicy {
    UrlPolicy {
        allow_http: !state.production,
        allow_private: !state.production || state.allow_private_webhooks,
    }
}

/// `WebhookFiltersView`: each list only when it constrains something.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiltersView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conversation_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<Vec<String>>,
}

impl From<FiltersView> for Filters {
    fn from(f: FiltersView) -> Self {
        Filters {
            agent_ids: f.agent_ids.unwrap_or_default(),
            conversation_ids: f.conversation_ids.unwrap_or_default(),
            labels: f.labels.unwrap_or_default(),
        }
    }
}

impl From<Filters> for FiltersView {
    fn from(f: Filters) -> Self {
        let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
        FiltersView {
            agent_ids: some(f.agent_ids),
            conversation_ids: some(f.conversation_ids),
            labels: some(f.labels),
        }
    }
}

/// `WebhookView`. `signing_secret` only in the creation's answer.
#[derive(Debug, Serialize)]
pub struct WebhookView {
    id: String,
    url: String,
    description: String,
    events: Vec<String>,
    filters: FiltersView,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_disabled_at: Option<String>,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_delivered_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_secret_expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
}

impl From<Webhook> for WebhookView {
    fn from(w: Webhook) -> Self {
        Self {
            id: w.id.to_string(),
            url: w.url,
            description: w.description,
            events: w.events,
            filters: w.filters.into(),
            enabled: w.enabled,
            auto_disabled_at: w.auto_disabled_at.map(rfc3339_seconds),
            created_at: rfc3339_seconds(w.created_at),
            last_delivered_at: w.last_delivered_at.map(rfc3339_seconds),
            previous_secret_expires_at: w.previous_secret_expires_at.map(rfc3339_seconds),
            signing_secret: None,
        }
    }
}

/// `CreateWebhookRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    filters: Option<FiltersView>,
    #[serde(default)]
    description: Option<String>,
}

/// `UpdateWebhookRequest`: each field present replaces the stored value
/// (`filters` as a whole).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    filters: Option<FiltersView>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// `RotateSecretOutputBody`.
#[derive(Serialize)]
struct RotatedView {
    signing_secret: String,
    previous_secret_expires_at: String,
}

fn no_store(status: StatusCode, body: impl Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 400 `invalid_webhook_url` unless `url` passes the deployment's policy.
fn check_url(state: &AppState, url: &str) -> Result<(), ApiError> {
    if url.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_webhook_url",
            "url is required",
        ));
    }
    e2a_webhook::check_url(url, &url_policy(state))
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_webhook_url", e.to_string()))
}

fn webhook_error(e: WebhookError) -> ApiError {
    match e {
        WebhookError::NotFound => ApiError::not_found("webhook"),
        WebhookError::InvalidUrl(_) => ApiError::bad_request("invalid_webhook_url", e.to_string()),
        WebhookError::InvalidEventType(ref t) => {
            let details = serde_json::json!({ "event_type": t, "allowed": events::CATALOG });
            ApiError::bad_request("invalid_event_type", e.to_string()).with_details(details)
        }
        WebhookError::Invalid(_) => ApiError::bad_request("invalid_request", e.to_string()),
        WebhookError::CapReached { limit } => {
            ApiError::bad_request("webhook_cap_reached", e.to_string())
                .with_details(serde_json::json!({ "limit": limit }))
        }
        WebhookError::Cooldown { until } => {
            let wait = (until - time::OffsetDateTime::now_utc())
                .whole_seconds()
                .max(1);
            ApiError::new(StatusCode::CONFLICT, "webhook_cooldown", e.to_string()).with_details(
                serde_json::json!({
                    "retry_after_seconds": wait,
                    "reenable_at": rfc3339_seconds(until),
                }),
            )
        }
        WebhookError::Store(e) => e.into(),
    }
}

fn store_error(e: e2a_store::StoreError) -> ApiError {
    match e {
        e2a_store::StoreError::NotFound => ApiError::not_found("webhook"),
        other => other.into(),
    }
}

/// `GET /v1/webhooks`: `{webhooks: [...]}`, newest first, no secrets.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let client = state.store.client().await?;
    let hooks: Vec<WebhookView> = webhooks::list(&client, &caller.user_id)
        .await?
        .into_iter()
        .map(WebhookView::from)
        .collect();
    Ok(Json(serde_json::json!({ "webhooks": hooks })))
}

/// `POST /v1/webhooks`: 201 with the webhook and its `signing_secret`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    let url = req.url.unwrap_or_default();
    check_url(&state, &url)?;
    let new = NewWebhook {
        url,
        description: req.description.unwrap_or_default(),
        events: req.events.unwrap_or_default(),
        filters: req.filters.map(Filters::from).unwrap_or_default(),
    };
    let mut client = state.store.client().await?;
    let limits = account_limits::effective(&client, &caller.user_id, &state.default_limits).await?;
    let created = webhooks::create(&mut client, &caller.user_id, &new, limits.max_webhooks)
        .await
        .map_err(webhook_error)?;
    tracing::info!(webhook.id = %created.webhook.id, "webhook created");
    let mut view = WebhookView::from(created.webhook);
    view.signing_secret = Some(created.signing_secret);
    Ok(no_store(StatusCode::CREATED, view))
}

/// `GET /v1/webhooks/{id}`: the webhook, no secret.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<WebhookView>, ApiError> {
    let client = state.store.client().await?;
    let webhook = webhooks::get(&client, &caller.user_id, &id)
        .await
        .map_err(store_error)?;
    Ok(Json(webhook.into()))
}

/// `PATCH /v1/webhooks/{id}`: 200 with the updated webhook; 409
/// `webhook_cooldown` for a re-enable within 5 minutes of an auto-disable.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateRequest>,
) -> Result<Json<WebhookView>, ApiError> {
    if let Some(url) = &req.url {
        check_url(&state, url)?;
    }
    let patch = WebhookPatch {
        url: req.url,
        description: req.description,
        events: req.events,
        filters: req.filters.map(Filters::from),
        enabled: req.enabled,
    };
    let mut client = state.store.client().await?;
    let webhook = webhooks::update(&mut client, &caller.user_id, &id, &patch)
        .await
        .map_err(webhook_error)?;
    if let Some(enabled) = patch.enabled {
        tracing::info!(webhook.id = %webhook.id, enabled, "webhook updated");
    }
    Ok(Json(webhook.into()))
}

/// `DELETE /v1/webhooks/{id}`: 204; its deliveries go with it.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let client = state.store.client().await?;
    webhooks::delete(&client, &caller.user_id, &id)
        .await
        .map_err(store_error)?;
    tracing::info!(webhook.id = %id, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/webhooks/{id}/rotate-secret`: 200 `{signing_secret,
/// previous_secret_expires_at}`. See [`webhooks::rotate`] for which
/// previous secret keeps signing.
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let client = state.store.client().await?;
    let rotated = webhooks::rotate(&client, &caller.user_id, &id)
        .await
        .map_err(store_error)?;
    tracing::info!(webhook.id = %id, "webhook secret rotated");
    Ok(no_store(
        StatusCode::OK,
        RotatedView {
            signing_secret: rotated.signing_secret,
            previous_secret_expires_at: rfc3339_seconds(rotated.previous_secret_expires_at),
        },
    ))
}
