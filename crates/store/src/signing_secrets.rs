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
