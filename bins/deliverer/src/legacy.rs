//! Legacy per-agent pushes (spec §3.5, §4.2): the [`Queue`] of POSTs of
//! inbound mail to a cloud agent's `webhook_url`, enqueued by the relay's
//! ingest with the message (never sent inline in the SMTP session).

use std::time::Duration;

use e2a_store::{
    Store,
    deliveries::Attempt,
    legacy_deliveries::{self, ClaimedLegacy, LegacyRecorded},
};
use e2a_webhook::{LegacyPayload, LegacyRequest, OutcomeKind, RetrySchedule, WebhookClient};
use tracing::Instrument as _;

use crate::queue::Queue;

/// The legacy push queue.
pub struct LegacyQueue {
    store: Store,
    client: WebhookClient,
    lease: Duration,
}

impl LegacyQueue {
    /// A queue posting with `client`, leasing for `lease`.
    pub fn new(store: Store, client: WebhookClient, lease: Duration) -> Self {
        Self {
            store,
            client,
            lease,
        }
    }
}

impl Queue for LegacyQueue {
    type Job = ClaimedLegacy;

    fn name(&self) -> &'static str {
        "legacy"
    }

    async fn claim(&self, max: usize) -> Result<Vec<ClaimedLegacy>, e2a_store::StoreError> {
        let c = self.store.client().await?;
        legacy_deliveries::claim_legacy(&c, i64::try_from(max).unwrap_or(i64::MAX), self.lease)
            .await
    }

    async fn process(&self, p: ClaimedLegacy, _slot: crate::queue::Slot) {
        let span = tracing::info_span!(
            "legacy_push",
            message_id = %p.message_id,
            agent_id = %p.agent_id,
            attempt = p.attempts,
        );
        async {
            let payload = LegacyPayload {
                message_id: p.message_id.as_str(),
                conversation_id: &p.conversation_id,
                from: &p.from,
                to: p.to.as_deref(),
                cc: &p.cc,
                reply_to: &p.reply_to,
                recipient: &p.recipient,
                raw_message: &p.raw_message,
                auth_headers: &p.auth_headers,
                received_at: p.received_at,
            };
            let invalid;
            let outcome;
            let attempt = match LegacyRequest::new(&payload) {
                Err(e) => {
                    invalid = e.to_string();
                    metrics::counter!("e2a_legacy_pushes_total", "outcome" => OutcomeKind::Invalid.as_str()).increment(1);
                    Attempt::Failed {
                        status: 0,
                        error: &invalid,
                    }
                }
                Ok(request) => {
                    outcome = self.client.send_legacy_request(&p.url, &request).await;
                    metrics::counter!("e2a_legacy_pushes_total", "outcome" => outcome.kind.as_str())
                        .increment(1);
                    crate::queue::attempt(&outcome, p.attempts, &RetrySchedule::LEGACY)
                }
            };
            let recorded = async {
                let c = self.store.client().await?;
                legacy_deliveries::record_legacy(&c, &p.message_id, &p.lease_token, attempt).await
            };
            match recorded.await {
                Ok(LegacyRecorded::LeaseLost) => tracing::warn!(
                    "the lease ran out before the outcome was recorded; another worker owns the push now"
                ),
                Ok(LegacyRecorded::Failed) => tracing::info!("legacy push failed for good"),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e2a_store::error::chain(&e),
                    "recording the outcome failed; the push is attempted again after its lease"
                ),
            }
        }
        .instrument(span)
        .await;
    }
}
