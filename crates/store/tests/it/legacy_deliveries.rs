//! Legacy per-agent pushes: enqueued by the ingest statement for cloud
//! agents with a `webhook_url` only, claimed with a lease that passes on
//! and guards the record, retried up to the limit, abandoned when the agent
//! stops taking pushes.
//!
//! Lapsed leases are simulated by moving the row's lease into the past in
//! SQL (what the clock would do), never by sleeping.

use std::time::Duration;

use e2a_store::{
    Store, StoreConfig,
    account_limits::Limits,
    address::EmailAddress,
    agents::{self, AgentMode, AgentPatch, NewAgent},
    deliveries::Attempt,
    ids::{MessageId, UserId},
    inbound::{self, Delivery, InboundMail, Outcome},
    legacy_deliveries::{
        self, AGENT_GONE_ERROR, LEGACY_MAX_ATTEMPTS, LegacyRecorded, NO_OUTCOME_ERROR,
    },
};
use serde_json::json;
use time::OffsetDateTime;

const LEASE: Duration = Duration::from_secs(60);
const HOOK: &str = "https://hooks.example.com/e2a?token=t0k";

async fn cloud_agent(store: &Store, user: &UserId, address: &str) {
    let mut c = store.client().await.unwrap();
    agents::create(
        &mut c,
        user,
        &NewAgent {
            address: EmailAddress::parse(address).unwrap(),
            name: String::new(),
            webhook_url: HOOK.into(),
            agent_mode: AgentMode::Cloud,
        },
        100,
    )
    .await
    .unwrap();
}

/// A delivery to `agent` flagged as the relay would: from the recipient
/// lookup.
async fn delivery(store: &Store, agent: &str) -> Delivery {
    let c = store.client().await.unwrap();
    let r = agents::resolve_recipient(&c, &EmailAddress::parse(agent).unwrap(), &Limits::default())
        .await
        .unwrap()
        .unwrap();
    Delivery {
        message_id: MessageId::new(),
        agent_id: r.agent_id,
        agent_domain: agent.split_once('@').unwrap().1.into(),
        user_id: r.user_id,
        auth_headers: json!({
            "X-E2A-Auth-Verified": "true",
            "X-E2A-Auth-Sender": "sender@remote.example",
            "X-E2A-Auth-Signature": "abc123",
        }),
        legacy_push: r.legacy_push,
    }
}

struct Mail {
    raw: Vec<u8>,
    sha256: String,
    message_id: String,
}

impl Mail {
    fn new(message_id: &str) -> Self {
        let mut raw = format!(
            "Message-ID: <{message_id}>\r\nFrom: sender@remote.example\r\nSubject: hi\r\n\r\nhello "
        )
        .into_bytes();
        // Not UTF-8: the raw bytes travel untouched.
        raw.extend_from_slice(b"\xff\r\n");
        Mail {
            sha256: inbound::body_sha256(&raw),
            raw,
            message_id: message_id.into(),
        }
    }
}

const TO: &[&str] = &["c@alice.example", "l@alice.example"];

/// Ingests `mail` to `deliveries` (To: both agents, Cc and Reply-To set).
async fn ingest(store: &Store, mail: &Mail, deliveries: &[Delivery]) -> Vec<Outcome> {
    let to: Vec<String> = TO.iter().map(|s| s.to_string()).collect();
    let cc = vec!["cc@remote.example".to_owned()];
    let reply_to = vec!["reply@remote.example".to_owned()];
    let view = InboundMail {
        raw: &mail.raw,
        body_sha256: &mail.sha256,
        email_message_id: &mail.message_id,
        sender: "reply@remote.example",
        subject: "hi",
        to: &to,
        cc: &cc,
        reply_to: &reply_to,
        thread_refs: &[],
        trusted_conversation_id: None,
        spf: "pass",
        dkim: "none",
        dmarc: "none",
    };
    inbound::ingest(store, &view, deliveries).await.unwrap()
}

/// Alice with a cloud agent `c@` and a local agent `l@` (which has a URL
/// too: local agents may keep one, and must not be pushed to).
async fn setup(store: &Store) -> UserId {
    let alice = super::user(store, "alice@example.com").await;
    super::agents::verified_domain(store, &alice, "alice.example").await;
    cloud_agent(store, &alice, "c@alice.example").await;
    super::agents::agent(store, &alice, "l@alice.example").await;
    let c = store.client().await.unwrap();
    agents::update(
        &c,
        &alice,
        "l@alice.example",
        &AgentPatch {
            webhook_url: Some(HOOK.into()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    alice
}

/// One message to the cloud agent; its id.
async fn pushed_message(store: &Store, n: usize) -> MessageId {
    let d = delivery(store, "c@alice.example").await;
    let id = d.message_id.clone();
    ingest(store, &Mail::new(&format!("m{n}@remote.example")), &[d]).await;
    id
}

async fn row(store: &Store, id: &MessageId) -> (String, i32, String) {
    let r = store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT status, attempts, last_error FROM webhook_deliveries WHERE message_id = $1",
            &[id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// What the clock does to a lease (or a retry's wait): it ends.
async fn lapse_lease(store: &Store, id: &MessageId) {
    store
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE webhook_deliveries \
                SET leased_until = CASE WHEN lease_token IS NOT NULL THEN now() - interval '1 second' END, \
                    next_retry_at = now() - interval '1 second' WHERE message_id = $1",
            &[id],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn ingest_enqueues_a_push_for_cloud_agents_with_a_url_only() {
    let (_db, store) = super::store().await;
    setup(&store).await;
    let cloud = delivery(&store, "c@alice.example").await;
    let local = delivery(&store, "l@alice.example").await;
    assert!(cloud.legacy_push);
    assert!(!local.legacy_push, "a local agent's URL is not pushed to");
    let cloud_id = cloud.message_id.clone();
    let mail = Mail::new("m1@remote.example");
    let before = OffsetDateTime::now_utc();
    ingest(&store, &mail, &[cloud, local]).await;

    let c = store.client().await.unwrap();
    let rows = c
        .query(
            "SELECT message_id, status, attempts, max_attempts, lease_token IS NULL, \
                    next_retry_at <= now(), expires_at FROM webhook_deliveries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "one push, for the cloud agent's copy only");
    let r = &rows[0];
    assert_eq!(r.get::<_, MessageId>(0), cloud_id);
    assert_eq!(r.get::<_, &str>(1), "pending");
    assert_eq!(
        (r.get::<_, i32>(2), r.get::<_, i32>(3)),
        (0, LEGACY_MAX_ATTEMPTS)
    );
    assert!(
        r.get::<_, bool>(4) && r.get::<_, bool>(5),
        "due, not leased"
    );
    let expires: OffsetDateTime = r.get(6);
    let ttl = expires - before;
    assert!(
        ttl > time::Duration::hours(71) && ttl < time::Duration::hours(73),
        "{ttl}"
    );
    // The delivery row copies nothing: the message row has it all.
    let headers: serde_json::Value = c
        .query_one(
            "SELECT auth_headers FROM messages WHERE id = $1",
            &[&cloud_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(headers["X-E2A-Auth-Signature"], "abc123");

    // An MTA retry of the same mail is a duplicate: no second push.
    let retry = [
        delivery(&store, "c@alice.example").await,
        delivery(&store, "l@alice.example").await,
    ];
    let outcomes = ingest(&store, &mail, &retry).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Duplicate { .. }))
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM webhook_deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_push_rolls_back_with_its_message() {
    let (_db, store) = super::store().await;
    let alice = setup(&store).await;
    // The second copy names an agent that does not exist: the statement
    // fails as a whole, the first copy's push included.
    let good = delivery(&store, "c@alice.example").await;
    let bad = Delivery {
        message_id: MessageId::new(),
        agent_id: "nobody@alice.example".into(),
        agent_domain: "alice.example".into(),
        user_id: alice,
        auth_headers: json!({}),
        legacy_push: true,
    };
    let raw = b"Subject: x\r\n\r\nx\r\n".to_vec();
    let sha = inbound::body_sha256(&raw);
    let view = InboundMail {
        raw: &raw,
        body_sha256: &sha,
        email_message_id: "",
        sender: "s@remote.example",
        subject: "x",
        to: &[],
        cc: &[],
        reply_to: &[],
        thread_refs: &[],
        trusted_conversation_id: None,
        spf: "none",
        dkim: "none",
        dmarc: "none",
    };
    assert!(inbound::ingest(&store, &view, &[good, bad]).await.is_err());
    let c = store.client().await.unwrap();
    for table in ["messages", "webhook_deliveries", "webhook_events"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
}

#[tokio::test]
async fn a_claim_returns_everything_the_post_needs_and_counts_the_attempt() {
    let (_db, store) = super::store().await;
    let alice = setup(&store).await;
    let mail = Mail::new("m1@remote.example");
    let d = delivery(&store, "c@alice.example").await;
    let id = d.message_id.clone();
    let outcomes = ingest(&store, &mail, &[d]).await;
    let Outcome::Stored {
        conversation_id, ..
    } = &outcomes[0]
    else {
        panic!("{outcomes:?}")
    };

    let c = store.client().await.unwrap();
    let mut claimed = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let p = claimed.remove(0);
    assert_eq!(p.message_id, id);
    assert_eq!(p.user_id, alice);
    assert_eq!(p.agent_id, "c@alice.example");
    assert_eq!(p.url, HOOK);
    assert_eq!(&p.conversation_id, conversation_id);
    assert_eq!(p.from, "reply@remote.example");
    assert_eq!(
        p.to.as_deref(),
        Some(&["c@alice.example".to_owned(), "l@alice.example".to_owned()][..])
    );
    assert_eq!(p.cc, ["cc@remote.example"]);
    assert_eq!(p.reply_to, ["reply@remote.example"]);
    assert_eq!(p.recipient, "c@alice.example");
    assert_eq!(p.raw_message, mail.raw);
    assert_eq!(
        p.auth_headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        [
            ("X-E2A-Auth-Sender", "sender@remote.example"),
            ("X-E2A-Auth-Signature", "abc123"),
            ("X-E2A-Auth-Verified", "true"),
        ]
    );
    let stored_at: OffsetDateTime = c
        .query_one("SELECT created_at FROM messages WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(p.received_at, stored_at);
    assert_eq!((p.attempts, p.max_attempts), (1, LEGACY_MAX_ATTEMPTS));
    assert!(p.lease_token.starts_with("lease_"));
    // Debug shows neither the URL nor the raw message.
    let debug = format!("{p:?}");
    assert!(
        !debug.contains("t0k") && !debug.contains("hello"),
        "{debug}"
    );

    // Leased: the lease's end is when it is due again; nobody else gets it.
    let r = c
        .query_one(
            "SELECT leased_until = next_retry_at, leased_until > now() + interval '50 seconds', \
                    last_attempt_at IS NOT NULL FROM webhook_deliveries WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert!(r.get::<_, bool>(0) && r.get::<_, bool>(1) && r.get::<_, bool>(2));
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &p.message_id,
            &p.lease_token,
            Attempt::Delivered { status: 204 }
        )
        .await
        .unwrap(),
        LegacyRecorded::Delivered
    );
    assert_eq!(
        row(&store, &id).await,
        ("delivered".into(), 1, String::new())
    );
    // A recorded outcome is final: recording again writes nothing.
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &p.message_id,
            &p.lease_token,
            Attempt::Failed {
                status: 500,
                error: "late"
            }
        )
        .await
        .unwrap(),
        LegacyRecorded::LeaseLost
    );
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_claimers_never_share_a_push() {
    let (db, store) = super::store().await;
    setup(&store).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(pushed_message(&store, n).await);
    }
    // Four claimers on their own pools (as four replicas), at once.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let claims: Vec<_> = (0..4)
        .map(|_| {
            let store = Store::new(&StoreConfig::new(db.url())).unwrap();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let c = store.client().await.unwrap();
                barrier.wait().await;
                legacy_deliveries::claim_legacy(&c, 10, LEASE)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for t in claims {
        claimed.extend(t.await.unwrap());
    }
    let mut got: Vec<MessageId> = claimed.iter().map(|p| p.message_id.clone()).collect();
    got.sort();
    let before = got.len();
    got.dedup();
    assert_eq!(got.len(), before, "a push was claimed twice");
    // Whatever the interleaving, what was left is claimable now, once.
    let c = store.client().await.unwrap();
    got.extend(
        legacy_deliveries::claim_legacy(&c, 100, LEASE)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.message_id),
    );
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
}

#[tokio::test]
async fn a_lapsed_lease_passes_on_and_the_late_worker_writes_nothing() {
    let (_db, store) = super::store().await;
    setup(&store).await;
    let id = pushed_message(&store, 1).await;
    let c = store.client().await.unwrap();
    let slow = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    lapse_lease(&store, &id).await;
    let taker = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(taker.message_id, id);
    assert_eq!(taker.attempts, 2, "the lost attempt counts");
    assert_ne!(taker.lease_token, slow.lease_token);
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &slow.message_id,
            &slow.lease_token,
            Attempt::Failed {
                status: 410,
                error: "HTTP 410"
            }
        )
        .await
        .unwrap(),
        LegacyRecorded::LeaseLost
    );
    assert_eq!(row(&store, &id).await, ("pending".into(), 2, String::new()));
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &taker.message_id,
            &taker.lease_token,
            Attempt::Delivered { status: 200 }
        )
        .await
        .unwrap(),
        LegacyRecorded::Delivered
    );
    assert_eq!(
        row(&store, &id).await,
        ("delivered".into(), 2, String::new())
    );
}

#[tokio::test]
async fn retries_wait_for_their_time_and_the_last_attempt_ends_failed() {
    let (_db, store) = super::store().await;
    setup(&store).await;
    let id = pushed_message(&store, 1).await;
    let c = store.client().await.unwrap();
    c.execute(
        "UPDATE webhook_deliveries SET max_attempts = 2 WHERE message_id = $1",
        &[&id],
    )
    .await
    .unwrap();

    let p = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    let at = OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &p.message_id,
            &p.lease_token,
            Attempt::Retry {
                status: 503,
                error: "HTTP 503",
                at
            }
        )
        .await
        .unwrap(),
        LegacyRecorded::WillRetry
    );
    let r = c
        .query_one(
            "SELECT status, next_retry_at, lease_token IS NULL AND leased_until IS NULL, \
                    last_status_code, last_error FROM webhook_deliveries WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, &str>(0), "pending");
    let due: OffsetDateTime = r.get(1);
    assert!(
        (due - at).abs() < time::Duration::milliseconds(1),
        "{due} {at}"
    );
    assert!(r.get::<_, bool>(2), "lease released");
    assert_eq!(
        (r.get::<_, Option<i32>>(3), r.get::<_, &str>(4)),
        (Some(503), "HTTP 503")
    );
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not before its time"
    );

    // Its time comes: the second and last attempt; a retryable failure
    // of the last attempt is final.
    lapse_lease(&store, &id).await;
    let p = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!((p.attempts, p.max_attempts), (2, 2));
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &p.message_id,
            &p.lease_token,
            Attempt::Retry {
                status: 0,
                error: "connect: connection refused",
                at: OffsetDateTime::now_utc(),
            }
        )
        .await
        .unwrap(),
        LegacyRecorded::Failed
    );
    assert_eq!(
        row(&store, &id).await,
        ("failed".into(), 2, "connect: connection refused".into())
    );
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_permanent_failure_ends_at_once_and_a_vanished_last_attempt_fails() {
    let (_db, store) = super::store().await;
    setup(&store).await;
    let c = store.client().await.unwrap();

    let id = pushed_message(&store, 1).await;
    let p = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        legacy_deliveries::record_legacy(
            &c,
            &p.message_id,
            &p.lease_token,
            Attempt::Failed {
                status: 404,
                error: "HTTP 404"
            }
        )
        .await
        .unwrap(),
        LegacyRecorded::Failed
    );
    assert_eq!(
        row(&store, &id).await,
        ("failed".into(), 1, "HTTP 404".into())
    );

    // The last allowed attempt is claimed, its worker vanishes: once the
    // lease is over the next claim fails it instead of a new attempt.
    let id = pushed_message(&store, 2).await;
    c.execute(
        "UPDATE webhook_deliveries SET max_attempts = 1 WHERE message_id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let lost = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(lost.attempts, 1);
    lapse_lease(&store, &id).await;
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        row(&store, &id).await,
        ("failed".into(), 1, NO_OUTCOME_ERROR.into())
    );
    let r = c
        .query_one(
            "SELECT lease_token IS NULL AND leased_until IS NULL FROM webhook_deliveries WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert!(r.get::<_, bool>(0));
}

#[tokio::test]
async fn a_push_whose_agent_stopped_taking_pushes_fails_without_an_attempt() {
    let (_db, store) = super::store().await;
    let alice = setup(&store).await;
    let c = store.client().await.unwrap();

    // Switched to local mode (and its URL cleared) before the push went out.
    let id = pushed_message(&store, 1).await;
    agents::update(
        &c,
        &alice,
        "c@alice.example",
        &AgentPatch {
            agent_mode: Some(AgentMode::Local),
            webhook_url: Some(String::new()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        row(&store, &id).await,
        ("failed".into(), 0, AGENT_GONE_ERROR.into())
    );

    // Local mode keeping its URL is just as final.
    agents::update(
        &c,
        &alice,
        "c@alice.example",
        &AgentPatch {
            agent_mode: Some(AgentMode::Cloud),
            webhook_url: Some(HOOK.into()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    let id = pushed_message(&store, 2).await;
    agents::update(
        &c,
        &alice,
        "c@alice.example",
        &AgentPatch {
            agent_mode: Some(AgentMode::Local),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(row(&store, &id).await.0, "failed");

    // A changed URL is followed: the push goes where the agent says now.
    agents::update(
        &c,
        &alice,
        "c@alice.example",
        &AgentPatch {
            agent_mode: Some(AgentMode::Cloud),
            webhook_url: Some("https://new.example.com/hook".into()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    let id = pushed_message(&store, 3).await;
    agents::update(
        &c,
        &alice,
        "c@alice.example",
        &AgentPatch {
            webhook_url: Some("https://newer.example.com/hook".into()),
            ..AgentPatch::default()
        },
    )
    .await
    .unwrap();
    let p = legacy_deliveries::claim_legacy(&c, 10, LEASE)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (&p.message_id, p.url.as_str()),
        (&id, "https://newer.example.com/hook")
    );

    // Deleting the agent deletes its messages and their pushes with them.
    let id = pushed_message(&store, 4).await;
    agents::delete(&c, &alice, "c@alice.example").await.unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM webhook_deliveries WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert!(
        legacy_deliveries::claim_legacy(&c, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}
