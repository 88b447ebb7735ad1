//! One SMTP conversation, generic over its byte stream (a TCP socket, or
//! an in-memory duplex in tests): the greeting, then one command line at a
//! time, parsed with `smtp-proto` and handled by one method per verb.
//! Replies are buffered and written when the next read would wait, so
//! pipelined commands are answered in one write. Every way a session can
//! end (EOF, I/O error, too many errors, QUIT, the sink dropped) is quiet:
//! no panic, nothing logged.

use std::sync::atomic::Ordering;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ParseError, Request, request::receiver::DataReceiver,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{MAX_ERRORS, MAX_LINE_BYTES, MAX_RECIPIENTS, Received, Reply, Shared, Stage};

/// Why a session ends early.
enum End {
    /// EOF or an I/O error: nothing more to say.
    Closed,
}

type Step<T = ()> = Result<T, End>;

/// One SMTP conversation over any byte stream.
pub(super) struct Session<'a, S> {
    stream: S,
    shared: &'a Shared,
    /// Bytes read and not yet consumed.
    input: Vec<u8>,
    /// Replies not yet written.
    output: Vec<u8>,
    greeted: bool,
    auth_user: Option<String>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    errors: u32,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub(super) fn new(stream: S, shared: &'a Shared) -> Self {
        Self {
            stream,
            shared,
            input: Vec::with_capacity(8 * 1024),
            output: Vec::with_capacity(1024),
            greeted: false,
            auth_user: None,
            mail_from: None,
            rcpt_to: Vec::new(),
            errors: 0,
        }
    }

    pub(super) async fn run(mut self) {
        let _ = self.serve().await;
        let _ = self.flush().await;
    }

    async fn serve(&mut self) -> Step {
        self.pause(Stage::Greeting).await?;
        let greeting = format!("{} ESMTP e2a test sink", self.shared.script.hostname);
        self.reply(220, &greeting);
        loop {
            let line = self.next_line().await?;
            let Some(line) = line else {
                self.reply(500, "5.5.2 Line too long");
                self.error()?;
                continue;
            };
            let request = Request::parse(&mut line.iter()).map(|r| r.into_owned());
            let quit = matches!(request, Ok(Request::Quit));
            match request {
                Ok(Request::Ehlo { host }) => self.ehlo(&host, true).await?,
                Ok(Request::Helo { host }) => self.ehlo(&host, false).await?,
                Ok(Request::Auth {
                    mechanism,
                    initial_response,
                }) => self.auth(mechanism, &initial_response).await?,
                Ok(Request::Mail { from }) => self.mail(from.address, from.size).await?,
                Ok(Request::Rcpt { to }) => self.rcpt(to.address).await?,
                Ok(Request::Data) => self.data().await?,
                Ok(Request::Rset) => {
                    self.reset();
                    self.reply(250, "2.0.0 OK");
                }
                Ok(Request::Noop { .. }) => self.reply(250, "2.0.0 OK"),
                Ok(Request::Quit) => {
                    self.pause(Stage::Quit).await?;
                    self.reply(221, "2.0.0 Bye");
                }
                Ok(Request::Vrfy { .. }) => self.reply(252, "2.5.0 Cannot VRFY user"),
                Ok(_) => {
                    self.reply(502, "5.5.1 Command not implemented");
                    self.error()?;
                }
                Err(e) => {
                    let (code, text) = match e {
                        ParseError::UnknownCommand => (500, "5.5.1 Unknown command"),
                        ParseError::InvalidSenderAddress => (501, "5.1.7 Bad sender address"),
                        ParseError::InvalidRecipientAddress => (501, "5.1.3 Bad recipient address"),
                        _ => (501, "5.5.4 Syntax error"),
                    };
                    self.reply(code, text);
                    self.error()?;
                }
            }
            if quit {
                return Ok(());
            }
        }
    }

    fn reply(&mut self, code: u16, text: &str) {
        Reply::new(code, text).write_to(&mut self.output);
    }

    /// Counts a refused command; past [`MAX_ERRORS`] says goodbye.
    fn error(&mut self) -> Step {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.reply(421, "4.7.0 Too many errors, closing");
            return Err(End::Closed);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    async fn flush(&mut self) -> Step {
        if self.output.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.output).await;
        self.output.clear();
        result.map_err(|_| End::Closed)
    }

    /// Sends what is due, then sleeps the scripted delay for `stage`.
    async fn pause(&mut self, stage: Stage) -> Step {
        if let Some(delay) = self.shared.delay(stage) {
            self.flush().await?;
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// Reads more input; flushes pending replies first (the client may be
    /// waiting for them). `End::Closed` at EOF.
    async fn fill(&mut self) -> Step {
        self.flush().await?;
        let n = self
            .stream
            .read_buf(&mut self.input)
            .await
            .map_err(|_| End::Closed)?;
        if n == 0 {
            return Err(End::Closed);
        }
        Ok(())
    }

    /// The next line, LF included; `None` for a line over
    /// [`MAX_LINE_BYTES`] (discarded).
    async fn next_line(&mut self) -> Step<Option<Vec<u8>>> {
        let mut too_long = false;
        loop {
            if let Some(pos) = self.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.input.drain(..=pos).collect();
                return Ok((!too_long && line.len() <= MAX_LINE_BYTES).then_some(line));
            }
            if self.input.len() > MAX_LINE_BYTES {
                too_long = true;
                self.input.clear();
            }
            self.fill().await?;
        }
    }

    async fn ehlo(&mut self, client: &str, extended: bool) -> Step {
        self.pause(Stage::Ehlo).await?;
        self.reset();
        self.greeted = true;
        let host = self.shared.script.hostname.clone();
        if !extended {
            self.reply(250, &host);
            return Ok(());
        }
        let mut lines = vec![
            format!("{host} greets {client}"),
            "PIPELINING".into(),
            "8BITMIME".into(),
            format!("SIZE {}", self.shared.script.max_message_bytes),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.shared.script.credentials.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(250, &lines.join("\n"));
        Ok(())
    }

    /// Reads one AUTH continuation line (without CRLF); `None` when the
    /// client cancelled with `*` or the line was too long.
    async fn auth_line(&mut self, challenge: &str) -> Step<Option<String>> {
        self.reply(334, challenge);
        let Some(line) = self.next_line().await? else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        Ok((line != "*").then_some(line))
    }

    async fn auth(&mut self, mechanism: u64, initial: &str) -> Step {
        let Some((user, pass)) = self.shared.script.credentials.clone() else {
            self.reply(503, "5.5.1 AUTH not available");
            return self.error();
        };
        if self.auth_user.is_some() {
            self.reply(503, "5.5.1 Already authenticated");
            return self.error();
        }
        if !self.greeted {
            self.reply(503, "5.5.1 Send EHLO first");
            return self.error();
        }
        let given = if mechanism == AUTH_PLAIN {
            let response = match initial {
                "" => self.auth_line("").await?,
                "=" => Some(String::new()),
                other => Some(other.to_owned()),
            };
            response.map(|r| {
                let decoded = BASE64.decode(r.as_bytes()).unwrap_or_default();
                let mut parts = decoded.split(|&b| b == 0).skip(1);
                let user = parts.next().unwrap_or_default().to_vec();
                let pass = parts.next().unwrap_or_default().to_vec();
                (user, pass)
            })
        } else if mechanism == AUTH_LOGIN {
            let user = match initial {
                "" => self.auth_line("VXNlcm5hbWU6").await?,
                other => Some(other.to_owned()),
            };
            match user {
                None => None,
                Some(user) => self.auth_line("UGFzc3dvcmQ6").await?.map(|pass| {
                    (
                        BASE64.decode(user.as_bytes()).unwrap_or_default(),
                        BASE64.decode(pass.as_bytes()).unwrap_or_default(),
                    )
                }),
            }
        } else {
            self.reply(504, "5.5.4 Mechanism not supported");
            return self.error();
        };
        let Some((given_user, given_pass)) = given else {
            self.reply(501, "5.0.0 Authentication cancelled");
            return self.error();
        };
        self.pause(Stage::Auth).await?;
        if given_user == user.as_bytes() && given_pass == pass.as_bytes() {
            self.auth_user = Some(user);
            self.reply(235, "2.7.0 Authentication successful");
            Ok(())
        } else {
            self.reply(535, "5.7.8 Authentication credentials invalid");
            self.error()
        }
    }

    async fn mail(&mut self, from: String, size: usize) -> Step {
        if !self.greeted {
            self.reply(503, "5.5.1 Send EHLO/HELO first");
            return self.error();
        }
        if self.shared.script.credentials.is_some() && self.auth_user.is_none() {
            self.reply(530, "5.7.0 Authentication required");
            return self.error();
        }
        if self.mail_from.is_some() {
            self.reply(503, "5.5.1 Nested MAIL command");
            return self.error();
        }
        if size > self.shared.script.max_message_bytes {
            self.reply(552, "5.3.4 Message size exceeds fixed limit");
            return self.error();
        }
        self.pause(Stage::Mail).await?;
        self.mail_from = Some(from);
        self.reply(250, "2.1.0 OK");
        Ok(())
    }

    async fn rcpt(&mut self, to: String) -> Step {
        if self.mail_from.is_none() {
            self.reply(503, "5.5.1 Need MAIL before RCPT");
            return self.error();
        }
        if self.rcpt_to.len() >= MAX_RECIPIENTS {
            self.reply(452, "4.5.3 Too many recipients");
            return Ok(());
        }
        let attempt = Shared::next_attempt(&self.shared.rcpt_attempts, &to);
        self.pause(Stage::Rcpt).await?;
        let reply = match &self.shared.script.rcpt_reply {
            Some(f) => f(&to, attempt),
            None => Reply::new(250, "2.1.5 OK"),
        };
        if reply.is_positive() {
            self.rcpt_to.push(to);
        }
        reply.write_to(&mut self.output);
        Ok(())
    }

    async fn data(&mut self) -> Step {
        let Some(mail_from) = self.mail_from.clone() else {
            self.reply(503, "5.5.1 Need MAIL before DATA");
            return self.error();
        };
        if self.rcpt_to.is_empty() {
            self.reply(554, "5.5.1 No valid recipients");
            return self.error();
        }
        self.pause(Stage::Data).await?;
        self.reply(354, "Start mail input; end with <CRLF>.<CRLF>");
        let max = self.shared.script.max_message_bytes;
        let mut receiver = DataReceiver::new();
        // The receiver only knows a line start after a CRLF: prime it with
        // one (removed below), so that a dot on the first line is
        // unstuffed and an immediate `.<CRLF>` ends an empty message.
        let mut data = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut data);
        let mut too_big = false;
        loop {
            let mut bytes = self.input.iter();
            let done = receiver.ingest(&mut bytes, &mut data);
            let consumed = self.input.len() - bytes.as_slice().len();
            self.input.drain(..consumed);
            if data.len() > max.saturating_add(2) {
                // Keep reading to the end, but no longer keep the bytes.
                too_big = true;
                data.clear();
            }
            if done {
                break;
            }
            self.fill().await?;
        }
        let rcpt_to = std::mem::take(&mut self.rcpt_to);
        self.reset();
        if too_big {
            self.reply(552, "5.3.4 Message size exceeds fixed limit");
            return Ok(());
        }
        data.drain(..2.min(data.len()));
        let message = Received {
            mail_from,
            rcpt_to,
            data,
            auth_user: self.auth_user.clone(),
        };
        let attempt = Shared::next_attempt(&self.shared.data_attempts, &message.attempt_key());
        self.pause(Stage::DataEnd).await?;
        let reply = match &self.shared.script.data_reply {
            Some(f) => f(&message, attempt),
            None => Reply::new(250, "2.0.0 Ok: queued as {seq}"),
        };
        if !reply.is_positive() {
            reply.write_to(&mut self.output);
            return Ok(());
        }
        let seq = self.shared.accepted_seq.fetch_add(1, Ordering::Relaxed) + 1;
        match self.shared.accept(message, seq).await {
            Ok(()) => {
                let text = reply.text.replace("{seq}", &format!("SINK{seq}"));
                Reply::new(reply.code, text).write_to(&mut self.output);
            }
            Err(_) => self.reply(451, "4.3.0 Could not spool the message"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{
            Mutex,
            atomic::{AtomicU64, AtomicUsize},
        },
    };

    use tokio::sync::watch;

    use super::*;
    use crate::smtp_sink::Script;

    #[tokio::test]
    async fn a_session_over_an_in_memory_stream() {
        let shared = Shared {
            script: Script::new(),
            received: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
            accepted_seq: AtomicU64::new(0),
            rcpt_attempts: Mutex::new(HashMap::new()),
            data_attempts: Mutex::new(HashMap::new()),
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(
                b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nHi\r\n..dot\r\n.\r\nQUIT\r\n",
            )
            .await
            .unwrap();
        Session::new(server, &shared).run().await;
        let mut transcript = String::new();
        client.read_to_string(&mut transcript).await.unwrap();
        assert!(transcript.starts_with("220 "), "{transcript}");
        assert!(
            transcript.contains("250 2.0.0 Ok: queued as SINK1\r\n"),
            "{transcript}"
        );
        assert!(transcript.ends_with("221 2.0.0 Bye\r\n"), "{transcript}");
        let received = shared.received.lock().unwrap().clone();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].data, b"Hi\r\n.dot\r\n");
    }
}
