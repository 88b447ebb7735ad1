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
