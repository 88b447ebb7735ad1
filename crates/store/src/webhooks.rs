//! Account webhooks (`webhooks`, `wh_…`): where a user's events are POSTed,
//! which event types and which agents, conversations and labels they
//! follow, and the `whsec_…` secret the deliveries are signed with.
//!
//! * **Validation is here** and shared with the API: event types against
//!   [`events::CATALOG`], filter caps and formats, the description. The
//!   API adds the URL policy (`e2a_webhook::check_url`), which depends on
//!   the deployment; the store itself only refuses an empty or over-long
//!   URL (flaw 31: an empty URL was a 500 on the column's CHECK).
//! * **Filters are typed columns** (`filter_agent_ids`,
//!   `filter_conversation_ids`, `filter_labels`, V16) so the fan-out matches
//!   in SQL; AND across kinds, OR within one, empty = no constraint.
//! * **The cap holds under concurrency**: [`create`] counts and inserts
//!   under the user's row lock (`users::lock`).
//! * **The re-enable cooldown is one statement** (flaw 24): [`update`]'s
//!   `UPDATE` refuses `enabled: true` within [`REENABLE_COOLDOWN`] of
//!   `auto_disabled_at` in its own `WHERE`, so no check-then-write window.
//! * **Rotation keeps a valid previous secret** (flaw 23): see [`rotate`].
//! * **Secrets never leave by accident**: [`Webhook`] carries none; the
//!   types that do ([`Created`], [`Rotated`], [`SigningKeys`]) redact them
//!   in `Debug`. Secrets are stored as they are: they are HMAC keys.

use std::collections::HashSet;

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{
    address::EmailAddress,
    error::{Result, StoreError},
    events,
    ids::{UserId, WebhookId},
    messages, secret, users,
};

/// Longest URL (the column's CHECK).
pub const MAX_URL_LEN: usize = 2048;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 200;
/// Most values in one filter list (spec §8: 50/50/50).
pub const MAX_FILTER_VALUES: usize = 50;
/// Longest agent or conversation id in a filter (labels: 64).
pub const MAX_FILTER_VALUE_LEN: usize = 200;
/// Prefix of a webhook signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// How long a rotated-out secret keeps signing (spec §3.7).
pub const PREVIOUS_SECRET_GRACE: time::Duration = time::Duration::hours(24);
/// How long after an auto-disable a re-enable is refused (spec §3.6).
pub const REENABLE_COOLDOWN: time::Duration = time::Duration::minutes(5);

/// A webhook's filters. Empty lists constrain nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// Agent addresses (normalised; agents of the owner when written).
    pub agent_ids: Vec<String>,
    /// Conversation ids (`[A-Za-z0-9_-]{1,200}`).
    pub conversation_ids: Vec<String>,
    /// Labels (`[a-z0-9:_-]{1,64}`; the `e2a:` prefix is allowed).
    pub labels: Vec<String>,
}

/// A webhook as the owner may see it: no secret in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    /// `wh_…`
    pub id: WebhookId,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Free text, at most [`MAX_DESCRIPTION_LEN`] characters, one line.
    pub description: String,
    /// Subscribed event types (from [`events::CATALOG`]), in the order given.
    pub events: Vec<String>,
    /// Filters.
    pub filters: Filters,
    /// False when disabled by the owner or automatically.
    pub enabled: bool,
    /// When the deliverer last disabled it for failing; cleared by a
    /// re-enable.
    pub auto_disabled_at: Option<OffsetDateTime>,
    /// Terminal delivery failures since the last success (auto-disable
    /// input, kept by the deliverer).
    pub consecutive_failures: i32,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last successful delivery.
    pub last_delivered_at: Option<OffsetDateTime>,
    /// While a rotated-out secret still signs: when it stops.
    pub previous_secret_expires_at: Option<OffsetDateTime>,
}

/// What [`create`] stores. Validated by [`create`] itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewWebhook {
    /// Target URL (the API checks it against its URL policy first).
    pub url: String,
    /// Description; may be empty.
    pub description: String,
    /// Event types, at least one.
    pub events: Vec<String>,
    /// Filters.
    pub filters: Filters,
}

/// A partial update: each field present replaces the stored value whole
/// (`filters` replaces all three lists), an absent one keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookPatch {
    /// New URL.
    pub url: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New event types.
    pub events: Option<Vec<String>>,
    /// New filters.
    pub filters: Option<Filters>,
    /// Enable or disable.
    pub enabled: Option<bool>,
}

/// A webhook just created, with its secret: the only time it is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Created {
    /// The stored webhook.
    pub webhook: Webhook,
    /// `whsec_` + 64 hex.
    pub signing_secret: String,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

/// The answer of [`rotate`].
#[derive(Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The new current secret, shown once.
    pub signing_secret: String,
    /// Until when the previous secret keeps signing.
    pub previous_secret_expires_at: OffsetDateTime,
}

impl std::fmt::Debug for Rotated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotated")
            .field(
                "previous_secret_expires_at",
                &self.previous_secret_expires_at,
            )
            .finish_non_exhaustive()
    }
}

/// The secrets a delivery is signed with right now (see [`signing_keys`]).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKeys {
    /// The current secret.
    pub current: String,
    /// The previous secret, only while its grace period runs.
    pub previous: Option<String>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Why a webhook write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No such webhook of this user (another user's is the same answer).
    #[error("webhook not found")]
    NotFound,
    /// The URL is empty or longer than [`MAX_URL_LEN`].
    #[error("{0}")]
    InvalidUrl(String),
    /// An event type outside [`events::CATALOG`].
    #[error("unknown event type {0:?}")]
    InvalidEventType(String),
    /// Any other invalid field (`invalid_request`): empty event list,
    /// filter caps or formats, an agent the user does not own, the
    /// description.
    #[error("{0}")]
    Invalid(String),
    /// The user already has `limit` webhooks.
    #[error("at most {limit} webhooks per account; delete one first")]
    CapReached {
        /// The cap in force.
        limit: i64,
    },
    /// `enabled: true` within [`REENABLE_COOLDOWN`] of an auto-disable.
    #[error("webhook was disabled automatically; it can be re-enabled at {until}")]
    Cooldown {
        /// When a re-enable is accepted.
        until: OffsetDateTime,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for WebhookError {
    fn from(e: tokio_postgres::Error) -> Self {
        WebhookError::Store(e.into())
    }
}

fn not_found_user(e: StoreError) -> WebhookError {
    match e {
        StoreError::NotFound => WebhookError::NotFound,
        other => other.into(),
    }
}

// ---------------------------------------------------------------------------
// Validation (shared with the API)

/// Checks the URL as far as the store can: not empty, at most
/// [`MAX_URL_LEN`]. The deployment's URL policy (scheme, addresses) is the
/// API's, before this.
pub fn check_url(url: &str) -> Result<(), WebhookError> {
    if url.trim().is_empty() {
        return Err(WebhookError::InvalidUrl("url is required".into()));
    }
    if url.len() > MAX_URL_LEN {
        return Err(WebhookError::InvalidUrl(format!(
            "url must be at most {MAX_URL_LEN} characters"
        )));
    }
    Ok(())
}

/// The event list deduplicated (first occurrence kept): at least one type,
/// each in [`events::CATALOG`].
pub fn check_events(list: &[String]) -> Result<Vec<String>, WebhookError> {
    if list.is_empty() {
        return Err(WebhookError::Invalid(
            "events must name at least one event type".into(),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for e in list {
        if !events::CATALOG.contains(&e.as_str()) {
            return Err(WebhookError::InvalidEventType(e.clone()));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

/// The description: at most [`MAX_DESCRIPTION_LEN`] characters, no control
/// characters (CR and LF in particular).
pub fn check_description(description: &str) -> Result<(), WebhookError> {
    if description.chars().count() > MAX_DESCRIPTION_LEN
        || description.chars().any(char::is_control)
    {
        return Err(WebhookError::Invalid(format!(
            "description must be at most {MAX_DESCRIPTION_LEN} characters on one line"
        )));
    }
    Ok(())
}

fn is_conversation_id(s: &str) -> bool {
    (1..=MAX_FILTER_VALUE_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn dedup(values: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    values
        .into_iter()
        .filter(|v| seen.insert(v.clone()))
        .collect()
}

/// The filters normalised: at most [`MAX_FILTER_VALUES`] values per list;
/// agent ids are e-mail addresses (lower-cased like everywhere, at most
/// [`MAX_FILTER_VALUE_LEN`]), conversation ids `[A-Za-z0-9_-]{1,200}`,
/// labels `[a-z0-9:_-]{1,64}`; duplicates removed. Whether the agents are
/// the user's is checked by [`create`] and [`update`].
pub fn check_filters(filters: &Filters) -> Result<Filters, WebhookError> {
    for (name, list) in [
        ("agent_ids", &filters.agent_ids),
        ("conversation_ids", &filters.conversation_ids),
        ("labels", &filters.labels),
    ] {
        if list.len() > MAX_FILTER_VALUES {
            return Err(WebhookError::Invalid(format!(
                "filters.{name} may hold at most {MAX_FILTER_VALUES} values"
            )));
        }
    }
    let agent_ids = filters
        .agent_ids
        .iter()
        .map(|a| match EmailAddress::parse(a) {
            Ok(addr) if addr.as_str().len() <= MAX_FILTER_VALUE_LEN => Ok(addr.as_str().to_owned()),
            _ => Err(WebhookError::Invalid(format!(
                "filters.agent_ids: {a:?} is not an agent address"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = filters
        .conversation_ids
        .iter()
        .find(|c| !is_conversation_id(c))
    {
        return Err(WebhookError::Invalid(format!(
            "filters.conversation_ids: {bad:?} is not a conversation id \
             (1-{MAX_FILTER_VALUE_LEN} characters of A-Z, a-z, 0-9, '_' and '-')"
        )));
    }
    if let Some(bad) = filters.labels.iter().find(|l| !messages::is_valid_label(l)) {
        return Err(WebhookError::Invalid(format!(
            "filters.labels: {bad:?} is not a label (1-{} characters of a-z, 0-9, ':', '_' and '-')",
            messages::MAX_LABEL_LEN
        )));
    }
    Ok(Filters {
        agent_ids: dedup(agent_ids),
        conversation_ids: dedup(filters.conversation_ids.clone()),
        labels: dedup(filters.labels.clone()),
    })
}

/// [`WebhookError::Invalid`] naming the first of `agent_ids` (normalised)
/// that is not an agent of the user. One statement.
async fn check_agents_owned(
    c: &impl GenericClient,
    user_id: &UserId,
    agent_ids: &[String],
) -> Result<(), WebhookError> {
    if agent_ids.is_empty() {
        return Ok(());
    }
    let stmt = c
        .prepare_cached("SELECT id FROM agents WHERE user_id = $1 AND id = ANY ($2)")
        .await?;
    let owned: HashSet<String> = c
        .query(&stmt, &[user_id, &agent_ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match agent_ids.iter().find(|a| !owned.contains(*a)) {
        None => Ok(()),
        Some(missing) => Err(WebhookError::Invalid(format!(
            "filters.agent_ids: {missing} is not one of your agents"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Reads

const COLUMNS: &str = "id, url, description, events, filter_agent_ids, filter_conversation_ids, \
     filter_labels, enabled, auto_disabled_at, consecutive_failures, created_at, last_delivered_at, \
     CASE WHEN signing_secret_prev_expires_at > now() THEN signing_secret_prev_expires_at END";

fn from_row(r: &Row) -> Webhook {
    Webhook {
        id: r.get(0),
        url: r.get(1),
        description: r.get(2),
        events: r.get(3),
        filters: Filters {
            agent_ids: r.get(4),
            conversation_ids: r.get(5),
            labels: r.get(6),
        },
        enabled: r.get(7),
        auto_disabled_at: r.get(8),
        consecutive_failures: r.get(9),
        created_at: r.get(10),
        last_delivered_at: r.get(11),
        previous_secret_expires_at: r.get(12),
    }
}

/// The user's webhook `id`, or [`StoreError::NotFound`] (also for a
/// malformed id and for another user's webhook). One statement.
pub async fn get(c: &impl GenericClient, user_id: &UserId, id: &str) -> Result<Webhook> {
    let Some(id) = WebhookId::parse(id) else {
        return Err(StoreError::NotFound);
    };
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE id = $1 AND user_id = $2"
        ))
        .await?;
    c.query_opt(&stmt, &[&id, user_id])
        .await?
        .map(|r| from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// The user's webhooks, newest first. Whole: at most the account's
/// `max_webhooks`. One statement (one index range).
pub async fn list(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<Webhook>> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE user_id = $1 ORDER BY created_at DESC, id DESC"
        ))
        .await?;
    Ok(c.query(&stmt, &[user_id])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// The secrets webhook `id` of the user signs with now: the current one
/// and, only while its grace period runs (`signing_secret_prev_expires_at >
/// now()`), the previous one — whether or not the janitor has cleared it
/// yet. [`StoreError::NotFound`] as for [`get`]. One statement.
pub async fn signing_keys(
    c: &impl GenericClient,
    user_id: &UserId,
    id: &WebhookId,
) -> Result<SigningKeys> {
    let stmt = c
        .prepare_cached(
            "SELECT signing_secret, \
                    CASE WHEN signing_secret_prev_expires_at > now() THEN signing_secret_prev END \
             FROM webhooks WHERE id = $1 AND user_id = $2",
        )
        .await?;
    c.query_opt(&stmt, &[id, user_id])
        .await?
        .map(|r| SigningKeys {
            current: r.get(0),
            previous: r.get(1),
        })
        .ok_or(StoreError::NotFound)
}

// ---------------------------------------------------------------------------
// Writes

fn new_secret() -> String {
    format!("{SECRET_PREFIX}{}", secret::random_hex::<32>())
}

/// Creates a webhook for the user with a fresh `whsec_` secret, which the
/// answer carries (the only time it is handed out).
///
/// Validates `new` ([`check_url`], [`check_events`], [`check_filters`],
/// [`check_description`]) before touching the database. Then, in its own
/// transaction (a savepoint inside the caller's) under the user's row lock:
/// counts the user's webhooks against `max_webhooks`
/// ([`WebhookError::CapReached`]), checks that every filtered agent is the
/// user's, inserts. The lock makes count and insert one decision, so
/// concurrent creations never pass the cap (the original counted, then
/// inserted: flaw 24's sibling).
pub async fn create(
    c: &mut impl GenericClient,
    user_id: &UserId,
    new: &NewWebhook,
    max_webhooks: i32,
) -> Result<Created, WebhookError> {
    check_url(&new.url)?;
    let event_types = check_events(&new.events)?;
    let filters = check_filters(&new.filters)?;
    check_description(&new.description)?;

    let tx = c.transaction().await?;
    users::lock(&tx, user_id).await.map_err(not_found_user)?;
    let count: i64 = tx
        .query_one(
            &tx.prepare_cached("SELECT count(*) FROM webhooks WHERE user_id = $1")
                .await?,
            &[user_id],
        )
        .await?
        .get(0);
    if count >= i64::from(max_webhooks) {
        return Err(WebhookError::CapReached {
            limit: i64::from(max_webhooks),
        });
    }
    check_agents_owned(&tx, user_id, &filters.agent_ids).await?;
    let signing_secret = new_secret();
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO webhooks (id, user_id, url, description, events, filter_agent_ids, \
                                   filter_conversation_ids, filter_labels, signing_secret) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &WebhookId::new(),
                user_id,
                &new.url,
                &new.description,
                &event_types,
                &filters.agent_ids,
                &filters.conversation_ids,
                &filters.labels,
                &signing_secret,
            ],
        )
        .await?;
    let webhook = from_row(&row);
    tx.commit().await?;
    Ok(Created {
        webhook,
        signing_secret,
    })
}

/// Applies `patch` to the user's webhook `id` and returns the result.
///
/// Present fields are validated like in [`create`] and replace the stored
/// values whole; absent ones are kept. One `UPDATE` decides everything
/// about the row, so concurrent patches of different fields never undo
/// each other and the cooldown has no check-then-write window (flaw 24):
///
/// * `enabled: true` on a webhook that is disabled and was auto-disabled
///   less than [`REENABLE_COOLDOWN`] ago (`now() < auto_disabled_at + 5
///   min`; exactly 5 minutes later is allowed) matches no row, and a
///   follow-up read answers [`WebhookError::Cooldown`] rather than
///   [`WebhookError::NotFound`]. The whole patch is then refused.
/// * A re-enable that passes (disabled → enabled) clears
///   `auto_disabled_at` and resets `consecutive_failures`.
/// * `enabled: false` (manual disable) never sets `auto_disabled_at`.
///
/// Filtered agents must be the user's (checked in the same transaction,
/// before the `UPDATE`). Runs in its own transaction (a savepoint inside
/// the caller's).
pub async fn update(
    c: &mut impl GenericClient,
    user_id: &UserId,
    id: &str,
    patch: &WebhookPatch,
) -> Result<Webhook, WebhookError> {
    let Some(id) = WebhookId::parse(id) else {
        return Err(WebhookError::NotFound);
    };
    if let Some(url) = &patch.url {
        check_url(url)?;
    }
    let event_types = patch.events.as_deref().map(check_events).transpose()?;
    let filters = patch.filters.as_ref().map(check_filters).transpose()?;
    if let Some(d) = &patch.description {
        check_description(d)?;
    }

    let tx = c.transaction().await?;
    if let Some(f) = &filters {
        check_agents_owned(&tx, user_id, &f.agent_ids).await?;
    }
    let cooldown_secs = REENABLE_COOLDOWN.whole_seconds();
    let stmt = tx
        .prepare_cached(&format!(
            "UPDATE webhooks SET \
               url = COALESCE($3, url), \
               description = COALESCE($4, description), \
               events = COALESCE($5, events), \
               filter_agent_ids = COALESCE($6, filter_agent_ids), \
               filter_conversation_ids = COALESCE($7, filter_conversation_ids), \
               filter_labels = COALESCE($8, filter_labels), \
               enabled = COALESCE($9, enabled), \
               auto_disabled_at = CASE WHEN $9 AND NOT enabled THEN NULL ELSE auto_disabled_at END, \
               consecutive_failures = CASE WHEN $9 AND NOT enabled THEN 0 ELSE consecutive_failures END \
             WHERE id = $1 AND user_id = $2 \
               AND NOT (COALESCE($9, false) AND NOT enabled AND auto_disabled_at IS NOT NULL \
                        AND now() < auto_disabled_at + interval '{cooldown_secs} seconds') \
             RETURNING {COLUMNS}"
        ))
        .await?;
    let row = tx
        .query_opt(
            &stmt,
            &[
                &id,
                user_id,
                &patch.url,
                &patch.description,
                &event_types,
                &filters.as_ref().map(|f| &f.agent_ids),
                &filters.as_ref().map(|f| &f.conversation_ids),
                &filters.as_ref().map(|f| &f.labels),
                &patch.enabled,
            ],
        )
        .await?;
    if let Some(row) = row {
        let webhook = from_row(&row);
        tx.commit().await?;
        return Ok(webhook);
    }
    // No row: missing (or another user's), or refused by the cooldown. The
    // row is not re-decided here; this read only names the reason.
    let stmt = tx
        .prepare_cached("SELECT auto_disabled_at FROM webhooks WHERE id = $1 AND user_id = $2")
        .await?;
    match tx.query_opt(&stmt, &[&id, user_id]).await? {
        None => Err(WebhookError::NotFound),
        Some(r) => {
            let at: Option<OffsetDateTime> = r.get(0);
            // `at` is NULL only if a concurrent re-enable won since our
            // UPDATE; the answer is the same: this re-enable did not apply.
            let until = at.map_or_else(OffsetDateTime::now_utc, |t| t + REENABLE_COOLDOWN);
            Err(WebhookError::Cooldown { until })
        }
    }
}

/// Deletes the user's webhook `id`; its deliveries go with it (foreign key
/// `ON DELETE CASCADE`). [`StoreError::NotFound`] as for [`get`]. One
/// statement.
pub async fn delete(c: &impl GenericClient, user_id: &UserId, id: &str) -> Result<()> {
    let Some(id) = WebhookId::parse(id) else {
        return Err(StoreError::NotFound);
    };
    let stmt = c
        .prepare_cached("DELETE FROM webhooks WHERE id = $1 AND user_id = $2")
        .await?;
    match c.execute(&stmt, &[&id, user_id]).await? {
        0 => Err(StoreError::NotFound),
        _ => Ok(()),
    }
}

/// Gives the user's webhook `id` a new `whsec_` secret (+ 64 hex) and
/// returns it — the only time it is shown. [`StoreError::NotFound`] as for
/// [`get`]. One statement, atomic under the row lock it takes.
///
/// The replaced secret keeps signing for [`PREVIOUS_SECRET_GRACE`] (24 h),
/// so receivers can switch without losing a delivery. One previous secret
/// is kept (deliveries carry at most two `v1=`), and **a still-valid
/// previous secret is never displaced** (flaw 23: the original overwrote it
/// with the intermediate secret, so a second rotation within 24 h broke
/// every receiver still on the original):
///
/// * no previous secret, or an expired one (`expires_at <= now()`): the
///   current secret becomes the previous one, valid for 24 h from now;
/// * a previous secret still valid: it stays, with its expiry unchanged,
///   and the intermediate secret (shown once by the last rotation and
///   typically not deployed yet, or rotated away because it leaked) stops
///   signing at once.
///
/// So no secret signs longer than 24 h after it was replaced, and the
/// answer's `previous_secret_expires_at` is the expiry of the previous
/// secret in force.
pub async fn rotate(c: &impl GenericClient, user_id: &UserId, id: &str) -> Result<Rotated> {
    let Some(id) = WebhookId::parse(id) else {
        return Err(StoreError::NotFound);
    };
    let grace_secs = PREVIOUS_SECRET_GRACE.whole_seconds();
    let stmt = c
        .prepare_cached(&format!(
            "UPDATE webhooks SET \
               signing_secret_prev = CASE WHEN signing_secret_prev_expires_at > now() \
                 THEN signing_secret_prev ELSE signing_secret END, \
               signing_secret_prev_expires_at = CASE WHEN signing_secret_prev_expires_at > now() \
                 THEN signing_secret_prev_expires_at ELSE now() + interval '{grace_secs} seconds' END, \
               signing_secret = $3 \
             WHERE id = $1 AND user_id = $2 \
             RETURNING signing_secret_prev_expires_at"
        ))
        .await?;
    let signing_secret = new_secret();
    let row = c
        .query_opt(&stmt, &[&id, user_id, &signing_secret])
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(Rotated {
        signing_secret,
        previous_secret_expires_at: row.get(0),
    })
}

/// Forgets up to `batch` previous secrets whose grace period is over
/// (`signing_secret_prev_expires_at <= now()`); returns how many. For the
/// janitor: rows are claimed with `FOR UPDATE SKIP LOCKED`, so replicas
/// never wait on each other or on a rotation. Signing does not depend on
/// it ([`signing_keys`] ignores an expired previous secret); it only
/// removes a dead key from the database. One statement.
pub async fn clear_expired_previous_secrets(c: &impl GenericClient, batch: i64) -> Result<u64> {
    let stmt = c
        .prepare_cached(
            "UPDATE webhooks SET signing_secret_prev = NULL, signing_secret_prev_expires_at = NULL \
             WHERE id IN (SELECT id FROM webhooks WHERE signing_secret_prev_expires_at <= now() \
                          LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(c.execute(&stmt, &[&batch]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn events_are_checked_against_the_catalogue_and_deduplicated() {
        assert_eq!(
            check_events(&s(&["email.sent", "email.received", "email.sent"])).unwrap(),
            s(&["email.sent", "email.received"])
        );
        assert!(matches!(
            check_events(&s(&["email.received", "email.bounced"])),
            Err(WebhookError::InvalidEventType(t)) if t == "email.bounced"
        ));
        assert!(matches!(check_events(&[]), Err(WebhookError::Invalid(_))));
        for t in events::CATALOG {
            assert!(check_events(&s(&[t])).is_ok(), "{t}");
        }
    }

    #[test]
    fn filters_are_capped_normalised_and_formatted() {
        let f = check_filters(&Filters {
            agent_ids: s(&["Demo@Agents.Example", "demo@agents.example"]),
            conversation_ids: s(&["cnv_0123", "thread-A_1"]),
            labels: s(&["e2a:hitl", "vip"]),
        })
        .unwrap();
        assert_eq!(f.agent_ids, s(&["demo@agents.example"]));
        assert_eq!(f.conversation_ids, s(&["cnv_0123", "thread-A_1"]));
        assert_eq!(f.labels, s(&["e2a:hitl", "vip"]));

        let too_many = Filters {
            labels: (0..51).map(|i| format!("l{i}")).collect(),
            ..Filters::default()
        };
        assert!(matches!(
            check_filters(&too_many),
            Err(WebhookError::Invalid(_))
        ));
        let fifty = Filters {
            conversation_ids: (0..50).map(|i| format!("c{i}")).collect(),
            ..Filters::default()
        };
        assert!(check_filters(&fifty).is_ok());
        for bad in [
            Filters {
                agent_ids: s(&["not an address"]),
                ..Filters::default()
            },
            Filters {
                conversation_ids: s(&["a b"]),
                ..Filters::default()
            },
            Filters {
                conversation_ids: vec!["c".repeat(201)],
                ..Filters::default()
            },
            Filters {
                labels: s(&["UPPER"]),
                ..Filters::default()
            },
            Filters {
                labels: vec!["l".repeat(65)],
                ..Filters::default()
            },
        ] {
            assert!(
                matches!(check_filters(&bad), Err(WebhookError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn urls_and_descriptions_are_bounded() {
        assert!(matches!(check_url(""), Err(WebhookError::InvalidUrl(_))));
        assert!(matches!(check_url("  "), Err(WebhookError::InvalidUrl(_))));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(check_url(&long), Err(WebhookError::InvalidUrl(_))));
        assert!(check_url("https://example.com/hook").is_ok());

        assert!(check_description(&"é".repeat(200)).is_ok());
        assert!(check_description(&"é".repeat(201)).is_err());
        assert!(check_description("two\nlines").is_err());
        assert!(check_description("cr\r").is_err());
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let keys = SigningKeys {
            current: "whsec_current".into(),
            previous: Some("whsec_previous".into()),
        };
        let rotated = Rotated {
            signing_secret: "whsec_new".into(),
            previous_secret_expires_at: OffsetDateTime::UNIX_EPOCH,
        };
        let shown = format!("{keys:?} {rotated:?}");
        assert!(!shown.contains("whsec_"), "{shown}");
    }
}
