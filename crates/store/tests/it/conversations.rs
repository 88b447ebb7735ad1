//! Conversations: summaries per agent (counts, unread, latest), ordering and
//! time window, detail with participants/labels/members, tenancy; the
//! stored summaries (V14) agree with a regrouping of the messages after
//! every kind of write, under concurrency, and when rebuilt by the
//! migration.

use std::sync::Arc;

use e2a_store::{Store, StoreError, conversations, ids::MessageId, messages};
use time::{Duration, OffsetDateTime};
use tokio::sync::Barrier;

use super::messages::{Mail, Mailbox, deliver, mailbox, set_created_at};

#[tokio::test]
async fn summaries_aggregate_each_thread_newest_first() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mallory = mailbox(&store, "mallory").await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::hours(2);

    // Thread one: a root and a reply found through References.
    let (root, conv_one) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "root@x",
            sender: "bob@example.org",
            subject: "plan",
            ..Mail::default()
        },
    )
    .await;
    let refs = vec!["root@x".to_owned()];
    let (reply, reply_conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "reply@x",
            sender: "carol@example.org",
            subject: "Re: plan",
            refs: &refs,
            ..Mail::default()
        },
    )
    .await;
    assert_eq!(reply_conv, conv_one, "the reply joins the thread");
    // Thread two: one message, newer than thread one.
    let (solo, conv_two) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "solo@x",
            sender: "dave@example.org",
            subject: "other",
            ..Mail::default()
        },
    )
    .await;
    set_created_at(&store, &root, t0).await;
    set_created_at(&store, &reply, t0 + Duration::minutes(10)).await;
    set_created_at(&store, &solo, t0 + Duration::minutes(20)).await;

    let c = store.client().await.unwrap();
    // Reading the solo message clears its thread's unread flag.
    messages::get_marking_read(&c, &alice.user, &alice.agent, &solo)
        .await
        .unwrap();

    let list = conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    let (two, one) = (&list[0], &list[1]);
    assert_eq!(two.conversation_id, conv_two);
    assert_eq!(
        (two.message_count, two.inbound_count, two.outbound_count),
        (1, 1, 0)
    );
    assert!(!two.has_unread);
    assert_eq!(one.conversation_id, conv_one);
    assert_eq!(
        (one.message_count, one.inbound_count, one.outbound_count),
        (2, 2, 0)
    );
    assert!(one.has_unread);
    assert_eq!(
        (one.first_message_at, one.last_message_at),
        (t0, t0 + Duration::minutes(10))
    );
    assert_eq!(
        (one.latest_subject.as_str(), one.latest_sender.as_str()),
        ("Re: plan", "carol@example.org")
    );

    // The window brackets last_message_at: since inclusive, until exclusive.
    let since = conversations::list(
        &c,
        &alice.user,
        &alice.agent,
        Some(t0 + Duration::minutes(10)),
        None,
        100,
    )
    .await
    .unwrap();
    assert_eq!(since.len(), 2);
    let until = conversations::list(
        &c,
        &alice.user,
        &alice.agent,
        None,
        Some(t0 + Duration::minutes(20)),
        100,
    )
    .await
    .unwrap();
    assert_eq!(
        until
            .iter()
            .map(|s| s.conversation_id.as_str())
            .collect::<Vec<_>>(),
        vec![conv_one.as_str()]
    );
    // Limit is clamped to 1..=100.
    assert_eq!(
        conversations::list(&c, &alice.user, &alice.agent, None, None, 0)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        conversations::list(&c, &alice.user, &alice.agent, None, None, 1000)
            .await
            .unwrap()
            .len(),
        2
    );

    // Other tenants see nothing.
    assert!(
        conversations::list(&c, &mallory.user, &alice.agent, None, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        conversations::list(&c, &alice.user, &mallory.agent, None, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn detail_lists_participants_labels_and_members_oldest_first() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mallory = mailbox(&store, "mallory").await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::hours(1);
    let cc = vec!["erin@example.org".to_owned()];
    let (first, conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "d1@x",
            sender: "zed@example.org",
            subject: "one",
            cc: &cc,
            ..Mail::default()
        },
    )
    .await;
    let refs = vec!["d1@x".to_owned()];
    let (second, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "d2@x",
            sender: "bob@example.org",
            subject: "two",
            refs: &refs,
            ..Mail::default()
        },
    )
    .await;
    set_created_at(&store, &first, t0).await;
    set_created_at(&store, &second, t0 + Duration::seconds(5)).await;
    let c = store.client().await.unwrap();
    messages::update_labels(
        &c,
        &alice.user,
        &alice.agent,
        &first,
        &["b".into(), "a".into()],
        &[],
    )
    .await
    .unwrap();
    messages::update_labels(
        &c,
        &alice.user,
        &alice.agent,
        &second,
        &["c".into(), "a".into()],
        &[],
    )
    .await
    .unwrap();

    let detail = conversations::get(&c, &alice.user, &alice.agent, &conv)
        .await
        .unwrap();
    assert_eq!(detail.summary.conversation_id, conv);
    assert_eq!(detail.summary.message_count, 2);
    assert_eq!(
        detail.participants,
        vec![
            "alice@agents.localhost",
            "bob@example.org",
            "erin@example.org",
            "zed@example.org"
        ]
    );
    assert_eq!(detail.labels, vec!["a", "b", "c"]);
    assert_eq!(
        detail
            .messages
            .iter()
            .map(|m| m.id.clone())
            .collect::<Vec<_>>(),
        vec![first, second]
    );
    assert_eq!(detail.messages[0].subject, "one");

    for (user, agent, id) in [
        (&mallory.user, &alice.agent, conv.as_str()),
        (&mallory.user, &mallory.agent, conv.as_str()),
        (&alice.user, &alice.agent, "cnv_unknown"),
        (&alice.user, &alice.agent, ""),
    ] {
        let err = conversations::get(&c, user, agent, id).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{id:?}: {err:?}");
    }
}

/// Every stored summary of `agent` as text, and the same computed by
/// regrouping its messages (expired ones included: the stored rows cover
/// every stored member), both in key order.
async fn stored_and_regrouped(store: &Store, agent: &str) -> (Vec<String>, Vec<String>) {
    let c = store.client().await.unwrap();
    let cols = "conversation_id, first_message_at, last_message_at, last_message_id, \
                message_count, inbound_count, outbound_count, unread_count, latest_subject, \
                latest_sender, min_expires_at, max_expires_at";
    let text = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    let stored = c
        .query(
            &format!(
                "SELECT row({cols})::text FROM conversation_summaries \
                 WHERE agent_id = $1 ORDER BY conversation_id"
            ),
            &[&agent],
        )
        .await
        .unwrap();
    let regrouped = c
        .query(
            "SELECT row(conversation_id, min(created_at), max(created_at), \
               (array_agg(id ORDER BY created_at DESC, id DESC))[1], count(*), \
               count(*) FILTER (WHERE direction = 'inbound'), \
               count(*) FILTER (WHERE direction = 'outbound'), \
               count(*) FILTER (WHERE inbox_status = 'unread'), \
               (array_agg(subject ORDER BY created_at DESC, id DESC))[1], \
               (array_agg(CASE WHEN direction = 'outbound' AND sender = '' THEN agent_id \
                               ELSE sender END ORDER BY created_at DESC, id DESC))[1], \
               min(expires_at), max(expires_at))::text \
             FROM messages WHERE agent_id = $1 AND conversation_id <> '' \
             GROUP BY conversation_id ORDER BY conversation_id",
            &[&agent],
        )
        .await
        .unwrap();
    (text(stored), text(regrouped))
}

async fn assert_summaries_exact(store: &Store, agent: &str, after: &str) {
    let (stored, regrouped) = stored_and_regrouped(store, agent).await;
    assert_eq!(stored, regrouped, "after {after}");
}

/// Stores an outbound row (no sender: the agent is the sender) in `conv`.
async fn send(store: &Store, from: &Mailbox, conv: &str, subject: &str) -> MessageId {
    let id = MessageId::new();
    let c = store.client().await.unwrap();
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, status, recipient, subject, \
           conversation_id, to_recipients) \
         VALUES ($1, $2, $3, 'outbound', 'queued', 'bob@example.org', $4, $5, ARRAY['bob@example.org'])",
        &[&id, &from.user, &from.agent, &subject, &conv],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn stored_summaries_follow_every_kind_of_write() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let agent = alice.agent.as_str();
    let c = store.client().await.unwrap();

    let (a, conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "w1@x",
            sender: "bob@example.org",
            subject: "first",
            ..Mail::default()
        },
    )
    .await;
    assert_summaries_exact(&store, agent, "ingest").await;
    let refs = vec!["w1@x".to_owned()];
    let (b, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "w2@x",
            sender: "carol@example.org",
            subject: "second",
            refs: &refs,
            ..Mail::default()
        },
    )
    .await;
    let sent = send(&store, &alice, &conv, "our answer").await;
    let (_, other) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "w3@x",
            subject: "elsewhere",
            ..Mail::default()
        },
    )
    .await;
    assert_summaries_exact(&store, agent, "a reply and an outbound row").await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::hours(1);
    set_created_at(&store, &a, t0).await;
    set_created_at(&store, &b, t0 + Duration::minutes(2)).await;
    set_created_at(&store, &sent, t0 + Duration::minutes(1)).await;
    assert_summaries_exact(&store, agent, "created_at changes").await;
    let list = conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap();
    let thread = list.iter().find(|s| s.conversation_id == conv).unwrap();
    assert_eq!(
        (
            thread.message_count,
            thread.inbound_count,
            thread.outbound_count
        ),
        (3, 2, 1)
    );
    assert_eq!(thread.latest_sender, "carol@example.org");
    // The outbound row becomes the newest: the agent is the latest sender.
    set_created_at(&store, &sent, t0 + Duration::minutes(3)).await;
    let list = conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap();
    let thread = list.iter().find(|s| s.conversation_id == conv).unwrap();
    assert_eq!(
        (
            thread.latest_sender.as_str(),
            thread.latest_subject.as_str()
        ),
        (agent, "our answer")
    );

    messages::get_marking_read(&c, &alice.user, &alice.agent, &a)
        .await
        .unwrap();
    assert_summaries_exact(&store, agent, "read-on-get").await;
    messages::update_labels(&c, &alice.user, &alice.agent, &b, &["x".into()], &[])
        .await
        .unwrap();
    c.execute(
        "UPDATE messages SET subject = 'edited', sender = 'dave@example.org' WHERE id = $1",
        &[&sent],
    )
    .await
    .unwrap();
    assert_summaries_exact(&store, agent, "an edit").await;
    c.execute(
        "UPDATE messages SET conversation_id = $2 WHERE id = $1",
        &[&b, &other],
    )
    .await
    .unwrap();
    assert_summaries_exact(&store, agent, "a move to another conversation").await;
    c.execute(
        "UPDATE messages SET expires_at = now() - interval '1 minute' WHERE id = $1",
        &[&a],
    )
    .await
    .unwrap();
    assert_summaries_exact(&store, agent, "an expiry change").await;
    // Expired but not swept: invisible in the list already.
    let thread = conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.conversation_id == conv)
        .unwrap();
    assert_eq!(thread.message_count, 1, "only the outbound row is visible");
    assert_eq!(thread.first_message_at, t0 + Duration::minutes(3));
    assert_eq!(messages::delete_expired(&c, 10).await.unwrap(), 1);
    assert_summaries_exact(&store, agent, "the janitor's sweep").await;
    c.execute("DELETE FROM messages WHERE id = $1", &[&sent])
        .await
        .unwrap();
    assert_summaries_exact(&store, agent, "the last member's deletion").await;
    assert!(
        conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
            .await
            .unwrap()
            .iter()
            .all(|s| s.conversation_id != conv),
        "an empty conversation is gone"
    );
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM conversation_summaries WHERE agent_id = $1",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    e2a_store::agents::delete(&c, &alice.user, agent)
        .await
        .unwrap();
    let left: i64 = c
        .query_one("SELECT count(*) FROM conversation_summaries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "deleting the agent deletes its summaries");
}

/// Returns once a session of this database waits for a lock.
async fn wait_for_a_lock_waiter(store: &Store) {
    let c = store.client().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody waits");
        tokio::task::yield_now().await;
    }
}

/// A deletion (which recomputes the summary) and an insert into the same
/// conversation, in both orders on two real connections: neither loses
/// the other.
#[tokio::test]
async fn concurrent_insert_and_delete_lose_nothing() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let agent = alice.agent.clone();
    let (first, conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "c1@x",
            ..Mail::default()
        },
    )
    .await;
    let mut doomed = vec![first];
    for i in 0..2 {
        doomed.push(send(&store, &alice, &conv, &format!("keep {i}")).await);
    }
    for delete_first in [true, false] {
        let victim = doomed.pop().unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let deleter = {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                let tx = c.transaction().await.unwrap();
                if !delete_first {
                    barrier.wait().await; // the insert holds the summary
                }
                tx.execute("DELETE FROM messages WHERE id = $1", &[&victim])
                    .await
                    .unwrap();
                if delete_first {
                    barrier.wait().await;
                    wait_for_a_lock_waiter(&store).await; // the insert waits for us
                }
                tx.commit().await.unwrap();
            })
        };
        let inserter = {
            let (store, barrier, alice) = (
                store.clone(),
                barrier.clone(),
                Mailbox {
                    user: alice.user.clone(),
                    agent: alice.agent.clone(),
                },
            );
            let conv = conv.clone();
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                let tx = c.transaction().await.unwrap();
                if delete_first {
                    barrier.wait().await;
                }
                tx.execute(
                    "INSERT INTO messages (id, user_id, agent_id, direction, status, subject, \
                       conversation_id) VALUES ($1, $2, $3, 'outbound', 'queued', 'racer', $4)",
                    &[&MessageId::new(), &alice.user, &alice.agent, &conv],
                )
                .await
                .unwrap();
                if !delete_first {
                    barrier.wait().await;
                    wait_for_a_lock_waiter(&store).await; // the delete waits for us
                }
                tx.commit().await.unwrap();
            })
        };
        deleter.await.unwrap();
        inserter.await.unwrap();
        assert_summaries_exact(
            &store,
            &agent,
            if delete_first {
                "a delete, then an insert"
            } else {
                "an insert, then a delete"
            },
        )
        .await;
    }
}

/// The V14 backfill rebuilds exactly what the triggers keep.
#[tokio::test]
async fn the_migration_backfill_rebuilds_the_summaries() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let (_, conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "b1@x",
            sender: "bob@example.org",
            subject: "one",
            ..Mail::default()
        },
    )
    .await;
    send(&store, &alice, &conv, "two").await;
    send(&store, &alice, "cnv_elsewhere", "three").await;
    let (before, _) = stored_and_regrouped(&store, &alice.agent).await;
    assert_eq!(before.len(), 2);
    let migration = include_str!("../../../../migrations/V14__conversation_summaries.sql");
    let backfill = &migration[migration
        .find("-- The conversations of the messages already stored.")
        .unwrap()..];
    let c = store.client().await.unwrap();
    c.batch_execute("DELETE FROM conversation_summaries")
        .await
        .unwrap();
    c.batch_execute(backfill).await.unwrap();
    let (after, regrouped) = stored_and_regrouped(&store, &alice.agent).await;
    assert_eq!(after, before);
    assert_eq!(after, regrouped);
}
