//! Magic-link tokens of human-in-the-loop review (`approval_tokens`, V3).
//!
//! The reviewer's notification mail carries an approve and a reject link.
//! Each link's token is `e2a_apv_` + 64 lowercase hex of fresh randomness
//! (256 bits, URL-safe as it stands). Only its SHA-256 ([`hash`]) is stored,
//! so a database leak yields no usable link, and the plaintext exists only
//! in the mail. A token is bound to **one message and one action**, is
//! **single-use** (`used_at`) and stops working at `expires_at` — the
//! hold's expiry plus [`GRACE`] (see [`expiry_for`]).
//!
//! This replaces the original's stateless HMAC tokens (§4.6), which could
//! be replayed until they expired and could not be revoked.
//!
//! The life of a token: [`mint`] inside the hold transaction; [`peek`] for
//! the confirmation page a `GET` renders (read-only: mail scanners fetch
//! every link); [`consume`] inside the decision's transaction when the
//! page's form is posted, so a decision that rolls back leaves the token
//! unused; [`revoke_for_message`] when the message is decided by any path;
//! [`delete_expired`] from the janitor.

use deadpool_postgres::GenericClient;
use time::{Duration, OffsetDateTime};

use crate::{
    error::{Result, StoreError, missing_parent_is_not_found},
    ids::{MessageId, UserId},
    secret,
};

/// Prefix of every magic-link token.
pub const TOKEN_PREFIX: &str = "e2a_apv_";
/// How long a link outlives the hold it belongs to (the original's
/// `tokenGraceAfterTTL`): a reviewer who opens the mail just as the hold
/// expires gets a clear answer rather than an unknown link.
pub const GRACE: Duration = Duration::minutes(10);

/// What a token lets its bearer do to its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Release the held message.
    Approve,
    /// Refuse the held message.
    Reject,
}

impl Action {
    /// The stored value (`approve` | `reject`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Reject => "reject",
        }
    }

    /// The action named by `s` (exactly `approve` or `reject`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "approve" => Some(Action::Approve),
            "reject" => Some(Action::Reject),
            _ => None,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The token expiry for a hold that expires at `approval_expires_at`:
/// [`GRACE`] later.
pub fn expiry_for(approval_expires_at: OffsetDateTime) -> OffsetDateTime {
    approval_expires_at + GRACE
}

/// The stored form of `token`: lowercase hex SHA-256 of its bytes (64
/// characters), whatever the token looks like.
pub fn hash(token: &str) -> String {
    secret::sha256_hex(token.as_bytes())
}

/// True when `token` has the shape [`mint`] produces; anything else is
/// answered without a query.
fn well_formed(token: &str) -> bool {
    token
        .strip_prefix(TOKEN_PREFIX)
        .is_some_and(|hex| secret::is_lower_hex(hex, 64))
}

/// Mints a token for `action` on `message_id` (owned by `user_id`) that
/// works until `expires_at` (normally [`expiry_for`] the hold's expiry) and
/// returns the plaintext — the only copy, for the link; never log it.
///
/// Stores only the token's [`hash`], in the caller's transaction (the hold
/// transaction), so a hold that rolls back leaves no token behind.
/// [`StoreError::NotFound`] when the message does not exist for that user.
pub async fn mint(
    c: &impl GenericClient,
    user_id: &UserId,
    message_id: &MessageId,
    action: Action,
    expires_at: OffsetDateTime,
) -> Result<String> {
    let token = format!("{TOKEN_PREFIX}{}", secret::random_hex::<32>());
    let stmt = c
        .prepare_cached(
            "INSERT INTO approval_tokens (token_hash, user_id, message_id, action, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .await?;
    c.execute(
        &stmt,
        &[
            &hash(&token),
            user_id,
            message_id,
            &action.as_str(),
            &expires_at,
        ],
    )
    .await
    .map_err(missing_parent_is_not_found)?;
    Ok(token)
}

/// What a token is worth right now, as [`peek`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// Unused and unexpired: the bearer may post `action` on `message_id`.
    Valid {
        /// The message's owner.
        user_id: UserId,
        /// The message the token is bound to.
        message_id: MessageId,
        /// The one action the token allows.
        action: Action,
        /// When the token stops working.
        expires_at: OffsetDateTime,
    },
    /// It was used, or its message was decided by another path.
    Used,
    /// Never used, but past its expiry.
    Expired,
    /// Malformed, never minted, or already swept.
    Unknown,
}

/// The state of `token`, for the confirmation page of a `GET`.
///
/// Read-only: one `SELECT`, never a write, so a mail scanner or link
/// preview that fetches the link changes nothing. A malformed token is
/// [`TokenState::Unknown`] without a query. Expiry is judged by the
/// database clock, like [`consume`]. The page must still [`consume`] on
/// `POST`: a `Valid` answer here promises nothing about later.
pub async fn peek(c: &impl GenericClient, token: &str) -> Result<TokenState> {
    if !well_formed(token) {
        return Ok(TokenState::Unknown);
    }
    let stmt = c
        .prepare_cached(
            "SELECT user_id, message_id, action, expires_at, used_at IS NOT NULL, \
                    expires_at <= now() \
               FROM approval_tokens WHERE token_hash = $1",
        )
        .await?;
    let Some(row) = c.query_opt(&stmt, &[&hash(token)]).await? else {
        return Ok(TokenState::Unknown);
    };
    if row.get::<_, bool>(4) {
        return Ok(TokenState::Used);
    }
    if row.get::<_, bool>(5) {
        return Ok(TokenState::Expired);
    }
    Ok(TokenState::Valid {
        user_id: row.get(0),
        message_id: row.get(1),
        action: stored_action(row.get(2))?,
        expires_at: row.get(3),
    })
}

fn stored_action(s: &str) -> Result<Action> {
    // The CHECK constraint allows nothing else; a mismatch is a schema bug.
    Action::parse(s).ok_or_else(|| StoreError::Invalid(format!("stored action {s:?}")))
}

/// A token [`consume`] accepted: the decision may go ahead on this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// The message's owner (the reviewer a magic-link decision records).
    pub user_id: UserId,
    /// The message the token was bound to.
    pub message_id: MessageId,
}

/// Why [`consume`] refused a token.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// Malformed, never minted, or already swept (a 400 page).
    #[error("unknown approval token")]
    Unknown,
    /// A real token, but for the other action (a 400 page); it stays usable
    /// for its own action.
    #[error("approval token is for another action")]
    WrongAction,
    /// Already used, or its message was decided by another path (a 410
    /// page).
    #[error("approval token already used")]
    Used,
    /// Past its expiry (a 410 page).
    #[error("approval token expired")]
    Expired,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Uses `token` for `action`: marks it used and returns its message.
///
/// One guarded `UPDATE … WHERE token_hash AND action AND used_at IS NULL
/// AND expires_at > now()`, so of two concurrent posts exactly one wins
/// (the other waits on the row lock, then sees it used). Run it inside the
/// decision's transaction: if the decision rolls back, so does the use and
/// the link still works. When nothing matched, a follow-up read tells
/// [`ConsumeError::Unknown`], [`ConsumeError::WrongAction`],
/// [`ConsumeError::Used`] and [`ConsumeError::Expired`] apart, in that
/// order of precedence (a token posted to the wrong action is refused
/// there whatever its state). A malformed token is `Unknown` without a
/// query.
pub async fn consume(
    c: &impl GenericClient,
    token: &str,
    action: Action,
) -> Result<Consumed, ConsumeError> {
    if !well_formed(token) {
        return Err(ConsumeError::Unknown);
    }
    let token_hash = hash(token);
    let stmt = c
        .prepare_cached(
            "UPDATE approval_tokens SET used_at = now() \
              WHERE token_hash = $1 AND action = $2 AND used_at IS NULL AND expires_at > now() \
              RETURNING user_id, message_id",
        )
        .await
        .map_err(StoreError::from)?;
    if let Some(row) = c
        .query_opt(&stmt, &[&token_hash, &action.as_str()])
        .await
        .map_err(StoreError::from)?
    {
        return Ok(Consumed {
            user_id: row.get(0),
            message_id: row.get(1),
        });
    }
    let stmt = c
        .prepare_cached(
            "SELECT action, used_at IS NOT NULL FROM approval_tokens WHERE token_hash = $1",
        )
        .await
        .map_err(StoreError::from)?;
    let row = c
        .query_opt(&stmt, &[&token_hash])
        .await
        .map_err(StoreError::from)?
        .ok_or(ConsumeError::Unknown)?;
    if row.get::<_, &str>(0) != action.as_str() {
        Err(ConsumeError::WrongAction)
    } else if row.get::<_, bool>(1) {
        Err(ConsumeError::Used)
    } else {
        Err(ConsumeError::Expired)
    }
}

/// Marks every unused token of the message used, so no link of a decided
/// message works again (whichever path decided it: the other link, the
/// API, the dashboard or expiry). Run it in the decision's transaction.
/// Idempotent; scoped to the owner; returns how many tokens it revoked.
pub async fn revoke_for_message(
    c: &impl GenericClient,
    user_id: &UserId,
    message_id: &MessageId,
) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "UPDATE approval_tokens SET used_at = now() \
              WHERE message_id = $1 AND user_id = $2 AND used_at IS NULL",
        )
        .await?;
    Ok(c.execute(&stmt, &[message_id, user_id]).await?)
}

/// Deletes up to `batch` tokens that expired more than `older_than` ago
/// (used or not) and returns how many. Keeping them a while after expiry
/// lets a late click say "expired" rather than "unknown link".
///
/// Oldest first, with `FOR UPDATE SKIP LOCKED`, so janitor replicas split
/// the work and never wait on a token being consumed. One statement, on
/// `approval_tokens_expires_at_idx`. A negative `older_than` counts as 0.
pub async fn delete_expired(
    c: &impl GenericClient,
    older_than: Duration,
    batch: i64,
) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "DELETE FROM approval_tokens WHERE token_hash IN ( \
               SELECT token_hash FROM approval_tokens \
                WHERE expires_at < now() - make_interval(secs => $2) \
                ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    let older_than = older_than.max(Duration::ZERO).as_seconds_f64();
    Ok(c.execute(&stmt, &[&batch, &older_than]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_round_trip_and_nothing_else_parses() {
        for a in [Action::Approve, Action::Reject] {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("Approve"), None);
        assert_eq!(Action::parse(""), None);
    }

    #[test]
    fn hash_is_sha256_hex_of_the_token() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn only_the_minted_shape_is_well_formed() {
        let hex = "0123456789abcdef".repeat(4);
        assert!(well_formed(&format!("{TOKEN_PREFIX}{hex}")));
        assert!(!well_formed(&hex));
        assert!(!well_formed(&format!(
            "{TOKEN_PREFIX}{}",
            hex.to_uppercase()
        )));
        assert!(!well_formed(&format!("{TOKEN_PREFIX}{hex}0")));
        assert!(!well_formed(&format!("e2s_{hex}")));
        assert!(!well_formed(""));
    }

    #[test]
    fn the_grace_follows_the_hold() {
        let t = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(expiry_for(t) - t, Duration::minutes(10));
    }
}
