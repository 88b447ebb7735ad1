//! The relay's configuration: [`CommonArgs`] plus the SMTP listener and its
//! limits. See `e2a-relay --help`.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};

use crate::session::SessionConfig;

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9091;

/// One-line `--help` summary.
const ABOUT: &str = "e2a SMTP relay: receives mail for agents, authenticates it and stores it.";

/// `--help` description: what this build does and, plainly, what it does not.
const LONG_ABOUT: &str = "\
e2a SMTP relay: the inbound SMTP listener of e2a.

It accepts mail for agents (RCPT to an unknown agent or an unverified domain \
is refused with 550 5.1.1), checks SPF on the envelope sender, DKIM and DMARC, \
signs the verdicts into X-E2A-Auth-* headers, threads the message into a \
conversation and stores one copy per recipient agent together with its \
email.received event in one transaction. 250 is sent only after that \
transaction commits; if the database fails the answer is 451 4.3.0 and \
nothing is stored. A sender retrying a message it already got 250 for does \
not create a duplicate. STARTTLS is offered when E2A_SMTP_TLS_CERT and \
E2A_SMTP_TLS_KEY name a PEM certificate and key.";

/// e2a SMTP relay (see [`LONG_ABOUT`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "e2a-relay", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub limits: e2a_runtime::config::LimitsArgs,

    /// Address the SMTP listener binds.
    #[arg(long, env = "E2A_SMTP_ADDR", default_value = "0.0.0.0:2525")]
    pub smtp_addr: SocketAddr,

    /// Host name announced in the 220 greeting and the EHLO/HELO reply.
    #[arg(long, env = "E2A_SMTP_DOMAIN", default_value = "localhost", value_parser = parse_domain)]
    pub smtp_domain: String,

    /// Largest message accepted, in bytes (announced as SIZE in the EHLO reply).
    #[arg(long, env = "E2A_SMTP_MAX_MESSAGE_BYTES", default_value_t = 10 << 20, value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    pub smtp_max_message_bytes: u64,

    /// Most recipients accepted per message.
    #[arg(long, env = "E2A_SMTP_MAX_RECIPIENTS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub smtp_max_recipients: u32,

    /// Seconds a client may stay silent (or leave our reply unread) before `421 4.4.2` and close.
    #[arg(long, env = "E2A_SMTP_IDLE_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub smtp_idle_timeout_secs: u64,

    /// Longest a whole SMTP session may last, in seconds, before `421 4.4.2` and close.
    #[arg(long, env = "E2A_SMTP_SESSION_TIMEOUT_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub smtp_session_timeout_secs: u64,

    /// Most simultaneous SMTP connections; beyond it a client gets `421 4.3.2 too many connections`.
    #[arg(long, env = "E2A_SMTP_MAX_CONNECTIONS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub smtp_max_connections: u32,

    /// Most simultaneous SMTP connections from one client IP address; beyond it `421 4.7.0`.
    #[arg(long, env = "E2A_SMTP_MAX_CONNECTIONS_PER_IP", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub smtp_max_connections_per_ip: u32,

    /// Bytes of message data all sessions together may hold in memory; a session that cannot get its share answers `452 4.3.1` (raised to at least E2A_SMTP_MAX_MESSAGE_BYTES).
    #[arg(long, env = "E2A_SMTP_DATA_BUDGET_BYTES", default_value_t = crate::session::DEFAULT_DATA_BUDGET_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=(1 << 40)))]
    pub smtp_data_budget_bytes: u64,

    /// Most mail transactions (MAIL commands) per session; the next gets `421 4.7.0` and the connection closes.
    #[arg(long, env = "E2A_SMTP_MAX_TRANSACTIONS", default_value_t = crate::session::DEFAULT_MAX_TRANSACTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub smtp_max_transactions: u32,

    /// Most RCPT commands per session, whatever their answer; the next gets `421 4.7.0` and the connection closes.
    #[arg(long, env = "E2A_SMTP_MAX_RCPT_COMMANDS", default_value_t = crate::session::DEFAULT_MAX_RCPT_COMMANDS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub smtp_max_rcpt_commands: u32,

    /// Milliseconds an accepted recipient (agent, owner, signing secret, quota state) is answered from memory before it is looked up again; 0 looks up every RCPT. Refusals are never cached.
    #[arg(long, env = "E2A_SMTP_RECIPIENT_CACHE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub smtp_recipient_cache_ms: u64,

    /// PEM certificate chain for STARTTLS (with E2A_SMTP_TLS_KEY); unset: STARTTLS is not offered.
    #[arg(long, env = "E2A_SMTP_TLS_CERT")]
    pub smtp_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key for STARTTLS (with E2A_SMTP_TLS_CERT).
    #[arg(long, env = "E2A_SMTP_TLS_KEY")]
    pub smtp_tls_key: Option<std::path::PathBuf>,

    /// SPF/DKIM/DMARC lookups: `system` (the system resolver) or `disabled` (every verdict `none`).
    #[arg(long, env = "E2A_SMTP_AUTH_DNS", value_enum, default_value_t = AuthDns::System)]
    pub smtp_auth_dns: AuthDns,

    /// Longest wait for one DNS answer during SPF/DKIM/DMARC checks; a timeout is a `temperror` verdict.
    #[arg(long, env = "E2A_SMTP_DNS_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=30_000))]
    pub smtp_dns_timeout_ms: u64,

    /// Comma-separated DKIM signing domains (ours) whose signature may vouch for an X-E2A-Conversation-Id header. Empty: the header is never trusted.
    #[arg(
        long,
        env = "E2A_SMTP_TRUSTED_SIGNING_DOMAINS",
        default_value = "",
        value_delimiter = ','
    )]
    pub smtp_trusted_signing_domains: Vec<String>,
}

/// Whether the relay looks up SPF/DKIM/DMARC records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthDns {
    /// The system resolver (`/etc/resolv.conf`), bounded by `E2A_SMTP_DNS_TIMEOUT_MS`.
    System,
    /// No lookups: every verdict is `none` (local development without DNS).
    Disabled,
}

impl Service for Config {
    const NAME: &'static str = "relay";
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

impl Config {
    /// A configuration for tests and embedding: the given database,
    /// defaults everywhere else (addresses unused by [`crate::run`]).
    pub fn for_database(url: impl Into<String>) -> Self {
        let mut config = Config::parse_from(["e2a-relay"]);
        config.common = CommonArgs::for_database(url);
        config
    }

    /// The per-session settings these options describe.
    /// Session settings; loads the STARTTLS certificate when configured
    /// (bad or half-configured files are an error: the relay must not start
    /// silently without the TLS the operator asked for).
    pub fn session_config(&self) -> Result<SessionConfig, crate::tls::TlsConfigError> {
        let tls = match (&self.smtp_tls_cert, &self.smtp_tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            (None, None) => None,
            _ => return Err(crate::tls::TlsConfigError::Incomplete),
        };
        let max_message_bytes = usize::try_from(self.smtp_max_message_bytes).unwrap_or(usize::MAX);
        Ok(SessionConfig {
            tls,
            domain: self.smtp_domain.clone(),
            max_message_bytes,
            max_recipients: self.smtp_max_recipients as usize,
            idle_timeout: Duration::from_secs(self.smtp_idle_timeout_secs),
            session_timeout: Duration::from_secs(self.smtp_session_timeout_secs),
            max_transactions: self.smtp_max_transactions,
            max_rcpt_commands: self.smtp_max_rcpt_commands,
            data_budget: crate::session::data_budget(
                usize::try_from(self.smtp_data_budget_bytes).unwrap_or(usize::MAX),
                max_message_bytes,
            ),
        })
    }
}

/// Accepts a host name or address literal made of printable ASCII without
/// spaces: it is echoed verbatim in SMTP replies.
fn parse_domain(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "must be printable ASCII without spaces (a host name such as mx.example.com)".into(),
        );
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::for_database("postgres://localhost/e2a");
        assert_eq!(c.smtp_addr.port(), 2525);
        assert_eq!(c.smtp_domain, "localhost");
        assert_eq!(c.smtp_max_message_bytes, 10 * 1024 * 1024);
        assert_eq!(c.smtp_max_recipients, 50);
        assert_eq!(c.smtp_idle_timeout_secs, 30);
        assert_eq!(c.smtp_session_timeout_secs, 600);
        assert_eq!(c.smtp_max_connections, 1000);
        assert_eq!(c.smtp_max_connections_per_ip, 50);
        assert_eq!(c.smtp_data_budget_bytes, 64 << 20);
        assert_eq!(c.smtp_max_transactions, 100);
        assert_eq!(c.smtp_max_rcpt_commands, 1000);
        assert_eq!(c.common.ops_addr_or(DEFAULT_OPS_PORT).port(), 9091);
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Config::try_parse_from(["x", "--smtp-domain", "two words"]).is_err());
        assert!(Config::try_parse_from(["x", "--smtp-idle-timeout-secs", "0"]).is_err());
        assert!(Config::try_parse_from(["x", "--smtp-max-connections", "0"]).is_err());
        let c = Config::try_parse_from(["x", "--smtp-domain", "mx.example.com"]).unwrap();
        assert_eq!(c.session_config().unwrap().domain, "mx.example.com");
    }

    #[test]
    fn help_describes_acceptance_and_its_settings() {
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("250 is sent only after"), "{help}");
        for var in [
            "E2A_SMTP_MAX_CONNECTIONS",
            "E2A_SMTP_MAX_CONNECTIONS_PER_IP",
            "E2A_SMTP_DATA_BUDGET_BYTES",
            "E2A_SMTP_MAX_TRANSACTIONS",
            "E2A_SMTP_MAX_RCPT_COMMANDS",
            "E2A_SMTP_AUTH_DNS",
            "E2A_SMTP_TRUSTED_SIGNING_DOMAINS",
        ] {
            assert!(help.contains(var), "{var} missing from --help");
        }
    }

    #[test]
    fn trusted_signing_domains_are_a_comma_list() {
        let c = Config::try_parse_from([
            "x",
            "--smtp-trusted-signing-domains",
            "mail.example.com,e2a.example",
        ])
        .unwrap();
        assert_eq!(
            c.smtp_trusted_signing_domains,
            ["mail.example.com", "e2a.example"]
        );
        assert!(Config::try_parse_from(["x", "--smtp-auth-dns", "sometimes"]).is_err());
    }
}
