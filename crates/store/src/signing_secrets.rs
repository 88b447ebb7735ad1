//! Per-user signing secrets (`wsec_…`): HMAC keys that sign the inbound
//! `X-E2A-Auth-*` headers (newest secret) and, later, magic links.
//! Stored in plaintext because they are HMAC keys (both sides need them).

use deadpool_postgres::GenericClient;

use crate::{
    error::{Result, StoreError},
    ids::{SigningSecretId, UserId},
    secret, users,
};

/// A secret and its id.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    /// `wsec_…`
    pub id: SigningSecretId,
    /// 64 lowercase hex; the HMAC key is these ASCII bytes, as in the original.
    pub secret: String,
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecret")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The user's newest secret, creating one named `default` when the user has
/// none (every user always has one).
///
/// The common case is one read. Creation happens only under the user's row
/// lock (the lock every other secret write takes, so the cap of 5 holds) and
/// re-checks under it: concurrent first calls create exactly one secret and
/// all return it. Run on a pooled client (it commits its own short
/// transaction) or inside a transaction (a savepoint; the lock is then held
/// until the caller commits).
pub async fn newest_or_create(
    c: &mut impl GenericClient,
    user_id: &UserId,
) -> Result<SigningSecret> {
    if let Some(secret) = newest(c, user_id).await? {
        return Ok(secret);
    }
    let tx = c.transaction().await?;
    users::lock(&tx, user_id).await?;
    if let Some(secret) = newest(&tx, user_id).await? {
        return Ok(secret);
    }
    let created = SigningSecret {
        id: SigningSecretId::new(),
        secret: secret::random_hex::<32>(),
    };
    let insert = tx
        .prepare_cached("INSERT INTO webhook_signing_secrets (id, user_id, secret, name) VALUES ($1, $2, $3, 'default')")
        .await?;
    tx.execute(&insert, &[&created.id, user_id, &created.secret])
        .await
        .map_err(crate::error::missing_parent_is_not_found)?;
    tx.commit().await?;
    Ok(created)
}

/// The user's newest secret, if any.
async fn newest(c: &impl GenericClient, user_id: &UserId) -> Result<Option<SigningSecret>> {
    let stmt = c
        .prepare_cached(
            "SELECT id, secret FROM webhook_signing_secrets WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[user_id])
        .await?
        .map(|r| SigningSecret {
            id: r.get(0),
            secret: r.get(1),
        }))
}

/// Records that `id` signed something now (best effort for the caller).
pub async fn touch(c: &impl GenericClient, id: &SigningSecretId) -> Result<()> {
    let stmt = c
        .prepare_cached("UPDATE webhook_signing_secrets SET last_signed_at = now() WHERE id = $1")
        .await?;
    c.execute(&stmt, &[id]).await?;
    Ok(())
}

/// Every secret of the user, newest first (verification tries them all).
pub async fn all(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<SigningSecret>> {
    let stmt = c
        .prepare_cached("SELECT id, secret FROM webhook_signing_secrets WHERE user_id = $1 ORDER BY created_at DESC, id DESC")
        .await?;
    let rows = c.query(&stmt, &[user_id]).await?;
    if rows.is_empty() {
        return Err(StoreError::NotFound);
    }
    Ok(rows
        .iter()
        .map(|r| SigningSecret {
            id: r.get(0),
            secret: r.get(1),
        })
        .collect())
}

/// A user holds at most this many signing secrets (spec §3.8: enough for a
/// rotation — create new, switch receivers, delete old).
pub const MAX_PER_USER: i64 = 5;

/// Characters of a secret shown in lists (`secret_prefix`).
pub const PREFIX_LEN: usize = 12;

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 100;

/// What a list shows of a secret: never the secret itself (the original's
/// flaw 32 returned the plaintext of every secret in lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningSecretInfo {
    /// `wsec_…`
    pub id: SigningSecretId,
    /// The name given at creation (`default` for the one minted
    /// automatically).
    pub name: String,
    /// The first [`PREFIX_LEN`] characters of the secret.
    pub secret_prefix: String,
    /// Creation time.
    pub created_at: time::OffsetDateTime,
    /// When it last signed a message, if ever.
    pub last_signed_at: Option<time::OffsetDateTime>,
}

/// A secret just created: the only time its plaintext is handed out.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedSecret {
    /// What lists will show of it.
    pub info: SigningSecretInfo,
    /// The 64-hex secret.
    pub secret: String,
}

impl std::fmt::Debug for CreatedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedSecret")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Why a secret could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The user already holds [`MAX_PER_USER`] secrets.
    #[error("at most {MAX_PER_USER} signing secrets per user; delete one before creating another")]
    CapReached,
    /// Deleting it would leave the user without a secret.
    #[error("cannot delete the last signing secret; create a new one first")]
    LastSecret,
    /// No such secret of this user (another user's is the same answer).
    #[error("signing secret not found")]
    NotFound,
    /// The name is longer than [`MAX_NAME_LEN`] or has control characters.
    #[error("name must be at most {MAX_NAME_LEN} characters without control characters")]
    InvalidName,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for SecretError {
    fn from(e: tokio_postgres::Error) -> Self {
        SecretError::Store(e.into())
    }
}

fn info_from_row(r: &tokio_postgres::Row) -> SigningSecretInfo {
    let secret: &str = r.get(2);
    SigningSecretInfo {
        id: r.get(0),
        name: r.get(1),
        secret_prefix: secret.chars().take(PREFIX_LEN).collect(),
        created_at: r.get(3),
        last_signed_at: r.get(4),
    }
}

/// The user's secrets, newest first, as lists show them (prefixes only).
/// A user without any gets none (the relay mints the first on demand).
pub async fn list(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<SigningSecretInfo>> {
    let stmt = c
        .prepare_cached(
            "SELECT id, name, secret, created_at, last_signed_at FROM webhook_signing_secrets \
             WHERE user_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .await?;
    Ok(c.query(&stmt, &[user_id])
        .await?
        .iter()
        .map(info_from_row)
        .collect())
}

/// Mints a secret named `name` (trimmed; empty is allowed) for the user.
///
/// Under the user's row lock, the lock every secret write takes: the count
/// and the insert are one decision, so concurrent creations never pass
/// [`MAX_PER_USER`]. Its own short transaction on a pooled client, or a
/// savepoint inside the caller's.
pub async fn create(
    c: &mut impl GenericClient,
    user_id: &UserId,
    name: &str,
) -> std::result::Result<CreatedSecret, SecretError> {
    let name = name.trim();
    if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(SecretError::InvalidName);
    }
    let tx = c.transaction().await?;
    users::lock(&tx, user_id).await.map_err(|e| match e {
        StoreError::NotFound => SecretError::NotFound,
        other => other.into(),
    })?;
    let count: i64 = tx
        .query_one(
            &tx.prepare_cached("SELECT count(*) FROM webhook_signing_secrets WHERE user_id = $1")
                .await?,
            &[user_id],
        )
        .await?
        .get(0);
    if count >= MAX_PER_USER {
        return Err(SecretError::CapReached);
    }
    let id = SigningSecretId::new();
    let secret = secret::random_hex::<32>();
    let row = tx
        .query_one(
            &tx.prepare_cached(
                "INSERT INTO webhook_signing_secrets (id, user_id, secret, name) VALUES ($1, $2, $3, $4) \
                 RETURNING id, name, secret, created_at, last_signed_at",
            )
            .await?,
            &[&id, user_id, &secret, &name],
        )
        .await?;
    let info = info_from_row(&row);
    tx.commit().await?;
    Ok(CreatedSecret { info, secret })
}

/// Deletes the user's secret `id`, unless it is their last one.
///
/// Under the user's row lock (see [`create`]): two concurrent deletions of
/// a user's last two secrets leave one. Another user's secret is
/// [`SecretError::NotFound`], exactly like a missing one.
pub async fn delete(
    c: &mut impl GenericClient,
    user_id: &UserId,
    id: &str,
) -> std::result::Result<(), SecretError> {
    let tx = c.transaction().await?;
    users::lock(&tx, user_id).await.map_err(|e| match e {
        StoreError::NotFound => SecretError::NotFound,
        other => other.into(),
    })?;
    let rows = tx
        .query(
            &tx.prepare_cached("SELECT id FROM webhook_signing_secrets WHERE user_id = $1")
                .await?,
            &[user_id],
        )
        .await?;
    if !rows.iter().any(|r| r.get::<_, &str>(0) == id) {
        return Err(SecretError::NotFound);
    }
    if rows.len() <= 1 {
        return Err(SecretError::LastSecret);
    }
    tx.execute(
        &tx.prepare_cached("DELETE FROM webhook_signing_secrets WHERE user_id = $1 AND id = $2")
            .await?,
        &[user_id, &id],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
