//! Sending through the API on a real server and database: what one accept
//! transaction stores (message, delivery, payload, recipients — or loopback
//! copies with their events), idempotency (replays before limits,
//! concurrent duplicates, key reuse, the 255-character bound), the shared
//! send rate limit, account caps, bad input with nothing queued, reply
//! threading, the test route, HITL holds, and a killed API process leaving
//! every message whole or absent.

mod common;

use std::time::Duration;

use common::Running;
use e2a_api::Config;
use e2a_store::{Store, StoreConfig};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct Harness {
    db: TestDb,
    api: Running,
    store: Store,
    key: String,
}

impl Harness {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tune: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.shared_domain = "agents.localhost".into();
        tune(&mut config);
        let api = Running::start(config).await;
        let key = common::key_for(db.url(), "owner@example.com").await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let h = Self {
            db,
            api,
            store,
            key,
        };
        h.agent("alice").await;
        h
    }

    async fn agent(&self, slug: &str) -> String {
        let (status, body) = self
            .api
            .call(
                Method::POST,
                "/v1/agents",
                &self.key,
                Some(json!({ "slug": slug })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["email"].as_str().unwrap().to_owned()
    }

    async fn send(&self, body: Value) -> (StatusCode, Value) {
        self.api
            .call(
                Method::POST,
                "/v1/agents/alice@agents.localhost/messages",
                &self.key,
                Some(body),
            )
            .await
    }

    async fn send_with_key(&self, key: &str, body: &Value) -> (StatusCode, Value, bool) {
        let resp = self
            .api
            .request(
                Method::POST,
                "/v1/agents/alice@agents.localhost/messages",
                &self.key,
            )
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        (status, resp.json().await.unwrap(), replayed)
    }

    async fn count(&self, sql: &str) -> i64 {
        self.store
            .client()
            .await
            .unwrap()
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }
}

fn simple(to: &str) -> Value {
    json!({"to": [to], "subject": "Hello", "body": "Hi there"})
}

#[tokio::test]
async fn a_send_is_queued_in_one_transaction_with_a_stable_message_id() {
    let h = Harness::new().await;
    let (status, body) = h
        .send(json!({
            "to": ["Bob@Example.net", "bob@example.net", "alice@agents.localhost"],
            "cc": ["carol@example.net", "BOB@example.net"],
            "bcc": ["dave@example.net", "carol@example.net"],
            "subject": "Héllo",
            "body": "Hi",
            "html_body": "<p>Hi</p>",
            "attachments": [{"filename": "a.txt", "content_type": "text/plain", "data": "aGVsbG8="}],
        }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["method"], "smtp");
    let message_id = body["message_id"].as_str().unwrap();
    assert!(
        message_id.starts_with('<') && message_id.ends_with("@agents.localhost>"),
        "{message_id}"
    );
    let c = h.store.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT m.status, m.to_recipients, m.cc, m.bcc, m.provider_message_id, m.message_type, \
                    m.conversation_id, p.body, d.mail_from, d.dkim_domain \
               FROM messages m JOIN mail_deliveries d ON d.message_id = m.id \
               JOIN mail_payloads p ON p.payload_id = d.payload_id WHERE m.direction = 'outbound'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "queued");
    // Canonical: lower-cased, de-duplicated, the agent itself dropped,
    // Cc without To, Bcc without To and Cc.
    assert_eq!(row.get::<_, Vec<String>>(1), ["bob@example.net"]);
    assert_eq!(row.get::<_, Vec<String>>(2), ["carol@example.net"]);
    assert_eq!(row.get::<_, Vec<String>>(3), ["dave@example.net"]);
    assert_eq!(
        format!("<{}>", row.get::<_, String>(4)),
        message_id,
        "the Message-ID of the answer is the stored one"
    );
    assert_eq!(row.get::<_, String>(5), "send");
    assert!(row.get::<_, String>(6).starts_with("cnv_"));
    let raw = String::from_utf8(row.get::<_, Vec<u8>>(7)).unwrap();
    assert!(raw.contains(&format!("Message-ID: {message_id}")), "{raw}");
    assert!(
        !raw.to_ascii_lowercase().contains("dave@"),
        "Bcc never in headers"
    );
    assert_eq!(row.get::<_, String>(8), "alice@agents.localhost");
    assert_eq!(row.get::<_, String>(9), "agents.localhost");
    assert_eq!(
        h.count("SELECT count(*) FROM mail_recipients").await,
        3,
        "one envelope recipient each"
    );
    // Nothing is announced until the deliverer sends it.
    assert_eq!(h.count("SELECT count(*) FROM webhook_events").await, 0);
}

#[tokio::test]
async fn bad_input_is_refused_with_the_contract_error_and_nothing_is_queued() {
    let h = Harness::new().await;
    let other_key = common::key_for(h.db.url(), "mallory@example.com").await;
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            json!({"subject": "s", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
        (
            json!({"to": [], "bcc": ["x@example.net"], "subject": "s", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
        (
            json!({"to": ["not an address"], "subject": "s", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
        (
            json!({"to": ["x@example.net\r\nBcc: y@example.net"], "subject": "s", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "a\r\nBcc: evil@example.net", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "attachments": [{"filename": "a\r\n.txt", "content_type": "text/plain", "data": ""}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "attachments": [{"filename": "a.txt", "content_type": "text/plain\nX-Evil: 1", "data": ""}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "attachments": [{"filename": "a.txt", "content_type": "text/plain", "data": "%%%"}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "from": "someone@else.net"}),
            StatusCode::BAD_REQUEST,
            "invalid_from",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "conversation_id": "a\nb"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": ["x@example.net"], "subject": "s", "body": "b", "surprise": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": (0..51).map(|i| format!("r{i}@example.net")).collect::<Vec<_>>(), "subject": "s", "body": "b"}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = h.send(body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        common::assert_error_shape(&answer);
        assert_eq!(common::code(&answer), code, "{body} → {answer}");
    }
    // Unknown parent, another tenant's agent, a malformed id.
    let (status, answer) = h
        .api
        .call(
            Method::POST,
            "/v1/agents/alice@agents.localhost/messages/msg_0123456789abcdef0123456789abcdef/reply",
            &h.key,
            Some(json!({"body": "hi"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, _) = h
        .api
        .call(
            Method::POST,
            "/v1/agents/alice@agents.localhost/messages/nonsense/forward",
            &h.key,
            Some(json!({"to": ["x@example.net"]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .api
        .call(
            Method::POST,
            "/v1/agents/alice@agents.localhost/messages",
            &other_key,
            Some(simple("x@example.net")),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another tenant's agent");
    // A 26 MiB body: 413, and the other routes keep the small limit.
    let big = json!({"to": ["x@example.net"], "subject": "s", "body": "x".repeat(26 << 20)});
    let (status, answer) = h.send(big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(common::code(&answer), "payload_too_large");
    let (status, _) = h
        .api
        .call(
            Method::POST,
            "/v1/webhooks",
            &h.key,
            Some(json!({"url": "https://x.example.com", "events": ["email.sent"], "description": "x".repeat(1 << 20)})),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    for table in [
        "messages",
        "mail_deliveries",
        "mail_payloads",
        "idempotency_keys",
    ] {
        assert_eq!(
            h.count(&format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}: nothing queued"
        );
    }
    // A 20 MiB message is fine.
    let (status, answer) = h
        .send(json!({"to": ["x@example.net"], "subject": "big", "body": "y".repeat(20 << 20)}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn idempotency_replays_before_limits_refuses_reuse_and_creates_one_message_for_duplicates() {
    let h = Harness::with(|c| c.rates.send_per_minute = 3).await;
    let body = simple("bob@example.net");
    let (s1, first, replayed) = h.send_with_key("k-1", &body).await;
    assert_eq!(s1, StatusCode::OK);
    assert!(!replayed);
    let (s2, second, replayed) = h.send_with_key("k-1", &body).await;
    assert_eq!((s2, &second), (StatusCode::OK, &first), "the stored answer");
    assert!(replayed);
    assert_eq!(
        h.count("SELECT count(*) FROM messages").await,
        1,
        "nothing ran twice"
    );
    // Another body with the same key.
    let (s, answer, _) = h.send_with_key("k-1", &simple("carol@example.net")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(common::code(&answer), "idempotency_key_reuse");
    // Keys are bounded.
    let (s, answer, _) = h.send_with_key(&"k".repeat(256), &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    let (s, _, _) = h.send_with_key(&"k".repeat(255), &body).await;
    assert_eq!(s, StatusCode::OK);

    // Use up the rate limit (3 per minute: 2 used).
    let (s, _) = h.send(simple("dave@example.net")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, answer) = h.send(simple("erin@example.net")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        answer["error"]["details"]["retry_after_seconds"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // A replay is still answered: it is checked before the limit (flaw 25).
    let (s, again, replayed) = h.send_with_key("k-1", &body).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    assert!(replayed);
    // A refused request stored nothing: its key is free.
    let (s, _, _) = h.send_with_key("k-2", &simple("frank@example.net")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        h.count("SELECT count(*) FROM idempotency_keys WHERE key = 'u:k-2'")
            .await,
        0
    );
}

#[tokio::test]
async fn concurrent_duplicates_create_exactly_one_message() {
    let h = Harness::new().await;
    let body = simple("bob@example.net");
    let answers =
        futures::future::join_all((0..20).map(|_| h.send_with_key("same-key", &body))).await;
    // Each duplicate either finds the first still in flight (409, retry
    // later) or gets its stored answer; none runs again.
    let ok: Vec<&Value> = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::OK)
        .map(|(_, a, _)| a)
        .collect();
    assert!(!ok.is_empty());
    assert!(ok.iter().all(|a| *a == ok[0]), "one answer: {ok:?}");
    for (status, answer, _) in &answers {
        if *status != StatusCode::OK {
            assert_eq!(*status, StatusCode::CONFLICT, "{answer}");
            assert_eq!(common::code(answer), "idempotency_in_flight");
        }
    }
    let (s, replay, replayed) = h.send_with_key("same-key", &body).await;
    assert_eq!((s, &replay), (StatusCode::OK, ok[0]));
    assert!(replayed);
    assert_eq!(h.count("SELECT count(*) FROM messages").await, 1);
    assert_eq!(h.count("SELECT count(*) FROM mail_deliveries").await, 1);
}

#[tokio::test]
async fn caps_and_an_unverified_domain_refuse_before_anything_is_stored() {
    let h = Harness::new().await;
    let c = h.store.client().await.unwrap();
    c.execute(
        "INSERT INTO account_limits (user_id, plan_code, max_agents, max_domains, max_messages_month, \
           max_storage_bytes, max_webhooks, upgrade_url) \
         SELECT id, 'tiny', 10, 10, 1, 1000000, 10, '' FROM users WHERE email = 'owner@example.com'",
        &[],
    )
    .await
    .unwrap();
    let (s, _) = h.send(simple("bob@example.net")).await;
    assert_eq!(s, StatusCode::OK, "the first message of the month");
    let (s, answer) = h.send(simple("bob@example.net")).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{answer}");
    assert_eq!(common::code(&answer), "limit_exceeded");
    assert_eq!(answer["error"]["details"]["resource"], "messages_month");
    assert_eq!(h.count("SELECT count(*) FROM messages").await, 1);
}

#[tokio::test]
async fn loopback_gives_local_agents_their_copy_at_once_and_queues_only_the_rest() {
    let h = Harness::new().await;
    let bob = h.agent("bob").await;
    let carol = h.agent("carol").await;
    let (s, body) = h
        .send(json!({"to": [bob, "outside@example.net"], "cc": [carol], "subject": "Lunch?", "body": "At noon"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "queued");
    for agent in ["bob@agents.localhost", "carol@agents.localhost"] {
        let (s, page) = h
            .api
            .call(
                Method::GET,
                format!("/v1/agents/{agent}/messages"),
                &h.key,
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{agent}: {page}");
        assert_eq!(items[0]["subject"], "Lunch?");
        assert_eq!(items[0]["from"], "alice@agents.localhost");
        assert_eq!(
            h.count(&format!(
                "SELECT count(*) FROM webhook_events WHERE type = 'email.received' AND agent_id = '{agent}'"
            ))
            .await,
            1
        );
    }
    assert_eq!(
        h.count("SELECT count(*) FROM mail_recipients").await,
        1,
        "only the outside address goes through the outbox"
    );

    // Only local recipients: sent at once, loopback, email.sent.
    let (s, body) = h.send(simple("bob@agents.localhost")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["method"].as_str()),
        (Some("sent"), Some("loopback"))
    );
    assert_eq!(
        h.count("SELECT count(*) FROM webhook_events WHERE type = 'email.sent'")
            .await,
        1
    );

    // Bob replies by loopback: the reply threads into Alice's conversation.
    let c = h.store.client().await.unwrap();
    let (copy_id, alice_conversation): (String, String) = {
        let r = c
            .query_one(
                "SELECT i.id, o.conversation_id FROM messages i JOIN messages o \
                   ON o.provider_message_id = i.email_message_id AND o.direction = 'outbound' \
                  WHERE i.agent_id = 'bob@agents.localhost' AND i.subject = 'Hello'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let (s, reply) = h
        .api
        .call(
            Method::POST,
            format!("/v1/agents/bob@agents.localhost/messages/{copy_id}/reply"),
            &h.key,
            Some(json!({"body": "Sure"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{reply}");
    let r = c
        .query_one(
            "SELECT subject, conversation_id FROM messages \
              WHERE agent_id = 'alice@agents.localhost' AND direction = 'inbound'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "Re: Hello");
    assert_eq!(
        r.get::<_, String>(1),
        alice_conversation,
        "Alice's copy of the reply joins her conversation"
    );
}

#[tokio::test]
async fn a_reply_joins_the_parent_conversation_and_carries_threading_headers() {
    let h = Harness::new().await;
    // An inbound message for Alice (as the relay would store it).
    let c = h.store.client().await.unwrap();
    let raw = "From: Bob <bob@example.net>\r\nTo: alice@agents.localhost\r\nCc: carol@example.net\r\n\
               Subject: Plans\r\nMessage-ID: <p1@example.net>\r\nReferences: <p0@example.net>\r\n\r\nLet's meet.\r\n";
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, email_message_id, \
           raw_message, body_sha256, conversation_id, inbox_status, to_recipients, cc) \
         SELECT 'msg_00000000000000000000000000000001', user_id, id, 'inbound', 'bob@example.net', id, 'Plans', \
                'p1@example.net', $1::bytea, repeat('a', 64), 'cnv_parent', 'unread', \
                ARRAY['alice@agents.localhost'], ARRAY['carol@example.net'] \
           FROM agents WHERE id = 'alice@agents.localhost'",
        &[&raw.as_bytes()],
    )
    .await
    .unwrap();
    let path = "/v1/agents/alice@agents.localhost/messages/msg_00000000000000000000000000000001";
    let (s, answer) = h
        .api
        .call(
            Method::POST,
            format!("{path}/reply"),
            &h.key,
            Some(json!({"body": "Tuesday?", "conversation_id": "cnv_other"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "another conversation: {answer}");
    let (s, answer) = h
        .api
        .call(
            Method::POST,
            format!("{path}/reply"),
            &h.key,
            Some(json!({"body": "Tuesday?", "reply_all": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let r = c
        .query_one(
            "SELECT m.subject, m.conversation_id, m.to_recipients, m.cc, m.message_type, p.body \
               FROM messages m JOIN mail_deliveries d ON d.message_id = m.id \
               JOIN mail_payloads p ON p.payload_id = d.payload_id WHERE m.direction = 'outbound'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "Re: Plans");
    assert_eq!(
        r.get::<_, String>(1),
        "cnv_parent",
        "flaw 16: joins the parent"
    );
    assert_eq!(r.get::<_, Vec<String>>(2), ["bob@example.net"]);
    assert_eq!(
        r.get::<_, Vec<String>>(3),
        ["carol@example.net"],
        "reply_all"
    );
    assert_eq!(r.get::<_, String>(4), "reply");
    let raw = String::from_utf8(r.get::<_, Vec<u8>>(5)).unwrap();
    assert!(raw.contains("In-Reply-To: <p1@example.net>"), "{raw}");
    assert!(
        raw.contains("<p0@example.net>") && raw.contains("References:"),
        "{raw}"
    );
    assert!(raw.contains("X-E2A-Conversation-Id: cnv_parent"), "{raw}");

    // Forward: new recipients, the original quoted, no In-Reply-To.
    let (s, answer) = h
        .api
        .call(
            Method::POST,
            format!("{path}/forward"),
            &h.key,
            Some(json!({"to": ["dave@example.net"], "body": "FYI"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    let raw: Vec<u8> = c
        .query_one(
            "SELECT p.body FROM messages m JOIN mail_deliveries d ON d.message_id = m.id \
               JOIN mail_payloads p ON p.payload_id = d.payload_id WHERE m.message_type = 'forward'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.contains("Subject: Fwd: Plans"), "{raw}");
    assert!(!raw.contains("In-Reply-To"), "{raw}");
    assert!(raw.contains("Let's meet."), "the original is quoted: {raw}");
}

#[tokio::test]
async fn the_test_route_is_recorded_and_delivered_by_loopback() {
    let h = Harness::new().await;
    let (s, body) = h
        .api
        .call(
            Method::POST,
            "/v1/agents/alice@agents.localhost/test",
            &h.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "sent");
    assert_eq!(body["method"], "loopback");
    assert_eq!(
        h.count(
            "SELECT count(*) FROM messages WHERE message_type = 'test' AND direction = 'outbound'"
        )
        .await,
        1,
        "flaw 20: recorded"
    );
    assert_eq!(
        h.count(
            "SELECT count(*) FROM messages WHERE direction = 'inbound' AND agent_id = 'alice@agents.localhost' \
               AND sender LIKE 'noreply@%' AND subject = 'Test email from e2a'"
        )
        .await,
        1
    );
    assert_eq!(
        h.count(
            "SELECT count(*) FROM webhook_events WHERE type IN ('email.received', 'email.sent')"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn an_agent_under_review_holds_its_mail() {
    let h = Harness::new().await;
    let (s, _) = h
        .api
        .call(
            Method::PATCH,
            "/v1/agents/alice@agents.localhost",
            &h.key,
            Some(json!({"hitl_enabled": true, "hitl_ttl_seconds": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = h.send(simple("bob@example.net")).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending_approval");
    assert!(body["message_id"].as_str().unwrap().starts_with("msg_"));
    assert!(body["approval_expires_at"].is_string());
    assert_eq!(h.count("SELECT count(*) FROM mail_deliveries").await, 0);
    assert_eq!(
        h.count("SELECT count(*) FROM webhook_events WHERE type = 'email.pending_approval'")
            .await,
        1
    );
}

#[tokio::test]
async fn an_api_killed_mid_flight_leaves_every_message_whole_or_absent() {
    e2a_runtime::install_crypto_provider();
    let db = TestDb::new().await;
    let key = common::key_for(db.url(), "owner@example.com").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut api = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-api"))
        .env("E2A_DATABASE_URL", db.url())
        .env("E2A_ENV", "development")
        .env("E2A_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("E2A_OPS_ADDR", format!("127.0.0.1:{ops}"))
        .env("E2A_SHARED_DOMAIN", "agents.localhost")
        .env("E2A_RATE_SEND_PER_MINUTE", "100000")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http
            .post(format!("{base}/v1/agents"))
            .bearer_auth(&key)
            .json(&json!({"slug": "alice"}))
            .send()
            .await
        {
            assert_eq!(r.status(), StatusCode::CREATED);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the API never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Sends keep arriving, 32 at a time; once some are stored, SIGKILL.
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let mut sends = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        sends.spawn(async move {
            let mut ok = 0;
            for i in 0..1000 {
                let sent = http
                    .post(format!("{base}/v1/agents/alice@agents.localhost/messages"))
                    .bearer_auth(&key)
                    .json(&json!({"to": [format!("r{worker}-{i}@example.net"), "x@example.net"], "subject": "s", "body": "b"}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::OK => ok += 1,
                    Ok(r) => panic!("unexpected answer {}", r.status()),
                    Err(_) => return ok,
                }
            }
            ok
        });
    }
    let c = store.client().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = c
            .query_one("SELECT count(*) FROM messages", &[])
            .await
            .unwrap()
            .get(0);
        if n >= 50 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sends never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    api.start_kill().unwrap();
    api.wait().await.unwrap();
    let mut answered_ok = 0;
    while let Some(r) = sends.join_next().await {
        answered_ok += r.unwrap();
    }
    let one = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let messages = one("SELECT count(*) FROM messages WHERE direction = 'outbound'").await;
    assert!(
        messages >= answered_ok,
        "every answered send is stored ({messages} < {answered_ok})"
    );
    eprintln!("killed with {answered_ok} sends answered, {messages} messages stored");
    assert!(
        answered_ok < 32 * 1000,
        "the kill came after every send finished: nothing was in flight"
    );
    // Whole: every message has its delivery, payload and both recipients;
    // nothing exists without its message.
    assert_eq!(
        one("SELECT count(*) FROM messages m WHERE m.direction = 'outbound' AND NOT EXISTS \
               (SELECT 1 FROM mail_deliveries d JOIN mail_payloads p ON p.payload_id = d.payload_id \
                 WHERE d.message_id = m.id \
                   AND (SELECT count(*) FROM mail_recipients r WHERE r.delivery_id = d.delivery_id) = 2)")
        .await,
        0,
        "a message without its whole delivery"
    );
    assert_eq!(
        one("SELECT count(*) FROM mail_deliveries WHERE message_id IS NULL").await,
        0
    );
    assert_eq!(
        one("SELECT count(*) FROM mail_payloads p WHERE NOT EXISTS \
               (SELECT 1 FROM mail_deliveries d WHERE d.payload_id = p.payload_id)")
        .await,
        0,
        "an orphan payload"
    );
}

/// The loopback acceptance, across services: Alice sends to Bob and
/// Carol (agents of this gateway) and to an outside address. Bob and Carol
/// each get one threaded inbound copy and their webhooks one
/// `email.received`; the outside copy goes out once, through a real SMTP
/// server, and Alice's webhook hears `email.sent` once.
#[tokio::test]
async fn agents_on_the_gateway_get_their_copy_and_webhooks_while_the_outside_copy_goes_out_once() {
    use e2a_testkit::{
        receiver::Receiver,
        smtp_sink::{Script, SmtpSink},
    };

    let h = Harness::new().await;
    let bob = h.agent("bob").await;
    let carol = h.agent("carol").await;
    let mut receiver = Receiver::ok().await;
    for (agent, events) in [
        (&bob, json!(["email.received"])),
        (&carol, json!(["email.received"])),
        (
            &"alice@agents.localhost".to_owned(),
            json!(["email.sent", "email.received"]),
        ),
    ] {
        let (s, body) = h
            .api
            .call(
                Method::POST,
                "/v1/webhooks",
                &h.key,
                Some(json!({
                    "url": receiver.url(&format!("/{agent}")),
                    "events": events,
                    "filters": {"agent_ids": [agent]},
                })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let sink = SmtpSink::start(Script::new()).await.unwrap();
    let mut config = e2a_deliverer::Config::for_database(h.db.url());
    config.outbound_smtp_host = sink.host();
    config.outbound_smtp_port = sink.port();
    config.outbound_smtp_tls = "none".into();
    let shutdown = e2a_runtime::CancellationToken::new();
    let deliverer = tokio::spawn(e2a_deliverer::run(
        config,
        e2a_deliverer::Listeners {
            ops: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        },
        shutdown.clone(),
    ));

    let (s, body) = h
        .send(json!({
            "to": [bob, "outside@example.net"],
            "cc": [carol],
            "subject": "Offsite",
            "body": "Friday?",
        }))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(sink.wait_for(1, Duration::from_secs(30)).await);
    let mut by_path = std::collections::HashMap::<String, Vec<Value>>::new();
    for _ in 0..3 {
        let r = receiver.next().await;
        by_path.entry(r.path.clone()).or_default().push(r.json());
    }
    assert!(
        receiver
            .next_within(Duration::from_millis(800))
            .await
            .is_none(),
        "nothing more: {by_path:?}"
    );
    for agent in [&bob, &carol] {
        let got = &by_path[&format!("/{agent}")];
        assert_eq!(got.len(), 1, "{agent}: one email.received");
        assert_eq!(got[0]["event"], "email.received");
        assert_eq!(got[0]["data"]["subject"], "Offsite");
        assert_eq!(got[0]["data"]["from"], "alice@agents.localhost");
        assert!(
            got[0]["data"]["conversation_id"]
                .as_str()
                .unwrap()
                .starts_with("cnv_")
        );
    }
    let alice = &by_path["/alice@agents.localhost"];
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0]["event"], "email.sent");
    assert_eq!(
        alice[0]["data"]["message_id"]
            .as_str()
            .map(|s| s.starts_with("msg_")),
        Some(true)
    );
    assert_eq!(alice[0]["data"]["provider_message_id"], body["message_id"]);
    let received = sink.received();
    assert_eq!(received.len(), 1, "the outside copy goes out once");
    assert_eq!(
        received[0].rcpt_to,
        ["outside@example.net"],
        "local agents are not in the envelope"
    );
    assert_eq!(
        h.count("SELECT count(*) FROM messages WHERE direction = 'inbound'")
            .await,
        2
    );
    shutdown.cancel();
    deliverer.await.unwrap().unwrap();
}
