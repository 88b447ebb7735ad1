//! The mail transaction: `MAIL FROM` (with `SIZE`, `BODY=8BITMIME` and
//! `SMTPUTF8` when they apply and the server offers them), one `RCPT TO`
//! per recipient (each classified on its own), `DATA`, the message and the
//! final reply, which decides [`Outcome::Sent`].

use mail_send::SmtpClient;
use smtp_proto::{EXT_8BIT_MIME, EXT_SIZE, EXT_SMTP_UTF8, EhloResponse};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{
    MAX_REPLY_TEXT, Outcome, RecipientResult, RecipientStatus,
    session::{Flow, Session, Stop, classify},
    text::{clip, queue_id, reply_text, to_reply},
};

impl Session<'_> {
    /// MAIL, RCPTs, DATA: the verdict.
    pub(super) async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut SmtpClient<S>,
        caps: &EhloResponse<String>,
        wire: &[u8],
        size: usize,
        eight_bit: bool,
    ) -> Flow<Outcome> {
        let envelope = self.envelope;
        let mut params = String::new();
        if caps.has_capability(EXT_SIZE) {
            params.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit && caps.has_capability(EXT_8BIT_MIME) {
            params.push_str(" BODY=8BITMIME");
        }
        let international =
            !envelope.mail_from.is_ascii() || envelope.rcpt_to.iter().any(|r| !r.is_ascii());
        if international {
            if !caps.has_capability(EXT_SMTP_UTF8) {
                return Err(Stop::Refused(Outcome::Permanent {
                    code: None,
                    reason: "the envelope has non-ASCII addresses and the server does not offer SMTPUTF8".into(),
                }));
            }
            params.push_str(" SMTPUTF8");
        }
        let line = format!("MAIL FROM:<{}>{params}\r\n", envelope.mail_from);
        self.command(client, "MAIL FROM", line.as_bytes()).await?;

        for rcpt in &envelope.rcpt_to {
            let line = format!("RCPT TO:<{rcpt}>\r\n");
            let reply = self
                .step(
                    self.cfg.command_timeout,
                    "RCPT TO",
                    client.cmd(line.as_bytes()),
                )
                .await?;
            let text = reply_text(&reply);
            let status = match reply.code {
                200..=299 => RecipientStatus::Accepted,
                500..=599 => RecipientStatus::Permanent {
                    code: reply.code,
                    text,
                },
                code => RecipientStatus::Temporary { code, text },
            };
            self.submission.recipients.push(RecipientResult {
                address: rcpt.clone(),
                status,
            });
        }
        if let Some(refused) = none_accepted(&self.submission.recipients) {
            return Err(Stop::Refused(refused));
        }

        let reply = self
            .step(self.cfg.command_timeout, "DATA", client.cmd(b"DATA\r\n"))
            .await?;
        if reply.code != 354 {
            self.submission.data = Some(to_reply(&reply));
            return Err(Stop::Refused(classify("DATA", &reply)));
        }
        let transfer = async {
            client.stream.write_all(wire).await?;
            client.stream.flush().await?;
            client.read().await
        };
        let what = "the reply to the message";
        let reply = self.step(self.cfg.data_timeout, what, transfer).await?;
        self.submission.data = Some(to_reply(&reply));
        if (200..300).contains(&reply.code) {
            let text = reply_text(&reply);
            Ok(Outcome::Sent {
                code: reply.code,
                queue_id: queue_id(&text),
                reply: text,
            })
        } else {
            Err(Stop::Refused(classify(what, &reply)))
        }
    }
}

/// Every recipient refused: temporary if any got a 4xx, else permanent.
/// `None` when at least one was accepted.
fn none_accepted(recipients: &[RecipientResult]) -> Option<Outcome> {
    if recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Accepted)
    {
        return None;
    }
    let mut first_temporary = None;
    let mut first_permanent = None;
    let mut details = Vec::new();
    for r in recipients {
        match &r.status {
            RecipientStatus::Accepted => {}
            RecipientStatus::Temporary { code, text } => {
                first_temporary.get_or_insert(*code);
                details.push(format!("{}: {code} {text}", r.address));
            }
            RecipientStatus::Permanent { code, text } => {
                first_permanent.get_or_insert(*code);
                details.push(format!("{}: {code} {text}", r.address));
            }
        }
    }
    let reason = clip(
        format!("no recipient accepted ({})", details.join("; ")),
        2 * MAX_REPLY_TEXT,
    );
    Some(match first_temporary {
        Some(code) => Outcome::Temporary {
            code: Some(code),
            reason,
        },
        None => Outcome::Permanent {
            code: first_permanent,
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refused_recipient_decides_the_outcome() {
        let r = |address: &str, status| RecipientResult {
            address: address.into(),
            status,
        };
        let temp = RecipientStatus::Temporary {
            code: 450,
            text: "4.2.0 busy".into(),
        };
        let perm = RecipientStatus::Permanent {
            code: 550,
            text: "5.1.1 unknown".into(),
        };
        let mixed = [r("a@x", perm.clone()), r("b@x", temp.clone())];
        assert!(matches!(
            none_accepted(&mixed),
            Some(Outcome::Temporary {
                code: Some(450),
                ..
            })
        ));
        let all_perm = [r("a@x", perm.clone())];
        let Some(Outcome::Permanent { code, reason }) = none_accepted(&all_perm) else {
            panic!("not permanent")
        };
        assert_eq!(code, Some(550));
        assert!(reason.contains("a@x: 550 5.1.1 unknown"), "{reason}");
        assert_eq!(
            none_accepted(&[r("a@x", RecipientStatus::Accepted), r("b@x", perm)]),
            None
        );
    }
}
