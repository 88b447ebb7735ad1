//! Sessions aggregate.

use e2a_store::{StoreError, secret, sessions};
use time::Duration;

#[tokio::test]
async fn issued_token_authenticates_and_only_its_hash_is_stored() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "s1@example.com").await;
    let c = store.client().await.unwrap();
    let s = sessions::create(&c, &user, sessions::SESSION_TTL)
        .await
        .unwrap();
    assert!(s.token.starts_with(sessions::TOKEN_PREFIX));
    assert_eq!(sessions::authenticate(&c, &s.token).await.unwrap(), user);
    let raw = db.client().await;
    let stored: String = raw
        .query_one("SELECT token_hash FROM user_sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, secret::sha256_hex(s.token.as_bytes()));
    assert_ne!(stored, s.token);
}

#[tokio::test]
async fn expired_revoked_and_malformed_tokens_are_not_found() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "s2@example.com").await;
    let c = store.client().await.unwrap();
    let expired = sessions::create(&c, &user, Duration::hours(1))
        .await
        .unwrap();
    db.client()
        .await
        .execute(
            "UPDATE user_sessions SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
            &[&secret::sha256_hex(expired.token.as_bytes())],
        )
        .await
        .unwrap();
    assert!(matches!(
        sessions::authenticate(&c, &expired.token).await,
        Err(StoreError::NotFound)
    ));

    let revoked = sessions::create(&c, &user, Duration::hours(1))
        .await
        .unwrap();
    assert!(sessions::revoke(&c, &revoked.token).await.unwrap());
    assert!(
        !sessions::revoke(&c, &revoked.token).await.unwrap(),
        "revoke is idempotent"
    );
    assert!(matches!(
        sessions::authenticate(&c, &revoked.token).await,
        Err(StoreError::NotFound)
    ));

    for bad in [
        "",
        "e2s_",
        "e2s_zz",
        &format!("{}x", revoked.token),
        "e2a_0000",
    ] {
        assert!(
            matches!(
                sessions::authenticate(&c, bad).await,
                Err(StoreError::NotFound)
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        sessions::create(&c, &user, Duration::ZERO).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn delete_expired_removes_only_dead_sessions() {
    let (db, store) = super::store().await;
    let user = super::user(&store, "s3@example.com").await;
    let c = store.client().await.unwrap();
    let live = sessions::create(&c, &user, Duration::hours(1))
        .await
        .unwrap();
    let dead = sessions::create(&c, &user, Duration::hours(1))
        .await
        .unwrap();
    let revoked = sessions::create(&c, &user, Duration::hours(1))
        .await
        .unwrap();
    sessions::revoke(&c, &revoked.token).await.unwrap();
    db.client()
        .await
        .execute(
            "UPDATE user_sessions SET expires_at = now() - interval '1 minute' WHERE token_hash = $1",
            &[&secret::sha256_hex(dead.token.as_bytes())],
        )
        .await
        .unwrap();
    assert_eq!(sessions::delete_expired(&c, 100).await.unwrap(), 2);
    assert_eq!(sessions::delete_expired(&c, 100).await.unwrap(), 0);
    assert_eq!(sessions::authenticate(&c, &live.token).await.unwrap(), user);
}

#[tokio::test]
async fn sessions_of_unknown_users_are_refused() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let err = sessions::create(&c, &e2a_store::ids::UserId::new(), Duration::hours(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}
