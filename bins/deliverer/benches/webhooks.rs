//! `cargo xtask bench webhooks`: webhook deliveries per second against the
//! database's own limit for the same claim and record work, and the
//! latency from an event's commit to its receiver's first byte.
//!
//! Set-up: a durable PostgreSQL cluster for this run (`fsync`,
//! `synchronous_commit`, `full_page_writes` on), one account, and the
//! `e2a-deliverer` **binary** (8 workers, the default) delivering to a
//! local HTTP/1.1 receiver that answers `200` at once.
//!
//! Figures (JSON lines on stdout; progress on stderr):
//! * `raw_sql_limit` (measured first) — the same claim and record transactions as plain SQL
//!   on 8 connections without HTTP over as many pending deliveries: claim
//!   the oldest due delivery of a webhook (each connection cycling through
//!   its share of the 50) `FOR UPDATE SKIP LOCKED` and lease it (committed
//!   asynchronously, as the deliverer's claim is), then one durable
//!   transaction marking it delivered (guarded by the lease token) and
//!   stamping its webhook. `deliveries_per_s`.
//! * `deliverer_drain` — the deliverer over the same backlog as the
//!   raw-SQL phase (every delivery pending again, no event arriving):
//!   `deliveries_per_s` and `vs_raw_sql` as `ratio`.
//! * `deliverer` — 50 webhooks; events committed every 10 ms at a steady
//!   rate offering as many deliveries per second as the drain phase
//!   delivered (`E2A_BENCH_EVENTS_PER_S` overrides it), so fan-out runs
//!   alongside claim and record; `deliveries_per_s` received, and the
//!   backlog left at the end.
//! * `deliverer_vs_raw_sql` — `ratio` of the two (goal ≥ 0.6).
//! * `latency` — one webhook, events committed one at a time at 50/s:
//!   `p50_ms`, `p99_ms` from the producer's commit returning to the
//!   receiver reading the request's first byte (goal ≤ 5 and ≤ 20).
//!
//! `E2A_BENCH_SECS` sets each measured phase's duration (default 8).

use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use e2a_store::{Store, StoreConfig, migrate::MigrationMode};
use e2a_testkit::receiver::{Receiver, Reply};
use serde_json::json;
use tokio_postgres::NoTls;

const WEBHOOKS: usize = 50;
const WORKERS: usize = 8;
const USER: &str = "usr_00000000000000000000000000000001";

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    (sorted_us[idx] as f64 / 10.0).round() / 100.0
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Replaces the account's webhooks with `n` posting to `receiver`.
async fn webhooks(c: &tokio_postgres::Client, receiver: &Receiver, n: usize, prefix: &str) {
    c.batch_execute("DELETE FROM webhooks").await.unwrap();
    for i in 0..n {
        c.execute(
            "INSERT INTO webhooks (id, user_id, url, events, signing_secret) \
             VALUES ($1, $2, $3, '{email.received}', $4)",
            &[
                &format!("wh_{prefix}{i:04}"),
                &USER,
                &receiver.url(&format!("/{prefix}/{i}")),
                &format!("whsec_{}", "5a".repeat(32)),
            ],
        )
        .await
        .unwrap();
    }
}

/// Inserts `n` events numbered from `first` in one statement (one commit).
async fn events(c: &tokio_postgres::Client, first: i64, n: i64) {
    c.execute(
        "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id) \
         SELECT 'evt_' || lpad(to_hex(g), 32, '0'), $1, 'email.received', \
                jsonb_build_object('event', 'email.received', 'id', 'evt_' || lpad(to_hex(g), 32, '0'), \
                  'created_at', now(), 'data', jsonb_build_object('subject', 'Bench', 'from', 'a@b.test', \
                  'recipient', 'agent@bench.test', 'message_id', 'msg_' || lpad(to_hex(g), 32, '0'))), \
                'agent@bench.test', 'conv' \
           FROM generate_series($2::bigint, $3::bigint) g",
        &[&USER, &first, &(first + n - 1)],
    )
    .await
    .unwrap();
}

/// Counts requests the receiver gets, and times each event's first one.
fn count_requests(mut receiver: Receiver) -> (Arc<Mutex<Counts>>, tokio::task::JoinHandle<()>) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let shared = counts.clone();
    let task = tokio::spawn(async move {
        while let Some(r) = receiver.next_within(Duration::from_secs(3600)).await {
            let mut c = shared.lock().unwrap();
            c.total += 1;
            if c.track_ids {
                let id: String = r.json()["id"].as_str().unwrap_or("").to_owned();
                c.first_byte.entry(id).or_insert(r.first_byte_at);
            }
        }
    });
    (counts, task)
}

#[derive(Default)]
struct Counts {
    total: u64,
    track_ids: bool,
    first_byte: HashMap<String, Instant>,
}

/// The raw-SQL limit: 8 connections claiming and recording the pending
/// deliveries as plain SQL for `secs`. Returns deliveries per second.
async fn raw_sql_phase(url: &str, secs: u64) -> f64 {
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let mut c = connect(&url).await;
                let claim = c
                    .prepare(
                        "WITH quiet AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS sync) \
                         UPDATE webhook_subscriber_deliveries s \
                            SET leased_until = now() + interval '60 seconds', lease_token = $2, \
                                attempts = s.attempts + 1, last_attempt_at = now() \
                          WHERE s.id IN (SELECT id FROM quiet, webhook_subscriber_deliveries \
                                          WHERE quiet.sync = 'off' AND webhook_id = $3 AND status = 'pending' \
                                            AND next_retry_at <= now() AND leased_until IS NULL \
                                          ORDER BY next_retry_at, id LIMIT $1 \
                                          FOR UPDATE OF webhook_subscriber_deliveries SKIP LOCKED) \
                         RETURNING s.id, s.webhook_id",
                    )
                    .await
                    .unwrap();
                let mark = c
                    .prepare(
                        "UPDATE webhook_subscriber_deliveries \
                            SET status = 'delivered', last_status_code = 200, last_error = '', \
                                leased_until = NULL, lease_token = NULL \
                          WHERE id = $1 AND lease_token = $2 AND status = 'pending'",
                    )
                    .await
                    .unwrap();
                let stamp = c
                    .prepare("UPDATE webhooks SET last_delivered_at = now() WHERE id = $1")
                    .await
                    .unwrap();
                let token = format!("lease_raw_{w}");
                let mut done = 0u64;
                let mut empty = 0;
                let mut hook = w;
                while Instant::now() < until && empty < WEBHOOKS {
                    // Each connection walks its own share of the webhooks.
                    hook = (hook + WORKERS) % WEBHOOKS;
                    let webhook_id = format!("wh_t{hook:04}");
                    let rows = c.query(&claim, &[&1i64, &token, &webhook_id]).await.unwrap();
                    let Some(row) = rows.first() else {
                        empty += 1;
                        continue;
                    };
                    empty = 0;
                    let (id, webhook): (String, String) = (row.get(0), row.get(1));
                    let tx = c.transaction().await.unwrap();
                    tx.execute(&mark, &[&id, &token]).await.unwrap();
                    tx.execute(&stamp, &[&webhook]).await.unwrap();
                    tx.commit().await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let secs: u64 = std::env::var("E2A_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let events_per_s: Option<f64> = std::env::var("E2A_BENCH_EVENTS_PER_S")
        .ok()
        .and_then(|s| s.parse().ok());
    let (cluster, _reaper) = e2a_testkit::durable_bench_cluster("webhooks");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let admin = connect(&cluster.url("postgres")).await;
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
            json!({"bench": "webhooks", "figure": "postgres", "fsync": fsync, "synchronous_commit": sync,
                   "full_page_writes": fpw, "server_version": settings.get::<_, String>(3)})
        );
        assert!(
            fsync == "on" && sync == "on" && fpw == "on",
            "the bench needs production durability"
        );
        admin
            .batch_execute("CREATE DATABASE bench_webhooks")
            .await
            .unwrap();
        let url = cluster.url("bench_webhooks");
        let store = Store::new(&StoreConfig::new(url.clone())).unwrap();
        store.migrate(MigrationMode::Auto).await.unwrap();
        let c = connect(&url).await;
        c.execute(
            "INSERT INTO users (id, email, name) VALUES ($1, 'bench@example.com', 'Bench')",
            &[&USER],
        )
        .await
        .unwrap();

        let receiver = Receiver::start(|_| Reply::status(200)).await;
        webhooks(&c, &receiver, WEBHOOKS, "t").await;

        // The raw-SQL limit first, on plain pending deliveries to the same
        // webhooks.
        eprintln!("bench webhooks: raw SQL limit…");
        let backlog_rows = 6000 * secs as i64;
        c.execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, status, processed_at) \
             SELECT 'evt_' || lpad(to_hex(g), 32, '0'), $1, 'email.received', \
                    jsonb_build_object('event', 'email.received', 'id', 'evt_' || lpad(to_hex(g), 32, '0'), \
                      'created_at', now(), 'data', jsonb_build_object('subject', 'Bench', 'from', 'a@b.test', \
                      'recipient', 'agent@bench.test')), 'agent@bench.test', 'conv', 'processed', now() \
               FROM generate_series(1, $2::bigint) g",
            &[&USER, &(backlog_rows / WEBHOOKS as i64 + 1)],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, event_id) \
             SELECT 'whd_' || lpad(to_hex(g), 32, '0'), $1, 'wh_t' || lpad((g % $3)::text, 4, '0'), \
                    'email.received', 'evt_' || lpad(to_hex(g / $3 + 1), 32, '0') \
               FROM generate_series(1, $2::bigint) g",
            &[&USER, &backlog_rows, &(WEBHOOKS as i64)],
        )
        .await
        .unwrap();
        c.batch_execute("VACUUM ANALYZE webhook_subscriber_deliveries")
            .await
            .unwrap();
        raw_sql_phase(&url, 1).await;
        let raw_rate = raw_sql_phase(&url, secs).await;
        // The deliverer over the same backlog: every delivery pending again.
        c.batch_execute(
            "UPDATE webhook_subscriber_deliveries SET status = 'pending', attempts = 0, \
                    leased_until = NULL, lease_token = NULL, next_retry_at = now(), last_attempt_at = NULL; \
             UPDATE webhooks SET next_due_at = now(), inflight_until = NULL, inflight_token = NULL;",
        )
        .await
        .unwrap();
        c.batch_execute("VACUUM ANALYZE webhook_subscriber_deliveries")
            .await
            .unwrap();
        let (counts, _counter) = count_requests(receiver);

        let log = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let port = e2a_testkit::cluster::free_port().unwrap();
        let mut deliverer = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-deliverer"))
            .env("E2A_DATABASE_URL", &url)
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{port}"))
            .env("E2A_ENV", "development")
            .env("E2A_WEBHOOK_WORKERS", WORKERS.to_string())
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-deliverer");

        eprintln!("bench webhooks: deliverer draining the same backlog…");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = counts.lock().unwrap().total;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let drain_rate = (counts.lock().unwrap().total - before) as f64 / started.elapsed().as_secs_f64();
        // Pause the webhooks while the rest of the backlog goes.
        // In id order, as the deliverer's record batches lock webhooks
        // (an unordered bulk update can deadlock with one).
        c.batch_execute(
            "UPDATE webhooks SET enabled = false \
             WHERE id IN (SELECT id FROM webhooks ORDER BY id FOR UPDATE)",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.batch_execute(
            "DELETE FROM webhook_subscriber_deliveries; \
             UPDATE webhooks SET enabled = true, next_due_at = NULL, inflight_until = NULL, inflight_token = NULL;",
        )
        .await
        .unwrap();
        // (No ANALYZE of the emptied table: statistics of an empty table
        // would plan the growing queue as if it stayed empty.)

        // Throughput: events committed every 10 ms at a steady rate that
        // offers as many deliveries as the deliverer drained just before
        // (offering more only makes fan-out queue rows nobody can deliver
        // in the phase: a measure of overload, not of throughput).
        let events_per_s = events_per_s.unwrap_or(drain_rate / WEBHOOKS as f64);
        let next_event = std::sync::atomic::AtomicI64::new(1_000_000_000);
        let offer = |secs: u64| {
            let (c, next_event) = (&c, &next_event);
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let start = Instant::now();
                let until = start + Duration::from_secs(secs);
                let mut sent = 0i64;
                while Instant::now() < until {
                    tick.tick().await;
                    let due = (start.elapsed().as_secs_f64() * events_per_s) as i64 - sent;
                    if due > 0 {
                        let n = next_event.fetch_add(due, std::sync::atomic::Ordering::Relaxed);
                        events(c, n, due).await;
                        sent += due;
                    }
                }
            }
        };
        eprintln!("bench webhooks: warm-up…");
        offer(2).await;
        eprintln!(
            "bench webhooks: deliverer, {events_per_s:.1} events/s to {WEBHOOKS} webhooks…"
        );
        let before = counts.lock().unwrap().total;
        let started = Instant::now();
        offer(secs).await;
        let delivered = counts.lock().unwrap().total - before;
        let elapsed = started.elapsed().as_secs_f64();
        let backlog: i64 = c
            .query_one(
                "SELECT count(*) FROM webhook_subscriber_deliveries WHERE status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let pending_events: i64 = c
            .query_one(
                "SELECT count(*) FROM webhook_events WHERE status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let deliverer_rate = delivered as f64 / elapsed;
        let _ = deliverer.start_kill();
        let _ = deliverer.wait().await;

        // Latency: one webhook, one event per commit at 50/s.
        eprintln!("bench webhooks: latency…");
        c.batch_execute("DELETE FROM webhook_subscriber_deliveries; UPDATE webhook_events SET status = 'processed' WHERE status = 'pending';")
            .await
            .unwrap();
        let receiver = Receiver::start(|_| Reply::status(200)).await;
        webhooks(&c, &receiver, 1, "l").await;
        let (counts, _counter) = count_requests(receiver);
        counts.lock().unwrap().track_ids = true;
        let mut deliverer = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-deliverer"))
            .env("E2A_DATABASE_URL", &url)
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{port}"))
            .env("E2A_ENV", "development")
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-deliverer");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut committed = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let first = 10_000_000i64;
        let n_events = (secs * 50) as i64;
        for i in 0..n_events {
            tick.tick().await;
            events(&c, first + i, 1).await;
            committed.push((format!("evt_{:032x}", first + i), Instant::now()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut latencies: Vec<u64> = {
            let counts = counts.lock().unwrap();
            committed
                .iter()
                .filter_map(|(id, at)| {
                    counts
                        .first_byte
                        .get(id)
                        .map(|fb| fb.saturating_duration_since(*at).as_micros() as u64)
                })
                .collect()
        };
        latencies.sort_unstable();
        let _ = deliverer.start_kill();
        let _ = deliverer.wait().await;

        let line = |v: serde_json::Value| println!("{v}");
        line(json!({
            "bench": "webhooks", "figure": "deliverer", "webhooks": WEBHOOKS, "workers": WORKERS,
            "events_per_s_offered": round1(events_per_s),
            "deliveries_per_s_offered": round1(events_per_s * WEBHOOKS as f64),
            "deliveries_per_s": round1(deliverer_rate),
            "backlog_deliveries": backlog, "backlog_events": pending_events,
        }));
        line(json!({
            "bench": "webhooks", "figure": "raw_sql_limit", "connections": WORKERS,
            "deliveries_per_s": round1(raw_rate),
        }));
        line(json!({
            "bench": "webhooks", "figure": "deliverer_drain", "webhooks": WEBHOOKS, "workers": WORKERS,
            "deliveries_per_s": round1(drain_rate),
            "vs_raw_sql": {"ratio": (drain_rate / raw_rate * 1000.0).round() / 1000.0, "target": 0.6},
        }));
        line(json!({
            "bench": "webhooks", "figure": "deliverer_vs_raw_sql",
            "ratio": (deliverer_rate / raw_rate * 1000.0).round() / 1000.0, "target": 0.6,
        }));
        line(json!({
            "bench": "webhooks", "figure": "latency", "events_per_s": 50,
            "events": n_events, "received": latencies.len(),
            "p50_ms": percentile_ms(&latencies, 0.50), "p99_ms": percentile_ms(&latencies, 0.99),
            "target_p50_ms": 5, "target_p99_ms": 20,
        }));
    });
}
