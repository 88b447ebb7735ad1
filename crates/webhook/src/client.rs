//! The SSRF-safe HTTP client that performs one delivery attempt.
//!
//! Built on `reqwest` (rustls on `ring`, HTTP/1.1 only) with:
//! * [`check_url`] before anything else (scheme, credentials, IP literals —
//!   a literal host never reaches a resolver);
//! * a resolver that filters every looked-up address through [`check_ip`]
//!   and hands reqwest only the survivors, so the addresses connected to are
//!   the addresses checked and DNS rebinding gains nothing;
//! * no redirects (`redirect::Policy::none()`: a 3xx is the outcome), no
//!   proxy (environment proxies ignored), no automatic retries;
//! * a total timeout (default 15 s) and a connect timeout (default 5 s);
//! * the response body read and discarded up to a cap (default 64 KiB),
//!   never buffered; past the cap the connection is dropped.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::body::Body;
use crate::headers::{legacy_headers, subscriber_headers};
use crate::legacy::LegacyRequest;
use crate::outcome::{Outcome, OutcomeKind};
use crate::policy::{RefusedAddress, UrlPolicy, check_ip, check_url};
use crate::retry::parse_retry_after;
use crate::signature::Secrets;

/// Total time for one attempt, from connecting to the end of the body (the
/// original's 15 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time to establish the TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Response body bytes read (and discarded) before the connection is dropped.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Client settings. `Default` is production: strict policy, 15 s, 5 s,
/// 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Total time for one attempt (connect, send, response, body).
    pub timeout: Duration,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Response body bytes read before giving up on the rest.
    pub max_response_body: usize,
    /// Destination policy (https only, public addresses only by default).
    pub policy: UrlPolicy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            policy: UrlPolicy::STRICT,
        }
    }
}

/// The future a [`Lookup`] returns.
pub type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Name resolution used by the client; every result is filtered by the
/// policy before it is connected to. Tests inject their own; production uses
/// [`SystemLookup`].
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `host` (a DNS name, never an IP literal).
    fn lookup(&self, host: &str) -> LookupFuture;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool; honours
/// `/etc/hosts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Why the resolver produced no address to connect to. Travels through
/// reqwest as the source of its connect error and is found again by
/// downcasting.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("DNS lookup failed: {0}")]
    Lookup(#[source] io::Error),
    #[error("the name has no addresses")]
    Empty,
    #[error("every address of the name is refused; first: {0}")]
    Refused(RefusedAddress),
}

struct GuardedResolver {
    lookup: Arc<dyn Lookup>,
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let lookup = Arc::clone(&self.lookup);
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = lookup.lookup(&host).await.map_err(ResolveError::Lookup)?;
            let mut first_refused = None;
            let mut allowed = Vec::with_capacity(ips.len());
            for ip in ips {
                match check_ip(ip, allow_private) {
                    // Port 0: reqwest substitutes the URL's port.
                    Ok(()) => allowed.push(SocketAddr::new(ip, 0)),
                    Err(refused) => {
                        first_refused.get_or_insert(refused);
                    }
                }
            }
            if allowed.is_empty() {
                let err = match first_refused {
                    Some(refused) => ResolveError::Refused(refused),
                    None => ResolveError::Empty,
                };
                return Err(Box::new(err) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client could not be built (TLS set-up).
#[derive(Debug, thiserror::Error)]
#[error("could not build the webhook HTTP client")]
pub struct BuildError(#[source] reqwest::Error);

/// Performs delivery attempts. Cheap to clone (shares its connection pool);
/// build one per process.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    config: ClientConfig,
}

impl WebhookClient {
    /// A client resolving names with the system resolver.
    pub fn new(config: ClientConfig) -> Result<Self, BuildError> {
        Self::with_lookup(config, Arc::new(SystemLookup))
    }

    /// A client resolving names with `lookup` (results still filtered).
    ///
    /// Installs rustls' `ring` provider as the process default if none is
    /// installed yet (the binaries install it at start anyway).
    pub fn with_lookup(config: ClientConfig, lookup: Arc<dyn Lookup>) -> Result<Self, BuildError> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Err: another thread installed one first; that one is used.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let resolver = GuardedResolver {
            lookup,
            allow_private: config.policy.allow_private,
        };
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .retry(reqwest::retry::never())
            .referer(false)
            .https_only(!config.policy.allow_http)
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            // Header names go out as `X-E2a-Signature`, like the original's
            // Go canonicalisation; receivers match case-insensitively.
            .http1_title_case_headers()
            .dns_resolver(Arc::new(resolver))
            .build()
            .map_err(BuildError)?;
        Ok(Self { http, config })
    }

    /// The settings this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A subscriber delivery (§4.1): POSTs `body` signed with `secrets` at
    /// the current time.
    pub async fn send_signed(&self, url: &str, body: &Body, secrets: &Secrets<'_>) -> Outcome {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let headers = subscriber_headers(secrets, now, body.as_bytes());
        self.post(url, headers, body).await
    }

    /// A legacy per-agent push (§4.2): POSTs `body` with the deprecation
    /// headers and the stored `X-E2A-Auth-*` headers. A stored header that
    /// cannot be sent safely is an [`OutcomeKind::Invalid`] outcome and
    /// nothing is sent.
    pub async fn send_legacy<'a>(
        &self,
        url: &str,
        body: &Body,
        auth_headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Outcome {
        match legacy_headers(auth_headers) {
            Ok(headers) => self.post(url, headers, body).await,
            Err(e) => Outcome::no_response(OutcomeKind::Invalid, e.to_string(), Duration::ZERO),
        }
    }

    /// A legacy per-agent push (§4.2) built with [`LegacyRequest::new`]:
    /// POSTs its body with its headers to `url` (the agent's
    /// `webhook_url`), under this client's policy. No signature.
    pub async fn send_legacy_request(&self, url: &str, request: &LegacyRequest) -> Outcome {
        self.post(url, request.headers().clone(), request.body())
            .await
    }

    /// One POST of `body` with `headers` to `url`, under the policy, and the
    /// classified outcome. Never panics, never returns an error: every
    /// failure is an [`Outcome`].
    pub async fn post(&self, url: &str, headers: HeaderMap, body: &Body) -> Outcome {
        let start = Instant::now();
        let url = match check_url(url, &self.config.policy) {
            Ok(url) => url,
            Err(e) => {
                return Outcome::no_response(
                    OutcomeKind::Blocked,
                    format!("blocked: {e}"),
                    start.elapsed(),
                );
            }
        };
        let sent = self
            .http
            .post(url)
            .headers(headers)
            .body(body.bytes())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return self.transport_failure(&e, start.elapsed()),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body_truncated = discard_body(response, self.config.max_response_body).await;
        Outcome::from_status(status, retry_after, start.elapsed(), body_truncated)
    }

    fn transport_failure(&self, err: &reqwest::Error, elapsed: Duration) -> Outcome {
        if let Some(resolve) = find_in_chain::<ResolveError>(err) {
            let kind = match resolve {
                ResolveError::Refused(_) => OutcomeKind::Blocked,
                ResolveError::Lookup(_) | ResolveError::Empty => OutcomeKind::Connect,
            };
            let prefix = if kind == OutcomeKind::Blocked {
                "blocked"
            } else {
                "connect"
            };
            return Outcome::no_response(kind, format!("{prefix}: {resolve}"), elapsed);
        }
        if err.is_timeout() {
            let text = if err.is_connect() {
                format!(
                    "timeout: no connection within {} s",
                    self.config.connect_timeout.as_secs_f64()
                )
            } else {
                format!(
                    "timeout: no response within {} s",
                    self.config.timeout.as_secs_f64()
                )
            };
            return Outcome::no_response(OutcomeKind::Timeout, text, elapsed);
        }
        let what = if err.is_connect() {
            "connect"
        } else {
            "connection"
        };
        let fallback = if err.is_connect() {
            "could not connect"
        } else {
            "failed before a response"
        };
        Outcome::no_response(
            OutcomeKind::Connect,
            format!("{what}: {}", root_cause(err, fallback)),
            elapsed,
        )
    }
}

/// Reads and drops the response body up to `cap` bytes; `true` (truncated)
/// when there is more, in which case the connection is dropped rather than
/// read to the end. A body error or timeout after the status arrived does
/// not change the outcome: the status decides.
async fn discard_body(mut response: reqwest::Response, cap: usize) -> bool {
    let cap_u64 = u64::try_from(cap).unwrap_or(u64::MAX);
    if response.content_length().is_some_and(|len| len > cap_u64) {
        return true;
    }
    let mut read = 0usize;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read = read.saturating_add(chunk.len());
                if read > cap {
                    return true;
                }
            }
            Ok(None) | Err(_) => return false,
        }
    }
}

fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The innermost cause's text (an `io::Error`, a TLS alert, hyper's
/// "connection closed before message completed"), which names no URL;
/// `fallback` when there is none or it would show a URL.
fn root_cause(err: &reqwest::Error, fallback: &str) -> String {
    let mut deepest: Option<&(dyn StdError + 'static)> = None;
    let mut current = err.source();
    while let Some(e) = current {
        deepest = Some(e);
        current = e.source();
    }
    match deepest.map(ToString::to_string) {
        Some(text) if !text.contains("://") && !text.is_empty() => text,
        _ => fallback.to_owned(),
    }
}
