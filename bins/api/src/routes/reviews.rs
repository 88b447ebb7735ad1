//! The reviewer's views of outbound mail (human-in-the-loop, issue 11),
//! served at the original's legacy paths (spec §5.2):
//!
//! * `GET /api/v1/pending` — the caller's drafts waiting for review across
//!   all their agents, the first to expire first, at most 100, each with
//!   its held bodies and its attachments' names, types and sizes (never
//!   their data). `status`, when given, must be `pending_approval`.
//! * `GET /api/v1/messages/{id}` — one outbound message of the caller, in
//!   any status, in the contract's `Message` shape: recipients, ids, the
//!   review fields (`reviewed_at`, `reviewed_by_user_id`,
//!   `reviewed_by_name`, `rejection_reason`, `edited`), the held bodies and
//!   attachments (data included) while it is held — a decision scrubs them,
//!   so they are absent afterwards — plus `inbound {sender, subject,
//!   created_at, auth_headers}` for the message a reply or forward answers,
//!   while that still exists.
//!
//! Both take the API key (`Authorization: Bearer`) and are poll-limited
//! (see `routes::poll_limited`). Another tenant's message, an inbound one,
//! an expired one and a malformed id are all `404 not_found`, alike. Error
//! bodies are the contract's; message bodies are never logged.

use axum::{
    Json,
    extract::{RawQuery, State},
};
use e2a_store::{
    StoreError,
    ids::MessageId,
    reviews::{self, AttachmentInfo, OutboundMessage, ParentInbound, PendingMessage},
};
use serde::Serialize;
use serde_json::Value;

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiPath, query_pairs, rfc3339_seconds},
};

/// The one `status` the pending list serves.
pub const PENDING_STATUS: &str = "pending_approval";

/// An attachment of a held draft in the list: no data.
#[derive(Debug, Serialize)]
pub struct AttachmentInfoView {
    filename: String,
    content_type: String,
    size_bytes: i64,
}

impl From<AttachmentInfo> for AttachmentInfoView {
    fn from(a: AttachmentInfo) -> Self {
        Self {
            filename: a.filename,
            content_type: a.content_type,
            size_bytes: a.size_bytes,
        }
    }
}

/// A held draft in the list: the contract's `Message` fields a draft has.
#[derive(Debug, Serialize)]
pub struct PendingView {
    id: String,
    agent_id: String,
    status: &'static str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    message_type: Option<String>,
    subject: String,
    to_recipients: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    conversation_id: String,
    created_at: String,
    approval_expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_html: Option<String>,
    attachments: Vec<AttachmentInfoView>,
}

impl From<PendingMessage> for PendingView {
    fn from(m: PendingMessage) -> Self {
        Self {
            id: m.id.to_string(),
            agent_id: m.agent_id,
            status: PENDING_STATUS,
            message_type: m.message_type,
            subject: m.subject,
            to_recipients: m.to,
            cc: m.cc,
            bcc: m.bcc,
            conversation_id: m.conversation_id,
            created_at: rfc3339_seconds(m.created_at),
            approval_expires_at: rfc3339_seconds(m.approval_expires_at),
            body_text: m.body_text,
            body_html: m.body_html,
            attachments: m.attachments.into_iter().map(Into::into).collect(),
        }
    }
}

/// `{"messages": [...]}`.
#[derive(Debug, Serialize)]
pub struct PendingList {
    messages: Vec<PendingView>,
}

/// Checks the pending list's query: `status` may be absent (or empty) or
/// `pending_approval`, given once; other parameters are ignored. 400
/// `invalid_request` otherwise.
pub fn check_pending_query(query: &str) -> Result<(), ApiError> {
    let pairs = query_pairs(query).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            "query string is not valid UTF-8 percent-encoding",
        )
    })?;
    let statuses: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "status")
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .collect();
    match statuses.as_slice() {
        [] | [PENDING_STATUS] => Ok(()),
        [_] => Err(ApiError::bad_request(
            "invalid_request",
            format!("status must be {PENDING_STATUS}"),
        )),
        _ => Err(ApiError::bad_request(
            "invalid_request",
            "status may be given only once",
        )),
    }
}

/// `GET /api/v1/pending`: 200 `{"messages": [...]}`.
pub async fn pending(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<PendingList>, ApiError> {
    check_pending_query(query.as_deref().unwrap_or(""))?;
    let client = state.store.client().await?;
    let messages = reviews::pending(&client, &caller.user_id)
        .await?
        .into_iter()
        .map(PendingView::from)
        .collect();
    Ok(Json(PendingList { messages }))
}

/// The parent of a reply or forward.
#[derive(Debug, Serialize)]
pub struct InboundView {
    sender: String,
    subject: String,
    created_at: String,
    /// The signed `X-E2A-Auth-*` map it arrived with (`{}` when none).
    auth_headers: Value,
}

impl From<ParentInbound> for InboundView {
    fn from(p: ParentInbound) -> Self {
        Self {
            sender: p.sender,
            subject: p.subject,
            created_at: rfc3339_seconds(p.created_at),
            auth_headers: p
                .auth_headers
                .filter(Value::is_object)
                .unwrap_or_else(|| Value::Object(serde_json::Map::new())),
        }
    }
}

/// One outbound message: the contract's `Message` fields that outbound
/// mail has, plus `inbound`. Absent fields are the ones the row does not
/// have (no hold, no decision, no parent, bodies scrubbed).
#[derive(Debug, Serialize)]
pub struct OutboundView {
    id: String,
    agent_id: String,
    direction: &'static str,
    status: String,
    sender: String,
    recipient: String,
    subject: String,
    to_recipients: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    conversation_id: String,
    email_message_id: String,
    provider_message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    message_type: Option<String>,
    created_at: String,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval_expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reviewed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reviewed_by_user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reviewed_by_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejection_reason: Option<String>,
    edited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attachments: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inbound: Option<InboundView>,
}

impl From<OutboundMessage> for OutboundView {
    fn from(m: OutboundMessage) -> Self {
        Self {
            id: m.id.to_string(),
            agent_id: m.agent_id,
            direction: "outbound",
            status: m.status,
            sender: m.sender,
            recipient: m.recipient,
            subject: m.subject,
            to_recipients: m.to,
            cc: m.cc,
            bcc: m.bcc,
            conversation_id: m.conversation_id,
            email_message_id: m.email_message_id,
            provider_message_id: m.provider_message_id,
            method: m.method,
            message_type: m.message_type,
            created_at: rfc3339_seconds(m.created_at),
            expires_at: rfc3339_seconds(m.expires_at),
            approval_expires_at: m.approval_expires_at.map(rfc3339_seconds),
            reviewed_at: m.reviewed_at.map(rfc3339_seconds),
            reviewed_by_user_id: m.reviewed_by_user_id.map(|u| u.to_string()),
            reviewed_by_name: m.reviewed_by_name,
            rejection_reason: m.rejection_reason,
            edited: m.edited,
            body_text: m.body_text,
            body_html: m.body_html,
            attachments: m.attachments,
            inbound: m.parent.map(Into::into),
        }
    }
}

fn message_not_found() -> ApiError {
    ApiError::not_found("message")
}

/// `GET /api/v1/messages/{id}`: 200 the outbound message in detail; 404
/// for anything that is not the caller's unexpired outbound message.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OutboundView>, ApiError> {
    let id = MessageId::parse(&id).ok_or_else(message_not_found)?;
    let client = state.store.client().await?;
    let message = reviews::outbound(&client, &caller.user_id, &id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => message_not_found(),
            other => other.into(),
        })?;
    Ok(Json(message.into()))
}

#[cfg(test)]
mod tests {
    use super::check_pending_query;

    #[test]
    fn the_pending_list_serves_pending_approval_only() {
        for ok in [
            "",
            "status=pending_approval",
            "status=",
            "limit=5",
            "status=pending_approval&x=1",
        ] {
            assert!(check_pending_query(ok).is_ok(), "{ok}");
        }
        for bad in [
            "status=sent",
            "status=Pending_Approval",
            "status=pending_approval&status=rejected",
            "status=%zz",
        ] {
            assert_eq!(
                check_pending_query(bad).unwrap_err().code,
                "invalid_request",
                "{bad}"
            );
        }
    }
}
