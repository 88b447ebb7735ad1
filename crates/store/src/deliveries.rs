//! Webhook deliveries: subscriber deliveries (one per event and matching
//! webhook, test sends, replays — `webhook_subscriber_deliveries`) and
//! legacy per-agent pushes (`webhook_deliveries`). This build holds their
//! retention; the claim/record queue arrives with the deliverer.

use deadpool_postgres::GenericClient;

use crate::error::Result;

/// Deletes up to `batch` subscriber deliveries past their `expires_at`
/// (90 days after creation: far beyond the last retry); returns how many.
/// `SKIP LOCKED`: a delivery a worker holds is left for the next pass.
pub async fn delete_expired_subscriber(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM webhook_subscriber_deliveries WHERE id IN ( \
               SELECT id FROM webhook_subscriber_deliveries WHERE expires_at <= now() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

/// Deletes up to `batch` legacy per-agent deliveries past their
/// `expires_at` (48 hours, as the original); returns how many.
pub async fn delete_expired_legacy(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM webhook_deliveries WHERE message_id IN ( \
               SELECT message_id FROM webhook_deliveries WHERE expires_at <= now() \
               ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}
