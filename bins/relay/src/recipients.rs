//! A short-lived, bounded cache of accepted recipients.
//!
//! Every `RCPT TO` needs the agent behind the address, its owner, the
//! owner's newest signing secret and quota state: one database round trip
//! ([`e2a_store::agents::resolve_recipient`]). A busy sender repeats the same
//! few addresses hundreds of times a second, and that lookup was a tenth of
//! the relay's database work per message. An address found acceptable is
//! therefore answered from memory for a short period, the cache's `ttl`
//! (`E2A_SMTP_RECIPIENT_CACHE_MS`, default one second; `0` turns it off).
//!
//! What staleness this allows, and why it is acceptable:
//! * Only acceptances are cached. An unknown address, an unverified domain,
//!   an account over quota and a failed lookup are looked up again on the
//!   next `RCPT`: a new agent receives mail at once, a raised cap takes
//!   effect at once, and a dictionary attack cannot fill the cache. A
//!   refusal also drops an acceptance still held for the address.
//! * A change that would now refuse a cached address (agent deleted,
//!   domain unverified, cap reached or lowered, DMARC opt-in toggled, new
//!   signing secret) is seen at most `ttl` later. A session already has
//!   this window without any cache: `RCPT` is answered before `DATA`, which
//!   may come seconds later. A message to an agent deleted in between fails
//!   its foreign key and is answered `451`, never stored without an owner.
//!   A cap is overshot by what each relay accepts within `ttl` at most.
//!   The period runs from the start of the lookup that accepted, so a slow
//!   lookup does not lengthen it.
//! * Bounded: at most [`MAX_ENTRIES`] addresses; when full, expired
//!   entries are dropped, and if none has expired the new one is not cached.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use e2a_store::agents::Recipient;

/// Most addresses held at once.
pub const MAX_ENTRIES: usize = 10_000;

/// See the module docs.
#[derive(Debug)]
pub struct RecipientCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Recipient)>>,
}

impl RecipientCache {
    /// A cache keeping acceptances for `ttl` (zero: nothing is cached).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The acceptance of `address` (normalised) whose lookup began less
    /// than `ttl` ago, if any.
    pub fn get(&self, address: &str) -> Option<Recipient> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(address)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, r)| r.clone())
    }

    /// Remembers that `address` was accepted as `recipient` by a lookup
    /// that began at `looked_up`: the entry expires `ttl` after
    /// that, so a slow lookup cannot stretch the staleness bound. Refusals
    /// (over quota) are never kept.
    pub fn put(&self, address: &str, recipient: &Recipient, looked_up: Instant) {
        if self.ttl.is_zero() || recipient.over_quota.is_some() {
            return;
        }
        let now = Instant::now();
        if now.duration_since(looked_up) >= self.ttl {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(address) {
            entries.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(address.to_owned(), (looked_up, recipient.clone()));
    }

    /// Drops what is known about `address`: a lookup refused it (unknown,
    /// unverified, over quota), so an acceptance still held must not be
    /// reused.
    pub fn forget(&self, address: &str) {
        if self.ttl.is_zero() {
            return;
        }
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(address);
    }

    /// How many addresses are held (expired or not).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use e2a_store::{
        agents::{AgentMode, Quota},
        ids::UserId,
    };

    use super::*;

    fn recipient(quota: Option<Quota>) -> Recipient {
        Recipient {
            agent_id: "bot@example.com".into(),
            user_id: UserId::new(),
            agent_mode: AgentMode::Local,
            reject_dmarc_failures: false,
            legacy_push: false,
            over_quota: quota,
            signing_secret: None,
        }
    }

    #[test]
    fn an_acceptance_is_reused_until_it_expires() {
        let cache = RecipientCache::new(Duration::from_millis(50));
        let r = recipient(None);
        assert_eq!(cache.get("bot@example.com"), None);
        cache.put("bot@example.com", &r, Instant::now());
        assert_eq!(cache.get("bot@example.com"), Some(r));
        assert_eq!(cache.get("other@example.com"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("bot@example.com"), None, "expired");
    }

    #[test]
    fn refusals_and_a_zero_ttl_keep_nothing() {
        let cache = RecipientCache::new(Duration::from_secs(60));
        cache.put(
            "bot@example.com",
            &recipient(Some(Quota::Storage)),
            Instant::now(),
        );
        assert_eq!(cache.get("bot@example.com"), None, "over quota: not kept");
        let off = RecipientCache::new(Duration::ZERO);
        off.put("bot@example.com", &recipient(None), Instant::now());
        assert!(off.is_empty());
        assert_eq!(off.get("bot@example.com"), None);
    }

    #[test]
    fn the_period_runs_from_the_lookup_and_a_refusal_forgets() {
        let cache = RecipientCache::new(Duration::from_millis(100));
        let r = recipient(None);
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(60));
        cache.put("bot@example.com", &r, started);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            cache.get("bot@example.com"),
            None,
            "100 ms after the lookup began"
        );
        cache.forget("bot@example.com");
        assert!(cache.is_empty());
        let too_slow = Instant::now();
        std::thread::sleep(Duration::from_millis(110));
        cache.put("bot@example.com", &r, too_slow);
        assert!(
            cache.is_empty(),
            "a lookup slower than the period is not kept"
        );
        cache.put("bot@example.com", &r, Instant::now());
        assert_eq!(cache.get("bot@example.com"), Some(r.clone()));
        cache.forget("bot@example.com");
        assert_eq!(cache.get("bot@example.com"), None, "a refusal drops it");
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = RecipientCache::new(Duration::from_secs(60));
        let r = recipient(None);
        for i in 0..MAX_ENTRIES + 100 {
            cache.put(&format!("a{i}@example.com"), &r, Instant::now());
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        assert_eq!(cache.get("a0@example.com"), Some(r.clone()), "kept");
        assert_eq!(
            cache.get(&format!("a{MAX_ENTRIES}@example.com")),
            None,
            "not cached when full"
        );
        // Once entries expire, room is made.
        let short = RecipientCache::new(Duration::from_millis(20));
        for i in 0..MAX_ENTRIES {
            short.put(&format!("a{i}@example.com"), &r, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(30));
        short.put("new@example.com", &r, Instant::now());
        assert_eq!(short.len(), 1);
        assert_eq!(short.get("new@example.com"), Some(r));
    }
}
