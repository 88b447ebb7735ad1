//! Agents aggregate: where agents may live, caps, updates, tenancy.

use e2a_store::{
    Store, StoreError,
    account_limits::{self, Limits},
    address::EmailAddress,
    agents::{self, AgentMode, AgentPatch, CreateError, ExpirationAction, NewAgent, Quota},
    domains,
    ids::UserId,
};

fn local(address: &str) -> NewAgent {
    NewAgent {
        address: EmailAddress::parse(address).unwrap(),
        name: String::new(),
        webhook_url: String::new(),
        agent_mode: AgentMode::Local,
    }
}

/// A verified domain for `user` (claimed and proven).
pub async fn verified_domain(store: &Store, user: &UserId, domain: &str) {
    let mut c = store.client().await.unwrap();
    domains::claim(&mut c, user, domain, &super::domains::keys(), 100)
        .await
        .unwrap();
    domains::record_check(&mut c, user, domain, true)
        .await
        .unwrap();
}

/// Creates a local agent (its domain must be usable by `user`).
pub async fn agent(store: &Store, user: &UserId, address: &str) -> agents::Agent {
    let mut c = store.client().await.unwrap();
    agents::create(&mut c, user, &local(address), 100)
        .await
        .unwrap()
}

#[tokio::test]
async fn agents_live_on_verified_own_domains_or_the_shared_domain() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();

    let err = agents::create(&mut c, &alice, &local("x@nowhere.example"), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CreateError::DomainNotRegistered(_)),
        "{err:?}"
    );

    domains::claim(&mut c, &alice, "alice.example", &super::domains::keys(), 10)
        .await
        .unwrap();
    let err = agents::create(&mut c, &alice, &local("x@alice.example"), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, CreateError::DomainNotVerified(_)), "{err:?}");
    domains::record_check(&mut c, &alice, "alice.example", true)
        .await
        .unwrap();
    let a = agents::create(&mut c, &alice, &local("X@Alice.Example"), 10)
        .await
        .unwrap();
    assert_eq!(
        (a.id.as_str(), a.domain.as_str(), a.domain_verified),
        ("x@alice.example", "alice.example", true)
    );
    assert_eq!(
        (a.hitl_enabled, a.hitl_ttl_seconds, a.hitl_expiration_action),
        (false, 604_800, ExpirationAction::Reject)
    );

    // Bob cannot put agents on Alice's domain, verified or not.
    let err = agents::create(&mut c, &bob, &local("y@alice.example"), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CreateError::DomainNotRegistered(_)),
        "{err:?}"
    );

    // Anyone may use the shared domain; addresses are unique across users.
    agents::create(&mut c, &bob, &local("demo@agents.localhost"), 10)
        .await
        .unwrap();
    let err = agents::create(&mut c, &alice, &local("demo@agents.localhost"), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, CreateError::Duplicate), "{err:?}");
}

#[tokio::test]
async fn cloud_agents_need_a_webhook_url_and_caps_apply() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    verified_domain(&store, &alice, "alice.example").await;
    let mut c = store.client().await.unwrap();
    let cloud = NewAgent {
        agent_mode: AgentMode::Cloud,
        ..local("c@alice.example")
    };
    assert!(matches!(
        agents::create(&mut c, &alice, &cloud, 10).await,
        Err(CreateError::Store(StoreError::Invalid(_)))
    ));
    let cloud = NewAgent {
        webhook_url: "https://hooks.example/x".into(),
        ..cloud
    };
    assert_eq!(
        agents::create(&mut c, &alice, &cloud, 10)
            .await
            .unwrap()
            .agent_mode,
        AgentMode::Cloud
    );

    agents::create(&mut c, &alice, &local("two@alice.example"), 2)
        .await
        .unwrap();
    let err = agents::create(&mut c, &alice, &local("three@alice.example"), 2)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CreateError::Store(StoreError::LimitExceeded {
                what: "agents",
                limit: 2
            })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn update_get_list_and_delete_are_tenant_scoped() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    verified_domain(&store, &alice, "alice.example").await;
    let a = agent(&store, &alice, "bot@alice.example").await;
    let c = store.client().await.unwrap();

    let patch = AgentPatch {
        name: Some("Bot".into()),
        hitl_enabled: Some(true),
        hitl_ttl_seconds: Some(3600),
        hitl_expiration_action: Some(ExpirationAction::Approve),
        reject_dmarc_failures: Some(true),
        ..AgentPatch::default()
    };
    let updated = agents::update(&c, &alice, &a.id, &patch).await.unwrap();
    assert_eq!(
        (
            updated.name.as_str(),
            updated.hitl_enabled,
            updated.hitl_ttl_seconds,
            updated.hitl_expiration_action,
            updated.reject_dmarc_failures
        ),
        ("Bot", true, 3600, ExpirationAction::Approve, true)
    );
    for ttl in [0, 604_801] {
        let bad = AgentPatch {
            hitl_ttl_seconds: Some(ttl),
            ..AgentPatch::default()
        };
        assert!(matches!(
            agents::update(&c, &alice, &a.id, &bad).await,
            Err(StoreError::Invalid(_))
        ));
    }
    let to_cloud = AgentPatch {
        agent_mode: Some(AgentMode::Cloud),
        ..AgentPatch::default()
    };
    assert!(matches!(
        agents::update(&c, &alice, &a.id, &to_cloud).await,
        Err(StoreError::Invalid(_))
    ));

    assert!(matches!(
        agents::get(&c, &mallory, &a.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        agents::update(&c, &mallory, &a.id, &patch).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        agents::delete(&c, &mallory, &a.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(agents::list(&c, &mallory).await.unwrap().is_empty());
    assert_eq!(agents::list(&c, &alice).await.unwrap().len(), 1);

    agents::delete(&c, &alice, &a.id).await.unwrap();
    assert!(matches!(
        agents::get(&c, &alice, &a.id).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn recipients_resolve_only_on_verified_domains() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    verified_domain(&store, &alice, "alice.example").await;
    let a = agent(&store, &alice, "bot@alice.example").await;
    let c = store.client().await.unwrap();
    let r = agents::resolve_recipient(
        &c,
        &EmailAddress::parse("BOT@alice.example").unwrap(),
        &Limits::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((r.agent_id, r.user_id), (a.id.clone(), alice.clone()));
    assert_eq!(r.over_quota, None);
    assert_eq!(r.signing_secret, None, "no secret yet");
    // Once the owner has a secret, the lookup carries the newest one.
    let mut cm = store.client().await.unwrap();
    let secret = e2a_store::signing_secrets::newest_or_create(&mut cm, &alice)
        .await
        .unwrap();
    let r = agents::resolve_recipient(
        &c,
        &EmailAddress::parse("bot@alice.example").unwrap(),
        &Limits::default(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.signing_secret, Some(secret));
    assert!(
        agents::resolve_recipient(
            &c,
            &EmailAddress::parse("nobody@alice.example").unwrap(),
            &Limits::default()
        )
        .await
        .unwrap()
        .is_none()
    );
    // A domain with agents can no longer lose its verification, so an
    // agent can never sit on an unverified domain (V10).
    let err = c
        .execute(
            "UPDATE domains SET verified = false WHERE domain = 'alice.example'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err}"
    );
    assert!(
        agents::resolve_recipient(
            &c,
            &EmailAddress::parse("bot@alice.example").unwrap(),
            &Limits::default()
        )
        .await
        .unwrap()
        .is_some()
    );
}

#[tokio::test]
async fn the_database_keeps_agents_on_their_owners_domains() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    verified_domain(&store, &alice, "alice.example").await;
    agent(&store, &alice, "one@alice.example").await;
    let c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();
    agent(&store, &bob, "bob@agents.localhost").await;

    // A caller bypassing the store's checks still cannot put Bob's agent on
    // Alice's domain.
    let err = c
        .execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode) VALUES ($1, $2, $3, 'local')",
            &[&"sneaky@alice.example", &bob.as_str(), &"alice.example"],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err}"
    );

    // Nor on a domain that is only claimed, not verified: his own pending
    // claim, or a pending claim of his on Alice's name (which the store never
    // creates, but a bypassing caller might).
    let mut cm = store.client().await.unwrap();
    domains::claim(&mut cm, &bob, "bob.example", &super::domains::keys(), 10)
        .await
        .unwrap();
    c.execute(
        "INSERT INTO domains (domain, user_id, verification_token) VALUES ('alice.example', $1, 'e2a-verify=0')",
        &[&bob.as_str()],
    )
    .await
    .unwrap();
    for (id, domain) in [
        ("pending@bob.example", "bob.example"),
        ("sneaky@alice.example", "alice.example"),
    ] {
        let err = c
            .execute(
                "INSERT INTO agents (id, user_id, domain, agent_mode) VALUES ($1, $2, $3, 'local')",
                &[&id, &bob.as_str(), &domain],
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
            "{id}: {err}"
        );
    }
    // And the store says why.
    let err = agents::create(&mut cm, &bob, &local("x@alice.example"), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CreateError::DomainNotRegistered(_)),
        "{err:?}"
    );

    // Deleting Alice takes her domain and its agents in one statement; Bob's
    // agent on the shared domain is untouched.
    let deleted = c
        .execute("DELETE FROM users WHERE id = $1", &[&alice.as_str()])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let left: i64 = c
        .query_one("SELECT count(*) FROM agents", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}

/// Spec §6.2: the monthly cap is checked first, then storage; the state comes
/// with the recipient, against the account's row or the defaults given.
#[tokio::test]
async fn recipients_carry_their_owners_quota_state() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    verified_domain(&store, &alice, "alice.example").await;
    agent(&store, &alice, "bot@alice.example").await;
    let c = store.client().await.unwrap();
    let bot = EmailAddress::parse("bot@alice.example").unwrap();
    let quota = |limits: Limits| {
        let c = &c;
        let bot = &bot;
        async move {
            agents::resolve_recipient(c, bot, &limits)
                .await
                .unwrap()
                .unwrap()
                .over_quota
        }
    };
    let defaults = Limits::default();
    assert_eq!(quota(defaults.clone()).await, None);
    // An inbound message of 100 bytes counts once and its bytes.
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, raw_message, body_sha256, inbox_status) \
         VALUES ('msg_q1', $1, 'bot@alice.example', 'inbound', $2, repeat('a', 64), 'unread')",
        &[&alice, &vec![b'x'; 100]],
    )
    .await
    .unwrap();
    let month_cap = Limits {
        max_messages_month: 1,
        ..defaults.clone()
    };
    assert_eq!(quota(month_cap.clone()).await, Some(Quota::MonthlyMessages));
    let storage_cap = Limits {
        max_storage_bytes: 100,
        ..defaults.clone()
    };
    assert_eq!(quota(storage_cap).await, Some(Quota::Storage));
    let both = Limits {
        max_messages_month: 1,
        max_storage_bytes: 100,
        ..defaults.clone()
    };
    assert_eq!(
        quota(both).await,
        Some(Quota::MonthlyMessages),
        "monthly first"
    );
    assert_eq!(
        quota(Limits {
            max_storage_bytes: 101,
            ..defaults.clone()
        })
        .await,
        None
    );
    // The account's own row overrides the defaults.
    account_limits::upsert(&c, &alice, &month_cap)
        .await
        .unwrap();
    assert_eq!(quota(defaults).await, Some(Quota::MonthlyMessages));
}
