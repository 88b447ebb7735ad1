//! SPF, DKIM and DMARC evaluation of an inbound message with `mail-auth`,
//! behind a resolver the caller injects (spec §6.6, with flaw 29 fixed).
//!
//! - **SPF** is evaluated on the **envelope** `MAIL FROM` domain, or on the
//!   HELO identity when the reverse-path is null — never on the `From` header.
//! - **DKIM**: every `DKIM-Signature` is verified; a signature carrying an
//!   `l=` (body length) tag is refused by policy and never counts as a pass.
//! - **DKIM**: at most [`MAX_DKIM_SIGNATURES`] signatures are verified,
//!   concurrently, each within what is left of the phase deadline; a
//!   signature that runs out of time counts as `temperror` and the others
//!   keep their results.
//! - **DMARC** is evaluated for every distinct RFC 5322 `From` domain (as
//!   `mail-auth` *and* `mail-parser` read the header block) from the SPF and
//!   DKIM results with identifier alignment (relaxed or strict as the policy
//!   says); the strictest outcome counts. [`AuthVerdict::verified`] is DMARC
//!   pass for a message with exactly one `From` mailbox on which both parsers
//!   agree (RFC 7489 §6.6.1).
//! - **Organisational domain**: `mail-auth` 0.13 implements DMARCbis
//!   (RFC 9989 §4.10): no Public Suffix List and no "last two labels" rule,
//!   but a DNS tree walk: `_dmarc.<name>` is queried for the author domain
//!   and then for its parents up to the TLD (at most eight queries: past
//!   seven labels it jumps to the last seven). The organisational domain is
//!   the name of a record with `psd=n`, else one label below a record with
//!   `psd=y`, else the shortest name that published a record. Relaxed
//!   alignment compares organisational domains found that way.
//!
//! Two resolvers: [`Authenticator::system`] (the system DNS with a short,
//! bounded timeout and a single attempt, so a dead DNS yields `temperror`
//! rather than a hang) and [`Authenticator::with_records`] (answers only from
//! an in-memory [`RecordCache`]; misses never reach the network).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::hickory_resolver::proto::rr::{Name, RData};
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DnsError, DnssecStatus, Error as MailAuthError, MX,
    MessageAuthenticator, Parameters, RecordSet, ResolverCache, SpfOutput, Txt,
};

/// Default per-lookup DNS timeout of the system resolver.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// Header name of DKIM signatures.
const DKIM_SIGNATURE: &[u8] = b"DKIM-Signature";

/// At most this many `DKIM-Signature` headers are verified per message, the
/// first ones in header order (the newest signatures are on top). Beyond it
/// a message costs no more key lookups; signatures past the cap count as
/// not passing.
pub const MAX_DKIM_SIGNATURES: usize = 10;

/// At most this many distinct `From` domains are evaluated for DMARC. A
/// message naming more is not evaluated (DMARC `permerror`) and
/// [`AuthVerdict::should_reject`] is true for it: RFC 5322 allows one
/// author field, and RFC 7489 §6.6.1 lets receivers reject such mail.
pub const MAX_DMARC_FROM_DOMAINS: usize = 5;

/// Why an [`Authenticator`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The system resolver configuration (`/etc/resolv.conf`) is unreadable.
    #[error("cannot read the system DNS configuration")]
    SystemConfig(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The resolver could not be built.
    #[error("cannot build the DNS resolver")]
    Resolver(#[source] mail_auth::hickory_resolver::net::NetError),
}

/// The SMTP-level facts the checks need, next to the raw message.
#[derive(Debug, Clone, Copy)]
pub struct AuthInput<'a> {
    /// The DATA payload as received.
    pub raw: &'a [u8],
    /// The connecting client's address.
    pub remote_ip: IpAddr,
    /// The EHLO/HELO argument.
    pub helo: &'a str,
    /// The envelope `MAIL FROM` address (without `<>`); empty for the null
    /// reverse-path.
    pub mail_from: &'a str,
    /// Our own host name (the SPF `%{r}` macro).
    pub local_host: &'a str,
}

/// SPF result (RFC 7208). `as_str` values are stored in a CHECK-constrained
/// column: pass, fail, softfail, neutral, none, temperror, permerror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl SpfResult {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }

    fn from_mail_auth(result: mail_auth::SpfResult) -> Self {
        match result {
            mail_auth::SpfResult::Pass => SpfResult::Pass,
            mail_auth::SpfResult::Fail => SpfResult::Fail,
            mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
            mail_auth::SpfResult::Neutral => SpfResult::Neutral,
            mail_auth::SpfResult::None => SpfResult::None,
            mail_auth::SpfResult::TempError => SpfResult::TempError,
            mail_auth::SpfResult::PermError => SpfResult::PermError,
        }
    }
}

/// Overall DKIM result of a message. `as_str` values are stored in a
/// CHECK-constrained column: pass, fail, policy, neutral, none, temperror,
/// permerror.
///
/// [`Authenticator::authenticate`] yields: `Pass` if any signature passes;
/// `None` if there is no `DKIM-Signature`; otherwise `TempError` if a key
/// lookup failed temporarily; `Policy` if every signature was refused by
/// local policy (an `l=` tag); `PermError` if every signature is malformed;
/// else `Fail`. `Neutral` is never produced but is a legal stored value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DkimResult {
    Pass,
    Fail,
    Policy,
    Neutral,
    None,
    TempError,
    PermError,
}

impl DkimResult {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DkimResult::Pass => "pass",
            DkimResult::Fail => "fail",
            DkimResult::Policy => "policy",
            DkimResult::Neutral => "neutral",
            DkimResult::None => "none",
            DkimResult::TempError => "temperror",
            DkimResult::PermError => "permerror",
        }
    }
}

/// DMARC result (RFC 7489 / DMARCbis). `as_str` values are stored in a
/// CHECK-constrained column: pass, fail, none, temperror, permerror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmarcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

impl DmarcResult {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcResult::Pass => "pass",
            DmarcResult::Fail => "fail",
            DmarcResult::None => "none",
            DmarcResult::TempError => "temperror",
            DmarcResult::PermError => "permerror",
        }
    }

    fn from_mail_auth(result: &mail_auth::DmarcResult) -> Self {
        match result {
            mail_auth::DmarcResult::Pass => DmarcResult::Pass,
            mail_auth::DmarcResult::Fail(_) => DmarcResult::Fail,
            mail_auth::DmarcResult::TempError(_) => DmarcResult::TempError,
            mail_auth::DmarcResult::PermError(_) => DmarcResult::PermError,
            mail_auth::DmarcResult::None => DmarcResult::None,
        }
    }
}

/// The policy the From domain's DMARC record asks receivers to apply
/// (already resolved for subdomains `sp=`/`np=` and lowered for `t=y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicy {
    /// `none`, `quarantine` or `reject`.
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

/// A DKIM signature that verified (and carried no `l=` tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimPass {
    /// The signing domain `d=`, lower-case, without a trailing dot.
    pub domain: String,
    /// The signed header names `h=`, lower-case, in signature order.
    pub signed_headers: Vec<String>,
}

impl DkimPass {
    /// True when `h=` covers the header `name` (case-insensitive).
    pub fn signs_header(&self, name: &str) -> bool {
        self.signed_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// The DMARC evaluation of one `From` domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcCheck {
    /// The `From` domain, lower-case, without a trailing dot.
    pub domain: String,
    pub result: DmarcResult,
    /// The policy of the record that applied (`sp=`/`np=` resolved, lowered
    /// for `t=y`); `None` without a record.
    pub policy: Option<DmarcPolicy>,
    /// The `pct=` of the record that applied (100 when absent; 0 when
    /// unreadable). `mail-auth` (DMARCbis) ignores `pct`, so it is looked up
    /// separately and only for a `fail` under `p=reject`; `None` otherwise,
    /// or when that lookup failed.
    pub pct: Option<u8>,
}

impl DmarcCheck {
    /// DMARC failed under `p=reject` with `pct=100`: the domain asks for
    /// every failing message to be rejected.
    pub fn asks_reject(&self) -> bool {
        self.result == DmarcResult::Fail
            && self.policy == Some(DmarcPolicy::Reject)
            && self.pct == Some(100)
    }

    /// The outcome cannot be known now: a temporary DNS error (or deadline),
    /// or a `p=reject` failure whose `pct=` could not be read.
    pub fn undecided(&self) -> bool {
        self.result == DmarcResult::TempError
            || (self.result == DmarcResult::Fail
                && self.policy == Some(DmarcPolicy::Reject)
                && self.pct.is_none())
    }
}

/// Everything the relay records about a message's authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthVerdict {
    pub spf: SpfResult,
    /// The domain SPF was evaluated for: the envelope `MAIL FROM` domain, or
    /// the HELO name for the null reverse-path.
    pub spf_domain: String,
    pub dkim: DkimResult,
    /// The strictest result over [`Self::dmarc_checks`]: `fail` if any
    /// failed, else `temperror`, `permerror`, `none`, and `pass` only if
    /// every From domain passed; `permerror` when more than
    /// [`MAX_DMARC_FROM_DOMAINS`] domains were named; `none` without a From
    /// domain.
    pub dmarc: DmarcResult,
    /// The strictest policy among the records that applied; `None` without
    /// a record.
    pub dmarc_policy: Option<DmarcPolicy>,
    /// The RFC 5322 `From` domain (of the first mailbox `mail-auth` read),
    /// lower-case.
    pub from_domain: Option<String>,
    /// Every passing signature, in header order.
    pub dkim_pass_domains: Vec<DkimPass>,
    /// The `From` mailbox addresses as `mail-auth` (the parser DMARC judged)
    /// read them, in order: spelled as written when `mail-parser` read the
    /// same ones, else lower-case.
    pub from_addresses: Vec<String>,
    /// How many `From` header fields `mail-auth` read.
    pub from_fields: usize,
    /// True when `mail-parser` (which every stored field comes from) read
    /// the same number of `From` fields and the same addresses,
    /// case-insensitively. A header block the two parsers read differently
    /// is never [`verified`](Self::verified).
    pub parsers_agree: bool,
    /// One DMARC evaluation per distinct From domain either parser read, in
    /// order of appearance (empty over [`MAX_DMARC_FROM_DOMAINS`]).
    pub dmarc_checks: Vec<DmarcCheck>,
    /// How many distinct From domains were not evaluated because there were
    /// more than [`MAX_DMARC_FROM_DOMAINS`] (0 normally).
    pub unjudged_from_domains: usize,
}

impl AuthVerdict {
    /// A verdict without any DNS lookup (`E2A_SMTP_AUTH_DNS=disabled`):
    /// SPF, DKIM and DMARC `none`, never verified, but the same `From`
    /// facts ([`Self::author`], [`Self::parsers_agree`]) as
    /// [`Authenticator::authenticate`] would record.
    pub fn unchecked(raw: &[u8]) -> Self {
        let message = AuthenticatedMessage::parse(raw);
        let from = FromFacts::of(message.as_ref(), raw);
        AuthVerdict {
            spf: SpfResult::None,
            spf_domain: String::new(),
            dkim: DkimResult::None,
            dmarc: DmarcResult::None,
            dmarc_policy: None,
            from_domain: from.first_domain(),
            dkim_pass_domains: Vec::new(),
            from_addresses: from.addresses,
            from_fields: from.fields,
            parsers_agree: from.agree,
            dmarc_checks: Vec::new(),
            unjudged_from_domains: 0,
        }
    }

    /// True iff DMARC passed, i.e. an SPF- or DKIM-authenticated identifier
    /// aligns with the `From` domain, **and** the message has exactly one
    /// `From` field holding exactly one mailbox, read the same by both
    /// parsers ([`Self::single_author`]). This is `X-E2A-Auth-Verified`.
    pub fn verified(&self) -> bool {
        self.dmarc == DmarcResult::Pass && self.single_author()
    }

    /// Exactly one `From` field with exactly one mailbox, and `mail-parser`
    /// agrees (RFC 7489 §6.6.1: anything else cannot be judged safely).
    pub fn single_author(&self) -> bool {
        self.from_fields == 1 && self.from_addresses.len() == 1 && self.parsers_agree
    }

    /// The sender to sign and store (`X-E2A-Auth-Sender`): the first `From`
    /// address of the parse DMARC judged, never an address only
    /// `mail-parser` saw. `None` without a `From` mailbox.
    pub fn author(&self) -> Option<&str> {
        self.from_addresses.first().map(String::as_str)
    }

    /// True iff an opted-in agent must refuse the message (`550 5.7.1`):
    /// some From domain failed DMARC under `p=reject` with `pct=100`
    /// (multiple From domains are judged by the strictest), or the message
    /// names more than [`MAX_DMARC_FROM_DOMAINS`] From domains. A `pct`
    /// below 100 (or `t=y`) never turns into a reject.
    pub fn should_reject(&self) -> bool {
        self.unjudged_from_domains > 0 || self.dmarc_checks.iter().any(DmarcCheck::asks_reject)
    }

    /// True iff an opted-in agent cannot decide now and the sender should
    /// retry (`451`): not [`Self::should_reject`], and some From domain's
    /// DMARC is `temperror` (DNS failure or deadline), or failed under
    /// `p=reject` with a `pct=` that could not be read.
    pub fn should_defer(&self) -> bool {
        !self.should_reject() && self.dmarc_checks.iter().any(DmarcCheck::undecided)
    }

    /// `spf=<s>; dkim=<s>; dmarc=<s>`, the `X-E2A-Auth-Domain-Check` value.
    pub fn domain_check(&self) -> String {
        format!(
            "spf={}; dkim={}; dmarc={}",
            self.spf.as_str(),
            self.dkim.as_str(),
            self.dmarc.as_str()
        )
    }
}

/// The `From` fields as both parsers read them.
struct FromFacts {
    addresses: Vec<String>,
    fields: usize,
    agree: bool,
    /// Distinct domains of either parser's addresses, lower-case, in order.
    domains: Vec<String>,
}

impl FromFacts {
    fn of(message: Option<&AuthenticatedMessage<'_>>, raw: &[u8]) -> Self {
        let parser = crate::parse::from_fields(raw);
        let (auth_addresses, auth_fields): (Vec<String>, usize) = match message {
            Some(m) => (
                m.from
                    .iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect(),
                m.headers
                    .iter()
                    .filter(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(b"From"))
                    .count(),
            ),
            None => (Vec::new(), 0),
        };
        let agree = auth_fields == parser.fields
            && auth_addresses.len() == parser.addresses.len()
            && auth_addresses
                .iter()
                .zip(&parser.addresses)
                .all(|(a, p)| a.eq_ignore_ascii_case(p));
        let mut domains: Vec<String> = Vec::new();
        for address in auth_addresses.iter().chain(&parser.addresses) {
            if let Some(domain) = address_domain(address)
                && !domains.contains(&domain)
            {
                domains.push(domain);
            }
        }
        FromFacts {
            addresses: if agree {
                parser.addresses
            } else {
                auth_addresses
            },
            fields: auth_fields,
            agree,
            domains,
        }
    }

    fn first_domain(&self) -> Option<String> {
        self.addresses.iter().find_map(|a| address_domain(a))
    }
}

/// The lower-case domain of `address` without a trailing dot, if any.
fn address_domain(address: &str) -> Option<String> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim().trim_end_matches('.').to_lowercase())
        .filter(|d| !d.is_empty())
}

/// DNS answers held in memory, consulted before the resolver.
///
/// For [`Authenticator::with_records`] it is the whole zone: a TXT name that
/// was not recorded answers NXDOMAIN, and A/AAAA/MX/PTR misses go to a
/// resolver pointed at `127.0.0.1:1`, which fails at once (`temperror`).
/// Names are normalised to lower-case FQDNs. Answers from the real resolver
/// are never stored here.
pub struct RecordCache {
    txt: MemCache<Box<str>, Txt>,
    /// The text of each recorded TXT value, for what `mail-auth` does not
    /// keep (a DMARC record's `pct=`).
    raw_txt: Mutex<HashMap<Box<str>, Box<str>>>,
    mx: MemCache<Box<str>, RecordSet<MX>>,
    ipv4: MemCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: MemCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: MemCache<IpAddr, RecordSet<Box<str>>>,
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCache")
            .field("txt_names", &self.txt.len())
            .finish_non_exhaustive()
    }
}

impl Default for RecordCache {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordCache {
    /// An empty, authoritative record set: unrecorded TXT names are NXDOMAIN.
    pub fn new() -> Self {
        Self::with_txt_miss(Some(Txt::Error(nxdomain())))
    }

    /// An empty pass-through cache: every miss goes to the resolver.
    fn pass_through() -> Self {
        Self::with_txt_miss(None)
    }

    fn with_txt_miss(miss: Option<Txt>) -> Self {
        RecordCache {
            txt: MemCache::new(miss),
            raw_txt: Mutex::new(HashMap::new()),
            mx: MemCache::new(None),
            ipv4: MemCache::new(None),
            ipv6: MemCache::new(None),
            ptr: MemCache::new(None),
        }
    }

    /// Records a TXT record at `name`, parsed by what the name says it is:
    /// `_dmarc.<domain>` as DMARC, `<selector>._domainkey.<domain>` as a DKIM key, anything else as
    /// SPF (a value not starting with `v=spf1` reads as "no SPF record"). An
    /// unparsable value is stored as the parse error, as a real lookup would.
    pub fn txt(&self, name: &str, value: &str) -> &Self {
        let fqdn = fqdn(name);
        let bytes = value.as_bytes();
        let record: Txt = if fqdn.starts_with("_dmarc.") {
            Dmarc::parse(bytes).into()
        } else if fqdn.contains("._domainkey.") {
            DomainKey::parse(bytes).into()
        } else if value
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("v=spf1")
        {
            Spf::parse(bytes).into()
        } else {
            Txt::Error(MailAuthError::Dns(DnsError::InvalidRecordType))
        };
        self.raw_txt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fqdn.clone(), value.into());
        self.txt.put(fqdn, record);
        self
    }

    /// Makes TXT lookups of `name` go to the authenticator's resolver
    /// instead of this cache (with [`Authenticator::with_records_via`], to a
    /// name server the caller runs, e.g. one that never answers).
    pub fn forward(&self, name: &str) -> &Self {
        let fqdn = fqdn(name);
        self.raw_txt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fqdn);
        self.txt.forward(fqdn);
        self
    }

    /// The recorded TXT strings at `fqdn`: `None` when the resolver must be
    /// asked, else what a lookup would answer.
    fn raw(&self, fqdn: &str) -> Option<Result<Vec<Vec<u8>>, MailAuthError>> {
        match self.txt.get(fqdn)? {
            Txt::Error(
                e @ MailAuthError::Dns(DnsError::RecordNotFound(_) | DnsError::Resolver(_)),
            ) => Some(Err(e)),
            _ => Some(Ok(self
                .raw_txt
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(fqdn)
                .map(|v| vec![v.as_bytes().to_vec()])
                .unwrap_or_default())),
        }
    }

    /// Records the SPF policy of `domain`.
    pub fn spf(&self, domain: &str, record: &str) -> &Self {
        self.txt(domain, record)
    }

    /// Records a DKIM key at `<selector>._domainkey.<domain>`.
    pub fn dkim(&self, selector: &str, domain: &str, record: &str) -> &Self {
        self.txt(&format!("{selector}._domainkey.{domain}"), record)
    }

    /// Records the DMARC policy at `_dmarc.<domain>`.
    pub fn dmarc(&self, domain: &str, record: &str) -> &Self {
        self.txt(&format!("_dmarc.{domain}"), record)
    }

    /// Makes TXT lookups of `name` answer NXDOMAIN.
    pub fn nxdomain(&self, name: &str) -> &Self {
        self.txt.put(fqdn(name), Txt::Error(nxdomain()));
        self
    }

    /// Makes TXT lookups of `name` fail temporarily (SERVFAIL/timeout).
    pub fn temp_error(&self, name: &str) -> &Self {
        self.raw_txt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fqdn(name));
        self.txt.put(
            fqdn(name),
            Txt::Error(MailAuthError::Dns(DnsError::Resolver(
                "recorded temporary failure".to_string(),
            ))),
        );
        self
    }

    /// Records the A records of `name`.
    pub fn a(&self, name: &str, addrs: &[Ipv4Addr]) -> &Self {
        self.ipv4.put(fqdn(name), record_set(addrs.to_vec()));
        self
    }

    /// Records the AAAA records of `name`.
    pub fn aaaa(&self, name: &str, addrs: &[Ipv6Addr]) -> &Self {
        self.ipv6.put(fqdn(name), record_set(addrs.to_vec()));
        self
    }

    /// Records the MX records of `name` as `(preference, exchange)` pairs.
    pub fn mx(&self, name: &str, exchanges: &[(u16, &str)]) -> &Self {
        let mut by_pref: Vec<(u16, Vec<Box<str>>)> = Vec::new();
        for &(pref, exchange) in exchanges {
            let exchange: Box<str> = fqdn(exchange);
            match by_pref.iter_mut().find(|(p, _)| *p == pref) {
                Some((_, list)) => list.push(exchange),
                None => by_pref.push((pref, vec![exchange])),
            }
        }
        by_pref.sort_unstable_by_key(|(p, _)| *p);
        let mx: Vec<MX> = by_pref
            .into_iter()
            .map(|(preference, exchanges)| MX {
                preference,
                exchanges: exchanges.into_boxed_slice(),
            })
            .collect();
        self.mx.put(fqdn(name), record_set(mx));
        self
    }

    /// Records the PTR names of `ip`.
    pub fn ptr(&self, ip: IpAddr, names: &[&str]) -> &Self {
        self.ptr
            .put(ip, record_set(names.iter().map(|n| fqdn(n)).collect()));
        self
    }
}

fn fqdn(name: &str) -> Box<str> {
    name.trim().to_fqdn().into_owned().into_boxed_str()
}

fn nxdomain() -> MailAuthError {
    MailAuthError::Dns(DnsError::RecordNotFound(ResponseCode::NXDomain))
}

fn record_set<T>(items: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: Arc::from(items.into_boxed_slice()),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

/// One record type's answers; `miss` is what an unknown name answers
/// (`None` = ask the resolver). mail-auth's inserts are ignored so nothing
/// grows without bound.
struct MemCache<K, V> {
    map: Mutex<HashMap<K, V>>,
    /// Names always left to the resolver.
    forwarded: Mutex<std::collections::HashSet<K>>,
    miss: Option<V>,
}

impl<K: Hash + Eq, V: Clone> MemCache<K, V> {
    fn new(miss: Option<V>) -> Self {
        MemCache {
            map: Mutex::new(HashMap::new()),
            forwarded: Mutex::new(std::collections::HashSet::new()),
            miss,
        }
    }

    fn forward(&self, key: K) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.forwarded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
    }

    fn put(&self, key: K, value: V) {
        self.forwarded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, value);
    }

    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for MemCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self
            .forwarded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
        {
            return None;
        }
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .or_else(|| self.miss.clone())
    }

    fn remove<Q>(&self, _name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _key: K, _value: V, _valid_until: Instant) {}
}

/// SPF/DKIM/DMARC evaluator. Cheap to share behind an `Arc`; `Send + Sync`.
pub struct Authenticator {
    resolver: MessageAuthenticator,
    records: RecordCache,
    phase_deadline: Duration,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("records", &self.records)
            .field("phase_deadline", &self.phase_deadline)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// The system DNS (`/etc/resolv.conf`) with `timeout` per query, a single
    /// attempt and no TCP retry. Each of the SPF, DKIM and DMARC phases is
    /// further bounded by `4 × timeout` in total, after which it reports
    /// `temperror`.
    pub fn system(timeout: Duration) -> Result<Self, AuthError> {
        let (config, opts) = mail_auth::hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| AuthError::SystemConfig(Box::new(e)))?;
        Self::build(config, opts, timeout, RecordCache::pass_through())
    }

    /// Answers only from `records`; misses never leave the machine (see
    /// [`RecordCache`]). For tests and offline tools.
    pub fn with_records(records: RecordCache) -> Result<Self, AuthError> {
        Self::with_records_via(records, SocketAddr::from((Ipv4Addr::LOCALHOST, 1)))
    }

    /// Like [`Self::with_records`], but what the records do not answer (and
    /// names marked with [`RecordCache::forward`]) is asked of the UDP name
    /// server at `nameserver`, 200 ms per query. For tests that need a slow
    /// or silent server.
    pub fn with_records_via(
        records: RecordCache,
        nameserver: SocketAddr,
    ) -> Result<Self, AuthError> {
        let mut ns = NameServerConfig::udp(nameserver.ip());
        for connection in &mut ns.connections {
            connection.port = nameserver.port();
        }
        let config = ResolverConfig::from_name_servers(vec![ns]);
        Self::build(
            config,
            ResolverOpts::default(),
            Duration::from_millis(200),
            records,
        )
    }

    fn build(
        config: ResolverConfig,
        mut opts: ResolverOpts,
        timeout: Duration,
        records: RecordCache,
    ) -> Result<Self, AuthError> {
        opts.timeout = timeout;
        opts.attempts = 0; // retries after the first try
        opts.try_tcp_on_error = false;
        opts.num_concurrent_reqs = 1;
        let resolver = MessageAuthenticator::new(config, opts).map_err(AuthError::Resolver)?;
        Ok(Authenticator {
            resolver,
            records,
            phase_deadline: timeout.saturating_mul(4),
        })
    }

    /// Overrides the per-phase deadline (default `4 ×` the query timeout).
    pub fn with_phase_deadline(mut self, deadline: Duration) -> Self {
        self.phase_deadline = deadline;
        self
    }

    /// The in-memory records consulted before DNS.
    pub fn records(&self) -> &RecordCache {
        &self.records
    }

    #[allow(clippy::type_complexity)]
    fn params<P>(
        &self,
        params: P,
    ) -> Parameters<
        '_,
        P,
        MemCache<Box<str>, Txt>,
        MemCache<Box<str>, RecordSet<MX>>,
        MemCache<Box<str>, RecordSet<Ipv4Addr>>,
        MemCache<Box<str>, RecordSet<Ipv6Addr>>,
        MemCache<IpAddr, RecordSet<Box<str>>>,
    > {
        Parameters::new(params)
            .with_txt_cache(&self.records.txt)
            .with_mx_cache(&self.records.mx)
            .with_ipv4_cache(&self.records.ipv4)
            .with_ipv6_cache(&self.records.ipv6)
            .with_ptr_cache(&self.records.ptr)
    }

    /// Evaluates SPF (envelope identity), every DKIM signature and DMARC for
    /// the `From` domain. Never fails: DNS trouble shows as `temperror`, an
    /// unparsable message as DKIM/DMARC `none`. Bounded in time by three
    /// phase deadlines.
    pub async fn authenticate(&self, input: &AuthInput<'_>) -> AuthVerdict {
        let helo = input.helo.trim().trim_end_matches('.');
        let mail_from = input
            .mail_from
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>');
        let local_host = input.local_host.trim();

        // SPF on the envelope: MAIL FROM, or the HELO identity for <>.
        let spf_params = if mail_from.is_empty() {
            SpfParameters::verify_ehlo(input.remote_ip, helo, local_host)
        } else {
            SpfParameters::verify_mail_from(input.remote_ip, helo, local_host, mail_from)
        };
        let envelope_domain = if mail_from.is_empty() {
            helo.to_string()
        } else {
            mail_from
                .rsplit_once('@')
                .map_or(helo, |(_, d)| d)
                .trim_end_matches('.')
                .to_string()
        };
        let spf_output = match tokio::time::timeout(
            self.phase_deadline,
            self.resolver.verify_spf(self.params(spf_params)),
        )
        .await
        {
            Ok(output) => output,
            Err(_) => {
                SpfOutput::new(envelope_domain.clone()).with_result(mail_auth::SpfResult::TempError)
            }
        };
        let spf = SpfResult::from_mail_auth(spf_output.result());
        let spf_domain = spf_output.domain().to_ascii_lowercase();

        // Header parsing and the DKIM body hashes (one per canonicalization
        // the signatures ask for) are the CPU-heavy part: off the executor.
        let (message, from) = crate::cpu::run_for(input.raw.len(), || {
            let message = AuthenticatedMessage::parse(input.raw);
            let from = FromFacts::of(message.as_ref(), input.raw);
            (message, from)
        })
        .await;
        let Some(message) = message else {
            return AuthVerdict {
                spf,
                spf_domain,
                dkim: DkimResult::None,
                dmarc: DmarcResult::None,
                dmarc_policy: None,
                from_domain: from.first_domain(),
                dkim_pass_domains: Vec::new(),
                from_addresses: from.addresses,
                from_fields: from.fields,
                parsers_agree: from.agree,
                dmarc_checks: Vec::new(),
                unjudged_from_domains: 0,
            };
        };

        // DKIM: the first MAX_DKIM_SIGNATURES signatures, each on its own
        // (a copy of the message carrying only that signature), all at once
        // and each within the phase deadline, so a slow key costs only its
        // own result. l= signatures are refused by policy, never verified.
        let census = SignatureCensus::of(&message);
        let base = AuthenticatedMessage {
            dkim_headers: Vec::new(),
            errors: Vec::new(),
            ..message.clone()
        };
        let singles: Vec<AuthenticatedMessage<'_>> = message
            .dkim_headers
            .iter()
            .filter(|h| !census.is_refused(&h.header))
            .take(MAX_DKIM_SIGNATURES)
            .map(|h| AuthenticatedMessage {
                dkim_headers: vec![h.clone()],
                ..base.clone()
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.phase_deadline;
        let mut dkim_outputs: Vec<DkimOutput<'_>> = join_all(
            singles
                .iter()
                .map(|single| self.verify_signature(single, deadline)),
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        dkim_outputs.extend(
            message
                .dkim_headers
                .iter()
                .filter(|h| census.is_refused(&h.header))
                .map(|h| {
                    DkimOutput::fail(MailAuthError::Dkim(DkimError::SignatureLength))
                        .with_signature(&h.header)
                }),
        );
        let dkim_pass_domains: Vec<DkimPass> = dkim_outputs
            .iter()
            .filter(|o| matches!(o.result(), mail_auth::DkimResult::Pass))
            .filter_map(|o| o.signature())
            .map(|sig| DkimPass {
                domain: sig.d.trim().trim_end_matches('.').to_ascii_lowercase(),
                signed_headers: sig
                    .h
                    .iter()
                    .map(|h| h.trim().to_ascii_lowercase())
                    .collect(),
            })
            .collect();
        let any_temp = dkim_outputs
            .iter()
            .any(|o| matches!(o.result(), mail_auth::DkimResult::TempError(_)));
        let dkim = if !dkim_pass_domains.is_empty() {
            DkimResult::Pass
        } else if census.total == 0 {
            DkimResult::None
        } else if any_temp {
            DkimResult::TempError
        } else if census.policy == census.total {
            DkimResult::Policy
        } else if census.malformed == census.total {
            DkimResult::PermError
        } else {
            DkimResult::Fail
        };

        // DMARC for every distinct From domain either parser read, all at
        // once within one phase deadline; the strictest outcome counts.
        let unjudged_from_domains = if from.domains.len() > MAX_DMARC_FROM_DOMAINS {
            from.domains.len()
        } else {
            0
        };
        let dmarc_checks: Vec<DmarcCheck> = if unjudged_from_domains > 0 {
            Vec::new()
        } else {
            let deadline = tokio::time::Instant::now() + self.phase_deadline;
            join_all(from.domains.iter().map(|domain| {
                self.dmarc_for(
                    domain,
                    &dkim_outputs,
                    &envelope_domain,
                    &spf_output,
                    deadline,
                )
            }))
            .await
        };
        let dmarc = if unjudged_from_domains > 0 {
            DmarcResult::PermError
        } else {
            dmarc_checks
                .iter()
                .map(|c| c.result)
                .min_by_key(|r| match r {
                    DmarcResult::Fail => 0,
                    DmarcResult::TempError => 1,
                    DmarcResult::PermError => 2,
                    DmarcResult::None => 3,
                    DmarcResult::Pass => 4,
                })
                .unwrap_or(DmarcResult::None)
        };
        let dmarc_policy = dmarc_checks
            .iter()
            .filter_map(|c| c.policy)
            .max_by_key(|p| match p {
                DmarcPolicy::None => 0,
                DmarcPolicy::Quarantine => 1,
                DmarcPolicy::Reject => 2,
            });

        AuthVerdict {
            spf,
            spf_domain,
            dkim,
            dmarc,
            dmarc_policy,
            from_domain: from.first_domain(),
            dkim_pass_domains,
            from_addresses: from.addresses,
            from_fields: from.fields,
            parsers_agree: from.agree,
            dmarc_checks,
            unjudged_from_domains,
        }
    }

    /// Verifies the one signature of `single` before `deadline`; past it the
    /// signature is `temperror` (so DMARC can neither pass nor fail on it
    /// if it aligns). `None` only if `mail-auth` reported nothing.
    async fn verify_signature<'m>(
        &'m self,
        single: &'m AuthenticatedMessage<'m>,
        deadline: tokio::time::Instant,
    ) -> Option<DkimOutput<'m>> {
        let signature = &single.dkim_headers.first()?.header;
        match tokio::time::timeout_at(deadline, self.resolver.verify_dkim(self.params(single)))
            .await
        {
            Ok(outputs) => outputs.into_iter().find(|o| o.signature().is_some()),
            Err(_) => Some(DkimOutput::temp_err(deadline_error("DKIM")).with_signature(signature)),
        }
    }

    /// DMARC for `domain` alone (as if it were the only From domain), with
    /// the `pct=` of its record looked up when it fails under `p=reject`.
    /// Past `deadline`: `temperror`.
    async fn dmarc_for<'m>(
        &'m self,
        domain: &str,
        dkim_outputs: &'m [DkimOutput<'m>],
        envelope_domain: &'m str,
        spf_output: &'m SpfOutput,
        deadline: tokio::time::Instant,
    ) -> DmarcCheck {
        let check = async {
            let author = AuthenticatedMessage {
                from: vec![format!("postmaster@{domain}")],
                ..AuthenticatedMessage::default()
            };
            let output = self
                .resolver
                .verify_dmarc(self.params(DmarcParameters::new(
                    &author,
                    dkim_outputs,
                    envelope_domain,
                    spf_output,
                )))
                .await;
            let result = DmarcResult::from_mail_auth(&output.result());
            let policy = output.dmarc_record().map(|_| match output.policy() {
                Policy::Reject => DmarcPolicy::Reject,
                Policy::Quarantine => DmarcPolicy::Quarantine,
                Policy::None | Policy::Unspecified => DmarcPolicy::None,
            });
            let pct = match (result, policy, output.dmarc_record()) {
                (DmarcResult::Fail, Some(DmarcPolicy::Reject), Some(record)) => {
                    self.dmarc_pct(domain, record).await
                }
                _ => None,
            };
            DmarcCheck {
                domain: domain.to_string(),
                result,
                policy,
                pct,
            }
        };
        tokio::time::timeout_at(deadline, check)
            .await
            .unwrap_or_else(|_| DmarcCheck {
                domain: domain.to_string(),
                result: DmarcResult::TempError,
                policy: None,
                pct: None,
            })
    }

    /// The `pct=` of `record`, the DMARC record `mail-auth` applied to
    /// `domain`: the same DNS tree walk (RFC 9989 §4.10) over raw TXT
    /// answers, the smallest `pct` among the records equal to `record`.
    /// `None` when a lookup failed or no equal record was found.
    async fn dmarc_pct(&self, domain: &str, record: &Dmarc) -> Option<u8> {
        let mut pct: Option<u8> = None;
        for name in tree_walk(domain) {
            let answers = match self.raw_txt(&format!("_dmarc.{name}")).await {
                Ok(answers) => answers,
                Err(MailAuthError::Dns(DnsError::RecordNotFound(_))) => continue,
                Err(_) => return None,
            };
            for text in answers {
                if Dmarc::parse(&text).is_ok_and(|parsed| parsed == *record) {
                    let value = record_pct(&text);
                    pct = Some(pct.map_or(value, |p| p.min(value)));
                }
            }
        }
        pct
    }

    /// The TXT strings at `name` (each record's strings joined), from the
    /// records when they answer for it, else from the resolver.
    async fn raw_txt(&self, name: &str) -> Result<Vec<Vec<u8>>, MailAuthError> {
        let fqdn = fqdn(name);
        if let Some(recorded) = self.records.raw(&fqdn) {
            return recorded;
        }
        let lookup = self
            .resolver
            .0
            .txt_lookup(Name::from_str_relaxed::<&str>(&fqdn)?)
            .await?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => Some(txt.txt_data.concat()),
                _ => None,
            })
            .collect())
    }
}

/// The names a DMARC tree walk queries for `domain` (RFC 9989 §4.10, as
/// `mail-auth` does it): the domain itself, then its parents down to the
/// TLD, jumping to seven labels first when it has eight or more.
fn tree_walk(domain: &str) -> Vec<&str> {
    let labels: Vec<usize> = std::iter::once(0)
        .chain(domain.match_indices('.').map(|(i, _)| i + 1))
        .collect();
    let total = labels.len();
    let mut names = Vec::new();
    if total < 2 {
        return names;
    }
    let mut count = total;
    loop {
        names.push(&domain[labels[total - count]..]);
        if count == 1 {
            break;
        }
        count = if count >= 8 { 7 } else { count - 1 };
    }
    names
}

/// The `pct=` tag of a DMARC record's text: 100 when absent, 0 when not an
/// integer from 0 to 100 (a value we cannot read never leads to a reject).
fn record_pct(text: &[u8]) -> u8 {
    let text = String::from_utf8_lossy(text);
    text.split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("pct"))
        .map_or(100, |(_, value)| {
            value
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|v| *v <= 100)
                .unwrap_or(0)
        })
}

/// The error recorded for a check that ran out of its phase deadline.
fn deadline_error(phase: &str) -> MailAuthError {
    MailAuthError::Dns(DnsError::Resolver(format!(
        "{phase} phase deadline exceeded"
    )))
}

/// Runs `futures` concurrently on the current task and returns their
/// outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// How many `DKIM-Signature` headers a message has and why some cannot pass.
struct SignatureCensus {
    total: usize,
    policy: usize,
    malformed: usize,
    /// Addresses (compared, never dereferenced) of the parsed signatures
    /// that carry an `l=` tag.
    l_tagged: Vec<usize>,
}

impl SignatureCensus {
    fn of(message: &AuthenticatedMessage<'_>) -> Self {
        let mut census = SignatureCensus {
            total: message.dkim_headers.len(),
            policy: 0,
            malformed: 0,
            l_tagged: Vec::new(),
        };
        for header in &message.dkim_headers {
            if header.header.l != 0 || has_l_tag(header.value) {
                census.policy += 1;
                census
                    .l_tagged
                    .push(std::ptr::from_ref(&header.header).addr());
            }
        }
        for error in &message.errors {
            if !error.name.eq_ignore_ascii_case(DKIM_SIGNATURE) {
                continue;
            }
            census.total += 1;
            if matches!(
                error.header,
                MailAuthError::Dkim(DkimError::SignatureLength)
            ) || has_l_tag(error.value)
            {
                census.policy += 1;
            } else {
                census.malformed += 1;
            }
        }
        census
    }

    /// True when `sig` carries an `l=` tag and is refused by policy.
    fn is_refused(&self, sig: &mail_auth::dkim::Signature) -> bool {
        sig.l != 0 || self.l_tagged.contains(&std::ptr::from_ref(sig).addr())
    }
}

/// True when a `DKIM-Signature` value has an `l=` tag.
fn has_l_tag(value: &[u8]) -> bool {
    value.split(|&b| b == b';').any(|tag| {
        let tag = tag.trim_ascii();
        tag.split(|&b| b == b'=')
            .next()
            .is_some_and(|name| name.trim_ascii() == b"l")
            && tag.contains(&b'=')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l_tag_detection() {
        assert!(has_l_tag(b"v=1; a=rsa-sha256; l=0; d=x"));
        assert!(has_l_tag(b"v=1;\r\n\tl = 120 ;d=x"));
        assert!(!has_l_tag(b"v=1; a=rsa-sha256; d=l.example; h=from:l"));
        assert!(!has_l_tag(b"v=1; bl=3"));
        assert!(!has_l_tag(b""));
    }

    #[test]
    fn stored_strings_match_the_check_constraints() {
        let spf: Vec<&str> = [
            SpfResult::Pass,
            SpfResult::Fail,
            SpfResult::SoftFail,
            SpfResult::Neutral,
            SpfResult::None,
            SpfResult::TempError,
            SpfResult::PermError,
        ]
        .map(SpfResult::as_str)
        .to_vec();
        assert_eq!(
            spf,
            [
                "pass",
                "fail",
                "softfail",
                "neutral",
                "none",
                "temperror",
                "permerror"
            ]
        );
        let dkim: Vec<&str> = [
            DkimResult::Pass,
            DkimResult::Fail,
            DkimResult::Policy,
            DkimResult::Neutral,
            DkimResult::None,
            DkimResult::TempError,
            DkimResult::PermError,
        ]
        .map(DkimResult::as_str)
        .to_vec();
        assert_eq!(
            dkim,
            [
                "pass",
                "fail",
                "policy",
                "neutral",
                "none",
                "temperror",
                "permerror"
            ]
        );
        let dmarc: Vec<&str> = [
            DmarcResult::Pass,
            DmarcResult::Fail,
            DmarcResult::None,
            DmarcResult::TempError,
            DmarcResult::PermError,
        ]
        .map(DmarcResult::as_str)
        .to_vec();
        assert_eq!(dmarc, ["pass", "fail", "none", "temperror", "permerror"]);
        assert_eq!(
            [
                DmarcPolicy::None,
                DmarcPolicy::Quarantine,
                DmarcPolicy::Reject
            ]
            .map(DmarcPolicy::as_str),
            ["none", "quarantine", "reject"]
        );
    }

    fn check(result: DmarcResult, policy: Option<DmarcPolicy>, pct: Option<u8>) -> DmarcCheck {
        DmarcCheck {
            domain: "a.example".into(),
            result,
            policy,
            pct,
        }
    }

    #[test]
    fn verified_and_should_reject_follow_dmarc() {
        let mut v = AuthVerdict {
            spf: SpfResult::Pass,
            spf_domain: "a.example".into(),
            dkim: DkimResult::Pass,
            dmarc: DmarcResult::None,
            dmarc_policy: None,
            from_domain: Some("a.example".into()),
            dkim_pass_domains: Vec::new(),
            from_addresses: vec!["ceo@a.example".into()],
            from_fields: 1,
            parsers_agree: true,
            dmarc_checks: vec![check(DmarcResult::None, None, None)],
            unjudged_from_domains: 0,
        };
        assert!(
            !v.verified(),
            "SPF and DKIM pass without DMARC is not verified"
        );
        v.dmarc = DmarcResult::Pass;
        assert!(v.verified());
        assert_eq!(v.author(), Some("ceo@a.example"));
        v.dmarc_checks = vec![check(
            DmarcResult::Fail,
            Some(DmarcPolicy::Quarantine),
            None,
        )];
        assert!(!v.should_reject());
        assert!(!v.should_defer());
        v.dmarc_checks = vec![check(
            DmarcResult::Fail,
            Some(DmarcPolicy::Reject),
            Some(100),
        )];
        assert!(v.should_reject());
        assert!(!v.should_defer());
        v.dmarc_checks = vec![check(DmarcResult::TempError, None, None)];
        assert!(!v.should_reject());
        assert!(v.should_defer());
        v.dmarc = DmarcResult::TempError;
        assert_eq!(v.domain_check(), "spf=pass; dkim=pass; dmarc=temperror");
    }

    #[test]
    fn only_one_agreed_from_mailbox_can_be_verified() {
        let single = AuthVerdict {
            spf: SpfResult::Pass,
            spf_domain: "a.example".into(),
            dkim: DkimResult::None,
            dmarc: DmarcResult::Pass,
            dmarc_policy: Some(DmarcPolicy::None),
            from_domain: Some("a.example".into()),
            dkim_pass_domains: Vec::new(),
            from_addresses: vec!["x@a.example".into()],
            from_fields: 1,
            parsers_agree: true,
            dmarc_checks: vec![check(DmarcResult::Pass, Some(DmarcPolicy::None), None)],
            unjudged_from_domains: 0,
        };
        assert!(single.verified());
        let disagreeing = AuthVerdict {
            parsers_agree: false,
            ..single.clone()
        };
        assert!(!disagreeing.verified());
        let two_fields = AuthVerdict {
            from_fields: 2,
            ..single.clone()
        };
        assert!(!two_fields.verified());
        let two_mailboxes = AuthVerdict {
            from_addresses: vec!["x@a.example".into(), "y@a.example".into()],
            ..single.clone()
        };
        assert!(!two_mailboxes.verified());
        let none = AuthVerdict {
            from_addresses: Vec::new(),
            ..single
        };
        assert!(!none.verified());
        assert_eq!(none.author(), None);
    }

    #[test]
    fn strictest_check_decides_and_pct_below_100_never_rejects() {
        let mut v = AuthVerdict::unchecked(b"From: a@a.example\r\n\r\nhi");
        v.dmarc_checks = vec![
            check(DmarcResult::Pass, Some(DmarcPolicy::None), None),
            check(DmarcResult::Fail, Some(DmarcPolicy::Reject), Some(100)),
        ];
        assert!(v.should_reject());
        v.dmarc_checks[1].pct = Some(99);
        assert!(!v.should_reject());
        assert!(!v.should_defer());
        v.dmarc_checks[1].pct = None;
        assert!(!v.should_reject());
        assert!(v.should_defer(), "a pct we could not read is undecided");
        v.dmarc_checks.push(check(
            DmarcResult::Fail,
            Some(DmarcPolicy::Reject),
            Some(100),
        ));
        assert!(v.should_reject());
        assert!(!v.should_defer(), "reject wins over defer");
        v.dmarc_checks.clear();
        v.unjudged_from_domains = MAX_DMARC_FROM_DOMAINS + 1;
        assert!(v.should_reject());
    }

    #[test]
    fn pct_tags_are_read_conservatively() {
        assert_eq!(record_pct(b"v=DMARC1; p=reject"), 100);
        assert_eq!(record_pct(b"v=DMARC1; p=reject; pct=100"), 100);
        assert_eq!(record_pct(b"v=DMARC1; p=reject; PCT = 25 ;"), 25);
        assert_eq!(record_pct(b"v=DMARC1; p=reject; pct=0"), 0);
        assert_eq!(record_pct(b"v=DMARC1; p=reject; pct=101"), 0);
        assert_eq!(record_pct(b"v=DMARC1; p=reject; pct=half"), 0);
    }

    #[test]
    fn tree_walk_names_match_mail_auth() {
        assert_eq!(
            tree_walk("a.b.example.com"),
            ["a.b.example.com", "b.example.com", "example.com", "com"]
        );
        assert_eq!(tree_walk("com"), Vec::<&str>::new());
        assert_eq!(
            tree_walk("1.2.3.4.5.6.7.8.9"),
            [
                "1.2.3.4.5.6.7.8.9",
                "3.4.5.6.7.8.9",
                "4.5.6.7.8.9",
                "5.6.7.8.9",
                "6.7.8.9",
                "7.8.9",
                "8.9",
                "9"
            ]
        );
    }

    #[test]
    fn record_names_are_normalised() {
        let records = RecordCache::new();
        records.dmarc("Sender.Example.", "v=DMARC1; p=reject");
        let key: &str = "_dmarc.sender.example.";
        assert!(matches!(records.txt.get(key), Some(Txt::Dmarc(_))));
        assert!(matches!(
            records.txt.get("unknown.example."),
            Some(Txt::Error(MailAuthError::Dns(DnsError::RecordNotFound(_))))
        ));
    }

    #[test]
    fn resolvers_build_outside_a_runtime() {
        assert!(Authenticator::system(DEFAULT_DNS_TIMEOUT).is_ok());
        assert!(Authenticator::with_records(RecordCache::new()).is_ok());
    }

    #[tokio::test]
    async fn system_resolver_builds_and_fails_fast_offline() {
        // Builds from /etc/resolv.conf; `.invalid` names (RFC 6761) keep the
        // check offline. Whatever happens, the answer comes in bounded time.
        let auth = Authenticator::system(Duration::from_millis(300))
            .expect("system resolver from /etc/resolv.conf")
            .with_phase_deadline(Duration::from_secs(1));
        let started = Instant::now();
        let v = auth
            .authenticate(&AuthInput {
                raw: b"From: a@example.invalid\r\n\r\nhi",
                remote_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                helo: "client.example.invalid",
                mail_from: "a@example.invalid",
                local_host: "relay.test",
            })
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(v.dkim, DkimResult::None);
    }
}
