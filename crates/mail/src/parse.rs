//! Best-effort MIME parsing of an inbound message (spec §6.3) into the fields
//! the API returns, with `mail-parser`.
//!
//! [`parse`] never panics and never fails: whatever the bytes (malformed MIME,
//! 8-bit garbage, NUL bytes, thousands of headers, over-long lines) it returns
//! a [`ParsedMessage`] whose unparsable fields are simply empty.

use std::borrow::Cow;

use mail_parser::{Address, HeaderName, MessageParser, MessagePart, MimeHeaders, PartType};
use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

/// At most this many ids are kept in [`ParsedMessage::references`]; when a
/// message carries more, the newest (rightmost) ones are kept.
pub const MAX_REFERENCES: usize = 100;

/// Most `In-Reply-To` ids kept (a reply names one parent; a few is generous).
pub const MAX_IN_REPLY_TO: usize = 10;

/// Longest message id kept, in bytes (RFC 5322 line limit). A longer
/// `Message-ID` is treated as absent: it could not be indexed (Postgres
/// B-tree entries are capped near 2.7 kB), and no real MTA mints one.
pub const MAX_ID_LEN: usize = 998;

/// Name of the conversation header (spec §4.5), matched case-insensitively.
pub const CONVERSATION_HEADER: &str = "X-E2A-Conversation-Id";

/// A mailbox of an address header: optional display name and the address as
/// written (case preserved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: String,
}

impl Mailbox {
    /// The address lower-cased (local part and domain), for comparisons.
    pub fn address_lower(&self) -> String {
        self.address.to_lowercase()
    }

    /// The lower-cased domain part (after the last `@`), if there is one.
    pub fn domain_lower(&self) -> Option<String> {
        self.address
            .rsplit_once('@')
            .map(|(_, d)| d.to_lowercase())
            .filter(|d| !d.is_empty())
    }
}

/// Metadata of one attachment; the content itself stays in the raw message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    /// The `filename`/`name` parameter, RFC 2231/2047-decoded.
    pub filename: Option<String>,
    /// `type/subtype`, lower-case; `application/octet-stream` when absent.
    pub content_type: String,
    /// Decoded size in bytes.
    pub size: usize,
}

/// The fields of an inbound message the gateway stores and returns.
///
/// Every field is best effort: an absent or unparsable header yields `None`,
/// an empty string or an empty list, never an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMessage {
    /// `Message-ID` without the angle brackets.
    pub message_id: Option<String>,
    /// `In-Reply-To` ids, bare, deduplicated in order.
    pub in_reply_to: Vec<String>,
    /// `References` ids, bare, split on whitespace/commas, deduplicated in
    /// order, at most [`MAX_REFERENCES`].
    pub references: Vec<String>,
    /// `Subject`, RFC 2047-decoded; empty when absent.
    pub subject: String,
    /// The first mailbox of the `From` field `mail-parser` returns (the last
    /// one when there are several). Display only: the authenticated sender
    /// is [`crate::auth::AuthVerdict::author`].
    pub from: Option<Mailbox>,
    /// `Reply-To` addresses (display names dropped).
    pub reply_to: Vec<String>,
    /// `To` addresses (display names dropped).
    pub to: Vec<String>,
    /// `Cc` addresses (display names dropped).
    pub cc: Vec<String>,
    /// `Date`, when valid.
    pub date: Option<OffsetDateTime>,
    /// The first text body; an HTML-only message gets its HTML converted to
    /// text here.
    pub text: Option<String>,
    /// The first `text/html` body, if the message has one.
    pub html: Option<String>,
    /// Attachment metadata, in MIME order.
    pub attachments: Vec<AttachmentInfo>,
    /// The raw, trimmed value of the first `X-E2A-Conversation-Id` header.
    /// Untrusted: see [`crate::conversation::trusted_conversation_id`].
    pub conversation_header: Option<String>,
    /// How many `X-E2A-Conversation-Id` headers the message has (trust
    /// requires exactly one).
    pub conversation_header_count: usize,
    /// Number of top-level header fields.
    pub header_count: usize,
}

impl ParsedMessage {
    /// The sender shown for the message: the first `From` address, else `None`.
    pub fn from_address(&self) -> Option<&str> {
        self.from.as_ref().map(|m| m.address.as_str())
    }

    /// `In-Reply-To` followed by `References`, deduplicated, the ids to look
    /// up when threading (spec §6.5).
    pub fn thread_ids(&self) -> Vec<String> {
        distinct_first(
            self.in_reply_to
                .iter()
                .chain(self.references.iter())
                .cloned(),
            MAX_IN_REPLY_TO + MAX_REFERENCES,
        )
    }
}

/// The `From` header fields of a message's top-level header block, as
/// `mail-parser` reads them (see [`from_fields`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FromFields {
    /// How many `From` header fields there are.
    pub fields: usize,
    /// Every mailbox address of every `From` field (groups included), in
    /// order, trimmed and as written; empty addresses dropped.
    pub addresses: Vec<String>,
}

/// The `From` header fields of `raw` as `mail-parser` reads them: the
/// parser behind [`parse`] and so behind every stored and displayed field.
///
/// `mail-parser` and `mail-auth` (which DMARC judges) disagree on malformed
/// header blocks: a line without a colon ends the header block for
/// `mail-auth` and is skipped by `mail-parser`, and with several `From`
/// fields [`ParsedMessage::from`] is taken from the last one.
/// [`crate::auth::AuthVerdict`] compares both views and is only verified
/// when they name the same single mailbox (RFC 7489 §6.6.1).
///
/// Guarantees: never panics, never fails, does no I/O; parses the header
/// block only.
pub fn from_fields(raw: &[u8]) -> FromFields {
    let Some(message) = MessageParser::default().parse_headers(raw) else {
        return FromFields::default();
    };
    let mut from = FromFields::default();
    for header in message.headers() {
        if header.name != HeaderName::From {
            continue;
        }
        from.fields += 1;
        if let Some(address) = header.value.as_address() {
            from.addresses.extend(
                address
                    .iter()
                    .filter_map(|a| a.address.as_deref().map(str::trim))
                    .filter(|a| !a.is_empty())
                    .map(str::to_string),
            );
        }
    }
    from
}

/// Parses `raw` (the DATA payload) into a [`ParsedMessage`].
///
/// Guarantees: never panics, never fails, does no I/O; fields that cannot be
/// parsed are left empty.
pub fn parse(raw: &[u8]) -> ParsedMessage {
    let Some(message) = MessageParser::default().parse(raw) else {
        return ParsedMessage::default();
    };
    let raw = message.raw_message();
    let root_headers = message.headers();

    let mut parsed = ParsedMessage {
        header_count: root_headers.len(),
        subject: message.subject().unwrap_or_default().trim().to_string(),
        from: message.from().and_then(first_mailbox),
        reply_to: addresses(message.reply_to()),
        to: addresses(message.to()),
        cc: addresses(message.cc()),
        date: message.date().and_then(to_offset_date_time),
        ..ParsedMessage::default()
    };

    // Every id of every References header, in order; deduplicated and cut to
    // the last MAX_REFERENCES once, after the loop (linear, whatever the
    // header holds).
    let mut references = Vec::new();
    for header in root_headers {
        let value = || -> Cow<'_, str> {
            raw.get(header.offset_start as usize..header.offset_end as usize)
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        };
        match &header.name {
            HeaderName::MessageId if parsed.message_id.is_none() => {
                parsed.message_id = bare_ids(&value()).into_iter().next();
            }
            HeaderName::InReplyTo if parsed.in_reply_to.is_empty() => {
                parsed.in_reply_to = distinct_first(bare_ids(&value()), MAX_IN_REPLY_TO);
            }
            HeaderName::References => references.extend(bare_ids(&value())),
            HeaderName::Other(name) if name.eq_ignore_ascii_case(CONVERSATION_HEADER) => {
                parsed.conversation_header_count += 1;
                if parsed.conversation_header.is_none() {
                    parsed.conversation_header = Some(value().trim().to_string());
                }
            }
            _ => {}
        }
    }
    parsed.references = distinct_last(references, MAX_REFERENCES);

    parsed.text = message.body_text(0).map(Cow::into_owned);
    parsed.html = message.html_bodies().find_map(|part| match &part.body {
        PartType::Html(html) => Some(html.to_string()),
        _ => None,
    });
    parsed.attachments = message.attachments().map(attachment_info).collect();
    parsed
}

/// Splits a `Message-ID`/`In-Reply-To`/`References` value into bare ids:
/// `<…>` groups when the value has any, else whitespace/comma-separated
/// tokens; angle brackets stripped, empties, ids with whitespace or control
/// characters and ids longer than [`MAX_ID_LEN`] dropped. Duplicates are
/// kept (callers deduplicate with [`distinct_first`]/[`distinct_last`]).
/// Linear in the length of `value`.
fn bare_ids(value: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut push = |id: &str| {
        let id = id.trim().trim_matches(|c| c == '<' || c == '>').trim();
        if !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && !id.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            ids.push(id.to_string());
        }
    };
    if value.contains('<') {
        let mut rest = value;
        while let Some(start) = rest.find('<') {
            let after = &rest[start + 1..];
            match after.find('>') {
                Some(end) => {
                    push(&after[..end]);
                    rest = &after[end + 1..];
                }
                None => {
                    push(after);
                    break;
                }
            }
        }
    } else {
        value
            .split(|c: char| c.is_whitespace() || c == ',')
            .for_each(&mut push);
    }
    ids
}

/// The first `max` distinct ids, in order (hash-set dedupe: linear).
fn distinct_first(ids: impl IntoIterator<Item = String>, max: usize) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for id in ids {
        if out.len() == max {
            break;
        }
        if seen.insert(id.clone()) {
            out.push(id);
        }
    }
    out
}

/// The last `max` distinct ids, in their original order (each kept at its
/// last occurrence): the nearest ancestors of a `References` chain.
fn distinct_last(ids: Vec<String>, max: usize) -> Vec<String> {
    let mut out = distinct_first(ids.into_iter().rev(), max);
    out.reverse();
    out
}

fn first_mailbox(address: &Address<'_>) -> Option<Mailbox> {
    address.iter().find_map(|addr| {
        let email = addr.address.as_deref()?.trim();
        if email.is_empty() {
            return None;
        }
        Some(Mailbox {
            name: addr
                .name
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string),
            address: email.to_string(),
        })
    })
}

fn addresses(address: Option<&Address<'_>>) -> Vec<String> {
    let Some(address) = address else {
        return Vec::new();
    };
    address
        .iter()
        .filter_map(|addr| addr.address.as_deref().map(str::trim))
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

fn to_offset_date_time(dt: &mail_parser::DateTime) -> Option<OffsetDateTime> {
    if !dt.is_valid() {
        return None;
    }
    let month = Month::try_from(dt.month).ok()?;
    let date = Date::from_calendar_date(i32::from(dt.year), month, dt.day).ok()?;
    let time = Time::from_hms(dt.hour, dt.minute, dt.second).ok()?;
    let sign: i8 = if dt.tz_before_gmt { -1 } else { 1 };
    let hours = i8::try_from(dt.tz_hour).ok()?;
    let minutes = i8::try_from(dt.tz_minute).ok()?;
    let offset = UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?;
    Some(date.with_time(time).assume_offset(offset))
}

fn attachment_info(part: &MessagePart<'_>) -> AttachmentInfo {
    let content_type = part
        .content_type()
        .map(|ct| match ct.subtype() {
            Some(sub) => format!("{}/{}", ct.ctype(), sub),
            None => ct.ctype().to_string(),
        })
        .map(|ct| ct.trim().to_ascii_lowercase())
        .filter(|ct| !ct.is_empty())
        .unwrap_or_else(|| "application/octet-stream".to_string());
    AttachmentInfo {
        filename: part
            .attachment_name()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        content_type,
        size: part.contents().len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIMPLE: &[u8] = b"From: \"Alice Example\" <Alice@Example.COM>\r\n\
To: bob@agents.localhost, \"Carol\" <carol@example.org>\r\n\
Cc: dave@example.net\r\n\
Reply-To: replies@example.com\r\n\
Subject: =?UTF-8?B?SGVsbG8gd8O2cmxk?=\r\n\
Date: Tue, 1 Jul 2025 10:52:37 +0200\r\n\
Message-ID: <abc.123@example.com>\r\n\
In-Reply-To: <parent@example.com>\r\n\
References: <root@example.com> <parent@example.com>\r\n <parent@example.com>,<x@y>\r\n\
x-e2a-conversation-id:   cnv_0123  \r\n\
\r\n\
Hi Bob\r\n";

    #[test]
    fn parses_the_api_fields() {
        let p = parse(SIMPLE);
        assert_eq!(p.message_id.as_deref(), Some("abc.123@example.com"));
        assert_eq!(p.in_reply_to, vec!["parent@example.com"]);
        assert_eq!(
            p.references,
            vec!["root@example.com", "parent@example.com", "x@y"]
        );
        assert_eq!(p.subject, "Hello wörld");
        let from = p.from.clone().unwrap();
        assert_eq!(from.name.as_deref(), Some("Alice Example"));
        assert_eq!(from.address, "Alice@Example.COM");
        assert_eq!(from.address_lower(), "alice@example.com");
        assert_eq!(from.domain_lower().as_deref(), Some("example.com"));
        assert_eq!(p.to, vec!["bob@agents.localhost", "carol@example.org"]);
        assert_eq!(p.cc, vec!["dave@example.net"]);
        assert_eq!(p.reply_to, vec!["replies@example.com"]);
        let date = p.date.unwrap();
        assert_eq!(date.unix_timestamp(), 1_751_359_957);
        assert_eq!(date.offset().whole_hours(), 2);
        assert_eq!(p.text.as_deref().map(str::trim), Some("Hi Bob"));
        assert_eq!(p.html, None);
        assert!(p.attachments.is_empty());
        assert_eq!(p.conversation_header.as_deref(), Some("cnv_0123"));
        assert_eq!(p.conversation_header_count, 1);
        assert_eq!(p.header_count, 10);
        assert_eq!(
            p.thread_ids(),
            vec!["parent@example.com", "root@example.com", "x@y"]
        );
    }

    #[test]
    fn parses_multipart_bodies_and_attachments() {
        let raw = b"From: a@example.com\r\n\
Subject: files\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
\r\n\
--b1\r\n\
Content-Type: multipart/alternative; boundary=\"b2\"\r\n\
\r\n\
--b2\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
plain body\r\n\
--b2\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>html body</p>\r\n\
--b2--\r\n\
--b1\r\n\
Content-Type: application/PDF; name=\"report.pdf\"\r\n\
Content-Disposition: attachment; filename=\"report.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
aGVsbG8gd29ybGQ=\r\n\
--b1--\r\n";
        let p = parse(raw);
        assert_eq!(p.text.as_deref().map(str::trim), Some("plain body"));
        assert_eq!(p.html.as_deref().map(str::trim), Some("<p>html body</p>"));
        assert_eq!(
            p.attachments,
            vec![AttachmentInfo {
                filename: Some("report.pdf".into()),
                content_type: "application/pdf".into(),
                size: 11,
            }]
        );
    }

    #[test]
    fn html_only_message_gets_a_text_rendering() {
        let raw =
            b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>there</b></p>\r\n";
        let p = parse(raw);
        assert!(p.html.as_deref().unwrap().contains("<b>there</b>"));
        assert!(p.text.as_deref().unwrap().contains("Hello there"));
    }

    #[test]
    fn from_fields_lists_every_from_field_and_mailbox() {
        let raw = b"From: A <a@x.example>, b@y.example\r\nfrom: c@z.example\r\nTo: t@x\r\n\r\nFrom: body@no";
        let from = from_fields(raw);
        assert_eq!(from.fields, 2);
        assert_eq!(
            from.addresses,
            ["a@x.example", "b@y.example", "c@z.example"]
        );
        // mail-parser skips a line without a colon and reads on.
        let junk = from_fields(b"From: x@a.example\r\njunk\r\nFrom: ceo@v.example\r\n\r\nhi");
        assert_eq!(junk.fields, 2);
        assert_eq!(junk.addresses, ["x@a.example", "ceo@v.example"]);
        assert_eq!(from_fields(b""), FromFields::default());
    }

    #[test]
    fn counts_repeated_conversation_headers() {
        let raw = b"X-E2A-Conversation-Id: first\r\nX-E2A-CONVERSATION-ID: second\r\n\r\nx";
        let p = parse(raw);
        assert_eq!(p.conversation_header.as_deref(), Some("first"));
        assert_eq!(p.conversation_header_count, 2);
    }

    #[test]
    fn bare_ids_handles_brackets_commas_and_junk() {
        assert_eq!(bare_ids("<a@b>"), vec!["a@b"]);
        assert_eq!(bare_ids("a@b, c@d  a@b"), vec!["a@b", "c@d", "a@b"]);
        assert_eq!(bare_ids("<a@b> junk <c@d"), vec!["a@b", "c@d"]);
        assert_eq!(bare_ids("<>< >"), Vec::<String>::new());
        assert_eq!(bare_ids(""), Vec::<String>::new());
    }

    #[test]
    fn keeps_the_newest_references_when_there_are_too_many() {
        let refs: Vec<String> = (0..150).map(|i| format!("<m{i}@x>")).collect();
        let raw = format!("References: {}\r\n\r\nbody", refs.join(" "));
        let p = parse(raw.as_bytes());
        assert_eq!(p.references.len(), MAX_REFERENCES);
        assert_eq!(p.references.first().map(String::as_str), Some("m50@x"));
        assert_eq!(p.references.last().map(String::as_str), Some("m149@x"));
    }

    #[test]
    fn duplicate_references_count_once_at_their_newest_position() {
        let raw = "References: <a@x> <b@x> <a@x> <c@x>\r\nIn-Reply-To: <c@x> <c@x>\r\n\r\nbody";
        let p = parse(raw.as_bytes());
        assert_eq!(p.references, vec!["b@x", "a@x", "c@x"]);
        assert_eq!(p.in_reply_to, vec!["c@x"]);
        assert_eq!(p.thread_ids(), vec!["c@x", "b@x", "a@x"]);
    }

    #[test]
    fn huge_reference_headers_are_cut_to_the_caps() {
        // 200 000 ids (with repeats) in References and In-Reply-To: the
        // result is capped, and parsing is linear (a quadratic dedupe over
        // this header took minutes).
        let refs: Vec<String> = (0..200_000)
            .map(|i| format!("<m{}@x>", i % 150_000))
            .collect();
        let joined = refs.join(" ");
        let raw = format!("In-Reply-To: {joined}\r\nReferences: {joined}\r\n\r\nbody");
        let p = parse(raw.as_bytes());
        assert_eq!(p.references.len(), MAX_REFERENCES);
        assert_eq!(p.references.last().map(String::as_str), Some("m49999@x"));
        assert_eq!(p.in_reply_to.len(), MAX_IN_REPLY_TO);
        assert_eq!(p.in_reply_to.first().map(String::as_str), Some("m0@x"));
    }

    #[test]
    fn over_long_message_ids_are_treated_as_absent() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let raw =
            format!("Message-ID: <{long}@example.com>\r\nIn-Reply-To: <{long}@p>\r\n\r\nbody");
        let p = parse(raw.as_bytes());
        assert_eq!(p.message_id, None);
        assert!(p.in_reply_to.is_empty());
        let ok = "y".repeat(MAX_ID_LEN - 12);
        let raw = format!("Message-ID: <{ok}@example.com>\r\n\r\nbody");
        assert_eq!(
            parse(raw.as_bytes()).message_id.map(|m| m.len()),
            Some(MAX_ID_LEN)
        );
    }

    #[test]
    fn invalid_dates_are_none() {
        for date in [
            "Mon, 31 Feb 2025 10:00:00 +0000",
            "yesterday",
            "Tue, 1 Jul 1800 10:00:00 +0000",
        ] {
            let raw = format!("Date: {date}\r\n\r\nx");
            assert_eq!(parse(raw.as_bytes()).date, None, "{date}");
        }
    }

    #[test]
    fn malformed_inputs_give_best_effort_results() {
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\0\0\0\0".to_vec(),
            b"\r\n\r\n".to_vec(),
            b"From:\r\nTo:\r\nSubject:\r\nMessage-ID:\r\nDate:\r\n\r\n".to_vec(),
            b"From: <<<@@@>>>\r\nTo: ,,,;;;\r\nMessage-ID: <\r\n\r\n".to_vec(),
            (0u8..=255).cycle().take(70_000).collect(),
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x".to_vec(),
            b"Subject: =?UTF-8?B?////?= =?bogus?Q?=FF=?=\r\n\r\n".to_vec(),
            b"From: a\0b@example.com\r\nSubject: nul\0inside\r\n\r\nbody\0body".to_vec(),
        ];
        // 10 000 headers
        let mut many = Vec::new();
        for i in 0..10_000 {
            many.extend_from_slice(format!("X-Header-{i}: value {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\nbody\r\n");
        cases.push(many);
        // a 998+ byte header line and body line
        let mut long = b"Subject: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 5_000));
        long.extend_from_slice(b"\r\n\r\n");
        long.extend(std::iter::repeat_n(b'b', 100_000));
        cases.push(long);
        // deeply nested multiparts
        let mut nested = Vec::new();
        for i in 0..500 {
            nested.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        cases.push(nested);
        // deeply nested message/rfc822
        let mut rfc822 = Vec::new();
        for _ in 0..500 {
            rfc822.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
        cases.push(rfc822);

        for case in &cases {
            let _ = parse(case);
        }
        let many = parse(&cases[9]);
        assert_eq!(many.header_count, 10_000);
        let long = parse(&cases[10]);
        assert_eq!(long.subject.len(), 5_000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn never_panics_on_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse(&raw);
        }

        #[test]
        fn never_panics_on_header_shaped_garbage(
            lines in proptest::collection::vec(
                ("(From|To|Cc|Subject|Message-ID|References|In-Reply-To|Date|Content-Type|X-E2A-Conversation-Id)",
                 proptest::collection::vec(any::<u8>(), 0..200)),
                0..30),
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut raw = Vec::new();
            for (name, value) in lines {
                raw.extend_from_slice(name.as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(&value);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
            raw.extend_from_slice(&body);
            let _ = parse(&raw);
        }
    }
}
