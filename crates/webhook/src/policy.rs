//! Which destinations a webhook may reach (SSRF policy).
//!
//! Two checks share one address classification:
//! * [`check_url`] — pure, no DNS: for registration-time validation and as the
//!   first step of every request. Scheme, credentials, host, and the policy
//!   for IP-literal hosts (a literal never reaches a resolver).
//! * [`check_ip`] — applied by the client's resolver to every address a name
//!   resolves to, so the addresses connected to are exactly the ones checked
//!   (no DNS-rebinding window).
//!
//! Refused unless [`UrlPolicy::allow_private`]: loopback, RFC 1918 private,
//! shared/CGNAT (100.64/10), link-local (169.254/16, fe80::/10), unique-local
//! (fc00::/7). Refused always: cloud-metadata addresses (even with
//! `allow_private`), unspecified, "this network" (0/8), broadcast,
//! multicast, reserved (240/4), documentation and benchmarking ranges, IETF
//! protocol assignments (192.0.0/24, 2001::/23 which includes Teredo), the
//! 6to4 relay anycast, deprecated site-local and IPv4-compatible IPv6, and
//! any IPv6 outside global unicast 2000::/3 other than the embeddings below.
//! IPv6 addresses that embed an IPv4 address — IPv4-mapped (::ffff:0:0/96),
//! NAT64 (64:ff9b::/96) and 6to4 (2002::/16) — are judged by the embedded
//! IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use reqwest::Url;

/// Longest URL accepted (the `webhooks.url` column's CHECK).
pub const MAX_URL_LEN: usize = 2048;

/// Cloud instance-metadata endpoints, refused even with `allow_private`:
/// AWS/GCP/Azure/Oracle/DigitalOcean `169.254.169.254`, AWS IPv6
/// `fd00:ec2::254`, Alibaba `100.100.100.200`, Azure wire server
/// `168.63.129.16` (a public address), Oracle `192.0.0.192`.
pub const CLOUD_METADATA: [IpAddr; 5] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

/// What a webhook URL may point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UrlPolicy {
    /// Accept `http://` as well as `https://` (development only).
    pub allow_http: bool,
    /// Accept loopback, private, CGNAT, link-local and unique-local
    /// addresses and `localhost` names (development and tests only; driven
    /// by `E2A_ALLOW_PRIVATE_WEBHOOKS=1` in the deliverer). Metadata,
    /// unspecified, multicast, broadcast and reserved addresses stay refused.
    pub allow_private: bool,
}

impl UrlPolicy {
    /// Production: `https://` to public addresses only. Same as `default()`.
    pub const STRICT: Self = Self {
        allow_http: false,
        allow_private: false,
    };
}

/// An address the policy refuses, with the reason (safe to log and to show
/// the webhook's owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address {ip} is not allowed: {reason}")]
pub struct RefusedAddress {
    /// The refused address.
    pub ip: IpAddr,
    /// Why, e.g. `loopback`, `private (RFC 1918)`, `cloud metadata`.
    pub reason: &'static str,
    /// True when `allow_private` would have admitted it.
    pub private: bool,
}

/// A URL refused by [`check_url`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Longer than [`MAX_URL_LEN`].
    #[error("URL is longer than {MAX_URL_LEN} characters")]
    TooLong,
    /// Not an absolute URL.
    #[error("not a valid absolute URL")]
    Invalid,
    /// `http://` without `allow_http`.
    #[error("webhook URL must use https://")]
    InsecureScheme,
    /// Neither `http` nor `https`.
    #[error("webhook URL scheme {0:?} is not supported (use https://)")]
    UnsupportedScheme(String),
    /// `user:password@` in the URL.
    #[error("webhook URL must not contain credentials")]
    Credentials,
    /// No host.
    #[error("webhook URL has no host")]
    MissingHost,
    /// Port 0.
    #[error("webhook URL port is invalid")]
    InvalidPort,
    /// `localhost`, a `.localhost` name or a single-label name, without
    /// `allow_private`.
    #[error("webhook host {0:?} is not a public name")]
    LocalName(String),
    /// An IP-literal host the policy refuses.
    #[error(transparent)]
    Address(#[from] RefusedAddress),
}

/// Validates a webhook URL without any network access and returns it
/// parsed. Also the first step of every request the client makes.
///
/// Refuses: more than [`MAX_URL_LEN`] characters; anything but `https`
/// (or `http` with `allow_http`); a user name or password; no host; port 0;
/// an IP-literal host refused by [`check_ip`] (WHATWG parsing turns
/// `0x7f.1`, `2130706433` and `127.1` into the literal 127.0.0.1 first);
/// without `allow_private`, `localhost`, `*.localhost` and single-label
/// names. Names are otherwise checked when connecting, on the addresses
/// they resolve to.
pub fn check_url(url: &str, policy: &UrlPolicy) -> Result<Url, UrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let parsed = Url::parse(url).map_err(|_| UrlError::Invalid)?;
    match parsed.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => return Err(UrlError::InsecureScheme),
        other => return Err(UrlError::UnsupportedScheme(other.to_owned())),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    if parsed.port() == Some(0) {
        return Err(UrlError::InvalidPort);
    }
    let host = parsed.host_str().ok_or(UrlError::MissingHost)?;
    // The URL parser has already normalised IP literals: IPv4 in dotted
    // decimal, IPv6 in brackets.
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip = v6.parse::<Ipv6Addr>().map_err(|_| UrlError::Invalid)?;
        check_ip(IpAddr::V6(ip), policy.allow_private)?;
    } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
        check_ip(IpAddr::V4(ip), policy.allow_private)?;
    } else {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Err(UrlError::MissingHost);
        }
        let local = name == "localhost" || name.ends_with(".localhost") || !name.contains('.');
        if local && !policy.allow_private {
            return Err(UrlError::LocalName(name));
        }
    }
    Ok(parsed)
}

/// Checks one address against the policy: `Ok` if a webhook may connect to
/// it.
pub fn check_ip(ip: IpAddr, allow_private: bool) -> Result<(), RefusedAddress> {
    match classify(ip) {
        Class::Public => Ok(()),
        Class::Private(_) if allow_private => Ok(()),
        Class::Private(reason) => Err(RefusedAddress {
            ip,
            reason,
            private: true,
        }),
        Class::Never(reason) => Err(RefusedAddress {
            ip,
            reason,
            private: false,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Public,
    /// Not public, but reachable in development with `allow_private`.
    Private(&'static str),
    /// Never a webhook target.
    Never(&'static str),
}

fn classify(ip: IpAddr) -> Class {
    if CLOUD_METADATA.contains(&ip) {
        return Class::Never("cloud metadata");
    }
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: u32, net: [u8; 4], prefix: u32) -> bool {
    let net = u32::from_be_bytes(net);
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    ip & mask == net & mask
}

fn classify_v4(v4: Ipv4Addr) -> Class {
    if CLOUD_METADATA.contains(&IpAddr::V4(v4)) {
        return Class::Never("cloud metadata");
    }
    let ip = u32::from(v4);
    const NEVER: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified / this network"),
        ([255, 255, 255, 255], 32, "broadcast"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
        ([192, 0, 0, 0], 24, "IETF protocol assignments"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([192, 88, 99, 0], 24, "6to4 relay anycast"),
    ];
    const PRIVATE: &[([u8; 4], u32, &str)] = &[
        ([127, 0, 0, 0], 8, "loopback"),
        ([10, 0, 0, 0], 8, "private (RFC 1918)"),
        ([172, 16, 0, 0], 12, "private (RFC 1918)"),
        ([192, 168, 0, 0], 16, "private (RFC 1918)"),
        ([100, 64, 0, 0], 10, "shared address space (CGNAT)"),
        ([169, 254, 0, 0], 16, "link-local"),
    ];
    if let Some((_, _, reason)) = NEVER.iter().find(|(n, p, _)| in_v4(ip, *n, *p)) {
        return Class::Never(reason);
    }
    if let Some((_, _, reason)) = PRIVATE.iter().find(|(n, p, _)| in_v4(ip, *n, *p)) {
        return Class::Private(reason);
    }
    Class::Public
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    let [a, b] = hi.to_be_bytes();
    let [c, d] = lo.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

fn classify_v6(v6: Ipv6Addr) -> Class {
    let s = v6.segments();
    // IPv4-mapped ::ffff:a.b.c.d: the socket connects to a.b.c.d.
    if let Some(v4) = v6.to_ipv4_mapped() {
        return classify(IpAddr::V4(v4));
    }
    // NAT64 well-known prefix 64:ff9b::/96: the translator connects to the
    // embedded address (an IPv6-only host with DNS64 sees every public
    // site this way, so public embeddings stay allowed).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify(IpAddr::V4(embedded_v4(s[6], s[7])));
    }
    if v6.is_unspecified() {
        return Class::Never("unspecified");
    }
    if v6.is_loopback() {
        return Class::Private("loopback");
    }
    // Deprecated IPv4-compatible ::a.b.c.d (RFC 4291): never a target, not
    // even with `allow_private`; the embedded address's reason when it is
    // itself refused.
    if s[..6] == [0; 6] {
        return match classify(IpAddr::V4(embedded_v4(s[6], s[7]))) {
            Class::Public => Class::Never("IPv4-compatible IPv6 (deprecated)"),
            Class::Private(reason) | Class::Never(reason) => Class::Never(reason),
        };
    }
    match s[0] {
        // 6to4 2002:a.b.c.d::/48 reaches a.b.c.d's network.
        0x2002 => match classify(IpAddr::V4(embedded_v4(s[1], s[2]))) {
            Class::Public => Class::Public,
            _ => Class::Never("6to4 embedding a non-public IPv4 address"),
        },
        // 2001::/23 IETF protocol assignments, including Teredo 2001::/32.
        0x2001 if s[1] < 0x0200 => Class::Never("IETF protocol assignments (incl. Teredo)"),
        0x2001 if s[1] == 0x0db8 => Class::Never("documentation"),
        0x3fff if s[1] < 0x1000 => Class::Never("documentation"),
        0x2000..=0x3fff => Class::Public,
        0xfc00..=0xfdff => Class::Private("unique local"),
        0xfe80..=0xfebf => Class::Private("link-local"),
        0xfec0..=0xfeff => Class::Never("site-local (deprecated)"),
        0xff00..=0xffff => Class::Never("multicast"),
        _ => Class::Never("not global unicast"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str, allow_private: bool) -> bool {
        check_ip(ip.parse().unwrap(), allow_private).is_err()
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!refused(ip, false), "{ip}");
        }
    }

    #[test]
    fn private_addresses_refused_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.1.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:192.168.0.1",
            "64:ff9b::7f00:1",
        ] {
            let err = check_ip(ip.parse().unwrap(), false).unwrap_err();
            assert!(err.private, "{ip}: {err}");
            assert!(!refused(ip, true), "{ip} with allow_private");
        }
    }

    #[test]
    fn never_allowed_even_with_allow_private() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.255",
            "192.88.99.1",
            "169.254.169.254",
            "100.100.100.200",
            "168.63.129.16",
            "192.0.0.192",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::",
            "::ffff:0.0.0.0",
            "::8.8.8.8",
            "::127.0.0.1",
            "ff02::1",
            "ff05::2",
            "fec0::1",
            "2001:db8::1",
            "3fff::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::1",
            "100::1",
            "64:ff9b:1::1",
        ] {
            assert!(refused(ip, true), "{ip} with allow_private");
            assert!(refused(ip, false), "{ip}");
        }
    }

    #[test]
    fn ipv4_compatible_loopback_keeps_its_reason() {
        let err = check_ip("::127.0.0.1".parse().unwrap(), false).unwrap_err();
        assert_eq!(err.reason, "loopback");
    }

    fn strict(url: &str) -> Result<Url, UrlError> {
        check_url(url, &UrlPolicy::STRICT)
    }

    #[test]
    fn url_scheme_credentials_host() {
        assert!(strict("https://hooks.example.com/e2a?x=1").is_ok());
        assert!(strict("https://hooks.example.com:8443/").is_ok());
        assert_eq!(
            strict("http://hooks.example.com/"),
            Err(UrlError::InsecureScheme)
        );
        let dev = UrlPolicy {
            allow_http: true,
            allow_private: false,
        };
        assert!(check_url("http://hooks.example.com/", &dev).is_ok());
        assert_eq!(
            strict("ftp://hooks.example.com/"),
            Err(UrlError::UnsupportedScheme("ftp".into()))
        );
        assert_eq!(
            strict("file:///etc/passwd"),
            Err(UrlError::UnsupportedScheme("file".into()))
        );
        assert_eq!(
            strict("https://user:pw@hooks.example.com/"),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            strict("https://user@hooks.example.com/"),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            strict("https://:pw@hooks.example.com/"),
            Err(UrlError::Credentials)
        );
        // WHATWG parsing reads the first path segment as the host here.
        assert_eq!(
            strict("https:///path"),
            Err(UrlError::LocalName("path".into()))
        );
        assert_eq!(strict("hooks.example.com"), Err(UrlError::Invalid));
        assert_eq!(strict(""), Err(UrlError::Invalid));
        assert_eq!(
            strict("https://hooks.example.com:0/"),
            Err(UrlError::InvalidPort)
        );
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(strict(&long), Err(UrlError::TooLong));
    }

    #[test]
    fn url_literals_and_local_names() {
        for url in [
            "https://127.0.0.1/",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f.0.0.1/",
            "https://0177.0.0.1/",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:7f00:1]/",
            "https://10.0.0.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[fd00:ec2::254]/",
            "https://0.0.0.0/",
        ] {
            assert!(
                matches!(strict(url), Err(UrlError::Address(_))),
                "{url}: {:?}",
                strict(url)
            );
        }
        for url in [
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://intranet/",
        ] {
            assert!(matches!(strict(url), Err(UrlError::LocalName(_))), "{url}");
        }
        let dev = UrlPolicy {
            allow_http: true,
            allow_private: true,
        };
        assert!(check_url("http://127.0.0.1:8080/hook", &dev).is_ok());
        assert!(check_url("http://localhost:8080/hook", &dev).is_ok());
        assert!(check_url("http://[::ffff:127.0.0.1]:8080/", &dev).is_ok());
        assert!(matches!(
            check_url("http://169.254.169.254/", &dev),
            Err(UrlError::Address(RefusedAddress { private: false, .. }))
        ));
        assert!(strict("https://8.8.8.8/").is_ok());
        assert!(strict("https://[2606:4700:4700::1111]/").is_ok());
    }
}
