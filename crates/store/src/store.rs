//! The [`Store`]: a deadpool-postgres pool built from [`StoreConfig`], with
//! bounded connection, acquisition and statement timeouts, a readiness ping,
//! pool statistics, migrations and a retrying transaction helper.

use std::{
    future::Future,
    pin::Pin,
    str::FromStr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::{IsolationLevel, NoTls};

use crate::{
    error::{Result, StoreError},
    migrate::{self, MigrateError, MigrationMode, MigrationReport},
};

/// How to reach the database and how patient to be with it.
#[derive(Clone)]
pub struct StoreConfig {
    /// A `postgres://` URL (or key=value connection string).
    pub database_url: String,
    /// Maximum pooled connections.
    pub pool_size: usize,
    /// Time to establish one TCP + startup handshake.
    pub connect_timeout: Duration,
    /// Longest wait for a free pooled connection before [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every pooled connection.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for StoreConfig {
    /// Prints the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field(
                "database_url",
                &crate::secret::redact_database_url(&self.database_url),
            )
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

impl StoreConfig {
    /// A config with the defaults used by the services.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors building a store from configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The URL could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] tokio_postgres::Error),
    /// The pool could not be built.
    #[error("cannot build connection pool: {0}")]
    Pool(String),
}

/// Pool usage at one instant, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Configured maximum.
    pub max_size: usize,
    /// Connections currently open.
    pub size: usize,
    /// Open connections idle in the pool.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// A boxed future borrowing a transaction, as returned by closures passed to
/// [`Store::transaction`].
pub type TxFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 't>>;

/// Maximum attempts of a transaction that keeps hitting serialization
/// failures or deadlocks.
pub const TX_MAX_ATTEMPTS: u32 = 5;

/// Prepared statements one pooled connection keeps before its cache is
/// emptied at the next checkout (statements are re-prepared on next use).
/// The fixed statements of all services together are well below this.
pub const MAX_CACHED_STATEMENTS: usize = 512;

/// The shared database handle. Cheap to clone; every clone uses the same pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    /// A coalesced `NOTIFY webhook_events_new` is scheduled (see
    /// [`crate::events::wake_deliverer`]).
    pub(crate) event_wake_pending: Arc<AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the URL: it may carry a password.
        f.debug_struct("Store")
            .field("pool", &self.pool_status())
            .finish()
    }
}

impl Store {
    /// Builds the pool. Connects lazily: this never touches the network, so
    /// it succeeds while the database is down (see [`Store::wait_until_ready`]).
    pub fn new(config: &StoreConfig) -> Result<Self, ConfigError> {
        let mut pg_config = tokio_postgres::Config::from_str(&config.database_url)
            .map_err(ConfigError::InvalidUrl)?;
        pg_config.connect_timeout(config.connect_timeout);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("e2a");
        }
        let mut pooled = pg_config.clone();
        let statement_ms = config.statement_timeout.as_millis().max(1);
        let mut options = pooled.get_options().unwrap_or_default().to_owned();
        options.push_str(&format!(" -c statement_timeout={statement_ms}"));
        pooled.options(options.trim());
        let manager = Manager::from_config(
            pooled,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| ConfigError::Pool(e.to_string()))?;
        Ok(Self {
            pool,
            pg_config,
            event_wake_pending: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A pooled client. [`StoreError::Unavailable`] when none can be had
    /// within the acquire timeout or the server refuses connections.
    pub async fn client(&self) -> Result<deadpool_postgres::Client> {
        let client = self.pool.get().await?;
        // Each connection caches its prepared statements (and the server
        // its plans). Most statements are fixed text, but list queries are
        // assembled per filter combination and page size, so a client could
        // otherwise grow one connection's cache without bound.
        if client.statement_cache.size() > MAX_CACHED_STATEMENTS {
            client.statement_cache.clear();
        }
        Ok(client)
    }

    /// Readiness probe: `SELECT 1` on a pooled connection, bounded by `timeout`.
    /// Read-only; touches no table.
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        let check = async {
            let client = self.client().await?;
            client.execute("SELECT 1", &[]).await?;
            Ok::<_, StoreError>(())
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable("readiness check timed out".into())),
        }
    }

    /// Retries [`Store::ping`] with capped backoff until it succeeds or
    /// `deadline` passes; returns the last error then. Only
    /// [`StoreError::Unavailable`] is retried, and not a refused login
    /// ([`StoreError::is_login_refused`]: failed authentication, missing
    /// database), which is returned at once. Used at start-up so a database
    /// that is still booting does not fail the service, while one that is
    /// really gone, or a wrong password, fails it in bounded time.
    pub async fn wait_until_ready(&self, deadline: Duration) -> Result<()> {
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.ping(Duration::from_secs(5)).await {
                Ok(()) => return Ok(()),
                // Wrong password, unknown database, bad TLS settings: waiting
                // will not fix these, so fail at once.
                Err(e) if !e.is_unavailable() || e.is_login_refused() => return Err(e),
                Err(e) if start.elapsed() + delay >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), retry_in_ms = delay.as_millis() as u64, "database not ready");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Pool usage right now.
    pub fn pool_status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    }

    /// The connection settings of the pool (without its statement timeout)
    /// for a dedicated, long-lived connection such as a `LISTEN`: TCP
    /// keepalives on, and `application_name` set to `name` unless the URL
    /// names one.
    pub fn dedicated_config(&self, name: &str) -> tokio_postgres::Config {
        let mut pg = self.pg_config.clone();
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name() == Some("e2a") {
            pg.application_name(name);
        }
        pg
    }

    /// Applies or verifies migrations per `mode` on a dedicated connection
    /// without statement timeout (see [`migrate::run`] for the guarantees).
    pub async fn migrate(&self, mode: MigrationMode) -> Result<MigrationReport, MigrateError> {
        if mode == MigrationMode::Skip {
            return migrate::run_skip();
        }
        let (mut client, connection) = self
            .pg_config
            .connect(NoTls)
            .await
            .map_err(MigrateError::Database)?;
        let conn = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "migration connection closed");
            }
        });
        let result = migrate::run(&mut client, mode).await;
        drop(client);
        let _ = conn.await;
        result
    }

    /// Runs `f` in a READ COMMITTED transaction; see [`Store::transaction_with`].
    pub async fn transaction<C, T, F>(&self, ctx: &C, f: F) -> Result<T>
    where
        C: Sync + ?Sized,
        T: Send,
        F: for<'t> FnMut(&'t Transaction<'t>, &'t C) -> TxFuture<'t, T> + Send,
    {
        self.transaction_with(IsolationLevel::ReadCommitted, ctx, f)
            .await
    }

    /// Runs `f(tx, ctx)` inside one transaction at `isolation` and commits.
    ///
    /// Atomic: either everything `f` wrote commits or nothing does. If `f`
    /// or the commit fails with a serialization failure or deadlock
    /// (SQLSTATE 40001/40P01), the whole transaction is retried from scratch
    /// (so `f` must be safe to re-run) up to [`TX_MAX_ATTEMPTS`] times with
    /// jittered backoff. Any other error rolls back and is returned.
    ///
    /// `ctx` is handed to every attempt: borrow the caller's data through it
    /// (a closure capturing borrowed data cannot satisfy the higher-ranked
    /// bound that lets its future borrow the transaction).
    pub async fn transaction_with<C, T, F>(
        &self,
        isolation: IsolationLevel,
        ctx: &C,
        mut f: F,
    ) -> Result<T>
    where
        C: Sync + ?Sized,
        T: Send,
        F: for<'t> FnMut(&'t Transaction<'t>, &'t C) -> TxFuture<'t, T> + Send,
    {
        let mut client = self.client().await?;
        let mut attempt = 1;
        loop {
            let outcome = async {
                let tx = client
                    .build_transaction()
                    .isolation_level(isolation)
                    .start()
                    .await?;
                let value = f(&tx, ctx).await?;
                tx.commit().await?;
                Ok::<T, StoreError>(value)
            }
            .await;
            match outcome {
                Err(e) if e.is_retryable_conflict() && attempt < TX_MAX_ATTEMPTS => {
                    conflict_backoff(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// The jittered pause before retry number `attempt + 1` of a transaction or
/// statement that failed with a serialization failure or deadlock.
pub(crate) async fn conflict_backoff(attempt: u32) {
    let backoff = 5 * u64::from(attempt) + crate::secret::random_below(20);
    tracing::debug!(attempt, backoff_ms = backoff, "retrying after conflict");
    tokio::time::sleep(Duration::from_millis(backoff)).await;
}
