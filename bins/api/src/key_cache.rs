//! Authenticated API keys, kept in memory for a few seconds.
//!
//! Every `/v1` request presents a key, and looking it up is a database
//! round trip — on a list request, as much database work as the page
//! itself. A key found valid is therefore kept here, by the SHA-256 of the
//! key (never the key), for at most `E2A_API_KEY_CACHE_SECS` (default 10;
//! 0 turns the cache off) and never past the key's own expiry.
//!
//! Revocation stays prompt across replicas: every statement that revokes,
//! deletes, re-keys or changes the expiry of keys notifies
//! `api_keys_changed` at commit (migration V27), and [`listen`] empties the
//! cache when the notification arrives, milliseconds after the commit. The
//! time limit bounds how long a revoked key can still be honoured should
//! the notification connection fail silently. While that connection is
//! down nothing is cached (every request looks its key up), and every
//! change of state (notification, lost or regained connection) bumps a
//! generation, so a lookup that started before it cannot store its result
//! after it.
//!
//! Only valid keys enter the cache (made-up keys are never stored), and it
//! holds at most [`MAX_ENTRIES`] keys: when full it is emptied.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use e2a_store::api_keys::Principal;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Most keys kept at once.
pub const MAX_ENTRIES: usize = 10_000;

/// The notification channel (migration V27).
pub const CHANNEL: &str = e2a_store::api_keys::CHANGED_CHANNEL;

/// `application_name` of the listening connection.
pub const LISTEN_APPLICATION_NAME: &str = "e2a-api-listen";

/// Delay before each successive reconnection attempt; the last repeats.
const RECONNECT_BACKOFF: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

/// The cache (see the module docs). Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct KeyCache {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    listening: bool,
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    principal: Principal,
    until: Instant,
}

/// Taken before a lookup; a result is stored only if nothing changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl KeyCache {
    /// A cache keeping keys for `ttl` (zero: never). It stores nothing
    /// until [`listen`] has its `LISTEN` in place.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the cache is configured on (a non-zero time limit).
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The key whose hash is `key_hash`, if it was found valid recently
    /// enough and nothing has changed since.
    pub fn get(&self, key_hash: &str) -> Option<Principal> {
        if !self.enabled() {
            return None;
        }
        let mut state = self.state();
        let entry = state.entries.get(key_hash)?;
        if entry.until > Instant::now() {
            return Some(entry.principal.clone());
        }
        state.entries.remove(key_hash);
        None
    }

    /// The ticket for a lookup about to start.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.state().generation)
    }

    /// Keeps `principal`, found valid for `key_hash` by a lookup that began
    /// with `ticket` — unless the cache is off, not listening, or anything
    /// changed since the ticket, or the key expires before it is worth it.
    pub fn put(&self, ticket: Ticket, key_hash: &str, principal: &Principal) {
        if !self.enabled() {
            return;
        }
        let mut keep = self.ttl;
        if let Some(expires_at) = principal.expires_at {
            let left = expires_at - OffsetDateTime::now_utc();
            match Duration::try_from(left) {
                Ok(left) if !left.is_zero() => keep = keep.min(left),
                _ => return,
            }
        }
        let until = Instant::now() + keep;
        let mut state = self.state();
        if !state.listening || state.generation != ticket.0 {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES && !state.entries.contains_key(key_hash) {
            state.entries.clear();
        }
        state.entries.insert(
            key_hash.to_owned(),
            Entry {
                principal: principal.clone(),
                until,
            },
        );
    }

    /// Forgets every key (a key changed somewhere).
    pub fn invalidate(&self) {
        let mut state = self.state();
        state.generation += 1;
        state.entries.clear();
    }

    /// Records whether changes are being heard; forgets every key either
    /// way (while deaf, a change may have been missed).
    pub fn set_listening(&self, listening: bool) {
        let mut state = self.state();
        state.generation += 1;
        state.listening = listening;
        state.entries.clear();
    }

    /// Whether changes are being heard (the cache is in use).
    pub fn listening(&self) -> bool {
        self.state().listening
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hears `api_keys_changed` on a dedicated connection (`pg`, from
/// [`e2a_store::Store::dedicated_config`]) until `shutdown`, emptying
/// `cache` on every notification. Reconnects with backoff (1, 2, 5, 10,
/// then 30 s) and keeps the cache off while it is not listening. Does
/// nothing when the cache is configured off.
pub async fn listen(
    cache: Arc<KeyCache>,
    pg: e2a_store::listen::Config,
    shutdown: CancellationToken,
) {
    if !cache.enabled() {
        return;
    }
    let mut failures = 0usize;
    loop {
        let listened = std::sync::atomic::AtomicBool::new(false);
        let lost = tokio::select! {
            () = shutdown.cancelled() => break,
            lost = e2a_store::listen::listen_once(
                &pg,
                CHANNEL,
                || {
                    listened.store(true, std::sync::atomic::Ordering::Relaxed);
                    cache.set_listening(true);
                    tracing::info!(channel = CHANNEL, "API key cache on");
                },
                || cache.invalidate(),
            ) => lost,
        };
        cache.set_listening(false);
        if listened.load(std::sync::atomic::Ordering::Relaxed) {
            failures = 0;
        }
        let delay = RECONNECT_BACKOFF[failures.min(RECONNECT_BACKOFF.len() - 1)];
        failures += 1;
        tracing::warn!(error = %lost, retry_in_secs = delay.as_secs(), "API key cache off: not hearing key changes; reconnecting");
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    cache.set_listening(false);
}

#[cfg(test)]
mod tests {
    use e2a_store::ids::{ApiKeyId, UserId};

    use super::*;

    fn principal(expires_in: Option<time::Duration>) -> Principal {
        Principal {
            user_id: UserId::new(),
            key_id: ApiKeyId::new(),
            expires_at: expires_in.map(|d| OffsetDateTime::now_utc() + d),
        }
    }

    fn listening(ttl: Duration) -> KeyCache {
        let cache = KeyCache::new(ttl);
        cache.set_listening(true);
        cache
    }

    #[test]
    fn keeps_a_valid_key_while_listening() {
        let cache = listening(Duration::from_secs(10));
        let t = cache.ticket();
        let p = principal(None);
        cache.put(t, "h1", &p);
        assert_eq!(cache.get("h1"), Some(p));
        assert_eq!(cache.get("h2"), None);
    }

    #[test]
    fn stores_nothing_when_deaf_or_off() {
        let deaf = KeyCache::new(Duration::from_secs(10));
        deaf.put(deaf.ticket(), "h1", &principal(None));
        assert_eq!(deaf.get("h1"), None);
        let off = listening(Duration::ZERO);
        off.put(off.ticket(), "h1", &principal(None));
        assert_eq!(off.get("h1"), None);
    }

    #[test]
    fn a_change_during_the_lookup_wins() {
        let cache = listening(Duration::from_secs(10));
        let t = cache.ticket();
        cache.invalidate();
        cache.put(t, "h1", &principal(None));
        assert_eq!(cache.get("h1"), None);
        let t = cache.ticket();
        cache.set_listening(false);
        cache.set_listening(true);
        cache.put(t, "h1", &principal(None));
        assert_eq!(cache.get("h1"), None);
    }

    #[test]
    fn a_notification_or_a_lost_connection_forgets_everything() {
        let cache = listening(Duration::from_secs(10));
        cache.put(cache.ticket(), "h1", &principal(None));
        cache.invalidate();
        assert_eq!(cache.get("h1"), None);
        cache.put(cache.ticket(), "h1", &principal(None));
        cache.set_listening(false);
        assert_eq!(cache.get("h1"), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn entries_end_at_the_limit_and_never_outlive_the_key() {
        let cache = listening(Duration::from_millis(50));
        cache.put(cache.ticket(), "h1", &principal(None));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(cache.get("h1"), None);

        let cache = listening(Duration::from_secs(10));
        cache.put(
            cache.ticket(),
            "h2",
            &principal(Some(time::Duration::milliseconds(50))),
        );
        assert!(cache.get("h2").is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(cache.get("h2"), None);
        // An expired key is never stored.
        cache.put(
            cache.ticket(),
            "h3",
            &principal(Some(time::Duration::seconds(-1))),
        );
        assert_eq!(cache.get("h3"), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = listening(Duration::from_secs(10));
        for i in 0..MAX_ENTRIES {
            cache.put(cache.ticket(), &format!("h{i}"), &principal(None));
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        cache.put(cache.ticket(), "one more", &principal(None));
        assert_eq!(cache.len(), 1);
        assert!(cache.get("one more").is_some());
    }
}
