//! Domains aggregate: anti-squat claims, caps, verification, deletion.

use e2a_store::{
    StoreError,
    domains::{self, Claimed, DkimKeys},
};

pub fn keys() -> DkimKeys {
    DkimKeys {
        selector: "e2a202611".into(),
        public_key_b64: "cHVi".into(),
        private_key_der: vec![1, 2, 3],
    }
}

#[tokio::test]
async fn normalise_accepts_names_and_rejects_garbage() {
    assert_eq!(
        domains::normalise(" Mail.Example.COM. ").unwrap(),
        "mail.example.com"
    );
    for bad in [
        "",
        "localhost",
        "exa mple.com",
        "-x.com",
        "x..com",
        "1.2.3.4",
        "ex_ample.com",
        "é.com",
    ] {
        assert!(
            matches!(domains::normalise(bad), Err(StoreError::Invalid(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn claim_is_first_come_and_stable_for_the_owner() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    let mut c = store.client().await.unwrap();
    let Claimed::Created(first) = domains::claim(&mut c, &alice, "alice.example", &keys(), 10)
        .await
        .unwrap()
    else {
        panic!("expected a new row")
    };
    assert!(first.verification_token.starts_with("e2a-verify="));
    assert_eq!(first.verification_token.len(), "e2a-verify=".len() + 32);
    assert!(!first.verified);
    assert_eq!(first.dkim_selector.as_deref(), Some("e2a202611"));

    // Re-claim by the owner: same token and keys, nothing regenerated.
    let other_keys = DkimKeys {
        public_key_b64: "b3RoZXI=".into(),
        ..keys()
    };
    let again = domains::claim(&mut c, &alice, "alice.example", &other_keys, 10)
        .await
        .unwrap();
    assert_eq!(again, Claimed::AlreadyOwned(first.clone()));

    // Anyone else: conflict, verified or not.
    let err = domains::claim(&mut c, &mallory, "alice.example", &keys(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
    domains::record_check(&c, &alice, "alice.example", true)
        .await
        .unwrap();
    let err = domains::claim(&mut c, &mallory, "alice.example", &keys(), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { what: "domain" }));

    // Another tenant sees nothing.
    assert!(matches!(
        domains::get(&c, &mallory, "alice.example").await,
        Err(StoreError::NotFound)
    ));
    assert!(domains::list(&c, &mallory).await.unwrap().is_empty());
    assert!(matches!(
        domains::delete(&c, &mallory, "alice.example").await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn the_shared_domain_is_verified_and_never_claimable() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .expect("idempotent");
    let err = domains::claim(&mut c, &alice, "agents.localhost", &keys(), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { what: "domain" }));
    // A user's domain cannot become the shared one.
    domains::claim(&mut c, &alice, "taken.example", &keys(), 10)
        .await
        .unwrap();
    assert!(matches!(
        domains::ensure_shared(&c, "taken.example").await,
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn the_domain_cap_holds_under_concurrency() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let claims = (0..6).map(|i| {
        let (store, alice) = (store.clone(), alice.clone());
        tokio::spawn(async move {
            let mut c = store.client().await.unwrap();
            domains::claim(&mut c, &alice, &format!("d{i}.example"), &keys(), 3).await
        })
    });
    let results = futures_join(claims).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    let capped = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(StoreError::LimitExceeded {
                    what: "domains",
                    limit: 3
                })
            )
        })
        .count();
    assert_eq!((created, capped), (3, 3));
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn verification_records_checks_and_never_unverifies() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::claim(&mut c, &alice, "v.example", &keys(), 10)
        .await
        .unwrap();
    let checked = domains::record_check(&c, &alice, "v.example", false)
        .await
        .unwrap();
    assert!(
        !checked.verified && checked.last_checked_at.is_some() && checked.verified_at.is_none()
    );
    let verified = domains::record_check(&c, &alice, "v.example", true)
        .await
        .unwrap();
    assert!(verified.verified && verified.verified_at.is_some());
    let again = domains::record_check(&c, &alice, "v.example", false)
        .await
        .unwrap();
    assert!(again.verified, "a failed re-check never un-verifies");
    assert_eq!(again.verified_at, verified.verified_at);
}

#[tokio::test]
async fn a_domain_with_agents_cannot_be_deleted() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::claim(&mut c, &alice, "busy.example", &keys(), 10)
        .await
        .unwrap();
    domains::record_check(&c, &alice, "busy.example", true)
        .await
        .unwrap();
    super::agents::agent(&store, &alice, "bot@busy.example").await;
    assert_eq!(
        domains::get(&c, &alice, "busy.example")
            .await
            .unwrap()
            .agent_count,
        1
    );
    let err = domains::delete(&c, &alice, "busy.example")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::HasDependents { what: "agents" }),
        "{err:?}"
    );
    e2a_store::agents::delete(&c, &alice, "bot@busy.example")
        .await
        .unwrap();
    domains::delete(&c, &alice, "busy.example").await.unwrap();
    assert!(matches!(
        domains::get(&c, &alice, "busy.example").await,
        Err(StoreError::NotFound)
    ));
}
