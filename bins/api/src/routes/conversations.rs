//! An agent's conversations: `GET /v1/agents/{address}/conversations`
//! (most recently active first, optional `since`/`until` on the last
//! message, `limit` 1–200 accepted and clamped to 100 as the original did;
//! no cursor, `next_cursor` is always null) and
//! `GET …/conversations/{id}` (participants, labels, members oldest
//! first). Read-only: fetching a conversation marks nothing read.

use axum::{
    Json,
    extract::{RawQuery, State},
};
use e2a_store::{
    StoreError,
    conversations::{self, ConversationDetail, ConversationSummary},
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiPath, invalid_filter, query_pairs, rfc3339_seconds, time_window},
    routes::{agents::owned_agent, messages::MessageSummaryView},
};

/// Default `limit`.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest `limit` accepted (the store returns at most 100).
pub const MAX_LIMIT: i64 = 200;
/// Longest conversation id.
pub const MAX_ID_LEN: usize = 200;

/// The contract's `ConversationSummaryView`.
#[derive(Debug, Serialize)]
pub struct ConversationSummaryView {
    conversation_id: String,
    last_message_at: String,
    first_message_at: String,
    message_count: i64,
    inbound_count: i64,
    outbound_count: i64,
    has_unread: bool,
    latest_subject: String,
    latest_sender: String,
}

impl From<ConversationSummary> for ConversationSummaryView {
    fn from(s: ConversationSummary) -> Self {
        Self {
            conversation_id: s.conversation_id,
            last_message_at: rfc3339_seconds(s.last_message_at),
            first_message_at: rfc3339_seconds(s.first_message_at),
            message_count: s.message_count,
            inbound_count: s.inbound_count,
            outbound_count: s.outbound_count,
            has_unread: s.has_unread,
            latest_subject: s.latest_subject,
            latest_sender: s.latest_sender,
        }
    }
}

/// The contract's `ConversationDetailView`.
#[derive(Debug, Serialize)]
pub struct ConversationDetailView {
    #[serde(flatten)]
    summary: ConversationSummaryView,
    participants: Vec<String>,
    labels: Vec<String>,
    messages: Vec<MessageSummaryView>,
}

impl From<ConversationDetail> for ConversationDetailView {
    fn from(d: ConversationDetail) -> Self {
        Self {
            summary: d.summary.into(),
            participants: d.participants,
            labels: d.labels,
            messages: d
                .messages
                .into_iter()
                .map(MessageSummaryView::from)
                .collect(),
        }
    }
}

/// `GET /v1/agents/{address}/conversations`: 200 `{items, next_cursor: null}`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(query.as_deref().unwrap_or(""))
        .ok_or_else(|| invalid_filter("query string is not valid UTF-8 percent-encoding"))?;
    let value = |k: &str| {
        pairs
            .iter()
            .rev()
            .find(|(key, v)| key == k && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    let (since, until) = time_window(value("since"), value("until"))?;
    let limit = match value("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| invalid_filter("limit must be an integer from 1 to 200"))?,
    };
    let client = state.store.client().await?;
    let agent = owned_agent(&client, &caller, &address).await?;
    let items: Vec<ConversationSummaryView> =
        conversations::list(&client, &caller.user_id, &agent.id, since, until, limit)
            .await?
            .into_iter()
            .map(ConversationSummaryView::from)
            .collect();
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

/// `GET /v1/agents/{address}/conversations/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
) -> Result<Json<ConversationDetailView>, ApiError> {
    if id.chars().count() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "conversation id must be at most 200 characters without control characters",
        ));
    }
    let client = state.store.client().await?;
    let agent = owned_agent(&client, &caller, &address).await?;
    let detail = conversations::get(&client, &caller.user_id, &agent.id, &id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found("conversation"),
            other => other.into(),
        })?;
    Ok(Json(detail.into()))
}
