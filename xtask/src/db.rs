//! `cargo xtask db start|stop|status|url`: a persistent local dev PostgreSQL.
//!
//! The cluster lives in `<target>/e2a-devdb` with durable settings (no
//! `fsync=off`), listens on 127.0.0.1 on a port persisted in its data
//! directory, and holds the database [`DATABASE`]. It survives `xtask`
//! (it is a normal `pg_ctl` server) until `cargo xtask db stop` or
//! `cargo clean`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use e2a_testkit::cluster::{Cluster, ClusterOptions, ClusterStatus, PgBinaries, PortChoice};

use crate::{CmdResult, workspace};

/// The application database created on the dev cluster.
pub const DATABASE: &str = "e2a";

/// Exit code of `db status` when the cluster is not running (as `pg_ctl status`).
const NOT_RUNNING: u8 = 3;

/// `cargo xtask db …`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Create (first time) and start the dev cluster, create database `e2a`,
    /// print its URL. Does nothing but print the URL when already running.
    Start,
    /// Stop the dev cluster (fast shutdown). Does nothing when not running.
    Stop,
    /// Print whether the dev cluster runs; exit 0 when running, 3 otherwise.
    Status,
    /// Print the URL of database `e2a` on the dev cluster.
    Url,
}

/// Runs one `db` action.
pub fn run(args: Args) -> CmdResult {
    match args.action {
        Action::Start => {
            let url = ensure_started()?;
            println!("{url}");
            Ok(ExitCode::SUCCESS)
        }
        Action::Stop => {
            let dir = data_dir();
            if !Cluster::exists(&dir) {
                eprintln!("no dev database in {}: nothing to stop", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            let cluster = Cluster::open(&dir)?;
            if cluster.status()? == ClusterStatus::Stopped {
                eprintln!("dev database already stopped");
            } else {
                cluster.stop()?;
                eprintln!("dev database stopped");
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Status => {
            let dir = data_dir();
            if !Cluster::exists(&dir) {
                println!("not created (run `cargo xtask db start`)");
                return Ok(ExitCode::from(NOT_RUNNING));
            }
            let cluster = Cluster::open(&dir)?;
            match cluster.status()? {
                ClusterStatus::Running => {
                    println!("running: {}", cluster.url(DATABASE));
                    Ok(ExitCode::SUCCESS)
                }
                ClusterStatus::Stopped => {
                    println!(
                        "stopped (data in {}; start with `cargo xtask db start`)",
                        dir.display()
                    );
                    Ok(ExitCode::from(NOT_RUNNING))
                }
            }
        }
        Action::Url => {
            let dir = data_dir();
            if !Cluster::exists(&dir) {
                return Err("no dev database yet: run `cargo xtask db start`".into());
            }
            println!("{}", Cluster::open(&dir)?.url(DATABASE));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The data directory of the dev cluster.
pub fn data_dir() -> PathBuf {
    workspace::target_dir().join("e2a-devdb")
}

/// Creates (first time) and starts the dev cluster if needed, makes sure
/// database [`DATABASE`] exists, and returns its URL. Idempotent; for use
/// by other commands (`dev`, `migrate`) too.
pub fn ensure_started() -> Result<String, Box<dyn std::error::Error>> {
    let dir = data_dir();
    let mut cluster = if Cluster::exists(&dir) {
        Cluster::open(&dir)?
    } else {
        if dir.exists() {
            return Err(format!(
                "{} exists but holds no cluster (an interrupted `db start`?); remove it and retry",
                dir.display()
            )
            .into());
        }
        eprintln!("creating the dev cluster in {}", dir.display());
        match Cluster::init(PgBinaries::find()?, &dir, &ClusterOptions::durable()) {
            Ok(cluster) => cluster,
            Err(e) => {
                // Only the half-made directory we just created goes.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        }
    };
    if cluster.status()? == ClusterStatus::Stopped {
        cluster.start(PortChoice::AnyFree)?;
        eprintln!("dev database started on 127.0.0.1:{}", cluster.port());
    }
    create_database(&cluster.url("postgres"), DATABASE)?;
    Ok(cluster.url(DATABASE))
}

/// `CREATE DATABASE name` unless it exists (a concurrent creator is fine).
fn create_database(admin_url: &str, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, connection) =
            tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
        let task = tokio::spawn(connection);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if !exists {
            match client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
            {
                Err(e)
                    if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) =>
                {
                    return Err(e.into());
                }
                _ => eprintln!("created database {name}"),
            }
        }
        drop(client);
        task.await??;
        Ok(())
    })
}

/// True when the dev cluster exists and is running.
pub fn is_running() -> bool {
    let dir = data_dir();
    if !Cluster::exists(&dir) {
        return false;
    }
    match Cluster::open(&dir) {
        Ok(cluster) => cluster.status().is_ok_and(|s| s == ClusterStatus::Running),
        Err(_) => false,
    }
}

/// Stops the dev cluster (fast shutdown) if it exists.
pub fn stop() -> Result<(), Box<dyn std::error::Error>> {
    let dir = data_dir();
    if Cluster::exists(&dir) {
        Cluster::open(&dir)?.stop()?;
    }
    Ok(())
}
