//! The webhook client against real sockets: a raw HTTP/1.1 receiver on
//! 127.0.0.1 records what arrives (raw header lines included) and answers as
//! each test tells it to. Nothing of the crate is mocked; name resolution is
//! injected only where a test needs a name to resolve to a given address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use e2a_webhook::{
    Body, ClientConfig, DEFAULT_TOLERANCE, LegacyPayload, LegacyRequest, Lookup, LookupFuture,
    OutcomeKind, Secrets, UrlPolicy, WebhookClient, verify,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// One request as the receiver saw it.
#[derive(Debug)]
struct Received {
    request_line: String,
    /// Header lines exactly as sent (name case preserved).
    raw_headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.raw_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the receiver answers.
#[derive(Clone)]
enum Reply {
    /// These exact bytes after the request.
    Raw(Vec<u8>),
    /// Read the request, then never answer (holds the connection).
    Stall,
    /// `200` with a chunked body that never ends; counts bytes written.
    Endless(Arc<AtomicU64>),
}

fn reply(status: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut raw = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (n, v) in headers {
        raw.push_str(&format!("{n}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    Reply::Raw(raw.into_bytes())
}

struct Receiver {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    async fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(stream, reply.clone(), tx.clone()));
            }
        });
        Self { addr, rx }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("the receiver got no request")
            .expect("receiver stopped")
    }

    /// True when no request arrived (the client has already returned, so
    /// anything it sent has been read by now or never will be).
    async fn got_nothing(&mut self) -> bool {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.rx.try_recv().is_err()
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    reply: Reply,
    tx: mpsc::UnboundedSender<Received>,
) {
    let mut buf = Vec::new();
    while let Some(received) = read_request(&mut stream, &mut buf).await {
        let _ = tx.send(received);
        match &reply {
            Reply::Raw(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Reply::Stall => {
                // Keep the socket open until the client gives up.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Reply::Endless(written) => {
                let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "x".repeat(16 * 1024));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    written.fetch_add(16 * 1024, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Received> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let mut tmp = [0u8; 8192];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_owned();
    let raw_headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = raw_headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < len {
        let mut tmp = [0u8; 8192];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = buf.drain(..len).collect();
    Some(Received {
        request_line,
        raw_headers,
        body,
    })
}

/// Resolves the names in its table and nothing else.
struct FixedLookup(HashMap<&'static str, Vec<IpAddr>>);

impl FixedLookup {
    fn new(entries: &[(&'static str, &[&str])]) -> Arc<Self> {
        Arc::new(Self(
            entries
                .iter()
                .map(|(name, ips)| (*name, ips.iter().map(|ip| ip.parse().unwrap()).collect()))
                .collect(),
        ))
    }
}

impl Lookup for FixedLookup {
    fn lookup(&self, host: &str) -> LookupFuture {
        let result = self.0.get(host).cloned().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such host in the test table",
            )
        });
        Box::pin(async move { result })
    }
}

/// http allowed (the receiver has no TLS), private addresses refused.
fn http_public_only() -> ClientConfig {
    ClientConfig {
        policy: UrlPolicy {
            allow_http: true,
            allow_private: false,
        },
        ..ClientConfig::default()
    }
}

/// What tests and development use: http and loopback allowed.
fn dev() -> ClientConfig {
    ClientConfig {
        policy: UrlPolicy {
            allow_http: true,
            allow_private: true,
        },
        ..ClientConfig::default()
    }
}

fn now_unix() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

const SECRET: &str = "whsec_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const PREVIOUS: &str = "whsec_fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
/// Part of a receiver's URL that must never show up in an error text.
const URL_TOKEN: &str = "tok_SENSITIVE";

fn envelope() -> Body {
    Body::from_envelope(&serde_json::json!({
        "event": "email.received",
        "id": "evt_00000000000000000000000000000001",
        "created_at": "2026-01-01T00:00:00Z",
        "data": {"message_id": "msg_1", "subject": "héllo"}
    }))
    .unwrap()
}

#[tokio::test]
async fn signed_post_arrives_verifiable_with_the_exact_headers_and_body() {
    let mut rx = Receiver::start(reply("204 No Content", &[], "")).await;
    let client = WebhookClient::new(dev()).unwrap();
    let body = envelope();
    let secrets = Secrets::new(SECRET).with_previous(Some(PREVIOUS));
    let outcome = client
        .send_signed(&rx.url("/hooks/e2a?k=1"), &body, &secrets)
        .await;
    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(outcome.status, 204);
    assert_eq!(outcome.error, "");

    let got = rx.next().await;
    assert_eq!(got.request_line, "POST /hooks/e2a?k=1 HTTP/1.1");
    assert_eq!(got.body, body.as_bytes());
    let names: Vec<&str> = got.raw_headers.iter().map(|(n, _)| n.as_str()).collect();
    // Title-cased on the wire, like the Go original.
    assert!(names.contains(&"X-E2a-Signature"), "{names:?}");
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("user-agent"), Some("e2a-webhooks/1"));
    let signature = got.header("x-e2a-signature").unwrap();
    assert_eq!(signature.matches(",v1=").count(), 2, "{signature}");
    assert!(!signature.contains(' '));
    let now = now_unix();
    for secret in [SECRET, PREVIOUS] {
        assert_eq!(
            verify(signature, &[secret], &got.body, now, DEFAULT_TOLERANCE),
            Ok(())
        );
    }
    assert!(
        verify(
            signature,
            &["whsec_wrong"],
            &got.body,
            now,
            DEFAULT_TOLERANCE
        )
        .is_err()
    );
    // No other request went out.
    assert!(rx.got_nothing().await);
}

#[tokio::test]
async fn legacy_push_carries_deprecation_and_auth_headers() {
    let mut rx = Receiver::start(reply("200 OK", &[], "ok")).await;
    let client = WebhookClient::new(dev()).unwrap();
    let auth = std::collections::BTreeMap::from([
        ("X-E2A-Auth-Verified".to_owned(), "true".to_owned()),
        ("X-E2A-Auth-Sender".to_owned(), "a@example.com".to_owned()),
    ]);
    let payload = LegacyPayload {
        message_id: "msg_1",
        conversation_id: "conv_1",
        from: "a@example.com",
        to: Some(&["bot@agents.example".to_owned()]),
        cc: &[],
        reply_to: &[],
        recipient: "bot@agents.example",
        raw_message: b"Subject: hi\r\n\r\nhello",
        auth_headers: &auth,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
    };
    let body = Body::from_legacy(&payload);
    let outcome = client
        .send_legacy(
            &rx.url("/agent"),
            &body,
            auth.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        )
        .await;
    assert!(outcome.is_success(), "{outcome:?}");
    let got = rx.next().await;
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(
        got.header("x-e2a-deprecation"),
        Some(
            "agent_identities.webhook_url is deprecated; use /api/v1/webhooks. Sunset target: 2026-12-01."
        )
    );
    assert_eq!(got.header("sunset"), Some("Tue, 01 Dec 2026 00:00:00 GMT"));
    assert_eq!(got.header("x-e2a-auth-verified"), Some("true"));
    assert_eq!(got.header("x-e2a-auth-sender"), Some("a@example.com"));
    assert_eq!(got.header("x-e2a-signature"), None);
}

/// The request the deliverer builds from a claimed legacy row arrives as
/// §4.2 says: the body's bytes, the deprecation headers, every auth header
/// (names canonicalised like the original's Go), no signature.
#[tokio::test]
async fn a_legacy_request_arrives_as_built() {
    let mut rx = Receiver::start(reply("204 No Content", &[], "")).await;
    let client = WebhookClient::new(dev()).unwrap();
    let auth = std::collections::BTreeMap::from([
        ("X-E2A-Auth-Verified".to_owned(), "false".to_owned()),
        ("X-E2A-Auth-Message-Id".to_owned(), "msg_1".to_owned()),
        ("X-E2A-Auth-Signature".to_owned(), "00ff".to_owned()),
    ]);
    let payload = LegacyPayload {
        message_id: "msg_1",
        conversation_id: "cnv_1",
        from: "a@example.com",
        to: None,
        cc: &[],
        reply_to: &[],
        recipient: "bot@agents.example",
        raw_message: b"Subject: hi\r\n\r\nhello",
        auth_headers: &auth,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
    };
    let request = LegacyRequest::new(&payload).unwrap();
    let outcome = client
        .send_legacy_request(&rx.url("/agent?token=t"), &request)
        .await;
    assert!(outcome.is_success(), "{outcome:?}");
    let got = rx.next().await;
    assert_eq!(got.request_line, "POST /agent?token=t HTTP/1.1");
    assert_eq!(got.body, request.body().as_bytes());
    assert_eq!(got.header("content-type"), Some("application/json"));
    for (name, value) in [
        (
            "X-E2a-Deprecation",
            "agent_identities.webhook_url is deprecated; use /api/v1/webhooks. Sunset target: 2026-12-01.",
        ),
        ("Sunset", "Tue, 01 Dec 2026 00:00:00 GMT"),
        ("X-E2a-Auth-Verified", "false"),
        ("X-E2a-Auth-Message-Id", "msg_1"),
        ("X-E2a-Auth-Signature", "00ff"),
    ] {
        assert!(
            got.raw_headers.iter().any(|(n, v)| n == name && v == value),
            "{name}: {:?}",
            got.raw_headers
        );
    }
    assert_eq!(got.header("x-e2a-signature"), None);
}

#[tokio::test]
async fn header_injection_is_refused_before_sending() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    let client = WebhookClient::new(dev()).unwrap();
    for (name, value) in [
        ("X-E2A-Auth-Verified", "true\r\nX-Injected: yes"),
        ("X-E2A-Auth-Verified", "true\nX-Injected: yes"),
        ("X-E2A-Auth-Verified\r\nX-Injected", "yes"),
        ("Host", "internal.example"),
    ] {
        let outcome = client
            .send_legacy(&rx.url("/"), &envelope(), [(name, value)])
            .await;
        assert_eq!(outcome.kind, OutcomeKind::Invalid, "{name:?} {value:?}");
        assert!(!outcome.retryable);
        assert_eq!(outcome.status, 0);
    }
    assert!(rx.got_nothing().await);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let mut target = Receiver::start(reply("200 OK", &[], "")).await;
    let location = target.url("/elsewhere");
    let mut rx = Receiver::start(reply("302 Found", &[("Location", &location)], "")).await;
    let client = WebhookClient::new(dev()).unwrap();
    let outcome = client
        .send_signed(&rx.url("/"), &envelope(), &Secrets::new(SECRET))
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Redirect);
    assert_eq!(outcome.status, 302);
    assert!(!outcome.retryable);
    assert_eq!(outcome.error, "HTTP 302 (redirects are not followed)");
    rx.next().await;
    assert!(target.got_nothing().await, "the redirect was followed");
}

#[tokio::test]
async fn client_and_server_errors_are_classified() {
    let client = WebhookClient::new(dev()).unwrap();
    let cases: [(Reply, u16, OutcomeKind, bool, Option<Duration>); 5] = [
        (
            reply("404 Not Found", &[], "nope"),
            404,
            OutcomeKind::ClientError,
            false,
            None,
        ),
        (
            reply("401 Unauthorized", &[], ""),
            401,
            OutcomeKind::ClientError,
            false,
            None,
        ),
        (
            reply("429 Too Many Requests", &[("Retry-After", "120")], ""),
            429,
            OutcomeKind::ClientError,
            true,
            Some(Duration::from_secs(120)),
        ),
        (
            reply("500 Internal Server Error", &[], "boom"),
            500,
            OutcomeKind::ServerError,
            true,
            None,
        ),
        (
            reply(
                "503 Service Unavailable",
                &[("Retry-After", "Thu, 01 Jan 1970 00:00:00 GMT")],
                "",
            ),
            503,
            OutcomeKind::ServerError,
            true,
            Some(Duration::ZERO),
        ),
    ];
    for (reply, status, kind, retryable, retry_after) in cases {
        let mut rx = Receiver::start(reply).await;
        let outcome = client
            .send_signed(&rx.url("/"), &envelope(), &Secrets::new(SECRET))
            .await;
        assert_eq!(outcome.status, status);
        assert_eq!(outcome.kind, kind, "{status}");
        assert_eq!(outcome.retryable, retryable, "{status}");
        assert_eq!(outcome.retry_after, retry_after, "{status}");
        assert_eq!(outcome.error, format!("HTTP {status}"));
        rx.next().await;
    }
}

#[tokio::test]
async fn a_slow_receiver_hits_the_timeout() {
    let mut rx = Receiver::start(Reply::Stall).await;
    let client = WebhookClient::new(ClientConfig {
        timeout: Duration::from_millis(300),
        ..dev()
    })
    .unwrap();
    let start = Instant::now();
    let outcome = client
        .send_signed(
            &rx.url(&format!("/{URL_TOKEN}")),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Timeout, "{outcome:?}");
    assert_eq!(outcome.status, 0);
    assert!(outcome.retryable);
    assert!(outcome.error.starts_with("timeout:"), "{}", outcome.error);
    assert!(!outcome.error.contains(URL_TOKEN));
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    rx.next().await;
}

#[tokio::test]
async fn an_endless_response_body_is_capped() {
    let written = Arc::new(AtomicU64::new(0));
    let mut rx = Receiver::start(Reply::Endless(Arc::clone(&written))).await;
    // A generous timeout: the cap, not the timeout, must end the attempt.
    let client = WebhookClient::new(ClientConfig {
        timeout: Duration::from_secs(30),
        ..dev()
    })
    .unwrap();
    let start = Instant::now();
    let outcome = client
        .send_signed(&rx.url("/"), &envelope(), &Secrets::new(SECRET))
        .await;
    assert!(outcome.is_success(), "{outcome:?}");
    assert!(outcome.body_truncated);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    rx.next().await;
    // The receiver could only write what fits in the socket buffers past
    // the 64 KiB we read, far less than an unbounded read would take in.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let total = written.load(Ordering::Relaxed);
    assert!(total < 64 * 1024 * 1024, "{total} bytes written");
}

#[tokio::test]
async fn a_large_declared_body_is_not_read() {
    let big = "y".repeat(1024 * 1024);
    let mut rx = Receiver::start(reply("200 OK", &[], &big)).await;
    let client = WebhookClient::new(dev()).unwrap();
    let outcome = client
        .send_signed(&rx.url("/"), &envelope(), &Secrets::new(SECRET))
        .await;
    assert!(
        outcome.is_success() && outcome.body_truncated,
        "{outcome:?}"
    );
    // A small body is read to the end.
    let mut small = Receiver::start(reply("200 OK", &[], "fine")).await;
    let outcome = client
        .send_signed(&small.url("/"), &envelope(), &Secrets::new(SECRET))
        .await;
    assert!(
        outcome.is_success() && !outcome.body_truncated,
        "{outcome:?}"
    );
    rx.next().await;
    small.next().await;
}

#[tokio::test]
async fn loopback_literals_are_refused_without_allow_private() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    let client = WebhookClient::new(http_public_only()).unwrap();
    let port = rx.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/{URL_TOKEN}"),
        format!("http://2130706433:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::ffff:7f00:1]:{port}/"),
        format!("http://[::1]:{port}/"),
        format!("http://localhost:{port}/"),
    ] {
        let outcome = client
            .send_signed(&url, &envelope(), &Secrets::new(SECRET))
            .await;
        assert_eq!(outcome.kind, OutcomeKind::Blocked, "{url}: {outcome:?}");
        assert!(!outcome.retryable);
        assert_eq!(outcome.status, 0);
        assert!(outcome.error.starts_with("blocked:"), "{}", outcome.error);
        assert!(!outcome.error.contains(URL_TOKEN));
    }
    assert!(rx.got_nothing().await);
}

#[tokio::test]
async fn names_resolving_to_private_addresses_are_refused_at_connect_time() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    let lookup = FixedLookup::new(&[
        ("rebind.example", &["127.0.0.1"]),
        ("mapped.example", &["::ffff:127.0.0.1"]),
        ("internal.example", &["10.0.0.7", "192.168.1.1", "fd00::1"]),
        ("metadata.example", &["169.254.169.254", "fd00:ec2::254"]),
    ]);
    let client = WebhookClient::with_lookup(http_public_only(), lookup).unwrap();
    let port = rx.addr.port();
    for (host, reason) in [
        ("rebind.example", "loopback"),
        ("mapped.example", "loopback"),
        ("internal.example", "private (RFC 1918)"),
        ("metadata.example", "cloud metadata"),
    ] {
        // The URL itself passes the registration-time check: only the
        // resolved addresses give it away.
        let url = format!("http://{host}:{port}/{URL_TOKEN}");
        assert!(e2a_webhook::check_url(&url, &http_public_only().policy).is_ok());
        let outcome = client
            .send_signed(&url, &envelope(), &Secrets::new(SECRET))
            .await;
        assert_eq!(outcome.kind, OutcomeKind::Blocked, "{host}: {outcome:?}");
        assert!(!outcome.retryable);
        assert!(outcome.error.contains(reason), "{host}: {}", outcome.error);
        assert!(!outcome.error.contains(URL_TOKEN));
    }
    // An unknown name is a (retryable) connection failure, not a block.
    let outcome = client
        .send_signed(
            &format!("http://unknown.example:{port}/"),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Connect, "{outcome:?}");
    assert!(outcome.retryable);
    assert!(rx.got_nothing().await);
}

#[tokio::test]
async fn allow_private_delivers_to_loopback_but_never_to_metadata() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    let port = rx.addr.port();
    let lookup = FixedLookup::new(&[
        ("receiver.test", &["127.0.0.1"]),
        // Only the loopback address survives the filter and is connected to.
        (
            "mixed.test",
            &["169.254.169.254", "::ffff:169.254.169.254", "127.0.0.1"],
        ),
        ("metadata.test", &["169.254.169.254"]),
    ]);
    let client = WebhookClient::with_lookup(dev(), lookup).unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://receiver.test:{port}/"),
        format!("http://mixed.test:{port}/"),
    ] {
        let outcome = client
            .send_signed(&url, &envelope(), &Secrets::new(SECRET))
            .await;
        assert!(outcome.is_success(), "{url}: {outcome:?}");
        rx.next().await;
    }
    let outcome = client
        .send_signed(
            &format!("http://metadata.test:{port}/"),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Blocked, "{outcome:?}");

    // The system resolver: `localhost` is loopback, allowed in development.
    let system = WebhookClient::new(dev()).unwrap();
    let outcome = system
        .send_signed(
            &format!("http://localhost:{port}/"),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert!(outcome.is_success(), "{outcome:?}");
    rx.next().await;
}

#[tokio::test]
async fn https_is_required_unless_allow_http() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    let client = WebhookClient::new(ClientConfig {
        policy: UrlPolicy {
            allow_http: false,
            allow_private: true,
        },
        ..ClientConfig::default()
    })
    .unwrap();
    let outcome = client
        .send_signed(&rx.url("/"), &envelope(), &Secrets::new(SECRET))
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Blocked, "{outcome:?}");
    assert_eq!(outcome.error, "blocked: webhook URL must use https://");
    assert!(rx.got_nothing().await);
    // An https URL to a plain-HTTP server fails in the TLS handshake: a
    // retryable connection failure, with the TLS stack actually exercised.
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = plain.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let outcome = client
        .send_signed(
            &format!("https://{plain_addr}/{URL_TOKEN}"),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Connect, "{outcome:?}");
    assert!(outcome.retryable);
    assert!(!outcome.error.contains(URL_TOKEN));
}

#[tokio::test]
async fn a_refused_connection_is_retryable_and_names_no_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = WebhookClient::new(dev()).unwrap();
    let outcome = client
        .send_signed(
            &format!("http://{addr}/{URL_TOKEN}?secret={URL_TOKEN}"),
            &envelope(),
            &Secrets::new(SECRET),
        )
        .await;
    assert_eq!(outcome.kind, OutcomeKind::Connect, "{outcome:?}");
    assert_eq!(outcome.status, 0);
    assert!(outcome.retryable);
    assert!(outcome.error.starts_with("connect:"), "{}", outcome.error);
    assert!(!outcome.error.contains(URL_TOKEN), "{}", outcome.error);
    assert!(!outcome.error.contains("whsec_"));
}

/// Answers from a list, one per lookup (the last one repeats): DNS
/// rebinding, where a name looks public to one check and private to the
/// next.
struct RebindingLookup {
    answers: Vec<Vec<IpAddr>>,
    calls: AtomicU64,
}

impl Lookup for RebindingLookup {
    fn lookup(&self, _host: &str) -> LookupFuture {
        let n = usize::try_from(self.calls.fetch_add(1, Ordering::SeqCst)).unwrap();
        let answer = self.answers[n.min(self.answers.len() - 1)].clone();
        Box::pin(async move { Ok(answer) })
    }
}

#[tokio::test]
async fn a_name_that_rebinds_to_a_private_address_is_never_contacted() {
    let mut rx = Receiver::start(reply("200 OK", &[], "")).await;
    // A public address (not reachable from the test machine: a connection
    // attempt fails fast with the short connect timeout), then loopback,
    // then both in one answer, public first.
    let public: IpAddr = [8, 8, 8, 8].into();
    assert!(e2a_webhook::check_ip(public, false).is_ok());
    let loopback: IpAddr = [127, 0, 0, 1].into();
    let lookup = Arc::new(RebindingLookup {
        answers: vec![vec![public], vec![loopback], vec![public, loopback]],
        calls: AtomicU64::new(0),
    });
    let client = WebhookClient::with_lookup(
        ClientConfig {
            connect_timeout: Duration::from_millis(300),
            timeout: Duration::from_secs(2),
            ..http_public_only()
        },
        lookup.clone(),
    )
    .unwrap();
    let url = format!("http://rebind.example:{}/", rx.addr.port());
    let kinds: Vec<OutcomeKind> = {
        let mut kinds = Vec::new();
        for _ in 0..3 {
            kinds.push(
                client
                    .send_signed(&url, &envelope(), &Secrets::new(SECRET))
                    .await
                    .kind,
            );
        }
        kinds
    };
    assert_eq!(
        lookup.calls.load(Ordering::SeqCst),
        3,
        "resolved every time"
    );
    assert_ne!(kinds[0], OutcomeKind::Success);
    assert_eq!(kinds[1], OutcomeKind::Blocked, "{kinds:?}");
    assert_ne!(kinds[2], OutcomeKind::Success, "{kinds:?}");
    assert!(
        rx.got_nothing().await,
        "the loopback receiver was never contacted"
    );
}
