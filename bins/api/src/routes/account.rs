//! `GET /v1/account`: the caller's plan caps and current usage
//! (`LimitsView` in the contract).

use axum::{Json, extract::State};
use e2a_store::{StoreError, account_limits};
use serde::Serialize;

use crate::{AppState, auth::Caller, error::ApiError};

/// The contract's `LimitsView`.
#[derive(Debug, Serialize)]
pub struct AccountView {
    plan_code: String,
    limits: Caps,
    usage: account_limits::Usage,
    upgrade_url: String,
}

#[derive(Debug, Serialize)]
struct Caps {
    max_agents: i32,
    max_domains: i32,
    max_messages_month: i32,
    max_storage_bytes: i64,
}

/// Reads limits and usage for the caller in one statement (one round trip,
/// one snapshot). 503 `limits_unavailable` when the
/// database cannot answer.
pub async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AccountView>, ApiError> {
    let unavailable = |e: StoreError| match e {
        StoreError::Unavailable(_) => ApiError::unavailable("limits_unavailable"),
        other => ApiError::from(other),
    };
    let client = state.store.client().await.map_err(unavailable)?;
    let (limits, usage) = account_limits::overview(&client, &caller.user_id, &state.default_limits)
        .await
        .map_err(unavailable)?;
    Ok(Json(AccountView {
        plan_code: limits.plan_code,
        limits: Caps {
            max_agents: limits.max_agents,
            max_domains: limits.max_domains,
            max_messages_month: limits.max_messages_month,
            max_storage_bytes: limits.max_storage_bytes,
        },
        usage,
        upgrade_url: limits.upgrade_url,
    }))
}
