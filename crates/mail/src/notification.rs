//! The reviewer's notification of a message held for human-in-the-loop
//! review (spec §4.6): what the agent wants to send, when the hold expires,
//! and the approve, reject and dashboard links. The message body is left
//! out on purpose (it may be long, and the mailbox it goes to is not the
//! place to keep it); the dashboard shows it.
//!
//! [`review_notification`] builds the [`OutgoingMessage`] from
//! [`ReviewFacts`]; [`crate::compose`] turns it into bytes. Everything the
//! agent controls (subject, display name, addresses) is shown on one line
//! with control and line-separator characters replaced ([`one_line`]), and
//! HTML-escaped in the HTML part ([`escape_html`]): a hostile subject can
//! neither add a header nor a fake line ("Approve: https://…") to the text
//! nor markup to the HTML.
//!
//! The links carry single-use bearer tokens: [`ReviewFacts`]'s `Debug`
//! leaves them out, and the composed bodies must never be logged.

use time::{OffsetDateTime, UtcOffset, macros::format_description};

use crate::compose::{ComposeError, Mailbox, OutgoingMessage, mint_message_id};

/// Local part of the notification sender (`From`, `Reply-To` and the
/// envelope sender).
pub const SENDER_LOCAL_PART: &str = "hitl-noreply";
/// Display name of the notification sender.
pub const SENDER_NAME: &str = "e2a";
/// Longest agent subject shown in the notification's own subject, in
/// characters, the `...` included.
pub const SUBJECT_MAX_CHARS: usize = 60;

/// What the reviewer is asked to decide, and where.
#[derive(Clone)]
pub struct ReviewFacts<'a> {
    /// The sending agent's address.
    pub agent_address: &'a str,
    /// The agent's display name (may be empty).
    pub agent_name: &'a str,
    /// The held message's subject, as the agent wrote it.
    pub subject: &'a str,
    /// The held message's `To` addresses.
    pub to: &'a [String],
    /// Its `Cc` addresses.
    pub cc: &'a [String],
    /// Its `Bcc` addresses (shown to the owner, who may see them).
    pub bcc: &'a [String],
    /// `send`, `reply`, `forward` or `test`.
    pub message_type: &'a str,
    /// When the hold ends and the agent's expiry action applies.
    pub approval_expires_at: OffsetDateTime,
    /// The approve link (carries a bearer token).
    pub approve_url: &'a str,
    /// The reject link (carries a bearer token).
    pub reject_url: &'a str,
    /// `<public_url>/dashboard/pending/<msg_id>`.
    pub dashboard_url: &'a str,
    /// The owner's account address: the notification's only recipient.
    pub owner_address: &'a str,
    /// The deployment's outbound domain; the sender is
    /// `hitl-noreply@<from_domain>`.
    pub from_domain: &'a str,
}

impl std::fmt::Debug for ReviewFacts<'_> {
    /// Leaves out the links: their tokens approve or reject the message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewFacts")
            .field("agent_address", &self.agent_address)
            .field("to", &self.to.len())
            .field("cc", &self.cc.len())
            .field("bcc", &self.bcc.len())
            .field("message_type", &self.message_type)
            .field("approval_expires_at", &self.approval_expires_at)
            .field("from_domain", &self.from_domain)
            .finish_non_exhaustive()
    }
}

/// Why no notification could be built: a fact the deployment or the
/// database supplied is unusable (a bug or a misconfiguration, not the
/// agent's input — the agent's subject is always made safe).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    /// A link that is not an absolute `https://` or `http://` URL, or that
    /// holds whitespace, quotes or angle brackets.
    #[error("{field} is not an absolute http(s) URL")]
    InvalidUrl {
        /// `approve_url`, `reject_url` or `dashboard_url`.
        field: &'static str,
    },
    /// The message would not compose (e.g. an unusable owner address or
    /// sender domain).
    #[error(transparent)]
    Compose(#[from] ComposeError),
}

/// The notification's sender, `hitl-noreply@<from_domain>`: its `From`,
/// `Reply-To` and envelope sender.
pub fn sender_address(from_domain: &str) -> String {
    format!("{SENDER_LOCAL_PART}@{}", from_domain.trim())
}

/// The reviewer's notification for `facts`, dated `date`.
///
/// From and Reply-To `e2a <hitl-noreply@<from_domain>>`, To the owner,
/// Subject [`notification_subject`], a fresh Message-ID at `from_domain`,
/// a text part and an HTML alternative that list type, agent, To, Cc,
/// Bcc, Subject and Expires and the approve, reject and dashboard links;
/// no body. The result passes [`OutgoingMessage::validate`], so
/// [`crate::compose`] accepts it. Pure but for the random Message-ID.
pub fn review_notification(
    facts: &ReviewFacts<'_>,
    date: OffsetDateTime,
) -> Result<OutgoingMessage, NotificationError> {
    for (url, field) in [
        (facts.approve_url, "approve_url"),
        (facts.reject_url, "reject_url"),
        (facts.dashboard_url, "dashboard_url"),
    ] {
        if !is_http_url(url) {
            return Err(NotificationError::InvalidUrl { field });
        }
    }
    let sender = sender_address(facts.from_domain);
    let msg = OutgoingMessage {
        from: Mailbox {
            name: Some(SENDER_NAME.to_owned()),
            address: sender.clone(),
        },
        reply_to: vec![sender],
        to: vec![facts.owner_address.trim().to_owned()],
        cc: Vec::new(),
        subject: notification_subject(facts.agent_address, facts.subject),
        message_id: mint_message_id(facts.from_domain),
        date,
        in_reply_to: None,
        references: Vec::new(),
        conversation_id: None,
        text: text_body(facts),
        html: Some(html_body(facts)),
        attachments: Vec::new(),
    };
    msg.validate()?;
    Ok(msg)
}

/// `[e2a] approve outbound from <agent>: <subject>`, the agent's subject
/// made one line ([`one_line`]) and cut to [`SUBJECT_MAX_CHARS`]
/// characters (not bytes), ending in `...` when cut; `(no subject)` when
/// it is blank.
pub fn notification_subject(agent_address: &str, subject: &str) -> String {
    let subject = one_line(subject);
    let subject = if subject.is_empty() {
        "(no subject)".to_owned()
    } else if subject.chars().count() > SUBJECT_MAX_CHARS {
        let kept: String = subject.chars().take(SUBJECT_MAX_CHARS - 3).collect();
        format!("{}...", kept.trim_end())
    } else {
        subject
    };
    format!(
        "[e2a] approve outbound from {}: {subject}",
        one_line(agent_address)
    )
}

/// `value` safe to show on one line: every control character (CR, LF,
/// tab, NUL, C1), Unicode line/paragraph separator and bidirectional
/// override is replaced by a space, runs of whitespace become one space,
/// and the ends are trimmed.
pub fn one_line(value: &str) -> String {
    let replaced = value.chars().map(|c| {
        if c.is_control()
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            )
        {
            ' '
        } else {
            c
        }
    });
    let mut out = String::with_capacity(value.len());
    for c in replaced {
        if c.is_whitespace() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.truncate(out.trim_end().len());
    out
}

pub use crate::draft::escape_html;

/// An absolute http(s) URL that can stand between quotes or on a line of
/// its own: no whitespace, control characters, quotes or angle brackets.
fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && !r
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '<' | '>'))
    })
}

/// The hold's expiry as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn expiry_text(at: OffsetDateTime) -> String {
    at.to_offset(UtcOffset::UTC)
        .format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
        ))
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// The agent as shown: `Name <address>`, or the bare address; one line.
pub fn agent_text(agent_name: &str, agent_address: &str) -> String {
    let name = one_line(agent_name);
    let address = one_line(agent_address);
    if name.is_empty() {
        address
    } else {
        format!("{name} <{address}>")
    }
}

/// A recipient list on one line, `(none)` when empty.
pub fn list_text(list: &[String]) -> String {
    if list.is_empty() {
        return "(none)".to_owned();
    }
    list.iter()
        .map(|a| one_line(a))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The labelled facts, in display order, each one line of plain text.
fn fields(facts: &ReviewFacts<'_>) -> [(&'static str, String); 7] {
    let subject = one_line(facts.subject);
    [
        ("Type", one_line(facts.message_type)),
        ("From", agent_text(facts.agent_name, facts.agent_address)),
        ("To", list_text(facts.to)),
        ("Cc", list_text(facts.cc)),
        ("Bcc", list_text(facts.bcc)),
        (
            "Subject",
            if subject.is_empty() {
                "(no subject)".to_owned()
            } else {
                subject
            },
        ),
        ("Expires", expiry_text(facts.approval_expires_at)),
    ]
}

fn text_body(facts: &ReviewFacts<'_>) -> String {
    let mut out = String::from("An agent wants to send a message that needs your approval.\n\n");
    for (label, value) in fields(facts) {
        out.push_str(&format!("{label}: {value}\n"));
    }
    out.push_str(&format!(
        "\nApprove: {}\nReject: {}\nReview in the dashboard: {}\n\n",
        facts.approve_url, facts.reject_url, facts.dashboard_url
    ));
    out.push_str(
        "Each link opens a confirmation page and works once. The links stop working \
         shortly after the hold expires. The message body is not included here; \
         the dashboard shows it.\n",
    );
    out
}

fn html_body(facts: &ReviewFacts<'_>) -> String {
    let mut rows = String::new();
    for (label, value) in fields(facts) {
        rows.push_str(&format!(
            "<tr><th align=\"left\">{label}</th><td>{}</td></tr>\n",
            escape_html(&value)
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Approval needed</title></head>\n\
         <body>\n<p>An agent wants to send a message that needs your approval.</p>\n\
         <table>\n{rows}</table>\n\
         <p><a href=\"{approve}\">Approve</a> | <a href=\"{reject}\">Reject</a> | \
         <a href=\"{dashboard}\">Review in the dashboard</a></p>\n\
         <p>Each link opens a confirmation page and works once. The links stop working \
         shortly after the hold expires. The message body is not included here; \
         the dashboard shows it.</p>\n</body></html>\n",
        approve = escape_html(facts.approve_url),
        reject = escape_html(facts.reject_url),
        dashboard = escape_html(facts.dashboard_url),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compose, parse};

    const APPROVE: &str = "https://e2a.example/api/v1/approve?t=e2a_apv_aaaa";
    const REJECT: &str = "https://e2a.example/api/v1/reject?t=e2a_apv_bbbb";
    const DASHBOARD: &str = "https://e2a.example/dashboard/pending/msg_0123";

    fn facts<'a>(subject: &'a str, to: &'a [String]) -> ReviewFacts<'a> {
        ReviewFacts {
            agent_address: "bot@agents.example",
            agent_name: "Bot",
            subject,
            to,
            cc: &[],
            bcc: &[],
            message_type: "send",
            approval_expires_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            approve_url: APPROVE,
            reject_url: REJECT,
            dashboard_url: DASHBOARD,
            owner_address: "owner@example.com",
            from_domain: "mail.e2a.example",
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_799_990_000).unwrap()
    }

    fn to() -> Vec<String> {
        vec!["alice@example.net".to_owned()]
    }

    /// The header block of composed bytes, unfolded, one header a line.
    fn header_lines(raw: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(raw);
        let head = text.split("\r\n\r\n").next().unwrap();
        head.replace("\r\n ", " ")
            .replace("\r\n\t", " ")
            .split("\r\n")
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn sender_recipient_and_subject_follow_the_spec() {
        let to = to();
        let msg = review_notification(&facts("Quarterly report", &to), now()).unwrap();
        assert_eq!(msg.from.name.as_deref(), Some("e2a"));
        assert_eq!(msg.from.address, "hitl-noreply@mail.e2a.example");
        assert_eq!(msg.reply_to, vec!["hitl-noreply@mail.e2a.example"]);
        assert_eq!(msg.to, vec!["owner@example.com"]);
        assert!(msg.cc.is_empty());
        assert_eq!(
            msg.subject,
            "[e2a] approve outbound from bot@agents.example: Quarterly report"
        );
        assert!(msg.message_id.ends_with("@mail.e2a.example"));
        assert!(msg.attachments.is_empty());
    }

    #[test]
    fn long_subjects_are_cut_by_characters_not_bytes() {
        // 61 three-byte characters: over the limit by one.
        let long = "€".repeat(61);
        let subject = notification_subject("bot@a.example", &long);
        let shown = subject.split_once(": ").unwrap().1;
        assert_eq!(shown.chars().count(), SUBJECT_MAX_CHARS);
        assert_eq!(shown, format!("{}...", "€".repeat(57)));

        // Exactly at the limit: kept whole, no ellipsis.
        let exact = "ü".repeat(60);
        let subject = notification_subject("bot@a.example", &exact);
        assert_eq!(subject.split_once(": ").unwrap().1, exact);

        // Mixed widths (emoji are 4 bytes) never split a character.
        let mixed = "a😀".repeat(40);
        let shown = notification_subject("bot@a.example", &mixed);
        let shown = shown.split_once(": ").unwrap().1;
        assert_eq!(shown.chars().count(), SUBJECT_MAX_CHARS);
        assert!(shown.ends_with("..."));
        assert!(shown.starts_with("a😀a😀"));

        assert_eq!(
            notification_subject("bot@a.example", " \r\n "),
            "[e2a] approve outbound from bot@a.example: (no subject)"
        );
    }

    #[test]
    fn a_subject_with_line_breaks_adds_no_header() {
        let to = to();
        let hostile = "hi\r\nBcc: x@evil.example\r\nX-Injected: 1";
        let msg = review_notification(&facts(hostile, &to), now()).unwrap();
        assert!(!msg.subject.contains(['\r', '\n']));
        let raw = compose(&msg).unwrap();
        let headers = header_lines(&raw);
        let subjects: Vec<_> = headers
            .iter()
            .filter(|h| h.starts_with("Subject:"))
            .collect();
        assert_eq!(subjects.len(), 1, "{headers:?}");
        assert!(
            !headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("bcc:") || h.starts_with("X-Injected")),
            "{headers:?}"
        );
        let parsed = parse(&raw);
        assert_eq!(
            parsed.subject,
            "[e2a] approve outbound from bot@agents.example: hi Bcc: x@evil.example X-Injected: 1"
        );
        // Nor a line of its own in the text part.
        assert!(!msg.text.lines().any(|l| l.starts_with("Bcc: x@evil")));
    }

    #[test]
    fn separators_and_bidi_overrides_are_flattened() {
        assert_eq!(one_line("a\u{2028}b\u{202E}c\td\0e\u{85}f"), "a b c d e f");
        assert_eq!(one_line("  many   spaces \n"), "many spaces");
    }

    #[test]
    fn the_html_part_escapes_everything_the_agent_controls() {
        let to = vec!["a&b@example.net".to_owned()];
        let mut f = facts("<script>alert('x')</script> & \"q\"", &to);
        f.agent_name = "<b>Evil</b>";
        let msg = review_notification(&f, now()).unwrap();
        let html = msg.html.as_deref().unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>Evil"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;")
        );
        assert!(html.contains("&lt;b&gt;Evil&lt;/b&gt;"));
        assert!(html.contains("a&amp;b@example.net"));
        assert_eq!(escape_html("<>&\"'"), "&lt;&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn both_parts_list_the_facts_and_the_three_links() {
        let to = vec!["alice@example.net".to_owned(), "bob@example.net".to_owned()];
        let cc = vec!["carol@example.net".to_owned()];
        let bcc = vec!["dave@example.net".to_owned()];
        let mut f = facts("Quarterly report", &to);
        f.cc = &cc;
        f.bcc = &bcc;
        let msg = review_notification(&f, now()).unwrap();
        let html = msg.html.as_deref().unwrap();
        for part in [msg.text.as_str(), html] {
            for url in [APPROVE, REJECT, DASHBOARD] {
                assert!(part.contains(url), "{url} missing in {part}");
            }
            for fact in [
                "alice@example.net, bob@example.net",
                "carol@example.net",
                "dave@example.net",
                "Quarterly report",
                "2027-01-15 08:00:00 UTC",
                "Bot &lt;bot@agents.example&gt;",
            ] {
                let fact = if part == html {
                    fact.to_owned()
                } else {
                    fact.replace("&lt;", "<").replace("&gt;", ">")
                };
                assert!(part.contains(&fact), "{fact} missing in {part}");
            }
        }
        assert!(html.contains(&format!("<a href=\"{APPROVE}\">Approve</a>")));
        assert!(html.contains(&format!("<a href=\"{REJECT}\">Reject</a>")));

        // They survive composition as a text + HTML alternative.
        let raw = compose(&msg).unwrap();
        let parsed = parse(&raw);
        assert!(parsed.text.unwrap().contains(APPROVE));
        assert!(parsed.html.unwrap().contains(REJECT));
        assert!(String::from_utf8_lossy(&raw).contains("multipart/alternative"));
    }

    #[test]
    fn unusable_links_are_refused() {
        let to = to();
        for bad in [
            "javascript:alert(1)",
            "/api/v1/approve?t=x",
            "https://",
            "https://e2a.example/a\"onclick=\"x",
            "https://e2a.example/a b",
        ] {
            let mut f = facts("s", &to);
            f.approve_url = bad;
            assert_eq!(
                review_notification(&f, now()),
                Err(NotificationError::InvalidUrl {
                    field: "approve_url"
                }),
                "{bad}"
            );
        }
        let mut f = facts("s", &to);
        f.owner_address = "not an address";
        assert!(matches!(
            review_notification(&f, now()),
            Err(NotificationError::Compose(_))
        ));
    }

    #[test]
    fn debug_output_leaves_out_the_links() {
        let to = to();
        let shown = format!("{:?}", facts("s", &to));
        assert!(!shown.contains("e2a_apv_"), "{shown}");
    }
}
