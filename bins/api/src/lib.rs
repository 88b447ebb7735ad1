//! `e2a-api`: the REST API service.
//!
//! [`run`] serves the `/v1` API and the legacy `/api/health` on the HTTP
//! listener and the ops endpoints on the ops listener until the shutdown
//! token is cancelled, then drains. Both listeners run on
//! [`e2a_runtime::serve`] (header-read and idle timeouts, a connection cap,
//! load shedding). `main.rs` only calls
//! [`e2a_runtime::main`] with [`serve`]; tests call [`run`] (or
//! [`run_with_resolver`], to answer the domain probe's DNS queries) with
//! port-0 listeners and their own token.

pub mod auth;
pub mod config;
pub mod dns;
pub mod error;
pub mod extract;
pub mod key_cache;
pub mod magic_pages;
mod middleware;
pub mod ratelimit;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::{Store, StoreError, account_limits::Limits, domains};
use tokio::{net::TcpListener, sync::Semaphore};

pub use config::Config;

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Deployment facts served by `GET /v1/info`.
    pub info: Arc<routes::info::DeploymentInfo>,
    /// Limits for users without an `account_limits` row.
    pub default_limits: Arc<Limits>,
    /// Public host name of the SMTP relay (MX target, SPF include).
    pub mail_host: Arc<str>,
    /// `E2A_ENV=production`: HTTPS-only webhook URLs, real DNS probes.
    pub production: bool,
    /// `E2A_ALLOW_PRIVATE_WEBHOOKS`: webhook URLs may name private and
    /// loopback hosts even in production (see
    /// [`routes::webhooks::url_policy`]).
    pub allow_private_webhooks: bool,
    /// DNS for domain verification (consulted only in production).
    pub dns: Arc<dyn dns::Resolver>,
    /// Bounds concurrent DKIM key generations (CPU-heavy) to the core count.
    pub keygen: Arc<Semaphore>,
    /// Request rate limits.
    pub limits: Arc<ratelimit::RateLimits>,
    /// What the send routes need to know about outbound mail.
    pub outbound: Arc<routes::outbound::OutboundSettings>,
    /// Bounds the send requests (bodies up to 25 MiB) in progress at once.
    pub send_slots: Arc<Semaphore>,
    /// Reviewers' notification mail, when `E2A_PUBLIC_URL` and
    /// `E2A_OUTBOUND_FROM_DOMAIN` are both set.
    pub notifications: Option<Arc<routes::hitl::Notifications>>,
    /// Keys found valid recently (in use once [`key_cache::listen`] runs).
    pub key_cache: Arc<key_cache::KeyCache>,
}

impl AppState {
    /// The state a configuration describes, on `store`, with `dns` for
    /// domain verification.
    pub fn new(store: Store, config: &Config, dns: Arc<dyn dns::Resolver>) -> Self {
        let info = routes::info::DeploymentInfo::from_config(config);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        AppState {
            store,
            info: Arc::new(info),
            default_limits: Arc::new(config.default_limits()),
            mail_host: config.smtp_domain.as_str().into(),
            production: config.is_production(),
            allow_private_webhooks: config.allow_private_webhooks,
            dns,
            keygen: Arc::new(Semaphore::new(cores)),
            limits: Arc::new(config.rate_limits()),
            outbound: Arc::new(config.outbound_settings()),
            send_slots: Arc::new(Semaphore::new(config.max_concurrent_sends as usize)),
            notifications: routes::hitl::Notifications::new(
                config.public_url.as_deref(),
                &config.outbound.outbound_from_domain,
            )
            .map(Arc::new),
            key_cache: Arc::new(key_cache::KeyCache::new(std::time::Duration::from_secs(
                config.api_key_cache_secs,
            ))),
        }
    }
}

/// The listeners [`run`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The public HTTP API.
    pub http: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// The whole HTTP application for `state`.
pub fn app(state: AppState, config: &Config) -> Router {
    routes::router(state, config)
}

/// Binds the configured addresses and runs the service (what `main` calls).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), BoxError> {
    let http = e2a_runtime::bind(config.http_addr, "E2A_HTTP_ADDR").await?;
    let ops = e2a_runtime::bind_ops(&config.common, config::DEFAULT_OPS_PORT).await?;
    run(config, Listeners { http, ops }, shutdown).await
}

/// Connects and migrates, then serves until `shutdown` is cancelled and
/// in-flight requests have finished. In production, domain verification
/// uses the system resolver.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let dns: Arc<dyn dns::Resolver> = if config.is_production() {
        Arc::new(dns::SystemResolver::from_system_conf()?)
    } else {
        Arc::new(dns::NoResolver)
    };
    run_with_resolver(config, listeners, shutdown, dns).await
}

/// [`run`] with the resolver the domain probe uses (production only).
///
/// When a shared domain is configured its system row is ensured first;
/// start-up fails if a user owns a domain of that name.
pub async fn run_with_resolver(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    dns: Arc<dyn dns::Resolver>,
) -> Result<(), BoxError> {
    let Some(store) =
        e2a_runtime::boot::connect_and_migrate("api", &config.common, &shutdown).await?
    else {
        return Ok(());
    };
    let info = routes::info::DeploymentInfo::from_config(&config);
    if !info.shared_domain.is_empty() {
        ensure_shared_domain(&store, &info.shared_domain).await?;
    }
    let state = AppState::new(store.clone(), &config, dns);
    tokio::spawn(key_cache::listen(
        state.key_cache.clone(),
        store.dedicated_config(key_cache::LISTEN_APPLICATION_NAME),
        shutdown.clone(),
    ));
    let app = app(state, &config);
    tracing::info!(
        http = %listeners.http.local_addr()?,
        ops = %listeners.ops.local_addr()?,
        "api listening"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(
        listeners.ops,
        "api",
        store,
        &config.common.http,
        shutdown.clone(),
    );
    let options = e2a_runtime::serve::Options {
        service: "api",
        listener: "http",
        limits: config.http_limits(),
        overloaded: Arc::new(middleware::overloaded),
    };
    e2a_runtime::serve::serve(listeners.http, app, options, shutdown.clone()).await;
    ops.stop(&shutdown).await?;
    Ok(())
}

/// Inserts the shared domain's system row (idempotent).
async fn ensure_shared_domain(store: &Store, shared: &str) -> Result<(), BoxError> {
    let name = domains::normalise(shared)
        .map_err(|_| format!("E2A_SHARED_DOMAIN {shared:?} is not a valid domain name"))?;
    let client = store.client().await?;
    match domains::ensure_shared(&client, &name).await {
        Ok(()) => {
            // Shared-domain agents send under their own From address, so
            // the shared domain signs their mail and needs a key (the
            // original sent it unsigned). Generated once, published by the
            // operator: docs/operations.md.
            if !domains::has_dkim_key(&client, &name).await? {
                let pair =
                    tokio::task::spawn_blocking(e2a_mail::dkim_keys::generate_rsa_2048).await??;
                let keys = domains::DkimKeys {
                    selector: e2a_mail::dkim_keys::selector_for(
                        time::OffsetDateTime::now_utc().date(),
                    ),
                    public_key_b64: pair.public_key_b64,
                    private_key_der: pair.private_key_der,
                };
                if domains::set_dkim_keys_if_missing(&client, &name, &keys).await? {
                    tracing::info!(
                        domain = %name,
                        selector = %keys.selector,
                        "generated the shared domain's DKIM key; publish {}._domainkey.{} TXT \"{}\"",
                        keys.selector,
                        name,
                        e2a_mail::dkim_keys::dns_txt_value(&keys.public_key_b64)
                    );
                }
            }
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => Err(format!(
            "E2A_SHARED_DOMAIN {name:?} is registered as a custom domain by a user; \
             choose another shared domain or remove that user's domain"
        )
        .into()),
        Err(e) => Err(e.into()),
    }
}
