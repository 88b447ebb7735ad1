//! Webhooks aggregate: the cap under concurrency, the re-enable cooldown
//! decided in one statement (flaw 24), rotation that keeps a valid
//! previous secret (flaw 23), the expired-secret sweep, tenancy.

use e2a_store::{
    Store, StoreConfig, StoreError, domains,
    ids::{UserId, WebhookId},
    webhooks::{self, Filters, NewWebhook, REENABLE_COOLDOWN, WebhookError, WebhookPatch},
};

fn hook(url: &str) -> NewWebhook {
    NewWebhook {
        url: url.into(),
        description: "test hook".into(),
        events: vec!["email.received".into()],
        filters: Filters::default(),
    }
}

async fn create(store: &Store, user: &UserId, new: &NewWebhook) -> webhooks::Created {
    let mut c = store.client().await.unwrap();
    webhooks::create(&mut c, user, new, 50).await.unwrap()
}

async fn enable(
    store: &Store,
    user: &UserId,
    id: &WebhookId,
) -> Result<webhooks::Webhook, WebhookError> {
    let mut c = store.client().await.unwrap();
    let patch = WebhookPatch {
        enabled: Some(true),
        ..WebhookPatch::default()
    };
    webhooks::update(&mut c, user, id.as_str(), &patch).await
}

/// What the deliverer's auto-disable writes (spec §3.6), `ago` before now.
async fn auto_disable(store: &Store, id: &WebhookId, ago: &str) {
    let c = store.client().await.unwrap();
    c.execute(
        &format!(
            "UPDATE webhooks SET enabled = false, consecutive_failures = 10, \
             auto_disabled_at = now() - interval '{ago}' WHERE id = $1"
        ),
        &[id],
    )
    .await
    .unwrap();
}

/// 20 concurrent creations, each on its own connection, against a cap of
/// 5: exactly 5 webhooks exist and 15 callers got `CapReached`.
#[tokio::test]
async fn concurrent_creations_never_pass_the_cap() {
    let (db, _) = super::store().await;
    // One connection per caller, so all 20 really run at once.
    let mut config = StoreConfig::new(db.url());
    config.pool_size = 20;
    let store = Store::new(&config).unwrap();
    let alice = super::user(&store, "alice@example.com").await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (store, alice, barrier) = (store.clone(), alice.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut c = store.client().await.unwrap();
                barrier.wait().await;
                webhooks::create(
                    &mut c,
                    &alice,
                    &hook(&format!("https://h{i}.example.com/")),
                    5,
                )
                .await
            })
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(WebhookError::CapReached { limit: 5 }) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((created, refused), (5, 15));
    let c = store.client().await.unwrap();
    assert_eq!(webhooks::list(&c, &alice).await.unwrap().len(), 5);
}

/// Create, read, list (newest first), update, delete; another user's
/// webhook is not found on every path; deletion takes deliveries along;
/// filters are normalised and agents must be the caller's.
#[tokio::test]
async fn crud_is_tenant_scoped_and_validated() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    {
        let c = store.client().await.unwrap();
        domains::ensure_shared(&c, "agents.localhost")
            .await
            .unwrap();
    }
    super::agents::agent(&store, &alice, "demo@agents.localhost").await;
    super::agents::agent(&store, &bob, "bobs@agents.localhost").await;

    let first = create(&store, &alice, &hook("https://one.example.com/")).await;
    assert!(first.signing_secret.starts_with("whsec_"));
    assert_eq!(first.signing_secret.len(), 6 + 64);
    assert!(!format!("{first:?}").contains(&first.signing_secret));
    let second = create(
        &store,
        &alice,
        &NewWebhook {
            filters: Filters {
                agent_ids: vec!["Demo@Agents.LocalHost".into()],
                conversation_ids: vec!["cnv_1".into(), "cnv_1".into()],
                labels: vec!["vip".into()],
            },
            events: vec![
                "email.sent".into(),
                "email.received".into(),
                "email.sent".into(),
            ],
            ..hook("https://two.example.com/")
        },
    )
    .await;
    let w = &second.webhook;
    assert_eq!(w.filters.agent_ids, vec!["demo@agents.localhost"]);
    assert_eq!(w.filters.conversation_ids, vec!["cnv_1"]);
    assert_eq!(w.events, vec!["email.sent", "email.received"]);
    assert!(w.enabled && w.auto_disabled_at.is_none() && w.previous_secret_expires_at.is_none());

    let mut c = store.client().await.unwrap();
    let listed = webhooks::list(&c, &alice).await.unwrap();
    assert_eq!(
        listed.iter().map(|w| &w.id).collect::<Vec<_>>(),
        vec![&second.webhook.id, &first.webhook.id],
        "newest first"
    );
    assert_eq!(webhooks::get(&c, &alice, w.id.as_str()).await.unwrap(), *w);

    // Bob: nothing of Alice's exists for him, and he cannot filter on her agent.
    assert!(webhooks::list(&c, &bob).await.unwrap().is_empty());
    let id = w.id.as_str();
    assert!(matches!(
        webhooks::get(&c, &bob, id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        webhooks::delete(&c, &bob, id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        webhooks::rotate(&c, &bob, id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        webhooks::update(&mut c, &bob, id, &WebhookPatch::default()).await,
        Err(WebhookError::NotFound)
    ));
    assert!(matches!(
        webhooks::get(&c, &alice, "wh_nope").await,
        Err(StoreError::NotFound)
    ));
    let mut cb = store.client().await.unwrap();
    let err = webhooks::create(
        &mut cb,
        &bob,
        &NewWebhook {
            filters: Filters {
                agent_ids: vec!["demo@agents.localhost".into()],
                ..Filters::default()
            },
            ..hook("https://bob.example.com/")
        },
        50,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, WebhookError::Invalid(ref m) if m.contains("demo@agents.localhost")),
        "{err:?}"
    );
    for bad in [
        hook(""),
        NewWebhook {
            events: vec![],
            ..hook("https://x.example.com/")
        },
    ] {
        assert!(webhooks::create(&mut cb, &bob, &bad, 50).await.is_err());
    }
    assert!(
        webhooks::list(&cb, &bob).await.unwrap().is_empty(),
        "nothing stored"
    );

    // Update replaces what is given and keeps the rest; filters whole.
    let patched = webhooks::update(
        &mut c,
        &alice,
        id,
        &WebhookPatch {
            url: Some("https://three.example.com/".into()),
            filters: Some(Filters {
                labels: vec!["urgent".into()],
                ..Filters::default()
            }),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(patched.url, "https://three.example.com/");
    assert_eq!(patched.description, "test hook");
    assert_eq!(patched.events, w.events);
    assert_eq!(
        patched.filters,
        Filters {
            labels: vec!["urgent".into()],
            ..Filters::default()
        }
    );
    let err = webhooks::update(
        &mut c,
        &alice,
        id,
        &WebhookPatch {
            filters: Some(Filters {
                agent_ids: vec!["bobs@agents.localhost".into()],
                ..Filters::default()
            }),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, WebhookError::Invalid(_)), "{err:?}");

    // Deleting takes the webhook's deliveries along.
    c.execute(
        "INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, event_payload) \
         VALUES ('whd_1', $1, $2, 'email.received', '{}')",
        &[&alice, &w.id],
    )
    .await
    .unwrap();
    webhooks::delete(&c, &alice, id).await.unwrap();
    assert!(matches!(
        webhooks::delete(&c, &alice, id).await,
        Err(StoreError::NotFound)
    ));
    let left: i64 = c
        .query_one("SELECT count(*) FROM webhook_subscriber_deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// Spec §3.6 without flaw 24: a re-enable within 5 minutes of an
/// auto-disable is refused; manual disable starts no cooldown; a re-enable
/// that passes clears `auto_disabled_at` and the failure counter; other
/// fields of a cooling webhook can still be edited.
#[tokio::test]
async fn reenable_waits_out_the_cooldown() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let id = create(&store, &alice, &hook("https://h.example.com/"))
        .await
        .webhook
        .id;

    auto_disable(&store, &id, "4 minutes").await;
    let err = enable(&store, &alice, &id).await.unwrap_err();
    let WebhookError::Cooldown { until } = err else {
        panic!("{err:?}")
    };
    let left = until - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::seconds(50) && left <= time::Duration::seconds(61),
        "{left}"
    );
    let mut c = store.client().await.unwrap();
    let w = webhooks::get(&c, &alice, id.as_str()).await.unwrap();
    assert!(
        !w.enabled && w.auto_disabled_at.is_some(),
        "nothing written"
    );

    // Editing without enabling is fine while cooling down.
    let edited = webhooks::update(
        &mut c,
        &alice,
        id.as_str(),
        &WebhookPatch {
            description: Some("fixed the receiver".into()),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(!edited.enabled && edited.auto_disabled_at.is_some());

    // Past the cooldown the re-enable passes and resets the failure state.
    auto_disable(&store, &id, "6 minutes").await;
    let enabled = enable(&store, &alice, &id).await.unwrap();
    assert!(enabled.enabled);
    assert_eq!(enabled.auto_disabled_at, None);
    assert_eq!(enabled.consecutive_failures, 0);

    // A manual disable sets no auto_disabled_at: re-enabling at once works.
    let off = webhooks::update(
        &mut c,
        &alice,
        id.as_str(),
        &WebhookPatch {
            enabled: Some(false),
            ..WebhookPatch::default()
        },
    )
    .await
    .unwrap();
    assert!(!off.enabled && off.auto_disabled_at.is_none());
    assert!(enable(&store, &alice, &id).await.unwrap().enabled);

    // `enabled: true` on an enabled webhook does not reset the counter.
    c.execute(
        "UPDATE webhooks SET consecutive_failures = 3 WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    assert_eq!(
        enable(&store, &alice, &id)
            .await
            .unwrap()
            .consecutive_failures,
        3
    );
}

/// The boundary, decided by the database clock inside one transaction
/// (`now()` is fixed for it): exactly 5 minutes after the auto-disable is
/// allowed, one microsecond less is refused.
#[tokio::test]
async fn cooldown_boundary_is_exactly_five_minutes() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let id = create(&store, &alice, &hook("https://h.example.com/"))
        .await
        .webhook
        .id;
    let cooldown = format!("{} seconds", REENABLE_COOLDOWN.whole_seconds());
    let mut c = store.client().await.unwrap();
    for (offset, allowed) in [("0 seconds", true), ("1 microsecond", false)] {
        let mut tx = c.transaction().await.unwrap();
        tx.execute(
            &format!(
                "UPDATE webhooks SET enabled = false, \
                 auto_disabled_at = now() - interval '{cooldown}' + interval '{offset}' WHERE id = $1"
            ),
            &[&id],
        )
        .await
        .unwrap();
        let patch = WebhookPatch {
            enabled: Some(true),
            ..WebhookPatch::default()
        };
        let result = webhooks::update(&mut tx, &alice, id.as_str(), &patch).await;
        match (allowed, result) {
            (true, Ok(w)) => assert!(w.enabled),
            (false, Err(WebhookError::Cooldown { .. })) => {}
            (_, other) => panic!("offset {offset}: {other:?}"),
        }
        tx.rollback().await.unwrap();
    }
}

/// Flaw 24 proven with two connections: an auto-disable commits while a
/// re-enable is waiting for the row. The re-enable must see it and refuse;
/// a check read before the write (the original) would have re-enabled a
/// webhook disabled a moment ago.
#[tokio::test]
async fn a_reenable_racing_an_auto_disable_sees_it() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let id = create(&store, &alice, &hook("https://h.example.com/"))
        .await
        .webhook
        .id;
    // Auto-disabled long ago: a re-enable would pass right now.
    auto_disable(&store, &id, "1 hour").await;

    // The deliverer re-disables it (fresh auto_disabled_at), uncommitted.
    let mut deliverer = store.client().await.unwrap();
    let tx = deliverer.transaction().await.unwrap();
    tx.execute(
        "UPDATE webhooks SET enabled = false, auto_disabled_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();

    let reenable = tokio::spawn({
        let (store, alice, id) = (store.clone(), alice.clone(), id.clone());
        async move { enable(&store, &alice, &id).await }
    });
    // Wait until the re-enable is blocked on the row lock (a signal, not a
    // guess: the server reports the waiting backend).
    let watcher = store.client().await.unwrap();
    super::until_blocked(
        &watcher,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
        "re-enable",
    )
    .await;
    tx.commit().await.unwrap();
    let result = reenable.await.unwrap();
    assert!(
        matches!(result, Err(WebhookError::Cooldown { .. })),
        "{result:?}"
    );
    let c = store.client().await.unwrap();
    assert!(
        !webhooks::get(&c, &alice, id.as_str())
            .await
            .unwrap()
            .enabled
    );
}

/// Flaw 23: rotating twice inside the 24 h window keeps the original
/// secret (still valid) as the previous one, with its expiry unchanged;
/// once it has expired, the next rotation demotes the current secret.
#[tokio::test]
async fn rotating_twice_keeps_a_valid_previous_secret() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let created = create(&store, &alice, &hook("https://h.example.com/")).await;
    let id = created.webhook.id.clone();
    let original = created.signing_secret;
    let c = store.client().await.unwrap();

    let keys = webhooks::signing_keys(&c, &alice, &id).await.unwrap();
    assert_eq!(
        (keys.current.as_str(), keys.previous.as_deref()),
        (original.as_str(), None)
    );

    let first = webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();
    assert!(first.signing_secret.starts_with("whsec_") && first.signing_secret != original);
    let ahead = first.previous_secret_expires_at - time::OffsetDateTime::now_utc();
    assert!(
        ahead > time::Duration::hours(23) && ahead <= time::Duration::hours(24),
        "{ahead}"
    );
    let keys = webhooks::signing_keys(&c, &alice, &id).await.unwrap();
    assert_eq!(keys.current, first.signing_secret);
    assert_eq!(keys.previous.as_deref(), Some(original.as_str()));
    assert!(!format!("{first:?} {keys:?}").contains("whsec_"));

    let second = webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();
    assert_eq!(
        second.previous_secret_expires_at,
        first.previous_secret_expires_at
    );
    let keys = webhooks::signing_keys(&c, &alice, &id).await.unwrap();
    assert_eq!(keys.current, second.signing_secret);
    assert_eq!(
        keys.previous.as_deref(),
        Some(original.as_str()),
        "the still-valid original stays; the intermediate secret is dropped"
    );
    let shown = webhooks::get(&c, &alice, id.as_str()).await.unwrap();
    assert_eq!(
        shown.previous_secret_expires_at,
        Some(first.previous_secret_expires_at)
    );

    // The original's window ends: it no longer signs, even before a sweep,
    // and the next rotation demotes the current secret for a fresh 24 h.
    c.execute(
        "UPDATE webhooks SET signing_secret_prev_expires_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let keys = webhooks::signing_keys(&c, &alice, &id).await.unwrap();
    assert_eq!(keys.previous, None);
    assert_eq!(
        webhooks::get(&c, &alice, id.as_str())
            .await
            .unwrap()
            .previous_secret_expires_at,
        None
    );
    let third = webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();
    assert!(third.previous_secret_expires_at > first.previous_secret_expires_at);
    let keys = webhooks::signing_keys(&c, &alice, &id).await.unwrap();
    assert_eq!(keys.current, third.signing_secret);
    assert_eq!(
        keys.previous.as_deref(),
        Some(second.signing_secret.as_str())
    );
}

/// The sweep clears expired previous secrets in batches and keeps valid
/// ones.
#[tokio::test]
async fn expired_previous_secrets_are_swept() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let c = store.client().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = create(&store, &alice, &hook(&format!("https://h{i}.example.com/")))
            .await
            .webhook
            .id;
        webhooks::rotate(&c, &alice, id.as_str()).await.unwrap();
        ids.push(id);
    }
    // Three expired (one exactly now), one still valid.
    c.execute(
        "UPDATE webhooks SET signing_secret_prev_expires_at = now() - interval '1 second' \
         WHERE id = ANY ($1)",
        &[&&ids[..2]],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE webhooks SET signing_secret_prev_expires_at = now() WHERE id = $1",
        &[&ids[2]],
    )
    .await
    .unwrap();
    assert_eq!(
        webhooks::clear_expired_previous_secrets(&c, 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        webhooks::clear_expired_previous_secrets(&c, 2)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        webhooks::clear_expired_previous_secrets(&c, 2)
            .await
            .unwrap(),
        0
    );
    let left: Vec<WebhookId> = c
        .query(
            "SELECT id FROM webhooks WHERE signing_secret_prev IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec![ids[3].clone()]);
}

/// The schema holds the filter rules on its own (V16), whatever writes.
#[tokio::test]
async fn the_schema_refuses_filters_past_their_caps_and_formats() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let id = create(&store, &alice, &hook("https://h.example.com/"))
        .await
        .webhook
        .id;
    let c = store.client().await.unwrap();
    for (set, constraint) in [
        (
            "filter_labels = (SELECT array_agg('l' || i) FROM generate_series(1, 51) i)",
            "webhooks_filter_labels_check",
        ),
        ("filter_labels = '{UPPER}'", "webhooks_filter_labels_check"),
        (
            "filter_conversation_ids = '{\"a b\"}'",
            "webhooks_filter_conversation_ids_check",
        ),
        (
            "filter_conversation_ids = ARRAY[NULL::text]",
            "webhooks_filter_conversation_ids_check",
        ),
        (
            "filter_agent_ids = ARRAY[repeat('a', 201)]",
            "webhooks_filter_agent_ids_check",
        ),
        ("description = E'a\\nb'", "webhooks_description_line_check"),
        ("url = ''", "webhooks_url_check"),
    ] {
        let err = c
            .execute(&format!("UPDATE webhooks SET {set} WHERE id = $1"), &[&id])
            .await
            .unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{set}: {err}"));
        assert_eq!(db.constraint(), Some(constraint), "{set}");
    }
    c.execute(
        "UPDATE webhooks SET filter_labels = (SELECT array_agg('l' || i) FROM generate_series(1, 50) i) \
         WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
}
