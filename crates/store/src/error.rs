//! Typed store errors. The edge (HTTP, SMTP) maps these once; nothing here is
//! stringified on the way: database errors keep their `tokio_postgres::Error`
//! as the source so the SQLSTATE stays reachable.

use tokio_postgres::error::SqlState;

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What can go wrong in a store call, in domain terms.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist **or belongs to another tenant**: the two are
    /// deliberately indistinguishable.
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was violated; `what` names the rule in domain terms
    /// (e.g. `"email"`).
    #[error("conflict: {what} already exists")]
    Conflict {
        /// Domain name of the violated rule.
        what: &'static str,
    },
    /// An account cap would be exceeded (`what` = `"agents"`, `"domains"`, …).
    #[error("{what} limit of {limit} reached")]
    LimitExceeded {
        /// What is capped.
        what: &'static str,
        /// The cap in force.
        limit: i64,
    },
    /// The row cannot be deleted while others depend on it (e.g. a domain
    /// that still has agents).
    #[error("still referenced by {what}")]
    HasDependents {
        /// What still refers to the row.
        what: &'static str,
    },
    /// The input was rejected before reaching the database.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The database cannot be reached right now (pool exhausted, connection
    /// refused or lost, server shutting down, statement timeout, a new
    /// connection refused at login — e.g. a rotated password). Callers
    /// answer "try again" (HTTP 503, SMTP 451), never success.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),
}

impl StoreError {
    /// True when retrying the whole transaction may succeed (serialization
    /// failure or deadlock).
    pub fn is_retryable_conflict(&self) -> bool {
        match self {
            StoreError::Database(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
            ),
            _ => false,
        }
    }

    /// True for [`StoreError::Unavailable`].
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// True when the server refused a new connection: failed
    /// authentication (SQLSTATE class 28: a wrong or rotated password, an
    /// unknown role, no `pg_hba.conf` entry), a database that does not exist
    /// (`3D000`), or any other non-transient SQLSTATE it sent while a
    /// connection was being opened (e.g. `42501` once `CONNECT` is revoked).
    ///
    /// Such an error is [`StoreError::Unavailable`]: while a service runs it
    /// is an outage like any other (the password was rotated under it) and
    /// requests answer "try again". At start-up it is a configuration error
    /// that waiting will not fix, so [`crate::Store::wait_until_ready`]
    /// returns it at once.
    pub fn is_login_refused(&self) -> bool {
        match self {
            StoreError::Unavailable(source) => source
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(tokio_postgres::Error::code)
                .is_some_and(|code| !is_transient_code(code)),
            _ => false,
        }
    }
    /// Maps a database error, turning unique violations of the named
    /// constraints into [`StoreError::Conflict`].
    ///
    /// `uniques` pairs a constraint (or unique index) name with the domain
    /// name reported in the conflict.
    pub fn from_pg_with(
        err: tokio_postgres::Error,
        uniques: &[(&str, &'static str)],
    ) -> StoreError {
        if let Some(db) = err.as_db_error()
            && *db.code() == SqlState::UNIQUE_VIOLATION
            && let Some(name) = db.constraint()
            && let Some((_, what)) = uniques.iter().find(|(c, _)| *c == name)
        {
            return StoreError::Conflict { what };
        }
        StoreError::from(err)
    }
}

/// Maps a database error for an insert whose foreign key names the owning
/// parent (e.g. a user): a foreign-key violation means the parent does not
/// exist, which is [`StoreError::NotFound`]; anything else maps as usual.
pub(crate) fn missing_parent_is_not_found(err: tokio_postgres::Error) -> StoreError {
    match StoreError::from(err) {
        StoreError::Database(db) if db.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
            StoreError::NotFound
        }
        other => other,
    }
}

/// SQLSTATEs that mean "the server is not there for us right now".
fn is_unavailable_code(code: &SqlState) -> bool {
    is_transient_code(code) || is_login_refused_code(code)
}

/// Outages that end by themselves: the server is unreachable, restarting,
/// full, or cancelled the statement.
fn is_transient_code(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("08") // connection exception
        || c == "57P01" // admin_shutdown
        || c == "57P02" // crash_shutdown
        || c == "57P03" // cannot_connect_now
        || c == "53300" // too_many_connections
        || c == "57014" // query_canceled: the per-statement timeout fired
}

/// SQLSTATEs only a login produces: class 28 (`28000`
/// invalid_authorization_specification, `28P01` invalid_password) and
/// `3D000` invalid_catalog_name (the database does not exist).
fn is_login_refused_code(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("28") || c == "3D000"
}

/// `err` and its sources joined with `: `, for log lines (a bare
/// `tokio_postgres::Error` displays only "db error").
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        let unavailable = err.is_closed()
            || match err.code() {
                Some(code) => is_unavailable_code(code),
                // No SQLSTATE and not a row/conversion problem: an I/O error.
                None => err.as_db_error().is_none() && is_io_error(&err),
            };
        if unavailable {
            StoreError::Unavailable(Box::new(err))
        } else {
            StoreError::Database(err)
        }
    }
}

fn is_io_error(err: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

impl From<deadpool_postgres::PoolError> for StoreError {
    /// Pool errors are [`StoreError::Unavailable`]: no free connection in
    /// time, or a new connection that could not be opened (`Backend` is
    /// only ever a connect error) — including every refusal the server
    /// answered with a SQLSTATE, see [`StoreError::is_login_refused`]. A
    /// connect error without a SQLSTATE that is no I/O error (an unusable
    /// connection setting) stays [`StoreError::Database`].
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) if e.code().is_some() => {
                StoreError::Unavailable(Box::new(e))
            }
            deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Unavailable(Box::new(other)),
        }
    }
}
