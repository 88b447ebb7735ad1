//! Inbound ingest: fan-out, atomicity, dedupe of MTA retries, threading,
//! events written with the message and announced at commit.

use e2a_store::{
    Store, StoreError, events,
    ids::{EventId, MessageId, UserId},
    inbound::{self, Delivery, InboundMail, Outcome},
};
use serde_json::{Value, json};
use tokio_postgres::{AsyncMessage, NoTls};

struct Mail {
    raw: Vec<u8>,
    sha256: String,
    message_id: String,
    refs: Vec<String>,
    to: Vec<String>,
}

impl Mail {
    fn new(message_id: &str, body: &str) -> Self {
        let raw =
            format!("Message-ID: <{message_id}>\r\nSubject: hi\r\n\r\n{body}\r\n").into_bytes();
        Mail {
            sha256: inbound::body_sha256(&raw),
            raw,
            message_id: message_id.into(),
            refs: Vec::new(),
            to: vec!["a@alice.example".into()],
        }
    }

    fn view(&self) -> InboundMail<'_> {
        InboundMail {
            raw: &self.raw,
            body_sha256: &self.sha256,
            email_message_id: &self.message_id,
            sender: "sender@remote.example",
            subject: "hi",
            to: &self.to,
            cc: &[],
            reply_to: &[],
            thread_refs: &self.refs,
            trusted_conversation_id: None,
            spf: "pass",
            dkim: "none",
            dmarc: "none",
        }
    }
}

fn delivery(agent: &str, user: &UserId) -> Delivery {
    Delivery {
        message_id: MessageId::new(),
        agent_id: agent.into(),
        agent_domain: agent.split_once('@').unwrap().1.into(),
        user_id: user.clone(),
        auth_headers: json!({"X-E2A-Auth-Verified": "false"}),
        legacy_push: false,
    }
}

/// A connection listening on `webhook_events_new` and the channel names of
/// the notifications it receives (keep the client alive while listening).
async fn listen(
    db: &e2a_testkit::TestDb,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (listener, mut connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    listener
        .batch_execute("LISTEN webhook_events_new")
        .await
        .unwrap();
    (listener, rx)
}

/// A user `email` owning the verified `domain` and the agents `addresses`.
async fn owner(store: &Store, email: &str, domain: &str, addresses: &[&str]) -> UserId {
    let user = super::user(store, email).await;
    super::agents::verified_domain(store, &user, domain).await;
    for address in addresses {
        super::agents::agent(store, &user, address).await;
    }
    user
}

/// alice@example.com owning the verified alice.example and `addresses`.
async fn alice(store: &Store, addresses: &[&str]) -> UserId {
    owner(store, "alice@example.com", "alice.example", addresses).await
}

async fn count(db: &e2a_testkit::TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn fans_out_one_row_and_one_event_per_recipient() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let bob = owner(&store, "bob@example.com", "bob.example", &["b@bob.example"]).await;

    let mail = Mail::new("m1@remote.example", "hello");
    let deliveries = [
        delivery("a@alice.example", &alice),
        delivery("b@bob.example", &bob),
    ];
    let outcomes = inbound::ingest(&store, &mail.view(), &deliveries)
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 2);
    let mut conversations = Vec::new();
    for (o, d) in outcomes.iter().zip(&deliveries) {
        let Outcome::Stored {
            message_id,
            conversation_id,
        } = o
        else {
            panic!("{o:?}")
        };
        assert_eq!(message_id, &d.message_id);
        assert!(
            conversation_id.starts_with("cnv_") && conversation_id.len() == 36,
            "minted: {conversation_id}"
        );
        conversations.push(conversation_id.clone());
    }
    assert_ne!(
        conversations[0], conversations[1],
        "conversations are per agent"
    );

    let raw = db.client().await;
    let rows = raw
        .query(
            "SELECT user_id, agent_id, inbox_status, body_sha256, email_message_id, status, direction FROM messages ORDER BY agent_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(0), alice.as_str());
    assert_eq!(
        rows[0].get::<_, &str>(2),
        "unread",
        "flaw 14: every inbound row is unread"
    );
    assert_eq!(rows[0].get::<_, &str>(4), "m1@remote.example");

    let events = raw
        .query("SELECT user_id, type, envelope, agent_id, message_id, conversation_id FROM webhook_events ORDER BY agent_id", &[])
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    let envelope: Value = events[0].get(2);
    assert_eq!(envelope["event"], "email.received");
    assert!(envelope["id"].as_str().unwrap().starts_with("evt_"));
    let data = &envelope["data"];
    assert_eq!(data["message_id"], deliveries[0].message_id.as_str());
    assert_eq!(data["conversation_id"], conversations[0].as_str());
    assert_eq!(
        data["agent"],
        json!({"id": "a@alice.example", "email": "a@alice.example", "domain": "alice.example"})
    );
    assert_eq!(data["recipient"], "a@alice.example");
    assert_eq!(data["from"], "sender@remote.example");
    // The raw bytes are stored once, in the message row, not in the event.
    assert!(data.get("raw_message").is_none(), "{data}");
    assert_eq!(events[0].get::<_, String>(0), alice.as_str());
    assert_eq!(events[1].get::<_, String>(0), bob.as_str());

    // Rendered for delivery, the envelope carries them, identically on
    // every attempt; once the message is gone, `raw_message` is null.
    let event_id: EventId = EventId::parse(envelope["id"].as_str().unwrap()).unwrap();
    let c = store.client().await.unwrap();
    let rendered = events::render(&c, &event_id).await.unwrap().unwrap();
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(rendered["data"]["raw_message"].as_str().unwrap())
            .unwrap(),
        mail.raw
    );
    let again = events::render(&c, &event_id).await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_vec(&rendered).unwrap(),
        serde_json::to_vec(&again).unwrap()
    );
    let mut expected = envelope.clone();
    expected["data"]["raw_message"] = rendered["data"]["raw_message"].clone();
    assert_eq!(rendered, expected, "nothing else changes");
    c.execute(
        "DELETE FROM messages WHERE id = $1",
        &[&deliveries[0].message_id],
    )
    .await
    .unwrap();
    let expired = events::render(&c, &event_id).await.unwrap().unwrap();
    assert_eq!(expired["data"]["raw_message"], Value::Null);
    assert_eq!(
        expired["data"]["message_id"],
        envelope["data"]["message_id"]
    );
    assert!(
        events::render(&c, &EventId::new()).await.unwrap().is_none(),
        "unknown event"
    );
}

#[tokio::test]
async fn an_mta_retry_creates_no_second_message_or_event() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let mail = Mail::new("retry@remote.example", "same bytes");
    let first = inbound::ingest(&store, &mail.view(), &[delivery("a@alice.example", &alice)])
        .await
        .unwrap();
    let Outcome::Stored { message_id, .. } = &first[0] else {
        panic!()
    };
    let again = inbound::ingest(&store, &mail.view(), &[delivery("a@alice.example", &alice)])
        .await
        .unwrap();
    assert_eq!(
        again,
        vec![Outcome::Duplicate {
            message_id: message_id.clone()
        }]
    );
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_events").await, 1);

    // Same Message-ID, different bytes: a different message.
    let changed = Mail::new("retry@remote.example", "other bytes");
    let third = inbound::ingest(
        &store,
        &changed.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap();
    assert!(matches!(third[0], Outcome::Stored { .. }));
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 2);

    // No Message-ID at all: the same raw bytes to the same agent are still
    // recognised as a retry (flaw 2); other bytes are another message.
    let bare = |body: &str| Mail {
        raw: format!("Subject: hi\r\n\r\n{body}\r\n").into_bytes(),
        sha256: inbound::body_sha256(format!("Subject: hi\r\n\r\n{body}\r\n").as_bytes()),
        message_id: String::new(),
        refs: Vec::new(),
        to: vec!["a@alice.example".into()],
    };
    let anonymous = bare("no id");
    let first = inbound::ingest(
        &store,
        &anonymous.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap();
    let again = inbound::ingest(
        &store,
        &anonymous.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap();
    let (Outcome::Stored { message_id, .. }, Outcome::Duplicate { message_id: dup }) =
        (&first[0], &again[0])
    else {
        panic!("{first:?} {again:?}")
    };
    assert_eq!(message_id, dup);
    let other = inbound::ingest(
        &store,
        &bare("other").view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap();
    assert!(matches!(other[0], Outcome::Stored { .. }));
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 4);
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_events").await, 4);
}

#[tokio::test]
async fn concurrent_retries_store_exactly_once() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (store, alice) = (store.clone(), alice.clone());
            tokio::spawn(async move {
                let mail = Mail::new("race@remote.example", "x");
                inbound::ingest(&store, &mail.view(), &[delivery("a@alice.example", &alice)])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        if matches!(t.await.unwrap()[0], Outcome::Stored { .. }) {
            stored += 1;
        }
    }
    assert_eq!(stored, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_events").await, 1);
}

#[tokio::test]
async fn a_failure_for_one_recipient_stores_nothing_for_any() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let mail = Mail::new("atomic@remote.example", "x");
    // The second delivery names an agent that does not exist: FK violation.
    let deliveries = [
        delivery("a@alice.example", &alice),
        delivery("ghost@alice.example", &alice),
    ];
    let err = inbound::ingest(&store, &mail.view(), &deliveries)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_events").await, 0);
}

#[tokio::test]
async fn replies_join_the_thread_and_trusted_ids_are_used_as_given() {
    let (_db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let parent = Mail::new("parent@remote.example", "first");
    let Outcome::Stored {
        conversation_id: thread,
        ..
    } = inbound::ingest(
        &store,
        &parent.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap()
    .remove(0)
    else {
        panic!()
    };

    let mut reply = Mail::new("child@remote.example", "second");
    reply.refs = vec!["unknown@x".into(), "parent@remote.example".into()];
    let Outcome::Stored {
        conversation_id, ..
    } = inbound::ingest(
        &store,
        &reply.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap()
    .remove(0)
    else {
        panic!()
    };
    assert_eq!(
        conversation_id, thread,
        "a reply inherits the parent's conversation"
    );

    let trusted = Mail::new("trusted@remote.example", "third");
    let mut view = trusted.view();
    view.trusted_conversation_id = Some("cnv_fromheader");
    let Outcome::Stored {
        conversation_id, ..
    } = inbound::ingest(&store, &view, &[delivery("a@alice.example", &alice)])
        .await
        .unwrap()
        .remove(0)
    else {
        panic!()
    };
    assert_eq!(conversation_id, "cnv_fromheader");

    // Threading never crosses agents: another agent's copy of the parent does not count.
    let c = store.client().await.unwrap();
    assert_eq!(
        inbound::thread_of(&c, "other@alice.example", &reply.refs)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn the_event_is_announced_at_commit() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;

    let (_listener, mut rx) = listen(&db).await;

    let mail = Mail::new("notify@remote.example", "x");
    inbound::ingest(&store, &mail.view(), &[delivery("a@alice.example", &alice)])
        .await
        .unwrap();
    let channel = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(channel, "webhook_events_new");
}

/// Threading looks ids up through the two partial indexes (the statement
/// repeats their `<> ''` predicates), not by scanning the agent's mailbox.
#[tokio::test]
async fn threading_lookups_use_their_indexes() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    for i in 0..20 {
        let mail = Mail::new(&format!("m{i}@remote.example"), "hello");
        inbound::ingest(&store, &mail.view(), &[delivery("a@alice.example", &alice)])
            .await
            .unwrap();
    }
    let c = db.client().await;
    c.batch_execute("ANALYZE messages; SET enable_seqscan = off")
        .await
        .unwrap();
    let refs = vec!["m3@remote.example".to_owned(), "x@y".to_owned()];
    let plan: Vec<String> = c
        .query(
            &format!("EXPLAIN {}", inbound::THREAD_OF_SQL),
            &[&"a@alice.example", &refs],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    for index in [
        "messages_agent_email_message_id_idx",
        "messages_agent_provider_message_id_idx",
    ] {
        assert!(plan.contains(index), "{index} not used:\n{plan}");
    }
    assert!(!plan.contains("Seq Scan"), "{plan}");
    // And the lookup answers.
    let found = inbound::thread_of(&store.client().await.unwrap(), "a@alice.example", &refs)
        .await
        .unwrap();
    assert!(found.is_some_and(|id| id.starts_with("cnv_")));
}

/// V11: a transaction that defers its NOTIFY commits without one, and the
/// coalesced wake-up sends it afterwards; writers that do not defer still
/// notify at commit.
#[tokio::test]
async fn deferred_notifications_come_from_the_coalesced_wake_up() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let (_listener, mut rx) = listen(&db).await;
    let append = |defer: bool| {
        let (store, alice) = (store.clone(), alice.clone());
        async move {
            let mut c = store.client().await.unwrap();
            let tx = c.transaction().await.unwrap();
            if defer {
                events::defer_notify(&tx).await.unwrap();
            }
            let id = EventId::new();
            let envelope = json!({"event": "email.received"});
            events::append(
                &tx,
                &events::NewEvent {
                    id: &id,
                    user_id: &alice,
                    event_type: events::EMAIL_RECEIVED,
                    envelope: &envelope,
                    agent_id: None,
                    conversation_id: None,
                    message_id: None,
                    labels: &[],
                },
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
    };
    let quiet = std::time::Duration::from_millis(300);
    append(true).await;
    assert!(
        tokio::time::timeout(quiet, rx.recv()).await.is_err(),
        "a deferring commit sends no NOTIFY of its own"
    );
    events::wake_deliverer(&store);
    let woken = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("the wake-up notifies")
        .unwrap();
    assert_eq!(woken, "webhook_events_new");
    // Many wake-ups within one window share a notification.
    for _ in 0..50 {
        events::wake_deliverer(&store);
    }
    tokio::time::sleep(quiet).await;
    let mut shared = 0;
    while rx.try_recv().is_ok() {
        shared += 1;
    }
    assert!(
        (1..50).contains(&shared),
        "{shared} notifications for 50 wake-ups"
    );
    // A writer that does not defer still notifies at commit.
    append(false).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("the trigger notifies at commit")
        .unwrap();
}

/// Ingest's one statement defers the trigger's NOTIFY: an ingest of two
/// copies is announced by exactly one notification (the coalesced wake-up),
/// not one per event plus the wake-up.
#[tokio::test]
async fn ingest_announces_itself_once_through_the_wake_up() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example", "b@alice.example"]).await;
    let (_listener, mut rx) = listen(&db).await;
    let mail = Mail::new("once@remote.example", "hello");
    let outcomes = inbound::ingest(
        &store,
        &mail.view(),
        &[
            delivery("b@alice.example", &alice),
            delivery("a@alice.example", &alice),
        ],
    )
    .await
    .unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Stored { .. })));
    assert_eq!(
        count(&db, "SELECT count(*) FROM webhook_events").await,
        2,
        "one event per copy"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut notifications = 0;
    while rx.try_recv().is_ok() {
        notifications += 1;
    }
    assert_eq!(notifications, 1);
}

/// Every conversation summary and usage counter of the database, as text,
/// next to the same figures recomputed from the stored messages.
async fn accounting_and_recomputed(db: &e2a_testkit::TestDb) -> (String, String) {
    let c = db.client().await;
    let one = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, String>(0) }
    };
    let stored = one("SELECT concat_ws(' | ', \
           (SELECT string_agg(row(agent_id, user_id, conversation_id, first_message_at, \
              last_message_at, last_message_id, message_count, inbound_count, outbound_count, \
              unread_count, latest_subject, latest_sender, min_expires_at, max_expires_at)::text, \
              ',' ORDER BY agent_id, conversation_id) FROM conversation_summaries), \
           (SELECT string_agg(row(user_id, b, n)::text, ',' ORDER BY user_id) FROM ( \
              SELECT user_id, sum(storage_bytes) AS b, sum(messages_month) AS n \
                FROM account_usage GROUP BY user_id) u))")
    .await;
    let recomputed = one("SELECT concat_ws(' | ', \
           (SELECT string_agg(r::text, ',' ORDER BY a, cid) FROM ( \
              SELECT agent_id AS a, conversation_id AS cid, row(agent_id, min(user_id), \
                conversation_id, min(created_at), max(created_at), \
                (array_agg(id ORDER BY created_at DESC, id DESC))[1], count(*), \
                count(*) FILTER (WHERE direction = 'inbound'), \
                count(*) FILTER (WHERE direction = 'outbound'), \
                count(*) FILTER (WHERE inbox_status = 'unread'), \
                (array_agg(subject ORDER BY created_at DESC, id DESC))[1], \
                (array_agg(CASE WHEN direction = 'outbound' AND sender = '' THEN agent_id \
                                ELSE sender END ORDER BY created_at DESC, id DESC))[1], \
                min(expires_at), max(expires_at)) AS r \
                FROM messages WHERE conversation_id <> '' GROUP BY agent_id, conversation_id) s), \
           (SELECT string_agg(row(user_id, b, n)::text, ',' ORDER BY user_id) FROM ( \
              SELECT user_id, sum(e2a_message_stored_bytes(raw_message, body_text, body_html, \
                attachments_json)) AS b, count(*) AS n FROM messages GROUP BY user_id) u))")
    .await;
    (stored, recomputed)
}

/// V28: the ingest statement keeps summaries and usage itself (the
/// accounting trigger stands aside for that one statement): the figures
/// equal a recomputation from the messages after new conversations,
/// replies, several owners and a duplicate — and an INSERT later in the
/// same transaction is accounted by the trigger as usual.
#[tokio::test]
async fn ingest_keeps_summaries_and_usage_exact_and_later_inserts_are_still_accounted() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example", "a2@alice.example"]).await;
    let bob = owner(&store, "bob@example.com", "bob.example", &["b@bob.example"]).await;
    let all = || {
        [
            delivery("a@alice.example", &alice),
            delivery("a2@alice.example", &alice),
            delivery("b@bob.example", &bob),
        ]
    };

    let first = Mail::new("acc-1@remote.example", "first");
    inbound::ingest(&store, &first.view(), &all())
        .await
        .unwrap();
    let (stored, recomputed) = accounting_and_recomputed(&db).await;
    assert_eq!(stored, recomputed, "after a first message to three agents");
    let alice_usage = format!("({alice},{},2)", 2 * first.raw.len());
    assert!(
        stored.contains(&alice_usage),
        "alice's two copies counted: {stored}"
    );

    let mut reply = Mail::new("acc-2@remote.example", "a reply");
    reply.refs = vec!["acc-1@remote.example".into()];
    inbound::ingest(&store, &reply.view(), &all())
        .await
        .unwrap();
    let outcomes = inbound::ingest(&store, &first.view(), &all())
        .await
        .unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Duplicate { .. }))
    );
    let (stored, recomputed) = accounting_and_recomputed(&db).await;
    assert_eq!(stored, recomputed, "after a reply and a duplicate");

    // In one transaction: a duplicate ingest (nothing inserted), a new one,
    // then a plain INSERT, which the trigger must account for.
    let mut c = store.client().await.unwrap();
    let tx = c.transaction().await.unwrap();
    inbound::ingest_in(&tx, &first.view(), &all())
        .await
        .unwrap();
    let third = Mail::new("acc-3@remote.example", "third");
    inbound::ingest_in(&tx, &third.view(), &all()[..1])
        .await
        .unwrap();
    let flag: String = tx
        .query_one(
            "SELECT coalesce(current_setting('e2a.messages_accounted', true), '')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        flag, "",
        "the statement's flag is consumed by its own trigger"
    );
    tx.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, status, recipient, subject, \
           conversation_id, to_recipients, body_text) \
         VALUES ($1, $2, 'a@alice.example', 'outbound', 'queued', 'x@remote.example', 'sent', \
           'cnv_outbound', ARRAY['x@remote.example'], 'a body')",
        &[&MessageId::new(), &alice],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (stored, recomputed) = accounting_and_recomputed(&db).await;
    assert_eq!(
        stored, recomputed,
        "after ingests and an insert in one transaction"
    );
    assert!(stored.contains("cnv_outbound"), "{stored}");
}

/// V28: an event's message reference is cleared when its message is
/// deleted (the former foreign key's ON DELETE SET NULL, now a trigger);
/// the event itself stays.
#[tokio::test]
async fn deleting_a_message_clears_its_events_reference() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let mail = Mail::new(&format!("del-{n}@remote.example"), "x");
        let d = delivery("a@alice.example", &alice);
        ids.push(d.message_id.clone());
        inbound::ingest(&store, &mail.view(), &[d]).await.unwrap();
    }
    let c = db.client().await;
    let deleted = c
        .execute(
            "DELETE FROM messages WHERE id = ANY($1)",
            &[&vec![ids[0].as_str(), ids[1].as_str()]],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let refs: Vec<Option<String>> = c
        .query(
            "SELECT message_id FROM webhook_events ORDER BY message_id NULLS FIRST",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(refs, vec![None, None, Some(ids[2].as_str().to_owned())]);
}

/// An ingest waits for an agent being deleted before it locks anything the
/// delete needs: the deleter holds the agent, then recomputes that agent's
/// conversation summaries and usage counters. Were the agent first locked
/// by the foreign-key check at the end of the statement (after the
/// summary and usage upserts), the two would deadlock.
#[tokio::test]
async fn an_ingest_waits_for_an_agent_being_deleted_before_it_locks_summaries_or_usage() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let first = Mail::new("del-1@remote.example", "first");
    inbound::ingest(
        &store,
        &first.view(),
        &[delivery("a@alice.example", &alice)],
    )
    .await
    .unwrap();

    // The deleter: holds the agent, as `DELETE FROM agents` does first.
    let mut deleter = db.client().await;
    let tx = deleter.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM agents WHERE id = 'a@alice.example' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();

    // A reply to the same conversation arrives meanwhile.
    let ingest = {
        let store = store.clone();
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut reply = Mail::new("del-2@remote.example", "a reply");
            reply.refs = vec!["del-1@remote.example".into()];
            inbound::ingest(
                &store,
                &reply.view(),
                &[delivery("a@alice.example", &alice)],
            )
            .await
        })
    };
    let watcher = db.client().await;
    super::until_blocked(
        &watcher,
        "SELECT count(*) FROM pg_locks WHERE NOT granted",
        "the ingest",
    )
    .await;

    // What the delete's triggers lock next is free: the ingest holds none of it.
    tx.execute(
        "SELECT 1 FROM conversation_summaries WHERE agent_id = 'a@alice.example' FOR UPDATE NOWAIT",
        &[],
    )
    .await
    .expect("the ingest must not hold the agent's conversation summaries");
    tx.execute(
        "SELECT 1 FROM account_usage WHERE user_id = $1 FOR UPDATE NOWAIT",
        &[&alice],
    )
    .await
    .expect("the ingest must not hold the owner's usage counters");
    tx.execute("DELETE FROM agents WHERE id = 'a@alice.example'", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let outcome = ingest.await.unwrap();
    assert!(outcome.is_err(), "the agent is gone: {outcome:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM conversation_summaries").await,
        0
    );
}

/// An `email.sent` event of `message_id`.
fn sent<'a>(user: &'a UserId, message_id: &'a str) -> events::MessageEvent<'a> {
    events::MessageEvent {
        user_id: user,
        message_id,
        agent_id: "a@alice.example",
        conversation_id: "",
        event_type: e2a_store::outbound::EMAIL_SENT,
    }
}

/// An event appended for a message references it only while it exists,
/// and holds it against a concurrent delete until the event is committed
/// (what `webhook_events_message_fkey` did before V28): no event is left
/// pointing at a deleted message.
#[tokio::test]
async fn an_appended_event_references_its_message_only_while_it_exists() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let d = delivery("a@alice.example", &alice);
    let id = d.message_id.clone();
    inbound::ingest(&store, &Mail::new("ev-1@remote.example", "x").view(), &[d])
        .await
        .unwrap();
    let event = |message_id| sent(&alice, message_id);
    let reference = |message: &str| {
        let db = &db;
        let event_id = events::deterministic_id(&[message, e2a_store::outbound::EMAIL_SENT]);
        async move {
            db.client()
                .await
                .query_one(
                    "SELECT message_id FROM webhook_events WHERE id = $1",
                    &[&event_id.as_str()],
                )
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    let leaked = id.as_str();

    // A message that does not exist (or is another tenant's) is not referenced.
    let c = store.client().await.unwrap();
    event("msg_00000000000000000000000000000000")
        .append(&c, time::OffsetDateTime::now_utc(), json!({}))
        .await
        .unwrap();
    assert_eq!(
        reference("msg_00000000000000000000000000000000").await,
        None
    );

    // An existing one is, and cannot be deleted before the event commits.
    let mut writer = store.client().await.unwrap();
    let tx = writer.transaction().await.unwrap();
    event(leaked)
        .append(&tx, time::OffsetDateTime::now_utc(), json!({}))
        .await
        .unwrap();
    let deleter = db.client().await;
    deleter
        .batch_execute("SET lock_timeout = '200ms'")
        .await
        .unwrap();
    let err = deleter
        .execute("DELETE FROM messages WHERE id = $1", &[&leaked])
        .await
        .expect_err("the event's transaction holds the message");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
    );
    tx.commit().await.unwrap();
    assert_eq!(reference(leaked).await.as_deref(), Some(leaked));
    assert_eq!(
        deleter
            .execute("DELETE FROM messages WHERE id = $1", &[&leaked])
            .await
            .unwrap(),
        1
    );
    assert_eq!(reference(leaked).await, None, "cleared with its message");
}

/// Group commit: one statement stores a batch of messages exactly as
/// ingesting them one by one would — every copy, one event per stored copy,
/// legacy pushes, lists byte for byte (whatever their characters), two
/// messages of one conversation in the same batch, duplicates of a message
/// stored earlier in the batch or before it, summaries and usage exact.
#[tokio::test]
async fn a_batch_stores_each_message_as_one_by_one_ingests_would() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example", "a2@alice.example"]).await;
    let bob = owner(&store, "bob@example.com", "bob.example", &["b@bob.example"]).await;

    let old = Mail::new("old@remote.example", "stored before the batch");
    let Outcome::Stored {
        message_id: old_id, ..
    } = inbound::ingest(&store, &old.view(), &[delivery("a@alice.example", &alice)])
        .await
        .unwrap()[0]
        .clone()
    else {
        panic!("stored")
    };

    let mut m1 = Mail::new("b1@remote.example", "one");
    m1.to = vec![
        "we\"ird\\@x.example".into(),
        "a,b{c}@x.example".into(),
        "NULL".into(),
        "ünï@x.example".into(),
        String::new(),
    ];
    let reply_to = vec!["r\"{,}@remote.example".to_owned()];
    let cc = vec!["c@remote.example".to_owned()];
    let m1_view = InboundMail {
        reply_to: &reply_to,
        cc: &cc,
        ..m1.view()
    };
    let mut m1_copies = [
        delivery("b@bob.example", &bob),
        delivery("a@alice.example", &alice),
        delivery("a2@alice.example", &alice),
    ];
    m1_copies[0].legacy_push = true;
    let m2 = Mail::new("b2@remote.example", "two");
    let m3 = Mail::new("b3@remote.example", "three");
    let (m2_view, m3_view) = (
        InboundMail {
            subject: "two",
            trusted_conversation_id: Some("cnv_shared"),
            ..m2.view()
        },
        InboundMail {
            subject: "three",
            trusted_conversation_id: Some("cnv_shared"),
            ..m3.view()
        },
    );
    let m2_copies = [delivery("a@alice.example", &alice)];
    let m3_copies = [delivery("a@alice.example", &alice)];
    let again_copies = [delivery("a@alice.example", &alice)];
    let old_copies = [delivery("a@alice.example", &alice)];
    let batch = [
        inbound::Arrival {
            mail: &m1_view,
            deliveries: &m1_copies,
        },
        inbound::Arrival {
            mail: &m2_view,
            deliveries: &m2_copies,
        },
        inbound::Arrival {
            mail: &m3_view,
            deliveries: &m3_copies,
        },
        // m1 again, for the same agent: a duplicate of a copy written by
        // this very statement.
        inbound::Arrival {
            mail: &m1_view,
            deliveries: &again_copies,
        },
        inbound::Arrival {
            mail: &old.view(),
            deliveries: &old_copies,
        },
        inbound::Arrival {
            mail: &m2_view,
            deliveries: &[],
        },
    ];
    let outcomes = inbound::ingest_batch(&store, &batch).await.unwrap();
    assert_eq!(
        outcomes.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 1, 1, 1, 1, 0]
    );
    for (o, d) in outcomes[0].iter().zip(&m1_copies) {
        assert!(matches!(o, Outcome::Stored { message_id, .. } if *message_id == d.message_id));
    }
    for (k, copies) in [(1, &m2_copies), (2, &m3_copies)] {
        assert_eq!(
            outcomes[k][0],
            Outcome::Stored {
                message_id: copies[0].message_id.clone(),
                conversation_id: "cnv_shared".into()
            }
        );
    }
    assert_eq!(
        outcomes[3][0],
        Outcome::Duplicate {
            message_id: m1_copies[1].message_id.clone()
        },
        "the earlier message of the batch wins"
    );
    assert_eq!(outcomes[4][0], Outcome::Duplicate { message_id: old_id });

    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 6);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM webhook_events WHERE type = 'email.received'"
        )
        .await,
        6,
        "one event per stored copy, none for a duplicate"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM webhook_deliveries").await,
        1,
        "the one flagged copy's legacy push"
    );
    let c = db.client().await;
    for d in &m1_copies {
        let row = c
            .query_one(
                "SELECT to_recipients, cc, reply_to, raw_message, subject FROM messages WHERE id = $1",
                &[&d.message_id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, Vec<String>>(0), m1.to, "lists byte for byte");
        assert_eq!(row.get::<_, Vec<String>>(1), cc);
        assert_eq!(row.get::<_, Option<Vec<String>>>(2), Some(reply_to.clone()));
        assert_eq!(row.get::<_, Vec<u8>>(3), m1.raw);
        assert_eq!(row.get::<_, String>(4), "hi");
    }
    let row = c
        .query_one(
            "SELECT reply_to, raw_message, subject FROM messages WHERE id = $1",
            &[&m3_copies[0].message_id],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<Vec<String>>>(0),
        None,
        "no Reply-To: NULL"
    );
    assert_eq!(
        row.get::<_, Vec<u8>>(1),
        m3.raw,
        "each message its own bytes"
    );
    assert_eq!(row.get::<_, String>(2), "three");
    let summary = c
        .query_one(
            "SELECT message_count, latest_subject FROM conversation_summaries \
              WHERE conversation_id = 'cnv_shared'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(summary.get::<_, i64>(0), 2);
    assert_eq!(
        summary.get::<_, String>(1),
        if m2_copies[0].message_id.as_str() > m3_copies[0].message_id.as_str() {
            "two"
        } else {
            "three"
        },
        "the latest (created_at, id) of the two gives the subject"
    );
    let (stored, recomputed) = accounting_and_recomputed(&db).await;
    assert_eq!(
        stored, recomputed,
        "summaries and usage exact after a batch"
    );
}

/// A batch is one statement: when one of its messages cannot be stored
/// (here its agent does not exist) nothing of the batch is — the relay then
/// stores its messages one by one (`e2a_runtime::group_commit`).
#[tokio::test]
async fn a_batch_with_a_message_that_cannot_be_stored_stores_nothing() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example"]).await;
    let good = Mail::new("good@remote.example", "good");
    let bad = Mail::new("bad@remote.example", "bad");
    let good_copies = [delivery("a@alice.example", &alice)];
    let bad_copies = [delivery("gone@alice.example", &alice)];
    let (good_view, bad_view) = (good.view(), bad.view());
    let batch = [
        inbound::Arrival {
            mail: &good_view,
            deliveries: &good_copies,
        },
        inbound::Arrival {
            mail: &bad_view,
            deliveries: &bad_copies,
        },
    ];
    assert!(inbound::ingest_batch(&store, &batch).await.is_err());
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_events").await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT coalesce(sum(messages_month), 0)::int8 FROM account_usage"
        )
        .await,
        0
    );
    // Alone, the good message is stored.
    let outcomes = inbound::ingest_batch(&store, &batch[..1]).await.unwrap();
    assert!(matches!(outcomes[0][0], Outcome::Stored { .. }));
}

/// A batch waits at most `BATCH_LOCK_TIMEOUT` for a row lock — here the
/// agent row of an agent being deleted — and then fails as a whole, while
/// one message alone waits for the delete like before (and then fails its
/// foreign key). Other messages never wait behind such an agent for long.
#[tokio::test]
async fn a_batch_stops_waiting_for_an_agent_being_deleted_after_its_lock_timeout() {
    let (db, store) = super::store().await;
    let alice = alice(&store, &["a@alice.example", "gone@alice.example"]).await;
    let good = Mail::new("good@remote.example", "good");
    let doomed = Mail::new("doomed@remote.example", "doomed");
    let good_copies = [delivery("a@alice.example", &alice)];
    let doomed_copies = [delivery("gone@alice.example", &alice)];
    let (good_view, doomed_view) = (good.view(), doomed.view());

    let mut deleter = db.client().await;
    let delete = deleter.transaction().await.unwrap();
    delete
        .execute("DELETE FROM agents WHERE id = 'gone@alice.example'", &[])
        .await
        .unwrap();

    let batch = [
        inbound::Arrival {
            mail: &doomed_view,
            deliveries: &doomed_copies,
        },
        inbound::Arrival {
            mail: &good_view,
            deliveries: &good_copies,
        },
    ];
    let err = inbound::ingest_batch(&store, &batch).await.unwrap_err();
    match &err {
        StoreError::Database(e) => assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
            "{e}"
        ),
        other => panic!("expected a lock timeout, got {other:?}"),
    }
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 0);

    // The good message alone is stored while the delete still runs.
    let alone = inbound::ingest(&store, &good_view, &good_copies)
        .await
        .unwrap();
    assert!(matches!(alone[0], Outcome::Stored { .. }));

    // The doomed message alone waits for the delete, then finds no agent.
    let waiting = {
        let store = store.clone();
        let copies = doomed_copies.clone();
        tokio::spawn(async move {
            let doomed = Mail::new("doomed@remote.example", "doomed");
            inbound::ingest(&store, &doomed.view(), &copies).await
        })
    };
    let watcher = db.client().await;
    super::until_blocked(
        &watcher,
        "SELECT count(*) FROM pg_stat_activity \
          WHERE wait_event_type = 'Lock' AND query LIKE 'WITH quiet%'",
        "the lone ingest",
    )
    .await;
    assert!(!waiting.is_finished(), "one message waits for the lock");
    delete.commit().await.unwrap();
    assert!(waiting.await.unwrap().is_err(), "its agent is gone");
    assert_eq!(count(&db, "SELECT count(*) FROM messages").await, 1);
}
