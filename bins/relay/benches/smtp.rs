//! `cargo xtask bench smtp`: the relay's end-to-end rate against the
//! raw-SQL limit of the same durable Postgres, measured in the same run.
//!
//! One throwaway cluster is created for the run (under the cargo target
//! directory, else the OS temp dir) with **production durability**: `fsync`,
//! `synchronous_commit` and `full_page_writes` on (checked with `SHOW` and
//! printed first). Every figure below runs in a fresh database of that
//! cluster, after a warm-up and a `CHECKPOINT`, from 20 concurrent clients,
//! with 4096-byte messages whose body is incompressible (random base64
//! lines, like an attachment: Postgres cannot shrink the stored row).
//!
//! For each of two shapes — `one_tenant_20_agents` (one user, 20 agents on
//! one verified domain of theirs) and `twenty_tenants` (20 users with one
//! agent each on the shared domain); client `i` always writes to agent `i` —
//! it measures:
//!
//! * **relay**: the real `e2a-relay` binary (release, its own process so its
//!   memory is measured alone) with 20 SMTP sessions, each sending its share
//!   of the messages (EHLO once, then pipelined MAIL/RCPT/DATA and the body
//!   per message). DNS checks are disabled (no network here), so the figure
//!   is SMTP + parsing + signing + the store transaction, which the relay
//!   shares between the messages whose DATA ends at the same moment (group
//!   commit, `e2a_relay::ingests`). Also: the WAL the
//!   cluster wrote during the run per accepted message
//!   (`pg_current_wal_lsn()` before and after) and the relay's peak VmRSS.
//! * **store**: one message's store transaction alone (`inbound::ingest`,
//!   same message, one recipient, no group commit) called directly from 20
//!   tasks — what the relay would reach storing each message on its own.
//! * **raw_sql_limit** (the reference): the minimal durable transaction for
//!   an accepted message, written as plain SQL without the store, from 20
//!   connections: `BEGIN; INSERT` one row with the 4 KB raw message into a
//!   table with a primary key and one secondary index `(agent_id,
//!   created_at)`; `INSERT` one small jsonb event row whose AFTER INSERT
//!   statement trigger does `pg_notify` (like `webhook_events`); `COMMIT`.
//!   Measured first and again last in the shape; the figure is the mean of
//!   the two runs (both printed), so a drift of the shared machine or of
//!   the disk's flush latency weighs on both sides of the ratio alike.
//!
//! Then, with a relay accepting 11 MiB messages: while 4 sessions each send
//! one 10 MiB message (multipart, base64 attachment), a fifth session
//! repeats `EHLO` and times each `EHLO`→`250` round trip, from before the
//! first body byte until the last of the four got its `250`.
//!
//! Prints JSON lines (stdout; progress goes to stderr): per shape `relay`,
//! `store` and `raw_sql_limit` in `msgs_per_s`; `relay_vs_raw_sql` as
//! `ratio` (target ≥ 0.6) and `store_vs_raw_sql`; `wal` as
//! `wal_bytes_per_msg` and `ratio_to_message` (target ≤ 3); `relay_peak_rss`
//! in `rss_mb` (target ≤ 64); then `ehlo_during_10mib_data` in `p50_ms`,
//! `p99_ms`, `max_ms` (target: under 50 ms).
//! `E2A_BENCH_MESSAGES` sets the messages per figure and shape (default 3000).

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    os::fd::AsFd as _,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains::{self, DkimKeys},
    ids::{MessageId, UserId},
    inbound::{self, Delivery, InboundMail},
    migrate::{self, MigrationMode},
    users,
};
use e2a_testkit::cluster::{Cluster, Reaper};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_postgres::{Client, NoTls};

/// Concurrent SMTP sessions, store tasks and raw-SQL connections.
const SESSIONS: usize = 20;
/// Size of every throughput message, CRLFs included.
const MESSAGE_BYTES: usize = 4096;
/// Size of each message of the EHLO-latency test.
const BIG_MESSAGE_BYTES: usize = 10 << 20;
/// The relay's `E2A_SMTP_MAX_MESSAGE_BYTES` in the EHLO-latency test.
const BIG_MESSAGE_LIMIT: usize = 11 << 20;
/// Sessions sending a big message at once in the EHLO-latency test.
const BIG_SENDERS: usize = 4;
/// Warm-up messages per client before each measured run.
const WARMUP_PER_CLIENT: usize = 3;
/// The migrated database every e2a database of the run is cloned from.
const TEMPLATE: &str = "bench_tpl";
const SHARED_DOMAIN: &str = "agents.bench";
const TENANT_DOMAIN: &str = "tenant.bench";
const SENDER: &str = "load@remote.bench";

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One user with 20 agents on one verified domain of theirs.
    OneTenant,
    /// 20 users with one agent each on the shared domain.
    TwentyTenants,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::OneTenant => "one_tenant_20_agents",
            Shape::TwentyTenants => "twenty_tenants",
        }
    }
}

/// One recipient agent (client `i` writes to target `i`).
#[derive(Debug, Clone)]
struct Target {
    agent: String,
    domain: String,
    user: UserId,
}

// ---------------------------------------------------------------- messages

/// xorshift64*: deterministic filler, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `lines` lines of 76 random base64 characters, each ending in CRLF.
    fn base64_lines(&mut self, lines: usize) -> Vec<u8> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::with_capacity(lines * 78);
        for _ in 0..lines {
            let mut bits = 0u64;
            for i in 0..76 {
                if i % 10 == 0 {
                    bits = self.next();
                }
                out.push(ALPHABET[(bits & 63) as usize]);
                bits >>= 6;
            }
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// Incompressible body text shared by the throughput messages.
fn filler() -> Arc<Vec<u8>> {
    Arc::new(Rng(0x9e37_79b9_7f4a_7c15).base64_lines(MESSAGE_BYTES / 78 + 1))
}

/// A message of exactly [`MESSAGE_BYTES`] to `to`, unique by `id`.
fn message(id: u64, to: &str, filler: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "From: Load <{SENDER}>\r\nTo: {to}\r\nSubject: bench {id}\r\nMessage-ID: <{id}.{}@remote.bench>\r\n\
         Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nContent-Type: text/plain\r\n\r\n",
        std::process::id()
    )
    .into_bytes();
    let body = MESSAGE_BYTES - m.len() - 2;
    m.extend_from_slice(&filler[..body]);
    if m.last() == Some(&b'\r') {
        *m.last_mut().unwrap() = b'A';
    }
    m.extend_from_slice(b"\r\n");
    debug_assert_eq!(m.len(), MESSAGE_BYTES);
    m
}

/// A multipart message of exactly [`BIG_MESSAGE_BYTES`]: a short text part
/// and a base64 attachment of random bytes.
fn big_message(n: usize, to: &str) -> Vec<u8> {
    let head = |pad: usize| {
        format!(
            "From: Load <{SENDER}>\r\nTo: {to}\r\nSubject: big {n}\r\n\
             Message-ID: <big.{n}.{}@remote.bench>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0undary\"\r\n\r\n\
             --b0undary\r\nContent-Type: text/plain\r\n\r\nAttached{}.\r\n\
             --b0undary\r\nContent-Type: application/octet-stream\r\n\
             Content-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=\"blob{n}.bin\"\r\n\r\n",
            std::process::id(),
            "!".repeat(pad)
        )
    };
    let tail = "--b0undary--\r\n";
    let room = BIG_MESSAGE_BYTES - head(0).len() - tail.len();
    let mut m = head(room % 78).into_bytes();
    m.extend(Rng(0x1234_5678 + n as u64).base64_lines(room / 78));
    m.extend_from_slice(tail.as_bytes());
    assert_eq!(m.len(), BIG_MESSAGE_BYTES);
    m
}

// ------------------------------------------------------------ SMTP client

struct Smtp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Smtp {
    /// Connects, reads the greeting and says EHLO.
    async fn open(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the relay");
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        let mut s = Smtp {
            r: BufReader::new(r),
            w,
        };
        let greeting = s.reply().await;
        assert!(greeting.starts_with("220"), "greeting {greeting:?}");
        s.w.write_all(b"EHLO load.bench\r\n").await.unwrap();
        let ehlo = s.reply().await;
        assert!(ehlo.starts_with("250"), "EHLO answered {ehlo:?}");
        s
    }

    /// The last line of the next (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).await.expect("read") == 0 {
                panic!("relay closed the connection; last reply {last:?}");
            }
            let done = line.as_bytes().get(3) != Some(&b'-');
            last = line;
            if done {
                return last;
            }
        }
    }

    /// One pipelined transaction; returns the reply to the end of DATA.
    /// `data` must not contain a line starting with `.`.
    async fn send(&mut self, to: &str, data: &[u8]) -> String {
        self.w
            .write_all(format!("MAIL FROM:<{SENDER}>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes())
            .await
            .unwrap();
        for expected in ["250", "250", "354"] {
            let got = self.reply().await;
            assert!(
                got.starts_with(expected),
                "expected {expected}, got {got:?}"
            );
        }
        if data.len() <= 64 * 1024 {
            let mut buf = Vec::with_capacity(data.len() + 3);
            buf.extend_from_slice(data);
            buf.extend_from_slice(b".\r\n");
            self.w.write_all(&buf).await.unwrap();
        } else {
            self.w.write_all(data).await.unwrap();
            self.w.write_all(b".\r\n").await.unwrap();
        }
        self.reply().await
    }

    /// Sends a message until it is accepted; a `452` (DATA budget
    /// exhausted) is retried. Returns how many `452`s it got.
    async fn deliver(&mut self, to: &str, data: &[u8]) -> u64 {
        let mut deferred = 0;
        loop {
            let got = self.send(to, data).await;
            if got.starts_with("250") {
                return deferred;
            }
            assert!(got.starts_with("452"), "DATA answered {got:?}");
            deferred += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn quit(mut self) {
        let _ = self.w.write_all(b"QUIT\r\n").await;
        let _ = self.reply().await;
    }
}

/// One session sending messages `ids` to `to`; returns the `452` count.
async fn relay_session(addr: SocketAddr, to: String, ids: Vec<u64>, filler: Arc<Vec<u8>>) -> u64 {
    let mut s = Smtp::open(addr).await;
    let mut deferred = 0;
    for id in ids {
        deferred += s.deliver(&to, &message(id, &to, &filler)).await;
    }
    s.quit().await;
    deferred
}

/// `SESSIONS` sessions, session `s` sending messages `first + i` for every
/// `i < count` with `i % SESSIONS == s` to `targets[s]`; returns the `452`s.
async fn relay_load(
    addr: SocketAddr,
    targets: &[Target],
    first: u64,
    count: usize,
    filler: &Arc<Vec<u8>>,
) -> u64 {
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let ids = (0..count)
                .filter(|i| i % SESSIONS == s)
                .map(|i| first + i as u64)
                .collect();
            tokio::spawn(relay_session(
                addr,
                targets[s].agent.clone(),
                ids,
                filler.clone(),
            ))
        })
        .collect();
    let mut deferred = 0;
    for t in tasks {
        deferred += t.await.expect("SMTP session");
    }
    deferred
}

// ------------------------------------------------------------ relay process

struct Relay {
    child: tokio::process::Child,
    addr: SocketAddr,
    pid: u32,
}

impl Relay {
    /// Starts `e2a-relay` on `db_url` and waits until it accepts SMTP
    /// connections. Its logs go to stderr (stdout is for the JSON lines).
    async fn start(db_url: &str, max_message_bytes: usize) -> Relay {
        let smtp_port = free_port();
        let ops_port = free_port();
        let log = std::io::stderr().as_fd().try_clone_to_owned().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-relay"))
            .env("E2A_DATABASE_URL", db_url)
            .env("E2A_SMTP_ADDR", format!("127.0.0.1:{smtp_port}"))
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{ops_port}"))
            .env("E2A_SMTP_AUTH_DNS", "disabled")
            .env("E2A_SMTP_DOMAIN", "mx.bench")
            .env("E2A_SMTP_MAX_MESSAGE_BYTES", max_message_bytes.to_string())
            .env("E2A_SMTP_MAX_TRANSACTIONS", "1000000")
            .env("E2A_SMTP_MAX_RCPT_COMMANDS", "1000000")
            .env("E2A_DB_POOL_SIZE", SESSIONS.to_string())
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-relay");
        let pid = child.id().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{smtp_port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("e2a-relay exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "e2a-relay did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Relay { child, addr, pid }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Samples `pid`'s VmRSS every 20 ms until aborted; the peak in tenths of MB.
fn rss_sampler(pid: u32) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let peak = Arc::new(AtomicU64::new(0));
    let task = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max((rss_mb(pid) * 10.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    (peak, task)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- Postgres

fn start_cluster() -> (Cluster, Reaper) {
    e2a_testkit::durable_bench_cluster("smtp")
}

async fn connect(url: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// The cluster's WAL position in bytes.
async fn wal_position(admin: &Client) -> f64 {
    admin
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A checkpoint (every measured run starts from one), then the WAL position.
async fn checkpoint(admin: &Client) -> f64 {
    admin.batch_execute("CHECKPOINT").await.unwrap();
    wal_position(admin).await
}

async fn drop_db(admin: &Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Creates and migrates [`TEMPLATE`]; its connection is closed on return.
async fn create_template(cluster: &Cluster, admin: &Client) {
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
}

/// A fresh migrated database `name` holding `shape`'s users and agents.
async fn e2a_db(cluster: &Cluster, admin: &Client, name: &str, shape: Shape) -> Vec<Target> {
    drop_db(admin, name).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
        .await
        .unwrap();
    let store = Store::new(&StoreConfig {
        pool_size: 1,
        ..StoreConfig::new(cluster.url(name))
    })
    .unwrap();
    let mut c = store.client().await.unwrap();
    let agent = |address: &str| NewAgent {
        address: EmailAddress::parse(address).unwrap(),
        name: String::new(),
        webhook_url: String::new(),
        agent_mode: AgentMode::Local,
    };
    let email = |i: usize| EmailAddress::parse(&format!("owner{i}@example.com")).unwrap();
    let mut targets = Vec::with_capacity(SESSIONS);
    match shape {
        Shape::OneTenant => {
            let user = users::create(&c, &email(0), "").await.unwrap().id;
            let keys = DkimKeys {
                selector: "e2a202611".into(),
                public_key_b64: "bench".into(),
                private_key_der: vec![0],
            };
            domains::claim(&mut c, &user, TENANT_DOMAIN, &keys, 10)
                .await
                .unwrap();
            domains::record_check(&mut c, &user, TENANT_DOMAIN, true)
                .await
                .unwrap();
            for i in 0..SESSIONS {
                let address = format!("agent{i:02}@{TENANT_DOMAIN}");
                agents::create(&mut c, &user, &agent(&address), 100)
                    .await
                    .unwrap();
                targets.push(Target {
                    agent: address,
                    domain: TENANT_DOMAIN.into(),
                    user: user.clone(),
                });
            }
        }
        Shape::TwentyTenants => {
            domains::ensure_shared(&c, SHARED_DOMAIN).await.unwrap();
            for i in 0..SESSIONS {
                let user = users::create(&c, &email(i), "").await.unwrap().id;
                let address = format!("tenant{i:02}@{SHARED_DOMAIN}");
                agents::create(&mut c, &user, &agent(&address), 100)
                    .await
                    .unwrap();
                targets.push(Target {
                    agent: address,
                    domain: SHARED_DOMAIN.into(),
                    user,
                });
            }
        }
    }
    targets
}

async fn count_messages(cluster: &Cluster, db: &str) -> usize {
    let (c, _task) = connect(&cluster.url(db)).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    n as usize
}

// ----------------------------------------------------------------- figures

/// Rate, WAL bytes per message and extras of one measured run.
struct Run {
    msgs_per_s: f64,
    wal_bytes_per_msg: f64,
    peak_rss_mb: f64,
    deferred: u64,
}

async fn relay_figure(
    cluster: &Cluster,
    admin: &Client,
    shape: Shape,
    count: usize,
    filler: &Arc<Vec<u8>>,
) -> Run {
    let db = format!("bench_relay_{}", shape.name());
    let targets = e2a_db(cluster, admin, &db, shape).await;
    let relay = Relay::start(&cluster.url(&db), 10 << 20).await;
    let warmup = WARMUP_PER_CLIENT * SESSIONS;
    relay_load(relay.addr, &targets, 900_000_000, warmup, filler).await;

    let before = checkpoint(admin).await;
    let (peak, sampler) = rss_sampler(relay.pid);
    let started = Instant::now();
    let deferred = relay_load(relay.addr, &targets, 0, count, filler).await;
    let elapsed = started.elapsed();
    let after = wal_position(admin).await;
    sampler.abort();
    relay.stop().await;

    let stored = count_messages(cluster, &db).await;
    assert_eq!(stored, count + warmup, "every 250 is a stored message");
    drop_db(admin, &db).await;
    Run {
        msgs_per_s: count as f64 / elapsed.as_secs_f64(),
        wal_bytes_per_msg: (after - before) / count as f64,
        peak_rss_mb: peak.load(Ordering::Relaxed) as f64 / 10.0,
        deferred,
    }
}

/// `inbound::ingest` of message `id` to `target`, as the relay calls it.
async fn ingest_one(store: &Store, target: &Target, id: u64, filler: &[u8]) {
    let raw = message(id, &target.agent, filler);
    let mid = format!("{id}.{}@remote.bench", std::process::id());
    let to = vec![target.agent.clone()];
    let sha256 = inbound::body_sha256(&raw);
    let subject = format!("bench {id}");
    let mail = InboundMail {
        raw: &raw,
        body_sha256: &sha256,
        email_message_id: &mid,
        sender: SENDER,
        subject: &subject,
        to: &to,
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
        agent_id: target.agent.clone(),
        agent_domain: target.domain.clone(),
        user_id: target.user.clone(),
        auth_headers: json!({"X-E2A-Auth-Verified": "false"}),
        legacy_push: false,
    };
    inbound::ingest(store, &mail, &[delivery])
        .await
        .expect("ingest");
}

/// `SESSIONS` tasks ingesting messages `first + i` (`i < count`, task
/// `i % SESSIONS`), task `s` to `targets[s]`.
async fn store_load(
    store: &Arc<Store>,
    targets: &[Target],
    first: u64,
    count: usize,
    filler: &Arc<Vec<u8>>,
) {
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let (store, target, filler) = (store.clone(), targets[s].clone(), filler.clone());
            tokio::spawn(async move {
                for i in (0..count).filter(|i| i % SESSIONS == s) {
                    ingest_one(&store, &target, first + i as u64, &filler).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("ingest task");
    }
}

async fn store_figure(
    cluster: &Cluster,
    admin: &Client,
    shape: Shape,
    count: usize,
    filler: &Arc<Vec<u8>>,
) -> Run {
    let db = format!("bench_store_{}", shape.name());
    let targets = e2a_db(cluster, admin, &db, shape).await;
    let store = Arc::new(
        Store::new(&StoreConfig {
            pool_size: SESSIONS,
            ..StoreConfig::new(cluster.url(&db))
        })
        .unwrap(),
    );
    let warmup = WARMUP_PER_CLIENT * SESSIONS;
    store_load(&store, &targets, 900_000_000, warmup, filler).await;

    let before = checkpoint(admin).await;
    let started = Instant::now();
    store_load(&store, &targets, 0, count, filler).await;
    let elapsed = started.elapsed();
    let after = wal_position(admin).await;
    drop(store);

    assert_eq!(count_messages(cluster, &db).await, count + warmup);
    drop_db(admin, &db).await;
    Run {
        msgs_per_s: count as f64 / elapsed.as_secs_f64(),
        wal_bytes_per_msg: (after - before) / count as f64,
        peak_rss_mb: 0.0,
        deferred: 0,
    }
}

/// The reference schema: what an accepted message minimally costs.
const RAW_SCHEMA: &str = "
CREATE TABLE msgs (
    id         text        PRIMARY KEY,
    agent_id   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    raw        bytea       NOT NULL
);
CREATE INDEX msgs_agent_created_idx ON msgs (agent_id, created_at DESC);
CREATE TABLE events (
    id      text  PRIMARY KEY,
    msg_id  text  NOT NULL,
    payload jsonb NOT NULL
);
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_new', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_notify_trg AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
";

/// One connection's share of the raw-SQL load: per message `BEGIN`,
/// `INSERT INTO msgs`, `INSERT INTO events`, `COMMIT`.
async fn raw_sql_worker(
    mut client: Client,
    agent: String,
    ids: Vec<u64>,
    filler: Arc<Vec<u8>>,
) -> Client {
    let insert_msg = client
        .prepare("INSERT INTO msgs (id, agent_id, raw) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    let insert_event = client
        .prepare("INSERT INTO events (id, msg_id, payload) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    for id in ids {
        let raw = message(id, &agent, &filler);
        let msg_id = format!("msg_{id:016}");
        let event_id = format!("evt_{id:016}");
        let payload = json!({
            "type": "email.received",
            "data": { "message_id": msg_id, "agent": agent, "from": SENDER, "subject": format!("bench {id}") },
        });
        let tx = client.transaction().await.unwrap();
        tx.execute(&insert_msg, &[&msg_id, &agent, &raw])
            .await
            .unwrap();
        tx.execute(&insert_event, &[&event_id, &msg_id, &payload])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    client
}

async fn raw_sql_load(
    clients: Vec<Client>,
    agents: &[String],
    first: u64,
    count: usize,
    filler: &Arc<Vec<u8>>,
) -> Vec<Client> {
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(s, client)| {
            let ids = (0..count)
                .filter(|i| i % SESSIONS == s)
                .map(|i| first + i as u64)
                .collect();
            tokio::spawn(raw_sql_worker(
                client,
                agents[s].clone(),
                ids,
                filler.clone(),
            ))
        })
        .collect();
    let mut clients = Vec::with_capacity(SESSIONS);
    for t in tasks {
        clients.push(t.await.expect("raw SQL task"));
    }
    clients
}

async fn raw_sql_figure(
    cluster: &Cluster,
    admin: &Client,
    shape: Shape,
    count: usize,
    filler: &Arc<Vec<u8>>,
) -> Run {
    let db = format!("bench_raw_{}", shape.name());
    drop_db(admin, &db).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = cluster.url(&db);
    let (setup, _task) = connect(&url).await;
    setup.batch_execute(RAW_SCHEMA).await.unwrap();
    // The agents of the shape, for the same index key distribution.
    let agents: Vec<String> = (0..SESSIONS)
        .map(|i| match shape {
            Shape::OneTenant => format!("agent{i:02}@{TENANT_DOMAIN}"),
            Shape::TwentyTenants => format!("tenant{i:02}@{SHARED_DOMAIN}"),
        })
        .collect();
    let mut clients = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        clients.push(connect(&url).await.0);
    }
    let warmup = WARMUP_PER_CLIENT * SESSIONS;
    let clients = raw_sql_load(clients, &agents, 900_000_000, warmup, filler).await;

    let before = checkpoint(admin).await;
    let started = Instant::now();
    let clients = raw_sql_load(clients, &agents, 0, count, filler).await;
    let elapsed = started.elapsed();
    let after = wal_position(admin).await;
    drop(clients);

    let stored: i64 = setup
        .query_one("SELECT count(*) FROM msgs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, count + warmup);
    drop(setup);
    drop_db(admin, &db).await;
    Run {
        msgs_per_s: count as f64 / elapsed.as_secs_f64(),
        wal_bytes_per_msg: (after - before) / count as f64,
        peak_rss_mb: 0.0,
        deferred: 0,
    }
}

/// EHLO round trips in ms on one session (a plain thread with a blocking
/// socket, so the bench's own runtime adds nothing): 20 on the idle relay
/// first (returned separately), then, after signalling `ready`, one every
/// ~2 ms until `stop`.
fn ehlo_prober(
    addr: SocketAddr,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: Arc<AtomicBool>,
) -> (Vec<f64>, Vec<f64>) {
    let stream = std::net::TcpStream::connect(addr).expect("connect the EHLO prober");
    stream.set_nodelay(true).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut read_reply = || {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "relay closed the prober"
            );
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    };
    assert!(read_reply().starts_with("220"));
    let mut ehlo = || {
        let started = Instant::now();
        w.write_all(b"EHLO probe.bench\r\n").unwrap();
        let got = read_reply();
        assert!(got.starts_with("250"), "EHLO answered {got:?}");
        started.elapsed().as_secs_f64() * 1000.0
    };
    let idle: Vec<f64> = (0..20)
        .map(|_| {
            let ms = ehlo();
            std::thread::sleep(Duration::from_millis(2));
            ms
        })
        .collect();
    let _ = ready.send(());
    let mut busy = Vec::new();
    while !stop.load(Ordering::Acquire) {
        busy.push(ehlo());
        std::thread::sleep(Duration::from_millis(2));
    }
    (idle, busy)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn ehlo_figure(cluster: &Cluster, admin: &Client) -> serde_json::Value {
    let db = "bench_ehlo";
    let targets = e2a_db(cluster, admin, db, Shape::TwentyTenants).await;
    let relay = Relay::start(&cluster.url(db), BIG_MESSAGE_LIMIT).await;
    let bodies: Vec<Arc<Vec<u8>>> = (0..BIG_SENDERS)
        .map(|n| Arc::new(big_message(n, &targets[n].agent)))
        .collect();
    let mut senders = Vec::new();
    for target in &targets[..BIG_SENDERS] {
        senders.push((Smtp::open(relay.addr).await, target.agent.clone()));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let prober = {
        let (addr, stop) = (relay.addr, stop.clone());
        std::thread::spawn(move || ehlo_prober(addr, ready_tx, stop))
    };
    ready_rx.await.expect("EHLO prober");

    let (peak, sampler) = rss_sampler(relay.pid);
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .zip(bodies)
        .map(|((mut s, to), body)| {
            tokio::spawn(async move {
                let deferred = s.deliver(&to, &body).await;
                s.quit().await;
                deferred
            })
        })
        .collect();
    let mut deferred = 0;
    for t in tasks {
        deferred += t.await.expect("10 MiB sender");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Release);
    let (mut idle, mut busy) = tokio::task::spawn_blocking(move || prober.join())
        .await
        .unwrap()
        .expect("EHLO prober thread");
    sampler.abort();
    relay.stop().await;
    assert_eq!(count_messages(cluster, db).await, BIG_SENDERS);
    drop_db(admin, db).await;

    idle.sort_by(f64::total_cmp);
    busy.sort_by(f64::total_cmp);
    let ms = |x: f64| (x * 100.0).round() / 100.0;
    json!({
        "bench": "smtp",
        "figure": "ehlo_during_10mib_data",
        "sending_sessions": BIG_SENDERS,
        "message_bytes": BIG_MESSAGE_BYTES,
        "data_elapsed_ms": elapsed.as_millis() as u64,
        "deferred_452": deferred,
        "samples": busy.len(),
        "p50_ms": ms(percentile(&busy, 0.5)),
        "p99_ms": ms(percentile(&busy, 0.99)),
        "max_ms": ms(busy.last().copied().unwrap_or(f64::NAN)),
        "idle_p50_ms": ms(percentile(&idle, 0.5)),
        "relay_peak_rss_mb": peak.load(Ordering::Relaxed) as f64 / 10.0,
        "target_ms": 50,
    })
}

fn main() {
    let count: usize = std::env::var("E2A_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let run_started = Instant::now();
    let (cluster, _reaper) = start_cluster();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (admin, _admin_task) = connect(&cluster.url("postgres")).await;
        let setting = |name: &'static str| {
            let admin = &admin;
            async move {
                admin
                    .simple_query(&format!("SHOW {name}"))
                    .await
                    .unwrap()
                    .into_iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .unwrap()
            }
        };
        let (fsync, sync_commit, fpw) = (
            setting("fsync").await,
            setting("synchronous_commit").await,
            setting("full_page_writes").await,
        );
        println!(
            "{}",
            json!({
                "bench": "smtp", "figure": "postgres",
                "server_version": setting("server_version").await,
                "fsync": fsync, "synchronous_commit": sync_commit, "full_page_writes": fpw,
                "wal_level": setting("wal_level").await,
                "shared_buffers": setting("shared_buffers").await,
            })
        );
        assert!(
            fsync == "on" && sync_commit == "on" && fpw == "on",
            "the bench needs production durability"
        );
        create_template(&cluster, &admin).await;
        let filler = filler();
        let round = |x: f64| (x * 10.0).round() / 10.0;
        let ratio = |x: f64| (x * 1000.0).round() / 1000.0;

        for shape in [Shape::OneTenant, Shape::TwentyTenants] {
            let name = shape.name();
            // The limit is measured before and after the others and averaged,
            // so a drift of the machine (other load, the disk's flush
            // latency) during the shape shows up in both sides alike.
            eprintln!("bench smtp: {name}: raw SQL limit…");
            let raw_before = raw_sql_figure(&cluster, &admin, shape, count, &filler).await;
            eprintln!("bench smtp: {name}: store…");
            let store = store_figure(&cluster, &admin, shape, count, &filler).await;
            eprintln!("bench smtp: {name}: relay…");
            let relay = relay_figure(&cluster, &admin, shape, count, &filler).await;
            eprintln!("bench smtp: {name}: raw SQL limit again…");
            let raw_after = raw_sql_figure(&cluster, &admin, shape, count, &filler).await;
            let raw = Run {
                msgs_per_s: (raw_before.msgs_per_s + raw_after.msgs_per_s) / 2.0,
                wal_bytes_per_msg: (raw_before.wal_bytes_per_msg + raw_after.wal_bytes_per_msg)
                    / 2.0,
                peak_rss_mb: 0.0,
                deferred: 0,
            };

            let line = |v: serde_json::Value| println!("{v}");
            line(json!({
                "bench": "smtp", "shape": name, "figure": "relay",
                "sessions": SESSIONS, "message_bytes": MESSAGE_BYTES, "messages": count,
                "msgs_per_s": round(relay.msgs_per_s), "deferred_452": relay.deferred,
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "store",
                "tasks": SESSIONS, "message_bytes": MESSAGE_BYTES, "messages": count,
                "msgs_per_s": round(store.msgs_per_s),
                "wal_bytes_per_msg": round(store.wal_bytes_per_msg),
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "raw_sql_limit",
                "connections": SESSIONS, "message_bytes": MESSAGE_BYTES, "messages": count,
                "msgs_per_s": round(raw.msgs_per_s),
                "runs_msgs_per_s": [round(raw_before.msgs_per_s), round(raw_after.msgs_per_s)],
                "wal_bytes_per_msg": round(raw.wal_bytes_per_msg),
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "relay_vs_raw_sql",
                "ratio": ratio(relay.msgs_per_s / raw.msgs_per_s), "target": 0.6,
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "store_vs_raw_sql",
                "ratio": ratio(store.msgs_per_s / raw.msgs_per_s),
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "wal",
                "message_bytes": MESSAGE_BYTES,
                "wal_bytes_per_msg": round(relay.wal_bytes_per_msg),
                "ratio_to_message": ratio(relay.wal_bytes_per_msg / MESSAGE_BYTES as f64),
                "target": 3.0,
            }));
            line(json!({
                "bench": "smtp", "shape": name, "figure": "relay_peak_rss",
                "sessions": SESSIONS, "rss_mb": relay.peak_rss_mb, "target_mb": 64,
            }));
        }

        eprintln!("bench smtp: EHLO latency during 10 MiB DATA…");
        println!("{}", ehlo_figure(&cluster, &admin).await);
        eprintln!(
            "bench smtp: done in {:.0} s",
            run_started.elapsed().as_secs_f64()
        );
    });
}
