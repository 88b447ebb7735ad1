//! Mail acceptance end to end: a real SMTP client (`mail-send`, and raw
//! sockets where exact reply codes matter) talks to `e2a_relay::run_with`
//! on a real socket, backed by a real database; SPF/DKIM/DMARC answer from
//! recorded DNS records.

mod common;

use std::{net::SocketAddr, time::Duration};

use e2a_mail::auth::{Authenticator, RecordCache};
use e2a_relay::{Config, Listeners};
use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::{
    Store, StoreConfig,
    agents::{self, AgentPatch},
    ids::UserId,
};
use e2a_testkit::{PrivateCluster, TestDb};
use mail_send::{SmtpClientBuilder, smtp::message::Message};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const PROMPT: Duration = Duration::from_secs(30);

struct Relay {
    smtp: SocketAddr,
    store: Store,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BoxError>>,
}

impl Relay {
    async fn start(url: &str, records: Option<RecordCache>) -> Relay {
        Relay::start_with(url, records, |_| {}).await
    }

    async fn start_with(
        url: &str,
        records: Option<RecordCache>,
        tweak: impl FnOnce(&mut Config),
    ) -> Relay {
        let mut config = Config::for_database(url);
        config.smtp_domain = "mx.test".into();
        tweak(&mut config);
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = smtp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let authenticator = records.map(|r| Authenticator::with_records(r).unwrap());
        let task = tokio::spawn(e2a_relay::run_with(
            config,
            Listeners { smtp, ops },
            shutdown.clone(),
            authenticator,
        ));
        let store = Store::new(&StoreConfig::new(url)).unwrap();
        store.wait_until_ready(PROMPT).await.unwrap();
        Relay {
            smtp: addr,
            store,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PROMPT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// A user owning a verified domain with one local agent on it.
    async fn agent(&self, email: &str, address: &str) -> UserId {
        common::owner_with_agent(&self.store, email, address).await
    }

    async fn rows(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        self.store
            .client()
            .await
            .unwrap()
            .query(sql, &[])
            .await
            .unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.rows(sql).await[0].get(0)
    }
}

/// A raw SMTP client for exact reply lines.
struct Raw {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut raw = Raw {
            reader: BufReader::new(r),
            writer: w,
        };
        assert!(raw.line().await.starts_with("220 "));
        raw
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(PROMPT, self.reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        line.trim_end().to_owned()
    }

    /// Sends `cmd` and returns the last line of its reply.
    async fn cmd(&mut self, cmd: &str) -> String {
        self.writer
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
        loop {
            let line = self.line().await;
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line;
            }
        }
    }
}

fn message(message_id: &str, from: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: demo@agents.test\r\nSubject: =?utf-8?q?Hello_w=C3=B6rld?=\r\nMessage-ID: <{message_id}>\r\n{extra_headers}Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    )
}

async fn send(relay: &Relay, from: &str, to: &[&str], raw: &str) -> mail_send::Result<()> {
    let mut client = SmtpClientBuilder::new("127.0.0.1", relay.smtp.port())
        .unwrap()
        .helo_host("client.remote.test")
        .timeout(PROMPT)
        .connect_plain()
        .await?;
    client
        .send(Message::new(from, to.to_vec(), raw.as_bytes()))
        .await?;
    let _ = client.quit().await;
    Ok(())
}

#[tokio::test]
async fn mail_to_two_agents_is_stored_signed_threaded_and_announced_once_each() {
    let db = TestDb::new().await;
    let records = RecordCache::new();
    records.spf("remote.test", "v=spf1 ip4:127.0.0.1 -all");
    records.dmarc("remote.test", "v=DMARC1; p=none");
    let relay = Relay::start(db.url(), Some(records)).await;
    let alice = relay.agent("alice@example.com", "demo@agents.test").await;
    let bob = relay.agent("bob@example.com", "bot@bob.test").await;

    let raw = message("first@remote.test", "someone@remote.test", "", "Hi there");
    // Mixed case recipient: normalised like agent addresses (flaw 33).
    send(
        &relay,
        "someone@remote.test",
        &["Demo@Agents.Test", "bot@bob.test"],
        &raw,
    )
    .await
    .unwrap();

    let rows = relay
        .rows("SELECT user_id, agent_id, subject, sender, spf_result, dkim_result, dmarc_result, conversation_id, auth_headers, inbox_status, raw_message FROM messages ORDER BY agent_id")
        .await;
    assert_eq!(rows.len(), 2);
    let by_agent = |agent: &str| rows.iter().find(|r| r.get::<_, &str>(1) == agent).unwrap();
    let demo = by_agent("demo@agents.test");
    assert_eq!(demo.get::<_, String>(0), alice.as_str());
    assert_eq!(by_agent("bot@bob.test").get::<_, String>(0), bob.as_str());
    assert_eq!(demo.get::<_, &str>(2), "Hello wörld");
    assert_eq!(demo.get::<_, &str>(3), "someone@remote.test");
    // SPF passes for the envelope domain, which is also the From domain:
    // aligned, so DMARC passes.
    assert_eq!(
        (
            demo.get::<_, &str>(4),
            demo.get::<_, &str>(5),
            demo.get::<_, &str>(6)
        ),
        ("pass", "none", "pass")
    );
    assert!(demo.get::<_, &str>(7).starts_with("cnv_"));
    assert_eq!(demo.get::<_, &str>(9), "unread");
    // Stored as transmitted (mail-send adds its own CRLF before the final dot).
    let stored: Vec<u8> = demo.get(10);
    assert!(
        stored.starts_with(raw.as_bytes()) && matches!(&stored[raw.len()..], b"" | b"\r\n"),
        "{stored:?}"
    );
    let headers: Value = demo.get(8);
    assert_eq!(headers["X-E2A-Auth-Sender"], "someone@remote.test");
    assert_eq!(
        headers["X-E2A-Auth-Domain-Check"],
        "spf=pass; dkim=none; dmarc=pass"
    );
    assert_eq!(headers["X-E2A-Auth-Verified"], "true");
    assert_eq!(headers["X-E2A-Auth-Signature"].as_str().unwrap().len(), 64);
    assert_eq!(
        relay
            .count("SELECT count(*) FROM webhook_events WHERE type = 'email.received'")
            .await,
        2
    );

    // The signature verifies with the owner's signing secret.
    let secret: String = relay
        .rows(&format!(
            "SELECT secret FROM webhook_signing_secrets WHERE user_id = '{}'",
            alice.as_str()
        ))
        .await[0]
        .get(0);
    let pairs: Vec<(String, String)> = headers
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    e2a_mail::headers::verify(pairs, &[secret.as_bytes()], time::OffsetDateTime::now_utc())
        .expect("signed with the owner's secret");

    // A reply joins the thread.
    let thread: String = demo.get(7);
    let reply = message(
        "second@remote.test",
        "someone@remote.test",
        "In-Reply-To: <first@remote.test>\r\n",
        "Re",
    );
    send(&relay, "someone@remote.test", &["demo@agents.test"], &reply)
        .await
        .unwrap();
    let conv: String = relay
        .rows("SELECT conversation_id FROM messages WHERE email_message_id = 'second@remote.test'")
        .await[0]
        .get(0);
    assert_eq!(conv, thread);
    relay.stop().await;
}

#[tokio::test]
async fn a_retry_of_an_accepted_message_creates_no_duplicate() {
    let db = TestDb::new().await;
    let relay = Relay::start(db.url(), None).await;
    relay.agent("alice@example.com", "demo@agents.test").await;
    let raw = message("retry@remote.test", "someone@remote.test", "", "same");
    for _ in 0..3 {
        send(&relay, "someone@remote.test", &["demo@agents.test"], &raw)
            .await
            .expect("250 every time");
    }
    assert_eq!(relay.count("SELECT count(*) FROM messages").await, 1);
    assert_eq!(relay.count("SELECT count(*) FROM webhook_events").await, 1);
    relay.stop().await;
}

/// A cloud agent's mail is stored with a legacy push enqueued in the same
/// transaction, and nothing is POSTed from the SMTP session (the original
/// POSTed inline, up to 30 s per recipient — flaw 5): the receiver has seen
/// no connection when the sender gets its 250. The queued push carries what
/// the deliverer needs, the signed auth headers included.
#[tokio::test]
async fn a_cloud_agents_mail_enqueues_a_legacy_push_and_posts_nothing_inline() {
    let db = TestDb::new().await;
    let relay = Relay::start(db.url(), None).await;
    let alice = relay.agent("alice@example.com", "demo@agents.test").await;
    relay.agent("bob@example.com", "bot@bob.test").await;
    // The receiver: a listening socket nobody accepts on, so any connection
    // made to it is left queued for the check below.
    let receiver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    receiver.set_nonblocking(true).unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let c = relay.store.client().await.unwrap();
    agents::update(
        &c,
        &alice,
        "demo@agents.test",
        &AgentPatch {
            agent_mode: Some(agents::AgentMode::Cloud),
            webhook_url: Some(hook.clone()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();

    let raw = message("cloud@remote.test", "someone@remote.test", "", "Hi cloud");
    send(
        &relay,
        "someone@remote.test",
        &["demo@agents.test", "bot@bob.test"],
        &raw,
    )
    .await
    .unwrap();
    assert_eq!(
        receiver.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "the relay connected to the agent's webhook"
    );

    let rows = relay
        .rows(
            "SELECT m.agent_id, w.status, w.attempts FROM webhook_deliveries w \
             JOIN messages m ON m.id = w.message_id",
        )
        .await;
    assert_eq!(rows.len(), 1, "a push for the cloud agent only");
    assert_eq!(
        (
            rows[0].get::<_, &str>(0),
            rows[0].get::<_, &str>(1),
            rows[0].get::<_, i32>(2)
        ),
        ("demo@agents.test", "pending", 0)
    );
    let claimed = e2a_store::legacy_deliveries::claim_legacy(&c, 10, PROMPT)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let push = &claimed[0];
    assert_eq!(
        (push.url.as_str(), push.recipient.as_str()),
        (hook.as_str(), "demo@agents.test")
    );
    assert!(push.raw_message.starts_with(raw.as_bytes()));
    assert_eq!(
        push.auth_headers["X-E2A-Auth-Message-Id"],
        push.message_id.as_str()
    );
    assert_eq!(push.auth_headers["X-E2A-Auth-Signature"].len(), 64);
    relay.stop().await;
}

#[tokio::test]
async fn dmarc_reject_is_550_only_for_agents_that_opted_in() {
    let db = TestDb::new().await;
    let records = RecordCache::new();
    records.spf("spoofed.test", "v=spf1 -all");
    records.dmarc("spoofed.test", "v=DMARC1; p=reject");
    let relay = Relay::start(db.url(), Some(records)).await;
    let alice = relay.agent("alice@example.com", "strict@agents.test").await;
    relay.agent("bob@example.com", "lenient@bob.test").await;
    let c = relay.store.client().await.unwrap();
    let opt_in = AgentPatch {
        reject_dmarc_failures: Some(true),
        ..AgentPatch::default()
    };
    agents::update(&c, &alice, "strict@agents.test", &opt_in)
        .await
        .unwrap();

    let raw = message("forged@spoofed.test", "ceo@spoofed.test", "", "wire money");
    let mut smtp = Raw::connect(relay.smtp).await;
    assert!(smtp.cmd("EHLO evil.test").await.starts_with("250 "));
    assert_eq!(
        smtp.cmd("MAIL FROM:<ceo@spoofed.test>").await,
        "250 2.1.0 OK"
    );
    assert_eq!(
        smtp.cmd("RCPT TO:<strict@agents.test>").await,
        "250 2.1.5 OK"
    );
    assert_eq!(
        smtp.cmd("DATA").await,
        "354 End data with <CR><LF>.<CR><LF>"
    );
    assert!(smtp.cmd(&format!("{raw}.")).await.starts_with("550 5.7.1 "));
    assert_eq!(relay.count("SELECT count(*) FROM messages").await, 0);

    // With a lenient agent among the recipients it is stored for that one only.
    assert_eq!(
        smtp.cmd("MAIL FROM:<ceo@spoofed.test>").await,
        "250 2.1.0 OK"
    );
    smtp.cmd("RCPT TO:<strict@agents.test>").await;
    smtp.cmd("RCPT TO:<lenient@bob.test>").await;
    smtp.cmd("DATA").await;
    assert!(smtp.cmd(&format!("{raw}.")).await.starts_with("250 "));
    let stored = relay
        .rows("SELECT agent_id, spf_result, dmarc_result FROM messages")
        .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (
            stored[0].get::<_, &str>(0),
            stored[0].get::<_, &str>(1),
            stored[0].get::<_, &str>(2)
        ),
        ("lenient@bob.test", "fail", "fail")
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_database_outage_during_data_is_451_and_stores_nothing() {
    let cluster = PrivateCluster::start().await;
    let relay = Relay::start(&cluster.database_url(), None).await;
    relay.agent("alice@example.com", "demo@agents.test").await;
    relay.agent("alice@example.com", "other@agents.test").await;
    let mut smtp = Raw::connect(relay.smtp).await;
    smtp.cmd("EHLO client.test").await;
    assert_eq!(smtp.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
    assert_eq!(smtp.cmd("RCPT TO:<demo@agents.test>").await, "250 2.1.5 OK");
    assert_eq!(
        smtp.cmd("DATA").await,
        "354 End data with <CR><LF>.<CR><LF>"
    );
    cluster.stop().await;
    let raw = message("outage@remote.test", "s@remote.test", "", "lost?");
    assert!(smtp.cmd(&format!("{raw}.")).await.starts_with("451 4.3.0 "));
    // RCPT lookups fail temporarily too while the database is down (an
    // address the recipient cache has not seen: a cached one is accepted
    // and its DATA answered 451 like the one above).
    smtp.cmd("MAIL FROM:<s@remote.test>").await;
    assert!(
        smtp.cmd("RCPT TO:<other@agents.test>")
            .await
            .starts_with("451 4.3.0 ")
    );
    cluster.start_again().await;
    relay.store.wait_until_ready(PROMPT).await.unwrap();
    assert_eq!(relay.count("SELECT count(*) FROM messages").await, 0);
    assert_eq!(relay.count("SELECT count(*) FROM webhook_events").await, 0);
    // And once it is back, the sender's retry is stored.
    smtp.cmd("RSET").await;
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        smtp.cmd("MAIL FROM:<s@remote.test>").await;
        if smtp
            .cmd("RCPT TO:<demo@agents.test>")
            .await
            .starts_with("250")
        {
            break;
        }
        smtp.cmd("RSET").await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay did not recover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    smtp.cmd("DATA").await;
    assert!(smtp.cmd(&format!("{raw}.")).await.starts_with("250 "));
    assert_eq!(relay.count("SELECT count(*) FROM messages").await, 1);
    relay.stop().await;
}

#[tokio::test]
async fn starttls_upgrades_the_session_and_mail_flows_over_tls() {
    e2a_runtime::install_crypto_provider();
    let db = TestDb::new().await;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let relay = Relay::start_with(db.url(), None, |c| {
        c.smtp_tls_cert = Some(fixtures.join("test-cert.pem"));
        c.smtp_tls_key = Some(fixtures.join("test-key.pem"));
    })
    .await;
    relay.agent("alice@example.com", "demo@agents.test").await;

    // Offered after EHLO; plaintext pipelined behind STARTTLS is discarded.
    let mut raw = Raw::connect(relay.smtp).await;
    raw.writer.write_all(b"EHLO client.test\r\n").await.unwrap();
    let mut ehlo = Vec::new();
    loop {
        let line = raw.line().await;
        let last = line.as_bytes().get(3) == Some(&b' ');
        ehlo.push(line);
        if last {
            break;
        }
    }
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    raw.writer
        .write_all(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        .await
        .unwrap();
    assert_eq!(raw.line().await, "220 2.0.0 ready to start TLS");
    // No plaintext answer to the injected command follows: the server now
    // waits for a TLS ClientHello, and our garbage ends the session.
    raw.writer.write_all(b"NOOP\r\n").await.unwrap();
    let after = raw.line().await;
    assert!(
        after.is_empty() || after.starts_with('\u{15}'),
        "only a TLS alert (or nothing) may follow, never a plaintext reply: {after:?}"
    );

    // A real client upgrades and delivers.
    let mut client = SmtpClientBuilder::new("localhost", relay.smtp.port())
        .unwrap()
        .implicit_tls(false)
        .allow_invalid_certs()
        .helo_host("client.remote.test")
        .timeout(PROMPT)
        .connect()
        .await
        .expect("STARTTLS handshake");
    let raw_message = message("tls@remote.test", "s@remote.test", "", "over TLS");
    client
        .send(Message::new(
            "s@remote.test",
            vec!["demo@agents.test"],
            raw_message.as_bytes(),
        ))
        .await
        .unwrap();
    let _ = client.quit().await;
    assert_eq!(
        relay
            .count("SELECT count(*) FROM messages WHERE email_message_id = 'tls@remote.test'")
            .await,
        1
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_half_configured_or_unreadable_certificate_stops_start_up() {
    let db = TestDb::new().await;
    for (cert, key) in [
        (Some("tests/fixtures/test-cert.pem"), None),
        (Some("/nonexistent.pem"), Some("/nonexistent.pem")),
    ] {
        let mut config = Config::for_database(db.url());
        config.smtp_tls_cert = cert.map(Into::into);
        config.smtp_tls_key = key.map(Into::into);
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = e2a_relay::run_with(
            config,
            Listeners { smtp, ops },
            CancellationToken::new(),
            None,
        )
        .await;
        let message = e2a_runtime::error_chain(result.unwrap_err().as_ref());
        assert!(
            message.contains("E2A_SMTP_TLS") || message.contains("nonexistent"),
            "{message}"
        );
    }
}

/// Group commit (`e2a_relay::ingests`): messages finishing DATA while the
/// recording tasks are busy share one transaction, yet each is answered
/// for itself. Here the first of a batch goes to an agent being deleted:
/// the batch stops waiting for that agent's lock after its lock timeout,
/// its messages are stored again one by one and concurrently, so every
/// other message is accepted while the delete still runs, and that one
/// alone gets `451` once its agent is gone.
#[tokio::test]
async fn concurrent_messages_share_commits_but_one_that_cannot_be_stored_fails_alone() {
    const GOOD: usize = 12;
    let db = TestDb::new().await;
    // No statement timeout within the test's patience: only the batch's
    // own lock timeout can free the good messages.
    let relay = Relay::start_with(db.url(), None, |c| {
        c.common.db.db_statement_timeout_ms = 300_000;
    })
    .await;
    relay.agent("alice@example.com", "demo@agents.test").await;
    relay.agent("gone@example.com", "gone@gone.test").await;
    let mut sessions = Vec::new();
    for i in 0..=GOOD {
        let to = if i == GOOD {
            "gone@gone.test"
        } else {
            "demo@agents.test"
        };
        let mut s = common::Raw::greeted(relay.smtp).await;
        assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
        assert_eq!(s.cmd(format!("RCPT TO:<{to}>")).await, "250 2.1.5 OK");
        assert!(s.cmd("DATA").await.starts_with("354 "));
        sessions.push(s);
    }
    let end = |i: usize, mut s: common::Raw| {
        tokio::spawn(async move {
            let raw = message(&format!("batch-{i}@remote.test"), "s@remote.test", "", "hi");
            s.send(raw).await;
            (i, s.cmd(".").await)
        })
    };
    let waiting = |n: i64| {
        let relay = &relay;
        async move {
            let sql = "SELECT count(*) FROM pg_stat_activity \
                       WHERE wait_event_type = 'Lock' AND query LIKE 'WITH quiet%'";
            let deadline = tokio::time::Instant::now() + PROMPT;
            while relay.count(sql).await < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n} statements wait"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Hold the good agent: each recording task's first message waits.
    let mut holder = relay.store.client().await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM agents WHERE id = 'demo@agents.test' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let mut sessions = sessions.into_iter().enumerate();
    let mut good = Vec::new();
    for n in 1..=2 {
        let (i, s) = sessions.next().unwrap();
        good.push(end(i, s));
        waiting(n).await;
    }
    // The agent of the last session is being deleted (not committed yet).
    let mut deleter = relay.store.client().await.unwrap();
    let delete = deleter.transaction().await.unwrap();
    delete
        .execute("DELETE FROM agents WHERE id = 'gone@gone.test'", &[])
        .await
        .unwrap();
    let (doomed_i, doomed_session) = sessions.next_back().unwrap();
    let doomed = end(doomed_i, doomed_session);
    tokio::time::sleep(Duration::from_millis(100)).await;
    good.extend(sessions.map(|(i, s)| end(i, s)));
    // All queued behind the two waiting tasks: one batch, the doomed first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.rollback().await.unwrap();

    for end in good {
        let (_, reply) = end.await.unwrap();
        assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    }
    assert!(
        !doomed.is_finished(),
        "the doomed message waits for the delete"
    );
    delete.commit().await.unwrap();
    let (_, reply) = doomed.await.unwrap();
    assert!(reply.starts_with("451 4.3.0"), "{reply}");
    assert_eq!(
        relay
            .count("SELECT count(DISTINCT email_message_id) FROM messages")
            .await,
        GOOD as i64
    );
    assert_eq!(
        relay.count("SELECT count(*) FROM messages").await,
        GOOD as i64
    );
    assert_eq!(
        relay
            .count("SELECT count(*) FROM webhook_events WHERE type = 'email.received'")
            .await,
        GOOD as i64
    );
    relay.stop().await;
}
