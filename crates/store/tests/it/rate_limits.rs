//! Shared rate limits (V13): exact under concurrency from several pools,
//! refusals consume nothing, full buckets are swept.

use std::time::Duration;

use e2a_store::{
    Store, StoreConfig,
    rate_limits::{self, Quota},
};

/// Two stores (two pools, as two API replicas have) hammer one key with 40
/// concurrent requests: exactly the limit is admitted, and every refusal
/// says when to come back.
#[tokio::test]
async fn concurrent_replicas_admit_exactly_the_limit() {
    let (db, a) = super::store().await;
    let b = Store::new(&StoreConfig::new(db.url())).unwrap();
    let quota = Quota::per_minute(7);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let c = store.client().await.unwrap();
            rate_limits::hit(&c, "send:bot@example.com", quota)
                .await
                .unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let d = t.await.unwrap();
        assert_eq!(d.limit, 7);
        if d.allowed {
            admitted += 1;
            assert!(d.remaining < 7);
        } else {
            assert_eq!(d.remaining, 0);
            assert!((1..=9).contains(&d.retry_after_secs), "{d:?}");
            assert!((55..=61).contains(&d.reset_after_secs), "{d:?}");
        }
    }
    assert_eq!(admitted, 7);
    // Another key is untouched.
    let c = a.client().await.unwrap();
    let other = rate_limits::hit(&c, "send:other@example.com", quota)
        .await
        .unwrap();
    assert!(other.allowed);
    assert_eq!(other.remaining, 6);
}

/// A key refills at limit/window, refusals do not push the next slot back,
/// and the janitor's sweep removes keys whose bucket is full again.
#[tokio::test]
async fn keys_refill_and_full_buckets_are_swept() {
    let (db, store) = super::store().await;
    let c = store.client().await.unwrap();
    // 2 per 600 ms: one slot every 300 ms.
    let quota = Quota {
        limit: 2,
        window: Duration::from_millis(600),
    };
    assert!(rate_limits::hit(&c, "k", quota).await.unwrap().allowed);
    assert!(rate_limits::hit(&c, "k", quota).await.unwrap().allowed);
    for _ in 0..5 {
        assert!(!rate_limits::hit(&c, "k", quota).await.unwrap().allowed);
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let d = rate_limits::hit(&c, "k", quota).await.unwrap();
    assert!(d.allowed, "a slot refilled despite the refusals: {d:?}");
    assert!(!rate_limits::hit(&c, "k", quota).await.unwrap().allowed);

    assert_eq!(
        rate_limits::sweep(&c, 100).await.unwrap(),
        0,
        "not full yet"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(rate_limits::sweep(&c, 100).await.unwrap(), 1);
    let left: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM rate_limits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
