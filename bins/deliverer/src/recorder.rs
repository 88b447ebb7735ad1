//! Group commit of attempts' outcomes.
//!
//! Every attempt (a submission, a webhook POST) ends in a record
//! transaction, and with durable commits (fsync, synchronous commit) the
//! commit is what a busy deliverer waits on: one per attempt. A
//! [`Recorder`] lets the workers of one queue hand their outcomes to a few
//! recording tasks, each of which takes whatever outcomes are waiting (up
//! to [`MAX_BATCH`]) and records them in one transaction (the store's
//! `record_batch` of that queue: statements pipelined, one commit). Nothing
//! waits to fill a batch: an idle deliverer records each outcome at once
//! (on its own, without the batch's transaction), a busy one shares
//! commits.
//!
//! Each outcome keeps its guarantees: guarded by its own lease token,
//! answered to its worker only after its commit. A batch that fails as a
//! whole (not a serialization conflict or deadlock, which the store
//! retries) is recorded again one outcome at a time, so one bad outcome
//! cannot hold up others.

use std::{future::Future, sync::Arc};

use e2a_store::{Store, StoreError};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most outcomes recorded in one transaction.
pub const MAX_BATCH: usize = 64;

/// Recording tasks (transactions in flight at once) per recorder.
pub const TASKS: usize = 2;

/// How one queue stores its outcomes.
pub trait Records: Send + Sync + 'static {
    /// One outcome, with what identifies its job and lease.
    type Item: Send + Sync + 'static;
    /// What recording one item answers.
    type Recorded: Send + 'static;
    /// The metric of batch sizes.
    const BATCH_METRIC: &'static str;

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

/// Hands outcomes to the recording tasks; they end when it is dropped.
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
    /// Starts [`TASKS`] recording tasks on `store` (call inside a Tokio
    /// runtime).
    pub fn spawn(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..TASKS {
            tokio::spawn(record_loop::<R>(store.clone(), receiver.clone()));
        }
        Self { requests, store }
    }

    /// Records one outcome, sharing a transaction with whatever other
    /// outcomes are waiting. Returns once it is committed (or failed).
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

/// One recording task: takes a batch of waiting requests, records it,
/// answers each; ends when every sender is gone.
async fn record_loop<R: Records>(
    store: Store,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Request<R>>>>,
) {
    loop {
        let mut batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            batch
        };
        metrics::histogram!(R::BATCH_METRIC).record(batch.len() as f64);
        batch.sort_by(|a, b| R::lock_order(&a.item).cmp(R::lock_order(&b.item)));
        let (items, replies): (Vec<R::Item>, Vec<_>) =
            batch.drain(..).map(|r| (r.item, r.reply)).unzip();
        // A lone outcome is recorded on its own: for a queue whose record
        // is one statement that is one round trip instead of three.
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
                tracing::warn!(batch = items.len(), error = %e2a_store::error::chain(&e), "recording a batch failed; recording its outcomes one by one");
                for (item, reply) in items.iter().zip(replies) {
                    let _ = reply.send(R::record_one(&store, item).await);
                }
            }
        }
    }
}
