//! `/api/v1/users/me/signing-secrets`: the caller's per-user signing secrets
//! (spec §3.8, §5.1) — the HMAC keys of the inbound `X-E2A-Auth-*` headers.
//!
//! Unlike the original (flaw 32), a list shows each secret's first 12
//! characters only; the plaintext is answered once, by the creation.
//! Every answer is `Cache-Control: no-store`.

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use e2a_store::signing_secrets::{self, SecretError, SigningSecretInfo};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiPath, rfc3339_seconds},
};

/// One secret as lists show it.
#[derive(Debug, Serialize)]
pub struct SecretView {
    id: String,
    name: String,
    secret_prefix: String,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_signed_at: Option<String>,
}

impl From<SigningSecretInfo> for SecretView {
    fn from(s: SigningSecretInfo) -> Self {
        Self {
            id: s.id.to_string(),
            name: s.name,
            secret_prefix: s.secret_prefix,
            created_at: rfc3339_seconds(s.created_at),
            last_signed_at: s.last_signed_at.map(rfc3339_seconds),
        }
    }
}

/// A secret just created: with its plaintext, this once.
#[derive(Debug, Serialize)]
pub struct CreatedView {
    #[serde(flatten)]
    info: SecretView,
    secret: String,
}

/// `{name?}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    name: Option<String>,
}

fn no_store(status: StatusCode, body: impl Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn secret_error(e: SecretError) -> ApiError {
    match e {
        SecretError::CapReached => {
            ApiError::bad_request("signing_secret_cap_reached", e.to_string())
        }
        SecretError::LastSecret => {
            ApiError::bad_request("cannot_delete_last_signing_secret", e.to_string())
        }
        SecretError::InvalidName => ApiError::bad_request("invalid_request", e.to_string()),
        SecretError::NotFound => ApiError::not_found("signing secret"),
        SecretError::Store(e) => e.into(),
    }
}

/// `GET`: `{secrets: [...]}`, newest first, prefixes only.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let client = state.store.client().await?;
    let secrets: Vec<SecretView> = signing_secrets::list(&client, &caller.user_id)
        .await?
        .into_iter()
        .map(SecretView::from)
        .collect();
    Ok(no_store(
        StatusCode::OK,
        serde_json::json!({ "secrets": secrets }),
    ))
}

/// `POST`: 201 with the new secret's plaintext; 400
/// `signing_secret_cap_reached` at the cap.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: none (or only whitespace) names the secret "".
    let req: CreateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_request", format!("invalid JSON body: {e}"))
        })?
    };
    let mut client = state.store.client().await?;
    let created = signing_secrets::create(
        &mut client,
        &caller.user_id,
        req.name.as_deref().unwrap_or(""),
    )
    .await
    .map_err(secret_error)?;
    tracing::info!(secret.id = %created.info.id, "signing secret created");
    Ok(no_store(
        StatusCode::CREATED,
        CreatedView {
            info: created.info.into(),
            secret: created.secret,
        },
    ))
}

/// `DELETE …/{id}`: 204; 400 `cannot_delete_last_signing_secret`; 404 for a
/// missing or another user's secret.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.store.client().await?;
    signing_secrets::delete(&mut client, &caller.user_id, &id)
        .await
        .map_err(secret_error)?;
    Ok(StatusCode::NO_CONTENT)
}
