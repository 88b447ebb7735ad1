//! The API's configuration: [`CommonArgs`] plus HTTP, deployment and
//! default-limit settings. See `e2a-api --help`.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use e2a_runtime::{Service, config::CommonArgs};
use e2a_store::account_limits::Limits;

/// Ops port used when `E2A_OPS_ADDR` is unset.
pub const DEFAULT_OPS_PORT: u16 = 9090;

/// e2a REST API: the public `/v1` HTTP API of the gateway.
///
/// This build serves `GET /api/health`, `GET /v1/info`, and with a bearer API
/// key `/v1/account`, `/v1/domains`, `/v1/agents`, an agent's messages
/// and conversations, and `/v1/webhooks`. Other paths answer 404 with the JSON error body. Ops
/// endpoints (/healthz, /readyz, /metrics) are on E2A_OPS_ADDR.
#[derive(Debug, Clone, Parser)]
#[command(name = "e2a-api", version)]
pub struct Config {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,

    /// Address the HTTP API listens on.
    #[arg(long, env = "E2A_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Shared agent domain: enables `<slug>@<domain>` agents and is reserved from custom registration. Empty disables slugs.
    #[arg(long, env = "E2A_SHARED_DOMAIN", default_value = "")]
    pub shared_domain: String,

    /// Public host name of the SMTP relay: the MX target and SPF include shown in a domain's DNS records and checked by domain verification in production.
    #[arg(long, env = "E2A_SMTP_DOMAIN", default_value = "localhost", value_parser = e2a_runtime::config::parse_host)]
    pub smtp_domain: String,

    /// Public base URL of this deployment (shown by /v1/info, used in links).
    #[arg(long, env = "E2A_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Seconds the server may work on a request; past it the request is answered 503 `timeout` with Retry-After.
    #[arg(long, env = "E2A_HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,

    /// Most connections the HTTP API keeps open. At the cap a new connection displaces the one idle longest (never one with a request in progress); when every connection has a request in progress, new ones wait in the listen backlog. The soft open-files limit is raised to fit it when the hard limit allows.
    #[arg(long, env = "E2A_HTTP_MAX_CONNECTIONS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_connections: u32,

    /// Most requests the HTTP API works on at once; past it a request is answered 503 `overloaded` with Retry-After at once.
    #[arg(long, env = "E2A_HTTP_MAX_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub http_max_in_flight: u32,

    /// Maximum request body for ordinary JSON requests, in bytes.
    #[arg(long, env = "E2A_HTTP_MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1024..=(64 << 20)))]
    pub max_body_bytes: u64,

    /// Accept webhook URLs on loopback, private (RFC 1918), CGNAT, link-local and unique-local addresses even in production (`1`/`true`). Development (`E2A_ENV=development`) always accepts them. Never for a deployment on the internet; cloud-metadata addresses stay refused.
    #[arg(long, env = "E2A_ALLOW_PRIVATE_WEBHOOKS", default_value_t = false, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_private_webhooks: bool,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub limits: e2a_runtime::config::LimitsArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub rates: RateArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub outbound: e2a_runtime::config::OutboundArgs,

    /// Send requests (send, reply, forward; bodies up to 25 MiB) handled at once by this replica; more wait up to 5 s, then 503 with Retry-After. Bounds the memory large messages can take.
    #[arg(long, env = "E2A_HTTP_MAX_CONCURRENT_SENDS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_concurrent_sends: u32,

    /// Seconds a key found valid is trusted without looking it up again (0: look up every request). Revocation still reaches every replica within milliseconds through NOTIFY; this bounds it should that connection fail silently.
    #[arg(long, env = "E2A_API_KEY_CACHE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub api_key_cache_secs: u64,
}

/// Request rate limits (see docs/operations.md for which hold per replica).
#[derive(Debug, Clone, clap::Args)]
pub struct RateArgs {
    /// Poll-limited reads (message and conversation lists and gets) per user per minute, per API replica.
    #[arg(long, env = "E2A_RATE_POLL_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub poll_per_minute: u32,

    /// Agent registrations (POST /v1/agents) per client address per hour, per API replica.
    #[arg(long, env = "E2A_RATE_AGENT_CREATE_PER_HOUR", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_create_per_hour: u32,

    /// Requests with an unknown, expired or revoked API key per client address per minute, per API replica; beyond it 429 without a database lookup.
    #[arg(long, env = "E2A_RATE_AUTH_FAILURES_PER_MINUTE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failures_per_minute: u32,

    /// Domain registrations (POST /v1/domains, an RSA key each) per account per hour, across all API replicas.
    #[arg(long, env = "E2A_RATE_DOMAIN_CREATE_PER_HOUR", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub domain_create_per_hour: u32,

    /// Sends (send, reply, forward, test, approve) per agent per minute, across all API replicas.
    #[arg(long, env = "E2A_RATE_SEND_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub send_per_minute: u32,

    /// Proxies whose X-Forwarded-For is believed: comma-separated addresses or CIDR blocks. Empty: the socket peer is the client.
    #[arg(long, env = "E2A_TRUSTED_PROXIES", default_value = "", value_parser = crate::ratelimit::parse_proxies)]
    pub trusted_proxies: std::vec::Vec<ipnet::IpNet>,
}

impl Service for Config {
    const NAME: &'static str = "api";
    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

impl Config {
    /// A configuration for tests and embedding: the given database,
    /// defaults everywhere else (addresses unused by [`crate::run`]).
    pub fn for_database(url: impl Into<String>) -> Self {
        let mut config = Config::parse_from(["e2a-api"]);
        config.common = CommonArgs::for_database(url);
        config
    }

    /// The rate limiters this configuration describes.
    pub fn rate_limits(&self) -> crate::ratelimit::RateLimits {
        use crate::ratelimit::LocalLimiter;
        use e2a_store::rate_limits::Quota;
        let r = &self.rates;
        crate::ratelimit::RateLimits {
            poll: LocalLimiter::new(Quota::per_minute(r.poll_per_minute)),
            agent_create: LocalLimiter::new(Quota::per_hour(r.agent_create_per_hour)),
            auth_failures: crate::ratelimit::AuthGuard::new(Quota::per_minute(
                r.auth_failures_per_minute,
            )),
            domain_create: Quota::per_hour(r.domain_create_per_hour),
            send: Quota::per_minute(r.send_per_minute),
            trusted_proxies: r.trusted_proxies.clone(),
        }
    }

    /// The send routes' settings.
    pub fn outbound_settings(&self) -> crate::routes::outbound::OutboundSettings {
        crate::routes::outbound::OutboundSettings {
            from_domain: self.outbound.outbound_from_domain.clone(),
            max_attempts: self.outbound.mail_max_attempts,
        }
    }

    /// Limits for users without an `account_limits` row.
    pub fn default_limits(&self) -> Limits {
        self.limits.limits()
    }

    /// True when `E2A_ENV=production` (HTTPS-only webhooks, real DNS probes).
    pub fn is_production(&self) -> bool {
        self.common.environment == e2a_runtime::config::Environment::Production
    }

    /// Request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The HTTP listener's bounds: the shared timeouts (`E2A_HTTP_*_TIMEOUT_SECS`)
    /// and the API's caps.
    pub fn http_limits(&self) -> e2a_runtime::serve::Limits {
        e2a_runtime::serve::Limits::new(
            &self.common.http,
            self.http_max_connections as usize,
            self.http_max_in_flight as usize,
        )
    }
}
