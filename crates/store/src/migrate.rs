//! Schema migrations: the SQL files in `migrations/` embedded at compile
//! time and applied with refinery, in one of three modes.
//!
//! * `auto` — apply pending migrations (the default).
//! * `verify` — apply nothing; refuse to start, naming every pending,
//!   unknown or changed migration.
//! * `skip` — do nothing (an operator migrates out of band).
//!
//! Concurrent starts are serialised with a session advisory lock
//! ([`MIGRATION_LOCK_KEY`]), so several replicas can boot against an empty
//! database at once: the first applies, the others wait and then find
//! nothing pending. Refinery runs each file in its own transaction.

use std::{fmt, str::FromStr};

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Advisory lock key held while migrating: `"e2_MIGR\0"` as a big-endian
/// integer, the same key the original service used.
pub const MIGRATION_LOCK_KEY: i64 = 0x6532_5F4D_4947_5200;

/// The table refinery records applied migrations in.
pub const HISTORY_TABLE: &str = "e2a_schema_history";

/// How a service treats the schema at start-up (`E2A_MIGRATION_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationMode {
    /// Apply pending migrations.
    #[default]
    Auto,
    /// Refuse to start unless the database is exactly at this build's schema.
    Verify,
    /// Leave the schema alone.
    Skip,
}

impl FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(MigrationMode::Auto),
            "verify" => Ok(MigrationMode::Verify),
            "skip" => Ok(MigrationMode::Skip),
            other => Err(format!(
                "unknown migration mode {other:?} (expected auto, verify or skip)"
            )),
        }
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::Auto => "auto",
            MigrationMode::Verify => "verify",
            MigrationMode::Skip => "skip",
        })
    }
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The mode that ran.
    pub mode: MigrationMode,
    /// Migrations applied by this run, as `V{n}__{name}`.
    pub applied: Vec<String>,
}

/// Why migrating (or verifying) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// `verify` found migrations this build has that the database lacks.
    #[error("database schema is behind this build: pending migration(s) {}; run `cargo xtask migrate` or start with E2A_MIGRATION_MODE=auto", .0.join(", "))]
    Pending(Vec<String>),
    /// The database has migrations this build does not know (a newer build
    /// migrated it).
    #[error("database has migration(s) unknown to this build: {}; deploy a build that includes them", .0.join(", "))]
    Unknown(Vec<String>),
    /// An applied migration's file changed afterwards.
    #[error("applied migration(s) differ from this build's files: {}", .0.join(", "))]
    Divergent(Vec<String>),
    /// Refinery failed while applying.
    #[error("applying migrations failed")]
    Apply(#[source] refinery::Error),
    /// A database error outside refinery (lock, history read).
    #[error("database error while migrating")]
    Database(#[source] tokio_postgres::Error),
}

/// The report of a `skip` run: nothing applied, nothing touched.
pub fn run_skip() -> Result<MigrationReport, MigrateError> {
    Ok(MigrationReport {
        mode: MigrationMode::Skip,
        applied: Vec::new(),
    })
}

/// Names of every migration embedded in this build, as `V{n}__{name}`, in
/// version order (refinery lists them by file name, where `V10` sorts
/// before `V2`).
pub fn embedded_names() -> Vec<String> {
    by_version(&embedded::migrations::runner())
        .iter()
        .map(label)
        .collect()
}

/// The runner's migrations in version order.
fn by_version(runner: &refinery::Runner) -> Vec<refinery::Migration> {
    let mut migrations = runner.get_migrations().clone();
    migrations.sort_by_key(refinery::Migration::version);
    migrations
}

fn label(m: &refinery::Migration) -> String {
    format!("V{}__{}", m.version(), m.name())
}

/// Brings the database to this build's schema according to `mode`.
///
/// Holds [`MIGRATION_LOCK_KEY`] (session advisory lock) for the whole run and
/// releases it before returning, also on error. `verify` and `auto` both
/// refuse unknown or changed migrations. Safe to call concurrently from many
/// processes. The client should have no statement timeout (a long migration
/// or a wait for the lock is expected here).
pub async fn run(
    client: &mut Client,
    mode: MigrationMode,
) -> Result<MigrationReport, MigrateError> {
    if mode == MigrationMode::Skip {
        return run_skip();
    }
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrateError::Database)?;
    let result = run_locked(client, mode).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    if let Err(e) = unlock {
        // The lock is session-scoped: it is released when this connection
        // closes, so a failed unlock cannot wedge other processes for long.
        tracing::warn!(error = %e, "failed to release migration lock");
    }
    result
}

async fn run_locked(
    client: &mut Client,
    mode: MigrationMode,
) -> Result<MigrationReport, MigrateError> {
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    let known = by_version(&runner);
    let applied = applied_migrations(client).await?;

    let unknown: Vec<String> = applied
        .iter()
        .filter(|(v, _, _)| !known.iter().any(|m| i64::from(m.version()) == *v))
        .map(|(v, name, _)| format!("V{v}__{name}"))
        .collect();
    if !unknown.is_empty() {
        return Err(MigrateError::Unknown(unknown));
    }
    let divergent: Vec<String> = known
        .iter()
        .filter(|m| {
            applied.iter().any(|(v, _, checksum)| {
                *v == i64::from(m.version()) && *checksum != m.checksum().to_string()
            })
        })
        .map(label)
        .collect();
    if !divergent.is_empty() {
        return Err(MigrateError::Divergent(divergent));
    }
    let pending: Vec<String> = known
        .iter()
        .filter(|m| !applied.iter().any(|(v, _, _)| *v == i64::from(m.version())))
        .map(label)
        .collect();

    match mode {
        MigrationMode::Skip => Ok(MigrationReport {
            mode,
            applied: Vec::new(),
        }),
        MigrationMode::Verify if pending.is_empty() => Ok(MigrationReport {
            mode,
            applied: Vec::new(),
        }),
        MigrationMode::Verify => Err(MigrateError::Pending(pending)),
        MigrationMode::Auto => {
            if pending.is_empty() {
                return Ok(MigrationReport {
                    mode,
                    applied: Vec::new(),
                });
            }
            let report = runner
                .set_abort_divergent(true)
                .set_abort_missing(true)
                .run_async(client)
                .await
                .map_err(MigrateError::Apply)?;
            let applied = report.applied_migrations().iter().map(label).collect();
            Ok(MigrationReport { mode, applied })
        }
    }
}

/// `(version, name, checksum)` of every applied migration; empty when the
/// history table does not exist yet.
async fn applied_migrations(client: &Client) -> Result<Vec<(i64, String, String)>, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await
        .map_err(MigrateError::Database)?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!("SELECT version::int8, name, checksum FROM {HISTORY_TABLE} ORDER BY version"),
            &[],
        )
        .await
        .map_err(MigrateError::Database)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                r.get::<_, Option<String>>(1).unwrap_or_default(),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_like_the_original() {
        assert_eq!("".parse::<MigrationMode>(), Ok(MigrationMode::Auto));
        assert_eq!("AUTO".parse::<MigrationMode>(), Ok(MigrationMode::Auto));
        assert_eq!("verify".parse::<MigrationMode>(), Ok(MigrationMode::Verify));
        assert_eq!("skip".parse::<MigrationMode>(), Ok(MigrationMode::Skip));
        assert!("sometimes".parse::<MigrationMode>().is_err());
    }

    #[test]
    fn lock_key_is_the_originals() {
        assert_eq!(MIGRATION_LOCK_KEY, 7_291_995_532_212_785_664);
    }

    #[test]
    fn embedded_migrations_are_numbered_from_one_without_gaps() {
        let names = embedded_names();
        assert!(!names.is_empty(), "no migrations embedded");
        for (i, name) in names.iter().enumerate() {
            assert!(
                name.starts_with(&format!("V{}__", i + 1)),
                "{name} out of sequence"
            );
        }
    }
}
