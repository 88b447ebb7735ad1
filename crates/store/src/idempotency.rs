//! Idempotency keys (`idempotency_keys`, spec §3.3): a request carrying a
//! key runs its effect once; a repeat gets the first answer back.
//!
//! A key is scoped to its user and stored as `u:` + the client's
//! `Idempotency-Key` header ([`Key::client`], at most
//! [`MAX_CLIENT_KEY_LEN`] characters — the original declared the limit but
//! never enforced it on `/v1`, flaw 25) or `s:` + a key the server mints
//! ([`Key::server`], e.g. `s:replay:<event_id>:<webhook_id>` for a
//! redelivery). Each claim carries a fingerprint of the request
//! ([`request_hash`]: sha256 of the route and the raw body).
//!
//! The life of a key:
//!
//! 1. [`claim`] decides, in one upsert, between running the request
//!    ([`Claim::Acquired`], with a [`Ticket`]) and not running it: another
//!    claim of the key is still working ([`Claim::InFlight`], HTTP 409
//!    `idempotency_in_flight`), the key was used for a different request
//!    ([`Claim::Reuse`], 422 `idempotency_key_reuse`), or the request was
//!    already answered ([`Claim::Replay`] with the stored status and body).
//! 2. On success the caller stores its answer with [`complete`]; on failure
//!    it [`release`]s the key, so failed requests are never cached and the
//!    key is free again at once.
//! 3. A completed key answers replays for its [`Key::replay_window`] (24 h
//!    for client keys, measured from the claim); after that a claim takes
//!    it over as new, whether or not [`sweep`] has deleted it yet.
//!
//! **Composes with the caller's transaction.** Every function takes
//! `&impl GenericClient`. Run [`claim`], the effect and [`complete`] in one
//! transaction and the effect and its record commit together: a concurrent
//! claim of the same key waits on the uncommitted row and then sees the
//! completed answer (a replay, never a second run), and a rollback takes
//! the claim with it. Run them on a pooled client instead (autocommit) when
//! the effect involves remote I/O, which no transaction may be held across;
//! then a claimer that died leaves its key `in_progress` until the
//! [`STALE_AFTER`] takeover.
//!
//! **Fenced.** A [`Ticket`] names the claim it came from (the row's claim
//! time), so [`complete`] and [`release`] of a claimer that lost its key to
//! a stale takeover change nothing.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;

use crate::{
    error::{Result, StoreError},
    ids::UserId,
    secret,
};

/// Longest client `Idempotency-Key`, in characters.
pub const MAX_CLIENT_KEY_LEN: usize = 255;
/// An `in_progress` claim older than this may be taken over: its claimer is
/// presumed dead (spec: 5 minutes).
pub const STALE_AFTER: time::Duration = time::Duration::minutes(5);
/// How long a completed client key answers replays, from its claim (spec:
/// 24 hours); also how old any key must be before [`sweep`] deletes it.
pub const TTL: time::Duration = time::Duration::hours(24);
/// The content type of every stored answer.
pub const CONTENT_TYPE: &str = "application/json";

/// How many times [`claim`] retries when the key it conflicted with is gone
/// before it could be read (released or swept in between).
const CLAIM_ROUNDS: usize = 3;

/// First key of the transaction-scoped advisory lock a client key's claim
/// takes (`pg_try_advisory_xact_lock(int4, int4)`): `"idem"` as big-endian
/// bytes; the second key is `hashtext(user_id || '/' || key)`.
const CLAIM_LOCK_CLASS: i32 = 0x6964_656d;

/// A key as stored (`u:…` or `s:…`), with how long its answer is replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    stored: String,
    replay_window: time::Duration,
}

/// Why a client's `Idempotency-Key` is refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is present but empty.
    #[error("Idempotency-Key must not be empty")]
    Empty,
    /// Longer than [`MAX_CLIENT_KEY_LEN`] characters.
    #[error("Idempotency-Key must be at most {max} characters (got {len})")]
    TooLong {
        /// Its length in characters.
        len: usize,
        /// [`MAX_CLIENT_KEY_LEN`].
        max: usize,
    },
    /// It contains a control character.
    #[error("Idempotency-Key must not contain control characters")]
    ControlCharacter,
}

impl Key {
    /// A client's `Idempotency-Key` header value: 1 to
    /// [`MAX_CLIENT_KEY_LEN`] characters, no control characters; stored as
    /// `u:` + the value, replayed for [`TTL`].
    pub fn client(header: &str) -> Result<Key, KeyError> {
        let len = header.chars().count();
        if len == 0 {
            return Err(KeyError::Empty);
        }
        if len > MAX_CLIENT_KEY_LEN {
            return Err(KeyError::TooLong {
                len,
                max: MAX_CLIENT_KEY_LEN,
            });
        }
        if header.chars().any(char::is_control) {
            return Err(KeyError::ControlCharacter);
        }
        Ok(Key {
            stored: format!("u:{header}"),
            replay_window: TTL,
        })
    }

    /// A key minted by the server (`s:` + `name`), replayed for
    /// `replay_window` (at most [`TTL`]: the sweep deletes it then).
    /// `name` is built by the server from ids, never from client text.
    pub fn server(name: &str, replay_window: time::Duration) -> Key {
        Key {
            stored: format!("s:{name}"),
            replay_window: replay_window.min(TTL),
        }
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.stored
    }

    /// How long after its claim a completed key answers replays.
    pub fn replay_window(&self) -> time::Duration {
        self.replay_window
    }
}

/// The fingerprint of a request: lowercase hex sha256 of `route`, a
/// newline and the raw body (spec §3.3; route e.g.
/// `/v1/agents/<agent_id>/messages`, `/v1/events/redeliver`).
pub fn request_hash(route: &str, body: &[u8]) -> String {
    let mut input = Vec::with_capacity(route.len() + 1 + body.len());
    input.extend_from_slice(route.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(body);
    secret::sha256_hex(&input)
}

/// Proof of an acquired key: [`complete`] or [`release`] it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    user_id: UserId,
    key: String,
    claimed_at: OffsetDateTime,
}

impl Ticket {
    /// When this claim was made (the row's `created_at`).
    pub fn claimed_at(&self) -> OffsetDateTime {
        self.claimed_at
    }
}

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Its HTTP status.
    pub status: u16,
    /// Always [`CONTENT_TYPE`].
    pub content_type: String,
    /// Its body, as first sent.
    pub body: Vec<u8>,
}

/// What [`claim`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Run the request, then [`complete`] or [`release`] the ticket. Either
    /// the key was new (or past its replay window), or a claim older than
    /// [`STALE_AFTER`] was taken over.
    Acquired(Ticket),
    /// Another claim of this key is working on it (HTTP 409
    /// `idempotency_in_flight`).
    InFlight,
    /// The key already answered a different request (HTTP 422
    /// `idempotency_key_reuse`).
    Reuse,
    /// The same request was answered: send this again, run nothing.
    Replay(Response),
}

/// Claims `key` of `user_id` for the request fingerprinted `request_hash`
/// ([`request_hash`]; `request_path` is kept for diagnosis only).
///
/// One upsert decides: it inserts an `in_progress` row, or takes over an
/// existing one that is `in_progress` for longer than [`STALE_AFTER`] or
/// completed longer ago than the key's replay window — [`Claim::Acquired`].
/// Otherwise a read of the row (which the upsert locked, when in a
/// transaction) names the outcome: `in_progress` → [`Claim::InFlight`];
/// completed for another fingerprint → [`Claim::Reuse`]; completed for this
/// one → [`Claim::Replay`]. Of any number of concurrent claims of one key,
/// exactly one is acquired.
///
/// In the caller's transaction (see the module doc), a claim of a
/// **client** key that another open transaction holds does not wait: it is
/// [`Claim::InFlight`] at once (spec §3.3's 409 — and a flood of
/// duplicates cannot pin connections on a row lock), through a
/// transaction-scoped advisory lock taken first (two keys whose 32-bit
/// hashes collide may see a spurious 409 while both are in flight). A
/// claim of a **server** key waits for that transaction to end, then
/// replays its answer. A claim that is not acquired leaves the row locked
/// until the caller's transaction ends; end it before doing anything slow.
pub async fn claim(
    c: &impl GenericClient,
    user_id: &UserId,
    key: &Key,
    request_path: &str,
    request_hash: &str,
) -> Result<Claim> {
    let upsert = c
        .prepare_cached(
            "INSERT INTO idempotency_keys \
               (user_id, key, request_path, request_body_hash, status, created_at, completed_at) \
             VALUES ($1, $2, $3, $4, 'in_progress', now(), NULL) \
             ON CONFLICT (user_id, key) DO UPDATE SET \
               request_path = EXCLUDED.request_path, \
               request_body_hash = EXCLUDED.request_body_hash, \
               response_status = 0, response_content_type = '', response_body = ''::bytea, \
               status = 'in_progress', created_at = now(), completed_at = NULL \
             WHERE (idempotency_keys.status = 'in_progress' \
                    AND idempotency_keys.created_at < now() - make_interval(secs => $5)) \
                OR (idempotency_keys.status = 'completed' \
                    AND idempotency_keys.created_at < now() - make_interval(secs => $6)) \
             RETURNING created_at",
        )
        .await?;
    let read = c
        .prepare_cached(
            "SELECT status, request_body_hash, response_status, response_content_type, response_body \
             FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .await?;
    if key.stored.starts_with("u:") {
        let lock = c
            .prepare_cached("SELECT pg_try_advisory_xact_lock($1, hashtext($2 || '/' || $3))")
            .await?;
        let locked: bool = c
            .query_one(&lock, &[&CLAIM_LOCK_CLASS, user_id, &key.stored])
            .await?
            .get(0);
        if !locked {
            return Ok(Claim::InFlight);
        }
    }
    let stale = STALE_AFTER.as_seconds_f64();
    let window = key.replay_window.as_seconds_f64();
    for _ in 0..CLAIM_ROUNDS {
        if let Some(row) = c
            .query_opt(
                &upsert,
                &[
                    user_id,
                    &key.stored,
                    &request_path,
                    &request_hash,
                    &stale,
                    &window,
                ],
            )
            .await?
        {
            return Ok(Claim::Acquired(Ticket {
                user_id: user_id.clone(),
                key: key.stored.clone(),
                claimed_at: row.get(0),
            }));
        }
        // Outside a transaction the row may have been released or swept
        // since the upsert saw it: then claim again.
        let Some(row) = c.query_opt(&read, &[user_id, &key.stored]).await? else {
            continue;
        };
        return Ok(held_elsewhere(&row, request_hash));
    }
    // The key kept appearing and disappearing under us: some claim of it
    // is active right now.
    Ok(Claim::InFlight)
}

/// What a [`claim`] of `key` would decide right now, without claiming:
/// `None` when it would be acquired, else [`Claim::InFlight`],
/// [`Claim::Reuse`] or [`Claim::Replay`]. One read, no lock. For a caller
/// that must answer replays before its own checks (rate limits, caps: the
/// original's flaw 25) but runs those checks outside the transaction that
/// claims: the claim stays the authority and may still decide otherwise.
pub async fn peek(
    c: &impl GenericClient,
    user_id: &UserId,
    key: &Key,
    request_hash: &str,
) -> Result<Option<Claim>> {
    let stmt = c
        .prepare_cached(
            "SELECT status, request_body_hash, response_status, response_content_type, response_body, \
                    created_at < now() - make_interval(secs => $3) AS stale, \
                    created_at < now() - make_interval(secs => $4) AS expired \
               FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .await?;
    let Some(row) = c
        .query_opt(
            &stmt,
            &[
                user_id,
                &key.stored,
                &STALE_AFTER.as_seconds_f64(),
                &key.replay_window.as_seconds_f64(),
            ],
        )
        .await?
    else {
        return Ok(None);
    };
    let completed = row.get::<_, &str>(0) == "completed";
    let (stale, expired): (bool, bool) = (row.get(5), row.get(6));
    Ok(match (completed, stale, expired) {
        // A claim would take these over.
        (true, _, true) | (false, true, _) => None,
        _ => Some(held_elsewhere(&row, request_hash)),
    })
}

/// What a key's row (columns: status, request hash, response status,
/// content type, body) means for a request with `request_hash` that cannot
/// take it over: [`Claim::Reuse`] or [`Claim::Replay`] for a completed
/// key, else [`Claim::InFlight`].
fn held_elsewhere(row: &tokio_postgres::Row, request_hash: &str) -> Claim {
    match row.get::<_, &str>(0) {
        "completed" if row.get::<_, &str>(1) != request_hash => Claim::Reuse,
        "completed" => Claim::Replay(Response {
            status: u16::try_from(row.get::<_, i32>(2)).unwrap_or(200),
            content_type: row.get(3),
            body: row.get(4),
        }),
        _ => Claim::InFlight,
    }
}

/// Stores the answer of the request `ticket` was acquired for (`status`
/// 100–599, `body` JSON) and marks the key completed; from now on claims
/// of it replay this answer. Guarded: returns `false` and changes nothing
/// when the claim is no longer this ticket's (taken over after
/// [`STALE_AFTER`], released, or swept). One statement.
pub async fn complete(
    c: &impl GenericClient,
    ticket: &Ticket,
    status: u16,
    body: &[u8],
) -> Result<bool> {
    if !(100..=599).contains(&status) {
        return Err(StoreError::Invalid(format!(
            "an HTTP status is 100-599, not {status}"
        )));
    }
    let stmt = c
        .prepare_cached(
            "UPDATE idempotency_keys SET status = 'completed', response_status = $4, \
               response_content_type = $5, response_body = $6, completed_at = now() \
             WHERE user_id = $1 AND key = $2 AND created_at = $3 AND status = 'in_progress'",
        )
        .await?;
    let n = c
        .execute(
            &stmt,
            &[
                &ticket.user_id,
                &ticket.key,
                &ticket.claimed_at,
                &i32::from(status),
                &CONTENT_TYPE,
                &body,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Gives the key of `ticket` up after a failed request: its `in_progress`
/// row is deleted, so the failure is not cached and the key can be used
/// again at once. Guarded like [`complete`] (returns `false` when the claim
/// is no longer this ticket's). One statement.
pub async fn release(c: &impl GenericClient, ticket: &Ticket) -> Result<bool> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM idempotency_keys \
             WHERE user_id = $1 AND key = $2 AND created_at = $3 AND status = 'in_progress'",
        )
        .await?;
    let n = c
        .execute(&stmt, &[&ticket.user_id, &ticket.key, &ticket.claimed_at])
        .await?;
    Ok(n == 1)
}

/// Deletes up to `batch` keys claimed more than [`TTL`] ago; returns how
/// many. Completed keys are past every replay window by then; an
/// `in_progress` key that old belongs to a claimer long dead (the original
/// never swept those, so they piled up) and a claim would take it over
/// anyway. Rows are taken oldest first with `FOR UPDATE SKIP LOCKED`
/// (janitor replicas split the work; a key being claimed is skipped).
/// One statement, on `idempotency_keys_created_at_idx`.
pub async fn sweep(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM idempotency_keys WHERE (user_id, key) IN ( \
               SELECT user_id, key FROM idempotency_keys \
                WHERE created_at < now() - make_interval(secs => $2) \
                ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch, &TTL.as_seconds_f64()]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_bounded_and_prefixed() {
        assert_eq!(Key::client("abc").unwrap().as_str(), "u:abc");
        assert_eq!(Key::client("abc").unwrap().replay_window(), TTL);
        let max = "é".repeat(MAX_CLIENT_KEY_LEN);
        assert_eq!(Key::client(&max).unwrap().as_str(), format!("u:{max}"));
        assert_eq!(
            Key::client(&"k".repeat(256)),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        assert_eq!(Key::client(""), Err(KeyError::Empty));
        assert_eq!(Key::client("a\nb"), Err(KeyError::ControlCharacter));
        assert_eq!(Key::client("a\0b"), Err(KeyError::ControlCharacter));
    }

    #[test]
    fn server_keys_are_prefixed_and_windows_capped() {
        let k = Key::server("replay:evt_1:wh_2", time::Duration::minutes(5));
        assert_eq!(k.as_str(), "s:replay:evt_1:wh_2");
        assert_eq!(k.replay_window(), time::Duration::minutes(5));
        assert_eq!(
            Key::server("x", time::Duration::days(7)).replay_window(),
            TTL
        );
        // Client and server keys never collide.
        assert_ne!(
            Key::client("s:x").unwrap().as_str(),
            Key::server("x", TTL).as_str()
        );
    }

    #[test]
    fn request_hash_is_sha256_of_route_newline_body() {
        assert_eq!(
            request_hash("/v1/events/redeliver", b""),
            secret::sha256_hex(b"/v1/events/redeliver\n")
        );
        assert_ne!(request_hash("/a", b"b"), request_hash("/a\nb", b""));
        assert_eq!(request_hash("/a", b"{}").len(), 64);
    }
}
