//! Sender spoofing end to end (issue 7, items 12 and 13): a real relay on a
//! real socket, a real database, SPF/DKIM/DMARC against recorded DNS
//! answers. What is signed and stored as the sender is the `From` DMARC
//! judged, and the per-agent DMARC opt-in cannot be sidestepped with
//! several `From` domains or a DNS failure.

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
use e2a_testkit::TestDb;
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
    async fn start(url: &str, records: RecordCache) -> Relay {
        let mut config = Config::for_database(url);
        config.smtp_domain = "mx.test".into();
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = smtp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(e2a_relay::run_with(
            config,
            Listeners { smtp, ops },
            shutdown.clone(),
            Some(Authenticator::with_records(records).unwrap()),
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

    /// A user owning a verified domain with one local agent on it,
    /// optionally opted in to DMARC rejection.
    async fn agent(&self, email: &str, address: &str, reject_dmarc_failures: bool) -> UserId {
        let user = common::owner_with_agent(&self.store, email, address).await;
        if reject_dmarc_failures {
            let opt_in = AgentPatch {
                reject_dmarc_failures: Some(true),
                ..AgentPatch::default()
            };
            let c = self.store.client().await.unwrap();
            agents::update(&c, &user, address, &opt_in).await.unwrap();
        }
        user
    }

    /// `(sender, dmarc_result, X-E2A-Auth-Sender, X-E2A-Auth-Verified)` of
    /// every stored message, oldest first.
    async fn stored(&self) -> Vec<(String, String, String, String)> {
        self.store
            .client()
            .await
            .unwrap()
            .query(
                "SELECT sender, dmarc_result, auth_headers FROM messages ORDER BY created_at, id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let headers: Value = row.get(2);
                (
                    row.get(0),
                    row.get(1),
                    headers["X-E2A-Auth-Sender"].as_str().unwrap().to_owned(),
                    headers["X-E2A-Auth-Verified"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

/// A raw SMTP client: exact reply lines, exact message bytes.
struct Smtp {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(addr: SocketAddr) -> Smtp {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut smtp = Smtp {
            reader: BufReader::new(r),
            writer: w,
        };
        assert!(smtp.line().await.starts_with("220 "));
        assert!(
            smtp.cmd("EHLO mx.attacker.example")
                .await
                .starts_with("250 ")
        );
        smtp
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

    /// One transaction; returns the reply to the end of DATA.
    async fn send(&mut self, mail_from: &str, rcpt: &[&str], raw: &str) -> String {
        assert_eq!(
            self.cmd(&format!("MAIL FROM:<{mail_from}>")).await,
            "250 2.1.0 OK"
        );
        for to in rcpt {
            assert_eq!(self.cmd(&format!("RCPT TO:<{to}>")).await, "250 2.1.5 OK");
        }
        assert!(self.cmd("DATA").await.starts_with("354 "));
        self.cmd(&format!("{raw}.")).await
    }
}

/// The attacker passes SPF for their own domain (`p=none`); the victim
/// publishes `p=reject`. The relay's clients connect from 127.0.0.1.
fn zone() -> RecordCache {
    let records = RecordCache::new();
    records
        .spf("attacker.example", "v=spf1 ip4:127.0.0.1 -all")
        .dmarc("attacker.example", "v=DMARC1; p=none")
        .dmarc("victim.example", "v=DMARC1; p=reject");
    records
}

fn with_headers(from_lines: &str, message_id: &str) -> String {
    format!(
        "{from_lines}To: demo@agents.test\r\nSubject: wire the money\r\n\
Message-ID: <{message_id}@attacker.example>\r\n\r\nPay now.\r\n"
    )
}

#[tokio::test]
async fn a_from_hidden_behind_a_junk_line_is_not_signed_as_the_victim() {
    let db = TestDb::new().await;
    let relay = Relay::start(db.url(), zone()).await;
    relay
        .agent("alice@example.com", "demo@agents.test", false)
        .await;
    let raw = with_headers(
        "From: x@attacker.example\r\njunk\r\nFrom: ceo@victim.example\r\n",
        "junk",
    );
    let mut smtp = Smtp::connect(relay.smtp).await;
    assert!(
        smtp.send("x@attacker.example", &["demo@agents.test"], &raw)
            .await
            .starts_with("250 ")
    );
    let stored = relay.stored().await;
    assert_eq!(stored.len(), 1);
    let (sender, _dmarc, auth_sender, verified) = &stored[0];
    assert!(
        !(auth_sender == "ceo@victim.example" && verified == "true"),
        "{stored:?}"
    );
    assert_eq!(auth_sender, "x@attacker.example");
    assert_eq!(verified, "false");
    assert_eq!(sender, "x@attacker.example");
    relay.stop().await;
}

#[tokio::test]
async fn several_from_fields_or_mailboxes_are_stored_unverified() {
    let db = TestDb::new().await;
    let relay = Relay::start(db.url(), zone()).await;
    relay
        .agent("alice@example.com", "demo@agents.test", false)
        .await;
    let mut smtp = Smtp::connect(relay.smtp).await;
    for (i, from) in [
        "From: x@attacker.example\r\nFrom: y@attacker.example\r\n",
        "From: x@attacker.example, y@attacker.example\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let raw = with_headers(from, &format!("several{i}"));
        assert!(
            smtp.send("x@attacker.example", &["demo@agents.test"], &raw)
                .await
                .starts_with("250 ")
        );
    }
    let stored = relay.stored().await;
    assert_eq!(stored.len(), 2);
    for (sender, dmarc, auth_sender, verified) in &stored {
        // DMARC itself passes (one domain, SPF aligned) — yet not verified.
        assert_eq!(dmarc, "pass");
        assert_eq!(verified, "false", "{stored:?}");
        assert_eq!(auth_sender, "x@attacker.example");
        assert_eq!(sender, "x@attacker.example");
    }
    // One From, one mailbox: verified.
    let raw = with_headers("From: x@attacker.example\r\n", "single");
    assert!(
        smtp.send("x@attacker.example", &["demo@agents.test"], &raw)
            .await
            .starts_with("250 ")
    );
    assert_eq!(relay.stored().await[2].3, "true");
    relay.stop().await;
}

#[tokio::test]
async fn a_second_from_domain_does_not_sidestep_the_dmarc_opt_in() {
    let db = TestDb::new().await;
    let relay = Relay::start(db.url(), zone()).await;
    relay
        .agent("alice@example.com", "strict@agents.test", true)
        .await;
    let mut smtp = Smtp::connect(relay.smtp).await;
    for (i, from) in [
        "From: x@attacker.example, ceo@victim.example\r\n",
        "From: x@attacker.example\r\nFrom: ceo@victim.example\r\n",
        "From: x@attacker.example\r\njunk\r\nFrom: ceo@victim.example\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let raw = with_headers(from, &format!("two-domains{i}"));
        let reply = smtp
            .send("x@attacker.example", &["strict@agents.test"], &raw)
            .await;
        assert!(reply.starts_with("550 5.7.1 "), "{from:?}: {reply}");
        smtp.cmd("RSET").await;
    }
    assert!(relay.stored().await.is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn dmarc_temperror_is_451_for_an_opted_in_agent() {
    let db = TestDb::new().await;
    let records = zone();
    records.temp_error("_dmarc.victim.example");
    let relay = Relay::start(db.url(), records).await;
    relay
        .agent("alice@example.com", "strict@agents.test", true)
        .await;
    relay
        .agent("bob@example.com", "lenient@bob.test", false)
        .await;
    let raw = with_headers("From: ceo@victim.example\r\n", "temperror");
    let mut smtp = Smtp::connect(relay.smtp).await;

    // Opted in: the sender must retry later; nothing is stored.
    let reply = smtp
        .send("x@attacker.example", &["strict@agents.test"], &raw)
        .await;
    assert!(reply.starts_with("451 4.7.0 "), "{reply}");
    // With an opted-in agent among the recipients the whole message waits.
    let reply = smtp
        .send(
            "x@attacker.example",
            &["strict@agents.test", "lenient@bob.test"],
            &raw,
        )
        .await;
    assert!(reply.starts_with("451 4.7.0 "), "{reply}");
    assert!(relay.stored().await.is_empty());

    // Without one it is stored, marked temperror and unverified.
    let reply = smtp
        .send("x@attacker.example", &["lenient@bob.test"], &raw)
        .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let stored = relay.stored().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1, "temperror");
    assert_eq!(stored[0].3, "false");
    relay.stop().await;
}
