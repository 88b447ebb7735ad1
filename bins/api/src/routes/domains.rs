//! `/v1/domains…`: register, list, get, set primary, delete and verify the caller's
//! custom mail domains.
//!
//! Registering creates a pending claim with its own verification token and
//! RSA-2048 DKIM key pair (`e2a_mail::dkim_keys`, off the async executor and
//! bounded by [`AppState::keygen`]); a re-registration by the same account
//! returns the existing row without generating anything. Several accounts
//! may hold pending claims of one name: the first to verify owns it and the
//! others' claims end (see `e2a_store::domains`). A name that is — or is
//! under — another account's verified domain is `400 domain_unavailable`,
//! both to register and to verify. The configured shared domain is
//! reserved. Another user's domain is 404 on every route, like a missing
//! one; verification never un-verifies (spec §3.9).

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use e2a_mail::dkim_keys;
use e2a_store::{
    StoreError, account_limits,
    domains::{self, Claimed, DkimKeys, Domain},
    rate_limits,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    AppState,
    auth::Caller,
    dns::{Probe, RecordState},
    error::ApiError,
    extract::{ApiJson, ApiPath, rfc3339_seconds},
};

/// One DNS record to publish.
#[derive(Debug, Serialize)]
struct DnsRecordView {
    host: String,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u16>,
}

#[derive(Debug, Serialize)]
struct DnsRecordsView {
    mx: DnsRecordView,
    txt: DnsRecordView,
    #[serde(skip_serializing_if = "Option::is_none")]
    dkim: Option<DnsRecordView>,
}

/// The contract's `DomainView`.
#[derive(Debug, Serialize)]
pub struct DomainView {
    domain: String,
    verified: bool,
    verification_token: String,
    dns_records: DnsRecordsView,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    verified_at: Option<String>,
    is_primary: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_checked_at: Option<String>,
    agent_count: i64,
}

impl DomainView {
    /// The view of `d`; `mail_host` is the MX target.
    pub fn new(d: Domain, mail_host: &str) -> Self {
        let dkim = match (&d.dkim_selector, &d.dkim_public_key) {
            (Some(selector), Some(key)) => Some(DnsRecordView {
                host: format!("{selector}._domainkey.{}", d.domain),
                value: dkim_keys::dns_txt_value(key),
                priority: None,
            }),
            _ => None,
        };
        Self {
            dns_records: DnsRecordsView {
                mx: DnsRecordView {
                    host: "@".into(),
                    value: mail_host.to_owned(),
                    priority: Some(10),
                },
                txt: DnsRecordView {
                    host: "@".into(),
                    value: d.verification_token.clone(),
                    priority: None,
                },
                dkim,
            },
            domain: d.domain,
            verified: d.verified,
            verification_token: d.verification_token,
            created_at: rfc3339_seconds(d.created_at),
            verified_at: d.verified_at.map(rfc3339_seconds),
            is_primary: d.is_primary,
            last_checked_at: d.last_checked_at.map(rfc3339_seconds),
            agent_count: d.agent_count,
        }
    }
}

fn domain_not_found() -> ApiError {
    ApiError::not_found("domain")
}

fn domain_store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => domain_not_found(),
        other => other.into(),
    }
}

/// A domain named in a path, normalised; unparsable → 404.
fn path_domain(raw: &str) -> Result<String, ApiError> {
    // The same IDNA mapping as registration, so `bücher.example` finds the
    // row stored as `xn--bcher-kva.example`.
    requested_domain(raw).map_err(|_| domain_not_found())
}

/// `GET /v1/domains`: the caller's domains, newest first.
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let client = state.store.client().await?;
    let views: Vec<DomainView> = domains::list(&client, &caller.user_id)
        .await?
        .into_iter()
        .map(|d| DomainView::new(d, &state.mail_host))
        .collect();
    Ok(Json(json!({ "domains": views })))
}

/// `GET /v1/domains/{domain}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(domain): ApiPath<String>,
) -> Result<Json<DomainView>, ApiError> {
    let domain = path_domain(&domain)?;
    let client = state.store.client().await?;
    let d = domains::get(&client, &caller.user_id, &domain)
        .await
        .map_err(domain_store_error)?;
    Ok(Json(DomainView::new(d, &state.mail_host)))
}

/// `DELETE /v1/domains/{domain}`: 204; 400 `domain_has_agents` while
/// agents use it.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(domain): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let domain = path_domain(&domain)?;
    let client = state.store.client().await?;
    domains::delete(&client, &caller.user_id, &domain)
        .await
        .map_err(domain_store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The contract's `UpdateDomainRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDomainRequest {
    is_primary: Option<bool>,
}

/// `PATCH /v1/domains/{domain}`: `{"is_primary": true}` makes the domain the
/// caller's primary (any previous primary is cleared in the same
/// transaction). `false` or a missing field is 400: a user always picks a
/// new primary rather than unsetting one.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(domain): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateDomainRequest>,
) -> Result<Json<DomainView>, ApiError> {
    let domain = path_domain(&domain)?;
    if req.is_primary != Some(true) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "is_primary must be true (choose another domain as primary instead of unsetting one)",
        ));
    }
    let mut client = state.store.client().await?;
    let d = domains::set_primary(&mut client, &caller.user_id, &domain)
        .await
        .map_err(domain_store_error)?;
    tracing::info!(domain = %d.domain, "primary domain set");
    Ok(Json(DomainView::new(d, &state.mail_host)))
}

/// The contract's `RegisterDomainRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDomainRequest {
    domain: Option<String>,
}

/// A requested domain name: IDNA to ASCII, then [`domains::normalise`].
fn requested_domain(raw: &str) -> Result<String, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_domain",
            "domain must be a domain name with at least two labels of 1-63 characters, e.g. mail.example.com",
        )
    };
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 253 {
        return Err(invalid());
    }
    let ascii = idna::domain_to_ascii(raw).map_err(|_| invalid())?;
    domains::normalise(&ascii).map_err(|_| invalid())
}

/// `POST /v1/domains`: 201 `DomainView`, also for the owner's re-claim.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RegisterDomainRequest>,
) -> Result<(StatusCode, Json<DomainView>), ApiError> {
    let Some(raw) = req.domain else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "domain is required",
        ));
    };
    let domain = requested_domain(&raw)?;
    if domain == state.info.shared_domain {
        return Err(ApiError::bad_request(
            "reserved_domain",
            "this is the deployment's shared domain; create agents on it by slug",
        ));
    }
    let created = |d: Domain| {
        Ok((
            StatusCode::CREATED,
            Json(DomainView::new(d, &state.mail_host)),
        ))
    };
    let max_domains = {
        let client = state.store.client().await?;
        match domains::get(&client, &caller.user_id, &domain).await {
            Ok(existing) => return created(existing),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        if domains::verified_by_another(&client, &caller.user_id, &domain).await? {
            return Err(domain_unavailable());
        }
        let limits =
            account_limits::effective(&client, &caller.user_id, &state.default_limits).await?;
        // Refuse before the expensive key generation; `claim` re-checks
        // under the user's row lock.
        if account_limits::usage(&client, &caller.user_id)
            .await?
            .domains
            >= i64::from(limits.max_domains)
        {
            return Err(StoreError::LimitExceeded {
                what: "domains",
                limit: i64::from(limits.max_domains),
            }
            .into());
        }
        // Each registration costs an RSA key generation: limited per
        // account across all replicas (only new claims count).
        let key = format!("domain_create:{}", caller.user_id.as_str());
        let d = rate_limits::hit(&client, &key, state.limits.domain_create).await?;
        if !d.allowed {
            return Err(ApiError::rate_limited(&d));
        }
        limits.max_domains
    };
    let keys = generate_keys(&state).await?;
    let mut client = state.store.client().await?;
    match domains::claim(&mut client, &caller.user_id, &domain, &keys, max_domains).await {
        Ok(Claimed::Created(d)) => {
            tracing::info!(domain = %d.domain, "domain registered");
            created(d)
        }
        Ok(Claimed::AlreadyOwned(d)) => created(d),
        Err(StoreError::Conflict { .. }) => Err(domain_unavailable()),
        Err(e) => Err(e.into()),
    }
}

fn domain_unavailable() -> ApiError {
    ApiError::bad_request(
        "domain_unavailable",
        "this domain, or a domain it is under, is verified by another account",
    )
}

/// A fresh DKIM key pair, generated on the blocking pool with at most one
/// generation per core at a time.
async fn generate_keys(state: &AppState) -> Result<DkimKeys, ApiError> {
    let _permit = state
        .keygen
        .acquire()
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let pair = tokio::task::spawn_blocking(dkim_keys::generate_rsa_2048)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::internal(&e))?;
    Ok(DkimKeys {
        selector: dkim_keys::selector_for(OffsetDateTime::now_utc().date()),
        public_key_b64: pair.public_key_b64,
        private_key_der: pair.private_key_der,
    })
}

/// The contract's `VerifyDomainView`.
#[derive(Debug, Serialize)]
struct VerifyDomainView {
    domain: String,
    verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    verified_at: Option<String>,
    mx: RecordState,
    spf: RecordState,
    dkim: RecordState,
}

/// `POST /v1/domains/{domain}/verify`: records the attempt, probes DNS
/// (production) and marks the domain verified when the TXT token is
/// published, ending other accounts' pending claims of it. 200 when verified
/// (now or before), 412 with the same body (`verified: false`) when the
/// token is missing, 400 `domain_unavailable` when another account verified
/// the name (or a domain above it) first — that account's claim won and the
/// caller's is gone (also when it was gone before this request) — and 404
/// when the caller holds no claim of an otherwise free name.
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(domain): ApiPath<String>,
) -> Result<Response, ApiError> {
    let domain = path_domain(&domain)?;
    let current = {
        let client = state.store.client().await?;
        match domains::get(&client, &caller.user_id, &domain).await {
            Ok(current) => current,
            // The caller's claim ended because another account verified the
            // name (or a domain above it) first: say so rather than 404.
            Err(StoreError::NotFound)
                if domains::verified_by_another(&client, &caller.user_id, &domain).await? =>
            {
                return Err(domain_unavailable());
            }
            Err(e) => return Err(domain_store_error(e)),
        }
    };
    // No pooled connection is held across the DNS lookups.
    let probe = if state.production {
        Probe::run(state.dns.as_ref(), &current, &state.mail_host).await
    } else {
        Probe::development(&current)
    };
    let mut client = state.store.client().await?;
    let updated = domains::record_check(&mut client, &caller.user_id, &domain, probe.txt_found)
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => domain_unavailable(),
            other => domain_store_error(other),
        })?;
    if updated.verified && !current.verified {
        tracing::info!(domain = %updated.domain, "domain verified");
    }
    let status = if updated.verified {
        StatusCode::OK
    } else {
        StatusCode::PRECONDITION_FAILED
    };
    let view = VerifyDomainView {
        domain: updated.domain,
        verified: updated.verified,
        verified_at: updated.verified_at.map(rfc3339_seconds),
        mx: probe.mx,
        spf: probe.spf,
        dkim: probe.dkim,
    };
    Ok((status, Json(view)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_domains_are_normalised() {
        assert_eq!(
            requested_domain(" Mail.Example.COM. ").unwrap(),
            "mail.example.com"
        );
        assert_eq!(
            requested_domain("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        for bad in ["", "localhost", "a..b", "-x.com", "1.2.3.4", "exa mple.com"] {
            assert_eq!(
                requested_domain(bad).unwrap_err().code,
                "invalid_domain",
                "{bad:?}"
            );
        }
    }
}
