//! Webhook delivery end to end on real sockets and a real database: events
//! appended to the outbox reach a local receiver signed; retries follow the
//! schedule (time is moved by moving the delivery's due time, never by
//! sleeping); auto-disable trips in the failing attempt's transaction; two
//! deliverer processes deliver thousands of events exactly once with never
//! two requests in flight for one webhook; a deliverer killed with SIGKILL
//! mid-delivery loses nothing; SIGTERM finishes what is in flight.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use e2a_deliverer::{Config, Listeners, Wakeups};
use e2a_runtime::CancellationToken;
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    events::{self, NewEvent},
    ids::UserId,
};
use e2a_testkit::{
    TestDb,
    receiver::{Receiver, Reply, Request},
};
use tokio::{net::TcpListener, task::JoinHandle};

const PROMPT: Duration = Duration::from_secs(30);

struct Harness {
    db: TestDb,
    store: Store,
    user: UserId,
}

impl Harness {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let c = store.client().await.unwrap();
        let user = e2a_store::users::create(
            &c,
            &EmailAddress::parse("owner@example.com").unwrap(),
            "Owner",
        )
        .await
        .unwrap()
        .id;
        Self { db, store, user }
    }

    /// A webhook for every event type, posting to `url`; returns its secret.
    async fn webhook(&self, id: &str, url: &str) -> String {
        let secret = format!("whsec_{}", "ab".repeat(32));
        self.sql(
            "INSERT INTO webhooks (id, user_id, url, events, signing_secret) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&id, &self.user.as_str(), &url, &events::CATALOG, &secret],
        )
        .await;
        secret
    }

    /// Appends an `email.received` event numbered `n`; returns its id.
    async fn event(&self, n: usize) -> String {
        let id = events::deterministic_id(&[&n.to_string(), events::EMAIL_RECEIVED]);
        let envelope = serde_json::json!({
            "event": events::EMAIL_RECEIVED, "id": id, "created_at": "2026-12-03T00:00:00Z",
            "data": {"n": n},
        });
        let c = self.store.client().await.unwrap();
        events::append(
            &c,
            &NewEvent {
                id: &id,
                user_id: &self.user,
                event_type: events::EMAIL_RECEIVED,
                envelope: &envelope,
                agent_id: Some("agent@example.com"),
                conversation_id: Some("conv"),
                message_id: None,
                labels: &[],
            },
        )
        .await
        .unwrap();
        id.to_string()
    }

    async fn sql(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> u64 {
        self.store
            .client()
            .await
            .unwrap()
            .execute(sql, params)
            .await
            .unwrap()
    }

    /// (status, attempts, last_status_code, seconds from the last attempt
    /// to the next retry) of the only delivery of `event`.
    async fn delivery(&self, event: &str) -> (String, i32, Option<i32>, f64) {
        let row = self
            .store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT status, attempts, last_status_code, \
                        EXTRACT(EPOCH FROM next_retry_at - last_attempt_at)::float8 \
                   FROM webhook_subscriber_deliveries WHERE event_id = $1",
                &[&event],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    }

    /// Waits until `sql` (at most one row of one boolean; no row is false)
    /// is true.
    async fn until(&self, what: &str, sql: &str) {
        let deadline = std::time::Instant::now() + PROMPT;
        let sql = format!("SELECT COALESCE(({sql}), false)");
        loop {
            let c = self.store.client().await.unwrap();
            if c.query_one(&sql, &[]).await.unwrap().get::<_, bool>(0) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// "Time passes" for the delivery of `event`: it is due now.
    async fn make_due(&self, event: &str) {
        self.sql(
            "UPDATE webhook_subscriber_deliveries SET next_retry_at = now() WHERE event_id = $1",
            &[&event],
        )
        .await;
        self.sql(
            "UPDATE webhooks SET next_due_at = now() WHERE id IN \
               (SELECT webhook_id FROM webhook_subscriber_deliveries WHERE event_id = $1)",
            &[&event],
        )
        .await;
        self.sql("NOTIFY webhook_deliveries_new", &[]).await;
    }

    /// An in-process deliverer on this database.
    fn deliverer(&self) -> Running {
        let shutdown = CancellationToken::new();
        let config = Config::for_database(self.db.url());
        let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ops.set_nonblocking(true).unwrap();
        let ops = TcpListener::from_std(ops).unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let task = tokio::spawn(e2a_deliverer::run_with(
            config,
            Listeners { ops },
            shutdown.clone(),
            Wakeups::new(),
        ));
        Running {
            shutdown,
            task,
            ops_addr,
        }
    }

    /// A deliverer process on this database.
    fn process(&self) -> tokio::process::Child {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-deliverer"))
            .env("E2A_DATABASE_URL", self.db.url())
            .env("E2A_ENV", "development")
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{port}"))
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-deliverer")
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), e2a_runtime::BoxError>>,
    ops_addr: std::net::SocketAddr,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("the deliverer stops")
            .unwrap()
            .unwrap();
    }
}

/// An independent check of `X-E2A-Signature` from the spec's formula
/// (§4.1): `t=<unix>,v1=<hex(HMAC-SHA256(secret as bytes, "<t>." + body))>`.
fn signature_is_valid(r: &Request, secret: &str) -> bool {
    let Some(header) = r.header("x-e2a-signature") else {
        return false;
    };
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => v1.push(v.to_owned()),
            _ => return false,
        }
    }
    let Some(t) = t else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&r.body);
    let expected = data_encoding::HEXLOWER.encode(ring::hmac::sign(&key, &message).as_ref());
    v1.contains(&expected)
}

#[tokio::test]
async fn an_event_reaches_its_webhook_signed_and_is_recorded_delivered() {
    let h = Harness::new().await;
    let mut receiver = Receiver::ok().await;
    let secret = h.webhook("wh_1", &receiver.url("/hook")).await;
    let deliverer = h.deliverer();
    let event = h.event(1).await;

    let r = receiver.next().await;
    assert_eq!(r.path, "/hook");
    assert!(signature_is_valid(&r, &secret), "{:?}", r.headers);
    let mut tampered = r.clone();
    tampered.body.push(b' ');
    assert!(!signature_is_valid(&tampered, &secret));
    assert_eq!(r.header("user-agent"), Some("e2a-webhooks/1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["id"], event.as_str());
    assert_eq!(body["event"], "email.received");
    assert_eq!(body["data"]["n"], 1);

    h.until(
        "the delivery is recorded",
        "SELECT status = 'delivered' AND attempts = 1 AND last_status_code = 200 \
           FROM webhook_subscriber_deliveries",
    )
    .await;
    h.until(
        "the webhook is idle again",
        "SELECT inflight_until IS NULL AND next_due_at IS NULL AND last_delivered_at IS NOT NULL \
           FROM webhooks",
    )
    .await;
    assert!(
        receiver
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "once"
    );
    let (status, metrics) = e2a_testkit::http_get(deliverer.ops_addr, "/metrics").await;
    assert_eq!(status, 200);
    for metric in [
        "e2a_webhook_deliveries_total{outcome=\"success\"}",
        "e2a_webhook_attempt_seconds",
        "e2a_webhook_fanout_deliveries_total",
    ] {
        assert!(metrics.contains(metric), "{metric} missing from /metrics");
    }
    deliverer.stop().await;
}

#[tokio::test]
async fn retries_follow_the_schedule_and_honour_retry_after() {
    let h = Harness::new().await;
    // 503, 503, 429 with Retry-After: 2 h, then 200.
    let answers = std::sync::Mutex::new(vec![
        Reply::status(200),
        Reply::status(429).header("Retry-After", "7200"),
        Reply::status(503),
        Reply::status(503),
    ]);
    let mut receiver =
        Receiver::start(move |_| answers.lock().unwrap().pop().unwrap_or(Reply::status(200))).await;
    h.webhook("wh_1", &receiver.url("/hook")).await;
    let deliverer = h.deliverer();
    let event = h.event(1).await;

    // The subscriber schedule: 1 min, then 5 min, each plus at most 10 %.
    for (attempt, base) in [(1, 60.0), (2, 300.0)] {
        receiver.next().await;
        h.until(
            "the failure is recorded",
            &format!("SELECT attempts = {attempt} AND leased_until IS NULL FROM webhook_subscriber_deliveries"),
        )
        .await;
        let (status, attempts, code, wait) = h.delivery(&event).await;
        assert_eq!(
            (status.as_str(), attempts, code),
            ("pending", attempt, Some(503))
        );
        assert!(
            wait >= base && wait <= base * 1.1 + 5.0,
            "attempt {attempt}: next try after {wait} s, expected {base} s + ≤10 %"
        );
        assert!(
            receiver
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "nothing before the retry is due"
        );
        h.make_due(&event).await;
    }
    // Third attempt: 429 asks for 2 h, longer than the 24 min of the schedule.
    receiver.next().await;
    h.until(
        "the 429 is recorded",
        "SELECT attempts = 3 AND leased_until IS NULL FROM webhook_subscriber_deliveries",
    )
    .await;
    let (_, _, code, wait) = h.delivery(&event).await;
    assert_eq!(code, Some(429));
    assert!(
        (7200.0..7210.0).contains(&wait),
        "Retry-After honoured: {wait}"
    );
    h.make_due(&event).await;
    receiver.next().await;
    h.until(
        "delivered at the fourth attempt",
        "SELECT status = 'delivered' AND attempts = 4 FROM webhook_subscriber_deliveries",
    )
    .await;
    deliverer.stop().await;
}

#[tokio::test]
async fn a_refusal_fails_at_once_and_enough_failures_disable_the_webhook() {
    let h = Harness::new().await;
    let mut receiver = Receiver::start(|_| Reply::status(410)).await;
    h.webhook("wh_1", &receiver.url("/hook")).await;
    // Nine deliveries of the last 72 h already failed, none delivered.
    h.sql(
        "INSERT INTO webhook_subscriber_deliveries \
           (id, user_id, webhook_id, event_type, event_payload, status, attempts, last_attempt_at) \
         SELECT 'whd_old' || g, $1, 'wh_1', 'email.received', '{}', 'failed', 8, now() - interval '1 hour' \
           FROM generate_series(1, 9) g",
        &[&h.user.as_str()],
    )
    .await;
    let deliverer = h.deliverer();
    let event = h.event(1).await;

    receiver.next().await;
    h.until(
        "the refusal is final",
        "SELECT status = 'failed' FROM webhook_subscriber_deliveries WHERE event_id IS NOT NULL",
    )
    .await;
    let (_, attempts, code, _) = h.delivery(&event).await;
    assert_eq!((attempts, code), (1, Some(410)), "a 4xx is not retried");
    h.until(
        "the tenth failure disables the webhook",
        "SELECT NOT enabled AND auto_disabled_at IS NOT NULL FROM webhooks",
    )
    .await;

    // A delivery that was already queued waits while the webhook is off;
    // a new event is not queued for it at all.
    h.sql(
        "INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, event_payload) \
         VALUES ('whd_waiting', $1, 'wh_1', 'webhook.test', '{\"event\": \"webhook.test\"}')",
        &[&h.user.as_str()],
    )
    .await;
    let later = h.event(2).await;
    h.until(
        "the new event is fanned out",
        &format!("SELECT status = 'no_match' FROM webhook_events WHERE id = '{later}'"),
    )
    .await;
    assert!(
        receiver
            .next_within(Duration::from_millis(1500))
            .await
            .is_none(),
        "a disabled webhook gets nothing"
    );
    h.until(
        "the queued delivery still waits",
        "SELECT status = 'pending' AND attempts = 0 FROM webhook_subscriber_deliveries WHERE id = 'whd_waiting'",
    )
    .await;
    deliverer.stop().await;
}

#[tokio::test]
async fn two_deliverer_processes_deliver_every_event_exactly_once_one_at_a_time_per_webhook() {
    const EVENTS: usize = 1500;
    const WEBHOOKS: usize = 4;
    let h = Harness::new().await;
    // Each request is held a little so overlapping requests would show.
    let mut receiver =
        Receiver::start(|_| Reply::status(204).after(Duration::from_millis(2))).await;
    for w in 0..WEBHOOKS {
        h.webhook(&format!("wh_{w}"), &receiver.url(&format!("/hook/{w}")))
            .await;
    }
    let mut a = h.process();
    let mut b = h.process();
    let c = h.store.client().await.unwrap();
    // Events arrive over time, in batches, while both deliverers run.
    for chunk in 0..15 {
        c.execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id) \
             SELECT 'evt_' || lpad(to_hex(g), 32, '0'), $1, 'email.received', \
                    jsonb_build_object('event', 'email.received', 'id', 'evt_' || lpad(to_hex(g), 32, '0'), 'data', '{}'::jsonb), \
                    'agent@example.com' \
               FROM generate_series($2::int, $3::int) g",
            &[
                &h.user.as_str(),
                &(chunk * 100 + 1),
                &((chunk + 1) * 100),
            ],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = EVENTS * WEBHOOKS;
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    while seen.values().sum::<usize>() < total {
        let r = receiver
            .next_within(Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("only {} of {total} deliveries arrived", seen.len()));
        let id = r.json()["id"].as_str().unwrap().to_owned();
        *seen.entry((r.path.clone(), id)).or_default() += 1;
    }
    assert!(
        receiver
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    assert_eq!(seen.len(), total, "every (event, webhook)");
    assert!(seen.values().all(|&n| n == 1), "exactly once");
    assert_eq!(
        receiver.max_concurrent_per_path(),
        1,
        "never two requests in flight for one webhook"
    );
    h.until(
        "every delivery recorded",
        "SELECT count(*) FILTER (WHERE status = 'delivered' AND attempts = 1) = 6000 \
           FROM webhook_subscriber_deliveries",
    )
    .await;
    for p in [&mut a, &mut b] {
        assert!(p.try_wait().unwrap().is_none(), "both deliverers still run");
        p.start_kill().unwrap();
    }
}

#[tokio::test]
async fn a_deliverer_killed_mid_delivery_loses_nothing() {
    let h = Harness::new().await;
    // The first request is never answered in time: the process dies holding it.
    let first = std::sync::atomic::AtomicBool::new(true);
    let mut receiver = Receiver::start(move |_| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Reply::status(200).after(Duration::from_secs(600))
        } else {
            Reply::status(200)
        }
    })
    .await;
    h.webhook("wh_1", &receiver.url("/hook")).await;
    let mut doomed = h.process();
    let event = h.event(1).await;
    receiver.next().await;
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    let (status, attempts, _, _) = h.delivery(&event).await;
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 1),
        "leased, not lost"
    );

    // Nobody takes it over while the lease holds.
    let survivor = h.deliverer();
    assert!(
        receiver
            .next_within(Duration::from_millis(1500))
            .await
            .is_none()
    );
    // The lease runs out (moved, not slept): the survivor delivers.
    h.sql(
        "UPDATE webhook_subscriber_deliveries SET leased_until = now() - interval '1 second' \
          WHERE event_id = $1",
        &[&event],
    )
    .await;
    h.sql(
        "UPDATE webhooks SET inflight_until = now() - interval '1 second'",
        &[],
    )
    .await;
    let again = receiver.next().await;
    assert_eq!(again.json()["id"], event.as_str());
    h.until(
        "delivered by the survivor",
        "SELECT status = 'delivered' AND attempts = 2 FROM webhook_subscriber_deliveries",
    )
    .await;
    survivor.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_deliveries_in_flight() {
    let h = Harness::new().await;
    let mut receiver =
        Receiver::start(|_| Reply::status(200).after(Duration::from_millis(800))).await;
    for w in 0..3 {
        h.webhook(&format!("wh_{w}"), &receiver.url(&format!("/hook/{w}")))
            .await;
    }
    let deliverer = h.deliverer();
    h.event(1).await;
    let mut paths = HashSet::new();
    for _ in 0..3 {
        paths.insert(receiver.next().await.path);
    }
    assert_eq!(paths.len(), 3);
    // All three are in flight (each answer takes 800 ms); stop now.
    deliverer.stop().await;
    let c = h.store.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FILTER (WHERE leased_until IS NOT NULL) \
               FROM webhook_subscriber_deliveries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (3, 0),
        "recorded before exit"
    );
}

#[tokio::test]
async fn production_refuses_a_loopback_webhook_without_sending() {
    let h = Harness::new().await;
    let mut receiver = Receiver::ok().await;
    h.webhook("wh_1", &receiver.url("/hook")).await;
    let mut config = Config::for_database(h.db.url());
    config.common.environment = e2a_runtime::config::Environment::Production;
    let shutdown = CancellationToken::new();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let task = tokio::spawn(e2a_deliverer::run_with(
        config,
        Listeners { ops },
        shutdown.clone(),
        Wakeups::new(),
    ));
    let event = h.event(1).await;
    h.until(
        "the delivery is refused",
        "SELECT status = 'failed' FROM webhook_subscriber_deliveries",
    )
    .await;
    let row = h
        .store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT last_error, last_status_code FROM webhook_subscriber_deliveries WHERE event_id = $1",
            &[&event],
        )
        .await
        .unwrap();
    let error: String = row.get(0);
    assert!(error.starts_with("blocked:"), "{error}");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(0));
    assert!(
        receiver
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
