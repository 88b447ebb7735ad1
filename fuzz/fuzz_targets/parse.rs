//! Fuzz target `parse`: arbitrary bytes as an inbound message.
//!
//! Feeds the DATA payload to everything in `e2a-mail` that reads untrusted
//! input without DNS: the MIME parser, mail-auth's authentication parser
//! (DKIM-Signature, From), conversation-id trust, and the `X-E2A-Auth-*`
//! verifier; and checks that signing whatever was parsed always verifies.
#![no_main]

use e2a_mail::auth::{AuthVerdict, DkimPass, DkimResult, DmarcResult, SpfResult};
use e2a_mail::conversation;
use e2a_mail::headers::{self, AuthHeaderInput};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let parsed = e2a_mail::parse::parse(data);
    let _ = mail_auth::AuthenticatedMessage::parse(data);

    // Conversation trust with a verdict that "signed" the header for the
    // From domain: must never panic, and what it trusts must be valid.
    let from_domain = parsed
        .from
        .as_ref()
        .and_then(|m| m.domain_lower())
        .unwrap_or_default();
    let verdict = AuthVerdict {
        spf: SpfResult::None,
        spf_domain: String::new(),
        dkim: DkimResult::Pass,
        dmarc: DmarcResult::None,
        dmarc_policy: None,
        from_domain: Some(from_domain.clone()),
        dkim_pass_domains: vec![DkimPass {
            domain: from_domain.clone(),
            signed_headers: vec!["x-e2a-conversation-id".into()],
        }],
        ..AuthVerdict::unchecked(data)
    };
    if let Some(id) = conversation::trusted_conversation_id(&parsed, &verdict, &[&from_domain]) {
        assert!(conversation::is_valid(&id));
    }

    // The verifier on header-shaped lines of the input.
    let text = String::from_utf8_lossy(data);
    let pairs: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once(':')).collect();
    let now = OffsetDateTime::UNIX_EPOCH;
    let _ = headers::verify(&pairs, &[b"key".as_slice()], now);

    // Signing what was parsed always verifies.
    let input = AuthHeaderInput {
        verified: parsed.conversation_header.is_some(),
        sender: parsed.from_address().unwrap_or_default().to_string(),
        domain_check: parsed.subject.clone(),
        timestamp: parsed.date.unwrap_or(now),
        message_id: parsed.message_id.clone().unwrap_or_default(),
        body_sha256: headers::body_sha256(data),
        delegation: parsed.conversation_header.clone(),
    };
    let signed = headers::sign(&input, b"key");
    let at = headers::format_timestamp(input.timestamp);
    assert!(signed.iter().any(|(_, v)| *v == at));
    let signed_at = input
        .timestamp
        .replace_nanosecond(0)
        .unwrap_or(input.timestamp);
    assert_eq!(
        headers::verify(&signed, &[b"key".as_slice()], signed_at),
        Ok(())
    );
});
