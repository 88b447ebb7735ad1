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
//!
//! A job holds a worker's [`Slot`] while it works. A queue whose outcome is
//! recorded through the group-committing [`e2a_runtime::group_commit::Recorder`]
//! frees the worker once the attempt is made and only the record's commit
//! is left to wait for ([`Slot::recording`]): the worker claims its next
//! job during that commit instead of idling through an fsync. At most
//! `workers` jobs are past that point at once (each holds a recording
//! place), so a replica holds at most twice `workers` leases, and shutdown
//! waits for their records like for any job in flight.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
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

    /// Does the work of one job and records its outcome, holding `slot`
    /// (see [`Slot::recording`]). Never panics on bad data; errors are
    /// handled (and logged) inside: a job whose outcome cannot be recorded
    /// is claimed again when its lease ends.
    fn process(&self, job: Self::Job, slot: Slot) -> impl Future<Output = ()> + Send;
}

/// A job's hold on a worker of [`run`]; the worker is free again when the
/// slot is dropped or moves on to [`Slot::recording`].
#[derive(Debug)]
pub struct Slot {
    worker: Option<OwnedSemaphorePermit>,
    recording: Option<OwnedSemaphorePermit>,
    places: Arc<Semaphore>,
    finished: Arc<Notify>,
}

impl Slot {
    /// The job's attempt is made and only its outcome's record is left:
    /// waits for one of the `workers` recording places, then frees the
    /// worker for the next claim. The lease stays held (and, for a webhook,
    /// the webhook stays in flight) until the record commits; the place is
    /// given back when the slot is dropped.
    pub async fn recording(&mut self) {
        if self.worker.is_none() {
            return;
        }
        // The semaphore is never closed; if it ever were, the worker simply
        // stays held until the end of the job.
        let Ok(place) = self.places.clone().acquire_owned().await else {
            return;
        };
        self.recording = Some(place);
        self.worker = None;
        self.finished.notify_one();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.worker.take().is_some() || self.recording.take().is_some() {
            self.finished.notify_one();
        }
    }
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
    let places = Arc::new(Semaphore::new(workers));
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
            let slot = Slot {
                worker: Some(permit),
                recording: None,
                places: places.clone(),
                finished: finished.clone(),
            };
            in_flight.spawn(async move {
                queue.process(job, slot).await;
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
mod slot_tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering::SeqCst},
        },
        time::Duration,
    };

    use tokio::sync::{Semaphore, watch};
    use tokio_util::sync::CancellationToken;

    use super::{Kick, Queue, Slot, run};

    /// Jobs that make their attempt, move to recording, then wait for
    /// `records` (a closed gate until the test opens it).
    struct Gated {
        jobs: AtomicUsize,
        claimed: AtomicUsize,
        attempting: AtomicUsize,
        max_attempting: AtomicUsize,
        recording: AtomicUsize,
        done: AtomicUsize,
        records: Semaphore,
    }

    impl Queue for Gated {
        type Job = ();

        fn name(&self) -> &'static str {
            "gated"
        }

        async fn claim(&self, max: usize) -> Result<Vec<()>, e2a_store::StoreError> {
            let left = self.jobs.load(SeqCst);
            let n = left.min(max);
            self.jobs.fetch_sub(n, SeqCst);
            self.claimed.fetch_add(n, SeqCst);
            Ok(vec![(); n])
        }

        async fn process(&self, (): (), mut slot: Slot) {
            let now = self.attempting.fetch_add(1, SeqCst) + 1;
            self.max_attempting.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.attempting.fetch_sub(1, SeqCst);
            slot.recording().await;
            self.recording.fetch_add(1, SeqCst);
            self.records.acquire().await.unwrap().forget();
            self.recording.fetch_sub(1, SeqCst);
            self.done.fetch_add(1, SeqCst);
        }
    }

    async fn until(what: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A worker takes its next job while the previous outcome waits for
    /// its commit, but never more than `workers` outcomes wait at once: at
    /// most twice `workers` leases, never more than `workers` attempts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_move_on_while_outcomes_commit_within_a_bound() {
        let q = Arc::new(Gated {
            jobs: AtomicUsize::new(20),
            claimed: AtomicUsize::new(0),
            attempting: AtomicUsize::new(0),
            max_attempting: AtomicUsize::new(0),
            recording: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            records: Semaphore::new(0),
        });
        let (_tx, wake) = watch::channel(Default::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(q.clone(), 3, wake, Kick::new(), shutdown.clone()));
        until(|| q.claimed.load(SeqCst) == 6 && q.recording.load(SeqCst) == 3).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            q.claimed.load(SeqCst),
            6,
            "3 recording + 3 workers blocked on a place"
        );
        assert_eq!(q.done.load(SeqCst), 0);
        q.records.add_permits(100);
        until(|| q.done.load(SeqCst) == 20).await;
        assert!(
            q.max_attempting.load(SeqCst) <= 3,
            "never more attempts than workers"
        );
        shutdown.cancel();
        task.await.unwrap();
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
