//! `/v1/domains` and `/v1/agents` end to end: registration with DKIM keys,
//! verification (development and production with injected DNS), agents by
//! email and by slug, validation codes, cross-tenant 404s, JSON errors for
//! malformed bodies.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use common::{Running, code, error_body, key_for};
use e2a_api::{
    Config,
    dns::{LookupError, LookupFuture, Resolver},
};
use e2a_store::{Store, StoreConfig, account_limits, address::EmailAddress, domains, users};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const SHARED: &str = "agents.localhost";
const MX: &str = "mx.e2a.test";

fn dev_config(db: &TestDb) -> Config {
    let mut config = Config::for_database(db.url());
    config.shared_domain = SHARED.into();
    config.smtp_domain = MX.into();
    config
}

#[tokio::test]
async fn domains_and_agents_end_to_end() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let api = Running::start(dev_config(&db)).await;

    // Register: normalised, token, DNS records with a fresh DKIM key.
    let (status, d) = api
        .call(
            Method::POST,
            "/v1/domains",
            &alice,
            Some(json!({"domain": " Alice.Example. "})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{d}");
    assert_eq!(d["domain"], "alice.example");
    assert_eq!(d["verified"], false);
    assert_eq!(d["agent_count"], 0);
    assert_eq!(d["is_primary"], false);
    let token = d["verification_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("e2a-verify="));
    assert_eq!(
        d["dns_records"]["mx"],
        json!({"host": "@", "value": MX, "priority": 10})
    );
    assert_eq!(
        d["dns_records"]["txt"],
        json!({"host": "@", "value": token})
    );
    let dkim = d["dns_records"]["dkim"].clone();
    let selector = format!(
        "e2a{}",
        time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!("[year][month]"))
            .unwrap()
    );
    assert_eq!(dkim["host"], format!("{selector}._domainkey.alice.example"));
    assert!(
        dkim["value"]
            .as_str()
            .unwrap()
            .starts_with("v=DKIM1; k=rsa; p=MIIB"),
        "{dkim}"
    );

    // Re-registration by the owner: same token and key, still 201.
    let (status, again) = api
        .call(
            Method::POST,
            "/v1/domains",
            &alice,
            Some(json!({"domain": "alice.example"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        (&again["verification_token"], &again["dns_records"]["dkim"]),
        (&d["verification_token"], &dkim)
    );

    // Registration errors.
    for (body, status, expected) in [
        (
            json!({"domain": "Agents.Localhost"}),
            400,
            "reserved_domain",
        ),
        (
            json!({"domain": "x.agents.localhost"}),
            400,
            "domain_unavailable",
        ),
        (json!({"domain": "localhost"}), 400, "invalid_domain"),
        (json!({"domain": "exa mple.com"}), 400, "invalid_domain"),
        (
            json!({"domain": format!("{}.com", "a".repeat(300))}),
            400,
            "invalid_domain",
        ),
        (json!({}), 400, "invalid_request"),
        (json!({"domain": 5}), 400, "invalid_request"),
        (
            json!({"domain": "x.example", "extra": true}),
            400,
            "invalid_request",
        ),
    ] {
        let (s, b) = api
            .call(Method::POST, "/v1/domains", &bob, Some(body.clone()))
            .await;
        assert_eq!((s.as_u16(), code(&b)), (status, expected), "{body}");
    }

    // Reads are scoped to the owner.
    let (_, list) = api.call(Method::GET, "/v1/domains", &alice, None).await;
    assert_eq!(list["domains"].as_array().unwrap().len(), 1);
    let (_, list) = api.call(Method::GET, "/v1/domains", &bob, None).await;
    assert_eq!(list, json!({"domains": []}));
    let (status, _) = api
        .call(Method::GET, "/v1/domains/ALICE.example", &alice, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for (path, key) in [
        ("/v1/domains/alice.example", &bob),
        ("/v1/domains/not..valid", &alice),
        ("/v1/domains/unknown.example", &alice),
    ] {
        let (s, b) = api.call(Method::GET, path, key, None).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }
    let (s, b) = api
        .call(Method::POST, "/v1/domains/alice.example/verify", &bob, None)
        .await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));

    // Agents need a verified domain of the caller's.
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"email": "support@alice.example"})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::BAD_REQUEST, "domain_not_verified")
    );
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &bob,
            Some(json!({"email": "x@alice.example"})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::BAD_REQUEST, "domain_not_registered")
    );

    // Development: the probe passes.
    let (s, v) = api
        .call(
            Method::POST,
            "/v1/domains/Alice.Example/verify",
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            &v["domain"],
            &v["verified"],
            &v["mx"],
            &v["spf"],
            &v["dkim"]
        ),
        (
            &json!("alice.example"),
            &json!(true),
            &json!("found"),
            &json!("found"),
            &json!("found")
        )
    );
    assert!(v["verified_at"].as_str().unwrap().ends_with('Z'));

    // Verified by Alice: neither it nor a name under it is Bob's to claim
    // or verify.
    for domain in ["alice.example", "mail.alice.example"] {
        let (s, b) = api
            .call(
                Method::POST,
                "/v1/domains",
                &bob,
                Some(json!({"domain": domain})),
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "domain_unavailable"),
            "{domain}"
        );
        let (s, b) = api
            .call(
                Method::POST,
                &format!("/v1/domains/{domain}/verify"),
                &bob,
                None,
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "domain_unavailable"),
            "{domain}"
        );
    }

    // Create by email (normalised) and by slug.
    let (s, a) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"email": "Support@Alice.Example", "name": "Support"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(
        a,
        json!({"id": "support@alice.example", "domain": "alice.example", "email": "support@alice.example"})
    );
    let (s, a) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "Demo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(a["id"], "demo@agents.localhost");
    let (s, a) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "hooked", "webhook_url": "http://127.0.0.1:9/hook"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");

    for (body, status, expected) in [
        (json!({"email": "support@alice.example"}), 409, "conflict"),
        (json!({"slug": "demo"}), 409, "conflict"),
        (json!({"slug": "-demo"}), 400, "invalid_slug"),
        (json!({"slug": "a..b"}), 400, "invalid_slug"),
        (json!({"slug": "x".repeat(65)}), 400, "invalid_slug"),
        (json!({"email": "-x@agents.localhost"}), 400, "invalid_slug"),
        (
            json!({"slug": "x", "email": "x@alice.example"}),
            400,
            "invalid_request",
        ),
        (json!({}), 400, "invalid_request"),
        (json!({"email": "not-an-address"}), 400, "invalid_request"),
        (
            json!({"slug": "m", "agent_mode": "cloud"}),
            400,
            "invalid_request",
        ),
        (
            json!({"slug": "m", "agent_mode": "push"}),
            400,
            "invalid_request",
        ),
        (
            json!({"slug": "m", "webhook_url": "ftp://hooks.example.com/"}),
            400,
            "invalid_webhook_url",
        ),
        (
            json!({"slug": "m", "webhook_url": "not a url"}),
            400,
            "invalid_webhook_url",
        ),
        (
            json!({"slug": "m", "webhook_url": format!("https://h.example.com/{}", "a".repeat(2048))}),
            400,
            "invalid_webhook_url",
        ),
        (
            json!({"slug": "m", "name": "x".repeat(201)}),
            400,
            "invalid_request",
        ),
        (
            json!({"slug": "m", "colour": "blue"}),
            400,
            "invalid_request",
        ),
    ] {
        let (s, b) = api
            .call(Method::POST, "/v1/agents", &alice, Some(body.clone()))
            .await;
        assert_eq!((s.as_u16(), code(&b)), (status, expected), "{body}");
    }

    // List newest first; get by a mixed-case address (flaw 33).
    let (_, list) = api.call(Method::GET, "/v1/agents", &alice, None).await;
    let ids: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "hooked@agents.localhost",
            "demo@agents.localhost",
            "support@alice.example"
        ]
    );
    let (s, agent) = api
        .call(
            Method::GET,
            "/v1/agents/Demo@Agents.LocalHost",
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        agent,
        json!({
            "id": "demo@agents.localhost", "domain": SHARED, "email": "demo@agents.localhost", "name": "",
            "webhook_url": "", "agent_mode": "local", "domain_verified": true, "created_at": agent["created_at"],
            "hitl_enabled": false, "hitl_ttl_seconds": 604800, "hitl_expiration_action": "reject",
            "reject_dmarc_failures": false
        })
    );
    let (_, hooked) = api
        .call(
            Method::GET,
            "/v1/agents/hooked@agents.localhost",
            &alice,
            None,
        )
        .await;
    assert_eq!(
        (&hooked["agent_mode"], &hooked["webhook_url"]),
        (&json!("cloud"), &json!("http://127.0.0.1:9/hook"))
    );

    // Another tenant, a missing agent, an unparsable address: 404 everywhere (flaw 27).
    for (method, path, key, body) in [
        (Method::GET, "/v1/agents/demo@agents.localhost", &bob, None),
        (
            Method::PATCH,
            "/v1/agents/demo@agents.localhost",
            &bob,
            Some(json!({"name": "x"})),
        ),
        (
            Method::DELETE,
            "/v1/agents/demo@agents.localhost",
            &bob,
            None,
        ),
        (
            Method::GET,
            "/v1/agents/nobody@agents.localhost",
            &alice,
            None,
        ),
        (Method::GET, "/v1/agents/not-an-address", &alice, None),
        (Method::DELETE, "/v1/agents/%ff%fe", &alice, None),
    ] {
        let (s, b) = api.call(method.clone(), path, key, body).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {path}"
        );
    }

    // Update.
    let (s, updated) = api
        .call(
            Method::PATCH,
            "/v1/agents/DEMO@agents.localhost",
            &alice,
            Some(
                json!({"name": "Demo", "hitl_enabled": true, "hitl_ttl_seconds": 60,
                     "hitl_expiration_action": "approve", "reject_dmarc_failures": true}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{updated}");
    assert_eq!(
        (
            &updated["name"],
            &updated["hitl_enabled"],
            &updated["hitl_ttl_seconds"],
            &updated["hitl_expiration_action"],
            &updated["reject_dmarc_failures"]
        ),
        (
            &json!("Demo"),
            &json!(true),
            &json!(60),
            &json!("approve"),
            &json!(true)
        )
    );
    let (s, updated) = api
        .call(
            Method::PATCH,
            "/v1/agents/demo@agents.localhost",
            &alice,
            Some(json!({"agent_mode": "cloud", "webhook_url": "https://hooks.example.com/e2a"})),
        )
        .await;
    assert_eq!(
        (s, &updated["agent_mode"]),
        (StatusCode::OK, &json!("cloud"))
    );
    for (body, expected) in [
        (json!({}), "invalid_request"),
        (json!({"mode": "cloud"}), "invalid_request"),
        (
            json!({"webhook_url": "javascript:alert(1)"}),
            "invalid_webhook_url",
        ),
        (json!({"webhook_url": ""}), "invalid_request"), // a cloud agent keeps its URL
        (json!({"agent_mode": "push"}), "invalid_request"),
        (json!({"hitl_ttl_seconds": 0}), "invalid_request"),
        (json!({"hitl_ttl_seconds": 604801}), "invalid_request"),
        (json!({"hitl_ttl_seconds": 1_i64 << 40}), "invalid_request"),
        (
            json!({"hitl_expiration_action": "later"}),
            "invalid_request",
        ),
        (json!({"hitl_enabled": "yes"}), "invalid_request"),
    ] {
        let (s, b) = api
            .call(
                Method::PATCH,
                "/v1/agents/demo@agents.localhost",
                &alice,
                Some(body.clone()),
            )
            .await;
        assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, expected), "{body}");
    }

    // Delete: a domain with agents stays; the agent goes; then the domain.
    let (s, b) = api
        .call(Method::DELETE, "/v1/domains/alice.example", &alice, None)
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::BAD_REQUEST, "domain_has_agents")
    );
    let (s, b) = api
        .call(Method::DELETE, "/v1/domains/alice.example", &bob, None)
        .await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, b) = api
        .call(
            Method::DELETE,
            "/v1/agents/Support@Alice.Example",
            &alice,
            None,
        )
        .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"status": "deleted"})));
    let (s, _) = api
        .call(
            Method::GET,
            "/v1/agents/support@alice.example",
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = api
        .call(Method::DELETE, "/v1/domains/alice.example", &alice, None)
        .await;
    assert_eq!((s, b), (StatusCode::NO_CONTENT, Value::Null));
    let (s, _) = api
        .call(Method::GET, "/v1/domains/alice.example", &alice, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Plan caps: 402 limit_exceeded.
    {
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let c = store.client().await.unwrap();
        let bob_id = users::get_by_email(&c, &EmailAddress::parse("bob@example.com").unwrap())
            .await
            .unwrap()
            .id;
        let limits = account_limits::Limits {
            max_agents: 0,
            max_domains: 0,
            ..account_limits::Limits::default()
        };
        account_limits::upsert(&c, &bob_id, &limits).await.unwrap();
    }
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &bob,
            Some(json!({"slug": "capped"})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::PAYMENT_REQUIRED, "limit_exceeded")
    );
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/domains",
            &bob,
            Some(json!({"domain": "bob.example"})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::PAYMENT_REQUIRED, "limit_exceeded")
    );
    // The account view counts what the caps count.
    let (s, account) = api.call(Method::GET, "/v1/account", &bob, None).await;
    assert_eq!(s, StatusCode::OK, "{account}");
    let (_, listed) = api.call(Method::GET, "/v1/agents", &bob, None).await;
    assert_eq!(account["limits"]["max_agents"], 0, "{account}");
    assert_eq!(
        account["usage"]["agents"].as_u64(),
        listed["agents"].as_array().map(|a| a.len() as u64),
        "{account} {listed}"
    );

    // Without a key: 401 before anything else.
    let (s, b) = api
        .call(Method::POST, "/v1/agents", "", Some(json!({"slug": "x"})))
        .await;
    assert_eq!((s, code(&b)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    api.stop().await;
}

#[tokio::test]
async fn slugs_are_refused_without_a_shared_domain() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "solo@example.com").await;
    let api = Running::start(Config::for_database(db.url())).await;
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::BAD_REQUEST, "slug_registration_disabled")
    );
    api.stop().await;
}

#[tokio::test]
async fn malformed_bodies_get_json_errors() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "body@example.com").await;
    let api = Running::start(dev_config(&db)).await;
    let post = |body: Vec<u8>, content_type: Option<&str>| {
        let mut req = api.request(Method::POST, "/v1/agents", &key).body(body);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        async move { error_body(req.send().await.unwrap()).await }
    };
    let (s, b) = post(br#"{"slug": "x""#.to_vec(), Some("application/json")).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, b) = post(Vec::new(), Some("application/json")).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, b) = post(b"[1, 2]".to_vec(), Some("application/json")).await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, b) = post(br#"{"slug": "x"}"#.to_vec(), Some("text/plain")).await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (s, b) = post(br#"{"slug": "x"}"#.to_vec(), None).await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let huge = format!(r#"{{"slug": "x", "name": "{}"}}"#, "a".repeat(100_000));
    let (s, b) = post(huge.into_bytes(), Some("application/json")).await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    api.stop().await;
}

/// DNS answers the test controls: `(type, name) -> records`.
#[derive(Default)]
struct FakeDns(Mutex<HashMap<(&'static str, String), Vec<String>>>);

impl FakeDns {
    fn set(&self, kind: &'static str, name: &str, records: &[&str]) {
        self.0.lock().unwrap().insert(
            (kind, name.to_owned()),
            records.iter().map(|r| (*r).to_owned()).collect(),
        );
    }

    fn answer(&self, kind: &'static str, name: &str) -> Result<Vec<String>, LookupError> {
        self.0
            .lock()
            .unwrap()
            .get(&(kind, name.to_owned()))
            .cloned()
            .ok_or(LookupError::NotFound)
    }
}

impl Resolver for FakeDns {
    fn txt<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        let answer = self.answer("txt", name);
        Box::pin(async move { answer })
    }

    fn mx<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        let answer = self.answer("mx", name);
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn production_verification_reads_dns_and_never_unverifies() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "prod@example.com").await;
    let mut config = dev_config(&db);
    config.common.environment = e2a_runtime::config::Environment::Production;
    let dns = Arc::new(FakeDns::default());
    let api = Running::start_with_resolver(config, dns.clone()).await;

    let (s, d) = api
        .call(
            Method::POST,
            "/v1/domains",
            &key,
            Some(json!({"domain": "prod.example"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = d["verification_token"].as_str().unwrap();
    let dkim_host = d["dns_records"]["dkim"]["host"].as_str().unwrap();
    let dkim_value = d["dns_records"]["dkim"]["value"].as_str().unwrap();

    // Nothing published: 412 with the diagnostics, not verified.
    let (s, v) = api
        .call(Method::POST, "/v1/domains/prod.example/verify", &key, None)
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        v,
        json!({"domain": "prod.example", "verified": false, "mx": "missing", "spf": "missing", "dkim": "missing"})
    );
    let (_, d) = api
        .call(Method::GET, "/v1/domains/prod.example", &key, None)
        .await;
    assert_eq!(d["verified"], false);
    assert!(d["last_checked_at"].is_string(), "the attempt is recorded");

    // SPF and MX alone do not verify.
    dns.set("txt", "prod.example", &["v=spf1 include:MX.e2a.test ~all"]);
    dns.set("mx", "prod.example", &["mx.e2a.test."]);
    let (s, v) = api
        .call(Method::POST, "/v1/domains/prod.example/verify", &key, None)
        .await;
    assert_eq!(
        (s, &v["mx"], &v["spf"]),
        (
            StatusCode::PRECONDITION_FAILED,
            &json!("found"),
            &json!("found")
        )
    );

    // The token verifies; DKIM is checked against the stored key.
    dns.set(
        "txt",
        "prod.example",
        &["v=spf1 include:mx.e2a.test ~all", token],
    );
    dns.set("txt", dkim_host, &[dkim_value]);
    let (s, v) = api
        .call(Method::POST, "/v1/domains/prod.example/verify", &key, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (&v["verified"], &v["mx"], &v["spf"], &v["dkim"]),
        (
            &json!(true),
            &json!("found"),
            &json!("found"),
            &json!("found")
        )
    );

    // Records removed later: still verified, diagnostics say what is missing.
    dns.set("txt", "prod.example", &[]);
    dns.set("txt", dkim_host, &["v=DKIM1; k=rsa; p=OTHER"]);
    let (s, v) = api
        .call(Method::POST, "/v1/domains/prod.example/verify", &key, None)
        .await;
    assert_eq!(
        (s, &v["verified"], &v["spf"], &v["dkim"]),
        (
            StatusCode::OK,
            &json!(true),
            &json!("missing"),
            &json!("missing")
        )
    );

    // Production webhooks: https to a public name only.
    for url in [
        "http://hooks.example.com/",
        "https://127.0.0.1/",
        "https://localhost/x",
    ] {
        let (s, b) = api
            .call(
                Method::POST,
                "/v1/agents",
                &key,
                Some(json!({"email": "a@prod.example", "webhook_url": url})),
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_webhook_url"),
            "{url}"
        );
    }
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(json!({"email": "a@prod.example", "webhook_url": "https://hooks.example.com/"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    api.stop().await;
}

/// An agent's (legacy) `webhook_url` follows the deployment's URL policy
/// exactly like `/v1/webhooks`, on create and on update: production refuses
/// `http://`, private and loopback hosts in any spelling and local names;
/// `E2A_ALLOW_PRIVATE_WEBHOOKS=1` admits private hosts (still not `http://`
/// nor metadata addresses). The original's PATCH stored any URL (flaw 31).
#[tokio::test]
async fn agent_webhook_urls_follow_the_deployments_url_policy() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "alice@example.com").await;
    let production = |allow_private: bool| {
        let mut config = dev_config(&db);
        config.common.environment = e2a_runtime::config::Environment::Production;
        config.allow_private_webhooks = allow_private;
        config
    };
    let create = |slug: &str, url: &str| json!({"slug": slug, "webhook_url": url});

    let api =
        Running::start_with_resolver(production(false), Arc::new(e2a_api::dns::NoResolver)).await;
    let (s, b) = api
        .call(Method::POST, "/v1/agents", &key, Some(json!({"slug": "l"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for url in [
        "http://hooks.example.com/",
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.1.2.3/hook",
        "https://192.168.0.10:8443/hook",
        "https://100.64.0.1/hook",
        "https://2130706433/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://localhost/hook",
        "https://receiver/hook",
        "https://169.254.169.254/",
        "https://user:pw@hooks.example.com/",
    ] {
        let (s, b) = api
            .call(Method::POST, "/v1/agents", &key, Some(create("p", url)))
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_webhook_url"),
            "create {url}: {b}"
        );
        let (s, b) = api
            .call(
                Method::PATCH,
                "/v1/agents/l@agents.localhost",
                &key,
                Some(json!({"webhook_url": url})),
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_webhook_url"),
            "update {url}: {b}"
        );
    }
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(create("p", "https://hooks.example.com/e2a")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    api.stop().await;

    let api =
        Running::start_with_resolver(production(true), Arc::new(e2a_api::dns::NoResolver)).await;
    for (url, allowed) in [
        ("https://127.0.0.1:8443/hook", true),
        ("https://10.1.2.3/hook", true),
        ("https://localhost/hook", true),
        ("http://127.0.0.1/hook", false),
        ("https://169.254.169.254/", false),
    ] {
        let (s, b) = api
            .call(
                Method::PATCH,
                "/v1/agents/l@agents.localhost",
                &key,
                Some(json!({"webhook_url": url})),
            )
            .await;
        let want = if allowed {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(s, want, "update {url}: {b}");
        if allowed {
            assert_eq!(b["webhook_url"], url);
        }
    }
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &key,
            Some(create("q", "https://10.1.2.3/hook")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    api.stop().await;
}

#[tokio::test]
async fn a_shared_domain_verified_by_a_user_fails_start_up() {
    let db = TestDb::new().await;
    {
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let mut c = store.client().await.unwrap();
        let user = users::create(&c, &EmailAddress::parse("squat@example.com").unwrap(), "")
            .await
            .unwrap();
        let keys = domains::DkimKeys {
            selector: "e2a202601".into(),
            public_key_b64: "cA==".into(),
            private_key_der: vec![1],
        };
        domains::claim(&mut c, &user.id, SHARED, &keys, 10)
            .await
            .unwrap();
        // A pending claim would simply end; a verified one blocks.
        domains::record_check(&mut c, &user.id, SHARED, true)
            .await
            .unwrap();
    }
    let api = Running::start(dev_config(&db)).await;
    let err = tokio::time::timeout(std::time::Duration::from_secs(15), api.task)
        .await
        .expect("start-up fails promptly")
        .unwrap()
        .unwrap_err();
    let message = e2a_runtime::error_chain(err.as_ref());
    assert!(message.contains("E2A_SHARED_DOMAIN"), "{message}");
}

#[tokio::test]
async fn primary_domain_idna_paths_and_names() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let api = Running::start(dev_config(&db)).await;
    for domain in ["one.example", "bücher.example"] {
        let (s, b) = api
            .call(
                Method::POST,
                "/v1/domains",
                &alice,
                Some(json!({"domain": domain})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    // The Unicode form in the path finds the row stored in ASCII.
    let (s, d) = api
        .call(Method::GET, "/v1/domains/BÜCHER.example", &alice, None)
        .await;
    assert_eq!(
        (s, &d["domain"]),
        (StatusCode::OK, &json!("xn--bcher-kva.example"))
    );

    let primary = |key: &str| {
        let key = key.to_owned();
        let api = &api;
        async move {
            let (_, list) = api.call(Method::GET, "/v1/domains", &key, None).await;
            list["domains"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["is_primary"] == true)
                .map(|d| d["domain"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let (s, d) = api
        .call(
            Method::PATCH,
            "/v1/domains/One.Example",
            &alice,
            Some(json!({"is_primary": true})),
        )
        .await;
    assert_eq!((s, &d["is_primary"]), (StatusCode::OK, &json!(true)), "{d}");
    assert_eq!(primary(&alice).await, ["one.example"]);
    // Moving the primary clears the old one in the same transaction.
    let (s, _) = api
        .call(
            Method::PATCH,
            "/v1/domains/bücher.example",
            &alice,
            Some(json!({"is_primary": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(primary(&alice).await, ["xn--bcher-kva.example"]);
    // Idempotent.
    let (s, _) = api
        .call(
            Method::PATCH,
            "/v1/domains/xn--bcher-kva.example",
            &alice,
            Some(json!({"is_primary": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(primary(&alice).await, ["xn--bcher-kva.example"]);

    for (key, path, body, status, expected) in [
        (
            &alice,
            "/v1/domains/one.example",
            json!({"is_primary": false}),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "/v1/domains/one.example",
            json!({}),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "/v1/domains/one.example",
            json!({"is_primary": true, "x": 1}),
            400,
            "invalid_request",
        ),
        (
            &bob,
            "/v1/domains/one.example",
            json!({"is_primary": true}),
            404,
            "not_found",
        ),
        (
            &alice,
            "/v1/domains/agents.localhost",
            json!({"is_primary": true}),
            404,
            "not_found",
        ),
        (
            &alice,
            "/v1/domains/missing.example",
            json!({"is_primary": true}),
            404,
            "not_found",
        ),
    ] {
        let (s, b) = api.call(Method::PATCH, path, key, Some(body.clone())).await;
        assert_eq!((s.as_u16(), code(&b)), (status, expected), "{path} {body}");
    }
    assert_eq!(primary(&alice).await, ["xn--bcher-kva.example"]);
    assert!(primary(&bob).await.is_empty());

    // Agent names: bounded, no control characters (NUL would be a 500).
    for name in ["a\u{0}b", "line\nbreak", &"n".repeat(201)] {
        let (s, b) = api
            .call(
                Method::POST,
                "/v1/agents",
                &alice,
                Some(json!({"slug": "named", "name": name})),
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{name:?}"
        );
    }
    let (s, b) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "named", "name": "Named Agent"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = api
        .call(
            Method::PATCH,
            "/v1/agents/named@agents.localhost",
            &alice,
            Some(json!({"name": "x\u{0}"})),
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    api.stop().await;
}

#[tokio::test]
async fn competing_claims_are_decided_by_verification() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mallory = key_for(db.url(), "mallory@example.com").await;
    let mut config = dev_config(&db);
    config.common.environment = e2a_runtime::config::Environment::Production;
    let dns = Arc::new(FakeDns::default());
    let api = Running::start_with_resolver(config, dns.clone()).await;
    let register = |key: &str, domain: &str| {
        let (api, key, domain) = (&api, key.to_owned(), domain.to_owned());
        async move {
            api.call(
                Method::POST,
                "/v1/domains",
                &key,
                Some(json!({ "domain": domain })),
            )
            .await
        }
    };
    let verify = |key: &str, domain: &str| {
        let (api, key, domain) = (&api, key.to_owned(), domain.to_owned());
        async move {
            api.call(
                Method::POST,
                &format!("/v1/domains/{domain}/verify"),
                &key,
                None,
            )
            .await
        }
    };

    // Mallory registers Alice's company domain first, and a name under it.
    let (s, squat) = register(&mallory, "corp.example").await;
    assert_eq!(s, StatusCode::CREATED, "{squat}");
    let (s, _) = register(&mallory, "mail.corp.example").await;
    assert_eq!(s, StatusCode::CREATED);
    // That blocks nobody: Alice gets her own claim, token and key.
    let (s, mine) = register(&alice, "corp.example").await;
    assert_eq!(s, StatusCode::CREATED, "{mine}");
    assert_ne!(mine["verification_token"], squat["verification_token"]);
    assert_ne!(mine["dns_records"]["dkim"], squat["dns_records"]["dkim"]);

    // Only Alice can publish her token; Mallory's proof fails.
    let token = mine["verification_token"].as_str().unwrap();
    dns.set("txt", "corp.example", &[token]);
    let (s, v) = verify(&mallory, "corp.example").await;
    assert_eq!(
        (s, &v["verified"]),
        (StatusCode::PRECONDITION_FAILED, &json!(false))
    );
    let (s, v) = verify(&alice, "corp.example").await;
    assert_eq!((s, &v["verified"]), (StatusCode::OK, &json!(true)), "{v}");

    // Mallory's claims of the name and below it ended.
    let (_, list) = api.call(Method::GET, "/v1/domains", &mallory, None).await;
    assert_eq!(list, json!({"domains": []}));
    let (s, b) = api
        .call(Method::GET, "/v1/domains/corp.example", &mallory, None)
        .await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    for domain in ["corp.example", "mail.corp.example", "x.mail.corp.example"] {
        let (s, b) = register(&mallory, domain).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "domain_unavailable"),
            "{domain}"
        );
        let (s, b) = verify(&mallory, domain).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "domain_unavailable"),
            "{domain}"
        );
    }
    // Alice may use names under her domain.
    let (s, _) = register(&alice, "mail.corp.example").await;
    assert_eq!(s, StatusCode::CREATED);
    api.stop().await;
}

#[tokio::test]
async fn two_racing_verifications_through_the_api_have_one_winner() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    // Development: every probe passes, so only the store decides.
    let api = Running::start(dev_config(&db)).await;
    for round in 0..5 {
        let domain = format!("race{round}.example");
        for key in [&alice, &bob] {
            let (s, b) = api
                .call(
                    Method::POST,
                    "/v1/domains",
                    key,
                    Some(json!({ "domain": domain })),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
        }
        let path = format!("/v1/domains/{domain}/verify");
        let ((sa, ba), (sb, bb)) = tokio::join!(
            api.call(Method::POST, &path, &alice, None),
            api.call(Method::POST, &path, &bob, None),
        );
        let (winner, loser, lost) = match (sa, sb) {
            (StatusCode::OK, StatusCode::BAD_REQUEST) => (&alice, &bob, bb),
            (StatusCode::BAD_REQUEST, StatusCode::OK) => (&bob, &alice, ba),
            other => panic!("{domain}: expected one 200 and one 400, got {other:?}: {ba} {bb}"),
        };
        assert_eq!(code(&lost), "domain_unavailable", "{lost}");
        let (s, d) = api
            .call(Method::GET, &format!("/v1/domains/{domain}"), winner, None)
            .await;
        assert_eq!((s, &d["verified"]), (StatusCode::OK, &json!(true)));
        let (s, _) = api
            .call(Method::GET, &format!("/v1/domains/{domain}"), loser, None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "the loser's claim is gone");
    }
    api.stop().await;
}
