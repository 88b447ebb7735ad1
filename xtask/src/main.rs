//! `cargo xtask`: the one entry point for chores (see `cargo xtask --help`).
//!
//! This file is only the dispatcher: one module per command. To add a
//! command, write `src/<command>.rs` with an `Args` type (`clap::Args`) and a
//! `run(args) -> CmdResult`, then point its variant of [`Command`] and its
//! arm in [`main`] at it.

mod bench;
mod bootstrap;
mod database;
mod db;
mod dev;
mod migrate;
mod new_migration;
mod outbox;
mod tidy;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The result of every command: an exit code, or an error that [`main`]
/// prints as `error: …` with its causes and turns into exit code 1.
pub type CmdResult = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Chores for the e2a workspace",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start, stop or inspect the local dev PostgreSQL (in target/e2a-devdb).
    Db(db::Args),
    /// Create migrations/V{next}__{name}.sql.
    NewMigration(new_migration::Args),
    /// Check repository conventions (module docs, migration numbering, no
    /// `SELECT *` in the store, thin binaries); exits 1 listing every problem.
    Tidy(tidy::Args),

    /// Apply (or --verify) the migrations on a database.
    Migrate(migrate::Args),
    /// Migrate, create or find a user and print a new API key.
    Bootstrap(bootstrap::Args),
    /// Run the whole gateway locally (embedded Postgres, all four services) until Ctrl-C.
    Dev(dev::Args),
    /// Inspect the outbound mail outbox: list deliveries, show one with its
    /// attempts, list dead letters, re-send one.
    Outbox(outbox::Args),
    /// Run a benchmark in release mode (`cargo xtask bench` lists them).
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Db(args) => db::run(args),
        Command::NewMigration(args) => new_migration::run(args),
        Command::Tidy(args) => tidy::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Bootstrap(args) => bootstrap::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Outbox(args) => outbox::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            let mut message = format!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
