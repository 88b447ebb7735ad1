//! E-mail address normalisation shared by every path that stores or looks up
//! an address (agent registration, RCPT TO, user e-mail), so `Demo@Agents.LocalHost`
//! and `demo@agents.localhost` are the same mailbox everywhere.
//!
//! Rules: surrounding whitespace and one pair of angle brackets are removed,
//! the whole address is lower-cased, the local part is a dot-atom (RFC 5322
//! `atext`, no leading, trailing or doubled dots, ≤ 64 octets), the domain is
//! at least two LDH labels of 1–63 characters (≤ 253 octets), and the whole
//! address is ≤ 254 octets. Quoted local parts, comments, IP literals and
//! non-ASCII addresses are rejected.

use std::fmt;

/// A normalised, validated e-mail address.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, postgres_types::ToSql, serde::Serialize,
)]
#[postgres(transparent)]
#[serde(transparent)]
pub struct EmailAddress(String);

/// Why an address was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty after trimming.
    #[error("address is empty")]
    Empty,
    /// Longer than 254 octets.
    #[error("address is too long")]
    TooLong,
    /// No `@`, or more than one.
    #[error("address must contain exactly one @")]
    MissingAt,
    /// The part before `@` is not a valid dot-atom.
    #[error("invalid local part")]
    InvalidLocalPart,
    /// The part after `@` is not a valid domain name.
    #[error("invalid domain")]
    InvalidDomain,
}

impl EmailAddress {
    /// Normalises and validates `input`.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let trimmed = input.trim();
        let trimmed = trimmed
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(trimmed)
            .trim();
        if trimmed.is_empty() {
            return Err(AddressError::Empty);
        }
        if trimmed.len() > 254 {
            return Err(AddressError::TooLong);
        }
        let lower = trimmed.to_ascii_lowercase();
        let mut parts = lower.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AddressError::MissingAt);
        };
        if !valid_local_part(local) {
            return Err(AddressError::InvalidLocalPart);
        }
        if !valid_domain(domain) {
            return Err(AddressError::InvalidDomain);
        }
        // The root dot of a fully qualified name (`a@example.com.`) names the
        // same mailbox: store and look up the form without it.
        match domain.strip_suffix('.') {
            Some(bare) => Ok(Self(format!("{local}@{bare}"))),
            None => Ok(Self(lower)),
        }
    }

    /// The normalised address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `@`.
    pub fn local_part(&self) -> &str {
        self.0.split_once('@').map(|(l, _)| l).unwrap_or_default()
    }

    /// The domain after `@`.
    pub fn domain(&self) -> &str {
        self.0.split_once('@').map(|(_, d)| d).unwrap_or_default()
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_local_part(local: &str) -> bool {
    const SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || SPECIALS.contains(&b))
}

/// True for a lower-case LDH domain of at least two labels.
pub fn valid_domain(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() || domain.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        // The top-level label is never all digits (rules out IPv4 literals).
        && !labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_whitespace_and_brackets() {
        let a = EmailAddress::parse("  <Demo@Agents.LocalHost> ").unwrap();
        assert_eq!(a.as_str(), "demo@agents.localhost");
        assert_eq!(a.local_part(), "demo");
        assert_eq!(a.domain(), "agents.localhost");
    }

    #[test]
    fn strips_the_root_dot_of_a_fully_qualified_domain() {
        let a = EmailAddress::parse("Demo@Agents.LocalHost.").unwrap();
        assert_eq!(a, EmailAddress::parse("demo@agents.localhost").unwrap());
        assert_eq!(a.domain(), "agents.localhost");
        assert!(EmailAddress::parse("demo@agents.localhost..").is_err());
    }

    #[test]
    fn accepts_dot_atoms_with_specials() {
        assert!(EmailAddress::parse("first.last+tag@mail.example.co.uk").is_ok());
        assert!(EmailAddress::parse("o'brien_x-y@ex-ample.com").is_ok());
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "   ",
            "no-at.example.com",
            "a@b@example.com",
            ".lead@example.com",
            "trail.@example.com",
            "dou..ble@example.com",
            "sp ace@example.com",
            "\"quoted\"@example.com",
            "user@localhost",
            "user@-bad.com",
            "user@bad-.com",
            "user@exa_mple.com",
            "user@[127.0.0.1]",
            "user@1.2.3.4",
            "usér@example.com",
            "user@example..com",
        ] {
            assert!(
                EmailAddress::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn enforces_length_limits() {
        let local = "a".repeat(65);
        assert_eq!(
            EmailAddress::parse(&format!("{local}@example.com")),
            Err(AddressError::InvalidLocalPart)
        );
        let long = format!("a@{}.com", "b".repeat(260));
        assert_eq!(EmailAddress::parse(&long), Err(AddressError::TooLong));
    }
}
