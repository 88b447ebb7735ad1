//! Per-user signing secrets (`wsec_…`): HMAC keys that sign the inbound
//! `X-E2A-Auth-*` headers (newest secret) and, later, magic links.
//! Stored in plaintext because they are HMAC keys (both sides need them).

use deadpool_postgres::GenericClient;

use crate::{
    error::{Result, StoreError},
    ids::{SigningSecretId, UserId},
    secret,
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
/// none (every user always has one). Concurrent first calls may each create
/// one; both are valid and the newest wins from then on.
pub async fn newest_or_create(c: &impl GenericClient, user_id: &UserId) -> Result<SigningSecret> {
    let newest = c
        .prepare_cached(
            "SELECT id, secret FROM webhook_signing_secrets WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .await?;
    if let Some(r) = c.query_opt(&newest, &[user_id]).await? {
        return Ok(SigningSecret {
            id: r.get(0),
            secret: r.get(1),
        });
    }
    let created = SigningSecret {
        id: SigningSecretId::new(),
        secret: secret::random_hex::<32>(),
    };
    let insert = c
        .prepare_cached("INSERT INTO webhook_signing_secrets (id, user_id, secret, name) VALUES ($1, $2, $3, 'default')")
        .await?;
    c.execute(&insert, &[&created.id, user_id, &created.secret])
        .await
        .map_err(crate::error::missing_parent_is_not_found)?;
    Ok(created)
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
