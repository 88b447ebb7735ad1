//! `AUTH` when a username is configured: `PLAIN` (one exchange), else
//! `LOGIN` when that is all the server offers. A 535 is permanent like any
//! 5xx; a server offering neither mechanism is a temporary failure (a
//! configuration problem, not the message's). The credentials go out only
//! on the stream the session chose (TLS unless [`TlsMode::None`]).
//!
//! [`TlsMode::None`]: super::TlsMode::None

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use mail_send::SmtpClient;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, EhloResponse};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Outcome,
    session::{Flow, Session, Stop},
    text::reply_line,
};

impl Session<'_> {
    /// AUTH PLAIN (or LOGIN) when a username is configured.
    pub(super) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        caps: &EhloResponse<String>,
    ) -> Flow<()> {
        let Some(user) = &self.cfg.username else {
            return Ok(());
        };
        let pass = self.cfg.password.as_deref().unwrap_or("");
        let last = if caps.auth_mechanisms & AUTH_PLAIN != 0 {
            let token = BASE64.encode(format!("\0{user}\0{pass}"));
            self.command(
                client,
                "AUTH PLAIN",
                format!("AUTH PLAIN {token}\r\n").as_bytes(),
            )
            .await?
        } else if caps.auth_mechanisms & AUTH_LOGIN != 0 {
            let mut reply = self
                .command(client, "AUTH LOGIN", b"AUTH LOGIN\r\n")
                .await?;
            for secret in [user.as_str(), pass] {
                if reply.code != 334 {
                    break;
                }
                let line = format!("{}\r\n", BASE64.encode(secret));
                reply = self.command(client, "AUTH LOGIN", line.as_bytes()).await?;
            }
            reply
        } else {
            return Err(Stop::Refused(Outcome::Temporary {
                code: None,
                reason: "a username is configured but the server offers neither AUTH PLAIN nor AUTH LOGIN".into(),
            }));
        };
        if last.code == 235 {
            Ok(())
        } else {
            Err(Stop::Refused(Outcome::Temporary {
                code: Some(last.code),
                reason: format!("AUTH: unexpected reply {}", reply_line(&last)),
            }))
        }
    }
}
