//! Per-user signing secrets: the first secret is created exactly once.

use e2a_store::signing_secrets;

/// Many concurrent "first mails" of one user (each on its own connection)
/// create one secret, and every caller gets that one.
#[tokio::test]
async fn concurrent_first_calls_create_exactly_one_secret() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let calls = (0..8).map(|_| {
        let store = store.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut c = store.client().await.unwrap();
            signing_secrets::newest_or_create(&mut c, &alice)
                .await
                .unwrap()
        })
    });
    let mut secrets = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        secrets.push(call.await.unwrap());
    }
    let c = store.client().await.unwrap();
    let stored: i64 = c
        .query_one(
            "SELECT count(*) FROM webhook_signing_secrets WHERE user_id = $1",
            &[&alice],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    assert!(secrets.iter().all(|s| *s == secrets[0]));
    // Later calls read the same secret.
    let mut c = store.client().await.unwrap();
    assert_eq!(
        signing_secrets::newest_or_create(&mut c, &alice)
            .await
            .unwrap(),
        secrets[0]
    );
}

/// Spec §3.8 with flaw 32 fixed: concurrent creations never pass the cap of
/// 5, lists show prefixes (never the secret), the last secret cannot be
/// deleted even by concurrent deletions, and another user's secret is
/// not found.
#[tokio::test]
async fn secrets_are_capped_listed_by_prefix_and_never_all_deleted() {
    use signing_secrets::{MAX_PER_USER, PREFIX_LEN, SecretError};
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;

    let creations: Vec<_> = (0..12)
        .map(|i| {
            let (store, alice) = (store.clone(), alice.clone());
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                signing_secrets::create(&mut c, &alice, &format!(" key {i} ")).await
            })
        })
        .collect();
    let mut created = Vec::new();
    for t in creations {
        match t.await.unwrap() {
            Ok(s) => created.push(s),
            Err(SecretError::CapReached) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created.len() as i64, MAX_PER_USER);
    let c = store.client().await.unwrap();
    let listed = signing_secrets::list(&c, &alice).await.unwrap();
    assert_eq!(listed.len() as i64, MAX_PER_USER);
    for info in &listed {
        let made = created.iter().find(|s| s.info.id == info.id).unwrap();
        assert_eq!(info.secret_prefix.len(), PREFIX_LEN);
        assert!(made.secret.starts_with(&info.secret_prefix));
        assert_eq!(made.secret.len(), 64);
        assert!(info.name.starts_with("key "), "trimmed: {:?}", info.name);
    }
    assert!(
        !format!("{created:?}").contains(&created[0].secret),
        "Debug never shows a secret"
    );
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at)
    );

    // Bob cannot see or delete Alice's secrets.
    assert!(signing_secrets::list(&c, &bob).await.unwrap().is_empty());
    let mut cb = store.client().await.unwrap();
    assert!(matches!(
        signing_secrets::delete(&mut cb, &bob, listed[0].id.as_str()).await,
        Err(SecretError::NotFound)
    ));
    assert!(matches!(
        signing_secrets::delete(&mut cb, &alice, "wsec_missing").await,
        Err(SecretError::NotFound)
    ));

    // Delete all of them at once: exactly one survives.
    let deletions: Vec<_> = listed
        .iter()
        .map(|info| {
            let (store, alice, id) = (store.clone(), alice.clone(), info.id.clone());
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                signing_secrets::delete(&mut c, &alice, id.as_str()).await
            })
        })
        .collect();
    let mut last = 0;
    for t in deletions {
        match t.await.unwrap() {
            Ok(()) => {}
            Err(SecretError::LastSecret) => last += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(last, 1);
    assert_eq!(signing_secrets::list(&c, &alice).await.unwrap().len(), 1);
    // The survivor still signs: it is the newest.
    let mut ca = store.client().await.unwrap();
    let newest = signing_secrets::newest_or_create(&mut ca, &alice)
        .await
        .unwrap();
    assert!(created.iter().any(|s| s.secret == newest.secret));

    // Names are bounded.
    assert!(matches!(
        signing_secrets::create(&mut ca, &alice, &"n".repeat(101)).await,
        Err(SecretError::InvalidName)
    ));
    assert!(matches!(
        signing_secrets::create(&mut ca, &alice, "a\nb").await,
        Err(SecretError::InvalidName)
    ));
}
