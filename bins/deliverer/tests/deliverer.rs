//! The deliverer's main loop against a real database: ops endpoints, LISTEN
//! wake-ups, reconnection after the listening connection is killed, and a
//! prompt clean exit on cancellation.

use std::time::Duration;

use e2a_deliverer::{Config, Listeners, WakeStats, Wakeups};
use e2a_runtime::CancellationToken;
use e2a_testkit::{TestDb, http_get};
use tokio::{net::TcpListener, sync::watch};

const PROMPT: Duration = Duration::from_secs(30);

/// Waits (bounded) until the counters satisfy `pred`.
async fn until(
    rx: &mut watch::Receiver<WakeStats>,
    what: &str,
    pred: impl FnMut(&WakeStats) -> bool,
) -> WakeStats {
    let outcome = tokio::time::timeout(PROMPT, rx.wait_for(pred))
        .await
        .map(|r| r.map(|s| s.clone()));
    match outcome {
        Ok(Ok(stats)) => stats,
        Ok(Err(_)) => panic!("wake-up counters dropped while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}; stats: {:?}", *rx.borrow()),
    }
}

#[tokio::test]
async fn listens_for_work_serves_ops_reconnects_and_stops_on_cancel() {
    let db = TestDb::new().await;
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let wakeups = Wakeups::new();
    let mut rx = wakeups.subscribe();
    let task = tokio::spawn(e2a_deliverer::run_with(
        Config::for_database(db.url()),
        Listeners { ops },
        shutdown.clone(),
        wakeups.clone(),
    ));

    until(&mut rx, "LISTEN", |s| s.listening).await;
    until(&mut rx, "a fallback tick", |s| s.ticks >= 1).await;
    assert_eq!(http_get(ops_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(ops_addr, "/readyz").await.0, 200);

    let sql = db.client().await;
    sql.batch_execute("NOTIFY webhook_events_new")
        .await
        .unwrap();
    until(&mut rx, "webhook_events_new", |s| s.webhook_events >= 1).await;
    sql.batch_execute("NOTIFY mail_outbox_new").await.unwrap();
    until(&mut rx, "mail_outbox_new", |s| s.mail_outbox >= 1).await;

    // Kill the listening connection: the loop reconnects (after 1 s) and
    // hears notifications again.
    let killed = sql
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
            &[&e2a_deliverer::wake::LISTEN_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1, "exactly one dedicated LISTEN connection");
    until(&mut rx, "reconnection", |s| s.listens >= 2 && s.listening).await;
    let before = wakeups.stats().webhook_events;
    sql.batch_execute("NOTIFY webhook_events_new")
        .await
        .unwrap();
    until(&mut rx, "webhook_events_new after reconnecting", |s| {
        s.webhook_events > before
    })
    .await;

    let cancelled_at = std::time::Instant::now();
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run returns promptly");
    result.unwrap().expect("run returns Ok");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        cancelled_at.elapsed()
    );
    assert!(!wakeups.stats().listening);
}
