//! Bearer API-key authentication for `/v1`.
//!
//! `Authorization: Bearer <key>` (scheme matched case-insensitively; a
//! header without a scheme is taken verbatim as the key, as the original
//! did). Missing, malformed, over-long, unknown, expired and revoked keys all
//! answer 401 with the same body; a database outage answers 503, never 401
//! and never 500. Session cookies are **not** accepted on `/v1` (the
//! original's flaw 36: cookie auth with only SameSite=Lax against CSRF).

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use e2a_store::{
    StoreError,
    api_keys::{self, Principal},
    ids::{ApiKeyId, UserId},
    secret,
};

use crate::{
    AppState,
    error::ApiError,
    ratelimit::{ClientIp, LookupOutcome},
};

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's owner: every store call is scoped to this user.
    pub user_id: UserId,
    /// The key that authenticated the request.
    pub key_id: ApiKeyId,
}

/// Extracts the presented token from an `Authorization` header value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => Some(rest.trim()),
        Some(_) => None,
        None if value.is_empty() => None,
        None => Some(value),
    }
}

impl Caller {
    /// The caller `p` authenticates, recorded on the request (for the
    /// handler after a layer) and its span.
    fn authenticated(parts: &mut Parts, p: Principal) -> Self {
        tracing::Span::current().record("user.id", p.user_id.as_str());
        let caller = Caller {
            user_id: p.user_id,
            key_id: p.key_id,
        };
        parts.extensions.insert(caller.clone());
        caller
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Already authenticated by a layer (the poll limit) of this request.
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        // Exactly one Authorization header: with two, which one a proxy or
        // the application honours is ambiguous, so neither is.
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        let (only, None) = (values.next(), values.next()) else {
            return Err(ApiError::unauthorized());
        };
        let token = only
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(ApiError::unauthorized)?
            .to_owned();
        let token = token.as_str();
        if !api_keys::is_well_formed(token) {
            return Err(ApiError::unauthorized());
        }
        let key_hash = secret::sha256_hex(token.as_bytes());
        // A key found valid moments ago (see `key_cache`) costs no lookup.
        if let Some(p) = state.key_cache.get(&key_hash) {
            return Ok(Caller::authenticated(parts, p));
        }
        // Made-up keys are limited per client address before they cost a
        // lookup (see `AuthGuard`: fresh addresses pre-pay each lookup,
        // addresses with a recent success pay for failures only).
        let Ok(ip) = ClientIp::from_request_parts(parts, state).await;
        let guard = &state.limits.auth_failures;
        let ticket = guard.admit(&ip.0).map_err(|d| ApiError::rate_limited(&d))?;
        let cache_ticket = state.key_cache.ticket();
        let looked_up = match state.store.client().await {
            Ok(client) => api_keys::authenticate_hash(&client, &key_hash).await,
            Err(e) => Err(e),
        };
        match looked_up {
            Ok(p) => {
                guard.settle(&ip.0, ticket, LookupOutcome::Valid);
                state.key_cache.put(cache_ticket, &key_hash, &p);
                Ok(Caller::authenticated(parts, p))
            }
            Err(StoreError::NotFound) => {
                guard.settle(&ip.0, ticket, LookupOutcome::Invalid);
                Err(ApiError::unauthorized())
            }
            Err(e) => {
                guard.settle(&ip.0, ticket, LookupOutcome::NotDone);
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn parses_bearer_schemes() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token(""), None);
        assert_eq!(bearer_token("   "), None);
    }
}
