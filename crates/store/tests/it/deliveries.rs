//! The subscriber delivery queue (V17): one delivery in flight per webhook
//! across claimers, leases that pass on and guard the record, retries,
//! last attempts, and auto-disable decided with the failure.

use std::time::Duration;

use e2a_store::{
    Store, StoreConfig,
    deliveries::{self, Attempt, Recorded},
    ids::UserId,
};
use time::OffsetDateTime;

const LEASE: Duration = Duration::from_secs(60);

async fn webhook(store: &Store, user: &UserId, id: &str) {
    let c = store.client().await.unwrap();
    c.execute(
        "INSERT INTO webhooks (id, user_id, url, events, signing_secret) \
         VALUES ($1, $2, 'https://hooks.example.com/' || $1, '{email.received}', 'whsec_' || $1)",
        &[&id, &user.as_str()],
    )
    .await
    .unwrap();
}

/// `n` due test-send deliveries to `webhook`, allowed `max_attempts` each.
async fn deliveries(store: &Store, user: &UserId, webhook: &str, n: i32, max_attempts: i32) {
    let c = store.client().await.unwrap();
    c.execute(
        "INSERT INTO webhook_subscriber_deliveries \
           (id, user_id, webhook_id, event_type, event_payload, max_attempts, next_retry_at) \
         SELECT 'whd_' || $2 || '_' || g, $1, $2, 'webhook.test', '{\"event\": \"webhook.test\"}', $4, \
                now() - make_interval(secs => $3 - g) \
           FROM generate_series(1, $3) g",
        &[&user.as_str(), &webhook, &n, &max_attempts],
    )
    .await
    .unwrap();
}

async fn status(store: &Store, id: &str) -> (String, i32) {
    let row = store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT status, attempts FROM webhook_subscriber_deliveries WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn one_delivery_in_flight_per_webhook_across_claimers() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    for w in ["wh_a", "wh_b"] {
        webhook(&store, &alice, w).await;
        deliveries(&store, &alice, w, 3, 8).await;
    }
    // Four claimers on their own pools (as four replicas), at once.
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let store = Store::new(&StoreConfig::new(db.url())).unwrap();
            tokio::spawn(async move {
                let c = store.client().await.unwrap();
                deliveries::claim(&c, 10, LEASE).await.unwrap()
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for t in claims {
        claimed.extend(t.await.unwrap());
    }
    let mut hooks: Vec<_> = claimed.iter().map(|d| d.webhook_id.clone()).collect();
    hooks.sort();
    assert_eq!(hooks, ["wh_a", "wh_b"], "{claimed:?}");
    // Each got its webhook's oldest due delivery, with its secret and URL.
    for d in &claimed {
        assert_eq!(d.id, format!("whd_{}_1", d.webhook_id));
        assert_eq!(d.secret, format!("whsec_{}", d.webhook_id));
        assert!(d.url.ends_with(&d.webhook_id));
        assert_eq!((d.attempts, d.max_attempts), (1, 8));
        assert!(d.envelope.is_some() && d.event_id.is_none());
    }
    let c = store.client().await.unwrap();
    assert!(deliveries::claim(&c, 10, LEASE).await.unwrap().is_empty());

    // Recording frees the webhook for its next delivery.
    let a = claimed.iter().find(|d| d.webhook_id == "wh_a").unwrap();
    let cm = store.client().await.unwrap();
    let r = deliveries::record(
        &cm,
        &a.id,
        &a.lease_token,
        Attempt::Delivered { status: 204 },
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        Recorded::Stored {
            failed: false,
            auto_disabled: false
        }
    );
    assert_eq!(status(&store, &a.id).await, ("delivered".into(), 1));
    let next = deliveries::claim(&c, 10, LEASE).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, "whd_wh_a_2");
}

#[tokio::test]
async fn a_lapsed_lease_passes_on_and_the_late_worker_writes_nothing() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 1, 8).await;
    let c = store.client().await.unwrap();
    let slow = deliveries::claim(&c, 10, Duration::from_millis(300))
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taker = deliveries::claim(&c, 10, LEASE).await.unwrap().remove(0);
    assert_eq!(taker.id, slow.id);
    assert_eq!(taker.attempts, 2, "the lost attempt counts");
    let cm = store.client().await.unwrap();
    assert_eq!(
        deliveries::record(
            &cm,
            &slow.id,
            &slow.lease_token,
            Attempt::Failed {
                status: 500,
                error: "HTTP 500"
            }
        )
        .await
        .unwrap(),
        Recorded::LeaseLost
    );
    deliveries::record(
        &cm,
        &taker.id,
        &taker.lease_token,
        Attempt::Delivered { status: 200 },
    )
    .await
    .unwrap();
    assert_eq!(status(&store, &taker.id).await, ("delivered".into(), 2));
    let failures: i32 = c
        .query_one(
            "SELECT consecutive_failures FROM webhooks WHERE id = 'wh_a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failures, 0);
}

#[tokio::test]
async fn retries_wait_and_the_last_attempt_ends_failed() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 1, 2).await;
    let c = store.client().await.unwrap();
    let cm = store.client().await.unwrap();
    let d = deliveries::claim(&c, 10, LEASE).await.unwrap().remove(0);
    let at = OffsetDateTime::now_utc() + time::Duration::milliseconds(400);
    deliveries::record(
        &cm,
        &d.id,
        &d.lease_token,
        Attempt::Retry {
            status: 503,
            error: "HTTP 503",
            at,
        },
    )
    .await
    .unwrap();
    assert!(deliveries::claim(&c, 10, LEASE).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = deliveries::claim(&c, 10, LEASE).await.unwrap().remove(0);
    assert_eq!(d.attempts, 2);
    let r = deliveries::record(
        &cm,
        &d.id,
        &d.lease_token,
        Attempt::Retry {
            status: 0,
            error: "connection refused",
            at: OffsetDateTime::now_utc(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        Recorded::Stored {
            failed: true,
            auto_disabled: false
        }
    );
    assert_eq!(status(&store, &d.id).await, ("failed".into(), 2));

    // A last attempt whose worker vanished is failed by the next claim.
    webhook(&store, &alice, "wh_c").await;
    deliveries(&store, &alice, "wh_c", 1, 1).await;
    let lost = deliveries::claim(&c, 10, Duration::from_millis(200))
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(deliveries::claim(&c, 10, LEASE).await.unwrap().is_empty());
    assert_eq!(status(&store, &lost.id).await, ("failed".into(), 1));
}

#[tokio::test]
async fn ten_failures_without_a_success_disable_the_webhook_at_once() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 11, 1).await;
    let c = store.client().await.unwrap();
    let cm = store.client().await.unwrap();
    for i in 1..=10 {
        let d = deliveries::claim(&c, 10, LEASE).await.unwrap().remove(0);
        let r = deliveries::record(
            &cm,
            &d.id,
            &d.lease_token,
            Attempt::Failed {
                status: 410,
                error: "HTTP 410",
            },
        )
        .await
        .unwrap();
        assert_eq!(
            r,
            Recorded::Stored {
                failed: true,
                auto_disabled: i == 10
            },
            "failure {i}"
        );
    }
    let row = c
        .query_one(
            "SELECT enabled, auto_disabled_at IS NOT NULL, consecutive_failures FROM webhooks WHERE id = 'wh_a'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, i32>(2)
        ),
        (false, true, 10)
    );
    // The eleventh waits while the webhook is disabled.
    assert!(deliveries::claim(&c, 10, LEASE).await.unwrap().is_empty());
    assert_eq!(status(&store, "whd_wh_a_11").await, ("pending".into(), 0));
}

/// The claim's asynchronous commit is its own: the pooled connection it
/// ran on commits the next transaction (a record) durably again.
#[tokio::test]
async fn the_asynchronous_claim_commit_does_not_leak_to_the_connection() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 1, 8).await;
    let c = store.client().await.unwrap();
    // (The throwaway test cluster runs with it off; production has it on.)
    c.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    assert_eq!(deliveries::claim(&c, 10, LEASE).await.unwrap().len(), 1);
    e2a_store::fanout::fan_out(&c, 10).await.unwrap();
    let setting: String = c
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "on");
}

/// A record that waits for a fan-out's lock on its webhook must not hide
/// the delivery that fan-out created: its snapshot cannot see it, so the
/// webhook is left due and the next claim finds it.
#[tokio::test]
async fn a_record_racing_a_fan_out_leaves_the_new_delivery_claimable() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 1, 8).await;
    let c = store.client().await.unwrap();
    let d = deliveries::claim(&c, 10, LEASE).await.unwrap().remove(0);

    // A fan-out in progress: its delivery is inserted and its trigger holds
    // the webhook row.
    let mut f = store.client().await.unwrap();
    let fanout = f.transaction().await.unwrap();
    fanout
        .execute(
            "INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, event_payload) \
             VALUES ('whd_new', $1, 'wh_a', 'webhook.test', '{}')",
            &[&alice.as_str()],
        )
        .await
        .unwrap();
    let recorder = {
        let store = store.clone();
        let (id, token) = (d.id.clone(), d.lease_token.clone());
        tokio::spawn(async move {
            let c = store.client().await.unwrap();
            deliveries::record(&c, &id, &token, Attempt::Delivered { status: 200 })
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!recorder.is_finished(), "the record waits for the fan-out");
    fanout.commit().await.unwrap();
    recorder.await.unwrap();

    let again = deliveries::claim(&c, 10, LEASE).await.unwrap();
    assert_eq!(
        again.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["whd_new"]
    );
}

/// Several outcomes in one transaction: each is guarded by its own lease
/// (a lapsed one is `LeaseLost` and writes nothing while the others
/// commit), results come back in the items' order, and every webhook is
/// freed for its next delivery.
#[tokio::test]
async fn a_batch_of_outcomes_commits_together_each_under_its_own_lease() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    for w in ["wh_a", "wh_b", "wh_c"] {
        webhook(&store, &alice, w).await;
        deliveries(&store, &alice, w, 2, 8).await;
    }
    let c = store.client().await.unwrap();
    let mut claimed = deliveries::claim(&c, 10, LEASE).await.unwrap();
    claimed.sort_by(|a, b| a.webhook_id.cmp(&b.webhook_id));
    assert_eq!(claimed.len(), 3);
    let stale = "lease_not_this_one".to_owned();
    let items = [
        deliveries::RecordItem {
            id: &claimed[0].id,
            token: &claimed[0].lease_token,
            attempt: Attempt::Delivered { status: 200 },
        },
        deliveries::RecordItem {
            id: &claimed[1].id,
            token: &stale,
            attempt: Attempt::Delivered { status: 200 },
        },
        deliveries::RecordItem {
            id: &claimed[2].id,
            token: &claimed[2].lease_token,
            attempt: Attempt::Failed {
                status: 410,
                error: "HTTP 410",
            },
        },
    ];
    let recorded = deliveries::record_batch(&store, &items).await.unwrap();
    assert_eq!(
        recorded,
        [
            Recorded::Stored {
                failed: false,
                auto_disabled: false
            },
            Recorded::LeaseLost,
            Recorded::Stored {
                failed: true,
                auto_disabled: false
            },
        ]
    );
    assert_eq!(
        status(&store, &claimed[0].id).await,
        ("delivered".into(), 1)
    );
    assert_eq!(status(&store, &claimed[1].id).await, ("pending".into(), 1));
    assert_eq!(status(&store, &claimed[2].id).await, ("failed".into(), 1));
    // wh_a and wh_c are free for their second delivery; wh_b is still held.
    let mut next: Vec<_> = deliveries::claim(&c, 10, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    next.sort();
    assert_eq!(next, ["whd_wh_a_2", "whd_wh_c_2"]);
}

/// The claim function runs with generic plans (V26: a function-level
/// `plan_cache_mode`) and its commit is still asynchronous: the function's
/// own setting is restored at its exit, its `SET LOCAL` of
/// `synchronous_commit` lasts to the end of the transaction.
#[tokio::test]
async fn the_claim_keeps_generic_plans_and_its_asynchronous_commit() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_a").await;
    deliveries(&store, &alice, "wh_a", 1, 8).await;
    let c = store.client().await.unwrap();
    c.batch_execute("SET synchronous_commit = on; BEGIN")
        .await
        .unwrap();
    let n = c
        .query(
            "SELECT id FROM e2a_claim_subscriber_deliveries(10, 60, 'lease_t')",
            &[],
        )
        .await
        .unwrap()
        .len();
    assert_eq!(n, 1);
    let row = c
        .query_one(
            "SELECT current_setting('synchronous_commit'), current_setting('plan_cache_mode')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("off".into(), "auto".into())
    );
    c.batch_execute("COMMIT").await.unwrap();
    let configured: Vec<String> = c
        .query(
            "SELECT p.proname FROM pg_proc p \
             WHERE 'plan_cache_mode=force_generic_plan' = ANY (p.proconfig) ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        configured,
        [
            "e2a_claim_mail_deliveries",
            "e2a_claim_subscriber_deliveries",
            "e2a_record_subscriber_delivery"
        ]
    );
}
