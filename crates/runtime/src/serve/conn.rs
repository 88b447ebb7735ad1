//! One HTTP connection: its [`Watch`] (phase and deadline), the socket
//! wrapper that reports reads to it, the service that reports requests to it
//! and sheds load, and the task that drives hyper and enforces the deadline.

use std::net::SocketAddr;
use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderValue, Request, Response, StatusCode, header},
};
use hyper::{
    body::{Frame, Incoming, SizeHint},
    server::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{Options, RETRY_AFTER_SECS, Shared};

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted; no byte yet. The header clock runs from the accept.
    Fresh,
    /// Bytes of a request head are arriving; the header clock runs.
    Head,
    /// A request is with the service or its response is being sent; no
    /// clock (the handler's own timeout bounds it).
    Busy,
    /// Between requests; the idle clock runs.
    Idle,
}

struct State {
    phase: Phase,
    /// When the phase began (the accept, for `Fresh` and a `Head` after it).
    since: Instant,
    /// When the connection is closed unless the phase changes first.
    deadline: Option<Instant>,
    /// Requests whose response body has not been dropped yet.
    in_flight: usize,
}

/// One connection's phase and deadline, shared by its socket wrapper, its
/// service, its task and the listener's registry.
pub(super) struct Watch {
    state: Mutex<State>,
    /// Woken when the deadline may have moved earlier or appeared.
    changed: Notify,
    /// Cancelled to make room under the connection cap.
    evict: CancellationToken,
    /// The listener's signal that a connection left `Busy` (and so can be
    /// evicted again).
    not_busy: Arc<Notify>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl Watch {
    /// A just-accepted connection: its first request head is due within
    /// `header_read_timeout`.
    pub(super) fn new(
        header_read_timeout: Duration,
        idle_timeout: Duration,
        not_busy: Arc<Notify>,
    ) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: Mutex::new(State {
                phase: Phase::Fresh,
                since: now,
                deadline: Some(now + header_read_timeout),
                in_flight: 0,
            }),
            changed: Notify::new(),
            evict: CancellationToken::new(),
            not_busy,
            header_read_timeout,
            idle_timeout,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: on an idle connection they begin a request head,
    /// which is due within the header timeout from now. (A fresh
    /// connection's head stays due from the accept.)
    fn on_read(&self) {
        let mut state = self.state();
        match state.phase {
            Phase::Fresh => state.phase = Phase::Head,
            Phase::Idle => {
                let now = Instant::now();
                state.phase = Phase::Head;
                state.since = now;
                state.deadline = Some(now + self.header_read_timeout);
                drop(state);
                self.changed.notify_one();
            }
            Phase::Head | Phase::Busy => {}
        }
    }

    /// A request head was parsed and handed to the service: no clock until
    /// the returned guard (kept with the response body) is dropped.
    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.in_flight += 1;
        state.phase = Phase::Busy;
        state.deadline = None;
        InFlight(self.clone())
    }

    /// The current deadline, if a clock runs.
    fn deadline(&self) -> Option<Instant> {
        self.state().deadline
    }

    /// The phase whose clock has run out, if one has.
    fn expired(&self) -> Option<Phase> {
        let state = self.state();
        state
            .deadline
            .is_some_and(|d| d <= Instant::now())
            .then_some(state.phase)
    }

    fn is_busy(&self) -> bool {
        self.state().phase == Phase::Busy
    }

    /// Eviction order: `(0, since)` for fresh and idle connections, `(1,
    /// since)` for ones receiving a head, the oldest first; `None` for busy
    /// or already evicted connections.
    pub(super) fn eviction_rank(&self) -> Option<(u8, Instant)> {
        if self.evict.is_cancelled() {
            return None;
        }
        let state = self.state();
        match state.phase {
            Phase::Fresh | Phase::Idle => Some((0, state.since)),
            Phase::Head => Some((1, state.since)),
            Phase::Busy => None,
        }
    }

    /// Asks the connection to close to make room (after its request, if it
    /// has one by now).
    pub(super) fn evict(&self) {
        self.evict.cancel();
    }
}

/// A request in progress on a connection; dropped with its response body.
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            let now = Instant::now();
            state.phase = Phase::Idle;
            state.since = now;
            state.deadline = Some(now + self.0.idle_timeout);
            drop(state);
            self.0.changed.notify_one();
            self.0.not_busy.notify_one();
        }
    }
}

/// The socket, reporting to the watch whenever bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.on_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that holds its request's place (busy connection,
/// in-flight permit) until hyper is done with it.
pub(super) struct Guarded {
    body: Body,
    _in_flight: InFlight,
    _permit: Option<OwnedSemaphorePermit>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The per-connection hyper service: marks the connection busy, sheds the
/// request when the listener has too many in flight, else routes it.
#[derive(Clone)]
struct ConnService {
    shared: Arc<Shared>,
    watch: Arc<Watch>,
    /// The TCP peer, handed to handlers as axum's `ConnectInfo` (the client
    /// address of rate limits).
    peer: SocketAddr,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Guarded>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Guarded>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let in_flight = self.watch.request_started();
        let Ok(permit) = self.shared.in_flight.clone().try_acquire_owned() else {
            return Box::pin(std::future::ready(Ok(self.shed(&request, in_flight))));
        };
        let app = self.shared.app.clone();
        Box::pin(async move {
            let Ok(response) = app.oneshot(request).await;
            Ok(response.map(|body| Guarded {
                body,
                _in_flight: in_flight,
                _permit: Some(permit),
            }))
        })
    }
}

impl ConnService {
    /// The listener's overloaded answer, forced to 503 with `Retry-After`.
    fn shed(&self, request: &Request<Incoming>, in_flight: InFlight) -> Response<Guarded> {
        let options = &self.shared.options;
        metrics::counter!(
            "e2a_http_requests_shed_total",
            "service" => options.service,
            "listener" => options.listener
        )
        .increment(1);
        if self.shared.shed_warning.ready() {
            tracing::warn!(
                service = options.service,
                listener = options.listener,
                max_in_flight = options.limits.max_in_flight,
                "too many requests in flight; answering 503 overloaded"
            );
        }
        let mut response = (options.overloaded)(request.headers());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        response.map(|body| Guarded {
            body,
            _in_flight: in_flight,
            _permit: None,
        })
    }
}

/// How a connection ended.
pub(super) enum End {
    /// The client closed it, or HTTP did (`Connection: close`, shutdown).
    Closed,
    /// hyper gave up on it (bad request, reset, …).
    Failed(hyper::Error),
    /// Its request head did not arrive in time.
    HeaderTimeout,
    /// It waited longer than the idle timeout for a next request.
    IdleTimeout,
    /// Closed to make room under the connection cap.
    Evicted,
}

impl End {
    /// Counts the connections we closed, logs the others at debug level.
    pub(super) fn record(&self, options: &Options) {
        let reason = match self {
            End::Closed => return,
            End::Failed(e) => {
                tracing::debug!(
                    service = options.service,
                    listener = options.listener,
                    error = %e,
                    "HTTP connection failed"
                );
                return;
            }
            End::HeaderTimeout => "header_timeout",
            End::IdleTimeout => "idle_timeout",
            End::Evicted => "evicted",
        };
        metrics::counter!(
            "e2a_http_connections_closed_total",
            "service" => options.service,
            "listener" => options.listener,
            "reason" => reason
        )
        .increment(1);
    }
}

/// Serves HTTP/1.1 on `stream` until the client or HTTP ends the
/// connection, its clock runs out or it is evicted (the socket is dropped,
/// nothing is answered), or `shutdown` drains it.
pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    watch: Arc<Watch>,
    shutdown: CancellationToken,
) -> End {
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        watch: watch.clone(),
    });
    let service = ConnService {
        shared,
        watch: watch.clone(),
        peer,
    };
    let connection = http1::Builder::new()
        .keep_alive(true)
        // Ours: see the module documentation.
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    let mut connection = pin!(connection);
    let mut draining = false;
    loop {
        let deadline = watch.deadline();
        tokio::select! {
            result = connection.as_mut() => {
                return match result {
                    Ok(()) => End::Closed,
                    Err(e) => End::Failed(e),
                };
            }
            () = sleep_until(deadline) => match watch.expired() {
                Some(Phase::Fresh | Phase::Head) => return End::HeaderTimeout,
                Some(Phase::Idle) => return End::IdleTimeout,
                Some(Phase::Busy) | None => {}
            },
            () = watch.changed.notified() => {}
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = watch.evict.cancelled(), if !draining => {
                if !watch.is_busy() {
                    return End::Evicted;
                }
                // A request arrived since it was chosen: let it finish.
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(75);

    fn watch() -> Arc<Watch> {
        Watch::new(HEADER, IDLE, Arc::new(Notify::new()))
    }

    fn phase(watch: &Watch) -> Phase {
        watch.state().phase
    }

    #[test]
    fn a_fresh_connection_owes_its_head_from_the_accept() {
        let watch = watch();
        let due = watch.deadline().unwrap();
        assert_eq!(phase(&watch), Phase::Fresh);
        // Its first bytes do not restart the header clock.
        watch.on_read();
        assert_eq!(phase(&watch), Phase::Head);
        assert_eq!(watch.deadline(), Some(due));
        assert_eq!(watch.expired(), None);
    }

    #[test]
    fn a_request_stops_the_clock_and_its_end_starts_the_idle_one() {
        let watch = watch();
        watch.on_read();
        let request = watch.request_started();
        assert_eq!((phase(&watch), watch.deadline()), (Phase::Busy, None));
        // Body bytes while busy change nothing.
        watch.on_read();
        assert_eq!((phase(&watch), watch.deadline()), (Phase::Busy, None));
        let before = Instant::now();
        drop(request);
        assert_eq!(phase(&watch), Phase::Idle);
        let due = watch.deadline().unwrap();
        assert!(due >= before + IDLE && due <= Instant::now() + IDLE);

        // The next request's first bytes start a fresh header clock.
        watch.on_read();
        assert_eq!(phase(&watch), Phase::Head);
        assert!(watch.deadline().unwrap() <= Instant::now() + HEADER);
    }

    #[test]
    fn overlapping_requests_keep_the_connection_busy_until_the_last_ends() {
        let watch = watch();
        let first = watch.request_started();
        let second = watch.request_started();
        drop(first);
        assert_eq!(phase(&watch), Phase::Busy);
        drop(second);
        assert_eq!(phase(&watch), Phase::Idle);
    }

    #[test]
    fn eviction_prefers_silent_and_idle_connections_and_spares_busy_ones() {
        let (fresh, head, busy) = (watch(), watch(), watch());
        head.on_read();
        let _request = busy.request_started();
        assert_eq!(fresh.eviction_rank().map(|r| r.0), Some(0));
        assert_eq!(head.eviction_rank().map(|r| r.0), Some(1));
        assert_eq!(busy.eviction_rank(), None);
        // An evicted connection is not chosen twice.
        fresh.evict();
        assert_eq!(fresh.eviction_rank(), None);
    }

    #[test]
    fn the_end_of_a_request_wakes_a_listener_waiting_at_the_cap() {
        let not_busy = Arc::new(Notify::new());
        let watch = Watch::new(HEADER, IDLE, not_busy.clone());
        drop(watch.request_started());
        // The stored permit completes the next wait at once.
        let notified = not_busy.notified();
        let mut notified = std::pin::pin!(notified);
        let waker = std::task::Waker::noop();
        assert!(
            notified
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready()
        );
    }
}
