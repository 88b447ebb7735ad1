//! Review of held mail: `POST /v1/agents/{address}/messages/{id}/approve`
//! (with optional reviewer edits and `Idempotency-Key`) and `…/reject`.
//!
//! A decision is one guarded transition in the store
//! ([`e2a_store::hitl`]): the message leaves `pending_approval` exactly
//! once, together with its delivery (or loopback copies), its event and
//! the idempotency record. Answers:
//!
//! * 404 `not_found` — no such outbound message of this agent (another
//!   tenant's or another agent's alike);
//! * 409 `message_not_pending` — already decided, or its hold expired;
//! * 403 `domain_not_verified` — approve only;
//! * 400 / 413 — edits that a new send would refuse (flaw 22: they are
//!   validated exactly as a send is, before anything is stored);
//! * 429 — approve counts toward the agent's send limit;
//! * 200 `{status, message_id, provider_message_id, method, edited}` —
//!   `status` is `approved` (queued for the deliverer) or `sent` (every
//!   recipient is an agent of this gateway).
//!
//! Approve never submits mail itself, so a concurrent decision answers 409
//! (never the original's 500 for a send in progress, flaw 11).

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use e2a_outbound::Draft;
use e2a_store::{
    StoreError,
    agents::Agent,
    hitl::{self, Approval, Decided, Held, Rejection, Via},
    idempotency,
    ids::{MessageId, UserId},
    outbound, rate_limits,
};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::ApiPath,
    routes::outbound::{
        AttachmentIn, answer, attachments, can_send_from, check_text, claim_key, header_safe,
        idempotency_key, idempotent_answer, invalid, load_agent, parse_optional_body,
        prepare_error, recipients,
    },
};

/// Longest rejection reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// The contract's `ApproveRequest`: each field present replaces the held
/// one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    subject: Option<String>,
    body_text: Option<String>,
    body_html: Option<String>,
    to: Option<Vec<String>>,
    cc: Option<Vec<String>>,
    bcc: Option<Vec<String>>,
    attachments: Option<Vec<AttachmentIn>>,
}

/// The contract's `RejectInputBody`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectRequest {
    reason: Option<String>,
}

fn not_pending(status: &str) -> ApiError {
    let message = if status == "expired" {
        "the message's approval window has passed".to_owned()
    } else {
        format!("the message is not pending approval (status {status})")
    };
    ApiError::new(StatusCode::CONFLICT, "message_not_pending", message)
        .with_details(json!({ "status": status }))
}

fn message_not_found() -> ApiError {
    ApiError::not_found("message")
}

/// The held message `id` of `agent`, checked pending and unexpired.
pub(crate) async fn pending(
    state: &AppState,
    user_id: &UserId,
    agent_id: Option<&str>,
    id: &MessageId,
) -> Result<Held, ApiError> {
    let client = state.store.client().await?;
    let held = match hitl::held(&client, user_id, agent_id, id).await {
        Ok(h) => h,
        Err(StoreError::NotFound) => return Err(message_not_found()),
        Err(e) => return Err(e.into()),
    };
    if let Some(status) = held.undecidable() {
        return Err(not_pending(status));
    }
    Ok(held)
}

/// Applies `edits` to the held `draft`, validating every edited field as a
/// new send validates it. Returns whether anything changed (the
/// `edited` rule: a field counts only when its value differs — supplying
/// the same attachments again is no edit, unlike the original, flaw 22).
fn apply_edits(
    state: &AppState,
    agent: &Agent,
    draft: &mut Draft,
    edits: ApproveRequest,
) -> Result<bool, ApiError> {
    let mut edited = false;
    if let Some(subject) = edits.subject {
        if subject.trim().is_empty() {
            return Err(invalid("subject must not be empty"));
        }
        edited |= subject != draft.subject;
        draft.subject = subject;
    }
    if let Some(text) = edits.body_text {
        edited |= text != draft.text;
        draft.text = text;
    }
    if let Some(html) = edits.body_html {
        let html = Some(html).filter(|h| !h.is_empty());
        edited |= html != draft.html;
        draft.html = html;
    }
    if draft.text.is_empty() && draft.html.as_deref().is_none_or(str::is_empty) {
        return Err(invalid("body is required: body_text or body_html"));
    }
    check_text(&draft.subject, &draft.text)?;
    if edits.to.is_some() || edits.cc.is_some() || edits.bcc.is_some() {
        let to = edits.to.unwrap_or_else(|| draft.to.clone());
        let cc = edits.cc.unwrap_or_else(|| draft.cc.clone());
        let bcc = edits.bcc.unwrap_or_else(|| draft.bcc.clone());
        let r = recipients(agent, &state.outbound, &to, &cc, &bcc)?;
        edited |= r.to != draft.to || r.cc != draft.cc || r.bcc != draft.bcc;
        draft.to = r.to;
        draft.cc = r.cc;
        draft.bcc = r.bcc;
    }
    if let Some(list) = edits.attachments {
        let (decoded, stored) = attachments(Some(list))?;
        edited |= stored != draft.attachments_json;
        draft.attachments = decoded;
        draft.attachments_json = stored;
    }
    Ok(edited)
}

/// `POST /v1/agents/{address}/messages/{id}/approve`.
pub async fn approve(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let id = MessageId::parse(&id).ok_or_else(message_not_found)?;
    let edits: ApproveRequest = parse_optional_body(&headers, &body)?;
    let key = idempotency_key(&headers)?;
    let route = format!("/v1/approve/{id}");
    let request_hash = idempotency::request_hash(&route, &body);

    // A replay is answered before any limit (flaw 25); the send limit
    // counts approvals (spec §5.3).
    let client = state.store.client().await?;
    if let Some(key) = &key
        && let Some(decided) =
            idempotency::peek(&client, &caller.user_id, key, &request_hash).await?
    {
        return idempotent_answer(decided);
    }
    let decision =
        rate_limits::hit(&client, &format!("send:{}", agent.id), state.limits.send).await?;
    drop(client);
    if !decision.allowed {
        return Err(ApiError::rate_limited(&decision));
    }
    let held = pending(&state, &caller.user_id, Some(&agent.id), &id).await?;
    can_send_from(&agent)?;
    let mut draft =
        e2a_outbound::draft_from_held(&held, &agent, &state.outbound).map_err(prepare_error)?;
    let edited = apply_edits(&state, &agent, &mut draft, edits)?;

    let mut client = state.store.client().await?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let ticket = match claim_key(&tx, &caller.user_id, key.as_ref(), &route, &request_hash).await {
        Ok(ticket) => ticket,
        Err(answer) => return answer,
    };
    let (status, body) =
        decide_approval(&state, &tx, &agent, &held, draft, edited, Via::Api).await?;
    if let Some(ticket) = &ticket {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        idempotency::complete(&tx, ticket, status.as_u16(), &bytes).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    e2a_store::events::wake_deliverer(&state.store);
    tracing::info!(message.id = %id, agent = %agent.id, edited, "held message approved");
    Ok(answer(status, &body))
}

/// Prepares `draft` (the held message, maybe edited) and approves it in
/// `tx`, its owner recorded as the reviewer: the answer's status and body,
/// or 409 when the message was decided meanwhile. Shared by the API and
/// the magic link.
pub(crate) async fn decide_approval(
    state: &AppState,
    tx: &impl e2a_store::GenericClient,
    agent: &Agent,
    held: &Held,
    draft: Draft,
    edited: bool,
    via: Via,
) -> Result<(StatusCode, Value), ApiError> {
    let prepared = e2a_outbound::prepare(
        &state.store,
        &state.outbound,
        &state.default_limits,
        agent,
        draft,
        held.rfc_message_id.clone(),
        false,
    )
    .await
    .map_err(prepare_error)?;
    let mail = prepared.mail(&held.id, &held.user_id, &agent.id, None);
    let approval = Approval {
        mail: &mail,
        reviewer: Some(&held.user_id),
        via,
        edited,
    };
    match hitl::approve(tx, &approval).await? {
        Decided::Done(done) => Ok((
            StatusCode::OK,
            json!({
                "status": done.status,
                "message_id": held.id,
                "provider_message_id": outbound::angle(&held.rfc_message_id),
                "method": done.accepted.method,
                "edited": done.edited,
            }),
        )),
        Decided::NotPending { status } => Err(not_pending(&status)),
    }
}

/// `POST /v1/agents/{address}/messages/{id}/reject`.
pub async fn reject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let id = MessageId::parse(&id).ok_or_else(message_not_found)?;
    let req: RejectRequest = parse_optional_body(&headers, &body)?;
    let reason = checked_reason(req.reason.as_deref())?;
    pending(&state, &caller.user_id, Some(&agent.id), &id).await?;
    let mut client = state.store.client().await?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let body = decide_rejection(&tx, &caller.user_id, &id, &reason, Via::Api).await?;
    tx.commit().await.map_err(StoreError::from)?;
    e2a_store::events::wake_deliverer(&state.store);
    tracing::info!(message.id = %id, agent = %agent.id, "held message rejected");
    Ok(answer(StatusCode::OK, &body))
}

/// A reviewer's reason: at most [`MAX_REASON_CHARS`] characters, no
/// control characters but line breaks and tabs.
pub(crate) fn checked_reason(reason: Option<&str>) -> Result<String, ApiError> {
    let reason = reason.map(str::trim).unwrap_or("");
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(invalid(format!(
            "reason must be at most {MAX_REASON_CHARS} characters"
        )));
    }
    let single_line: String = reason
        .chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\t') {
                ' '
            } else {
                c
            }
        })
        .collect();
    header_safe("reason", &single_line)?;
    Ok(reason.to_owned())
}

/// Rejects `user_id`'s message `id` in `tx`, its owner recorded as the
/// reviewer: the answer's body, or 409 when it was decided meanwhile.
/// Shared by the API and the magic link.
pub(crate) async fn decide_rejection(
    tx: &impl e2a_store::GenericClient,
    user_id: &UserId,
    id: &MessageId,
    reason: &str,
    via: Via,
) -> Result<Value, ApiError> {
    let rejection = Rejection {
        user_id,
        message_id: id,
        reviewer: Some(user_id),
        via,
        reason,
    };
    match hitl::reject(tx, &rejection).await? {
        Decided::Done(done) => Ok(json!({
            "status": done.status,
            "message_id": id,
            "rejection_reason": done.reason,
        })),
        Decided::NotPending { status } => Err(not_pending(&status)),
    }
}

/// Where reviewers' notification mail links to and comes from: on only
/// when `E2A_PUBLIC_URL` and `E2A_OUTBOUND_FROM_DOMAIN` are both set.
#[derive(Debug, Clone)]
pub struct Notifications {
    /// `E2A_PUBLIC_URL`, without a trailing slash.
    pub public_url: String,
    /// `E2A_OUTBOUND_FROM_DOMAIN`: the notification comes from
    /// `hitl-noreply@` it (DKIM-signed when the domain has a key).
    pub from_domain: String,
}

impl Notifications {
    /// The settings `public_url` and `from_domain` make, or `None` when
    /// either is unset.
    pub fn new(public_url: Option<&str>, from_domain: &str) -> Option<Self> {
        let public_url = public_url.map(str::trim).filter(|u| !u.is_empty())?;
        (!from_domain.is_empty()).then(|| Notifications {
            public_url: public_url.trim_end_matches('/').to_owned(),
            from_domain: from_domain.to_owned(),
        })
    }
}

/// What the reviewer's notification says about a held message.
pub(crate) struct HeldFacts<'a> {
    pub message_id: &'a MessageId,
    pub user_id: &'a UserId,
    pub agent: &'a Agent,
    pub message_type: &'a str,
    pub subject: &'a str,
    pub to: &'a [String],
    pub cc: &'a [String],
    pub bcc: &'a [String],
    pub expires_at: OffsetDateTime,
}

/// In the hold's transaction `tx`: mints the message's approve and reject
/// links (only their hashes are stored) and enqueues the notification
/// mail to the owner through the mail outbox, keyed
/// `hitl_notification:<msg_id>`. Nothing when notifications are off. The
/// tokens exist only in the composed mail, which the deliverer empties
/// once it is sent or given up.
pub(crate) async fn enqueue_notification(
    state: &AppState,
    tx: &impl e2a_store::GenericClient,
    held: &HeldFacts<'_>,
) -> Result<(), ApiError> {
    use e2a_mail::notification;
    use e2a_store::{approval_tokens, mail_outbox, users};

    let Some(n) = state.notifications.as_deref() else {
        return Ok(());
    };
    let owner = users::get(tx, held.user_id).await?;
    let until = approval_tokens::expiry_for(held.expires_at);
    let approve = approval_tokens::mint(
        tx,
        held.user_id,
        held.message_id,
        approval_tokens::Action::Approve,
        until,
    )
    .await?;
    let reject = approval_tokens::mint(
        tx,
        held.user_id,
        held.message_id,
        approval_tokens::Action::Reject,
        until,
    )
    .await?;
    let approve_url = format!("{}/api/v1/approve?t={approve}", n.public_url);
    let reject_url = format!("{}/api/v1/reject?t={reject}", n.public_url);
    let dashboard_url = format!("{}/dashboard/pending/{}", n.public_url, held.message_id);
    let facts = notification::ReviewFacts {
        agent_address: &held.agent.id,
        agent_name: &held.agent.name,
        subject: held.subject,
        to: held.to,
        cc: held.cc,
        bcc: held.bcc,
        message_type: held.message_type,
        approval_expires_at: held.expires_at,
        approve_url: &approve_url,
        reject_url: &reject_url,
        dashboard_url: &dashboard_url,
        owner_address: owner.email.as_str(),
        from_domain: &n.from_domain,
    };
    let message = notification::review_notification(&facts, OffsetDateTime::now_utc())
        .map_err(|e| ApiError::internal(&e))?;
    let raw = e2a_mail::compose::compose(&message).map_err(|e| ApiError::internal(&e))?;
    let key = format!(
        "{}:{}",
        mail_outbox::HITL_NOTIFICATION_TEMPLATE,
        held.message_id
    );
    let recipients = [(
        owner.email.as_str().to_owned(),
        mail_outbox::RecipientKind::To,
    )];
    mail_outbox::enqueue(
        tx,
        &mail_outbox::Enqueue {
            user_id: held.user_id,
            message_id: None,
            template_id: mail_outbox::HITL_NOTIFICATION_TEMPLATE,
            idempotency_key: &key,
            subject: &message.subject,
            body: &raw,
            mail_from: &notification::sender_address(&n.from_domain),
            dkim_domain: &n.from_domain,
            recipients: &recipients,
            max_attempts: state.outbound.max_attempts,
        },
    )
    .await?;
    Ok(())
}
