//! The reviewer's views on a real server and database (issue 11):
//! `GET /api/v1/pending` (the caller's held drafts across their agents,
//! first to expire first, capped at 100, `status` other than
//! `pending_approval` refused, poll-limited) and `GET /api/v1/messages/{id}`
//! (an outbound message in detail: its parent's `inbound` block for a
//! held reply, bodies while held, review fields after a decision; another
//! tenant's message, an inbound one and a missing one all the same 404).

mod common;

use base64::{Engine, engine::general_purpose::STANDARD};
use common::Running;
use e2a_api::Config;
use e2a_store::{Store, StoreConfig};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PARENT: &str = "msg_00000000000000000000000000000001";

struct Harness {
    _db: TestDb,
    api: Running,
    store: Store,
    key: String,
    other_key: String,
}

impl Harness {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.shared_domain = "agents.localhost".into();
        let api = Running::start(config).await;
        let key = common::key_for(db.url(), "owner@example.com").await;
        let other_key = common::key_for(db.url(), "other@example.com").await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        Self {
            _db: db,
            api,
            store,
            key,
            other_key,
        }
    }

    /// Creates `slug@agents.localhost` for `key`'s owner, holding its mail
    /// for `ttl` seconds when given.
    async fn agent(&self, key: &str, slug: &str, ttl: Option<i64>) -> String {
        let (s, body) = self
            .api
            .call(
                Method::POST,
                "/v1/agents",
                key,
                Some(json!({ "slug": slug })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let address = body["email"].as_str().unwrap().to_owned();
        if let Some(ttl) = ttl {
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
            assert_eq!(body["hitl_enabled"], true);
            assert_eq!(body["hitl_ttl_seconds"], ttl);
            assert_eq!(body["hitl_expiration_action"], "reject");
        }
        address
    }

    /// Sends `body` from `agent` with `key`; returns the answer's status
    /// and `message_id`.
    async fn send(&self, key: &str, agent: &str, body: Value) -> (StatusCode, String) {
        let (s, answer) = self
            .api
            .call(
                Method::POST,
                format!("/v1/agents/{agent}/messages"),
                key,
                Some(body),
            )
            .await;
        assert!(s.is_success(), "{answer}");
        (s, answer["message_id"].as_str().unwrap().to_owned())
    }

    async fn pending(&self, key: &str) -> Vec<Value> {
        let (s, body) = self
            .api
            .call(Method::GET, "/api/v1/pending", key, None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["messages"].as_array().unwrap().clone()
    }

    async fn detail(&self, key: &str, id: &str) -> (StatusCode, Value) {
        self.api
            .call(Method::GET, format!("/api/v1/messages/{id}"), key, None)
            .await
    }

    async fn sql(&self, sql: &str) {
        self.store
            .client()
            .await
            .unwrap()
            .execute(sql, &[])
            .await
            .unwrap();
    }

    async fn owner_id(&self) -> String {
        self.store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT id FROM users WHERE email = 'owner@example.com'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }
}

fn ids(list: &[Value]) -> Vec<&str> {
    list.iter().map(|m| m["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn the_pending_list_spans_the_callers_agents_first_to_expire_first() {
    let h = Harness::new().await;
    let alice = h.agent(&h.key, "alice", Some(3600)).await;
    let carol = h.agent(&h.key, "carol", Some(600)).await;
    let dave = h.agent(&h.key, "dave", None).await;
    let mallory = h.agent(&h.other_key, "mallory", Some(60)).await;

    let attachment = json!({
        "filename": "notes.txt",
        "content_type": "text/plain",
        "data": STANDARD.encode("hello"),
    });
    let (s, first) = h
        .send(
            &h.key,
            &alice,
            json!({"to": ["bob@example.net"], "cc": ["cc@example.net"], "bcc": ["bcc@example.net"],
                   "subject": "Numbers", "body": "Here they are.", "html_body": "<p>Here</p>",
                   "attachments": [attachment]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, second) = h
        .send(
            &h.key,
            &alice,
            json!({"to": ["bob@example.net"], "subject": "Again", "body": "More."}),
        )
        .await;
    let (_, soonest) = h
        .send(
            &h.key,
            &carol,
            json!({"to": ["bob@example.net"], "subject": "Soon", "body": "Quick."}),
        )
        .await;
    // Neither a direct send nor another tenant's draft is listed.
    let (s, _) = h
        .send(
            &h.key,
            &dave,
            json!({"to": ["bob@example.net"], "subject": "Direct", "body": "Sent."}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    h.send(
        &h.other_key,
        &mallory,
        json!({"to": ["bob@example.net"], "subject": "Not yours", "body": "x"}),
    )
    .await;

    let list = h.pending(&h.key).await;
    assert_eq!(
        ids(&list),
        [soonest.as_str(), first.as_str(), second.as_str()]
    );
    let m = &list[1];
    assert_eq!(m["agent_id"], alice);
    assert_eq!(m["status"], "pending_approval");
    assert_eq!(m["type"], "send");
    assert_eq!(m["subject"], "Numbers");
    assert_eq!(m["to_recipients"], json!(["bob@example.net"]));
    assert_eq!(m["cc"], json!(["cc@example.net"]));
    assert_eq!(m["bcc"], json!(["bcc@example.net"]));
    assert!(m["conversation_id"].as_str().unwrap().starts_with("cnv_"));
    assert_eq!(m["body_text"], "Here they are.");
    assert_eq!(m["body_html"], "<p>Here</p>");
    assert_eq!(
        m["attachments"],
        json!([{"filename": "notes.txt", "content_type": "text/plain", "size_bytes": 5}]),
        "names, types and decoded sizes, never the data"
    );
    let created = m["created_at"].as_str().unwrap();
    let expires = m["approval_expires_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && expires.ends_with('Z') && created < expires);
    assert_eq!(list[0]["attachments"], json!([]));

    let theirs = h.pending(&h.other_key).await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["agent_id"], mallory);

    // `status` may only name the one status the list serves.
    let (s, body) = h
        .api
        .call(
            Method::GET,
            "/api/v1/pending?status=pending_approval",
            &h.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    for bad in ["status=sent", "status=rejected", "status=all"] {
        let (s, body) = h
            .api
            .call(Method::GET, format!("/api/v1/pending?{bad}"), &h.key, None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(common::code(&body), "invalid_request", "{bad}");
    }

    // A poll like the others: authenticated and counted.
    let resp = h.api.get("/api/v1/pending", None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = h
        .api
        .request(Method::GET, "/api/v1/pending", &h.key)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("ratelimit-limit"));
    h.api.stop().await;
}

#[tokio::test]
async fn the_pending_list_stops_at_100_and_breaks_ties_by_id() {
    let h = Harness::new().await;
    h.agent(&h.key, "alice", Some(3600)).await;
    // 105 drafts; pairs share an expiry so the id decides within each.
    // Inserted in descending id order so insertion order proves nothing.
    h.sql(
        "INSERT INTO messages (id, user_id, agent_id, direction, status, subject, message_type, \
           conversation_id, to_recipients, cc, bcc, approval_expires_at, body_text) \
         SELECT 'msg_' || lpad(to_hex(n), 32, '0'), a.user_id, a.id, 'outbound', 'pending_approval', \
                'draft ' || n, 'send', 'cnv_x', ARRAY['bob@example.net'], '{}', '{}', \
                now() + make_interval(mins => (n + 1) / 2), 'body' \
           FROM agents a, generate_series(105, 1, -1) AS n WHERE a.id = 'alice@agents.localhost'",
    )
    .await;
    let list = h.pending(&h.key).await;
    assert_eq!(list.len(), 100, "at most 100");
    let expected: Vec<String> = (1..=100).map(|n| format!("msg_{n:032x}")).collect();
    assert_eq!(ids(&list), expected, "expiry ascending, then id ascending");
    h.api.stop().await;
}

#[tokio::test]
async fn the_detail_of_a_held_reply_shows_its_parent_then_the_decision_without_bodies() {
    let h = Harness::new().await;
    let alice = h.agent(&h.key, "alice", Some(3600)).await;
    h.agent(&h.other_key, "mallory", None).await;
    h.sql("UPDATE users SET name = 'Olivia Owner' WHERE email = 'owner@example.com'")
        .await;
    // An inbound message for Alice, as the relay would store it.
    h.sql(&format!(
        "INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, \
           email_message_id, raw_message, body_sha256, conversation_id, inbox_status, \
           to_recipients, auth_headers) \
         SELECT '{PARENT}', user_id, id, 'inbound', 'bob@example.net', id, 'Plans', \
                'p1@example.net', convert_to('From: bob@example.net\r\nSubject: Plans\r\n\
                  Message-ID: <p1@example.net>\r\n\r\nLet''s meet.\r\n', 'UTF8'), repeat('a', 64), \
                'cnv_parent', 'unread', ARRAY['{alice}'], \
                '{{\"X-E2A-Auth-Verified\": \"true\"}}'::jsonb \
           FROM agents WHERE id = '{alice}'"
    ))
    .await;
    let attachment = json!({
        "filename": "plan.pdf",
        "content_type": "application/pdf",
        "data": STANDARD.encode(b"%PDF-1.4"),
    });
    let (s, answer) = h
        .api
        .call(
            Method::POST,
            format!("/v1/agents/{alice}/messages/{PARENT}/reply"),
            &h.key,
            Some(json!({"body": "Tuesday?", "attachments": [attachment.clone()]})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{answer}");
    let id = answer["message_id"].as_str().unwrap().to_owned();

    let (s, m) = h.detail(&h.key, &id).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["agent_id"], alice);
    assert_eq!(m["direction"], "outbound");
    assert_eq!(m["status"], "pending_approval");
    assert_eq!(m["type"], "reply");
    assert_eq!(m["subject"], "Re: Plans");
    assert_eq!(m["recipient"], "bob@example.net");
    assert_eq!(m["to_recipients"], json!(["bob@example.net"]));
    assert_eq!(m["conversation_id"], "cnv_parent");
    assert_eq!(m["email_message_id"], "p1@example.net");
    assert!(m["provider_message_id"].as_str().unwrap().contains('@'));
    assert!(m["approval_expires_at"].is_string());
    assert!(m["expires_at"].is_string());
    assert_eq!(m["edited"], false);
    assert_eq!(m["body_text"], "Tuesday?");
    assert_eq!(m["attachments"], json!([attachment]), "in full while held");
    for absent in [
        "method",
        "reviewed_at",
        "reviewed_by_user_id",
        "rejection_reason",
    ] {
        assert!(m.get(absent).is_none(), "{absent}: {m}");
    }
    assert_eq!(
        m["inbound"],
        json!({
            "sender": "bob@example.net",
            "subject": "Plans",
            "created_at": m["inbound"]["created_at"],
            "auth_headers": {"X-E2A-Auth-Verified": "true"},
        })
    );
    assert!(m["inbound"]["created_at"].as_str().unwrap().ends_with('Z'));

    // Another tenant's message, an inbound message, a missing one and a
    // malformed id are the same 404.
    let missing = "msg_0000000000000000000000000000ffff";
    for (key, target) in [
        (&h.other_key, id.as_str()),
        (&h.key, PARENT),
        (&h.key, missing),
        (&h.key, "not-an-id"),
    ] {
        let (s, body) = h.detail(key, target).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{target}: {body}");
        assert_eq!(common::code(&body), "not_found");
        assert_eq!(body["error"]["message"], "message not found", "{target}");
    }

    // A decision (as the reject transition writes it): the bodies are
    // scrubbed, the review fields show, the parent still does.
    let owner = h.owner_id().await;
    h.sql(&format!(
        "UPDATE messages SET status = 'rejected', rejection_reason = 'not now', \
           reviewed_at = now(), reviewed_by_user_id = '{owner}', body_text = NULL, \
           body_html = NULL, attachments_json = NULL WHERE id = '{id}'"
    ))
    .await;
    let (s, m) = h.detail(&h.key, &id).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["status"], "rejected");
    for scrubbed in ["body_text", "body_html", "attachments"] {
        assert!(m[scrubbed].is_null(), "{scrubbed}: {m}");
    }
    assert_eq!(m["rejection_reason"], "not now");
    assert_eq!(m["reviewed_by_user_id"], owner.as_str());
    assert_eq!(m["reviewed_by_name"], "Olivia Owner");
    assert!(m["reviewed_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(m["inbound"]["subject"], "Plans");
    assert!(h.pending(&h.key).await.is_empty(), "decided: not pending");

    // Once the parent is gone, the block is too.
    h.sql(&format!("DELETE FROM messages WHERE id = '{PARENT}'"))
        .await;
    let (s, m) = h.detail(&h.key, &id).await;
    assert_eq!(s, StatusCode::OK);
    assert!(m.get("inbound").is_none(), "{m}");
    h.api.stop().await;
}
