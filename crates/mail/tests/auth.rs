//! SPF, DKIM and DMARC verdicts against recorded DNS answers only, plus the
//! parts that depend on them: conversation trust and the signed headers.
//! No test here touches the network (`Authenticator::with_records`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use e2a_mail::auth::{
    AuthInput, AuthVerdict, Authenticator, DkimResult, DmarcPolicy, DmarcResult,
    MAX_DKIM_SIGNATURES, MAX_DMARC_FROM_DOMAINS, RecordCache, SpfResult,
};
use e2a_mail::conversation::trusted_conversation_id;
use e2a_mail::dkim_keys::{self, DkimKeyPair};
use e2a_mail::headers::{self, AuthHeaderInput};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

const SENDER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const SELECTOR: &str = "e2a202507";

/// One RSA-2048 key per test binary: generation is slow in debug builds.
fn key() -> &'static DkimKeyPair {
    static KEY: OnceLock<DkimKeyPair> = OnceLock::new();
    KEY.get_or_init(|| dkim_keys::generate_rsa_2048().expect("RSA key generation"))
}

fn message(from: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <{from}>\r\nTo: demo@agents.localhost\r\nSubject: hello\r\n\
Message-ID: <m1@sender.example>\r\n{extra_headers}\r\n{body}"
    )
    .into_bytes()
}

/// Prepends a DKIM-Signature by `domain` over `headers` (and `l=` when asked).
fn dkim_sign(raw: &[u8], domain: &str, headers: &[&str], body_length: bool) -> Vec<u8> {
    let key = dkim_keys::signing_key(&key().private_key_der).expect("signing key");
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector(SELECTOR)
        .headers(headers.iter().copied())
        .body_length(body_length)
        .sign(raw)
        .expect("DKIM signing");
    let mut signed = signature.to_header().into_bytes();
    signed.extend_from_slice(raw);
    signed
}

/// A zone where `sender.example` and `e2a.example` publish our test key.
fn zone() -> RecordCache {
    let records = RecordCache::new();
    let txt = dkim_keys::dns_txt_value(&key().public_key_b64);
    records
        .dkim(SELECTOR, "sender.example", &txt)
        .dkim(SELECTOR, "e2a.example", &txt)
        .dkim(SELECTOR, "other.example", &txt);
    records
}

async fn check(records: RecordCache, raw: &[u8], ip: IpAddr, mail_from: &str) -> AuthVerdict {
    let auth = Authenticator::with_records(records).expect("authenticator");
    auth.authenticate(&AuthInput {
        raw,
        remote_ip: ip,
        helo: "mx.sender.example",
        mail_from,
        local_host: "relay.e2a.example",
    })
    .await
}

// ---------------------------------------------------------------- SPF

#[tokio::test]
async fn spf_pass_is_evaluated_on_the_envelope_not_the_from_header() {
    let records = zone();
    records
        .spf("bounces.sender.example", "v=spf1 ip4:192.0.2.0/24 -all")
        // The From domain would fail this IP: if SPF used From, we'd see fail.
        .spf("author.example", "v=spf1 -all");
    let raw = message("alice@author.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "b+123@bounces.sender.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.spf_domain, "bounces.sender.example");
    assert_eq!(v.from_domain.as_deref(), Some("author.example"));
}

#[tokio::test]
async fn spf_fail_on_the_envelope_even_when_the_from_domain_would_pass() {
    let records = zone();
    records
        .spf("bounces.sender.example", "v=spf1 ip4:203.0.113.0/24 -all")
        .spf("author.example", "v=spf1 ip4:192.0.2.0/24 -all");
    let raw = message("alice@author.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "b@bounces.sender.example").await;
    assert_eq!(v.spf, SpfResult::Fail);
    assert_eq!(v.spf_domain, "bounces.sender.example");
}

#[tokio::test]
async fn spf_softfail() {
    let records = zone();
    records.spf("sender.example", "v=spf1 ip4:203.0.113.1 ~all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::SoftFail);
}

#[tokio::test]
async fn spf_neutral() {
    let records = zone();
    records.spf("sender.example", "v=spf1 ?all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::Neutral);
}

#[tokio::test]
async fn spf_none_without_a_record() {
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(zone(), &raw, SENDER_IP, "alice@nospf.example").await;
    assert_eq!(v.spf, SpfResult::None);
    assert_eq!(v.spf_domain, "nospf.example");
}

#[tokio::test]
async fn spf_temperror_when_the_lookup_fails() {
    let records = zone();
    records.temp_error("sender.example");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::TempError);
}

#[tokio::test]
async fn spf_permerror_on_a_broken_record() {
    let records = zone();
    records.spf("sender.example", "v=spf1 ip4:not-an-ip -all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::PermError);
}

#[tokio::test]
async fn spf_uses_the_helo_identity_for_the_null_sender() {
    let records = zone();
    records.spf("mx.sender.example", "v=spf1 ip4:192.0.2.10 -all");
    let raw = message("mailer-daemon@sender.example", "", "bounce\r\n");
    let v = check(records, &raw, SENDER_IP, "").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.spf_domain, "mx.sender.example");
}

#[tokio::test]
async fn unrecorded_lookups_fail_fast_without_the_network() {
    // `a:` needs an A lookup that is not recorded: it goes to the dead
    // resolver at 127.0.0.1:1 and must come back as temperror, quickly.
    let records = zone();
    records.spf("sender.example", "v=spf1 a:unrecorded.example -all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let started = Instant::now();
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::TempError);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn spf_a_and_mx_mechanisms_use_recorded_addresses() {
    let records = zone();
    records
        .spf("sender.example", "v=spf1 mx -all")
        .mx("sender.example", &[(10, "mx1.sender.example")])
        .a("mx1.sender.example", &[Ipv4Addr::new(192, 0, 2, 10)]);
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
}

// ---------------------------------------------------------------- DKIM

#[tokio::test]
async fn dkim_passes_with_a_generated_key_in_the_cache() {
    let raw = dkim_sign(
        &message("alice@sender.example", "", "Hello agent\r\n"),
        "sender.example",
        &["From", "To", "Subject", "Message-ID"],
        false,
    );
    let v = check(zone(), &raw, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Pass);
    assert_eq!(v.dkim_pass_domains.len(), 1);
    assert_eq!(v.dkim_pass_domains[0].domain, "sender.example");
    let mut signed = v.dkim_pass_domains[0].signed_headers.clone();
    signed.sort();
    assert_eq!(signed, ["from", "message-id", "subject", "to"]);
}

#[tokio::test]
async fn dkim_fails_on_a_tampered_body() {
    let signed = dkim_sign(
        &message("alice@sender.example", "", "Pay 10 EUR\r\n"),
        "sender.example",
        &["From", "To", "Subject"],
        false,
    );
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replace("Pay 10 EUR", "Pay 99 EUR")
        .into_bytes();
    let v = check(zone(), &tampered, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Fail);
    assert!(v.dkim_pass_domains.is_empty());
}

#[tokio::test]
async fn dkim_fails_on_a_tampered_signed_header() {
    let signed = dkim_sign(
        &message("alice@sender.example", "", "body\r\n"),
        "sender.example",
        &["From", "To", "Subject"],
        false,
    );
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replace("Subject: hello", "Subject: urgent")
        .into_bytes();
    let v = check(zone(), &tampered, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Fail);
}

#[tokio::test]
async fn dkim_none_without_a_signature() {
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(zone(), &raw, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::None);
}

#[tokio::test]
async fn dkim_signature_with_l_tag_is_refused_by_policy() {
    let raw = dkim_sign(
        &message("alice@sender.example", "", "signed part\r\n"),
        "sender.example",
        &["From", "To", "Subject"],
        true,
    );
    assert!(String::from_utf8_lossy(&raw).contains(" l="));
    let records = zone();
    records.dmarc("sender.example", "v=DMARC1; p=reject");
    let v = check(records, &raw, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Policy);
    assert!(v.dkim_pass_domains.is_empty());
    // and it does not let DMARC pass
    assert_eq!(v.dmarc, DmarcResult::Fail);
}

#[tokio::test]
async fn dkim_l_tag_next_to_a_failing_signature_is_fail() {
    let signed = dkim_sign(
        &message("alice@sender.example", "", "body\r\n"),
        "sender.example",
        &["From", "To"],
        true,
    );
    let tampered_second = dkim_sign(&signed, "other.example", &["From", "Subject"], false);
    let tampered = String::from_utf8(tampered_second)
        .unwrap()
        .replace("Subject: hello", "Subject: bye")
        .into_bytes();
    let v = check(zone(), &tampered, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Fail);
}

#[tokio::test]
async fn dkim_with_no_published_key_fails() {
    let raw = dkim_sign(
        &message("alice@nokey.example", "", "hi\r\n"),
        "nokey.example",
        &["From", "To"],
        false,
    );
    let v = check(zone(), &raw, OTHER_IP, "alice@nokey.example").await;
    assert_eq!(v.dkim, DkimResult::Fail);
}

#[tokio::test]
async fn dkim_temperror_when_the_key_lookup_fails() {
    let raw = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "sender.example",
        &["From", "To"],
        false,
    );
    let records = RecordCache::new();
    records.temp_error(&format!("{SELECTOR}._domainkey.sender.example"));
    let v = check(records, &raw, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::TempError);
}

#[tokio::test]
async fn dkim_malformed_signature_is_permerror() {
    let raw = message(
        "alice@sender.example",
        "DKIM-Signature: v=1; a=rsa-sha256; garbage\r\n",
        "hi\r\n",
    );
    let v = check(zone(), &raw, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::PermError);
}

#[tokio::test]
async fn every_signature_is_verified_and_any_pass_counts() {
    let once = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "nokey.example",
        &["From", "To"],
        false,
    );
    let twice = dkim_sign(&once, "sender.example", &["From", "To"], false);
    let v = check(zone(), &twice, OTHER_IP, "alice@sender.example").await;
    assert_eq!(v.dkim, DkimResult::Pass);
    let domains: Vec<&str> = v
        .dkim_pass_domains
        .iter()
        .map(|p| p.domain.as_str())
        .collect();
    assert_eq!(domains, ["sender.example"]);
}

// ---------------------------------------------------------------- DMARC

#[tokio::test]
async fn dmarc_passes_via_aligned_dkim() {
    let records = zone();
    records
        .dmarc("sender.example", "v=DMARC1; p=reject")
        .spf("bounce.example", "v=spf1 -all");
    let raw = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "sender.example",
        &["From", "To", "Subject"],
        false,
    );
    let v = check(records, &raw, SENDER_IP, "x@bounce.example").await;
    assert_eq!(v.spf, SpfResult::Fail);
    assert_eq!(v.dkim, DkimResult::Pass);
    assert_eq!(v.dmarc, DmarcResult::Pass);
    assert_eq!(v.dmarc_policy, Some(DmarcPolicy::Reject));
    assert!(v.verified());
    assert!(!v.should_reject());
    assert_eq!(v.domain_check(), "spf=fail; dkim=pass; dmarc=pass");
}

#[tokio::test]
async fn dmarc_passes_via_aligned_spf_on_a_subdomain_relaxed() {
    let records = zone();
    records
        .dmarc("sender.example", "v=DMARC1; p=quarantine")
        .spf("bounces.sender.example", "v=spf1 ip4:192.0.2.10 -all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "b@bounces.sender.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.dkim, DkimResult::None);
    assert_eq!(v.dmarc, DmarcResult::Pass);
    assert_eq!(v.dmarc_policy, Some(DmarcPolicy::Quarantine));
    assert!(v.verified());
}

#[tokio::test]
async fn dmarc_strict_spf_alignment_rejects_the_subdomain() {
    let records = zone();
    records
        .dmarc("sender.example", "v=DMARC1; p=reject; aspf=s")
        .spf("bounces.sender.example", "v=spf1 ip4:192.0.2.10 -all");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "b@bounces.sender.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.dmarc, DmarcResult::Fail);
    assert!(v.should_reject());
}

#[tokio::test]
async fn dmarc_fails_with_reject_when_nothing_aligns() {
    // Flaw 29: SPF passes and DKIM passes, but for other domains than From.
    let records = zone();
    records
        .dmarc("bank.example", "v=DMARC1; p=reject")
        .spf("attacker.example", "v=spf1 ip4:192.0.2.10 -all");
    let raw = dkim_sign(
        &message("ceo@bank.example", "", "wire the money\r\n"),
        "other.example",
        &["From", "To", "Subject"],
        false,
    );
    let v = check(records, &raw, SENDER_IP, "x@attacker.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.dkim, DkimResult::Pass);
    assert_eq!(v.dmarc, DmarcResult::Fail);
    assert_eq!(v.dmarc_policy, Some(DmarcPolicy::Reject));
    assert!(!v.verified());
    assert!(v.should_reject());
}

#[tokio::test]
async fn dmarc_fail_with_p_none_does_not_ask_for_rejection() {
    let records = zone();
    records.dmarc("bank.example", "v=DMARC1; p=none");
    let raw = message("ceo@bank.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "x@attacker.example").await;
    assert_eq!(v.dmarc, DmarcResult::Fail);
    assert_eq!(v.dmarc_policy, Some(DmarcPolicy::None));
    assert!(!v.should_reject());
}

#[tokio::test]
async fn dmarc_none_without_a_record() {
    let records = zone();
    records.spf("sender.example", "v=spf1 ip4:192.0.2.10 -all");
    let raw = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "sender.example",
        &["From", "To"],
        false,
    );
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.dkim, DkimResult::Pass);
    assert_eq!(v.dmarc, DmarcResult::None);
    assert_eq!(v.dmarc_policy, None);
    assert!(!v.verified(), "verified means DMARC pass, not any pass");
    assert!(!v.should_reject());
}

#[tokio::test]
async fn dmarc_temperror_when_the_policy_lookup_fails() {
    let records = zone();
    records.temp_error("_dmarc.sender.example");
    let raw = message("alice@sender.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert_eq!(v.dmarc, DmarcResult::TempError);
}

// ------------------------------------------- one From, as DMARC judged it

/// `From: x@attacker.example`, a line without a colon, then the victim's
/// `From`: mail-auth stops at the junk line, mail-parser skips it.
fn junk_line_message() -> Vec<u8> {
    b"From: x@attacker.example\r\njunk\r\nFrom: ceo@victim.example\r\n\
To: demo@agents.localhost\r\nSubject: wire the money\r\n\r\npay now\r\n"
        .to_vec()
}

/// SPF passes for attacker.example (their own domain, `p=none`), and the
/// victim publishes `p=reject`.
fn attacker_zone() -> RecordCache {
    let records = zone();
    records
        .spf("attacker.example", "v=spf1 ip4:192.0.2.10 -all")
        .dmarc("attacker.example", "v=DMARC1; p=none")
        .dmarc("victim.example", "v=DMARC1; p=reject");
    records
}

#[tokio::test]
async fn a_from_hidden_behind_a_junk_line_is_never_verified_as_the_victim() {
    let raw = junk_line_message();
    // The premise: the two parsers read different senders.
    assert_eq!(
        e2a_mail::parse(&raw).from_address(),
        Some("ceo@victim.example")
    );
    let v = check(attacker_zone(), &raw, SENDER_IP, "x@attacker.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert!(!v.parsers_agree);
    assert!(!v.verified(), "{v:?}");
    // The sender to sign is the one DMARC judged, not the victim.
    assert_eq!(v.author(), Some("x@attacker.example"));
    // And the victim's domain is judged too: its p=reject fails.
    assert_eq!(v.dmarc, DmarcResult::Fail);
    assert!(v.should_reject());
}

#[tokio::test]
async fn two_from_fields_are_not_verified() {
    let records = zone();
    records
        .spf("sender.example", "v=spf1 ip4:192.0.2.10 -all")
        .dmarc("sender.example", "v=DMARC1; p=none");
    let raw = b"From: a@sender.example\r\nFrom: b@sender.example\r\nSubject: x\r\n\r\nhi\r\n";
    let v = check(records, raw, SENDER_IP, "a@sender.example").await;
    assert_eq!(
        v.dmarc,
        DmarcResult::Pass,
        "same domain: DMARC itself passes"
    );
    assert_eq!(v.from_fields, 2);
    assert!(!v.verified());
    assert_eq!(v.author(), Some("a@sender.example"));
}

#[tokio::test]
async fn a_from_with_two_mailboxes_is_not_verified() {
    let records = zone();
    records
        .spf("sender.example", "v=spf1 ip4:192.0.2.10 -all")
        .dmarc("sender.example", "v=DMARC1; p=none");
    let raw = b"From: a@sender.example, B@Sender.Example\r\nSubject: x\r\n\r\nhi\r\n";
    let v = check(records, raw, SENDER_IP, "a@sender.example").await;
    assert_eq!(v.dmarc, DmarcResult::Pass);
    assert_eq!(v.from_fields, 1);
    assert!(v.parsers_agree);
    assert_eq!(v.from_addresses, ["a@sender.example", "B@Sender.Example"]);
    assert!(!v.verified());
}

#[tokio::test]
async fn one_agreed_from_keeps_its_spelling_and_is_verified() {
    let records = zone();
    records
        .spf("sender.example", "v=spf1 ip4:192.0.2.10 -all")
        .dmarc("sender.example", "v=DMARC1; p=reject");
    let raw = message("Alice@Sender.Example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    assert!(v.single_author());
    assert!(v.verified());
    assert_eq!(v.author(), Some("Alice@Sender.Example"));
}

#[test]
fn unchecked_verdicts_record_the_same_from_facts() {
    let v = AuthVerdict::unchecked(&junk_line_message());
    assert_eq!(v.author(), Some("x@attacker.example"));
    assert!(!v.parsers_agree);
    assert!(!v.verified());
    assert_eq!(v.dmarc, DmarcResult::None);
    let ok = AuthVerdict::unchecked(&message("alice@sender.example", "", "hi\r\n"));
    assert!(ok.single_author());
    assert_eq!(ok.from_domain.as_deref(), Some("sender.example"));
    assert!(!ok.verified(), "no DMARC, no verification");
    assert!(!ok.should_reject() && !ok.should_defer());
}

// ------------------------------------------- the DMARC opt-in, not sidestepped

#[tokio::test]
async fn two_from_domains_are_judged_by_the_strictest_policy() {
    // mail-auth exempts a multi-domain From from DMARC (result `none`).
    for raw in [
        &b"From: x@attacker.example, ceo@victim.example\r\nSubject: x\r\n\r\nhi\r\n"[..],
        &b"From: x@attacker.example\r\nFrom: ceo@victim.example\r\nSubject: x\r\n\r\nhi\r\n"[..],
    ] {
        let v = check(attacker_zone(), raw, SENDER_IP, "x@attacker.example").await;
        assert_eq!(v.dmarc, DmarcResult::Fail, "{v:?}");
        assert_eq!(v.dmarc_policy, Some(DmarcPolicy::Reject));
        let domains: Vec<(&str, DmarcResult)> = v
            .dmarc_checks
            .iter()
            .map(|c| (c.domain.as_str(), c.result))
            .collect();
        assert_eq!(
            domains,
            [
                ("attacker.example", DmarcResult::Pass),
                ("victim.example", DmarcResult::Fail)
            ]
        );
        assert!(v.should_reject());
        assert!(!v.verified());
    }
}

#[tokio::test]
async fn too_many_from_domains_are_rejected_unjudged() {
    let from: Vec<String> = (0..=MAX_DMARC_FROM_DOMAINS)
        .map(|i| format!("a@d{i}.example"))
        .collect();
    let raw = format!("From: {}\r\nSubject: x\r\n\r\nhi\r\n", from.join(", "));
    let v = check(zone(), raw.as_bytes(), SENDER_IP, "a@d0.example").await;
    assert_eq!(v.dmarc, DmarcResult::PermError);
    assert!(v.dmarc_checks.is_empty());
    assert!(v.should_reject());
}

#[tokio::test]
async fn dmarc_temperror_defers_instead_of_delivering() {
    let records = zone();
    records
        .spf("attacker.example", "v=spf1 ip4:192.0.2.10 -all")
        .temp_error("_dmarc.victim.example");
    let raw = message("ceo@victim.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "x@attacker.example").await;
    assert_eq!(v.dmarc, DmarcResult::TempError);
    assert!(!v.should_reject());
    assert!(v.should_defer());
}

#[tokio::test]
async fn pct_below_100_never_turns_into_a_reject() {
    for (record, reject) in [
        ("v=DMARC1; p=reject; pct=50", false),
        ("v=DMARC1; p=reject; pct=0", false),
        ("v=DMARC1; p=reject; pct=100", true),
        ("v=DMARC1; p=reject", true),
        ("v=DMARC1; p=reject; t=y", false),
    ] {
        let records = zone();
        records.dmarc("victim.example", record);
        let raw = message("ceo@victim.example", "", "hi\r\n");
        let v = check(records, &raw, SENDER_IP, "x@attacker.example").await;
        assert_eq!(v.dmarc, DmarcResult::Fail, "{record}");
        assert_eq!(v.should_reject(), reject, "{record}: {v:?}");
        assert!(!v.should_defer(), "{record}");
    }
    // The organisational domain's record applies to a subdomain, pct too.
    let records = zone();
    records.dmarc("victim.example", "v=DMARC1; p=reject; pct=10");
    let raw = message("ceo@mail.victim.example", "", "hi\r\n");
    let v = check(records, &raw, SENDER_IP, "x@attacker.example").await;
    assert_eq!(v.dmarc, DmarcResult::Fail);
    assert_eq!(v.dmarc_checks[0].pct, Some(10));
    assert!(!v.should_reject());
}

/// A name server on a real local socket that reads queries and never
/// answers; it records the names asked.
struct SilentDns {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentDns {
    async fn start() -> SilentDns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&asked);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, _)) = socket.recv_from(&mut buf).await {
                // The question name starts after the 12-byte header.
                log.lock().unwrap().push(buf[12.min(n)..n].to_vec());
            }
        });
        SilentDns { addr, asked, task }
    }

    fn distinct_questions(&self) -> usize {
        let mut asked = self.asked.lock().unwrap().clone();
        asked.sort();
        asked.dedup();
        asked.len()
    }
}

impl Drop for SilentDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn slow_dkim_keys_do_not_erase_a_pass_already_made() {
    let dns = SilentDns::start().await;
    let records = zone();
    records.dmarc("sender.example", "v=DMARC1; p=reject");
    let mut raw = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "sender.example",
        &["From", "To", "Subject"],
        false,
    );
    for i in 0..3 {
        let slow = format!("slow{i}.example");
        records.forward(&format!("{SELECTOR}._domainkey.{slow}"));
        raw = dkim_sign(&raw, &slow, &["From", "To"], false);
    }
    // The deadline runs out before the silent server's 200 ms query timeout.
    let auth = Authenticator::with_records_via(records, dns.addr)
        .unwrap()
        .with_phase_deadline(Duration::from_millis(100));
    let started = Instant::now();
    let v = auth
        .authenticate(&AuthInput {
            raw: &raw,
            remote_ip: OTHER_IP,
            helo: "mx.sender.example",
            mail_from: "x@bounce.example",
            local_host: "relay.e2a.example",
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        dns.distinct_questions() >= 1,
        "the slow keys were asked for"
    );
    assert_eq!(v.dkim, DkimResult::Pass, "{v:?}");
    let domains: Vec<&str> = v
        .dkim_pass_domains
        .iter()
        .map(|p| p.domain.as_str())
        .collect();
    assert_eq!(domains, ["sender.example"]);
    assert_eq!(v.dmarc, DmarcResult::Pass);
    assert!(v.verified());
}

#[tokio::test]
async fn a_slow_aligned_key_makes_dmarc_temperror_and_defers() {
    let dns = SilentDns::start().await;
    let records = zone();
    records
        .dmarc("victim.example", "v=DMARC1; p=reject")
        .forward(&format!("{SELECTOR}._domainkey.victim.example"));
    let raw = dkim_sign(
        &message("ceo@victim.example", "", "hi\r\n"),
        "victim.example",
        &["From", "To"],
        false,
    );
    let auth = Authenticator::with_records_via(records, dns.addr)
        .unwrap()
        .with_phase_deadline(Duration::from_millis(100));
    let v = auth
        .authenticate(&AuthInput {
            raw: &raw,
            remote_ip: OTHER_IP,
            helo: "mx.attacker.example",
            mail_from: "x@attacker.example",
            local_host: "relay.e2a.example",
        })
        .await;
    assert_eq!(v.dkim, DkimResult::TempError);
    assert_eq!(v.dmarc, DmarcResult::TempError);
    assert!(!v.should_reject());
    assert!(v.should_defer());
}

#[tokio::test]
async fn at_most_the_capped_number_of_signatures_is_looked_up() {
    let dns = SilentDns::start().await;
    let records = zone();
    let mut raw = message("alice@sender.example", "", "hi\r\n");
    for i in 0..(MAX_DKIM_SIGNATURES + 15) {
        let domain = format!("many{i}.example");
        records.forward(&format!("{SELECTOR}._domainkey.{domain}"));
        raw = dkim_sign(&raw, &domain, &["From"], false);
    }
    let auth = Authenticator::with_records_via(records, dns.addr)
        .unwrap()
        .with_phase_deadline(Duration::from_millis(400));
    let v = auth
        .authenticate(&AuthInput {
            raw: &raw,
            remote_ip: OTHER_IP,
            helo: "mx.sender.example",
            mail_from: "alice@sender.example",
            local_host: "relay.e2a.example",
        })
        .await;
    assert_eq!(v.dkim, DkimResult::TempError);
    let asked = dns.distinct_questions();
    assert!(
        (1..=MAX_DKIM_SIGNATURES).contains(&asked),
        "{asked} distinct questions"
    );
}

#[tokio::test]
async fn garbage_input_gives_none_verdicts() {
    let v = check(zone(), b"\0\0\xff\xfe not a message", SENDER_IP, "").await;
    assert_eq!(v.dkim, DkimResult::None);
    assert_eq!(v.dmarc, DmarcResult::None);
    assert_eq!(v.from_domain, None);
}

#[test]
fn authenticate_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let auth = Authenticator::with_records(RecordCache::new()).unwrap();
    let input = AuthInput {
        raw: b"",
        remote_ip: SENDER_IP,
        helo: "h",
        mail_from: "",
        local_host: "l",
    };
    let fut = auth.authenticate(&input);
    assert_send(&fut);
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Authenticator>();
}

// ------------------------------------------------- conversation trust

fn conversation_message(value: &str) -> Vec<u8> {
    message(
        "agent@e2a.example",
        &format!("X-E2A-Conversation-Id: {value}\r\n"),
        "reply\r\n",
    )
}

async fn trusted(raw: &[u8], mail_from: &str) -> Option<String> {
    let records = zone();
    records.spf("e2a.example", "v=spf1 ip4:192.0.2.10 -all");
    let v = check(records, raw, SENDER_IP, mail_from).await;
    let parsed = e2a_mail::parse(raw);
    trusted_conversation_id(&parsed, &v, &["e2a.example"])
}

const CONV_HEADERS: &[&str] = &["From", "To", "Subject", "X-E2A-Conversation-Id"];

#[tokio::test]
async fn conversation_trusted_when_signed_by_an_authorised_domain() {
    let raw = dkim_sign(
        &conversation_message("cnv_0123456789abcdef0123456789abcdef"),
        "e2a.example",
        CONV_HEADERS,
        false,
    );
    assert_eq!(
        trusted(&raw, "bounce@elsewhere.example").await.as_deref(),
        Some("cnv_0123456789abcdef0123456789abcdef")
    );
}

#[tokio::test]
async fn conversation_untrusted_when_the_header_is_not_in_h() {
    let raw = dkim_sign(
        &conversation_message("cnv_0123456789abcdef0123456789abcdef"),
        "e2a.example",
        &["From", "To", "Subject"],
        false,
    );
    assert_eq!(trusted(&raw, "x@e2a.example").await, None);
}

#[tokio::test]
async fn conversation_untrusted_when_signed_by_another_domain() {
    let raw = dkim_sign(
        &conversation_message("cnv_0123456789abcdef0123456789abcdef"),
        "other.example",
        CONV_HEADERS,
        false,
    );
    assert_eq!(trusted(&raw, "x@other.example").await, None);
}

#[tokio::test]
async fn conversation_untrusted_when_dkim_fails() {
    let signed = dkim_sign(
        &conversation_message("cnv_0123456789abcdef0123456789abcdef"),
        "e2a.example",
        CONV_HEADERS,
        false,
    );
    let forged = String::from_utf8(signed)
        .unwrap()
        .replace(
            "cnv_0123456789abcdef0123456789abcdef",
            "cnv_ffffffffffffffffffffffffffffffff",
        )
        .into_bytes();
    assert_eq!(trusted(&forged, "x@e2a.example").await, None);
}

#[tokio::test]
async fn conversation_untrusted_when_only_the_envelope_is_authorised() {
    // Flaw 28: MAIL FROM in the authorised domain, SPF even passes — no DKIM.
    let raw = conversation_message("cnv_0123456789abcdef0123456789abcdef");
    let records = zone();
    records.spf("e2a.example", "v=spf1 ip4:192.0.2.10 -all");
    let v = check(records, &raw, SENDER_IP, "bounce@e2a.example").await;
    assert_eq!(v.spf, SpfResult::Pass);
    assert_eq!(v.spf_domain, "e2a.example");
    assert_eq!(trusted(&raw, "bounce@e2a.example").await, None);
}

#[tokio::test]
async fn conversation_untrusted_with_bad_characters() {
    let raw = dkim_sign(
        &conversation_message("cnv_01 23;x"),
        "e2a.example",
        CONV_HEADERS,
        false,
    );
    assert_eq!(trusted(&raw, "x@e2a.example").await, None);
}

#[tokio::test]
async fn conversation_untrusted_when_an_unsigned_copy_is_prepended() {
    // Replay: a genuinely signed mail with a second header added on top.
    let signed = dkim_sign(
        &conversation_message("cnv_00000000000000000000000000000001"),
        "e2a.example",
        CONV_HEADERS,
        false,
    );
    let mut replay = b"X-E2A-Conversation-Id: cnv_00000000000000000000000000000002\r\n".to_vec();
    replay.extend_from_slice(&signed);
    assert_eq!(trusted(&replay, "x@e2a.example").await, None);
}

// ------------------------------------------------- signed headers

#[tokio::test]
async fn verdict_headers_sign_and_verify() {
    let records = zone();
    records.dmarc("sender.example", "v=DMARC1; p=reject");
    let raw = dkim_sign(
        &message("alice@sender.example", "", "hi\r\n"),
        "sender.example",
        &["From", "To"],
        false,
    );
    let v = check(records, &raw, SENDER_IP, "alice@sender.example").await;
    let now = time::OffsetDateTime::now_utc();
    let input = AuthHeaderInput::from_verdict(
        &v,
        "alice@sender.example",
        now,
        "msg_1",
        headers::body_sha256(&raw),
    );
    let signed = headers::sign(&input, b"secret");
    assert_eq!(signed[0], (headers::VERIFIED.into(), "true".into()));
    assert_eq!(
        signed[3],
        (
            headers::DOMAIN_CHECK.into(),
            "spf=none; dkim=pass; dmarc=pass".into()
        )
    );
    assert_eq!(headers::verify(&signed, &[b"secret"], now), Ok(()));
}
