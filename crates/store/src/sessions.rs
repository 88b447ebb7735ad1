//! Dashboard login sessions.
//!
//! The token handed to the browser is `e2s_` + 64 hex of fresh randomness;
//! only its SHA-256 is stored, so a database leak yields no usable session.
//! Lookups reject expired and revoked sessions.

use deadpool_postgres::GenericClient;
use time::{Duration, OffsetDateTime};

use crate::{
    error::{Result, StoreError},
    ids::UserId,
    secret,
};

/// Prefix of every session token.
pub const TOKEN_PREFIX: &str = "e2s_";
/// Default session lifetime (the original's `SessionTTL`).
pub const SESSION_TTL: Duration = Duration::days(7);

/// A session just issued; `token` is the only copy of the plaintext.
#[derive(Clone)]
pub struct IssuedSession {
    /// The plaintext token for the cookie. Never log it.
    pub token: String,
    /// Owner.
    pub user_id: UserId,
    /// When the session stops working.
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for IssuedSession {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSession")
            .field("token", &"***")
            .field("user_id", &self.user_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

fn well_formed(token: &str) -> bool {
    token
        .strip_prefix(TOKEN_PREFIX)
        .is_some_and(|hex| secret::is_lower_hex(hex, 64))
}

/// Issues a session for `user_id` that lasts `ttl` (must be positive).
pub async fn create(
    c: &impl GenericClient,
    user_id: &UserId,
    ttl: Duration,
) -> Result<IssuedSession> {
    if ttl <= Duration::ZERO {
        return Err(StoreError::Invalid("session TTL must be positive".into()));
    }
    let token = format!("{TOKEN_PREFIX}{}", secret::random_hex::<32>());
    let expires_at = OffsetDateTime::now_utc() + ttl;
    let stmt = c
        .prepare_cached(
            "INSERT INTO user_sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
        )
        .await?;
    c.execute(
        &stmt,
        &[&secret::sha256_hex(token.as_bytes()), user_id, &expires_at],
    )
    .await
    .map_err(crate::error::missing_parent_is_not_found)?;
    Ok(IssuedSession {
        token,
        user_id: user_id.clone(),
        expires_at,
    })
}

/// The owner of a live session. [`StoreError::NotFound`] for a malformed,
/// unknown, expired or revoked token (indistinguishable on purpose).
pub async fn authenticate(c: &impl GenericClient, token: &str) -> Result<UserId> {
    if !well_formed(token) {
        return Err(StoreError::NotFound);
    }
    let stmt = c
        .prepare_cached(
            "SELECT user_id FROM user_sessions \
             WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > now()",
        )
        .await?;
    c.query_opt(&stmt, &[&secret::sha256_hex(token.as_bytes())])
        .await?
        .map(|r| r.get(0))
        .ok_or(StoreError::NotFound)
}

/// Revokes a session (logout). Idempotent: revoking an unknown or already
/// revoked token is not an error; returns whether a live session was revoked.
pub async fn revoke(c: &impl GenericClient, token: &str) -> Result<bool> {
    if !well_formed(token) {
        return Ok(false);
    }
    let stmt = c
        .prepare_cached("UPDATE user_sessions SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL")
        .await?;
    Ok(c.execute(&stmt, &[&secret::sha256_hex(token.as_bytes())])
        .await?
        > 0)
}

/// Deletes up to `batch` expired or revoked sessions and returns how many.
///
/// Safe to run from several janitor replicas at once: rows are claimed with
/// `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other.
pub async fn delete_expired(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM user_sessions WHERE token_hash IN ( \
               SELECT token_hash FROM user_sessions \
               WHERE expires_at <= now() OR revoked_at IS NOT NULL \
               LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}
