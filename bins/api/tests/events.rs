//! The events API and a webhook's deliveries on a real server and a real
//! database (contract operations listEvents, getEvent, redeliverEvent,
//! testWebhook, listWebhookDeliveries): the contract's shapes, cursor
//! paging, 404 across tenants, 410 past retention, redelivery deduplicated
//! (and its 409s), test sends queued for the deliverer, and every bad input
//! a 4xx with the contract's error body — never a 5xx.

mod common;

use common::{Running, code, key_for};
use e2a_api::Config;
use e2a_store::{Store, StoreConfig, events, ids::UserId};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn config(db: &TestDb) -> Config {
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    config
}

/// The keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort_unstable();
    k
}

fn is_rfc3339_seconds(v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

async fn user_id(store: &Store, email: &str) -> UserId {
    store
        .client()
        .await
        .unwrap()
        .query_one("SELECT id FROM users WHERE email = $1", &[&email])
        .await
        .unwrap()
        .get(0)
}

/// Event `n` of `user` (`evt_` + n in hex), created `n` seconds ago.
async fn event(
    store: &Store,
    user: &UserId,
    n: u32,
    event_type: &str,
    agent: Option<&str>,
) -> String {
    let id = format!("evt_{n:032x}");
    let envelope = json!({"event": event_type, "id": id, "created_at": "x", "data": {"n": n}});
    store
        .client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, \
               created_at) \
             VALUES ($1, $2, $3, $4, $5, 'cnv_1', now() - make_interval(secs => $6))",
            &[&id, user, &event_type, &envelope, &agent, &f64::from(n)],
        )
        .await
        .unwrap();
    id
}

async fn webhook(api: &Running, key: &str, url: &str) -> String {
    let (s, created) = api
        .call(
            Method::POST,
            "/v1/webhooks",
            key,
            Some(json!({"url": url, "events": ["email.received"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn events_are_listed_fetched_and_redelivered_with_the_contract_shapes() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let alice_id = user_id(&store, "alice@example.com").await;
    let api = Running::start(config(&db)).await;
    let e1 = event(
        &store,
        &alice_id,
        1,
        "email.received",
        Some("a@agents.localhost"),
    )
    .await;
    let e2 = event(&store, &alice_id, 2, "email.sent", None).await;
    let e3 = event(
        &store,
        &alice_id,
        3,
        "email.received",
        Some("b@agents.localhost"),
    )
    .await;

    // The list: newest first, the contract's EventJSON, not poll-limited.
    let resp = api
        .request(Method::GET, "/v1/events", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("ratelimit-limit").is_none());
    let page: Value = resp.json().await.unwrap();
    assert_eq!(keys(&page), ["items", "next_cursor"]);
    assert_eq!(page["next_cursor"], Value::Null);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [e1.as_str(), e2.as_str(), e3.as_str()]);
    let first = &page["items"][0];
    assert_eq!(
        keys(first),
        [
            "agent_id",
            "conversation_id",
            "created_at",
            "data",
            "id",
            "schema_version",
            "status",
            "type"
        ]
    );
    assert_eq!(first["type"], "email.received");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["schema_version"], 1);
    assert_eq!(first["data"], json!({"n": 1}));
    assert!(is_rfc3339_seconds(&first["created_at"]), "{first}");
    assert!(
        page["items"][1].get("agent_id").is_none(),
        "absent routing keys are left out"
    );

    // Pages of one, by cursor; filters.
    let (s, p1) = api
        .call(Method::GET, "/v1/events?limit=1", &alice, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    let (_, p2) = api
        .call(
            Method::GET,
            format!("/v1/events?limit=1&cursor={cursor}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(p2["items"][0]["id"], e2.as_str());
    let (_, sent) = api
        .call(Method::GET, "/v1/events?type=email.sent", &alice, None)
        .await;
    assert_eq!(sent["items"].as_array().unwrap().len(), 1);
    assert_eq!(sent["items"][0]["id"], e2.as_str());
    let (_, by_agent) = api
        .call(
            Method::GET,
            "/v1/events?agent_id=B@Agents.LocalHost&conversation_id=cnv_1",
            &alice,
            None,
        )
        .await;
    assert_eq!(by_agent["items"][0]["id"], e3.as_str());
    assert_eq!(by_agent["items"].as_array().unwrap().len(), 1);
    // Bob sees none of it.
    let (s, bobs) = api.call(Method::GET, "/v1/events", &bob, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bobs, json!({"items": [], "next_cursor": null}));

    // One event: delivery_status; 404 for bob and for garbage.
    let (s, got) = api
        .call(Method::GET, format!("/v1/events/{e1}"), &alice, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(
        got["delivery_status"],
        json!({"matched_webhooks": 0, "delivered": 0, "pending": 0, "failed": 0})
    );
    for (key, path) in [
        (&bob, format!("/v1/events/{e1}")),
        (&alice, "/v1/events/evt_nope".into()),
        (&alice, "/v1/events/%FF".into()),
        (&alice, format!("/v1/events/{}", "e".repeat(5000))),
    ] {
        let (s, body) = api.call(Method::GET, &path, key, None).await;
        assert_eq!(
            (s, code(&body)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }

    // Redelivery: the fan-out matched w1 and w2 (set here by hand).
    let w1 = webhook(&api, &alice, "https://one.example/h").await;
    let w2 = webhook(&api, &alice, "https://two.example/h").await;
    let unmatched = webhook(&api, &alice, "https://three.example/h").await;
    let bobs_hook = webhook(&api, &bob, "https://bob.example/h").await;
    store
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE webhook_events SET status = 'processed', processed_at = now(), \
               matched_webhook_ids = ARRAY[$2, $3] WHERE id = $1",
            &[&e1, &w1, &w2],
        )
        .await
        .unwrap();
    let redeliver = format!("/v1/events/{e1}/redeliver");
    let (s, one) = api
        .call(
            Method::POST,
            &redeliver,
            &alice,
            Some(json!({"webhook_id": w1})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{one}");
    assert_eq!(
        keys(&one),
        ["delivery_id", "event_id", "status", "webhook_id"]
    );
    assert_eq!(one["status"], "pending");
    assert_eq!(one["event_id"], e1.as_str());
    assert_eq!(one["webhook_id"], w1.as_str());
    assert!(one["delivery_id"].as_str().unwrap().starts_with("whd_"));
    // A repeat: the same answer, nothing new queued.
    let (s, again) = api
        .call(
            Method::POST,
            &redeliver,
            &alice,
            Some(json!({"webhook_id": w1})),
        )
        .await;
    assert_eq!((s, &again), (StatusCode::OK, &one));
    // All matched webhooks; with an empty body or `{}` alike.
    let resp = api
        .request(Method::POST, &redeliver, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let all: Value = resp.json().await.unwrap();
    assert_eq!(keys(&all), ["deliveries", "event_id", "status"]);
    assert_eq!(all["status"], "scheduled");
    let items = all["deliveries"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for (item, w) in items.iter().zip([&w1, &w2]) {
        assert_eq!(keys(item), ["delivery_id", "status", "webhook_id"]);
        assert_eq!(item["webhook_id"], w.as_str());
        assert_eq!(item["status"], "pending");
    }
    let (s, same) = api
        .call(Method::POST, &redeliver, &alice, Some(json!({})))
        .await;
    assert_eq!((s, &same), (StatusCode::OK, &all));
    let (_, got) = api
        .call(Method::GET, format!("/v1/events/{e1}"), &alice, None)
        .await;
    assert_eq!(
        got["delivery_status"],
        json!({"matched_webhooks": 2, "delivered": 0, "pending": 3, "failed": 0})
    );

    // Refusals.
    let (s, body) = api
        .call(
            Method::POST,
            &redeliver,
            &alice,
            Some(json!({"webhook_id": unmatched})),
        )
        .await;
    assert_eq!(
        (s, code(&body)),
        (StatusCode::CONFLICT, "conflict"),
        "{body}"
    );
    api.call(
        Method::PATCH,
        format!("/v1/webhooks/{w2}"),
        &alice,
        Some(json!({"enabled": false})),
    )
    .await;
    let (s, body) = api
        .call(
            Method::POST,
            &redeliver,
            &alice,
            Some(json!({"webhook_id": w2})),
        )
        .await;
    assert_eq!(
        (s, code(&body)),
        (StatusCode::CONFLICT, "webhook_disabled"),
        "{body}"
    );
    for (key, path, body, want) in [
        (
            &alice,
            redeliver.clone(),
            json!({"webhook_id": bobs_hook}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &bob,
            redeliver.clone(),
            json!({}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            format!("/v1/events/{e2}/redeliver"),
            json!({}),
            (StatusCode::CONFLICT, "conflict"),
        ),
        (
            &alice,
            "/v1/events/evt_x/redeliver".into(),
            json!({}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            redeliver.clone(),
            json!({"webhook_id": "nope"}),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ),
        (
            &alice,
            redeliver.clone(),
            json!({"webhook_id": 7}),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ),
        (
            &alice,
            redeliver.clone(),
            json!({"extra": true}),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ),
    ] {
        let (s, got) = api.call(Method::POST, &path, key, Some(body.clone())).await;
        assert_eq!((s, code(&got)), want, "{path} {body}: {got}");
    }

    // Past its retention: 410 gone for reads and redeliveries, not listed.
    store
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE webhook_events SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&e1],
        )
        .await
        .unwrap();
    let (s, body) = api
        .call(Method::GET, format!("/v1/events/{e1}"), &alice, None)
        .await;
    assert_eq!((s, code(&body)), (StatusCode::GONE, "gone"));
    let (s, body) = api.call(Method::POST, &redeliver, &alice, None).await;
    assert_eq!((s, code(&body)), (StatusCode::GONE, "gone"));
    let (_, page) = api.call(Method::GET, "/v1/events", &alice, None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    api.stop().await;
}

#[tokio::test]
async fn bad_event_queries_are_400_with_the_contract_body() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let api = Running::start(config(&db)).await;
    let cases = [
        ("type=email.bounced", "invalid_filter"),
        ("agent_id=nobody", "invalid_filter"),
        ("message_id=msg_1", "invalid_filter"),
        ("conversation_id=a%0Ab", "invalid_filter"),
        ("since=yesterday", "invalid_filter"),
        ("until=9999-12-31T23:59:59-01:00", "invalid_filter"),
        (
            "since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "invalid_filter",
        ),
        ("limit=0", "invalid_filter"),
        ("limit=201", "invalid_filter"),
        ("limit=99999999999999999999", "invalid_filter"),
        ("type=email.sent&type=email.sent", "invalid_filter"),
        ("cursor=%%%", "invalid_filter"),
        ("cursor=not-base64!", "invalid_cursor"),
        ("cursor=e30", "invalid_cursor"),
        (
            "cursor=eyJjIjoiOTk5OS0xMi0zMVQyMzo1OTo1OS0wMTowMCIsImkiOiJldnRfMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAifQ",
            "invalid_cursor",
        ),
    ];
    for (query, want) in cases {
        let (s, body) = api
            .call(Method::GET, format!("/v1/events?{query}"), &alice, None)
            .await;
        assert_eq!(
            (s, code(&body)),
            (StatusCode::BAD_REQUEST, want),
            "{query}: {body}"
        );
    }
    // Unknown parameters are ignored.
    let (s, _) = api
        .call(Method::GET, "/v1/events?foo=bar&limit=200", &alice, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // No key: 401.
    let resp = api.get("/v1/events", None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    api.stop().await;
}

#[tokio::test]
async fn test_sends_are_queued_and_listed_in_the_webhooks_delivery_log() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let api = Running::start(config(&db)).await;
    let w = webhook(&api, &alice, "https://one.example/h").await;
    let test = format!("/v1/webhooks/{w}/test");

    // No body: email.received with {"test": true}.
    let resp = api
        .request(Method::POST, &test, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("ratelimit-limit").is_none());
    let sent: Value = resp.json().await.unwrap();
    assert_eq!(keys(&sent), ["delivery_id"]);
    let first = sent["delivery_id"].as_str().unwrap().to_owned();
    let (s, second) = api
        .call(
            Method::POST,
            &test,
            &alice,
            Some(json!({"event": "email.sent", "data": {"hello": "world"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{second}");
    let second = second["delivery_id"].as_str().unwrap().to_owned();
    let c = store.client().await.unwrap();
    for (id, event, data) in [
        (&first, "email.received", json!({"test": true})),
        (&second, "email.sent", json!({"hello": "world"})),
    ] {
        let payload: Value = c
            .query_one(
                "SELECT event_payload FROM webhook_subscriber_deliveries WHERE id = $1 AND event_id IS NULL",
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(keys(&payload), ["created_at", "data", "event", "id"]);
        assert_eq!(payload["event"], event);
        assert_eq!(payload["data"], data);
        assert!(payload["id"].as_str().unwrap().starts_with("evt_"));
    }

    // Refusals, nothing queued.
    for (key, path, body, want) in [
        (
            &bob,
            test.clone(),
            json!({}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            "/v1/webhooks/wh_x/test".into(),
            json!({}),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            test.clone(),
            json!({"event": "email.bounced"}),
            (StatusCode::BAD_REQUEST, "invalid_event_type"),
        ),
        (
            &alice,
            test.clone(),
            json!({"data": [1, 2]}),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ),
        (
            &alice,
            test.clone(),
            json!({"data": {}, "x": 1}),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ),
    ] {
        let (s, got) = api.call(Method::POST, &path, key, Some(body.clone())).await;
        assert_eq!((s, code(&got)), want, "{path} {body}: {got}");
    }
    let resp = api
        .request(Method::POST, &test, &alice)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    api.call(
        Method::PATCH,
        format!("/v1/webhooks/{w}"),
        &alice,
        Some(json!({"enabled": false})),
    )
    .await;
    let (s, body) = api.call(Method::POST, &test, &alice, None).await;
    assert_eq!((s, code(&body)), (StatusCode::CONFLICT, "webhook_disabled"));
    let queued: i64 = c
        .query_one("SELECT count(*) FROM webhook_subscriber_deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 2);

    // The log: newest first, poll-limited, the contract's view.
    let deliveries = format!("/v1/webhooks/{w}/deliveries");
    let resp = api
        .request(Method::GET, &deliveries, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("ratelimit-limit").is_some());
    let page: Value = resp.json().await.unwrap();
    assert_eq!(keys(&page), ["items", "next_cursor"]);
    assert_eq!(page["next_cursor"], Value::Null);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], second.as_str());
    assert_eq!(items[1]["id"], first.as_str());
    assert_eq!(
        keys(&items[0]),
        [
            "attempts",
            "created_at",
            "event_type",
            "id",
            "next_retry_at",
            "status"
        ]
    );
    assert_eq!(items[0]["event_type"], "email.sent");
    assert_eq!(items[0]["status"], "pending");
    assert_eq!(items[0]["attempts"], 0);
    assert!(is_rfc3339_seconds(&items[0]["next_retry_at"]));
    assert!(is_rfc3339_seconds(&items[0]["created_at"]));
    // A recorded failure shows its error, code and attempt time.
    c.execute(
        "UPDATE webhook_subscriber_deliveries SET status = 'failed', attempts = 1, \
           last_error = 'HTTP 500', last_status_code = 500, last_attempt_at = now() WHERE id = $1",
        &[&first],
    )
    .await
    .unwrap();
    let (_, failed) = api
        .call(
            Method::GET,
            format!("{deliveries}?status=failed"),
            &alice,
            None,
        )
        .await;
    let items = failed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        keys(&items[0]),
        [
            "attempts",
            "created_at",
            "event_type",
            "id",
            "last_attempt_at",
            "last_error",
            "last_status_code",
            "next_retry_at",
            "status"
        ]
    );
    assert_eq!(items[0]["last_status_code"], 500);
    assert_eq!(items[0]["last_error"], "HTTP 500");
    // Pages by cursor.
    let (_, p1) = api
        .call(Method::GET, format!("{deliveries}?limit=1"), &alice, None)
        .await;
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = api
        .call(
            Method::GET,
            format!("{deliveries}?limit=1&cursor={cursor}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(p2["items"][0]["id"], first.as_str());
    assert_eq!(p2["next_cursor"], Value::Null);

    for (key, path, want) in [
        (
            &bob,
            deliveries.clone(),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            "/v1/webhooks/wh_0/deliveries".into(),
            (StatusCode::NOT_FOUND, "not_found"),
        ),
        (
            &alice,
            format!("{deliveries}?status=sent"),
            (StatusCode::BAD_REQUEST, "invalid_filter"),
        ),
        (
            &alice,
            format!("{deliveries}?limit=101"),
            (StatusCode::BAD_REQUEST, "invalid_filter"),
        ),
        (
            &alice,
            format!("{deliveries}?cursor=e30"),
            (StatusCode::BAD_REQUEST, "invalid_cursor"),
        ),
    ] {
        let (s, body) = api.call(Method::GET, &path, key, None).await;
        assert_eq!((s, code(&body)), want, "{path}: {body}");
    }
    api.stop().await;
}

/// The store's replay key shape is what the spec names.
#[test]
fn replay_keys_are_server_minted() {
    let e = e2a_store::ids::EventId::new();
    assert_eq!(
        events::replay_key(&e, None).as_str(),
        format!("s:replay:{e}:")
    );
}
