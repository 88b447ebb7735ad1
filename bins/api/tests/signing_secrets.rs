//! `/api/v1/users/me/signing-secrets` on a real server (spec §3.8, §5.1):
//! created once with the plaintext, listed by prefix only (flaw 32), capped
//! at 5, the last one kept, another user's secret not found.

mod common;

use common::{Running, code, key_for};
use e2a_api::Config;
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

const PATH: &str = "/api/v1/users/me/signing-secrets";

#[tokio::test]
async fn signing_secrets_are_shown_once_capped_and_never_all_deleted() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let api = Running::start(Config::for_database(db.url())).await;

    let mut secrets: Vec<Value> = Vec::new();
    for i in 0..5 {
        // The body is optional.
        let req = api.request(Method::POST, PATH, &alice);
        let req = if i == 0 {
            req
        } else {
            req.json(&json!({"name": format!("rotation {i}")}))
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        let body: Value = resp.json().await.unwrap();
        let secret = body["secret"].as_str().unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.starts_with(body["secret_prefix"].as_str().unwrap()));
        assert!(body["id"].as_str().unwrap().starts_with("wsec_"));
        secrets.push(body);
    }
    let (s, body) = api
        .call(Method::POST, PATH, &alice, Some(json!({"name": "sixth"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&body), "signing_secret_cap_reached");

    // The list never carries a secret.
    let resp = api.request(Method::GET, PATH, &alice).send().await.unwrap();
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let text = resp.text().await.unwrap();
    for s in &secrets {
        assert!(!text.contains(s["secret"].as_str().unwrap()), "{text}");
    }
    let listed: Value = serde_json::from_str(&text).unwrap();
    let listed = listed["secrets"].as_array().unwrap();
    assert_eq!(listed.len(), 5);
    assert!(
        listed
            .iter()
            .all(|s| s.get("secret").is_none() && s["secret_prefix"].as_str().unwrap().len() == 12)
    );
    assert_eq!(listed[0]["name"], "rotation 4", "newest first");

    // Bob sees none of them and cannot delete them.
    let (_, theirs) = api.call(Method::GET, PATH, &bob, None).await;
    assert_eq!(theirs["secrets"], json!([]));
    let first = secrets[0]["id"].as_str().unwrap();
    let (s, body) = api
        .call(Method::DELETE, format!("{PATH}/{first}"), &bob, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // Alice deletes four; the fifth is the last and stays.
    for s in &secrets[..4] {
        let (status, _) = api
            .call(
                Method::DELETE,
                format!("{PATH}/{}", s["id"].as_str().unwrap()),
                &alice,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let last = secrets[4]["id"].as_str().unwrap();
    let (s, body) = api
        .call(Method::DELETE, format!("{PATH}/{last}"), &alice, None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(code(&body), "cannot_delete_last_signing_secret");
    let (s, body) = api
        .call(
            Method::POST,
            PATH,
            &alice,
            Some(json!({"name": "x", "extra": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    api.stop().await;
}
