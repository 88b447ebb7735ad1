//! Rate limits (spec §5.3) and the client address they key on.
//!
//! Two kinds, both the generic cell rate algorithm of
//! [`e2a_store::rate_limits`] (a burst of `limit`, then one request every
//! `window / limit`; refusals consume nothing):
//!
//! * **Shared** limits live in Postgres and hold across every API replica:
//!   they protect what a customer pays for or what costs the gateway per
//!   account whichever replica answers — domain registration (an RSA key
//!   each), and, with the outbound routes, sending.
//! * **Per-replica** limits live in this process ([`LocalLimiter`]): they
//!   protect the replica's own CPU and database pool, must cost no database
//!   round trip (the failed-authentication limit runs *before* the key
//!   lookup), and scale with the number of replicas — polling per user,
//!   agent registration per client address, failed authentication per
//!   client address.
//!
//! The client address is the socket peer, or — only when the peer is one of
//! `E2A_TRUSTED_PROXIES` — the right-most `X-Forwarded-For` entry that is
//! not itself a trusted proxy ([`ClientIp`]). IPv6 clients are keyed by
//! their /64, which is what one subscriber usually holds.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::Instant,
};

use axum::{
    extract::{ConnectInfo, FromRequestParts, Request, State},
    http::{HeaderMap, HeaderValue, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use e2a_store::rate_limits::{Decision, Quota};
use ipnet::IpNet;

use crate::{AppState, auth::Caller, error::ApiError};

/// Keys one [`LocalLimiter`] (or the [`AuthGuard`]'s set of vouched-for
/// addresses) remembers at most, over all shards.
pub const LOCAL_MAX_KEYS: usize = 100_000;
const SHARDS: usize = 16;

/// A bounded map from key to the instant until which its entry means
/// something (a GCRA arrival time, an expiry). At most [`LOCAL_MAX_KEYS`]
/// keys: a full shard first forgets entries that mean nothing any more;
/// if none does, an arbitrary one — a flood of distinct keys can therefore
/// not grow memory, only make the map forget.
#[derive(Debug)]
struct Shards {
    hasher: RandomState,
    shards: Box<[Shard]>,
}

/// Keys of one shard and their instants.
type Shard = Mutex<HashMap<Box<str>, Instant>>;

impl Shards {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Runs `f` on the shard of `key`, locked.
    fn with<R>(&self, key: &str, f: impl FnOnce(&mut HashMap<Box<str>, Instant>) -> R) -> R {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    /// Sets `key` to `until` in `map` (a shard), making room first.
    fn insert(map: &mut HashMap<Box<str>, Instant>, key: &str, until: Instant, now: Instant) {
        if !map.contains_key(key) && map.len() >= LOCAL_MAX_KEYS / SHARDS {
            map.retain(|_, t| *t > now);
            if map.len() >= LOCAL_MAX_KEYS / SHARDS
                && let Some(victim) = map.keys().next().cloned()
            {
                map.remove(&victim);
            }
        }
        map.insert(key.into(), until);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// A per-process GCRA limiter with bounded memory (see [`Shards`]: at
/// worst a forgotten key gets a fresh burst).
#[derive(Debug)]
pub struct LocalLimiter {
    quota: Quota,
    keys: Shards,
}

impl LocalLimiter {
    /// A limiter enforcing `quota` per key.
    pub fn new(quota: Quota) -> Self {
        Self {
            quota,
            keys: Shards::new(),
        }
    }

    /// Counts one request for `key` unless that would exceed the quota.
    pub fn hit(&self, key: &str) -> Decision {
        self.decide(key, true)
    }

    /// What [`LocalLimiter::hit`] would answer, without counting.
    pub fn peek(&self, key: &str) -> Decision {
        self.decide(key, false)
    }

    fn decide(&self, key: &str, count: bool) -> Decision {
        let now = Instant::now();
        self.keys.with(key, |map| {
            let tat = map.get(key).copied().unwrap_or(now).max(now);
            let next = tat + self.quota.interval();
            if next.duration_since(now) > self.quota.window {
                return self.quota.decide(false, tat.duration_since(now));
            }
            if count {
                Shards::insert(map, key, next, now);
            }
            self.quota.decide(true, next.duration_since(now))
        })
    }

    /// Gives back one request counted by [`LocalLimiter::hit`].
    pub fn refund(&self, key: &str) {
        let now = Instant::now();
        self.keys.with(key, |map| {
            if let Some(tat) = map.get_mut(key) {
                *tat = tat
                    .checked_sub(self.quota.interval())
                    .map_or(now, |t| t.max(now));
            }
        });
    }
}

/// How long a successful authentication vouches for its client address.
pub const VOUCHED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// The failed-authentication limit per client address, applied before the
/// key lookup so that made-up keys cost no database round trip once an
/// address is over it.
///
/// An address that authenticated successfully within [`VOUCHED_FOR`] is
/// *vouched for*: its lookups run freely and only a failure is counted, so
/// a busy client with many concurrent requests is never refused for
/// requests still in flight. Any other address *pre-pays*: each lookup is
/// counted before it runs and refunded when the key was good, so even a
/// burst of concurrent made-up keys from a fresh address costs at most the
/// limit's burst in lookups. Either way an address over the limit is
/// refused before the lookup.
#[derive(Debug)]
pub struct AuthGuard {
    failures: LocalLimiter,
    vouched: Shards,
}

/// What [`AuthGuard::admit`] charged, to settle in [`AuthGuard::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// Nothing yet (a vouched-for address).
    Free,
    /// One failure, paid in advance.
    Prepaid,
}

/// How a lookup ended, for [`AuthGuard::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupOutcome {
    /// The key was good.
    Valid,
    /// Unknown, expired or revoked.
    Invalid,
    /// The lookup did not happen (database unavailable): not the client's
    /// failure.
    NotDone,
}

impl AuthGuard {
    /// A guard allowing `quota` failures per client address.
    pub fn new(quota: Quota) -> Self {
        Self {
            failures: LocalLimiter::new(quota),
            vouched: Shards::new(),
        }
    }

    /// Before a key lookup from `ip`: the ticket to settle afterwards, or
    /// the refusal when the address is over its limit.
    pub fn admit(&self, ip: &str) -> Result<Ticket, Decision> {
        let now = Instant::now();
        let vouched = self
            .vouched
            .with(ip, |map| map.get(ip).is_some_and(|until| *until > now));
        if vouched {
            let d = self.failures.peek(ip);
            return if d.allowed { Ok(Ticket::Free) } else { Err(d) };
        }
        let d = self.failures.hit(ip);
        if d.allowed {
            Ok(Ticket::Prepaid)
        } else {
            Err(d)
        }
    }

    /// After the lookup admitted with `ticket`.
    pub fn settle(&self, ip: &str, ticket: Ticket, outcome: LookupOutcome) {
        match (ticket, outcome) {
            (Ticket::Prepaid, LookupOutcome::Valid | LookupOutcome::NotDone) => {
                self.failures.refund(ip);
            }
            (Ticket::Free, LookupOutcome::Invalid) => {
                self.failures.hit(ip);
            }
            _ => {}
        }
        if outcome == LookupOutcome::Valid {
            let now = Instant::now();
            self.vouched
                .with(ip, |map| Shards::insert(map, ip, now + VOUCHED_FOR, now));
        }
    }
}

/// Every limit the API enforces, built from the configuration.
#[derive(Debug)]
pub struct RateLimits {
    /// Poll-limited reads, per user, per replica.
    pub poll: LocalLimiter,
    /// `POST /v1/agents`, per client address, per replica.
    pub agent_create: LocalLimiter,
    /// Requests with a well-formed but unknown, expired or revoked key, per
    /// client address, per replica; enforced before the key lookup.
    pub auth_failures: AuthGuard,
    /// `POST /v1/domains`, per account, shared by all replicas.
    pub domain_create: Quota,
    /// Sends per agent (send, reply, forward, test), shared by all replicas.
    pub send: Quota,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// The address limits are keyed on, as text: an IPv4 address, or the /64
/// of an IPv6 address (`2001:db8:1:2::/64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIp(pub String);

impl ClientIp {
    /// The key for `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientIp(v4.to_string()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientIp(v4.to_string()),
                None => {
                    let s = v6.segments();
                    let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                    ClientIp(format!("{net}/64"))
                }
            },
        }
    }

    /// The client address of a request from `peer` carrying `headers`.
    pub fn resolve(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Self {
        let Some(peer) = peer else {
            // In-process calls (tests driving the router directly).
            return ClientIp("unknown".into());
        };
        let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
        if !is_trusted(&peer) {
            return Self::of(peer);
        }
        // Walk the hops right to left: each trusted proxy appended the
        // address it received from; the first hop that is not a trusted
        // proxy is the client. An entry that does not parse ends the walk
        // at the last address a trusted proxy vouched for.
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !is_trusted(&ip) {
                break;
            }
        }
        Self::of(client)
    }
}

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(ClientIp::resolve(
            peer,
            &parts.headers,
            &state.limits.trusted_proxies,
        ))
    }
}

/// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (and
/// `Retry-After` when refused) from `d`.
pub fn set_headers(headers: &mut HeaderMap, d: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(d.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(d.reset_after_secs));
    if !d.allowed {
        headers.insert("retry-after", HeaderValue::from(d.retry_after_secs));
    }
}

/// Middleware of the poll-limited reads: authenticates the caller (the
/// handler reuses the result), counts the request against the caller's
/// poll limit, and puts the limit's headers on every answer.
pub async fn poll_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let caller = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let d = state.limits.poll.hit(caller.user_id.as_str());
    if !d.allowed {
        return ApiError::rate_limited(&d).into_response();
    }
    parts.extensions.insert(caller);
    let mut response = next.run(Request::from_parts(parts, body)).await;
    set_headers(response.headers_mut(), &d);
    response
}

/// Middleware of agent registration: counts the request against the
/// client address's limit before anything else, and puts the limit's
/// headers on every answer.
pub async fn agent_create_limit(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(ip) = ClientIp::from_request_parts(&mut parts, &state).await;
    let d = state.limits.agent_create.hit(&ip.0);
    if !d.allowed {
        return ApiError::rate_limited(&d).into_response();
    }
    let mut response = next.run(Request::from_parts(parts, body)).await;
    set_headers(response.headers_mut(), &d);
    response
}

/// Parses `E2A_TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks.
pub fn parse_proxies(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{p:?} is not an IP address or CIDR block"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = parse_proxies("10.0.0.0/8, 192.0.2.1").unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // An untrusted peer's header is ignored (the original's flaw 34).
        assert_eq!(
            ClientIp::resolve(ip("203.0.113.9"), &headers(&["1.2.3.4"]), &trusted).0,
            "203.0.113.9"
        );
        // Through a trusted proxy: the right-most untrusted hop, so a
        // client-supplied left-most entry cannot choose its own key.
        assert_eq!(
            ClientIp::resolve(
                ip("10.1.1.1"),
                &headers(&["6.6.6.6, 198.51.100.7, 10.2.2.2"]),
                &trusted
            )
            .0,
            "198.51.100.7"
        );
        assert_eq!(
            ClientIp::resolve(
                ip("192.0.2.1"),
                &headers(&["6.6.6.6", "198.51.100.8"]),
                &trusted
            )
            .0,
            "198.51.100.8"
        );
        // Garbage stops the walk at the last vouched-for address.
        assert_eq!(
            ClientIp::resolve(ip("10.1.1.1"), &headers(&["junk, 10.3.3.3"]), &trusted).0,
            "10.3.3.3"
        );
        // No header: the proxy itself.
        assert_eq!(
            ClientIp::resolve(ip("10.1.1.1"), &HeaderMap::new(), &trusted).0,
            "10.1.1.1"
        );
        // IPv6 by /64; mapped IPv4 as IPv4.
        assert_eq!(
            ClientIp::resolve(ip("2001:db8:1:2:3:4:5:6"), &HeaderMap::new(), &[]).0,
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            ClientIp::resolve(ip("::ffff:198.51.100.1"), &HeaderMap::new(), &[]).0,
            "198.51.100.1"
        );
        assert!(parse_proxies("10.0.0.0/33").is_err());
        assert!(parse_proxies("").unwrap().is_empty());
    }

    #[test]
    fn local_limits_admit_the_burst_then_refuse_and_refund() {
        let l = LocalLimiter::new(Quota::per_minute(3));
        let d: Vec<_> = (0..4).map(|_| l.hit("a")).collect();
        assert!(d[..3].iter().all(|d| d.allowed));
        assert_eq!(
            d.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert!(!d[3].allowed);
        assert_eq!(d[3].retry_after_secs, 20);
        assert!(l.hit("b").allowed, "keys are independent");
        l.refund("a");
        assert!(l.hit("a").allowed, "a refund gives one request back");
        assert!(!l.hit("a").allowed);
    }

    #[test]
    fn fresh_addresses_prepay_and_vouched_ones_pay_for_failures_only() {
        let g = AuthGuard::new(Quota::per_minute(3));
        // A fresh address: three concurrent lookups prepaid, the fourth
        // refused before it runs.
        let tickets: Vec<_> = (0..3).map(|_| g.admit("a").unwrap()).collect();
        assert!(tickets.iter().all(|t| *t == Ticket::Prepaid));
        assert!(g.admit("a").is_err());
        // One was good: refunded, and the address is now vouched for.
        g.settle("a", tickets[0], LookupOutcome::Valid);
        g.settle("a", tickets[1], LookupOutcome::Invalid);
        g.settle("a", tickets[2], LookupOutcome::NotDone);
        // Many concurrent lookups of a vouched-for address run freely…
        let free: Vec<_> = (0..50).map(|_| g.admit("a").unwrap()).collect();
        assert!(free.iter().all(|t| *t == Ticket::Free));
        for t in free {
            g.settle("a", t, LookupOutcome::Valid);
        }
        // …and its failures still count: 1 so far, 2 more, then refused.
        for _ in 0..2 {
            let t = g.admit("a").unwrap();
            g.settle("a", t, LookupOutcome::Invalid);
        }
        let refused = g.admit("a").unwrap_err();
        assert_eq!(refused.limit, 3);
        assert!(refused.retry_after_secs >= 1);
        // Another address is untouched.
        assert_eq!(g.admit("b"), Ok(Ticket::Prepaid));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_keys() {
        let l = LocalLimiter::new(Quota::per_hour(1));
        for i in 0..(LOCAL_MAX_KEYS + 5_000) {
            l.hit(&format!("k{i}"));
        }
        let total = l.keys.len();
        assert!(total <= LOCAL_MAX_KEYS, "{total}");
    }
}
