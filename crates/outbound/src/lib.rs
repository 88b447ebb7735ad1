//! The outbound pipeline shared by every producer of an agent's mail: the
//! API's send, reply, forward and test routes, a reviewer's approval (API
//! or magic link) and the janitor's approval of an expired hold.
//!
//! [`prepare`] takes a validated [`Draft`] and does everything that is not
//! the caller's transaction: composes the MIME message (off the executor
//! when large), splits the recipients into agents of this gateway
//! (loopback: an inbound copy each, its `X-E2A-Auth-*` headers signed now
//! with the recipient owner's newest signing secret, so they are fresh when
//! stored) and everyone else (one mail-outbox delivery), and keeps it all
//! so that [`Prepared::mail`] can lend the store the
//! [`OutboundMail`] its transaction needs. Nothing here writes.

use std::collections::HashSet;

use base64::{Engine, engine::general_purpose::STANDARD};
use e2a_mail::{
    compose::{self, Attachment, Mailbox, OutgoingMessage},
    cpu, headers,
};
use e2a_store::{
    Store, StoreError,
    account_limits::Limits,
    address::EmailAddress,
    agents::{self, Agent},
    hitl::Held,
    ids::{MessageId, UserId},
    inbound::{self, Delivery, InboundMail},
    mail_outbox::RecipientKind,
    outbound::{Hold, Loopback, MessageType, OutboundMail},
    signing_secrets,
};
use serde_json::Value;
use time::OffsetDateTime;

/// Deployment facts every producer of outbound mail needs.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `E2A_OUTBOUND_FROM_DOMAIN`: the envelope sender's domain (and the
    /// test mail's `From`); empty = the agent's own domain.
    pub from_domain: String,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: i32,
}

impl Settings {
    /// The domain of `agent`'s envelope sender and of the test mail's
    /// `From`: `E2A_OUTBOUND_FROM_DOMAIN`, else the agent's own domain.
    pub fn domain_for<'a>(&'a self, agent: &'a Agent) -> &'a str {
        if self.from_domain.is_empty() {
            &agent.domain
        } else {
            &self.from_domain
        }
    }

    /// `agent`'s envelope sender (`MAIL FROM`): its local part at
    /// [`Self::domain_for`].
    pub fn envelope_sender(&self, agent: &Agent) -> String {
        let local = agent.id.split_once('@').map_or("", |(l, _)| l);
        format!("{local}@{}", self.domain_for(agent))
    }

    /// The `From` of `agent`'s platform test mail.
    pub fn test_sender(&self, agent: &Agent) -> Mailbox {
        Mailbox {
            name: Some("e2a".into()),
            address: format!("noreply@{}", self.domain_for(agent)),
        }
    }
}

/// `agent` as a `From` mailbox (its name, when it has one).
pub fn agent_mailbox(agent: &Agent) -> Mailbox {
    Mailbox {
        name: (!agent.name.trim().is_empty()).then(|| agent.name.clone()),
        address: agent.id.clone(),
    }
}

/// A message ready to prepare: validated and canonical (the API validates
/// a request; a held message was validated when it was held, and a
/// reviewer's edits before they are applied).
#[derive(Debug, Clone)]
pub struct Draft {
    /// Send, reply, forward or test.
    pub message_type: MessageType,
    /// Subject.
    pub subject: String,
    /// Canonical To.
    pub to: Vec<String>,
    /// Canonical Cc.
    pub cc: Vec<String>,
    /// Canonical Bcc.
    pub bcc: Vec<String>,
    /// Text body.
    pub text: String,
    /// HTML body.
    pub html: Option<String>,
    /// Attachments, decoded.
    pub attachments: Vec<Attachment>,
    /// The same attachments as stored on a held row.
    pub attachments_json: Option<Value>,
    /// Decided conversation (caller's, parent's or minted).
    pub conversation_id: String,
    /// In-Reply-To, bare.
    pub in_reply_to: Option<String>,
    /// References, bare.
    pub references: Vec<String>,
    /// The parent's Message-ID (reply, forward), bare, or empty.
    pub parent_email_message_id: String,
    /// The `From` mailbox (the agent, or `noreply@…` for a test).
    pub from: Mailbox,
}

/// Why [`prepare`] or [`draft_from_held`] refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message cannot be composed (a client mistake: 400).
    #[error("{0}")]
    Compose(String),
    /// A recipient is not an address (400 `invalid_recipient`).
    #[error("{0} is not an address")]
    Recipient(String),
    /// A held message's stored attachments do not decode (cannot happen
    /// for rows this gateway wrote).
    #[error("stored attachments are malformed")]
    StoredAttachments,
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Attachments as the contract sends and a held row stores them
/// (`[{filename, content_type, data(base64)}]`), decoded.
pub fn attachments_from_json(stored: Option<&Value>) -> Result<Vec<Attachment>, Error> {
    let Some(Value::Array(list)) = stored else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|a| {
            let field = |k: &str| a.get(k).and_then(Value::as_str);
            let (Some(filename), Some(content_type), Some(data)) =
                (field("filename"), field("content_type"), field("data"))
            else {
                return Err(Error::StoredAttachments);
            };
            Ok(Attachment {
                filename: filename.to_owned(),
                content_type: content_type.to_owned(),
                data: STANDARD
                    .decode(data.as_bytes())
                    .map_err(|_| Error::StoredAttachments)?,
            })
        })
        .collect()
}

/// The draft of a held message as it was held (a reviewer's edits are
/// applied to it by the caller, after validating them like a new send):
/// a reply answers its parent's Message-ID with the References chain kept
/// at the hold; a forward starts a new thread for its recipients.
pub fn draft_from_held(held: &Held, agent: &Agent, settings: &Settings) -> Result<Draft, Error> {
    let in_reply_to = (held.message_type == MessageType::Reply
        && !held.parent_email_message_id.is_empty())
    .then(|| held.parent_email_message_id.clone());
    Ok(Draft {
        message_type: held.message_type,
        subject: held.subject.clone(),
        to: held.to.clone(),
        cc: held.cc.clone(),
        bcc: held.bcc.clone(),
        text: held.body_text.clone().unwrap_or_default(),
        html: held.body_html.clone().filter(|h| !h.is_empty()),
        attachments: attachments_from_json(held.attachments_json.as_ref())?,
        attachments_json: held.attachments_json.clone(),
        conversation_id: held.conversation_id.clone(),
        in_reply_to,
        references: if held.message_type == MessageType::Reply {
            held.thread_refs.clone()
        } else {
            Vec::new()
        },
        parent_email_message_id: held.parent_email_message_id.clone(),
        from: if held.message_type == MessageType::Test {
            settings.test_sender(agent)
        } else {
            agent_mailbox(agent)
        },
    })
}

/// A composed message with its recipients split: what [`Prepared::mail`]
/// lends the store.
#[derive(Debug)]
pub struct Prepared {
    /// The draft it was made from; its decoded `attachments` are moved
    /// into [`Self::raw`] (the stored form, `attachments_json`, stays).
    pub draft: Draft,
    /// The Message-ID, bare.
    pub rfc_message_id: String,
    /// The composed MIME message (unsigned; the deliverer signs it).
    pub raw: Vec<u8>,
    sha: String,
    thread_refs: Vec<String>,
    /// Recipients outside the gateway.
    pub external: Vec<(String, RecipientKind)>,
    /// Inbound copies for recipients that are agents of this gateway.
    pub copies: Vec<Delivery>,
    mail_from: String,
    dkim_domain: String,
    max_attempts: i32,
    no_reply_to: Vec<String>,
}

/// Composes `draft` as `agent`'s message with the Message-ID
/// `rfc_message_id` (minted at accept, kept through a hold), and — unless
/// `hold` (a held message goes nowhere until it is decided) — resolves
/// which recipients are agents of this gateway and signs their copies.
/// An agent whose owner is over quota is treated like any outside
/// address: the relay refuses it when it comes back through MX, exactly
/// as for a stranger. Reads only; one lookup per recipient.
pub async fn prepare(
    store: &Store,
    settings: &Settings,
    defaults: &Limits,
    agent: &Agent,
    mut draft: Draft,
    rfc_message_id: String,
    hold: bool,
) -> Result<Prepared, Error> {
    let message = OutgoingMessage {
        from: draft.from.clone(),
        reply_to: Vec::new(),
        to: draft.to.clone(),
        cc: draft.cc.clone(),
        subject: draft.subject.clone(),
        message_id: rfc_message_id.clone(),
        date: OffsetDateTime::now_utc(),
        in_reply_to: draft.in_reply_to.clone(),
        references: draft.references.clone(),
        conversation_id: Some(draft.conversation_id.clone()),
        text: draft.text.clone(),
        html: draft.html.clone(),
        // Moved, not copied: up to 25 MiB, and nothing after the
        // composition reads them (a hold keeps `attachments_json`).
        attachments: std::mem::take(&mut draft.attachments),
    };
    let size: usize = message.text.len()
        + message.html.as_ref().map_or(0, String::len)
        + message
            .attachments
            .iter()
            .map(|a| a.data.len())
            .sum::<usize>();
    let raw = cpu::run_for(size, || compose::compose(&message))
        .await
        .map_err(|e| Error::Compose(e.to_string()))?;
    drop(message);

    let mut local = Vec::new();
    let mut external = Vec::new();
    if !hold {
        let client = store.client().await?;
        for (kind, list) in [
            (RecipientKind::To, &draft.to),
            (RecipientKind::Cc, &draft.cc),
            (RecipientKind::Bcc, &draft.bcc),
        ] {
            for address in list {
                let parsed =
                    EmailAddress::parse(address).map_err(|_| Error::Recipient(address.clone()))?;
                match agents::resolve_recipient(&client, &parsed, defaults).await? {
                    Some(r) if r.over_quota.is_none() => local.push(r),
                    _ => external.push((address.clone(), kind)),
                }
            }
        }
    }
    // Only loopback copies need the body's hash (their dedupe key and
    // signed headers): most messages have none, and the hash of a large
    // one is not free.
    let sha = if local.is_empty() {
        String::new()
    } else {
        cpu::run_for(raw.len(), || inbound::body_sha256(&raw)).await
    };
    let copies = loopback_copies(store, &local, &draft.from.address, &sha).await?;
    let thread_refs = draft
        .in_reply_to
        .iter()
        .chain(draft.references.iter())
        .cloned()
        .collect();
    Ok(Prepared {
        rfc_message_id,
        raw,
        sha,
        thread_refs,
        external,
        copies,
        mail_from: settings.envelope_sender(agent),
        dkim_domain: agent.domain.clone(),
        max_attempts: settings.max_attempts,
        no_reply_to: Vec::new(),
        draft,
    })
}

impl Prepared {
    /// The store's view of this message, stored as `message_id` of
    /// `user_id`'s agent `agent_id`; `hold` for a message held for review.
    pub fn mail<'a>(
        &'a self,
        message_id: &'a MessageId,
        user_id: &'a UserId,
        agent_id: &'a str,
        hold: Option<Hold<'a>>,
    ) -> OutboundMail<'a> {
        let draft = &self.draft;
        OutboundMail {
            message_id,
            user_id,
            agent_id,
            message_type: draft.message_type,
            rfc_message_id: &self.rfc_message_id,
            parent_email_message_id: &draft.parent_email_message_id,
            subject: &draft.subject,
            to: &draft.to,
            cc: &draft.cc,
            bcc: &draft.bcc,
            conversation_id: &draft.conversation_id,
            raw: &self.raw,
            mail_from: &self.mail_from,
            dkim_domain: &self.dkim_domain,
            external: &self.external,
            loopback: (!self.copies.is_empty()).then(|| Loopback {
                mail: InboundMail {
                    raw: &self.raw,
                    body_sha256: &self.sha,
                    email_message_id: &self.rfc_message_id,
                    sender: &draft.from.address,
                    subject: &draft.subject,
                    to: &draft.to,
                    cc: &draft.cc,
                    reply_to: &self.no_reply_to,
                    thread_refs: &self.thread_refs,
                    trusted_conversation_id: None,
                    spf: "none",
                    dkim: "none",
                    dmarc: "none",
                },
                copies: &self.copies,
            }),
            max_attempts: self.max_attempts,
            hold,
        }
    }

    /// The hold of this message, expiring at `expires_at`: its bodies,
    /// attachments and References chain, kept on the row until decided.
    pub fn hold(&self, expires_at: OffsetDateTime) -> Hold<'_> {
        Hold {
            expires_at,
            body_text: &self.draft.text,
            body_html: self.draft.html.as_deref(),
            attachments_json: self.draft.attachments_json.as_ref(),
            thread_refs: &self.draft.references,
        }
    }
}

/// One inbound copy per local recipient agent, its `X-E2A-Auth-*` headers
/// signed with the recipient owner's newest signing secret: verified (the
/// gateway authenticated the sender by its API key), entity `agent`.
async fn loopback_copies(
    store: &Store,
    local: &[agents::Recipient],
    sender: &str,
    body_sha256: &str,
) -> Result<Vec<Delivery>, Error> {
    if local.is_empty() {
        return Ok(Vec::new());
    }
    let now = OffsetDateTime::now_utc();
    let mut client = store.client().await?;
    let mut seen = HashSet::new();
    let mut copies = Vec::new();
    for r in local {
        if !seen.insert(r.agent_id.clone()) {
            continue;
        }
        let secret = match &r.signing_secret {
            Some(s) => s.clone(),
            None => signing_secrets::newest_or_create(&mut client, &r.user_id).await?,
        };
        let message_id = MessageId::new();
        let input = headers::AuthHeaderInput {
            verified: true,
            sender: sender.to_owned(),
            domain_check: "loopback=pass".into(),
            timestamp: now,
            message_id: message_id.as_str().to_owned(),
            body_sha256: body_sha256.to_owned(),
            delegation: None,
        };
        let signed: serde_json::Map<String, Value> =
            headers::sign(&input, secret.secret.as_bytes())
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
        copies.push(Delivery {
            message_id,
            agent_id: r.agent_id.clone(),
            agent_domain: r
                .agent_id
                .split_once('@')
                .map(|(_, d)| d.to_owned())
                .unwrap_or_default(),
            user_id: r.user_id.clone(),
            auth_headers: Value::Object(signed),
            legacy_push: r.legacy_push,
        });
    }
    Ok(copies)
}
