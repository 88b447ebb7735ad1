//! `/v1/agents` and `/v1/agents/{address}`: list, create, get, update and
//! delete the caller's agents.
//!
//! Path addresses are normalised like everywhere else ([`EmailAddress`]),
//! so `Demo@Agents.LocalHost` names `demo@agents.localhost` (the original's
//! flaw 33); an unparsable address, a missing agent and another user's
//! agent are all 404 `not_found` (flaw 27 — the original answered 403).
//! Webhook URLs are validated on create **and** on update (flaw 31), with
//! the same policy as `/v1/webhooks` ([`super::webhooks::url_policy`]):
//! the legacy per-agent push goes out through the same SSRF-safe client.

use axum::{Json, extract::State, http::StatusCode};
use e2a_store::{
    GenericClient, StoreError, account_limits,
    address::EmailAddress,
    agents::{self, Agent, AgentMode, AgentPatch, CreateError, ExpirationAction, NewAgent},
};
use e2a_webhook::UrlPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::webhooks::url_policy;
use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJson, ApiPath, rfc3339_seconds},
};

/// Longest accepted slug (an e-mail local part).
pub const MAX_SLUG_LEN: usize = 64;

/// The contract's `AgentView`, plus `reject_dmarc_failures` (the DMARC
/// opt-in this gateway adds).
#[derive(Debug, Serialize)]
pub struct AgentView {
    id: String,
    domain: String,
    email: String,
    name: String,
    webhook_url: String,
    agent_mode: &'static str,
    domain_verified: bool,
    created_at: String,
    hitl_enabled: bool,
    hitl_ttl_seconds: i32,
    hitl_expiration_action: &'static str,
    reject_dmarc_failures: bool,
}

impl From<Agent> for AgentView {
    fn from(a: Agent) -> Self {
        Self {
            email: a.id.clone(),
            id: a.id,
            domain: a.domain,
            name: a.name,
            webhook_url: a.webhook_url,
            agent_mode: a.agent_mode.as_str(),
            domain_verified: a.domain_verified,
            created_at: rfc3339_seconds(a.created_at),
            hitl_enabled: a.hitl_enabled,
            hitl_ttl_seconds: a.hitl_ttl_seconds,
            hitl_expiration_action: a.hitl_expiration_action.as_str(),
            reject_dmarc_failures: a.reject_dmarc_failures,
        }
    }
}

/// The caller's agent named by a path address, or 404 `not_found`.
pub async fn owned_agent(
    c: &impl GenericClient,
    caller: &Caller,
    raw_address: &str,
) -> Result<Agent, ApiError> {
    let address = EmailAddress::parse(raw_address).map_err(|_| agent_not_found())?;
    agents::get(c, &caller.user_id, address.as_str())
        .await
        .map_err(agent_store_error)
}

fn agent_not_found() -> ApiError {
    ApiError::not_found("agent")
}

fn agent_store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => agent_not_found(),
        other => other.into(),
    }
}

/// `GET /v1/agents`: the caller's agents, newest first.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let client = state.store.client().await?;
    let agents: Vec<AgentView> = agents::list(&client, &caller.user_id)
        .await?
        .into_iter()
        .map(AgentView::from)
        .collect();
    Ok(Json(json!({ "agents": agents })))
}

/// `GET /v1/agents/{address}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
) -> Result<Json<AgentView>, ApiError> {
    let client = state.store.client().await?;
    Ok(Json(owned_agent(&client, &caller, &address).await?.into()))
}

/// `DELETE /v1/agents/{address}`: the agent and (by cascade) its messages.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let address = EmailAddress::parse(&address).map_err(|_| agent_not_found())?;
    let client = state.store.client().await?;
    agents::delete(&client, &caller.user_id, address.as_str())
        .await
        .map_err(agent_store_error)?;
    Ok(Json(json!({ "status": "deleted" })))
}

/// The contract's `CreateAgentRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    email: Option<String>,
    slug: Option<String>,
    name: Option<String>,
    webhook_url: Option<String>,
    agent_mode: Option<String>,
}

/// True for a slug: `[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?`.
pub fn is_valid_slug(slug: &str) -> bool {
    let bytes = slug.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_SLUG_LEN
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| edge(b) || matches!(b, b'.' | b'_' | b'-'))
}

fn invalid_slug() -> ApiError {
    ApiError::bad_request(
        "invalid_slug",
        "slug must be 1-64 characters of a-z, 0-9, '.', '_' and '-', starting and ending with a letter or digit",
    )
}

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// A display name: at most [`MAX_NAME_CHARS`] characters and no control
/// characters (NUL cannot be stored at all). 400 `invalid_request` otherwise.
fn check_name(name: Option<String>) -> Result<Option<String>, ApiError> {
    match name {
        Some(n) if n.chars().count() > MAX_NAME_CHARS || n.chars().any(char::is_control) => {
            Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "name must be at most {MAX_NAME_CHARS} characters without control characters"
                ),
            ))
        }
        other => Ok(other),
    }
}

/// Checks an agent's (legacy) webhook URL against `policy` — the
/// deployment's [`url_policy`], the one `/v1/webhooks` applies: `https://`
/// to a public host in production (no loopback, private, CGNAT, link-local
/// or unique-local literal, in any disguise, no `localhost` or single-label
/// name) unless `E2A_ALLOW_PRIVATE_WEBHOOKS=1` admits private hosts;
/// `http://` and private hosts in development; never credentials, a
/// non-http scheme, more than 2048 characters or a cloud-metadata address.
/// Names are checked again on the addresses the deliverer connects to.
/// 400 `invalid_webhook_url` otherwise.
pub fn check_webhook_url(url: &str, policy: &UrlPolicy) -> Result<(), ApiError> {
    e2a_webhook::check_url(url, policy)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_webhook_url", format!("webhook_url: {e}")))
}

/// The address a create request asks for, validated.
fn requested_address(req: &CreateAgentRequest, shared: &str) -> Result<EmailAddress, ApiError> {
    match (&req.email, &req.slug) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_request",
            "give either email or slug, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "invalid_request",
            "email or slug is required",
        )),
        (None, Some(slug)) => {
            if shared.is_empty() {
                return Err(ApiError::bad_request(
                    "slug_registration_disabled",
                    "this deployment has no shared domain; register an agent by email on your own domain",
                ));
            }
            let slug = slug.trim().to_ascii_lowercase();
            if !is_valid_slug(&slug) {
                return Err(invalid_slug());
            }
            EmailAddress::parse(&format!("{slug}@{shared}")).map_err(|_| invalid_slug())
        }
        (Some(email), None) => {
            let address = EmailAddress::parse(email).map_err(|_| {
                ApiError::bad_request("invalid_request", "email is not a valid e-mail address")
            })?;
            if !shared.is_empty()
                && address.domain() == shared
                && !is_valid_slug(address.local_part())
            {
                return Err(invalid_slug());
            }
            Ok(address)
        }
    }
}

fn parse_mode(mode: &str) -> Result<AgentMode, ApiError> {
    AgentMode::parse(mode).ok_or_else(|| {
        ApiError::bad_request("invalid_request", "agent_mode must be cloud or local")
    })
}

/// `POST /v1/agents`: 201 `{id, domain, email}`.
///
/// `agent_mode` defaults to `cloud` when a `webhook_url` is given and to
/// `local` otherwise (so `{"slug": "demo"}` alone creates a polling agent).
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateAgentRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let address = requested_address(&req, &state.info.shared_domain)?;
    let webhook_url = req.webhook_url.clone().unwrap_or_default();
    if !webhook_url.is_empty() {
        check_webhook_url(&webhook_url, &url_policy(&state))?;
    }
    let agent_mode = match req.agent_mode.as_deref() {
        Some(mode) => parse_mode(mode)?,
        None if webhook_url.is_empty() => AgentMode::Local,
        None => AgentMode::Cloud,
    };
    if agent_mode == AgentMode::Cloud && webhook_url.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "cloud agents need a webhook_url",
        ));
    }
    let new = NewAgent {
        address,
        name: check_name(req.name)?.unwrap_or_default(),
        webhook_url,
        agent_mode,
    };
    let mut client = state.store.client().await?;
    let limits = account_limits::effective(&client, &caller.user_id, &state.default_limits).await?;
    let agent = agents::create(&mut client, &caller.user_id, &new, limits.max_agents)
        .await
        .map_err(|e| match e {
            CreateError::DomainNotRegistered(d) => ApiError::bad_request(
                "domain_not_registered",
                format!("domain {d} is not registered to this account"),
            ),
            CreateError::DomainNotVerified(d) => ApiError::bad_request(
                "domain_not_verified",
                format!("domain {d} is not verified yet"),
            ),
            CreateError::Duplicate => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "an agent with this address already exists",
            ),
            CreateError::Store(e) => e.into(),
        })?;
    tracing::info!(agent.id = %agent.id, "agent created");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": agent.id, "domain": agent.domain, "email": agent.id })),
    ))
}

/// The contract's `UpdateAgentRequest`, plus `name` and
/// `reject_dmarc_failures`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgentRequest {
    webhook_url: Option<String>,
    agent_mode: Option<String>,
    hitl_enabled: Option<bool>,
    hitl_ttl_seconds: Option<i64>,
    hitl_expiration_action: Option<String>,
    name: Option<String>,
    reject_dmarc_failures: Option<bool>,
}

/// `PATCH /v1/agents/{address}`: 200 with the updated agent. An empty
/// `webhook_url` clears it (refused while the agent is, or becomes, cloud).
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateAgentRequest>,
) -> Result<Json<AgentView>, ApiError> {
    let address = EmailAddress::parse(&address).map_err(|_| agent_not_found())?;
    if let Some(url) = req.webhook_url.as_deref().filter(|u| !u.is_empty()) {
        check_webhook_url(url, &url_policy(&state))?;
    }
    let hitl_ttl_seconds = match req.hitl_ttl_seconds {
        None => None,
        Some(ttl) => Some(
            i32::try_from(ttl)
                .ok()
                .filter(|t| (1..=agents::MAX_HITL_TTL_SECONDS).contains(t))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        format!(
                            "hitl_ttl_seconds must be between 1 and {}",
                            agents::MAX_HITL_TTL_SECONDS
                        ),
                    )
                })?,
        ),
    };
    let patch = AgentPatch {
        name: check_name(req.name)?,
        webhook_url: req.webhook_url,
        agent_mode: req.agent_mode.as_deref().map(parse_mode).transpose()?,
        hitl_enabled: req.hitl_enabled,
        hitl_ttl_seconds,
        hitl_expiration_action: req
            .hitl_expiration_action
            .as_deref()
            .map(|a| {
                ExpirationAction::parse(a).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        "hitl_expiration_action must be approve or reject",
                    )
                })
            })
            .transpose()?,
        reject_dmarc_failures: req.reject_dmarc_failures,
    };
    if patch.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "no recognised field to update",
        ));
    }
    let client = state.store.client().await?;
    let agent = agents::update(&client, &caller.user_id, address.as_str(), &patch)
        .await
        .map_err(agent_store_error)?;
    Ok(Json(agent.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["a", "demo", "a.b-c_d", "0x", &"a".repeat(64)] {
            assert!(is_valid_slug(ok), "{ok:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".a",
            "a.",
            "A",
            "a b",
            "a@b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!is_valid_slug(bad), "{bad:?}");
        }
    }

    #[test]
    fn webhook_urls_follow_the_policy() {
        let production = UrlPolicy::STRICT;
        let development = UrlPolicy {
            allow_http: true,
            allow_private: true,
        };
        let production_private = UrlPolicy {
            allow_http: false,
            allow_private: true,
        };
        assert!(check_webhook_url("https://hooks.example.com/x?y=1", &production).is_ok());
        assert!(check_webhook_url("http://127.0.0.1:9000/hook", &development).is_ok());
        assert!(check_webhook_url("https://10.1.2.3/hook", &production_private).is_ok());
        assert!(check_webhook_url("https://localhost/hook", &production_private).is_ok());
        for (bad, policy) in [
            ("http://hooks.example.com/", production),
            ("https://127.0.0.1/", production),
            ("https://[::1]/", production),
            ("https://localhost/", production),
            ("https://10.1.2.3/", production),
            ("https://2130706433/", production),
            ("https://[::ffff:192.168.0.1]/", production),
            ("https://receiver/hook", production),
            ("http://127.0.0.1/", production_private),
            ("http://169.254.169.254/", development),
            ("ftp://hooks.example.com/", development),
            ("/relative", development),
            ("hooks.example.com", development),
            ("https://user:pw@hooks.example.com/", development),
            ("https://exa mple.com/", development),
            ("https://", development),
        ] {
            let err = check_webhook_url(bad, &policy).unwrap_err();
            assert_eq!(err.code, "invalid_webhook_url", "{bad:?}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(check_webhook_url(&long, &development).is_err());
    }
}
