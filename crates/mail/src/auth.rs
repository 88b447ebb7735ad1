//! SPF, DKIM and DMARC evaluation of an inbound message with `mail-auth`,
//! behind a resolver the caller injects (spec §6.6, with flaw 29 fixed).
//!
//! - **SPF** is evaluated on the **envelope** `MAIL FROM` domain, or on the
//!   HELO identity when the reverse-path is null — never on the `From` header.
//! - **DKIM**: every `DKIM-Signature` is verified; a signature carrying an
//!   `l=` (body length) tag is refused by policy and never counts as a pass.
//! - **DMARC** is evaluated for the RFC 5322 `From` domain from the SPF and
//!   DKIM results with identifier alignment (relaxed or strict as the policy
//!   says). [`AuthVerdict::verified`] is DMARC pass.
//!
//! Two resolvers: [`Authenticator::system`] (the system DNS with a short,
//! bounded timeout and a single attempt, so a dead DNS yields `temperror`
//! rather than a hang) and [`Authenticator::with_records`] (answers only from
//! an in-memory [`RecordCache`]; misses never reach the network).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
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

/// Everything the relay records about a message's authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthVerdict {
    pub spf: SpfResult,
    /// The domain SPF was evaluated for: the envelope `MAIL FROM` domain, or
    /// the HELO name for the null reverse-path.
    pub spf_domain: String,
    pub dkim: DkimResult,
    pub dmarc: DmarcResult,
    /// The policy of the DMARC record that applied; `None` without a record.
    pub dmarc_policy: Option<DmarcPolicy>,
    /// The RFC 5322 `From` domain, lower-case.
    pub from_domain: Option<String>,
    /// Every passing signature, in header order.
    pub dkim_pass_domains: Vec<DkimPass>,
}

impl AuthVerdict {
    /// True iff DMARC passed, i.e. an SPF- or DKIM-authenticated identifier
    /// aligns with the `From` domain. This is `X-E2A-Auth-Verified`.
    pub fn verified(&self) -> bool {
        self.dmarc == DmarcResult::Pass
    }

    /// True iff DMARC failed and the From domain's policy is `reject`. The
    /// relay rejects with `550 5.7.1` only for agents that opted in.
    pub fn should_reject(&self) -> bool {
        self.dmarc == DmarcResult::Fail && self.dmarc_policy == Some(DmarcPolicy::Reject)
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

/// DNS answers held in memory, consulted before the resolver.
///
/// For [`Authenticator::with_records`] it is the whole zone: a TXT name that
/// was not recorded answers NXDOMAIN, and A/AAAA/MX/PTR misses go to a
/// resolver pointed at `127.0.0.1:1`, which fails at once (`temperror`).
/// Names are normalised to lower-case FQDNs. Answers from the real resolver
/// are never stored here.
pub struct RecordCache {
    txt: MemCache<Box<str>, Txt>,
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
        self.txt.put(fqdn, record);
        self
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
    miss: Option<V>,
}

impl<K: Hash + Eq, V: Clone> MemCache<K, V> {
    fn new(miss: Option<V>) -> Self {
        MemCache {
            map: Mutex::new(HashMap::new()),
            miss,
        }
    }

    fn put(&self, key: K, value: V) {
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
        let mut ns = NameServerConfig::udp(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for connection in &mut ns.connections {
            connection.port = 1;
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

        let Some(message) = AuthenticatedMessage::parse(input.raw) else {
            return AuthVerdict {
                spf,
                spf_domain,
                dkim: DkimResult::None,
                dmarc: DmarcResult::None,
                dmarc_policy: None,
                from_domain: None,
                dkim_pass_domains: Vec::new(),
            };
        };
        let from_domain = message
            .from
            .iter()
            .find_map(|a| a.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.')))
            .filter(|d| !d.is_empty())
            .map(str::to_ascii_lowercase);

        // DKIM: every signature; l= signatures are refused by policy.
        let (dkim_outputs, dkim_timed_out) = match tokio::time::timeout(
            self.phase_deadline,
            self.resolver.verify_dkim(self.params(&message)),
        )
        .await
        {
            Ok(outputs) => (outputs, false),
            Err(_) => (Vec::new(), true),
        };
        let census = SignatureCensus::of(&message);
        let dkim_outputs: Vec<DkimOutput<'_>> = dkim_outputs
            .into_iter()
            .filter_map(|output| {
                // Some(_) when refused by policy: the message's own copy of
                // the signature (None if it cannot be found: drop the output).
                let refused = output
                    .signature()
                    .filter(|sig| census.is_refused(sig))
                    .map(|sig| census.find(&message, sig));
                match refused {
                    None => Some(output),
                    Some(Some(sig)) => Some(
                        DkimOutput::fail(MailAuthError::Dkim(DkimError::SignatureLength))
                            .with_signature(sig),
                    ),
                    Some(None) => None,
                }
            })
            .collect();
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
        let any_temp = dkim_timed_out
            || dkim_outputs
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

        // DMARC for the From domain, with alignment.
        let dmarc_output = tokio::time::timeout(
            self.phase_deadline,
            self.resolver.verify_dmarc(self.params(DmarcParameters::new(
                &message,
                &dkim_outputs,
                &envelope_domain,
                &spf_output,
            ))),
        )
        .await
        .ok();
        let (mut dmarc, dmarc_policy) = match &dmarc_output {
            Some(output) => (
                DmarcResult::from_mail_auth(&output.result()),
                output.dmarc_record().map(|_| match output.policy() {
                    Policy::Reject => DmarcPolicy::Reject,
                    Policy::Quarantine => DmarcPolicy::Quarantine,
                    Policy::None | Policy::Unspecified => DmarcPolicy::None,
                }),
            ),
            None => (DmarcResult::TempError, None),
        };
        if dkim_timed_out && census.total > 0 && dmarc != DmarcResult::Pass {
            // DKIM could not be evaluated: DMARC can neither pass nor fail.
            dmarc = DmarcResult::TempError;
        }

        AuthVerdict {
            spf,
            spf_domain,
            dkim,
            dmarc,
            dmarc_policy,
            from_domain,
            dkim_pass_domains,
        }
    }
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

    /// The message's own copy of `sig`, borrowed for the message's lifetime.
    fn find<'m>(
        &self,
        message: &'m AuthenticatedMessage<'m>,
        sig: &mail_auth::dkim::Signature,
    ) -> Option<&'m mail_auth::dkim::Signature> {
        let addr = std::ptr::from_ref(sig).addr();
        message
            .dkim_headers
            .iter()
            .map(|h| &h.header)
            .find(|candidate| std::ptr::from_ref(*candidate).addr() == addr)
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
        };
        assert!(
            !v.verified(),
            "SPF and DKIM pass without DMARC is not verified"
        );
        v.dmarc = DmarcResult::Pass;
        assert!(v.verified());
        v.dmarc = DmarcResult::Fail;
        v.dmarc_policy = Some(DmarcPolicy::Quarantine);
        assert!(!v.should_reject());
        v.dmarc_policy = Some(DmarcPolicy::Reject);
        assert!(v.should_reject());
        v.dmarc = DmarcResult::TempError;
        assert!(!v.should_reject());
        assert_eq!(v.domain_check(), "spf=pass; dkim=pass; dmarc=temperror");
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
