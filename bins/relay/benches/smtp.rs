//! `cargo xtask bench smtp`: the relay's end-to-end rate against its
//! reference limit, measured in the same run.
//!
//! * **relay**: the real `e2a-relay` binary (release, a separate process so
//!   its memory is measured alone) with 20 concurrent SMTP sessions, each
//!   sending 4 KB messages (EHLO once, then MAIL/RCPT/DATA per message) to
//!   one agent. DNS checks are disabled (no network here), so the figure is
//!   SMTP + parsing + signing + the store transaction.
//! * **store limit**: the identical store transaction (`inbound::ingest`,
//!   same message shape, one recipient) called directly from 20 tasks.
//!
//! Prints JSON lines: `msgs_per_s` for both, their `ratio` (target ≥ 0.6)
//! and the relay's peak `rss_mb` during the run (target ≤ 64).
//! `E2A_BENCH_MESSAGES` sets the count (default 4000).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains,
    ids::MessageId,
    inbound::{self, Delivery, InboundMail},
    users,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const SESSIONS: usize = 20;
const AGENT: &str = "bench@agents.bench";

fn message(id: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Load <load@remote.bench>\r\nTo: {AGENT}\r\nSubject: bench {id}\r\nMessage-ID: <{id}.{}@remote.bench>\r\n\
         Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nContent-Type: text/plain\r\n\r\n",
        std::process::id()
    )
    .into_bytes();
    while m.len() < 4096 - 2 {
        m.extend_from_slice(b"The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    m.truncate(4094);
    m.extend_from_slice(b"\r\n");
    m
}

async fn reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut last = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.expect("read") == 0 {
            panic!("relay closed the connection; last reply {last:?}");
        }
        let done = line.as_bytes().get(3) != Some(&b'-');
        last = line;
        if done {
            return last;
        }
    }
}

async fn session(addr: SocketAddr, ids: Vec<usize>) {
    let (r, mut w) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    let mut r = BufReader::new(r);
    reply(&mut r).await;
    w.write_all(b"EHLO load.bench\r\n").await.unwrap();
    reply(&mut r).await;
    for id in ids {
        w.write_all(
            format!("MAIL FROM:<load@remote.bench>\r\nRCPT TO:<{AGENT}>\r\nDATA\r\n").as_bytes(),
        )
        .await
        .unwrap();
        for expected in ["250", "250", "354"] {
            let got = reply(&mut r).await;
            assert!(
                got.starts_with(expected),
                "expected {expected}, got {got:?}"
            );
        }
        let mut data = message(id);
        data.extend_from_slice(b".\r\n");
        w.write_all(&data).await.unwrap();
        let got = reply(&mut r).await;
        assert!(got.starts_with("250"), "DATA answered {got:?}");
    }
    w.write_all(b"QUIT\r\n").await.unwrap();
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn main() {
    let count: usize = std::env::var("E2A_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = e2a_testkit::TestDb::new().await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let user = {
            let mut c = store.client().await.unwrap();
            let user = users::create(&c, &EmailAddress::parse("bench@example.com").unwrap(), "").await.unwrap().id;
            domains::ensure_shared(&c, "agents.bench").await.unwrap();
            let new = NewAgent {
                address: EmailAddress::parse(AGENT).unwrap(),
                name: String::new(),
                webhook_url: String::new(),
                agent_mode: AgentMode::Local,
            };
            agents::create(&mut c, &user, &new, 10).await.unwrap();
            user
        };

        // The relay, as its own process.
        let smtp_port = free_port();
        let ops_port = free_port();
        let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-relay"))
            .env("E2A_DATABASE_URL", db.url())
            .env("E2A_SMTP_ADDR", format!("127.0.0.1:{smtp_port}"))
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{ops_port}"))
            .env("E2A_SMTP_AUTH_DNS", "disabled")
            .env("E2A_SMTP_DOMAIN", "mx.bench")
            .env("E2A_DB_POOL_SIZE", "20")
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-relay");
        let pid = relay.id().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{smtp_port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "relay did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Warm-up, then the measured run.
        session(addr, (0..50).map(|i| 10_000_000 + i).collect()).await;
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max((rss_mb(pid) * 10.0) as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let started = Instant::now();
        let tasks: Vec<_> = (0..SESSIONS)
            .map(|s| tokio::spawn(session(addr, (0..count).filter(|i| i % SESSIONS == s).collect())))
            .collect();
        for t in tasks {
            t.await.expect("session");
        }
        let relay_elapsed = started.elapsed();
        sampler.abort();
        let stored: i64 = db.client().await.query_one("SELECT count(*) FROM messages", &[]).await.unwrap().get(0);
        assert_eq!(stored as usize, count + 50, "every 250 is a stored message");

        // The reference: the same transaction straight into Postgres.
        let store = Arc::new(store);
        let started = Instant::now();
        let tasks: Vec<_> = (0..SESSIONS)
            .map(|s| {
                let (store, user) = (store.clone(), user.clone());
                tokio::spawn(async move {
                    for i in (0..count).filter(|i| i % SESSIONS == s) {
                        let raw = message(20_000_000 + i);
                        let mid = format!("{}.{}@remote.bench", 20_000_000 + i, std::process::id());
                        let to = vec![AGENT.to_owned()];
                        let mail = InboundMail {
                            raw: &raw,
                            email_message_id: &mid,
                            sender: "load@remote.bench",
                            subject: "bench",
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
                            agent_id: AGENT.into(),
                            agent_domain: "agents.bench".into(),
                            user_id: user.clone(),
                            auth_headers: serde_json::json!({"X-E2A-Auth-Verified": "false"}),
                        };
                        inbound::ingest(&store, &mail, &[delivery]).await.expect("ingest");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("ingest task");
        }
        let store_elapsed = started.elapsed();

        let relay_rate = count as f64 / relay_elapsed.as_secs_f64();
        let store_rate = count as f64 / store_elapsed.as_secs_f64();
        let round = |x: f64| (x * 10.0).round() / 10.0;
        println!("{}", serde_json::json!({"bench": "smtp", "figure": "relay", "sessions": SESSIONS, "message_bytes": 4096, "messages": count, "msgs_per_s": round(relay_rate)}));
        println!("{}", serde_json::json!({"bench": "smtp", "figure": "store_limit", "tasks": SESSIONS, "messages": count, "msgs_per_s": round(store_rate)}));
        println!("{}", serde_json::json!({"bench": "smtp", "figure": "relay_vs_store", "ratio": (relay_rate / store_rate * 1000.0).round() / 1000.0, "target": 0.6}));
        println!("{}", serde_json::json!({"bench": "smtp", "figure": "relay_peak_rss", "sessions": SESSIONS, "rss_mb": peak.load(Ordering::Relaxed) as f64 / 10.0, "target_mb": 64}));
        let _ = relay.start_kill();
    });
}
