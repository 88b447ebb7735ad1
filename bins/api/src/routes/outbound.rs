//! Sending: `POST /v1/agents/{address}/messages` (send), `…/messages/{id}/reply`,
//! `…/messages/{id}/forward` and `POST /v1/agents/{address}/test`.
//!
//! Queue-first: a request is validated, composed (off the executor), and
//! stored in **one transaction** ([`e2a_store::outbound::accept`]) together
//! with its idempotency record; the deliverer submits it later. The answer
//! comes at once:
//!
//! * `200 {"status": "queued", "message_id": "<Message-ID>", "method": "smtp"}`
//!   — some recipient is outside the gateway; the Message-ID is minted here
//!   and stays the same on every retry;
//! * `200 {"status": "sent", …, "method": "loopback"}` — every recipient is
//!   an agent of this gateway and already has its copy;
//! * `202 {"status": "pending_approval", "message_id": "msg_…",
//!   "approval_expires_at"}` — the agent's review is on.
//!
//! Order of checks (spec §7.1, with the original's flaw 25 fixed): the
//! owned agent (404), the body (400), the parent inbound message for a
//! reply or forward (404), the idempotency key (a replay answers here,
//! before any limit), the send rate limit (429, shared by every replica),
//! the agent's domain (403), the account caps (402) — each a statement of
//! its own, so no lock is held across them — and then, in one transaction,
//! the idempotency claim, the accept and the key's completion. A failure
//! rolls the transaction back, which releases the key: failures are never
//! cached. A refused request still counts against the send limit.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use e2a_mail::{
    compose::{self, Attachment},
    cpu, draft,
};
use e2a_store::{
    StoreError,
    address::EmailAddress,
    agents::{self, Agent},
    idempotency::{self, Claim, Key},
    ids::MessageId,
    inbound,
    outbound::{self, MessageType},
    rate_limits,
};
use serde::Deserialize;
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    AppState, auth::Caller, error::ApiError, extract::ApiPath, routes::agents::owned_agent,
};

/// Largest request body of the send routes (spec §8: 25 MiB).
pub const MAX_SEND_BODY_BYTES: usize = 25 << 20;
/// Most recipients (To + Cc + Bcc) of one message.
pub const MAX_RECIPIENTS: usize = 50;
/// Longest subject, in characters.
pub const MAX_SUBJECT_CHARS: usize = 998;
/// Longest caller-supplied conversation id.
pub const MAX_CONVERSATION_ID_LEN: usize = 200;
/// Most attachments of one message.
pub const MAX_ATTACHMENTS: usize = 100;

/// An attachment as the contract sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentIn {
    filename: String,
    content_type: String,
    /// Base64 (standard alphabet).
    data: String,
}

/// The contract's `SendEmailRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendEmailRequest {
    from: Option<String>,
    to: Option<Vec<String>>,
    cc: Option<Vec<String>>,
    bcc: Option<Vec<String>>,
    subject: Option<String>,
    body: Option<String>,
    html_body: Option<String>,
    conversation_id: Option<String>,
    attachments: Option<Vec<AttachmentIn>>,
}

/// The contract's `ReplyRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyRequest {
    body: Option<String>,
    html_body: Option<String>,
    reply_all: Option<bool>,
    cc: Option<Vec<String>>,
    bcc: Option<Vec<String>>,
    conversation_id: Option<String>,
    attachments: Option<Vec<AttachmentIn>>,
}

/// The contract's `ForwardRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    to: Option<Vec<String>>,
    cc: Option<Vec<String>>,
    bcc: Option<Vec<String>>,
    body: Option<String>,
    html_body: Option<String>,
    conversation_id: Option<String>,
    attachments: Option<Vec<AttachmentIn>>,
}

pub use e2a_outbound::Settings as OutboundSettings;

/// The draft the send routes build, plus its idempotency fingerprint.
struct Draft {
    inner: e2a_outbound::Draft,
    /// Fingerprint route for the idempotency record.
    route: String,
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// Parses a JSON body of a send route (any content type the contract
/// lists: JSON, or the raw body as `application/octet-stream`).
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json_like = content_type == "application/json"
        || content_type == "application/octet-stream"
        || (content_type.starts_with("application/") && content_type.ends_with("+json"));
    if !json_like {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("invalid JSON body: {e}")))
}

/// No CR, LF or other control character in a header-bound value.
pub(crate) fn header_safe(field: &str, value: &str) -> Result<(), ApiError> {
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must not contain line breaks or control characters"
        )));
    }
    Ok(())
}

fn conversation_id(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(id) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    header_safe("conversation_id", id)?;
    if id.len() > MAX_CONVERSATION_ID_LEN {
        return Err(invalid(format!(
            "conversation_id must be at most {MAX_CONVERSATION_ID_LEN} characters"
        )));
    }
    Ok(Some(id.to_owned()))
}

pub(crate) fn attachments(
    list: Option<Vec<AttachmentIn>>,
) -> Result<(Vec<Attachment>, Option<Value>), ApiError> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_ATTACHMENTS {
        return Err(invalid(format!(
            "at most {MAX_ATTACHMENTS} attachments per message"
        )));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut stored = Vec::with_capacity(list.len());
    for (i, a) in list.into_iter().enumerate() {
        if a.filename.trim().is_empty() {
            return Err(invalid(format!("attachments[{i}].filename is required")));
        }
        header_safe(&format!("attachments[{i}].filename"), &a.filename)?;
        header_safe(&format!("attachments[{i}].content_type"), &a.content_type)?;
        let data = STANDARD
            .decode(a.data.as_bytes())
            .map_err(|_| invalid(format!("attachments[{i}].data is not valid base64")))?;
        stored.push(json!({
            "filename": a.filename,
            "content_type": a.content_type,
            "data": a.data,
        }));
        out.push(Attachment {
            filename: a.filename,
            content_type: a.content_type,
            data,
        });
    }
    let json = (!stored.is_empty()).then_some(Value::Array(stored));
    Ok((out, json))
}

/// Recipient canonicalisation (spec §7.2): trimmed, validated, lower-cased;
/// the agent's own address (and its alias at the outbound domain) dropped;
/// duplicates dropped; Cc minus To, Bcc minus To and Cc. To + Cc empty is
/// 400 (`no valid recipients`); an address that does not parse is 400
/// `invalid_recipient`.
pub(crate) fn recipients(
    agent: &Agent,
    settings: &OutboundSettings,
    to: &[String],
    cc: &[String],
    bcc: &[String],
) -> Result<draft::Recipients, ApiError> {
    let alias = settings.envelope_sender(agent);
    let parse = |field: &str, raw: &[String]| -> Result<Vec<String>, ApiError> {
        raw.iter()
            .enumerate()
            .map(|(i, r)| {
                header_safe(&format!("{field}[{i}]"), r)?;
                EmailAddress::parse(r)
                    .map(|a| a.as_str().to_owned())
                    .map_err(|e| {
                        ApiError::bad_request("invalid_recipient", format!("{field}[{i}]: {e}"))
                            .with_details(json!({ "field": field, "index": i }))
                    })
            })
            .collect()
    };
    let recipients = draft::canonical_recipients(
        &[agent.id.as_str(), alias.as_str()],
        &parse("to", to)?,
        &parse("cc", cc)?,
        &parse("bcc", bcc)?,
    );
    if recipients.no_visible_recipient() {
        return Err(ApiError::bad_request(
            "invalid_recipient",
            "no valid recipients: name at least one To or Cc address other than the agent itself",
        ));
    }
    if recipients.envelope().count() > MAX_RECIPIENTS {
        return Err(ApiError::bad_request(
            "invalid_recipient",
            format!("at most {MAX_RECIPIENTS} recipients per message"),
        ));
    }
    Ok(recipients)
}

pub(crate) fn check_text(subject: &str, text: &str) -> Result<(), ApiError> {
    header_safe("subject", subject)?;
    if subject.chars().count() > MAX_SUBJECT_CHARS {
        return Err(invalid(format!(
            "subject must be at most {MAX_SUBJECT_CHARS} characters"
        )));
    }
    if text.contains('\0') {
        return Err(invalid("body must not contain NUL characters"));
    }
    Ok(())
}

/// `POST /v1/agents/{address}/messages`.
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let req: SendEmailRequest = parse_body(&headers, &body)?;
    if let Some(from) = req.from.as_deref().filter(|f| !f.trim().is_empty()) {
        let same = EmailAddress::parse(from).is_ok_and(|a| a.as_str() == agent.id);
        if !same {
            return Err(ApiError::bad_request(
                "invalid_from",
                "from must be the agent's own address (or omitted)",
            ));
        }
    }
    let subject = req.subject.unwrap_or_default();
    let text = req.body.unwrap_or_default();
    if subject.trim().is_empty() {
        return Err(invalid("subject is required"));
    }
    if text.is_empty() && req.html_body.as_deref().is_none_or(str::is_empty) {
        return Err(invalid("body is required"));
    }
    check_text(&subject, &text)?;
    let draft::Recipients { to, cc, bcc } = recipients(
        &agent,
        &state.outbound,
        req.to.as_deref().unwrap_or_default(),
        req.cc.as_deref().unwrap_or_default(),
        req.bcc.as_deref().unwrap_or_default(),
    )?;
    let (attachments, attachments_json) = attachments(req.attachments)?;
    let conversation_id = conversation_id(req.conversation_id.as_deref())?
        .unwrap_or_else(inbound::mint_conversation_id);
    let draft = Draft {
        inner: e2a_outbound::Draft {
            message_type: MessageType::Send,
            subject,
            to,
            cc,
            bcc,
            text,
            html: req.html_body.filter(|h| !h.is_empty()),
            attachments,
            attachments_json,
            conversation_id,
            in_reply_to: None,
            references: Vec::new(),
            parent_email_message_id: String::new(),
            from: e2a_outbound::agent_mailbox(&agent),
        },
        route: format!("/v1/agents/{}/messages", agent.id),
    };
    accept(&state, &caller, &agent, draft, &headers, &body).await
}

/// `POST /v1/agents/{address}/messages/{id}/reply`.
pub async fn reply(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let req: ReplyRequest = parse_body(&headers, &body)?;
    let text = req.body.unwrap_or_default();
    if text.is_empty() && req.html_body.as_deref().is_none_or(str::is_empty) {
        return Err(invalid("body is required"));
    }
    let (parent, parsed) = load_parent(&state, &caller, &agent, &id).await?;
    let subject = draft::reply_subject(&parent.subject);
    check_text(&subject, &text)?;
    let parent_from = parsed
        .from
        .as_ref()
        .map(|m| m.address.clone())
        .unwrap_or_else(|| parent.sender.clone());
    let (to, mut cc) = draft::reply_recipients(
        Some(parent_from.as_str()),
        &parent.reply_to,
        &parent.to,
        &parent.cc,
        req.reply_all.unwrap_or(false),
    );
    cc.extend(req.cc.unwrap_or_default());
    let draft::Recipients { to, cc, bcc } = recipients(
        &agent,
        &state.outbound,
        &to,
        &cc,
        req.bcc.as_deref().unwrap_or_default(),
    )?;
    let (attachments, attachments_json) = attachments(req.attachments)?;
    let conversation = joined_conversation(req.conversation_id.as_deref(), &parent)?;
    let (in_reply_to, references) = draft::threading(
        Some(parent.email_message_id.as_str()).filter(|s| !s.is_empty()),
        &parsed.references,
        &parsed.in_reply_to,
    );
    let draft = Draft {
        inner: e2a_outbound::Draft {
            message_type: MessageType::Reply,
            subject,
            to,
            cc,
            bcc,
            text,
            html: req.html_body.filter(|h| !h.is_empty()),
            attachments,
            attachments_json,
            conversation_id: conversation,
            in_reply_to,
            references,
            parent_email_message_id: parent.email_message_id.clone(),
            from: e2a_outbound::agent_mailbox(&agent),
        },
        route: format!("/v1/reply/{id}"),
    };
    accept(&state, &caller, &agent, draft, &headers, &body).await
}

/// `POST /v1/agents/{address}/messages/{id}/forward`.
pub async fn forward(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let req: ForwardRequest = parse_body(&headers, &body)?;
    let (parent, parsed) = load_parent(&state, &caller, &agent, &id).await?;
    let subject = draft::forward_subject(&parent.subject);
    let comment = req.body.unwrap_or_default();
    check_text(&subject, &comment)?;
    let draft::Recipients { to, cc, bcc } = recipients(
        &agent,
        &state.outbound,
        req.to.as_deref().unwrap_or_default(),
        req.cc.as_deref().unwrap_or_default(),
        req.bcc.as_deref().unwrap_or_default(),
    )?;
    let (attachments, attachments_json) = attachments(req.attachments)?;
    let conversation = joined_conversation(req.conversation_id.as_deref(), &parent)?;
    let original = draft::ForwardedParent {
        from: Some(
            parsed
                .from
                .as_ref()
                .map(|m| m.address.clone())
                .unwrap_or_else(|| parent.sender.clone()),
        ),
        to: parent.to.clone(),
        cc: parent.cc.clone(),
        date: parsed.date.or(Some(parent.created_at)),
        subject: parent.subject.clone(),
        text: parsed.text.clone(),
        html: parsed.html.clone(),
    };
    let (text, html) = draft::forward_body(
        Some(comment.as_str()).filter(|c| !c.is_empty()),
        req.html_body.as_deref().filter(|h| !h.is_empty()),
        &original,
    );
    // A forward starts a new thread for its recipients (no In-Reply-To, on
    // every path — the original's flaw 21), but keeps the agent's own
    // conversation with the message it forwards.
    let draft = Draft {
        inner: e2a_outbound::Draft {
            message_type: MessageType::Forward,
            subject,
            to,
            cc,
            bcc,
            text,
            html,
            attachments,
            attachments_json,
            conversation_id: conversation,
            in_reply_to: None,
            references: Vec::new(),
            parent_email_message_id: parent.email_message_id.clone(),
            from: e2a_outbound::agent_mailbox(&agent),
        },
        route: format!("/v1/forward/{id}"),
    };
    accept(&state, &caller, &agent, draft, &headers, &body).await
}

/// `POST /v1/agents/{address}/test`: a platform test mail to the agent's
/// own address, recorded like any other message (the original recorded
/// nothing — flaw 20). It never leaves the gateway (loopback), so it shows
/// that the agent's inbound path (its webhooks, its inbox) works.
pub async fn test(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let agent = load_agent(&state, &caller, &address).await?;
    let draft = Draft {
        inner: e2a_outbound::Draft {
            message_type: MessageType::Test,
            subject: "Test email from e2a".into(),
            to: vec![agent.id.clone()],
            cc: Vec::new(),
            bcc: Vec::new(),
            text: format!(
                "This is a test message from e2a to {}.\r\n\r\nIf your agent received it, inbound delivery works.\r\n",
                agent.id
            ),
            html: None,
            attachments: Vec::new(),
            attachments_json: None,
            conversation_id: inbound::mint_conversation_id(),
            in_reply_to: None,
            references: Vec::new(),
            parent_email_message_id: String::new(),
            from: state.outbound.test_sender(&agent),
        },
        route: format!("/v1/agents/{}/test", agent.id),
    };
    accept(&state, &caller, &agent, draft, &headers, b"").await
}

pub(crate) async fn load_agent(
    state: &AppState,
    caller: &Caller,
    address: &str,
) -> Result<Agent, ApiError> {
    let client = state.store.client().await?;
    owned_agent(&client, caller, address).await
}

/// The inbound message a reply or forward answers, and its parse (off the
/// executor when large); 404 for anything but an unexpired inbound
/// message of this agent.
async fn load_parent(
    state: &AppState,
    caller: &Caller,
    agent: &Agent,
    id: &str,
) -> Result<(outbound::Parent, e2a_mail::ParsedMessage), ApiError> {
    let not_found = || ApiError::not_found("message");
    let id = MessageId::parse(id).ok_or_else(not_found)?;
    let client = state.store.client().await?;
    let parent = match outbound::parent(&client, &caller.user_id, &agent.id, &id).await {
        Ok(p) => p,
        Err(StoreError::NotFound) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    drop(client);
    let raw = &parent.raw;
    let parsed = cpu::run_for(raw.len(), || e2a_mail::parse(raw)).await;
    Ok((parent, parsed))
}

/// A reply or forward belongs to its parent's conversation on every path
/// (the original's flaw 16). A caller-supplied id must be that one.
fn joined_conversation(
    requested: Option<&str>,
    parent: &outbound::Parent,
) -> Result<String, ApiError> {
    let requested = conversation_id(requested)?;
    let parent_id = if parent.conversation_id.is_empty() {
        inbound::mint_conversation_id()
    } else {
        parent.conversation_id.clone()
    };
    match requested {
        Some(r) if r != parent_id => Err(invalid(format!(
            "a reply or forward joins its parent's conversation ({parent_id}); omit conversation_id or pass that one"
        ))),
        _ => Ok(parent_id),
    }
}

/// The response of an accepted message (also what a replay answers).
pub(crate) fn answer(status: StatusCode, body: &Value) -> Response {
    (status, Json(body)).into_response()
}

/// Composes `draft` (off the executor), then stores it in one transaction
/// with the idempotency record, the rate limit, the domain and cap checks.
async fn accept(
    state: &AppState,
    caller: &Caller,
    agent: &Agent,
    draft: Draft,
    headers: &HeaderMap,
    raw_body: &[u8],
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let request_hash = idempotency::request_hash(&draft.route, raw_body);

    let rfc_message_id = compose::mint_message_id(&agent.domain);
    let route = draft.route;
    let prepared = e2a_outbound::prepare(
        &state.store,
        &state.outbound,
        &state.default_limits,
        agent,
        draft.inner,
        rfc_message_id,
        agent.hitl_enabled,
    )
    .await
    .map_err(prepare_error)?;
    let message_id = MessageId::new();
    // Rounded up to a whole second, so the stored expiry is exactly the
    // one answered (RFC 3339 in seconds) and never earlier than the TTL.
    let hold_expires = OffsetDateTime::now_utc()
        + time::Duration::seconds(i64::from(agent.hitl_ttl_seconds.clamp(1, 604_800)) + 1);
    let hold_expires = hold_expires.replace_nanosecond(0).unwrap_or(hold_expires);
    let mail = prepared.mail(
        &message_id,
        &caller.user_id,
        &agent.id,
        agent.hitl_enabled.then(|| prepared.hold(hold_expires)),
    );

    // Checks before the transaction, so that no lock is held across them:
    // the send limit's row in particular, held to a commit, would make one
    // agent's sends commit one after another. First the idempotency key (a
    // replay is answered before any limit, flaw 25); the claim in the
    // transaction below stays the authority.
    let mut client = state.store.client().await?;
    if let Some(key) = &key
        && let Some(decided) =
            idempotency::peek(&client, &caller.user_id, key, &request_hash).await?
    {
        return idempotent_answer(decided);
    }
    let decision =
        rate_limits::hit(&client, &format!("send:{}", agent.id), state.limits.send).await?;
    if !decision.allowed {
        return Err(ApiError::rate_limited(&decision));
    }
    can_send_from(agent)?;
    if let Some((quota, limit)) =
        outbound::over_quota(&client, &caller.user_id, &state.default_limits).await?
    {
        let what = match quota {
            agents::Quota::MonthlyMessages => "messages_month",
            agents::Quota::Storage => "storage_bytes",
        };
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "limit_exceeded",
            format!("your plan's {what} limit of {limit} is reached"),
        )
        .with_details(json!({ "resource": what, "limit": limit })));
    }

    let tx = client.transaction().await.map_err(StoreError::from)?;
    let ticket = match claim_key(&tx, &caller.user_id, key.as_ref(), &route, &request_hash).await {
        Ok(ticket) => ticket,
        Err(answer) => return answer,
    };
    let accepted = outbound::accept(&tx, &mail).await?;
    if accepted.status == "pending_approval" {
        let draft = &prepared.draft;
        let held = crate::routes::hitl::HeldFacts {
            message_id: &message_id,
            user_id: &caller.user_id,
            agent,
            message_type: draft.message_type.as_str(),
            subject: &draft.subject,
            to: &draft.to,
            cc: &draft.cc,
            bcc: &draft.bcc,
            expires_at: hold_expires,
        };
        crate::routes::hitl::enqueue_notification(state, &tx, &held).await?;
    }
    let (status, body) = if accepted.status == "pending_approval" {
        (
            StatusCode::ACCEPTED,
            json!({
                "status": "pending_approval",
                "message_id": message_id,
                "approval_expires_at": hold_expires.format(&Rfc3339).unwrap_or_default(),
            }),
        )
    } else {
        (
            StatusCode::OK,
            json!({
                "status": accepted.status,
                "message_id": outbound::angle(&prepared.rfc_message_id),
                "method": accepted.method,
            }),
        )
    };
    if let Some(ticket) = &ticket {
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        idempotency::complete(&tx, ticket, status.as_u16(), &bytes).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    accepted.wake(&state.store);
    tracing::info!(
        message.id = %message_id,
        agent = %agent.id,
        status = accepted.status,
        external = prepared.external.len(),
        loopback = prepared.copies.len(),
        "outbound message accepted"
    );
    Ok(answer(status, &body))
}

/// The request's `Idempotency-Key`, if any: 1–255 visible ASCII
/// characters, else 400.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<Key>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        ApiError::bad_request("invalid_request", "Idempotency-Key must be visible ASCII")
    })?;
    Key::client(v)
        .map(Some)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

/// In the request's transaction `tx`: claims `key` (if any) for this
/// request. `Err` holds the answer when the key is not this request's to
/// run — the stored answer, 409 or 422 ([`idempotent_answer`]) — or a
/// database error.
pub(crate) async fn claim_key(
    tx: &impl e2a_store::GenericClient,
    user_id: &e2a_store::ids::UserId,
    key: Option<&Key>,
    route: &str,
    request_hash: &str,
) -> Result<Option<idempotency::Ticket>, Result<Response, ApiError>> {
    let Some(key) = key else {
        return Ok(None);
    };
    match idempotency::claim(tx, user_id, key, route, request_hash).await {
        Ok(Claim::Acquired(ticket)) => Ok(Some(ticket)),
        Ok(decided) => Err(idempotent_answer(decided)),
        Err(e) => Err(Err(e.into())),
    }
}

/// 403 `domain_not_verified` unless `agent` may send (its domain is
/// verified): checked before a send and an approval alike.
pub(crate) fn can_send_from(agent: &Agent) -> Result<(), ApiError> {
    if agent.domain_verified {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "domain_not_verified",
        "the agent's domain is not verified; verify it before sending",
    ))
}

/// A JSON body that may also be empty (then `T::default()`).
pub(crate) fn parse_optional_body<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_body(headers, body)
    }
}

/// The answer of an idempotency key that is not this request's to run:
/// 409 while another request holds it, 422 for another request's key, or
/// the stored answer (marked `Idempotent-Replayed`).
pub(crate) fn idempotent_answer(decided: Claim) -> Result<Response, ApiError> {
    match decided {
        Claim::Replay(stored) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let mut response = (status, stored.body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(idempotency::CONTENT_TYPE),
            );
            response.headers_mut().insert(
                "idempotent-replayed",
                header::HeaderValue::from_static("true"),
            );
            Ok(response)
        }
        Claim::Reuse => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reuse",
            "this Idempotency-Key was used for a different request",
        )),
        Claim::InFlight | Claim::Acquired(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_in_flight",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )),
    }
}

/// The answer to a draft that [`e2a_outbound::prepare`] refused.
pub(crate) fn prepare_error(e: e2a_outbound::Error) -> ApiError {
    match e {
        e2a_outbound::Error::Compose(msg) => invalid(msg),
        e2a_outbound::Error::Recipient(address) => {
            ApiError::bad_request("invalid_recipient", format!("{address} is not an address"))
        }
        e @ e2a_outbound::Error::StoredAttachments => ApiError::internal(&e),
        e2a_outbound::Error::Store(e) => e.into(),
    }
}
