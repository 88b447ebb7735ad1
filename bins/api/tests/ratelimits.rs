//! Rate limits on a real socket (spec §5.3, issue 8 item 1): poll reads per
//! user, agent registration per client address, failed authentication per
//! client address before any key lookup, domain registration per account
//! across two API processes on one database; client addresses from
//! `X-Forwarded-For` only through a trusted proxy.

mod common;

use common::{Running, code, error_body, key_for};
use e2a_api::Config;
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};

fn config(db: &TestDb) -> Config {
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    config
}

fn num(h: &HeaderMap, name: &str) -> u64 {
    h.get(name)
        .unwrap_or_else(|| panic!("{name} missing: {h:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts a contract 429: `rate_limited`, `details.retry_after_seconds`
/// equal to `Retry-After`, and the RateLimit headers with nothing left.
async fn assert_429(resp: reqwest::Response, limit: u64) -> HeaderMap {
    let headers = resp.headers().clone();
    let (status, body) = error_body(resp).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(code(&body), "rate_limited");
    let retry = num(&headers, "retry-after");
    assert!(retry >= 1);
    assert_eq!(
        body["error"]["details"]["retry_after_seconds"],
        json!(retry)
    );
    assert_eq!(num(&headers, "ratelimit-limit"), limit);
    assert_eq!(num(&headers, "ratelimit-remaining"), 0);
    assert!(num(&headers, "ratelimit-reset") >= retry);
    headers
}

#[tokio::test]
async fn poll_reads_are_limited_per_user_and_carry_the_headers() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let mut config = config(&db);
    config.rates.poll_per_minute = 3;
    let api = Running::start(config).await;
    for (key, slug) in [(&alice, "alice"), (&bob, "bob")] {
        let (s, _) = api
            .call(Method::POST, "/v1/agents", key, Some(json!({"slug": slug})))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let list = "/v1/agents/alice@agents.localhost/messages";
    for remaining in [2, 1, 0] {
        let resp = api.request(Method::GET, list, &alice).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(num(resp.headers(), "ratelimit-limit"), 3);
        assert_eq!(num(resp.headers(), "ratelimit-remaining"), remaining);
        assert!(resp.headers().get("retry-after").is_none());
    }
    // The fourth read of any poll-limited route is refused…
    let conversations = "/v1/agents/alice@agents.localhost/conversations";
    let resp = api
        .request(Method::GET, conversations, &alice)
        .send()
        .await
        .unwrap();
    let headers = assert_429(resp, 3).await;
    assert!(
        (19..=20).contains(&num(&headers, "retry-after")),
        "{headers:?}"
    );
    // …without touching other users, other routes, or writes.
    let resp = api
        .request(
            Method::GET,
            "/v1/agents/bob@agents.localhost/messages",
            &bob,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(num(resp.headers(), "ratelimit-remaining"), 2);
    let (s, _) = api.call(Method::GET, "/v1/agents", &alice, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = api
        .call(
            Method::PATCH,
            "/v1/agents/alice@agents.localhost/messages/msg_00000000000000000000000000000000",
            &alice,
            Some(json!({"add_labels": ["x"]})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "label updates are not polls: {body}"
    );
    // An unauthenticated poll is a 401, not a count against anyone.
    let resp = api
        .request(Method::GET, list, "e2a_not_a_key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    api.stop().await;
}

#[tokio::test]
async fn agent_registration_is_limited_per_client_address() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let mut config = config(&db);
    config.rates.agent_create_per_hour = 2;
    config.rates.trusted_proxies = e2a_api::ratelimit::parse_proxies("127.0.0.1").unwrap();
    let api = Running::start(config).await;
    let create = |key: &str, slug: &str, client: &str| {
        api.request(Method::POST, "/v1/agents", key)
            .header("x-forwarded-for", client)
            .json(&json!({"slug": slug}))
            .send()
    };
    for (i, slug) in ["a1", "a2"].into_iter().enumerate() {
        let resp = create(&alice, slug, "198.51.100.1").await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(num(resp.headers(), "ratelimit-limit"), 2);
        assert_eq!(num(resp.headers(), "ratelimit-remaining"), 1 - i as u64);
    }
    // Same address, another account: still the same client address.
    let headers = assert_429(create(&bob, "b1", "198.51.100.1").await.unwrap(), 2).await;
    assert!(num(&headers, "retry-after") > 1000, "{headers:?}");
    // A client behind the proxy cannot pick its key with a left-most entry:
    // the proxy appended the real address last.
    assert_429(
        create(&bob, "b1", "203.0.113.5, 198.51.100.1")
            .await
            .unwrap(),
        2,
    )
    .await;
    // Another client address is counted apart.
    let resp = create(&bob, "b1", "198.51.100.2").await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    api.stop().await;
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mut config = config(&db);
    config.rates.agent_create_per_hour = 1;
    let api = Running::start(config).await;
    let create = |slug: &str, client: &str| {
        api.request(Method::POST, "/v1/agents", &alice)
            .header("x-forwarded-for", client)
            .json(&json!({"slug": slug}))
            .send()
    };
    assert_eq!(
        create("a1", "198.51.100.1").await.unwrap().status(),
        StatusCode::CREATED
    );
    // The original keyed on the first X-Forwarded-For entry (flaw 34).
    assert_429(create("a2", "198.51.100.2").await.unwrap(), 1).await;
    api.stop().await;
}

/// A flood of well-formed random keys from one address is refused after the
/// failure limit without a key lookup, so a pool of two connections keeps
/// serving another client throughout.
#[tokio::test]
async fn failed_authentication_is_limited_before_the_key_lookup() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mut config = config(&db);
    config.rates.auth_failures_per_minute = 5;
    config.rates.poll_per_minute = 1000;
    config.common.db.db_pool_size = 2;
    config.rates.trusted_proxies = e2a_api::ratelimit::parse_proxies("127.0.0.1").unwrap();
    let api = Running::start(config).await;

    let mut flood = Vec::new();
    for i in 0..200 {
        let req = api
            .request(
                Method::GET,
                "/v1/account",
                &format!("e2a_{:0>64}", format!("{i:x}")),
            )
            .header("x-forwarded-for", "203.0.113.66");
        flood.push(tokio::spawn(async move { req.send().await.unwrap() }));
    }
    let legit = async {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            let resp = api
                .request(Method::GET, "/v1/account", &alice)
                .header("x-forwarded-for", "198.51.100.9")
                .send()
                .await
                .unwrap();
            statuses.push(resp.status());
        }
        statuses
    };
    let statuses = legit.await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    // An address vouched for by a success is not limited by its requests
    // in flight: 64 at once, far over the failure limit of 5, all pass.
    let burst: Vec<_> = (0..64)
        .map(|_| {
            let req = api
                .request(Method::GET, "/v1/account", &alice)
                .header("x-forwarded-for", "198.51.100.9");
            tokio::spawn(async move { req.send().await.unwrap().status() })
        })
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let (mut unauthorized, mut limited) = (0, 0);
    for t in flood {
        let resp = t.await.unwrap();
        match resp.status() {
            StatusCode::UNAUTHORIZED => unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert_429(resp, 5).await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((unauthorized, limited), (5, 195));
    // A good key the replica has not seen yet, from the limited address, is
    // refused too (the limit cannot tell it apart before looking it up),
    // and says when to come back. (A key it found valid moments ago is in
    // its key cache and costs no lookup: docs/operations.md.)
    let unseen = {
        let store = e2a_store::Store::new(&e2a_store::StoreConfig::new(db.url())).unwrap();
        let c = store.client().await.unwrap();
        let user: String = c
            .query_one("SELECT user_id FROM api_keys", &[])
            .await
            .unwrap()
            .get(0);
        e2a_store::api_keys::create(
            &c,
            &e2a_store::ids::UserId::parse(&user).unwrap(),
            "second",
            None,
        )
        .await
        .unwrap()
        .plaintext
    };
    let resp = api
        .request(Method::GET, "/v1/account", &unseen)
        .header("x-forwarded-for", "203.0.113.66")
        .send()
        .await
        .unwrap();
    assert_429(resp, 5).await;
    api.stop().await;
}

/// Two API processes on one database: the domain-registration limit (an
/// RSA key each) is shared, and both answer 429 with the same headers.
#[tokio::test]
async fn a_shared_limit_holds_across_two_api_processes() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mut config = config(&db);
    config.rates.domain_create_per_hour = 3;
    let a = Running::start(config.clone()).await;
    let b = Running::start(config).await;
    let mut created = 0;
    let mut refusals: Vec<HeaderMap> = Vec::new();
    for i in 0..8 {
        let api = if i % 2 == 0 { &a } else { &b };
        let resp = api
            .request(Method::POST, "/v1/domains", &alice)
            .json(&json!({"domain": format!("d{i}.example.com")}))
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => refusals.push(assert_429(resp, 3).await),
            other => panic!("{other}: {:?}", resp.text().await),
        }
    }
    assert_eq!(created, 3, "3 per hour in total, not per process");
    assert_eq!(refusals.len(), 5);
    let names = |h: &HeaderMap| {
        let mut n: Vec<_> = h
            .keys()
            .map(|k| k.as_str().to_owned())
            .filter(|k| k.starts_with("ratelimit-") || k == "retry-after")
            .collect();
        n.sort();
        n
    };
    let (first, last) = (&refusals[0], &refusals[refusals.len() - 1]);
    assert_eq!(names(first), names(last));
    assert_eq!(num(first, "retry-after"), num(last, "retry-after"));
    // Registering a name the account already holds is not a new key.
    let resp = a
        .request(Method::POST, "/v1/domains", &alice)
        .json(&json!({"domain": "d0.example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let _: Value = resp.json().await.unwrap();
    a.stop().await;
    b.stop().await;
}
