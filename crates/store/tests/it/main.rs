//! Store integration tests against a real PostgreSQL (one fresh database per
//! test, from `e2a-testkit`). One test binary for the whole crate keeps link
//! time down; each aggregate has its own module.

mod account_limits;
mod agents;
mod api_keys;
mod approval_tokens;
mod bounded;
mod conversations;
mod deliveries;
mod delivery_log;
mod domains;
mod events;
mod fanout;
mod hitl;
mod idempotency;
mod inbound;
mod legacy_deliveries;
mod mail_outbox;
mod messages;
mod migrate;
mod rate_limits;
mod reviews;
mod sessions;
mod signing_secrets;
mod store;
mod users;
mod webhooks;

use e2a_store::{Store, StoreConfig, address::EmailAddress, ids::UserId};
use e2a_testkit::TestDb;

/// A store on a fresh migrated database. Keep the `TestDb` alive for the
/// test's duration.
pub async fn store() -> (TestDb, Store) {
    let db = TestDb::new().await;
    let store = Store::new(&StoreConfig::new(db.url())).expect("store config");
    (db, store)
}

/// Creates a user with a unique address.
pub async fn user(store: &Store, email: &str) -> UserId {
    let client = store.client().await.unwrap();
    e2a_store::users::create(&client, &EmailAddress::parse(email).unwrap(), "Test")
        .await
        .unwrap()
        .id
}

/// Waits until `count_sql` (a count of blocked lock requests, read on `c`)
/// is positive: a signal that another session is blocked, not a guess.
/// Panics naming `what` after 20 s.
pub async fn until_blocked(c: &tokio_postgres::Client, count_sql: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = c.query_one(count_sql, &[]).await.unwrap().get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never blocked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
