//! The janitor's configuration: [`CommonArgs`] plus the sweep interval and
//! batch size. See `e2a-janitor --help`.

use std::time::Duration;

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9093;

/// One-line `--help` summary.
const ABOUT: &str =
    "e2a janitor: periodic sweeps (expired data) and the expiry of held outbound mail.";

/// `--help` description: what this build sweeps and, plainly, what it does not yet.
const LONG_ABOUT: &str = "\
e2a janitor: deletes data that has outlived its retention, in small batches.

It sweeps once at start, then every E2A_JANITOR_INTERVAL_SECS (retention) \
and every E2A_JANITOR_FAST_INTERVAL_SECS (webhook previous secrets, idle \
rate-limit keys), each schedule on its own, until stopped. \
Sweeps in this build: messages past their 10-day TTL (held messages still \
pending approval are kept), expired or revoked dashboard sessions, domain \
claims left unverified for 7 days, idle API rate-limit keys, events older \
than 30 days that were handled, webhook deliveries past their retention, \
idempotency keys claimed more than 24 hours ago, and outbound mail \
deliveries finished (sent or dead-lettered) more than 30 days ago, with \
their payload, attempts and send gate (unfinished ones are never deleted). \
Every E2A_HITL_EXPIRY_INTERVAL_SECS it also decides held outbound mail whose \
approval window has passed, as the agent's hitl_expiration_action says: \
reject (reason ttl_expired), or approve and enqueue it for the deliverer \
(rejected instead when the agent's domain is not verified); each decision \
commits with its email.approved or email.rejected event. Several replicas may run \
at once (rows are claimed with SKIP LOCKED). A failed sweep (e.g. the database \
is down) is logged and retried at the next interval.";

/// e2a janitor (see [`LONG_ABOUT`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "e2a-janitor", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,

    /// Seconds between retention sweeps (messages, sessions, claims, events, deliveries, idempotency keys; the first runs at start).
    #[arg(long, env = "E2A_JANITOR_INTERVAL_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub janitor_interval_secs: u64,

    /// Seconds between the fast sweeps (expired webhook previous secrets, idle rate-limit keys; the first runs at start), on their own schedule.
    #[arg(long, env = "E2A_JANITOR_FAST_INTERVAL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub janitor_fast_interval_secs: u64,

    /// Rows deleted per statement; a sweep repeats while full batches are deleted.
    #[arg(long, env = "E2A_JANITOR_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub janitor_batch: i64,

    /// Seconds between passes over held messages whose approval window has passed (each is approved or rejected by its agent's hitl_expiration_action, with its event; the first pass runs at start).
    #[arg(long, env = "E2A_HITL_EXPIRY_INTERVAL_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub hitl_expiry_interval_secs: u64,

    /// Expired holds decided per transaction.
    #[arg(long, env = "E2A_HITL_EXPIRY_BATCH", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub hitl_expiry_batch: i64,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub outbound: e2a_runtime::config::OutboundArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub limits: e2a_runtime::config::LimitsArgs,
}

impl Service for Config {
    const NAME: &'static str = "janitor";
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

impl Config {
    /// A configuration for tests and embedding: the given database,
    /// defaults everywhere else.
    pub fn for_database(url: impl Into<String>) -> Self {
        let mut config = Config::parse_from(["e2a-janitor"]);
        config.common = CommonArgs::for_database(url);
        config
    }

    /// Time between sweeps.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.janitor_interval_secs)
    }

    /// Time between passes over expired holds.
    pub fn hitl_expiry_interval(&self) -> Duration {
        Duration::from_secs(self.hitl_expiry_interval_secs)
    }

    /// What an expired hold's approval needs to compose and enqueue it.
    pub fn outbound_settings(&self) -> e2a_outbound::Settings {
        e2a_outbound::Settings {
            from_domain: self.outbound.outbound_from_domain.clone(),
            max_attempts: self.outbound.mail_max_attempts,
        }
    }

    /// Time between the fast sweeps.
    pub fn fast_interval(&self) -> Duration {
        Duration::from_secs(self.janitor_fast_interval_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_limits_and_help() {
        use clap::CommandFactory;
        let c = Config::for_database("postgres://localhost/e2a");
        assert_eq!(c.interval(), Duration::from_secs(3600));
        assert_eq!(c.janitor_batch, 1000);
        assert_eq!(c.common.ops_addr_or(DEFAULT_OPS_PORT).port(), 9093);
        assert!(Config::try_parse_from(["x", "--janitor-interval-secs", "0"]).is_err());
        assert!(Config::try_parse_from(["x", "--janitor-batch", "0"]).is_err());
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("idempotency keys claimed"), "{help}");
        assert!(help.contains("10-day TTL"), "{help}");
        assert!(help.contains("E2A_JANITOR_INTERVAL_SECS"), "{help}");
    }
}
