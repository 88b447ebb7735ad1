//! Composition of outbound mail (spec §7.2, with our fixes) with
//! `mail-builder`.
//!
//! [`compose`] turns an [`OutgoingMessage`] into RFC 5322 bytes (CRLF line
//! endings, ready for DKIM signing and SMTP `DATA`):
//!
//! - headers `From` (optional display name), `Reply-To`, `To`, `Cc`,
//!   `Subject`, `Date`, `Message-ID`, `In-Reply-To`, `References`,
//!   [`CONVERSATION_HEADER`] and `MIME-Version: 1.0`; empty lists and absent
//!   values are left out, and **`Bcc` never appears** (the type has no such
//!   field: blind recipients exist only in the SMTP envelope);
//! - a non-ASCII subject or display name is RFC 2047-encoded (UTF-8), and
//!   so is one holding an ASCII control character or an encoded-word
//!   look-alike (`=?`, so that it comes back literally); a non-ASCII
//!   attachment filename is RFC 2231-encoded; long headers are folded;
//! - the body is `text/plain` alone; `multipart/alternative` (text, then
//!   HTML) when there is HTML; wrapped in `multipart/mixed` with one
//!   base64 part per attachment (`Content-Disposition: attachment`) when
//!   there are attachments. Text bodies are UTF-8, transfer-encoded as
//!   needed (7bit, quoted-printable or base64; always base64 when they hold
//!   an ASCII control character other than tab); every line break in them
//!   (`CRLF`, a lone `LF` or a lone `CR`) is sent as `CRLF`, the one change
//!   made to the content. Attachment bytes are always base64 and come back
//!   byte for byte.
//!
//! The output has no NUL, no CR or LF outside a CRLF pair, no control
//! character in the header block other than tab, and no line over 998
//! bytes, whatever the input (what SMTP `DATA` requires; a bare CR or LF is
//! what SMTP smuggling exploits).
//!
//! **Header injection is refused, never repaired.** [`OutgoingMessage::validate`]
//! rejects a CR, LF or NUL in any value that becomes a header (subject,
//! display name, addresses, message ids, conversation id, attachment
//! filenames and content types) with a [`ComposeError`] naming the field, as
//! well as values of the wrong shape (an address with `<`, a content type
//! that is not `type/subtype`, …). [`compose`] validates first: it never
//! strips or rewrites a value silently.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_builder::MessageBuilder;
use mail_builder::headers::HeaderType;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::parse::MAX_ID_LEN;

/// Name of the conversation header we write (spec §4.5). Inbound matching is
/// case-insensitive ([`crate::parse::CONVERSATION_HEADER`]).
pub const CONVERSATION_HEADER: &str = "X-E2A-Conversation-Id";

/// Longest address accepted, in bytes (RFC 5321 §4.5.3.1.3 path limit minus
/// the angle brackets).
pub const MAX_ADDRESS_LEN: usize = 254;

/// Length of a base64 line in attachment parts (RFC 2045 §6.8).
const BASE64_LINE: usize = 76;

/// A mailbox: an address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Display name; written RFC 2047-encoded when it is not plain ASCII.
    /// `None` or a blank name writes the bare address.
    pub name: Option<String>,
    /// `local@domain`, without angle brackets.
    pub address: String,
}

/// A file attached to an outgoing message.
#[derive(Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The file name shown to the recipient (non-empty).
    pub filename: String,
    /// `type/subtype`, without parameters, e.g. `application/pdf`.
    pub content_type: String,
    /// The content, sent base64-encoded.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Attachment {
    /// Names and sizes only: attachment content is message content, never
    /// logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("size", &self.data.len())
            .finish()
    }
}

/// Everything an outbound message is made of.
#[derive(Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The agent's own address (the DKIM-aligned `From`), optional display
    /// name.
    pub from: Mailbox,
    /// `Reply-To` addresses; empty writes no header.
    pub reply_to: Vec<String>,
    /// `To` addresses.
    pub to: Vec<String>,
    /// `Cc` addresses. Blind copies are envelope-only and have no field here.
    pub cc: Vec<String>,
    /// `Subject`, any Unicode text without CR, LF or NUL.
    pub subject: String,
    /// The `Message-ID`, bare (without angle brackets); see
    /// [`mint_message_id`].
    pub message_id: String,
    /// The `Date` header (written in UTC, whole seconds).
    pub date: OffsetDateTime,
    /// `In-Reply-To`, a bare id.
    pub in_reply_to: Option<String>,
    /// `References`, bare ids, oldest first.
    pub references: Vec<String>,
    /// Written as [`CONVERSATION_HEADER`]: visible ASCII, no spaces.
    pub conversation_id: Option<String>,
    /// The `text/plain` body.
    pub text: String,
    /// An optional `text/html` alternative.
    pub html: Option<String>,
    /// Attachments, in order.
    pub attachments: Vec<Attachment>,
}

impl std::fmt::Debug for OutgoingMessage {
    /// Headers and sizes only: bodies are never logged (conventions, rule 15).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("from", &self.from)
            .field("reply_to", &self.reply_to)
            .field("to", &self.to)
            .field("cc", &self.cc)
            .field("message_id", &self.message_id)
            .field("date", &self.date)
            .field("in_reply_to", &self.in_reply_to)
            .field("references", &self.references.len())
            .field("conversation_id", &self.conversation_id)
            .field("text_len", &self.text.len())
            .field("html_len", &self.html.as_ref().map(String::len))
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

/// Why a message cannot be composed. Every variant is the caller's input
/// (an API 400), and names the offending field where there is one (see
/// [`ComposeError::field`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComposeError {
    /// A CR, LF or NUL in a value that becomes a header.
    #[error("{field} contains a line break or NUL character")]
    LineBreak { field: &'static str },
    /// Not a plain `local@domain` address (empty, no `@`, spaces, control
    /// characters, `<>,;:"()[]\`, or over [`MAX_ADDRESS_LEN`] bytes).
    #[error("{field} is not a valid e-mail address")]
    InvalidAddress { field: &'static str },
    /// Not a bare message id (empty, whitespace or control characters,
    /// angle brackets, or over [`MAX_ID_LEN`] bytes).
    #[error("{field} is not a valid message id")]
    InvalidMessageId { field: &'static str },
    /// Empty, longer than [`crate::conversation::MAX_LEN`], or not visible
    /// ASCII.
    #[error("conversation_id must be 1 to 200 visible ASCII characters")]
    InvalidConversationId,
    /// An attachment content type that is not `type/subtype` (RFC 2045 tokens,
    /// no parameters).
    #[error("attachment content type must have the form type/subtype")]
    InvalidContentType,
    /// An attachment without a file name.
    #[error("attachment filename is empty")]
    EmptyFilename,
    /// Neither `To` nor `Cc` names anyone.
    #[error("the message has no To or Cc recipient")]
    NoRecipients,
    /// A `Date` before 1970 or after 9999.
    #[error("date is out of range")]
    DateOutOfRange,
}

impl ComposeError {
    /// The field at fault, as named in the API (`subject`, `to`,
    /// `attachments.filename`, …); `None` for [`ComposeError::NoRecipients`].
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ComposeError::LineBreak { field }
            | ComposeError::InvalidAddress { field }
            | ComposeError::InvalidMessageId { field } => Some(field),
            ComposeError::InvalidConversationId => Some("conversation_id"),
            ComposeError::InvalidContentType => Some("attachments.content_type"),
            ComposeError::EmptyFilename => Some("attachments.filename"),
            ComposeError::DateOutOfRange => Some("date"),
            ComposeError::NoRecipients => None,
        }
    }
}

/// A fresh message id for mail sent from `domain`: 32 lowercase hex
/// characters (128 bits from the operating system's CSPRNG) `@` the domain,
/// bare (no angle brackets). The domain is used as given (trimmed); an
/// unusable one is caught by [`OutgoingMessage::validate`].
///
/// # Panics
/// Only if the OS random source fails, which `ring` treats as unrecoverable
/// (as [`crate::conversation::mint`]).
pub fn mint_message_id(domain: &str) -> String {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("operating system random source failed");
    format!("{}@{}", crate::hex::encode(&bytes), domain.trim())
}

impl OutgoingMessage {
    /// Checks every value that becomes a header; `Ok` means [`compose`] will
    /// write each one verbatim (or encoded) and nothing else.
    ///
    /// Refuses, naming the field: a CR, LF or NUL anywhere in a header value
    /// ([`ComposeError::LineBreak`], checked first); malformed addresses,
    /// message ids, conversation id and attachment content types; an empty
    /// attachment filename; no `To`/`Cc` recipient; a date outside
    /// 1970–9999. Bodies may hold any text. Pure, never panics.
    pub fn validate(&self) -> Result<(), ComposeError> {
        check_line_breaks(self)?;

        check_address(&self.from.address, "from.address")?;
        for (list, field) in [
            (&self.reply_to, "reply_to"),
            (&self.to, "to"),
            (&self.cc, "cc"),
        ] {
            for address in list {
                check_address(address, field)?;
            }
        }
        if self.to.is_empty() && self.cc.is_empty() {
            return Err(ComposeError::NoRecipients);
        }

        check_message_id(&self.message_id, "message_id")?;
        if let Some(id) = &self.in_reply_to {
            check_message_id(id, "in_reply_to")?;
        }
        for id in &self.references {
            check_message_id(id, "references")?;
        }

        if let Some(id) = &self.conversation_id
            && (!(1..=crate::conversation::MAX_LEN).contains(&id.len())
                || !id.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ComposeError::InvalidConversationId);
        }

        for attachment in &self.attachments {
            if attachment.filename.trim().is_empty() {
                return Err(ComposeError::EmptyFilename);
            }
            if !is_mime_type(&attachment.content_type) {
                return Err(ComposeError::InvalidContentType);
            }
        }

        if !(1970..=9999).contains(&self.date.year()) {
            return Err(ComposeError::DateOutOfRange);
        }
        Ok(())
    }
}

/// Every header value of `msg`, with the field it belongs to.
fn header_values(msg: &OutgoingMessage) -> impl Iterator<Item = (&'static str, &str)> {
    let singles = [
        ("subject", Some(msg.subject.as_str())),
        ("from.name", msg.from.name.as_deref()),
        ("from.address", Some(msg.from.address.as_str())),
        ("message_id", Some(msg.message_id.as_str())),
        ("in_reply_to", msg.in_reply_to.as_deref()),
        ("conversation_id", msg.conversation_id.as_deref()),
    ]
    .into_iter()
    .filter_map(|(field, value)| value.map(|v| (field, v)));
    let lists = [
        ("reply_to", &msg.reply_to),
        ("to", &msg.to),
        ("cc", &msg.cc),
        ("references", &msg.references),
    ]
    .into_iter()
    .flat_map(|(field, list)| list.iter().map(move |v| (field, v.as_str())));
    let attachments = msg.attachments.iter().flat_map(|a| {
        [
            ("attachments.filename", a.filename.as_str()),
            ("attachments.content_type", a.content_type.as_str()),
        ]
    });
    singles.chain(lists).chain(attachments)
}

fn check_line_breaks(msg: &OutgoingMessage) -> Result<(), ComposeError> {
    match header_values(msg).find(|(_, value)| value.contains(['\r', '\n', '\0'])) {
        Some((field, _)) => Err(ComposeError::LineBreak { field }),
        None => Ok(()),
    }
}

/// A plain `local@domain` address as we write it between angle brackets.
fn check_address(address: &str, field: &'static str) -> Result<(), ComposeError> {
    let plain = address.len() <= MAX_ADDRESS_LEN
        && !address.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(
                    c,
                    '<' | '>' | ',' | ';' | ':' | '"' | '(' | ')' | '[' | ']' | '\\'
                )
        })
        && address.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if plain {
        Ok(())
    } else {
        Err(ComposeError::InvalidAddress { field })
    }
}

/// A bare message id (what [`crate::parse`] keeps).
fn check_message_id(id: &str, field: &'static str) -> Result<(), ComposeError> {
    let bare = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
    if bare {
        Ok(())
    } else {
        Err(ComposeError::InvalidMessageId { field })
    }
}

/// `type/subtype`, both RFC 2045 tokens, nothing else.
fn is_mime_type(value: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_graphic()
                    && !matches!(
                        b,
                        b'(' | b')'
                            | b'<'
                            | b'>'
                            | b'@'
                            | b','
                            | b';'
                            | b':'
                            | b'\\'
                            | b'"'
                            | b'/'
                            | b'['
                            | b']'
                            | b'?'
                            | b'='
                    )
            })
    };
    value
        .split_once('/')
        .is_some_and(|(kind, subtype)| token(kind) && token(subtype))
}

/// Composes `msg` into the bytes of an RFC 5322 message (see the module
/// docs for the layout). Calls [`OutgoingMessage::validate`] first and
/// returns its error unchanged; nothing is ever stripped or rewritten.
///
/// Pure and deterministic but for the MIME boundaries; never panics. The
/// output is roughly 4/3 of the attachment bytes plus the bodies: call it
/// off the async executor ([`crate::cpu`]) for large messages.
pub fn compose(msg: &OutgoingMessage) -> Result<Vec<u8>, ComposeError> {
    msg.validate()?;

    let name = msg
        .from
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let mut builder = match name {
        // A name that reads as an encoded word would be decoded by the
        // receiver: encode it ourselves (mail-builder would quote it).
        Some(name) if looks_encoded(name) => MessageBuilder::new().header(
            "From",
            Raw::new(format!("{} <{}>", encoded_words(name), msg.from.address)),
        ),
        _ => MessageBuilder::new().from(Address::new_address(name, msg.from.address.as_str())),
    };
    if !msg.reply_to.is_empty() {
        builder = builder.reply_to(address_list(&msg.reply_to));
    }
    if !msg.to.is_empty() {
        builder = builder.to(address_list(&msg.to));
    }
    if !msg.cc.is_empty() {
        builder = builder.cc(address_list(&msg.cc));
    }
    builder = if looks_encoded(&msg.subject) {
        builder.header("Subject", Raw::new(encoded_words(&msg.subject)))
    } else {
        builder.subject(msg.subject.as_str())
    };
    builder = builder
        .date(Date::new(msg.date.unix_timestamp()))
        .message_id(msg.message_id.as_str());
    if let Some(id) = &msg.in_reply_to {
        builder = builder.in_reply_to(id.as_str());
    }
    if !msg.references.is_empty() {
        builder = builder.references(MessageId::from(msg.references.as_slice()));
    }
    if let Some(id) = &msg.conversation_id {
        builder = builder.header(CONVERSATION_HEADER, Raw::new(id.as_str()));
    }
    builder = builder.header("MIME-Version", Raw::new("1.0"));

    let text = text_part("text/plain", crlf(&msg.text));
    let content = match &msg.html {
        Some(html) => MimePart::new(
            "multipart/alternative",
            vec![text, text_part("text/html", crlf(html))],
        ),
        None => text,
    };
    let body = if msg.attachments.is_empty() {
        content
    } else {
        let mut parts = Vec::with_capacity(msg.attachments.len() + 1);
        parts.push(content);
        parts.extend(msg.attachments.iter().map(attachment_part));
        MimePart::new("multipart/mixed", parts)
    };

    let mut out = Vec::new();
    builder.body(body).serialize(&mut out);
    Ok(out)
}

/// `text` with every line break (CRLF, a lone LF or a lone CR) written as
/// CRLF. SMTP allows CR and LF only as a pair (RFC 5321 §2.3.8; a bare one
/// is what SMTP smuggling exploits), and `mail-builder` leaves a lone CR as
/// it is in 7bit and quoted-printable parts.
fn crlf(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let clean = bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes.get(i - 1) == Some(&b'\r'),
        _ => true,
    });
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + text.len() / 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// True when `mail-builder` would write `value` as it is but it must be
/// encoded: it holds something a receiver could take for an RFC 2047
/// encoded word (and would decode into something else), or an ASCII control
/// character other than tab (not allowed raw in a header, RFC 5322 §3.2.5).
fn looks_encoded(value: &str) -> bool {
    value.contains("=?") || value.bytes().any(|b| b.is_ascii_control() && b != b'\t')
}

/// Longest encoded word (RFC 2047 §2).
const MAX_ENCODED_WORD: usize = 75;

/// `value` as RFC 2047 `B` encoded words of UTF-8, at most
/// [`MAX_ENCODED_WORD`] characters each, separated by single spaces (which
/// the receiver drops between encoded words, and where the header folds).
/// Each word holds whole characters.
fn encoded_words(value: &str) -> String {
    const PREFIX: &str = "=?utf-8?B?";
    const SUFFIX: &str = "?=";
    // 75 - 12 = 63 base64 characters hold 45 bytes (15 groups of 3 bytes).
    const MAX_CHUNK: usize = (MAX_ENCODED_WORD - PREFIX.len() - SUFFIX.len()) / 4 * 3;

    let mut out = String::with_capacity(value.len() * 2);
    let mut rest = value;
    while !rest.is_empty() {
        let mut end = rest.len().min(MAX_CHUNK);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (chunk, tail) = rest.split_at(end);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(PREFIX);
        out.push_str(&STANDARD.encode(chunk));
        out.push_str(SUFFIX);
        rest = tail;
    }
    out
}

fn address_list(addresses: &[String]) -> Address<'_> {
    Address::new_list(
        addresses
            .iter()
            .map(|a| Address::new_address(None::<&str>, a.as_str()))
            .collect(),
    )
}

/// A UTF-8 text part. `mail-builder` picks 7bit, quoted-printable or base64
/// from the content, but passes ASCII control characters through as they
/// are: a NUL in a 7bit part (RFC 2045 §2.7 forbids it), or a form feed at
/// the end of a quoted-printable line (which decoders strip as trailing
/// whitespace). A body holding a control character other than tab, CR and
/// LF is base64-encoded here instead, and comes back exactly.
fn text_part<'a>(content_type: &'a str, body: Cow<'a, str>) -> MimePart<'a> {
    let plain = !body
        .bytes()
        .any(|b| b.is_ascii_control() && !matches!(b, b'\t' | b'\r' | b'\n'));
    if plain {
        return MimePart::new(content_type, body);
    }
    MimePart {
        headers: vec![
            (
                "Content-Type".into(),
                HeaderType::from(ContentType::new(content_type).attribute("charset", "utf-8")),
            ),
            (
                "Content-Transfer-Encoding".into(),
                HeaderType::from(Raw::new("base64")),
            ),
        ],
        contents: BodyPart::Text(base64_lines(body.as_bytes()).into()),
    }
}

/// `data` base64-encoded in CRLF-terminated lines of [`BASE64_LINE`]
/// characters.
fn base64_lines(data: &[u8]) -> String {
    let encoded = STANDARD.encode(data);
    let mut wrapped = String::with_capacity(encoded.len() + encoded.len() / BASE64_LINE * 2 + 2);
    // base64 output is ASCII, so every chunk is valid UTF-8.
    for line in encoded.as_bytes().chunks(BASE64_LINE) {
        wrapped.push_str(std::str::from_utf8(line).unwrap_or_default());
        wrapped.push_str("\r\n");
    }
    wrapped
}

/// An attachment part written raw: its headers, then the data base64-encoded
/// in lines of [`BASE64_LINE`] characters. `mail-builder` would pick 7bit or
/// quoted-printable for a `text/*` attachment; base64 always gives the bytes
/// back exactly.
fn attachment_part(attachment: &Attachment) -> MimePart<'_> {
    let wrapped = base64_lines(&attachment.data);
    let filename = attachment.filename.as_str();
    MimePart {
        headers: vec![
            (
                "Content-Type".into(),
                HeaderType::from(
                    ContentType::new(attachment.content_type.as_str()).attribute("name", filename),
                ),
            ),
            (
                "Content-Disposition".into(),
                HeaderType::from(ContentType::new("attachment").attribute("filename", filename)),
            ),
            (
                "Content-Transfer-Encoding".into(),
                HeaderType::from(Raw::new("base64")),
            ),
        ],
        contents: BodyPart::Text(wrapped.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{self, ParsedMessage};
    use proptest::prelude::*;
    use time::macros::datetime;

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            from: Mailbox {
                name: Some("Support Agent".into()),
                address: "support@agents.example".into(),
            },
            reply_to: vec!["support@agents.example".into()],
            to: vec!["alice@example.com".into(), "bob@example.org".into()],
            cc: vec!["carol@example.net".into()],
            subject: "Quarterly report".into(),
            message_id: "0123456789abcdef0123456789abcdef@agents.example".into(),
            date: datetime!(2025-07-01 12:34:56 UTC),
            in_reply_to: None,
            references: vec![],
            conversation_id: None,
            text: "Hello Alice,\n\nhere it is.\n".into(),
            html: None,
            attachments: vec![],
        }
    }

    fn round_trip(msg: &OutgoingMessage) -> (Vec<u8>, ParsedMessage) {
        let raw = compose(msg).expect("composes");
        let parsed = parse::parse(&raw);
        (raw, parsed)
    }

    /// Text with every line break as one LF, to compare what was sent
    /// with what the receiver sees.
    fn lf(s: &str) -> String {
        s.replace("\r\n", "\n").replace('\r', "\n")
    }

    /// No NUL, CR and LF only as CRLF pairs, lines of at most 998 bytes
    /// (RFC 5322 §2.1.1).
    fn wire_safe(raw: &[u8]) -> bool {
        raw.iter().enumerate().all(|(i, &b)| match b {
            0 => false,
            b'\r' => raw.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && raw.get(i - 1) == Some(&b'\r'),
            _ => true,
        }) && raw.split(|&b| b == b'\n').all(|line| line.len() <= 999)
            && headers_of(raw)
                .iter()
                .all(|&b| !b.is_ascii_control() || matches!(b, b'\t' | b'\r' | b'\n'))
    }

    /// The top-level header block.
    fn headers_of(raw: &[u8]) -> &[u8] {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or(raw.len());
        &raw[..end]
    }

    #[test]
    fn plain_text_message_round_trips_every_header() {
        let msg = message();
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw.clone()).expect("ASCII output");
        assert!(text.contains("MIME-Version: 1.0\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain"), "{text}");
        assert!(!text.contains("multipart"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("bcc"), "{text}");
        assert!(wire_safe(&raw));

        let from = parsed.from.expect("from");
        assert_eq!(from.name.as_deref(), Some("Support Agent"));
        assert_eq!(from.address, "support@agents.example");
        assert_eq!(parsed.reply_to, msg.reply_to);
        assert_eq!(parsed.to, msg.to);
        assert_eq!(parsed.cc, msg.cc);
        assert_eq!(parsed.subject, msg.subject);
        assert_eq!(parsed.message_id.as_deref(), Some(msg.message_id.as_str()));
        assert_eq!(parsed.date, Some(msg.date));
        assert_eq!(
            parsed.text.as_deref().map(lf).as_deref(),
            Some(msg.text.as_str())
        );
        assert_eq!(parsed.html, None);
        assert!(parsed.attachments.is_empty());
        assert!(parsed.in_reply_to.is_empty());
        assert!(parsed.references.is_empty());
        assert_eq!(parsed.conversation_header_count, 0);
    }

    #[test]
    fn non_ascii_subject_and_display_name_are_encoded_and_decode_back() {
        let mut msg = message();
        msg.subject = "Überweisung für Zoë — 請求書 ✓".into();
        msg.from.name = Some("Ágent Smíth, Esq.".into());
        let (raw, parsed) = round_trip(&msg);
        assert!(raw.is_ascii(), "headers must be 7-bit");
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(text.contains("Subject: =?utf-8?"), "{text}");
        assert_eq!(parsed.subject, msg.subject);
        assert_eq!(
            parsed.from.and_then(|m| m.name).as_deref(),
            Some("Ágent Smíth, Esq.")
        );
    }

    #[test]
    fn a_long_subject_is_folded_and_unfolds_back() {
        let mut msg = message();
        msg.subject = "word ".repeat(60).trim_end().to_string();
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(text.lines().all(|l| l.len() <= 998));
        assert!(
            text.lines().filter(|l| l.starts_with(' ')).count() > 1,
            "{text}"
        );
        assert_eq!(parsed.subject, msg.subject);

        // One 3000-character word, in the subject, the name and the body.
        msg.subject = "x".repeat(3000);
        msg.from.name = Some("n".repeat(3000));
        msg.text = "y".repeat(3000);
        let (raw, parsed) = round_trip(&msg);
        assert!(wire_safe(&raw));
        assert_eq!(parsed.subject, msg.subject);
        assert_eq!(parsed.from.and_then(|m| m.name), msg.from.name);
        assert_eq!(parsed.text, Some(msg.text));
    }

    #[test]
    fn html_becomes_a_multipart_alternative() {
        let mut msg = message();
        msg.html = Some("<p>Hello <b>Alice</b> — ünïcödé</p>".into());
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(!text.contains("multipart/mixed"), "{text}");
        assert_eq!(parsed.html, msg.html);
        assert_eq!(
            parsed.text.as_deref().map(lf).as_deref(),
            Some(msg.text.as_str())
        );
    }

    #[test]
    fn attachments_are_base64_parts_of_a_multipart_mixed_and_come_back_exactly() {
        let mut msg = message();
        msg.html = Some("<p>see attached</p>".into());
        let binary: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        msg.attachments = vec![
            Attachment {
                filename: "report.pdf".into(),
                content_type: "application/pdf".into(),
                data: binary.clone(),
            },
            Attachment {
                filename: "naïve résumé.txt".into(),
                content_type: "text/plain".into(),
                data: b"line one\nline two\r\nbare\rcr\0nul".to_vec(),
            },
            Attachment {
                filename: "empty.bin".into(),
                content_type: "application/octet-stream".into(),
                data: vec![],
            },
        ];
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw.clone()).expect("ASCII");
        assert!(text.contains("multipart/mixed"), "{text}");
        assert!(text.contains("multipart/alternative"), "{text}");
        assert_eq!(parsed.html, msg.html);

        let names: Vec<_> = parsed
            .attachments
            .iter()
            .map(|a| a.filename.clone())
            .collect();
        assert_eq!(
            names,
            vec![
                Some("report.pdf".to_string()),
                Some("naïve résumé.txt".to_string()),
                Some("empty.bin".to_string())
            ]
        );
        let types: Vec<_> = parsed
            .attachments
            .iter()
            .map(|a| a.content_type.as_str())
            .collect();
        assert_eq!(
            types,
            ["application/pdf", "text/plain", "application/octet-stream"]
        );

        // The bytes themselves, straight from mail-parser.
        let message = mail_parser::MessageParser::default()
            .parse(&raw)
            .expect("parses");
        let contents: Vec<Vec<u8>> = message
            .attachments()
            .map(|part| part.contents().to_vec())
            .collect();
        let expected: Vec<Vec<u8>> = msg.attachments.iter().map(|a| a.data.clone()).collect();
        assert_eq!(contents, expected);
    }

    #[test]
    fn text_with_attachments_but_no_html_is_mixed_without_alternative() {
        let mut msg = message();
        msg.attachments = vec![Attachment {
            filename: "a.csv".into(),
            content_type: "text/csv".into(),
            data: b"a,b\n1,2\n".to_vec(),
        }];
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(text.contains("multipart/mixed"), "{text}");
        assert!(!text.contains("multipart/alternative"), "{text}");
        assert_eq!(
            parsed.text.as_deref().map(lf).as_deref(),
            Some(msg.text.as_str())
        );
        assert_eq!(parsed.attachments.len(), 1);
        assert_eq!(parsed.attachments[0].size, 8);
    }

    #[test]
    fn threading_and_conversation_headers_round_trip() {
        let mut msg = message();
        msg.in_reply_to = Some("parent@mail.example.com".into());
        msg.references = (0..30)
            .map(|i| format!("ref{i}.{}@mail.example.com", "x".repeat(20)))
            .collect();
        msg.references.push("parent@mail.example.com".into());
        msg.conversation_id = Some("cnv_0123456789abcdef0123456789abcdef".into());
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(
            text.contains("\r\nX-E2A-Conversation-Id: cnv_0123456789abcdef0123456789abcdef\r\n"),
            "{text}"
        );
        assert_eq!(
            parsed.in_reply_to,
            vec!["parent@mail.example.com".to_string()]
        );
        assert_eq!(parsed.references, msg.references);
        assert_eq!(
            parsed.conversation_header.as_deref(),
            msg.conversation_id.as_deref()
        );
        assert_eq!(parsed.conversation_header_count, 1);
    }

    #[test]
    fn date_is_written_in_utc_whole_seconds() {
        let mut msg = message();
        msg.date = datetime!(2025-07-01 14:34:56.789 +02:00);
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(
            text.contains("Date: Tue, 1 Jul 2025 12:34:56 +0000\r\n"),
            "{text}"
        );
        assert_eq!(parsed.date, Some(datetime!(2025-07-01 12:34:56 UTC)));
    }

    #[test]
    fn encoded_word_look_alikes_come_back_literally() {
        let mut msg = message();
        msg.subject = "=?utf-8?Q?not_encoded?= really".into();
        msg.from.name = Some("=?utf-8?B?QQ==?= Bot".into());
        let (_, parsed) = round_trip(&msg);
        assert_eq!(parsed.subject, msg.subject);
        assert_eq!(parsed.from.and_then(|m| m.name), msg.from.name);

        let long = format!("=?{}", "é".repeat(100));
        let words = encoded_words(&long);
        assert!(
            words.split(' ').all(|w| w.len() <= MAX_ENCODED_WORD),
            "{words}"
        );
        msg.subject = long;
        let (_, parsed) = round_trip(&msg);
        assert_eq!(parsed.subject, msg.subject);
    }

    #[test]
    fn nul_and_control_characters_are_encoded_not_sent_raw() {
        let mut msg = message();
        msg.subject = "bell\u{7} and del\u{7f}".into();
        msg.from.name = Some("esc\u{1b}".into());
        msg.text = "a\0b".into();
        msg.html = Some("\0".into());
        let (raw, parsed) = round_trip(&msg);
        assert!(wire_safe(&raw), "{}", String::from_utf8_lossy(&raw));
        assert_eq!(parsed.subject, msg.subject);
        assert_eq!(parsed.from.and_then(|m| m.name), msg.from.name);
        assert_eq!(parsed.text, Some(msg.text));
        assert_eq!(parsed.html, msg.html);
    }

    #[test]
    fn body_line_breaks_are_sent_as_crlf() {
        let mut msg = message();
        msg.text = "one\ntwo\rthree\r\nfour\r".into();
        msg.html = Some("<p>a</p>\r<p>b</p>\n".into());
        let (raw, parsed) = round_trip(&msg);
        assert!(wire_safe(&raw));
        assert_eq!(
            parsed.text.as_deref(),
            Some("one\r\ntwo\r\nthree\r\nfour\r\n")
        );
        assert_eq!(parsed.html.as_deref(), Some("<p>a</p>\r\n<p>b</p>\r\n"));
        assert_eq!(crlf("a\r\nb"), Cow::Borrowed("a\r\nb"));
        assert_eq!(crlf(""), Cow::Borrowed(""));
        assert_eq!(crlf("\n\r"), "\r\n\r\n");
    }

    #[test]
    fn blank_display_name_writes_the_bare_address() {
        let mut msg = message();
        msg.from.name = Some("   ".into());
        let (raw, parsed) = round_trip(&msg);
        let text = String::from_utf8(raw).expect("ASCII");
        assert!(
            text.starts_with("From: <support@agents.example>\r\n"),
            "{text}"
        );
        assert_eq!(parsed.from.and_then(|m| m.name), None);
    }

    #[test]
    fn line_breaks_in_any_header_value_are_refused_naming_the_field() {
        type Edit = fn(&mut OutgoingMessage, String);
        let cases: &[(&str, Edit)] = &[
            ("subject", |m, v| m.subject = v),
            ("from.name", |m, v| m.from.name = Some(v)),
            ("from.address", |m, v| m.from.address = v),
            ("reply_to", |m, v| m.reply_to = vec![v]),
            ("to", |m, v| m.to.push(v)),
            ("cc", |m, v| m.cc = vec![v]),
            ("message_id", |m, v| m.message_id = v),
            ("in_reply_to", |m, v| m.in_reply_to = Some(v)),
            ("references", |m, v| m.references = vec!["ok@x".into(), v]),
            ("conversation_id", |m, v| m.conversation_id = Some(v)),
            ("attachments.filename", |m, v| {
                m.attachments = vec![Attachment {
                    filename: v,
                    content_type: "text/plain".into(),
                    data: vec![],
                }]
            }),
            ("attachments.content_type", |m, v| {
                m.attachments = vec![Attachment {
                    filename: "a.txt".into(),
                    content_type: v,
                    data: vec![],
                }]
            }),
        ];
        for (field, edit) in cases {
            for bad in [
                "a@b.example\r\nBcc: evil@x.example",
                "a@b.example\nX: y",
                "a@b.example\rX: y",
                "a@b.example\0",
            ] {
                let mut msg = message();
                edit(&mut msg, bad.to_string());
                let expected = ComposeError::LineBreak { field };
                assert_eq!(msg.validate(), Err(expected.clone()), "{field} {bad:?}");
                assert_eq!(compose(&msg), Err(expected.clone()), "{field} {bad:?}");
                assert_eq!(expected.field(), Some(*field));
            }
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        let mut msg = message();
        msg.to = vec![];
        msg.cc = vec![];
        assert_eq!(msg.validate(), Err(ComposeError::NoRecipients));

        for bad in [
            "",
            "no-at-sign",
            "@example.com",
            "a@",
            "a b@example.com",
            "a@b@c",
            "x@y.example>, <evil@z.example",
            "<a@example.com>",
            "a,b@example.com",
            "é\u{7f}@x.example",
        ] {
            let mut msg = message();
            msg.to = vec![bad.into()];
            assert_eq!(
                msg.validate(),
                Err(ComposeError::InvalidAddress { field: "to" }),
                "{bad:?}"
            );
        }
        let mut msg = message();
        msg.from.address = format!("{}@example.com", "a".repeat(MAX_ADDRESS_LEN));
        assert_eq!(
            msg.validate(),
            Err(ComposeError::InvalidAddress {
                field: "from.address"
            })
        );

        for bad in ["", "<id@x>", "a b@x", "a\tb@x", &"x".repeat(MAX_ID_LEN + 1)] {
            let mut msg = message();
            msg.message_id = bad.into();
            assert_eq!(
                msg.validate(),
                Err(ComposeError::InvalidMessageId {
                    field: "message_id"
                }),
                "{bad:?}"
            );
            let mut msg = message();
            msg.references = vec![bad.into()];
            assert_eq!(
                msg.validate(),
                Err(ComposeError::InvalidMessageId {
                    field: "references"
                }),
                "{bad:?}"
            );
        }

        for bad in ["", "has space", "ünï", &"c".repeat(201)] {
            let mut msg = message();
            msg.conversation_id = Some(bad.into());
            assert_eq!(
                msg.validate(),
                Err(ComposeError::InvalidConversationId),
                "{bad:?}"
            );
        }

        for bad in [
            "text",
            "text/",
            "/plain",
            "text/plain; charset=utf-8",
            "text/pl ain",
            "a/b/c",
            "tëxt/plain",
        ] {
            let mut msg = message();
            msg.attachments = vec![Attachment {
                filename: "a".into(),
                content_type: bad.into(),
                data: vec![],
            }];
            assert_eq!(
                msg.validate(),
                Err(ComposeError::InvalidContentType),
                "{bad:?}"
            );
        }
        let mut msg = message();
        msg.attachments = vec![Attachment {
            filename: " ".into(),
            content_type: "a/b".into(),
            data: vec![],
        }];
        assert_eq!(msg.validate(), Err(ComposeError::EmptyFilename));

        let mut msg = message();
        msg.date = datetime!(1969-12-31 23:59:59 UTC);
        assert_eq!(msg.validate(), Err(ComposeError::DateOutOfRange));
    }

    #[test]
    fn minted_message_ids_are_random_hex_at_the_domain_and_valid() {
        let a = mint_message_id("agents.example");
        let b = mint_message_id(" agents.example ");
        assert_ne!(a, b);
        let (hex, domain) = a.split_once('@').expect("@");
        assert_eq!(domain, "agents.example");
        assert_eq!(hex.len(), 32);
        assert!(
            hex.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert!(b.ends_with("@agents.example"));
        assert_eq!(check_message_id(&a, "message_id"), Ok(()));
    }

    #[test]
    fn debug_output_leaves_out_bodies() {
        let mut msg = message();
        msg.text = "secret body".into();
        msg.attachments = vec![Attachment {
            filename: "f.txt".into(),
            content_type: "text/plain".into(),
            data: b"secret attachment".to_vec(),
        }];
        let debug = format!("{msg:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("f.txt"), "{debug}");
    }

    /// Arbitrary Unicode, or text dense in what headers find hard: folding
    /// whitespace, line breaks, NUL and other controls, encoded-word
    /// look-alikes, quotes and specials.
    fn header_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            r#"[ \t\r\na-zA-Z0-9é€😀\x00\x01\x7f=?_"(),;:<>@\\]{0,200}"#,
            r"( {0,3}[a-z]{1,12}| {0,3}=\?utf-8\?[QB]\?[a-z=]{0,8}\?=){0,40}",
        ]
    }

    /// Arbitrary Unicode, or long lines mixing every line ending.
    fn body_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            r"([ \ta-zé.=]{0,120}(\r\n|\n|\r|\x00)?){0,30}",
            r"[ a-z\x00-\x1f\x7f]{0,40}",
            "[a-z ]{900,1100}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the subject, display name and bodies, the message is
        /// either refused by `validate` or parses back to what was sent.
        #[test]
        fn arbitrary_subjects_and_bodies_are_refused_or_round_trip(
            subject in header_text(),
            name in proptest::option::of(header_text()),
            text in body_text(),
            html in proptest::option::of(body_text()),
            attachment in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..600)),
        ) {
            let mut msg = message();
            msg.subject = subject;
            msg.from.name = name;
            msg.text = text;
            msg.html = html;
            msg.attachments = attachment
                .into_iter()
                .map(|data| Attachment { filename: "f.bin".into(), content_type: "application/octet-stream".into(), data })
                .collect();
            match msg.validate() {
                Err(ComposeError::LineBreak { field }) => {
                    prop_assert!(field == "subject" || field == "from.name");
                    prop_assert!(compose(&msg).is_err());
                }
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
                Ok(()) => {
                    let (raw, parsed) = round_trip(&msg);
                    prop_assert!(wire_safe(&raw), "bare CR, LF or NUL on the wire");
                    prop_assert_eq!(&parsed.subject, msg.subject.trim());
                    let expected_name = msg.from.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
                    prop_assert_eq!(parsed.from.as_ref().and_then(|m| m.name.as_deref()), expected_name);
                    prop_assert_eq!(parsed.from.as_ref().map(|m| m.address.as_str()), Some("support@agents.example"));
                    prop_assert_eq!(&parsed.to, &msg.to);
                    prop_assert_eq!(parsed.message_id.as_deref(), Some(msg.message_id.as_str()));
                    prop_assert_eq!(parsed.text.as_deref().map(lf), Some(lf(&msg.text)));
                    prop_assert_eq!(parsed.html.as_deref().map(lf), msg.html.as_deref().map(lf));
                    let message = mail_parser::MessageParser::default().parse(&raw).expect("parses");
                    let contents: Vec<Vec<u8>> = message.attachments().map(|p| p.contents().to_vec()).collect();
                    let expected: Vec<Vec<u8>> = msg.attachments.iter().map(|a| a.data.clone()).collect();
                    prop_assert_eq!(contents, expected);
                }
            }
        }
    }
}
