//! `cargo xtask`: the one entry point for chores (see `cargo xtask --help`).
//!
//! This file is only the dispatcher: one module per command. To add a
//! command, write `src/<command>.rs` with an `Args` type (`clap::Args`) and a
//! `run(args) -> CmdResult`, then point its variant of [`Command`] and its
//! arm in [`main`] at it. The placeholders (`migrate`, `bootstrap`, `dev`,
//! `bench`) currently go to [`not_yet`].

mod db;
mod new_migration;
mod not_yet;
mod tidy;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The result of every command: an exit code, or an error that [`main`]
/// prints as `error: …` with its causes and turns into exit code 1.
pub type CmdResult = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Chores for the e2a workspace", version)]
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

    // ---- not yet implemented (each exits 2). Replace `not_yet::Args` with the
    // command's own `Args` and its arm in `main` with `<module>::run(args)`.
    /// Apply the migrations to a database (not yet implemented).
    Migrate(not_yet::Args),
    /// Create the first user, API key and domain (not yet implemented).
    Bootstrap(not_yet::Args),
    /// Run the whole gateway locally (not yet implemented).
    Dev(not_yet::Args),
    /// Run the benchmarks (not yet implemented).
    Bench(not_yet::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Db(args) => db::run(args),
        Command::NewMigration(args) => new_migration::run(args),
        Command::Tidy(args) => tidy::run(args),
        Command::Migrate(args) => not_yet::run("migrate", args),
        Command::Bootstrap(args) => not_yet::run("bootstrap", args),
        Command::Dev(args) => not_yet::run("dev", args),
        Command::Bench(args) => not_yet::run("bench", args),
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
