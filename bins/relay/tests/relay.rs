//! The relay over real sockets: `e2a_relay::run` on port-0 listeners with a
//! fresh test database, driven by plain `TcpStream` clients.

use std::{net::SocketAddr, time::Duration};

use e2a_relay::{Config, Listeners};
use e2a_runtime::{BoxError, CancellationToken};
use e2a_testkit::{TestDb, http_get};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// Generous bound for anything that should happen "promptly" (first replies
/// include connecting and migrating the database).
const PROMPT: Duration = Duration::from_secs(30);

struct Relay {
    _db: TestDb,
    smtp: SocketAddr,
    ops: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BoxError>>,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Relay {
    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.smtp_domain = "mx.test".into();
    config.smtp_auth_dns = e2a_relay::config::AuthDns::Disabled;
    tweak(&mut config);
    let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (smtp_addr, ops_addr) = (smtp.local_addr().unwrap(), ops.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(e2a_relay::run(
        config,
        Listeners { smtp, ops },
        shutdown.clone(),
    ));
    Relay {
        _db: db,
        smtp: smtp_addr,
        ops: ops_addr,
        shutdown,
        task,
    }
}

struct Smtp {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(addr: SocketAddr) -> Smtp {
        let (read, writer) = TcpStream::connect(addr).await.unwrap().into_split();
        Smtp {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// One reply line without CRLF; "" at end of stream.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(PROMPT, self.reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        line.trim_end().to_owned()
    }

    async fn reply(&mut self) -> Vec<String> {
        let mut lines = vec![self.line().await];
        while lines
            .last()
            .is_some_and(|l| l.len() >= 4 && l.as_bytes()[3] == b'-')
        {
            lines.push(self.line().await);
        }
        lines
    }

    async fn send(&mut self, cmd: &str) {
        self.writer
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn serves_smtp_and_ops_then_drains_on_cancel() {
    let relay = start(|_| {}).await;

    let mut c = Smtp::connect(relay.smtp).await;
    assert_eq!(c.line().await, "220 mx.test ESMTP e2a");
    c.send("EHLO client.example").await;
    let ehlo = c.reply().await;
    assert!(ehlo[0].starts_with("250-mx.test"), "{ehlo:?}");
    assert!(
        ehlo.iter()
            .any(|l| l == "250-PIPELINING" || l == "250 PIPELINING"),
        "{ehlo:?}"
    );
    c.send("MAIL FROM:<sender@example.com>").await;
    assert_eq!(c.line().await, "250 2.1.0 OK");
    c.send("RCPT TO:<nobody@unknown.example>").await;
    assert_eq!(c.line().await, "550 5.1.1 recipient not found");
    c.send("RSET").await;
    assert_eq!(c.line().await, "250 2.0.0 OK");
    c.send("QUIT").await;
    assert_eq!(c.line().await, "221 2.0.0 Bye");
    assert_eq!(c.line().await, "", "closed after QUIT");

    assert_eq!(http_get(relay.ops, "/readyz").await.0, 200);
    assert_eq!(http_get(relay.ops, "/healthz").await.0, 200);

    // A client mid-session when shutdown starts gets 421 and `run` returns.
    let mut open = Smtp::connect(relay.smtp).await;
    assert_eq!(open.line().await, "220 mx.test ESMTP e2a");
    open.send("HELO client.example").await;
    assert_eq!(open.line().await, "250 mx.test");
    let cancelled_at = std::time::Instant::now();
    relay.shutdown.cancel();
    assert_eq!(open.line().await, "421 4.3.0 shutting down");
    assert_eq!(open.line().await, "");
    let result = tokio::time::timeout(Duration::from_secs(5), relay.task)
        .await
        .expect("run returns promptly");
    result.unwrap().expect("run returns Ok");
    assert!(cancelled_at.elapsed() < Duration::from_secs(5));
    assert!(
        TcpStream::connect(relay.smtp).await.is_err(),
        "listener closed after run returned"
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_get_421() {
    let relay = start(|c| c.smtp_max_connections = 1).await;
    let mut first = Smtp::connect(relay.smtp).await;
    assert_eq!(first.line().await, "220 mx.test ESMTP e2a");

    let mut second = Smtp::connect(relay.smtp).await;
    assert_eq!(second.line().await, "421 4.3.2 too many connections");
    assert_eq!(second.line().await, "");

    first.send("QUIT").await;
    assert_eq!(first.line().await, "221 2.0.0 Bye");
    // The slot is released when the first session's task ends.
    let deadline = std::time::Instant::now() + PROMPT;
    loop {
        let mut next = Smtp::connect(relay.smtp).await;
        let greeting = next.line().await;
        if greeting.starts_with("220 ") {
            break;
        }
        assert_eq!(greeting, "421 4.3.2 too many connections");
        assert!(std::time::Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), relay.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
