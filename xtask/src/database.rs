//! Which database an xtask command talks to: `--database-url`, else
//! `E2A_DATABASE_URL`, else `DATABASE_URL`, else the local dev cluster
//! (started on demand, see [`crate::db`]).

use e2a_store::{Store, StoreConfig};

/// A resolved database URL and whether this command started the dev cluster.
#[derive(Debug)]
pub struct Target {
    /// The URL (may carry a password: never print it as a whole).
    pub url: String,
    /// True when the dev cluster was not running before this command.
    pub started_dev_cluster: bool,
}

/// Resolves the database; starts the dev cluster when nothing is configured.
pub fn resolve(explicit: Option<String>) -> Result<Target, Box<dyn std::error::Error>> {
    let configured = explicit
        .or_else(|| std::env::var("E2A_DATABASE_URL").ok())
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|u| !u.trim().is_empty());
    if let Some(url) = configured {
        return Ok(Target {
            url,
            started_dev_cluster: false,
        });
    }
    let was_running = crate::db::is_running();
    let url = crate::db::ensure_started()?;
    Ok(Target {
        url,
        started_dev_cluster: !was_running,
    })
}

/// A store on `url` with the services' defaults.
pub fn store(url: &str) -> Result<Store, Box<dyn std::error::Error>> {
    Ok(Store::new(&StoreConfig::new(url))?)
}

/// A small Tokio runtime for one command.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
