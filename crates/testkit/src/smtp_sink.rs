//! A real SMTP server on 127.0.0.1 that catches mail, for tests, benchmarks
//! and the dev gateway (`cargo xtask dev`).
//!
//! [`SmtpSink::start`] binds an ephemeral port and serves every connection
//! on its own task: greeting, `EHLO` (advertising `PIPELINING`, `8BITMIME`,
//! `SIZE`, `SMTPUTF8`, `ENHANCEDSTATUSCODES`, and `AUTH PLAIN LOGIN` when
//! credentials are configured), `HELO`, `MAIL FROM`, `RCPT TO`, `DATA`
//! (dot-unstuffed; only `<CRLF>.<CRLF>` ends it, a bare-LF `\n.\n` does
//! not), `RSET`, `NOOP`, `QUIT` and `AUTH PLAIN`/`AUTH LOGIN`. With
//! credentials configured, `MAIL` before a successful `AUTH` is answered
//! `530 5.7.0`.
//!
//! What it answers is scripted ([`Script`]): a reply per recipient and
//! attempt, a reply per DATA attempt (counted per `Message-ID`), a stall
//! before any [`Stage`] to trigger client timeouts. Every accepted message is
//! recorded in arrival order ([`SmtpSink::received`]), and optionally written
//! to a spool directory as `<unix-millis>-<n>.eml` (no fsync).
//!
//! Built for throughput (benchmarks push thousands of messages a second
//! through it): replies to pipelined commands go out in one write, nothing
//! is synced to disk, and a benchmark can turn off keeping message bodies in
//! memory ([`Script::keep_messages`]). Nothing a client sends can make it
//! panic; a line or message over its bounds is refused with the usual reply.
//!
//! This file holds the public API and the shared state; the conversation
//! itself, one method per verb, is in `smtp_sink/session.rs`.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use e2a_testkit::smtp_sink::{Reply, Script, SmtpSink};
//! let sink = SmtpSink::start(Script::new().rcpt_reply(|rcpt, _attempt| {
//!     if rcpt.starts_with("busy@") {
//!         Reply::new(450, "4.2.0 Mailbox busy")
//!     } else {
//!         Reply::new(250, "2.1.5 OK")
//!     }
//! }))
//! .await?;
//! // … point a client at sink.host():sink.port() …
//! assert!(sink.wait_for(1, std::time::Duration::from_secs(5)).await);
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{net::TcpListener, sync::watch};

mod session;

use session::Session;

/// Longest command line accepted, CRLF included (what `smtp-proto` allows).
pub const MAX_LINE_BYTES: usize = 4096;

/// Default of [`Script::max_message_bytes`], also advertised as `SIZE`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Most recipients accepted in one transaction; more get `452 4.5.3`.
pub const MAX_RECIPIENTS: usize = 1000;

/// Rejected commands tolerated per connection before `421 4.7.0` and close.
pub const MAX_ERRORS: u32 = 50;

/// One SMTP reply the sink sends. `text` is everything after the code,
/// usually starting with an enhanced status code (`"4.2.0 Mailbox busy"`);
/// a text with line breaks is sent as a multi-line reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The text after the code.
    pub text: String,
}

impl Reply {
    /// A reply with `code` and `text`.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    /// True for a 2xx reply.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Appends the reply, CRLF-terminated, to `out`.
    fn write_to(&self, out: &mut Vec<u8>) {
        let lines: Vec<&str> = self.text.lines().collect();
        let count = lines.len().max(1);
        for i in 0..count {
            let sep = if i + 1 == count { ' ' } else { '-' };
            let line = lines.get(i).copied().unwrap_or("");
            out.extend_from_slice(format!("{}{sep}{line}\r\n", self.code).as_bytes());
        }
    }
}

/// A point in the conversation before which the sink can stall
/// ([`Script::delay_before`]): the delay comes before the reply is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The `220` greeting.
    Greeting,
    /// The reply to `EHLO` or `HELO`.
    Ehlo,
    /// The final reply to `AUTH`.
    Auth,
    /// The reply to `MAIL FROM`.
    Mail,
    /// The reply to each `RCPT TO`.
    Rcpt,
    /// The reply to the `DATA` command (before `354`).
    Data,
    /// The reply after the message's final `<CRLF>.<CRLF>`.
    DataEnd,
    /// The reply to `QUIT`.
    Quit,
}

/// One message as received (and, in [`SmtpSink::received`], accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The `MAIL FROM` path (empty for the null sender `<>`).
    pub mail_from: String,
    /// The accepted `RCPT TO` paths, in order.
    pub rcpt_to: Vec<String>,
    /// The message bytes, dot-unstuffed, ending with the CRLF before the
    /// terminating dot.
    pub data: Vec<u8>,
    /// The user name of a successful `AUTH` on this connection.
    pub auth_user: Option<String>,
}

impl Received {
    /// The first header field `name` (any case), unfolded and trimmed, as
    /// raw text (encoded words are not decoded).
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.data, name)
    }

    /// The `Subject` header, raw.
    pub fn subject(&self) -> Option<String> {
        self.header("Subject")
    }

    /// The `Message-ID` header, raw (usually with its angle brackets).
    pub fn message_id(&self) -> Option<String> {
        self.header("Message-ID")
    }

    /// The key DATA attempts are counted under: the `Message-ID` when the
    /// message has one, else a hash of the bytes (`body:<hex>`).
    pub fn attempt_key(&self) -> String {
        self.message_id().unwrap_or_else(|| {
            let mut hasher = DefaultHasher::new();
            self.data.hash(&mut hasher);
            format!("body:{:016x}", hasher.finish())
        })
    }
}

type RcptFn = Arc<dyn Fn(&str, u32) -> Reply + Send + Sync>;
type DataFn = Arc<dyn Fn(&Received, u32) -> Reply + Send + Sync>;
type ReceivedFn = Arc<dyn Fn(&Received) + Send + Sync>;

/// How the sink behaves; [`Script::new`] accepts everything.
#[derive(Clone)]
pub struct Script {
    hostname: String,
    credentials: Option<(String, String)>,
    rcpt_reply: Option<RcptFn>,
    data_reply: Option<DataFn>,
    on_received: Option<ReceivedFn>,
    delays: HashMap<Stage, Duration>,
    spool_dir: Option<PathBuf>,
    keep_messages: bool,
    max_message_bytes: usize,
}

impl fmt::Debug for Script {
    /// Never shows the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("hostname", &self.hostname)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("rcpt_reply", &self.rcpt_reply.is_some())
            .field("data_reply", &self.data_reply.is_some())
            .field("on_received", &self.on_received.is_some())
            .field("delays", &self.delays)
            .field("spool_dir", &self.spool_dir)
            .field("keep_messages", &self.keep_messages)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl Default for Script {
    fn default() -> Self {
        Self::new()
    }
}

impl Script {
    /// Accepts every command, recipient and message; no AUTH; keeps
    /// messages in memory; no spool; messages up to
    /// [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub fn new() -> Self {
        Self {
            hostname: "sink.e2a.test".into(),
            credentials: None,
            rcpt_reply: None,
            data_reply: None,
            on_received: None,
            delays: HashMap::new(),
            spool_dir: None,
            keep_messages: true,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Requires `AUTH` (PLAIN or LOGIN) with exactly these credentials
    /// before `MAIL` (`530 5.7.0` otherwise; a wrong pair gets `535 5.7.8`).
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((username.into(), password.into()));
        self
    }

    /// Answers each `RCPT TO` with `f(recipient, attempt)`, where `attempt`
    /// counts the `RCPT TO` commands for this exact path on this sink,
    /// starting at 1. A 2xx reply adds the recipient to the transaction.
    pub fn rcpt_reply(mut self, f: impl Fn(&str, u32) -> Reply + Send + Sync + 'static) -> Self {
        self.rcpt_reply = Some(Arc::new(f));
        self
    }

    /// Answers each complete message with `f(message, attempt)`, where
    /// `attempt` counts the messages with the same
    /// [`Received::attempt_key`] (the `Message-ID`) on this sink, starting
    /// at 1. Only a 2xx reply records the message as accepted. `{seq}` in
    /// the reply text becomes the sink's queue id (`SINK<n>`, `n` counting
    /// accepted messages), as in the default `250 2.0.0 Ok: queued as {seq}`.
    pub fn data_reply(
        mut self,
        f: impl Fn(&Received, u32) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.data_reply = Some(Arc::new(f));
        self
    }

    /// Calls `f` for every accepted message (after the spool write, before
    /// the `250` goes out), e.g. to log it.
    pub fn on_received(mut self, f: impl Fn(&Received) + Send + Sync + 'static) -> Self {
        self.on_received = Some(Arc::new(f));
        self
    }

    /// Sleeps `delay` before sending the reply of `stage` (the replies
    /// already due are sent first), on every connection.
    pub fn delay_before(mut self, stage: Stage, delay: Duration) -> Self {
        self.delays.insert(stage, delay);
        self
    }

    /// Also writes every accepted message to `dir` (created if missing) as
    /// `<unix-millis>-<n>.eml`, where `n` counts accepted messages from 1.
    /// Files appear complete (written under a temporary name, then renamed);
    /// nothing is synced to disk. A failed write is answered `451 4.3.0`.
    pub fn spool_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.spool_dir = dir;
        self
    }

    /// Whether [`SmtpSink::received`] keeps the messages (default true).
    /// Benchmarks turn it off and rely on [`SmtpSink::count`].
    pub fn keep_messages(mut self, keep: bool) -> Self {
        self.keep_messages = keep;
        self
    }

    /// Largest message accepted (advertised as `SIZE`); larger ones are read
    /// to their end and answered `552 5.3.4`.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// The name in the greeting and the EHLO reply.
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }
}

struct Shared {
    script: Script,
    received: Mutex<Vec<Received>>,
    /// Accepted messages; watched by [`SmtpSink::wait_for`].
    count: watch::Sender<usize>,
    connections: AtomicUsize,
    /// Numbers accepted messages (spool file names, queue ids).
    accepted_seq: AtomicU64,
    rcpt_attempts: Mutex<HashMap<String, u32>>,
    data_attempts: Mutex<HashMap<String, u32>>,
}

impl Shared {
    fn delay(&self, stage: Stage) -> Option<Duration> {
        self.script.delays.get(&stage).copied()
    }

    fn next_attempt(map: &Mutex<HashMap<String, u32>>, key: &str) -> u32 {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    /// Spools (if configured), reports and records an accepted message.
    /// `Err` when the spool write failed (nothing recorded).
    async fn accept(&self, message: Received, seq: u64) -> std::io::Result<()> {
        if let Some(dir) = &self.script.spool_dir {
            spool(dir, seq, &message.data).await?;
        }
        if let Some(f) = &self.script.on_received {
            f(&message);
        }
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        if self.script.keep_messages {
            received.push(message);
        }
        // Under the same lock: `received()` and `count()` agree on order.
        self.count.send_modify(|c| *c += 1);
        Ok(())
    }
}

async fn spool(dir: &Path, seq: u64, data: &[u8]) -> std::io::Result<()> {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!("{millis}-{seq}.eml");
    tokio::fs::create_dir_all(dir).await?;
    let tmp = dir.join(format!(".{name}.tmp"));
    tokio::fs::write(&tmp, data).await?;
    tokio::fs::rename(&tmp, dir.join(name)).await
}

/// A running sink. Dropping it stops accepting and ends every open session.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
    /// Dropped with the sink: every session watching it ends.
    _shutdown: watch::Sender<()>,
}

impl fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .field("count", &self.count())
            .field("connections", &self.connections())
            .finish()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and serves SMTP as `script` says, one task per
    /// connection, until dropped. Must be called inside a Tokio runtime.
    pub async fn start(script: Script) -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script,
            received: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
            accepted_seq: AtomicU64::new(0),
            rcpt_attempts: Mutex::new(HashMap::new()),
            data_attempts: Mutex::new(HashMap::new()),
        });
        let (shutdown, _) = watch::channel(());
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), shutdown.subscribe()));
        Ok(SmtpSink {
            addr,
            shared,
            accept,
            _shutdown: shutdown,
        })
    }

    /// The listening address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"127.0.0.1"`.
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every accepted message so far, in the order the sink accepted them
    /// (empty when [`Script::keep_messages`] is off).
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many messages were accepted (cheap; counts even when messages
    /// are not kept).
    pub fn count(&self) -> usize {
        *self.shared.count.borrow()
    }

    /// Waits until at least `n` messages were accepted; false when `timeout`
    /// passed first.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.count.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await,
            Ok(Ok(_))
        )
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// How many `DATA` transfers were completed (accepted or not) for
    /// messages with this `Message-ID` (as in the header, brackets
    /// included), or with this [`Received::attempt_key`].
    pub fn data_attempts(&self, message_id: &str) -> u32 {
        let map = self
            .shared
            .data_attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(message_id).copied().unwrap_or(0)
    }

    /// How many `RCPT TO` commands named exactly `rcpt`.
    pub fn rcpt_attempts(&self, rcpt: &str) -> u32 {
        let map = self
            .shared
            .rcpt_attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(rcpt).copied().unwrap_or(0)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<()>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and the like: back off briefly instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = Session::new(stream, &shared).run() => {}
                // Err when the sink (the sender) is dropped.
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// The first header field `name` in `data`'s header section, unfolded.
fn header_value(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut found: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(value) = found.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((field, value)) = line.split_once(':')
            && field.trim().eq_ignore_ascii_case(name)
        {
            found = Some(value.trim().to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies_use_dashes_until_the_last_line() {
        let mut out = Vec::new();
        Reply::new(250, "a\nb\nc").write_to(&mut out);
        assert_eq!(out, b"250-a\r\n250-b\r\n250 c\r\n");
        out.clear();
        Reply::new(354, "").write_to(&mut out);
        assert_eq!(out, b"354 \r\n");
    }

    #[test]
    fn headers_are_found_unfolded_and_only_in_the_header_section() {
        let data =
            b"From: a@b\r\nSubject: hello\r\n  world\r\nmessage-id: <1@x>\r\n\r\nSubject: body\r\n";
        let message = Received {
            mail_from: String::new(),
            rcpt_to: vec![],
            data: data.to_vec(),
            auth_user: None,
        };
        assert_eq!(message.subject().as_deref(), Some("hello world"));
        assert_eq!(message.message_id().as_deref(), Some("<1@x>"));
        assert_eq!(message.attempt_key(), "<1@x>");
        assert_eq!(message.header("To"), None);
        let no_id = Received {
            data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
            ..message
        };
        assert!(no_id.attempt_key().starts_with("body:"));
    }
}
