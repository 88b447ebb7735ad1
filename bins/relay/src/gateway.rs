//! The production [`Backend`]: recipients are agents in the store; a
//! message is parsed, authenticated (SPF on the envelope, DKIM, DMARC —
//! the original's flaw 29), signed with each owner's newest signing secret
//! (`X-E2A-Auth-*`), threaded and stored for every recipient agent in **one
//! transaction** with its `email.received` events
//! ([`e2a_store::inbound::ingest_batch`], group-committed with other
//! sessions' messages by [`crate::ingests`]). The session answers `250`
//! only after that transaction committed; any storage error is
//! `451 4.3.0`, and nothing partial remains (flaw 3).
//!
//! DMARC rejection: an agent that opted in (`reject_dmarc_failures`) does
//! not receive mail that fails DMARC under a `p=reject` policy
//! ([`AuthVerdict::should_reject`]). When every recipient opted in the
//! message is refused with `550 5.7.1`; otherwise it is stored for the
//! others only. When DMARC cannot be decided now
//! ([`AuthVerdict::should_defer`]) and any recipient opted in, the whole
//! message is answered `451 4.7.0` so the sender retries.
//!
//! The signed sender (`X-E2A-Auth-Sender`) is the `From` address DMARC
//! judged ([`AuthVerdict::author`]), never one only `mail-parser` saw.
//!
//! The conversation header is trusted only when a passing DKIM signature of
//! a configured signing domain covers it (flaw 28); see
//! [`e2a_mail::conversation::trusted_conversation_id`].
//!
//! NUL characters are dropped from every text field taken from the message
//! or the envelope before it is signed and stored (see [`storable`]); the
//! raw message keeps every byte.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use e2a_mail::{
    auth::{AuthInput, AuthVerdict, Authenticator},
    conversation, headers,
    parse::ParsedMessage,
};
use e2a_store::{
    Store,
    account_limits::Limits,
    address::EmailAddress,
    agents::{self, Recipient},
    ids::{MessageId, SigningSecretId, UserId},
    inbound::{Delivery, Outcome},
    signing_secrets::{self, SigningSecret},
};
use time::OffsetDateTime;

use crate::{
    backend::{Backend, DeliveryOutcome, Envelope, RecipientCheck},
    ingests::{Ingester, Received},
    recipients::RecipientCache,
};

/// How often at most `last_signed_at` of one signing secret is written:
/// the column says "in use recently", not "at this second", and one UPDATE
/// per message would put a shared row lock on every tenant's ingest path.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// The store-backed gateway.
pub struct Gateway {
    store: Store,
    /// `None` when DNS checks are disabled (`E2A_SMTP_AUTH_DNS=disabled`).
    authenticator: Option<Authenticator>,
    local_host: String,
    trusted_signing_domains: Vec<String>,
    /// Caps of accounts without an `account_limits` row (`E2A_LIMITS_*`).
    default_limits: Limits,
    /// When each signing secret's `last_signed_at` was last written.
    touched: Mutex<HashMap<SigningSecretId, Instant>>,
    /// Recipients accepted in the last moment (`E2A_SMTP_RECIPIENT_CACHE_MS`).
    recipients: RecipientCache,
    /// Stores messages, sharing commits between sessions.
    ingester: Ingester,
}

impl Gateway {
    /// A gateway storing into `store`. `authenticator` is `None` to skip
    /// SPF/DKIM/DMARC (every verdict `none`); `local_host` is our host
    /// name; `trusted_signing_domains` may vouch for the conversation header;
    /// an accepted recipient is reused for `recipient_cache` (see
    /// [`crate::recipients`]; zero looks every `RCPT` up). Starts the
    /// recording tasks of [`crate::ingests`] (call inside a Tokio runtime).
    pub fn new(
        store: Store,
        authenticator: Option<Authenticator>,
        local_host: String,
        trusted_signing_domains: Vec<String>,
        default_limits: Limits,
        recipient_cache: Duration,
    ) -> Self {
        Self {
            ingester: Ingester::spawn(store.clone()),
            store,
            authenticator,
            local_host,
            trusted_signing_domains,
            default_limits,
            touched: Mutex::new(HashMap::new()),
            recipients: RecipientCache::new(recipient_cache),
        }
    }

    /// Records, off the reply path and at most every [`TOUCH_EVERY`] per
    /// secret, that these secrets signed something (best effort).
    fn touch(&self, secrets: impl Iterator<Item = SigningSecretId>) {
        let now = Instant::now();
        let due: Vec<SigningSecretId> = {
            let mut touched = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
            // Bounded: entries older than the period are dropped.
            touched.retain(|_, at| now.duration_since(*at) < TOUCH_EVERY);
            secrets
                .filter(|id| touched.insert(id.clone(), now).is_none())
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Ok(client) = store.client().await {
                for id in &due {
                    let _ = signing_secrets::touch(&client, id).await;
                }
            }
        });
    }

    async fn verdict(&self, envelope: &Envelope<Recipient>, raw: &[u8]) -> AuthVerdict {
        match &self.authenticator {
            Some(authenticator) => {
                let input = AuthInput {
                    raw,
                    remote_ip: envelope
                        .remote_ip
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    helo: &envelope.helo,
                    mail_from: &envelope.mail_from,
                    local_host: &self.local_host,
                };
                authenticator.authenticate(&input).await
            }
            None => e2a_mail::cpu::run_for(raw.len(), || AuthVerdict::unchecked(raw)).await,
        }
    }
}

impl Backend for Gateway {
    type Recipient = Recipient;

    async fn recipient(&self, address: &EmailAddress) -> RecipientCheck<Recipient> {
        if let Some(recipient) = self.recipients.get(address.as_str()) {
            metrics::counter!("e2a_smtp_recipient_cache_hits_total").increment(1);
            return RecipientCheck::Accept(recipient);
        }
        metrics::counter!("e2a_smtp_recipient_lookups_total").increment(1);
        let looked_up = Instant::now();
        let lookup = async {
            let client = self.store.client().await?;
            agents::resolve_recipient(&client, address, &self.default_limits).await
        };
        match lookup.await {
            Ok(Some(recipient)) if recipient.over_quota.is_some() => {
                tracing::info!(quota = ?recipient.over_quota, "recipient's account is over quota");
                self.recipients.forget(address.as_str());
                RecipientCheck::OverQuota
            }
            Ok(Some(recipient)) => {
                self.recipients.put(address.as_str(), &recipient, looked_up);
                RecipientCheck::Accept(recipient)
            }
            Ok(None) => {
                self.recipients.forget(address.as_str());
                RecipientCheck::Unknown
            }
            Err(e) => {
                tracing::warn!(error = %e2a_runtime::error_chain(&e), "recipient lookup failed");
                RecipientCheck::TempFail
            }
        }
    }

    async fn deliver(&self, envelope: &Envelope<Recipient>, raw: Vec<u8>) -> DeliveryOutcome {
        // Parsed and hashed once, off the executor.
        let (parsed, body_sha256) = e2a_mail::cpu::run_for(raw.len(), || {
            (
                e2a_mail::parse::parse(&raw),
                e2a_store::inbound::body_sha256(&raw),
            )
        })
        .await;
        let verdict = self.verdict(envelope, &raw).await;
        if verdict.should_defer()
            && envelope
                .recipients
                .iter()
                .any(|(_, r)| r.reject_dmarc_failures)
        {
            tracing::info!(
                dmarc = verdict.dmarc.as_str(),
                "message deferred: DMARC undecided, a recipient opted in to rejection"
            );
            return DeliveryOutcome::Deferred {
                code: 451,
                esc: [4, 7, 0],
                message: "DMARC of the From domain cannot be evaluated now, try again later".into(),
            };
        }
        let recipients: Vec<&Recipient> = envelope
            .recipients
            .iter()
            .map(|(_, r)| r)
            .filter(|r| !(r.reject_dmarc_failures && verdict.should_reject()))
            .collect();
        if recipients.is_empty() {
            tracing::info!(
                dmarc = verdict.dmarc.as_str(),
                "message refused: DMARC failure, recipients opted in to rejection"
            );
            return DeliveryOutcome::Reject {
                code: 550,
                esc: [5, 7, 1],
                message: "message rejected: it fails the DMARC policy of its From domain".into(),
            };
        }
        if recipients.len() < envelope.recipients.len() {
            tracing::info!(
                dropped = envelope.recipients.len() - recipients.len(),
                "DMARC failure: not delivered to agents that opted in to rejection"
            );
        }
        match self
            .store_for(envelope, raw, body_sha256, &parsed, &verdict, &recipients)
            .await
        {
            Ok(outcomes) => {
                let id = outcomes
                    .first()
                    .map(|o| match o {
                        Outcome::Stored { message_id, .. } | Outcome::Duplicate { message_id } => {
                            message_id.to_string()
                        }
                    })
                    .unwrap_or_default();
                let duplicates = outcomes
                    .iter()
                    .filter(|o| matches!(o, Outcome::Duplicate { .. }))
                    .count();
                metrics::counter!("e2a_smtp_messages_stored_total")
                    .increment((outcomes.len() - duplicates) as u64);
                if duplicates > 0 {
                    metrics::counter!("e2a_smtp_messages_duplicate_total")
                        .increment(duplicates as u64);
                }
                tracing::info!(message.id = %id, recipients = outcomes.len(), duplicates, spf = verdict.spf.as_str(), dkim = verdict.dkim.as_str(), dmarc = verdict.dmarc.as_str(), "message stored");
                DeliveryOutcome::Accepted { id }
            }
            Err(e) => {
                tracing::warn!(error = %e2a_runtime::error_chain(&e), "storing a message failed; answered 451");
                DeliveryOutcome::TempFail
            }
        }
    }
}

impl Gateway {
    /// Signs and stores the message for `recipients` (one transaction,
    /// maybe shared with other sessions' messages: [`crate::ingests`]).
    async fn store_for(
        &self,
        envelope: &Envelope<Recipient>,
        raw: Vec<u8>,
        body_sha256: String,
        parsed: &ParsedMessage,
        verdict: &AuthVerdict,
        recipients: &[&Recipient],
    ) -> Result<Vec<Outcome>, e2a_store::StoreError> {
        let trusted: Vec<&str> = self
            .trusted_signing_domains
            .iter()
            .map(String::as_str)
            .collect();
        let trusted_conversation = conversation::trusted_conversation_id(parsed, verdict, &trusted);
        // X-E2A-Auth-Sender is the From address DMARC judged (mail-auth's
        // parse, not mail-parser's); the display sender prefers Reply-To
        // (spec §6.4).
        let from = storable(verdict.author().unwrap_or(&envelope.mail_from)).into_owned();
        let subject = storable(&parsed.subject);
        let (to, cc, reply_to) = (
            storable_all(&parsed.to),
            storable_all(&parsed.cc),
            storable_all(&parsed.reply_to),
        );
        let display_sender = reply_to.first().cloned().unwrap_or_else(|| from.clone());
        let now = OffsetDateTime::now_utc();

        // What every copy's headers assert, but its own message id.
        let signed_facts =
            headers::AuthHeaderInput::from_verdict(verdict, from.clone(), now, "", &body_sha256);
        let mut secrets: HashMap<UserId, SigningSecret> = HashMap::new();
        let mut deliveries = Vec::with_capacity(recipients.len());
        {
            for r in recipients {
                if !secrets.contains_key(&r.user_id) {
                    // Read with the recipient at RCPT (no extra round trip);
                    // created under the user lock on the owner's first mail.
                    let secret = match &r.signing_secret {
                        Some(secret) => secret.clone(),
                        None => {
                            let mut client = self.store.client().await?;
                            signing_secrets::newest_or_create(&mut client, &r.user_id).await?
                        }
                    };
                    secrets.insert(r.user_id.clone(), secret);
                }
                let secret = &secrets[&r.user_id];
                let message_id = MessageId::new();
                let input = headers::AuthHeaderInput {
                    message_id: message_id.as_str().to_owned(),
                    ..signed_facts.clone()
                };
                let signed = headers::sign(&input, secret.secret.as_bytes());
                let auth_headers: serde_json::Map<String, serde_json::Value> = signed
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                deliveries.push(Delivery {
                    message_id,
                    agent_domain: r
                        .agent_id
                        .split_once('@')
                        .map(|(_, d)| d.to_owned())
                        .unwrap_or_default(),
                    agent_id: r.agent_id.clone(),
                    user_id: r.user_id.clone(),
                    auth_headers: serde_json::Value::Object(auth_headers),
                    // Enqueued with the message, POSTed by the deliverer:
                    // never inline in this session (flaw 5).
                    legacy_push: r.legacy_push,
                });
            }
        }
        let received = Received {
            raw,
            body_sha256,
            email_message_id: storable(parsed.message_id.as_deref().unwrap_or("")).into_owned(),
            sender: display_sender,
            subject: subject.into_owned(),
            to,
            cc,
            reply_to,
            thread_refs: storable_all(&parsed.thread_ids()),
            trusted_conversation_id: trusted_conversation,
            spf: verdict.spf.as_str(),
            dkim: verdict.dkim.as_str(),
            dmarc: verdict.dmarc.as_str(),
            deliveries,
        };
        let outcomes = self.ingester.record(received).await?;
        self.touch(secrets.values().map(|s| s.id.clone()));
        Ok(outcomes)
    }
}

/// `s` without NUL characters. PostgreSQL `text` and `jsonb` cannot hold
/// U+0000, yet a message may carry it in any header (raw, or RFC 2047-encoded
/// as `=?utf-8?q?=00?=`) and an envelope sender in a quoted local part
/// (`MAIL FROM:<"a\0b"@example.com>`). Stored as is, it fails the whole
/// transaction on every attempt: the sender would get `451` for ever.
fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', ""))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`storable`] for a list.
fn storable_all(list: &[String]) -> Vec<String> {
    list.iter().map(|s| storable(s).into_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_text_drops_nul_characters_only() {
        assert!(matches!(storable("plain \u{fffd} text"), Cow::Borrowed(_)));
        assert_eq!(storable("\0a\0\0b\0"), "ab");
        assert_eq!(storable("\0"), "");
        assert_eq!(
            storable_all(&["x\0@y".into(), "z@w".into()]),
            ["x@y", "z@w"]
        );
    }
}
