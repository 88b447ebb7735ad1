//! Fuzz target `smtp_session`: arbitrary client bytes against a whole
//! `e2a_relay::session::Session`.
//!
//! The session runs over an in-memory `tokio::io::duplex` stream, against
//! an in-memory [`Backend`] (`*@known.test` is accepted, `down@…` is a
//! temporary failure, everything else is unknown; a message for `defer@…`
//! is answered `451`, one for `reject@…` `550`, anything else is stored in
//! memory), with small limits: 2 KiB messages, 3 recipients, and idle and
//! session timeouts on a paused tokio clock, so a session that waits for
//! anything but the client's bytes times out at once instead of sleeping.
//!
//! Input layout: the first byte selects how the client behaves (see
//! [`Mode`]), the rest is what it sends. The seeds in `seeds/smtp_session/`
//! start with `@` (0x40: no flags set) or `A` (1-byte writes). Replaying an
//! input with `E2A_FUZZ_TRACE` set prints the mode, how the session ended
//! and every reply.
//!
//! Checked on every input:
//! * the session never panics and always ends (within a virtual minute);
//! * every reply line is `ddd ` or `ddd-` plus printable ASCII and CRLF —
//!   nothing the client sent is echoed back — starting with the `220`
//!   greeting;
//! * `250 … queued` is sent only for a message the backend accepted, and
//!   (when no reply can have been dropped) for every one;
//! * what reaches the backend respects the limits: at most 2 KiB, 1 to 3
//!   distinct recipients, each one the backend accepted.
#![no_main]

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use e2a_relay::{
    backend::{Backend, DeliveryOutcome, Envelope, RecipientCheck},
    session::{Session, SessionConfig},
};
use e2a_store::address::EmailAddress;
use libfuzzer_sys::fuzz_target;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    runtime::Runtime,
};
use tokio_util::sync::CancellationToken;

const MAX_MESSAGE_BYTES: usize = 2048;
const MAX_RECIPIENTS: usize = 3;
/// Bytes the duplex pipe buffers in each direction: small, so both sides
/// meet back-pressure.
const PIPE_BYTES: usize = 512;
/// Virtual time after which a session that has not ended is a bug.
const MUST_END_WITHIN: Duration = Duration::from_secs(60);

/// How the client behaves, from the first input byte.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Bits 0–1: write the input at once, or in pieces of 1, 13 or 512
    /// bytes with a yield between them (packet boundaries anywhere).
    chunk: usize,
    /// Bit 2: keep the connection open after the input instead of closing
    /// the write half, so the session must end by its idle timeout.
    keep_open: bool,
    /// Bit 3: cancel the shutdown token once the input is written.
    shutdown: bool,
    /// Bit 4: offer STARTTLS (the relay's test certificate).
    tls: bool,
    /// Bit 5: read the replies only after writing everything, so the
    /// session blocks writing them and must time out.
    slow_reader: bool,
}

impl Mode {
    fn new(byte: u8) -> Self {
        Self {
            chunk: [usize::MAX, 1, 13, 512][usize::from(byte & 0b11)],
            keep_open: byte & 0b100 != 0,
            shutdown: byte & 0b1000 != 0,
            tls: byte & 0b1_0000 != 0,
            slow_reader: byte & 0b10_0000 != 0,
        }
    }
}

/// The in-memory backend (see the module docs).
#[derive(Default)]
struct MemoryBackend {
    delivered: Mutex<Vec<(Envelope<String>, Vec<u8>)>>,
}

impl Backend for MemoryBackend {
    type Recipient = String;

    async fn recipient(&self, address: &EmailAddress) -> RecipientCheck<String> {
        match (address.local_part(), address.domain()) {
            ("down", _) => RecipientCheck::TempFail,
            (local, "known.test") => RecipientCheck::Accept(local.to_owned()),
            _ => RecipientCheck::Unknown,
        }
    }

    async fn deliver(&self, envelope: &Envelope<String>, message: Vec<u8>) -> DeliveryOutcome {
        check_delivery(envelope, &message);
        let has = |name: &str| envelope.recipients.iter().any(|(_, r)| r == name);
        if has("defer") {
            return DeliveryOutcome::TempFail;
        }
        if has("reject") {
            return DeliveryOutcome::Reject {
                code: 550,
                esc: [5, 7, 1],
                message: "rejected by policy".into(),
            };
        }
        let mut delivered = self.delivered.lock().unwrap();
        delivered.push((envelope.clone(), message));
        DeliveryOutcome::Accepted {
            id: format!("m{}", delivered.len()),
        }
    }
}

/// What the session hands the backend stays within the limits.
fn check_delivery(envelope: &Envelope<String>, message: &[u8]) {
    assert!(
        message.len() <= MAX_MESSAGE_BYTES,
        "{} bytes",
        message.len()
    );
    let n = envelope.recipients.len();
    assert!((1..=MAX_RECIPIENTS).contains(&n), "{n} recipients");
    for (i, (address, local)) in envelope.recipients.iter().enumerate() {
        assert_eq!(address.domain(), "known.test");
        assert_eq!(address.local_part(), local);
        assert!(
            envelope.recipients[..i].iter().all(|(a, _)| a != address),
            "duplicate recipient"
        );
    }
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("tokio runtime")
    })
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    static ACCEPTOR: OnceLock<tokio_rustls::TlsAcceptor> = OnceLock::new();
    ACCEPTOR
        .get_or_init(|| {
            let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../bins/relay/tests/fixtures");
            e2a_relay::tls::acceptor(
                &fixtures.join("test-cert.pem"),
                &fixtures.join("test-key.pem"),
            )
            .expect("the relay's test certificate")
        })
        .clone()
}

fn config(mode: Mode) -> SessionConfig {
    SessionConfig {
        tls: mode.tls.then(tls_acceptor),
        max_message_bytes: MAX_MESSAGE_BYTES,
        max_recipients: MAX_RECIPIENTS,
        idle_timeout: Duration::from_secs(5),
        session_timeout: Duration::from_secs(30),
        ..SessionConfig::new("mx.test")
    }
}

async fn drive(mode: Mode, input: &[u8]) {
    let (server, client) = tokio::io::duplex(PIPE_BYTES);
    let backend = Arc::new(MemoryBackend::default());
    let shutdown = CancellationToken::new();
    let session = Session::new(
        server,
        Arc::new(config(mode)),
        backend.clone(),
        Some(std::net::IpAddr::from([192, 0, 2, 1])),
        shutdown.clone(),
    );
    let (mut reader, mut writer) = tokio::io::split(client);

    let write = async {
        for piece in input.chunks(mode.chunk.min(input.len().max(1))) {
            // The session may have ended (QUIT, too many errors, a failed
            // TLS handshake): the rest of the input is then undeliverable.
            if writer.write_all(piece).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        if mode.shutdown {
            shutdown.cancel();
        }
        if !mode.keep_open {
            let _ = writer.shutdown().await;
        }
        writer
    };
    let read = async {
        let mut replies = Vec::new();
        let _ = reader.read_to_end(&mut replies).await;
        replies
    };
    let client = async {
        if mode.slow_reader {
            let writer = write.await;
            (writer, read.await)
        } else {
            tokio::join!(write, read)
        }
    };
    let (end, (_writer, replies)) = tokio::time::timeout(MUST_END_WITHIN, async {
        tokio::join!(session.run(), client)
    })
    .await
    .expect("the session must end");
    let _ = end.as_str();
    if std::env::var_os("E2A_FUZZ_TRACE").is_some() {
        eprintln!(
            "{mode:?} -> {}\n{}",
            end.as_str(),
            String::from_utf8_lossy(&replies)
        );
        eprintln!("stored: {}", backend.delivered.lock().unwrap().len());
    }
    check_replies(mode, &replies, &backend);
}

/// The reply stream is well formed and agrees with what was stored.
fn check_replies(mode: Mode, replies: &[u8], backend: &MemoryBackend) {
    let mut queued = 0;
    let mut lines = replies.split_inclusive(|&b| b == b'\n').peekable();
    if let Some(first) = lines.peek() {
        assert_eq!(*first, b"220 mx.test ESMTP e2a\r\n");
    }
    let mut tls_started = false;
    for line in lines {
        // A line cut short is possible only where the session dropped the
        // rest of its replies (a slow reader, shutdown).
        let Some(text) = line.strip_suffix(b"\r\n") else {
            assert!(mode.slow_reader || mode.shutdown, "unterminated {line:?}");
            break;
        };
        assert!(text.len() >= 4, "{line:?}");
        assert!(matches!(text[0], b'2'..=b'5'), "{line:?}");
        assert!(text[1..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(matches!(text[3], b' ' | b'-'), "{line:?}");
        assert!(
            text.iter().all(|b| b.is_ascii_graphic() || *b == b' '),
            "non-printable reply {line:?}"
        );
        if text.starts_with(b"250 2.0.0 OK queued as ") {
            queued += 1;
        }
        if text == b"220 2.0.0 ready to start TLS" {
            // What follows is TLS records, not SMTP replies.
            tls_started = true;
            break;
        }
    }
    let accepted = backend.delivered.lock().unwrap().len();
    assert!(
        queued <= accepted,
        "{queued} acknowledged, {accepted} stored"
    );
    if !(mode.slow_reader || mode.shutdown || tls_started) {
        assert_eq!(queued, accepted, "a stored message was not acknowledged");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    runtime().block_on(drive(Mode::new(mode), input));
});
