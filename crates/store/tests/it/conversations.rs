//! Conversations: summaries per agent (counts, unread, latest), ordering and
//! time window, detail with participants/labels/members, tenancy.

use e2a_store::{StoreError, conversations, messages};
use time::{Duration, OffsetDateTime};

use super::messages::{Mail, deliver, mailbox, set_created_at};

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
