//! Hostile and broken input against the real relay: `e2a_relay::run_with`
//! on a real socket with a real database (DNS checks off), driven by a raw
//! TCP client so every reply code is exact.
//!
//! Each test sends one kind of bad input, checks the answer, and then checks
//! that the relay is still up: a new connection gets `220` and delivers a
//! message that is stored ([`Relay::still_serves`]).
//!
//! Covered at the session level only (in `src/session.rs`, over an
//! in-memory stream) and therefore repeated here over TCP with the real
//! gateway: NUL bytes and 8-bit garbage in commands, over-long command
//! lines, an oversized body, pipelining. New here: what the gateway and the
//! store make of such bodies (malformed MIME, 8-bit garbage and NUL bytes
//! in DATA, 10 000 headers, long lines).

use std::{net::SocketAddr, time::Duration};

use e2a_relay::{Config, Listeners};
use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains::{self, DkimKeys},
    users,
};
use e2a_testkit::TestDb;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const PROMPT: Duration = Duration::from_secs(30);
const AGENT: &str = "demo@agents.test";

struct Relay {
    _db: TestDb,
    smtp: SocketAddr,
    store: Store,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BoxError>>,
}

impl Relay {
    /// The relay on a fresh database with the agent [`AGENT`].
    async fn start(tweak: impl FnOnce(&mut Config)) -> Relay {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.smtp_domain = "mx.test".into();
        config.smtp_auth_dns = e2a_relay::config::AuthDns::Disabled;
        tweak(&mut config);
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = smtp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(e2a_relay::run_with(
            config,
            Listeners { smtp, ops },
            shutdown.clone(),
            None,
        ));
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        store.wait_until_ready(PROMPT).await.unwrap();
        let relay = Relay {
            _db: db,
            smtp: addr,
            store,
            shutdown,
            task,
        };
        relay.agent().await;
        relay
    }

    /// A user owning the verified domain of [`AGENT`], and the agent.
    async fn agent(&self) {
        let mut c = self.store.client().await.unwrap();
        let email = EmailAddress::parse("alice@example.com").unwrap();
        let user = users::create(&c, &email, "").await.unwrap().id;
        let address = EmailAddress::parse(AGENT).unwrap();
        let keys = DkimKeys {
            selector: "s".into(),
            public_key_b64: "cA==".into(),
            private_key_der: vec![0],
        };
        domains::claim(&mut c, &user, address.domain(), &keys, 10)
            .await
            .unwrap();
        domains::record_check(&mut c, &user, address.domain(), true)
            .await
            .unwrap();
        let new = NewAgent {
            address,
            name: String::new(),
            webhook_url: String::new(),
            agent_mode: AgentMode::Local,
        };
        agents::create(&mut c, &user, &new, 10).await.unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        let c = self.store.client().await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn messages(&self) -> i64 {
        self.count("SELECT count(*) FROM messages").await
    }

    /// The raw bytes stored for the message with this Message-ID.
    async fn raw(&self, message_id: &str) -> Vec<u8> {
        let c = self.store.client().await.unwrap();
        c.query_one(
            "SELECT raw_message FROM messages WHERE email_message_id = $1",
            &[&message_id],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// The relay is still up: a new connection is greeted and a message is
    /// accepted and stored.
    async fn still_serves(&self) {
        let before = self.messages().await;
        let mut c = Raw::connect(self.smtp).await;
        c.transaction(&message("after@remote.test", "still here"))
            .await;
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
        assert_eq!(self.messages().await, before + 1);
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("the relay drains")
            .unwrap()
            .expect("run returns Ok");
    }
}

/// A raw SMTP client.
struct Raw {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    /// Connects and checks the greeting.
    async fn connect(addr: SocketAddr) -> Raw {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut raw = Raw {
            reader: BufReader::new(r),
            writer: w,
        };
        assert_eq!(raw.line().await, "220 mx.test ESMTP e2a");
        raw
    }

    /// Connects and says EHLO.
    async fn greeted(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr).await;
        assert!(raw.cmd("EHLO client.remote.test").await.starts_with("250 "));
        raw
    }

    /// One reply line without CRLF; "" at end of stream.
    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        tokio::time::timeout(PROMPT, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("a reply in time")
            .unwrap();
        let line = String::from_utf8(line).expect("replies are ASCII");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// The last line of one (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        loop {
            let line = self.line().await;
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line;
            }
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends `cmd` (CRLF appended) and returns the last line of its reply.
    async fn cmd(&mut self, cmd: impl AsRef<[u8]>) -> String {
        self.send([cmd.as_ref(), b"\r\n"].concat()).await;
        self.reply().await
    }

    /// MAIL, RCPT and DATA for [`AGENT`]; returns the reply to the body
    /// (`body` is sent as is, followed by `.` on a line of its own).
    async fn send_message(&mut self, body: &[u8]) -> String {
        assert_eq!(
            self.cmd("MAIL FROM:<sender@remote.test>").await,
            "250 2.1.0 OK"
        );
        assert_eq!(self.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
        assert_eq!(
            self.cmd("DATA").await,
            "354 End data with <CR><LF>.<CR><LF>"
        );
        self.send(body).await;
        self.cmd(".").await
    }

    /// EHLO plus [`Self::send_message`], which must be accepted.
    async fn transaction(&mut self, body: &[u8]) {
        assert!(
            self.cmd("EHLO client.remote.test")
                .await
                .starts_with("250 ")
        );
        let reply = self.send_message(body).await;
        assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    }
}

/// A small well-formed message, CRLF-terminated.
fn message(message_id: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@remote.test>\r\nTo: {AGENT}\r\nSubject: test\r\nMessage-ID: <{message_id}>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn malformed_mime_is_stored_as_sent() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::greeted(relay.smtp).await;
    let headers = |id: &str| {
        format!("From: sender@remote.test\r\nTo: {AGENT}\r\nMessage-ID: <{id}>\r\n").into_bytes()
    };
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        // A multipart that is never closed, parts without headers, a part
        // that claims base64 but is not.
        ("unclosed@remote.test", [
            headers("unclosed@remote.test"),
            b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--b1\r\n\r\nno headers\r\n--b1\r\nContent-Type: multipart/alternative; boundary=b1\r\n\r\n--b1\r\n".to_vec(),
        ].concat()),
        // A multipart without a boundary parameter and a broken header block.
        ("noboundary@remote.test", [
            headers("noboundary@remote.test"),
            b"Content-Type: multipart/mixed\r\nContent-Type: ;;;==\r\nMIME-Version: banana\r\nno colon in this header line\r\n\r\n--\r\n----\r\n".to_vec(),
        ].concat()),
        // Bad encoded words, an unknown charset, a quoted-printable soft
        // break at the very end, a nested message/rfc822 with no body.
        ("encoded@remote.test", [
            headers("encoded@remote.test"),
            b"Subject: =?UTF-8?B?////?= =?x-unknown?Q?=FF=?= =?utf-8?q?\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\nsoft break =".to_vec(),
        ].concat()),
        // Deeply nested multiparts.
        ("nested@remote.test", {
            let mut m = headers("nested@remote.test");
            for i in 0..200 {
                m.extend_from_slice(
                    format!("Content-Type: multipart/mixed; boundary=n{i}\r\n\r\n--n{i}\r\n")
                        .as_bytes(),
                );
            }
            m
        }),
    ];
    for (id, mut body) in bodies {
        body.extend_from_slice(b"\r\n");
        let reply = c.send_message(&body).await;
        assert!(
            reply.starts_with("250 2.0.0 OK queued as "),
            "{id}: {reply}"
        );
        assert_eq!(relay.raw(id).await, body, "{id} stored byte for byte");
    }
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn eight_bit_garbage_and_nul_bytes_in_data_are_stored_as_sent() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::greeted(relay.smtp).await;

    // Every byte value, NUL included, in the body (no CRLF.CRLF among them).
    let mut body = message("garbage@remote.test", "");
    body.extend((0u8..=255).cycle().take(20_000));
    body.extend_from_slice(b"\r\n");
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(relay.raw("garbage@remote.test").await, body);

    // 8-bit garbage and NUL bytes in the headers the gateway stores as text
    // (subject, sender, recipients, reply-to): stored, not a 451 for ever.
    let body = b"From: Se\0nder \xff\xfe <sen\0der@remote.test>\r\nTo: \xc3\x28@agents.test, a\0b@agents.test\r\nCc: \0\r\nReply-To: r\0@remote.test\r\nSubject: nul\0inside \xff\xfe\x80 =?utf-8?q?=00=FF?=\r\nMessage-ID: <nul-headers@remote.test>\r\nIn-Reply-To: <a\0b@remote.test>\r\nReferences: <\0@x> <\xff@y>\r\n\r\nbody\0body \xe2\x82\r\n".to_vec();
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(relay.raw("nul-headers@remote.test").await, body);
    let subject: String = relay
        .store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT subject FROM messages WHERE email_message_id = 'nul-headers@remote.test'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(subject.starts_with("nul"), "{subject:?}");
    assert!(!subject.contains('\0'), "{subject:?}");

    // A NUL in the Message-ID itself.
    let body = b"From: sender@remote.test\r\nMessage-ID: <nul\0id@remote.test>\r\nSubject: id\r\n\r\nx\r\n";
    let reply = c.send_message(body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");

    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert_eq!(relay.messages().await, 3);
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn nul_bytes_and_8bit_garbage_in_commands_are_refused() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::connect(relay.smtp).await;
    assert!(c.cmd(b"\0\0\0").await.starts_with("500 5.5.1 "));
    assert!(
        c.cmd(b"\xff\xfe\x80 \xc3\x28")
            .await
            .starts_with("500 5.5.1 ")
    );
    assert!(c.cmd(b"NO\0OP").await.starts_with("500 5.5.1 "));
    // A NUL in the EHLO name is accepted (the name is untrusted anyway).
    assert!(c.cmd(b"EHLO cli\0ent\xff").await.starts_with("250 "));
    assert!(
        c.cmd(b"MAIL FROM:<se\0nder@remote.test>")
            .await
            .starts_with("501 5.1.7 ")
    );
    assert!(
        c.cmd(b"MAIL FROM:<sender@remote.test>\0")
            .await
            .starts_with("5")
    );
    assert_eq!(
        c.cmd("MAIL FROM:<sender@remote.test>").await,
        "250 2.1.0 OK"
    );
    assert!(
        c.cmd(b"RCPT TO:<de\0mo@agents.test>")
            .await
            .starts_with("501 5.1.3 ")
    );
    assert!(
        c.cmd(b"RCPT TO:<\xffdemo@agents.test>")
            .await
            .starts_with("5")
    );
    assert_eq!(c.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 OK");

    // A NUL inside a quoted local part passes the SMTP parser: the envelope
    // sender then reaches the store (as the sender, the message having no
    // From header) and must not make the message fail for ever.
    assert_eq!(
        c.cmd(b"MAIL FROM:<\"se\0nder\"@remote.test>").await,
        "250 2.1.0 OK"
    );
    assert_eq!(c.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
    assert_eq!(c.cmd("DATA").await, "354 End data with <CR><LF>.<CR><LF>");
    c.send(b"Message-ID: <no-from@remote.test>\r\nSubject: no From\r\n\r\nx\r\n")
        .await;
    let reply = c.cmd(".").await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_message_with_10_000_headers_is_stored() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::greeted(relay.smtp).await;
    let mut body = Vec::new();
    for i in 0..10_000 {
        body.extend_from_slice(format!("X-Header-{i}: value {i}\r\n").as_bytes());
    }
    body.extend_from_slice(&message("many-headers@remote.test", "body"));
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(relay.raw("many-headers@remote.test").await, body);
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn lines_longer_than_998_bytes_in_commands_and_data() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::greeted(relay.smtp).await;

    // Commands: over 998 bytes but within the 4096-byte line limit is
    // parsed; past the limit is 500 5.5.2 and the session goes on.
    let noop = format!("NOOP {}", "x".repeat(1500));
    assert_eq!(c.cmd(noop).await, "250 2.0.0 OK");
    let long_rcpt = format!("RCPT TO:<{}@agents.test>", "a".repeat(1200));
    assert_eq!(
        c.cmd("MAIL FROM:<sender@remote.test>").await,
        "250 2.1.0 OK"
    );
    assert!(c.cmd(long_rcpt).await.starts_with("501 5.1.3 "));
    let too_long = format!("RCPT TO:<{AGENT}> {}", "y".repeat(10_000));
    assert_eq!(c.cmd(too_long).await, "500 5.5.2 line too long");
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 OK");

    // DATA: a 999-byte header line, a 5000-byte body line and a 200 KB one
    // (longer than a read chunk) are kept as sent.
    let mut body = format!("X-Long: {}\r\n", "h".repeat(989)).into_bytes();
    assert_eq!(body.len(), 999);
    body.extend_from_slice(&message("long-lines@remote.test", ""));
    body.extend(std::iter::repeat_n(b'b', 5000));
    body.extend_from_slice(b"\r\n");
    body.extend(std::iter::repeat_n(b'c', 200_000));
    body.extend_from_slice(b"\r\n");
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(relay.raw("long-lines@remote.test").await, body);
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_message_just_over_the_size_limit_is_552_and_the_session_goes_on() {
    const LIMIT: usize = 4096;
    let relay = Relay::start(|c| c.smtp_max_message_bytes = LIMIT as u64).await;
    let mut c = Raw::greeted(relay.smtp).await;

    // Announced too big.
    assert!(
        c.cmd(format!("MAIL FROM:<sender@remote.test> SIZE={}", LIMIT + 1))
            .await
            .starts_with("552 5.3.4 ")
    );
    // One byte over (the body as stored: CRLF before the dot included).
    let mut body = message("too-big@remote.test", "");
    body.resize(LIMIT - 1, b'z');
    body.extend_from_slice(b"\r\n");
    assert_eq!(body.len(), LIMIT + 1);
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("552 5.3.4 "), "{reply}");
    assert_eq!(relay.messages().await, 0);

    // The same session: exactly at the limit is stored.
    let mut body = message("at-limit@remote.test", "");
    body.resize(LIMIT - 2, b'z');
    body.extend_from_slice(b"\r\n");
    assert_eq!(body.len(), LIMIT);
    let reply = c.send_message(&body).await;
    assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    assert_eq!(relay.raw("at-limit@remote.test").await, body);
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    relay.still_serves().await;
    relay.stop().await;
}

#[tokio::test]
async fn pipelined_commands_in_one_packet_are_answered_in_order() {
    let relay = Relay::start(|_| {}).await;
    let mut c = Raw::connect(relay.smtp).await;
    let mut packet = format!(
        "EHLO client.remote.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<{AGENT}>\r\nRCPT TO:<nobody@agents.test>\r\nRCPT TO:<{AGENT}>\r\nDATA\r\n"
    )
    .into_bytes();
    packet.extend_from_slice(&message("pipelined-1@remote.test", "..one"));
    packet.extend_from_slice(
        format!(".\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<{AGENT}>\r\nDATA\r\n").as_bytes(),
    );
    packet.extend_from_slice(&message("pipelined-2@remote.test", "two"));
    packet.extend_from_slice(b".\r\nNOOP\r\nDATA\r\nFROB\r\nQUIT\r\n");
    c.send(&packet).await;

    assert!(c.reply().await.starts_with("250 "), "EHLO");
    for expected in [
        "250 2.1.0 OK",
        "250 2.1.5 OK",
        "550 5.1.1 recipient not found",
        "250 2.1.5 OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ] {
        assert_eq!(c.line().await, expected);
    }
    assert!(c.line().await.starts_with("250 2.0.0 OK queued as "));
    for expected in [
        "250 2.0.0 OK",
        "250 2.1.0 OK",
        "250 2.1.5 OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ] {
        assert_eq!(c.line().await, expected);
    }
    assert!(c.line().await.starts_with("250 2.0.0 OK queued as "));
    assert_eq!(c.line().await, "250 2.0.0 OK");
    assert!(
        c.line().await.starts_with("503 5.5.1 "),
        "DATA without MAIL"
    );
    assert!(c.line().await.starts_with("500 5.5.1 "), "unknown command");
    assert_eq!(c.line().await, "221 2.0.0 Bye");
    assert_eq!(c.line().await, "", "closed after QUIT");
    assert_eq!(
        relay.raw("pipelined-1@remote.test").await,
        message("pipelined-1@remote.test", ".one"),
        "dot-unstuffed"
    );
    assert_eq!(relay.messages().await, 2);
    relay.still_serves().await;
    relay.stop().await;
}
