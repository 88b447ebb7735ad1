//! The relay binary under a flood of large messages, as its own process so
//! its memory is its own: the relay-wide DATA budget holds. (Latency under
//! large messages: `tests/latency.rs`, a separate binary so the two do not
//! share the machine.)

mod common;

use std::sync::Arc;

use common::{Raw, RelayProcess, message};

/// The documented bound for this test's settings (`docs/operations.md`,
/// "Memory"): peak RSS stays under this many MiB with a 2 MiB DATA budget,
/// while the 200 sessions offer 50 MiB of message data at once.
const RSS_BOUND_MB: f64 = 48.0;

/// 200 sessions at once, each sending a message just under the size limit,
/// against a DATA budget far smaller than what they offer: every session
/// gets `250` or a temporary `4xx` (never a crash), every `250` is a stored
/// message, and the relay's peak RSS stays under the documented bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_messages_stays_within_the_data_budget() {
    const LIMIT: usize = 256 * 1024;
    const SESSIONS: usize = 200;
    let relay = RelayProcess::spawn(&[
        ("E2A_SMTP_MAX_MESSAGE_BYTES", &LIMIT.to_string()),
        ("E2A_SMTP_DATA_BUDGET_BYTES", &(2 << 20).to_string()),
        ("E2A_SMTP_MAX_CONNECTIONS_PER_IP", "1000"),
        ("E2A_DB_POOL_SIZE", "8"),
    ])
    .await;
    let mut body = message("flood@remote.test", "");
    while body.len() < LIMIT - 200 {
        body.extend_from_slice(b"flood flood flood flood flood flood flood flood flood flood\r\n");
    }
    let body = Arc::new(body);
    let barrier = Arc::new(tokio::sync::Barrier::new(SESSIONS));
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (body, barrier, addr) = (body.clone(), barrier.clone(), relay.smtp);
            tokio::spawn(async move {
                let mut s = Raw::greeted(addr).await;
                // Distinct bytes per session, so none is a retry of another.
                let mut body = (*body).clone();
                body.extend_from_slice(format!("session {i}\r\n").as_bytes());
                barrier.wait().await;
                s.send_message(&body).await
            })
        })
        .collect();
    let (mut accepted, mut deferred) = (0i64, 0i64);
    for session in sessions {
        let reply = session.await.unwrap();
        if reply.starts_with("250 ") {
            accepted += 1;
        } else {
            assert!(
                reply.starts_with("452 4.3.1 ") || reply.starts_with("451 "),
                "{reply}"
            );
            deferred += 1;
        }
    }
    let peak = relay.peak_rss_mb();
    println!("flood: {accepted} accepted, {deferred} deferred, peak RSS {peak:.1} MiB");
    assert_eq!(accepted + deferred, SESSIONS as i64);
    assert!(accepted > 0, "the budget admits messages");
    assert!(
        deferred > 0,
        "the budget deferred some of the 50 MiB offered"
    );
    assert_eq!(relay.messages().await, accepted, "every 250 is stored");
    assert!(
        peak < RSS_BOUND_MB,
        "peak RSS {peak:.1} MiB over {RSS_BOUND_MB} MiB"
    );
    // Still serving, with budget to spare again.
    let mut s = Raw::greeted(relay.smtp).await;
    s.transaction(&message("after@remote.test", "still here"))
        .await;
}
