//! The SMTP sink spoken to over a real socket, byte by byte: transparency
//! (dot-stuffing, bare LF), pipelining, AUTH, scripted replies, stalls, the
//! spool directory, limits and many concurrent connections.

use std::time::{Duration, Instant};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use e2a_testkit::smtp_sink::{Reply, Script, SmtpSink, Stage};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

const WAIT: Duration = Duration::from_secs(5);

/// A raw SMTP client: writes bytes, reads whole (multi-line) replies.
struct Raw {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Raw {
    /// Connects and returns the client with the greeting read.
    async fn connect(sink: &SmtpSink) -> (Raw, String) {
        let stream = TcpStream::connect(sink.addr()).await.expect("connect");
        let (r, w) = stream.into_split();
        let mut raw = Raw {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    /// The next reply, all its lines joined with `\n`, CRLFs removed.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("reply within 5 s")
                .expect("read");
            assert!(n > 0, "connection closed; got so far: {lines:?}");
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Sends one command line (CRLF added) and returns the reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// EHLO, MAIL, one RCPT, DATA `body` (already terminated); the final reply.
    async fn send_message(&mut self, from: &str, to: &str, body: &[u8]) -> String {
        assert!(self.cmd("EHLO client.test").await.starts_with("250"));
        assert!(
            self.cmd(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250")
        );
        assert!(
            self.cmd(&format!("RCPT TO:<{to}>"))
                .await
                .starts_with("250")
        );
        assert!(self.cmd("DATA").await.starts_with("354"));
        self.send(body).await;
        self.reply().await
    }
}

#[tokio::test]
async fn data_is_unstuffed_and_only_crlf_dot_crlf_ends_it() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let (mut c, greeting) = Raw::connect(&sink).await;
    assert!(greeting.starts_with("220 "), "{greeting}");

    let ehlo = c.cmd("EHLO client.test").await;
    for capability in ["PIPELINING", "8BITMIME", "SIZE ", "SMTPUTF8"] {
        assert!(ehlo.contains(capability), "{capability} missing: {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "AUTH without credentials: {ehlo}");

    assert_eq!(c.cmd("MAIL FROM:<a@x.test>").await, "250 2.1.0 OK");
    assert_eq!(c.cmd("RCPT TO:<b@y.test>").await, "250 2.1.5 OK");
    assert_eq!(c.cmd("RCPT TO:<c@y.test>").await, "250 2.1.5 OK");
    assert!(c.cmd("DATA").await.starts_with("354 "));
    // `..stuffed` is one stuffed dot; `\n.\n` (bare LF) is data.
    c.send(b"Subject: t\r\n\r\n..stuffed\r\nbare\n.\nstill data\r\n...\r\n.\r\n")
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");

    assert!(sink.wait_for(1, WAIT).await);
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].mail_from, "a@x.test");
    assert_eq!(received[0].rcpt_to, ["b@y.test", "c@y.test"]);
    assert_eq!(
        received[0].data,
        b"Subject: t\r\n\r\n.stuffed\r\nbare\n.\nstill data\r\n..\r\n"
    );
    assert_eq!(received[0].auth_user, None);
    assert_eq!(sink.count(), 1);
    assert_eq!(sink.connections(), 1);
}

#[tokio::test]
async fn a_dot_on_the_first_line_is_unstuffed_and_an_empty_message_ends_at_once() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    let reply = c
        .send_message("a@x.test", "b@y.test", b"..first\r\n.\r\n")
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let reply = c.send_message("a@x.test", "b@y.test", b".\r\n").await;
    assert!(reply.starts_with("250"), "{reply}");
    let received = sink.received();
    assert_eq!(received[0].data, b".first\r\n");
    assert_eq!(received[1].data, b"");
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    c.send(b"EHLO p\r\nMAIL FROM:<>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250-"));
    assert_eq!(c.reply().await, "250 2.1.0 OK");
    assert_eq!(c.reply().await, "250 2.1.5 OK");
    assert_eq!(c.reply().await, "250 2.1.5 OK");
    assert!(c.reply().await.starts_with("354"));
    c.send(b"x\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued as SINK1"));
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    assert_eq!(c.reply().await, "221 2.0.0 Bye");
    let received = sink.received();
    assert_eq!(received[0].mail_from, "", "null sender");
    assert_eq!(received[0].data, b"x\r\n");
}

#[tokio::test]
async fn order_errors_and_limits_get_their_codes() {
    let sink = SmtpSink::start(Script::new().max_message_bytes(16))
        .await
        .expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    assert!(c.cmd("MAIL FROM:<a@x.test>").await.starts_with("503"));
    assert!(c.cmd("FROB").await.starts_with("500"));
    assert!(
        c.cmd(&format!("NOOP {}", "x".repeat(5000)))
            .await
            .starts_with("500 5.5.2")
    );
    assert_eq!(c.cmd("HELO old.client").await, "250 sink.e2a.test");
    assert!(c.cmd("RCPT TO:<b@y.test>").await.starts_with("503"));
    assert!(
        c.cmd("MAIL FROM:<a@x.test> SIZE=17")
            .await
            .starts_with("552")
    );
    assert!(c.cmd("MAIL FROM:<a@x.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("554"), "no recipients yet");
    assert!(c.cmd("RCPT TO:<b@y.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"this body is longer than sixteen bytes\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    assert!(c.cmd("AUTH PLAIN AGEAYg==").await.starts_with("503"));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn auth_is_required_and_checked() {
    let sink = SmtpSink::start(Script::new().credentials("user", "s3cret"))
        .await
        .expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(c.cmd("MAIL FROM:<a@x.test>").await.starts_with("530 5.7.0"));
    let wrong = BASE64.encode(b"\0user\0wrong");
    assert!(
        c.cmd(&format!("AUTH PLAIN {wrong}"))
            .await
            .starts_with("535 5.7.8")
    );
    assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("504"));
    // PLAIN without an initial response: the credentials follow a 334.
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 ");
    let right = BASE64.encode(b"\0user\0s3cret");
    assert!(c.cmd(&right).await.starts_with("235"));
    assert!(
        c.cmd("AUTH PLAIN").await.starts_with("503"),
        "already authenticated"
    );
    assert!(c.cmd("MAIL FROM:<a@x.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@y.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"hi\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(sink.received()[0].auth_user.as_deref(), Some("user"));

    // AUTH LOGIN on a second connection.
    let (mut c, _) = Raw::connect(&sink).await;
    c.cmd("EHLO client.test").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd(&BASE64.encode("user")).await, "334 UGFzc3dvcmQ6");
    assert!(c.cmd(&BASE64.encode("s3cret")).await.starts_with("235"));
    // A cancelled exchange on a third.
    let (mut c, _) = Raw::connect(&sink).await;
    c.cmd("EHLO client.test").await;
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert!(c.cmd("*").await.starts_with("501"));
    assert_eq!(sink.connections(), 3);
}

#[tokio::test]
async fn scripted_replies_per_recipient_and_per_data_attempt() {
    let script = Script::new()
        .rcpt_reply(|rcpt, attempt| match rcpt {
            "busy@y.test" if attempt == 1 => Reply::new(450, "4.2.0 Mailbox busy"),
            "gone@y.test" => Reply::new(550, "5.1.1 No such user"),
            _ => Reply::new(250, "2.1.5 OK"),
        })
        .data_reply(|message, attempt| {
            if message.subject().as_deref() == Some("reject") {
                Reply::new(554, "5.7.1 Rejected")
            } else if attempt == 1 {
                Reply::new(451, "4.3.0 Try again")
            } else {
                Reply::new(250, "2.0.0 OK <queued-{seq}>")
            }
        });
    let sink = SmtpSink::start(script).await.expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@x.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<busy@y.test>").await,
        "450 4.2.0 Mailbox busy"
    );
    assert_eq!(
        c.cmd("RCPT TO:<gone@y.test>").await,
        "550 5.1.1 No such user"
    );
    assert_eq!(c.cmd("RCPT TO:<ok@y.test>").await, "250 2.1.5 OK");
    assert_eq!(c.cmd("RCPT TO:<busy@y.test>").await, "250 2.1.5 OK");
    assert_eq!(sink.rcpt_attempts("busy@y.test"), 2);
    c.cmd("DATA").await;
    let message = b"Message-ID: <m1@x.test>\r\nSubject: s\r\n\r\nbody\r\n.\r\n";
    c.send(message).await;
    assert_eq!(c.reply().await, "451 4.3.0 Try again");
    assert_eq!(sink.count(), 0, "a refused message is not recorded");
    let reply = c.send_message("a@x.test", "ok@y.test", message).await;
    assert_eq!(reply, "250 2.0.0 OK <queued-SINK1>");
    assert_eq!(sink.data_attempts("<m1@x.test>"), 2);
    let reply = c
        .send_message(
            "a@x.test",
            "ok@y.test",
            b"Subject: reject\r\n\r\nx\r\n.\r\n",
        )
        .await;
    assert_eq!(reply, "554 5.7.1 Rejected");
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_to, ["ok@y.test"]);
    assert_eq!(received[0].message_id().as_deref(), Some("<m1@x.test>"));
}

#[tokio::test]
async fn a_stall_before_a_stage_delays_its_reply() {
    let stall = Duration::from_millis(300);
    let sink = SmtpSink::start(Script::new().delay_before(Stage::Rcpt, stall))
        .await
        .expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    c.cmd("EHLO client.test").await;
    let started = Instant::now();
    c.cmd("MAIL FROM:<a@x.test>").await;
    assert!(started.elapsed() < stall, "MAIL is not delayed");
    let started = Instant::now();
    assert!(c.cmd("RCPT TO:<b@y.test>").await.starts_with("250"));
    assert!(
        started.elapsed() >= stall,
        "RCPT answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn accepted_messages_are_spooled_and_reported() {
    let dir = std::env::temp_dir().join(format!("e2a-sink-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, rx) = std::sync::mpsc::channel();
    let script = Script::new()
        .spool_dir(Some(dir.clone()))
        .keep_messages(false)
        .on_received(move |m| {
            let _ = tx.send(m.subject());
        });
    let sink = SmtpSink::start(script).await.expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    let body = b"Subject: spooled\r\n\r\nhello\r\n";
    let mut wire = body.to_vec();
    wire.extend_from_slice(b".\r\n");
    assert!(
        c.send_message("a@x.test", "b@y.test", &wire)
            .await
            .starts_with("250")
    );
    assert_eq!(sink.count(), 1);
    assert!(sink.received().is_empty(), "not kept");
    assert_eq!(rx.try_recv().ok().flatten().as_deref(), Some("spooled"));
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("spool dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    let (millis, rest) = name.split_once('-').expect("<millis>-<n>.eml");
    assert!(millis.parse::<u128>().is_ok(), "{name}");
    assert_eq!(rest, "1.eml");
    assert_eq!(std::fs::read(&files[0]).expect("read"), body);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let clients = 100;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let addr = sink.addr();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (r, w) = stream.into_split();
            let mut c = Raw {
                reader: BufReader::new(r),
                writer: w,
            };
            c.reply().await;
            let body = format!("Subject: {i}\r\n\r\nx\r\n.\r\n");
            let reply = c
                .send_message("a@x.test", &format!("r{i}@y.test"), body.as_bytes())
                .await;
            assert!(reply.starts_with("250"), "{reply}");
            c.cmd("QUIT").await;
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    assert!(sink.wait_for(clients, WAIT).await);
    assert_eq!(sink.connections(), clients);
    let mut subjects: Vec<usize> = sink
        .received()
        .iter()
        .map(|m| m.subject().unwrap().parse().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(subjects, (0..clients).collect::<Vec<_>>());
}

#[tokio::test]
async fn wait_for_gives_up_after_its_timeout() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let started = Instant::now();
    assert!(!sink.wait_for(1, Duration::from_millis(100)).await);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(sink.wait_for(0, Duration::ZERO).await);
}

#[tokio::test]
async fn dropping_the_sink_ends_open_sessions() {
    let sink = SmtpSink::start(Script::new()).await.expect("start");
    let (mut c, _) = Raw::connect(&sink).await;
    c.cmd("EHLO client.test").await;
    drop(sink);
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, c.reader.read_line(&mut line))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "got {line:?}");
}
