//! Bytes and texts: the DATA payload on the wire (CRLF, dot-stuffing, one
//! terminator), reply texts made single-line and bounded, the queue id in
//! a `250`, and scrubbing the password out of anything a server said.

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use smtp_proto::Response;

use super::{MAX_REPLY_TEXT, Outcome, RecipientStatus, Reply, SmtpConfig, Submission};

/// The DATA payload on the wire: CRLF line endings, dot-stuffed, a final
/// CRLF if missing, and the terminating `.<CRLF>`.
pub(super) fn data_wire(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 50 + 8);
    let mut line_start = true;
    let mut i = 0;
    while let Some(&b) = message.get(i) {
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line_start = true;
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                if line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The server's id in a 2xx reply text (see [`Outcome::Sent::queue_id`]).
pub(super) fn queue_id(text: &str) -> Option<String> {
    if let Some(start) = text.find('<')
        && let Some(len) = text[start..].find('>')
        && len > 1
    {
        return Some(text[start..=start + len].to_owned());
    }
    let token = |rest: &str| {
        rest.split_whitespace()
            .next()
            .map(|t| t.trim_end_matches([',', ';', ')']).to_owned())
            .filter(|t| !t.is_empty())
    };
    let lower = text.to_ascii_lowercase();
    if let Some(pos) = lower.find("queued as ") {
        return token(&text[pos + "queued as ".len()..]);
    }
    // Amazon SES: "[2.0.0 ]Ok 0100018b…-000000".
    let rest = match text.split_once(' ') {
        Some((first, rest)) if is_enhanced_code(first) => rest,
        _ => text,
    };
    match rest.get(..3) {
        Some(ok) if ok.eq_ignore_ascii_case("ok ") => token(&rest[3..]),
        _ => None,
    }
}

/// `2.0.0`-shaped.
fn is_enhanced_code(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

pub(super) fn to_reply(reply: &Response<String>) -> Reply {
    Reply {
        code: reply.code,
        text: reply_text(reply),
    }
}

/// The text after the code (enhanced status code first), single-line and
/// clipped.
pub(super) fn reply_text(reply: &Response<String>) -> String {
    let [class, subject, detail] = reply.esc;
    let text = if class == 0 {
        reply.message.clone()
    } else {
        format!("{class}.{subject}.{detail} {}", reply.message)
    };
    clip(printable(&text), MAX_REPLY_TEXT)
}

pub(super) fn reply_line(reply: &Response<String>) -> String {
    format!("{} {}", reply.code, reply_text(reply))
}

/// `s` with control characters (line breaks included) as spaces.
pub(super) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(super) fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The forms in which the password could come back in a server's text.
pub(super) struct Secrets(Vec<String>);

impl Secrets {
    pub(super) fn of(cfg: &SmtpConfig) -> Self {
        let mut forms = Vec::new();
        if let Some(pass) = cfg.password.as_deref().filter(|p| !p.is_empty()) {
            forms.push(pass.to_owned());
            forms.push(BASE64.encode(pass));
            let user = cfg.username.as_deref().unwrap_or("");
            forms.push(BASE64.encode(format!("\0{user}\0{pass}")));
        }
        // Longest first: a form containing another is replaced whole.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        Self(forms)
    }

    fn scrub(&self, text: &mut String) {
        for form in &self.0 {
            if text.contains(form.as_str()) {
                *text = text.replace(form.as_str(), "***");
            }
        }
    }

    pub(super) fn scrub_submission(&self, s: &mut Submission) {
        if self.0.is_empty() {
            return;
        }
        for r in &mut s.recipients {
            if let RecipientStatus::Temporary { text, .. }
            | RecipientStatus::Permanent { text, .. } = &mut r.status
            {
                self.scrub(text);
            }
        }
        if let Some(reply) = &mut s.data {
            self.scrub(&mut reply.text);
        }
        match &mut s.outcome {
            Outcome::Sent {
                reply, queue_id, ..
            } => {
                self.scrub(reply);
                if let Some(id) = queue_id {
                    self.scrub(id);
                }
            }
            Outcome::Temporary { reason, .. } | Outcome::Permanent { reason, .. } => {
                self.scrub(reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::submit::TlsMode;

    #[test]
    fn the_wire_form_is_crlf_stuffed_and_terminated_once() {
        assert_eq!(data_wire(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(data_wire(b"a\r\nb"), b"a\r\nb\r\n.\r\n");
        assert_eq!(
            data_wire(b".a\r\n..b\r\n.\r\n"),
            b"..a\r\n...b\r\n..\r\n.\r\n"
        );
        // Bare LF and bare CR become CRLF, so `\n.\n` cannot end DATA early.
        assert_eq!(data_wire(b"a\n.\nb\r.\r"), b"a\r\n..\r\nb\r\n..\r\n.\r\n");
        assert_eq!(data_wire(b""), b".\r\n");
        assert_eq!(data_wire(b"mid.dot\r\n"), b"mid.dot\r\n.\r\n");
    }

    #[test]
    fn queue_ids_are_found_in_common_reply_styles() {
        assert_eq!(
            queue_id("2.0.0 Ok: queued as 4Bd3XyZ").as_deref(),
            Some("4Bd3XyZ")
        );
        assert_eq!(
            queue_id("2.0.0 OK <abc@relay.test> queued").as_deref(),
            Some("<abc@relay.test>")
        );
        assert_eq!(
            queue_id("Ok 0100018b2f3a1c2d-aaaa-000000").as_deref(),
            Some("0100018b2f3a1c2d-aaaa-000000")
        );
        assert_eq!(
            queue_id("2.0.0 Ok 0100018b-x").as_deref(),
            Some("0100018b-x")
        );
        assert_eq!(queue_id("2.0.0 Message accepted"), None);
        assert_eq!(queue_id("<>"), None);
        assert_eq!(queue_id(""), None);
    }

    #[test]
    fn secrets_are_scrubbed_in_every_form() {
        let mut cfg = SmtpConfig::new("relay.test", 25, TlsMode::None);
        cfg.username = Some("u".into());
        cfg.password = Some("pw-123".into());
        let secrets = Secrets::of(&cfg);
        let plain_token = BASE64.encode("\0u\0pw-123");
        let mut s = Submission {
            recipients: vec![],
            data: Some(Reply {
                code: 501,
                text: format!("bad AUTH PLAIN {plain_token}"),
            }),
            outcome: Outcome::Permanent {
                code: Some(501),
                reason: format!("echo pw-123 and {}", BASE64.encode("pw-123")),
            },
        };
        secrets.scrub_submission(&mut s);
        let shown = format!("{s:?}");
        assert!(!shown.contains("pw-123"), "{shown}");
        assert!(!shown.contains(&plain_token), "{shown}");
        assert!(!shown.contains(&BASE64.encode("pw-123")), "{shown}");
    }

    #[test]
    fn reply_texts_are_single_line_and_clipped() {
        let reply = Response {
            code: 250,
            esc: [2, 0, 0],
            message: format!("line one\nline two {}", "é".repeat(400)),
        };
        let text = reply_text(&reply);
        assert!(text.starts_with("2.0.0 line one line two"), "{text}");
        assert!(text.len() <= MAX_REPLY_TEXT);
    }
}
