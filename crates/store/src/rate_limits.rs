//! Rate limits that hold across every API replica (V13): a generic cell
//! rate algorithm (GCRA) per key, evaluated by one statement under the key's
//! row lock.
//!
//! A [`Quota`] of `limit` per `window` admits a burst of `limit` requests
//! and then one every `window / limit`; an idle key refills at that pace.
//! Refused requests consume nothing. The rows live in an UNLOGGED table: a
//! database crash forgets at most one window of usage, and no request pays
//! for WAL.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::error::Result;

/// `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests admitted in a burst, and per `window` on average.
    pub limit: u32,
    /// The window.
    pub window: Duration,
}

impl Quota {
    /// `limit` per minute.
    pub const fn per_minute(limit: u32) -> Self {
        Quota {
            limit,
            window: Duration::from_secs(60),
        }
    }

    /// `limit` per hour.
    pub const fn per_hour(limit: u32) -> Self {
        Quota {
            limit,
            window: Duration::from_secs(3600),
        }
    }

    /// The pace at which an idle key refills: `window / limit`.
    pub fn interval(&self) -> Duration {
        self.window / self.limit.max(1)
    }

    /// The decision for a key whose theoretical arrival time is `tat`
    /// (already moved forward when `allowed`), observed at `now`. Shared by
    /// this module and by in-process limiters, so every limit reports the
    /// same figures.
    pub fn decide(&self, allowed: bool, tat_minus_now: Duration) -> Decision {
        let interval = self.interval().max(Duration::from_nanos(1));
        let ceil_secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        if allowed {
            let headroom = self.window.saturating_sub(tat_minus_now);
            Decision {
                allowed: true,
                limit: self.limit,
                remaining: (headroom.as_nanos() / interval.as_nanos()).min(u128::from(self.limit))
                    as u32,
                reset_after_secs: ceil_secs(tat_minus_now),
                retry_after_secs: 0,
            }
        } else {
            // Admitted again once max(tat, now) + interval - now <= window.
            let wait = (tat_minus_now + interval).saturating_sub(self.window);
            Decision {
                allowed: false,
                limit: self.limit,
                remaining: 0,
                reset_after_secs: ceil_secs(tat_minus_now),
                retry_after_secs: ceil_secs(wait).max(1),
            }
        }
    }
}

/// The outcome of one request against a [`Quota`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed (and was counted).
    pub allowed: bool,
    /// The quota's limit (`RateLimit-Limit`).
    pub limit: u32,
    /// Further requests admitted right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Seconds until the key is back to a full burst (`RateLimit-Reset`).
    pub reset_after_secs: u64,
    /// When refused: seconds until a request is admitted (`Retry-After`).
    pub retry_after_secs: u64,
}

fn pg_interval(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Counts one request for `key` against `quota` unless that would exceed
/// it. Atomic across connections and replicas: the check and the update are
/// one upsert under the key's row lock, so N concurrent callers of a fresh
/// key are admitted exactly `min(N, quota.limit)` times. One round trip when
/// admitted, two when refused.
pub async fn hit(c: &impl GenericClient, key: &str, quota: Quota) -> Result<Decision> {
    let interval = pg_interval(quota.interval());
    let window = pg_interval(quota.window);
    let stmt = c
        .prepare_cached(
            "INSERT INTO rate_limits AS r (key, tat) \
             VALUES ($1, clock_timestamp() + make_interval(secs => $2)) \
             ON CONFLICT (key) DO UPDATE \
               SET tat = GREATEST(r.tat, clock_timestamp()) + make_interval(secs => $2) \
               WHERE GREATEST(r.tat, clock_timestamp()) + make_interval(secs => $2) \
                     <= clock_timestamp() + make_interval(secs => $3) \
             RETURNING tat, clock_timestamp()",
        )
        .await?;
    let (allowed, row) = match c.query_opt(&stmt, &[&key, &interval, &window]).await? {
        Some(row) => (true, row),
        None => {
            let current = c
                .prepare_cached("SELECT tat, clock_timestamp() FROM rate_limits WHERE key = $1")
                .await?;
            (false, c.query_one(&current, &[&key]).await?)
        }
    };
    let tat: OffsetDateTime = row.get(0);
    let now: OffsetDateTime = row.get(1);
    let ahead = Duration::try_from(tat - now).unwrap_or(Duration::ZERO);
    Ok(quota.decide(allowed, ahead))
}

/// Deletes up to `batch` keys whose bucket is full again (their row says
/// nothing a missing row would not). Returns how many were deleted.
pub async fn sweep(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM rate_limits WHERE key IN ( \
               SELECT key FROM rate_limits WHERE tat < clock_timestamp() \
               ORDER BY tat LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_report_the_headers_figures() {
        let q = Quota::per_minute(60);
        // First request of a fresh key: tat = now + 1 s.
        let d = q.decide(true, Duration::from_secs(1));
        assert_eq!((d.remaining, d.reset_after_secs), (59, 1));
        // Burst spent: tat = now + 60 s.
        let d = q.decide(true, Duration::from_secs(60));
        assert_eq!((d.remaining, d.reset_after_secs), (0, 60));
        // Refused with tat = now + 60 s: one interval until the next slot.
        let d = q.decide(false, Duration::from_secs(60));
        assert!(!d.allowed);
        assert_eq!((d.retry_after_secs, d.reset_after_secs), (1, 60));
        // Refused with a slow quota: 10/h means one every 6 minutes.
        let d = Quota::per_hour(10).decide(false, Duration::from_secs(3600));
        assert_eq!(d.retry_after_secs, 360);
    }
}
