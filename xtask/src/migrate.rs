//! `cargo xtask migrate [--database-url URL] [--verify]`: apply (or only
//! verify) the embedded migrations — the deploy/CI step that lets services
//! run with `E2A_MIGRATION_MODE=verify`.

use std::process::ExitCode;

use e2a_store::migrate::MigrationMode;

use crate::{CmdResult, database};

/// `cargo xtask migrate` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Database to migrate (default: E2A_DATABASE_URL, DATABASE_URL, else the local dev cluster).
    #[arg(long)]
    database_url: Option<String>,
    /// Only check that the database is up to date; exit 1 naming what is pending.
    #[arg(long)]
    verify: bool,
}

/// Applies or verifies the migrations.
pub fn run(args: Args) -> CmdResult {
    let target = database::resolve(args.database_url)?;
    let mode = if args.verify {
        MigrationMode::Verify
    } else {
        MigrationMode::Auto
    };
    let report = database::runtime()?.block_on(async {
        let store = database::store(&target.url)?;
        store
            .wait_until_ready(std::time::Duration::from_secs(10))
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(store.migrate(mode).await?)
    })?;
    if report.applied.is_empty() {
        eprintln!(
            "schema is up to date ({} migrations)",
            e2a_store::migrate::embedded_names().len()
        );
    } else {
        for name in &report.applied {
            eprintln!("applied {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
