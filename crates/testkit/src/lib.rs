//! Real PostgreSQL for e2a tests: one fresh, migrated database per test.
//! Also a webhook [`receiver`] and an SMTP sink ([`smtp_sink::SmtpSink`])
//! that catches outbound mail in tests, benchmarks and `cargo xtask dev`.
//!
//! ```no_run
//! # async fn example() {
//! let db = e2a_testkit::TestDb::new().await; // cloned from the migrated template
//! let client = db.client().await;
//! client.simple_query("SELECT 1").await.unwrap();
//! # }
//! // dropping `db` drops the database
//! ```
//!
//! Where the server comes from:
//! * `E2A_TEST_DATABASE_URL` set: that server (its user must be able to
//!   `CREATE DATABASE`), which may be shared by several processes, checkouts
//!   and hosts. Per-test databases are named `e2a_t_<host>_<pid>_<n>`, where
//!   `<host>` is a short tag of this host (hostname and PID namespace);
//!   leftover databases of *this host's* processes that no longer run are
//!   swept on first use, never those of other hosts.
//! * otherwise: one throwaway cluster per test process (see [`cluster`]),
//!   started lazily on first use under `<target>/e2a-testpg/<pid>-<n>` (or
//!   `<temp>/e2a-testpg/…` when the server's OS user cannot enter the target
//!   directory; see [`cluster_base_dirs`]) and stopped and removed when the
//!   process exits, however it exits.
//!
//! Either way each [`TestDb::new`] is a `CREATE DATABASE … TEMPLATE
//! e2a_tpl_<hash>` ([`template_db`]), where `<hash>` covers the labels and
//! contents of the migration files this build embeds: identical schemas share
//! one template, different schemas (other checkouts) get their own. The
//! template is migrated with `e2a_store::migrate::run` (`Auto`) under a
//! temporary name and renamed when complete, so a template under its final
//! name is always complete and is reused as is, never rebuilt.
//!
//! Database URLs in messages (errors, panics, `Debug`) have their passwords
//! redacted.
//!
//! **Never skipped**: when no server can be found or started, [`TestDb::new`]
//! panics with a message saying how to install one, so the suite fails.
//!
//! Each `#[tokio::test]` has its own runtime, so the process-wide state holds
//! only plain data (URLs, the cluster handle); every connection is made per
//! use, on the caller's runtime.

pub mod cluster;
pub mod dkim;
mod naming;
pub mod receiver;
pub mod smtp_sink;

pub use smtp_sink::SmtpSink;

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use e2a_store::secret::redact_database_url;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use cluster::{Cluster, ClusterError, ClusterOptions, PgBinaries, PortChoice, Reaper};

/// Environment variable naming an external server to use instead of a throwaway cluster.
pub const DATABASE_URL_ENV: &str = "E2A_TEST_DATABASE_URL";

pub use naming::TEST_DB_PREFIX;

/// First key of the advisory lock guarding a template
/// (`pg_advisory_lock(int4, int4)`): `"e2a_"` as big-endian bytes. The second
/// key is derived from the template's name. Exclusive while the template is
/// built, shared while a database is cloned from it.
const TEMPLATE_LOCK_CLASS: i32 = 0x6532_615f;

/// Bound on any single setup or teardown step against the server.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Sub-directory of the cargo target directory holding test clusters.
const TEST_CLUSTERS_DIR: &str = "e2a-testpg";

static SERVER: OnceCell<Result<Server, String>> = OnceCell::const_new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);
static CLUSTER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The migrated template every [`TestDb::new`] database is cloned from:
/// `e2a_tpl_<hash>`, where `<hash>` is derived from the labels and contents of
/// the migration files embedded in this build (the ones e2a-store applies).
pub fn template_db() -> &'static str {
    naming::template_name()
}

/// The server this process's tests use. Plain data only (no runtime-bound objects).
struct Server {
    /// URL of the maintenance database (admin connections: CREATE/DROP DATABASE).
    admin_url: String,
    /// Appended to `CREATE DATABASE … TEMPLATE …`: `STRATEGY FILE_COPY` on
    /// PostgreSQL 15+ (a small template copies several times faster than
    /// through the WAL), empty before 15 where file copy is the only way.
    clone_strategy: &'static str,
    /// The throwaway cluster and its reaper; `None` for an external server.
    /// Never dropped: the reaper's pipe closes when the process exits.
    _cluster: Option<(Cluster, Reaper)>,
}

/// A fresh database for one test, dropped (with `WITH (FORCE)`) when this value is dropped.
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
}

impl fmt::Debug for TestDb {
    /// Shows the URLs with their passwords redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("name", &self.name)
            .field("url", &redact_database_url(&self.url))
            .field("admin_url", &redact_database_url(&self.admin_url))
            .finish()
    }
}

impl TestDb {
    /// A fresh database cloned from the migrated template.
    ///
    /// The first call in a process starts (or connects to) the server and
    /// builds the template for this build's schema unless a complete one
    /// already exists there; later calls only clone it. Panics — never
    /// skips — with an install hint when PostgreSQL is unavailable, and with
    /// the cause when migrating or cloning fails.
    pub async fn new() -> TestDb {
        let server = server().await;
        let name = next_db_name();
        let template = template_db();
        let sql = format!(
            "CREATE DATABASE {name} TEMPLATE {template}{}",
            server.clone_strategy
        );
        let created = async {
            let (admin, conn) = connect(&server.admin_url).await?;
            // Shared: many clones at once, but never while the template is built.
            admin
                .execute(
                    "SELECT pg_advisory_lock_shared($1, $2)",
                    &[&TEMPLATE_LOCK_CLASS, &naming::template_lock_id(template)],
                )
                .await?;
            admin.batch_execute(&sql).await?;
            close(admin, conn).await;
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(STEP_TIMEOUT, created).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: `{sql}` failed: {}", chain(&e)),
            Err(_) => panic!("e2a-testkit: `{sql}` timed out after {STEP_TIMEOUT:?}"),
        }
        TestDb::named(server, name)
    }

    /// A fresh EMPTY database (no migrations applied) on the same server, for
    /// migration tests. Panics like [`TestDb::new`].
    pub async fn empty() -> TestDb {
        let server = server().await;
        let name = next_db_name();
        let sql = create_empty_sql(&name);
        let created = async {
            let (admin, conn) = connect(&server.admin_url).await?;
            admin.batch_execute(&sql).await?;
            close(admin, conn).await;
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(STEP_TIMEOUT, created).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: `{sql}` failed: {}", chain(&e)),
            Err(_) => panic!("e2a-testkit: `{sql}` timed out after {STEP_TIMEOUT:?}"),
        }
        TestDb::named(server, name)
    }

    fn named(server: &Server, name: String) -> TestDb {
        TestDb {
            url: with_database(&server.admin_url, &name),
            admin_url: server.admin_url.clone(),
            name,
        }
    }

    /// A `postgres://` URL (or the key=value form of `E2A_TEST_DATABASE_URL`)
    /// for this database, usable by any client library. It includes the
    /// password of `E2A_TEST_DATABASE_URL`, if any: redact it before printing
    /// (`e2a_store::secret::redact_database_url`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name (`e2a_t_<host>_<pid>_<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to this database; its connection task is spawned on
    /// the caller's runtime. Panics when the connection fails.
    pub async fn client(&self) -> Client {
        match connect(&self.url).await {
            Ok((client, _task)) => client,
            Err(e) => panic!(
                "e2a-testkit: connecting to test database {} failed: {}",
                self.name,
                chain(&e)
            ),
        }
    }
}

impl Drop for TestDb {
    /// Drops the database synchronously (on a helper thread with its own
    /// runtime, so it works inside and outside async code). Never panics: a
    /// failure is reported on stderr and the name-based sweep or the
    /// cluster's removal cleans up later.
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = run_detached(self.admin_url.clone(), sql.clone()) {
            eprintln!("e2a-testkit: warning: `{sql}` failed: {e}");
        }
    }
}

/// A cluster of its own for tests that stop and restart the database
/// (outage tests: "database stopped → /readyz 503, recovery when it returns").
///
/// It holds a migrated database [`PrivateCluster::DATABASE`], keeps its port
/// across [`stop`](PrivateCluster::stop) / [`start_again`](PrivateCluster::start_again),
/// and is stopped and removed when dropped or when the process exits.
/// Always needs local server binaries (`E2A_TEST_DATABASE_URL` is not used).
#[derive(Debug)]
pub struct PrivateCluster {
    cluster: Cluster,
    _reaper: Reaper,
}

impl PrivateCluster {
    /// The migrated database created on every private cluster.
    pub const DATABASE: &'static str = "e2a";

    /// Creates and starts a throwaway cluster and migrates [`Self::DATABASE`].
    /// Panics with an install hint when PostgreSQL is unavailable.
    pub async fn start() -> PrivateCluster {
        let started = tokio::task::spawn_blocking(start_throwaway_cluster).await;
        let (cluster, reaper) = match started {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => panic!("e2a-testkit: cannot start a private PostgreSQL cluster: {e}"),
            Err(e) => panic!("e2a-testkit: starting a private cluster panicked: {e}"),
        };
        let admin_url = cluster.url("postgres");
        let setup = async {
            let (admin, conn) = connect(&admin_url).await.map_err(|e| chain(&e))?;
            admin
                .batch_execute(&create_empty_sql(Self::DATABASE))
                .await
                .map_err(|e| chain(&e))?;
            close(admin, conn).await;
            migrate(&cluster.url(Self::DATABASE)).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, setup).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: preparing the private cluster failed: {e}"),
            Err(_) => panic!("e2a-testkit: preparing the private cluster timed out"),
        }
        PrivateCluster {
            cluster,
            _reaper: reaper,
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/<dbname>` on this cluster.
    pub fn url(&self, dbname: &str) -> String {
        self.cluster.url(dbname)
    }

    /// The URL of the migrated database [`Self::DATABASE`].
    pub fn database_url(&self) -> String {
        self.cluster.url(Self::DATABASE)
    }

    /// The TCP port, the same before and after a restart.
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// Stops the server (fast shutdown: open sessions are terminated) and
    /// returns once it is down. Panics when it cannot be stopped.
    pub async fn stop(&self) {
        let cluster = self.cluster.clone();
        match tokio::task::spawn_blocking(move || cluster.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: stopping the private cluster failed: {e}"),
            Err(e) => panic!("e2a-testkit: stopping the private cluster panicked: {e}"),
        }
    }

    /// Starts the server again on the same port and returns once it accepts
    /// connections. Panics when it cannot start (e.g. the port was taken).
    pub async fn start_again(&self) {
        let mut cluster = self.cluster.clone();
        match tokio::task::spawn_blocking(move || cluster.start(PortChoice::Same)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: restarting the private cluster failed: {e}"),
            Err(e) => panic!("e2a-testkit: restarting the private cluster panicked: {e}"),
        }
    }

    /// Creates the superuser `role` logging in with `password`, makes the
    /// server check that role's password (SCRAM-SHA-256) on TCP connections
    /// — other roles stay trusted — and returns the URL of
    /// [`Self::DATABASE`] as `role`. For credential tests: a later
    /// `ALTER ROLE … PASSWORD` refuses new connections with SQLSTATE
    /// `28P01` while the ones already open stay logged in, as in a real
    /// password rotation.
    ///
    /// Returns once the server refuses a wrong password. `role` and
    /// `password` must be ASCII letters, digits and `_`. Panics on failure.
    pub async fn password_role(&self, role: &str, password: &str) -> String {
        let plain =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        assert!(
            plain(role) && plain(password),
            "password_role: use ASCII letters, digits and _"
        );
        // First matching line wins: this role's TCP logins need the password.
        let hba = self.cluster.data_dir().join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)
            .unwrap_or_else(|e| panic!("e2a-testkit: reading {}: {e}", hba.display()));
        std::fs::write(
            &hba,
            format!("host all {role} 127.0.0.1/32 scram-sha-256\n{rules}"),
        )
        .unwrap_or_else(|e| panic!("e2a-testkit: writing {}: {e}", hba.display()));
        let setup = async {
            let (admin, conn) = connect(&self.url("postgres")).await?;
            admin
                .batch_execute(&format!(
                    "SET password_encryption = 'scram-sha-256'; \
                     CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'; \
                     SELECT pg_reload_conf();"
                ))
                .await?;
            close(admin, conn).await;
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(STEP_TIMEOUT, setup).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("e2a-testkit: creating role {role} failed: {}", chain(&e)),
            Err(_) => panic!("e2a-testkit: creating role {role} timed out"),
        }
        let url_with = |password: &str| {
            format!(
                "postgres://{role}:{password}@127.0.0.1:{}/{}",
                self.port(),
                Self::DATABASE
            )
        };
        // The reload is asynchronous: wait until a wrong password is refused.
        let wrong = url_with(&format!("{password}_wrong"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match connect(&wrong).await {
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD) => {
                    break;
                }
                Ok((client, conn)) => close(client, conn).await,
                Err(e) => panic!("e2a-testkit: probing role {role}: {}", chain(&e)),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "e2a-testkit: the server did not start checking {role}'s password"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        url_with(password)
    }

    /// Whether the server is running. Panics when `pg_ctl status` cannot run.
    pub async fn is_running(&self) -> bool {
        let cluster = self.cluster.clone();
        match tokio::task::spawn_blocking(move || cluster.status()).await {
            Ok(Ok(status)) => status == cluster::ClusterStatus::Running,
            Ok(Err(e)) => panic!("e2a-testkit: `pg_ctl status` failed: {e}"),
            Err(e) => panic!("e2a-testkit: `pg_ctl status` panicked: {e}"),
        }
    }
}

/// `GET path` over a fresh raw HTTP/1.1 connection to `addr` (no client
/// library needed); returns the status code and the response body (after the headers).
/// Panics, naming the problem, on connection errors, a response that is not
/// HTTP, or no response within 30 s — for service tests probing `/readyz`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = match tokio::time::timeout(Duration::from_secs(30), exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("GET http://{addr}{path}: {e}"),
        Err(_) => panic!("GET http://{addr}{path}: no response within 30 s"),
    };
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The cargo target directory of the workspace running this code, if found:
/// `CARGO_TARGET_DIR`, else the nearest ancestor of the current executable
/// holding cargo's `CACHEDIR.TAG`, else a `target` directory next to a
/// `Cargo.lock` above `CARGO_MANIFEST_DIR` (run time, then build time).
pub fn target_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return std::path::absolute(dir).ok();
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        return Some(dir.to_owned());
    }
    let manifest_dirs = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    manifest_dirs.into_iter().flatten().find_map(|start| {
        start
            .ancestors()
            .find(|d| d.join("Cargo.lock").is_file() && d.join("target").is_dir())
            .map(|d| d.join("target"))
    })
}

/// `url` with its database replaced by `dbname`. Handles `postgres://` /
/// `postgresql://` URLs (query parameters kept) and the key=value form.
pub fn with_database(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={dbname}");
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let after = &rest[authority_end..];
    let query = after.find('?').map_or("", |q| &after[q..]);
    format!(
        "{}{}/{dbname}{query}",
        &url[..rest_start],
        &rest[..authority_end]
    )
}

async fn server() -> &'static Server {
    let server = SERVER.get_or_init(|| async { init_server().await }).await;
    match server {
        Ok(server) => server,
        Err(msg) => panic!("e2a-testkit: no PostgreSQL for tests: {msg}"),
    }
}

/// Starts or connects to the server and makes sure the template exists. Runs once per process.
async fn init_server() -> Result<Server, String> {
    let external = std::env::var(DATABASE_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty());
    let (admin_url, cluster) = match external {
        Some(url) => (url, None),
        None => {
            let started = tokio::task::spawn_blocking(start_throwaway_cluster)
                .await
                .map_err(|e| format!("starting the test cluster panicked: {e}"))?
                .map_err(|e| e.to_string())?;
            (started.0.url("postgres"), Some(started))
        }
    };
    let is_external = cluster.is_none();
    let prepared = async {
        if is_external {
            sweep_dead_databases(&admin_url).await?;
        }
        ensure_template(&admin_url, template_db()).await?;
        clone_strategy(&admin_url).await
    };
    let clone_strategy = match tokio::time::timeout(STEP_TIMEOUT, prepared).await {
        Ok(Ok(strategy)) => strategy,
        Ok(Err(e)) if is_external => return Err(external_server_hint(&e, &admin_url)),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(format!(
                "preparing the test server timed out after {STEP_TIMEOUT:?}"
            ));
        }
    };
    Ok(Server {
        admin_url,
        clone_strategy,
        _cluster: cluster,
    })
}

/// The error of preparing an external server, with what to check; the URL's
/// password is redacted.
fn external_server_hint(error: &str, admin_url: &str) -> String {
    format!(
        "{error}\n(using {DATABASE_URL_ENV}={}: check that the server runs and its user may \
         CREATE DATABASE, or unset {DATABASE_URL_ENV} to let the tests start their own cluster)",
        redact_database_url(admin_url)
    )
}

/// Makes sure the complete, migrated template `template` exists.
///
/// A database under the template's final name is always complete (it is
/// built under [`naming::building_name`] and renamed once migrated), so an
/// existing one is reused as is. Otherwise it is built under the exclusive
/// template lock; another process waiting on that lock finds it built.
async fn ensure_template(admin_url: &str, template: &str) -> Result<(), String> {
    let step =
        |what: &'static str| move |e: tokio_postgres::Error| format!("{what}: {}", chain(&e));
    // The migrations hashed into the name must be the ones e2a-store applies.
    naming::check_matches_store(&e2a_store::migrate::embedded_names())?;
    let (admin, conn) = connect(admin_url)
        .await
        .map_err(step("connecting to the server"))?;
    if database_exists(&admin, template)
        .await
        .map_err(step("looking for the template database"))?
    {
        close(admin, conn).await;
        return Ok(());
    }
    admin
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&TEMPLATE_LOCK_CLASS, &naming::template_lock_id(template)],
        )
        .await
        .map_err(step("locking the template"))?;
    // Another process may have built it while this one waited for the lock.
    if !database_exists(&admin, template)
        .await
        .map_err(step("looking for the template database"))?
    {
        let building = naming::building_name(template);
        // Separate statements: a multi-statement string is an implicit transaction block.
        // A leftover of a builder that died (it held the lock, so it is gone).
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .map_err(step("dropping a half-built template database"))?;
        admin
            .batch_execute(&create_empty_sql(&building))
            .await
            .map_err(step("creating the template database"))?;
        migrate(&with_database(admin_url, &building)).await?;
        let comment = format!(
            "e2a-testkit template for migrations {} (built by host {} pid {})",
            naming::migration_labels().join(", "),
            naming::host_tag(),
            std::process::id()
        );
        admin
            .batch_execute(&format!(
                "COMMENT ON DATABASE {building} IS {}",
                naming::sql_literal(&comment)
            ))
            .await
            .map_err(step("describing the template database"))?;
        admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
            .map_err(step("renaming the migrated template database"))?;
    }
    // Closing the admin connection releases the lock.
    close(admin, conn).await;
    Ok(())
}

async fn database_exists(admin: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    let row = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// The `CREATE DATABASE` suffix for clones, by server version.
async fn clone_strategy(admin_url: &str) -> Result<&'static str, String> {
    let (admin, conn) = connect(admin_url)
        .await
        .map_err(|e| format!("connecting to the server: {}", chain(&e)))?;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| format!("reading the server version: {}", chain(&e)))?
        .get(0);
    close(admin, conn).await;
    Ok(if version >= 150_000 {
        " STRATEGY FILE_COPY"
    } else {
        ""
    })
}

/// Migrates the database at `url` with the store's migrator and closes the
/// connection fully before returning (a template must have no sessions).
async fn migrate(url: &str) -> Result<(), String> {
    let shown = redact_database_url(url);
    let (mut client, conn) = connect(url)
        .await
        .map_err(|e| format!("connecting to {shown}: {}", chain(&e)))?;
    e2a_store::migrate::run(&mut client, e2a_store::migrate::MigrationMode::Auto)
        .await
        .map_err(|e| format!("migrating {shown}: {}", chain(&e)))?;
    close(client, conn).await;
    Ok(())
}

/// Drops this host's `e2a_t_<host>_<pid>_<n>` databases whose process is
/// gone (external servers only). Databases of other hosts sharing the server
/// are left alone: their pids cannot be checked from here.
async fn sweep_dead_databases(admin_url: &str) -> Result<(), String> {
    let (admin, conn) = connect(admin_url)
        .await
        .map_err(|e| format!("connecting to the server: {}", chain(&e)))?;
    let host = naming::host_tag();
    let rows = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
            &[&format!("{TEST_DB_PREFIX}{host}_")],
        )
        .await
        .map_err(|e| format!("listing databases: {}", chain(&e)))?;
    let me = std::process::id();
    for row in rows {
        let name: String = row.get(0);
        if !naming::is_sweepable(&name, host, me, pid_alive) {
            continue;
        }
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            eprintln!(
                "e2a-testkit: warning: sweeping leftover database {name} failed: {}",
                chain(&e)
            );
        }
    }
    close(admin, conn).await;
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new("/proc").join(pid.to_string()).exists();
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn next_db_name() -> String {
    naming::test_db_name(
        naming::host_tag(),
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed),
    )
}

/// `CREATE DATABASE` from `template0` with UTF8 and the C collation, so
/// results do not depend on the server's locale.
fn create_empty_sql(name: &str) -> String {
    format!("CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
}

/// Creates, starts and ties to this process a throwaway cluster in the first
/// usable of [`cluster_base_dirs`]. Blocking.
fn start_throwaway_cluster() -> Result<(Cluster, Reaper), ClusterError> {
    let bins = PgBinaries::find()?;
    let leaf = format!(
        "{}-{}",
        std::process::id(),
        CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let (mut cluster, reaper) = init_throwaway_cluster(&bins, &cluster_base_dirs(), &leaf)?;
    cluster.start(PortChoice::AnyFree)?;
    Ok((cluster, reaper))
}

/// Where throwaway clusters are created, in order of preference:
/// `<target>/e2a-testpg` (when [`target_dir`] finds one), then
/// `<temp>/e2a-testpg`.
///
/// The target directory is preferred (it is removed by `cargo clean` and
/// never shared between checkouts), but it is unusable when the server runs
/// as another OS user who cannot enter it: as root, PostgreSQL runs as
/// `postgres`, which cannot search a checkout under `/root` or inside a
/// `0700` directory. [`init_throwaway_cluster`] then falls back to the next
/// base. Every cluster the testkit creates, and the testkit's own tests,
/// choose their directory this way.
pub fn cluster_base_dirs() -> Vec<PathBuf> {
    let mut bases: Vec<PathBuf> = target_dir()
        .map(|t| t.join(TEST_CLUSTERS_DIR))
        .into_iter()
        .collect();
    bases.push(std::env::temp_dir().join(TEST_CLUSTERS_DIR));
    bases
}

/// Initialises (but does not start) a throwaway cluster in `<base>/<leaf>`
/// for the first of `bases` where that works, and ties it to this process
/// with a [`Reaper`] spawned before `initdb` (dropping the reaper stops the
/// cluster and removes its directory). Blocking.
///
/// A base is skipped when it cannot be created or when the OS user the
/// server runs as cannot reach the directory
/// ([`ClusterError::DataDirNotAccessible`] or [`ClusterError::Io`]); the
/// error of the last base tried is returned when none works. Any other
/// error (no binaries, `initdb` failing) is returned at once. `leaf` should
/// start with `<pid>-` so that directories left by dead processes are swept
/// (once per base and process, before the first cluster is created there);
/// an existing `<base>/<leaf>` is removed first (a crashed earlier process
/// with the same pid left it).
pub fn init_throwaway_cluster(
    bins: &PgBinaries,
    bases: &[PathBuf],
    leaf: &str,
) -> Result<(Cluster, Reaper), ClusterError> {
    let mut last_err = None;
    for base in bases {
        sweep_dead_cluster_dirs(base);
        let dir = base.join(leaf);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(base) {
            last_err = Some(ClusterError::Io {
                context: format!("creating {}", base.display()),
                source: e,
            });
            continue;
        }
        // Before initdb, so that even an interrupted creation is removed;
        // dropping it (on any error below) removes the directory.
        let reaper = Reaper::spawn(bins, &dir)?;
        match Cluster::init(bins.clone(), &dir, &ClusterOptions::throwaway()) {
            Ok(cluster) => return Ok((cluster, reaper)),
            // Unusable directory (e.g. another user's target/): try the next base.
            Err(e @ (ClusterError::DataDirNotAccessible { .. } | ClusterError::Io { .. })) => {
                last_err = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or(ClusterError::Io {
        context: "finding a directory for the test cluster".into(),
        source: std::io::Error::other("no candidate directory"),
    }))
}

/// Removes `<pid>-<n>` cluster directories whose process is gone (their
/// reaper was killed too). Best effort, once per base directory and process.
fn sweep_dead_cluster_dirs(base: &Path) {
    static SWEPT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
        if swept.iter().any(|b| b == base) {
            return;
        }
        swept.push(base.to_owned());
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        match Cluster::open(&path) {
            Ok(cluster) => {
                let _ = cluster.destroy();
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

async fn connect(url: &str) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(async move {
        // Errors surface on the client's next call; nothing to do here.
        let _ = connection.await;
    });
    Ok((client, task))
}

/// Drops the client and waits until its connection is closed.
async fn close(client: Client, task: JoinHandle<()>) {
    drop(client);
    let _ = task.await;
}

/// Runs `sql` on `admin_url` on a helper thread with its own runtime and waits for it.
fn run_detached(admin_url: String, sql: String) -> Result<(), String> {
    let worker = std::thread::Builder::new()
        .name("e2a-testkit-drop".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building a runtime: {e}"))?;
            runtime.block_on(async {
                let work = async {
                    let (admin, conn) = connect(&admin_url).await?;
                    admin.batch_execute(&sql).await?;
                    close(admin, conn).await;
                    Ok::<_, tokio_postgres::Error>(())
                };
                match tokio::time::timeout(STEP_TIMEOUT, work).await {
                    Ok(result) => result.map_err(|e| chain(&e)),
                    Err(_) => Err(format!("timed out after {STEP_TIMEOUT:?}")),
                }
            })
        })
        .map_err(|e| format!("spawning a thread: {e}"))?;
    worker
        .join()
        .unwrap_or_else(|_| Err("the helper thread panicked".into()))
}

/// An error and all its sources, `: `-separated.
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// A new cluster with production durability (`fsync`, `synchronous_commit`
/// and `full_page_writes` on) for one benchmark run, named after `label`;
/// stopped and removed when the [`Reaper`] drops or the process exits.
/// Placed like the test clusters: under the target directory, else the OS
/// temp dir (e.g. when, running as root, the `postgres` user cannot enter
/// the target directory).
///
/// # Panics
///
/// When no PostgreSQL server binaries are installed or no directory works:
/// a benchmark without its database has nothing to measure.
pub fn durable_bench_cluster(label: &str) -> (Cluster, Reaper) {
    let bins = PgBinaries::find().unwrap_or_else(|e| panic!("PostgreSQL server binaries: {e}"));
    let mut bases: Vec<PathBuf> = target_dir()
        .map(|t| t.join("e2a-benchpg"))
        .into_iter()
        .collect();
    bases.push(std::env::temp_dir().join("e2a-benchpg"));
    let mut last_err = String::from("no candidate directory");
    for base in bases {
        let dir = base.join(format!("{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&base) {
            last_err = format!("creating {}: {e}", base.display());
            continue;
        }
        let reaper = Reaper::spawn(&bins, &dir).expect("cluster reaper");
        match Cluster::init(bins.clone(), &dir, &ClusterOptions::durable()) {
            Ok(mut cluster) => {
                cluster
                    .start(PortChoice::AnyFree)
                    .unwrap_or_else(|e| panic!("starting the bench cluster: {e}"));
                return (cluster, reaper);
            }
            Err(e @ (ClusterError::DataDirNotAccessible { .. } | ClusterError::Io { .. })) => {
                last_err = e.to_string();
            }
            Err(e) => panic!("creating the bench cluster: {e}"),
        }
    }
    panic!("no directory for the bench cluster: {last_err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_the_path_only() {
        assert_eq!(
            with_database("postgres://u:p@h:5/old?sslmode=disable", "new"),
            "postgres://u:p@h:5/new?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgresql://h/?a=b", "x"),
            "postgresql://h/x?a=b"
        );
        assert_eq!(
            with_database("host=h user=u", "x"),
            "host=h user=u dbname=x"
        );
    }

    #[test]
    fn own_db_names_carry_this_hosts_tag_and_pid() {
        let name = next_db_name();
        assert_eq!(
            naming::parse_test_db_name(&name),
            Some((naming::host_tag(), std::process::id()))
        );
        assert_ne!(name, next_db_name());
        // Never swept by this process, whatever the liveness check says.
        assert!(!naming::is_sweepable(
            &name,
            naming::host_tag(),
            std::process::id(),
            |_| false
        ));
    }

    const SECRET_URL: &str = "postgres://e2a:s3cret@127.0.0.1:1/postgres";

    #[test]
    fn debug_output_hides_passwords() {
        let db = TestDb {
            name: "e2a_t_0123abcd_1_0".into(),
            url: with_database(SECRET_URL, "e2a_t_0123abcd_1_0"),
            admin_url: SECRET_URL.into(),
        };
        let shown = format!("{db:?}");
        // Not dropped: there is no server to drop it on.
        std::mem::forget(db);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("e2a_t_0123abcd_1_0"), "{shown}");
    }

    #[test]
    fn external_server_hint_hides_the_password() {
        let hint = external_server_hint("connecting to the server: refused", SECRET_URL);
        assert!(!hint.contains("s3cret"), "{hint}");
        assert!(hint.contains("e2a:***@127.0.0.1:1/postgres"), "{hint}");
        assert!(hint.contains(DATABASE_URL_ENV), "{hint}");
    }

    async fn has_table(url: &str, table: &str) -> bool {
        let (client, conn) = connect(url).await.expect("connect");
        let found = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .expect("query to_regclass")
            .get(0);
        close(client, conn).await;
        found
    }

    async fn oid_of(admin_url: &str, name: &str) -> Option<u32> {
        let (admin, conn) = connect(admin_url).await.expect("connect");
        let oid = admin
            .query_opt("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
            .await
            .expect("query pg_database")
            .map(|row| row.get(0));
        close(admin, conn).await;
        oid
    }

    #[tokio::test]
    async fn complete_template_is_reused_and_half_built_one_is_rebuilt() {
        let admin_url = server().await.admin_url.clone();

        // The shared template exists and is reused as is: same database.
        let oid = oid_of(&admin_url, template_db()).await;
        assert!(oid.is_some(), "{} missing", template_db());
        ensure_template(&admin_url, template_db())
            .await
            .expect("ensure the existing template");
        assert_eq!(oid_of(&admin_url, template_db()).await, oid);
        assert_eq!(
            oid_of(&admin_url, &naming::building_name(template_db())).await,
            None
        );

        // A builder that died left a half-built database behind: it is
        // replaced, and the result appears under the final name only.
        let name = format!(
            "e2a_tpl_selftest_{}_{}",
            naming::host_tag(),
            std::process::id()
        );
        let building = naming::building_name(&name);
        let (admin, conn) = connect(&admin_url).await.expect("connect");
        admin
            .batch_execute(&create_empty_sql(&building))
            .await
            .expect("create half-built template");
        close(admin, conn).await;
        let (half, conn) = connect(&with_database(&admin_url, &building))
            .await
            .expect("connect to half-built template");
        half.batch_execute("CREATE TABLE half_built_marker ()")
            .await
            .expect("mark half-built template");
        close(half, conn).await;

        let built = ensure_template(&admin_url, &name).await;
        let url = with_database(&admin_url, &name);
        let (marker, migrated) = match built {
            Ok(()) => (
                has_table(&url, "half_built_marker").await,
                has_table(&url, e2a_store::migrate::HISTORY_TABLE).await,
            ),
            Err(_) => (true, false),
        };
        let building_left = oid_of(&admin_url, &building).await.is_some();
        run_detached(
            admin_url.clone(),
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .expect("drop the self-test template");
        run_detached(
            admin_url.clone(),
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
        )
        .expect("drop the self-test building database");
        built.expect("build the self-test template");
        assert!(migrated, "the rebuilt template is not migrated");
        assert!(!marker, "the half-built template was reused");
        assert!(!building_left, "the building name is still in use");
    }

    #[tokio::test]
    async fn migrate_errors_hide_the_password() {
        // Port 1 on the loopback: nothing listens, the connection is refused.
        let err = migrate(&with_database(SECRET_URL, "e2a_t_0123abcd_1_0"))
            .await
            .expect_err("nothing listens on port 1");
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            err.contains("e2a:***@127.0.0.1:1/e2a_t_0123abcd_1_0"),
            "{err}"
        );
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
