//! The API's side of the delivery queue: test sends (a pending delivery
//! with its own envelope, which the deliverer's claim picks up) and a
//! webhook's delivery log (newest first, status filter, bounded walks,
//! another tenant's webhook never read).

use e2a_store::{
    Store, StoreError,
    deliveries::{self, Position, Status, TestSendError},
    ids::{UserId, WebhookId},
    webhooks::{self, NewWebhook, WebhookPatch},
};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::events::assert_one_bounded_index_walk;

async fn webhook(store: &Store, user: &UserId) -> WebhookId {
    let mut c = store.client().await.unwrap();
    webhooks::create(
        &mut c,
        user,
        &NewWebhook {
            url: "https://hooks.example.com/h".into(),
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

fn object(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

async fn count(store: &Store) -> i64 {
    store
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM webhook_subscriber_deliveries", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_test_send_queues_its_own_envelope_for_the_deliverer() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let w = webhook(&store, &alice).await;
    let c = store.client().await.unwrap();
    let before = OffsetDateTime::now_utc();
    let id = deliveries::send_test(
        &c,
        &alice,
        w.as_str(),
        "email.sent",
        object(json!({"test": true, "n": 1})),
    )
    .await
    .unwrap();
    assert!(id.as_str().starts_with("whd_"));

    let row = c
        .query_one(
            "SELECT event_id, replay_id, event_type, event_payload, status, user_id \
             FROM webhook_subscriber_deliveries WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, String>(2), "email.sent");
    let envelope: Value = row.get(3);
    assert_eq!(envelope["event"], "email.sent");
    assert_eq!(envelope["data"], json!({"test": true, "n": 1}));
    let evt = envelope["id"].as_str().unwrap();
    assert!(e2a_store::ids::EventId::parse(evt).is_some(), "{evt}");
    let at = OffsetDateTime::parse(
        envelope["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(at >= before - time::Duration::seconds(1));
    assert_eq!(row.get::<_, String>(4), "pending");
    assert_eq!(row.get::<_, UserId>(5), alice);

    // Due at once: the deliverer's claim takes it, with its payload.
    let claimed = deliveries::claim(&c, 10, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, id.as_str());
    assert_eq!(claimed[0].envelope.as_ref(), Some(&envelope));
    assert_eq!(claimed[0].event_id, None);

    // Refusals write nothing.
    let n = count(&store).await;
    assert!(matches!(
        deliveries::send_test(&c, &bob, w.as_str(), "email.received", Map::new()).await,
        Err(TestSendError::NotFound)
    ));
    for bad in ["", "wh_x", "wh_00000000000000000000000000000000"] {
        assert!(matches!(
            deliveries::send_test(&c, &alice, bad, "email.received", Map::new()).await,
            Err(TestSendError::NotFound)
        ));
    }
    assert!(matches!(
        deliveries::send_test(&c, &alice, w.as_str(), "email.bounced", Map::new()).await,
        Err(TestSendError::InvalidEventType(t)) if t == "email.bounced"
    ));
    let mut cm = store.client().await.unwrap();
    webhooks::update(
        &mut cm,
        &alice,
        w.as_str(),
        &WebhookPatch {
            enabled: Some(false),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        deliveries::send_test(&c, &alice, w.as_str(), "email.received", Map::new()).await,
        Err(TestSendError::Disabled)
    ));
    assert_eq!(count(&store).await, n);
}

/// Deliveries 1..=n of `webhook` (1 newest): failed at `failed_at`,
/// pending for 1 and 2, else delivered.
async fn log(store: &Store, user: &UserId, webhook: &WebhookId, n: i64, failed_at: &[i64]) {
    let c = store.client().await.unwrap();
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    c.execute(
        "INSERT INTO webhook_subscriber_deliveries \
           (id, user_id, webhook_id, event_type, event_payload, status, attempts, last_error, \
            last_status_code, last_attempt_at, created_at) \
         SELECT 'whd_' || lpad(to_hex(g), 32, '0'), $1, $2, 'email.received', '{}', \
                CASE WHEN g = ANY ($4) THEN 'failed' WHEN g <= 2 THEN 'pending' ELSE 'delivered' END, \
                CASE WHEN g <= 2 THEN 0 ELSE 1 END, \
                CASE WHEN g = ANY ($4) THEN 'HTTP 500' ELSE '' END, \
                CASE WHEN g = ANY ($4) THEN 500 WHEN g <= 2 THEN NULL ELSE 204 END, \
                CASE WHEN g <= 2 THEN NULL ELSE now() END, \
                now() - make_interval(secs => g) \
         FROM generate_series(1, $3::int8) g",
        &[user, webhook, &n, &failed_at.to_vec()],
    )
    .await
    .unwrap();
    c.batch_execute("ANALYZE webhook_subscriber_deliveries")
        .await
        .unwrap();
}

async fn walk(
    store: &Store,
    user: &UserId,
    webhook: &WebhookId,
    status: Option<Status>,
    limit: i64,
) -> (Vec<i64>, usize) {
    let c = store.client().await.unwrap();
    let mut after: Option<Position> = None;
    let (mut found, mut pages) = (Vec::new(), 0);
    loop {
        let page = deliveries::list(&c, user, webhook.as_str(), status, after.as_ref(), limit)
            .await
            .unwrap();
        pages += 1;
        assert!(page.items.len() as i64 <= limit);
        found.extend(
            page.items
                .iter()
                .map(|d| i64::from_str_radix(&d.id.as_str()[4..], 16).unwrap()),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => return (found, pages),
        }
        assert!(pages < 1000, "the walk does not end");
    }
}

#[tokio::test]
async fn the_delivery_log_pages_newest_first_by_status_for_the_owner_only() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let w = webhook(&store, &alice).await;
    let other = webhook(&store, &alice).await;
    log(&store, &alice, &w, 20, &[7, 13]).await;
    let c = store.client().await.unwrap();

    let (found, pages) = walk(&store, &alice, &w, None, 6).await;
    assert_eq!(found, (1..=20).collect::<Vec<_>>());
    assert_eq!(pages, 4);
    let (found, _) = walk(&store, &alice, &w, Some(Status::Failed), 1).await;
    assert_eq!(found, [7, 13]);
    let (found, _) = walk(&store, &alice, &w, Some(Status::Pending), 50).await;
    assert_eq!(found, [1, 2]);
    let (found, _) = walk(&store, &alice, &w, Some(Status::Delivered), 50).await;
    assert_eq!(found.len(), 16);
    let (found, pages) = walk(&store, &alice, &other, None, 50).await;
    assert_eq!((found.len(), pages), (0, 1));

    let page = deliveries::list(&c, &alice, w.as_str(), Some(Status::Failed), None, 1)
        .await
        .unwrap();
    let d = &page.items[0];
    assert_eq!(d.status, Status::Failed);
    assert_eq!(d.event_type, "email.received");
    assert_eq!((d.attempts, d.last_status_code), (1, Some(500)));
    assert_eq!(d.last_error, "HTTP 500");
    assert!(d.last_attempt_at.is_some());
    assert!(d.created_at < OffsetDateTime::now_utc());
    let pending = deliveries::list(&c, &alice, w.as_str(), None, None, 1)
        .await
        .unwrap();
    assert_eq!(pending.items[0].status, Status::Pending);
    assert_eq!(pending.items[0].last_status_code, None);

    // Another tenant's webhook (or no webhook) is not found; none of its
    // rows is read.
    for (user, id) in [
        (&bob, w.as_str()),
        (&alice, "wh_00000000000000000000000000000000"),
        (&alice, "nonsense"),
    ] {
        assert!(matches!(
            deliveries::list(&c, user, id, None, None, 10).await,
            Err(StoreError::NotFound)
        ));
    }
}

#[tokio::test]
async fn a_status_filter_on_a_long_log_examines_a_bounded_number_of_rows() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let w = webhook(&store, &alice).await;
    log(&store, &alice, &w, 5000, &[4500]).await;
    let c = store.client().await.unwrap();

    let first = deliveries::list(&c, &alice, w.as_str(), Some(Status::Failed), None, 10)
        .await
        .unwrap();
    assert!(first.items.is_empty() && first.next.is_some());
    let (found, pages) = walk(&store, &alice, &w, Some(Status::Failed), 10).await;
    assert_eq!(found, [4500]);
    assert_eq!(pages as i64, 5000 / deliveries::SCAN_BUDGET + 1);

    let mid = Position {
        created_at: OffsetDateTime::now_utc() - time::Duration::seconds(2500),
        id: e2a_store::ids::DeliveryId::from_hex(&format!("{:032x}", 2500)).unwrap(),
    };
    for status in [None, Some(Status::Failed), Some(Status::Delivered)] {
        for after in [None, Some(&mid)] {
            let plan = deliveries::explain_list(&c, &w, status, after, 100)
                .await
                .unwrap();
            let index = assert_one_bounded_index_walk(
                &plan,
                "webhook_subscriber_deliveries",
                deliveries::SCAN_BUDGET,
            );
            assert_eq!(index, "webhook_subscriber_deliveries_webhook_created_idx");
        }
    }
}
