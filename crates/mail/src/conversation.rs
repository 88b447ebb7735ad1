//! Conversation ids: when an inbound `X-E2A-Conversation-Id` header may be
//! trusted (flaw 28 fixed) and minting ids for new threads (flaw 16).
//!
//! The original trusted the header whenever the envelope `MAIL FROM` domain
//! was ours, which anyone can forge. Here the header is trusted only when a
//! **passing** DKIM signature of an authorised domain (or a subdomain of one)
//! covers it in its `h=` list, the message carries the header exactly once,
//! and the value is an id this gateway minted (`cnv_` + 32 hex, see
//! [`is_minted`]). The envelope is never a reason. Requiring a minted id
//! matters because every tenant's outbound mail is signed by the gateway's
//! domain: a chosen, guessable id ("support") would otherwise let one tenant
//! thread mail into another tenant's conversation; a minted id is 128 random
//! bits that only the participants of that conversation know.

use ring::rand::{SecureRandom, SystemRandom};

use crate::auth::AuthVerdict;
use crate::parse::ParsedMessage;

/// Prefix of minted conversation ids.
pub const PREFIX: &str = "cnv_";

/// Longest accepted conversation id.
pub const MAX_LEN: usize = 200;

/// Lower-case name of the header as it appears in a DKIM `h=` list.
const HEADER_LOWER: &str = "x-e2a-conversation-id";

/// The conversation id a message may be threaded by, or `None`.
///
/// Returns the header value only when all hold:
/// - the message has exactly one `X-E2A-Conversation-Id` header, and its
///   trimmed value satisfies [`is_minted`];
/// - some passing DKIM signature has `d=` equal to an entry of
///   `authorised_domains` or a subdomain of one (case-insensitive, trailing
///   dots ignored), and its `h=` covers `x-e2a-conversation-id`.
pub fn trusted_conversation_id(
    parsed: &ParsedMessage,
    verdict: &AuthVerdict,
    authorised_domains: &[&str],
) -> Option<String> {
    if parsed.conversation_header_count != 1 {
        return None;
    }
    let value = parsed.conversation_header.as_deref()?.trim();
    if !is_minted(value) {
        return None;
    }
    let trusted = verdict.dkim_pass_domains.iter().any(|pass| {
        pass.signs_header(HEADER_LOWER)
            && authorised_domains
                .iter()
                .any(|auth| domain_within(&pass.domain, auth))
    });
    trusted.then(|| value.to_string())
}

/// True when `domain` equals `parent` or is a subdomain of it,
/// case-insensitively; an empty `parent` matches nothing.
fn domain_within(domain: &str, parent: &str) -> bool {
    let domain = domain.trim().trim_end_matches('.');
    let parent = parent.trim().trim_end_matches('.');
    if parent.is_empty() || domain.is_empty() {
        return false;
    }
    if domain.eq_ignore_ascii_case(parent) {
        return true;
    }
    domain.len() > parent.len() + 1 && {
        let split = domain.len() - parent.len();
        domain.is_char_boundary(split)
            && domain[split..].eq_ignore_ascii_case(parent)
            && domain.as_bytes()[split - 1] == b'.'
    }
}

/// True when `id` matches `[A-Za-z0-9_-]{1,200}`.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// True for an id of the form [`mint`] produces: `cnv_` + 32 lowercase hex.
pub fn is_minted(id: &str) -> bool {
    id.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A fresh conversation id: `cnv_` + 32 lowercase hex characters (128 bits
/// from the operating system's CSPRNG via `ring`).
///
/// # Panics
/// Only if the OS random source fails, which `ring` treats as unrecoverable.
pub fn mint() -> String {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("operating system random source failed");
    format!("{PREFIX}{}", crate::hex::encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{DkimPass, DkimResult, DmarcResult, SpfResult};

    fn parsed(value: &str) -> ParsedMessage {
        ParsedMessage {
            conversation_header: Some(value.to_string()),
            conversation_header_count: 1,
            ..ParsedMessage::default()
        }
    }

    fn verdict(passes: Vec<DkimPass>) -> AuthVerdict {
        AuthVerdict {
            spf: SpfResult::Pass,
            spf_domain: "e2a.example".into(),
            dkim: if passes.is_empty() {
                DkimResult::Fail
            } else {
                DkimResult::Pass
            },
            dmarc: DmarcResult::Pass,
            dmarc_policy: None,
            from_domain: Some("e2a.example".into()),
            dkim_pass_domains: passes,
            ..AuthVerdict::unchecked(b"From: a@e2a.example\r\n\r\n")
        }
    }

    fn pass(domain: &str, headers: &[&str]) -> DkimPass {
        DkimPass {
            domain: domain.into(),
            signed_headers: headers.iter().map(|h| h.to_string()).collect(),
        }
    }

    const ID: &str = "cnv_0123456789abcdef0123456789abcdef";

    const SIGNED: &[&str] = &["from", "to", "subject", "x-e2a-conversation-id"];

    #[test]
    fn trusted_when_an_authorised_signature_covers_the_header() {
        let v = verdict(vec![pass("e2a.example", SIGNED)]);
        assert_eq!(
            trusted_conversation_id(&parsed(ID), &v, &["e2a.example"]).as_deref(),
            Some(ID)
        );
        // subdomain of an authorised domain, any case
        let v = verdict(vec![pass("mail.E2A.example", SIGNED)]);
        assert!(trusted_conversation_id(&parsed(ID), &v, &["e2a.EXAMPLE."]).is_some());
        // one of several signatures suffices
        let v = verdict(vec![
            pass("other.example", SIGNED),
            pass("e2a.example", SIGNED),
        ]);
        assert!(trusted_conversation_id(&parsed(ID), &v, &["e2a.example"]).is_some());
    }

    #[test]
    fn untrusted_when_the_header_is_not_signed() {
        let v = verdict(vec![pass("e2a.example", &["from", "to", "subject"])]);
        assert_eq!(
            trusted_conversation_id(&parsed(ID), &v, &["e2a.example"]),
            None
        );
    }

    #[test]
    fn untrusted_when_signed_by_another_domain() {
        for d in [
            "evil.example",
            "e2a.example.evil",
            "xe2a.example",
            "example",
        ] {
            let v = verdict(vec![pass(d, SIGNED)]);
            assert_eq!(
                trusted_conversation_id(&parsed(ID), &v, &["e2a.example"]),
                None,
                "{d}"
            );
        }
    }

    #[test]
    fn untrusted_without_a_passing_signature_even_from_our_envelope() {
        // The envelope (SPF) is ours and passes, but no DKIM signature passed.
        let v = verdict(Vec::new());
        assert_eq!(v.spf_domain, "e2a.example");
        assert_eq!(
            trusted_conversation_id(&parsed(ID), &v, &["e2a.example"]),
            None
        );
    }

    #[test]
    fn untrusted_unless_minted_by_us() {
        let v = verdict(vec![pass("e2a.example", SIGNED)]);
        for bad in [
            "",
            "cnv abc",
            "cnv_abc;drop",
            "cnv_abc",
            "support",
            "cnv_0123456789ABCDEF0123456789abcdef",
            "cnv_é",
            "a\u{0}b",
            &"a".repeat(201),
        ] {
            assert_eq!(
                trusted_conversation_id(&parsed(bad), &v, &["e2a.example"]),
                None,
                "{bad:?}"
            );
        }
        assert!(trusted_conversation_id(&parsed(&"a".repeat(200)), &v, &["e2a.example"]).is_none());
        assert!(trusted_conversation_id(&parsed(&mint()), &v, &["e2a.example"]).is_some());
    }

    #[test]
    fn untrusted_when_absent_or_repeated() {
        let v = verdict(vec![pass("e2a.example", SIGNED)]);
        assert_eq!(
            trusted_conversation_id(&ParsedMessage::default(), &v, &["e2a.example"]),
            None
        );
        let mut twice = parsed(ID);
        twice.conversation_header_count = 2;
        assert_eq!(trusted_conversation_id(&twice, &v, &["e2a.example"]), None);
        assert_eq!(trusted_conversation_id(&parsed(ID), &v, &[]), None);
        assert_eq!(trusted_conversation_id(&parsed(ID), &v, &[""]), None);
    }

    #[test]
    fn minted_ids_are_valid_fresh_and_well_formed() {
        let a = mint();
        let b = mint();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(is_valid(id));
            let hex = id.strip_prefix(PREFIX).unwrap();
            assert_eq!(hex.len(), 32);
            assert!(
                hex.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            );
        }
    }

    #[test]
    fn domain_within_is_label_aligned() {
        assert!(domain_within("a.b.example", "b.example"));
        assert!(domain_within("B.Example", "b.example"));
        assert!(!domain_within("ab.example", "b.example"));
        assert!(!domain_within("b.example", "a.b.example"));
        assert!(!domain_within(".b.example", "b.example"));
        assert!(!domain_within("", "b.example"));
    }
}
