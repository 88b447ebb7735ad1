//! The HTTP server behind every listener: the API's public one and each
//! service's ops listener. HTTP/1.1 on hyper's connection driver, with a
//! bound on everything a peer could otherwise make us hold:
//!
//! * **Header-read timeout.** A request's head must arrive within
//!   [`Limits::header_read_timeout`], counted from the connection's opening
//!   (first request) or from the first byte of a later request. A client
//!   that dribbles its headers (slowloris) is disconnected without an answer.
//! * **Idle timeout.** A kept-alive connection waiting for its next request
//!   is closed after [`Limits::idle_timeout`]. The clock starts when the
//!   response body has been handed to hyper, so it also bounds a client that
//!   stops reading the end of its response.
//! * **Connection cap.** At most [`Limits::max_connections`] are open. At
//!   the cap a new connection displaces the one that has gone longest without
//!   a request in progress: idle and silent connections first, then ones
//!   still sending their request head. A connection with a request in
//!   progress is never displaced; when every connection has one, new
//!   connections wait in the kernel's listen backlog until one finishes.
//! * **Load shedding.** At most [`Limits::max_in_flight`] requests are
//!   worked on at once; the next is answered at once with the listener's
//!   [`Overloaded`] response (always 503 with `Retry-After`), before routing,
//!   so shedding costs almost nothing.
//!
//! hyper's own `header_read_timeout` is not used: hyper restarts it the
//! moment a connection goes idle, so it would also close kept-alive
//! connections after the header timeout, and the two could not be set
//! apart. Instead each connection has a watch (see `conn`): bytes arriving
//! on an idle connection start the header clock, the service call stops it,
//! the end of the response starts the idle clock, and the connection's task
//! closes the socket when the running clock runs out.
//!
//! Shutdown: the accept loop stops and drops the listener, every connection
//! shuts down gracefully (idle ones close at once, a request in progress
//! finishes, then its connection closes), and [`serve`] returns when all are
//! gone: the drain `axum::serve` gave before.

mod conn;

use std::{
    collections::HashMap,
    fmt, io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Response},
};
use tokio::{
    net::TcpListener,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::HttpTimeoutArgs;

/// `Retry-After` (seconds) of a shed request.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a request head to arrive.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Open connections (at least 1).
    pub max_connections: usize,
    /// Requests worked on at once (at least 1); more are shed.
    pub max_in_flight: usize,
}

impl Limits {
    /// The ops listener's connection cap: probes and scrapers need few.
    pub const OPS_MAX_CONNECTIONS: usize = 64;
    /// The ops listener's in-flight bound.
    pub const OPS_MAX_IN_FLIGHT: usize = 32;

    /// Limits with the configured timeouts and the given caps.
    pub fn new(timeouts: &HttpTimeoutArgs, max_connections: usize, max_in_flight: usize) -> Self {
        Self {
            header_read_timeout: timeouts.header_read_timeout(),
            idle_timeout: timeouts.idle_timeout(),
            max_connections: max_connections.max(1),
            max_in_flight: max_in_flight.max(1),
        }
    }

    /// The ops listener's limits: the configured timeouts, fixed small caps.
    pub fn ops(timeouts: &HttpTimeoutArgs) -> Self {
        Self::new(timeouts, Self::OPS_MAX_CONNECTIONS, Self::OPS_MAX_IN_FLIGHT)
    }
}

/// Builds the answer to a shed request from its headers (e.g. to echo a
/// request id). [`serve`] forces its status to 503 and adds `Retry-After`.
pub type Overloaded = Arc<dyn Fn(&HeaderMap) -> Response<Body> + Send + Sync>;

/// How [`serve`] runs one listener.
#[derive(Clone)]
pub struct Options {
    /// Service name, the `service` label of the metrics (`api`, `relay`, …).
    pub service: &'static str,
    /// Listener name, the `listener` label (`http`, `ops`).
    pub listener: &'static str,
    /// The bounds.
    pub limits: Limits,
    /// The answer to a shed request.
    pub overloaded: Overloaded,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("service", &self.service)
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Pause after an `accept` that failed for want of file descriptors or
/// another resource, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Warnings that could fire per connection or per request are logged at
/// most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Descriptors the process needs besides the listener's connections
/// (database pool, other listeners, files), for the start-up check.
const FD_MARGIN: u64 = 128;

/// Serves `app` on `listener` within `options.limits` until `shutdown` is
/// cancelled, then drains: returns once every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: Options,
    shutdown: CancellationToken,
) {
    let limits = options.limits;
    fit_open_files_limit(&options);
    let shared = Arc::new(Shared {
        app,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        options,
        shed_warning: Throttle::default(),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let registry = Arc::new(Registry::default());
    let connections = TaskTracker::new();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if on_accept_error(&e, &registry, &shared.options) {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
                continue;
            }
        };
        let Some(slot) = free_slot(&slots, &registry, &shared.options, &shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let watch = conn::Watch::new(
            limits.header_read_timeout,
            limits.idle_timeout,
            registry.not_busy.clone(),
        );
        let open = Open::register(&registry, next_id, watch.clone(), slot, &shared.options);
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        connections.spawn(async move {
            let end = conn::run(stream, peer, shared.clone(), watch, shutdown).await;
            // The socket is closed (dropped by `run`) before the slot frees.
            drop(open);
            end.record(&shared.options);
        });
    }
    drop(listener);
    connections.close();
    if !connections.is_empty() {
        tracing::info!(
            service = shared.options.service,
            listener = shared.options.listener,
            open = connections.len(),
            "HTTP listener closed; draining connections"
        );
    }
    connections.wait().await;
}

/// What every connection of a listener shares.
struct Shared {
    app: Router,
    in_flight: Arc<Semaphore>,
    options: Options,
    shed_warning: Throttle,
}

/// A slot under the connection cap for a connection just accepted: a free
/// one, else one made by evicting the connection idle longest. When every
/// connection has a request in progress, waits until one ends (then it can
/// be evicted) or a connection closes. `None` on shutdown.
async fn free_slot(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    options: &Options,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        let evicted = registry.evict_one(options);
        if !evicted && registry.full_warning.ready() {
            tracing::warn!(
                service = options.service,
                listener = options.listener,
                max_connections = options.limits.max_connections,
                "every connection has a request in progress; new connections wait"
            );
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            slot = slots.clone().acquire_owned() => return slot.ok(),
            // Waiting for the victim to close; or, with no victim, for a
            // request to end so its connection can be one.
            () = registry.not_busy.notified(), if !evicted => {}
        }
    }
}

/// The open connections of a listener, for eviction at the cap.
#[derive(Default)]
struct Registry {
    open: Mutex<HashMap<u64, Arc<conn::Watch>>>,
    /// Signalled whenever a connection's last request ends.
    not_busy: Arc<Notify>,
    full_warning: Throttle,
}

impl Registry {
    /// Tells the connection that has gone longest without a request in
    /// progress to close (idle or silent ones before ones receiving a head);
    /// false when every connection has a request in progress.
    fn evict_one(&self, options: &Options) -> bool {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let victim = open
            .values()
            .filter_map(|watch| watch.eviction_rank().map(|rank| (rank, watch)))
            .min_by_key(|(rank, _)| *rank);
        let Some((_, watch)) = victim else {
            return false;
        };
        watch.evict();
        tracing::debug!(
            service = options.service,
            listener = options.listener,
            "connection cap reached; closing the longest-idle connection"
        );
        true
    }
}

/// One connection's place: its registry entry, its slot under the cap and
/// the open-connections gauge. Given back on drop.
struct Open {
    registry: Arc<Registry>,
    id: u64,
    _slot: OwnedSemaphorePermit,
    labels: [(&'static str, &'static str); 2],
}

impl Open {
    fn register(
        registry: &Arc<Registry>,
        id: u64,
        watch: Arc<conn::Watch>,
        slot: OwnedSemaphorePermit,
        options: &Options,
    ) -> Self {
        registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, watch);
        let labels = [("service", options.service), ("listener", options.listener)];
        metrics::gauge!("e2a_http_connections_open", &labels).increment(1.0);
        metrics::counter!("e2a_http_connections_total", &labels).increment(1);
        Self {
            registry: registry.clone(),
            id,
            _slot: slot,
            labels,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        metrics::gauge!("e2a_http_connections_open", &self.labels).decrement(1.0);
    }
}

/// Handles a failed `accept`; true when the loop should pause before the
/// next one. A connection that died in the backlog is skipped at once; out
/// of file descriptors, an idle connection is closed to make room.
fn on_accept_error(e: &io::Error, registry: &Registry, options: &Options) -> bool {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return false;
    }
    // ENFILE (23) and EMFILE (24), the same numbers on Linux and macOS.
    if matches!(e.raw_os_error(), Some(23 | 24)) {
        registry.evict_one(options);
    }
    static WARNING: Throttle = Throttle::new();
    if WARNING.ready() {
        tracing::warn!(
            service = options.service,
            listener = options.listener,
            error = %e,
            "accepting an HTTP connection failed"
        );
    }
    true
}

/// Makes room for the connection cap in the open-files limit: raises the
/// soft limit as far as the cap needs (never above the hard limit, as Go's
/// runtime does at start), and warns when even that is too low: `accept`
/// would then fail before the cap is reached.
fn fit_open_files_limit(options: &Options) {
    #[cfg(unix)]
    {
        let needed = (options.limits.max_connections as u64).saturating_add(FD_MARGIN);
        match rlimit::increase_nofile_limit(needed) {
            Ok(limit) if limit < needed => tracing::warn!(
                service = options.service,
                listener = options.listener,
                open_files_limit = limit,
                max_connections = options.limits.max_connections,
                "the open-files limit (ulimit -Hn) is below the connection cap plus {FD_MARGIN}; \
                 raise it or lower the cap"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
        }
    }
}

/// Lets a repeated warning through at most once per [`WARN_EVERY`].
struct Throttle {
    /// Milliseconds since [`process_start`] of the last warning, plus one
    /// (0: never).
    last: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    const fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
        }
    }

    fn ready(&self) -> bool {
        let now = process_start().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = WARN_EVERY.as_millis() as u64;
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}
