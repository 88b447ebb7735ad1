//! When to try again: the retry schedule as data, with jitter and
//! `Retry-After`.
//!
//! The original's table (`[1 m, 5 m, 15 m, 1 h, 4 h, 8 h, 16 h, 24 h]`) was
//! indexed by the *new* attempt count, so its first entry was never used and
//! eight attempts spanned about 53 h 20 m while the docs promised ~72 h
//! (spec §3.4, flaw 6). Here the delay after the `n`-th failed attempt is
//! entry `n - 1`, clamped to the last entry, and the subscriber schedule's
//! entries add up to exactly 72 h:
//!
//! | after failure | 1 | 2 | 3 | 4 | 5 | 6 | 7 |
//! |---|---|---|---|---|---|---|---|
//! | base delay | 1 m | 5 m | 24 m | 1 h 30 m | 6 h | 24 h | 40 h |
//! | attempt 8 no sooner than (cumulative) | 1 m | 6 m | 30 m | 2 h | 8 h | 32 h | **72 h** |
//!
//! Legacy per-agent pushes (spec §3.5, [`RetrySchedule::LEGACY`]) get 7
//! attempts over exactly 24 h — the same first five delays, then 16 h —
//! instead of the original's accidental three POSTs within ~6 minutes
//! (`max_attempts = 2` plus an uncounted inline attempt):
//!
//! | after failure | 1 | 2 | 3 | 4 | 5 | 6 |
//! |---|---|---|---|---|---|---|
//! | base delay | 1 m | 5 m | 24 m | 1 h 30 m | 6 h | 16 h |
//! | attempt 7 no sooner than (cumulative) | 1 m | 6 m | 30 m | 2 h | 8 h | **24 h** |
//!
//! The store enqueues legacy rows with `max_attempts = 7` and keeps them 72 h
//! (`e2a_store::legacy_deliveries::LEGACY_MAX_ATTEMPTS`, `LEGACY_TTL`): even the
//! worst case below (every failure answering a long `Retry-After`, about
//! 48 h) ends well before the row expires.
//!
//! **Jitter is bounded and only ever adds**: each delay is
//! `base + uniform[0, base × 10 %]`. So with `max_attempts = 8` (the schema's
//! default) the eighth and last attempt comes between 72 h and 79 h 12 m
//! after the first (plus the deliverer's pick-up latency): a receiver that is
//! down for less than 72 h still gets the event. Full jitter
//! (`uniform[0, base]`) was rejected because it would break that promise.
//!
//! **`Retry-After`** (seconds or an HTTP-date) can only lengthen a wait: the
//! delay is `max(jittered base, min(Retry-After, RETRY_AFTER_MAX))`, with
//! [`RETRY_AFTER_MAX`] = 6 h. A receiver asking for less than the schedule
//! waits the schedule; one asking for days waits 6 h (and the attempt still
//! counts). Worst case with `Retry-After` on every failure: ~101 h.
//!
//! How many attempts a row gets is the database's `max_attempts` (enforced in
//! SQL); this module only answers "how long until the next one".

use std::time::{Duration, SystemTime};

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;

/// Longest wait a `Retry-After` can ask for; longer requests are cut to this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(6 * HOUR);

/// A retry schedule: base delays indexed by the number of failed attempts,
/// plus an upward jitter bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: &'static [Duration],
    jitter_percent: u32,
}

impl RetrySchedule {
    /// Account-level (subscriber) deliveries: 8 attempts whose base delays
    /// sum to exactly 72 h; jitter adds up to 10 % to each delay.
    pub const SUBSCRIBER: Self = Self {
        delays: &[
            Duration::from_secs(MINUTE),
            Duration::from_secs(5 * MINUTE),
            Duration::from_secs(24 * MINUTE),
            Duration::from_secs(90 * MINUTE),
            Duration::from_secs(6 * HOUR),
            Duration::from_secs(24 * HOUR),
            Duration::from_secs(40 * HOUR),
        ],
        jitter_percent: 10,
    };

    /// Legacy per-agent pushes (`agents.webhook_url`, spec §3.5): 7
    /// attempts whose base delays sum to exactly 24 h; jitter adds up to
    /// 10 % to each delay. A deprecated path: long enough to ride out a
    /// receiver's bad day, shorter than the subscribers' 72 h.
    pub const LEGACY: Self = Self {
        delays: &[
            Duration::from_secs(MINUTE),
            Duration::from_secs(5 * MINUTE),
            Duration::from_secs(24 * MINUTE),
            Duration::from_secs(90 * MINUTE),
            Duration::from_secs(6 * HOUR),
            Duration::from_secs(16 * HOUR),
        ],
        jitter_percent: 10,
    };

    /// A schedule of `delays` (after the 1st, 2nd, … failure; must not be
    /// empty) with up to `jitter_percent` % added to each.
    pub const fn new(delays: &'static [Duration], jitter_percent: u32) -> Self {
        assert!(!delays.is_empty(), "a retry schedule needs a delay");
        Self {
            delays,
            jitter_percent,
        }
    }

    /// The number of attempts this schedule is designed for: one more than
    /// its delays. (The database's `max_attempts` is what is enforced.)
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.delays.len()).map_or(u32::MAX, |n| n.saturating_add(1))
    }

    /// The base delay after `failed_attempts` failures (`1` = after the
    /// first attempt failed), clamped to the last entry; `0` is treated
    /// as `1`.
    pub fn base_delay(&self, failed_attempts: u32) -> Duration {
        let index = usize::try_from(failed_attempts.saturating_sub(1)).unwrap_or(usize::MAX);
        self.delays[index.min(self.delays.len() - 1)]
    }

    /// The sum of the base delays: the least time from the first to the
    /// last of [`attempts`](Self::attempts) attempts.
    pub fn min_span(&self) -> Duration {
        self.delays.iter().sum()
    }

    /// The most time from the first to the last attempt when every delay
    /// draws the maximum jitter and no `Retry-After` lengthens it.
    pub fn max_span(&self) -> Duration {
        self.delays.iter().map(|d| self.max_jittered(*d)).sum()
    }

    fn max_jittered(&self, base: Duration) -> Duration {
        base.saturating_add(jitter_span(base, self.jitter_percent))
    }

    /// The wait after `failed_attempts` failures, with the jitter drawn from
    /// `random` (any `u64`; uniform input gives uniform jitter) and a
    /// received `Retry-After` honoured within [`RETRY_AFTER_MAX`].
    ///
    /// Always in `[base, base + base × jitter %]`, or
    /// `min(retry_after, RETRY_AFTER_MAX)` when that is longer.
    pub fn delay_with(
        &self,
        failed_attempts: u32,
        retry_after: Option<Duration>,
        random: u64,
    ) -> Duration {
        let base = self.base_delay(failed_attempts);
        let span_ms =
            u64::try_from(jitter_span(base, self.jitter_percent).as_millis()).unwrap_or(u64::MAX);
        let extra_ms = if span_ms == u64::MAX {
            random
        } else {
            random % (span_ms + 1)
        };
        let jittered = base.saturating_add(Duration::from_millis(extra_ms));
        match retry_after {
            Some(asked) => jittered.max(asked.min(RETRY_AFTER_MAX)),
            None => jittered,
        }
    }

    /// [`delay_with`](Self::delay_with) drawing the jitter from the system
    /// RNG.
    pub fn delay(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Duration {
        self.delay_with(failed_attempts, retry_after, random_u64())
    }
}

fn jitter_span(base: Duration, percent: u32) -> Duration {
    base.checked_mul(percent).unwrap_or(Duration::MAX) / 100
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut buf = [0u8; 8];
    // The system RNG does not fail on supported platforms; without it the
    // delay is simply the base delay (no jitter), which is still correct.
    match ring::rand::SystemRandom::new().fill(&mut buf) {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => 0,
    }
}

/// Parses a `Retry-After` value: delay-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, also the obsolete RFC 850 and asctime
/// forms) relative to `now`. A date in the past is zero. Anything else is
/// `None`. The result is not clamped: [`RetrySchedule::delay_with`] does
/// that.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is "very long": it is clamped later.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: RetrySchedule = RetrySchedule::SUBSCRIBER;

    #[test]
    fn subscriber_schedule_spans_72_hours_over_8_attempts() {
        assert_eq!(S.attempts(), 8);
        assert_eq!(S.min_span(), Duration::from_secs(72 * HOUR));
        assert_eq!(S.max_span(), Duration::from_secs(72 * HOUR * 11 / 10));
        // Fixed off-by-one: the first retry uses the first entry.
        assert_eq!(S.base_delay(1), Duration::from_secs(60));
        assert_eq!(S.base_delay(0), Duration::from_secs(60));
        // Clamped to the last entry.
        assert_eq!(S.base_delay(7), Duration::from_secs(40 * HOUR));
        assert_eq!(S.base_delay(50), Duration::from_secs(40 * HOUR));
        assert_eq!(S.base_delay(u32::MAX), Duration::from_secs(40 * HOUR));
    }

    #[test]
    fn legacy_schedule_spans_24_hours_over_7_attempts() {
        let l = RetrySchedule::LEGACY;
        assert_eq!(l.attempts(), 7);
        assert_eq!(l.min_span(), Duration::from_secs(24 * HOUR));
        assert_eq!(l.max_span(), Duration::from_secs(24 * HOUR * 11 / 10));
        assert_eq!(l.base_delay(1), Duration::from_secs(60));
        assert_eq!(l.base_delay(6), Duration::from_secs(16 * HOUR));
        assert_eq!(l.base_delay(7), Duration::from_secs(16 * HOUR));
        // Worst case: every failure asks for a longer Retry-After than its
        // delay (capped at 6 h), every delay draws the maximum jitter. The
        // store keeps a legacy row 72 h; the last attempt must come well
        // before that.
        let worst: Duration = (1..l.attempts())
            .map(|failed| l.delay_with(failed, Some(Duration::MAX), u64::MAX))
            .sum();
        assert!(worst < Duration::from_secs(49 * HOUR), "{worst:?}");
    }

    #[test]
    fn jitter_bounds() {
        for failed in 1..=9 {
            let base = S.base_delay(failed);
            let max = base + base / 10;
            assert_eq!(S.delay_with(failed, None, 0), base);
            for random in [1, 7, 1 << 20, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
                let d = S.delay_with(failed, None, random);
                assert!(d >= base && d <= max, "{failed} {random} {d:?}");
            }
            // The top of the range is reachable.
            let span_ms = u64::try_from((base / 10).as_millis()).unwrap();
            assert_eq!(S.delay_with(failed, None, span_ms), max);
            for _ in 0..200 {
                let d = S.delay(failed, None);
                assert!(d >= base && d <= max, "{failed} {d:?}");
            }
        }
    }

    #[test]
    fn retry_after_only_lengthens_and_is_capped() {
        let base = S.base_delay(1);
        // Shorter than the schedule: the schedule wins.
        assert_eq!(S.delay_with(1, Some(Duration::from_secs(1)), 0), base);
        // Longer: honoured.
        assert_eq!(
            S.delay_with(1, Some(Duration::from_secs(2 * HOUR)), 0),
            Duration::from_secs(2 * HOUR)
        );
        // Far longer: capped.
        assert_eq!(
            S.delay_with(1, Some(Duration::from_secs(30 * 24 * HOUR)), 0),
            RETRY_AFTER_MAX
        );
        assert_eq!(
            S.delay_with(1, Some(Duration::MAX), u64::MAX),
            RETRY_AFTER_MAX
        );
        // A long base delay is not shortened by the cap.
        assert_eq!(
            S.delay_with(7, Some(Duration::from_secs(30 * 24 * HOUR)), 0),
            Duration::from_secs(40 * HOUR)
        );
    }

    #[test]
    fn parse_retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let p = |v| parse_retry_after(v, now);
        assert_eq!(p("120"), Some(Duration::from_secs(120)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            p("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            p("Wed, 21 Oct 2015 07:30:00 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            p("Wednesday, 21-Oct-15 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(p("Wed Oct 21 07:28:30 2015"), Some(Duration::from_secs(30)));
        assert_eq!(p("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(p(""), None);
        assert_eq!(p("-5"), None);
        assert_eq!(p("1.5"), None);
        assert_eq!(p("soon"), None);
    }
}
