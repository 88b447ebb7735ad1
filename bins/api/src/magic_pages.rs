//! The HTML pages behind the magic links of human-in-the-loop review
//! (`GET`/`POST /api/v1/approve` and `/api/v1/reject`, spec §3.1).
//!
//! Pure rendering, no state: the handlers decide, these functions draw.
//!
//! * [`confirm`] answers a `GET`: it shows what would be approved or
//!   rejected (agent, recipients, subject, expiry — never the body) and a
//!   `<form method="post">` that posts the token back to the page's own URL
//!   in the hidden field [`TOKEN_FIELD`]. A `GET` never changes anything:
//!   mail scanners and link previews fetch every link they see.
//! * [`done`] answers a `POST` that decided the message.
//! * [`error`] (and the named refusals: [`invalid_link`], [`wrong_action`],
//!   [`used`], [`expired`], [`not_found`], [`not_pending`],
//!   [`token_refusal`], [`consume_refusal`]) answer everything else.
//!
//! Every page is a complete document with no script, no external resource
//! and no inline event handler, every dynamic value HTML-escaped, and
//! [`SECURITY_HEADERS`]: a CSP allowing nothing but inline style and a form
//! posting to this origin, no framing, no referrer (the link's query holds
//! the token), not cached, not indexed.

use axum::{
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use e2a_mail::notification::{agent_text, escape_html, expiry_text, list_text, one_line};
use e2a_store::{
    approval_tokens::{Action, ConsumeError, TokenState},
    ids::MessageId,
};
use time::OffsetDateTime;

/// Name of the form field holding the token (as in the link's query).
pub const TOKEN_FIELD: &str = "t";
/// Name of the reject form's optional reason field.
pub const REASON_FIELD: &str = "reason";
/// Longest reason accepted, in characters (the textarea's `maxlength`; the
/// handler must enforce it too).
pub const MAX_REASON_CHARS: usize = 500;
/// The reason recorded when a magic-link rejection gives none (spec §3.1).
pub const DEFAULT_REJECT_REASON: &str = "magic-link rejection";

/// The page's `Content-Security-Policy`: nothing may load or run; only
/// inline style, and a form posting to this origin.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

/// Headers every page carries (besides `Content-Type`).
pub const SECURITY_HEADERS: [(&str, &str); 6] = [
    ("content-security-policy", CSP),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
    ("x-robots-tag", "noindex, nofollow"),
    ("x-content-type-options", "nosniff"),
];

/// What the confirmation page shows about the held message. Never the
/// body.
#[derive(Debug, Clone, Copy)]
pub struct ReviewFacts<'a> {
    /// The message.
    pub message_id: &'a MessageId,
    /// The sending agent's address.
    pub agent_address: &'a str,
    /// The agent's display name (may be empty).
    pub agent_name: &'a str,
    /// The subject.
    pub subject: &'a str,
    /// `To` addresses.
    pub to: &'a [String],
    /// `Cc` addresses.
    pub cc: &'a [String],
    /// `Bcc` addresses.
    pub bcc: &'a [String],
    /// When the hold ends.
    pub approval_expires_at: OffsetDateTime,
}

/// The confirmation page of a `GET` on a valid link: the facts and a form
/// that posts `token` (in [`TOKEN_FIELD`]) back to the same URL — for
/// [`Action::Reject`] with an optional reason of at most
/// [`MAX_REASON_CHARS`]. 200. Never the body, never a script.
pub fn confirm(action: Action, facts: &ReviewFacts<'_>, token: &str) -> Response {
    let (title, lead, button) = match action {
        Action::Approve => (
            "Approve this message?",
            "The agent's message below will be sent once you approve it.",
            "Approve and send",
        ),
        Action::Reject => (
            "Reject this message?",
            "The agent's message below will not be sent.",
            "Reject",
        ),
    };
    let mut rows = String::new();
    for (label, value) in [
        ("Message", facts.message_id.to_string()),
        ("From", agent_text(facts.agent_name, facts.agent_address)),
        ("To", list_text(facts.to)),
        ("Cc", list_text(facts.cc)),
        ("Bcc", list_text(facts.bcc)),
        ("Subject", or_none(one_line(facts.subject), "(no subject)")),
        ("Expires", expiry_text(facts.approval_expires_at)),
    ] {
        rows.push_str(&format!(
            "<tr><th>{label}</th><td>{}</td></tr>\n",
            escape_html(&value)
        ));
    }
    let reason = match action {
        Action::Approve => String::new(),
        Action::Reject => format!(
            "<p><label for=\"{REASON_FIELD}\">Reason (optional)</label><br>\n\
             <textarea id=\"{REASON_FIELD}\" name=\"{REASON_FIELD}\" \
             maxlength=\"{MAX_REASON_CHARS}\" rows=\"4\" cols=\"60\"></textarea></p>\n"
        ),
    };
    let inner = format!(
        "<p>{lead}</p>\n<table>\n{rows}</table>\n\
         <p>The message body is not shown here.</p>\n\
         <form method=\"post\">\n\
         <input type=\"hidden\" name=\"{TOKEN_FIELD}\" value=\"{token}\">\n\
         {reason}<button type=\"submit\">{button}</button>\n</form>\n",
        token = escape_html(token),
    );
    page(StatusCode::OK, title, &inner)
}

/// The page after a decision: `message_id` was approved (and queued for
/// sending) or rejected. 200.
pub fn done(action: Action, message_id: &MessageId) -> Response {
    let (title, what) = match action {
        Action::Approve => ("Approved", "was approved and will be sent"),
        Action::Reject => ("Rejected", "was rejected and will not be sent"),
    };
    let inner = format!(
        "<p>The message <code>{}</code> {what}. You can close this page.</p>\n",
        escape_html(message_id.as_str())
    );
    page(StatusCode::OK, title, &inner)
}

/// A refusal page: `status` with `title` and `detail`, both escaped.
pub fn error(status: StatusCode, title: &str, detail: &str) -> Response {
    let inner = format!("<p>{}</p>\n", escape_html(detail));
    page(status, title, &inner)
}

/// 400: a malformed, tampered or unknown link.
pub fn invalid_link() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "Invalid link",
        "This link is not valid. Open the link from the notification e-mail exactly as it was sent.",
    )
}

/// 400: an approve link used to reject, or the other way round.
pub fn wrong_action() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "Wrong link",
        "This link is for the other action. Use the matching link from the notification e-mail.",
    )
}

/// 410: the link was used, or the message was decided another way.
pub fn used() -> Response {
    error(
        StatusCode::GONE,
        "Link already used",
        "This link has already been used, or the message was decided another way. Each link works once.",
    )
}

/// 410: the link expired with its hold.
pub fn expired() -> Response {
    error(
        StatusCode::GONE,
        "Link expired",
        "This link has expired. The agent's expiry rule has decided the message.",
    )
}

/// 404: the link's message no longer exists.
pub fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Message not found",
        "The message this link refers to no longer exists.",
    )
}

/// 409: the message is no longer pending (already decided).
pub fn not_pending() -> Response {
    error(
        StatusCode::CONFLICT,
        "Already decided",
        "This message is no longer waiting for review; it was already approved, rejected or expired.",
    )
}

/// The refusal page for what [`e2a_store::approval_tokens::peek`] found,
/// or `None` for a valid token (render [`confirm`]).
pub fn token_refusal(state: &TokenState) -> Option<Response> {
    match state {
        TokenState::Valid { .. } => None,
        TokenState::Used => Some(used()),
        TokenState::Expired => Some(expired()),
        TokenState::Unknown => Some(invalid_link()),
    }
}

/// The refusal page for why [`e2a_store::approval_tokens::consume`]
/// refused, or `None` for a database failure (the handler logs it and
/// answers 503/500 itself).
pub fn consume_refusal(err: &ConsumeError) -> Option<Response> {
    match err {
        ConsumeError::Unknown => Some(invalid_link()),
        ConsumeError::WrongAction => Some(wrong_action()),
        ConsumeError::Used => Some(used()),
        ConsumeError::Expired => Some(expired()),
        ConsumeError::Store(_) => None,
    }
}

/// A complete page: `title` (escaped) as heading and `inner` (already
/// safe HTML) below it, with `status` and [`SECURITY_HEADERS`].
fn page(status: StatusCode, title: &str, inner: &str) -> Response {
    let title = escape_html(title);
    let body = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex, nofollow\">\
         <title>{title} - e2a</title>\n<style>{STYLE}</style></head>\n\
         <body><main>\n<h1>{title}</h1>\n{inner}</main></body></html>\n"
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem;color:#222}\
main{max-width:40rem}th{text-align:left;padding-right:1rem;vertical-align:top}\
td{word-break:break-all}button{font-size:1rem;padding:.5rem 1rem}";

fn or_none(value: String, none: &str) -> String {
    if value.is_empty() {
        none.to_owned()
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "e2a_apv_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    async fn body(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// True when `html` has an attribute like ` onclick=`.
    fn has_event_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    fn facts<'a>(id: &'a MessageId, subject: &'a str, to: &'a [String]) -> ReviewFacts<'a> {
        ReviewFacts {
            message_id: id,
            agent_address: "bot@agents.example",
            agent_name: "Bot",
            subject,
            to,
            cc: &[],
            bcc: &[],
            approval_expires_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        }
    }

    fn every_page() -> Vec<(StatusCode, Response)> {
        let id = MessageId::new();
        let to = vec!["alice@example.net".to_owned()];
        let f = facts(&id, "hello", &to);
        vec![
            (StatusCode::OK, confirm(Action::Approve, &f, TOKEN)),
            (StatusCode::OK, confirm(Action::Reject, &f, TOKEN)),
            (StatusCode::OK, done(Action::Approve, &id)),
            (StatusCode::OK, done(Action::Reject, &id)),
            (
                StatusCode::IM_A_TEAPOT,
                error(StatusCode::IM_A_TEAPOT, "t", "d"),
            ),
            (StatusCode::BAD_REQUEST, invalid_link()),
            (StatusCode::BAD_REQUEST, wrong_action()),
            (StatusCode::GONE, used()),
            (StatusCode::GONE, expired()),
            (StatusCode::NOT_FOUND, not_found()),
            (StatusCode::CONFLICT, not_pending()),
        ]
    }

    #[tokio::test]
    async fn every_page_carries_its_status_and_the_security_headers() {
        for (status, response) in every_page() {
            assert_eq!(response.status(), status);
            let h = response.headers();
            assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert_eq!(
                h[header::CONTENT_SECURITY_POLICY],
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                 frame-ancestors 'none'; base-uri 'none'"
            );
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert_eq!(h[header::CACHE_CONTROL], "no-store");
            assert_eq!(h["x-robots-tag"], "noindex, nofollow");
            let html = body(response).await;
            assert!(html.starts_with("<!DOCTYPE html>"));
            let lower = html.to_lowercase();
            for active in ["<script", "<img", "<iframe", "<link", "http-equiv", "<a "] {
                assert!(!lower.contains(active), "{active} in {html}");
            }
            assert!(!has_event_handler(&lower), "{html}");
        }
    }

    #[tokio::test]
    async fn a_hostile_subject_and_name_are_escaped() {
        let id = MessageId::new();
        let to = vec!["<img src=x>@example.net".to_owned()];
        let mut f = facts(&id, "<script>alert('x')</script>\r\n\"&", &to);
        f.agent_name = "</td><form method=\"get\">";
        let html = body(confirm(Action::Approve, &f, TOKEN)).await;
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("method=\"get\""), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &quot;&amp;"));
        assert!(html.contains("&lt;/td&gt;&lt;form method=&quot;get&quot;&gt;"));

        let html = body(error(StatusCode::BAD_REQUEST, "<b>", "<i>'\"&")).await;
        assert!(html.contains("<h1>&lt;b&gt;</h1>"));
        assert!(html.contains("&lt;i&gt;&#39;&quot;&amp;"));
    }

    #[tokio::test]
    async fn the_form_posts_the_token_in_a_hidden_field_and_nothing_acts_on_get() {
        let id = MessageId::new();
        let to = vec!["alice@example.net".to_owned()];
        for action in [Action::Approve, Action::Reject] {
            let html = body(confirm(action, &facts(&id, "hello", &to), TOKEN)).await;
            assert_eq!(html.matches("<form").count(), 1, "{html}");
            assert!(html.contains("<form method=\"post\">"), "{html}");
            assert!(html.contains(&format!(
                "<input type=\"hidden\" name=\"t\" value=\"{TOKEN}\">"
            )));
            // The token is nowhere else: no link a prefetcher could follow.
            assert_eq!(html.matches(TOKEN).count(), 1, "{html}");
            assert!(!html.contains("<a "), "{html}");
            assert!(html.contains("alice@example.net"));
            assert!(html.contains("2027-01-15 08:00:00 UTC"));
            let has_reason = html.contains(
                "<textarea id=\"reason\" name=\"reason\" maxlength=\"500\" rows=\"4\" cols=\"60\">",
            );
            assert_eq!(has_reason, action == Action::Reject, "{html}");
        }
    }

    #[tokio::test]
    async fn a_hostile_token_cannot_break_out_of_its_attribute() {
        let id = MessageId::new();
        let to = vec!["alice@example.net".to_owned()];
        let hostile = "x\"><script>alert(1)</script>";
        let html = body(confirm(Action::Approve, &facts(&id, "s", &to), hostile)).await;
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("value=\"x&quot;&gt;&lt;script&gt;"));
    }

    #[test]
    fn the_event_handler_check_sees_handlers() {
        assert!(has_event_handler("<p onclick=x>"));
        assert!(!has_event_handler("works once."));
    }

    #[test]
    fn refusals_map_to_the_documented_statuses() {
        assert_eq!(
            token_refusal(&TokenState::Used).unwrap().status(),
            StatusCode::GONE
        );
        assert_eq!(
            token_refusal(&TokenState::Expired).unwrap().status(),
            StatusCode::GONE
        );
        assert_eq!(
            token_refusal(&TokenState::Unknown).unwrap().status(),
            StatusCode::BAD_REQUEST
        );
        assert!(
            token_refusal(&TokenState::Valid {
                user_id: e2a_store::ids::UserId::new(),
                message_id: MessageId::new(),
                action: Action::Approve,
                expires_at: OffsetDateTime::UNIX_EPOCH,
            })
            .is_none()
        );
        for (err, status) in [
            (ConsumeError::Unknown, StatusCode::BAD_REQUEST),
            (ConsumeError::WrongAction, StatusCode::BAD_REQUEST),
            (ConsumeError::Used, StatusCode::GONE),
            (ConsumeError::Expired, StatusCode::GONE),
        ] {
            assert_eq!(consume_refusal(&err).unwrap().status(), status, "{err}");
        }
        assert!(consume_refusal(&ConsumeError::Store(e2a_store::StoreError::NotFound)).is_none());
    }
}
