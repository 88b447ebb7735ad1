//! The events API in the store: the owner's log paged newest first with
//! every filter, bounded walks on a big log, one event with its delivery
//! counts and raw message, and redelivery — replays that reference the
//! event, 409s for webhooks that never matched, deduplication through the
//! idempotency core (sequential and concurrent), retention (gone) and
//! tenancy.

use e2a_store::{
    Store, StoreConfig,
    events::{
        self, EventError, EventStatus, ItemStatus, ListFilter, Position, Redelivery,
        RedeliveryItem, RedeliveryStatus, SkipReason,
    },
    ids::{EventId, UserId, WebhookId},
    webhooks::{self, NewWebhook, WebhookPatch},
};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use super::messages::{Mail, deliver, mailbox};

/// Event number `n` of the fixtures: a fixed id that sorts like `n`.
fn evt(n: i64) -> EventId {
    EventId::from_hex(&format!("{n:032x}")).unwrap()
}

/// Appends event `n` of `user` created `n` seconds before `t0`.
#[allow(clippy::too_many_arguments)]
async fn event(
    store: &Store,
    user: &UserId,
    n: i64,
    t0: OffsetDateTime,
    event_type: &str,
    agent: Option<&str>,
    conversation: Option<&str>,
) {
    let id = evt(n);
    let envelope = events::envelope(event_type, &id, t0, json!({ "n": n }));
    store
        .client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, \
               status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'processed', $7::timestamptz - make_interval(secs => $8))",
            &[
                &id,
                user,
                &event_type,
                &envelope,
                &agent,
                &conversation,
                &t0,
                &(n as f64),
            ],
        )
        .await
        .unwrap();
}

/// Every event `filter` selects, following `next` with pages of `limit`;
/// also the number of pages.
async fn walk(store: &Store, user: &UserId, filter: &ListFilter, limit: i64) -> (Vec<i64>, usize) {
    let c = store.client().await.unwrap();
    let mut after: Option<Position> = None;
    let mut found = Vec::new();
    let mut pages = 0;
    loop {
        let page = events::list(&c, user, filter, after.as_ref(), limit)
            .await
            .unwrap();
        pages += 1;
        assert!(page.items.len() as i64 <= limit);
        for e in &page.items {
            let n = i64::from_str_radix(&e.id.as_str()[4..], 16).unwrap();
            found.push(n);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return (found, pages),
        }
        assert!(pages < 1000, "the walk does not end");
    }
}

const TYPES: [&str; 5] = [
    "email.received",
    "email.sent",
    "email.pending_approval",
    "email.approved",
    "email.rejected",
];

#[tokio::test]
async fn the_log_pages_newest_first_with_every_filter_and_never_another_tenants() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let t0 = OffsetDateTime::now_utc();
    // Alice: events 1..=25 (1 newest); bob: 101..=105.
    let agent_of = |n: i64| if n % 2 == 1 { "a1@x.test" } else { "a2@x.test" };
    let conv_of = |n: i64| format!("cnv_{}", n % 3);
    for n in 1..=25 {
        let conv = conv_of(n);
        event(
            &store,
            &alice,
            n,
            t0,
            TYPES[(n % 5) as usize],
            Some(agent_of(n)),
            Some(&conv),
        )
        .await;
    }
    for n in 101..=105 {
        event(&store, &bob, n, t0, "email.received", None, None).await;
    }
    // Alice's event 26 is past its retention: never listed.
    event(
        &store,
        &alice,
        26,
        t0,
        "email.sent",
        Some("a1@x.test"),
        None,
    )
    .await;
    let c = store.client().await.unwrap();
    c.execute(
        "UPDATE webhook_events SET expires_at = now() - interval '1 second' WHERE id = $1",
        &[&evt(26)],
    )
    .await
    .unwrap();

    let all: Vec<i64> = (1..=25).collect();
    let (found, pages) = walk(&store, &alice, &ListFilter::default(), 7).await;
    assert_eq!(found, all);
    assert_eq!(pages, 4);
    let (found, pages) = walk(&store, &alice, &ListFilter::default(), 25).await;
    assert_eq!((found.len(), pages), (25, 1), "no empty last page");

    let page = events::list(&c, &alice, &ListFilter::default(), None, 2)
        .await
        .unwrap();
    let first = &page.items[0];
    assert_eq!(first.id, evt(1));
    assert_eq!(first.event_type, "email.sent");
    assert_eq!(first.status, EventStatus::Processed);
    assert_eq!(first.schema_version, 1);
    assert_eq!(first.agent_id.as_deref(), Some("a1@x.test"));
    assert_eq!(first.conversation_id.as_deref(), Some("cnv_1"));
    assert_eq!(first.message_id, None);
    assert_eq!(first.data, json!({ "n": 1 }));

    let expect = |pred: &dyn Fn(i64) -> bool| all.iter().copied().filter(|&n| pred(n)).collect();
    let cases: Vec<(ListFilter, Vec<i64>)> = vec![
        (
            ListFilter {
                event_type: Some("email.sent".into()),
                ..ListFilter::default()
            },
            expect(&|n| n % 5 == 1),
        ),
        (
            ListFilter {
                agent_id: Some("a2@x.test".into()),
                ..ListFilter::default()
            },
            expect(&|n| n % 2 == 0),
        ),
        (
            ListFilter {
                agent_id: Some("a1@x.test".into()),
                event_type: Some("email.received".into()),
                ..ListFilter::default()
            },
            expect(&|n| n % 2 == 1 && n % 5 == 0),
        ),
        (
            ListFilter {
                event_type: Some("email.approved".into()),
                conversation_id: Some("cnv_0".into()),
                ..ListFilter::default()
            },
            expect(&|n| n % 5 == 3 && n % 3 == 0),
        ),
        (
            ListFilter {
                since: Some(t0 - Duration::seconds(10)),
                until: Some(t0 - Duration::seconds(4)),
                ..ListFilter::default()
            },
            expect(&|n| (5..=10).contains(&n)),
        ),
        (
            ListFilter {
                agent_id: Some("nobody@x.test".into()),
                ..ListFilter::default()
            },
            vec![],
        ),
        (
            ListFilter {
                message_id: Some("msg_00000000000000000000000000000000".into()),
                ..ListFilter::default()
            },
            vec![],
        ),
    ];
    for (filter, want) in cases {
        for limit in [1, 3, 200] {
            let (found, _) = walk(&store, &alice, &filter, limit).await;
            assert_eq!(found, want, "{filter:?} limit {limit}");
        }
    }
    let (found, _) = walk(&store, &bob, &ListFilter::default(), 50).await;
    assert_eq!(found, (101..=105).collect::<Vec<_>>());
}

/// Events of one message share a timestamp: the cursor breaks ties by id.
#[tokio::test]
async fn ties_on_created_at_are_paged_by_id() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let t0 = OffsetDateTime::now_utc();
    for n in 1..=9 {
        event(
            &store,
            &alice,
            n,
            t0,
            "email.received",
            Some("a@x.test"),
            None,
        )
        .await;
    }
    store
        .client()
        .await
        .unwrap()
        .execute("UPDATE webhook_events SET created_at = $1", &[&t0])
        .await
        .unwrap();
    for filter in [
        ListFilter::default(),
        ListFilter {
            agent_id: Some("a@x.test".into()),
            ..ListFilter::default()
        },
        ListFilter {
            event_type: Some("email.received".into()),
            ..ListFilter::default()
        },
    ] {
        let (found, pages) = walk(&store, &alice, &filter, 2).await;
        assert_eq!(found, (1..=9).rev().collect::<Vec<_>>(), "{filter:?}");
        assert_eq!(pages, 5);
    }
}

/// Every plan node, depth first.
fn nodes(plan: &Value) -> Vec<&Value> {
    let mut out = vec![plan];
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            out.extend(nodes(child));
        }
    }
    out
}

/// Asserts the executed plan reads `relation` once, through an index scan
/// that examines at most `budget` rows, and sorts nothing; returns the
/// index.
pub fn assert_one_bounded_index_walk(explained: &Value, relation: &str, budget: i64) -> String {
    let root = &explained[0]["Plan"];
    let all = nodes(root);
    for node in &all {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        assert!(
            !matches!(
                kind,
                "Sort" | "Incremental Sort" | "Aggregate" | "Hash" | "Materialize"
            ),
            "a {kind} node: {root:#}"
        );
    }
    let scans: Vec<_> = all
        .iter()
        .filter(|n| n["Relation Name"] == relation)
        .collect();
    assert_eq!(scans.len(), 1, "one scan of {relation}: {root:#}");
    let scan = scans[0];
    assert_eq!(scan["Node Type"], "Index Scan", "{root:#}");
    let rows = scan["Actual Rows"].as_f64().unwrap() * scan["Actual Loops"].as_f64().unwrap();
    let removed = scan["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
    assert!(
        rows + removed <= budget as f64 + 1.0,
        "{rows} rows (+{removed} filtered) examined: {root:#}"
    );
    scan["Index Name"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_log_of_20k_events_is_walked_in_bounded_pages_through_one_index() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let c = store.client().await.unwrap();
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    // 20,000 events of alice, g = 1 newest: types in turn, agent a1 on odd
    // rows, a2 on even ones; one conversation `cnv_needle` at g = 15,000;
    // and as many of bob's, interleaved.
    for (user, id_base, age_offset) in [(&alice, 0_i64, 0.0_f64), (&bob, 100_000, 0.5)] {
        c.execute(
            "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, \
               status, created_at) \
             SELECT 'evt_' || lpad(to_hex(g + $3::int8), 32, '0'), $1, \
                    ($2::text[])[1 + g % 5], '{}', \
                    CASE WHEN g % 2 = 1 THEN 'a1@x.test' ELSE 'a2@x.test' END, \
                    CASE WHEN g = 15000 THEN 'cnv_needle' ELSE 'cnv_' || (g % 100) END, \
                    'processed', now() - make_interval(secs => g + $4::float8) \
             FROM generate_series(1, 20000) g",
            &[user, &TYPES.to_vec(), &id_base, &age_offset],
        )
        .await
        .unwrap();
    }
    c.batch_execute("ANALYZE webhook_events").await.unwrap();

    // A rare conversation: short (empty) pages with a cursor, each at most
    // the budget, until the one match and then the end.
    let needle = ListFilter {
        conversation_id: Some("cnv_needle".into()),
        ..ListFilter::default()
    };
    let first = events::list(&c, &alice, &needle, None, 50).await.unwrap();
    assert!(first.items.is_empty());
    assert!(first.next.is_some(), "the budget ran out: more to come");
    let (found, pages) = walk(&store, &alice, &needle, 50).await;
    assert_eq!(found, [15000]);
    assert_eq!(pages as i64, 20000 / events::SCAN_BUDGET + 1);

    let mid = Position {
        created_at: OffsetDateTime::now_utc() - Duration::seconds(10_000),
        id: evt(10_000),
    };
    let walks = [
        (ListFilter::default(), "webhook_events_user_created_idx"),
        (needle.clone(), "webhook_events_user_created_idx"),
        (
            ListFilter {
                event_type: Some("email.sent".into()),
                ..ListFilter::default()
            },
            "webhook_events_user_type_created_idx",
        ),
        (
            ListFilter {
                event_type: Some("email.sent".into()),
                conversation_id: Some("cnv_needle".into()),
                ..ListFilter::default()
            },
            "webhook_events_user_type_created_idx",
        ),
        (
            ListFilter {
                agent_id: Some("a2@x.test".into()),
                event_type: Some("email.sent".into()),
                ..ListFilter::default()
            },
            "webhook_events_user_agent_created_idx",
        ),
        (
            ListFilter {
                agent_id: Some("a1@x.test".into()),
                since: Some(OffsetDateTime::now_utc() - Duration::hours(3)),
                ..ListFilter::default()
            },
            "webhook_events_user_agent_created_idx",
        ),
    ];
    for (filter, index) in walks {
        for after in [None, Some(&mid)] {
            for limit in [1, 200] {
                let plan = events::explain_list(&c, &alice, &filter, after, limit)
                    .await
                    .unwrap();
                let used =
                    assert_one_bounded_index_walk(&plan, "webhook_events", events::SCAN_BUDGET);
                assert_eq!(used, index, "{filter:?}");
            }
        }
    }
}

async fn webhook(store: &Store, user: &UserId, url: &str) -> WebhookId {
    let mut c = store.client().await.unwrap();
    webhooks::create(
        &mut c,
        user,
        &NewWebhook {
            url: url.into(),
            events: vec!["email.received".into()],
            ..NewWebhook::default()
        },
        50,
    )
    .await
    .unwrap()
    .webhook
    .id
}

/// What the fan-out (another module) does: mark the event processed with
/// its matches, and their first deliveries in the given states.
async fn fan_out(store: &Store, user: &UserId, event: &EventId, matched: &[(&WebhookId, &str)]) {
    let c = store.client().await.unwrap();
    let ids: Vec<&str> = matched.iter().map(|(w, _)| w.as_str()).collect();
    c.execute(
        "UPDATE webhook_events SET status = 'processed', processed_at = now(), \
           matched_webhook_ids = $2 WHERE id = $1",
        &[event, &ids],
    )
    .await
    .unwrap();
    for (w, status) in matched {
        c.execute(
            "INSERT INTO webhook_subscriber_deliveries \
               (id, user_id, webhook_id, event_id, event_type, status) \
             VALUES ('whd_' || md5(random()::text), $1, $2, $3, 'email.received', $4)",
            &[user, w, event, status],
        )
        .await
        .unwrap();
    }
}

async fn replay_rows(store: &Store, event: &EventId) -> Vec<(String, String)> {
    let c = store.client().await.unwrap();
    let rows = c
        .query(
            "SELECT id, webhook_id, event_payload IS NULL, status, event_type FROM webhook_subscriber_deliveries \
             WHERE event_id = $1 AND replay_id = id ORDER BY created_at, id",
            &[event],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            assert!(
                r.get::<_, bool>(2),
                "replays reference the event, no payload"
            );
            assert_eq!(r.get::<_, String>(3), "pending");
            assert_eq!(r.get::<_, String>(4), "email.received");
            (r.get(0), r.get(1))
        })
        .collect()
}

#[tokio::test]
async fn get_counts_deliveries_and_redeliver_replays_to_matched_webhooks_once() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let bob = mailbox(&store, "bob").await;
    let (message, conversation) = deliver(
        &store,
        &alice,
        Mail {
            message_id: "m1@remote.example",
            subject: "hello",
            ..Mail::default()
        },
    )
    .await;
    let c = store.client().await.unwrap();
    let event: EventId = c
        .query_one(
            "SELECT id FROM webhook_events WHERE message_id = $1",
            &[&message],
        )
        .await
        .unwrap()
        .get(0);

    // Pending, nothing matched yet; the raw message filled in.
    let got = events::get(&c, &alice.user, event.as_str()).await.unwrap();
    assert_eq!(got.event.status, EventStatus::Pending);
    assert_eq!(got.event.message_id.as_deref(), Some(message.as_str()));
    assert_eq!(
        got.event.conversation_id.as_deref(),
        Some(conversation.as_str())
    );
    assert_eq!(got.event.agent_id.as_deref(), Some(alice.agent.as_str()));
    assert_eq!(got.event.data["subject"], "hello");
    assert!(
        got.event.data["raw_message"]
            .as_str()
            .is_some_and(|b| !b.is_empty())
    );
    assert_eq!(got.delivery_status, events::DeliveryCounts::default());
    // The list has the same event, without the raw message.
    let by_message = ListFilter {
        message_id: Some(message.to_string()),
        ..ListFilter::default()
    };
    let page = events::list(&c, &alice.user, &by_message, None, 50)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].id, event);
    assert!(page.items[0].data.get("raw_message").is_none());
    // Nothing of it for bob, nor for garbage ids.
    assert!(matches!(
        events::get(&c, &bob.user, event.as_str()).await,
        Err(EventError::NotFound)
    ));
    assert!(
        events::list(&c, &bob.user, &by_message, None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    for bad in [
        "",
        "evt_x",
        "msg_00000000000000000000000000000000",
        "evt_'; --",
    ] {
        assert!(matches!(
            events::get(&c, &alice.user, bad).await,
            Err(EventError::NotFound)
        ));
    }

    // A pending event is not fanned out yet: nothing to redeliver.
    let w1 = webhook(&store, &alice.user, "https://one.example/h").await;
    let mut cm = store.client().await.unwrap();
    for w in [Some(w1.as_str()), None] {
        assert!(matches!(
            events::redeliver(&mut cm, &alice.user, event.as_str(), w).await,
            Err(EventError::Pending)
        ));
    }

    let w2 = webhook(&store, &alice.user, "https://two.example/h").await;
    let w3 = webhook(&store, &alice.user, "https://three.example/h").await;
    let unmatched = webhook(&store, &alice.user, "https://four.example/h").await;
    let bobs = webhook(&store, &bob.user, "https://bob.example/h").await;
    fan_out(
        &store,
        &alice.user,
        &event,
        &[(&w1, "delivered"), (&w2, "failed"), (&w3, "pending")],
    )
    .await;
    let got = events::get(&c, &alice.user, event.as_str()).await.unwrap();
    assert_eq!(got.event.status, EventStatus::Processed);
    assert_eq!(
        got.delivery_status,
        events::DeliveryCounts {
            matched_webhooks: 3,
            delivered: 1,
            pending: 1,
            failed: 1,
        }
    );

    // One webhook: a pending replay referencing the event.
    let first = events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w1.as_str()))
        .await
        .unwrap();
    assert!(!first.replayed);
    let one = first.redelivery.clone();
    assert_eq!(one.event_id, event);
    assert_eq!(one.status, RedeliveryStatus::Pending);
    assert_eq!(one.webhook_id.as_ref(), Some(&w1));
    assert!(one.deliveries.is_none());
    let delivery = one.delivery_id.clone().unwrap();
    assert_eq!(
        replay_rows(&store, &event).await,
        [(delivery.to_string(), w1.to_string())]
    );
    assert_eq!(
        serde_json::to_value(&one).unwrap(),
        json!({
            "event_id": event, "status": "pending",
            "delivery_id": delivery, "webhook_id": w1,
        })
    );
    // The deliverer's claim picks it up, as a delivery of the event.
    let claimed = e2a_store::deliveries::claim(&c, 10, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        claimed.iter().any(|d| d.id == delivery.as_str()
            && d.event_id.as_deref() == Some(event.as_str())
            && d.envelope
                .as_ref()
                .is_some_and(|e| e["id"] == event.as_str())),
        "{claimed:?}"
    );

    // Again within the window: the same answer, nothing new queued.
    let again = events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w1.as_str()))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.redelivery, one);
    assert_eq!(replay_rows(&store, &event).await.len(), 1);
    let got = events::get(&c, &alice.user, event.as_str()).await.unwrap();
    assert_eq!(got.delivery_status.pending, 2);

    // Refusals: 404 for webhooks not alice's, 409 for one that never
    // matched or is disabled; none of them stores a key or a delivery.
    for (w, want) in [
        (bobs.as_str(), "not found"),
        ("wh_00000000000000000000000000000000", "not found"),
        ("garbage", "not found"),
        (unmatched.as_str(), "not matched"),
    ] {
        let got = events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w)).await;
        match (want, got) {
            ("not found", Err(EventError::WebhookNotFound)) => {}
            ("not matched", Err(EventError::WebhookNotMatched(id))) if id == unmatched => {}
            (want, got) => panic!("{w}: want {want}, got {got:?}"),
        }
    }
    webhooks::update(
        &mut cm,
        &alice.user,
        w3.as_str(),
        &WebhookPatch {
            enabled: Some(false),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w3.as_str())).await,
        Err(EventError::WebhookDisabled(w)) if w == w3
    ));
    assert!(matches!(
        events::redeliver(&mut cm, &bob.user, event.as_str(), None).await,
        Err(EventError::NotFound)
    ));
    let keys: i64 = c
        .query_one("SELECT count(*) FROM idempotency_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "only the successful redelivery is remembered");
    assert_eq!(replay_rows(&store, &event).await.len(), 1);

    // All matched webhooks: w1 queued, w2 deleted since, w3 disabled.
    webhooks::delete(&c, &alice.user, w2.as_str())
        .await
        .unwrap();
    let all = events::redeliver(&mut cm, &alice.user, event.as_str(), None)
        .await
        .unwrap();
    assert!(!all.replayed);
    let items = all.redelivery.deliveries.clone().unwrap();
    assert_eq!(all.redelivery.status, RedeliveryStatus::Scheduled);
    assert_eq!(all.redelivery.delivery_id, None);
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].webhook_id, w1);
    assert_eq!(items[0].status, ItemStatus::Pending);
    assert_eq!(
        &items[1..],
        [
            RedeliveryItem {
                webhook_id: w2.clone(),
                delivery_id: None,
                status: ItemStatus::Skipped,
                reason: Some(SkipReason::WebhookDeleted),
            },
            RedeliveryItem {
                webhook_id: w3.clone(),
                delivery_id: None,
                status: ItemStatus::Skipped,
                reason: Some(SkipReason::WebhookDisabled),
            },
        ]
    );
    assert_eq!(
        serde_json::to_value(&all.redelivery).unwrap()["deliveries"][1],
        json!({"webhook_id": w2, "status": "skipped", "reason": "webhook_deleted"})
    );
    let rows = replay_rows(&store, &event).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[1],
        (
            items[0].delivery_id.clone().unwrap().to_string(),
            w1.to_string()
        )
    );
    let again = events::redeliver(&mut cm, &alice.user, event.as_str(), None)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.redelivery, all.redelivery);
    assert_eq!(replay_rows(&store, &event).await.len(), 2);

    // After the dedupe window, a redelivery queues again.
    c.execute(
        "UPDATE idempotency_keys SET created_at = created_at - interval '301 seconds', \
           completed_at = completed_at - interval '301 seconds' WHERE key = $1",
        &[&events::replay_key(&event, Some(&w1)).as_str()],
    )
    .await
    .unwrap();
    let later = events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w1.as_str()))
        .await
        .unwrap();
    assert!(!later.replayed);
    assert_ne!(later.redelivery.delivery_id, one.delivery_id);
    assert_eq!(replay_rows(&store, &event).await.len(), 3);

    // Past its retention the event is gone, for reads and redeliveries,
    // and no longer listed.
    c.execute(
        "UPDATE webhook_events SET expires_at = now() - interval '1 second' WHERE id = $1",
        &[&event],
    )
    .await
    .unwrap();
    assert!(matches!(
        events::get(&c, &alice.user, event.as_str()).await,
        Err(EventError::Gone)
    ));
    assert!(matches!(
        events::redeliver(&mut cm, &alice.user, event.as_str(), Some(w1.as_str())).await,
        Err(EventError::Gone)
    ));
    assert!(
        events::list(&c, &alice.user, &by_message, None, 50)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_identical_redeliveries_queue_one_delivery() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    event(
        &store,
        &alice,
        1,
        OffsetDateTime::now_utc(),
        "email.received",
        None,
        None,
    )
    .await;
    let w = webhook(&store, &alice, "https://one.example/h").await;
    fan_out(&store, &alice, &evt(1), &[(&w, "delivered")]).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = Store::new(&StoreConfig::new(db.url())).unwrap();
            let (alice, w, barrier) = (alice.clone(), w.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                barrier.wait().await;
                events::redeliver(&mut c, &alice, evt(1).as_str(), Some(w.as_str()))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    let first: &Redelivery = &answers[0].redelivery;
    assert!(
        answers.iter().all(|a| &a.redelivery == first),
        "every caller got the one answer: {answers:?}"
    );
    assert_eq!(replay_rows(&store, &evt(1)).await.len(), 1);
}
