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
