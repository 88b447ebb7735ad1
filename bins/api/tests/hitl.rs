//! Review of held mail through the API, on a real server and database:
//! approve and reject with every illegal transition refused, another
//! tenant's message indistinguishable from a missing one, approve replayed
//! by its `Idempotency-Key`, a hold past its time, reviewer edits validated
//! like a new send, an approval with edits reaching a real SMTP server
//! DKIM-signed with the original body gone, and an approval to an agent of
//! this gateway delivered by loopback.

mod common;

use std::time::Duration;

use common::Running;
use e2a_api::Config;
use e2a_store::{Store, StoreConfig};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ALICE: &str = "alice@agents.localhost";
const ORIGINAL_BODY: &str = "original draft 7f3a: please wire the money";

struct Harness {
    db: TestDb,
    api: Running,
    store: Store,
    key: String,
}

impl Harness {
    async fn new(ttl_seconds: i64) -> Self {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.shared_domain = "agents.localhost".into();
        let api = Running::start(config).await;
        let key = common::key_for(db.url(), "owner@example.com").await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let h = Self {
            db,
            api,
            store,
            key,
        };
        h.agent(&h.key, "alice", Some(ttl_seconds)).await;
        h
    }

    async fn agent(&self, key: &str, slug: &str, review_ttl: Option<i64>) -> String {
        let (status, body) = self
            .api
            .call(
                Method::POST,
                "/v1/agents",
                key,
                Some(json!({ "slug": slug })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let address = body["email"].as_str().unwrap().to_owned();
        if let Some(ttl) = review_ttl {
            let (s, body) = self
                .api
                .call(
                    Method::PATCH,
                    format!("/v1/agents/{address}"),
                    key,
                    Some(json!({"hitl_enabled": true, "hitl_ttl_seconds": ttl})),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{body}");
        }
        address
    }

    /// Holds a message of Alice to `to`; returns its `msg_` id.
    async fn hold(&self, to: &str) -> String {
        let (s, body) = self
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{ALICE}/messages"),
                &self.key,
                Some(json!({
                    "to": [to],
                    "subject": "Quarterly numbers",
                    "body": ORIGINAL_BODY,
                    "html_body": format!("<p>{ORIGINAL_BODY}</p>"),
                })),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        body["message_id"].as_str().unwrap().to_owned()
    }

    async fn decide(&self, id: &str, action: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api
            .call(
                Method::POST,
                format!("/v1/agents/{ALICE}/messages/{id}/{action}"),
                &self.key,
                Some(body.unwrap_or_else(|| json!({}))),
            )
            .await
    }

    async fn count(&self, sql: &str, id: &str) -> i64 {
        self.store
            .client()
            .await
            .unwrap()
            .query_one(sql, &[&id])
            .await
            .unwrap()
            .get(0)
    }

    async fn status(&self, id: &str) -> String {
        self.store
            .client()
            .await
            .unwrap()
            .query_one("SELECT status FROM messages WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    async fn deliveries(&self, id: &str) -> i64 {
        self.count(
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            id,
        )
        .await
    }

    async fn events(&self, id: &str, event_type: &str) -> i64 {
        self.store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM webhook_events WHERE message_id = $1 AND type = $2",
                &[&id, &event_type],
            )
            .await
            .unwrap()
            .get(0)
    }
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn approve_and_reject_each_decide_once_and_refuse_every_later_decision() {
    let h = Harness::new(3600).await;
    let a = h.hold("bob@example.net").await;
    let b = h.hold("bob@example.net").await;

    let (s, body) = h.decide(&a, "approve", None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["message_id"], a.as_str());
    assert_eq!(body["method"], "smtp");
    assert_eq!(body["edited"], false);
    assert!(
        body["provider_message_id"]
            .as_str()
            .is_some_and(|p| p.starts_with('<') && p.ends_with("@agents.localhost>")),
        "{body}"
    );
    assert_eq!(h.status(&a).await, "approved");
    assert_eq!(h.deliveries(&a).await, 1);
    assert_eq!(h.events(&a, "email.approved").await, 1);
    assert_eq!(
        h.count(
            "SELECT count(*) FROM messages WHERE id = $1 AND body_text IS NULL \
               AND body_html IS NULL AND reviewed_at IS NOT NULL AND decided_via = 'api'",
            &a
        )
        .await,
        1
    );

    // Approve twice, reject after approve.
    for action in ["approve", "reject"] {
        let (s, body) = h.decide(&a, action, None).await;
        assert_error(s, &body, StatusCode::CONFLICT, "message_not_pending");
        assert_eq!(body["error"]["details"]["status"], "approved");
    }

    let (s, body) = h
        .decide(&b, "reject", Some(json!({"reason": "tone is off"})))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"status": "rejected", "message_id": b, "rejection_reason": "tone is off"})
    );
    assert_eq!(h.events(&b, "email.rejected").await, 1);
    // Approve after reject, reject twice.
    for action in ["approve", "reject"] {
        let (s, body) = h.decide(&b, action, None).await;
        assert_error(s, &body, StatusCode::CONFLICT, "message_not_pending");
    }
    assert_eq!(h.deliveries(&b).await, 0);
    assert_eq!(h.events(&a, "email.approved").await, 1);
    assert_eq!(h.events(&b, "email.rejected").await, 1);

    // The events carry who decided and how.
    let envelope: Value = h
        .store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT envelope FROM webhook_events WHERE message_id = $1 AND type = 'email.rejected'",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(envelope["data"]["rejection_reason"], "tone is off");
    assert_eq!(envelope["data"]["decided_via"], "api");
    assert!(envelope["data"]["reviewed_by_user_id"].is_string());

    // A reason too long or with control characters is refused.
    let c = h.hold("bob@example.net").await;
    let (s, body) = h
        .decide(&c, "reject", Some(json!({"reason": "x".repeat(501)})))
        .await;
    assert_error(s, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (s, body) = h
        .decide(&c, "reject", Some(json!({"reason": "a\u{0}b"})))
        .await;
    assert_error(s, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(h.status(&c).await, "pending_approval");
}

#[tokio::test]
async fn another_tenant_gets_404_and_the_message_stays_pending() {
    let h = Harness::new(3600).await;
    let id = h.hold("bob@example.net").await;
    let mallory = common::key_for(h.db.url(), "mallory@example.com").await;
    let mallet = h.agent(&mallory, "mallet", Some(3600)).await;
    for action in ["approve", "reject"] {
        // Through Alice's address: not Mallory's agent.
        let (s, body) = h
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{ALICE}/messages/{id}/{action}"),
                &mallory,
                Some(json!({})),
            )
            .await;
        assert_error(s, &body, StatusCode::NOT_FOUND, "not_found");
        // Through her own agent: not its message.
        let (s, body) = h
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{mallet}/messages/{id}/{action}"),
                &mallory,
                Some(json!({})),
            )
            .await;
        assert_error(s, &body, StatusCode::NOT_FOUND, "not_found");
        // A missing id answers the same.
        let (s2, body2) = h
            .api
            .call(
                Method::POST,
                format!(
                    "/v1/agents/{mallet}/messages/msg_0123456789abcdef0123456789abcdef/{action}"
                ),
                &mallory,
                Some(json!({})),
            )
            .await;
        assert_eq!(s2, s);
        assert_eq!(body2["error"]["code"], body["error"]["code"]);
        assert_eq!(body2["error"]["message"], body["error"]["message"]);
    }
    assert_eq!(h.status(&id).await, "pending_approval");
    // Another agent of the same owner does not reach it either.
    let other = h.agent(&h.key, "other", None).await;
    let (s, body) = h
        .api
        .call(
            Method::POST,
            format!("/v1/agents/{other}/messages/{id}/approve"),
            &h.key,
            Some(json!({})),
        )
        .await;
    assert_error(s, &body, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(h.status(&id).await, "pending_approval");
}

#[tokio::test]
async fn an_approve_replayed_with_its_key_answers_the_same_and_sends_once() {
    let h = Harness::new(3600).await;
    let id = h.hold("bob@example.net").await;
    let approve = |key: &'static str, body: Value| {
        let h = &h;
        let id = id.clone();
        async move {
            let resp = h
                .api
                .request(
                    Method::POST,
                    &format!("/v1/agents/{ALICE}/messages/{id}/approve"),
                    &h.key,
                )
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let replayed = resp.headers().contains_key("idempotent-replayed");
            (status, resp.json::<Value>().await.unwrap(), replayed)
        }
    };
    let edits = json!({"subject": "Quarterly numbers (final)"});
    let (s1, b1, r1) = approve("approve-1", edits.clone()).await;
    assert_eq!(s1, StatusCode::OK, "{b1}");
    assert!(!r1);
    assert_eq!(b1["edited"], true);
    let (s2, b2, r2) = approve("approve-1", edits.clone()).await;
    assert_eq!((s2, &b2, r2), (StatusCode::OK, &b1, true));
    // The same key for a different approval is refused.
    let (s3, b3, _) = approve("approve-1", json!({"subject": "other"})).await;
    assert_error(
        s3,
        &b3,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reuse",
    );
    // A new key finds the message decided.
    let (s4, b4, _) = approve("approve-2", edits).await;
    assert_error(s4, &b4, StatusCode::CONFLICT, "message_not_pending");
    assert_eq!(h.deliveries(&id).await, 1);
    assert_eq!(h.events(&id, "email.approved").await, 1);
}

#[tokio::test]
async fn a_hold_past_its_time_can_no_longer_be_decided_by_a_human() {
    let h = Harness::new(1).await;
    let id = h.hold("bob@example.net").await;
    // A 1 s hold ends within 2 s (its expiry is rounded up to a second).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for action in ["approve", "reject"] {
        let (s, body) = h.decide(&id, action, None).await;
        assert_error(s, &body, StatusCode::CONFLICT, "message_not_pending");
        assert_eq!(body["error"]["details"]["status"], "expired");
    }
    assert_eq!(h.status(&id).await, "pending_approval");
    assert_eq!(h.deliveries(&id).await, 0);
}

#[tokio::test]
async fn reviewer_edits_are_validated_like_a_new_send_before_anything_is_stored() {
    let h = Harness::new(3600).await;
    let id = h.hold("bob@example.net").await;
    let cases = [
        (
            json!({"to": ["not an address"]}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
        (
            json!({"cc": ["bob@example.net\r\nBcc: x@evil.example"]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"to": [], "cc": []}),
            StatusCode::BAD_REQUEST,
            "invalid_recipient",
        ),
        (
            json!({"subject": "Hi\r\nBcc: x@evil.example"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"subject": "   "}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"body_text": "", "body_html": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"attachments": [{"filename": "a.txt", "content_type": "text/plain", "data": "%%%"}]}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"bogus": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (edits, want, code) in cases {
        let (s, body) = h.decide(&id, "approve", Some(edits.clone())).await;
        assert_error(s, &body, want, code);
    }
    // An edited body past the 25 MiB send limit.
    let resp = h
        .api
        .request(
            Method::POST,
            &format!("/v1/agents/{ALICE}/messages/{id}/approve"),
            &h.key,
        )
        .header("content-type", "application/json")
        .body(format!("{{\"body_text\": \"{}\"}}", "a".repeat(26 << 20)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert_eq!(h.status(&id).await, "pending_approval");
    assert_eq!(h.deliveries(&id).await, 0);
    assert_eq!(h.events(&id, "email.approved").await, 0);

    // The same values again are no edit (flaw 22), even for attachments.
    let held_attachment =
        json!([{"filename": "a.txt", "content_type": "text/plain", "data": "aGk="}]);
    let id2 = {
        let (s, body) = h
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{ALICE}/messages"),
                &h.key,
                Some(json!({
                    "to": ["bob@example.net"],
                    "subject": "With file",
                    "body": "see attached",
                    "attachments": held_attachment,
                })),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        body["message_id"].as_str().unwrap().to_owned()
    };
    let (s, body) = h
        .decide(
            &id2,
            "approve",
            Some(json!({"subject": "With file", "attachments": held_attachment, "to": ["BOB@example.net"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["edited"], false, "{body}");
}

#[tokio::test]
async fn an_approval_with_edits_reaches_a_real_smtp_server_signed_and_the_draft_is_gone() {
    use e2a_testkit::smtp_sink::{Script, SmtpSink};

    let h = Harness::new(3600).await;
    let id = h.hold("bob@example.net").await;
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
        .decide(
            &id,
            "approve",
            Some(json!({
                "subject": "Quarterly numbers (reviewed)",
                "body_text": "Reviewed wording: numbers attached next week.",
                "body_html": "",
                "to": ["carol@example.net"],
                "cc": ["dave@example.net"],
            })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["edited"], true);
    assert!(sink.wait_for(1, Duration::from_secs(30)).await, "delivered");
    let received = sink.received();
    assert_eq!(received.len(), 1);
    let m = &received[0];
    assert_eq!(m.rcpt_to, ["carol@example.net", "dave@example.net"]);
    let text = String::from_utf8_lossy(&m.data).into_owned();
    assert!(
        text.contains("Subject: Quarterly numbers (reviewed)"),
        "{text}"
    );
    assert!(text.contains("Reviewed wording"), "{text}");
    assert!(!text.contains("7f3a"), "the original body is not sent");
    assert!(
        !text.contains("bob@example.net"),
        "the original recipient is not addressed"
    );
    let txt: String = h
        .store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT 'v=DKIM1; k=rsa; p=' || dkim_public_key FROM domains WHERE owned_domain = 'agents.localhost'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let verified = e2a_testkit::dkim::verify(&m.data, &txt).expect("DKIM verifies");
    assert_eq!(verified.domain, "agents.localhost");
    assert_eq!(
        m.message_id().as_deref(),
        body["provider_message_id"].as_str(),
        "the Message-ID minted at the hold"
    );

    // Recorded sent, and the original draft is nowhere in the database.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.status(&id).await != "sent" {
        assert!(tokio::time::Instant::now() < deadline, "recorded sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = h.store.client().await.unwrap();
    let leftovers: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM messages \
                      WHERE body_text LIKE '%7f3a%' OR body_html LIKE '%7f3a%' \
                         OR position('7f3a'::bytea IN COALESCE(raw_message, ''::bytea)) > 0) \
                  + (SELECT count(*) FROM mail_payloads WHERE position('7f3a'::bytea IN body) > 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "the original body is gone");
    let (subject, to): (String, Vec<String>) = {
        let r = c
            .query_one(
                "SELECT subject, to_recipients FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(subject, "Quarterly numbers (reviewed)");
    assert_eq!(to, ["carol@example.net"]);
    shutdown.cancel();
    deliverer.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_approval_to_an_agent_of_this_gateway_is_delivered_by_loopback() {
    let h = Harness::new(3600).await;
    let bob = h.agent(&h.key, "bob", None).await;
    let id = h.hold(&bob).await;
    let (s, body) = h.decide(&id, "approve", None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "sent");
    assert_eq!(body["method"], "loopback");
    assert_eq!(h.deliveries(&id).await, 0);
    assert_eq!(h.events(&id, "email.approved").await, 1);
    assert_eq!(h.events(&id, "email.sent").await, 1);
    let copies: i64 = h
        .store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM messages WHERE direction = 'inbound' AND agent_id = $1 \
               AND subject = 'Quarterly numbers' AND position($2::bytea IN raw_message) > 0",
            &[&bob, &ORIGINAL_BODY.as_bytes()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 1, "Bob has his copy");
}
