//! The janitor against real databases: `sweep_once` deletes exactly the
//! dead sessions (in batches), `run` serves ops and stops on cancel, and the
//! loop survives a database outage.

use std::{net::SocketAddr, time::Duration};

use e2a_janitor::{Config, Listeners, SweepReport, sweep_once};
use e2a_runtime::CancellationToken;
use e2a_store::{Store, StoreConfig, address::EmailAddress, ids::UserId, secret, sessions};
use e2a_testkit::{PrivateCluster, TestDb, http_get};
use tokio::net::TcpListener;

const PROMPT: Duration = Duration::from_secs(30);

async fn user(store: &Store, email: &str) -> UserId {
    let c = store.client().await.unwrap();
    e2a_store::users::create(&c, &EmailAddress::parse(email).unwrap(), "Test")
        .await
        .unwrap()
        .id
}

/// The first column of every row of `sql`, as strings.
async fn strings(c: &e2a_store::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A session for `user` that expired a minute ago; returns its token.
async fn expired_session(store: &Store, user: &UserId) -> String {
    let c = store.client().await.unwrap();
    let s = sessions::create(&c, user, time::Duration::hours(1))
        .await
        .unwrap();
    c.execute(
        "UPDATE user_sessions SET expires_at = now() - interval '1 minute' WHERE token_hash = $1",
        &[&secret::sha256_hex(s.token.as_bytes())],
    )
    .await
    .unwrap();
    s.token
}

async fn session_hashes(store: &Store) -> Vec<String> {
    let c = store.client().await.unwrap();
    let rows = c
        .query(
            "SELECT token_hash FROM user_sessions ORDER BY token_hash",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Polls `check` every 50 ms until it holds or [`PROMPT`] passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PROMPT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sweep_once_deletes_exactly_the_dead_sessions() {
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let bob = user(&store, "bob@example.com").await;
    let c = store.client().await.unwrap();
    let live_a = sessions::create(&c, &alice, time::Duration::hours(1))
        .await
        .unwrap();
    let live_b = sessions::create(&c, &bob, sessions::SESSION_TTL)
        .await
        .unwrap();
    let revoked = sessions::create(&c, &bob, time::Duration::hours(1))
        .await
        .unwrap();
    sessions::revoke(&c, &revoked.token).await.unwrap();
    for _ in 0..4 {
        expired_session(&store, &alice).await;
    }
    expired_session(&store, &bob).await;

    // Batch 2 with 6 dead rows: the sweep repeats until the queue is empty.
    let report = sweep_once(&store, 2).await.unwrap();
    assert_eq!(
        report,
        SweepReport {
            sessions_deleted: 6,
            ..SweepReport::default()
        }
    );
    let mut want = vec![
        secret::sha256_hex(live_a.token.as_bytes()),
        secret::sha256_hex(live_b.token.as_bytes()),
    ];
    want.sort();
    assert_eq!(session_hashes(&store).await, want);
    assert_eq!(
        sessions::authenticate(&c, &live_a.token).await.unwrap(),
        alice
    );
    assert_eq!(
        sessions::authenticate(&c, &live_b.token).await.unwrap(),
        bob
    );

    assert_eq!(
        sweep_once(&store, 1000).await.unwrap(),
        SweepReport::default(),
        "nothing left to sweep"
    );
}

#[tokio::test]
async fn expired_messages_are_swept_and_live_ones_kept() {
    use e2a_store::{
        agents::{self, AgentMode, NewAgent},
        domains,
        ids::MessageId,
        inbound::{self, Delivery, InboundMail},
    };
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.test").await.unwrap();
    let new = NewAgent {
        address: EmailAddress::parse("a@agents.test").unwrap(),
        name: String::new(),
        webhook_url: String::new(),
        agent_mode: AgentMode::Local,
    };
    agents::create(&mut c, &alice, &new, 10).await.unwrap();
    for i in 0..5 {
        let raw = format!("Message-ID: <{i}@x>\r\n\r\nbody {i}\r\n").into_bytes();
        let id = format!("{i}@x");
        let sha256 = inbound::body_sha256(&raw);
        let mail = InboundMail {
            raw: &raw,
            body_sha256: &sha256,
            email_message_id: &id,
            sender: "s@x.test",
            subject: "",
            to: &[],
            cc: &[],
            reply_to: &[],
            thread_refs: &[],
            trusted_conversation_id: None,
            spf: "none",
            dkim: "none",
            dmarc: "none",
        };
        let delivery = Delivery {
            message_id: MessageId::new(),
            agent_id: "a@agents.test".into(),
            agent_domain: "agents.test".into(),
            user_id: alice.clone(),
            auth_headers: serde_json::json!({}),
            legacy_push: false,
        };
        inbound::ingest(&store, &mail, &[delivery]).await.unwrap();
    }
    c.execute(
        "UPDATE messages SET expires_at = now() - interval '1 second' WHERE email_message_id IN ('0@x', '1@x', '2@x')",
        &[],
    )
    .await
    .unwrap();
    let report = sweep_once(&store, 2).await.unwrap();
    assert_eq!(report.messages_deleted, 3);
    let left = strings(
        &c,
        "SELECT email_message_id FROM messages ORDER BY email_message_id",
    )
    .await;
    assert_eq!(left, ["3@x", "4@x"]);
    // The storage counter followed the deletes.
    let bytes: i64 = c
        .query_one(
            "SELECT u.storage_bytes FROM users, e2a_account_usage(users.id) AS u",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let expected: i64 = c
        .query_one("SELECT sum(size_bytes)::int8 FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bytes, expected);
}

#[tokio::test]
async fn run_sweeps_at_start_serves_ops_and_stops_on_cancel() {
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let carol = user(&store, "carol@example.com").await;
    expired_session(&store, &carol).await;

    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    // Default interval (1 h): only the sweep at start can delete the row.
    let task = tokio::spawn(e2a_janitor::run(
        Config::for_database(db.url()),
        Listeners { ops },
        shutdown.clone(),
    ));

    assert_eq!(http_get(ops_addr, "/readyz").await.0, 200);
    eventually("the start-up sweep", || async {
        session_hashes(&store).await.is_empty()
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
}

/// `e2a_janitor_sweeps_total{outcome="error"}` from `/metrics`.
async fn failed_sweeps(ops: SocketAddr) -> u64 {
    let (status, body) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("e2a_janitor_sweeps_total{outcome=\"error\"} "))
        .map_or(0, |n| n.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test]
async fn the_loop_survives_a_database_outage() {
    let cluster = PrivateCluster::start().await;
    let url = cluster.database_url();
    let store = Store::new(&StoreConfig::new(url.clone())).unwrap();
    let dave = user(&store, "dave@example.com").await;

    let mut config = Config::for_database(url);
    config.janitor_interval_secs = 1;
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(e2a_janitor::run(
        config,
        Listeners { ops },
        shutdown.clone(),
    ));
    assert_eq!(http_get(ops_addr, "/readyz").await.0, 200);

    let before = failed_sweeps(ops_addr).await;
    cluster.stop().await;
    eventually("a failed sweep", || async {
        failed_sweeps(ops_addr).await > before
    })
    .await;
    assert!(!task.is_finished(), "the loop must survive the outage");

    cluster.start_again().await;
    expired_session(&store, &dave).await;
    eventually("a sweep after recovery", || async {
        session_hashes(&store).await.is_empty()
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run returns promptly")
        .unwrap()
        .unwrap();
}

/// A sweep batch that deadlocks with another transaction (here: one holding
/// the account's usage counters and then wanting an expiring message the
/// batch holds) loses, rolls back and is run again: the sweep still ends
/// with every expired message deleted and the counters exact.
#[tokio::test]
async fn a_sweep_batch_that_loses_a_deadlock_is_retried() {
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    e2a_store::domains::ensure_shared(&c, "agents.test")
        .await
        .unwrap();
    c.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode) VALUES ('a@agents.test', $1, 'agents.test', 'local')",
        &[&alice],
    )
    .await
    .unwrap();
    for i in 0..3 {
        c.execute(
            "INSERT INTO messages (id, user_id, agent_id, direction, raw_message, body_sha256, inbox_status, expires_at) \
             VALUES ($1, $2, 'a@agents.test', 'inbound', $3, repeat('a', 63) || $4, 'unread', now() - interval '1 minute')",
            &[&format!("msg_dl{i}"), &alice, &vec![b'x'; 100], &i.to_string()],
        )
        .await
        .unwrap();
    }
    // The other transaction takes the counters first.
    let mut other = db.client().await;
    let tx = other.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM account_usage WHERE user_id = $1 FOR UPDATE",
        &[&alice],
    )
    .await
    .unwrap();
    let sweep = tokio::spawn({
        let store = store.clone();
        async move { sweep_once(&store, 10).await }
    });
    // The batch now holds the expired rows and waits for the counters; the
    // other transaction wants one of those rows: a deadlock, which the
    // batch (waiting longest) detects and loses.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.execute(
        "UPDATE messages SET labels = '{x}' WHERE id = 'msg_dl0'",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = tokio::time::timeout(PROMPT, sweep)
        .await
        .unwrap()
        .unwrap()
        .expect("the sweep retried the batch");
    assert_eq!(report.messages_deleted, 3);
    let (messages, storage): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM messages), u.storage_bytes FROM e2a_account_usage($1) u",
                &[&alice],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((messages, storage), (0, 0));
}

#[tokio::test]
async fn expired_domain_claims_are_swept_and_the_rest_kept() {
    use e2a_store::domains::{self, DkimKeys};
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let bob = user(&store, "bob@example.com").await;
    let mut c = store.client().await.unwrap();
    let keys = DkimKeys {
        selector: "s".into(),
        public_key_b64: "cA==".into(),
        private_key_der: vec![0],
    };
    for (owner, name) in [
        (&alice, "old.example"),
        (&bob, "old.example"),
        (&bob, "new.example"),
        (&alice, "mine.example"),
    ] {
        domains::claim(&mut c, owner, name, &keys, 10)
            .await
            .unwrap();
    }
    domains::record_check(&mut c, &alice, "mine.example", true)
        .await
        .unwrap();
    // Everything but new.example is older than the TTL; mine.example is
    // verified, so it stays.
    let age = (domains::PENDING_CLAIM_TTL + time::Duration::hours(1)).whole_seconds() as f64;
    c.execute(
        "UPDATE domains SET created_at = now() - make_interval(secs => $1) WHERE domain <> 'new.example'",
        &[&age],
    )
    .await
    .unwrap();

    let report = sweep_once(&store, 1).await.unwrap();
    assert_eq!(report.domain_claims_deleted, 2);
    let left = strings(&c, "SELECT domain FROM domains ORDER BY domain").await;
    assert_eq!(left, ["mine.example", "new.example"]);
}

#[tokio::test]
async fn idle_rate_limit_keys_are_swept_and_busy_ones_kept() {
    use e2a_store::rate_limits::{self, Quota};
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let c = store.client().await.unwrap();
    // A key whose bucket refilled long ago, and one just spent.
    for key in ["idle", "busy"] {
        rate_limits::hit(&c, key, Quota::per_hour(1)).await.unwrap();
    }
    c.execute(
        "UPDATE rate_limits SET tat = now() - interval '1 minute' WHERE key = 'idle'",
        &[],
    )
    .await
    .unwrap();
    let report = sweep_once(&store, 1).await.unwrap();
    assert_eq!(report.rate_limits_deleted, 1);
    let left = strings(&c, "SELECT key FROM rate_limits").await;
    assert_eq!(left, ["busy"]);
    // The busy key is still limited: the sweep forgot nothing that counts.
    assert!(
        !rate_limits::hit(&c, "busy", Quota::per_hour(1))
            .await
            .unwrap()
            .allowed
    );
}

/// Events past their 30 days go once handled (a pending one stays whatever
/// its age); subscriber and legacy deliveries go past their own expiry.
#[tokio::test]
async fn expired_events_and_deliveries_are_swept_and_pending_events_kept() {
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    for (id, status, age_days) in [
        ("evt_old_done", "processed", 31),
        ("evt_old_nomatch", "no_match", 40),
        ("evt_old_pending", "pending", 45),
        ("evt_new_done", "processed", 1),
    ] {
        c.execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, status, created_at, expires_at) \
             VALUES ($1, $2, 'email.received', '{}', $3, now() - make_interval(days => $4), \
                     now() - make_interval(days => $4) + interval '30 days')",
            &[&id, &alice.as_str(), &status, &age_days],
        )
        .await
        .unwrap();
    }
    c.batch_execute(&format!(
        "INSERT INTO webhooks (id, user_id, url, events, signing_secret) \
           VALUES ('wh_1', '{alice}', 'https://example.com/h', '{{email.received}}', 'whsec_x'); \
         INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, event_payload, expires_at) \
           VALUES ('whd_old', '{alice}', 'wh_1', 'email.received', '{{}}', now() - interval '1 minute'), \
                  ('whd_new', '{alice}', 'wh_1', 'email.received', '{{}}', now() + interval '1 day');",
        alice = alice.as_str()
    ))
    .await
    .unwrap();

    // Legacy pushes hang off messages: two stored messages, one push
    // expired, one not.
    let mut cm = store.client().await.unwrap();
    e2a_store::domains::ensure_shared(&cm, "agents.test")
        .await
        .unwrap();
    let agent = e2a_store::agents::NewAgent {
        address: EmailAddress::parse("a@agents.test").unwrap(),
        name: String::new(),
        webhook_url: "https://hooks.example.com/a".into(),
        agent_mode: e2a_store::agents::AgentMode::Cloud,
    };
    e2a_store::agents::create(&mut cm, &alice, &agent, 10)
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO messages (id, user_id, agent_id, direction, body_sha256, inbox_status) \
         VALUES ('msg_legacy_old', '{alice}', 'a@agents.test', 'inbound', repeat('a', 64), 'unread'), \
                ('msg_legacy_new', '{alice}', 'a@agents.test', 'inbound', repeat('b', 64), 'unread'); \
         INSERT INTO webhook_deliveries (message_id, user_id, expires_at) \
         VALUES ('msg_legacy_old', '{alice}', now() - interval '1 minute'), \
                ('msg_legacy_new', '{alice}', now() + interval '1 hour');",
        alice = alice.as_str()
    ))
    .await
    .unwrap();

    let report = sweep_once(&store, 1).await.unwrap();
    assert_eq!(report.events_deleted, 2);
    assert_eq!(report.deliveries_deleted, 2, "one subscriber, one legacy");
    let legacy = strings(&c, "SELECT message_id FROM webhook_deliveries").await;
    assert_eq!(legacy, ["msg_legacy_new"]);
    let events = strings(&c, "SELECT id FROM webhook_events ORDER BY id").await;
    assert_eq!(events, ["evt_new_done", "evt_old_pending"]);
    let deliveries = strings(&c, "SELECT id FROM webhook_subscriber_deliveries").await;
    assert_eq!(deliveries, ["whd_new"]);
}

/// Previous webhook secrets past their grace are forgotten in batches; a
/// previous secret still in its window stays (spec §3.7).
#[tokio::test]
async fn expired_previous_webhook_secrets_are_cleared_and_valid_ones_kept() {
    use e2a_store::webhooks::{self, NewWebhook};
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let new = NewWebhook {
            url: format!("https://h{i}.example.com/"),
            events: vec!["email.received".into()],
            ..NewWebhook::default()
        };
        let id = webhooks::create(&mut c, &alice, &new, 50)
            .await
            .unwrap()
            .webhook
            .id;
        webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();
        ids.push(id);
    }
    c.execute(
        "UPDATE webhooks SET signing_secret_prev_expires_at = now() - interval '1 minute' \
         WHERE id <> $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    let report = sweep_once(&store, 1).await.unwrap();
    assert_eq!(report.webhook_secrets_cleared, 2);
    let kept = strings(
        &c,
        "SELECT id FROM webhooks WHERE signing_secret_prev IS NOT NULL",
    )
    .await;
    assert_eq!(kept, [ids[0].to_string()]);
    assert_eq!(sweep_once(&store, 1).await.unwrap(), SweepReport::default());
}

/// Idempotency keys claimed more than 24 hours ago go, completed or
/// abandoned in progress; younger ones keep answering replays (spec §3.3).
#[tokio::test]
async fn idempotency_keys_past_a_day_are_swept_and_younger_ones_kept() {
    use e2a_store::idempotency::{self, Claim, Key};
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    let hash = idempotency::request_hash("/v1/events/redeliver", b"");
    for (name, complete, age_hours) in [
        ("old-done", true, 25),
        ("old-abandoned", false, 30),
        ("young-done", true, 23),
    ] {
        let key = Key::client(name).unwrap();
        let Claim::Acquired(ticket) = idempotency::claim(&c, &alice, &key, "/x", &hash)
            .await
            .unwrap()
        else {
            panic!("fresh key not acquired");
        };
        if complete {
            idempotency::complete(&c, &ticket, 200, b"{}")
                .await
                .unwrap();
        }
        c.execute(
            "UPDATE idempotency_keys SET created_at = created_at - make_interval(hours => $2), \
               completed_at = completed_at - make_interval(hours => $2) WHERE key = $1",
            &[&key.as_str(), &age_hours],
        )
        .await
        .unwrap();
    }
    let report = sweep_once(&store, 1).await.unwrap();
    assert_eq!(
        report,
        SweepReport {
            idempotency_keys_deleted: 2,
            ..SweepReport::default()
        }
    );
    assert_eq!(
        strings(&c, "SELECT key FROM idempotency_keys").await,
        ["u:young-done"]
    );
}

/// The fast sweeps keep their own schedule: with the retention pass an
/// hour away, an expired previous secret is still cleared within seconds,
/// while a session that expired after the start-up pass waits for the
/// hourly one.
#[tokio::test]
async fn the_fast_sweeps_do_not_wait_for_the_hourly_pass() {
    use e2a_store::webhooks::{self, NewWebhook};
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice = user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    let id = webhooks::create(
        &mut c,
        &alice,
        &NewWebhook {
            url: "https://h.example.com/".into(),
            events: vec!["email.received".into()],
            ..NewWebhook::default()
        },
        50,
    )
    .await
    .unwrap()
    .webhook
    .id;
    webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();

    let mut config = Config::for_database(db.url());
    config.janitor_fast_interval_secs = 1;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(e2a_janitor::run(
        config,
        Listeners {
            ops: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        },
        shutdown.clone(),
    ));
    // Let both start-up passes finish, then expire a secret and a session.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.execute(
        "UPDATE webhooks SET signing_secret_prev_expires_at = now() - interval '1 minute'",
        &[],
    )
    .await
    .unwrap();
    expired_session(&store, &alice).await;
    eventually("the fast sweep clears the secret", || async {
        strings(
            &c,
            "SELECT id FROM webhooks WHERE signing_secret_prev IS NOT NULL",
        )
        .await
        .is_empty()
    })
    .await;
    assert_eq!(
        session_hashes(&store).await.len(),
        1,
        "retention waits for its own interval"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
