//! The deliverer's configuration: [`CommonArgs`] plus the webhook delivery
//! settings. See `e2a-deliverer --help`.

use std::time::Duration;

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};
use e2a_webhook::UrlPolicy;

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9092;

/// One-line `--help` summary.
const ABOUT: &str = "e2a deliverer: fans events out to webhooks and delivers them, and submits outbound mail over SMTP.";

/// `--help` description: what this build does and, plainly, what it does not.
const LONG_ABOUT: &str = "\
e2a deliverer: fans events out to webhooks and delivers them.

It LISTENs on `webhook_events_new`, `webhook_deliveries_new` and \
`mail_outbox_new` on a dedicated database connection (reconnecting with \
backoff) and polls once a second as a fallback. Each pending event becomes \
one delivery per matching enabled webhook, committed with the event's new \
status; workers claim due deliveries under a lease (at most one in flight \
per webhook across every replica), POST them signed, and record the outcome \
guarded by the lease. Failed attempts are retried over 72 hours; a webhook \
that keeps failing is disabled. Legacy per-agent pushes go through the same \
loop.

Outbound mail: workers claim due mail-outbox deliveries under a lease, pass \
the send gate (a message is submitted at most once even when replicas race \
or one dies), DKIM-sign them with the From domain's key, submit them to \
E2A_OUTBOUND_SMTP_HOST with explicit connect, command and data timeouts, and \
record each recipient's answer: sent (email.sent), retried on a schedule \
(1 min, 5 min, 15 min, 1 h, 2 h, 4 h, 8 h) after a 4xx, a timeout or a \
connection error, or dead-lettered (email.failed) after a 5xx or the last \
attempt. Without E2A_OUTBOUND_SMTP_HOST mail waits in the queue.

On SIGTERM it stops claiming and finishes the deliveries in flight.";

/// e2a deliverer (see [`LONG_ABOUT`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "e2a-deliverer", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,

    /// Webhook deliveries in flight at once in this replica (each to a different webhook).
    #[arg(long, env = "E2A_WEBHOOK_WORKERS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub webhook_workers: u32,

    /// Legacy per-agent pushes (to a cloud agent's webhook_url) in flight at once in this replica.
    #[arg(long, env = "E2A_LEGACY_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub legacy_workers: u32,

    /// Seconds one webhook POST may take in total (connect, send, response).
    #[arg(long, env = "E2A_WEBHOOK_TIMEOUT_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_secs: u64,

    /// Seconds a claimed delivery is leased to this replica: after it, another replica may deliver it again. Must be at least twice the timeout plus 10 s (checked at start-up).
    #[arg(long, env = "E2A_WEBHOOK_LEASE_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub webhook_lease_secs: u64,

    /// Events fanned out per statement.
    #[arg(long, env = "E2A_FANOUT_BATCH", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub fanout_batch: i64,

    /// This gateway's public host name (the relay's MX name): the name the deliverer greets SMTP servers with (EHLO).
    #[arg(long, env = "E2A_SMTP_DOMAIN", default_value = "localhost")]
    pub smtp_domain: String,

    /// Outbound mails being submitted at once in this replica.
    #[arg(long, env = "E2A_MAIL_WORKERS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub mail_workers: u32,

    /// Host of the SMTP server outbound mail is submitted to (a smarthost or provider such as SES). Empty: outbound mail waits in the queue until one is configured.
    #[arg(long, env = "E2A_OUTBOUND_SMTP_HOST", default_value = "")]
    pub outbound_smtp_host: String,

    /// Its port.
    #[arg(long, env = "E2A_OUTBOUND_SMTP_PORT", default_value_t = 587)]
    pub outbound_smtp_port: u16,

    /// AUTH PLAIN user name (empty: no authentication).
    #[arg(long, env = "E2A_OUTBOUND_SMTP_USERNAME", default_value = "")]
    pub outbound_smtp_username: String,

    /// AUTH PLAIN password (never logged).
    #[arg(
        long,
        env = "E2A_OUTBOUND_SMTP_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub outbound_smtp_password: String,

    /// Transport security: `starttls` (required, the default), `implicit` (TLS from the first byte, port 465) or `none` (plain text: local development and tests only).
    #[arg(long, env = "E2A_OUTBOUND_SMTP_TLS", default_value = "starttls")]
    pub outbound_smtp_tls: String,

    /// Seconds to open the TCP connection (and TLS) to the SMTP server.
    #[arg(long, env = "E2A_OUTBOUND_SMTP_CONNECT_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub smtp_connect_timeout_secs: u64,

    /// Seconds each SMTP command may wait for its reply.
    #[arg(long, env = "E2A_OUTBOUND_SMTP_COMMAND_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub smtp_command_timeout_secs: u64,

    /// Seconds to transfer the message and get the final reply to DATA.
    #[arg(long, env = "E2A_OUTBOUND_SMTP_DATA_TIMEOUT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub smtp_data_timeout_secs: u64,

    /// Seconds a claimed mail delivery is leased to this replica, and how long its send gate stays closed to others. Must exceed the worst-case SMTP submission (the timeouts above added up) by 30 s (checked at start-up). 0: that worst case plus 60 s.
    #[arg(long, env = "E2A_MAIL_LEASE_SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub mail_lease_secs: u64,

    /// Deliver to webhook URLs on loopback, private (RFC 1918), CGNAT, link-local and unique-local addresses even in production (`1`/`true`). Development (`E2A_ENV=development`) always may. Never for a deployment on the internet; cloud-metadata addresses stay refused.
    #[arg(long, env = "E2A_ALLOW_PRIVATE_WEBHOOKS", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_private_webhooks: bool,
}

impl Service for Config {
    const NAME: &'static str = "deliverer";
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// A configuration the deliverer refuses to start with.
#[derive(Debug, thiserror::Error)]
#[error(
    "E2A_WEBHOOK_LEASE_SECS ({lease}) must be at least twice E2A_WEBHOOK_TIMEOUT_SECS ({timeout}) plus 10: \
     a lease that ends while its POST is still running lets another replica deliver the same event"
)]
pub struct LeaseTooShort {
    lease: u64,
    timeout: u64,
}

/// Outbound SMTP settings the deliverer refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    /// `E2A_OUTBOUND_SMTP_TLS` is not one of the modes.
    #[error("E2A_OUTBOUND_SMTP_TLS must be starttls, implicit or none, not {0:?}")]
    Tls(String),
    /// A lease the worst-case submission could outlast.
    #[error(
        "E2A_MAIL_LEASE_SECS ({lease}) must exceed the worst-case SMTP submission ({worst} s: the \
         E2A_OUTBOUND_SMTP_*_TIMEOUT_SECS added up) by at least {margin} s: a lease or send gate that ends \
         while a submission may still be running lets another replica send the same message again"
    )]
    LeaseTooShort {
        /// The configured lease.
        lease: u64,
        /// The worst case, rounded up.
        worst: u64,
        /// The margin required.
        margin: u64,
    },
    /// Plain-text submission in production.
    #[error(
        "E2A_OUTBOUND_SMTP_TLS=none sends mail (and credentials) in plain text; refused in production"
    )]
    PlainTextInProduction,
}

/// Room between the worst-case submission and the end of the lease, for
/// recording the outcome.
pub const MAIL_LEASE_MARGIN: Duration = Duration::from_secs(30);

impl Config {
    /// The SMTP server outbound mail goes to, or `None` when
    /// `E2A_OUTBOUND_SMTP_HOST` is empty (mail then waits in the queue).
    pub fn smtp_config(&self) -> Result<Option<e2a_mail::submit::SmtpConfig>, MailConfigError> {
        let tls: e2a_mail::submit::TlsMode = self
            .outbound_smtp_tls
            .parse()
            .map_err(|_| MailConfigError::Tls(self.outbound_smtp_tls.clone()))?;
        if self.outbound_smtp_host.trim().is_empty() {
            return Ok(None);
        }
        if self.production() && tls == e2a_mail::submit::TlsMode::None {
            return Err(MailConfigError::PlainTextInProduction);
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Ok(Some(e2a_mail::submit::SmtpConfig {
            host: self.outbound_smtp_host.trim().to_owned(),
            port: self.outbound_smtp_port,
            tls,
            username: non_empty(&self.outbound_smtp_username),
            password: non_empty(&self.outbound_smtp_password),
            helo_name: self.smtp_domain.trim().to_owned(),
            connect_timeout: Duration::from_secs(self.smtp_connect_timeout_secs),
            command_timeout: Duration::from_secs(self.smtp_command_timeout_secs),
            data_timeout: Duration::from_secs(self.smtp_data_timeout_secs),
        }))
    }

    /// The mail lease (and send-gate window), checked against the
    /// worst-case submission of `smtp` (the original's flaw 12: its window
    /// was shorter than its own worst case).
    pub fn mail_lease(
        &self,
        smtp: Option<&e2a_mail::submit::SmtpConfig>,
    ) -> Result<Duration, MailConfigError> {
        let worst = smtp.map_or(
            Duration::from_secs(60),
            e2a_mail::submit::SmtpConfig::worst_case,
        );
        if self.mail_lease_secs == 0 {
            return Ok(worst + 2 * MAIL_LEASE_MARGIN);
        }
        let lease = Duration::from_secs(self.mail_lease_secs);
        if lease < worst + MAIL_LEASE_MARGIN {
            return Err(MailConfigError::LeaseTooShort {
                lease: self.mail_lease_secs,
                worst: worst.as_secs() + u64::from(worst.subsec_nanos() > 0),
                margin: MAIL_LEASE_MARGIN.as_secs(),
            });
        }
        Ok(lease)
    }

    /// A configuration for tests and embedding: the given database,
    /// defaults everywhere else.
    pub fn for_database(url: impl Into<String>) -> Self {
        let mut config = Config::parse_from(["e2a-deliverer"]);
        config.common = CommonArgs::for_database(url);
        config
    }

    /// Whether this is a production deployment (`E2A_ENV`).
    pub fn production(&self) -> bool {
        self.common.environment == e2a_runtime::config::Environment::Production
    }

    /// Where webhooks may be delivered: `https://` to public addresses in
    /// production; `http://` and private addresses in development; private
    /// addresses in production only with `E2A_ALLOW_PRIVATE_WEBHOOKS`.
    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_http: !self.production(),
            allow_private: !self.production() || self.allow_private_webhooks,
        }
    }

    /// The total time of one POST.
    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhook_timeout_secs)
    }

    /// The lease, after checking it outlasts a POST with room to record
    /// its outcome.
    pub fn webhook_lease(&self) -> Result<Duration, LeaseTooShort> {
        if self.webhook_lease_secs < 2 * self.webhook_timeout_secs + 10 {
            return Err(LeaseTooShort {
                lease: self.webhook_lease_secs,
                timeout: self.webhook_timeout_secs,
            });
        }
        Ok(Duration::from_secs(self.webhook_lease_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_help() {
        use clap::CommandFactory;
        let c = Config::for_database("postgres://localhost/e2a");
        assert_eq!(c.common.ops_addr_or(DEFAULT_OPS_PORT).port(), 9092);
        assert_eq!(c.webhook_workers, 8);
        assert_eq!(c.webhook_timeout(), Duration::from_secs(15));
        assert_eq!(c.webhook_lease().unwrap(), Duration::from_secs(60));
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("E2A_WEBHOOK_WORKERS"), "{help}");
        assert!(help.contains("E2A_OUTBOUND_SMTP_HOST"), "{help}");
        assert!(help.contains("E2A_MAIL_LEASE_SECS"), "{help}");
    }

    #[test]
    fn a_lease_shorter_than_a_post_is_refused() {
        let mut c = Config::for_database("postgres://localhost/e2a");
        c.webhook_timeout_secs = 30;
        c.webhook_lease_secs = 60;
        let e = c.webhook_lease().unwrap_err().to_string();
        assert!(e.contains("E2A_WEBHOOK_LEASE_SECS (60)"), "{e}");
        c.webhook_lease_secs = 70;
        assert!(c.webhook_lease().is_ok());
    }

    #[test]
    fn production_delivers_to_public_https_only() {
        let mut c = Config::for_database("postgres://localhost/e2a");
        c.common.environment = e2a_runtime::config::Environment::Production;
        assert_eq!(c.url_policy(), UrlPolicy::STRICT);
        c.allow_private_webhooks = true;
        assert!(c.url_policy().allow_private && !c.url_policy().allow_http);
    }
}
