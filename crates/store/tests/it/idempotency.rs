//! Idempotency keys (spec §3.3) on a real database: acquire, in flight,
//! reuse and replay; release; stale takeover fenced by the ticket; replay
//! windows; exactly one winner among parallel claims and across open
//! transactions; the 24 h sweep.

use std::sync::Arc;

use e2a_store::{
    Store, StoreConfig,
    idempotency::{self, Claim, Key, Response, Ticket},
    ids::UserId,
};
use tokio::sync::Barrier;

const ROUTE: &str = "/v1/agents/demo@example.com/messages";

fn hash(body: &str) -> String {
    idempotency::request_hash(ROUTE, body.as_bytes())
}

async fn claim(store: &Store, user: &UserId, key: &Key, body: &str) -> Claim {
    let c = store.client().await.unwrap();
    idempotency::claim(&c, user, key, ROUTE, &hash(body))
        .await
        .unwrap()
}

fn acquired(claim: Claim) -> Ticket {
    match claim {
        Claim::Acquired(t) => t,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// Moves the key's claim time `secs` seconds into the past.
async fn age(store: &Store, user: &UserId, key: &Key, secs: f64) {
    store
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE idempotency_keys SET created_at = created_at - make_interval(secs => $3), \
               completed_at = completed_at - make_interval(secs => $3) \
             WHERE user_id = $1 AND key = $2",
            &[user, &key.as_str(), &secs],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn acquire_in_flight_complete_replay_and_reuse() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::client("order-42").unwrap();
    let c = store.client().await.unwrap();

    let ticket = acquired(claim(&store, &alice, &key, r#"{"a":1}"#).await);
    assert_eq!(
        claim(&store, &alice, &key, r#"{"a":1}"#).await,
        Claim::InFlight
    );
    assert_eq!(
        claim(&store, &alice, &key, r#"{"a":2}"#).await,
        Claim::InFlight,
        "in progress wins over a different body"
    );

    assert!(
        idempotency::complete(&c, &ticket, 202, br#"{"status":"queued"}"#)
            .await
            .unwrap()
    );
    assert!(
        !idempotency::complete(&c, &ticket, 200, b"{}")
            .await
            .unwrap(),
        "a completed key is not completed twice"
    );
    assert_eq!(
        claim(&store, &alice, &key, r#"{"a":1}"#).await,
        Claim::Replay(Response {
            status: 202,
            content_type: "application/json".into(),
            body: br#"{"status":"queued"}"#.to_vec(),
        })
    );
    assert_eq!(
        claim(&store, &alice, &key, r#"{"a":2}"#).await,
        Claim::Reuse
    );
    let row = c
        .query_one(
            "SELECT key, request_path, status FROM idempotency_keys WHERE user_id = $1",
            &[&alice],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "u:order-42");
    assert_eq!(row.get::<_, String>(1), ROUTE);
    assert_eq!(row.get::<_, String>(2), "completed");

    // Keys are per user: bob's "order-42" is another key.
    let bob = super::user(&store, "bob@example.com").await;
    acquired(claim(&store, &bob, &key, r#"{"a":2}"#).await);

    assert!(
        idempotency::complete(&c, &ticket, 600, b"{}")
            .await
            .is_err(),
        "not an HTTP status"
    );
}

#[tokio::test]
async fn a_released_key_is_free_at_once_and_failures_are_not_cached() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::client("k").unwrap();
    let c = store.client().await.unwrap();
    let ticket = acquired(claim(&store, &alice, &key, "{}").await);
    assert!(idempotency::release(&c, &ticket).await.unwrap());
    assert!(!idempotency::release(&c, &ticket).await.unwrap());
    let again = acquired(claim(&store, &alice, &key, r#"{"other":true}"#).await);
    assert_ne!(again, ticket);
    // A completed key cannot be released.
    assert!(idempotency::complete(&c, &again, 200, b"{}").await.unwrap());
    assert!(!idempotency::release(&c, &again).await.unwrap());
    assert!(matches!(
        claim(&store, &alice, &key, r#"{"other":true}"#).await,
        Claim::Replay(_)
    ));
}

#[tokio::test]
async fn a_stale_claim_is_taken_over_and_its_late_claimer_changes_nothing() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::client("slow").unwrap();
    let c = store.client().await.unwrap();
    let slow = acquired(claim(&store, &alice, &key, "{}").await);

    // Just under 5 minutes: still in flight.
    age(&store, &alice, &key, 290.0).await;
    assert_eq!(claim(&store, &alice, &key, "{}").await, Claim::InFlight);
    // Past 5 minutes: taken over (a different body too: the old claim
    // answered nothing).
    age(&store, &alice, &key, 20.0).await;
    let taker = acquired(claim(&store, &alice, &key, r#"{"v":2}"#).await);
    assert!(taker.claimed_at() > slow.claimed_at());

    // The presumed-dead claimer wakes up: it can neither answer nor free
    // the key of the claim that replaced it.
    assert!(
        !idempotency::complete(&c, &slow, 200, b"{\"late\":true}")
            .await
            .unwrap()
    );
    assert!(!idempotency::release(&c, &slow).await.unwrap());
    assert_eq!(
        claim(&store, &alice, &key, r#"{"v":2}"#).await,
        Claim::InFlight
    );
    assert!(
        idempotency::complete(&c, &taker, 201, b"{\"v\":2}")
            .await
            .unwrap()
    );
    assert_eq!(
        claim(&store, &alice, &key, r#"{"v":2}"#).await,
        Claim::Replay(Response {
            status: 201,
            content_type: "application/json".into(),
            body: b"{\"v\":2}".to_vec(),
        })
    );
}

#[tokio::test]
async fn completed_keys_replay_for_their_window_then_run_again() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();

    // Client keys: 24 hours from the claim, swept or not.
    let client = Key::client("daily").unwrap();
    let t = acquired(claim(&store, &alice, &client, "{}").await);
    idempotency::complete(&c, &t, 200, b"{}").await.unwrap();
    age(&store, &alice, &client, 23.9 * 3600.0).await;
    assert!(matches!(
        claim(&store, &alice, &client, "{}").await,
        Claim::Replay(_)
    ));
    age(&store, &alice, &client, 0.2 * 3600.0).await;
    acquired(claim(&store, &alice, &client, "{}").await);

    // A server key with a short window.
    let server = Key::server("replay:evt_x:wh_y", time::Duration::minutes(5));
    assert_eq!(server.as_str(), "s:replay:evt_x:wh_y");
    let t = acquired(claim(&store, &alice, &server, "").await);
    idempotency::complete(&c, &t, 200, b"{}").await.unwrap();
    assert!(matches!(
        claim(&store, &alice, &server, "").await,
        Claim::Replay(_)
    ));
    age(&store, &alice, &server, 301.0).await;
    acquired(claim(&store, &alice, &server, "").await);
}

#[tokio::test]
async fn of_parallel_duplicate_claims_exactly_one_is_acquired() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    const N: usize = 12;
    let barrier = Arc::new(Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            // One pool per claimer: N real connections, as N API replicas.
            let store = Store::new(&StoreConfig::new(db.url())).unwrap();
            let (alice, barrier) = (alice.clone(), barrier.clone());
            tokio::spawn(async move {
                let c = store.client().await.unwrap();
                let key = Key::client("same").unwrap();
                barrier.wait().await;
                idempotency::claim(&c, &alice, &key, ROUTE, &hash("{}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.unwrap());
    }
    let won = claims
        .iter()
        .filter(|c| matches!(c, Claim::Acquired(_)))
        .count();
    assert_eq!(won, 1, "{claims:?}");
    assert!(
        claims
            .iter()
            .all(|c| matches!(c, Claim::Acquired(_) | Claim::InFlight)),
        "{claims:?}"
    );
}

/// Waits until some backend waits for a lock (a signal, not a sleep).
async fn until_someone_waits_for_a_lock(store: &Store) {
    let c = store.client().await.unwrap();
    for _ in 0..2000 {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("no claim ever waited");
}

#[tokio::test]
async fn in_transactions_a_duplicate_waits_for_the_first_and_replays_its_answer() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::server("replay:evt_a:", idempotency::TTL);

    // The first request claims, does its work and completes in one
    // transaction; the duplicate arrives before the commit.
    let mut first = store.client().await.unwrap();
    let tx = first.transaction().await.unwrap();
    let ticket = acquired(
        idempotency::claim(&tx, &alice, &key, ROUTE, &hash(""))
            .await
            .unwrap(),
    );
    let other = Store::new(&StoreConfig::new(db.url())).unwrap();
    let (k, a) = (key.clone(), alice.clone());
    let duplicate = tokio::spawn(async move {
        let mut c = other.client().await.unwrap();
        let tx = c.transaction().await.unwrap();
        let claim = idempotency::claim(&tx, &a, &k, ROUTE, &hash(""))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        claim
    });
    until_someone_waits_for_a_lock(&store).await;
    assert!(!duplicate.is_finished());
    idempotency::complete(&tx, &ticket, 200, b"{\"n\":1}")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        duplicate.await.unwrap(),
        Claim::Replay(Response {
            status: 200,
            content_type: "application/json".into(),
            body: b"{\"n\":1}".to_vec(),
        })
    );

    // A first request that rolls back takes its claim with it: the waiting
    // duplicate runs instead. (Server keys wait; a client key's duplicate is
    // in flight at once, see the next test.)
    let key = Key::server("replay:evt_b:", idempotency::TTL);
    let tx = first.transaction().await.unwrap();
    acquired(
        idempotency::claim(&tx, &alice, &key, ROUTE, &hash(""))
            .await
            .unwrap(),
    );
    let other = Store::new(&StoreConfig::new(db.url())).unwrap();
    let (k, a) = (key.clone(), alice.clone());
    let duplicate = tokio::spawn(async move {
        let c = other.client().await.unwrap();
        idempotency::claim(&c, &a, &k, ROUTE, &hash(""))
            .await
            .unwrap()
    });
    until_someone_waits_for_a_lock(&store).await;
    tx.rollback().await.unwrap();
    acquired(duplicate.await.unwrap());
}

#[tokio::test]
async fn the_sweep_deletes_keys_claimed_over_a_day_ago_in_batches() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    for i in 0..5 {
        let key = Key::client(&format!("old-{i}")).unwrap();
        let t = acquired(claim(&store, &alice, &key, "{}").await);
        if i % 2 == 0 {
            idempotency::complete(&c, &t, 200, b"{}").await.unwrap();
        }
        age(&store, &alice, &key, 24.0 * 3600.0 + 60.0).await;
    }
    let young = Key::client("young").unwrap();
    let t = acquired(claim(&store, &alice, &young, "{}").await);
    idempotency::complete(&c, &t, 200, b"{}").await.unwrap();
    age(&store, &alice, &young, 23.0 * 3600.0).await;
    let stuck = Key::client("stuck").unwrap();
    acquired(claim(&store, &alice, &stuck, "{}").await);

    assert_eq!(idempotency::sweep(&c, 2).await.unwrap(), 2);
    assert_eq!(idempotency::sweep(&c, 10).await.unwrap(), 3);
    assert_eq!(idempotency::sweep(&c, 10).await.unwrap(), 0);
    let mut left: Vec<String> = c
        .query("SELECT key FROM idempotency_keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    left.sort();
    assert_eq!(left, ["u:stuck", "u:young"]);
}

#[tokio::test]
async fn the_longest_client_key_fits_the_table() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::client(&"ключ".repeat(63)).unwrap(); // 252 characters
    let t = acquired(claim(&store, &alice, &key, "{}").await);
    let c = store.client().await.unwrap();
    assert!(idempotency::complete(&c, &t, 200, b"{}").await.unwrap());
    let max = Key::client(&"k".repeat(idempotency::MAX_CLIENT_KEY_LEN)).unwrap();
    acquired(claim(&store, &alice, &max, "{}").await);
}

#[tokio::test]
async fn in_transactions_a_client_key_duplicate_is_in_flight_at_once_then_replays() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let key = Key::client("send-1").unwrap();

    let mut first = store.client().await.unwrap();
    let tx = first.transaction().await.unwrap();
    let ticket = acquired(
        idempotency::claim(&tx, &alice, &key, ROUTE, &hash("{}"))
            .await
            .unwrap(),
    );
    // While the first transaction is open, a duplicate does not wait.
    let other = Store::new(&StoreConfig::new(db.url())).unwrap();
    let mut c = other.client().await.unwrap();
    let dup = c.transaction().await.unwrap();
    assert_eq!(
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            idempotency::claim(&dup, &alice, &key, ROUTE, &hash("{}"))
        )
        .await
        .expect("no waiting on a lock")
        .unwrap(),
        Claim::InFlight
    );
    dup.rollback().await.unwrap();
    idempotency::complete(&tx, &ticket, 200, b"{\"n\":1}")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // After the commit it replays the answer.
    let dup = c.transaction().await.unwrap();
    let again = idempotency::claim(&dup, &alice, &key, ROUTE, &hash("{}"))
        .await
        .unwrap();
    assert!(
        matches!(&again, Claim::Replay(r) if r.body == b"{\"n\":1}"),
        "{again:?}"
    );

    dup.rollback().await.unwrap();

    // A first claim that rolls back frees the key at once.
    let key = Key::client("send-2").unwrap();
    let tx = first.transaction().await.unwrap();
    acquired(
        idempotency::claim(&tx, &alice, &key, ROUTE, &hash("{}"))
            .await
            .unwrap(),
    );
    tx.rollback().await.unwrap();
    acquired(claim(&store, &alice, &key, "{}").await);
}
