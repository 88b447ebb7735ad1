//! One SMTP session, generic over its byte stream (a TCP socket in
//! production, an in-memory duplex in tests) and over the [`Backend`] that
//! checks recipients and stores messages.
//!
//! [`Session::run`] sends the greeting, then reads command lines through a
//! bounded [`LineBuffer`], parses each with `smtp-proto`'s
//! [`Request::parse`] and dispatches it to one handler per verb, which
//! appends its reply to an output buffer. Replies are flushed whenever no
//! further complete command is buffered, so pipelined commands arriving in
//! one packet are all answered, in order, in one write.
//!
//! The mail transaction: `MAIL FROM` (after EHLO/HELO; a `SIZE=` above the
//! limit is `552 5.3.4`) → `RCPT TO` per recipient (normalised like agent
//! addresses; unknown or unverified → `550 5.1.1`; beyond the recipient cap
//! → `452 4.5.3`; backend unavailable → `451 4.3.0`) → `DATA` (`354`, then
//! the body up to `<CRLF>.<CRLF>`, dot-unstuffed, read in bounded chunks; a
//! body over the size limit is read to its end and answered `552 5.3.4`).
//! **`250` is sent only after the backend has stored the message**; a
//! storage failure is `451 4.3.0`. Wrong order is `503 5.5.1`.
//!
//! Limits: command lines longer than [`MAX_COMMAND_LINE_BYTES`] get `500
//! 5.5.2 line too long` (and are discarded without buffering them); no
//! command within the idle timeout, or a session past its total time limit,
//! gets `421 4.4.2` and the connection closes; after [`MAX_ERRORS`] rejected
//! commands the session gets `421 4.7.0` and closes, and so does a session
//! past [`SessionConfig::max_transactions`] `MAIL` or
//! [`SessionConfig::max_rcpt_commands`] `RCPT` commands (every RCPT counts,
//! whatever its answer, so a `MAIL`/`RCPT`×N/`RSET` loop cannot buy
//! unbounded database lookups). On shutdown the session
//! finishes the command in hand, answers `421 4.3.0 shutting down` and
//! closes. A client that disconnects, or sends NUL bytes or 8-bit garbage,
//! ends the session quietly: every outcome is a [`SessionEnd`], never a
//! panic.
//!
//! STARTTLS is offered when a certificate is configured (see [`crate::tls`]).
//!
//! Nothing from the conversation is logged except verbs and reply codes.

use std::{borrow::Cow, sync::Arc, time::Duration};

use smtp_proto::{
    EXT_8BIT_MIME, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS, EhloResponse, Error as ParseError, MailFrom, Request, Response,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use e2a_store::address::EmailAddress;

use crate::{
    backend::{Backend, DeliveryOutcome, Envelope, RecipientCheck},
    lines::{DataInput, Input, LineBuffer},
    tls::Conn,
};

/// Longest accepted command line, CRLF included. RFC 5321 §4.5.3.1.4 sets
/// a 512-octet minimum; ESMTP parameters and SMTPUTF8 addresses make longer
/// lines legitimate, so we allow what `smtp-proto`'s own receiver allows.
pub const MAX_COMMAND_LINE_BYTES: usize = 4096;

/// Rejected commands (5xx replies) tolerated before the session is closed
/// with `421 4.7.0`: a client speaking garbage is not kept busy forever.
pub const MAX_ERRORS: u32 = 20;

/// Default of [`SessionConfig::max_transactions`].
pub const DEFAULT_MAX_TRANSACTIONS: u32 = 100;

/// Default of [`SessionConfig::max_rcpt_commands`]: room for a few full
/// messages of recipients, not for a directory-harvest loop.
pub const DEFAULT_MAX_RCPT_COMMANDS: u32 = 1000;

/// Default of the relay-wide DATA budget (`E2A_SMTP_DATA_BUDGET_BYTES`).
pub const DEFAULT_DATA_BUDGET_BYTES: usize = 64 << 20;

/// DATA budget is reserved in blocks of this many bytes (fewer semaphore
/// operations than one per line; the body's buffer grows by whole blocks).
const BUDGET_BLOCK: usize = 64 * 1024;

/// The shared semaphore of a DATA budget of `bytes`, raised to at least
/// `max_message_bytes` so that a message at the size limit can always be
/// received when the relay is otherwise idle.
pub fn data_budget(bytes: usize, max_message_bytes: usize) -> Arc<tokio::sync::Semaphore> {
    let permits = bytes
        .max(max_message_bytes)
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    Arc::new(tokio::sync::Semaphore::new(permits))
}

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 4096;

/// Extensions announced in the EHLO reply.
const EHLO_CAPABILITIES: u32 =
    EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8;

/// DATA bodies are read in pieces of at most this many bytes, so one
/// endless line cannot exhaust memory.
const DATA_CHUNK: usize = 64 * 1024;

/// What a `RCPT TO` path names.
#[derive(Debug, PartialEq, Eq)]
enum Recipient {
    /// A normalised address to look up (an internationalised domain in its
    /// ASCII, A-label form).
    Address(EmailAddress),
    /// A well-formed internationalised address (RFC 6531) whose local part
    /// is not ASCII: no agent can have it (`550 5.1.1`, not a syntax error).
    NotAnAgent,
    /// Not an address.
    Invalid,
}

/// Reads a `RCPT TO` path. ASCII paths are normalised like agent addresses
/// (flaw 33). SMTPUTF8 paths (RFC 6531) are accepted: a U-label domain is
/// converted to its A-label form (UTS #46, as the API does for domain
/// paths), so `demo@bücher.example` reaches the agent on
/// `xn--bcher-kva.example`; a non-ASCII local part cannot name an agent.
fn recipient_address(path: &str) -> Recipient {
    if path.is_ascii() {
        return EmailAddress::parse(path).map_or(Recipient::Invalid, Recipient::Address);
    }
    let path = path.trim();
    let Some((local, domain)) = path.rsplit_once('@') else {
        return Recipient::Invalid;
    };
    if local.is_empty()
        || local.len() > 64
        || local.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Recipient::Invalid;
    }
    let Ok(domain) = idna::domain_to_ascii(domain) else {
        return Recipient::Invalid;
    };
    let Ok(address) = EmailAddress::parse(&format!("{local}@{domain}")) else {
        return if local.is_ascii() || domain.is_empty() {
            Recipient::Invalid
        } else {
            Recipient::NotAnAgent
        };
    };
    Recipient::Address(address)
}

/// Per-session settings, shared by every session of a listener.
#[derive(Clone)]
pub struct SessionConfig {
    /// STARTTLS, offered when set (`E2A_SMTP_TLS_CERT`/`_KEY`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Host name in the greeting and the EHLO/HELO reply.
    pub domain: String,
    /// Announced as `SIZE`; a `MAIL FROM … SIZE=` above it gets `552 5.3.4`.
    pub max_message_bytes: usize,
    /// Most recipients per message (`452 4.5.3` beyond it).
    pub max_recipients: usize,
    /// Longest wait for the next command, or for the client to take a reply.
    pub idle_timeout: Duration,
    /// Longest a whole session may last.
    pub session_timeout: Duration,
    /// Most mail transactions (`MAIL` commands) one session may open; the
    /// next gets `421 4.7.0` and the connection closes.
    pub max_transactions: u32,
    /// Bytes of DATA all sessions of the listener may hold in memory at
    /// once. A session reserves its share in blocks as the body arrives; one
    /// that cannot get the next block reads the body to its end, drops it and
    /// answers `452 4.3.1` (the connection stays usable). The reservation is
    /// released when the message has been stored (or refused).
    pub data_budget: Arc<tokio::sync::Semaphore>,
    /// Most `RCPT` commands one session may send (accepted, refused,
    /// duplicate or deferred alike: each may cost a database lookup); the
    /// next gets `421 4.7.0` and the connection closes.
    pub max_rcpt_commands: u32,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("domain", &self.domain)
            .field("starttls", &self.tls.is_some())
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_recipients", &self.max_recipients)
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// The defaults of `e2a-relay --help` with `domain` as host name.
    pub fn new(domain: impl Into<String>) -> Self {
        let max_message_bytes = 10 << 20;
        Self {
            tls: None,
            domain: domain.into(),
            max_message_bytes,
            max_recipients: 50,
            idle_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(600),
            max_transactions: DEFAULT_MAX_TRANSACTIONS,
            max_rcpt_commands: DEFAULT_MAX_RCPT_COMMANDS,
            data_budget: data_budget(DEFAULT_DATA_BUDGET_BYTES, max_message_bytes),
        }
    }
}

/// Where a session is in the SMTP dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Greeting sent; the client has not said EHLO or HELO yet.
    Connected,
    /// The client identified itself; a mail transaction may be open (see
    /// [`Session::in_transaction`]).
    Identified {
        /// The name the client gave in EHLO/HELO (untrusted; not logged).
        client_host: String,
        /// True after EHLO, false after HELO.
        extended: bool,
    },
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The client sent QUIT and got `221`.
    Quit,
    /// The client closed the connection.
    ClientClosed,
    /// No command (or no reading of our reply) within the idle timeout.
    IdleTimeout,
    /// The session's total time limit passed.
    SessionTimeout,
    /// The service is shutting down.
    Shutdown,
    /// Too many rejected commands.
    TooManyErrors,
    /// Too many mail transactions or RCPT commands in one session.
    TooManyCommands,
    /// Reading or writing failed (reset, broken pipe, …).
    Io(std::io::Error),
}

impl SessionEnd {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionEnd::Quit => "quit",
            SessionEnd::ClientClosed => "client_closed",
            SessionEnd::IdleTimeout => "idle_timeout",
            SessionEnd::SessionTimeout => "session_timeout",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::TooManyErrors => "too_many_errors",
            SessionEnd::TooManyCommands => "too_many_commands",
            SessionEnd::Io(_) => "io_error",
        }
    }
}

/// An open mail transaction: after MAIL FROM, collecting recipients.
struct MailTransaction<R> {
    mail_from: String,
    recipients: Vec<(EmailAddress, R)>,
}

/// How a DATA body ended.
enum DataEnd {
    /// The terminating `.` line arrived; here is the unstuffed body and its
    /// share of the DATA budget (released when dropped).
    Complete(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>),
    /// The body passed the size limit (and was read to its end).
    TooLarge,
    /// The relay-wide DATA budget was exhausted (the body was read to its
    /// end and dropped).
    OverBudget,
}

/// One SMTP conversation over `S`, storing mail through `B`.
pub struct Session<S, B: Backend> {
    stream: Conn<S>,
    config: Arc<SessionConfig>,
    backend: Arc<B>,
    remote_ip: Option<std::net::IpAddr>,
    shutdown: CancellationToken,
    state: State,
    transaction: Option<MailTransaction<B::Recipient>>,
    lines: LineBuffer,
    out: Vec<u8>,
    errors: u32,
    transactions: u32,
    rcpt_commands: u32,
    deadline: Instant,
    closing: bool,
}

/// What a handler tells the command loop.
enum Flow {
    Continue,
    Close(SessionEnd),
}

impl<S: AsyncRead + AsyncWrite + Unpin, B: Backend> Session<S, B> {
    /// A session on `stream` from `remote_ip` that stores mail through
    /// `backend` and stops at the next command boundary once `shutdown` is
    /// cancelled. Its total time limit starts now.
    pub fn new(
        stream: S,
        config: Arc<SessionConfig>,
        backend: Arc<B>,
        remote_ip: Option<std::net::IpAddr>,
        shutdown: CancellationToken,
    ) -> Self {
        let deadline = Instant::now() + config.session_timeout;
        Self {
            stream: Conn::Plain(stream),
            config,
            backend,
            remote_ip,
            shutdown,
            state: State::Connected,
            transaction: None,
            lines: LineBuffer::new(MAX_COMMAND_LINE_BYTES),
            out: Vec::with_capacity(512),
            errors: 0,
            transactions: 0,
            rcpt_commands: 0,
            deadline,
            closing: false,
        }
    }

    /// The current dialogue state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// True between a successful MAIL FROM and the end of DATA / RSET.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// Runs the whole session: greeting, commands until QUIT, a limit, an
    /// I/O error, the client leaving or shutdown. Every reply owed is
    /// written (best effort) before the stream is shut down and dropped.
    pub async fn run(mut self) -> SessionEnd {
        let greeting = format!("220 {} ESMTP e2a\r\n", self.config.domain);
        self.out.extend_from_slice(greeting.as_bytes());
        let end = self.command_loop().await;
        if !matches!(end, SessionEnd::Io(_) | SessionEnd::ClientClosed) {
            self.closing = true;
            if self.flush().await.is_ok() {
                let _ = self.stream.shutdown().await;
            }
        }
        end
    }

    async fn command_loop(&mut self) -> SessionEnd {
        loop {
            let input = match self.next_input().await {
                Ok(input) => input,
                Err(end) => return end,
            };
            if self.shutdown.is_cancelled() {
                self.reply(421, [4, 3, 0], "shutting down");
                return SessionEnd::Shutdown;
            }
            let flow = match input {
                Input::Line(line) => self.handle_line(&line).await,
                Input::TooLong => {
                    count_command("TOO_LONG");
                    self.reject(500, [5, 5, 2], "line too long")
                }
            };
            if let Flow::Close(end) = flow {
                return end;
            }
        }
    }

    /// The next buffered command, flushing owed replies and reading more
    /// bytes when none is complete.
    async fn next_input(&mut self) -> Result<Input, SessionEnd> {
        loop {
            if let Some(input) = self.lines.next_input() {
                return Ok(input);
            }
            self.flush().await?;
            self.fill().await?;
        }
    }

    /// Reads once, bounded by the idle timeout, the session deadline and
    /// shutdown. Owed replies for those endings are queued here.
    async fn fill(&mut self) -> Result<(), SessionEnd> {
        enum Woke {
            Read(std::io::Result<usize>),
            Shutdown,
            Timeout,
        }
        let idle_deadline = Instant::now() + self.config.idle_timeout;
        let limit = idle_deadline.min(self.deadline);
        let mut chunk = [0u8; READ_CHUNK];
        let woke = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Woke::Shutdown,
            r = self.stream.read(&mut chunk) => Woke::Read(r),
            () = tokio::time::sleep_until(limit) => Woke::Timeout,
        };
        match woke {
            Woke::Read(Ok(0)) => Err(SessionEnd::ClientClosed),
            Woke::Read(Ok(n)) => {
                self.lines.push(&chunk[..n]);
                Ok(())
            }
            Woke::Read(Err(e)) => Err(SessionEnd::Io(e)),
            Woke::Shutdown => {
                self.reply(421, [4, 3, 0], "shutting down");
                Err(SessionEnd::Shutdown)
            }
            Woke::Timeout if limit < self.deadline => {
                self.reply(421, [4, 4, 2], "idle timeout, closing connection");
                Err(SessionEnd::IdleTimeout)
            }
            Woke::Timeout => {
                self.reply(
                    421,
                    [4, 4, 2],
                    "session time limit exceeded, closing connection",
                );
                Err(SessionEnd::SessionTimeout)
            }
        }
    }

    /// Writes every owed reply. A client that does not take them within the
    /// idle timeout is dropped; so is one blocking us when shutdown starts
    /// (unless this is the final flush, which is bounded by the timeout only).
    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = (Instant::now() + self.config.idle_timeout).min(self.deadline);
        let interruptible = !self.closing;
        let result = tokio::select! {
            biased;
            r = async {
                self.stream.write_all(&self.out).await?;
                self.stream.flush().await
            } => r.map_err(SessionEnd::Io),
            () = tokio::time::sleep_until(limit) => Err(SessionEnd::IdleTimeout),
            () = self.shutdown.cancelled(), if interruptible => Err(SessionEnd::Shutdown),
        };
        self.out.clear();
        result
    }

    /// Parses one line and runs its verb's handler.
    async fn handle_line(&mut self, line: &[u8]) -> Flow {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => {
                let verb = if matches!(e, ParseError::UnknownCommand) {
                    "UNKNOWN"
                } else {
                    "INVALID"
                };
                count_command(verb);
                return self.parse_error(e);
            }
        };
        count_command(request.name());
        tracing::debug!(verb = request.name(), "command");
        match request {
            Request::Ehlo { host } => self.ehlo(host),
            Request::Helo { host } => self.helo(host),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(&to.address).await,
            Request::Data => self.data().await,
            Request::Rset => self.rset(),
            Request::Noop { .. } => self.noop(),
            Request::Quit => self.quit(),
            Request::Vrfy { .. } => self.vrfy(),
            Request::Help { .. } => self.help(),
            Request::StartTls => self.starttls().await,
            Request::Auth { .. }
            | Request::Bdat { .. }
            | Request::Burl { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Lhlo { .. } => self.not_implemented(),
        }
    }

    /// EHLO: identifies the client, resets any transaction, lists extensions.
    fn ehlo(&mut self, host: Cow<'_, str>) -> Flow {
        self.transaction = None;
        self.state = State::Identified {
            client_host: host.into_owned(),
            extended: true,
        };
        let mut reply = EhloResponse::new(self.config.domain.as_str());
        reply.capabilities = EHLO_CAPABILITIES;
        if self.config.tls.is_some() && !self.stream.is_tls() {
            reply.capabilities |= EXT_START_TLS;
        }
        reply.size = self.config.max_message_bytes;
        // Writing into a Vec cannot fail.
        let _ = reply.write(&mut self.out);
        Flow::Continue
    }

    /// HELO: identifies the client (no extensions), resets any transaction.
    fn helo(&mut self, host: Cow<'_, str>) -> Flow {
        self.transaction = None;
        self.state = State::Identified {
            client_host: host.into_owned(),
            extended: false,
        };
        let line = format!("250 {}\r\n", self.config.domain);
        self.out.extend_from_slice(line.as_bytes());
        Flow::Continue
    }

    /// MAIL: needs EHLO/HELO first and no open transaction; an announced
    /// size above the limit is a permanent 552. Opens the transaction.
    fn mail(&mut self, from: MailFrom<Cow<'_, str>>) -> Flow {
        if self.state == State::Connected {
            return self.reject(503, [5, 5, 1], "send EHLO or HELO first");
        }
        if self.transaction.is_some() {
            return self.reject(503, [5, 5, 1], "nested MAIL command");
        }
        if from.size > self.config.max_message_bytes {
            return self.reject(
                552,
                [5, 3, 4],
                "message size exceeds fixed maximum message size",
            );
        }
        self.transactions += 1;
        if self.transactions > self.config.max_transactions {
            return self.too_many("too many mail transactions in one session");
        }
        self.transaction = Some(MailTransaction {
            mail_from: from.address.trim().to_owned(),
            recipients: Vec::new(),
        });
        self.reply(250, [2, 1, 0], "OK");
        Flow::Continue
    }

    /// RCPT: needs MAIL; the address is normalised like agent addresses
    /// (flaw 33), checked against the recipient cap, then resolved by the
    /// backend. A repeated recipient is accepted once.
    async fn rcpt(&mut self, address: &str) -> Flow {
        if self.transaction.is_none() {
            return self.reject(503, [5, 5, 1], "need MAIL before RCPT");
        }
        self.rcpt_commands += 1;
        if self.rcpt_commands > self.config.max_rcpt_commands {
            return self.too_many("too many recipients in one session");
        }
        let address = match recipient_address(address) {
            Recipient::Address(address) => address,
            Recipient::NotAnAgent => return self.reject(550, [5, 1, 1], "recipient not found"),
            Recipient::Invalid => {
                return self.reject(501, [5, 1, 3], "invalid recipient address");
            }
        };
        let recipients = self
            .transaction
            .as_ref()
            .map_or(&[][..], |t| t.recipients.as_slice());
        if recipients.iter().any(|(a, _)| *a == address) {
            self.reply(250, [2, 1, 5], "OK");
            return Flow::Continue;
        }
        if recipients.len() >= self.config.max_recipients {
            self.reply(452, [4, 5, 3], "too many recipients");
            return Flow::Continue;
        }
        match self.backend.recipient(&address).await {
            RecipientCheck::Accept(recipient) => {
                if let Some(t) = self.transaction.as_mut() {
                    t.recipients.push((address, recipient));
                }
                self.reply(250, [2, 1, 5], "OK");
                Flow::Continue
            }
            RecipientCheck::Unknown => self.reject(550, [5, 1, 1], "recipient not found"),
            RecipientCheck::OverQuota => self.reject(552, [5, 2, 2], "mailbox quota exceeded"),
            RecipientCheck::TempFail => {
                self.reply(451, [4, 3, 0], "temporary failure, try again later");
                Flow::Continue
            }
        }
    }

    /// DATA: needs MAIL and at least one accepted RCPT. Answers 354, reads
    /// the body, hands it to the backend and answers with its outcome —
    /// `250` only once stored. The transaction ends either way.
    async fn data(&mut self) -> Flow {
        match &self.transaction {
            None => return self.reject(503, [5, 5, 1], "need MAIL before DATA"),
            Some(t) if t.recipients.is_empty() => {
                return self.reject(503, [5, 5, 1], "need RCPT before DATA");
            }
            Some(_) => {}
        }
        self.out
            .extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
        let body = match self.read_data().await {
            Ok(body) => body,
            Err(end) => return Flow::Close(end),
        };
        let Some(transaction) = self.transaction.take() else {
            return Flow::Continue;
        };
        let (message, budget) = match body {
            DataEnd::TooLarge => {
                return self.reject(
                    552,
                    [5, 3, 4],
                    "message size exceeds fixed maximum message size",
                );
            }
            DataEnd::OverBudget => {
                metrics::counter!("e2a_smtp_data_budget_exhausted_total").increment(1);
                self.reply(
                    452,
                    [4, 3, 1],
                    "insufficient system resources, try again later",
                );
                return Flow::Continue;
            }
            DataEnd::Complete(message, budget) => (message, budget),
        };
        let helo = match &self.state {
            State::Identified { client_host, .. } => client_host.clone(),
            State::Connected => String::new(),
        };
        let envelope = Envelope {
            remote_ip: self.remote_ip,
            helo,
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
        };
        let outcome = self.backend.deliver(&envelope, message).await;
        // The message's share of the DATA budget is free once the backend
        // is done with it (stored or not).
        drop(budget);
        match outcome {
            DeliveryOutcome::Accepted { id } => {
                self.reply(250, [2, 0, 0], &format!("OK queued as {id}"));
                Flow::Continue
            }
            DeliveryOutcome::TempFail => {
                self.reply(
                    451,
                    [4, 3, 0],
                    "temporary failure storing the message, try again later",
                );
                Flow::Continue
            }
            DeliveryOutcome::Deferred { code, esc, message } => {
                self.reply(code, esc, &message);
                Flow::Continue
            }
            DeliveryOutcome::Reject { code, esc, message } => self.reject(code, esc, &message),
        }
    }

    /// Reads a DATA body up to the `.` line: dot-unstuffed, lines kept as
    /// sent, in chunks of at most [`DATA_CHUNK`]. Past the size limit the
    /// rest is read and dropped. Timeouts and shutdown end the session (the
    /// message was not acknowledged, so the sender keeps it).
    ///
    /// **Only `<CR><LF>.<CR><LF>` ends the body** (SMTP smuggling defence,
    /// as Postfix's `smtpd_forbid_bare_newline = normal`): a line counts as
    /// starting a new line — for the terminator and for dot-unstuffing —
    /// only when the line before it ended in CRLF. A bare LF or a bare CR
    /// therefore never ends the body: `\n.\n`, `\n.\r\n`, `\r.\r\n`,
    /// `\r\n.\r`, `\r\n.\n` and `\r.\n` stay inside the message as sent.
    async fn read_data(&mut self) -> Result<DataEnd, SessionEnd> {
        let mut body = Vec::new();
        let mut too_large = false;
        let mut over_budget = false;
        let mut reserved: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut reserved_bytes = 0usize;
        // True when the previous piece was a complete line ending in CRLF
        // (or nothing was read yet): only then does a new line start.
        let mut after_crlf = true;
        loop {
            let piece = loop {
                if let Some(piece) = self.lines.next_data(DATA_CHUNK) {
                    break piece;
                }
                self.flush().await?;
                self.fill().await?;
            };
            let (bytes, complete_line) = match piece {
                DataInput::Line(line) => (line, true),
                DataInput::Partial(part) => (part, false),
            };
            let mut bytes = bytes.as_slice();
            let line_start = after_crlf;
            if line_start && bytes == b".\r\n" {
                return Ok(if too_large {
                    DataEnd::TooLarge
                } else if over_budget {
                    DataEnd::OverBudget
                } else {
                    DataEnd::Complete(body, reserved)
                });
            }
            after_crlf = complete_line && bytes.ends_with(b"\r\n");
            if line_start && bytes.first() == Some(&b'.') {
                bytes = &bytes[1..];
            }
            if too_large || over_budget {
                continue;
            }
            let needed = body.len() + bytes.len();
            if needed > self.config.max_message_bytes {
                too_large = true;
                body = Vec::new();
                reserved = None;
                continue;
            }
            if needed > reserved_bytes {
                let block = (needed - reserved_bytes)
                    .max(BUDGET_BLOCK)
                    .min(self.config.max_message_bytes - reserved_bytes);
                let permit = u32::try_from(block).ok().and_then(|n| {
                    self.config
                        .data_budget
                        .clone()
                        .try_acquire_many_owned(n)
                        .ok()
                });
                match (permit, reserved.as_mut()) {
                    (Some(permit), Some(held)) => held.merge(permit),
                    (Some(permit), None) => reserved = Some(permit),
                    (None, _) => {
                        over_budget = true;
                        body = Vec::new();
                        reserved = None;
                        continue;
                    }
                }
                reserved_bytes += block;
                body.reserve_exact(reserved_bytes - body.len());
            }
            body.extend_from_slice(bytes);
        }
    }

    /// STARTTLS (RFC 3207): offered only when configured and not yet in
    /// TLS. Answers `220`, discards anything the client pipelined after the
    /// command (it was sent in plaintext: command injection), performs the
    /// handshake within the idle timeout, and returns to the greeted state —
    /// the client must say EHLO again and any transaction is gone. A failed
    /// handshake ends the session.
    async fn starttls(&mut self) -> Flow {
        let Some(acceptor) = self.config.tls.clone() else {
            return self.not_implemented();
        };
        if self.stream.is_tls() {
            return self.reject(503, [5, 5, 1], "TLS already active");
        }
        if self.state == State::Connected {
            return self.reject(503, [5, 5, 1], "send EHLO first");
        }
        self.reply(220, [2, 0, 0], "ready to start TLS");
        if let Err(end) = self.flush().await {
            return Flow::Close(end);
        }
        self.lines = LineBuffer::new(MAX_COMMAND_LINE_BYTES);
        let Conn::Plain(plain) = std::mem::replace(&mut self.stream, Conn::Taken) else {
            return Flow::Close(SessionEnd::Io(std::io::Error::other(
                "STARTTLS on a non-plain stream",
            )));
        };
        match tokio::time::timeout(self.config.idle_timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.stream = Conn::Tls(Box::new(tls));
                self.state = State::Connected;
                self.transaction = None;
                Flow::Continue
            }
            Ok(Err(e)) => Flow::Close(SessionEnd::Io(e)),
            Err(_) => Flow::Close(SessionEnd::IdleTimeout),
        }
    }

    /// RSET: clears the transaction; the client stays identified.
    fn rset(&mut self) -> Flow {
        self.transaction = None;
        self.reply(250, [2, 0, 0], "OK");
        Flow::Continue
    }

    fn noop(&mut self) -> Flow {
        self.reply(250, [2, 0, 0], "OK");
        Flow::Continue
    }

    fn quit(&mut self) -> Flow {
        self.reply(221, [2, 0, 0], "Bye");
        Flow::Close(SessionEnd::Quit)
    }

    /// VRFY: never confirms or denies an address (no harvesting).
    fn vrfy(&mut self) -> Flow {
        self.reply(
            252,
            [2, 5, 0],
            "cannot VRFY user; recipients are checked at RCPT",
        );
        Flow::Continue
    }

    fn help(&mut self) -> Flow {
        self.reply(
            214,
            [2, 0, 0],
            "e2a SMTP; commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
        );
        Flow::Continue
    }

    /// Recognised verbs we do not offer (AUTH, BDAT, EXPN, …; STARTTLS
    /// without a configured certificate).
    fn not_implemented(&mut self) -> Flow {
        self.reject(502, [5, 5, 1], "command not implemented")
    }

    /// Maps a parse failure to its reply. Nothing from the line is echoed.
    fn parse_error(&mut self, error: ParseError) -> Flow {
        match error {
            ParseError::UnknownCommand | ParseError::InvalidResponse { .. } => {
                self.reject(500, [5, 5, 1], "command unrecognized")
            }
            ParseError::SyntaxError { syntax } => {
                let message = format!("syntax: {syntax}");
                self.reject(501, [5, 5, 2], &message)
            }
            ParseError::InvalidSenderAddress => {
                self.reject(501, [5, 1, 7], "invalid sender address")
            }
            ParseError::InvalidRecipientAddress => {
                self.reject(501, [5, 1, 3], "invalid recipient address")
            }
            ParseError::InvalidParameter { .. } => self.reject(501, [5, 5, 4], "invalid parameter"),
            ParseError::UnsupportedParameter { .. } => {
                self.reject(555, [5, 5, 4], "unsupported parameter")
            }
            ParseError::ResponseTooLong => self.reject(500, [5, 5, 2], "line too long"),
            // A complete line always ends in LF, so the parser only asks for
            // more when the command itself is malformed.
            ParseError::NeedsMoreData { .. } => self.reject(501, [5, 5, 2], "syntax error"),
        }
    }

    /// Past a per-session command cap: `421 4.7.0` and close.
    fn too_many(&mut self, message: &str) -> Flow {
        tracing::info!(
            transactions = self.transactions,
            rcpt_commands = self.rcpt_commands,
            "session command cap reached; closing"
        );
        self.reply(421, [4, 7, 0], &format!("{message}, closing connection"));
        Flow::Close(SessionEnd::TooManyCommands)
    }

    /// Queues a 5xx reply and counts it; past [`MAX_ERRORS`] closes.
    fn reject(&mut self, code: u16, esc: [u8; 3], message: &str) -> Flow {
        tracing::debug!(code, "command rejected");
        self.reply(code, esc, message);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.reply(421, [4, 7, 0], "too many errors, closing connection");
            return Flow::Close(SessionEnd::TooManyErrors);
        }
        Flow::Continue
    }

    /// Queues a single-line reply with an enhanced status code.
    fn reply(&mut self, code: u16, esc: [u8; 3], message: &str) {
        // Writing into a Vec cannot fail.
        let _ = Response { code, esc, message }.write(&mut self.out);
    }
}

fn count_command(verb: &'static str) {
    metrics::counter!("e2a_smtp_commands_total", "verb" => verb).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

    /// Knows `*@known.test` (except `down@…`, which is a backend outage)
    /// and records what it stores; answers DATA with `outcome`.
    #[derive(Default)]
    struct MemoryBackend {
        stored: Mutex<Vec<(Envelope<String>, Vec<u8>)>>,
        outcome: Mutex<Option<DeliveryOutcome>>,
    }

    impl Backend for MemoryBackend {
        type Recipient = String;

        async fn recipient(&self, address: &EmailAddress) -> RecipientCheck<String> {
            match (address.local_part(), address.domain()) {
                ("down", _) => RecipientCheck::TempFail,
                (_, "known.test") => RecipientCheck::Accept(address.to_string()),
                _ => RecipientCheck::Unknown,
            }
        }

        async fn deliver(&self, envelope: &Envelope<String>, message: Vec<u8>) -> DeliveryOutcome {
            if let Some(outcome) = self.outcome.lock().unwrap().clone() {
                return outcome;
            }
            self.stored
                .lock()
                .unwrap()
                .push((envelope.clone(), message));
            DeliveryOutcome::Accepted { id: "msg_1".into() }
        }
    }

    struct Client {
        reader: BufReader<ReadHalf<DuplexStream>>,
        writer: WriteHalf<DuplexStream>,
        session: tokio::task::JoinHandle<SessionEnd>,
        shutdown: CancellationToken,
        backend: Arc<MemoryBackend>,
    }

    impl Client {
        fn start(config: SessionConfig) -> Client {
            let (server, client) = tokio::io::duplex(64 * 1024);
            let shutdown = CancellationToken::new();
            let backend = Arc::new(MemoryBackend::default());
            let ip = Some(std::net::IpAddr::from([192, 0, 2, 1]));
            let session = Session::new(
                server,
                Arc::new(config),
                backend.clone(),
                ip,
                shutdown.clone(),
            );
            let session = tokio::spawn(session.run());
            let (read, writer) = tokio::io::split(client);
            Client {
                reader: BufReader::new(read),
                writer,
                session,
                shutdown,
                backend,
            }
        }

        async fn greeted() -> Client {
            let mut c = Client::start(SessionConfig::new("mx.test"));
            assert_eq!(c.line().await, "220 mx.test ESMTP e2a");
            c
        }

        async fn send(&mut self, bytes: impl AsRef<[u8]>) {
            self.writer.write_all(bytes.as_ref()).await.unwrap();
        }

        /// One reply line without CRLF; "" at end of stream.
        async fn line(&mut self) -> String {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut line))
                    .await;
            read.expect("reply within 5 s").unwrap();
            line.trim_end_matches(['\r', '\n']).to_owned()
        }

        /// A whole (possibly multi-line) reply.
        async fn reply(&mut self) -> Vec<String> {
            let mut lines = vec![self.line().await];
            while lines
                .last()
                .is_some_and(|l| l.len() >= 4 && l.as_bytes()[3] == b'-')
            {
                lines.push(self.line().await);
            }
            lines
        }

        async fn command(&mut self, cmd: &str) -> String {
            self.send(format!("{cmd}\r\n")).await;
            let reply = self.reply().await;
            assert_eq!(reply.len(), 1, "{cmd}: {reply:?}");
            reply.into_iter().next().unwrap()
        }

        async fn ehlo(&mut self) -> Vec<String> {
            self.send("EHLO client.example\r\n").await;
            let reply = self.reply().await;
            assert!(reply.last().unwrap().starts_with("250 "), "{reply:?}");
            reply
        }

        async fn end(self) -> SessionEnd {
            tokio::time::timeout(Duration::from_secs(5), self.session)
                .await
                .expect("session ends")
                .unwrap()
        }
    }

    #[tokio::test]
    async fn greeting_names_the_domain() {
        let mut c = Client::greeted().await;
        assert_eq!(c.command("QUIT").await, "221 2.0.0 Bye");
        assert!(matches!(c.end().await, SessionEnd::Quit));
    }

    #[tokio::test]
    async fn ehlo_lists_the_extensions() {
        let mut c = Client::greeted().await;
        c.send("EHLO client.example\r\n").await;
        let reply = c.reply().await;
        assert!(reply[0].starts_with("250-mx.test"), "{reply:?}");
        let caps: Vec<&str> = reply[1..].iter().map(|l| &l[4..]).collect();
        for want in [
            "PIPELINING",
            "SIZE 10485760",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ] {
            assert!(caps.contains(&want), "{want} missing from {reply:?}");
        }
        assert!(
            !caps
                .iter()
                .any(|c| c.starts_with("STARTTLS") || c.starts_with("AUTH")),
            "{reply:?}"
        );
        assert!(reply.last().unwrap().starts_with("250 "), "{reply:?}");
        assert!(
            reply[..reply.len() - 1]
                .iter()
                .all(|l| l.starts_with("250-")),
            "{reply:?}"
        );
        assert_eq!(c.command("HELO again.example").await, "250 mx.test");
    }

    #[tokio::test]
    async fn noop_rset_quit_codes() {
        let mut c = Client::greeted().await;
        assert_eq!(c.command("NOOP").await, "250 2.0.0 OK");
        assert_eq!(c.command("noop with args").await, "250 2.0.0 OK");
        assert_eq!(c.command("RSET").await, "250 2.0.0 OK");
        assert!(c.command("VRFY someone").await.starts_with("252 2.5.0 "));
        assert!(c.command("HELP").await.starts_with("214 "));
        assert_eq!(c.command("QUIT").await, "221 2.0.0 Bye");
        assert_eq!(c.line().await, "", "connection closed after QUIT");
        assert!(matches!(c.end().await, SessionEnd::Quit));
    }

    #[tokio::test]
    async fn commands_out_of_order_get_503() {
        let mut c = Client::greeted().await;
        assert!(
            c.command("MAIL FROM:<a@example.com>")
                .await
                .starts_with("503 5.5.1 ")
        );
        assert!(
            c.command("RCPT TO:<b@example.com>")
                .await
                .starts_with("503 5.5.1 ")
        );
        assert!(c.command("DATA").await.starts_with("503 5.5.1 "));
        c.ehlo().await;
        assert!(
            c.command("RCPT TO:<b@example.com>")
                .await
                .starts_with("503 5.5.1 ")
        );
        assert!(c.command("DATA").await.starts_with("503 5.5.1 "));
    }

    #[tokio::test]
    async fn a_transaction_stores_the_unstuffed_body_and_answers_250_after() {
        let mut c = Client::greeted().await;
        c.ehlo().await;
        assert_eq!(
            c.command("MAIL FROM:<sender@remote.test> BODY=8BITMIME")
                .await,
            "250 2.1.0 OK"
        );
        assert_eq!(c.command("RCPT TO:<Bot@Known.Test>").await, "250 2.1.5 OK");
        assert_eq!(
            c.command("RCPT TO:<bot@known.test>").await,
            "250 2.1.5 OK",
            "duplicate accepted once"
        );
        assert_eq!(
            c.command("RCPT TO:<other@known.test>").await,
            "250 2.1.5 OK"
        );
        assert_eq!(
            c.command("DATA").await,
            "354 End data with <CR><LF>.<CR><LF>"
        );
        c.send("Subject: hi\r\n\r\n..leading dot\r\nline\r\n.\r\n")
            .await;
        assert_eq!(c.line().await, "250 2.0.0 OK queued as msg_1");
        let stored = c.backend.stored.lock().unwrap().clone();
        assert_eq!(stored.len(), 1);
        let (envelope, body) = &stored[0];
        assert_eq!(body, b"Subject: hi\r\n\r\n.leading dot\r\nline\r\n");
        assert_eq!(envelope.mail_from, "sender@remote.test");
        assert_eq!(envelope.helo, "client.example");
        assert_eq!(
            envelope.remote_ip,
            Some(std::net::IpAddr::from([192, 0, 2, 1]))
        );
        let rcpts: Vec<&str> = envelope
            .recipients
            .iter()
            .map(|(a, _)| a.as_str())
            .collect();
        assert_eq!(rcpts, ["bot@known.test", "other@known.test"]);
        // The transaction is over: a new one can start.
        assert!(c.command("DATA").await.starts_with("503 5.5.1 "));
        assert_eq!(c.command("MAIL FROM:<>").await, "250 2.1.0 OK");
    }

    #[tokio::test]
    async fn recipient_replies() {
        let mut c = Client::start(SessionConfig {
            max_recipients: 2,
            ..SessionConfig::new("mx.test")
        });
        c.line().await;
        c.ehlo().await;
        c.command("MAIL FROM:<s@remote.test>").await;
        assert_eq!(
            c.command("RCPT TO:<nobody@elsewhere.test>").await,
            "550 5.1.1 recipient not found"
        );
        assert_eq!(
            c.command("RCPT TO:<down@known.test>").await,
            "451 4.3.0 temporary failure, try again later"
        );
        assert!(
            c.command("RCPT TO:<not an address>")
                .await
                .starts_with("501 ")
        );
        assert!(
            c.command("DATA").await.starts_with("503 5.5.1 "),
            "no recipient yet"
        );
        assert_eq!(c.command("RCPT TO:<a@known.test>").await, "250 2.1.5 OK");
        assert_eq!(c.command("RCPT TO:<b@known.test>").await, "250 2.1.5 OK");
        assert_eq!(
            c.command("RCPT TO:<c@known.test>").await,
            "452 4.5.3 too many recipients"
        );
        assert!(
            c.command("MAIL FROM:<s@remote.test>")
                .await
                .starts_with("503 5.5.1 "),
            "nested MAIL"
        );
        assert_eq!(c.command("RSET").await, "250 2.0.0 OK");
        assert!(
            c.command("RCPT TO:<a@known.test>")
                .await
                .starts_with("503 5.5.1 "),
            "RSET ended it"
        );
        assert!(
            c.command("MAIL FROM:<a@example.com> SIZE=99999999999")
                .await
                .starts_with("552 5.3.4 ")
        );
    }

    #[tokio::test]
    async fn a_storage_failure_is_451_and_a_policy_refusal_is_passed_through() {
        let mut c = Client::greeted().await;
        c.ehlo().await;
        *c.backend.outcome.lock().unwrap() = Some(DeliveryOutcome::TempFail);
        c.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nDATA\r\n")
            .await;
        assert_eq!(c.line().await, "250 2.1.0 OK");
        assert_eq!(c.line().await, "250 2.1.5 OK");
        assert_eq!(c.line().await, "354 End data with <CR><LF>.<CR><LF>");
        c.send("x\r\n.\r\n").await;
        assert_eq!(
            c.line().await,
            "451 4.3.0 temporary failure storing the message, try again later"
        );
        *c.backend.outcome.lock().unwrap() = Some(DeliveryOutcome::Reject {
            code: 550,
            esc: [5, 7, 1],
            message: "DMARC policy violation".into(),
        });
        c.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nDATA\r\nx\r\n.\r\n")
            .await;
        for expected in [
            "250 2.1.0 OK",
            "250 2.1.5 OK",
            "354 End data with <CR><LF>.<CR><LF>",
            "550 5.7.1 DMARC policy violation",
        ] {
            assert_eq!(c.line().await, expected);
        }
        assert!(c.backend.stored.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_oversized_body_is_read_to_its_end_and_refused() {
        let mut c = Client::start(SessionConfig {
            max_message_bytes: 1000,
            ..SessionConfig::new("mx.test")
        });
        c.line().await;
        c.ehlo().await;
        c.command("MAIL FROM:<s@remote.test>").await;
        c.command("RCPT TO:<a@known.test>").await;
        c.command("DATA").await;
        // Just over the limit, with a 5000-byte line without newline in the middle.
        c.send(vec![b'y'; 5000]).await;
        c.send("\r\n.\r\n").await;
        assert!(c.line().await.starts_with("552 5.3.4 "));
        assert!(c.backend.stored.lock().unwrap().is_empty());
        // Exactly at the limit is fine.
        c.command("MAIL FROM:<s@remote.test>").await;
        c.command("RCPT TO:<a@known.test>").await;
        c.command("DATA").await;
        let mut body = vec![b'z'; 998];
        body.extend_from_slice(b"\r\n.\r\n");
        c.send(body).await;
        assert!(c.line().await.starts_with("250 2.0.0 "));
        assert_eq!(c.backend.stored.lock().unwrap()[0].1.len(), 1000);
        assert_eq!(c.command("QUIT").await, "221 2.0.0 Bye");
    }

    #[tokio::test]
    async fn a_whole_pipelined_transaction_in_one_packet() {
        let mut c = Client::greeted().await;
        c.send(
            "EHLO c.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nRCPT TO:<x@nowhere.test>\r\nDATA\r\n",
        )
        .await;
        let ehlo = c.reply().await;
        assert!(ehlo.last().unwrap().starts_with("250 "));
        for expected in [
            "250 2.1.0 OK",
            "250 2.1.5 OK",
            "550 5.1.1 recipient not found",
            "354 End data with <CR><LF>.<CR><LF>",
        ] {
            assert_eq!(c.line().await, expected);
        }
        c.send("Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n").await;
        assert_eq!(c.line().await, "250 2.0.0 OK queued as msg_1");
        assert_eq!(c.line().await, "221 2.0.0 Bye");
    }

    #[tokio::test]
    async fn unknown_commands_get_500_and_unoffered_ones_502() {
        let mut c = Client::greeted().await;
        assert!(c.command("FROBNICATE now").await.starts_with("500 5.5.1 "));
        assert!(c.command("").await.starts_with("500 5.5.1 "));
        assert!(c.command("STARTTLS").await.starts_with("502 5.5.1 "));
        assert!(
            c.command("AUTH PLAIN AGFAAGI=")
                .await
                .starts_with("502 5.5.1 ")
        );
        assert_eq!(c.command("NOOP").await, "250 2.0.0 OK");
    }

    #[tokio::test]
    async fn bad_arguments_get_501() {
        let mut c = Client::greeted().await;
        assert!(c.command("EHLO").await.starts_with("501 5.5.2 "));
        assert!(c.command("HELO").await.starts_with("501 5.5.2 "));
        c.ehlo().await;
        assert!(
            c.command("MAIL FROM:a@example.com")
                .await
                .starts_with("501 5.5.2 ")
        );
        assert!(
            c.command("MAIL TO:<a@example.com>")
                .await
                .starts_with("501 5.5.2 ")
        );
        assert!(
            c.command("MAIL FROM:<a@example.com> SIZE=abc")
                .await
                .starts_with("501 5.5.4 ")
        );
        assert!(
            c.command("MAIL FROM:<a@example.com> FOO=BAR")
                .await
                .starts_with("555 5.5.4 ")
        );
    }

    #[tokio::test]
    async fn an_over_long_line_gets_500_and_the_session_continues() {
        let mut c = Client::greeted().await;
        let long = format!("NOOP {}\r\n", "x".repeat(3 * MAX_COMMAND_LINE_BYTES));
        c.send(long).await;
        assert_eq!(c.line().await, "500 5.5.2 line too long");
        assert_eq!(c.command("NOOP").await, "250 2.0.0 OK");
        // A line exactly at the limit is fine.
        let max = format!("NOOP {}\r\n", "y".repeat(MAX_COMMAND_LINE_BYTES - 7));
        assert_eq!(max.len(), MAX_COMMAND_LINE_BYTES);
        c.send(max).await;
        assert_eq!(c.line().await, "250 2.0.0 OK");
    }

    #[tokio::test]
    async fn pipelined_commands_are_answered_in_order() {
        let mut c = Client::greeted().await;
        c.send("EHLO client.example\r\nNOOP\r\nMAIL FROM:<a@example.com>\r\nRSET\r\nQUIT\r\n")
            .await;
        let ehlo = c.reply().await;
        assert!(ehlo[0].starts_with("250-mx.test"), "{ehlo:?}");
        assert!(ehlo.last().unwrap().starts_with("250 "), "{ehlo:?}");
        assert_eq!(c.line().await, "250 2.0.0 OK");
        assert_eq!(c.line().await, "250 2.1.0 OK");
        assert_eq!(c.line().await, "250 2.0.0 OK");
        assert_eq!(c.line().await, "221 2.0.0 Bye");
        assert_eq!(c.line().await, "");
        assert!(matches!(c.end().await, SessionEnd::Quit));
    }

    #[tokio::test]
    async fn nul_bytes_and_8bit_garbage_are_rejected_without_panic() {
        let mut c = Client::greeted().await;
        c.send(b"\0\0\0\r\n").await;
        assert!(c.line().await.starts_with("500 5.5.1 "));
        c.send(b"\xff\xfe\x80 \xc3\x28\r\n").await;
        assert!(c.line().await.starts_with("500 5.5.1 "));
        c.send(b"EHLO \xff\xfe\0\r\n").await;
        assert!(c.reply().await[0].starts_with("250-"));
        c.send(b"MAIL FROM:<\xff@\0>\r\n").await;
        assert!(c.line().await.starts_with("5"), "garbage address rejected");
        assert_eq!(c.command("NOOP").await, "250 2.0.0 OK");
        // Nothing but garbage: after MAX_ERRORS rejections the session closes.
        let garbage: Vec<u8> = (0..MAX_ERRORS * 2)
            .flat_map(|i| [0x80 + i as u8, b'\0', b'\r', b'\n'])
            .collect();
        c.send(&garbage).await;
        let mut last = String::new();
        loop {
            let line = c.line().await;
            if line.is_empty() {
                break;
            }
            last = line;
        }
        assert!(last.starts_with("421 4.7.0 "), "{last}");
        assert!(matches!(c.end().await, SessionEnd::TooManyErrors));
    }

    #[tokio::test]
    async fn a_client_vanishing_mid_session_ends_it_quietly() {
        let mut c = Client::greeted().await;
        c.send("EHLO client.example\r\nNOOP\r\nMAIL FROM:<a@exa")
            .await;
        let Client {
            reader,
            writer,
            session,
            ..
        } = c;
        drop(writer);
        drop(reader);
        let end = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(end, SessionEnd::ClientClosed | SessionEnd::Io(_)),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_client_gets_421_and_is_disconnected() {
        let mut config = SessionConfig::new("mx.test");
        config.idle_timeout = Duration::from_millis(150);
        let mut c = Client::start(config);
        assert_eq!(c.line().await, "220 mx.test ESMTP e2a");
        assert_eq!(c.command("NOOP").await, "250 2.0.0 OK");
        assert!(c.line().await.starts_with("421 4.4.2 "));
        assert_eq!(c.line().await, "");
        assert!(matches!(c.end().await, SessionEnd::IdleTimeout));
    }

    #[tokio::test]
    async fn the_total_session_time_is_capped() {
        let mut config = SessionConfig::new("mx.test");
        config.idle_timeout = Duration::from_millis(200);
        config.session_timeout = Duration::from_millis(500);
        let mut c = Client::start(config);
        assert_eq!(c.line().await, "220 mx.test ESMTP e2a");
        let started = std::time::Instant::now();
        // A chatty client never goes idle, yet the session still ends.
        let last = loop {
            let _ = c.writer.write_all(b"NOOP\r\n").await;
            let reply = c.line().await;
            if reply != "250 2.0.0 OK" {
                break reply;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "session never timed out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(last.starts_with("421 4.4.2 session time limit"), "{last}");
        assert!(started.elapsed() >= Duration::from_millis(450));
        assert!(matches!(c.end().await, SessionEnd::SessionTimeout));
    }

    #[tokio::test]
    async fn shutdown_answers_421_after_the_current_command() {
        let mut c = Client::greeted().await;
        c.send("EHLO client.example\r\n").await;
        assert!(c.reply().await.last().unwrap().starts_with("250 "));
        c.shutdown.cancel();
        assert_eq!(c.line().await, "421 4.3.0 shutting down");
        assert_eq!(c.line().await, "");
        assert!(matches!(c.end().await, SessionEnd::Shutdown));
    }

    /// Every published smuggling ending: the would-be second message stays
    /// in the first one's body, byte for byte, and nothing else is stored.
    #[tokio::test]
    async fn only_crlf_dot_crlf_ends_data() {
        for ending in ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\r\n.\n", "\r.\n"] {
            let mut c = Client::greeted().await;
            c.ehlo().await;
            c.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nDATA\r\n")
                .await;
            assert_eq!(c.line().await, "250 2.1.0 OK");
            assert_eq!(c.line().await, "250 2.1.5 OK");
            assert_eq!(c.line().await, "354 End data with <CR><LF>.<CR><LF>");
            let smuggled = format!(
                "Subject: first\r\n\r\nbody{ending}MAIL FROM:<ceo@victim.test>\r\n\
                 RCPT TO:<a@known.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
            );
            c.send(format!("{smuggled}.\r\n")).await;
            assert_eq!(c.line().await, "250 2.0.0 OK queued as msg_1", "{ending:?}");
            assert_eq!(c.command("QUIT").await, "221 2.0.0 Bye", "{ending:?}");
            let stored = c.backend.stored.lock().unwrap().clone();
            assert_eq!(stored.len(), 1, "{ending:?}: one message only");
            // Only a dot right after CRLF is unstuffed.
            let expected = smuggled
                .replace("\r\n.\r", "\r\n\r")
                .replace("\r\n.\n", "\r\n\n");
            assert_eq!(
                String::from_utf8_lossy(&stored[0].1),
                expected,
                "{ending:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_lone_dot_after_a_bare_newline_is_content() {
        let mut c = Client::greeted().await;
        c.ehlo().await;
        c.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nDATA\r\n")
            .await;
        for _ in 0..3 {
            c.line().await;
        }
        c.send("a\n.\r\n..b\r\n.\r\n").await;
        assert_eq!(c.line().await, "250 2.0.0 OK queued as msg_1");
        let stored = c.backend.stored.lock().unwrap().clone();
        assert_eq!(stored[0].1, b"a\n.\r\n.b\r\n");
    }

    #[tokio::test]
    async fn mail_transactions_per_session_are_capped() {
        let mut c = Client::start(SessionConfig {
            max_transactions: 3,
            ..SessionConfig::new("mx.test")
        });
        c.line().await;
        c.ehlo().await;
        for _ in 0..3 {
            assert_eq!(c.command("MAIL FROM:<s@remote.test>").await, "250 2.1.0 OK");
            assert_eq!(c.command("RSET").await, "250 2.0.0 OK");
        }
        assert!(
            c.command("MAIL FROM:<s@remote.test>")
                .await
                .starts_with("421 4.7.0 ")
        );
        assert_eq!(c.line().await, "", "closed");
        assert!(matches!(c.end().await, SessionEnd::TooManyCommands));
    }

    #[tokio::test]
    async fn rcpt_commands_per_session_are_capped_whatever_their_answer() {
        let mut c = Client::start(SessionConfig {
            max_rcpt_commands: 6,
            max_recipients: 1,
            ..SessionConfig::new("mx.test")
        });
        c.line().await;
        c.ehlo().await;
        c.command("MAIL FROM:<s@remote.test>").await;
        // Accepted, duplicate, over the recipient cap, deferred: none of
        // them is an error, all of them count.
        assert_eq!(c.command("RCPT TO:<a@known.test>").await, "250 2.1.5 OK");
        assert_eq!(c.command("RCPT TO:<a@known.test>").await, "250 2.1.5 OK");
        assert!(
            c.command("RCPT TO:<b@known.test>")
                .await
                .starts_with("452 ")
        );
        c.command("RSET").await;
        c.command("MAIL FROM:<s@remote.test>").await;
        assert!(
            c.command("RCPT TO:<down@known.test>")
                .await
                .starts_with("451 ")
        );
        assert!(
            c.command("RCPT TO:<down@known.test>")
                .await
                .starts_with("451 ")
        );
        assert!(
            c.command("RCPT TO:<down@known.test>")
                .await
                .starts_with("451 ")
        );
        assert!(
            c.command("RCPT TO:<a@known.test>")
                .await
                .starts_with("421 4.7.0 ")
        );
        assert!(matches!(c.end().await, SessionEnd::TooManyCommands));
    }

    #[tokio::test]
    async fn an_exhausted_data_budget_is_452_and_the_session_goes_on() {
        let config = SessionConfig {
            max_message_bytes: 4096,
            data_budget: data_budget(0, 4096),
            ..SessionConfig::new("mx.test")
        };
        let budget = config.data_budget.clone();
        let mut c = Client::start(config);
        c.line().await;
        c.ehlo().await;
        // Another session holds all but 100 bytes of the budget.
        let held = budget.clone().try_acquire_many_owned(4096 - 100).unwrap();
        let transaction = "MAIL FROM:<s@remote.test>\r\nRCPT TO:<a@known.test>\r\nDATA\r\n";
        c.send(transaction).await;
        for _ in 0..3 {
            c.line().await;
        }
        c.send(format!("{}\r\n.\r\n", "x".repeat(1000))).await;
        assert_eq!(
            c.line().await,
            "452 4.3.1 insufficient system resources, try again later"
        );
        assert!(c.backend.stored.lock().unwrap().is_empty());
        // Once the budget is free again the same connection delivers.
        drop(held);
        c.send(transaction).await;
        for _ in 0..3 {
            c.line().await;
        }
        c.send(format!("{}\r\n.\r\n", "x".repeat(1000))).await;
        assert_eq!(c.line().await, "250 2.0.0 OK queued as msg_1");
        assert_eq!(
            budget.available_permits(),
            4096,
            "the reservation is returned after delivery"
        );
    }

    #[tokio::test]
    async fn internationalised_recipients() {
        let mut c = Client::greeted().await;
        let ehlo = c.ehlo().await;
        assert!(ehlo.iter().any(|l| l.contains("SMTPUTF8")), "{ehlo:?}");
        c.command("MAIL FROM:<jörg@bücher.example> SMTPUTF8").await;
        // A U-label domain reaches its A-label form.
        assert_eq!(
            recipient_address("Bot@Known.Test"),
            Recipient::Address(EmailAddress::parse("bot@known.test").unwrap())
        );
        assert_eq!(
            recipient_address("demo@Bücher.example"),
            Recipient::Address(EmailAddress::parse("demo@xn--bcher-kva.example").unwrap())
        );
        assert_eq!(recipient_address("jörg@known.test"), Recipient::NotAnAgent);
        assert_eq!(recipient_address("jö rg@known.test"), Recipient::Invalid);
        assert_eq!(recipient_address("ö"), Recipient::Invalid);
        assert_eq!(
            c.command("RCPT TO:<jörg@known.test>").await,
            "550 5.1.1 recipient not found"
        );
        assert_eq!(c.command("RCPT TO:<bot@known.test>").await, "250 2.1.5 OK");
    }
}
