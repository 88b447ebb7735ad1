//! The reviewer's notification and its magic links, end to end on a real
//! server, database and SMTP server: the notification is queued with the
//! hold and reaches the owner; only token hashes are stored and the sent
//! mail's payload is emptied; a GET (repeated) changes nothing; a POST
//! decides once, with the API path's event; used, expired, tampered and
//! other-action tokens are refused with their pages.

mod common;

use std::time::Duration;

use common::Running;
use e2a_api::Config;
use e2a_store::{Store, StoreConfig, secret};
use e2a_testkit::{
    TestDb,
    smtp_sink::{Script, SmtpSink},
};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const ALICE: &str = "alice@agents.localhost";

struct Harness {
    db: TestDb,
    api: Running,
    store: Store,
    key: String,
    http: reqwest::Client,
}

impl Harness {
    async fn new(notify: bool) -> Self {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.shared_domain = "agents.localhost".into();
        if notify {
            config.public_url = Some("http://review.localhost:8080/".into());
            config.outbound.outbound_from_domain = "agents.localhost".into();
        } else {
            config.public_url = None;
        }
        let api = Running::start(config).await;
        let key = common::key_for(db.url(), "owner@example.com").await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let h = Self {
            db,
            api,
            store,
            key,
            http,
        };
        let (s, body) = h
            .api
            .call(
                Method::POST,
                "/v1/agents",
                &h.key,
                Some(json!({"slug": "alice"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let (s, body) = h
            .api
            .call(
                Method::PATCH,
                format!("/v1/agents/{ALICE}"),
                &h.key,
                Some(json!({"hitl_enabled": true, "hitl_ttl_seconds": 3600})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        h
    }

    async fn hold(&self, subject: &str) -> String {
        let (s, body) = self
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{ALICE}/messages"),
                &self.key,
                Some(json!({
                    "to": ["bob@example.net"],
                    "subject": subject,
                    "body": "the draft",
                })),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        body["message_id"].as_str().unwrap().to_owned()
    }

    /// The approve and reject tokens in `id`'s queued notification.
    async fn tokens(&self, id: &str) -> (String, String) {
        let body: Vec<u8> = self
            .store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT p.body FROM mail_deliveries d JOIN mail_payloads p USING (payload_id) \
                  WHERE d.idempotency_key = $1",
                &[&format!("hitl_notification:{id}")],
            )
            .await
            .unwrap()
            .get(0);
        let text = e2a_mail::parse(&body).text.unwrap_or_default();
        let token_after = |prefix: &str| {
            let at = text
                .find(prefix)
                .unwrap_or_else(|| panic!("{prefix} in {text}"))
                + prefix.len();
            text[at..at + 8 + 64].to_owned()
        };
        (
            token_after("/api/v1/approve?t="),
            token_after("/api/v1/reject?t="),
        )
    }

    async fn get(&self, action: &str, token: &str) -> (StatusCode, header::HeaderMap, String) {
        let resp = self
            .http
            .get(format!("{}/api/v1/{action}?t={token}", self.api.base))
            .send()
            .await
            .unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.text().await.unwrap())
    }

    async fn post(&self, action: &str, form: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .post(format!("{}/api/v1/{action}", self.api.base))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str, id: &str) -> T {
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
        self.one("SELECT status FROM messages WHERE id = $1", id)
            .await
    }
}

fn assert_page_headers(headers: &header::HeaderMap) {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    assert!(get("content-type").starts_with("text/html"));
    assert!(get("content-security-policy").contains("default-src 'none'"));
    assert_eq!(get("referrer-policy"), "no-referrer");
    assert_eq!(get("x-frame-options"), "DENY");
    assert!(get("cache-control").contains("no-store"));
}

#[tokio::test]
async fn a_hold_notifies_the_owner_and_its_links_decide_once() {
    let h = Harness::new(true).await;
    let id = h.hold("Pricing <draft>").await;
    let (approve, reject) = h.tokens(&id).await;
    assert!(approve.starts_with("e2a_apv_") && reject.starts_with("e2a_apv_"));
    assert_ne!(approve, reject);

    // The notification is queued for the owner, from hitl-noreply@.
    let (to, mail_from): (String, String) = {
        let c = h.store.client().await.unwrap();
        let r = c
            .query_one(
                "SELECT r.address, d.mail_from FROM mail_deliveries d \
                   JOIN mail_recipients r USING (delivery_id) \
                  WHERE d.idempotency_key = $1 AND d.template_id = 'hitl_notification'",
                &[&format!("hitl_notification:{id}")],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(to, "owner@example.com");
    assert_eq!(mail_from, "hitl-noreply@agents.localhost");

    // Only hashes are stored, bound to the message and one action each.
    for (token, action) in [(&approve, "approve"), (&reject, "reject")] {
        let c = h.store.client().await.unwrap();
        let rows = c
            .query(
                "SELECT action, message_id FROM approval_tokens WHERE token_hash = $1",
                &[&secret::sha256_hex(token.as_bytes())],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, String>(0), action);
        assert_eq!(rows[0].get::<_, String>(1), id);
        let plain: i64 = c
            .query_one(
                "SELECT count(*) FROM approval_tokens WHERE token_hash = $1 \
                    OR position($1 IN token_hash) > 0",
                &[token],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(plain, 0, "the plaintext is not stored");
    }

    // GET, repeated, shows the page and changes nothing.
    for _ in 0..3 {
        let (s, headers, page) = h.get("approve", &approve).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert_page_headers(&headers);
        assert!(page.contains("method=\"post\""));
        assert!(page.contains("Pricing &lt;draft&gt;"), "escaped: {page}");
        assert!(!page.contains("the draft"), "never the body");
    }
    assert_eq!(h.status(&id).await, "pending_approval");
    let unused: i64 = h
        .one(
            "SELECT count(*) FROM approval_tokens WHERE message_id = $1 AND used_at IS NULL",
            &id,
        )
        .await;
    assert_eq!(unused, 2);

    // The other action's token, and a tampered one, are refused.
    let (s, _) = h.post("approve", &format!("t={reject}")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = h.get("reject", &approve).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let mut tampered = approve.clone();
    tampered.replace_range(20..21, if &approve[20..21] == "a" { "b" } else { "a" });
    let (s, _) = h.post("approve", &format!("t={tampered}")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = h.get("approve", "e2a_apv_nonsense").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h.status(&id).await, "pending_approval");

    // POST decides, once, recording the owner and emitting the event.
    let (s, page) = h.post("approve", &format!("t={approve}")).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(h.status(&id).await, "approved");
    let envelope: Value = h
        .one(
            "SELECT envelope FROM webhook_events WHERE message_id = $1 AND type = 'email.approved'",
            &id,
        )
        .await;
    assert_eq!(envelope["data"]["decided_via"], "magic_link");
    let owner: String = h
        .one("SELECT user_id FROM messages WHERE id = $1", &id)
        .await;
    assert_eq!(envelope["data"]["reviewed_by_user_id"], owner.as_str());
    let deliveries: i64 = h
        .one(
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            &id,
        )
        .await;
    assert_eq!(deliveries, 1);

    // Used: both links now say so (deciding revoked the other one).
    let (s, _) = h.post("approve", &format!("t={approve}")).await;
    assert_eq!(s, StatusCode::GONE);
    let (s, headers, _) = h.get("approve", &approve).await;
    assert_eq!(s, StatusCode::GONE);
    assert_page_headers(&headers);
    let (s, _) = h.post("reject", &format!("t={reject}")).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(h.status(&id).await, "approved");
}

#[tokio::test]
async fn the_reject_link_records_its_reason_and_expired_links_are_gone() {
    let h = Harness::new(true).await;
    let id = h.hold("one").await;
    let (_, reject) = h.tokens(&id).await;
    let (s, page) = h
        .post("reject", &format!("t={reject}&reason=wrong+tone%21"))
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(h.status(&id).await, "rejected");
    let reason: String = h
        .one("SELECT rejection_reason FROM messages WHERE id = $1", &id)
        .await;
    assert_eq!(reason, "wrong tone!");
    let events: i64 = h
        .one(
            "SELECT count(*) FROM webhook_events WHERE message_id = $1 AND type = 'email.rejected' \
               AND envelope->'data'->>'decided_via' = 'magic_link'",
            &id,
        )
        .await;
    assert_eq!(events, 1);

    let other = h.hold("two").await;
    let (approve, _) = h.tokens(&other).await;
    h.store
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE approval_tokens SET expires_at = now() - interval '1 second' WHERE message_id = $1",
            &[&other],
        )
        .await
        .unwrap();
    let (s, _, _) = h.get("approve", &approve).await;
    assert_eq!(s, StatusCode::GONE);
    let (s, _) = h.post("approve", &format!("t={approve}")).await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(h.status(&other).await, "pending_approval");
    // A POST that is not a form changes nothing either.
    let resp = h
        .http
        .post(format!("{}/api/v1/approve", h.api.base))
        .json(&json!({"t": approve}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_notification_reaches_the_owner_and_its_tokens_leave_the_database() {
    let h = Harness::new(true).await;
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
    let id = h.hold("Invoice").await;
    let (approve, _) = h.tokens(&id).await;
    assert!(sink.wait_for(1, Duration::from_secs(30)).await, "notified");
    let m = &sink.received()[0];
    assert_eq!(m.rcpt_to, ["owner@example.com"]);
    let parsed = e2a_mail::parse(&m.data);
    assert_eq!(
        parsed.subject,
        "[e2a] approve outbound from alice@agents.localhost: Invoice"
    );
    let text = parsed.text.unwrap_or_default();
    assert!(text.contains(&format!(
        "http://review.localhost:8080/api/v1/approve?t={approve}"
    )));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, bytes): (String, i32) = {
            let c = h.store.client().await.unwrap();
            let r = c
                .query_one(
                    "SELECT d.status, octet_length(p.body) FROM mail_deliveries d \
                       JOIN mail_payloads p USING (payload_id) WHERE d.idempotency_key = $1",
                    &[&format!("hitl_notification:{id}")],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        if status == "sent" {
            assert_eq!(bytes, 0, "the sent notification's payload is emptied");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recorded sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The link still works: only the stored copy of the mail is gone.
    let (s, _, _) = h.get("approve", &approve).await;
    assert_eq!(s, StatusCode::OK);
    shutdown.cancel();
    deliverer.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_a_public_url_no_notification_is_queued() {
    let h = Harness::new(false).await;
    let id = h.hold("quiet").await;
    let n: i64 = h
        .one(
            "SELECT count(*) FROM mail_deliveries WHERE idempotency_key = 'hitl_notification:' || $1",
            &id,
        )
        .await;
    assert_eq!(n, 0);
    let tokens: i64 = h
        .one(
            "SELECT count(*) FROM approval_tokens WHERE message_id = $1",
            &id,
        )
        .await;
    assert_eq!(tokens, 0);
}
