//! Slow, idle and too many connections, and requests the server cannot
//! finish in time, against the real server on real sockets with a real
//! Postgres. Timeouts and caps are lowered in each test's configuration so
//! the tests stay quick. A request is held in flight the way it happens in
//! production: the test locks `api_keys` in its own transaction, so the API's
//! key lookup waits on the database until the test lets go.

mod common;

use std::{
    io::{ErrorKind, Read},
    net::SocketAddr,
    time::Duration,
};

use common::{Running, error_body, key_for};
use e2a_api::Config;
use e2a_testkit::TestDb;
use reqwest::{StatusCode, header};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const REQUEST: &[u8] = b"GET /api/health HTTP/1.1\r\nHost: e2a.test\r\n\r\n";

/// Starts the API with `config` and waits until it answers.
async fn start(config: Config) -> Running {
    let api = Running::start(config).await;
    assert_eq!(api.get("/api/health", None).await.status(), 200);
    api
}

/// Connects to `addr` and writes `bytes` one at a time, `every` apart, while
/// reading. Returns how long after connecting the server closed the
/// connection and what it sent, or `None` if it was still open after
/// `give_up`.
async fn dribble(
    addr: SocketAddr,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<(Duration, Vec<u8>)> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    let reader = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let writer = async {
        for byte in bytes {
            if wr.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        got = reader => Some((started.elapsed(), got)),
        () = writer => unreachable!(),
        () = tokio::time::sleep(give_up) => None,
    }
}

/// Reads one HTTP/1.1 response (with a `Content-Length` body) from
/// `stream`; returns its head and body.
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(data[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed inside a response body");
        data.extend_from_slice(&buf[..n]);
    }
    (head, data[head_end..].to_vec())
}

/// Waits (bounded) until the server closes `stream`; returns how long that
/// took, or `None` if it was still open after `give_up`.
async fn closed_within(stream: &mut TcpStream, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(give_up, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Some(started.elapsed()),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => None,
    }
}

/// Locks `api_keys` in a transaction on its own connection, so every API
/// key lookup waits until [`KeyLock::release`]. A second connection watches
/// the waiters: inside a transaction `pg_stat_activity` is a snapshot.
struct KeyLock {
    holder: tokio_postgres::Client,
    watcher: tokio_postgres::Client,
}

impl KeyLock {
    async fn take(db: &TestDb) -> KeyLock {
        let holder = db.client().await;
        holder
            .batch_execute("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        KeyLock {
            holder,
            watcher: db.client().await,
        }
    }

    /// Waits until `n` sessions of this database wait on a lock: the
    /// requests are then in flight inside the API.
    async fn wait_for_waiters(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = self
                .watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{waiting} of {n} requests reached the database"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn release(self) {
        self.holder.batch_execute("ROLLBACK").await.unwrap();
    }
}

#[tokio::test]
async fn a_client_dribbling_its_headers_is_disconnected_within_the_header_timeout() {
    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.common.http.http_header_read_timeout_secs = 2;
    config.common.http.http_idle_timeout_secs = 60;
    let api = start(config).await;

    // One byte a second on the API and on the ops listener: cut off after
    // the header timeout (2 s), long before the head is complete, without
    // an answer.
    for (listener, addr) in [("http", api.http_addr()), ("ops", api.ops_addr())] {
        let (after, got) = dribble(
            addr,
            REQUEST,
            Duration::from_secs(1),
            Duration::from_secs(8),
        )
        .await
        .unwrap_or_else(|| panic!("{listener}: still open after 8 s"));
        assert!(
            after >= Duration::from_millis(1800) && after <= Duration::from_millis(3500),
            "{listener}: closed after {after:?}"
        );
        assert!(
            got.is_empty(),
            "{listener}: {}",
            String::from_utf8_lossy(&got)
        );
    }

    // A connection that never sends anything gets the same deadline.
    let (after, got) = dribble(
        api.http_addr(),
        b"",
        Duration::from_secs(1),
        Duration::from_secs(8),
    )
    .await
    .expect("a silent connection still open after 8 s");
    assert!(
        after >= Duration::from_millis(1800) && after <= Duration::from_millis(3500),
        "closed after {after:?}"
    );
    assert!(got.is_empty());

    // A client that sends its head at once is served as before.
    assert_eq!(api.get("/api/health", None).await.status(), 200);
    api.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    // A long header timeout: what closes the connection below is the idle
    // timeout, not the header clock.
    config.common.http.http_header_read_timeout_secs = 30;
    config.common.http.http_idle_timeout_secs = 2;
    let api = start(config).await;

    for (listener, addr) in [("http", api.http_addr()), ("ops", api.ops_addr())] {
        let path: &[u8] = if listener == "http" {
            REQUEST
        } else {
            b"GET /healthz HTTP/1.1\r\nHost: e2a.test\r\n\r\n"
        };
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // Keep-alive works: two requests on one connection, the second
        // after a pause shorter than the idle timeout.
        stream.write_all(path).await.unwrap();
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{listener}: {head}");
        tokio::time::sleep(Duration::from_millis(800)).await;
        stream.write_all(path).await.unwrap();
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{listener}: {head}");

        let after = closed_within(&mut stream, Duration::from_secs(8))
            .await
            .unwrap_or_else(|| panic!("{listener}: idle connection still open after 8 s"));
        assert!(
            after >= Duration::from_millis(1800) && after <= Duration::from_millis(3500),
            "{listener}: closed {after:?} after the last response"
        );
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_keep_a_new_client_out() {
    const IDLE: usize = 2000;
    const BATCH: usize = 100;
    const CAP: u32 = 100;
    // Client and server sides of every connection live in this process.
    let needed = (IDLE + CAP as usize + 1000) as u64;
    let limit = rlimit::increase_nofile_limit(needed).unwrap();
    assert!(
        limit >= needed,
        "this test needs {needed} open files; the hard limit allows {limit} (raise `ulimit -Hn`)"
    );

    let db = TestDb::new().await;
    let key = key_for(db.url(), "busy@example.com").await;
    let mut config = Config::for_database(db.url());
    config.http_max_connections = CAP;
    // Timers far away: only the cap can close the idle connections here.
    config.common.http.http_header_read_timeout_secs = 120;
    config.common.http.http_idle_timeout_secs = 120;
    let api = start(config).await;

    // A request in progress while the flood arrives must not be hurt.
    let lock = KeyLock::take(&db).await;
    let busy = tokio::spawn(
        api.request(reqwest::Method::GET, "/v1/account", &key)
            .send(),
    );
    lock.wait_for_waiters(1).await;

    let addr = api.http_addr();
    // In batches smaller than any listen backlog, each followed by a request
    // on a connection of its own: once it is answered, the server has
    // accepted the whole batch (the backlog is first in, first out). An
    // overflowing backlog would drop handshakes, and the client would count
    // as open connections the server never accepted.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE / BATCH {
        idle.extend(connect_all(addr, BATCH).await);
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe.write_all(REQUEST).await.unwrap();
        let (head, _) = read_response(&mut probe).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }

    // A new client is served promptly.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let resp = fresh
        .get(format!("{}/api/health", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a new client waited {:?}",
        started.elapsed()
    );

    // The server holds no more than its cap: the idle connections beyond
    // it were closed to make room.
    let idle: Vec<std::net::TcpStream> = idle.into_iter().map(|s| s.into_std().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let still_open = loop {
        let open = idle.iter().filter(|s| is_open(s)).count();
        if open <= CAP as usize || Instant::now() > deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        still_open <= CAP as usize,
        "{still_open} of {IDLE} idle connections still open with a cap of {CAP}"
    );

    // The request that was in progress all along completes normally.
    lock.release().await;
    let resp = busy.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);

    let metrics = fresh
        .get(format!("{}/metrics", api.ops))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("e2a_http_connections_closed_total")
                && l.contains("listener=\"http\"")
                && l.contains("reason=\"evicted\"")),
        "{metrics}"
    );
    drop(idle);
    api.stop().await;
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_new_one_waits_then_gets_in() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "cap@example.com").await;
    let mut config = Config::for_database(db.url());
    config.http_max_connections = 2;
    // Timers far away: only the cap decides here.
    config.common.http.http_header_read_timeout_secs = 60;
    config.common.http.http_idle_timeout_secs = 60;
    let api = start(config).await;
    let addr = api.http_addr();

    // Two connections, each with a request in progress: the cap is full.
    let lock = KeyLock::take(&db).await;
    let account = format!(
        "GET /v1/account HTTP/1.1\r\nHost: e2a.test\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(account.as_bytes()).await.unwrap();
        busy.push(stream);
    }
    lock.wait_for_waiters(2).await;

    // A third waits: it is neither refused nor served, and nothing in
    // progress is disturbed for it.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(REQUEST).await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.peek(&mut buf))
            .await
            .is_err(),
        "served beyond the cap"
    );

    // The two finish and stay open, idle; the waiting one takes the place
    // of one of them at once, not after the 60 s idle timeout.
    lock.release().await;
    for stream in &mut busy {
        let (head, _) = read_response(stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let (head, _) = tokio::time::timeout(Duration::from_secs(2), read_response(&mut third))
        .await
        .expect("the waiting connection was not served once the others went idle");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    api.stop().await;
}

/// True while the peer has not closed `stream` (a non-blocking read).
fn is_open(mut stream: &std::net::TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::WouldBlock => true,
        Err(_) => false,
    }
}

/// Opens `n` connections to `addr` concurrently.
async fn connect_all(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(TcpStream::connect(addr)))
        .collect();
    let mut streams = Vec::with_capacity(n);
    for task in tasks {
        streams.push(task.await.unwrap().expect("connect"));
    }
    streams
}

#[tokio::test]
async fn requests_past_the_in_flight_bound_are_shed_with_503_and_retry_after() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "shed@example.com").await;
    let mut config = Config::for_database(db.url());
    config.http_max_in_flight = 1;
    let api = start(config).await;

    let lock = KeyLock::take(&db).await;
    let first = tokio::spawn(
        api.request(reqwest::Method::GET, "/v1/account", &key)
            .send(),
    );
    lock.wait_for_waiters(1).await;

    // One request in flight: the next is shed at once, whatever its route.
    let started = Instant::now();
    let resp = api.get("/api/health", None).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let (status, body) = error_body(resp).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    // The client's request id is echoed in the header and the body.
    let resp = api
        .http
        .get(format!("{}/v1/account", api.base))
        .header("x-request-id", "shed-trace-1")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-request-id"], "shed-trace-1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "shed-trace-1", "{body}");

    // The ops listener has its own bound.
    let ready = api
        .http
        .get(format!("{}/healthz", api.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // Once the first request is done, requests are served again.
    lock.release().await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(api.get("/api/health", None).await.status(), 200);
    api.stop().await;
}

#[tokio::test]
async fn a_request_past_the_request_timeout_is_answered_503_with_retry_after() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "slow@example.com").await;
    let mut config = Config::for_database(db.url());
    config.request_timeout_secs = 1;
    let api = start(config).await;

    // The key lookup waits on a lock held by another transaction: the
    // server cannot answer within its 1 s deadline.
    let lock = KeyLock::take(&db).await;
    let started = Instant::now();
    let resp = api
        .request(reqwest::Method::GET, "/v1/account", &key)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (status, body) = error_body(resp).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(body["error"]["request_id"], request_id.as_str());

    // The abandoned lookup does not poison the pool.
    lock.release().await;
    let resp = api
        .request(reqwest::Method::GET, "/v1/account", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    api.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_drains_requests_in_progress() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "drain@example.com").await;
    let api = start(Config::for_database(db.url())).await;
    let addr = api.http_addr();

    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(REQUEST).await.unwrap();
    let (head, _) = read_response(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let lock = KeyLock::take(&db).await;
    let busy = tokio::spawn(
        api.request(reqwest::Method::GET, "/v1/account", &key)
            .send(),
    );
    lock.wait_for_waiters(1).await;

    api.shutdown.cancel();
    // The kept-alive connection closes at once; no new connection is taken.
    closed_within(&mut idle, Duration::from_secs(2))
        .await
        .expect("idle connection still open after shutdown");
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The request in progress finishes, then the service stops cleanly.
    assert!(!api.task.is_finished());
    lock.release().await;
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(10), api.task)
        .await
        .expect("the api did not stop after draining")
        .unwrap()
        .expect("the api stopped with an error");
}
