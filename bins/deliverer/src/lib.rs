//! `e2a-deliverer`: fans events out to webhooks and delivers them.
//!
//! [`run`] boots (connect, migrate), serves the ops endpoints, and runs
//! side by side until the shutdown token is cancelled:
//!
//! * [`wake::wait_for_work`] — `LISTEN` on a dedicated connection plus a
//!   1 s fallback tick, published through [`Wakeups`];
//! * [`webhooks::fan_out_loop`] — pending events become one delivery per
//!   matching enabled webhook ([`e2a_store::fanout`]);
//! * [`queue::run`] over [`webhooks::WebhookQueue`] — `E2A_WEBHOOK_WORKERS`
//!   deliveries in flight, claimed under a lease, at most one per webhook
//!   across every replica;
//! * [`queue::run`] over [`legacy::LegacyQueue`] — legacy per-agent pushes
//!   (`E2A_LEGACY_WORKERS` in flight);
//! * [`queue::run`] over [`mail::MailQueue`] — outbound mail
//!   (`E2A_MAIL_WORKERS` in flight): claim through the send gate, DKIM-sign,
//!   submit over SMTP, record;
//! * [`webhooks::sample_gauges`], [`mail::sample_gauges`] — queue depth for
//!   `/metrics`.
//!
//! On cancellation nothing new is claimed and the deliveries in flight are
//! finished and recorded before [`run`] returns. `main.rs` only calls [`e2a_runtime::main`]
//! with [`serve`]; tests call [`run_with`] with a port-0 listener, their own
//! token and a [`Wakeups`] to observe.

pub mod config;
pub mod legacy;
pub mod mail;
pub mod queue;
pub mod wake;
pub mod webhooks;

use std::{str::FromStr, sync::Arc, time::Duration};

use e2a_runtime::{BoxError, CancellationToken, config::CommonArgs};
use e2a_webhook::{ClientConfig, WebhookClient};
use tokio::net::TcpListener;

pub use config::Config;
pub use wake::{WakeSource, WakeStats, Wakeups};

/// How often the queue gauges are sampled.
const GAUGE_EVERY: Duration = Duration::from_secs(10);

/// The listeners [`run`] serves on.
#[derive(Debug)]
pub struct Listeners {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// Binds the configured address and runs the service (what `main` calls).
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), BoxError> {
    let ops = e2a_runtime::bind_ops(&config.common, config::DEFAULT_OPS_PORT).await?;
    run(config, Listeners { ops }, shutdown).await
}

/// [`run_with`] with counters nobody observes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    run_with(config, listeners, shutdown, Wakeups::new()).await
}

/// Checks the configuration, connects and migrates, then fans out and
/// delivers (recording wake-ups in `wakeups`) and serves the ops endpoints
/// until `shutdown` is cancelled; returns once the deliveries in flight are
/// recorded.
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    wakeups: Wakeups,
) -> Result<(), BoxError> {
    let lease = config.webhook_lease()?;
    let smtp = config.smtp_config()?;
    let mail_lease = config.mail_lease(smtp.as_ref())?;
    let client = WebhookClient::new(ClientConfig {
        timeout: config.webhook_timeout(),
        policy: config.url_policy(),
        ..ClientConfig::default()
    })?;
    let Some(store) =
        e2a_runtime::boot::connect_and_migrate("deliverer", &config.common, &shutdown).await?
    else {
        return Ok(());
    };
    let listen_config = listen_config(&config.common)?;
    tracing::info!(
        ops = %listeners.ops.local_addr()?,
        workers = config.webhook_workers,
        lease_secs = lease.as_secs(),
        mail_workers = config.mail_workers,
        mail_lease_secs = mail_lease.as_secs(),
        smtp = smtp.as_ref().map_or("(none: outbound mail waits)", |s| s.host.as_str()),
        "deliverer started"
    );
    let ops = e2a_runtime::ops::OpsServer::spawn(
        listeners.ops,
        "deliverer",
        store.clone(),
        &config.common.http,
        shutdown.clone(),
    );
    let kick = queue::Kick::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(wake::wait_for_work(
        listen_config,
        wakeups.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(webhooks::fan_out_loop(
        store.clone(),
        config.fanout_batch,
        wakeups.subscribe(),
        kick.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(queue::run(
        Arc::new(webhooks::WebhookQueue::new(
            store.clone(),
            client.clone(),
            lease,
        )),
        usize::try_from(config.webhook_workers).unwrap_or(8),
        wakeups.subscribe(),
        kick,
        shutdown.clone(),
    ));
    tasks.spawn(queue::run(
        Arc::new(legacy::LegacyQueue::new(store.clone(), client, lease)),
        usize::try_from(config.legacy_workers).unwrap_or(4),
        wakeups.subscribe(),
        queue::Kick::new(),
        shutdown.clone(),
    ));
    tasks.spawn(queue::run(
        Arc::new(mail::MailQueue::new(store.clone(), smtp, mail_lease)),
        usize::try_from(config.mail_workers).unwrap_or(16),
        wakeups.subscribe(),
        queue::Kick::new(),
        shutdown.clone(),
    ));
    tasks.spawn(webhooks::sample_gauges(
        store.clone(),
        GAUGE_EVERY,
        shutdown.clone(),
    ));
    tasks.spawn(mail::sample_gauges(
        store.clone(),
        GAUGE_EVERY,
        shutdown.clone(),
    ));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a deliverer task panicked");
            shutdown.cancel();
        }
    }
    ops.stop(&shutdown).await?;
    Ok(())
}

/// Settings of the dedicated `LISTEN` connection: the configured URL and
/// connect timeout, [`wake::LISTEN_APPLICATION_NAME`] unless the URL names
/// an application, and TCP keepalives so a dead peer is noticed.
fn listen_config(common: &CommonArgs) -> Result<tokio_postgres::Config, BoxError> {
    let mut pg = tokio_postgres::Config::from_str(common.db.url()?)?;
    pg.connect_timeout(std::time::Duration::from_millis(
        common.db.db_connect_timeout_ms,
    ));
    pg.keepalives(true);
    pg.keepalives_idle(std::time::Duration::from_secs(30));
    if pg.get_application_name().is_none() {
        pg.application_name(wake::LISTEN_APPLICATION_NAME);
    }
    Ok(pg)
}
