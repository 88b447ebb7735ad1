//! The inbound path across services, as a user sees it: create an agent by
//! slug through the API, send it mail with a real SMTP client through the
//! real relay, and read it back through the API with its authentication
//! verdicts and conversation.

mod common;

use std::time::Duration;

use common::Running;
use e2a_api::Config;
use e2a_mail::auth::{Authenticator, RecordCache};
use e2a_runtime::CancellationToken;
use e2a_testkit::TestDb;
use mail_send::{SmtpClientBuilder, smtp::message::Message};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;

async fn send(port: u16, raw: &str) {
    let mut client = SmtpClientBuilder::new("127.0.0.1", port)
        .unwrap()
        .helo_host("mail.remote.test")
        .timeout(Duration::from_secs(30))
        .connect_plain()
        .await
        .unwrap();
    // Mixed-case RCPT: normalised like agent addresses (flaw 33).
    client
        .send(Message::new(
            "someone@remote.test",
            vec!["Demo@Agents.LocalHost"],
            raw.as_bytes(),
        ))
        .await
        .unwrap();
    let _ = client.quit().await;
}

#[tokio::test]
async fn mail_sent_over_smtp_is_readable_through_the_api_with_verdicts_and_thread() {
    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    let api = Running::start(config).await;
    let key = common::key_for(db.url(), "owner@example.com").await;

    let (status, created) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["email"], "demo@agents.localhost");

    let records = RecordCache::new();
    records.spf("remote.test", "v=spf1 ip4:127.0.0.1 -all");
    records.dmarc("remote.test", "v=DMARC1; p=reject");
    let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = smtp.local_addr().unwrap().port();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let mut relay_config = e2a_relay::Config::for_database(db.url());
    relay_config.smtp_domain = "agents.localhost".into();
    let relay = tokio::spawn(e2a_relay::run_with(
        relay_config,
        e2a_relay::Listeners { smtp, ops },
        shutdown.clone(),
        Some(Authenticator::with_records(records).unwrap()),
    ));

    send(
        port,
        "From: Someone <someone@remote.test>\r\nTo: demo@agents.localhost\r\nSubject: Quarterly numbers\r\n\
         Message-ID: <q1@remote.test>\r\n\r\nHere they are.\r\n",
    )
    .await;

    let agent = "/v1/agents/demo@agents.localhost";
    let (status, list) = api
        .call(Method::GET, format!("{agent}/messages"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        1,
        "the default list (inbound, unread) shows it: {list}"
    );
    assert_eq!(items[0]["subject"], "Quarterly numbers");
    assert_eq!(items[0]["from"], "someone@remote.test");
    let id = items[0]["message_id"].as_str().unwrap().to_owned();
    let thread = items[0]["conversation_id"].as_str().unwrap().to_owned();
    assert!(
        thread.starts_with("cnv_"),
        "the gateway minted a conversation: {thread}"
    );

    let (status, message) = api
        .call(Method::GET, format!("{agent}/messages/{id}"), &key, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{message}");
    assert_eq!(
        message["auth"],
        json!({"spf": "pass", "dkim": "none", "dmarc": "pass"})
    );
    assert_eq!(message["auth_headers"]["X-E2A-Auth-Verified"], "true");
    assert_eq!(
        message["auth_headers"]["X-E2A-Auth-Domain-Check"],
        "spf=pass; dkim=none; dmarc=pass"
    );
    assert_eq!(message["conversation_id"], thread.as_str());

    // A reply from the same correspondent joins the thread.
    send(
        port,
        "From: Someone <someone@remote.test>\r\nTo: demo@agents.localhost\r\nSubject: Re: Quarterly numbers\r\n\
         Message-ID: <q2@remote.test>\r\nIn-Reply-To: <q1@remote.test>\r\n\r\nOne more thing.\r\n",
    )
    .await;
    let (status, conversation) = api
        .call(
            Method::GET,
            format!("{agent}/conversations/{thread}"),
            &key,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{conversation}");
    let subjects: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["Quarterly numbers", "Re: Quarterly numbers"]);

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    api.stop().await;
}

/// The whole event path: an account webhook created through the API gets
/// the `email.received` event of mail sent over SMTP to the relay, signed
/// with the secret the API showed once, with the raw message inside.
#[tokio::test]
async fn mail_sent_over_smtp_reaches_the_account_webhook_signed() {
    use base64::Engine as _;
    use e2a_testkit::receiver::Receiver;

    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    let api = Running::start(config).await;
    let key = common::key_for(db.url(), "owner@example.com").await;
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let mut receiver = Receiver::ok().await;
    let (status, webhook) = api
        .call(
            Method::POST,
            "/v1/webhooks",
            &key,
            Some(json!({"url": receiver.url("/e2a"), "events": ["email.received"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{webhook}");
    let secret = webhook["signing_secret"].as_str().unwrap().to_owned();

    let shutdown = CancellationToken::new();
    let (port, services) = relay_and_deliverer(db.url(), &shutdown).await;

    let raw = "From: Someone <someone@remote.test>\r\nTo: demo@agents.localhost\r\nSubject: Hello hook\r\n\
               Message-ID: <h1@remote.test>\r\n\r\nPing.\r\n";
    send(port, raw).await;

    let r = receiver.next().await;
    assert_eq!(r.path, "/e2a");
    let signature = r.header("x-e2a-signature").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    e2a_webhook::verify(
        signature,
        &[secret.as_str()],
        &r.body,
        i64::try_from(now).unwrap(),
        e2a_webhook::DEFAULT_TOLERANCE,
    )
    .expect("signed with the secret shown at creation");
    let body = r.json();
    assert_eq!(body["event"], "email.received");
    assert!(body["id"].as_str().unwrap().starts_with("evt_"));
    let data = &body["data"];
    assert_eq!(data["recipient"], "demo@agents.localhost");
    assert_eq!(data["subject"], "Hello hook");
    let stored = base64::engine::general_purpose::STANDARD
        .decode(data["raw_message"].as_str().unwrap())
        .unwrap();
    assert!(
        String::from_utf8_lossy(&stored).starts_with(raw),
        "the raw message as stored: {:?}",
        String::from_utf8_lossy(&stored)
    );

    // The event is visible as processed, matched to that webhook.
    let c = e2a_store::Store::new(&e2a_store::StoreConfig::new(db.url()))
        .unwrap()
        .client()
        .await
        .unwrap();
    let row = c
        .query_one(
            "SELECT status, matched_webhook_ids FROM webhook_events WHERE id = $1",
            &[&body["id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "processed");
    assert_eq!(
        row.get::<_, Vec<String>>(1),
        [webhook["id"].as_str().unwrap()]
    );

    shutdown.cancel();
    for service in services {
        service.await.unwrap().unwrap();
    }
    api.stop().await;
}

/// The legacy path: a cloud agent with a `webhook_url` gets its mail
/// POSTed there by the deliverer (queued by the relay with the message,
/// never sent inline in the SMTP session), with the deprecation headers and
/// the authentication verdicts.
#[tokio::test]
async fn mail_to_a_cloud_agent_is_pushed_to_its_webhook_url() {
    use base64::Engine as _;
    use e2a_testkit::receiver::Receiver;

    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    let api = Running::start(config).await;
    let key = common::key_for(db.url(), "owner@example.com").await;
    let mut receiver = Receiver::ok().await;
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(json!({"slug": "demo", "agent_mode": "cloud", "webhook_url": receiver.url("/push")})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");

    let shutdown = CancellationToken::new();
    let (port, services) = relay_and_deliverer(db.url(), &shutdown).await;

    let raw = "From: Someone <someone@remote.test>\r\nTo: demo@agents.localhost\r\nSubject: Legacy\r\n\
               Message-ID: <l1@remote.test>\r\n\r\nOld style.\r\n";
    send(port, raw).await;

    let r = receiver.next().await;
    assert_eq!(r.path, "/push");
    assert!(
        r.header("x-e2a-signature").is_none(),
        "legacy pushes are unsigned"
    );
    assert!(r.header("x-e2a-deprecation").is_some());
    assert_eq!(r.header("sunset"), Some("Tue, 01 Dec 2026 00:00:00 GMT"));
    assert_eq!(r.header("x-e2a-auth-verified"), Some("false"));
    let body = r.json();
    assert_eq!(body["recipient"], "demo@agents.localhost");
    assert_eq!(body["from"], "someone@remote.test");
    assert!(body["message_id"].as_str().unwrap().starts_with("msg_"));
    let stored = base64::engine::general_purpose::STANDARD
        .decode(body["raw_message"].as_str().unwrap())
        .unwrap();
    assert!(String::from_utf8_lossy(&stored).starts_with(raw));
    let c = e2a_store::Store::new(&e2a_store::StoreConfig::new(db.url()))
        .unwrap()
        .client()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: String = c
            .query_one("SELECT status FROM webhook_deliveries", &[])
            .await
            .unwrap()
            .get(0);
        if status == "delivered" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    shutdown.cancel();
    for service in services {
        service.await.unwrap().unwrap();
    }
    api.stop().await;
}

/// The relay (SMTP on a free port, no DNS records) and the deliverer on the
/// database at `url`, until `shutdown`; the SMTP port and both tasks.
async fn relay_and_deliverer(
    url: &str,
    shutdown: &CancellationToken,
) -> (
    u16,
    [tokio::task::JoinHandle<Result<(), e2a_runtime::BoxError>>; 2],
) {
    let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = smtp.local_addr().unwrap().port();
    let mut relay_config = e2a_relay::Config::for_database(url);
    relay_config.smtp_domain = "agents.localhost".into();
    let relay = tokio::spawn(e2a_relay::run_with(
        relay_config,
        e2a_relay::Listeners {
            smtp,
            ops: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        },
        shutdown.clone(),
        Some(Authenticator::with_records(RecordCache::new()).unwrap()),
    ));
    let deliverer = tokio::spawn(e2a_deliverer::run(
        e2a_deliverer::Config::for_database(url),
        e2a_deliverer::Listeners {
            ops: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        },
        shutdown.clone(),
    ));
    (port, [relay, deliverer])
}
