//! The deliverer's configuration: [`CommonArgs`] plus the webhook delivery
//! settings. See `e2a-deliverer --help`.

use std::time::Duration;

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};
use e2a_webhook::UrlPolicy;

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9092;

/// One-line `--help` summary.
const ABOUT: &str = "e2a deliverer: fans events out to webhooks and delivers them (outbound mail arrives in a later issue).";

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
loop. On SIGTERM it stops claiming and finishes the deliveries in flight. \
Outbound mail is not delivered by this build yet.";

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

impl Config {
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
        assert!(help.contains("Outbound mail is not delivered"), "{help}");
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
