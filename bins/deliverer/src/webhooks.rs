//! Account webhooks: the fan-out loop (pending events → deliveries) and the
//! delivery [`Queue`] (claim, which brings the rendered event → signed
//! POST → record).

use std::time::Duration;

use e2a_store::{
    Store, StoreError,
    deliveries::{self, Attempt, Claimed, RecordItem, Recorded},
    fanout,
};
use e2a_webhook::{Body, OutcomeKind, RetrySchedule, Secrets, WebhookClient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use e2a_runtime::group_commit::{Recorder, Records};

use crate::{
    queue::{Kick, Queue},
    wake::WakeStats,
};

/// Attempts at storing an outcome before giving up on it (the lease then
/// runs out and the delivery is attempted again: at least once).
const RECORD_TRIES: u32 = 3;

/// The subscriber delivery queue.
pub struct WebhookQueue {
    store: Store,
    client: WebhookClient,
    lease: Duration,
    recorder: Recorder<WebhookRecords>,
}

/// One attempt's outcome, for the [`Recorder`] (owned: it crosses tasks).
#[derive(Debug)]
pub struct WebhookOutcome {
    id: String,
    token: String,
    webhook_id: String,
    status: i32,
    error: String,
    kind: OutcomeClass,
}

#[derive(Debug, Clone, Copy)]
enum OutcomeClass {
    Delivered,
    Retry(time::OffsetDateTime),
    Failed,
}

impl WebhookOutcome {
    fn new(d: &Claimed, attempt: Attempt<'_>) -> Self {
        let (status, error, kind) = match attempt {
            Attempt::Delivered { status } => (status, "", OutcomeClass::Delivered),
            Attempt::Retry { status, error, at } => (status, error, OutcomeClass::Retry(at)),
            Attempt::Failed { status, error } => (status, error, OutcomeClass::Failed),
        };
        Self {
            id: d.id.clone(),
            token: d.lease_token.clone(),
            webhook_id: d.webhook_id.to_string(),
            status,
            error: error.to_owned(),
            kind,
        }
    }

    fn item(&self) -> RecordItem<'_> {
        let (status, error) = (self.status, self.error.as_str());
        RecordItem {
            id: &self.id,
            token: &self.token,
            attempt: match self.kind {
                OutcomeClass::Delivered => Attempt::Delivered { status },
                OutcomeClass::Retry(at) => Attempt::Retry { status, error, at },
                OutcomeClass::Failed => Attempt::Failed { status, error },
            },
        }
    }
}

/// Webhook outcomes are stored by [`deliveries::record_batch`], sorted by
/// webhook (each record locks its webhook's row).
#[derive(Debug)]
pub struct WebhookRecords;

impl Records for WebhookRecords {
    type Item = WebhookOutcome;
    type Recorded = Recorded;
    const BATCH_METRIC: &'static str = "e2a_webhook_record_batch_size";

    async fn record_batch(
        store: &Store,
        items: &[WebhookOutcome],
    ) -> Result<Vec<Recorded>, StoreError> {
        let items: Vec<RecordItem<'_>> = items.iter().map(WebhookOutcome::item).collect();
        deliveries::record_batch(store, &items).await
    }

    async fn record_one(store: &Store, o: &WebhookOutcome) -> Result<Recorded, StoreError> {
        let c = store.client().await?;
        let i = o.item();
        deliveries::record(&c, i.id, i.token, i.attempt).await
    }

    fn lock_order(item: &WebhookOutcome) -> &str {
        &item.webhook_id
    }
}

impl WebhookQueue {
    /// A queue delivering with `client`, leasing for `lease`. Starts its
    /// [`Recorder`] (call inside a Tokio runtime).
    pub fn new(store: Store, client: WebhookClient, lease: Duration) -> Self {
        Self {
            recorder: Recorder::spawn(store.clone()),
            store,
            client,
            lease,
        }
    }

    /// The exact bytes to POST (the claim brought the rendered envelope),
    /// or why there is nothing to send (a final failure).
    fn body(d: &Claimed) -> Result<Body, String> {
        let envelope = d
            .envelope
            .as_ref()
            .ok_or_else(|| "the event no longer exists".to_owned())?;
        Body::from_envelope(envelope).map_err(|e| e.to_string())
    }

    /// Stores `attempt` (through the [`Recorder`], sharing a commit with
    /// other workers' outcomes), retrying a failed database call a few
    /// times.
    async fn record(&self, d: &Claimed, attempt: Attempt<'_>) {
        for try_no in 1..=RECORD_TRIES {
            match self.recorder.record(WebhookOutcome::new(d, attempt)).await {
                Ok(Recorded::Stored {
                    failed,
                    auto_disabled,
                }) => {
                    if failed {
                        tracing::info!("delivery failed for good");
                    }
                    if auto_disabled {
                        metrics::counter!("e2a_webhooks_auto_disabled_total").increment(1);
                        tracing::warn!(
                            "webhook disabled: 10 or more failed deliveries and none delivered in 72 h"
                        );
                    }
                    return;
                }
                Ok(Recorded::LeaseLost) => {
                    metrics::counter!("e2a_webhook_leases_lost_total").increment(1);
                    tracing::warn!(
                        "the lease ran out before the outcome was recorded; another worker owns the delivery now"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(try_no, error = %e2a_store::error::chain(&e), "recording the outcome failed");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(try_no))).await;
                }
            }
        }
        tracing::error!(
            "outcome not recorded; the delivery will be attempted again after its lease"
        );
    }
}

impl Queue for WebhookQueue {
    type Job = Claimed;

    fn name(&self) -> &'static str {
        "webhooks"
    }

    async fn claim(&self, max: usize) -> Result<Vec<Claimed>, e2a_store::StoreError> {
        let c = self.store.client().await?;
        deliveries::claim(&c, i64::try_from(max).unwrap_or(i64::MAX), self.lease).await
    }

    async fn process(&self, d: Claimed, mut slot: crate::queue::Slot) {
        let span = tracing::info_span!(
            "webhook_delivery",
            delivery_id = %d.id,
            webhook_id = %d.webhook_id,
            event_id = d.event_id.as_deref().unwrap_or(""),
            event_type = %d.event_type,
            attempt = d.attempts,
        );
        async {
            let body = match Self::body(&d) {
                Ok(body) => body,
                Err(error) => {
                    outcome_metric(OutcomeKind::Invalid);
                    slot.recording().await;
                    self.record(
                        &d,
                        Attempt::Failed {
                            status: 0,
                            error: &error,
                        },
                    )
                    .await;
                    return;
                }
            };
            let secrets = Secrets::new(&d.secret).with_previous(d.previous_secret.as_deref());
            let outcome = self.client.send_signed(&d.url, &body, &secrets).await;
            outcome_metric(outcome.kind);
            metrics::histogram!("e2a_webhook_attempt_seconds")
                .record(outcome.elapsed.as_secs_f64());
            tracing::debug!(
                outcome = outcome.kind.as_str(),
                status = outcome.status,
                elapsed_ms = outcome.elapsed.as_millis() as u64,
                "attempted"
            );
            let attempt = crate::queue::attempt(&outcome, d.attempts, &RetrySchedule::SUBSCRIBER);
            // The worker may take its next delivery while this outcome
            // waits for its (shared, durable) commit; the webhook stays in
            // flight until then.
            slot.recording().await;
            self.record(&d, attempt).await;
        }
        .instrument(span)
        .await;
    }
}

fn outcome_metric(kind: OutcomeKind) {
    metrics::counter!("e2a_webhook_deliveries_total", "outcome" => kind.as_str()).increment(1);
}

/// Fans out pending events until `shutdown`: whenever woken, in batches of
/// `batch` until none is due, kicking `deliveries` when it created any. A
/// failed batch is retried one event per statement so a bad event is set
/// aside (see [`fanout::fan_out_one_by_one`]).
pub async fn fan_out_loop(
    store: Store,
    batch: i64,
    mut wake: watch::Receiver<WakeStats>,
    deliveries: Kick,
    shutdown: CancellationToken,
) {
    loop {
        let result = async {
            let c = store.client().await?;
            loop {
                let done = match fanout::fan_out(&c, batch).await {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::warn!(error = %e2a_store::error::chain(&e), "fan-out batch failed; going one event at a time");
                        fanout::fan_out_one_by_one(&c, batch).await?
                    }
                };
                if done.deliveries > 0 {
                    metrics::counter!("e2a_webhook_fanout_deliveries_total")
                        .increment(done.deliveries);
                    deliveries.kick();
                }
                metrics::counter!("e2a_webhook_fanout_events_total").increment(done.events);
                if done.events < u64::try_from(batch).unwrap_or(u64::MAX) || shutdown.is_cancelled()
                {
                    return Ok::<_, e2a_store::StoreError>(());
                }
            }
        };
        if let Err(e) = result.await {
            tracing::warn!(error = %e2a_store::error::chain(&e), "fan-out failed; retrying on the next wake-up");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = crate::wake::woken(&mut wake) => {}
        }
    }
}

/// Samples the queue gauges every `every` until `shutdown`: pending
/// deliveries due now, scheduled for later and in flight; pending events;
/// the age of the oldest due delivery and of the oldest pending event.
pub async fn sample_gauges(store: Store, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sampled = async {
            let c = store.client().await?;
            deliveries::queue_depth(&c).await
        };
        match sampled.await {
            Ok(d) => {
                let g = |status: &'static str, v: i64| {
                    metrics::gauge!("e2a_webhook_deliveries_queued", "status" => status)
                        .set(v as f64);
                };
                g("due", d.due);
                g("scheduled", d.scheduled);
                g("in_flight", d.in_flight);
                metrics::gauge!("e2a_webhook_events_pending").set(d.events_pending as f64);
                metrics::gauge!("e2a_webhook_oldest_due_delivery_seconds").set(d.oldest_due_secs);
                metrics::gauge!("e2a_webhook_oldest_pending_event_seconds")
                    .set(d.oldest_event_secs);
            }
            Err(e) => {
                tracing::debug!(error = %e2a_store::error::chain(&e), "sampling queue depth failed");
            }
        }
    }
}
