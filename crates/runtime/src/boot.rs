//! Start-up shared by every service: build the pool, wait (bounded) for the
//! database, and migrate per `E2A_MIGRATION_MODE`.

use e2a_store::{Store, migrate::MigrateError};
use tokio_util::sync::CancellationToken;

use crate::config::{CommonArgs, ConfigError};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database URL or pool settings are invalid.
    #[error(transparent)]
    Store(#[from] e2a_store::ConfigError),
    /// The database stayed unreachable for the whole start-up budget.
    #[error("database unreachable after {secs}s of retries")]
    Unreachable {
        /// The retry budget that was exhausted.
        secs: u64,
        /// The last error seen.
        #[source]
        source: e2a_store::StoreError,
    },
    /// Migrating or verifying failed.
    #[error("migrations ({mode})")]
    Migrate {
        /// The mode that failed.
        mode: e2a_store::migrate::MigrationMode,
        /// What went wrong.
        #[source]
        source: MigrateError,
    },
}

/// Connects to the database (retrying for `E2A_DB_STARTUP_TIMEOUT_SECS`),
/// then migrates or verifies the schema. Returns the ready store, or `None`
/// when `shutdown` fires first: a SIGTERM while the database is still
/// unreachable, or while another replica holds the migration lock, stops the
/// service at once and cleanly instead of waiting out the retry budget.
pub async fn connect_and_migrate(
    service: &'static str,
    common: &CommonArgs,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, BootError> {
    let store = Store::new(&common.db.store_config()?)?;
    let boot = async {
        store
            .wait_until_ready(common.db.startup_timeout())
            .await
            .map_err(|source| BootError::Unreachable {
                secs: common.db.db_startup_timeout_secs,
                source,
            })?;
        let mode = common.migration_mode;
        let report = store
            .migrate(mode)
            .await
            .map_err(|source| BootError::Migrate { mode, source })?;
        tracing::info!(service, mode = %report.mode, applied = ?report.applied, "database ready");
        Ok::<_, BootError>(())
    };
    tokio::select! {
        r = boot => r.map(|()| Some(store)),
        () = shutdown.cancelled() => {
            tracing::info!(service, "shutdown requested during start-up");
            Ok(None)
        }
    }
}
