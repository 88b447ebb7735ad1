//! SMTP submission of one composed message to the outbound relay
//! (`E2A_OUTBOUND_SMTP_*`), with every reply classified.
//!
//! [`submit`] opens one connection, optionally wraps it in TLS (implicit,
//! or a required `STARTTLS`), says `EHLO`, authenticates with `AUTH PLAIN`
//! (or `AUTH LOGIN` when that is all the server offers) when a username is
//! configured, sends `MAIL FROM`, one `RCPT TO` per recipient, `DATA`, and
//! `QUIT`. It never panics and never returns an error: whatever happens is a
//! [`Submission`] whose [`Outcome`] says whether the message was sent,
//! should be retried later, or will never be accepted.
//!
//! Guarantees:
//! - **Bounded time.** Connecting (DNS included) is bounded by
//!   [`SmtpConfig::connect_timeout`], each command and the TLS handshake by
//!   [`SmtpConfig::command_timeout`], sending the message and reading the
//!   final reply by [`SmtpConfig::data_timeout`], and the whole call by
//!   [`SmtpConfig::worst_case`]. mail-send's own one-hour default is never
//!   relied on.
//! - **Classification** (RFC 5321 §4.2.1): per recipient, 2xx accepted, 4xx
//!   temporary, 5xx permanent. With no recipient accepted, the message is
//!   temporary if any recipient got a 4xx, else permanent. A 4xx to any
//!   other step is temporary, a 5xx permanent; a timeout, a refused or reset
//!   connection, a TLS failure or an unreadable reply is temporary.
//! - **Secrets.** The password is sent only inside TLS unless
//!   [`TlsMode::None`] was chosen explicitly. It never appears in a reason,
//!   a reply text or `Debug` output (reply texts are scrubbed of it, also
//!   base64-encoded, in case a server echoes a command back).
//! - **Transparency.** Line endings are normalised to CRLF (a bare CR or LF
//!   becomes CRLF, which also prevents SMTP smuggling), lines starting with
//!   `.` are dot-stuffed, and the message is terminated exactly once: the
//!   server stores the bytes given, plus a final CRLF if they lacked one.
//! - Nothing is logged here; the caller logs the outcome once. Reply texts
//!   are single-line and at most [`MAX_REPLY_TEXT`] bytes.
//!
//! Split by phase: `session` (connection, TLS, greeting, EHLO, QUIT, the
//! timeouts), `auth`, `transaction` (MAIL, RCPT, DATA) and `text` (the wire
//! form of the message, reply texts, queue ids, secret scrubbing). mail-send
//! provides the stream, reply parsing and the TLS upgrade; its high-level
//! `send` is not used because it stops at the first refused recipient and
//! has one timeout for everything.

use std::{fmt, str::FromStr, time::Duration};

use tokio::time::Instant;

use session::Session;
use text::{Secrets, data_wire, printable};

mod auth;
mod session;
mod text;
mod transaction;

/// Command timeouts [`SmtpConfig::worst_case`] allows for in one session:
/// greeting, TLS handshake, EHLO, STARTTLS, EHLO again, AUTH (up to three
/// exchanges for LOGIN), MAIL, a first RCPT, DATA and QUIT. Further RCPTs
/// share what is left; every step is also cut at the overall deadline.
pub const COMMAND_STEPS: u32 = 12;

/// Longest reply text kept (bytes); longer texts are cut at a character
/// boundary.
pub const MAX_REPLY_TEXT: usize = 512;

/// How the connection to the relay is protected (`E2A_OUTBOUND_SMTP_TLS`:
/// `none`, `starttls` or `implicit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext. Credentials, if configured, are sent in the clear: for a
    /// relay on the same host or network, or the dev sink.
    None,
    /// Plaintext greeting, then `STARTTLS` is **required**: a server that
    /// does not offer it gets nothing (temporary failure).
    StartTls,
    /// TLS from the first byte (usually port 465).
    Implicit,
}

impl TlsMode {
    /// The configuration spelling: `none`, `starttls` or `implicit`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::StartTls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TLS mode other than `none`, `starttls` or `implicit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown SMTP TLS mode {0:?}: expected none, starttls or implicit")]
pub struct ParseTlsModeError(pub String);

impl FromStr for TlsMode {
    type Err = ParseTlsModeError;

    /// Parses `none`, `starttls` or `implicit` (any case, surrounding
    /// whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(TlsMode::None),
            "starttls" => Ok(TlsMode::StartTls),
            "implicit" => Ok(TlsMode::Implicit),
            _ => Err(ParseTlsModeError(s.to_owned())),
        }
    }
}

/// Where and how to submit. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// The relay's host name or IP address (also the TLS server name).
    pub host: String,
    /// The relay's port.
    pub port: u16,
    /// How the connection is protected.
    pub tls: TlsMode,
    /// AUTH user name; `None` submits without authenticating.
    pub username: Option<String>,
    /// AUTH password (empty when `None` and a username is set).
    pub password: Option<String>,
    /// The name sent with `EHLO`.
    pub helo_name: String,
    /// Bound on resolving the host and establishing TCP.
    pub connect_timeout: Duration,
    /// Bound on the TLS handshake and on each command's reply.
    pub command_timeout: Duration,
    /// Bound on sending the message and reading the reply after it.
    pub data_timeout: Duration,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("helo_name", &self.helo_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("data_timeout", &self.data_timeout)
            .finish()
    }
}

impl SmtpConfig {
    /// Default [`SmtpConfig::connect_timeout`] (the original's dial timeout).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`SmtpConfig::command_timeout`].
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`SmtpConfig::data_timeout`].
    pub const DEFAULT_DATA_TIMEOUT: Duration = Duration::from_secs(120);

    /// `host:port` with `tls`, no credentials, `EHLO localhost` and the
    /// default timeouts.
    pub fn new(host: impl Into<String>, port: u16, tls: TlsMode) -> Self {
        Self {
            host: host.into(),
            port,
            tls,
            username: None,
            password: None,
            helo_name: "localhost".into(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
            data_timeout: Self::DEFAULT_DATA_TIMEOUT,
        }
    }

    /// The longest one [`submit`] call can take: `connect_timeout +
    /// COMMAND_STEPS × command_timeout + data_timeout`. `submit` enforces it
    /// as an overall deadline, whatever the number of recipients, so a
    /// worker's lease (and the send gate's takeover window) longer than this
    /// can never expire under a submission still running.
    pub fn worst_case(&self) -> Duration {
        self.connect_timeout
            .saturating_add(self.command_timeout.saturating_mul(COMMAND_STEPS))
            .saturating_add(self.data_timeout)
    }
}

/// The SMTP envelope: who the message is from and whom it goes to. Paths
/// are bare addresses, without angle brackets; `mail_from` may be empty
/// (the null sender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The `MAIL FROM` path.
    pub mail_from: String,
    /// The `RCPT TO` paths, in order.
    pub rcpt_to: Vec<String>,
}

/// A server reply: the code and the text after it (enhanced status code
/// included, single-line, scrubbed of secrets, at most [`MAX_REPLY_TEXT`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text, e.g. `2.0.0 Ok: queued as 4Bd3`.
    pub text: String,
}

/// What the server said to one `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    /// The path as given in the [`Envelope`].
    pub address: String,
    /// Its classification.
    pub status: RecipientStatus,
}

/// The classification of one recipient's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientStatus {
    /// 2xx: the server takes the message for this recipient.
    Accepted,
    /// 4xx (or an unexpected non-2xx/5xx code): try this recipient again later.
    Temporary {
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
    /// 5xx: this recipient will not be accepted.
    Permanent {
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
}

/// Everything one [`submit`] call learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// One entry per `RCPT TO` that got a reply, in envelope order; shorter
    /// than the envelope (possibly empty) when the session ended earlier.
    pub recipients: Vec<RecipientResult>,
    /// The reply that decided the DATA phase: the refusal of the `DATA`
    /// command, or the reply after the message. `None` when DATA was not
    /// reached or no reply came.
    pub data: Option<Reply>,
    /// The verdict for the message as a whole.
    pub outcome: Outcome,
}

/// The verdict for the message as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered 2xx after the message. Recipients refused at
    /// `RCPT` (see [`Submission::recipients`]) did not get it.
    Sent {
        /// The final reply code.
        code: u16,
        /// The final reply text.
        reply: String,
        /// The server's id for the message, when the reply names one: the
        /// first `<…>` (brackets kept), else what follows `queued as `, else
        /// the token after a leading `Ok ` (Amazon SES style).
        queue_id: Option<String>,
    },
    /// Try again later: a 4xx reply, a timeout, a connection or TLS
    /// failure, an unexpected reply, or every recipient refused with at
    /// least one 4xx.
    Temporary {
        /// The server's code, when a reply decided it.
        code: Option<u16>,
        /// What happened, for operators (no secrets).
        reason: String,
    },
    /// Never going to be accepted as is: a 5xx reply to the session, the
    /// sender or the message, every recipient refused with 5xx, or an
    /// envelope that cannot be sent (no recipients, a path with control
    /// characters or brackets, non-ASCII paths to a server without
    /// SMTPUTF8).
    Permanent {
        /// The server's code; `None` when the message was refused locally.
        code: Option<u16>,
        /// What happened, for operators (no secrets).
        reason: String,
    },
}

impl Outcome {
    /// True for [`Outcome::Sent`].
    pub fn is_sent(&self) -> bool {
        matches!(self, Outcome::Sent { .. })
    }

    /// True for [`Outcome::Temporary`].
    pub fn is_temporary(&self) -> bool {
        matches!(self, Outcome::Temporary { .. })
    }

    /// True for [`Outcome::Permanent`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, Outcome::Permanent { .. })
    }
}

/// Submits `message` (the complete RFC 5322 message, ideally CRLF lines)
/// to the relay in `cfg` for `envelope`. Returns within
/// [`SmtpConfig::worst_case`]; never panics; see the module docs for the
/// classification and what is never revealed.
pub async fn submit(cfg: &SmtpConfig, envelope: &Envelope, message: &[u8]) -> Submission {
    let secrets = Secrets::of(cfg);
    let mut submission = Submission {
        recipients: Vec::new(),
        data: None,
        outcome: Outcome::Temporary {
            code: None,
            reason: String::new(),
        },
    };
    let outcome = match check(cfg, envelope) {
        Err(outcome) => outcome,
        Ok(()) => {
            let deadline = Instant::now() + cfg.worst_case();
            let wire = data_wire(message);
            let eight_bit = !message.is_ascii();
            let mut session = Session {
                cfg,
                envelope,
                deadline,
                submission: &mut submission,
            };
            session.run(&wire, message.len(), eight_bit).await
        }
    };
    submission.outcome = outcome;
    secrets.scrub_submission(&mut submission);
    submission
}

/// Refuses, before connecting, what cannot be sent.
fn check(cfg: &SmtpConfig, envelope: &Envelope) -> Result<(), Outcome> {
    let permanent = |reason: String| Outcome::Permanent { code: None, reason };
    if envelope.rcpt_to.is_empty() {
        return Err(permanent("the envelope has no recipients".into()));
    }
    let bad_path = |p: &str| {
        p.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
    };
    if bad_path(&envelope.mail_from) {
        return Err(permanent(format!(
            "invalid MAIL FROM path {:?}",
            printable(&envelope.mail_from)
        )));
    }
    if let Some(bad) = envelope
        .rcpt_to
        .iter()
        .find(|r| r.is_empty() || bad_path(r))
    {
        return Err(permanent(format!(
            "invalid RCPT TO path {:?}",
            printable(bad)
        )));
    }
    // A configuration problem, not the message's: keep the message for a
    // later attempt with a fixed configuration.
    if cfg.helo_name.is_empty()
        || cfg
            .helo_name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Outcome::Temporary {
            code: None,
            reason: format!(
                "invalid EHLO name {:?} in the configuration",
                printable(&cfg.helo_name)
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_parse_from_their_configuration_spelling() {
        for mode in [TlsMode::None, TlsMode::StartTls, TlsMode::Implicit] {
            assert_eq!(mode.as_str().parse::<TlsMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(" STARTTLS ".parse::<TlsMode>(), Ok(TlsMode::StartTls));
        let err = "tls".parse::<TlsMode>().unwrap_err();
        assert!(
            err.to_string().contains("none, starttls or implicit"),
            "{err}"
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut cfg = SmtpConfig::new("relay.test", 587, TlsMode::StartTls);
        cfg.username = Some("user".into());
        cfg.password = Some("hunter2-s3cret".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user") && shown.contains("***"), "{shown}");
    }

    #[test]
    fn worst_case_adds_every_bound() {
        let mut cfg = SmtpConfig::new("relay.test", 587, TlsMode::None);
        cfg.connect_timeout = Duration::from_secs(1);
        cfg.command_timeout = Duration::from_secs(2);
        cfg.data_timeout = Duration::from_secs(3);
        assert_eq!(cfg.worst_case(), Duration::from_secs(1 + 2 * 12 + 3));
        cfg.data_timeout = Duration::MAX;
        assert_eq!(cfg.worst_case(), Duration::MAX, "saturates");
    }

    #[test]
    fn bad_envelopes_are_refused_before_connecting() {
        let cfg = SmtpConfig::new("relay.test", 25, TlsMode::None);
        let env = |from: &str, to: &[&str]| Envelope {
            mail_from: from.into(),
            rcpt_to: to.iter().map(|s| s.to_string()).collect(),
        };
        assert!(check(&cfg, &env("", &["a@x"])).is_ok(), "null sender");
        for bad in [
            env("a@x", &[]),
            env("a@x>\r\nRCPT TO:<evil@x", &["b@x"]),
            env("a@x", &["b@x>\r\nDATA"]),
            env("a@x", &["b @x"]),
            env("a@x", &[""]),
        ] {
            assert!(
                matches!(
                    check(&cfg, &bad),
                    Err(Outcome::Permanent { code: None, .. })
                ),
                "{bad:?}"
            );
        }
        let mut bad_helo = cfg.clone();
        bad_helo.helo_name = "a\r\nb".into();
        assert!(matches!(
            check(&bad_helo, &env("a@x", &["b@x"])),
            Err(Outcome::Temporary { .. })
        ));
    }
}
