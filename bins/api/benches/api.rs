//! `cargo xtask bench api`: the API's read path against the database's own
//! limit for the same work, quiet and under a flood of made-up keys.
//!
//! Set-up: a durable PostgreSQL cluster for this run (`fsync`,
//! `synchronous_commit`, `full_page_writes` on), one account with one agent
//! holding 10,000 inbound messages, and the `e2a-api` **binary** on it
//! (pool of 32, the poll limit raised out of the way). Load: 32 keep-alive
//! HTTP/1.1 connections, each sending `GET /v1/agents/{agent}/messages?
//! limit=50` with the account's key as fast as answers come back.
//!
//! Figures (JSON lines on stdout; progress on stderr):
//! * `api` — the API's `req_per_s`, `p50_ms`, `p99_ms`.
//! * `raw_sql_limit` — the same work as plain SQL over 32 connections: the
//!   key lookup by hash, then the same page of the same 15 columns of the
//!   agent's 50 newest unread inbound messages, two prepared statements per
//!   request; measured before and after the API phase and averaged.
//! * `api_vs_raw_sql` — `ratio` of the two (goal ≥ 0.5).
//! * `api_under_key_flood` — the same load while 8 more connections send
//!   well-formed random keys as fast as they can, through a trusted proxy
//!   spreading them over 64 client addresses (so every address sits at the
//!   failed-authentication limit's edge): the legitimate client's
//!   `req_per_s`, `p50_ms`, `p99_ms`, `p99_vs_quiet` as `ratio` (goal ≤ 2),
//!   and the flood's answers by status.
//!
//! `E2A_BENCH_SECS` sets each measured phase's duration (default 8).

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    api_keys, domains,
    ids::MessageId,
    inbound::{self, Delivery, InboundMail},
    migrate::MigrationMode,
    secret, users,
};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

const CONNECTIONS: usize = 32;
const FLOOD_CONNECTIONS: usize = 8;
const FLOOD_ADDRESSES: usize = 64;
const MESSAGES: usize = 10_000;
const SHARED_DOMAIN: &str = "agents.bench";
const AGENT: &str = "inbox@agents.bench";
const PAGE: &str = "/v1/agents/inbox@agents.bench/messages?limit=50";

/// Latencies and answers of one load phase.
#[derive(Default)]
struct Phase {
    ok: u64,
    other: Vec<(u16, u64)>,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Phase {
    fn merge(&mut self, ok: u64, other: Vec<u16>, latencies: Vec<u64>) {
        self.ok += ok;
        for status in other {
            match self.other.iter_mut().find(|(s, _)| *s == status) {
                Some((_, n)) => *n += 1,
                None => self.other.push((status, 1)),
            }
        }
        self.latencies_us.extend(latencies);
    }

    fn finish(&mut self, started: Instant) {
        self.elapsed = started.elapsed();
        self.latencies_us.sort_unstable();
    }

    fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let sorted = &self.latencies_us;
        if sorted.is_empty() {
            return 0.0;
        }
        let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        (sorted[idx] as f64 / 10.0).round() / 100.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// What one HTTP connection sends.
#[derive(Clone)]
enum Client {
    /// The account's key, from one client address.
    Legit(Arc<str>),
    /// Random well-formed keys, from `FLOOD_ADDRESSES` addresses in turn.
    Flood(u64),
}

async fn http_connection(
    addr: SocketAddr,
    client: Client,
    until: Instant,
) -> (u64, Vec<u16>, Vec<u64>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let (mut ok, mut other, mut latencies) = (0, Vec::new(), Vec::with_capacity(50_000));
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let req = Request::get(PAGE).header("host", "bench");
        let req = match &client {
            Client::Legit(key) => req
                .header("authorization", format!("Bearer {key}"))
                .header("x-forwarded-for", "198.51.100.1"),
            Client::Flood(seed) => {
                let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(n);
                req.header(
                    "authorization",
                    format!("Bearer e2a_{:064x}", u128::from(x)),
                )
                .header(
                    "x-forwarded-for",
                    format!("203.0.113.{}", (x as usize) % FLOOD_ADDRESSES),
                )
            }
        };
        let started = Instant::now();
        let Ok(resp) = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
        else {
            break;
        };
        let status = resp.status().as_u16();
        if resp.into_body().collect().await.is_err() {
            break;
        }
        latencies.push(started.elapsed().as_micros() as u64);
        if status == 200 {
            ok += 1;
        } else {
            other.push(status);
        }
    }
    (ok, other, latencies)
}

/// Runs `CONNECTIONS` legitimate connections (and, with `flood`, the
/// flooding ones) for `secs`; returns the legitimate and the flood phases.
async fn http_phase(addr: SocketAddr, key: &Arc<str>, secs: u64, flood: bool) -> (Phase, Phase) {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let legit: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(http_connection(addr, Client::Legit(key.clone()), until)))
        .collect();
    let flooders: Vec<_> = (0..if flood { FLOOD_CONNECTIONS } else { 0 })
        .map(|i| tokio::spawn(http_connection(addr, Client::Flood(i as u64 + 1), until)))
        .collect();
    let (mut a, mut b) = (Phase::default(), Phase::default());
    for t in legit {
        let (ok, other, lat) = t.await.expect("load task");
        a.merge(ok, other, lat);
    }
    for t in flooders {
        let (ok, other, lat) = t.await.expect("flood task");
        b.merge(ok, other, lat);
    }
    a.finish(started);
    b.finish(started);
    (a, b)
}

/// The raw-SQL limit: per request, the key lookup and the page query, as
/// plain prepared statements, over `CONNECTIONS` connections.
async fn raw_sql_phase(url: &str, key_hash: &str, user_id: &str, secs: u64) -> Phase {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (url, key_hash, user_id) = (url.to_owned(), key_hash.to_owned(), user_id.to_owned());
            tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
                tokio::spawn(conn);
                let lookup = c
                    .prepare(
                        "SELECT id, user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL \
                         AND (expires_at IS NULL OR expires_at > now())",
                    )
                    .await
                    .unwrap();
                let page = c
                    .prepare(
                        "SELECT m.id, m.agent_id, m.direction, m.sender, m.to_recipients, m.cc, \
                           m.reply_to, m.recipient, m.subject, m.conversation_id, m.inbox_status, \
                           m.status, m.size_bytes, m.labels, m.created_at \
                         FROM messages m WHERE m.user_id = $1 AND m.agent_id = $2 \
                           AND m.expires_at > now() AND m.direction = 'inbound' \
                           AND m.inbox_status = 'unread' \
                         ORDER BY m.created_at DESC, m.id DESC LIMIT 51",
                    )
                    .await
                    .unwrap();
                let mut latencies = Vec::with_capacity(50_000);
                while Instant::now() < until {
                    let t = Instant::now();
                    let k = c.query_one(&lookup, &[&key_hash]).await.unwrap();
                    let user: String = k.get(1);
                    assert_eq!(user, user_id);
                    let rows = c.query(&page, &[&user, &AGENT]).await.unwrap();
                    assert_eq!(rows.len(), 51);
                    latencies.push(t.elapsed().as_micros() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut p = Phase::default();
    for t in tasks {
        let lat = t.await.expect("raw task");
        p.merge(lat.len() as u64, Vec::new(), lat);
    }
    p.finish(started);
    p
}

/// One account, one agent with `MESSAGES` inbound messages; returns the
/// plaintext key and the user id.
async fn seed(store: &Store) -> (String, String) {
    let mut c = store.client().await.unwrap();
    let user = users::create(&c, &EmailAddress::parse("bench@example.com").unwrap(), "")
        .await
        .unwrap();
    let key = api_keys::create(&c, &user.id, "bench", None)
        .await
        .unwrap()
        .plaintext;
    domains::ensure_shared(&c, SHARED_DOMAIN).await.unwrap();
    agents::create(
        &mut c,
        &user.id,
        &NewAgent {
            address: EmailAddress::parse(AGENT).unwrap(),
            name: String::new(),
            webhook_url: String::new(),
            agent_mode: AgentMode::Local,
        },
        10,
    )
    .await
    .unwrap();
    let to = vec![AGENT.to_owned()];
    let filler = "x".repeat(900);
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let (store, user_id, to, filler) =
            (store.clone(), user.id.clone(), to.clone(), filler.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..MESSAGES).step_by(16) {
                let message_id = format!("m{i}@remote.bench");
                let subject = format!("message {i}");
                let raw = format!(
                    "From: sender{i}@remote.bench\r\nTo: {AGENT}\r\nMessage-ID: <{message_id}>\r\n\
                     Subject: {subject}\r\n\r\n{filler}\r\n"
                )
                .into_bytes();
                let sha = inbound::body_sha256(&raw);
                let sender = format!("sender{i}@remote.bench");
                let mail = InboundMail {
                    raw: &raw,
                    body_sha256: &sha,
                    email_message_id: &message_id,
                    sender: &sender,
                    subject: &subject,
                    to: &to,
                    cc: &[],
                    reply_to: &[],
                    thread_refs: &[],
                    trusted_conversation_id: None,
                    spf: "pass",
                    dkim: "none",
                    dmarc: "none",
                };
                let delivery = Delivery {
                    message_id: MessageId::new(),
                    agent_id: AGENT.into(),
                    agent_domain: SHARED_DOMAIN.into(),
                    user_id: user_id.clone(),
                    auth_headers: json!({"X-E2A-Auth-Verified": "false"}),
                    legacy_push: false,
                };
                inbound::ingest(&store, &mail, &[delivery]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for sql in [
        "VACUUM ANALYZE messages",
        "VACUUM ANALYZE api_keys",
        "CHECKPOINT",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    (key, user.id.as_str().to_owned())
}

fn free_port() -> u16 {
    e2a_testkit::cluster::free_port().expect("free port")
}

fn main() {
    let secs: u64 = std::env::var("E2A_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (cluster, _reaper) = e2a_testkit::durable_bench_cluster("api");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (admin, conn) = tokio_postgres::connect(&cluster.url("postgres"), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let settings = admin
            .query_one(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
                        current_setting('full_page_writes'), current_setting('server_version')",
                &[],
            )
            .await
            .unwrap();
        let (fsync, sync, fpw): (String, String, String) = (settings.get(0), settings.get(1), settings.get(2));
        println!(
            "{}",
            json!({"bench": "api", "figure": "postgres", "fsync": fsync, "synchronous_commit": sync,
                   "full_page_writes": fpw, "server_version": settings.get::<_, String>(3)})
        );
        assert!(
            fsync == "on" && sync == "on" && fpw == "on",
            "the bench needs production durability"
        );
        admin.batch_execute("CREATE DATABASE bench_api").await.unwrap();
        let url = cluster.url("bench_api");
        let mut config = StoreConfig::new(url.clone());
        config.pool_size = 20;
        let store = Store::new(&config).unwrap();
        store.migrate(MigrationMode::Auto).await.unwrap();
        eprintln!("bench api: storing {MESSAGES} messages…");
        let (key, user_id) = seed(&store).await;
        let key_hash = secret::sha256_hex(key.as_bytes());
        let key: Arc<str> = key.into();

        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let mut api = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-api"))
            .env("E2A_DATABASE_URL", &url)
            .env("E2A_HTTP_ADDR", addr.to_string())
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("E2A_ENV", "development")
            .env("E2A_SHARED_DOMAIN", SHARED_DOMAIN)
            .env("E2A_DB_POOL_SIZE", CONNECTIONS.to_string())
            .env("E2A_RATE_POLL_PER_MINUTE", "1000000000")
            .env("E2A_TRUSTED_PROXIES", "127.0.0.1")
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-api");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(api.try_wait().unwrap().is_none(), "e2a-api exited at start");
            assert!(Instant::now() < deadline, "e2a-api did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        eprintln!("bench api: warm-up…");
        http_phase(addr, &key, 2, false).await;
        raw_sql_phase(&url, &key_hash, &user_id, 1).await;

        eprintln!("bench api: raw SQL limit…");
        let raw_before = raw_sql_phase(&url, &key_hash, &user_id, secs).await;
        eprintln!("bench api: API…");
        let (quiet, _) = http_phase(addr, &key, secs, false).await;
        eprintln!("bench api: raw SQL limit again…");
        let raw_after = raw_sql_phase(&url, &key_hash, &user_id, secs).await;
        eprintln!("bench api: API under a key flood…");
        let (flooded, flood) = http_phase(addr, &key, secs, true).await;

        let raw_rps = (raw_before.rps() + raw_after.rps()) / 2.0;
        let line = |v: serde_json::Value| println!("{v}");
        line(json!({
            "bench": "api", "figure": "api", "connections": CONNECTIONS, "messages": MESSAGES,
            "page": 50, "req_per_s": round1(quiet.rps()),
            "p50_ms": quiet.percentile_ms(0.50), "p99_ms": quiet.percentile_ms(0.99),
            "non_200": quiet.other,
        }));
        line(json!({
            "bench": "api", "figure": "raw_sql_limit", "connections": CONNECTIONS,
            "req_per_s": round1(raw_rps),
            "runs_req_per_s": [round1(raw_before.rps()), round1(raw_after.rps())],
            "p50_ms": raw_before.percentile_ms(0.50), "p99_ms": raw_before.percentile_ms(0.99),
        }));
        line(json!({
            "bench": "api", "figure": "api_vs_raw_sql",
            "ratio": (quiet.rps() / raw_rps * 1000.0).round() / 1000.0, "target": 0.5,
        }));
        line(json!({
            "bench": "api", "figure": "api_under_key_flood",
            "flood_connections": FLOOD_CONNECTIONS, "flood_addresses": FLOOD_ADDRESSES,
            "req_per_s": round1(flooded.rps()),
            "p50_ms": flooded.percentile_ms(0.50), "p99_ms": flooded.percentile_ms(0.99),
            "p99_vs_quiet": {
                "ratio": (flooded.percentile_ms(0.99) / quiet.percentile_ms(0.99).max(0.01) * 1000.0)
                    .round() / 1000.0,
                "target": 2.0,
            },
            "non_200": flooded.other,
            "flood_req_per_s": round1(flood.rps()),
            "flood_answers": flood.other,
        }));
        assert!(
            quiet.other.is_empty() && flooded.other.is_empty(),
            "the legitimate client got non-200 answers"
        );
        let _ = api.start_kill();
        let _ = api.wait().await;
    });
}
