//! One SMTP session, generic over its byte stream (a TCP socket in
//! production, an in-memory duplex in tests).
//!
//! [`Session::run`] sends the greeting, then reads command lines through a
//! bounded [`LineBuffer`], parses each with `smtp-proto`'s
//! [`Request::parse`] and dispatches it to one handler per verb, which
//! appends its reply to an output buffer. Replies are flushed whenever no
//! further complete command is buffered, so pipelined commands arriving in
//! one packet are all answered, in order, in one write.
//!
//! **Mail acceptance is not enabled in this build.** After EHLO/HELO, `MAIL
//! FROM` is answered `451 4.3.2 mail acceptance is not enabled in this build;
//! try again later` — a temporary failure, so a sending MTA keeps the message
//! and retries later — and `RCPT`/`DATA` without a successful `MAIL` get
//! `503 5.5.1`. Nothing here stores or acknowledges a message.
//!
//! Limits: command lines longer than [`MAX_COMMAND_LINE_BYTES`] get `500
//! 5.5.2 line too long` (and are discarded without buffering them); no
//! command within the idle timeout, or a session past its total time limit,
//! gets `421 4.4.2` and the connection closes; after [`MAX_ERRORS`] rejected
//! commands the session gets `421 4.7.0` and closes. On shutdown the session
//! finishes the command in hand, answers `421 4.3.0 shutting down` and
//! closes. A client that disconnects, or sends NUL bytes or 8-bit garbage,
//! ends the session quietly: every outcome is a [`SessionEnd`], never a
//! panic.
//!
//! Nothing from the conversation is logged except verbs and reply codes.

use std::{borrow::Cow, sync::Arc, time::Duration};

use smtp_proto::{
    EXT_8BIT_MIME, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
    EhloResponse, Error as ParseError, MailFrom, Request, Response,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::lines::{Input, LineBuffer};

/// Longest accepted command line, CRLF included. RFC 5321 §4.5.3.1.4 sets
/// a 512-octet minimum; ESMTP parameters and SMTPUTF8 addresses make longer
/// lines legitimate, so we allow what `smtp-proto`'s own receiver allows.
pub const MAX_COMMAND_LINE_BYTES: usize = 4096;

/// Rejected commands (5xx replies) tolerated before the session is closed
/// with `421 4.7.0`: a client speaking garbage is not kept busy forever.
pub const MAX_ERRORS: u32 = 20;

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 4096;

/// Extensions announced in the EHLO reply.
const EHLO_CAPABILITIES: u32 =
    EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8;

/// The reply to `MAIL FROM` while mail acceptance is not enabled.
pub const MAIL_NOT_ENABLED: &str = "mail acceptance is not enabled in this build; try again later";

/// Per-session settings, shared by every session of a listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Host name in the greeting and the EHLO/HELO reply.
    pub domain: String,
    /// Announced as `SIZE`; a `MAIL FROM … SIZE=` above it gets `552 5.3.4`.
    pub max_message_bytes: usize,
    /// Most recipients per message (enforced once mail acceptance exists).
    pub max_recipients: usize,
    /// Longest wait for the next command, or for the client to take a reply.
    pub idle_timeout: Duration,
    /// Longest a whole session may last.
    pub session_timeout: Duration,
}

impl SessionConfig {
    /// The defaults of `e2a-relay --help` with `domain` as host name.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            max_message_bytes: 10 << 20,
            max_recipients: 50,
            idle_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(600),
        }
    }
}

/// Where a session is in the SMTP dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Greeting sent; the client has not said EHLO or HELO yet.
    Connected,
    /// The client identified itself; no mail transaction is open (none can
    /// be: mail acceptance is not enabled in this build, so this state has
    /// no successor yet).
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
            SessionEnd::Io(_) => "io_error",
        }
    }
}

/// One SMTP conversation over `S`.
pub struct Session<S> {
    stream: S,
    config: Arc<SessionConfig>,
    shutdown: CancellationToken,
    state: State,
    lines: LineBuffer,
    out: Vec<u8>,
    errors: u32,
    deadline: Instant,
    closing: bool,
}

/// What a handler tells the command loop.
enum Flow {
    Continue,
    Close(SessionEnd),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A session on `stream` that stops at the next command boundary once
    /// `shutdown` is cancelled. Its total time limit starts now.
    pub fn new(stream: S, config: Arc<SessionConfig>, shutdown: CancellationToken) -> Self {
        let deadline = Instant::now() + config.session_timeout;
        Self {
            stream,
            config,
            shutdown,
            state: State::Connected,
            lines: LineBuffer::new(MAX_COMMAND_LINE_BYTES),
            out: Vec::with_capacity(512),
            errors: 0,
            deadline,
            closing: false,
        }
    }

    /// The current dialogue state.
    pub fn state(&self) -> &State {
        &self.state
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
                Input::Line(line) => self.handle_line(&line),
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
    fn handle_line(&mut self, line: &[u8]) -> Flow {
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
            Request::Rcpt { .. } => self.rcpt(),
            Request::Data => self.data(),
            Request::Rset => self.rset(),
            Request::Noop { .. } => self.noop(),
            Request::Quit => self.quit(),
            Request::Vrfy { .. } => self.vrfy(),
            Request::Help { .. } => self.help(),
            Request::StartTls
            | Request::Auth { .. }
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
        self.state = State::Identified {
            client_host: host.into_owned(),
            extended: true,
        };
        let mut reply = EhloResponse::new(self.config.domain.as_str());
        reply.capabilities = EHLO_CAPABILITIES;
        reply.size = self.config.max_message_bytes;
        // Writing into a Vec cannot fail.
        let _ = reply.write(&mut self.out);
        Flow::Continue
    }

    /// HELO: identifies the client (no extensions), resets any transaction.
    fn helo(&mut self, host: Cow<'_, str>) -> Flow {
        self.state = State::Identified {
            client_host: host.into_owned(),
            extended: false,
        };
        let line = format!("250 {}\r\n", self.config.domain);
        self.out.extend_from_slice(line.as_bytes());
        Flow::Continue
    }

    /// MAIL: needs EHLO/HELO first; an announced size above the limit is a
    /// permanent 552; otherwise a temporary 451 because this build does not
    /// accept mail.
    fn mail(&mut self, from: MailFrom<Cow<'_, str>>) -> Flow {
        match self.state {
            State::Connected => self.reject(503, [5, 5, 1], "send EHLO or HELO first"),
            State::Identified { .. } if from.size > self.config.max_message_bytes => self.reject(
                552,
                [5, 3, 4],
                "message size exceeds fixed maximum message size",
            ),
            State::Identified { .. } => {
                self.reply(451, [4, 3, 2], MAIL_NOT_ENABLED);
                Flow::Continue
            }
        }
    }

    /// RCPT: no MAIL transaction can be open in this build.
    fn rcpt(&mut self) -> Flow {
        self.reject(503, [5, 5, 1], "need MAIL before RCPT")
    }

    /// DATA: no MAIL transaction can be open in this build.
    fn data(&mut self) -> Flow {
        self.reject(503, [5, 5, 1], "need MAIL before DATA")
    }

    /// RSET: clears the transaction (there is none to clear yet); the
    /// client stays identified.
    fn rset(&mut self) -> Flow {
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

    /// Recognised verbs we do not offer (STARTTLS, AUTH, BDAT, EXPN, …).
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
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

    struct Client {
        reader: BufReader<ReadHalf<DuplexStream>>,
        writer: WriteHalf<DuplexStream>,
        session: tokio::task::JoinHandle<SessionEnd>,
        shutdown: CancellationToken,
    }

    impl Client {
        fn start(config: SessionConfig) -> Client {
            let (server, client) = tokio::io::duplex(64 * 1024);
            let shutdown = CancellationToken::new();
            let session =
                tokio::spawn(Session::new(server, Arc::new(config), shutdown.clone()).run());
            let (read, writer) = tokio::io::split(client);
            Client {
                reader: BufReader::new(read),
                writer,
                session,
                shutdown,
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
    async fn mail_is_refused_temporarily_and_nothing_is_accepted() {
        let mut c = Client::greeted().await;
        assert_eq!(c.command("HELO client.example").await, "250 mx.test");
        assert_eq!(
            c.command("MAIL FROM:<a@example.com>").await,
            "451 4.3.2 mail acceptance is not enabled in this build; try again later"
        );
        assert!(
            c.command("RCPT TO:<b@example.com>")
                .await
                .starts_with("503 5.5.1 ")
        );
        assert!(c.command("DATA").await.starts_with("503 5.5.1 "));
        assert!(
            c.command("MAIL FROM:<a@example.com> SIZE=99999999999")
                .await
                .starts_with("552 5.3.4 ")
        );
        assert_eq!(
            c.command("MAIL FROM:<> BODY=8BITMIME SMTPUTF8").await,
            "451 4.3.2 mail acceptance is not enabled in this build; try again later"
        );
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
        assert!(c.line().await.starts_with("451 4.3.2 "));
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
}
