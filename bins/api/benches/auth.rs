//! `cargo xtask bench auth`: authenticated `GET /v1/account` requests/s
//! against its reference limit, `GET /api/health` (same server, same
//! connections, no authentication or database), at 32 concurrent keep-alive
//! connections. Prints one JSON line per figure and the ratio.
//!
//! The API runs in-process on a real PostgreSQL from the testkit (a
//! throwaway cluster: `fsync=off`, which does not matter for this read-only
//! path). `E2A_BENCH_SECS` sets each phase's duration (default 5).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use e2a_api::{Config, Listeners};
use e2a_runtime::CancellationToken;
use e2a_store::{Store, StoreConfig, address::EmailAddress, api_keys, users};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 32;

struct Phase {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn connection_loop(
    addr: std::net::SocketAddr,
    path: &'static str,
    auth: Option<Arc<str>>,
    until: Instant,
) -> (u64, u64, Vec<u64>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(100_000));
    while Instant::now() < until {
        let mut req = Request::get(path).header("host", "bench");
        if let Some(key) = &auth {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let started = Instant::now();
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("request");
        let status = resp.status();
        resp.into_body().collect().await.expect("body");
        latencies.push(started.elapsed().as_micros() as u64);
        if status == 200 { ok += 1 } else { errors += 1 }
    }
    (ok, errors, latencies)
}

async fn phase(
    addr: std::net::SocketAddr,
    path: &'static str,
    auth: Option<Arc<str>>,
    secs: u64,
) -> Phase {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(connection_loop(addr, path, auth.clone(), until)))
        .collect();
    let mut result = Phase {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (ok, errors, lat) = t.await.expect("load task");
        result.requests += ok;
        result.errors += errors;
        result.latencies_us.extend(lat);
    }
    result.elapsed = started.elapsed();
    result.latencies_us.sort_unstable();
    result
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
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

fn report(endpoint: &str, p: &Phase) -> f64 {
    let rps = p.requests as f64 / p.elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "auth", "endpoint": endpoint, "connections": CONNECTIONS,
            "requests": p.requests, "errors": p.errors,
            "req_per_s": (rps * 10.0).round() / 10.0,
            "p50_ms": percentile(&p.latencies_us, 0.50), "p99_ms": percentile(&p.latencies_us, 0.99),
        })
    );
    rps
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let secs: u64 = std::env::var("E2A_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    e2a_runtime::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let db = e2a_testkit::TestDb::new().await;
        let store = Store::new(&StoreConfig::new(db.url())).expect("store");
        let key: Arc<str> = {
            let c = store.client().await.expect("client");
            let user = users::create(&c, &EmailAddress::parse("bench@example.com").unwrap(), "")
                .await
                .expect("user");
            api_keys::create(&c, &user.id, "bench", None)
                .await
                .expect("key")
                .plaintext
                .into()
        };
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut config = Config::for_database(db.url());
        config.common.db.db_pool_size = 16;
        let server = tokio::spawn(e2a_api::run(
            config,
            Listeners { http, ops },
            shutdown.clone(),
        ));

        // Warm up both paths (connections, prepared statements, caches).
        phase(addr, "/api/health", None, 1).await;
        phase(addr, "/v1/account", Some(key.clone()), 1).await;

        let health = phase(addr, "/api/health", None, secs).await;
        let account = phase(addr, "/v1/account", Some(key.clone()), secs).await;
        let health_rps = report("GET /api/health", &health);
        let account_rps = report("GET /v1/account", &account);
        println!(
            "{}",
            serde_json::json!({
                "bench": "auth", "figure": "account_vs_health",
                "ratio": ((account_rps / health_rps) * 1000.0).round() / 1000.0,
                "rss_mb": (rss_mb() * 10.0).round() / 10.0,
            })
        );
        assert_eq!(
            account.errors + health.errors,
            0,
            "non-200 answers during the benchmark"
        );
        shutdown.cancel();
        server.await.expect("server task").expect("server");
    });
}
