//! `e2a-store`: the only crate that speaks SQL.
//!
//! It owns the schema (the embedded `migrations/`), one module per aggregate
//! and the transactional state machines. Every aggregate function takes
//! `&impl GenericClient`, so it runs on a pooled client or inside a
//! [`Transaction`] alike and callers can compose several into one atomic
//! unit with [`Store::transaction`]. No function here does network I/O other
//! than to Postgres, and none holds a transaction across remote I/O.
//!
//! Tenancy: every query on a tenant-owned table filters by owner, so another
//! tenant's row is [`StoreError::NotFound`], exactly like a missing one.

pub mod account_limits;
pub mod address;
pub mod agents;
pub mod api_keys;
pub mod approval_tokens;
pub mod conversations;
pub mod deliveries;
pub mod domains;
pub mod error;
pub mod events;
pub mod fanout;
pub mod hitl;
pub mod idempotency;
pub mod ids;
pub mod inbound;
pub mod legacy_deliveries;
pub mod listen;
pub mod mail_outbox;
pub mod messages;
pub mod migrate;
pub mod outbound;
pub mod rate_limits;
pub mod reviews;
pub mod secret;
pub mod sessions;
pub mod signing_secrets;
mod store;
pub mod users;
pub mod webhooks;

pub use deadpool_postgres::{Client, GenericClient, Transaction};
pub use error::{Result, StoreError};
pub use store::{
    ConfigError, MAX_CACHED_STATEMENTS, PoolStatus, Store, StoreConfig, TX_MAX_ATTEMPTS, TxFuture,
};
pub use tokio_postgres::IsolationLevel;
