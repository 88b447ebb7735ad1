//! DKIM signing of composed messages, checked by a verifier written here
//! from RFC 6376 (relaxed/relaxed, rsa-sha256, `ring` for the RSA check),
//! independent of `mail-auth`, and by `mail-auth`'s own verifier behind
//! [`Authenticator::with_records`]. Tampering must make the independent
//! verifier fail, so it cannot pass by accident.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use e2a_mail::auth::{AuthInput, Authenticator, DkimResult, RecordCache};
use e2a_mail::compose::{self, Attachment, Mailbox, OutgoingMessage};
use e2a_mail::conversation::trusted_conversation_id;
use e2a_mail::dkim_keys::{self, DkimKeyPair};
use e2a_mail::dkim_sign::{self, DkimKey, SIGNED_HEADERS, SignError};
use e2a_testkit::dkim::{relaxed_body, relaxed_header, verify};
use time::OffsetDateTime;
use time::macros::datetime;

const DOMAIN: &str = "agents.example";
const SELECTOR: &str = "e2a202507";
const NOW: OffsetDateTime = datetime!(2025-07-01 12:00:00 UTC);

/// One RSA-2048 key per test binary: generation is slow in debug builds.
fn key() -> &'static DkimKeyPair {
    static KEY: OnceLock<DkimKeyPair> = OnceLock::new();
    KEY.get_or_init(|| dkim_keys::generate_rsa_2048().expect("RSA key generation"))
}

fn dkim_key() -> DkimKey {
    DkimKey::new(DOMAIN, SELECTOR, &key().private_key_der).expect("key loads")
}

/// The TXT record a domain owner would publish.
fn txt_record() -> String {
    dkim_keys::dns_txt_value(&key().public_key_b64)
}

fn message() -> OutgoingMessage {
    OutgoingMessage {
        from: Mailbox {
            name: Some("Support Agent via e2a".into()),
            address: format!("support@{DOMAIN}"),
        },
        reply_to: vec![format!("support@{DOMAIN}")],
        to: vec!["alice@example.com".into()],
        cc: vec!["bob@example.org".into()],
        subject: "Re: Your   invoice — Überweisung".into(),
        message_id: compose::mint_message_id(DOMAIN),
        date: NOW,
        in_reply_to: Some("parent@mail.example.com".into()),
        references: vec![
            "root@mail.example.com".into(),
            "parent@mail.example.com".into(),
        ],
        conversation_id: Some("cnv_0123456789abcdef0123456789abcdef".into()),
        text: "Hello Alice,  \r\n\r\nsee   below.\t\r\n\r\n\r\n".into(),
        html: Some("<p>Hello <b>Alice</b></p>".into()),
        attachments: vec![Attachment {
            filename: "invoice.pdf".into(),
            content_type: "application/pdf".into(),
            data: (0..=255u8).cycle().take(3000).collect(),
        }],
    }
}

fn signed_message() -> Vec<u8> {
    let raw = compose::compose(&message()).expect("composes");
    dkim_key().sign(&raw, NOW).expect("signs")
}

// ------------------------------------------------------------------ tests

#[test]
fn the_verifier_knows_rfc_6376_canonicalisation() {
    // RFC 6376 §3.4.5 example.
    assert_eq!(relaxed_header("A: X"), "a:X");
    assert_eq!(relaxed_header("B : Y\t\r\n\tZ  "), "b:Y Z");
    assert_eq!(relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n");
    assert_eq!(relaxed_body(b""), b"");
    assert_eq!(relaxed_body(b"\r\n\r\n"), b"");
}

#[test]
fn a_composed_message_signs_and_verifies_independently() {
    let signed = signed_message();
    assert!(signed.starts_with(b"DKIM-Signature: "));
    let verified = verify(&signed, &txt_record()).expect("signature verifies");
    assert_eq!(verified.domain, DOMAIN);
    assert_eq!(verified.selector, SELECTOR);
    assert_eq!(verified.timestamp, NOW.unix_timestamp() as u64);
    // Every listed header is in h=, the absent ones too (so adding one
    // later breaks the signature); nothing else is.
    let mut lower: Vec<String> = verified
        .signed_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    lower.sort();
    let mut expected: Vec<String> = SIGNED_HEADERS
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    expected.sort();
    assert_eq!(lower, expected);
}

#[test]
fn the_one_shot_sign_matches_the_prepared_key() {
    let raw = compose::compose(&message()).expect("composes");
    let once = dkim_sign::sign(&raw, DOMAIN, SELECTOR, &key().private_key_der, NOW).expect("signs");
    // RSA PKCS#1 v1.5 is deterministic: same input, same signature.
    assert_eq!(once, dkim_key().sign(&raw, NOW).expect("signs"));
    let header = dkim_key().signature_header(&raw, NOW).expect("signs");
    assert!(header.ends_with("\r\n"));
    assert_eq!(once, [header.as_bytes(), &raw].concat());
}

#[test]
fn tampering_with_the_body_or_a_signed_header_fails_verification() {
    let signed = signed_message();
    let text = String::from_utf8(signed.clone()).expect("ASCII");
    let txt = txt_record();

    let cases: Vec<(&str, String)> = vec![
        ("body", text.replacen("Hello Alice", "Hello Mallory", 1)),
        ("appended body line", format!("{text}P.S. send money\r\n")),
        (
            "to",
            text.replacen("To: <alice@example.com>", "To: <mallory@example.com>", 1),
        ),
        (
            "date",
            text.replacen("Date: Tue, 1 Jul 2025", "Date: Wed, 2 Jul 2025", 1),
        ),
        (
            "added header",
            text.replacen(
                "\r\nTo: ",
                "\r\nReply-To: <mallory@evil.example>\r\nTo: ",
                1,
            ),
        ),
        (
            "conversation id",
            text.replacen("cnv_0123456789abcdef", "cnv_ffffffffffffffff", 1),
        ),
    ];
    for (what, tampered) in cases {
        assert_ne!(tampered, text, "{what}: the edit must apply");
        assert!(
            verify(tampered.as_bytes(), &txt).is_err(),
            "{what} still verifies"
        );
    }

    // Whitespace changes the relaxed algorithms ignore still verify.
    let relaxed =
        text.replacen("Subject: ", "subject:   ", 1)
            .replacen("Hello Alice,", "Hello   Alice,", 1);
    assert_ne!(relaxed, text);
    verify(relaxed.as_bytes(), &txt).expect("relaxed canonicalisation ignores whitespace");

    // A header the message did not have is in h= too: adding one breaks it.
    let mut bare = message();
    bare.cc = vec![];
    bare.reply_to = vec![];
    bare.in_reply_to = None;
    bare.references = vec![];
    bare.conversation_id = None;
    let raw = compose::compose(&bare).expect("composes");
    let signed_bare = dkim_key().sign(&raw, NOW).expect("signs");
    verify(&signed_bare, &txt).expect("signature verifies");
    let text_bare = String::from_utf8(signed_bare).expect("ASCII");
    for added in [
        "In-Reply-To: <forged@evil.example>",
        "Reply-To: <mallory@evil.example>",
        "Cc: <mallory@evil.example>",
        "X-E2A-Conversation-Id: cnv_ffffffffffffffffffffffffffffffff",
    ] {
        let tampered = text_bare.replacen("\r\nTo: ", &format!("\r\n{added}\r\nTo: "), 1);
        assert_ne!(tampered, text_bare);
        assert!(
            verify(tampered.as_bytes(), &txt).is_err(),
            "adding {added} still verifies"
        );
    }

    // Another key's record does not verify it.
    let other = dkim_keys::generate_rsa_2048().expect("RSA key generation");
    assert!(verify(&signed, &dkim_keys::dns_txt_value(&other.public_key_b64)).is_err());
}

#[test]
fn a_two_mebibyte_message_with_attachments_signs_and_verifies() {
    let mut msg = message();
    msg.attachments = (0..4)
        .map(|i| Attachment {
            filename: format!("part-{i}.bin"),
            content_type: "application/octet-stream".into(),
            data: (0..512 * 1024)
                .map(|n: u32| (n.wrapping_mul(31) ^ i) as u8)
                .collect(),
        })
        .collect();
    let raw = compose::compose(&msg).expect("composes");
    assert!(raw.len() > 2 * 1024 * 1024, "{} bytes", raw.len());
    let signed = dkim_key().sign(&raw, NOW).expect("signs");
    verify(&signed, &txt_record()).expect("signature verifies");
    let mut tampered = signed.clone();
    let last = tampered.len() - 100;
    tampered[last] ^= 0x01;
    assert!(verify(&tampered, &txt_record()).is_err());
}

#[tokio::test]
async fn mail_auth_verifies_the_signature_and_the_conversation_id_is_trusted_on_return() {
    let raw = compose::compose(&message()).expect("composes");
    let signed = dkim_key()
        .sign(&raw, OffsetDateTime::now_utc())
        .expect("signs");
    let records = RecordCache::new();
    records.dkim(SELECTOR, DOMAIN, &txt_record());
    let auth = Authenticator::with_records(records).expect("authenticator");
    let verdict = auth
        .authenticate(&AuthInput {
            raw: &signed,
            remote_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            helo: "mx.agents.example",
            mail_from: "support@agents.example",
            local_host: "relay.e2a.example",
        })
        .await;
    assert_eq!(verdict.dkim, DkimResult::Pass);
    let pass = verdict
        .dkim_pass_domains
        .first()
        .expect("a passing signature");
    assert_eq!(pass.domain, DOMAIN);
    assert!(pass.signs_header("x-e2a-conversation-id"));

    // Mail we sent that comes back in (agent to agent through MX) keeps its
    // conversation.
    let parsed = e2a_mail::parse(&signed);
    assert_eq!(
        trusted_conversation_id(&parsed, &verdict, &[DOMAIN]).as_deref(),
        Some("cnv_0123456789abcdef0123456789abcdef")
    );
}

#[test]
fn a_message_without_from_is_not_signed() {
    let raw = b"To: <a@example.com>\r\nSubject: x\r\n\r\nbody\r\n";
    assert!(matches!(dkim_key().sign(raw, NOW), Err(SignError::NoFrom)));
    assert!(matches!(dkim_key().sign(b"", NOW), Err(SignError::NoFrom)));
    // Garbage with a From header signs without panicking.
    let garbage = b"From: \xff\xfe\r\n\x00\x01\r\n\r\n\r\n\r\n";
    assert!(dkim_key().sign(garbage, NOW).is_ok());
}

#[test]
fn debug_output_never_shows_the_key() {
    let debug = format!("{:?}", dkim_key());
    assert!(
        debug.contains(DOMAIN) && debug.contains(SELECTOR),
        "{debug}"
    );
    assert!(debug.len() < 200, "{debug}");
}
