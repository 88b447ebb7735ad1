//! `cargo xtask bootstrap [--email ADDR]`: migrate, find or create the user,
//! and print one new API key on stdout (the only copy; it is stored hashed).

use std::process::ExitCode;

use e2a_store::{Store, address::EmailAddress, api_keys, migrate::MigrationMode, users};

use crate::{CmdResult, database};

/// The address used when none is given (also the `cargo xtask dev` user).
pub const DEFAULT_EMAIL: &str = "dev@e2a.localhost";

/// `cargo xtask bootstrap` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The user's e-mail address.
    #[arg(long, default_value = DEFAULT_EMAIL)]
    email: String,
    /// Database (default: E2A_DATABASE_URL, DATABASE_URL, else the local dev cluster).
    #[arg(long)]
    database_url: Option<String>,
    /// Name recorded on the new key.
    #[arg(long, default_value = "bootstrap")]
    key_name: String,
}

/// Creates (or finds) the user and prints a fresh API key.
pub fn run(args: Args) -> CmdResult {
    let email =
        EmailAddress::parse(&args.email).map_err(|e| format!("--email {:?}: {e}", args.email))?;
    let target = database::resolve(args.database_url)?;
    let key = database::runtime()?.block_on(async {
        let store = database::store(&target.url)?;
        store
            .wait_until_ready(std::time::Duration::from_secs(10))
            .await?;
        store.migrate(MigrationMode::Auto).await?;
        issue_key(&store, &email, &args.key_name).await
    })?;
    println!("{key}");
    Ok(ExitCode::SUCCESS)
}

/// Finds or creates the user `email` and returns a new plaintext API key.
pub async fn issue_key(
    store: &Store,
    email: &EmailAddress,
    key_name: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let client = store.client().await?;
    let outcome = users::bootstrap(&client, email).await?;
    match &outcome {
        users::Bootstrapped::Created(u) => eprintln!("created user {} ({})", u.email, u.id),
        users::Bootstrapped::Existing(u) => eprintln!("found user {} ({})", u.email, u.id),
    }
    let created = api_keys::create(&client, &outcome.user().id, key_name, None).await?;
    eprintln!("new API key {} (shown once)", created.key.key_prefix);
    Ok(created.plaintext)
}
