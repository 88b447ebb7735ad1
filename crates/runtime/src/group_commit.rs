//! Group commit: many tasks' writes, one transaction.
//!
//! With durable commits (fsync, synchronous commit) a busy service waits on
//! one commit per write — per attempt's outcome in the deliverer, per
//! received message in the relay — and pays per statement what does not
//! depend on its rows (plan, constraint setup, commit). A [`Recorder`] lets
//! many tasks hand their writes to a few recording tasks
//! ([`Records::TASKS`]), each of which takes whatever writes are waiting (up
//! to [`MAX_BATCH`], and [`Records::MAX_BATCH_WEIGHT`]) and records them in
//! one transaction ([`Records::record_batch`]). Nothing waits to fill a
//! batch: an idle service records each write at once (on its own,
//! [`Records::record_one`]), a busy one shares commits.
//!
//! Each write keeps its guarantees: answered to its task only after its
//! commit. A batch that fails as a whole (not a serialization conflict or
//! deadlock, which the store retries) is recorded again one write at a
//! time, [`FALLBACK_CONCURRENCY`] at once, so one bad write — or one that
//! waits long for a lock — cannot hold up the others.

use std::{future::Future, sync::Arc};

use e2a_store::{Store, StoreError};
use futures::StreamExt as _;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most writes recorded in one transaction.
pub const MAX_BATCH: usize = 64;

/// Writes of a failed batch recorded at once, each on its own.
pub const FALLBACK_CONCURRENCY: usize = 4;

/// How one kind of write is stored.
pub trait Records: Send + Sync + 'static {
    /// One write, with what identifies it (a job and its lease, a message).
    type Item: Send + Sync + 'static;
    /// What recording one item answers.
    type Recorded: Send + 'static;
    /// The metric of batch sizes.
    const BATCH_METRIC: &'static str;
    /// Recording tasks (transactions in flight at once) per recorder.
    const TASKS: usize = 2;
    /// Most total [`Records::weight`] in one batch (a batch always takes at
    /// least one item, whatever its weight).
    const MAX_BATCH_WEIGHT: usize = usize::MAX;

    /// What an item counts against [`Records::MAX_BATCH_WEIGHT`] (e.g. its
    /// bytes, so that a batch's statement stays small).
    fn weight(_item: &Self::Item) -> usize {
        0
    }

    /// Records `items` in one transaction; results in the items' order.
    /// The items arrive sorted by [`Records::lock_order`].
    fn record_batch(
        store: &Store,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Recorded>, StoreError>> + Send;

    /// Records one item on its own.
    fn record_one(
        store: &Store,
        item: &Self::Item,
    ) -> impl Future<Output = Result<Self::Recorded, StoreError>> + Send;

    /// The key a batch is sorted by, so concurrent batches take their row
    /// locks in one order.
    fn lock_order(item: &Self::Item) -> &str;
}

struct Request<R: Records> {
    item: R::Item,
    reply: oneshot::Sender<Result<R::Recorded, StoreError>>,
}

/// What the recording tasks share: the waiting requests, and one taken
/// that did not fit its batch (the next task to look takes it first).
struct Waiting<R: Records> {
    receiver: mpsc::UnboundedReceiver<Request<R>>,
    carried: Option<Request<R>>,
}

/// Hands writes to the recording tasks; they end when it is dropped.
pub struct Recorder<R: Records> {
    requests: mpsc::UnboundedSender<Request<R>>,
    store: Store,
}

impl<R: Records> std::fmt::Debug for Recorder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl<R: Records> Recorder<R> {
    /// Starts [`Records::TASKS`] recording tasks on `store` (call inside a
    /// Tokio runtime).
    pub fn spawn(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting {
            receiver,
            carried: None,
        }));
        for _ in 0..R::TASKS.max(1) {
            tokio::spawn(record_loop::<R>(store.clone(), waiting.clone()));
        }
        Self { requests, store }
    }

    /// Records one write, sharing a transaction with whatever other writes
    /// are waiting. Returns once it is committed (or failed).
    pub async fn record(&self, item: R::Item) -> Result<R::Recorded, StoreError> {
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(r)) = self.requests.send(Request { item, reply }) {
            // The tasks are gone (the runtime is shutting down): record here.
            return R::record_one(&self.store, &r.item).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the recording task stopped before answering".into(),
            ))
        })
    }
}

/// Takes the next batch: the carried request or the next one to arrive,
/// then whatever else is waiting, up to [`MAX_BATCH`] and
/// [`Records::MAX_BATCH_WEIGHT`] (a request that does not fit is carried
/// for the next task to look). `None` once every sender is gone.
async fn next_batch<R: Records>(waiting: &Mutex<Waiting<R>>) -> Option<Vec<Request<R>>> {
    let mut waiting = waiting.lock().await;
    let first = match waiting.carried.take() {
        Some(first) => first,
        None => waiting.receiver.recv().await?,
    };
    let mut weight = R::weight(&first.item);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        let Ok(more) = waiting.receiver.try_recv() else {
            break;
        };
        weight = weight.saturating_add(R::weight(&more.item));
        if weight > R::MAX_BATCH_WEIGHT {
            waiting.carried = Some(more);
            break;
        }
        batch.push(more);
    }
    Some(batch)
}

/// One recording task: takes a batch of waiting requests, records it,
/// answers each; ends when every sender is gone.
async fn record_loop<R: Records>(store: Store, waiting: Arc<Mutex<Waiting<R>>>) {
    while let Some(mut batch) = next_batch(&waiting).await {
        metrics::histogram!(R::BATCH_METRIC).record(batch.len() as f64);
        batch.sort_by(|a, b| R::lock_order(&a.item).cmp(R::lock_order(&b.item)));
        let (items, replies): (Vec<R::Item>, Vec<_>) =
            batch.drain(..).map(|r| (r.item, r.reply)).unzip();
        // A lone write is recorded on its own: for a write that is one
        // statement that is one round trip instead of three.
        let result = if let [item] = items.as_slice() {
            R::record_one(&store, item).await.map(|r| vec![r])
        } else {
            R::record_batch(&store, &items).await
        };
        match result {
            Ok(recorded) => {
                for (reply, recorded) in replies.into_iter().zip(recorded) {
                    let _ = reply.send(Ok(recorded));
                }
            }
            Err(e) if items.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(batch = items.len(), error = %e2a_store::error::chain(&e), "recording a batch failed; recording its writes one by one");
                let store = &store;
                futures::stream::iter(items.iter().zip(replies))
                    .for_each_concurrent(FALLBACK_CONCURRENCY, |(item, reply)| async move {
                        let _ = reply.send(R::record_one(store, item).await);
                    })
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Mutex as StdMutex, OnceLock},
        time::Duration,
    };

    use super::*;

    /// Every batch each test's recorder stored, by test.
    type Log = StdMutex<HashMap<&'static str, Vec<Vec<u32>>>>;

    fn log() -> &'static Log {
        static LOG: OnceLock<Log> = OnceLock::new();
        LOG.get_or_init(Default::default)
    }

    fn batches(test: &'static str) -> Vec<Vec<u32>> {
        log().lock().unwrap().get(test).cloned().unwrap_or_default()
    }

    /// Stores `(test, n)`: 2n after a pause like a commit's; `13` cannot be
    /// stored, and a batch holding it fails as a whole.
    struct Doubles;

    impl Records for Doubles {
        type Item = (&'static str, u32);
        type Recorded = u32;
        const BATCH_METRIC: &'static str = "test_batch_size";
        const MAX_BATCH_WEIGHT: usize = 100;

        fn weight(item: &Self::Item) -> usize {
            item.1 as usize
        }

        async fn record_batch(_: &Store, items: &[Self::Item]) -> Result<Vec<u32>, StoreError> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let test = items[0].0;
            log()
                .lock()
                .unwrap()
                .entry(test)
                .or_default()
                .push(items.iter().map(|i| i.1).collect());
            if items.iter().any(|i| i.1 == 13) {
                return Err(StoreError::Unavailable("13 in the batch".into()));
            }
            Ok(items.iter().map(|i| i.1 * 2).collect())
        }

        async fn record_one(_: &Store, item: &Self::Item) -> Result<u32, StoreError> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if item.1 == 13 {
                return Err(StoreError::Unavailable("13".into()));
            }
            Ok(item.1 * 2)
        }

        fn lock_order(_: &Self::Item) -> &str {
            ""
        }
    }

    fn recorder() -> Arc<Recorder<Doubles>> {
        // Never connected: the fake records nothing in it.
        let store = Store::new(&e2a_store::StoreConfig::new("postgres://unused/none")).unwrap();
        Arc::new(Recorder::spawn(store))
    }

    async fn record_all(
        recorder: &Arc<Recorder<Doubles>>,
        test: &'static str,
        items: impl Iterator<Item = u32>,
    ) -> Vec<(u32, Result<u32, StoreError>)> {
        let tasks: Vec<_> = items
            .map(|n| {
                let recorder = recorder.clone();
                tokio::spawn(async move { (n, recorder.record((test, n)).await) })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn concurrent_writes_share_batches_and_each_gets_its_own_answer() {
        let recorder = recorder();
        let answers = record_all(&recorder, "shared", (0..60).map(|k| 1 + k % 5)).await;
        for (n, answer) in answers {
            assert_eq!(answer.unwrap(), n * 2);
        }
        let batches = batches("shared");
        let stored: usize = batches.iter().map(Vec::len).sum();
        assert!(stored > 0, "some writes went through a batch");
        assert!(
            batches.iter().any(|b| b.len() > 2),
            "writes waiting together share one batch: {batches:?}"
        );
        for batch in &batches {
            let weight: u32 = batch.iter().sum();
            assert!(batch.len() <= MAX_BATCH);
            assert!(weight <= 100, "a batch stays within its weight: {batch:?}");
        }
    }

    #[tokio::test]
    async fn one_failing_write_fails_alone_when_its_batch_is_retried_one_by_one() {
        let recorder = recorder();
        // Weight 1 each, so batches form; 13 fails every batch it is in.
        let items = (0..40).map(|k| if k == 17 { 13 } else { 1 });
        let answers = record_all(&recorder, "failing", items).await;
        for (n, answer) in answers {
            match n {
                13 => assert!(answer.is_err(), "the bad write is answered an error"),
                _ => assert_eq!(answer.unwrap(), 2, "every other write is stored"),
            }
        }
        assert!(
            batches("failing")
                .iter()
                .any(|b| b.len() > 1 && b.contains(&13)),
            "the bad write was batched with others at least once"
        );
    }

    #[tokio::test]
    async fn a_write_heavier_than_the_batch_weight_is_recorded_alone() {
        let recorder = recorder();
        let answers = record_all(&recorder, "heavy", [60, 70, 500, 30, 40].into_iter()).await;
        for (n, answer) in answers {
            assert_eq!(answer.unwrap(), n * 2);
        }
        for batch in batches("heavy") {
            assert!(batch.iter().sum::<u32>() <= 100, "{batch:?}");
            assert!(!batch.contains(&500), "500 went alone (record_one)");
        }
    }
}
