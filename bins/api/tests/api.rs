//! The API end to end: a real server on a port-0 listener, a real Postgres
//! from the testkit, a real HTTP client.

mod common;

use std::time::Duration;

use common::{Running, error_body, key_for};
use e2a_api::Config;
use e2a_store::{
    Store, StoreConfig, address::EmailAddress, api_keys, migrate::MigrationMode, users,
};
use e2a_testkit::{PrivateCluster, TestDb};
use reqwest::{StatusCode, header};
use serde_json::Value;

#[tokio::test]
async fn health_info_and_request_ids() {
    let db = TestDb::new().await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "Agents.LocalHost".into();
    config.public_url = Some("http://localhost:8080".into());
    let api = Running::start(config).await;

    let resp = api.get("/api/health", None).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );

    let head = api
        .http
        .head(format!("{}/api/health", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);

    let echoed = api
        .http
        .get(format!("{}/api/health", api.base))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-abc-123");

    let info: Value = api.get("/v1/info", None).await.json().await.unwrap();
    assert_eq!(
        info,
        serde_json::json!({"shared_domain": "agents.localhost", "slug_registration_enabled": true, "public_url": "http://localhost:8080"})
    );

    for path in ["/healthz", "/readyz"] {
        let resp = api
            .http
            .get(format!("{}{path}", api.ops))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let metrics = api
        .http
        .get(format!("{}/metrics", api.ops))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("e2a_db_pool_max_connections"), "{metrics}");
    api.stop().await;
}

#[tokio::test]
async fn account_answers_limits_and_usage_for_a_valid_key() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "owner@example.com").await;
    let api = Running::start(Config::for_database(db.url())).await;
    for auth in [
        format!("Bearer {key}"),
        format!("bearer {key}"),
        key.clone(),
    ] {
        let resp = api.get("/v1/account", Some(&auth)).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "plan_code": "default",
                "limits": {"max_agents": 1_000_000, "max_domains": 1_000_000,
                           "max_messages_month": 1_000_000_000, "max_storage_bytes": 1_i64 << 50},
                "usage": {"agents": 0, "domains": 0, "messages_month": 0, "storage_bytes": 0},
                "upgrade_url": ""
            })
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn every_bad_credential_is_401_never_500() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "victim@example.com").await;
    let revoked = {
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let c = store.client().await.unwrap();
        let user = users::get_by_email(&c, &EmailAddress::parse("victim@example.com").unwrap())
            .await
            .unwrap();
        let k = api_keys::create(&c, &user.id, "old", None).await.unwrap();
        api_keys::revoke(&c, &user.id, &k.key.id).await.unwrap();
        let expired = api_keys::create(
            &c,
            &user.id,
            "exp",
            Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
        )
        .await
        .unwrap();
        c.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&expired.key.id],
        )
        .await
        .unwrap();
        vec![k.plaintext, expired.plaintext]
    };
    let api = Running::start(Config::for_database(db.url())).await;

    let missing = api.get("/v1/account", None).await;
    assert_eq!(
        missing.headers()[header::WWW_AUTHENTICATE],
        r#"Bearer realm="e2a""#
    );
    let (status, body) = error_body(missing).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );

    let wrong_body = format!("Bearer e2a_{}", "f".repeat(64));
    let over_long = format!("Bearer {key}{}", "a".repeat(5000));
    let mut bad = vec![
        "Basic dXNlcjpwYXNz".to_owned(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        "Bearer e2a_".to_owned(),
        "Bearer not-a-key".to_owned(),
        wrong_body,
        over_long,
        format!("Bearer {}", key.to_uppercase()),
        format!("Bearer {key} extra"),
    ];
    bad.extend(revoked.iter().map(|k| format!("Bearer {k}")));
    for auth in &bad {
        let (status, body) = error_body(api.get("/v1/account", Some(auth)).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:.40}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // Non-UTF-8 header bytes.
    let resp = api
        .http
        .get(format!("{}/v1/account", api.base))
        .header(
            header::AUTHORIZATION,
            header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Two Authorization headers, even both valid: ambiguous, so refused.
    let resp = api
        .http
        .get(format!("{}/v1/account", api.base))
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // And the good key still works.
    assert_eq!(
        api.get("/v1/account", Some(&format!("Bearer {key}")))
            .await
            .status(),
        200
    );
    api.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let db = TestDb::new().await;
    let api = Running::start(Config::for_database(db.url())).await;
    let (status, body) = error_body(api.get("/v1/nope", None).await).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let resp = api
        .http
        .post(format!("{}/v1/account", api.base))
        .send()
        .await
        .unwrap();
    let (status, body) = error_body(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let resp = api
        .http
        .get(format!("{}/v1/info", api.base))
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap();
    let (status, body) = error_body(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    api.stop().await;
}

#[tokio::test]
async fn database_outage_gives_503_and_recovers() {
    let cluster = PrivateCluster::start().await;
    let key = key_for(&cluster.database_url(), "outage@example.com").await;
    let api = Running::start(Config::for_database(cluster.database_url())).await;
    let auth = format!("Bearer {key}");
    assert_eq!(api.get("/v1/account", Some(&auth)).await.status(), 200);
    let readyz = || async {
        api.http
            .get(format!("{}/readyz", api.ops))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(readyz().await.status(), 200);

    cluster.stop().await;
    let not_ready = readyz().await;
    assert_eq!(not_ready.status(), 503);
    assert_eq!(not_ready.headers()[header::RETRY_AFTER], "5");
    let resp = api.get("/v1/account", Some(&auth)).await;
    assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
    let (status, body) = error_body(resp).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Liveness does not depend on the database.
    assert_eq!(api.get("/api/health", None).await.status(), 200);
    assert_eq!(
        api.http
            .get(format!("{}/healthz", api.ops))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    cluster.start_again().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if readyz().await.status() == 200
            && api.get("/v1/account", Some(&auth)).await.status() == 200
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not recover after the database returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    api.stop().await;
}

#[tokio::test]
async fn a_rotated_database_password_is_503_with_retry_after_and_recovers() {
    let cluster = PrivateCluster::start().await;
    let url = cluster.password_role("e2a_app", "first").await;
    let key = key_for(&url, "rotation@example.com").await;
    let mut config = Config::for_database(url.clone());
    config.common.db.db_pool_size = 2;
    let api = Running::start(config).await;
    let auth = format!("Bearer {key}");
    let routes = ["/v1/account", "/v1/agents", "/v1/domains"];
    for path in routes {
        assert_eq!(api.get(path, Some(&auth)).await.status(), 200, "{path}");
    }

    // Rotate the password. Sessions already open stay logged in, so end
    // them, as a pooler restart or failover during a rotation does: every
    // connection the API opens from now on is refused with 28P01.
    let admin = Store::new(&StoreConfig::new(cluster.url("postgres"))).unwrap();
    let admin = admin.client().await.unwrap();
    admin
        .batch_execute("ALTER ROLE e2a_app PASSWORD 'second'")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = 'e2a_app'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "sessions linger");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale = Store::new(&StoreConfig::new(url)).unwrap();
    let refused = stale.client().await.unwrap_err();
    assert!(refused.is_login_refused(), "{refused:?}");

    // Every request: 503 with Retry-After, never 500 (the old mapping of
    // 28P01) or 401 (the key was never the problem).
    for _ in 0..2 {
        for path in routes {
            let resp = api.get(path, Some(&auth)).await;
            assert_eq!(resp.headers()[header::RETRY_AFTER], "5", "{path}");
            let (status, body) = error_body(resp).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, Some("service_unavailable")),
                "{path}: {body}"
            );
        }
    }

    // The credentials the API holds become valid again: it recovers.
    admin
        .batch_execute("ALTER ROLE e2a_app PASSWORD 'first'")
        .await
        .unwrap();
    for path in routes {
        assert_eq!(api.get(path, Some(&auth)).await.status(), 200, "{path}");
    }
    api.stop().await;
}

#[tokio::test]
async fn unreachable_database_at_start_fails_after_a_bounded_retry() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::for_database(format!("postgres://postgres@127.0.0.1:{port}/e2a"));
    config.common.db.db_startup_timeout_secs = 1;
    config.common.db.db_connect_timeout_ms = 300;
    let api = Running::start(config).await;
    let err = tokio::time::timeout(Duration::from_secs(15), api.task)
        .await
        .expect("start-up retry is bounded")
        .unwrap()
        .unwrap_err();
    let message = e2a_runtime::error_chain(err.as_ref());
    assert!(message.contains("database unreachable"), "{message}");
}

#[tokio::test]
async fn a_shutdown_signal_during_start_up_retries_stops_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::for_database(format!("postgres://postgres@127.0.0.1:{port}/e2a"));
    config.common.db.db_startup_timeout_secs = 600;
    config.common.db.db_connect_timeout_ms = 300;
    let api = Running::start(config).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), api.task)
        .await
        .expect("SIGTERM during start-up must not wait out the retry budget")
        .unwrap();
    assert!(
        result.is_ok(),
        "a requested stop is a clean exit: {result:?}"
    );
}

#[tokio::test]
async fn a_permanent_database_error_at_start_is_not_retried() {
    let db = TestDb::new().await;
    let (server, _) = db.url().rsplit_once('/').unwrap();
    let mut config = Config::for_database(format!("{server}/no_such_database"));
    config.common.db.db_startup_timeout_secs = 600;
    let api = Running::start(config).await;
    let err = tokio::time::timeout(Duration::from_secs(10), api.task)
        .await
        .expect("an unknown database fails at once")
        .unwrap()
        .unwrap_err();
    let message = e2a_runtime::error_chain(err.as_ref());
    assert!(message.contains("no_such_database"), "{message}");
}

#[tokio::test]
async fn verify_mode_refuses_an_unmigrated_database_naming_the_migrations() {
    let db = TestDb::empty().await;
    let mut config = Config::for_database(db.url());
    config.common.migration_mode = MigrationMode::Verify;
    let api = Running::start(config).await;
    let err = tokio::time::timeout(Duration::from_secs(15), api.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let message = e2a_runtime::error_chain(err.as_ref());
    assert!(
        message.contains("pending migration(s)") && message.contains("V1__accounts"),
        "{message}"
    );
}

#[tokio::test]
async fn two_services_started_at_once_on_an_empty_database_both_come_up() {
    let db = TestDb::empty().await;
    let (a, b) = tokio::join!(
        Running::start(Config::for_database(db.url())),
        Running::start(Config::for_database(db.url()))
    );
    for api in [&a, &b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = api
                .http
                .get(format!("{}/readyz", api.ops))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(!api.task.is_finished(), "a service failed to start");
            assert!(
                tokio::time::Instant::now() < deadline,
                "service never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}

/// Waits until `n` API processes have their `LISTEN api_keys_changed` in
/// place (their key caches are on).
async fn wait_for_key_listeners(db: &TestDb, n: i64) {
    let c = db.client().await;
    for _ in 0..200 {
        let listening: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'e2a-api-listen' AND query = 'LISTEN api_keys_changed'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if listening >= n {
            // The cache turns on right after the LISTEN returns.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the API processes never listened for key changes");
}

/// Polls each server with `auth` until it answers 401; fails with `what`
/// if that takes 3 s (far less than the 10 s the cache keeps a key).
async fn refused_within_3s(servers: &[&Running], auth: &str, what: &str) {
    let started = std::time::Instant::now();
    for api in servers {
        while api.get("/v1/account", Some(auth)).await.status() != StatusCode::UNAUTHORIZED {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{what} after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Keys found valid are cached for `E2A_API_KEY_CACHE_SECS` (10 s here),
/// yet a change to any key reaches every replica within moments: two API
/// servers on one database both hold the key (a revocation hidden from
/// them by a disabled trigger is not seen: they answer from memory), then
/// the next statement that changes keys notifies, and both refuse the key
/// long before the 10 s are up. A replica that lost its notification
/// connection stops trusting its memory at once.
#[tokio::test]
async fn a_key_change_reaches_every_replicas_key_cache_at_once() {
    let db = TestDb::new().await;
    let key = key_for(db.url(), "cached@example.com").await;
    let a = Running::start(Config::for_database(db.url())).await;
    let b = Running::start(Config::for_database(db.url())).await;
    wait_for_key_listeners(&db, 2).await;
    let auth = format!("Bearer {key}");
    for api in [&a, &b] {
        assert_eq!(api.get("/v1/account", Some(&auth)).await.status(), 200);
    }
    let c = db.client().await;
    c.batch_execute(
        "ALTER TABLE api_keys DISABLE TRIGGER api_keys_changed; \
         UPDATE api_keys SET revoked_at = now(); \
         ALTER TABLE api_keys ENABLE TRIGGER api_keys_changed",
    )
    .await
    .unwrap();
    for api in [&a, &b] {
        assert_eq!(
            api.get("/v1/account", Some(&auth)).await.status(),
            200,
            "answered from the cache"
        );
    }
    // Any statement changing a key's expiry notifies (even a no-op one).
    c.batch_execute("UPDATE api_keys SET expires_at = expires_at")
        .await
        .unwrap();
    refused_within_3s(&[&a, &b], &auth, "a revoked key still works").await;

    // A new key, cached; then the notification connections are cut and the
    // key revoked unseen: a deaf replica has already dropped its memory.
    let key = {
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let c = store.client().await.unwrap();
        let user = users::get_by_email(&c, &EmailAddress::parse("cached@example.com").unwrap())
            .await
            .unwrap();
        api_keys::create(&c, &user.id, "second", None)
            .await
            .unwrap()
            .plaintext
    };
    let auth = format!("Bearer {key}");
    for api in [&a, &b] {
        assert_eq!(api.get("/v1/account", Some(&auth)).await.status(), 200);
    }
    c.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'e2a-api-listen'",
    )
    .await
    .unwrap();
    c.batch_execute(
        "ALTER TABLE api_keys DISABLE TRIGGER api_keys_changed; \
         UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL; \
         ALTER TABLE api_keys ENABLE TRIGGER api_keys_changed",
    )
    .await
    .unwrap();
    refused_within_3s(&[&a, &b], &auth, "a deaf replica still trusts its cache").await;
    a.stop().await;
    b.stop().await;
}
