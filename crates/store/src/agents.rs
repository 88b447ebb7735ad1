//! Agents: e-mail identities owned by users. An agent's id **is** its
//! normalised address (`demo@agents.localhost`), on either a verified domain
//! its owner claimed or the shared domain.
//!
//! Every read and write is scoped to the owner; another user's agent is
//! [`StoreError::NotFound`], exactly like a missing one.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{
    account_limits::Limits,
    address::EmailAddress,
    error::{Result, StoreError},
    ids::SigningSecretId,
    ids::UserId,
    signing_secrets::SigningSecret,
    users,
};

/// How an agent receives mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    /// Pushed to webhooks.
    Cloud,
    /// Polled / notified locally.
    Local,
}

impl AgentMode {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::Cloud => "cloud",
            AgentMode::Local => "local",
        }
    }

    /// Parses `cloud` / `local`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cloud" => Some(AgentMode::Cloud),
            "local" => Some(AgentMode::Local),
            _ => None,
        }
    }
}

/// What happens to a held message when its approval window passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpirationAction {
    /// Send it.
    Approve,
    /// Drop it.
    Reject,
}

impl ExpirationAction {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpirationAction::Approve => "approve",
            ExpirationAction::Reject => "reject",
        }
    }

    /// Parses `approve` / `reject`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "approve" => Some(ExpirationAction::Approve),
            "reject" => Some(ExpirationAction::Reject),
            _ => None,
        }
    }
}

/// Longest HITL hold (7 days).
pub const MAX_HITL_TTL_SECONDS: i32 = 604_800;

/// An agent row plus whether its domain is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The address (primary key).
    pub id: String,
    /// Owner.
    pub user_id: UserId,
    /// The domain part.
    pub domain: String,
    /// Display name.
    pub name: String,
    /// Legacy per-agent webhook URL (cloud mode).
    pub webhook_url: String,
    /// Delivery mode.
    pub agent_mode: AgentMode,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Hold outbound mail for approval.
    pub hitl_enabled: bool,
    /// Approval window in seconds (1..=604800).
    pub hitl_ttl_seconds: i32,
    /// What expiry does.
    pub hitl_expiration_action: ExpirationAction,
    /// Refuse inbound mail that fails DMARC with `p=reject` (550 5.7.1).
    pub reject_dmarc_failures: bool,
    /// Whether the domain is verified (the shared domain always is).
    pub domain_verified: bool,
}

const COLUMNS: &str = "a.id, a.user_id, a.domain, a.name, a.webhook_url, a.agent_mode, a.created_at, a.hitl_enabled, \
     a.hitl_ttl_seconds, a.hitl_expiration_action, a.reject_dmarc_failures, d.verified";

fn from_row(r: &Row) -> Agent {
    Agent {
        id: r.get(0),
        user_id: r.get(1),
        domain: r.get(2),
        name: r.get(3),
        webhook_url: r.get(4),
        agent_mode: AgentMode::parse(r.get(5)).unwrap_or(AgentMode::Local),
        created_at: r.get(6),
        hitl_enabled: r.get(7),
        hitl_ttl_seconds: r.get(8),
        hitl_expiration_action: ExpirationAction::parse(r.get(9))
            .unwrap_or(ExpirationAction::Reject),
        reject_dmarc_failures: r.get(10),
        domain_verified: r.get(11),
    }
}

/// A new agent.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// Its address.
    pub address: EmailAddress,
    /// Display name (≤ 200 characters, no control characters).
    pub name: String,
    /// Webhook URL; required for [`AgentMode::Cloud`]. The caller validates it.
    pub webhook_url: String,
    /// Delivery mode.
    pub agent_mode: AgentMode,
}

/// Why [`create`] refused.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The domain has no row the caller may use (missing or another user's).
    #[error("domain {0} is not registered to this account")]
    DomainNotRegistered(String),
    /// The caller's domain is not verified yet.
    #[error("domain {0} is not verified")]
    DomainNotVerified(String),
    /// An agent with this address exists (anyone's).
    #[error("an agent with this address already exists")]
    Duplicate,
    /// Anything else (caps, validation, database).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for CreateError {
    fn from(e: tokio_postgres::Error) -> Self {
        CreateError::Store(e.into())
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "name must be at most 200 characters without control characters".into(),
        ));
    }
    Ok(())
}

/// Creates an agent for `user_id`.
///
/// Atomic (own transaction, user row locked so the cap holds under
/// concurrency). The domain must be the shared domain (a row without owner)
/// or a **verified** domain of the caller. At most `max_agents` per user
/// ([`StoreError::LimitExceeded`]). A cloud agent needs a webhook URL
/// ([`StoreError::Invalid`]).
pub async fn create(
    c: &mut impl GenericClient,
    user_id: &UserId,
    new: &NewAgent,
    max_agents: i32,
) -> std::result::Result<Agent, CreateError> {
    check_name(&new.name)?;
    if new.agent_mode == AgentMode::Cloud && new.webhook_url.is_empty() {
        return Err(StoreError::Invalid("cloud agents need a webhook_url".into()).into());
    }
    let domain = new.address.domain().to_owned();
    let tx = c.transaction().await?;
    users::lock(&tx, user_id).await?;
    // The name's verified (or shared) row if there is one, else the
    // caller's live pending claim; other accounts' pending claims are not
    // registrations of the caller's.
    let sql = format!(
        "SELECT d.user_id, d.verified FROM domains d \
         WHERE d.domain = $1 AND (d.verified OR d.user_id = $2) AND {} \
         ORDER BY d.verified DESC LIMIT 1",
        crate::domains::live_sql("d.")
    );
    let row = tx
        .query_opt(&tx.prepare_cached(&sql).await?, &[&domain, user_id])
        .await?;
    match row.map(|r| (r.get::<_, Option<UserId>>(0), r.get::<_, bool>(1))) {
        None => return Err(CreateError::DomainNotRegistered(domain)),
        Some((Some(owner), _)) if &owner != user_id => {
            return Err(CreateError::DomainNotRegistered(domain));
        }
        Some((Some(_), false)) => return Err(CreateError::DomainNotVerified(domain)),
        Some(_) => {}
    }
    let count: i64 = tx
        .query_one(
            &tx.prepare_cached("SELECT count(*) FROM agents WHERE user_id = $1")
                .await?,
            &[user_id],
        )
        .await?
        .get(0);
    if count >= i64::from(max_agents) {
        return Err(StoreError::LimitExceeded {
            what: "agents",
            limit: i64::from(max_agents),
        }
        .into());
    }
    let inserted = tx
        .execute(
            &tx.prepare_cached(
                "INSERT INTO agents (id, user_id, domain, name, webhook_url, agent_mode) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?,
            &[&new.address.as_str(), user_id, &domain, &new.name, &new.webhook_url, &new.agent_mode.as_str()],
        )
        .await?;
    if inserted == 0 {
        return Err(CreateError::Duplicate);
    }
    let agent = get(&tx, user_id, new.address.as_str()).await?;
    tx.commit().await?;
    Ok(agent)
}

/// The caller's agent by address (normalise it first), or
/// [`StoreError::NotFound`].
pub async fn get(c: &impl GenericClient, user_id: &UserId, address: &str) -> Result<Agent> {
    let sql = format!(
        "SELECT {COLUMNS} FROM agents a JOIN domains d ON d.owned_domain = a.domain WHERE a.id = $1 AND a.user_id = $2"
    );
    c.query_opt(&c.prepare_cached(&sql).await?, &[&address, user_id])
        .await?
        .map(|r| from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// The caller's agents, newest first.
pub async fn list(c: &impl GenericClient, user_id: &UserId) -> Result<Vec<Agent>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM agents a JOIN domains d ON d.owned_domain = a.domain WHERE a.user_id = $1 \
         ORDER BY a.created_at DESC, a.id"
    );
    Ok(c.query(&c.prepare_cached(&sql).await?, &[user_id])
        .await?
        .iter()
        .map(from_row)
        .collect())
}

/// Fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AgentPatch {
    /// New display name.
    pub name: Option<String>,
    /// New webhook URL (the caller validates it).
    pub webhook_url: Option<String>,
    /// New mode.
    pub agent_mode: Option<AgentMode>,
    /// HITL on/off.
    pub hitl_enabled: Option<bool>,
    /// HITL window, 1..=604800.
    pub hitl_ttl_seconds: Option<i32>,
    /// HITL expiry action.
    pub hitl_expiration_action: Option<ExpirationAction>,
    /// DMARC rejection opt-in.
    pub reject_dmarc_failures: Option<bool>,
}

impl AgentPatch {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.webhook_url.is_none()
            && self.agent_mode.is_none()
            && self.hitl_enabled.is_none()
            && self.hitl_ttl_seconds.is_none()
            && self.hitl_expiration_action.is_none()
            && self.reject_dmarc_failures.is_none()
    }
}

/// Applies `patch` to the caller's agent in one statement and returns the
/// updated agent. [`StoreError::NotFound`] if not theirs; [`StoreError::Invalid`]
/// for an out-of-range TTL or a cloud agent left without webhook URL.
pub async fn update(
    c: &impl GenericClient,
    user_id: &UserId,
    address: &str,
    patch: &AgentPatch,
) -> Result<Agent> {
    if let Some(name) = &patch.name {
        check_name(name)?;
    }
    if let Some(ttl) = patch.hitl_ttl_seconds
        && !(1..=MAX_HITL_TTL_SECONDS).contains(&ttl)
    {
        return Err(StoreError::Invalid(format!(
            "hitl_ttl_seconds must be between 1 and {MAX_HITL_TTL_SECONDS}"
        )));
    }
    let stmt = c
        .prepare_cached(
            "UPDATE agents SET name = COALESCE($3, name), webhook_url = COALESCE($4, webhook_url), \
               agent_mode = COALESCE($5, agent_mode), hitl_enabled = COALESCE($6, hitl_enabled), \
               hitl_ttl_seconds = COALESCE($7, hitl_ttl_seconds), \
               hitl_expiration_action = COALESCE($8, hitl_expiration_action), \
               reject_dmarc_failures = COALESCE($9, reject_dmarc_failures) \
             WHERE id = $1 AND user_id = $2",
        )
        .await?;
    let updated = c
        .execute(
            &stmt,
            &[
                &address,
                user_id,
                &patch.name,
                &patch.webhook_url,
                &patch.agent_mode.map(AgentMode::as_str),
                &patch.hitl_enabled,
                &patch.hitl_ttl_seconds,
                &patch.hitl_expiration_action.map(ExpirationAction::as_str),
                &patch.reject_dmarc_failures,
            ],
        )
        .await
        .map_err(|e| match e.as_db_error().and_then(|d| d.constraint()) {
            Some("agents_cloud_webhook_url_check") => {
                StoreError::Invalid("cloud agents need a webhook_url".into())
            }
            _ => e.into(),
        })?;
    if updated == 0 {
        return Err(StoreError::NotFound);
    }
    get(c, user_id, address).await
}

/// Deletes the caller's agent and (by cascade) its messages.
/// [`StoreError::NotFound`] if not theirs.
pub async fn delete(c: &impl GenericClient, user_id: &UserId, address: &str) -> Result<()> {
    let stmt = c
        .prepare_cached("DELETE FROM agents WHERE id = $1 AND user_id = $2")
        .await?;
    match c.execute(&stmt, &[&address, user_id]).await? {
        0 => Err(StoreError::NotFound),
        _ => Ok(()),
    }
}

/// What the relay needs to accept a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The agent's address.
    pub agent_id: String,
    /// Its owner.
    pub user_id: UserId,
    /// Delivery mode.
    pub agent_mode: AgentMode,
    /// DMARC rejection opt-in.
    pub reject_dmarc_failures: bool,
    /// The agent is in cloud mode with a `webhook_url`: its mail is also
    /// pushed there (legacy per-agent push, spec §3.5). The relay passes
    /// this on as [`crate::inbound::Delivery::legacy_push`]; the
    /// deliverer checks the agent again when it claims the push.
    pub legacy_push: bool,
    /// The owner's account is at or over a cap (spec §6.2: monthly messages
    /// first, then storage): the relay answers `552 5.2.2`.
    pub over_quota: Option<Quota>,
    /// The owner's newest signing secret at lookup time (`None` when the
    /// owner has none yet: see [`crate::signing_secrets::newest_or_create`]),
    /// read in the same statement so signing costs no extra round trip.
    pub signing_secret: Option<SigningSecret>,
}

/// Which account cap a recipient's owner has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Messages this UTC month ≥ `max_messages_month`.
    MonthlyMessages,
    /// Stored bytes ≥ `max_storage_bytes`.
    Storage,
}

/// The agent that receives mail for `address` (normalised), if it exists
/// and its domain is verified, with its owner's quota state against the
/// owner's `account_limits` row or `defaults` — all in one statement (one
/// round trip, a consistent snapshot). Not tenant-scoped: SMTP recipients
/// are public addresses.
///
/// The quota answer is a snapshot: messages accepted concurrently by other
/// sessions may overshoot a cap by at most what is in flight, never more.
pub async fn resolve_recipient(
    c: &impl GenericClient,
    address: &EmailAddress,
    defaults: &Limits,
) -> Result<Option<Recipient>> {
    let stmt = c
        .prepare_cached(
            "SELECT a.id, a.user_id, a.agent_mode, a.reject_dmarc_failures, \
                    u.messages_month >= COALESCE(l.max_messages_month::int8, $2::int8), \
                    u.storage_bytes >= COALESCE(l.max_storage_bytes, $3::int8), \
                    s.id, s.secret, \
                    a.agent_mode = 'cloud' AND a.webhook_url <> '' \
             FROM agents a \
             JOIN domains d ON d.owned_domain = a.domain \
             CROSS JOIN LATERAL e2a_account_usage(a.user_id) AS u \
             LEFT JOIN account_limits l ON l.user_id = a.user_id \
             LEFT JOIN LATERAL (SELECT id, secret FROM webhook_signing_secrets \
                                 WHERE user_id = a.user_id \
                                 ORDER BY created_at DESC, id DESC LIMIT 1) s ON true \
             WHERE a.id = $1 AND d.verified",
        )
        .await?;
    Ok(c.query_opt(
        &stmt,
        &[
            &address.as_str(),
            &i64::from(defaults.max_messages_month),
            &defaults.max_storage_bytes,
        ],
    )
    .await?
    .map(|r| Recipient {
        agent_id: r.get(0),
        user_id: r.get(1),
        agent_mode: AgentMode::parse(r.get(2)).unwrap_or(AgentMode::Local),
        reject_dmarc_failures: r.get(3),
        legacy_push: r.get(8),
        over_quota: if r.get(4) {
            Some(Quota::MonthlyMessages)
        } else if r.get(5) {
            Some(Quota::Storage)
        } else {
            None
        },
        signing_secret: r
            .get::<_, Option<SigningSecretId>>(6)
            .map(|id| SigningSecret {
                id,
                secret: r.get(7),
            }),
    }))
}
