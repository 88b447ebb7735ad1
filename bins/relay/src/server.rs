//! The SMTP accept loop: one tracked task per connection, a semaphore cap
//! on simultaneous sessions, and a graceful drain.
//!
//! A connection beyond the cap is answered `421 4.3.2 too many connections`
//! and closed at once, without a session; so is one beyond the per-client-IP
//! cap, with `421 4.7.0` (one client cannot take every slot). On shutdown the loop stops
//! accepting (the listener is dropped), every open session finishes its
//! current command, answers `421 4.3.0 shutting down` and closes, and
//! [`serve`] returns once all of them are done.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    backend::Backend,
    session::{Session, SessionConfig},
};

/// Sent, without a session, to a connection beyond the cap.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.3.2 too many connections\r\n";

/// Sent, without a session, to a connection beyond the per-IP cap.
pub const TOO_MANY_FROM_IP: &[u8] = b"421 4.7.0 too many connections from your address\r\n";

/// Caps on simultaneous connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// All clients together (`E2A_SMTP_MAX_CONNECTIONS`).
    pub total: usize,
    /// One client IP address (`E2A_SMTP_MAX_CONNECTIONS_PER_IP`).
    pub per_ip: usize,
}

/// Open connections per client IP. A [`PerIpSlot`] holds one and gives it
/// back when dropped; an address with no open connection has no entry, so
/// the map is bounded by the total connection cap.
#[derive(Debug, Default)]
struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIp`].
struct PerIpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A slot for `ip`, or `None` when it already has `cap` connections.
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<PerIpSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(PerIpSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` and runs a [`Session`] for each, at
/// most `limits.total` at a time and `limits.per_ip` per client address,
/// until `shutdown` is cancelled; then drains: returns only when every
/// session has ended.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    config: Arc<SessionConfig>,
    backend: Arc<B>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let max_connections = limits.total.max(1);
    let slots = Arc::new(Semaphore::new(max_connections));
    let per_ip = Arc::new(PerIp::default());
    let sessions = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an SMTP connection failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("e2a_smtp_connections_rejected_total").increment(1);
            tracing::warn!(%peer, max_connections, "connection limit reached; refusing connection");
            // A fresh socket's send buffer is empty: this never blocks.
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            continue;
        };
        let Some(ip_slot) = per_ip.take(peer.ip(), limits.per_ip.max(1)) else {
            metrics::counter!("e2a_smtp_connections_rejected_total").increment(1);
            tracing::warn!(%peer, per_ip = limits.per_ip, "per-address connection limit reached; refusing connection");
            let _ = stream.try_write(TOO_MANY_FROM_IP);
            continue;
        };
        metrics::counter!("e2a_smtp_connections_total").increment(1);
        let _ = stream.set_nodelay(true);
        let conn_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("smtp", conn_id, %peer);
        let session = Session::new(
            stream,
            config.clone(),
            backend.clone(),
            Some(peer.ip()),
            shutdown.clone(),
        );
        sessions.spawn(
            async move {
                let _permit = (permit, ip_slot);
                let started = tokio::time::Instant::now();
                tracing::info!("connection opened");
                let end = session.run().await;
                let duration_ms = started.elapsed().as_millis() as u64;
                match &end {
                    crate::session::SessionEnd::Io(e) => {
                        tracing::info!(outcome = end.as_str(), error = %e, duration_ms, "connection closed");
                    }
                    _ => tracing::info!(outcome = end.as_str(), duration_ms, "connection closed"),
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    sessions.close();
    if !sessions.is_empty() {
        tracing::info!(
            open = sessions.len(),
            "SMTP listener closed; draining sessions"
        );
    }
    sessions.wait().await;
}
