//! The claim → process → record loop shared by every queue the deliverer
//! works (webhook deliveries, legacy per-agent pushes, and outbound mail
//! next).
//!
//! A [`Queue`] knows how to claim due jobs under a lease and how to process
//! one (do the work with no transaction open, then record the outcome
//! guarded by the lease). [`run`] owns the concurrency: at most `workers`
//! jobs in flight, claiming only as many as there are free workers, so a
//! replica never holds a lease it is not working on; it claims again as
//! soon as a worker frees up (waiting a millisecond for more to free up
//! when most are busy, so one claim serves several), when woken (`LISTEN`/`NOTIFY`, the fallback
//! tick, or a [`Kick`]), and backs off a tick after a claim error. On
//! shutdown it stops claiming and waits for the jobs in flight (the
//! process-wide drain deadline bounds that wait).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::wake::WakeStats;

/// A queue of leased jobs.
pub trait Queue: Send + Sync + 'static {
    /// One claimed job (holds its lease token).
    type Job: Send + 'static;

    /// Short name for logs and metrics labels.
    fn name(&self) -> &'static str;

    /// Claims up to `max` due jobs under a lease. Fewer than `max` (or
    /// none) means nothing more is due right now.
    fn claim(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Self::Job>, e2a_store::StoreError>> + Send;

    /// Does the work of one job and records its outcome. Never panics on
    /// bad data; errors are handled (and logged) inside: a job whose
    /// outcome cannot be recorded is claimed again when its lease ends.
    fn process(&self, job: Self::Job) -> impl Future<Output = ()> + Send;
}

/// Wakes a [`run`] loop from inside the process (e.g. after a fan-out
/// created deliveries), without waiting for the database's `NOTIFY`.
#[derive(Debug, Clone, Default)]
pub struct Kick(Arc<Notify>);

impl Kick {
    /// A new kick.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the loop; a kick while it is busy is kept for its next wait.
    pub fn kick(&self) {
        self.0.notify_one();
    }

    async fn kicked(&self) {
        self.0.notified().await;
    }
}

/// How long a claim for fewer than half the workers waits for more of them
/// to free up.
const CLAIM_LINGER: Duration = Duration::from_millis(1);

/// How long to wait after a failed claim before the next one (the next
/// wake-up also ends the wait).
const CLAIM_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Works `queue` with up to `workers` jobs in flight until `shutdown`, then
/// waits for the jobs in flight and returns.
pub async fn run<Q: Queue>(
    queue: Arc<Q>,
    workers: usize,
    mut wake: watch::Receiver<WakeStats>,
    kick: Kick,
    shutdown: CancellationToken,
) {
    let workers = workers.max(1);
    let free = Arc::new(Semaphore::new(workers));
    let finished = Arc::new(Notify::new());
    let mut in_flight = JoinSet::new();
    let name = queue.name();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        while let Some(done) = in_flight.try_join_next() {
            if let Err(e) = done {
                tracing::error!(queue = name, error = %e, "a job task panicked or was cancelled");
            }
        }
        let mut want = free.available_permits();
        if want == 0 {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = finished.notified() => continue,
            }
        }
        if want < workers / 2 {
            // Most workers are busy and will free up within moments: let a
            // few more finish so one claim serves several (each claim is a
            // statement to plan and commit). An idle queue is not delayed.
            tokio::time::sleep(CLAIM_LINGER).await;
            want = free.available_permits();
        }
        let jobs = match queue.claim(want).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(queue = name, error = %e2a_store::error::chain(&e), "claim failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(CLAIM_ERROR_BACKOFF) => {}
                }
                continue;
            }
        };
        let drained = jobs.len() < want;
        for job in jobs {
            let Ok(permit) = free.clone().try_acquire_owned() else {
                // Unreachable: this loop is the only taker of permits and
                // claimed no more than were free.
                tracing::error!(queue = name, "claimed more jobs than free workers");
                break;
            };
            let queue = queue.clone();
            let finished = finished.clone();
            in_flight.spawn(async move {
                queue.process(job).await;
                drop(permit);
                finished.notify_one();
            });
        }
        if drained {
            // Nothing more due now: wait for a reason to look again. A
            // finished job may have made its webhook's next delivery
            // claimable, so that counts too.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = crate::wake::woken(&mut wake) => {}
                () = kick.kicked() => {}
                () = finished.notified() => {}
            }
        }
    }
    let n = in_flight.len();
    if n > 0 {
        tracing::info!(
            queue = name,
            in_flight = n,
            "finishing the jobs in flight before exit"
        );
    }
    while let Some(done) = in_flight.join_next().await {
        if let Err(e) = done {
            tracing::error!(queue = name, error = %e, "a job task panicked or was cancelled");
        }
    }
}

/// What to record after attempt number `attempts` ended with `outcome`: a
/// 2xx is delivered; a retryable failure is tried again after `schedule`'s
/// delay (a `Retry-After` honoured within its bound; the store turns it
/// into a final failure on the last allowed attempt); anything else is a
/// final failure. Shared by every HTTP queue.
pub fn attempt<'a>(
    outcome: &'a e2a_webhook::Outcome,
    attempts: i32,
    schedule: &e2a_webhook::RetrySchedule,
) -> e2a_store::deliveries::Attempt<'a> {
    use e2a_store::deliveries::Attempt;
    let status = i32::from(outcome.status);
    if outcome.is_success() {
        Attempt::Delivered { status }
    } else if outcome.retryable {
        let failed = u32::try_from(attempts).unwrap_or(1);
        Attempt::Retry {
            status,
            error: &outcome.error,
            at: time::OffsetDateTime::now_utc() + schedule.delay(failed, outcome.retry_after),
        }
    } else {
        Attempt::Failed {
            status,
            error: &outcome.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use e2a_store::deliveries::Attempt;
    use e2a_webhook::{Outcome, RetrySchedule};

    use super::attempt;

    fn answered(status: u16, retry_after: Option<Duration>) -> Outcome {
        Outcome::from_status(status, retry_after, Duration::ZERO, false)
    }

    #[test]
    fn outcomes_map_to_what_is_recorded() {
        let s = &RetrySchedule::SUBSCRIBER;
        let ok = answered(204, None);
        assert!(matches!(
            attempt(&ok, 1, s),
            Attempt::Delivered { status: 204 }
        ));
        let gone = answered(410, None);
        assert!(matches!(
            attempt(&gone, 1, s),
            Attempt::Failed { status: 410, .. }
        ));
        let now = time::OffsetDateTime::now_utc();
        let busy = answered(503, None);
        let Attempt::Retry { at, .. } = attempt(&busy, 2, s) else {
            panic!("503 is retried")
        };
        let wait = (at - now).whole_seconds();
        assert!(
            (300..=331).contains(&wait),
            "second failure waits 5 min + ≤10 %: {wait}"
        );
        let slow_down = answered(429, Some(Duration::from_secs(7200)));
        let Attempt::Retry { at, .. } = attempt(&slow_down, 1, s) else {
            panic!("429 is retried")
        };
        assert!((at - now).whole_seconds() >= 7200, "Retry-After honoured");
    }
}
