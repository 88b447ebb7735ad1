//! `cargo xtask bench outbound`: outbound mail through the API into the
//! queue and out to a local SMTP sink with RSA-2048 DKIM, against the
//! limits of the parts it is made of, measured in the same run.
//!
//! Set-up: a durable PostgreSQL cluster for this run (`fsync`,
//! `synchronous_commit`, `full_page_writes` on), one account with one API
//! key, the shared domain with an RSA-2048 DKIM key and one agent on it.
//! The API (`e2a_api::run`, pool of 32), the deliverer
//! (`e2a_deliverer::run_with`, 32 mail workers, pool of 32) and an
//! [`SmtpSink`] (bodies not kept) run **in this process**, on one Tokio
//! runtime, so they share the machine's cores with each other and with the
//! load. Every message is the same small one (subject, ~600 bytes of text)
//! from the agent to one external recipient, `x@example.net`.
//!
//! Figures (JSON lines on stdout; progress on stderr):
//! * `accepted` — the queue pre-filled through the API with the deliverer
//!   stopped: 32 keep-alive HTTP/1.1 connections `POST
//!   /v1/agents/{agent}/messages` as fast as answers come back
//!   (`E2A_BENCH_MESSAGES`, default 3,000, after a warm-up of 64, the
//!   first of them sent alone):
//!   `req_per_s`, `p50_ms`, `p99_ms`.
//! * `delivered` — then the deliverer is started over that queue:
//!   `msgs_per_s` from the sink's first accepted message to its last (the
//!   deliverer's start-up excluded, reported as `first_delivery_ms`), goal
//!   ≥ 500. Afterwards the run **fails** unless the sink got exactly one
//!   copy of every accepted Message-ID and every delivery, message and
//!   `email.sent` event is recorded.
//! * `end_to_end` — API and deliverer at once (the deliverer idle and
//!   waiting, the queue empty): the same load again; `req_per_s` accepted
//!   and `delivered_msgs_per_s` from the first request to the sink's last
//!   message, checked the same way.
//! * `sign` (a limit) — `DkimKey::sign` of a message as stored by the API,
//!   in a loop on one thread per core for 2 s: `msgs_per_s`.
//! * `sink` (a limit) — the sink's own rate: that message signed once and
//!   submitted with `e2a_mail::submit::submit` (the deliverer's client and
//!   settings, no database) from 32 tasks to a fresh sink: `msgs_per_s`.
//! * `sql_accept` (a limit) — the rows the accept writes, as plain SQL in a
//!   second database of the cluster, from 32 connections, one transaction
//!   per message (the four INSERTs pipelined): the message, its payload,
//!   its delivery and its recipient: `msgs_per_s`. The tables are the
//!   migrated ones, so their triggers (account usage, the outbox's
//!   `NOTIFY`) run as they do under the API.
//! * `sql_accept_with_send_limit` — the same, plus the API's shared send
//!   limit (an upsert of one `rate_limits` row per agent) as the
//!   transaction's first statement, as the API does it, for 3 s.
//! * `sql_deliver` (a limit) — the deliverer's database work as plain SQL
//!   over the rows the two `sql_accept` phases left, from 32 connections
//!   until none is due: claim one due delivery (`FOR UPDATE SKIP LOCKED`,
//!   taking its send gate, leasing it and marking its message, one
//!   durable statement), then record it sent
//!   (delivery, attempt row, recipient, gate, message, `email.sent`: one
//!   durable transaction, pipelined): `msgs_per_s`.
//! * `accepted_vs_sql_accept`, `accepted_vs_sql_accept_with_send_limit`
//!   and `delivered_vs_limit` — `ratio`s; the last against the smallest of
//!   `sign`, `sink` and `sql_deliver` (named in `limit`).
//!
//! `E2A_BENCH_MESSAGES` sets the messages per phase (default 3000: about
//! a minute on a busy 2-core machine, the build not counted).

/// The services' allocator, as in the `e2a-api` and `e2a-deliverer` binaries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use e2a_runtime::CancellationToken;
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    api_keys, domains,
    migrate::{self, MigrationMode},
    users,
};
use e2a_testkit::smtp_sink::{Script, SmtpSink};
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_postgres::{Client, NoTls, types::ToSql};

/// HTTP connections, SQL connections and sink-reference tasks.
const CONNECTIONS: usize = 32;
/// The deliverer's `E2A_MAIL_WORKERS` (and its pool).
const MAIL_WORKERS: u32 = 32;
/// Warm-up sends before the measured ones.
const WARMUP: usize = 64;
const SHARED_DOMAIN: &str = "agents.bench";
const AGENT: &str = "sender@agents.bench";
const PATH: &str = "/v1/agents/sender@agents.bench/messages";
const RECIPIENT: &str = "x@example.net";
const SELECTOR: &str = "e2a202701";
/// The migrated database both databases of the run are cloned from.
const TEMPLATE: &str = "bench_outbound_tpl";
/// Where the API and the deliverer work.
const E2A_DB: &str = "bench_outbound";
/// Where the plain-SQL references work.
const SQL_DB: &str = "bench_outbound_sql";
/// Longest wait for the deliverer to empty the queue.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn ratio(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    (sorted_us[idx] as f64 / 10.0).round() / 100.0
}

async fn connect(url: &str) -> (Client, JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// The request body of every send.
fn send_body() -> Bytes {
    let text = "The numbers for the quarter are in; the summary is below and the \
                details follow in the usual place. Nothing unexpected this time. "
        .repeat(4);
    Bytes::from(
        serde_json::to_vec(&json!({
            "to": [RECIPIENT],
            "subject": "Quarterly numbers",
            "body": text,
        }))
        .unwrap(),
    )
}

// ------------------------------------------------------------------ API load

/// What the send load got back.
#[derive(Default)]
struct Sends {
    latencies_us: Vec<u64>,
    /// The `message_id` (`<…>`) of every 200.
    message_ids: Vec<String>,
    /// Non-200 answers: (status, count).
    other: Vec<(u16, u64)>,
    elapsed: Duration,
}

impl Sends {
    fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// One keep-alive connection sending `count` messages.
async fn send_connection(
    addr: SocketAddr,
    key: Arc<str>,
    body: Bytes,
    count: usize,
) -> (Vec<u64>, Vec<String>, Vec<u16>) {
    let stream = TcpStream::connect(addr).await.expect("connect to the API");
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let (mut latencies, mut ids, mut other) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::new(),
    );
    for _ in 0..count {
        let req = Request::post(PATH)
            .header("host", "bench")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .unwrap();
        let started = Instant::now();
        let resp = sender.send_request(req).await.expect("send request");
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes();
        latencies.push(started.elapsed().as_micros() as u64);
        if status == 200 {
            let v: Value = serde_json::from_slice(&bytes).expect("JSON answer");
            assert_eq!(v["status"], "queued", "{v}");
            ids.push(v["message_id"].as_str().expect("message_id").to_owned());
        } else {
            if other.is_empty() {
                eprintln!(
                    "bench outbound: the API answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            other.push(status);
        }
    }
    (latencies, ids, other)
}

/// `count` sends over [`CONNECTIONS`] connections.
async fn send_load(addr: SocketAddr, key: &Arc<str>, body: &Bytes, count: usize) -> Sends {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let share = count / CONNECTIONS + usize::from(i < count % CONNECTIONS);
            tokio::spawn(send_connection(addr, key.clone(), body.clone(), share))
        })
        .collect();
    let mut sends = Sends::default();
    for t in tasks {
        let (latencies, ids, other) = t.await.expect("send task");
        sends.latencies_us.extend(latencies);
        sends.message_ids.extend(ids);
        for status in other {
            match sends.other.iter_mut().find(|(s, _)| *s == status) {
                Some((_, n)) => *n += 1,
                None => sends.other.push((status, 1)),
            }
        }
    }
    sends.elapsed = started.elapsed();
    sends.latencies_us.sort_unstable();
    sends
}

// ------------------------------------------------------------- the services

struct Service {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), e2a_runtime::BoxError>>,
}

impl Service {
    async fn stop(self, what: &str) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap_or_else(|_| panic!("{what} did not stop in time"))
            .expect("service task")
            .unwrap_or_else(|e| panic!("{what} stopped with an error: {e}"));
    }
}

fn ops_listener() -> tokio::net::TcpListener {
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    ops.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(ops).unwrap()
}

/// The API on a port-0 listener; returns it and its address.
async fn start_api(url: &str) -> (Service, SocketAddr) {
    let mut config = e2a_api::Config::for_database(url);
    config.shared_domain = SHARED_DOMAIN.into();
    config.common.migration_mode = MigrationMode::Verify;
    config.common.db.db_pool_size = CONNECTIONS as u32;
    config.common.db.db_acquire_timeout_ms = 5000;
    // The shared send limit must not be what caps the bench.
    config.rates.send_per_minute = 1_000_000_000;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(e2a_api::run(
        config,
        e2a_api::Listeners {
            http,
            ops: ops_listener(),
        },
        shutdown.clone(),
    ));
    (Service { shutdown, task }, addr)
}

/// The deliverer's configuration, submitting to `sink`.
fn deliverer_config(url: &str, sink: &SmtpSink) -> e2a_deliverer::Config {
    let mut config = e2a_deliverer::Config::for_database(url);
    config.common.migration_mode = MigrationMode::Verify;
    config.common.db.db_pool_size = MAIL_WORKERS;
    config.common.db.db_acquire_timeout_ms = 5000;
    config.mail_workers = MAIL_WORKERS;
    config.outbound_smtp_host = sink.host();
    config.outbound_smtp_port = sink.port();
    config.outbound_smtp_tls = "none".into();
    config
}

fn start_deliverer(url: &str, sink: &SmtpSink) -> Service {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(e2a_deliverer::run_with(
        deliverer_config(url, sink),
        e2a_deliverer::Listeners {
            ops: ops_listener(),
        },
        shutdown.clone(),
        e2a_deliverer::Wakeups::new(),
    ));
    Service { shutdown, task }
}

// ----------------------------------------------------------------- database

/// Migrates [`TEMPLATE`] and clones it into [`E2A_DB`] and [`SQL_DB`].
async fn create_databases(cluster: &e2a_testkit::cluster::Cluster, admin: &Client) {
    admin
        .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
        .await
        .unwrap();
    let (mut client, task) = connect(&cluster.url(TEMPLATE)).await;
    migrate::run(&mut client, MigrationMode::Auto)
        .await
        .expect("migrating the bench template");
    drop(client);
    let _ = task.await;
    for db in [E2A_DB, SQL_DB] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {TEMPLATE}"))
            .await
            .unwrap();
    }
}

/// The account, its key, the shared domain and the agent in `url`; with
/// `dkim`, the domain's key too. Returns the API key and the key's DER.
async fn seed(url: &str, dkim: bool) -> (String, Vec<u8>) {
    let store = Store::new(&StoreConfig {
        pool_size: 1,
        ..StoreConfig::new(url)
    })
    .unwrap();
    let mut c = store.client().await.unwrap();
    let user = users::create(
        &c,
        &EmailAddress::parse("bench@example.com").unwrap(),
        "Bench",
    )
    .await
    .unwrap();
    let key = api_keys::create(&c, &user.id, "bench", None)
        .await
        .unwrap()
        .plaintext;
    domains::ensure_shared(&c, SHARED_DOMAIN).await.unwrap();
    let mut der = Vec::new();
    if dkim {
        let pair = tokio::task::spawn_blocking(e2a_mail::dkim_keys::generate_rsa_2048)
            .await
            .unwrap()
            .unwrap();
        der.clone_from(&pair.private_key_der);
        let keys = domains::DkimKeys {
            selector: SELECTOR.into(),
            public_key_b64: pair.public_key_b64,
            private_key_der: pair.private_key_der,
        };
        assert!(
            domains::set_dkim_keys_if_missing(&c, SHARED_DOMAIN, &keys)
                .await
                .unwrap()
        );
    }
    agents::create(
        &mut c,
        &user.id,
        &NewAgent {
            address: EmailAddress::parse(AGENT).unwrap(),
            name: "Bench Sender".into(),
            webhook_url: String::new(),
            agent_mode: AgentMode::Local,
        },
        10,
    )
    .await
    .unwrap();
    (key, der)
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until the sink holds `total` messages and the database has
/// recorded them all; returns when the sink's count first moved and when
/// it reached `total`. Fails loudly when a message is missing, one of
/// `ids` arrived other than once, or an outcome is not recorded.
async fn await_delivery(
    sink: &SmtpSink,
    c: &Client,
    total: usize,
    ids: &[String],
) -> (Instant, Instant) {
    let mut first = None;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while sink.count() < total {
        if first.is_none() && sink.count() > 0 {
            first = Some(Instant::now());
        }
        if Instant::now() > deadline {
            let rows = c
                .query(
                    "SELECT status, count(*) FROM mail_deliveries GROUP BY status ORDER BY status",
                    &[],
                )
                .await
                .unwrap();
            let by_status: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            panic!(
                "the sink got {} of {total} messages in {DRAIN_TIMEOUT:?}; deliveries by status: {by_status:?}",
                sink.count()
            );
        }
        sink.wait_for(sink.count() + 1, Duration::from_millis(50))
            .await;
    }
    let last = Instant::now();
    let first = first.unwrap_or(last);
    // Every outcome recorded (the sink's 250 comes before the record).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = count(
            c,
            "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'",
        )
        .await;
        if sent as usize == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sent} of {total} deliveries recorded sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.count(), total, "the sink got more messages than sent");
    let duplicated: Vec<&String> = ids
        .iter()
        .filter(|id| sink.data_attempts(id) != 1)
        .collect();
    assert!(
        duplicated.is_empty(),
        "{} accepted Message-IDs did not reach the sink exactly once, e.g. {:?} ({} times)",
        duplicated.len(),
        duplicated[0],
        sink.data_attempts(duplicated[0])
    );
    for (what, sql) in [
        (
            "deliveries",
            "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'",
        ),
        (
            "outbound messages sent",
            "SELECT count(*) FROM messages WHERE direction = 'outbound' AND status = 'sent'",
        ),
        (
            "email.sent events",
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent'",
        ),
        (
            "recipients sent",
            "SELECT count(*) FROM mail_recipients WHERE status = 'sent'",
        ),
    ] {
        assert_eq!(count(c, sql).await as usize, total, "{what}");
    }
    (first, last)
}

// --------------------------------------------------------------- references

/// `key.sign(message)` on one thread per core for `secs`; messages/s.
fn sign_rate(key: &Arc<e2a_mail::dkim_sign::DkimKey>, message: &Arc<Vec<u8>>, secs: u64) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (key, message) = (key.clone(), message.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until {
                    let signed = key
                        .sign(&message, time::OffsetDateTime::now_utc())
                        .expect("sign");
                    assert!(signed.len() > message.len());
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / started.elapsed().as_secs_f64()
}

/// `count` submissions of `signed` to a fresh sink from [`CONNECTIONS`]
/// tasks, with the deliverer's client settings; messages/s.
async fn sink_rate(url: &str, mail_from: &str, signed: &Arc<Vec<u8>>, count: usize) -> f64 {
    let sink = SmtpSink::start(Script::new().keep_messages(false))
        .await
        .unwrap();
    let smtp = Arc::new(
        deliverer_config(url, &sink)
            .smtp_config()
            .unwrap()
            .expect("an SMTP server"),
    );
    let envelope = Arc::new(e2a_mail::submit::Envelope {
        mail_from: mail_from.to_owned(),
        rcpt_to: vec![RECIPIENT.to_owned()],
    });
    let run = |n: usize| {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let share = n / CONNECTIONS + usize::from(i < n % CONNECTIONS);
                let (smtp, envelope, signed) = (smtp.clone(), envelope.clone(), signed.clone());
                tokio::spawn(async move {
                    for _ in 0..share {
                        let s = e2a_mail::submit::submit(&smtp, &envelope, &signed).await;
                        assert!(s.outcome.is_sent(), "{:?}", s.outcome);
                    }
                })
            })
            .collect::<Vec<_>>();
        async move {
            for t in tasks {
                t.await.expect("submit task");
            }
        }
    };
    run(WARMUP).await;
    let started = Instant::now();
    run(count).await;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    assert_eq!(sink.count(), WARMUP + count);
    rate
}

/// The plain-SQL accept: per message one transaction with the four
/// INSERTs pipelined (and, with `send_limit`, the send limit's upsert
/// first). `ids` hands out message numbers; stops at `until` or when
/// they run out. Returns messages/s.
async fn sql_accept_rate(
    url: &str,
    user_id: &str,
    body: &Arc<Vec<u8>>,
    ids: std::ops::Range<usize>,
    send_limit: bool,
    until: Option<Instant>,
) -> f64 {
    let next = Arc::new(AtomicUsize::new(ids.start));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (url, user_id, body, next) =
                (url.to_owned(), user_id.to_owned(), body.clone(), next.clone());
            let end = ids.end;
            tokio::spawn(async move {
                let (mut c, _task) = connect(&url).await;
                let limit = c
                    .prepare(
                        "INSERT INTO rate_limits AS r (key, tat) \
                         VALUES ($1, clock_timestamp() + make_interval(secs => $2)) \
                         ON CONFLICT (key) DO UPDATE \
                           SET tat = GREATEST(r.tat, clock_timestamp()) + make_interval(secs => $2) \
                           WHERE GREATEST(r.tat, clock_timestamp()) + make_interval(secs => $2) \
                                 <= clock_timestamp() + make_interval(secs => $3) \
                         RETURNING tat, clock_timestamp()",
                    )
                    .await
                    .unwrap();
                let message = c
                    .prepare(
                        "INSERT INTO messages (id, user_id, agent_id, direction, status, recipient, \
                           subject, provider_message_id, method, message_type, conversation_id, \
                           to_recipients, cc, bcc, expires_at) \
                         VALUES ($1, $2, $3, 'outbound', 'queued', $4, 'Quarterly numbers', $5, 'smtp', \
                           'send', $6, ARRAY[$4], '{}', '{}', now() + interval '10 days')",
                    )
                    .await
                    .unwrap();
                let payload = c
                    .prepare(
                        "INSERT INTO mail_payloads (payload_id, user_id, content_type, subject, body) \
                         VALUES ($1, $2, 'message/rfc822', 'Quarterly numbers', $3)",
                    )
                    .await
                    .unwrap();
                let delivery = c
                    .prepare(
                        "INSERT INTO mail_deliveries (delivery_id, user_id, message_id, template_id, \
                           idempotency_key, payload_id, mail_from, dkim_domain, max_attempts) \
                         VALUES ($1, $2, $3, 'agent_message', 'agent_message:' || $3, $4, $5, $6, 8)",
                    )
                    .await
                    .unwrap();
                let recipient = c
                    .prepare(
                        "INSERT INTO mail_recipients (recipient_id, user_id, delivery_id, address, kind) \
                         VALUES ($1, $2, $3, $4, 'to')",
                    )
                    .await
                    .unwrap();
                let key = format!("send:{AGENT}");
                let (interval, window) = (60.0f64 / 1e9, 60.0f64);
                loop {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= end {
                        break;
                    }
                    let msg = format!("msg_{n:032x}");
                    let rfc = format!("{n:032x}@{SHARED_DOMAIN}");
                    let conv = format!("cnv_{n:032x}");
                    let pay = format!("mpl_{n:032x}");
                    let dlv = format!("mdl_{n:032x}");
                    let rcp = format!("rcp_{n:032x}");
                    let tx = c.transaction().await.unwrap();
                    if send_limit {
                        tx.query_opt(&limit, &[&key, &interval, &window])
                            .await
                            .unwrap()
                            .expect("the send limit admits it");
                    }
                    let body = body.as_slice();
                    let message_params: [&(dyn ToSql + Sync); 6] =
                        [&msg, &user_id, &AGENT, &RECIPIENT, &rfc, &conv];
                    let payload_params: [&(dyn ToSql + Sync); 3] = [&pay, &user_id, &body];
                    let delivery_params: [&(dyn ToSql + Sync); 6] =
                        [&dlv, &user_id, &msg, &pay, &AGENT, &SHARED_DOMAIN];
                    let recipient_params: [&(dyn ToSql + Sync); 4] =
                        [&rcp, &user_id, &dlv, &RECIPIENT];
                    tokio::try_join!(
                        tx.execute(&message, &message_params),
                        tx.execute(&payload, &payload_params),
                        tx.execute(&delivery, &delivery_params),
                        tx.execute(&recipient, &recipient_params),
                    )
                    .unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("SQL accept task");
    }
    let done = next.load(Ordering::Relaxed).min(ids.end) - ids.start;
    done as f64 / started.elapsed().as_secs_f64()
}

/// The plain-SQL deliverer: claim one due delivery (one durable
/// statement), then record it sent (one durable transaction, pipelined),
/// from [`CONNECTIONS`] connections until nothing is due. Returns
/// (deliveries, messages/s).
async fn sql_deliver_rate(url: &str) -> (u64, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|w| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let (mut c, _task) = connect(&url).await;
                let claim = c
                    .prepare(
                        "WITH due AS ( \
                           SELECT delivery_id, user_id FROM mail_deliveries \
                            WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now() \
                            ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED), \
                         gate AS ( \
                           INSERT INTO send_attempts (delivery_id, user_id, status, attempted_at) \
                           SELECT delivery_id, user_id, 'attempting', now() FROM due \
                           RETURNING delivery_id), \
                         leased AS ( \
                           UPDATE mail_deliveries d SET status = 'sending', lease_token = $1, \
                                  leased_until = now() + interval '5 minutes', updated_at = now() \
                             FROM gate WHERE d.delivery_id = gate.delivery_id \
                           RETURNING d.delivery_id, d.user_id, d.message_id, d.payload_id, d.mail_from), \
                         marked AS ( \
                           UPDATE messages m SET status = 'sending' FROM leased \
                            WHERE m.id = leased.message_id AND m.user_id = leased.user_id \
                              AND m.status = 'queued') \
                         SELECT l.delivery_id, l.user_id, l.message_id, p.body, l.mail_from, \
                                ARRAY(SELECT r.address FROM mail_recipients r \
                                       WHERE r.delivery_id = l.delivery_id AND r.status = 'pending') \
                           FROM leased l JOIN mail_payloads p ON p.payload_id = l.payload_id",
                    )
                    .await
                    .unwrap();
                let delivered = c
                    .prepare(
                        "UPDATE mail_deliveries SET status = 'sent', attempts = attempts + 1, \
                           next_attempt_at = NULL, leased_until = NULL, lease_token = NULL, \
                           updated_at = now(), last_error = '', sent_at = now() \
                         WHERE delivery_id = $1 AND lease_token = $2 AND status = 'sending'",
                    )
                    .await
                    .unwrap();
                let attempt = c
                    .prepare(
                        "INSERT INTO mail_attempts (attempt_id, user_id, delivery_id, attempt_no, \
                           started_at, finished_at, outcome, smtp_code, error, reply) \
                         VALUES (gen_random_uuid()::text, $2, $1, 1, now(), now(), 'sent', 250, '', \
                           '2.0.0 Ok: queued')",
                    )
                    .await
                    .unwrap();
                let recipients = c
                    .prepare(
                        "UPDATE mail_recipients SET status = 'sent', smtp_code = 250, \
                           reply = '2.0.0 Ok: queued' WHERE delivery_id = $1 AND status = 'pending'",
                    )
                    .await
                    .unwrap();
                let gate = c
                    .prepare(
                        "UPDATE send_attempts SET status = 'sent', completed_at = now(), \
                           method = 'smtp', provider_message_id = $2 \
                         WHERE delivery_id = $1 AND status = 'attempting'",
                    )
                    .await
                    .unwrap();
                let message = c
                    .prepare(
                        "UPDATE messages SET status = 'sent' \
                          WHERE id = $1 AND user_id = $2 AND direction = 'outbound'",
                    )
                    .await
                    .unwrap();
                let event = c
                    .prepare(
                        "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, \
                           conversation_id, message_id) \
                         VALUES ('evt_' || md5($1), $2, 'email.sent', $3, $4, $5, $1) \
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .await
                    .unwrap();
                let token = format!("lease_sql_{w}");
                let mut done = 0u64;
                loop {
                    let rows = c.query(&claim, &[&token]).await.unwrap();
                    let Some(row) = rows.first() else { break };
                    let (delivery_id, user_id, message_id): (String, String, String) =
                        (row.get(0), row.get(1), row.get(2));
                    let body: &[u8] = row.get(3);
                    let rcpt: Vec<String> = row.get(5);
                    assert!(!body.is_empty() && rcpt.len() == 1);
                    let envelope = json!({
                        "event": "email.sent", "id": format!("evt_{message_id}"),
                        "data": {"message_id": message_id, "from": AGENT, "to": rcpt,
                                 "method": "smtp", "subject": "Quarterly numbers"},
                    });
                    let tx = c.transaction().await.unwrap();
                    let provider = format!("<{message_id}@{SHARED_DOMAIN}>");
                    let delivered_params: [&(dyn ToSql + Sync); 2] = [&delivery_id, &token];
                    let attempt_params: [&(dyn ToSql + Sync); 2] = [&delivery_id, &user_id];
                    let recipients_params: [&(dyn ToSql + Sync); 1] = [&delivery_id];
                    let gate_params: [&(dyn ToSql + Sync); 2] = [&delivery_id, &provider];
                    let message_params: [&(dyn ToSql + Sync); 2] = [&message_id, &user_id];
                    let event_params: [&(dyn ToSql + Sync); 5] =
                        [&message_id, &user_id, &envelope, &AGENT, &"cnv_bench"];
                    let (n, ..) = tokio::try_join!(
                        tx.execute(&delivered, &delivered_params),
                        tx.execute(&attempt, &attempt_params),
                        tx.execute(&recipients, &recipients_params),
                        tx.execute(&gate, &gate_params),
                        tx.execute(&message, &message_params),
                        tx.execute(&event, &event_params),
                    )
                    .unwrap();
                    assert_eq!(n, 1, "the lease holds");
                    tx.commit().await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("SQL deliver task");
    }
    (total, total as f64 / started.elapsed().as_secs_f64())
}

fn main() {
    let messages: usize = std::env::var("E2A_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let run_started = Instant::now();
    e2a_runtime::install_crypto_provider();
    let (cluster, _reaper) = e2a_testkit::durable_bench_cluster("outbound");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (admin, _admin_task) = connect(&cluster.url("postgres")).await;
        let settings = admin
            .query_one(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
                        current_setting('full_page_writes'), current_setting('server_version')",
                &[],
            )
            .await
            .unwrap();
        let (fsync, sync, fpw): (String, String, String) =
            (settings.get(0), settings.get(1), settings.get(2));
        println!(
            "{}",
            json!({"bench": "outbound", "figure": "postgres", "fsync": fsync, "synchronous_commit": sync,
                   "full_page_writes": fpw, "server_version": settings.get::<_, String>(3)})
        );
        assert!(
            fsync == "on" && sync == "on" && fpw == "on",
            "the bench needs production durability"
        );
        create_databases(&cluster, &admin).await;
        let url = cluster.url(E2A_DB);
        let sql_url = cluster.url(SQL_DB);
        let (key, der) = seed(&url, true).await;
        seed(&sql_url, false).await;
        let key: Arc<str> = key.into();
        let (c, _c_task) = connect(&url).await;
        let body = send_body();

        // The API alone: the deliverer is stopped, the queue fills.
        let (api, addr) = start_api(&url).await;
        eprintln!("bench outbound: warm-up…");
        // One send alone first: until an address has authenticated once,
        // the API pre-pays each of its lookups against the failed-key
        // limit (30 a minute), so 32 first requests at once would get 429s.
        let (_, mut warm_ids, refused) = send_connection(addr, key.clone(), body.clone(), 1).await;
        assert!(refused.is_empty(), "first send refused: {refused:?}");
        let warm = send_load(addr, &key, &body, WARMUP - 1).await;
        assert!(warm.other.is_empty(), "warm-up refused: {:?}", warm.other);
        warm_ids.extend(warm.message_ids.iter().cloned());
        eprintln!("bench outbound: accepting {messages} messages, deliverer stopped…");
        let accepted = send_load(addr, &key, &body, messages).await;
        assert!(
            accepted.other.is_empty(),
            "the API refused sends: {:?}",
            accepted.other
        );
        let queued = count(
            &c,
            "SELECT count(*) FROM mail_deliveries WHERE status = 'pending'",
        )
        .await as usize;
        assert_eq!(queued, WARMUP + messages, "every 200 is a queued delivery");

        // The message as the API stored it: what the references sign and send.
        let row = c
            .query_one(
                "SELECT p.body, d.mail_from FROM mail_deliveries d \
                   JOIN mail_payloads p ON p.payload_id = d.payload_id LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        let stored: Arc<Vec<u8>> = Arc::new(row.get(0));
        let mail_from: String = row.get(1);
        let dkim = Arc::new(
            e2a_mail::dkim_sign::DkimKey::new(SHARED_DOMAIN, SELECTOR, &der).expect("DKIM key"),
        );

        eprintln!("bench outbound: signing alone…");
        let sign = {
            let (dkim, stored) = (dkim.clone(), stored.clone());
            tokio::task::spawn_blocking(move || {
                sign_rate(&dkim, &stored, 1);
                sign_rate(&dkim, &stored, 2)
            })
            .await
            .unwrap()
        };
        eprintln!("bench outbound: the sink alone…");
        let signed = Arc::new(
            dkim.sign(&stored, time::OffsetDateTime::now_utc())
                .expect("sign"),
        );
        let sink_limit = sink_rate(&url, &mail_from, &signed, messages).await;

        // The deliverer over the queue the API filled.
        for table in [
            "mail_deliveries",
            "mail_payloads",
            "mail_recipients",
            "messages",
        ] {
            c.batch_execute(&format!("VACUUM ANALYZE {table}"))
                .await
                .unwrap();
        }
        c.batch_execute("CHECKPOINT").await.unwrap();
        let sink = SmtpSink::start(Script::new().keep_messages(false))
            .await
            .unwrap();
        eprintln!(
            "bench outbound: deliverer draining {} messages…",
            WARMUP + messages
        );
        let started = Instant::now();
        let deliverer = start_deliverer(&url, &sink);
        let mut ids = warm_ids;
        ids.extend(accepted.message_ids.iter().cloned());
        let (first, last) = await_delivery(&sink, &c, ids.len(), &ids).await;
        let first_delivery_ms = first.duration_since(started).as_millis() as u64;
        let drain = (ids.len() - 1) as f64 / last.duration_since(first).as_secs_f64();

        // Both at once: the same load while the deliverer runs.
        eprintln!("bench outbound: API and deliverer at once, {messages} messages…");
        let before = ids.len();
        let started = Instant::now();
        let both = send_load(addr, &key, &body, messages).await;
        assert!(
            both.other.is_empty(),
            "the API refused sends: {:?}",
            both.other
        );
        ids.extend(both.message_ids.iter().cloned());
        let (_, last) = await_delivery(&sink, &c, ids.len(), &ids).await;
        let end_to_end = (ids.len() - before) as f64 / last.duration_since(started).as_secs_f64();
        deliverer.stop("the deliverer").await;
        api.stop("the API").await;

        // The plain-SQL references, in their own database.
        eprintln!("bench outbound: plain SQL…");
        let user_id: String = {
            let (s, _t) = connect(&sql_url).await;
            s.query_one("SELECT id FROM users", &[]).await.unwrap().get(0)
        };
        sql_accept_rate(&sql_url, &user_id, &stored, 0..WARMUP, false, None).await;
        let sql_accept = sql_accept_rate(
            &sql_url,
            &user_id,
            &stored,
            WARMUP..WARMUP + messages,
            false,
            None,
        )
        .await;
        let first_id = WARMUP + messages;
        let sql_accept_limited = sql_accept_rate(
            &sql_url,
            &user_id,
            &stored,
            first_id..first_id + messages,
            true,
            Some(Instant::now() + Duration::from_secs(3)),
        )
        .await;
        {
            let (s, _t) = connect(&sql_url).await;
            for table in [
                "mail_deliveries",
                "mail_payloads",
                "mail_recipients",
                "messages",
            ] {
                s.batch_execute(&format!("VACUUM ANALYZE {table}"))
                    .await
                    .unwrap();
            }
            s.batch_execute("CHECKPOINT").await.unwrap();
        }
        let (sql_delivered, sql_deliver) = sql_deliver_rate(&sql_url).await;

        let line = |v: Value| println!("{v}");
        line(json!({
            "bench": "outbound", "figure": "accepted", "connections": CONNECTIONS,
            "messages": messages, "req_per_s": round1(accepted.rps()),
            "p50_ms": percentile_ms(&accepted.latencies_us, 0.50),
            "p99_ms": percentile_ms(&accepted.latencies_us, 0.99),
            "note": "POST /v1/agents/{agent}/messages, one external recipient; deliverer stopped",
        }));
        line(json!({
            "bench": "outbound", "figure": "delivered", "workers": MAIL_WORKERS,
            "messages": WARMUP + messages, "msgs_per_s": round1(drain),
            "first_delivery_ms": first_delivery_ms, "target_msgs_per_s": 500,
            "note": "the queue the API filled, drained by the deliverer (RSA-2048 DKIM, SMTP to the \
                     sink); sink's first to last message, start-up excluded; every Message-ID \
                     received once and recorded sent",
        }));
        line(json!({
            "bench": "outbound", "figure": "end_to_end", "connections": CONNECTIONS,
            "workers": MAIL_WORKERS, "messages": messages,
            "req_per_s": round1(both.rps()),
            "p50_ms": percentile_ms(&both.latencies_us, 0.50),
            "p99_ms": percentile_ms(&both.latencies_us, 0.99),
            "delivered_msgs_per_s": round1(end_to_end),
            "note": "API and deliverer at once; delivered = messages / (first request → sink's last message)",
        }));
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        line(json!({
            "bench": "outbound", "figure": "sign", "threads": threads,
            "message_bytes": stored.len(), "msgs_per_s": round1(sign),
        }));
        line(json!({
            "bench": "outbound", "figure": "sink", "tasks": CONNECTIONS,
            "message_bytes": signed.len(), "messages": messages, "msgs_per_s": round1(sink_limit),
            "note": "pre-signed message, e2a_mail::submit::submit (one connection per message, as the deliverer) to a fresh sink",
        }));
        line(json!({
            "bench": "outbound", "figure": "sql_accept", "connections": CONNECTIONS,
            "messages": messages, "msgs_per_s": round1(sql_accept),
            "note": "message, payload, delivery, recipient: four INSERTs, one durable transaction per message",
        }));
        line(json!({
            "bench": "outbound", "figure": "sql_accept_with_send_limit", "connections": CONNECTIONS,
            "msgs_per_s": round1(sql_accept_limited),
            "note": "the same plus the agent's send-limit upsert first (one rate_limits row per agent, held to commit)",
        }));
        line(json!({
            "bench": "outbound", "figure": "sql_deliver", "connections": CONNECTIONS,
            "messages": sql_delivered, "msgs_per_s": round1(sql_deliver),
            "note": "claim one (gate, lease, message) in one durable statement; record sent in one durable transaction",
        }));
        line(json!({
            "bench": "outbound", "figure": "accepted_vs_sql_accept",
            "ratio": ratio(accepted.rps() / sql_accept),
        }));
        line(json!({
            "bench": "outbound", "figure": "accepted_vs_sql_accept_with_send_limit",
            "ratio": ratio(accepted.rps() / sql_accept_limited),
        }));
        let (limit_name, limit) = [("sign", sign), ("sink", sink_limit), ("sql_deliver", sql_deliver)]
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        line(json!({
            "bench": "outbound", "figure": "delivered_vs_limit", "limit": limit_name,
            "limit_msgs_per_s": round1(limit), "ratio": ratio(drain / limit),
        }));
        eprintln!(
            "bench outbound: done in {:.0} s",
            run_started.elapsed().as_secs_f64()
        );
    });
}
