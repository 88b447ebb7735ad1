//! Waiting for work: `LISTEN` on a dedicated connection plus a fallback tick.
//!
//! [`wait_for_work`] opens its own connection with `tokio_postgres::connect`
//! (never a pooled one: a pooled connection would be recycled and lose its
//! `LISTEN`s), listens on [`CHANNELS`] and records every wake-up in
//! [`Wakeups`]. When the connection drops it reconnects after
//! [`RECONNECT_BACKOFF`] (1, 2, 5, 10, then 30 s between attempts, reset
//! once a `LISTEN` succeeds); [`FALLBACK_TICK`] keeps waking it meanwhile,
//! so work is never missed for longer than a tick.
//!
//! Every wake-up is counted in [`Wakeups`]; the work loops (fan-out and the
//! delivery queues, see [`crate::queue`]) subscribe to it and look for due
//! work whenever it changes.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// The notification channels listened on (statement triggers `NOTIFY` them
/// when `webhook_events`, `webhook_subscriber_deliveries` / `mail_outbox`
/// rows are inserted).
pub const CHANNELS: [&str; 3] = [
    "webhook_events_new",
    "webhook_deliveries_new",
    "mail_outbox_new",
];

/// Delay before each successive reconnection attempt; the last is repeated.
pub const RECONNECT_BACKOFF: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

/// Period of the polling fallback that runs whether or not `LISTEN` works.
pub const FALLBACK_TICK: Duration = Duration::from_secs(1);

/// `application_name` of the listening connection (unless the URL sets one),
/// so operators can tell it apart in `pg_stat_activity`.
pub const LISTEN_APPLICATION_NAME: &str = "e2a-deliverer-listen";

/// What woke the deliverer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeSource {
    /// `NOTIFY webhook_events_new`.
    WebhookEvents,
    /// `NOTIFY webhook_deliveries_new`.
    WebhookDeliveries,
    /// `NOTIFY mail_outbox_new`.
    MailOutbox,
    /// The fallback tick.
    Tick,
}

impl WakeSource {
    /// The channel name, or `tick`.
    pub fn as_str(self) -> &'static str {
        match self {
            WakeSource::WebhookEvents => CHANNELS[0],
            WakeSource::WebhookDeliveries => CHANNELS[1],
            WakeSource::MailOutbox => CHANNELS[2],
            WakeSource::Tick => "tick",
        }
    }

    fn from_channel(channel: &str) -> Option<Self> {
        match channel {
            "webhook_events_new" => Some(WakeSource::WebhookEvents),
            "webhook_deliveries_new" => Some(WakeSource::WebhookDeliveries),
            "mail_outbox_new" => Some(WakeSource::MailOutbox),
            _ => None,
        }
    }
}

/// Counters of everything that woke the deliverer since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WakeStats {
    /// Notifications received on `webhook_events_new`.
    pub webhook_events: u64,
    /// Notifications received on `webhook_deliveries_new`.
    pub webhook_deliveries: u64,
    /// Notifications received on `mail_outbox_new`.
    pub mail_outbox: u64,
    /// Fallback ticks.
    pub ticks: u64,
    /// Successful `LISTEN` set-ups (1 + reconnections).
    pub listens: u64,
    /// Whether the `LISTEN` connection is up right now.
    pub listening: bool,
}

/// Where the wait loop records wake-ups. Cheap to clone; observers (tests,
/// the work loops) [`subscribe`](Wakeups::subscribe) to changes.
#[derive(Debug, Clone)]
pub struct Wakeups {
    tx: Arc<watch::Sender<WakeStats>>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Self::new()
    }
}

impl Wakeups {
    /// Fresh counters, all zero.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(WakeStats::default())),
        }
    }

    /// A receiver that sees every later change of the counters.
    pub fn subscribe(&self) -> watch::Receiver<WakeStats> {
        self.tx.subscribe()
    }

    /// The counters now.
    pub fn stats(&self) -> WakeStats {
        self.tx.borrow().clone()
    }

    fn record(&self, f: impl FnOnce(&mut WakeStats)) {
        self.tx.send_modify(f);
    }

    fn woke(&self, source: WakeSource) {
        metrics::counter!("e2a_deliverer_wakeups_total", "source" => source.as_str()).increment(1);
        match source {
            WakeSource::Tick => tracing::trace!(source = source.as_str(), "woken"),
            _ => tracing::debug!(source = source.as_str(), "woken"),
        }
        self.record(|s| match source {
            WakeSource::WebhookEvents => s.webhook_events += 1,
            WakeSource::WebhookDeliveries => s.webhook_deliveries += 1,
            WakeSource::MailOutbox => s.mail_outbox += 1,
            WakeSource::Tick => s.ticks += 1,
        });
    }
}

/// Resolves at the next change of the counters `rx` watches (any wake-up).
/// Once the wait loop is gone (shutting down) it resolves every
/// [`FALLBACK_TICK`] instead, so a work loop still polls on its own.
pub async fn woken(rx: &mut watch::Receiver<WakeStats>) {
    if rx.changed().await.is_err() {
        tokio::time::sleep(FALLBACK_TICK).await;
    }
}

/// The backoff before reconnection attempt `failures` (0-based), clamped
/// to the last entry.
pub fn reconnect_delay(failures: usize) -> Duration {
    RECONNECT_BACKOFF[failures.min(RECONNECT_BACKOFF.len() - 1)]
}

/// An open `LISTEN` connection. Dropping it closes the connection.
struct Listening {
    _client: tokio_postgres::Client,
    notifications: mpsc::Receiver<WakeSource>,
    driver: JoinHandle<Option<tokio_postgres::Error>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects and listens on every channel in [`CHANNELS`].
async fn listen(pg: &tokio_postgres::Config) -> Result<Listening, tokio_postgres::Error> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    // A wake-up already queued covers later ones: a small channel coalesces.
    let (tx, notifications) = mpsc::channel(16);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(source) = WakeSource::from_channel(n.channel()) {
                        let _ = tx.try_send(source);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    });
    let listening = Listening {
        _client: client,
        notifications,
        driver,
    };
    let sql: String = CHANNELS.iter().map(|c| format!("LISTEN {c};")).collect();
    listening._client.batch_execute(&sql).await?;
    Ok(listening)
}

/// The next notification, or `None` when the connection is gone; pending
/// forever when not connected.
async fn next_notification(listening: &mut Option<Listening>) -> Option<WakeSource> {
    match listening {
        Some(l) => l.notifications.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for work until `shutdown` is cancelled, recording wake-ups in
/// `wakeups`. Survives database outages (reconnects with backoff) and
/// returns promptly on cancellation, closing the connection.
pub async fn wait_for_work(
    pg: tokio_postgres::Config,
    wakeups: Wakeups,
    shutdown: CancellationToken,
) {
    enum Event {
        Shutdown,
        Notified(Option<WakeSource>),
        Reconnect,
        Tick,
    }
    let mut tick = tokio::time::interval(FALLBACK_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut listening: Option<Listening> = None;
    let mut failures = 0usize;
    let mut reconnect_at = Instant::now();
    loop {
        let disconnected = listening.is_none();
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => Event::Shutdown,
            n = next_notification(&mut listening) => Event::Notified(n),
            () = tokio::time::sleep_until(reconnect_at), if disconnected => Event::Reconnect,
            _ = tick.tick() => Event::Tick,
        };
        match event {
            Event::Shutdown => break,
            Event::Notified(Some(source)) => wakeups.woke(source),
            Event::Notified(None) => {
                let error = match listening.take() {
                    Some(mut lost) => (&mut lost.driver).await.ok().flatten(),
                    None => None,
                };
                let delay = reconnect_delay(failures);
                failures += 1;
                reconnect_at = Instant::now() + delay;
                wakeups.record(|s| s.listening = false);
                match error {
                    Some(e) => {
                        tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "LISTEN connection lost; reconnecting")
                    }
                    None => tracing::warn!(
                        retry_in_secs = delay.as_secs(),
                        "LISTEN connection closed; reconnecting"
                    ),
                }
            }
            Event::Reconnect => {
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => break,
                    attempt = listen(&pg) => attempt,
                };
                match attempt {
                    Ok(l) => {
                        failures = 0;
                        listening = Some(l);
                        wakeups.record(|s| {
                            s.listens += 1;
                            s.listening = true;
                        });
                        tracing::info!(channels = ?CHANNELS, "listening for work");
                    }
                    Err(e) => {
                        let delay = reconnect_delay(failures);
                        failures += 1;
                        reconnect_at = Instant::now() + delay;
                        tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "cannot LISTEN; retrying");
                    }
                }
            }
            Event::Tick => wakeups.woke(WakeSource::Tick),
        }
    }
    drop(listening);
    wakeups.record(|s| s.listening = false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_at_thirty_seconds() {
        let secs: Vec<u64> = (0..8).map(|n| reconnect_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 5, 10, 30, 30, 30, 30]);
    }

    #[test]
    fn channels_map_to_sources() {
        for c in CHANNELS {
            assert_eq!(WakeSource::from_channel(c).map(WakeSource::as_str), Some(c));
        }
        assert_eq!(WakeSource::from_channel("other"), None);
    }
}
