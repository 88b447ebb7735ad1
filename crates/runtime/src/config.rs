//! Configuration shared by every service, read from `E2A_*` environment
//! variables (and `DATABASE_URL`) or the equivalent flags.
//!
//! Each binary's clap `Parser` flattens [`CommonArgs`] and adds its own
//! options; `--help` lists them all with their variables and defaults.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};
use e2a_store::{StoreConfig, migrate::MigrationMode};

/// Database connection settings.
#[derive(Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/e2a. Takes precedence over DATABASE_URL.
    #[arg(
        long = "database-url",
        env = "E2A_DATABASE_URL",
        hide_env_values = true
    )]
    pub e2a_database_url: Option<String>,

    /// Fallback PostgreSQL URL when E2A_DATABASE_URL is unset.
    #[arg(
        long = "database-url-fallback",
        env = "DATABASE_URL",
        hide_env_values = true,
        hide = true
    )]
    pub database_url: Option<String>,

    /// Maximum pooled database connections.
    #[arg(long, env = "E2A_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,

    /// Time allowed to open one database connection, in milliseconds.
    #[arg(long, env = "E2A_DB_CONNECT_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub db_connect_timeout_ms: u64,

    /// Longest wait for a free pooled connection, in milliseconds (then 503).
    #[arg(long, env = "E2A_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub db_acquire_timeout_ms: u64,

    /// Server-side statement_timeout for pooled connections, in milliseconds.
    #[arg(long, env = "E2A_DB_STATEMENT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub db_statement_timeout_ms: u64,

    /// How long to keep retrying an unreachable database at start-up before exiting, in seconds.
    #[arg(long, env = "E2A_DB_STARTUP_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub db_startup_timeout_secs: u64,
}

impl std::fmt::Debug for DatabaseArgs {
    /// Prints the URLs without their passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |u: &Option<String>| u.as_deref().map(e2a_store::secret::redact_database_url);
        f.debug_struct("DatabaseArgs")
            .field("e2a_database_url", &redact(&self.e2a_database_url))
            .field("database_url", &redact(&self.database_url))
            .field("db_pool_size", &self.db_pool_size)
            .field("db_connect_timeout_ms", &self.db_connect_timeout_ms)
            .field("db_acquire_timeout_ms", &self.db_acquire_timeout_ms)
            .field("db_statement_timeout_ms", &self.db_statement_timeout_ms)
            .field("db_startup_timeout_secs", &self.db_startup_timeout_secs)
            .finish()
    }
}

/// Configuration errors found after parsing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither database variable is set.
    #[error("no database configured: set E2A_DATABASE_URL (or DATABASE_URL) to a postgres:// URL")]
    MissingDatabaseUrl,
}

impl DatabaseArgs {
    /// The effective URL: `E2A_DATABASE_URL`, else `DATABASE_URL`.
    pub fn url(&self) -> Result<&str, ConfigError> {
        self.e2a_database_url
            .as_deref()
            .or(self.database_url.as_deref())
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingDatabaseUrl)
    }

    /// The store configuration these settings describe.
    pub fn store_config(&self) -> Result<StoreConfig, ConfigError> {
        Ok(StoreConfig {
            database_url: self.url()?.to_owned(),
            pool_size: self.db_pool_size as usize,
            connect_timeout: Duration::from_millis(self.db_connect_timeout_ms),
            acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        })
    }

    /// Start-up retry budget.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.db_startup_timeout_secs)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Deployment environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Environment {
    /// Local development: relaxed checks (domains verify without DNS,
    /// `http://` and private webhook targets allowed). `cargo xtask dev` and
    /// the tests set it explicitly.
    Development,
    /// Production, the default: strict checks (HTTPS-only public webhook
    /// targets, real DNS probes before a domain verifies, …).
    #[default]
    Production,
}

/// Settings every service reads.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DatabaseArgs,

    /// What to do with the schema at start-up: auto (apply pending), verify (refuse to start unless up to date) or skip.
    #[arg(long, env = "E2A_MIGRATION_MODE", default_value = "auto", value_parser = parse_migration_mode)]
    pub migration_mode: MigrationMode,

    /// Address of the ops listener (/healthz, /readyz, /metrics). Default: 0.0.0.0 on the service's ops port.
    #[arg(long, env = "E2A_OPS_ADDR")]
    pub ops_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "E2A_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Deployment environment. Production (the default) verifies domains through DNS and refuses http:// and private webhook targets; development relaxes both.
    #[arg(long = "env", env = "E2A_ENV", value_enum, default_value_t = Environment::Production)]
    pub environment: Environment,

    /// Seconds allowed for in-flight work to finish after SIGINT/SIGTERM.
    #[arg(long, env = "E2A_SHUTDOWN_GRACE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_secs: u64,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub http: HttpTimeoutArgs,
}

/// Default of `E2A_HTTP_HEADER_READ_TIMEOUT_SECS`.
pub const DEFAULT_HTTP_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Default of `E2A_HTTP_IDLE_TIMEOUT_SECS`.
pub const DEFAULT_HTTP_IDLE_TIMEOUT_SECS: u64 = 75;

/// Timeouts of every HTTP listener of the process: the API's public one and
/// each service's ops listener (see [`crate::serve`]).
#[derive(Debug, Clone, Args)]
pub struct HttpTimeoutArgs {
    /// Seconds a client has to send a request's headers, counted from the connection's opening or from the first byte of a later request on a kept-alive connection; a slower client is disconnected. Applies to every HTTP listener (the API's and the ops listener).
    #[arg(long, env = "E2A_HTTP_HEADER_READ_TIMEOUT_SECS", default_value_t = DEFAULT_HTTP_HEADER_READ_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub http_header_read_timeout_secs: u64,

    /// Seconds a kept-alive HTTP connection may wait for its next request before it is closed. Keep it above the idle timeout of a load balancer in front (often 60). Applies to every HTTP listener.
    #[arg(long, env = "E2A_HTTP_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_HTTP_IDLE_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_idle_timeout_secs: u64,
}

impl Default for HttpTimeoutArgs {
    fn default() -> Self {
        Self {
            http_header_read_timeout_secs: DEFAULT_HTTP_HEADER_READ_TIMEOUT_SECS,
            http_idle_timeout_secs: DEFAULT_HTTP_IDLE_TIMEOUT_SECS,
        }
    }
}

impl HttpTimeoutArgs {
    /// The header-read timeout.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.http_header_read_timeout_secs)
    }

    /// The keep-alive idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.http_idle_timeout_secs)
    }
}

fn parse_migration_mode(s: &str) -> Result<MigrationMode, String> {
    s.parse()
}

impl CommonArgs {
    /// The drain deadline after a shutdown signal.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The ops address, or `0.0.0.0:<default_port>`.
    pub fn ops_addr_or(&self, default_port: u16) -> SocketAddr {
        self.ops_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }

    /// Defaults suitable for tests and embedding: the given database,
    /// `auto` migrations, short timeouts.
    pub fn for_database(url: impl Into<String>) -> Self {
        Self {
            db: DatabaseArgs {
                e2a_database_url: Some(url.into()),
                database_url: None,
                db_pool_size: 8,
                db_connect_timeout_ms: 2000,
                db_acquire_timeout_ms: 2000,
                db_statement_timeout_ms: 10_000,
                db_startup_timeout_secs: 5,
            },
            migration_mode: MigrationMode::Auto,
            ops_addr: None,
            log_format: LogFormat::Pretty,
            environment: Environment::Development,
            shutdown_grace_secs: 10,
            http: HttpTimeoutArgs::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn flags_parse_and_validate() {
        let cli = Cli::try_parse_from([
            "x",
            "--database-url",
            "postgres://localhost/e2a",
            "--migration-mode",
            "verify",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.common.migration_mode, MigrationMode::Verify);
        assert_eq!(cli.common.log_format, LogFormat::Json);
        assert_eq!(cli.common.db.url().unwrap(), "postgres://localhost/e2a");
        assert_eq!(cli.common.ops_addr_or(9090).port(), 9090);
        let defaults = HttpTimeoutArgs::default();
        assert_eq!(
            (
                cli.common.http.http_header_read_timeout_secs,
                cli.common.http.http_idle_timeout_secs
            ),
            (
                defaults.http_header_read_timeout_secs,
                defaults.http_idle_timeout_secs
            ),
            "clap's defaults and HttpTimeoutArgs::default() agree"
        );
    }

    /// Safe by default: an operator who sets nothing runs production.
    #[test]
    fn the_environment_defaults_to_production() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let env = cmd
            .get_arguments()
            .find(|a| a.get_id() == "environment")
            .unwrap();
        assert_eq!(env.get_env().unwrap(), "E2A_ENV");
        assert_eq!(env.get_default_values(), ["production"]);
        assert_eq!(Environment::default(), Environment::Production);
        let cli = Cli::try_parse_from(["x", "--env", "development"]).unwrap();
        assert_eq!(cli.common.environment, Environment::Development);
    }

    #[test]
    fn invalid_values_are_rejected_with_a_message() {
        let err = Cli::try_parse_from(["x", "--migration-mode", "sometimes"]).unwrap_err();
        assert!(err.to_string().contains("unknown migration mode"), "{err}");
        let err = Cli::try_parse_from(["x", "--db-pool-size", "0"]).unwrap_err();
        assert!(err.to_string().contains("db-pool-size"), "{err}");
        let err = Cli::try_parse_from(["x", "--ops-addr", "not-an-addr"]).unwrap_err();
        assert!(err.to_string().contains("ops-addr"), "{err}");
        let err = Cli::try_parse_from(["x", "--http-header-read-timeout-secs", "0"]).unwrap_err();
        assert!(
            err.to_string().contains("http-header-read-timeout-secs"),
            "{err}"
        );
    }

    #[test]
    fn missing_database_url_is_a_clear_error() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let mut db = cli.common.db;
        db.e2a_database_url = None;
        db.database_url = None;
        let msg = db.url().unwrap_err().to_string();
        assert!(msg.contains("E2A_DATABASE_URL"), "{msg}");
        db.database_url = Some("postgres://fallback/db".into());
        assert_eq!(db.url().unwrap(), "postgres://fallback/db");
        db.e2a_database_url = Some("postgres://primary/db".into());
        assert_eq!(db.url().unwrap(), "postgres://primary/db");
    }
}

/// What every producer of an agent's outbound mail needs: the API's send
/// routes and approvals, and the janitor's approval of an expired hold.
#[derive(Debug, Clone, clap::Args)]
pub struct OutboundArgs {
    /// Envelope-sender domain of outbound mail (MAIL FROM <agent-local-part>@this; SPF is checked on it) and the From domain of test mail. Empty: each agent's own domain. The From header is always the agent's own address, DKIM-signed by its domain.
    #[arg(long, env = "E2A_OUTBOUND_FROM_DOMAIN", default_value = "", value_parser = parse_optional_host)]
    pub outbound_from_domain: String,

    /// Attempts an outbound message gets before it is dead-lettered (email.failed).
    #[arg(long, env = "E2A_MAIL_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..=50))]
    pub mail_max_attempts: i32,
}

impl Default for OutboundArgs {
    fn default() -> Self {
        Self {
            outbound_from_domain: String::new(),
            mail_max_attempts: 8,
        }
    }
}

/// An empty string, or a host name (lower-cased, trailing dot dropped).
pub fn parse_optional_host(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    parse_host(s)
}

/// A host name such as `mx.example.com` (lower-cased, trailing dot
/// dropped).
pub fn parse_host(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('.');
    if s.is_empty()
        || s.len() > 253
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err("must be a host name such as mx.example.com".into());
    }
    Ok(s.to_ascii_lowercase())
}

/// The caps of accounts without an `account_limits` row (`E2A_LIMITS_*`),
/// shared by every service that enforces them (the API on sends and
/// registrations, the relay at RCPT).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Plan code for accounts without an account_limits row.
    #[arg(long, env = "E2A_LIMITS_PLAN_CODE", default_value = "default")]
    pub limits_plan_code: String,

    /// Default maximum agents per account.
    #[arg(long, env = "E2A_LIMITS_MAX_AGENTS", default_value_t = 1_000_000, value_parser = clap::value_parser!(i32).range(0..))]
    pub limits_max_agents: i32,

    /// Default maximum custom domains per account.
    #[arg(long, env = "E2A_LIMITS_MAX_DOMAINS", default_value_t = 1_000_000, value_parser = clap::value_parser!(i32).range(0..))]
    pub limits_max_domains: i32,

    /// Default maximum messages per account per UTC month.
    #[arg(long, env = "E2A_LIMITS_MAX_MESSAGES_MONTH", default_value_t = 1_000_000_000, value_parser = clap::value_parser!(i32).range(0..))]
    pub limits_max_messages_month: i32,

    /// Default maximum stored bytes per account.
    #[arg(long, env = "E2A_LIMITS_MAX_STORAGE_BYTES", default_value_t = 1 << 50, value_parser = clap::value_parser!(i64).range(0..))]
    pub limits_max_storage_bytes: i64,

    /// Default maximum webhooks per account.
    #[arg(long, env = "E2A_LIMITS_MAX_WEBHOOKS", default_value_t = 50, value_parser = clap::value_parser!(i32).range(0..))]
    pub limits_max_webhooks: i32,
}

impl LimitsArgs {
    /// These settings as [`e2a_store::account_limits::Limits`].
    pub fn limits(&self) -> e2a_store::account_limits::Limits {
        e2a_store::account_limits::Limits {
            plan_code: self.limits_plan_code.clone(),
            max_agents: self.limits_max_agents,
            max_domains: self.limits_max_domains,
            max_messages_month: self.limits_max_messages_month,
            max_storage_bytes: self.limits_max_storage_bytes,
            max_webhooks: self.limits_max_webhooks,
            upgrade_url: String::new(),
        }
    }
}
