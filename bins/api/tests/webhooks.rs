//! `/v1/webhooks` on a real server (spec §3.6, §3.7, §5.1; contract
//! operations listWebhooks … rotateWebhookSecret): the contract's shapes,
//! the secret shown on create and rotate only, 404 across tenants, 400s for
//! bad input with nothing stored (an empty URL included: flaw 31), the cap,
//! the re-enable cooldown, and the URL policy of production and
//! development.

mod common;

use std::sync::Arc;

use common::{Running, code, key_for};
use e2a_api::Config;
use e2a_runtime::config::Environment;
use e2a_store::{
    Store, StoreConfig,
    account_limits::{self, Limits},
    address::EmailAddress,
    users,
};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const SHARED: &str = "agents.localhost";

fn dev_config(db: &TestDb) -> Config {
    let mut config = Config::for_database(db.url());
    config.shared_domain = SHARED.into();
    config
}

async fn start_production(db: &TestDb, allow_private: bool) -> Running {
    let mut config = dev_config(db);
    config.common.environment = Environment::Production;
    config.allow_private_webhooks = allow_private;
    Running::start_with_resolver(config, Arc::new(e2a_api::dns::NoResolver)).await
}

fn hook(url: &str) -> Value {
    json!({"url": url, "events": ["email.received"]})
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

#[tokio::test]
async fn webhooks_have_the_contract_shapes_and_secrets_show_only_on_create_and_rotate() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let api = Running::start(dev_config(&db)).await;
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Create: 201, no-store, the WebhookView plus signing_secret.
    let resp = api
        .request(Method::POST, "/v1/webhooks", &alice)
        .json(&json!({
            "url": "https://hooks.example.com/e2a",
            "events": ["email.received", "email.sent"],
            "description": "inbox",
            "filters": {"agent_ids": ["Demo@Agents.LocalHost"], "labels": null},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    assert!(
        resp.headers().get("ratelimit-limit").is_none(),
        "writes are not poll-limited"
    );
    let created: Value = resp.json().await.unwrap();
    assert_eq!(
        keys(&created),
        [
            "created_at",
            "description",
            "enabled",
            "events",
            "filters",
            "id",
            "signing_secret",
            "url"
        ]
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    assert!(id.starts_with("wh_"));
    assert!(
        secret.len() == 6 + 64
            && secret.starts_with("whsec_")
            && secret[6..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{secret}"
    );
    assert_eq!(created["url"], "https://hooks.example.com/e2a");
    assert_eq!(created["events"], json!(["email.received", "email.sent"]));
    assert_eq!(
        created["filters"],
        json!({"agent_ids": ["demo@agents.localhost"]})
    );
    assert_eq!(created["enabled"], true);
    assert!(is_rfc3339_seconds(&created["created_at"]), "{created}");

    // List and get: poll-limited, never a secret.
    let resp = api
        .request(Method::GET, "/v1/webhooks", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("ratelimit-limit").is_some());
    let text = resp.text().await.unwrap();
    assert!(!text.contains("whsec_"), "{text}");
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(keys(&listed), ["webhooks"]);
    let mut view = created.clone();
    view.as_object_mut().unwrap().remove("signing_secret");
    assert_eq!(listed["webhooks"], json!([view]));
    let resp = api
        .request(Method::GET, &format!("/v1/webhooks/{id}"), &alice)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("ratelimit-limit").is_some());
    let got: Value = resp.json().await.unwrap();
    assert_eq!(got, view);

    // Patch: given fields replace (filters whole), the rest stays.
    let (s, patched) = api
        .call(
            Method::PATCH,
            format!("/v1/webhooks/{id}"),
            &alice,
            Some(json!({"description": "all mail", "filters": {"conversation_ids": ["cnv_1"]}, "enabled": false})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{patched}");
    assert_eq!(patched["description"], "all mail");
    assert_eq!(patched["filters"], json!({"conversation_ids": ["cnv_1"]}));
    assert_eq!(patched["events"], created["events"]);
    assert_eq!(patched["enabled"], false);
    assert!(
        patched.get("auto_disabled_at").is_none(),
        "a manual disable is not an auto-disable"
    );
    assert!(patched.get("signing_secret").is_none());

    // Rotate: the new secret once; reads show only when the old one expires.
    let resp = api
        .request(
            Method::POST,
            &format!("/v1/webhooks/{id}/rotate-secret"),
            &alice,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let rotated: Value = resp.json().await.unwrap();
    assert_eq!(
        keys(&rotated),
        ["previous_secret_expires_at", "signing_secret"]
    );
    let new_secret = rotated["signing_secret"].as_str().unwrap();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(is_rfc3339_seconds(&rotated["previous_secret_expires_at"]));
    let (_, got) = api
        .call(Method::GET, format!("/v1/webhooks/{id}"), &alice, None)
        .await;
    assert_eq!(
        got["previous_secret_expires_at"],
        rotated["previous_secret_expires_at"]
    );
    assert!(!got.to_string().contains("whsec_"));
    // A second rotation keeps the original secret as the previous one (flaw 23).
    let (_, again) = api
        .call(
            Method::POST,
            format!("/v1/webhooks/{id}/rotate-secret"),
            &alice,
            None,
        )
        .await;
    assert_eq!(
        again["previous_secret_expires_at"],
        rotated["previous_secret_expires_at"]
    );

    // Delete: 204, then gone.
    let (s, body) = api
        .call(Method::DELETE, format!("/v1/webhooks/{id}"), &alice, None)
        .await;
    assert_eq!((s, body), (StatusCode::NO_CONTENT, Value::Null));
    let (s, body) = api
        .call(Method::GET, format!("/v1/webhooks/{id}"), &alice, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(code(&body), "not_found");
    let (_, listed) = api.call(Method::GET, "/v1/webhooks", &alice, None).await;
    assert_eq!(listed, json!({"webhooks": []}));
    api.stop().await;
}

#[tokio::test]
async fn another_accounts_webhook_is_not_found_on_every_route() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let api = Running::start(dev_config(&db)).await;
    let (_, created) = api
        .call(
            Method::POST,
            "/v1/webhooks",
            &alice,
            Some(hook("https://a.example.com/")),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    let missing = "wh_0123456789abcdef0123456789abcdef";

    for target in [id, missing, "not-an-id"] {
        for (method, path, body) in [
            (Method::GET, format!("/v1/webhooks/{target}"), None),
            (
                Method::PATCH,
                format!("/v1/webhooks/{target}"),
                Some(json!({"enabled": false})),
            ),
            (Method::DELETE, format!("/v1/webhooks/{target}"), None),
            (
                Method::POST,
                format!("/v1/webhooks/{target}/rotate-secret"),
                None,
            ),
        ] {
            let (s, body) = api.call(method.clone(), &path, &bob, body).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {body}");
            assert_eq!(code(&body), "not_found");
            assert_eq!(
                body["error"]["message"], "webhook not found",
                "indistinguishable"
            );
        }
    }
    let (_, theirs) = api.call(Method::GET, "/v1/webhooks", &bob, None).await;
    assert_eq!(theirs, json!({"webhooks": []}));
    // Alice's webhook is untouched.
    let (_, mine) = api
        .call(Method::GET, format!("/v1/webhooks/{id}"), &alice, None)
        .await;
    assert_eq!(mine["enabled"], true);
    api.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_400_and_stores_nothing() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let api = Running::start(dev_config(&db)).await;
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &bob,
            Some(json!({"slug": "bobs"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let ok = "https://hooks.example.com/";
    let long = format!("https://hooks.example.com/{}", "a".repeat(2048));
    let cases: Vec<(Value, &str)> = vec![
        (json!({"events": ["email.received"]}), "invalid_webhook_url"),
        (hook(""), "invalid_webhook_url"),
        (hook("   "), "invalid_webhook_url"),
        (
            hook("https://user:pw@hooks.example.com/"),
            "invalid_webhook_url",
        ),
        (hook("ftp://hooks.example.com/"), "invalid_webhook_url"),
        (hook("hooks.example.com/x"), "invalid_webhook_url"),
        (hook(&long), "invalid_webhook_url"),
        (
            hook("http://169.254.169.254/latest/meta-data"),
            "invalid_webhook_url",
        ),
        (
            json!({"url": ok, "events": ["email.bounced"]}),
            "invalid_event_type",
        ),
        (json!({"url": ok, "events": []}), "invalid_request"),
        (json!({"url": ok}), "invalid_request"),
        (
            json!({"url": ok, "events": ["email.received"], "description": "a\nb"}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "description": "x".repeat(201)}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "filters": {"labels": (0..51).map(|i| format!("l{i}")).collect::<Vec<_>>()}}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "filters": {"conversation_ids": ["no spaces"]}}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "filters": {"labels": ["UPPER"]}}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "filters": {"agent_ids": ["bobs@agents.localhost"]}}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "filters": {"senders": ["x"]}}),
            "invalid_request",
        ),
        (
            json!({"url": ok, "events": ["email.received"], "secret": "mine"}),
            "invalid_request",
        ),
        (
            json!({"url": 7, "events": ["email.received"]}),
            "invalid_request",
        ),
    ];
    for (body, want) in &cases {
        let (s, err) = api
            .call(Method::POST, "/v1/webhooks", &alice, Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(code(&err), *want, "{body}: {err}");
    }
    let (_, listed) = api.call(Method::GET, "/v1/webhooks", &alice, None).await;
    assert_eq!(listed, json!({"webhooks": []}), "nothing stored");

    // The same rules on PATCH; the webhook stays as it was.
    let (_, created) = api
        .call(Method::POST, "/v1/webhooks", &alice, Some(hook(ok)))
        .await;
    let path = format!("/v1/webhooks/{}", created["id"].as_str().unwrap());
    for (body, want) in [
        (json!({"url": ""}), "invalid_webhook_url"),
        (
            json!({"url": "https://10.0.0.1:99999/"}),
            "invalid_webhook_url",
        ),
        (
            json!({"events": ["email.received", "nope"]}),
            "invalid_event_type",
        ),
        (json!({"events": []}), "invalid_request"),
        (
            json!({"filters": {"agent_ids": ["bobs@agents.localhost"]}}),
            "invalid_request",
        ),
        (json!({"enabled": "yes"}), "invalid_request"),
    ] {
        let (s, err) = api
            .call(Method::PATCH, &path, &alice, Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(code(&err), want, "{body}: {err}");
    }
    let (_, now) = api.call(Method::GET, &path, &alice, None).await;
    let mut before = created.clone();
    before.as_object_mut().unwrap().remove("signing_secret");
    assert_eq!(now, before);
    api.stop().await;
}

#[tokio::test]
async fn the_cap_and_the_cooldown_answer_as_the_contract_says() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let c = store.client().await.unwrap();
    let user = users::get_by_email(&c, &EmailAddress::parse("alice@example.com").unwrap())
        .await
        .unwrap()
        .id;
    account_limits::upsert(
        &c,
        &user,
        &Limits {
            max_webhooks: 2,
            ..Limits::default()
        },
    )
    .await
    .unwrap();
    let api = Running::start(dev_config(&db)).await;

    let mut ids = Vec::new();
    for i in 0..2 {
        let (s, w) = api
            .call(
                Method::POST,
                "/v1/webhooks",
                &alice,
                Some(hook(&format!("https://h{i}.example.com/"))),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        ids.push(w["id"].as_str().unwrap().to_owned());
    }
    let (s, err) = api
        .call(
            Method::POST,
            "/v1/webhooks",
            &alice,
            Some(hook("https://h3.example.com/")),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&err), "webhook_cap_reached");
    assert_eq!(err["error"]["details"]["limit"], 2);

    // The deliverer auto-disables it; a re-enable within 5 minutes is 409.
    c.execute(
        "UPDATE webhooks SET enabled = false, auto_disabled_at = now() - interval '1 minute' WHERE id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    let path = format!("/v1/webhooks/{}", ids[0]);
    let (_, got) = api.call(Method::GET, &path, &alice, None).await;
    assert_eq!(got["enabled"], false);
    assert!(is_rfc3339_seconds(&got["auto_disabled_at"]), "{got}");
    let (s, err) = api
        .call(Method::PATCH, &path, &alice, Some(json!({"enabled": true})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert_eq!(code(&err), "webhook_cooldown");
    let wait = err["error"]["details"]["retry_after_seconds"]
        .as_i64()
        .unwrap();
    assert!((200..=240).contains(&wait), "{err}");
    let resp = api
        .request(Method::PATCH, &path, &alice)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let header: i64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (wait - 2..=wait).contains(&header),
        "Retry-After {header}, details {wait}"
    );

    // Once the cooldown is over the re-enable passes and clears it.
    c.execute(
        "UPDATE webhooks SET auto_disabled_at = now() - interval '5 minutes' WHERE id = $1",
        &[&ids[0]],
    )
    .await
    .unwrap();
    let (s, got) = api
        .call(Method::PATCH, &path, &alice, Some(json!({"enabled": true})))
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(got["enabled"], true);
    assert!(got.get("auto_disabled_at").is_none());
    api.stop().await;
}

/// Production: `https://` to public hosts only; loopback, private and
/// local names refused (also with `http://`). `E2A_ALLOW_PRIVATE_WEBHOOKS`
/// admits private hosts but not `http://` nor metadata addresses.
/// Development admits `http://` and private hosts.
#[tokio::test]
async fn the_url_policy_follows_the_deployment() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let refused_in_production = [
        "http://hooks.example.com/",
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.1.2.3/hook",
        "https://192.168.0.10:8443/hook",
        "https://100.64.0.1/hook",
        "https://2130706433/hook",
        "https://localhost/hook",
        "https://receiver/hook",
        "https://169.254.169.254/",
    ];

    let api = start_production(&db, false).await;
    for url in refused_in_production {
        let (s, err) = api
            .call(Method::POST, "/v1/webhooks", &alice, Some(hook(url)))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {err}");
        assert_eq!(code(&err), "invalid_webhook_url", "{url}");
    }
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/webhooks",
            &alice,
            Some(hook("https://hooks.example.com/")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    api.stop().await;

    let api = start_production(&db, true).await;
    for (url, allowed) in [
        ("https://127.0.0.1:8443/hook", true),
        ("https://10.1.2.3/hook", true),
        ("https://localhost/hook", true),
        ("http://127.0.0.1/hook", false),
        ("https://169.254.169.254/", false),
    ] {
        let (s, body) = api
            .call(Method::POST, "/v1/webhooks", &alice, Some(hook(url)))
            .await;
        let want = if allowed {
            StatusCode::CREATED
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(s, want, "{url}: {body}");
    }
    api.stop().await;

    let api = Running::start(dev_config(&db)).await;
    for (url, allowed) in [
        ("http://127.0.0.1:9000/hook", true),
        ("http://localhost:9000/hook", true),
        ("https://192.168.1.1/hook", true),
        ("http://169.254.169.254/", false),
    ] {
        let (s, body) = api
            .call(Method::POST, "/v1/webhooks", &alice, Some(hook(url)))
            .await;
        let want = if allowed {
            StatusCode::CREATED
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(s, want, "{url}: {body}");
    }
    api.stop().await;
}

#[test]
fn allow_private_webhooks_is_off_by_default_and_parses_booleans() {
    use clap::Parser;
    assert!(!Config::parse_from(["e2a-api"]).allow_private_webhooks);
    for (v, want) in [("1", true), ("true", true), ("0", false), ("off", false)] {
        let c = Config::try_parse_from(["e2a-api", "--allow-private-webhooks", v]).unwrap();
        assert_eq!(c.allow_private_webhooks, want, "{v}");
    }
    assert!(Config::try_parse_from(["e2a-api", "--allow-private-webhooks", "maybe"]).is_err());
}
