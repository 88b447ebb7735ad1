//! The pure rules for drafting a reply or a forward from an inbound parent
//! message (spec §7.1 and §7.2), with our fixes:
//!
//! - [`reply_subject`], [`forward_subject`]: the `Re: `/`Fwd: ` prefixes,
//!   added once (any case, with or without a space after the colon);
//! - [`threading`]: `In-Reply-To` and a `References` chain capped at
//!   [`MAX_REPLY_REFERENCES`] ids so it cannot grow without bound;
//! - [`reply_recipients`], [`canonical_recipients`]: who a reply goes to,
//!   and the canonical To/Cc/Bcc lists without the agent's own address;
//! - [`forward_body`]: the caller's comment above a quoted copy of the
//!   parent, as text and (when either side has HTML) as escaped HTML.
//!
//! Everything taken from the parent is untrusted: subjects and header lines
//! derived from it have control characters (CR, LF, NUL, …) turned into
//! spaces, so a hostile parent cannot make a reply fail
//! [`crate::compose::OutgoingMessage::validate`] or forge lines in a quoted
//! header block; ids that are not valid bare message ids are dropped; header
//! values placed in HTML are escaped. Nothing here does I/O or panics.

use std::collections::HashSet;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::parse::MAX_ID_LEN;

/// Most ids a reply's `References` carries: the thread's first message and
/// the newest `MAX_REPLY_REFERENCES - 1` (RFC 5322 §3.6.4 allows trimming;
/// the root and the recent ancestors are what threading uses).
pub const MAX_REPLY_REFERENCES: usize = 20;

/// Subject of a reply used when the parent has none.
pub const EMPTY_REPLY_SUBJECT: &str = "Re: your message";

/// Subject of a forward used when the parent has none.
pub const EMPTY_FORWARD_SUBJECT: &str = "Fwd: (no subject)";

/// The line that opens a forwarded copy (Gmail's wording).
pub const FORWARD_SEPARATOR: &str = "---------- Forwarded message ---------";

/// The parent's subject on one line: every control character (CR, LF, NUL,
/// tab, …) becomes a space; the result is trimmed.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// True when `value` starts with `prefix` (ASCII, lower-case), any case.
fn starts_with_ci(value: &str, prefix: &str) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// The subject of a reply to a message titled `parent`: `Re: <subject>`,
/// unchanged when it already starts with `re:` in any case (`Re:`, `RE:`,
/// `re:x`), [`EMPTY_REPLY_SUBJECT`] when blank. The parent is put on one
/// line first (control characters become spaces, trimmed).
pub fn reply_subject(parent: &str) -> String {
    let subject = one_line(parent);
    if subject.is_empty() {
        EMPTY_REPLY_SUBJECT.to_string()
    } else if starts_with_ci(&subject, "re:") {
        subject
    } else {
        format!("Re: {subject}")
    }
}

/// The subject of a forward of a message titled `parent`: `Fwd: <subject>`,
/// unchanged when it already starts with `fwd:` or `fw:` in any case,
/// [`EMPTY_FORWARD_SUBJECT`] when blank. Put on one line like
/// [`reply_subject`].
pub fn forward_subject(parent: &str) -> String {
    let subject = one_line(parent);
    if subject.is_empty() {
        EMPTY_FORWARD_SUBJECT.to_string()
    } else if starts_with_ci(&subject, "fwd:") || starts_with_ci(&subject, "fw:") {
        subject
    } else {
        format!("Fwd: {subject}")
    }
}

/// `id` as a bare message id (trimmed, one pair of angle brackets removed),
/// or `None` when it is not one [`crate::compose`] accepts.
fn bare_id(id: &str) -> Option<String> {
    let id = id.trim();
    let id = id
        .strip_prefix('<')
        .and_then(|i| i.strip_suffix('>'))
        .unwrap_or(id);
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
    valid.then(|| id.to_string())
}

/// The threading headers of a reply: `(In-Reply-To, References)`.
///
/// - `In-Reply-To` is the parent's `Message-ID`;
/// - `References` is the parent's `References` (or, when it has none, its
///   `In-Reply-To`) without the parent's id, then the parent's id last;
///   deduplicated (first occurrence kept), and capped at
///   [`MAX_REPLY_REFERENCES`]: the first id and the newest ones are kept.
///
/// Ids are accepted bare or in angle brackets; ones that are not valid
/// message ids are dropped. Without a parent id there is no `In-Reply-To`,
/// and `References` is the parent's chain alone.
pub fn threading(
    parent_message_id: Option<&str>,
    parent_references: &[String],
    parent_in_reply_to: &[String],
) -> (Option<String>, Vec<String>) {
    let parent = parent_message_id.and_then(bare_id);
    let valid = |ids: &[String]| ids.iter().filter_map(|id| bare_id(id)).collect::<Vec<_>>();
    let mut chain = valid(parent_references);
    if chain.is_empty() {
        chain = valid(parent_in_reply_to);
    }

    let mut seen = HashSet::new();
    let mut references: Vec<String> = chain
        .into_iter()
        .filter(|id| Some(id) != parent.as_ref())
        .filter(|id| seen.insert(id.clone()))
        .collect();
    references.extend(parent.clone());

    if references.len() > MAX_REPLY_REFERENCES {
        let newest = references.split_off(references.len() - (MAX_REPLY_REFERENCES - 1));
        references.truncate(1);
        references.extend(newest);
    }
    (parent, references)
}

/// Who a reply goes to: `(To, Cc)`.
///
/// To is the parent's `Reply-To` addresses, else its `From`; with
/// `reply_all`, Cc is the parent's To followed by its Cc. Addresses are
/// trimmed and blanks dropped; nothing else is removed here — pass the
/// result through [`canonical_recipients`] to drop the agent's own address
/// and duplicates.
pub fn reply_recipients(
    parent_from: Option<&str>,
    parent_reply_to: &[String],
    parent_to: &[String],
    parent_cc: &[String],
    reply_all: bool,
) -> (Vec<String>, Vec<String>) {
    let clean = |list: &[String]| -> Vec<String> {
        list.iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut to = clean(parent_reply_to);
    if to.is_empty() {
        to = parent_from
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .into_iter()
            .collect();
    }
    let cc = if reply_all {
        let mut cc = clean(parent_to);
        cc.extend(clean(parent_cc));
        cc
    } else {
        Vec::new()
    };
    (to, cc)
}

/// Canonical recipient lists of an outbound message (spec §7.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipients {
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
}

impl Recipients {
    /// True when nobody would see the message in `To` or `Cc` (the API's
    /// "no valid recipients").
    pub fn no_visible_recipient(&self) -> bool {
        self.to.is_empty() && self.cc.is_empty()
    }

    /// The SMTP envelope: To, then Cc, then Bcc.
    pub fn envelope(&self) -> impl Iterator<Item = &str> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(String::as_str)
    }
}

/// `address` trimmed, taken out of `Name <…>` or `<…>` when written so, and
/// lower-cased; `None` when blank.
fn canonical_address(address: &str) -> Option<String> {
    let address = address.trim();
    let inner = match (address.rfind('<'), address.strip_suffix('>')) {
        (Some(open), Some(without_close)) => without_close.get(open + 1..).unwrap_or_default(),
        _ => address,
    };
    let inner = inner.trim();
    (!inner.is_empty()).then(|| inner.to_lowercase())
}

/// The canonical recipients (spec §7.2): each address trimmed, taken out of
/// angle brackets, lower-cased; blanks and the agent's own addresses
/// (`own`, any case) dropped; duplicates dropped (first kept); Cc without
/// anything in To; Bcc without anything in To or Cc. Addresses are not
/// otherwise checked here: [`crate::compose::OutgoingMessage::validate`]
/// refuses malformed ones, naming the list.
pub fn canonical_recipients(
    own: &[&str],
    to: &[String],
    cc: &[String],
    bcc: &[String],
) -> Recipients {
    let mut seen: HashSet<String> = own.iter().filter_map(|a| canonical_address(a)).collect();
    let mut take = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter_map(|a| canonical_address(a))
            .filter(|a| seen.insert(a.clone()))
            .collect()
    };
    let to = take(to);
    let cc = take(cc);
    let bcc = take(bcc);
    Recipients { to, cc, bcc }
}

/// The parent message of a forward, as the quoted block shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardedParent {
    /// The `From` line as shown, e.g. `Alice <alice@example.com>`.
    pub from: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub date: Option<OffsetDateTime>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// The quoted header block lines, `(label, value)`, each value on one line.
fn header_lines(parent: &ForwardedParent) -> Vec<(&'static str, String)> {
    let mut lines = Vec::with_capacity(5);
    if let Some(from) = parent
        .from
        .as_deref()
        .map(one_line)
        .filter(|f| !f.is_empty())
    {
        lines.push(("From", from));
    }
    if let Some(date) = parent.date.and_then(|d| d.format(&Rfc2822).ok()) {
        lines.push(("Date", date));
    }
    lines.push(("Subject", one_line(&parent.subject)));
    let joined = |list: &[String]| {
        list.iter()
            .map(|a| one_line(a))
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let to = joined(&parent.to);
    if !to.is_empty() {
        lines.push(("To", to));
    }
    let cc = joined(&parent.cc);
    if !cc.is_empty() {
        lines.push(("Cc", cc));
    }
    lines
}

/// `value` with `&`, `<`, `>`, `"` and `'` escaped for HTML text and
/// attribute values.
pub fn escape_html(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + value.len() / 8);
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Plain text as HTML: escaped, each line break (CRLF, LF or CR) a `<br>`.
fn text_as_html(text: &str) -> String {
    escape_html(text)
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "<br>\n")
}

/// The body of a forward: `(text, html)`.
///
/// Text: the caller's comment (its text, else its HTML rendered as text)
/// and a blank line when there is one, then [`FORWARD_SEPARATOR`], the
/// parent's `From`, `Date`, `Subject`, `To` and `Cc` lines (absent ones
/// left out), a blank line and the parent's text (else its HTML rendered as
/// text).
///
/// HTML, only when the comment or the parent has HTML: the comment (its
/// HTML as given, else its text escaped), the same header block with every
/// value HTML-escaped, and the parent's HTML (else its text escaped) in a
/// `<blockquote>`. The caller's HTML and the parent's HTML are included as
/// they are: they are the message content being sent.
pub fn forward_body(
    comment_text: Option<&str>,
    comment_html: Option<&str>,
    parent: &ForwardedParent,
) -> (String, Option<String>) {
    let comment_text = comment_text.filter(|c| !c.trim().is_empty());
    let comment_html = comment_html.filter(|c| !c.trim().is_empty());
    let headers = header_lines(parent);

    let mut text = String::new();
    let comment_as_text = match (comment_text, comment_html) {
        (Some(t), _) => Some(t.to_string()),
        (None, Some(h)) => Some(mail_parser::decoders::html::html_to_text(h)),
        (None, None) => None,
    };
    if let Some(comment) = comment_as_text {
        text.push_str(comment.trim_end());
        text.push_str("\n\n");
    }
    text.push_str(FORWARD_SEPARATOR);
    text.push('\n');
    for (label, value) in &headers {
        text.push_str(label);
        text.push_str(": ");
        text.push_str(value);
        text.push('\n');
    }
    text.push('\n');
    match (&parent.text, &parent.html) {
        (Some(t), _) => text.push_str(t),
        (None, Some(h)) => text.push_str(&mail_parser::decoders::html::html_to_text(h)),
        (None, None) => {}
    }

    if comment_html.is_none() && parent.html.is_none() {
        return (text, None);
    }

    let mut html = String::new();
    match (comment_html, comment_text) {
        (Some(h), _) => {
            html.push_str("<div>");
            html.push_str(h);
            html.push_str("</div>\n<br>\n");
        }
        (None, Some(t)) => {
            html.push_str("<div>");
            html.push_str(&text_as_html(t));
            html.push_str("</div>\n<br>\n");
        }
        (None, None) => {}
    }
    html.push_str("<div class=\"e2a_forward\">");
    html.push_str(FORWARD_SEPARATOR);
    html.push_str("<br>\n");
    for (label, value) in &headers {
        html.push_str(label);
        html.push_str(": ");
        html.push_str(&escape_html(value));
        html.push_str("<br>\n");
    }
    html.push_str("</div>\n<br>\n<blockquote style=\"margin:0 0 0 .8ex;border-left:1px solid #ccc;padding-left:1ex\">\n");
    match (&parent.html, &parent.text) {
        (Some(h), _) => html.push_str(h),
        (None, Some(t)) => html.push_str(&text_as_html(t)),
        (None, None) => {}
    }
    html.push_str("\n</blockquote>\n");
    (text, Some(html))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reply_subject_adds_re_once() {
        assert_eq!(reply_subject("Invoice"), "Re: Invoice");
        assert_eq!(reply_subject("  Invoice  "), "Re: Invoice");
        for already in [
            "Re: Invoice",
            "RE: Invoice",
            "re: Invoice",
            "Re:Invoice",
            "rE:x",
            "re:",
        ] {
            assert_eq!(reply_subject(already), already, "{already:?}");
        }
        // Not a prefix: "Regarding", "Re " without a colon.
        assert_eq!(reply_subject("Regarding lunch"), "Re: Regarding lunch");
        assert_eq!(reply_subject("Re Invoice"), "Re: Re Invoice");
        assert_eq!(reply_subject("Fwd: news"), "Re: Fwd: news");
        for blank in ["", "   ", "\t\r\n"] {
            assert_eq!(reply_subject(blank), EMPTY_REPLY_SUBJECT, "{blank:?}");
        }
        // Multi-byte text at the front does not panic on the prefix check.
        assert_eq!(reply_subject("ré: x"), "Re: ré: x");
        assert_eq!(reply_subject("é"), "Re: é");
    }

    #[test]
    fn forward_subject_adds_fwd_once() {
        assert_eq!(forward_subject("Invoice"), "Fwd: Invoice");
        for already in [
            "Fwd: Invoice",
            "FWD: x",
            "fwd:x",
            "Fw: Invoice",
            "FW:x",
            "fw: ",
        ] {
            assert_eq!(forward_subject(already), already.trim(), "{already:?}");
        }
        assert_eq!(forward_subject("Re: Invoice"), "Fwd: Re: Invoice");
        assert_eq!(forward_subject("Fwdx"), "Fwd: Fwdx");
        assert_eq!(forward_subject(""), EMPTY_FORWARD_SUBJECT);
        assert_eq!(forward_subject(" \n "), EMPTY_FORWARD_SUBJECT);
    }

    #[test]
    fn subjects_from_a_hostile_parent_are_one_line() {
        let hostile = "Hi\r\nBcc: evil@example.com\0";
        assert_eq!(reply_subject(hostile), "Re: Hi  Bcc: evil@example.com");
        assert_eq!(forward_subject(hostile), "Fwd: Hi  Bcc: evil@example.com");
        assert!(!reply_subject("\r\nRe: x").contains(['\r', '\n']));
        assert_eq!(reply_subject("\r\nRe: x"), "Re: x");
    }

    #[test]
    fn threading_follows_the_parent() {
        let (irt, refs) = threading(Some("p@x"), &ids(&["a@x", "b@x"]), &ids(&["b@x"]));
        assert_eq!(irt.as_deref(), Some("p@x"));
        assert_eq!(refs, ids(&["a@x", "b@x", "p@x"]));

        // No References: the parent's In-Reply-To.
        let (_, refs) = threading(Some("p@x"), &[], &ids(&["b@x"]));
        assert_eq!(refs, ids(&["b@x", "p@x"]));

        // A first message: just the parent.
        let (irt, refs) = threading(Some("<p@x>"), &[], &[]);
        assert_eq!(irt.as_deref(), Some("p@x"));
        assert_eq!(refs, ids(&["p@x"]));
    }

    #[test]
    fn threading_moves_the_parent_last_and_deduplicates() {
        let (_, refs) = threading(
            Some("p@x"),
            &ids(&["a@x", "p@x", "b@x", "a@x", "<b@x>"]),
            &[],
        );
        assert_eq!(refs, ids(&["a@x", "b@x", "p@x"]));
    }

    #[test]
    fn threading_drops_invalid_ids_and_falls_back() {
        let (irt, refs) = threading(
            Some("not an id"),
            &ids(&["", "has space@x", "ok@x", "bad\r\n@x"]),
            &ids(&["irt@x"]),
        );
        assert_eq!(irt, None);
        assert_eq!(refs, ids(&["ok@x"]));

        // Only invalid References: In-Reply-To is used instead.
        let (_, refs) = threading(Some("p@x"), &ids(&["<>", " "]), &ids(&["irt@x"]));
        assert_eq!(refs, ids(&["irt@x", "p@x"]));

        let (irt, refs) = threading(None, &[], &[]);
        assert_eq!((irt, refs), (None, vec![]));
    }

    #[test]
    fn threading_caps_the_chain_keeping_the_root_and_the_newest() {
        let chain: Vec<String> = (0..100).map(|i| format!("m{i}@x")).collect();
        let (_, refs) = threading(Some("p@x"), &chain, &[]);
        assert_eq!(refs.len(), MAX_REPLY_REFERENCES);
        assert_eq!(refs[0], "m0@x");
        assert_eq!(refs[1], "m82@x");
        assert_eq!(refs[MAX_REPLY_REFERENCES - 2], "m99@x");
        assert_eq!(refs[MAX_REPLY_REFERENCES - 1], "p@x");

        // Exactly at the cap: untouched.
        let chain: Vec<String> = (0..MAX_REPLY_REFERENCES - 1)
            .map(|i| format!("m{i}@x"))
            .collect();
        let (_, refs) = threading(Some("p@x"), &chain, &[]);
        assert_eq!(refs.len(), MAX_REPLY_REFERENCES);
        assert_eq!(refs[..MAX_REPLY_REFERENCES - 1], chain[..]);

        // Replying to a reply of a reply never grows past the cap.
        let mut refs: Vec<String> = Vec::new();
        for i in 0..200 {
            let (_, next) = threading(Some(&format!("r{i}@x")), &refs, &[]);
            assert!(next.len() <= MAX_REPLY_REFERENCES);
            refs = next;
        }
        assert_eq!(refs[0], "r0@x");
        assert_eq!(refs.last().map(String::as_str), Some("r199@x"));
    }

    #[test]
    fn reply_goes_to_reply_to_else_from() {
        let (to, cc) = reply_recipients(
            Some("alice@example.com"),
            &ids(&["team@example.com", " "]),
            &ids(&["agent@agents.example"]),
            &ids(&["bob@example.com"]),
            false,
        );
        assert_eq!(to, ids(&["team@example.com"]));
        assert!(cc.is_empty());

        let (to, _) = reply_recipients(Some(" alice@example.com "), &[], &[], &[], false);
        assert_eq!(to, ids(&["alice@example.com"]));

        let (to, cc) = reply_recipients(None, &[], &ids(&["x@y"]), &[], false);
        assert!(to.is_empty() && cc.is_empty());
    }

    #[test]
    fn reply_all_copies_the_parents_to_and_cc() {
        let (to, cc) = reply_recipients(
            Some("alice@example.com"),
            &[],
            &ids(&["agent@agents.example", "carol@example.com"]),
            &ids(&["bob@example.com"]),
            true,
        );
        assert_eq!(to, ids(&["alice@example.com"]));
        assert_eq!(
            cc,
            ids(&[
                "agent@agents.example",
                "carol@example.com",
                "bob@example.com"
            ])
        );

        // The caller then drops its own address and duplicates.
        let recipients = canonical_recipients(&["Agent@Agents.Example"], &to, &cc, &[]);
        assert_eq!(recipients.to, ids(&["alice@example.com"]));
        assert_eq!(
            recipients.cc,
            ids(&["carol@example.com", "bob@example.com"])
        );
    }

    #[test]
    fn canonical_recipients_follow_the_spec() {
        let r = canonical_recipients(
            &["agent@agents.example", "agent@e2a.example"],
            &ids(&[
                " Alice@Example.com ",
                "alice@example.com",
                "Agent@Agents.Example",
                "",
            ]),
            &ids(&[
                "ALICE@example.com",
                "Bob <Bob@Example.com>",
                "agent@e2a.example",
            ]),
            &ids(&[
                "<bob@example.com>",
                "carol@example.com",
                "CAROL@example.com",
            ]),
        );
        assert_eq!(r.to, ids(&["alice@example.com"]));
        assert_eq!(r.cc, ids(&["bob@example.com"]));
        assert_eq!(r.bcc, ids(&["carol@example.com"]));
        assert!(!r.no_visible_recipient());
        assert_eq!(
            r.envelope().collect::<Vec<_>>(),
            ["alice@example.com", "bob@example.com", "carol@example.com"]
        );

        let only_self = canonical_recipients(&["me@x"], &ids(&["ME@x"]), &[], &ids(&["b@x"]));
        assert!(only_self.no_visible_recipient());
        assert_eq!(only_self.bcc, ids(&["b@x"]));
    }

    fn parent() -> ForwardedParent {
        ForwardedParent {
            from: Some("Alice <alice@example.com>".into()),
            to: ids(&["agent@agents.example", "bob@example.com"]),
            cc: ids(&["carol@example.com"]),
            date: Some(datetime!(2025-07-01 12:34:56 UTC)),
            subject: "Quarterly <numbers> & \"plans\"".into(),
            text: Some("The numbers are in.\n".into()),
            html: None,
        }
    }

    #[test]
    fn forward_text_is_comment_then_quoted_headers_then_original() {
        let (text, html) = forward_body(Some("FYI, see below."), None, &parent());
        assert_eq!(
            text,
            "FYI, see below.\n\n\
             ---------- Forwarded message ---------\n\
             From: Alice <alice@example.com>\n\
             Date: Tue, 01 Jul 2025 12:34:56 +0000\n\
             Subject: Quarterly <numbers> & \"plans\"\n\
             To: agent@agents.example, bob@example.com\n\
             Cc: carol@example.com\n\
             \n\
             The numbers are in.\n"
        );
        assert_eq!(html, None, "no HTML on either side");
    }

    #[test]
    fn forward_without_comment_or_optional_headers() {
        let bare = ForwardedParent {
            subject: "Hi".into(),
            ..ForwardedParent::default()
        };
        let (text, html) = forward_body(Some("  "), None, &bare);
        assert_eq!(text, format!("{FORWARD_SEPARATOR}\nSubject: Hi\n\n"));
        assert_eq!(html, None);
    }

    #[test]
    fn forward_html_escapes_headers_and_quotes_the_original() {
        let mut p = parent();
        p.html = Some("<p>The <b>numbers</b> are in.</p>".into());
        let (text, html) = forward_body(Some("FYI <3"), None, &p);
        let html = html.expect("the parent has HTML");
        assert!(text.starts_with("FYI <3\n\n"), "{text}");
        assert!(html.starts_with("<div>FYI &lt;3</div>"), "{html}");
        assert!(
            html.contains("From: Alice &lt;alice@example.com&gt;<br>"),
            "{html}"
        );
        assert!(
            html.contains("Subject: Quarterly &lt;numbers&gt; &amp; &quot;plans&quot;<br>"),
            "{html}"
        );
        assert!(html.contains("<blockquote"), "{html}");
        assert!(
            html.contains("<p>The <b>numbers</b> are in.</p>\n</blockquote>"),
            "{html}"
        );
        // The text keeps the parent's text; HTML-only parents get theirs rendered.
        assert!(text.ends_with("The numbers are in.\n"), "{text}");
        p.text = None;
        let (text, _) = forward_body(None, None, &p);
        assert!(text.contains("The numbers are in."), "{text}");
        assert!(!text.contains("<b>"), "{text}");
    }

    #[test]
    fn forward_html_is_built_when_only_the_caller_has_html() {
        let (text, html) = forward_body(None, Some("<p>See <i>this</i></p>"), &parent());
        let html = html.expect("the caller has HTML");
        assert!(
            html.starts_with("<div><p>See <i>this</i></p></div>"),
            "{html}"
        );
        assert!(
            html.contains("<blockquote style=\"margin:0 0 0 .8ex;border-left:1px solid #ccc;padding-left:1ex\">\nThe numbers are in.<br>\n\n</blockquote>"),
            "{html}"
        );
        assert!(text.starts_with("See this"), "{text}");
    }

    #[test]
    fn forward_header_lines_cannot_be_forged_by_the_parent() {
        let mut p = parent();
        p.subject = "x\r\nFrom: ceo@example.com".into();
        p.from = Some("a@b\n<script>".into());
        p.html = Some(String::new());
        let (text, html) = forward_body(None, None, &p);
        assert!(
            text.contains("Subject: x  From: ceo@example.com\n"),
            "{text}"
        );
        assert_eq!(text.matches("\nFrom: ").count(), 1, "{text}");
        let html = html.expect("html");
        assert!(!html.contains("<script>"), "{html}");
    }

    #[test]
    fn a_date_that_rfc_2822_cannot_express_is_left_out() {
        let mut p = parent();
        p.date = Some(datetime!(1800-01-01 0:00 UTC));
        let (text, _) = forward_body(None, None, &p);
        assert!(!text.contains("Date:"), "{text}");
    }

    proptest::proptest! {
        /// Whatever the parent holds, what we derive from it passes
        /// `compose`'s validation: a hostile parent cannot make a reply fail.
        #[test]
        fn derived_subjects_and_ids_always_validate(
            subject in proptest::prelude::any::<String>(),
            id in proptest::prelude::any::<String>(),
            chain in proptest::collection::vec(proptest::prelude::any::<String>(), 0..40),
        ) {
            let (in_reply_to, references) = threading(Some(&id), &chain, &chain);
            proptest::prop_assert!(references.len() <= MAX_REPLY_REFERENCES);
            for subject in [reply_subject(&subject), forward_subject(&subject)] {
                let msg = crate::compose::OutgoingMessage {
                    from: crate::compose::Mailbox { name: None, address: "a@agents.example".into() },
                    reply_to: vec![],
                    to: vec!["b@example.com".into()],
                    cc: vec![],
                    subject,
                    message_id: "m@agents.example".into(),
                    date: datetime!(2025-07-01 0:00 UTC),
                    in_reply_to: in_reply_to.clone(),
                    references: references.clone(),
                    conversation_id: None,
                    text: String::new(),
                    html: None,
                    attachments: vec![],
                };
                proptest::prop_assert_eq!(msg.validate(), Ok(()));
            }
        }
    }

    #[test]
    fn escape_html_covers_the_five_characters() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(text_as_html("a\r\nb\rc\nd"), "a<br>\nb<br>\nc<br>\nd");
    }
}
