//! Outbound accept and the mail outbox (V23): one transaction per accept,
//! loopback copies, the claim's lease and send gate, records guarded by the
//! lease, retries, dead letters with `email.failed`, operator re-send, and
//! a gate that outlives its message.

use std::time::Duration;

use e2a_store::{
    Store,
    ids::MessageId,
    inbound::{self, Delivery, InboundMail},
    mail_outbox::{
        self, Gate, Outcome, RecipientAnswer, RecipientKind, RecipientState, Recorded, ResendError,
    },
    outbound::{self, Loopback, MessageType, OutboundMail},
};
use time::OffsetDateTime;

use super::messages::{Mailbox, mailbox};

const LEASE: Duration = Duration::from_secs(60);

struct Sent {
    message_id: MessageId,
    rfc: String,
}

/// Accepts a message from `from` to `external` addresses and `local`
/// mailboxes, in one transaction.
async fn send(store: &Store, from: &Mailbox, external: &[&str], local: &[&Mailbox]) -> Sent {
    let message_id = MessageId::new();
    let rfc = format!("{}@agents.localhost", e2a_store::secret::random_hex::<16>());
    let raw = format!(
        "From: {}\r\nMessage-ID: <{rfc}>\r\nSubject: hello\r\n\r\nhi\r\n",
        from.agent
    );
    let to: Vec<String> = external
        .iter()
        .map(|s| (*s).to_owned())
        .chain(local.iter().map(|m| m.agent.clone()))
        .collect();
    let ext: Vec<(String, RecipientKind)> = external
        .iter()
        .map(|a| ((*a).to_owned(), RecipientKind::To))
        .collect();
    let sha = inbound::body_sha256(raw.as_bytes());
    let copies: Vec<Delivery> = local
        .iter()
        .map(|m| Delivery {
            message_id: MessageId::new(),
            agent_id: m.agent.clone(),
            agent_domain: "agents.localhost".into(),
            user_id: m.user.clone(),
            auth_headers: serde_json::json!({}),
            legacy_push: false,
        })
        .collect();
    let refs: Vec<String> = vec![];
    let empty: Vec<String> = vec![];
    let mail = OutboundMail {
        message_id: &message_id,
        user_id: &from.user,
        agent_id: &from.agent,
        message_type: MessageType::Send,
        rfc_message_id: &rfc,
        parent_email_message_id: "",
        subject: "hello",
        to: &to,
        cc: &empty,
        bcc: &empty,
        conversation_id: "cnv_0123456789abcdef0123456789abcdef",
        raw: raw.as_bytes(),
        mail_from: &from.agent,
        dkim_domain: "agents.localhost",
        external: &ext,
        loopback: (!copies.is_empty()).then(|| Loopback {
            mail: InboundMail {
                raw: raw.as_bytes(),
                body_sha256: &sha,
                email_message_id: &rfc,
                sender: &from.agent,
                subject: "hello",
                to: &to,
                cc: &empty,
                reply_to: &empty,
                thread_refs: &refs,
                trusted_conversation_id: None,
                spf: "none",
                dkim: "none",
                dmarc: "none",
            },
            copies: &copies,
        }),
        max_attempts: 3,
        hold: None,
    };
    let accepted = store
        .transaction(&mail, |tx, mail| Box::pin(outbound::accept(tx, mail)))
        .await
        .unwrap();
    accepted.wake(store);
    Sent { message_id, rfc }
}

async fn one(store: &Store, sql: &str, p: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> i64 {
    store
        .client()
        .await
        .unwrap()
        .query_one(sql, p)
        .await
        .unwrap()
        .get(0)
}

async fn message_status(store: &Store, id: &MessageId) -> String {
    store
        .client()
        .await
        .unwrap()
        .query_one("SELECT status FROM messages WHERE id = $1", &[id])
        .await
        .unwrap()
        .get(0)
}

async fn claim(store: &Store) -> Vec<mail_outbox::ClaimedMail> {
    let c = store.client().await.unwrap();
    mail_outbox::claim(&c, 10, LEASE, LEASE).await.unwrap()
}

fn all(job: &mail_outbox::ClaimedMail, state: RecipientState, code: u16) -> Vec<RecipientAnswer> {
    job.recipients
        .iter()
        .map(|a| RecipientAnswer {
            address: a.clone(),
            state,
            code: Some(code),
            reply: format!("{code} ok"),
        })
        .collect()
}

#[tokio::test]
async fn a_send_is_queued_claimed_once_and_recorded_sent_with_its_event() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let sent = send(
        &store,
        &alice,
        &["bob@example.net", "carol@example.net"],
        &[],
    )
    .await;
    assert_eq!(message_status(&store, &sent.message_id).await, "queued");

    let jobs = claim(&store).await;
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.gate, Gate::Acquired);
    assert_eq!(job.recipients, ["bob@example.net", "carol@example.net"]);
    assert!(String::from_utf8_lossy(&job.body).contains(&sent.rfc));
    assert_eq!(message_status(&store, &sent.message_id).await, "sending");
    assert!(
        claim(&store).await.is_empty(),
        "leased: nobody else gets it"
    );

    let started = OffsetDateTime::now_utc();
    let answers = all(job, RecipientState::Sent, 250);
    let outcome = Outcome::Sent {
        code: 250,
        reply: "2.0.0 queued as X".into(),
    };
    assert_eq!(
        mail_outbox::record(&store, job, started, &outcome, &answers)
            .await
            .unwrap(),
        Recorded::Done("sent")
    );
    // A second record with the same (now cleared) lease writes nothing.
    assert_eq!(
        mail_outbox::record(&store, job, started, &outcome, &answers)
            .await
            .unwrap(),
        Recorded::LeaseLost
    );
    assert_eq!(message_status(&store, &sent.message_id).await, "sent");
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = $1",
            &[&sent.message_id]
        )
        .await,
        1
    );
    let detail = mail_outbox::show(&store.client().await.unwrap(), job.delivery_id.as_str())
        .await
        .unwrap();
    assert_eq!(detail.gate.as_deref(), Some("sent"));
    assert_eq!(detail.attempts.len(), 1);
    assert_eq!(detail.attempts[0].smtp_code, Some(250));
    assert!(detail.recipients.iter().all(|r| r.status == "sent"));
    assert!(claim(&store).await.is_empty(), "sent is final");
}

#[tokio::test]
async fn loopback_copies_commit_with_the_message_and_nothing_leaves() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let bob = mailbox(&store, "bob").await;
    let carol = mailbox(&store, "carol").await;

    // Only local recipients: sent at once, no outbox delivery.
    let sent = send(&store, &alice, &[], &[&bob, &carol]).await;
    assert_eq!(message_status(&store, &sent.message_id).await, "sent");
    assert_eq!(
        one(&store, "SELECT count(*) FROM mail_deliveries", &[]).await,
        0
    );
    for m in [&bob, &carol] {
        assert_eq!(
            one(
                &store,
                "SELECT count(*) FROM messages WHERE agent_id = $1 AND direction = 'inbound' \
                   AND email_message_id = $2",
                &[&m.agent, &sent.rfc]
            )
            .await,
            1
        );
        assert_eq!(
            one(
                &store,
                "SELECT count(*) FROM webhook_events WHERE type = 'email.received' AND agent_id = $1",
                &[&m.agent]
            )
            .await,
            1
        );
    }
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = $1",
            &[&sent.message_id]
        )
        .await,
        1
    );

    // Mixed: the local copy now, the external one through the outbox.
    let mixed = send(&store, &alice, &["dave@example.net"], &[&bob]).await;
    assert_eq!(message_status(&store, &mixed.message_id).await, "queued");
    let jobs = claim(&store).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].recipients, ["dave@example.net"]);
}

#[tokio::test]
async fn a_failing_accept_leaves_nothing() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let message_id = MessageId::new();
    let ext = vec![("bob@example.net".to_owned(), RecipientKind::To)];
    let to = vec!["bob@example.net".to_owned()];
    let mail = OutboundMail {
        message_id: &message_id,
        user_id: &alice.user,
        agent_id: &alice.agent,
        message_type: MessageType::Send,
        rfc_message_id: "x@y",
        parent_email_message_id: "",
        subject: "s",
        to: &to,
        cc: &[],
        bcc: &[],
        conversation_id: "cnv_x",
        raw: b"Subject: s\r\n\r\nx\r\n",
        mail_from: &alice.agent,
        dkim_domain: "",
        external: &ext,
        loopback: None,
        max_attempts: 3,
        hold: None,
    };
    // The accept succeeds, then the transaction fails after it: rolled back.
    let result: Result<(), _> = store
        .transaction(&mail, |tx, mail| {
            Box::pin(async move {
                outbound::accept(tx, mail).await?;
                tx.execute("SELECT 1/0", &[]).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err());
    for table in [
        "messages",
        "mail_deliveries",
        "mail_payloads",
        "mail_recipients",
    ] {
        assert_eq!(
            one(&store, &format!("SELECT count(*) FROM {table}"), &[]).await,
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn retries_then_a_dead_letter_with_email_failed_then_an_operator_resend() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let sent = send(
        &store,
        &alice,
        &["bob@example.net", "carol@example.net"],
        &[],
    )
    .await;

    // Attempt 1: bob accepted, carol 450: retry only carol.
    let job = claim(&store).await.remove(0);
    let answers = vec![
        RecipientAnswer {
            address: "bob@example.net".into(),
            state: RecipientState::Sent,
            code: Some(250),
            reply: "ok".into(),
        },
        RecipientAnswer {
            address: "carol@example.net".into(),
            state: RecipientState::Pending,
            code: Some(450),
            reply: "4.2.0 busy".into(),
        },
    ];
    let retry = Outcome::Retry {
        at: OffsetDateTime::now_utc() - time::Duration::seconds(1),
        code: Some(450),
        error: "450 4.2.0 busy".into(),
    };
    assert_eq!(
        mail_outbox::record(&store, &job, OffsetDateTime::now_utc(), &retry, &answers)
            .await
            .unwrap(),
        Recorded::Done("retrying")
    );
    assert_eq!(message_status(&store, &sent.message_id).await, "queued");

    // Attempt 2: only carol is left; 450 again.
    let job = claim(&store).await.remove(0);
    assert_eq!(job.gate, Gate::Acquired, "a failed gate is taken again");
    assert_eq!(job.recipients, ["carol@example.net"]);
    let answers = all(&job, RecipientState::Pending, 450);
    mail_outbox::record(&store, &job, OffsetDateTime::now_utc(), &retry, &answers)
        .await
        .unwrap();

    // Attempt 3 of 3: 550 → dead letter.
    let job = claim(&store).await.remove(0);
    let answers = all(&job, RecipientState::Failed, 550);
    let dead = Outcome::DeadLetter {
        code: Some(550),
        error: "550 5.1.1 no such user".into(),
    };
    assert_eq!(
        mail_outbox::record(&store, &job, OffsetDateTime::now_utc(), &dead, &answers)
            .await
            .unwrap(),
        Recorded::Done("dead_lettered")
    );
    assert_eq!(message_status(&store, &sent.message_id).await, "failed");
    let c = store.client().await.unwrap();
    let event: serde_json::Value = c
        .query_one(
            "SELECT envelope FROM webhook_events WHERE type = 'email.failed' AND message_id = $1",
            &[&sent.message_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(event["data"]["smtp_code"], 550);
    assert_eq!(
        event["data"]["failed_recipients"][0]["address"],
        "carol@example.net"
    );
    assert_eq!(event["data"]["attempts"], 3);
    assert_eq!(mail_outbox::dead_letters(&c, 10).await.unwrap().len(), 1);
    assert!(claim(&store).await.is_empty());

    // Operator re-send: pending again, carol only, dead letter kept.
    mail_outbox::resend(&store, job.delivery_id.as_str())
        .await
        .unwrap();
    assert_eq!(message_status(&store, &sent.message_id).await, "queued");
    let job = claim(&store).await.remove(0);
    assert_eq!(job.recipients, ["carol@example.net"]);
    assert_eq!(job.attempts, 0);
    let ok = Outcome::Sent {
        code: 250,
        reply: "ok".into(),
    };
    let answers = all(&job, RecipientState::Sent, 250);
    mail_outbox::record(&store, &job, OffsetDateTime::now_utc(), &ok, &answers)
        .await
        .unwrap();
    assert!(matches!(
        mail_outbox::resend(&store, job.delivery_id.as_str()).await,
        Err(ResendError::AlreadySent)
    ));
    let detail = mail_outbox::show(&c, job.delivery_id.as_str())
        .await
        .unwrap();
    let numbers: Vec<i32> = detail.attempts.iter().map(|a| a.attempt_no).collect();
    assert_eq!(numbers, [1, 2, 3, 4], "attempt numbers keep growing");
    assert_eq!(mail_outbox::dead_letters(&c, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_lapsed_lease_with_a_fresh_gate_waits_and_the_gate_outlives_the_message() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let sent = send(&store, &alice, &["bob@example.net"], &[]).await;
    let c = store.client().await.unwrap();
    let gate_stale = Duration::from_secs(600);
    let jobs = mail_outbox::claim(&c, 10, Duration::from_millis(1), gate_stale)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1);
    let first = jobs[0].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The agent (and with it the message) is deleted while it is in flight.
    c.execute("DELETE FROM agents WHERE id = $1", &[&alice.agent])
        .await
        .unwrap();
    assert_eq!(
        one(&store, "SELECT count(*) FROM messages", &[]).await,
        0,
        "the message is gone"
    );
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM send_attempts WHERE status = 'attempting'",
            &[]
        )
        .await,
        1,
        "the gate is not"
    );

    // The lease lapsed but the gate is fresh: nobody may send; it waits.
    assert!(
        mail_outbox::claim(&c, 10, LEASE, gate_stale)
            .await
            .unwrap()
            .is_empty()
    );
    let wait = one(
        &store,
        "SELECT EXTRACT(EPOCH FROM next_attempt_at - now())::int8 FROM mail_deliveries",
        &[],
    )
    .await;
    assert!((590..=600).contains(&wait), "waits for the gate: {wait}");

    // The first worker's record is refused: its lease is gone.
    let ok = Outcome::Sent {
        code: 250,
        reply: "ok".into(),
    };
    assert_eq!(
        mail_outbox::record(&store, &first, OffsetDateTime::now_utc(), &ok, &[])
            .await
            .unwrap(),
        Recorded::LeaseLost
    );

    // Once the gate is stale, a claim takes it over (the one unavoidable
    // re-send window) and the message no longer existing does not matter.
    c.execute(
        "UPDATE send_attempts SET attempted_at = now() - interval '11 minutes'",
        &[],
    )
    .await
    .unwrap();
    c.execute("UPDATE mail_deliveries SET next_attempt_at = now()", &[])
        .await
        .unwrap();
    let jobs = mail_outbox::claim(&c, 10, LEASE, gate_stale).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].gate, Gate::Acquired);
    assert!(jobs[0].message.is_none());
    assert_eq!(
        mail_outbox::record(&store, &jobs[0], OffsetDateTime::now_utc(), &ok, &[])
            .await
            .unwrap(),
        Recorded::Done("sent")
    );
    let _ = sent;
}

#[tokio::test]
async fn an_enqueue_on_an_existing_key_leaves_the_transaction_usable() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let rcpt = vec![("bob@example.net".to_owned(), RecipientKind::To)];
    let enqueue = mail_outbox::Enqueue {
        user_id: &alice.user,
        message_id: None,
        template_id: "hitl_notification",
        idempotency_key: "hitl_notification:msg_1",
        subject: "review",
        body: b"Subject: review\r\n\r\nx\r\n",
        mail_from: "noreply@agents.localhost",
        dkim_domain: "",
        recipients: &rcpt,
        max_attempts: 3,
    };
    let (first, second) = store
        .transaction(&enqueue, |tx, e| {
            Box::pin(async move {
                let first = mail_outbox::enqueue(tx, e).await?;
                let second = mail_outbox::enqueue(tx, e).await?;
                // Still usable after the conflict.
                tx.execute("SELECT 1", &[]).await?;
                Ok((first, second))
            })
        })
        .await
        .unwrap();
    assert!(first.is_some());
    assert!(second.is_none());
    assert_eq!(
        one(&store, "SELECT count(*) FROM mail_payloads", &[]).await,
        1,
        "no orphan payload"
    );
    // Agent mail about the same message uses another key: no collision.
    let agent_key = mail_outbox::Enqueue {
        template_id: outbound::AGENT_MESSAGE_TEMPLATE,
        idempotency_key: "agent_message:msg_1",
        ..enqueue.clone()
    };
    let c = store.client().await.unwrap();
    assert!(
        mail_outbox::enqueue(&c, &agent_key)
            .await
            .unwrap()
            .is_some()
    );
    let (depth, oldest) = mail_outbox::depth(&c).await.unwrap();
    assert!(depth.contains(&("pending", 2)));
    assert!(depth.contains(&("dead_lettered", 0)));
    assert!(oldest >= 0.0);
}

#[tokio::test]
async fn the_retention_sweep_deletes_finished_deliveries_only() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    send(&store, &alice, &["bob@example.net"], &[]).await;
    send(&store, &alice, &["carol@example.net"], &[]).await;
    // One is sent (its gate and attempt exist), the other still pending.
    let job = claim(&store).await.remove(0);
    let ok = Outcome::Sent {
        code: 250,
        reply: "ok".into(),
    };
    let answers = all(&job, RecipientState::Sent, 250);
    mail_outbox::record(&store, &job, OffsetDateTime::now_utc(), &ok, &answers)
        .await
        .unwrap();
    let c = store.client().await.unwrap();
    c.execute(
        "UPDATE mail_deliveries SET expires_at = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE mail_deliveries SET status = 'pending', leased_until = NULL, lease_token = NULL \
          WHERE status = 'sending'",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(mail_outbox::delete_expired(&c, 100).await.unwrap(), 1);
    for (table, left) in [
        ("mail_deliveries", 1),
        ("mail_payloads", 1),
        ("mail_attempts", 0),
        // The unfinished one keeps its gate (both were claimed).
        ("send_attempts", 1),
        ("mail_recipients", 1),
    ] {
        assert_eq!(
            one(&store, &format!("SELECT count(*) FROM {table}"), &[]).await,
            left,
            "{table}"
        );
    }
    assert_eq!(
        one(&store, "SELECT count(*) FROM messages", &[]).await,
        2,
        "messages follow their own TTL"
    );
}

/// The stored payload body of a delivery.
async fn payload_body(store: &Store, delivery_id: &str) -> Vec<u8> {
    store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT p.body FROM mail_payloads p JOIN mail_deliveries d ON d.payload_id = p.payload_id \
              WHERE d.delivery_id = $1",
            &[&delivery_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn finished_reviewer_notifications_lose_their_body_and_agent_mail_keeps_it() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let body: &[u8] =
        b"Subject: review\r\n\r\nApprove: https://e2a.example/api/v1/approve?t=single-use-token\r\n";
    let rcpt = vec![("alice@example.com".to_owned(), RecipientKind::To)];
    let c = store.client().await.unwrap();
    let mut notifications = Vec::new();
    for key in ["hitl_notification:msg_a", "hitl_notification:msg_b"] {
        let notification = mail_outbox::Enqueue {
            user_id: &alice.user,
            message_id: None,
            template_id: mail_outbox::HITL_NOTIFICATION_TEMPLATE,
            idempotency_key: key,
            subject: "review",
            body,
            mail_from: "hitl-noreply@agents.localhost",
            dkim_domain: "",
            recipients: &rcpt,
            max_attempts: 2,
        };
        let id = mail_outbox::enqueue(&c, &notification)
            .await
            .unwrap()
            .unwrap();
        notifications.push(id.as_str().to_owned());
    }
    let agent_mail = send(&store, &alice, &["bob@example.net"], &[]).await;

    let jobs = claim(&store).await;
    assert_eq!(jobs.len(), 3);
    let job_of = |id: &str| {
        jobs.iter()
            .find(|j| j.delivery_id.as_str() == id)
            .unwrap()
            .clone()
    };
    let (sent, retried) = (job_of(&notifications[0]), job_of(&notifications[1]));
    let agent = jobs.iter().find(|j| j.message.is_some()).unwrap().clone();
    let ok = Outcome::Sent {
        code: 250,
        reply: "ok".into(),
    };

    // Sent: the body (and its tokens) is gone in the same commit; the
    // subject and the history stay for operators.
    let answers = all(&sent, RecipientState::Sent, 250);
    assert_eq!(
        mail_outbox::record(&store, &sent, OffsetDateTime::now_utc(), &ok, &answers)
            .await
            .unwrap(),
        Recorded::Done("sent")
    );
    assert!(payload_body(&store, &notifications[0]).await.is_empty());
    let detail = mail_outbox::show(&c, &notifications[0]).await.unwrap();
    assert_eq!(detail.delivery.subject, "review");
    assert_eq!(detail.attempts.len(), 1);

    // A temporary failure keeps the body: the retry needs it.
    let retry = Outcome::Retry {
        at: OffsetDateTime::now_utc() - time::Duration::seconds(1),
        code: Some(450),
        error: "450 busy".into(),
    };
    let answers = all(&retried, RecipientState::Pending, 450);
    assert_eq!(
        mail_outbox::record(
            &store,
            &retried,
            OffsetDateTime::now_utc(),
            &retry,
            &answers
        )
        .await
        .unwrap(),
        Recorded::Done("retrying")
    );
    assert_eq!(payload_body(&store, &notifications[1]).await, body);

    // Agent mail keeps its body when sent.
    let answers = all(&agent, RecipientState::Sent, 250);
    mail_outbox::record(&store, &agent, OffsetDateTime::now_utc(), &ok, &answers)
        .await
        .unwrap();
    let kept = payload_body(&store, agent.delivery_id.as_str()).await;
    assert!(String::from_utf8_lossy(&kept).contains(&agent_mail.rfc));

    // The retry is claimed with its body intact, then dead-lettered: the
    // body goes too, and the operator's re-send refuses to send nothing.
    let again = claim(&store).await.remove(0);
    assert_eq!(again.delivery_id.as_str(), notifications[1]);
    assert_eq!(again.body, body);
    let dead = Outcome::DeadLetter {
        code: Some(550),
        error: "550 no such user".into(),
    };
    let answers = all(&again, RecipientState::Failed, 550);
    assert_eq!(
        mail_outbox::record(&store, &again, OffsetDateTime::now_utc(), &dead, &answers)
            .await
            .unwrap(),
        Recorded::Done("dead_lettered")
    );
    assert!(payload_body(&store, &notifications[1]).await.is_empty());
    assert!(matches!(
        mail_outbox::resend(&store, &notifications[1]).await,
        Err(ResendError::Scrubbed)
    ));
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM mail_deliveries WHERE delivery_id = $1 AND status = 'dead_lettered'",
            &[&notifications[1]],
        )
        .await,
        1,
        "the refused re-send changed nothing"
    );
    assert!(matches!(
        mail_outbox::resend(&store, &notifications[0]).await,
        Err(ResendError::AlreadySent)
    ));
}

/// Outcomes recorded together share one commit, yet each is guarded by
/// its own lease: a lost lease writes nothing for its delivery and does
/// not stop the others.
#[tokio::test]
async fn a_batch_records_each_outcome_under_its_own_lease() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let kept = send(&store, &alice, &["x@example.net"], &[]).await;
    let lost = send(&store, &alice, &["y@example.net"], &[]).await;
    let mut jobs = claim(&store).await;
    assert_eq!(jobs.len(), 2);
    let lost_at = jobs
        .iter()
        .position(|j| {
            j.message.as_ref().map(|m| m.message_id.as_str()) == Some(lost.message_id.as_str())
        })
        .unwrap();
    jobs[lost_at].lease_token = "taken-over-by-another-worker".into();
    let sent = Outcome::Sent {
        code: 250,
        reply: "2.0.0 ok".into(),
    };
    let answers: Vec<Vec<RecipientAnswer>> = jobs
        .iter()
        .map(|j| all(j, RecipientState::Sent, 250))
        .collect();
    let now = OffsetDateTime::now_utc();
    let items: Vec<mail_outbox::RecordItem<'_>> = jobs
        .iter()
        .zip(&answers)
        .map(|(job, recipients)| mail_outbox::RecordItem {
            job,
            started_at: now,
            outcome: &sent,
            recipients,
        })
        .collect();
    let recorded = mail_outbox::record_batch(&store, &items).await.unwrap();
    for (i, r) in recorded.iter().enumerate() {
        let want = if i == lost_at {
            Recorded::LeaseLost
        } else {
            Recorded::Done("sent")
        };
        assert_eq!(*r, want);
    }
    assert_eq!(message_status(&store, &kept.message_id).await, "sent");
    assert_eq!(message_status(&store, &lost.message_id).await, "sending");
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = $1",
            &[&kept.message_id.as_str()],
        )
        .await,
        1
    );
    assert_eq!(
        one(
            &store,
            "SELECT count(*) FROM mail_attempts a JOIN mail_deliveries d USING (delivery_id) \
              WHERE d.message_id = $1",
            &[&lost.message_id.as_str()],
        )
        .await,
        0,
        "nothing written under a lost lease"
    );
}
