//! Randomness and hashing for tokens and keys: `ring`'s system RNG and
//! SHA-256, plus lowercase hex encoding. Plaintext secrets never reach the
//! database; only [`sha256_hex`] digests do.

use ring::rand::{SecureRandom, SystemRandom};

/// Fills `N` bytes from the operating system's CSPRNG.
///
/// # Panics
/// Only if the OS random source fails, which `ring` treats as unrecoverable.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("operating system random source failed");
    buf
}

/// `2 * N` lowercase hex characters of fresh randomness.
pub fn random_hex<const N: usize>() -> String {
    hex(&random_bytes::<N>())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    out
}

/// Lowercase hex SHA-256 of `data` (64 characters).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// True when `s` is exactly `len` lowercase hex characters.
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A random value in `0..bound` (bound > 0), for jitter.
pub fn random_below(bound: u64) -> u64 {
    u64::from_le_bytes(random_bytes::<8>()) % bound.max(1)
}

/// `url` with its password replaced by `***`, for `Debug` output and log
/// lines: handles `postgres://user:pass@host/db` URLs and libpq
/// `key=value` strings (`password=…`). Anything unrecognised is replaced
/// whole rather than risk printing a secret.
pub fn redact_database_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // The authority ends at the first '/', '?' or '#'; userinfo is
        // everything before its last '@'.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let tail = redact_query_password(tail);
        return match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
                None => format!("{scheme}://{userinfo}@{host}{tail}"),
            },
            None => format!("{scheme}://{authority}{tail}"),
        };
    }
    if url.contains('=') {
        return url
            .split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    "***".to_owned()
}

fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let query = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn random_hex_is_fresh_lowercase_hex() {
        let a = random_hex::<32>();
        let b = random_hex::<32>();
        assert!(is_lower_hex(&a, 64));
        assert_ne!(a, b);
    }

    #[test]
    fn is_lower_hex_rejects_upper_and_wrong_length() {
        assert!(!is_lower_hex("ABCDEF", 6));
        assert!(!is_lower_hex("abc", 4));
        assert!(is_lower_hex("09af", 4));
    }

    #[test]
    fn database_urls_lose_their_passwords() {
        assert_eq!(
            redact_database_url("postgres://e2a:s3cret@db:5432/e2a?sslmode=require"),
            "postgres://e2a:***@db:5432/e2a?sslmode=require"
        );
        assert_eq!(
            redact_database_url("postgres://e2a:p@ss@db/e2a"),
            "postgres://e2a:***@db/e2a"
        );
        assert_eq!(
            redact_database_url("postgres://db/e2a?user=x&password=s3cret"),
            "postgres://db/e2a?user=x&password=***"
        );
        assert_eq!(
            redact_database_url("host=/tmp user=e2a password=s3cret"),
            "host=/tmp user=e2a password=***"
        );
        assert_eq!(redact_database_url("s3cret"), "***");
    }
}
