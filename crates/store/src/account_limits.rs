//! Account limits (plan caps) and current usage.
//!
//! An `account_limits` row, written by an external provisioner, overrides
//! the deployment's configured defaults for one user; without a row the
//! defaults apply. Usage is read live: agent and domain counts from their
//! tables, storage and this month's message count from `account_usage`
//! (maintained by triggers on `messages`, so it does not depend on an
//! optional usage-tracking feature as the original's monthly cap did; spread
//! over per-connection slots and summed by `e2a_account_usage`, V9).

use deadpool_postgres::GenericClient;
use serde::Serialize;

use crate::{domains, error::Result, ids::UserId};

/// The caps that apply to one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Plan name shown to the user.
    pub plan_code: String,
    /// Maximum agents.
    pub max_agents: i32,
    /// Maximum custom domains.
    pub max_domains: i32,
    /// Maximum messages (both directions) per calendar month (UTC).
    pub max_messages_month: i32,
    /// Maximum stored bytes.
    pub max_storage_bytes: i64,
    /// Maximum account-level webhooks.
    pub max_webhooks: i32,
    /// Where to send a user who hits a cap; may be empty.
    pub upgrade_url: String,
}

impl Default for Limits {
    /// The original's built-in defaults (`limits.*` in its config).
    fn default() -> Self {
        Self {
            plan_code: "default".into(),
            max_agents: 1_000_000,
            max_domains: 1_000_000,
            max_messages_month: 1_000_000_000,
            max_storage_bytes: 1 << 50,
            max_webhooks: 50,
            upgrade_url: String::new(),
        }
    }
}

/// What an account currently uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// Agents owned.
    pub agents: i64,
    /// Custom domains held: verified ones plus pending claims that have not
    /// expired.
    pub domains: i64,
    /// Messages stored this calendar month (UTC), both directions.
    pub messages_month: i64,
    /// Bytes of raw messages, bodies and attachments stored.
    pub storage_bytes: i64,
}

/// Limits from the first seven columns of `row` (the `account_limits`
/// columns in declaration order); `None` when they are NULL (no row joined).
fn limits_from_row(r: &tokio_postgres::Row) -> Option<Limits> {
    Some(Limits {
        plan_code: r.get::<_, Option<String>>(0)?,
        max_agents: r.get(1),
        max_domains: r.get(2),
        max_messages_month: r.get(3),
        max_storage_bytes: r.get(4),
        max_webhooks: r.get(5),
        upgrade_url: r.get(6),
    })
}

/// The user's limits: their `account_limits` row, else `defaults`.
pub async fn effective(
    c: &impl GenericClient,
    user_id: &UserId,
    defaults: &Limits,
) -> Result<Limits> {
    let stmt = c
        .prepare_cached(
            "SELECT plan_code, max_agents, max_domains, max_messages_month, max_storage_bytes, \
                    max_webhooks, upgrade_url \
             FROM account_limits WHERE user_id = $1",
        )
        .await?;
    let row = c.query_opt(&stmt, &[user_id]).await?;
    Ok(row
        .as_ref()
        .and_then(limits_from_row)
        .unwrap_or_else(|| defaults.clone()))
}

/// Sets the user's limits (the provisioner's write). Idempotent upsert.
pub async fn upsert(c: &impl GenericClient, user_id: &UserId, limits: &Limits) -> Result<()> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO account_limits (user_id, plan_code, max_agents, max_domains, max_messages_month, \
                                         max_storage_bytes, max_webhooks, upgrade_url, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now()) \
             ON CONFLICT (user_id) DO UPDATE SET plan_code = EXCLUDED.plan_code, \
               max_agents = EXCLUDED.max_agents, max_domains = EXCLUDED.max_domains, \
               max_messages_month = EXCLUDED.max_messages_month, \
               max_storage_bytes = EXCLUDED.max_storage_bytes, max_webhooks = EXCLUDED.max_webhooks, \
               upgrade_url = EXCLUDED.upgrade_url, updated_at = now()",
        )
        .await?;
    c.execute(
        &stmt,
        &[
            user_id,
            &limits.plan_code,
            &limits.max_agents,
            &limits.max_domains,
            &limits.max_messages_month,
            &limits.max_storage_bytes,
            &limits.max_webhooks,
            &limits.upgrade_url,
        ],
    )
    .await?;
    Ok(())
}

/// The user's limits (row or `defaults`) and usage, read in one statement
/// and one round trip (a consistent snapshot) — what `GET /v1/account` shows.
pub async fn overview(
    c: &impl GenericClient,
    user_id: &UserId,
    defaults: &Limits,
) -> Result<(Limits, Usage)> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT l.plan_code, l.max_agents, l.max_domains, l.max_messages_month, l.max_storage_bytes, \
                    l.max_webhooks, l.upgrade_url, \
                    (SELECT count(*) FROM agents WHERE user_id = $1), \
                    (SELECT count(*) FROM domains d WHERE d.user_id = $1 AND {live}), \
                    u.messages_month, u.storage_bytes \
             FROM e2a_account_usage($1) AS u LEFT JOIN account_limits l ON l.user_id = $1",
            live = domains::live_sql("d.")
        ))
        .await?;
    let r = c.query_one(&stmt, &[user_id]).await?;
    let limits = limits_from_row(&r).unwrap_or_else(|| defaults.clone());
    let usage = Usage {
        agents: r.get(7),
        domains: r.get(8),
        messages_month: r.get(9),
        storage_bytes: r.get(10),
    };
    Ok((limits, usage))
}

/// The user's current usage, read in one statement (a consistent snapshot).
pub async fn usage(c: &impl GenericClient, user_id: &UserId) -> Result<Usage> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT (SELECT count(*) FROM agents WHERE user_id = $1), \
                    (SELECT count(*) FROM domains d WHERE d.user_id = $1 AND {live}), \
                    u.messages_month, u.storage_bytes \
             FROM e2a_account_usage($1) AS u",
            live = domains::live_sql("d.")
        ))
        .await?;
    let r = c.query_one(&stmt, &[user_id]).await?;
    Ok(Usage {
        agents: r.get(0),
        domains: r.get(1),
        messages_month: r.get(2),
        storage_bytes: r.get(3),
    })
}
