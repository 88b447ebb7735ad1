//! Messages aggregate: list filters, keyset paging with ties, read-on-get
//! for the owner only, labels (atomic, capped, reserved prefix), TTL sweep.

use e2a_store::{
    Store, StoreError,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains,
    ids::{MessageId, UserId},
    inbound::{self, Delivery, InboundMail, Outcome},
    messages::{self, Direction, InboxStatus, ListFilter, Position, Sort},
};
use time::{Duration, OffsetDateTime};

/// One user with one agent on the shared domain `agents.localhost`.
pub struct Mailbox {
    pub user: UserId,
    pub agent: String,
}

/// A user `name@example.com` with the agent `name@agents.localhost`.
pub async fn mailbox(store: &Store, name: &str) -> Mailbox {
    let user = super::user(store, &format!("{name}@example.com")).await;
    let mut c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();
    let agent = agents::create(
        &mut c,
        &user,
        &NewAgent {
            address: EmailAddress::parse(&format!("{name}@agents.localhost")).unwrap(),
            name: String::new(),
            webhook_url: String::new(),
            agent_mode: AgentMode::Local,
        },
        100,
    )
    .await
    .unwrap();
    Mailbox {
        user,
        agent: agent.id,
    }
}

/// What to deliver; defaults give a plain unrelated message.
#[derive(Default)]
pub struct Mail<'a> {
    pub message_id: &'a str,
    pub sender: &'a str,
    pub subject: &'a str,
    pub cc: &'a [String],
    pub refs: &'a [String],
}

/// Ingests `mail` for `to` and returns the stored row id and conversation.
pub async fn deliver(store: &Store, to: &Mailbox, mail: Mail<'_>) -> (MessageId, String) {
    let raw = format!(
        "Message-ID: <{}>\r\nSubject: {}\r\n\r\nbody\r\n",
        mail.message_id, mail.subject
    );
    let to_list = vec![to.agent.clone()];
    let sha256 = inbound::body_sha256(raw.as_bytes());
    let inbound_mail = InboundMail {
        raw: raw.as_bytes(),
        body_sha256: &sha256,
        email_message_id: mail.message_id,
        sender: if mail.sender.is_empty() {
            "someone@example.net"
        } else {
            mail.sender
        },
        subject: mail.subject,
        to: &to_list,
        cc: mail.cc,
        reply_to: &[],
        thread_refs: mail.refs,
        trusted_conversation_id: None,
        spf: "pass",
        dkim: "pass",
        dmarc: "pass",
    };
    let delivery = Delivery {
        message_id: MessageId::new(),
        agent_id: to.agent.clone(),
        agent_domain: "agents.localhost".into(),
        user_id: to.user.clone(),
        auth_headers: serde_json::json!({"X-E2A-Auth-Verified": "true"}),
        legacy_push: false,
    };
    match inbound::ingest(store, &inbound_mail, &[delivery])
        .await
        .unwrap()
        .remove(0)
    {
        Outcome::Stored {
            message_id,
            conversation_id,
        } => (message_id, conversation_id),
        other => panic!("not stored: {other:?}"),
    }
}

/// Sets a message's `created_at` (to make ties and orderings deterministic).
pub async fn set_created_at(store: &Store, id: &MessageId, at: OffsetDateTime) {
    let c = store.client().await.unwrap();
    c.execute(
        "UPDATE messages SET created_at = $2 WHERE id = $1",
        &[id, &at],
    )
    .await
    .unwrap();
}

fn all() -> ListFilter {
    ListFilter {
        direction: None,
        inbox_status: None,
        ..ListFilter::default()
    }
}

fn ids(page: &messages::Page) -> Vec<MessageId> {
    page.items.iter().map(|m| m.id.clone()).collect()
}

#[tokio::test]
async fn filters_narrow_the_list_and_match_wildcards_literally() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let base = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::hours(1);
    let (a, conv_a) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "a@x",
            sender: "Bob@Example.org",
            subject: "100% sure",
            ..Mail::default()
        },
    )
    .await;
    let (b, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "b@x",
            sender: "carol@example.org",
            subject: "1000 sure",
            ..Mail::default()
        },
    )
    .await;
    let (c_id, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "c@x",
            sender: "dave_x@example.org",
            subject: "a_b",
            ..Mail::default()
        },
    )
    .await;
    for (i, id) in [&a, &b, &c_id].into_iter().enumerate() {
        set_created_at(&store, id, base + Duration::minutes(i as i64)).await;
    }
    let c = store.client().await.unwrap();
    let list = |filter: ListFilter| {
        let (c, alice) = (&c, &alice);
        async move {
            ids(
                &messages::list(c, &alice.user, &alice.agent, &filter, None, 50)
                    .await
                    .unwrap(),
            )
        }
    };

    // Default inbox view (flaw 14): inbound + unread shows every new message.
    let inbox = ListFilter {
        direction: Some(Direction::Inbound),
        inbox_status: Some(InboxStatus::Unread),
        ..all()
    };
    assert_eq!(
        list(inbox.clone()).await,
        vec![c_id.clone(), b.clone(), a.clone()]
    );
    assert_eq!(
        list(ListFilter {
            sort: Sort::Asc,
            ..inbox.clone()
        })
        .await,
        vec![a.clone(), b.clone(), c_id.clone()]
    );
    assert!(
        list(ListFilter {
            direction: Some(Direction::Outbound),
            ..all()
        })
        .await
        .is_empty()
    );
    assert!(
        list(ListFilter {
            inbox_status: Some(InboxStatus::Read),
            ..all()
        })
        .await
        .is_empty()
    );

    // Case-insensitive substrings; % and _ match only themselves.
    assert_eq!(
        list(ListFilter {
            from: Some("BOB@".into()),
            ..all()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(ListFilter {
            subject_contains: Some("0%".into()),
            ..all()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(ListFilter {
            subject_contains: Some("_".into()),
            ..all()
        })
        .await,
        vec![c_id.clone()]
    );
    assert_eq!(
        list(ListFilter {
            from: Some("e_x".into()),
            ..all()
        })
        .await,
        vec![c_id.clone()]
    );
    assert!(
        list(ListFilter {
            from: Some("\\".into()),
            ..all()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        list(ListFilter {
            conversation_id: Some(conv_a.clone()),
            ..all()
        })
        .await,
        vec![a.clone()]
    );

    // Time window: since inclusive, until exclusive.
    let window = ListFilter {
        since: Some(base + Duration::minutes(1)),
        until: Some(base + Duration::minutes(2)),
        ..all()
    };
    assert_eq!(list(window).await, vec![b.clone()]);

    // Labels are AND-matched.
    messages::update_labels(
        &c,
        &alice.user,
        &alice.agent,
        &a,
        &["x".into(), "y".into()],
        &[],
    )
    .await
    .unwrap();
    messages::update_labels(&c, &alice.user, &alice.agent, &b, &["x".into()], &[])
        .await
        .unwrap();
    assert_eq!(
        list(ListFilter {
            labels: vec!["x".into()],
            ..all()
        })
        .await,
        vec![b.clone(), a.clone()]
    );
    assert_eq!(
        list(ListFilter {
            labels: vec!["x".into(), "y".into()],
            ..all()
        })
        .await,
        vec![a.clone()]
    );

    // Another tenant (or the wrong agent) sees nothing.
    let mallory = mailbox(&store, "mallory").await;
    assert!(
        messages::list(&c, &mallory.user, &alice.agent, &all(), None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        messages::list(&c, &alice.user, &mallory.agent, &all(), None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn keyset_pages_return_every_row_once_despite_ties() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - Duration::hours(1);
    let mut stored = Vec::new();
    for i in 0..7 {
        let (id, _) = deliver(
            &store,
            &alice,
            Mail {
                message_id: &format!("m{i}@x"),
                ..Mail::default()
            },
        )
        .await;
        // Three rows share t0, four share t0 + 1 s.
        set_created_at(&store, &id, t0 + Duration::seconds(i64::from(i >= 3))).await;
        stored.push(id);
    }
    let c = store.client().await.unwrap();
    for sort in [Sort::Desc, Sort::Asc] {
        let filter = ListFilter { sort, ..all() };
        let everything = messages::list(&c, &alice.user, &alice.agent, &filter, None, 100)
            .await
            .unwrap();
        assert_eq!(everything.items.len(), 7);
        assert_eq!(everything.next, None, "one page holds everything");
        let mut paged = Vec::new();
        let mut after: Option<Position> = None;
        let mut pages = 0;
        loop {
            let page = messages::list(&c, &alice.user, &alice.agent, &filter, after.as_ref(), 2)
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            paged.extend(ids(&page));
            pages += 1;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 4, "{sort:?}: 2+2+2+1, no empty trailing page");
        assert_eq!(paged, ids(&everything), "{sort:?}");
        let mut created: Vec<_> = everything
            .items
            .iter()
            .map(|m| (m.created_at, m.id.clone()))
            .collect();
        let mut sorted = created.clone();
        sorted.sort();
        if sort == Sort::Desc {
            sorted.reverse();
        }
        assert_eq!(created, sorted, "{sort:?} order on (created_at, id)");
        created.dedup();
        assert_eq!(created.len(), 7);
    }
    // Limits are clamped to 1..=100.
    let one = messages::list(&c, &alice.user, &alice.agent, &all(), None, 0)
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert!(one.next.is_some());
}

#[tokio::test]
async fn get_marks_only_the_owners_unread_row_read() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let alice_second = {
        let mut c = store.client().await.unwrap();
        agents::create(
            &mut c,
            &alice.user,
            &NewAgent {
                address: EmailAddress::parse("alice2@agents.localhost").unwrap(),
                name: String::new(),
                webhook_url: String::new(),
                agent_mode: AgentMode::Local,
            },
            100,
        )
        .await
        .unwrap()
        .id
    };
    let mallory = mailbox(&store, "mallory").await;
    let (id, conv) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "r@x",
            subject: "hello",
            ..Mail::default()
        },
    )
    .await;
    let c = store.client().await.unwrap();

    // Foreign user, foreign agent, wrong agent of the same user: not found, nothing written.
    for (user, agent) in [
        (&mallory.user, &alice.agent),
        (&mallory.user, &mallory.agent),
        (&alice.user, &alice_second),
    ] {
        let err = messages::get_marking_read(&c, user, agent, &id)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
    }
    let untouched = messages::get(&c, &alice.user, &alice.agent, &id)
        .await
        .unwrap();
    assert_eq!(untouched.summary.inbox_status, Some(InboxStatus::Unread));

    let read = messages::get_marking_read(&c, &alice.user, &alice.agent, &id)
        .await
        .unwrap();
    assert_eq!(read.summary.inbox_status, Some(InboxStatus::Read));
    assert_eq!(read.summary.subject, "hello");
    assert_eq!(read.summary.conversation_id, conv);
    assert_eq!(read.summary.direction, Direction::Inbound);
    assert_eq!(read.summary.to, vec![alice.agent.clone()]);
    assert_eq!(read.summary.recipient, alice.agent);
    assert!(
        read.raw_message
            .as_deref()
            .is_some_and(|r| r.starts_with(b"Message-ID: <r@x>"))
    );
    assert_eq!(
        read.summary.size_bytes,
        read.raw_message.as_ref().map_or(0, |r| r.len() as i64)
    );
    assert_eq!(
        read.auth_headers,
        Some(serde_json::json!({"X-E2A-Auth-Verified": "true"}))
    );
    assert_eq!(
        (
            read.spf_result.as_deref(),
            read.dkim_result.as_deref(),
            read.dmarc_result.as_deref()
        ),
        (Some("pass"), Some("pass"), Some("pass"))
    );
    // Idempotent: a second get reads it again, still read.
    let again = messages::get_marking_read(&c, &alice.user, &alice.agent, &id)
        .await
        .unwrap();
    assert_eq!(again.summary.inbox_status, Some(InboxStatus::Read));
    // It left the default inbox view and appears under status=read.
    let unread = ListFilter {
        direction: Some(Direction::Inbound),
        inbox_status: Some(InboxStatus::Unread),
        ..all()
    };
    assert!(
        messages::list(&c, &alice.user, &alice.agent, &unread, None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let read_view = ListFilter {
        inbox_status: Some(InboxStatus::Read),
        ..unread
    };
    assert_eq!(
        ids(
            &messages::list(&c, &alice.user, &alice.agent, &read_view, None, 50)
                .await
                .unwrap()
        ),
        vec![id.clone()]
    );
    // An unknown id is not found.
    assert!(matches!(
        messages::get_marking_read(&c, &alice.user, &alice.agent, &MessageId::new()).await,
        Err(StoreError::NotFound)
    ));
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn labels_add_then_remove_atomically_with_caps() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mallory = mailbox(&store, "mallory").await;
    let (id, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "l@x",
            ..Mail::default()
        },
    )
    .await;
    let c = store.client().await.unwrap();
    let update = |add: Vec<String>, remove: Vec<String>| {
        let (c, alice, id) = (&c, &alice, &id);
        async move { messages::update_labels(c, &alice.user, &alice.agent, id, &add, &remove).await }
    };

    assert_eq!(
        update(labels(&["b", "a", "b", "c"]), vec![]).await.unwrap(),
        labels(&["a", "b", "c"])
    );
    // Remove wins over add.
    assert_eq!(
        update(labels(&["d", "a"]), labels(&["a", "zz"]))
            .await
            .unwrap(),
        labels(&["b", "c", "d"])
    );
    assert_eq!(
        update(vec![], vec![]).await.unwrap(),
        labels(&["b", "c", "d"])
    );

    // Malformed, reserved and over-long lists are refused and change nothing.
    for (add, remove) in [
        (labels(&["Upper"]), vec![]),
        (labels(&["e2a:spam"]), vec![]),
        (vec![], labels(&["e2a:spam"])),
        (vec!["x".repeat(65)], vec![]),
        ((0..51).map(|i| format!("l{i}")).collect(), vec![]),
        (vec![], (0..51).map(|i| format!("l{i}")).collect()),
    ] {
        let err = update(add, remove).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }

    // At most 100 per message: 3 + 50 + 47 fits, one more does not.
    update((0..50).map(|i| format!("p{i:02}")).collect(), vec![])
        .await
        .unwrap();
    let full = update((0..47).map(|i| format!("q{i:02}")).collect(), vec![])
        .await
        .unwrap();
    assert_eq!(full.len(), 100);
    let err = update(labels(&["overflow"]), vec![]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("100")),
        "{err:?}"
    );
    // Swapping one for another at the cap is fine (remove is applied in the same statement).
    let swapped = update(labels(&["overflow"]), labels(&["q00"]))
        .await
        .unwrap();
    assert_eq!(swapped.len(), 100);
    assert!(swapped.contains(&"overflow".to_owned()) && !swapped.contains(&"q00".to_owned()));

    // Another tenant cannot touch it.
    let err = messages::update_labels(&c, &mallory.user, &alice.agent, &id, &labels(&["x"]), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound));
    let err = messages::update_labels(&c, &mallory.user, &mallory.agent, &id, &labels(&["x"]), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound));
    assert_eq!(
        messages::get(&c, &alice.user, &alice.agent, &id)
            .await
            .unwrap()
            .summary
            .labels,
        swapped
    );
}

#[tokio::test]
async fn concurrent_label_updates_lose_nothing() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let (id, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "cc@x",
            ..Mail::default()
        },
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, user, agent, id) = (
            store.clone(),
            alice.user.clone(),
            alice.agent.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = store.client().await.unwrap();
            messages::update_labels(&c, &user, &agent, &id, &[format!("t{i}")], &[])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = store.client().await.unwrap();
    let got = messages::get(&c, &alice.user, &alice.agent, &id)
        .await
        .unwrap()
        .summary
        .labels;
    assert_eq!(got, (0..8).map(|i| format!("t{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn expired_rows_are_invisible_and_swept_in_batches() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mut expired = Vec::new();
    for i in 0..3 {
        expired.push(
            deliver(
                &store,
                &alice,
                Mail {
                    message_id: &format!("old{i}@x"),
                    ..Mail::default()
                },
            )
            .await
            .0,
        );
    }
    let (fresh, _) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "fresh@x",
            ..Mail::default()
        },
    )
    .await;
    let c = store.client().await.unwrap();
    c.execute(
        "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
        &[&expired],
    )
    .await
    .unwrap();

    let page = messages::list(&c, &alice.user, &alice.agent, &all(), None, 50)
        .await
        .unwrap();
    assert_eq!(ids(&page), vec![fresh.clone()]);
    assert!(matches!(
        messages::get(&c, &alice.user, &alice.agent, &expired[0]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        messages::update_labels(
            &c,
            &alice.user,
            &alice.agent,
            &expired[0],
            &labels(&["x"]),
            &[]
        )
        .await,
        Err(StoreError::NotFound)
    ));

    assert_eq!(messages::delete_expired(&c, 2).await.unwrap(), 2);
    assert_eq!(messages::delete_expired(&c, 2).await.unwrap(), 1);
    assert_eq!(messages::delete_expired(&c, 2).await.unwrap(), 0);
    let left: i64 = c
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    messages::get(&c, &alice.user, &alice.agent, &fresh)
        .await
        .expect("fresh row kept");
}

#[tokio::test]
async fn concurrent_sweeps_skip_each_others_rows() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    for i in 0..4 {
        deliver(
            &store,
            &alice,
            Mail {
                message_id: &format!("s{i}@x"),
                ..Mail::default()
            },
        )
        .await;
    }
    let mut holder = store.client().await.unwrap();
    holder
        .execute(
            "UPDATE messages SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    // One sweeper holds two rows locked in an open transaction...
    let tx = holder.transaction().await.unwrap();
    let locked = tx
        .query(
            "SELECT id FROM messages ORDER BY id LIMIT 2 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(locked.len(), 2);
    // ...another takes the rest without waiting.
    let other = store.client().await.unwrap();
    let swept = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        messages::delete_expired(&other, 10),
    )
    .await
    .expect("a sweep never waits on locked rows")
    .unwrap();
    assert_eq!(swept, 2);
    tx.rollback().await.unwrap();
    assert_eq!(messages::delete_expired(&other, 10).await.unwrap(), 2);
}

/// The label rule is enforced by the schema itself (V12 writes it as a plain
/// expression): lowercase `[a-z0-9:_-]`, 1..64 characters, no NULL element;
/// an empty set is valid.
#[tokio::test]
async fn the_schema_refuses_malformed_labels() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let (id, _) = deliver(&store, &alice, Mail::default()).await;
    let c = store.client().await.unwrap();
    let set = |labels: &'static str| {
        let (c, id) = (&c, &id);
        async move {
            c.execute(
                &format!("UPDATE messages SET labels = '{labels}' WHERE id = $1"),
                &[&id.as_str()],
            )
            .await
        }
    };
    for good in [
        "{}",
        "{a}",
        "{a,b:c,x_y-9}",
        &*format!("{{{}}}", "z".repeat(64)),
    ] {
        let good: &'static str = Box::leak(good.to_owned().into_boxed_str());
        assert_eq!(set(good).await.unwrap(), 1, "{good}");
    }
    for bad in [
        "{Upper}",
        "{\"\"}",
        "{NULL}",
        "{a,NULL}",
        "{\"a b\"}",
        "{\"a,b\"}",
        "{é}",
        &*format!("{{{}}}", "z".repeat(65)),
    ] {
        let bad: &'static str = Box::leak(bad.to_owned().into_boxed_str());
        let err = set(bad).await.expect_err(bad);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
            "{bad}: {err}"
        );
    }
}

/// Deleting a user deletes its events (V12 trigger; the foreign key that
/// did this is gone) and leaves other users' events alone.
#[tokio::test]
async fn deleting_a_user_deletes_its_events() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let bob = mailbox(&store, "bob").await;
    deliver(&store, &alice, Mail::default()).await;
    deliver(&store, &bob, Mail::default()).await;
    let c = store.client().await.unwrap();
    let events = |user: &UserId| {
        let (c, user) = (&c, user.clone());
        async move {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM webhook_events WHERE user_id = $1",
                    &[&user.as_str()],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    assert_eq!(events(&alice.user).await, 1);
    c.execute("DELETE FROM users WHERE id = $1", &[&alice.user.as_str()])
        .await
        .unwrap();
    assert_eq!(events(&alice.user).await, 0);
    assert_eq!(events(&bob.user).await, 1);
}

/// The page statement is planned once per connection, not per call: its
/// limits are literals, so after Postgres's five custom plans the cached
/// generic plan is used (a `LIMIT $n` looked costlier as a generic plan and
/// was re-planned on every execution — a third of the database's time on
/// `GET …/messages`).
#[tokio::test]
async fn list_statements_reuse_their_generic_plan() {
    let (_db, store) = super::store().await;
    let mb = mailbox(&store, "plans").await;
    for i in 0..30 {
        let id = format!("plan{i}@example.net");
        deliver(
            &store,
            &mb,
            Mail {
                message_id: &id,
                subject: "s",
                ..Mail::default()
            },
        )
        .await;
    }
    // Enough rows that a generic plan's guess at `LIMIT $n` (a tenth of
    // the rows) costs visibly more than a custom plan for `LIMIT 6`:
    // copies of the 30 with new ids and message ids.
    let c = store.client().await.unwrap();
    c.batch_execute(
        "CREATE TEMP TABLE copies AS SELECT m.* FROM messages m, generate_series(1, 100); \
         UPDATE copies SET id = 'msg_' || md5(random()::text), \
                           email_message_id = md5(random()::text), \
                           created_at = created_at - random() * interval '1 day'; \
         DO $$ DECLARE cols text; BEGIN \
           SELECT string_agg(quote_ident(attname), ',') INTO cols FROM pg_attribute \
            WHERE attrelid = 'messages'::regclass AND attnum > 0 AND NOT attisdropped \
              AND attgenerated = ''; \
           EXECUTE format('INSERT INTO messages (%s) SELECT %s FROM copies', cols, cols); \
         END $$; \
         ANALYZE messages",
    )
    .await
    .unwrap();
    // The three statement forms: the default inbox view, the whole
    // listing, and a row-by-row filter (the budgeted window).
    let inbox = ListFilter {
        direction: Some(Direction::Inbound),
        inbox_status: Some(InboxStatus::Unread),
        ..ListFilter::default()
    };
    let by_sender = ListFilter {
        from: Some("someone".into()),
        ..all()
    };
    let filters = [inbox, all(), by_sender];
    for filter in &filters {
        for _ in 0..10 {
            let page = messages::list(&c, &mb.user, &mb.agent, filter, None, 5)
                .await
                .unwrap();
            assert_eq!(page.items.len(), 5);
        }
    }
    let rows = c
        .query(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements \
             WHERE statement LIKE '%FROM messages m WHERE%' \
               AND statement NOT LIKE '%pg_prepared_statements%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), filters.len(), "one statement per filter shape");
    for row in rows {
        let (sql, generic, custom): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(
            generic >= 5 && custom <= 5,
            "re-planned: {generic} generic, {custom} custom plans of {sql}"
        );
    }
}
