//! API keys aggregate.

use e2a_store::{StoreError, api_keys, secret};
use time::{Duration, OffsetDateTime};

#[tokio::test]
async fn plaintext_is_returned_once_and_only_the_hash_is_stored() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "k1@example.com").await;
    let c = store.client().await.unwrap();
    let created = api_keys::create(&c, &user, "ci", None).await.unwrap();
    assert!(api_keys::is_well_formed(&created.plaintext));
    assert_eq!(created.key.key_prefix, &created.plaintext[..12]);
    assert!(created.key.id.as_str().starts_with("apk_"));

    let raw = db.client().await;
    let row = raw
        .query_one("SELECT key_hash, key_prefix FROM api_keys", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        secret::sha256_hex(created.plaintext.as_bytes())
    );
    // No column anywhere holds the plaintext.
    let leaks: i64 = raw
        .query_one(
            "SELECT count(*) FROM api_keys k WHERE k::text LIKE '%' || $1 || '%'",
            &[&&created.plaintext[12..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaks, 0);

    let listed = api_keys::list(&c, &user).await.unwrap();
    assert_eq!(listed, vec![created.key.clone()]);
    let p = api_keys::authenticate(&c, &created.plaintext)
        .await
        .unwrap();
    assert_eq!((p.user_id, p.key_id), (user, created.key.id));
}

#[tokio::test]
async fn malformed_unknown_expired_and_revoked_keys_are_all_not_found() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "k2@example.com").await;
    let c = store.client().await.unwrap();
    let good = api_keys::create(&c, &user, "", None).await.unwrap();

    let wrong_body = format!("e2a_{}", "0".repeat(64));
    let over_long = format!("{}00", good.plaintext);
    let upper = good.plaintext.to_uppercase();
    for bad in [
        "",
        "e2a_",
        "Bearer x",
        wrong_body.as_str(),
        over_long.as_str(),
        upper.as_str(),
        &"x".repeat(10_000),
    ] {
        assert!(
            matches!(
                api_keys::authenticate(&c, bad).await,
                Err(StoreError::NotFound)
            ),
            "{bad:.20}"
        );
    }

    let expiring = api_keys::create(
        &c,
        &user,
        "",
        Some(OffsetDateTime::now_utc() + Duration::hours(1)),
    )
    .await
    .unwrap();
    api_keys::authenticate(&c, &expiring.plaintext)
        .await
        .expect("valid before expiry");
    db.client()
        .await
        .execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&expiring.key.id],
        )
        .await
        .unwrap();
    assert!(matches!(
        api_keys::authenticate(&c, &expiring.plaintext).await,
        Err(StoreError::NotFound)
    ));

    api_keys::revoke(&c, &user, &good.key.id).await.unwrap();
    assert!(matches!(
        api_keys::authenticate(&c, &good.plaintext).await,
        Err(StoreError::NotFound)
    ));
    assert!(
        api_keys::list(&c, &user)
            .await
            .unwrap()
            .iter()
            .all(|k| k.id != good.key.id)
    );
    assert!(matches!(
        api_keys::revoke(&c, &user, &good.key.id).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn expiry_must_be_in_the_future() {
    let (_db, store) = super::store().await;
    let user = super::user(&store, "k3@example.com").await;
    let c = store.client().await.unwrap();
    let past = OffsetDateTime::now_utc() - Duration::seconds(1);
    assert!(matches!(
        api_keys::create(&c, &user, "", Some(past)).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn another_users_key_cannot_be_revoked_and_looks_missing() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    let c = store.client().await.unwrap();
    let key = api_keys::create(&c, &alice, "", None).await.unwrap();
    assert!(matches!(
        api_keys::revoke(&c, &mallory, &key.key.id).await,
        Err(StoreError::NotFound)
    ));
    api_keys::authenticate(&c, &key.plaintext)
        .await
        .expect("still valid");
    assert!(api_keys::list(&c, &mallory).await.unwrap().is_empty());
}

#[tokio::test]
async fn last_used_at_is_touched_at_most_once_a_minute() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "k4@example.com").await;
    let c = store.client().await.unwrap();
    let key = api_keys::create(&c, &user, "", None).await.unwrap();
    let raw = db.client().await;
    let last_used = || async {
        raw.query_one(
            "SELECT last_used_at FROM api_keys WHERE id = $1",
            &[&key.key.id],
        )
        .await
        .unwrap()
        .get::<_, Option<OffsetDateTime>>(0)
    };
    assert_eq!(last_used().await, None);
    api_keys::authenticate(&c, &key.plaintext).await.unwrap();
    let first = last_used().await.expect("set on first use");
    api_keys::authenticate(&c, &key.plaintext).await.unwrap();
    assert_eq!(
        last_used().await,
        Some(first),
        "not rewritten within the minute"
    );

    raw.execute(
        "UPDATE api_keys SET last_used_at = now() - interval '2 minutes' WHERE id = $1",
        &[&key.key.id],
    )
    .await
    .unwrap();
    let stale = last_used().await.unwrap();
    api_keys::authenticate(&c, &key.plaintext).await.unwrap();
    assert!(
        last_used().await.unwrap() > stale,
        "refreshed after a minute"
    );
}

#[tokio::test]
async fn keys_for_unknown_users_are_refused() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let err = api_keys::create(&c, &e2a_store::ids::UserId::new(), "", None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}
