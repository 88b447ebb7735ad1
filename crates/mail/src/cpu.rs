//! CPU-heavy work (MIME parsing, DKIM body hashing, SHA-256) kept off the
//! async executor's worker threads.
//!
//! [`run`] waits for one of a fixed number of permits (the machine's
//! parallelism), then runs the closure with [`tokio::task::block_in_place`]:
//! the worker thread becomes a blocking thread for the duration and hands
//! its other tasks to a fresh worker, so a few 10 MiB messages cannot stall
//! every other session's `EHLO`. The permits bound how many threads do such
//! work at once. The closure may borrow (unlike `spawn_blocking`), so a
//! message is parsed and hashed in place, once.
//!
//! On a current-thread runtime (unit tests) there is no other worker to
//! hand tasks to, and the closure simply runs inline. [`run_for`] also runs
//! small inputs inline (below [`INLINE_BYTES`]), where the hand-off would
//! cost more than the work.

use std::sync::OnceLock;

use tokio::{
    runtime::{Handle, RuntimeFlavor},
    sync::Semaphore,
};

/// The permits: one per available CPU.
fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Semaphore::new(cpus.max(1))
    })
}

/// Messages smaller than this are parsed and hashed inline: the work takes
/// well under a millisecond, less than handing the worker thread off would
/// cost.
pub const INLINE_BYTES: usize = 64 * 1024;

/// Runs `work` over `bytes` of input: inline below [`INLINE_BYTES`], else
/// through [`run`].
pub async fn run_for<R>(bytes: usize, work: impl FnOnce() -> R) -> R {
    if bytes < INLINE_BYTES {
        work()
    } else {
        run(work).await
    }
}

/// Runs `work` off the executor (see the module docs) and returns its result.
pub async fn run<R>(work: impl FnOnce() -> R) -> R {
    // The semaphore is never closed, so acquiring cannot fail; if it ever
    // did, running unbounded is still correct.
    let _permit = permits().acquire().await.ok();
    let multi_thread =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_inline_on_a_current_thread_runtime() {
        let data = [1u8, 2, 3];
        assert_eq!(
            run(|| data.iter().map(|&b| u32::from(b)).sum::<u32>()).await,
            6
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_tasks_progress_while_work_blocks() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // A task that needs the executor while the work holds its thread.
        let ticker = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(()).unwrap();
        });
        let waited = run(|| rx.recv_timeout(std::time::Duration::from_secs(10))).await;
        assert!(
            waited.is_ok(),
            "the other task ran during the blocking work"
        );
        ticker.await.unwrap();
    }
}
