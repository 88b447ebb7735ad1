//! Users: one row per human account owner.
//!
//! E-mail addresses are stored normalised ([`EmailAddress`]) and unique.
//! Users created by [`bootstrap`] have no Google subject (the original wrote
//! a synthetic one).

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::{
    address::EmailAddress,
    error::{Result, StoreError},
    ids::UserId,
};

/// A user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `usr_…`
    pub id: UserId,
    /// Normalised e-mail address, unique.
    pub email: String,
    /// Display name; may be empty.
    pub name: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

const COLUMNS: &str = "id, email, name, created_at";
const UNIQUES: &[(&str, &str)] = &[
    ("users_email_key", "email"),
    ("users_google_subject_key", "google_subject"),
];

fn from_row(row: &Row) -> User {
    User {
        id: row.get(0),
        email: row.get(1),
        name: row.get(2),
        created_at: row.get(3),
    }
}

/// Maximum length of a display name.
pub const MAX_NAME_LEN: usize = 200;

fn check_name(name: &str) -> Result<()> {
    if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "name must be at most {MAX_NAME_LEN} characters without control characters"
        )));
    }
    Ok(())
}

/// Creates a user. [`StoreError::Conflict`] `{ what: "email" }` when the
/// address is taken. One statement, atomic.
pub async fn create(c: &impl GenericClient, email: &EmailAddress, name: &str) -> Result<User> {
    check_name(name)?;
    let sql =
        format!("INSERT INTO users (id, email, name) VALUES ($1, $2, $3) RETURNING {COLUMNS}");
    let stmt = c.prepare_cached(&sql).await?;
    let row = c
        .query_one(&stmt, &[&UserId::new(), &email.as_str(), &name])
        .await
        .map_err(|e| StoreError::from_pg_with(e, UNIQUES))?;
    Ok(from_row(&row))
}

/// The user with `id`, or [`StoreError::NotFound`].
pub async fn get(c: &impl GenericClient, id: &UserId) -> Result<User> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    let stmt = c.prepare_cached(&sql).await?;
    c.query_opt(&stmt, &[id])
        .await?
        .map(|r| from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// The user with this (normalised) e-mail, or [`StoreError::NotFound`].
pub async fn get_by_email(c: &impl GenericClient, email: &EmailAddress) -> Result<User> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE email = $1");
    let stmt = c.prepare_cached(&sql).await?;
    c.query_opt(&stmt, &[&email.as_str()])
        .await?
        .map(|r| from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// Outcome of [`bootstrap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrapped {
    /// A new user was created.
    Created(User),
    /// A user with this e-mail already existed and is returned unchanged.
    Existing(User),
}

impl Bootstrapped {
    /// The user, however it was obtained.
    pub fn user(&self) -> &User {
        match self {
            Bootstrapped::Created(u) | Bootstrapped::Existing(u) => u,
        }
    }
}

/// Finds the user with `email` or creates it (name `bootstrap`).
///
/// Idempotent and race-free: concurrent calls for the same address yield one
/// row (`INSERT … ON CONFLICT DO NOTHING`, then read).
pub async fn bootstrap(c: &impl GenericClient, email: &EmailAddress) -> Result<Bootstrapped> {
    let sql = format!(
        "INSERT INTO users (id, email, name) VALUES ($1, $2, 'bootstrap') \
         ON CONFLICT (email) DO NOTHING RETURNING {COLUMNS}"
    );
    let stmt = c.prepare_cached(&sql).await?;
    match c
        .query_opt(&stmt, &[&UserId::new(), &email.as_str()])
        .await?
    {
        Some(row) => Ok(Bootstrapped::Created(from_row(&row))),
        None => Ok(Bootstrapped::Existing(get_by_email(c, email).await?)),
    }
}

/// Takes the user's row lock (`SELECT … FOR UPDATE`) for the rest of the
/// transaction `c` must be. Serialises the user's cap-checked creations
/// (count, then insert) so two concurrent requests cannot both pass the
/// cap. [`StoreError::NotFound`] if the user does not exist.
pub async fn lock(c: &impl GenericClient, id: &UserId) -> Result<()> {
    let stmt = c
        .prepare_cached("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
        .await?;
    c.query_opt(&stmt, &[id])
        .await?
        .map(|_| ())
        .ok_or(StoreError::NotFound)
}
