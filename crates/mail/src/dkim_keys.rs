//! Per-domain DKIM keys: RSA-2048 generation with the `rsa` crate (ring
//! cannot generate RSA keys) from the operating system's randomness, the TXT
//! record a domain owner publishes, and the monthly selector name.
//!
//! The private key is kept as PKCS#1 DER (as the original stored it); signing
//! goes through `mail-auth` on `ring` ([`signing_key`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_auth::common::crypto::{RsaKey, Sha256};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};
use time::Date;

/// RSA modulus size of generated keys.
pub const RSA_BITS: usize = 2048;

/// A freshly generated DKIM key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct DkimKeyPair {
    /// PKCS#1 DER `RSAPrivateKey`. Secret: never log it.
    pub private_key_der: Vec<u8>,
    /// Base64 (standard, padded) of the DER `SubjectPublicKeyInfo`: the `p=`
    /// value of the DKIM TXT record.
    pub public_key_b64: String,
}

impl std::fmt::Debug for DkimKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKeyPair")
            .field("private_key_der", &"<redacted>")
            .field("public_key_b64", &self.public_key_b64)
            .finish()
    }
}

/// Why key generation or loading failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("RSA key generation failed")]
    Generate(#[source] rsa::Error),
    #[error("encoding the RSA private key as PKCS#1 failed")]
    EncodePrivate(#[source] rsa::pkcs1::Error),
    #[error("encoding the RSA public key as SubjectPublicKeyInfo failed")]
    EncodePublic(#[source] rsa::pkcs8::spki::Error),
    #[error("the stored private key is not a valid PKCS#1 RSA key")]
    Load(#[source] mail_auth::Error),
}

/// Generates an RSA-2048 key pair from the OS CSPRNG (`getrandom`).
///
/// Takes ~10–70 ms in release builds and up to ~1 s in debug builds: call it
/// off the async executor (`spawn_blocking`) on request paths.
pub fn generate_rsa_2048() -> Result<DkimKeyPair, KeyError> {
    let private =
        rsa::PrivateKey::new(&mut getrandom::SysRng, RSA_BITS).map_err(KeyError::Generate)?;
    let private_key_der = private
        .to_pkcs1_der()
        .map_err(KeyError::EncodePrivate)?
        .as_bytes()
        .to_vec();
    let public_der = private
        .to_public_key()
        .to_public_key_der()
        .map_err(KeyError::EncodePublic)?;
    Ok(DkimKeyPair {
        private_key_der,
        public_key_b64: STANDARD.encode(public_der.as_bytes()),
    })
}

/// The DKIM TXT record value: `v=DKIM1; k=rsa; p=<public_key_b64>`.
pub fn dns_txt_value(public_key_b64: &str) -> String {
    format!("v=DKIM1; k=rsa; p={public_key_b64}")
}

/// The selector for keys created on `date`: `e2aYYYYMM`, e.g. `e2a202507`.
pub fn selector_for(date: Date) -> String {
    format!("e2a{:04}{:02}", date.year(), u8::from(date.month()))
}

/// Loads a stored PKCS#1 DER private key as a `mail-auth` RSA-SHA256 signing
/// key (ring), for `mail_auth::dkim::DkimSigner`.
pub fn signing_key(private_key_der: &[u8]) -> Result<RsaKey<Sha256>, KeyError> {
    RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(
        private_key_der,
    )))
    .map_err(KeyError::Load)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn selector_and_txt_value() {
        assert_eq!(selector_for(date!(2025 - 07 - 01)), "e2a202507");
        assert_eq!(selector_for(date!(2031 - 12 - 31)), "e2a203112");
        assert_eq!(dns_txt_value("QUJD"), "v=DKIM1; k=rsa; p=QUJD");
    }

    #[test]
    fn garbage_private_key_is_an_error() {
        assert!(matches!(signing_key(b"not a key"), Err(KeyError::Load(_))));
    }
}
