//! The links of the reviewer's notification mail: `GET|POST
//! /api/v1/approve` and `GET|POST /api/v1/reject` (the token is the only
//! credential; see [`e2a_store::approval_tokens`]).
//!
//! * `GET ?t=<token>` renders a confirmation page and changes nothing —
//!   mail scanners and link previews fetch every link they see.
//! * `POST` (form field `t`, for reject an optional `reason`) uses the
//!   token and decides the message in **one transaction**: the token's
//!   use, the guarded transition ([`e2a_store::hitl`]), the delivery and
//!   the event (the same `email.approved` / `email.rejected` as the API
//!   path, with `decided_via: "magic_link"` — the original's magic links
//!   emitted none, flaw 10). The reviewer recorded is the message's
//!   owner. A decision that fails rolls back and leaves the link usable.
//!
//! Every answer is an HTML page ([`crate::magic_pages`]); the token never
//! reaches a log (query strings and bodies are not logged).

use axum::{
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use e2a_store::{
    StoreError, agents,
    approval_tokens::{self, Action, TokenState},
    hitl::{self, Held, Via},
    rate_limits,
};
use time::OffsetDateTime;

use crate::{
    AppState,
    error::ApiError,
    extract::query_pairs,
    magic_pages::{self, REASON_FIELD, ReviewFacts, TOKEN_FIELD},
    routes::{
        hitl::{checked_reason, decide_approval, decide_rejection},
        outbound::can_send_from,
    },
};

/// `GET /api/v1/approve`.
pub async fn approve_page(State(state): State<AppState>, RawQuery(q): RawQuery) -> Response {
    page(&state, Action::Approve, q.as_deref()).await
}

/// `GET /api/v1/reject`.
pub async fn reject_page(State(state): State<AppState>, RawQuery(q): RawQuery) -> Response {
    page(&state, Action::Reject, q.as_deref()).await
}

/// `POST /api/v1/approve`.
pub async fn approve(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    act(&state, Action::Approve, &headers, &body).await
}

/// `POST /api/v1/reject`.
pub async fn reject(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    act(&state, Action::Reject, &headers, &body).await
}

/// Form or query fields, `+` read as a space (HTML forms encode spaces so).
fn fields(raw: &str) -> Option<Vec<(String, String)>> {
    query_pairs(&raw.replace('+', "%20"))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The page for an error of the store or of a decision.
fn failure(e: ApiError) -> Response {
    if e.code == "message_not_pending" {
        return magic_pages::not_pending();
    }
    if e.status == StatusCode::NOT_FOUND {
        return magic_pages::not_found();
    }
    if e.status.is_server_error() {
        tracing::warn!(code = e.code, "magic-link request failed");
        return magic_pages::error(
            e.status,
            "Try again later",
            "The request could not be completed right now. The link still works; try again in a minute.",
        );
    }
    magic_pages::error(e.status, "Not possible", &e.message)
}

fn store_failure(e: StoreError) -> Response {
    failure(ApiError::from(e))
}

/// The held message behind a token, when it can still be decided.
fn decidable(held: &Held) -> Option<Response> {
    match held.undecidable()? {
        "expired" => Some(magic_pages::expired()),
        _ => Some(magic_pages::not_pending()),
    }
}

async fn page(state: &AppState, action: Action, query: Option<&str>) -> Response {
    let Some(token) = query
        .and_then(fields)
        .and_then(|f| field(&f, TOKEN_FIELD).map(str::to_owned))
    else {
        return magic_pages::invalid_link();
    };
    let client = match state.store.client().await {
        Ok(c) => c,
        Err(e) => return store_failure(e),
    };
    let (user_id, message_id) = match approval_tokens::peek(&client, &token).await {
        Ok(TokenState::Valid {
            user_id,
            message_id,
            action: bound,
            ..
        }) => {
            if bound != action {
                return magic_pages::wrong_action();
            }
            (user_id, message_id)
        }
        Ok(other) => {
            return magic_pages::token_refusal(&other).unwrap_or_else(magic_pages::invalid_link);
        }
        Err(e) => return store_failure(e),
    };
    let held = match hitl::held(&client, &user_id, None, &message_id).await {
        Ok(h) => h,
        Err(e) => return store_failure(e),
    };
    if let Some(refusal) = decidable(&held) {
        return refusal;
    }
    let agent_name = match agents::get(&client, &user_id, &held.agent_id).await {
        Ok(a) => a.name,
        Err(e) => return store_failure(e),
    };
    let facts = ReviewFacts {
        message_id: &held.id,
        agent_address: &held.agent_id,
        agent_name: &agent_name,
        subject: &held.subject,
        to: &held.to,
        cc: &held.cc,
        bcc: &held.bcc,
        approval_expires_at: held
            .approval_expires_at
            .unwrap_or_else(OffsetDateTime::now_utc),
    };
    magic_pages::confirm(action, &facts, &token)
}

async fn act(state: &AppState, action: Action, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let fields = std::str::from_utf8(body)
        .ok()
        .filter(|_| form)
        .and_then(fields);
    let Some(fields) = fields else {
        return magic_pages::error(
            StatusCode::BAD_REQUEST,
            "Not a form",
            "Use the button on the link's page.",
        );
    };
    let Some(token) = field(&fields, TOKEN_FIELD) else {
        return magic_pages::invalid_link();
    };
    let reason = match checked_reason(field(&fields, REASON_FIELD)) {
        Ok(r) if r.is_empty() => magic_pages::DEFAULT_REJECT_REASON.to_owned(),
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    let mut client = match state.store.client().await {
        Ok(c) => c,
        Err(e) => return store_failure(e),
    };
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => return store_failure(e.into()),
    };
    let used = match approval_tokens::consume(&tx, token, action).await {
        Ok(used) => used,
        Err(approval_tokens::ConsumeError::Store(e)) => return store_failure(e),
        Err(e) => {
            return magic_pages::consume_refusal(&e).unwrap_or_else(magic_pages::invalid_link);
        }
    };
    let held = match hitl::held(&tx, &used.user_id, None, &used.message_id).await {
        Ok(h) => h,
        Err(e) => return store_failure(e),
    };
    if let Some(refusal) = decidable(&held) {
        return refusal;
    }
    // The send limit counts approvals (spec §5.3). A refusal drops the
    // transaction: the link stays usable.
    if action == Action::Approve
        && let Err(page) = within_send_limit(state, &held.agent_id).await
    {
        return page;
    }
    let decided = match action {
        Action::Approve => approve_in(state, &tx, &held).await,
        Action::Reject => decide_rejection(
            &tx,
            &used.user_id,
            &used.message_id,
            &reason,
            Via::MagicLink,
        )
        .await
        .map(drop),
    };
    if let Err(e) = decided {
        return failure(e);
    }
    if let Err(e) = tx.commit().await {
        return store_failure(e.into());
    }
    e2a_store::events::wake_deliverer(&state.store);
    tracing::info!(message.id = %used.message_id, action = action.as_str(), "held message decided by magic link");
    magic_pages::done(action, &used.message_id)
}

/// Approves `held` in `tx` as its owner, as it was held.
async fn approve_in(
    state: &AppState,
    tx: &e2a_store::Transaction<'_>,
    held: &Held,
) -> Result<(), ApiError> {
    let agent = agents::get(tx, &held.user_id, &held.agent_id).await?;
    can_send_from(&agent)?;
    let draft = e2a_outbound::draft_from_held(held, &agent, &state.outbound)
        .map_err(crate::routes::outbound::prepare_error)?;
    decide_approval(state, tx, &agent, held, draft, false, Via::MagicLink)
        .await
        .map(drop)
}

/// Counts an approval against `agent_id`'s send limit (on a connection of
/// its own: the count stands whatever the decision's transaction does);
/// the refusal page when the limit is reached.
async fn within_send_limit(state: &AppState, agent_id: &str) -> Result<(), Response> {
    let client = state.store.client().await.map_err(store_failure)?;
    let decision = rate_limits::hit(&client, &format!("send:{agent_id}"), state.limits.send)
        .await
        .map_err(store_failure)?;
    if decision.allowed {
        Ok(())
    } else {
        Err(magic_pages::error(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many sends",
            &format!(
                "This agent has sent too much in the last minute. Try again in {} seconds; the link still works.",
                decision.retry_after_secs
            ),
        ))
    }
}
