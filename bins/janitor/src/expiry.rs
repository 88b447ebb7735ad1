//! The expiry of held outbound mail (spec §3.1 "Expire", with the
//! original's flaw 10 fixed: every decision emits its event).
//!
//! Each pass takes up to `batch` holds past their `approval_expires_at`,
//! oldest first, locked `FOR UPDATE SKIP LOCKED` in one transaction
//! ([`hitl::claim_expired`]), so janitor replicas take disjoint batches
//! and a reviewer deciding one of them at the same moment either wins
//! first (the row is no longer pending, so it is not claimed) or waits for
//! this transaction and then finds it decided. Each hold is decided by its
//! agent's `hitl_expiration_action`:
//!
//! * `reject` → `expired_rejected`, reason `ttl_expired`, `email.rejected`;
//! * `approve` → composed as it was held and `expired_approved` with its
//!   mail-outbox delivery (or `sent` by loopback) and `email.approved`;
//!   rejected instead with `auto-approve failed: …` when the held message
//!   can no longer be composed, or with [`hitl::REASON_DOMAIN_NOT_VERIFIED`]
//!   when the agent's domain is not verified (the spec's rule; in this
//!   schema a defence only, as agents reference verified domains).
//!
//! The batch commits together; a database error rolls it back and the next
//! pass tries again. Passes repeat while batches come back full.

use e2a_outbound::{Settings, draft_from_held, prepare};
use e2a_store::{
    Store, StoreError,
    account_limits::Limits,
    agents, events,
    hitl::{self, Approval, Decided, Expired, Rejection, Via},
};
use tokio_util::sync::CancellationToken;

/// What one pass decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpiryReport {
    /// Holds approved by their expiry.
    pub approved: u64,
    /// Holds rejected by their expiry (including approvals that could not
    /// go out).
    pub rejected: u64,
}

/// Decides every hold past its expiry, in batches of `batch`, until none
/// is left (or `shutdown` is cancelled between batches).
pub async fn expire_once(
    store: &Store,
    settings: &Settings,
    defaults: &Limits,
    batch: i64,
    shutdown: &CancellationToken,
) -> Result<ExpiryReport, StoreError> {
    let mut report = ExpiryReport::default();
    loop {
        let mut client = store.client().await?;
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let claimed = hitl::claim_expired(&tx, batch).await?;
        let n = claimed.len();
        for expired in claimed {
            if decide(store, &tx, settings, defaults, expired).await? {
                report.approved += 1;
            } else {
                report.rejected += 1;
            }
        }
        tx.commit().await.map_err(StoreError::from)?;
        if n > 0 {
            events::wake_deliverer(store);
        }
        if (n as i64) < batch || shutdown.is_cancelled() {
            return Ok(report);
        }
    }
}

/// Decides one claimed hold in `tx`; true when it was approved.
async fn decide(
    store: &Store,
    tx: &e2a_store::Transaction<'_>,
    settings: &Settings,
    defaults: &Limits,
    expired: Expired,
) -> Result<bool, StoreError> {
    let held = &expired.held;
    if !expired.approve {
        reject(tx, &expired, hitl::REASON_TTL_EXPIRED).await?;
        return Ok(false);
    }
    if !expired.domain_verified {
        reject(tx, &expired, hitl::REASON_DOMAIN_NOT_VERIFIED).await?;
        return Ok(false);
    }
    let agent = agents::get(tx, &held.user_id, &held.agent_id).await?;
    let prepared = async {
        let draft = draft_from_held(held, &agent, settings)?;
        let rfc_message_id = held.rfc_message_id.clone();
        prepare(
            store,
            settings,
            defaults,
            &agent,
            draft,
            rfc_message_id,
            false,
        )
        .await
    }
    .await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e2a_outbound::Error::Store(e)) => return Err(e),
        Err(e) => {
            let reason = format!("auto-approve failed: {e}");
            reject(tx, &expired, &reason).await?;
            return Ok(false);
        }
    };
    let mail = prepared.mail(&held.id, &held.user_id, &agent.id, None);
    let approval = Approval {
        mail: &mail,
        reviewer: None,
        via: Via::Expiry,
        edited: false,
    };
    match hitl::approve(tx, &approval).await? {
        Decided::Done(done) => {
            metrics::counter!("e2a_janitor_hitl_expired_total", "action" => "approve").increment(1);
            tracing::info!(message.id = %held.id, agent = %agent.id, status = done.status, "expired hold approved");
            Ok(true)
        }
        // Claimed under lock, so it is still pending; kept for safety.
        Decided::NotPending { .. } => Ok(false),
    }
}

async fn reject(
    tx: &e2a_store::Transaction<'_>,
    expired: &Expired,
    reason: &str,
) -> Result<(), StoreError> {
    let held = &expired.held;
    let rejection = Rejection {
        user_id: &held.user_id,
        message_id: &held.id,
        reviewer: None,
        via: Via::Expiry,
        reason,
    };
    if let Decided::Done(_) = hitl::reject(tx, &rejection).await? {
        metrics::counter!("e2a_janitor_hitl_expired_total", "action" => "reject").increment(1);
        tracing::info!(message.id = %held.id, agent = %held.agent_id, "expired hold rejected");
    }
    Ok(())
}
