//! The session: connect, TLS (implicit or `STARTTLS`), greeting, `EHLO`,
//! then [`auth`](super::auth) and the [`transaction`](super::transaction),
//! and `QUIT`. Every step is bounded by its own timeout and cut at the
//! overall deadline; failures become a [`Stop`]: `Refused` (the server
//! answered; classified by its code, QUIT still said) or `Broken`
//! (timeout, I/O, TLS, garbage: temporary, the connection dropped).

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use mail_send::SmtpClient;
use rustls_platform_verifier::BuilderVerifierExt;
use smtp_proto::{EXT_START_TLS, EhloResponse, Response};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::TlsConnector;

use super::{Envelope, Outcome, SmtpConfig, Submission, TlsMode, text::reply_line};

/// Why a session stops before a verdict on the message.
pub(super) enum Stop {
    /// The server answered (the connection is still usable: say QUIT).
    Refused(Outcome),
    /// Timeout, I/O or TLS failure, garbage: just drop the connection.
    Broken(Outcome),
}

impl Stop {
    fn into_outcome(self) -> Outcome {
        match self {
            Stop::Refused(o) | Stop::Broken(o) => o,
        }
    }
}

pub(super) type Flow<T> = Result<T, Stop>;

/// One connection's worth of SMTP for one message. Every step goes
/// through [`Session::step`], which bounds it by its own timeout and by the
/// overall deadline.
pub(super) struct Session<'a> {
    pub(super) cfg: &'a SmtpConfig,
    pub(super) envelope: &'a Envelope,
    /// `submit` returns by then ([`SmtpConfig::worst_case`] after it began).
    pub(super) deadline: Instant,
    /// Where per-recipient and DATA replies are collected.
    pub(super) submission: &'a mut Submission,
}

impl Session<'_> {
    pub(super) async fn run(&mut self, wire: &[u8], size: usize, eight_bit: bool) -> Outcome {
        let cfg = self.cfg;
        let target = format!("{}:{}", cfg.host, cfg.port);
        let connect = async {
            let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, mail_send::Error>(tcp)
        };
        let what = format!("connecting to {target}");
        let tcp = match self.step(cfg.connect_timeout, &what, connect).await {
            Ok(tcp) => tcp,
            Err(stop) => return stop.into_outcome(),
        };
        let mut client = SmtpClient {
            stream: tcp,
            timeout: cfg.command_timeout,
        };
        match cfg.tls {
            TlsMode::None => {
                let caps = match self.open(&mut client).await {
                    Ok(caps) => caps,
                    Err(stop) => return self.finish(&mut client, Err(stop)).await,
                };
                let result = self
                    .transaction(&mut client, &caps, wire, size, eight_bit)
                    .await;
                self.finish(&mut client, result).await
            }
            TlsMode::StartTls => {
                let upgraded = async {
                    let caps = self.open(&mut client).await?;
                    if !caps.has_capability(EXT_START_TLS) {
                        return Err(Stop::Refused(Outcome::Temporary {
                            code: None,
                            reason: format!(
                                "{target} does not offer STARTTLS, which the configuration requires"
                            ),
                        }));
                    }
                    self.command(&mut client, "STARTTLS", b"STARTTLS\r\n")
                        .await?;
                    Ok(())
                }
                .await;
                if let Err(stop) = upgraded {
                    return self.finish(&mut client, Err(stop)).await;
                }
                let mut client = match self.handshake(client).await {
                    Ok(client) => client,
                    Err(stop) => return stop.into_outcome(),
                };
                let result = async {
                    let caps = self.ehlo(&mut client).await?;
                    self.authenticate(&mut client, &caps).await?;
                    self.transaction(&mut client, &caps, wire, size, eight_bit)
                        .await
                }
                .await;
                self.finish(&mut client, result).await
            }
            TlsMode::Implicit => {
                let mut client = match self.handshake(client).await {
                    Ok(client) => client,
                    Err(stop) => return stop.into_outcome(),
                };
                let result = async {
                    let caps = self.open(&mut client).await?;
                    self.transaction(&mut client, &caps, wire, size, eight_bit)
                        .await
                }
                .await;
                self.finish(&mut client, result).await
            }
        }
    }

    /// Runs `fut` for at most `limit`, cut at the overall deadline.
    pub(super) async fn step<T>(
        &self,
        limit: Duration,
        what: &str,
        fut: impl Future<Output = mail_send::Result<T>>,
    ) -> Flow<T> {
        let budget = limit.min(self.deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(budget, fut).await {
            Ok(Ok(value)) => Ok(value),
            // mail-send's own timer (set to the same bound) may fire first.
            Ok(Err(mail_send::Error::Timeout)) | Err(_) => Err(timed_out(what, budget)),
            Ok(Err(e)) => Err(failure(what, e)),
        }
    }

    /// Sends `line` and returns the reply when it is 2xx or 3xx; a 4xx/5xx
    /// (or anything else) stops the session, classified.
    pub(super) async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        what: &str,
        line: &[u8],
    ) -> Flow<Response<String>> {
        let reply = self
            .step(self.cfg.command_timeout, what, client.cmd(line))
            .await?;
        if (200..400).contains(&reply.code) {
            Ok(reply)
        } else {
            Err(Stop::Refused(classify(what, &reply)))
        }
    }

    /// Greeting, EHLO and (outside STARTTLS) AUTH: the server's capabilities.
    async fn open<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
    ) -> Flow<EhloResponse<String>> {
        let greeting = self
            .step(self.cfg.command_timeout, "the greeting", client.read())
            .await?;
        if !(200..300).contains(&greeting.code) {
            return Err(Stop::Refused(classify("the greeting", &greeting)));
        }
        let caps = self.ehlo(client).await?;
        if self.cfg.tls != TlsMode::StartTls {
            self.authenticate(client, &caps).await?;
        }
        Ok(caps)
    }

    async fn ehlo<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
    ) -> Flow<EhloResponse<String>> {
        let helo = &self.cfg.helo_name;
        self.step(self.cfg.command_timeout, "EHLO", client.ehlo(helo))
            .await
    }

    async fn handshake(
        &self,
        client: SmtpClient<TcpStream>,
    ) -> Flow<SmtpClient<tokio_rustls::client::TlsStream<TcpStream>>> {
        let connector = tls_connector().map_err(|e| {
            Stop::Broken(Outcome::Temporary {
                code: None,
                reason: format!("TLS set-up: {e}"),
            })
        })?;
        let what = format!("the TLS handshake with {}", self.cfg.host);
        self.step(
            self.cfg.command_timeout,
            &what,
            client.into_tls(&connector, &self.cfg.host),
        )
        .await
    }

    /// Says QUIT when the connection is still in a state to hear it (within
    /// what is left of the deadline, reply ignored) and returns the verdict.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        result: Flow<Outcome>,
    ) -> Outcome {
        let (outcome, usable) = match result {
            Ok(outcome) => (outcome, true),
            Err(Stop::Refused(outcome)) => (outcome, true),
            Err(Stop::Broken(outcome)) => (outcome, false),
        };
        if usable {
            let budget = self
                .cfg
                .command_timeout
                .min(self.deadline.saturating_duration_since(Instant::now()));
            if !budget.is_zero() {
                let _ = tokio::time::timeout(budget, client.cmd(b"QUIT\r\n")).await;
            }
        }
        outcome
    }
}

/// A refusal of `what`: 5xx permanent, anything else temporary.
pub(super) fn classify(what: &str, reply: &Response<String>) -> Outcome {
    let reason = format!("{what}: {}", reply_line(reply));
    if (500..600).contains(&reply.code) {
        Outcome::Permanent {
            code: Some(reply.code),
            reason,
        }
    } else {
        Outcome::Temporary {
            code: Some(reply.code),
            reason,
        }
    }
}

fn timed_out(what: &str, budget: Duration) -> Stop {
    Stop::Broken(Outcome::Temporary {
        code: None,
        reason: format!("{what}: timed out after {} ms", budget.as_millis()),
    })
}

/// A mail-send error during `what`. Replies are classified; everything else
/// is temporary and leaves the connection unusable.
fn failure(what: &str, error: mail_send::Error) -> Stop {
    use mail_send::Error as E;
    let broken = |detail: String| {
        Stop::Broken(Outcome::Temporary {
            code: None,
            reason: format!("{what}: {detail}"),
        })
    };
    match error {
        E::UnexpectedReply(reply) | E::AuthenticationFailed(reply) => {
            Stop::Refused(classify(what, &reply))
        }
        E::Io(e) => broken(e.to_string()),
        E::Tls(e) => broken(format!("TLS: {e}")),
        E::Timeout => broken("timed out".into()),
        E::UnparseableReply => broken("connection closed or unreadable reply".into()),
        E::InvalidTLSName => broken("the host is not a valid TLS server name".into()),
        other => broken(other.to_string()),
    }
}

/// The TLS client configuration: rustls with the ring provider and the
/// operating system's trust store, built once per process.
fn tls_connector() -> Result<TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_platform_verifier()
                .map_err(|e| e.to_string())?
                .with_no_client_auth();
            Ok(TlsConnector::from(Arc::new(config)))
        })
        .clone()
}
