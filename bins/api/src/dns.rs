//! The DNS probe behind `POST /v1/domains/{domain}/verify` (spec §3.9).
//!
//! Lookups go through the [`Resolver`] trait so tests inject answers; the
//! production implementation is [`SystemResolver`] (hickory, the system's
//! `resolv.conf`, one attempt with a short timeout, every lookup also
//! bounded by [`LOOKUP_TIMEOUT`]). Outside production nothing is looked up:
//! [`Probe::development`] passes everything, as the original did.
//!
//! Only the verification TXT decides verification; MX, SPF and DKIM are
//! diagnostics for the user.

use std::{future::Future, pin::Pin, time::Duration};

use e2a_store::domains::Domain;
use hickory_resolver::{TokioResolver, proto::rr::RData};
use serde::Serialize;

/// Upper bound on one lookup, whatever the resolver configuration says.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a lookup gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The name or record type does not exist.
    #[error("no such record")]
    NotFound,
    /// Timeout, SERVFAIL, network trouble, ….
    #[error("lookup failed: {0}")]
    Failed(String),
}

/// The future a [`Resolver`] lookup returns.
pub type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, LookupError>> + Send + 'a>>;

/// The DNS queries the probe needs. `name` is a domain without trailing dot.
pub trait Resolver: Send + Sync {
    /// The TXT records at `name`, each record's strings concatenated.
    fn txt<'a>(&'a self, name: &'a str) -> LookupFuture<'a>;
    /// The MX exchanges at `name`, without trailing dot.
    fn mx<'a>(&'a self, name: &'a str) -> LookupFuture<'a>;
}

/// The system resolver (hickory on tokio).
pub struct SystemResolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for SystemResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemResolver").finish_non_exhaustive()
    }
}

impl SystemResolver {
    /// Reads the system configuration; one attempt per server, short timeout.
    pub fn from_system_conf() -> Result<Self, e2a_runtime::BoxError> {
        let mut builder = TokioResolver::builder_tokio()?;
        let options = builder.options_mut();
        options.timeout = Duration::from_secs(2);
        options.attempts = 1;
        Ok(Self {
            inner: builder.build()?,
        })
    }

    async fn records(&self, name: &str, txt: bool) -> Result<Vec<String>, LookupError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = if txt {
            self.inner.txt_lookup(fqdn).await
        } else {
            self.inner.mx_lookup(fqdn).await
        };
        let lookup = lookup.map_err(|e| {
            if e.is_no_records_found() || e.is_nx_domain() {
                LookupError::NotFound
            } else {
                LookupError::Failed(e.to_string())
            }
        })?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                RData::MX(mx) => Some(mx.exchange.to_ascii().trim_end_matches('.').to_owned()),
                _ => None,
            })
            .collect())
    }
}

impl Resolver for SystemResolver {
    fn txt<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        Box::pin(self.records(name, true))
    }

    fn mx<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        Box::pin(self.records(name, false))
    }
}

/// A resolver that never answers; used where lookups are not made
/// (development mode).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoResolver;

impl Resolver for NoResolver {
    fn txt<'a>(&'a self, _name: &'a str) -> LookupFuture<'a> {
        Box::pin(async { Err(LookupError::NotFound) })
    }

    fn mx<'a>(&'a self, _name: &'a str) -> LookupFuture<'a> {
        Box::pin(async { Err(LookupError::NotFound) })
    }
}

/// The state of one published record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Published as expected.
    Found,
    /// Absent or different.
    Missing,
    /// Not checked (no DKIM key stored).
    Deferred,
}

/// What the probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// A TXT at the apex contains the verification token: this alone
    /// decides verification.
    pub txt_found: bool,
    /// An MX points at the mail host.
    pub mx: RecordState,
    /// An SPF TXT mentions the mail host.
    pub spf: RecordState,
    /// The DKIM TXT carries the stored public key.
    pub dkim: RecordState,
}

impl Probe {
    /// Development and test deployments: everything passes (DKIM only when
    /// a key is stored).
    pub fn development(domain: &Domain) -> Self {
        Self {
            txt_found: true,
            mx: RecordState::Found,
            spf: RecordState::Found,
            dkim: if domain.dkim_public_key.is_some() {
                RecordState::Found
            } else {
                RecordState::Deferred
            },
        }
    }

    /// Looks the records up (concurrently, each bounded by
    /// [`LOOKUP_TIMEOUT`]). `mail_host` is the MX target and SPF include.
    /// A failed lookup counts as a missing record.
    pub async fn run(resolver: &dyn Resolver, domain: &Domain, mail_host: &str) -> Self {
        let dkim_name = domain
            .dkim_selector
            .as_ref()
            .map(|sel| format!("{sel}._domainkey.{}", domain.domain));
        let (apex_txt, mx, dkim_txt) = tokio::join!(
            bounded(resolver.txt(&domain.domain)),
            bounded(resolver.mx(&domain.domain)),
            async {
                match &dkim_name {
                    Some(name) => bounded(resolver.txt(name)).await,
                    None => Vec::new(),
                }
            }
        );
        let host = mail_host.trim_end_matches('.').to_ascii_lowercase();
        let found = |ok: bool| {
            if ok {
                RecordState::Found
            } else {
                RecordState::Missing
            }
        };
        let txt_found = apex_txt
            .iter()
            .any(|t| t.contains(&domain.verification_token));
        let spf = found(apex_txt.iter().any(|t| {
            let t = t.trim().to_ascii_lowercase();
            t.starts_with("v=spf1") && t.contains(&host)
        }));
        let mx = found(
            mx.iter()
                .any(|m| m.trim_end_matches('.').eq_ignore_ascii_case(&host)),
        );
        let dkim = match &domain.dkim_public_key {
            None => RecordState::Deferred,
            Some(key) => found(dkim_txt.iter().any(|t| dkim_key(t) == Some(key.as_str()))),
        };
        Self {
            txt_found,
            mx,
            spf,
            dkim,
        }
    }
}

/// Awaits `fut` for at most [`LOOKUP_TIMEOUT`]; no answer is an empty list.
async fn bounded(fut: LookupFuture<'_>) -> Vec<String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, fut).await {
        Ok(Ok(records)) => records,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "dns lookup gave no answer");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!("dns lookup timed out");
            Vec::new()
        }
    }
}

/// The `p=` tag of a DKIM TXT record, whitespace removed.
fn dkim_key(record: &str) -> Option<&str> {
    record.split(';').find_map(|tag| {
        let (name, value) = tag.split_once('=')?;
        (name.trim() == "p").then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dkim_key_reads_the_p_tag() {
        assert_eq!(dkim_key("v=DKIM1; k=rsa; p=QUJD"), Some("QUJD"));
        assert_eq!(dkim_key("v=DKIM1;p= QUJD ;t=s"), Some("QUJD"));
        assert_eq!(dkim_key("v=DKIM1; k=rsa"), None);
    }
}
