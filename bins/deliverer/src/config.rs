//! The deliverer's configuration: [`CommonArgs`] only, for now. See
//! `e2a-deliverer --help`.

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9092;

/// One-line `--help` summary.
const ABOUT: &str = "e2a deliverer: webhook and mail delivery are not implemented yet; this build only waits for work.";

/// `--help` description: what this build does and, plainly, what it does not.
const LONG_ABOUT: &str = "\
e2a deliverer: will deliver webhook events and outbound mail.

Webhook and mail delivery are not implemented yet; this build only waits for \
work: it LISTENs on the `webhook_events_new` and `mail_outbox_new` channels \
on a dedicated database connection (reconnecting with backoff), wakes once a \
second as a fallback, logs wake-ups at debug level and serves the ops \
endpoints. It delivers nothing and changes no rows.";

/// e2a deliverer (see [`LONG_ABOUT`]).
#[derive(Debug, Clone, Parser)]
#[command(name = "e2a-deliverer", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
}

impl Service for Config {
    const NAME: &'static str = "deliverer";
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

impl Config {
    /// A configuration for tests and embedding: the given database,
    /// defaults everywhere else.
    pub fn for_database(url: impl Into<String>) -> Self {
        let mut config = Config::parse_from(["e2a-deliverer"]);
        config.common = CommonArgs::for_database(url);
        config
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
        let help = Config::command().render_long_help().to_string();
        assert!(help.contains("delivery are not implemented yet"), "{help}");
    }
}
