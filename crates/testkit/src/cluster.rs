//! PostgreSQL clusters driven through the server's own tools (`initdb`, `pg_ctl`).
//!
//! Used by the per-test databases of this crate (throwaway clusters, one per
//! test process) and by `cargo xtask db` (a durable local dev cluster).
//!
//! * The server binaries are looked up on `PATH`, else in the highest version
//!   under `/usr/lib/postgresql/*/bin` ([`PgBinaries::find`]); the lookup is
//!   injectable ([`PgBinaries::find_in`]) so the "not installed" hint can be tested.
//! * As root, every server tool runs as the `postgres` OS user through
//!   `runuser -u postgres --` (PostgreSQL refuses to run as root) and the data
//!   directory is handed to that user.
//! * The cluster listens on 127.0.0.1 only, keeps its Unix socket inside its
//!   data directory and persists its port in `<data dir>/e2a.port`, so a
//!   cluster can be re-attached by its directory alone ([`Cluster::open`]).
//! * A [`Reaper`] ties a cluster's life to the current process: a tiny `sh`
//!   child waits for its stdin pipe to close (which happens when this process
//!   exits for any reason), then stops the server and removes the directory.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

/// Where Debian and Ubuntu install the versioned server binaries (`<root>/<version>/bin`).
pub const DEFAULT_VERSION_ROOT: &str = "/usr/lib/postgresql";

/// The superuser every cluster created here is initialised with.
pub const SUPERUSER: &str = "postgres";

/// The OS user the server tools run as when this process is root.
pub const OS_USER: &str = "postgres";

/// File inside the data directory holding the cluster's TCP port.
pub const PORT_FILE: &str = "e2a.port";

/// File inside the data directory the server writes its log to.
pub const LOG_FILE: &str = "server.log";

/// How long `pg_ctl -w` may wait for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Longest Unix socket path the kernel accepts is 107 bytes; leave a margin.
const MAX_SOCKET_PATH: usize = 100;

/// How often [`Cluster::start`] retries with a new port when another process
/// grabbed the chosen one first ([`PortChoice::AnyFree`] only).
const PORT_RETRIES: usize = 5;

/// The hint appended to every "cannot get a server" error.
const INSTALL_HINT: &str = "Install them with `apt-get install postgresql` (Debian/Ubuntu) \
     or point E2A_TEST_DATABASE_URL at a server you run.";

/// Everything that can go wrong while finding, creating, starting or stopping a cluster.
///
/// Every message says what to do about it; start and init failures carry the
/// tool's output and the tail of the server log.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `initdb`/`pg_ctl` are neither on `PATH` nor under any version root.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under {searched}. {hint}",
        hint = INSTALL_HINT
    )]
    BinariesNotFound {
        /// The version roots that were searched, e.g. `/usr/lib/postgresql/*/bin`.
        searched: String,
    },
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root, but there is no `{OS_USER}` OS user to run PostgreSQL as (initdb and \
         postgres refuse to run as root). Create it with \
         `useradd --system --user-group --home-dir /var/lib/postgresql {OS_USER}` \
         (installing the `postgresql` package also does), or run as a normal user."
    )]
    NoPostgresUser,
    /// Running as root, but `runuser` (util-linux) is missing.
    #[error(
        "running as root, but `runuser` was not found to run PostgreSQL as the `{OS_USER}` user. \
         Install it with `apt-get install util-linux`, or run as a normal user."
    )]
    NoRunuser,
    /// The data directory cannot be reached or written by the OS user the server runs as.
    #[error(
        "the `{user}` OS user cannot write {data_dir} (a parent directory is probably not \
         searchable by it); choose a directory that user can reach, e.g. under /tmp"
    )]
    DataDirNotAccessible {
        /// The intended data directory.
        data_dir: PathBuf,
        /// The OS user the server would run as.
        user: String,
    },
    /// `initdb` was given a directory that already holds files.
    #[error("cannot create a cluster in {0}: the directory exists and is not empty")]
    DataDirNotEmpty(PathBuf),
    /// [`Cluster::open`] was given a directory that holds no initialised cluster.
    #[error(
        "{0} holds no PostgreSQL cluster created by e2a (missing PG_VERSION or {PORT_FILE}); \
         create one first (e.g. `cargo xtask db start`)"
    )]
    NotACluster(PathBuf),
    /// `initdb` exited unsuccessfully.
    #[error("initdb failed for {data_dir} ({status}):\n{output}")]
    InitdbFailed {
        /// The data directory being initialised.
        data_dir: PathBuf,
        /// The exit status as printed by the OS.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// `pg_ctl start` failed or the server did not come up.
    #[error(
        "PostgreSQL in {data_dir} failed to start on 127.0.0.1:{port} ({status}):\n{output}\n\
         --- last lines of {log} ---\n{log_tail}\n\
         Check that the port is free and the binaries work; reinstall with \
         `apt-get install postgresql` if they are broken, or point E2A_TEST_DATABASE_URL at a \
         server you run."
    )]
    StartFailed {
        /// The data directory of the cluster.
        data_dir: PathBuf,
        /// The port it was asked to listen on.
        port: u16,
        /// The exit status of `pg_ctl` as printed by the OS.
        status: String,
        /// `pg_ctl`'s stdout and stderr.
        output: String,
        /// The server log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// A `pg_ctl` command other than `start` failed.
    #[error("`pg_ctl {command}` failed for {data_dir} ({status}):\n{output}")]
    PgCtlFailed {
        /// The `pg_ctl` mode (`stop`, `status`, ...).
        command: &'static str,
        /// The data directory of the cluster.
        data_dir: PathBuf,
        /// The exit status as printed by the OS.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// Another I/O failure (creating directories, running a tool, reading files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// The located PostgreSQL server tools; all three live in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The directory holding `initdb` and `pg_ctl`.
    pub bin_dir: PathBuf,
}

impl PgBinaries {
    /// Finds the server binaries on `PATH`, else in the highest version under
    /// [`DEFAULT_VERSION_ROOT`].
    ///
    /// Fails with [`ClusterError::BinariesNotFound`] (whose message says how to
    /// install them) when neither has both `initdb` and `pg_ctl`.
    pub fn find() -> Result<Self> {
        Self::find_in(
            std::env::var_os("PATH").as_deref(),
            &[PathBuf::from(DEFAULT_VERSION_ROOT)],
            None,
        )
    }

    /// Finds the binaries for an existing data directory: the version named by
    /// its `PG_VERSION` file is preferred (so a cluster keeps working after a
    /// newer server is installed), else as [`PgBinaries::find`].
    pub fn find_for(data_dir: &Path) -> Result<Self> {
        let major = fs::read_to_string(data_dir.join("PG_VERSION")).ok();
        Self::find_in(
            std::env::var_os("PATH").as_deref(),
            &[PathBuf::from(DEFAULT_VERSION_ROOT)],
            major.as_deref().map(str::trim),
        )
    }

    /// The injectable lookup behind [`PgBinaries::find`].
    ///
    /// Order: `<root>/<prefer_major>/bin` for each root (when given), then each
    /// directory of `path` (a `PATH`-style list), then the highest numeric
    /// version `<root>/<version>/bin` across all `version_roots`. A directory
    /// qualifies only when it holds executable `initdb` and `pg_ctl`.
    pub fn find_in(
        path: Option<&OsStr>,
        version_roots: &[PathBuf],
        prefer_major: Option<&str>,
    ) -> Result<Self> {
        if let Some(major) = prefer_major.filter(|m| !m.is_empty()) {
            for root in version_roots {
                let dir = root.join(major).join("bin");
                if has_server_tools(&dir) {
                    return Ok(Self { bin_dir: dir });
                }
            }
        }
        if let Some(path) = path {
            for dir in std::env::split_paths(path) {
                if dir.as_os_str().is_empty() {
                    continue;
                }
                if has_server_tools(&dir) {
                    return Ok(Self { bin_dir: dir });
                }
            }
        }
        let mut best: Option<(Vec<u64>, PathBuf)> = None;
        for root in version_roots {
            let Ok(entries) = fs::read_dir(root) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(version) = entry.file_name().to_str().and_then(parse_version) else {
                    continue;
                };
                let dir = entry.path().join("bin");
                if has_server_tools(&dir) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                    best = Some((version, dir));
                }
            }
        }
        match best {
            Some((_, bin_dir)) => Ok(Self { bin_dir }),
            None => Err(ClusterError::BinariesNotFound {
                searched: version_roots
                    .iter()
                    .map(|r| format!("{}/*/bin", r.display()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Path of `initdb`.
    pub fn initdb(&self) -> PathBuf {
        self.bin_dir.join("initdb")
    }

    /// Path of `pg_ctl`.
    pub fn pg_ctl(&self) -> PathBuf {
        self.bin_dir.join("pg_ctl")
    }
}

fn parse_version(name: &str) -> Option<Vec<u64>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn has_server_tools(dir: &Path) -> bool {
    is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Who runs the server tools: this process's user, or (as root) the `postgres` user.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunAs {
    Me,
    OsUser { runuser: PathBuf, user: String },
}

impl RunAs {
    fn detect() -> Result<Self> {
        if effective_uid() != Some(0) {
            return Ok(Self::Me);
        }
        let runuser = find_on_path("runuser", &["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
            .ok_or(ClusterError::NoRunuser)?;
        let known = Command::new("id")
            .args(["-u", OS_USER])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !known {
            return Err(ClusterError::NoPostgresUser);
        }
        Ok(Self::OsUser {
            runuser,
            user: OS_USER.to_owned(),
        })
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = match self {
            Self::Me => Command::new(program),
            Self::OsUser { runuser, user } => {
                let mut cmd = Command::new(runuser);
                cmd.arg("-u").arg(user).arg("--").arg(program);
                cmd
            }
        };
        // The invoking directory may not be readable by the postgres user.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// The program and arguments that run `program` as this user, for scripts.
    fn argv(&self, program: impl Into<OsString>) -> Vec<OsString> {
        match self {
            Self::Me => vec![program.into()],
            Self::OsUser { runuser, user } => vec![
                runuser.clone().into(),
                "-u".into(),
                user.into(),
                "--".into(),
                program.into(),
            ],
        }
    }
}

/// The effective uid of this process (Linux `/proc`, else `id -u`).
fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok());
        if euid.is_some() {
            return euid;
        }
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// How durable a new cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Normal crash-safe settings (dev clusters, benches).
    Durable,
    /// `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`,
    /// `wal_level=minimal` and `initdb --no-sync`: several times faster, for
    /// test clusters only.
    Throwaway,
}

/// Settings fixed when a cluster is created (written into its `postgresql.conf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Durable or throwaway settings.
    pub durability: Durability,
    /// `max_connections` of the server.
    pub max_connections: u32,
}

impl ClusterOptions {
    /// Settings for test clusters: throwaway, 300 connections.
    pub fn throwaway() -> Self {
        Self {
            durability: Durability::Throwaway,
            max_connections: 300,
        }
    }

    /// Settings for the local dev cluster: durable, 200 connections.
    pub fn durable() -> Self {
        Self {
            durability: Durability::Durable,
            max_connections: 200,
        }
    }
}

/// Which port [`Cluster::start`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    /// Exactly the persisted port (outage tests restart on the same address).
    Same,
    /// The persisted port if it is free, else a new free port (persisted).
    AnyFree,
}

/// Whether the server of a cluster is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterStatus {
    /// `pg_ctl status` found a live postmaster.
    Running,
    /// No server is running on this data directory.
    Stopped,
}

/// A PostgreSQL cluster (data directory + port) managed through `pg_ctl`.
///
/// Cloning is cheap and yields a handle to the same cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    bins: PgBinaries,
    data_dir: PathBuf,
    port: u16,
    run_as: RunAs,
}

impl Cluster {
    /// Creates a new cluster in `data_dir` with `initdb` (superuser
    /// `postgres`, trust auth, UTF8, C locale) and writes its settings:
    /// 127.0.0.1 only, socket in the data directory, `options`, and a free
    /// port persisted in [`PORT_FILE`]. Does not start it.
    ///
    /// `data_dir` must not exist or be empty; missing parents are created.
    /// As root the directory is handed to the `postgres` user, and
    /// [`ClusterError::DataDirNotAccessible`] is returned when that user cannot
    /// reach it (pick a directory elsewhere then).
    pub fn init(bins: PgBinaries, data_dir: &Path, options: &ClusterOptions) -> Result<Self> {
        let run_as = RunAs::detect()?;
        let data_dir = absolute(data_dir)?;
        prepare_data_dir(&data_dir, &run_as)?;

        let mut cmd = run_as.command(bins.initdb());
        cmd.arg("-D").arg(&data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if options.durability == Durability::Throwaway {
            cmd.arg("--no-sync");
        }
        let out = cmd
            .output()
            .map_err(io_err(format!("running {}", bins.initdb().display())))?;
        if !out.status.success() {
            return Err(ClusterError::InitdbFailed {
                data_dir,
                status: out.status.to_string(),
                output: output_text(&out),
            });
        }

        append_settings(&data_dir, options)?;
        let cluster = Self {
            bins,
            port: free_port()?,
            data_dir,
            run_as,
        };
        cluster.write_port()?;
        Ok(cluster)
    }

    /// Re-attaches to a cluster created by [`Cluster::init`] through its data
    /// directory (binaries via [`PgBinaries::find_for`], port from [`PORT_FILE`]).
    /// It may be running or stopped.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let data_dir = absolute(data_dir)?;
        let port = read_port(&data_dir)?;
        let bins = PgBinaries::find_for(&data_dir)?;
        Ok(Self {
            bins,
            data_dir,
            port,
            run_as: RunAs::detect()?,
        })
    }

    /// True when `data_dir` holds a cluster that [`Cluster::open`] can attach to.
    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join("PG_VERSION").is_file() && data_dir.join(PORT_FILE).is_file()
    }

    /// Starts the server with `pg_ctl -w start` and returns once it accepts
    /// connections. Idempotent: a running cluster is left alone.
    ///
    /// With [`PortChoice::AnyFree`] a taken port is replaced by a free one (and
    /// persisted), retrying when another process wins a race for it; with
    /// [`PortChoice::Same`] the persisted port is used or the start fails.
    /// Failures include `pg_ctl`'s output and the tail of the server log.
    pub fn start(&mut self, ports: PortChoice) -> Result<()> {
        if self.status()? == ClusterStatus::Running {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            if ports == PortChoice::AnyFree && !port_is_free(self.port) {
                self.port = free_port()?;
                self.write_port()?;
            }
            match self.start_once() {
                Err(ClusterError::StartFailed { log_tail, .. })
                    if ports == PortChoice::AnyFree
                        && attempt < PORT_RETRIES
                        && (log_tail.contains("could not bind")
                            || log_tail.contains("could not create any TCP/IP sockets")) =>
                {
                    self.port = free_port()?;
                    self.write_port()?;
                }
                other => return other,
            }
        }
    }

    fn start_once(&self) -> Result<()> {
        let log = self.log_file();
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = self
            .run_as
            .command(self.bins.pg_ctl())
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start")
            .output()
            .map_err(io_err(format!("running {}", self.bins.pg_ctl().display())))?;
        if out.status.success() {
            return Ok(());
        }
        Err(ClusterError::StartFailed {
            data_dir: self.data_dir.clone(),
            port: self.port,
            status: out.status.to_string(),
            output: output_text(&out),
            log_tail: log_tail(&log, log_start, 30),
            log,
        })
    }

    /// Stops the server (`pg_ctl stop -m fast -w`: open sessions are
    /// terminated) and returns once it is down. Idempotent.
    pub fn stop(&self) -> Result<()> {
        self.stop_with("fast")
    }

    /// Stops the server without a shutdown checkpoint (`-m immediate`, crash
    /// recovery on the next start). Idempotent.
    pub fn stop_immediate(&self) -> Result<()> {
        self.stop_with("immediate")
    }

    fn stop_with(&self, mode: &str) -> Result<()> {
        if self.status()? == ClusterStatus::Stopped {
            return Ok(());
        }
        let out = self
            .run_as
            .command(self.bins.pg_ctl())
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"])
            .output()
            .map_err(io_err(format!("running {}", self.bins.pg_ctl().display())))?;
        if out.status.success() || self.status()? == ClusterStatus::Stopped {
            return Ok(());
        }
        Err(ClusterError::PgCtlFailed {
            command: "stop",
            data_dir: self.data_dir.clone(),
            status: out.status.to_string(),
            output: output_text(&out),
        })
    }

    /// Whether the server is running (`pg_ctl status`).
    pub fn status(&self) -> Result<ClusterStatus> {
        let out = self
            .run_as
            .command(self.bins.pg_ctl())
            .arg("-D")
            .arg(&self.data_dir)
            .arg("status")
            .output()
            .map_err(io_err(format!("running {}", self.bins.pg_ctl().display())))?;
        match out.status.code() {
            Some(0) => Ok(ClusterStatus::Running),
            // 3: not running; 4: no accessible data directory.
            Some(3 | 4) => Ok(ClusterStatus::Stopped),
            _ => Err(ClusterError::PgCtlFailed {
                command: "status",
                data_dir: self.data_dir.clone(),
                status: out.status.to_string(),
                output: output_text(&out),
            }),
        }
    }

    /// Stops the server immediately and removes the data directory.
    pub fn destroy(self) -> Result<()> {
        // A half-initialised directory has no server to stop; removal still counts.
        let _ = self.stop_immediate();
        fs::remove_dir_all(&self.data_dir)
            .map_err(io_err(format!("removing {}", self.data_dir.display())))
    }

    /// `postgres://postgres@127.0.0.1:<port>/<dbname>`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The TCP port (on 127.0.0.1) the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The (absolute) data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// The binaries this cluster is driven with.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// Ties this cluster to the current process; see [`Reaper::spawn`].
    pub fn spawn_reaper(&self) -> Result<Reaper> {
        Reaper::spawn_as(&self.run_as, &self.bins, &self.data_dir)
    }

    fn write_port(&self) -> Result<()> {
        let file = self.data_dir.join(PORT_FILE);
        fs::write(&file, format!("{}\n", self.port))
            .map_err(io_err(format!("writing {}", file.display())))
    }
}

/// Stops and removes a cluster when dropped or when this process exits.
///
/// Created by [`Reaper::spawn`] or [`Cluster::spawn_reaper`]. Dropping it closes the pipe and
/// waits until the cluster is stopped and its directory removed. Keep it in
/// a `static` to tie the cluster to the process instead.
#[derive(Debug)]
pub struct Reaper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Reaper {
    /// Ties the cluster in `data_dir` (which may not exist yet: spawn the
    /// reaper before `initdb` so even an interrupted creation is cleaned up)
    /// to the current process: spawns `sh` that waits until its stdin pipe,
    /// held by the returned value, closes, then runs
    /// `pg_ctl stop -m immediate` and removes `data_dir`.
    ///
    /// The pipe closes when the [`Reaper`] is dropped or when this process
    /// exits for any reason (panic, signal, `exit`). The child ignores
    /// SIGINT/SIGTERM/SIGHUP so a Ctrl-C to the process group still cleans up.
    pub fn spawn(bins: &PgBinaries, data_dir: &Path) -> Result<Reaper> {
        Self::spawn_as(&RunAs::detect()?, bins, &absolute(data_dir)?)
    }

    fn spawn_as(run_as: &RunAs, bins: &PgBinaries, data_dir: &Path) -> Result<Reaper> {
        const SCRIPT: &str = r#"trap '' INT TERM HUP PIPE
cat >/dev/null
dir=$1
shift
"$@" >/dev/null 2>&1
rm -rf -- "$dir""#;
        let mut argv = run_as.argv(bins.pg_ctl());
        argv.push("-D".into());
        argv.push(data_dir.as_os_str().to_owned());
        argv.extend(
            ["-m", "immediate", "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"].map(OsString::from),
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("e2a-pg-reaper")
            .arg(data_dir)
            .args(argv)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawning the cluster reaper (sh)"))?;
        let stdin = child.stdin.take();
        Ok(Reaper { child, stdin })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Returns a port on 127.0.0.1 that was free a moment ago (bind to port 0, read, release).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(io_err("binding 127.0.0.1:0 to find a port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the port of 127.0.0.1:0"))?
        .port();
    Ok(port)
}

fn port_is_free(port: u16) -> bool {
    port != 0 && TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(io_err(format!("resolving {}", path.display())))
}

fn prepare_data_dir(data_dir: &Path, run_as: &RunAs) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ClusterError::DataDirNotEmpty(data_dir.to_owned()));
    }
    fs::create_dir_all(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(format!(
        "setting permissions of {}",
        data_dir.display()
    )))?;
    if let RunAs::OsUser { user, .. } = run_as {
        let out = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(data_dir)
            .output()
            .map_err(io_err("running chown"))?;
        if !out.status.success() {
            return Err(ClusterError::Io {
                context: format!("chown {user}: {}", data_dir.display()),
                source: io::Error::other(output_text(&out)),
            });
        }
        let writable = run_as
            .command("test")
            .arg("-w")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !writable {
            return Err(ClusterError::DataDirNotAccessible {
                data_dir: data_dir.to_owned(),
                user: user.clone(),
            });
        }
    }
    Ok(())
}

fn append_settings(data_dir: &Path, options: &ClusterOptions) -> Result<()> {
    use std::io::Write;
    let socket_dir = data_dir.to_string_lossy();
    // The kernel caps Unix socket paths (~107 bytes); when the data directory
    // is too deep, go TCP-only rather than fail to start.
    let socket_dir = if socket_dir.len() + ".s.PGSQL.65535".len() + 1 > MAX_SOCKET_PATH {
        String::new()
    } else {
        socket_dir.replace('\'', "''")
    };
    let mut conf = format!(
        "\n# --- e2a settings (written when this cluster was created) ---\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket_dir}'\n\
         max_connections = {}\n",
        options.max_connections
    );
    if options.durability == Durability::Throwaway {
        conf.push_str(
            "# throwaway test cluster: fast, not crash-safe\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             wal_level = minimal\n\
             max_wal_senders = 0\n",
        );
    }
    let file = data_dir.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(io_err(format!("writing {}", file.display())))
}

fn read_port(data_dir: &Path) -> Result<u16> {
    if !Cluster::exists(data_dir) {
        return Err(ClusterError::NotACluster(data_dir.to_owned()));
    }
    let file = data_dir.join(PORT_FILE);
    let text = fs::read_to_string(&file).map_err(io_err(format!("reading {}", file.display())))?;
    text.trim().parse().map_err(|_| ClusterError::Io {
        context: format!("reading {}", file.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("not a port: {text:?}")),
    })
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(err.trim_end());
    }
    text
}

/// The last `lines` lines of `path` written after byte `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(e) = read {
        return format!("(cannot read {}: {e})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("15") > parse_version("9.6"));
        assert!(parse_version("16") > parse_version("15"));
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn log_tail_keeps_last_lines_after_offset() {
        let dir = std::env::temp_dir().join(format!("e2a-logtail-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        let file = dir.join("log");
        fs::write(&file, "old\na\nb\nc\n").expect("write log");
        assert_eq!(log_tail(&file, 4, 2), "b\nc");
        fs::remove_dir_all(&dir).expect("remove temp dir");
    }
}
