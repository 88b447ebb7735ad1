//! The relay under attack, on a real socket with a real database: SMTP
//! smuggling endings, quotas at RCPT, per-session command caps, the
//! per-address connection cap and internationalised addresses. (Load and
//! memory: `tests/load.rs`.)

mod common;

use std::time::Duration;

use common::{AGENT, PROMPT, Raw, Relay, message};
use e2a_store::account_limits::{self, Limits};

/// Every published smuggling ending (bare LF / bare CR variants of the
/// end-of-data sequence): the second message stays in the first one's body
/// and no second message row or event exists.
#[tokio::test]
async fn smuggled_messages_stay_inside_the_first_body() {
    let relay = Relay::start(|_| {}).await;
    let endings = ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\r\n.\n", "\r.\n"];
    for (i, ending) in endings.iter().enumerate() {
        let mut c = Raw::greeted(relay.smtp).await;
        let first = format!(
            "From: sender@remote.test\r\nTo: {AGENT}\r\nMessage-ID: <first-{i}@remote.test>\r\nSubject: first\r\n\r\nhello"
        );
        let smuggled = format!(
            "{ending}MAIL FROM:<ceo@victim.test>\r\nRCPT TO:<{AGENT}>\r\nDATA\r\n\
             From: ceo@victim.test\r\nMessage-ID: <smuggled-{i}@victim.test>\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
        );
        let reply = c
            .send_message(format!("{first}{smuggled}").as_bytes())
            .await;
        assert!(reply.starts_with("250 2.0.0 "), "{ending:?}: {reply}");
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye", "{ending:?}");
        let raw = relay.raw(&format!("first-{i}@remote.test")).await;
        let raw = String::from_utf8_lossy(&raw);
        assert!(
            raw.contains("Subject: smuggled") && raw.contains("wire the money"),
            "{ending:?}: the smuggled text is part of the first message: {raw:?}"
        );
    }
    let n = endings.len() as i64;
    assert_eq!(relay.messages().await, n, "one message per session");
    assert_eq!(
        relay
            .count("SELECT count(*) FROM messages WHERE subject = 'smuggled'")
            .await,
        0
    );
    assert_eq!(
        relay.count("SELECT count(*) FROM webhook_events").await,
        n,
        "one event per session"
    );
    relay.stop().await;
}

/// Spec §6.2: an account at its monthly cap, then one at its storage cap, is
/// refused at RCPT with `552 5.2.2` and nothing is stored. With the
/// recipient cache off every RCPT reads the caps (with it on, see
/// `the_recipient_cache_answers_acceptances_only_for_its_period`).
#[tokio::test]
async fn an_account_over_quota_is_refused_at_rcpt() {
    let relay = Relay::start(|c| c.smtp_recipient_cache_ms = 0).await;
    let c = relay.store.client().await.unwrap();
    let limit = |month: i32, storage: i64| Limits {
        max_messages_month: month,
        max_storage_bytes: storage,
        ..Limits::default()
    };
    account_limits::upsert(&c, &relay.user, &limit(1, 1 << 40))
        .await
        .unwrap();
    let mut s = Raw::greeted(relay.smtp).await;
    s.transaction(&message("quota-1@remote.test", "first"))
        .await;
    assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
    assert_eq!(
        s.cmd(format!("RCPT TO:<{AGENT}>")).await,
        "552 5.2.2 mailbox quota exceeded"
    );
    assert!(s.cmd("DATA").await.starts_with("503 "), "no recipient");
    assert_eq!(s.cmd("RSET").await, "250 2.0.0 OK");
    // Storage: the one stored message already fills a tiny cap.
    account_limits::upsert(&c, &relay.user, &limit(1000, 10))
        .await
        .unwrap();
    assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
    assert_eq!(
        s.cmd(format!("RCPT TO:<{AGENT}>")).await,
        "552 5.2.2 mailbox quota exceeded"
    );
    assert_eq!(s.cmd("RSET").await, "250 2.0.0 OK");
    assert_eq!(relay.messages().await, 1, "nothing stored over quota");
    // Raised caps: mail flows again on the same connection.
    account_limits::upsert(&c, &relay.user, &limit(1000, 1 << 40))
        .await
        .unwrap();
    let reply = s
        .send_message(&message("quota-2@remote.test", "again"))
        .await;
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    assert_eq!(relay.messages().await, 2);
    relay.stop().await;
}

/// `E2A_SMTP_RECIPIENT_CACHE_MS`: an accepted address is answered from
/// memory for the period (a cap reached meanwhile is refused once it ends),
/// while refusals are never cached (raised caps take effect at once).
#[tokio::test]
async fn the_recipient_cache_answers_acceptances_only_for_its_period() {
    let period = Duration::from_millis(1500);
    let relay = Relay::start(|c| c.smtp_recipient_cache_ms = 1500).await;
    let c = relay.store.client().await.unwrap();
    let limit = |month: i32| Limits {
        max_messages_month: month,
        ..Limits::default()
    };
    let mut s = Raw::greeted(relay.smtp).await;
    let looked_up = tokio::time::Instant::now();
    assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
    assert_eq!(s.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
    account_limits::upsert(&c, &relay.user, &limit(0))
        .await
        .unwrap();
    assert_eq!(
        s.cmd(format!("RCPT TO:<{AGENT}>")).await,
        "250 2.1.5 OK",
        "within the period the acceptance is reused"
    );
    assert!(
        looked_up.elapsed() < period,
        "the test ran too slowly to show the cache"
    );
    assert_eq!(s.cmd("RSET").await, "250 2.0.0 OK");
    tokio::time::sleep_until(looked_up + period + Duration::from_millis(100)).await;
    assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
    assert_eq!(
        s.cmd(format!("RCPT TO:<{AGENT}>")).await,
        "552 5.2.2 mailbox quota exceeded",
        "after the period the address is looked up again"
    );
    // A refusal is looked up again on the next RCPT.
    account_limits::upsert(&c, &relay.user, &limit(1000))
        .await
        .unwrap();
    assert_eq!(s.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
    assert_eq!(s.cmd("RSET").await, "250 2.0.0 OK");
    let reply = s
        .send_message(&message("cache-1@remote.test", "after raising the cap"))
        .await;
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    assert_eq!(relay.messages().await, 1);
    relay.stop().await;
}

/// A MAIL / RCPT×N / RSET loop is cut off with `421 4.7.0` once the session
/// passes its caps, whatever the RCPT answers were.
#[tokio::test]
async fn command_loops_are_cut_off() {
    let relay = Relay::start(|c| {
        c.smtp_max_transactions = 5;
        c.smtp_max_rcpt_commands = 20;
    })
    .await;
    let mut s = Raw::greeted(relay.smtp).await;
    let mut last = String::new();
    'outer: for _ in 0..10 {
        last = s.cmd("MAIL FROM:<s@remote.test>").await;
        if !last.starts_with("250") {
            break;
        }
        for _ in 0..6 {
            // Duplicates and unknown recipients alike.
            for rcpt in [AGENT, AGENT, "nobody@agents.test"] {
                last = s.cmd(format!("RCPT TO:<{rcpt}>")).await;
                if last.starts_with("421") {
                    break 'outer;
                }
            }
        }
        s.cmd("RSET").await;
    }
    assert!(last.starts_with("421 4.7.0 "), "{last}");
    assert_eq!(s.line().await, "", "the connection is closed");
    relay.still_serves().await;

    // The transaction cap alone.
    let mut s = Raw::greeted(relay.smtp).await;
    for _ in 0..5 {
        assert_eq!(s.cmd("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
        assert_eq!(s.cmd("RSET").await, "250 2.0.0 OK");
    }
    assert!(
        s.cmd("MAIL FROM:<s@remote.test>")
            .await
            .starts_with("421 4.7.0 ")
    );
    relay.stop().await;
}

/// One client address cannot hold more than its share of connections.
#[tokio::test]
async fn connections_per_client_address_are_capped() {
    let relay = Relay::start(|c| c.smtp_max_connections_per_ip = 2).await;
    let a = Raw::connect(relay.smtp).await;
    let b = Raw::connect(relay.smtp).await;
    let mut third = tokio::net::TcpStream::connect(relay.smtp).await.unwrap();
    let mut reply = String::new();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 128];
    let n = tokio::time::timeout(PROMPT, third.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    reply.push_str(&String::from_utf8_lossy(&buf[..n]));
    assert!(reply.starts_with("421 4.7.0 "), "{reply}");
    drop((a, b));
    // Once the others are gone the address is served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.still_serves().await;
    relay.stop().await;
}

/// SMTPUTF8 (RFC 6531): a sender and headers in UTF-8 are accepted and
/// stored; a recipient whose domain is written as a U-label reaches the
/// agent on its A-label domain; a non-ASCII mailbox is "not found", not a
/// syntax error.
#[tokio::test]
async fn internationalised_addresses_end_to_end() {
    let relay = Relay::start(|_| {}).await;
    {
        use e2a_store::{
            address::EmailAddress,
            agents::{self, AgentMode, NewAgent},
            domains::{self, DkimKeys},
        };
        let mut c = relay.store.client().await.unwrap();
        let keys = DkimKeys {
            selector: "s".into(),
            public_key_b64: "cA==".into(),
            private_key_der: vec![0],
        };
        domains::claim(&mut c, &relay.user, "xn--bcher-kva.example", &keys, 10)
            .await
            .unwrap();
        domains::record_check(&mut c, &relay.user, "xn--bcher-kva.example", true)
            .await
            .unwrap();
        let new = NewAgent {
            address: EmailAddress::parse("shop@xn--bcher-kva.example").unwrap(),
            name: String::new(),
            webhook_url: String::new(),
            agent_mode: AgentMode::Local,
        };
        agents::create(&mut c, &relay.user, &new, 10).await.unwrap();
    }
    let mut s = Raw::connect(relay.smtp).await;
    s.send("EHLO client.remote.test\r\n").await;
    let mut ehlo = Vec::new();
    loop {
        let line = s.line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        ehlo.push(line);
        if last {
            break;
        }
    }
    assert!(ehlo.iter().any(|l| l.contains("SMTPUTF8")), "{ehlo:?}");
    assert_eq!(
        s.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8").await,
        "250 2.1.0 OK"
    );
    assert_eq!(
        s.cmd("RCPT TO:<jörg@agents.test>").await,
        "550 5.1.1 recipient not found"
    );
    assert_eq!(s.cmd("RCPT TO:<Shop@Bücher.example>").await, "250 2.1.5 OK");
    assert_eq!(s.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
    assert_eq!(s.cmd("DATA").await, "354 End data with <CR><LF>.<CR><LF>");
    s.send(
        "From: Jörg <jörg@bücher.example>\r\nTo: shop@bücher.example\r\nSubject: Grüße\r\n\
         Message-ID: <utf8@bücher.example>\r\n\r\nHallo!\r\n",
    )
    .await;
    let reply = s.cmd(".").await;
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    let c = relay.store.client().await.unwrap();
    let rows = c
        .query(
            "SELECT agent_id, sender, subject FROM messages ORDER BY agent_id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            (
                AGENT.to_owned(),
                "jörg@bücher.example".to_owned(),
                "Grüße".to_owned()
            ),
            (
                "shop@xn--bcher-kva.example".to_owned(),
                "jörg@bücher.example".to_owned(),
                "Grüße".to_owned()
            ),
        ]
    );
    relay.stop().await;
}
