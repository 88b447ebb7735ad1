//! API keys: bearer credentials for the `/v1` API.
//!
//! A key is `e2a_` + 64 hex (32 bytes from `ring`'s system RNG). Its
//! plaintext is returned exactly once, by [`create`]; the database keeps only
//! its SHA-256 (unique) and a 12-character display prefix. Revocation is a
//! soft delete. [`authenticate`] rejects malformed, unknown, expired and
//! revoked keys alike and touches `last_used_at` at most once a minute.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{
    error::{Result, StoreError},
    ids::{ApiKeyId, UserId},
    secret,
};

/// Prefix of every API key.
pub const KEY_PREFIX: &str = "e2a_";
/// Length of a well-formed key: prefix plus 64 hex.
pub const KEY_LEN: usize = KEY_PREFIX.len() + 64;
/// Characters of the plaintext kept for display (`e2a_` + 8 hex).
pub const DISPLAY_PREFIX_LEN: usize = 12;
/// Maximum length of a key's name.
pub const MAX_NAME_LEN: usize = 100;

/// An API key row (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `apk_…`
    pub id: ApiKeyId,
    /// Owner.
    pub user_id: UserId,
    /// Free-form label.
    pub name: String,
    /// First 12 characters of the plaintext, for recognising the key.
    pub key_prefix: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last successful authentication, at minute resolution.
    pub last_used_at: Option<OffsetDateTime>,
    /// When the key stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// A key just created: the row plus the only copy of the plaintext.
#[derive(Clone)]
pub struct CreatedApiKey {
    /// The stored row.
    pub key: ApiKey,
    /// The plaintext key. Show it once; never log it.
    pub plaintext: String,
}

impl std::fmt::Debug for CreatedApiKey {
    /// Never prints the plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedApiKey")
            .field("key", &self.key)
            .field("plaintext", &"***")
            .finish()
    }
}

/// The channel notified at the commit of every statement that revokes,
/// deletes, re-keys, re-assigns or changes the expiry of keys (V27), so
/// caches of authenticated keys can forget them.
pub const CHANGED_CHANNEL: &str = "api_keys_changed";

/// Who a valid key authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's owner.
    pub user_id: UserId,
    /// The key used.
    pub key_id: ApiKeyId,
    /// When the key stops working (`None`: never), so a cache of
    /// authenticated keys does not outlive it.
    pub expires_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, user_id, name, key_prefix, created_at, last_used_at, expires_at";

fn from_row(row: &Row) -> ApiKey {
    ApiKey {
        id: row.get(0),
        user_id: row.get(1),
        name: row.get(2),
        key_prefix: row.get(3),
        created_at: row.get(4),
        last_used_at: row.get(5),
        expires_at: row.get(6),
    }
}

/// True when `s` has the shape of an API key (checked before any hashing or
/// database work, so garbage and over-long input cost nothing).
pub fn is_well_formed(s: &str) -> bool {
    s.len() == KEY_LEN
        && s.strip_prefix(KEY_PREFIX)
            .is_some_and(|hex| secret::is_lower_hex(hex, 64))
}

/// Creates a key for `user_id`. `expires_at`, when given, must be in the
/// future ([`StoreError::Invalid`] otherwise). [`StoreError::NotFound`] if
/// the user does not exist.
pub async fn create(
    c: &impl GenericClient,
    user_id: &UserId,
    name: &str,
    expires_at: Option<OffsetDateTime>,
) -> Result<CreatedApiKey> {
    if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "key name must be at most {MAX_NAME_LEN} characters without control characters"
        )));
    }
    if expires_at.is_some_and(|t| t <= OffsetDateTime::now_utc()) {
        return Err(StoreError::Invalid(
            "expires_at must be in the future".into(),
        ));
    }
    let plaintext = format!("{KEY_PREFIX}{}", secret::random_hex::<32>());
    let sql = format!(
        "INSERT INTO api_keys (id, user_id, name, key_prefix, key_hash, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    );
    let stmt = c.prepare_cached(&sql).await?;
    let row = c
        .query_one(
            &stmt,
            &[
                &ApiKeyId::new(),
                user_id,
                &name,
                &&plaintext[..DISPLAY_PREFIX_LEN],
                &secret::sha256_hex(plaintext.as_bytes()),
                &expires_at,
            ],
        )
        .await
        .map_err(crate::error::missing_parent_is_not_found)?;
    Ok(CreatedApiKey {
        key: from_row(&row),
        plaintext,
    })
}

/// The user's non-revoked keys, newest first.
pub async fn list(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<ApiKey>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL \
         ORDER BY created_at DESC, id DESC"
    );
    let stmt = c.prepare_cached(&sql).await?;
    Ok(c.query(&stmt, &[user_id])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Revokes the user's key `id`. [`StoreError::NotFound`] when the key does
/// not exist, belongs to someone else, or is already revoked.
pub async fn revoke(c: &impl GenericClient, user_id: &UserId, id: &ApiKeyId) -> Result<()> {
    let stmt = c
        .prepare_cached(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .await?;
    match c.execute(&stmt, &[id, user_id]).await? {
        0 => Err(StoreError::NotFound),
        _ => Ok(()),
    }
}

/// Resolves a presented key to its owner.
///
/// [`StoreError::NotFound`] for anything that is not a live key: malformed,
/// unknown, expired or revoked (no difference is observable). On success
/// `last_used_at` is set to now if it is unset or older than a minute, in the
/// same statement, so busy keys cost one write a minute, not one per request.
pub async fn authenticate(c: &impl GenericClient, presented: &str) -> Result<Principal> {
    if !is_well_formed(presented) {
        return Err(StoreError::NotFound);
    }
    authenticate_hash(c, &secret::sha256_hex(presented.as_bytes())).await
}

/// [`authenticate`] for a key the caller has already hashed
/// ([`secret::sha256_hex`] of the presented key, as stored).
pub async fn authenticate_hash(c: &impl GenericClient, key_hash: &str) -> Result<Principal> {
    let stmt = c
        .prepare_cached(
            "WITH k AS ( \
               SELECT id, user_id, expires_at FROM api_keys \
               WHERE key_hash = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > now())), \
             touched AS ( \
               UPDATE api_keys SET last_used_at = now() \
               WHERE id = (SELECT id FROM k) \
                 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute') \
               RETURNING id) \
             SELECT id, user_id, expires_at FROM k",
        )
        .await?;
    let row = c
        .query_opt(&stmt, &[&key_hash])
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(Principal {
        key_id: row.get(0),
        user_id: row.get(1),
        expires_at: row.get(2),
    })
}
