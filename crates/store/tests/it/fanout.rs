//! Fan-out: every matching enabled webhook gets each event exactly once, in
//! the commit that moves the event out of `pending`, whatever the number of
//! webhooks (flaw 8), with label filters that match (flaw 9), across
//! concurrent replicas, and one bad event does not hold back the others.

use std::collections::HashSet;

use e2a_store::{
    Store, StoreConfig,
    events::{self, NewEvent},
    fanout,
    ids::UserId,
};

/// A webhook of `user` with the given subscription and filters.
async fn webhook(
    store: &Store,
    user: &UserId,
    id: &str,
    events: &[&str],
    filters: (&[&str], &[&str], &[&str]),
    enabled: bool,
) {
    let c = store.client().await.unwrap();
    c.execute(
        "INSERT INTO webhooks (id, user_id, url, events, signing_secret, enabled, \
                               filter_agent_ids, filter_conversation_ids, filter_labels) \
         VALUES ($1, $2, 'https://hooks.example.com/' || $1, $3, 'whsec_' || $1, $4, $5, $6, $7)",
        &[
            &id,
            &user.as_str(),
            &events,
            &enabled,
            &filters.0,
            &filters.1,
            &filters.2,
        ],
    )
    .await
    .unwrap();
}

const NONE: (&[&str], &[&str], &[&str]) = (&[], &[], &[]);

/// Appends an event; returns its id.
async fn event(
    store: &Store,
    user: &UserId,
    n: usize,
    event_type: &str,
    agent: &str,
    conversation: &str,
    labels: &[&str],
) -> String {
    let id = events::deterministic_id(&[&format!("{user}-{n}"), event_type]);
    let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    let envelope = serde_json::json!({"event": event_type, "id": id, "data": {}});
    let c = store.client().await.unwrap();
    events::append(
        &c,
        &NewEvent {
            id: &id,
            user_id: user,
            event_type,
            envelope: &envelope,
            agent_id: Some(agent),
            conversation_id: Some(conversation),
            message_id: None,
            labels: &labels,
        },
    )
    .await
    .unwrap();
    id.to_string()
}

/// (status, matched webhook ids) of an event.
async fn outcome(store: &Store, id: &str) -> (String, Vec<String>) {
    let row = store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT status, matched_webhook_ids FROM webhook_events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The webhooks an event has deliveries for, sorted.
async fn delivered_to(store: &Store, id: &str) -> Vec<String> {
    store
        .client()
        .await
        .unwrap()
        .query(
            "SELECT webhook_id FROM webhook_subscriber_deliveries WHERE event_id = $1 ORDER BY 1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn events_reach_exactly_the_matching_enabled_webhooks() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let received = &["email.received"][..];
    webhook(&store, &alice, "wh_all", received, NONE, true).await;
    webhook(&store, &alice, "wh_off", received, NONE, false).await;
    webhook(&store, &alice, "wh_sent", &["email.sent"], NONE, true).await;
    webhook(
        &store,
        &alice,
        "wh_agent",
        received,
        (&["a@x.test"], &[], &[]),
        true,
    )
    .await;
    webhook(
        &store,
        &alice,
        "wh_conv",
        received,
        (&[], &["conv_1"], &[]),
        true,
    )
    .await;
    webhook(
        &store,
        &alice,
        "wh_label",
        received,
        (&[], &[], &["urgent", "vip"]),
        true,
    )
    .await;
    webhook(
        &store,
        &alice,
        "wh_both",
        received,
        (&["a@x.test"], &[], &["vip"]),
        true,
    )
    .await;
    webhook(&store, &bob, "wh_bob", received, NONE, true).await;

    let plain = event(
        &store,
        &alice,
        1,
        "email.received",
        "b@x.test",
        "conv_2",
        &[],
    )
    .await;
    let agent_a = event(
        &store,
        &alice,
        2,
        "email.received",
        "a@x.test",
        "conv_2",
        &[],
    )
    .await;
    let conv_1 = event(
        &store,
        &alice,
        3,
        "email.received",
        "b@x.test",
        "conv_1",
        &[],
    )
    .await;
    let vip_a = event(
        &store,
        &alice,
        4,
        "email.received",
        "a@x.test",
        "conv_2",
        &["vip"],
    )
    .await;
    let sent = event(&store, &alice, 5, "email.sent", "b@x.test", "conv_2", &[]).await;
    let nobody = event(&store, &alice, 6, "email.rejected", "b@x.test", "c", &[]).await;

    let c = store.client().await.unwrap();
    let done = fanout::fan_out(&c, 100).await.unwrap();
    assert_eq!(done.events, 6);
    assert_eq!(done.deliveries, 1 + 2 + 2 + 4 + 1);

    assert_eq!(delivered_to(&store, &plain).await, ["wh_all"]);
    assert_eq!(delivered_to(&store, &agent_a).await, ["wh_agent", "wh_all"]);
    assert_eq!(delivered_to(&store, &conv_1).await, ["wh_all", "wh_conv"]);
    assert_eq!(
        delivered_to(&store, &vip_a).await,
        ["wh_agent", "wh_all", "wh_both", "wh_label"]
    );
    assert_eq!(delivered_to(&store, &sent).await, ["wh_sent"]);
    assert!(delivered_to(&store, &nobody).await.is_empty());

    let (status, matched) = outcome(&store, &vip_a).await;
    assert_eq!(status, "processed");
    assert_eq!(matched, ["wh_agent", "wh_all", "wh_both", "wh_label"]);
    assert_eq!(outcome(&store, &nobody).await, ("no_match".into(), vec![]));

    // Nothing is pending any more; a second pass does nothing.
    assert_eq!(
        fanout::fan_out(&c, 100).await.unwrap(),
        fanout::FannedOut::default()
    );
    // The deliveries reference the event and copy nothing.
    let copied: i64 = c
        .query_one(
            "SELECT count(*) FROM webhook_subscriber_deliveries WHERE event_payload IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied, 0);
    // And they are due: the webhooks' next_due_at came forward.
    let due: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks WHERE next_due_at <= now()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(due, 6, "every enabled webhook of alice with a delivery");
}

#[tokio::test]
async fn any_number_of_webhooks_each_get_the_event_once() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    c.execute(
        "INSERT INTO webhooks (id, user_id, url, events, signing_secret) \
         SELECT 'wh_' || g, $1, 'https://hooks.example.com/' || g, '{email.received}', 'whsec_' || g \
           FROM generate_series(1, 300) g",
        &[&alice.as_str()],
    )
    .await
    .unwrap();
    let id = event(&store, &alice, 1, "email.received", "a@x.test", "c", &[]).await;
    let done = fanout::fan_out(&c, 10).await.unwrap();
    assert_eq!((done.events, done.deliveries), (1, 300));
    assert_eq!(delivered_to(&store, &id).await.len(), 300);
    assert_eq!(outcome(&store, &id).await.1.len(), 300);
}

#[tokio::test]
async fn concurrent_replicas_fan_out_every_event_exactly_once() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    for w in ["wh_1", "wh_2", "wh_3"] {
        webhook(&store, &alice, w, &["email.received"], NONE, true).await;
    }
    let mut ids = HashSet::new();
    for n in 0..600 {
        ids.insert(event(&store, &alice, n, "email.received", "a@x.test", "c", &[]).await);
    }
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let store = Store::new(&StoreConfig::new(db.url())).unwrap();
            tokio::spawn(async move {
                let c = store.client().await.unwrap();
                let mut total = fanout::FannedOut::default();
                loop {
                    let done = fanout::fan_out(&c, 25).await.unwrap();
                    total.events += done.events;
                    total.deliveries += done.deliveries;
                    if done.events == 0 {
                        return total;
                    }
                }
            })
        })
        .collect();
    let (mut events_done, mut deliveries_done) = (0, 0);
    for r in replicas {
        let t = r.await.unwrap();
        events_done += t.events;
        deliveries_done += t.deliveries;
    }
    assert_eq!((events_done, deliveries_done), (600, 1800));
    let c = store.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT (event_id, webhook_id)) FROM webhook_subscriber_deliveries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1800, 1800));
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM webhook_events WHERE status = 'pending'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn one_event_that_cannot_be_fanned_out_does_not_block_the_others() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_1", &["email.received"], NONE, true).await;
    let good = event(&store, &alice, 1, "email.received", "a@x.test", "c", &[]).await;
    let bad = event(&store, &alice, 2, "email.received", "a@x.test", "c", &[]).await;
    let c = store.client().await.unwrap();
    // A fault that only this event's deliveries hit.
    c.batch_execute(&format!(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.event_id = '{bad}' THEN RAISE EXCEPTION 'refused for the test'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER test_refuse BEFORE INSERT ON webhook_subscriber_deliveries \
         FOR EACH ROW EXECUTE FUNCTION test_refuse();"
    ))
    .await
    .unwrap();

    assert!(fanout::fan_out(&c, 10).await.is_err(), "the batch fails");
    assert_eq!(outcome(&store, &good).await.0, "pending", "atomic: nothing");
    let done = fanout::fan_out_one_by_one(&c, 10).await.unwrap();
    assert_eq!((done.events, done.deliveries), (1, 1));
    assert_eq!(outcome(&store, &good).await.0, "processed");
    let row = c
        .query_one(
            "SELECT status, attempts, last_error, next_poll_at > now() FROM webhook_events WHERE id = $1",
            &[&bad],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert!(row.get::<_, String>(2).contains("refused for the test"));
    assert!(row.get::<_, bool>(3), "retried later, not in a hot loop");

    // At its last attempt it is given up.
    c.execute(
        "UPDATE webhook_events SET attempts = max_attempts - 1, next_poll_at = now() WHERE id = $1",
        &[&bad],
    )
    .await
    .unwrap();
    fanout::fan_out_one_by_one(&c, 10).await.unwrap();
    assert_eq!(outcome(&store, &bad).await.0, "failed");
}

/// The claim brings what to send: the event's envelope, or nothing once
/// the event is gone (the deliverer then fails the delivery).
#[tokio::test]
async fn a_claim_carries_the_event_or_says_it_is_gone() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    webhook(&store, &alice, "wh_1", &["email.sent"], NONE, true).await;
    webhook(&store, &alice, "wh_2", &["email.sent"], NONE, true).await;
    let id = event(&store, &alice, 1, "email.sent", "a@x.test", "c", &[]).await;
    let c = store.client().await.unwrap();
    fanout::fan_out(&c, 10).await.unwrap();
    let lease = std::time::Duration::from_secs(60);
    let first = e2a_store::deliveries::claim(&c, 1, lease).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].envelope.as_ref().unwrap()["id"], id.as_str());
    c.execute("DELETE FROM webhook_events WHERE id = $1", &[&id])
        .await
        .unwrap();
    let second = e2a_store::deliveries::claim(&c, 10, lease).await.unwrap();
    assert_eq!(second.len(), 1);
    assert!(second[0].envelope.is_none());
}
