//! Group commit of mail attempts' outcomes.
//!
//! Every submission ends in a record transaction, and with durable commits
//! (fsync, synchronous commit) the commit is what a busy deliverer waits
//! on: one per message. The [`Recorder`] lets the mail workers hand their
//! outcomes to a few recording tasks, each of which takes whatever
//! outcomes are waiting (up to [`MAX_BATCH`]) and records them in one
//! transaction ([`mail_outbox::record_batch`]: statements pipelined, one
//! commit). Nothing waits to fill a batch: an idle deliverer records each
//! outcome at once, a busy one shares commits.
//!
//! Each outcome keeps its guarantees: guarded by its own lease token,
//! answered to its worker only after its commit. A batch that fails as a
//! whole (not a serialization conflict, which is retried) is recorded
//! again one outcome at a time, so one bad outcome cannot hold up others.

use std::sync::Arc;

use e2a_store::{
    Store, StoreError,
    mail_outbox::{self, ClaimedMail, Outcome, RecipientAnswer, RecordItem, Recorded},
};
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most outcomes recorded in one transaction.
pub const MAX_BATCH: usize = 64;

/// Recording tasks (transactions in flight at once).
pub const TASKS: usize = 2;

struct Request {
    job: Arc<ClaimedMail>,
    started: OffsetDateTime,
    outcome: Outcome,
    answers: Vec<RecipientAnswer>,
    reply: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// Hands outcomes to the recording tasks; they end when it is dropped.
#[derive(Debug)]
pub struct Recorder {
    requests: mpsc::UnboundedSender<Request>,
    store: Store,
}

impl Recorder {
    /// Starts [`TASKS`] recording tasks on `store` (call inside a Tokio
    /// runtime).
    pub fn spawn(store: Store) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..TASKS {
            tokio::spawn(record_loop(store.clone(), receiver.clone()));
        }
        Self { requests, store }
    }

    /// Records one attempt's outcome (see [`mail_outbox::record`]),
    /// sharing a transaction with whatever other outcomes are waiting.
    /// Returns once it is committed (or failed).
    pub async fn record(
        &self,
        job: Arc<ClaimedMail>,
        started: OffsetDateTime,
        outcome: Outcome,
        answers: Vec<RecipientAnswer>,
    ) -> Result<Recorded, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            job,
            started,
            outcome,
            answers,
            reply,
        };
        if let Err(mpsc::error::SendError(r)) = self.requests.send(request) {
            // The tasks are gone (the runtime is shutting down): record here.
            return mail_outbox::record(&self.store, &r.job, r.started, &r.outcome, &r.answers)
                .await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the recording task stopped before answering".into(),
            ))
        })
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("delivery_id", &self.job.delivery_id)
            .finish_non_exhaustive()
    }
}

/// One recording task: takes a batch of waiting requests, records it,
/// answers each; ends when every sender is gone.
async fn record_loop(store: Store, receiver: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
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
        metrics::histogram!("e2a_mail_record_batch_size").record(batch.len() as f64);
        let items: Vec<RecordItem<'_>> = batch
            .iter()
            .map(|r| RecordItem {
                job: &r.job,
                started_at: r.started,
                outcome: &r.outcome,
                recipients: &r.answers,
            })
            .collect();
        let result = mail_outbox::record_batch(&store, &items).await;
        drop(items);
        match result {
            Ok(recorded) => {
                for (request, recorded) in batch.into_iter().zip(recorded) {
                    let _ = request.reply.send(Ok(recorded));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(request) = batch.pop() {
                    let _ = request.reply.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(batch = batch.len(), error = %e2a_store::error::chain(&e), "recording a batch failed; recording its outcomes one by one");
                for r in batch {
                    let one =
                        mail_outbox::record(&store, &r.job, r.started, &r.outcome, &r.answers)
                            .await;
                    let _ = r.reply.send(one);
                }
            }
        }
    }
}
