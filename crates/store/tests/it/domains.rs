//! Domains aggregate: competing claims decided by verification, names under
//! verified domains, expiry, caps, verification, deletion.

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
async fn pending_claims_coexist_and_the_first_verification_wins() {
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

    // Re-claim by the same account: same token and keys, nothing regenerated.
    let other_keys = DkimKeys {
        public_key_b64: "b3RoZXI=".into(),
        ..keys()
    };
    let again = domains::claim(&mut c, &alice, "alice.example", &other_keys, 10)
        .await
        .unwrap();
    assert_eq!(again, Claimed::AlreadyOwned(first.clone()));

    // Registering first proves nothing: another account may claim the same
    // name, with its own token and key.
    let Claimed::Created(squat) =
        domains::claim(&mut c, &mallory, "alice.example", &other_keys, 10)
            .await
            .unwrap()
    else {
        panic!("expected a second, independent claim")
    };
    assert_ne!(squat.verification_token, first.verification_token);
    assert_eq!(squat.dkim_public_key.as_deref(), Some("b3RoZXI="));
    assert_eq!(
        domains::list(&c, &mallory).await.unwrap(),
        std::slice::from_ref(&squat)
    );
    assert_eq!(
        domains::list(&c, &alice).await.unwrap(),
        std::slice::from_ref(&first)
    );
    // A failed check of one claim leaves the other alone.
    domains::record_check(&mut c, &mallory, "alice.example", false)
        .await
        .unwrap();
    assert_eq!(
        domains::get(&c, &alice, "alice.example").await.unwrap(),
        first
    );

    // Alice proves it: she owns it, Mallory's claim ends.
    let verified = domains::record_check(&mut c, &alice, "alice.example", true)
        .await
        .unwrap();
    assert!(verified.verified);
    assert!(matches!(
        domains::get(&c, &mallory, "alice.example").await,
        Err(StoreError::NotFound)
    ));
    assert!(domains::list(&c, &mallory).await.unwrap().is_empty());

    // From now on nobody else can claim or verify it.
    let err = domains::claim(&mut c, &mallory, "alice.example", &keys(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
    let err = domains::record_check(&mut c, &mallory, "alice.example", true)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
    assert!(
        domains::verified_by_another(&c, &mallory, "alice.example")
            .await
            .unwrap()
    );
    assert!(
        !domains::verified_by_another(&c, &alice, "alice.example")
            .await
            .unwrap()
    );

    // Another tenant sees nothing and can delete nothing.
    assert!(matches!(
        domains::get(&c, &mallory, "alice.example").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        domains::delete(&c, &mallory, "alice.example").await,
        Err(StoreError::NotFound)
    ));
    assert!(
        domains::get(&c, &alice, "alice.example")
            .await
            .unwrap()
            .verified
    );
}

#[tokio::test]
async fn names_under_a_verified_domain_belong_to_its_owner() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    let mut c = store.client().await.unwrap();
    // Mallory's pending claims under corp.example, made before Alice
    // verifies it; one elsewhere.
    for name in ["mail.corp.example", "a.b.corp.example", "notcorp.example"] {
        domains::claim(&mut c, &mallory, name, &keys(), 10)
            .await
            .unwrap();
    }
    domains::claim(&mut c, &alice, "corp.example", &keys(), 10)
        .await
        .unwrap();
    domains::record_check(&mut c, &alice, "corp.example", true)
        .await
        .unwrap();
    // The claims under corp.example ended; the lookalike did not.
    let left: Vec<String> = domains::list(&c, &mallory)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.domain)
        .collect();
    assert_eq!(left, ["notcorp.example"]);

    // Nobody but Alice may claim a name under corp.example.
    for name in ["mail.corp.example", "x.y.corp.example"] {
        let err = domains::claim(&mut c, &mallory, name, &keys(), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "domain" }),
            "{name}: {err:?}"
        );
        assert!(
            domains::verified_by_another(&c, &mallory, name)
                .await
                .unwrap()
        );
    }
    let Claimed::Created(sub) = domains::claim(&mut c, &alice, "mail.corp.example", &keys(), 10)
        .await
        .unwrap()
    else {
        panic!("the owner claims below her domain")
    };
    assert!(!sub.verified, "a sub-domain is still proven on its own");

    // Verification re-checks the rule: a pending claim under corp.example
    // that escaped the clean-up (e.g. carried over from before V10) cannot
    // be verified.
    c.execute(
        "INSERT INTO domains (domain, user_id, verification_token) VALUES ('old.corp.example', $1, 'e2a-verify=0')",
        &[&mallory.as_str()],
    )
    .await
    .unwrap();
    let err = domains::record_check(&mut c, &mallory, "old.corp.example", true)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
    assert!(
        !domains::get(&c, &mallory, "old.corp.example")
            .await
            .unwrap()
            .verified
    );
}

#[tokio::test]
async fn a_name_verified_before_its_parent_stays_with_its_prover() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let mut c = store.client().await.unwrap();
    domains::claim(&mut c, &bob, "shop.brand.example", &keys(), 10)
        .await
        .unwrap();
    domains::record_check(&mut c, &bob, "shop.brand.example", true)
        .await
        .unwrap();
    // Alice proves the parent later: she gets it, Bob keeps what he proved.
    domains::claim(&mut c, &alice, "brand.example", &keys(), 10)
        .await
        .unwrap();
    domains::record_check(&mut c, &alice, "brand.example", true)
        .await
        .unwrap();
    assert!(
        domains::get(&c, &bob, "shop.brand.example")
            .await
            .unwrap()
            .verified
    );
    let err = domains::claim(&mut c, &alice, "shop.brand.example", &keys(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
    // Bob may not claim anything else under Alice's domain.
    let err = domains::claim(&mut c, &bob, "blog.brand.example", &keys(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "domain" }),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_shared_domain_is_verified_and_never_claimable() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mut c = store.client().await.unwrap();
    // A pending claim does not stop a name from becoming the shared domain;
    // it ends there, with the claims below it.
    domains::claim(&mut c, &alice, "agents.localhost", &keys(), 10)
        .await
        .unwrap();
    domains::claim(&mut c, &alice, "x.agents.localhost", &keys(), 10)
        .await
        .unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .expect("idempotent");
    assert!(domains::list(&c, &alice).await.unwrap().is_empty());
    for name in ["agents.localhost", "x.agents.localhost"] {
        let err = domains::claim(&mut c, &alice, name, &keys(), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "domain" }),
            "{name}: {err:?}"
        );
    }
    // A user's verified domain cannot become the shared one.
    domains::claim(&mut c, &alice, "taken.example", &keys(), 10)
        .await
        .unwrap();
    domains::record_check(&mut c, &alice, "taken.example", true)
        .await
        .unwrap();
    assert!(matches!(
        domains::ensure_shared(&c, "taken.example").await,
        Err(StoreError::Conflict { .. })
    ));
}

/// Ages the claim of `user` on `domain` past [`domains::PENDING_CLAIM_TTL`].
async fn expire(store: &e2a_store::Store, user: &e2a_store::ids::UserId, domain: &str) {
    let c = store.client().await.unwrap();
    let age = domains::PENDING_CLAIM_TTL + time::Duration::minutes(1);
    let n = c
        .execute(
            "UPDATE domains SET created_at = now() - make_interval(secs => $3) WHERE domain = $1 AND user_id = $2",
            &[&domain, &user.as_str(), &(age.whole_seconds() as f64)],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn pending_claims_expire() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    let mut c = store.client().await.unwrap();
    assert_eq!(domains::PENDING_CLAIM_TTL, time::Duration::days(7));
    let Claimed::Created(old) = domains::claim(&mut c, &mallory, "victim.example", &keys(), 1)
        .await
        .unwrap()
    else {
        panic!("new claim")
    };
    expire(&store, &mallory, "victim.example").await;

    // Expired: invisible, not counted, not verifiable.
    assert!(matches!(
        domains::get(&c, &mallory, "victim.example").await,
        Err(StoreError::NotFound)
    ));
    assert!(domains::list(&c, &mallory).await.unwrap().is_empty());
    assert_eq!(
        e2a_store::account_limits::usage(&c, &mallory)
            .await
            .unwrap()
            .domains,
        0
    );
    assert!(matches!(
        domains::record_check(&mut c, &mallory, "victim.example", true).await,
        Err(StoreError::NotFound)
    ));
    // With a cap of 1, the expired claim leaves room for another.
    domains::claim(&mut c, &mallory, "other.example", &keys(), 1)
        .await
        .unwrap();

    // Claiming the name again (anyone) removes the expired row; the same
    // account starts over with a fresh token.
    domains::claim(&mut c, &alice, "victim.example", &keys(), 10)
        .await
        .unwrap();
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM domains WHERE domain = 'victim.example' AND user_id = $1",
            &[&mallory.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    domains::delete(&c, &mallory, "other.example")
        .await
        .unwrap();
    let Claimed::Created(fresh) = domains::claim(&mut c, &mallory, "victim.example", &keys(), 1)
        .await
        .unwrap()
    else {
        panic!("an expired claim is not re-used")
    };
    assert_ne!(fresh.verification_token, old.verification_token);
}

#[tokio::test]
async fn the_sweep_deletes_only_expired_pending_claims() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let mut c = store.client().await.unwrap();
    for (user, name) in [
        (&alice, "a1.example"),
        (&bob, "a1.example"),
        (&bob, "b1.example"),
        (&alice, "live.example"),
        (&alice, "owned.example"),
    ] {
        domains::claim(&mut c, user, name, &keys(), 10)
            .await
            .unwrap();
    }
    domains::record_check(&mut c, &alice, "owned.example", true)
        .await
        .unwrap();
    for (user, name) in [
        (&alice, "a1.example"),
        (&bob, "a1.example"),
        (&bob, "b1.example"),
        (&alice, "owned.example"),
    ] {
        expire(&store, user, name).await;
    }
    assert_eq!(domains::delete_expired_claims(&c, 2).await.unwrap(), 2);
    assert_eq!(domains::delete_expired_claims(&c, 2).await.unwrap(), 1);
    assert_eq!(domains::delete_expired_claims(&c, 2).await.unwrap(), 0);
    let left: Vec<(String, bool)> = c
        .query("SELECT domain, verified FROM domains ORDER BY domain", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("live.example".to_owned(), false),
            ("owned.example".to_owned(), true)
        ]
    );
}

#[tokio::test]
async fn of_two_racing_verifications_exactly_one_wins() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let mut wins = [0, 0];
    for round in 0..8 {
        let name = format!("race{round}.example");
        let (mut ca, mut cb) = (store.client().await.unwrap(), store.client().await.unwrap());
        domains::claim(&mut ca, &alice, &name, &keys(), 100)
            .await
            .unwrap();
        domains::claim(&mut cb, &bob, &name, &keys(), 100)
            .await
            .unwrap();
        // Two transactions on two connections, in flight at once.
        let (a, b) = tokio::join!(
            domains::record_check(&mut ca, &alice, &name, true),
            domains::record_check(&mut cb, &bob, &name, true),
        );
        let (winner, loser, loser_err) = match (a, b) {
            (Ok(d), Err(e)) => {
                wins[0] += 1;
                (d, &bob, e)
            }
            (Err(e), Ok(d)) => {
                wins[1] += 1;
                (d, &alice, e)
            }
            other => panic!("{name}: expected exactly one winner, got {other:?}"),
        };
        assert!(winner.verified, "{name}");
        assert!(
            matches!(loser_err, StoreError::Conflict { what: "domain" }),
            "{name}: {loser_err:?}"
        );
        assert!(
            matches!(
                domains::get(&ca, loser, &name).await,
                Err(StoreError::NotFound)
            ),
            "{name}: the loser's claim is gone"
        );
        let rows: i64 = ca
            .query_one("SELECT count(*) FROM domains WHERE domain = $1", &[&name])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 1, "{name}");
    }
    assert_eq!(wins[0] + wins[1], 8);
}

#[tokio::test]
async fn a_claim_racing_the_verification_of_its_parent_never_survives() {
    let (_db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let mallory = super::user(&store, "mallory@example.com").await;
    for round in 0..8 {
        let parent = format!("corp{round}.example");
        let child = format!("mail.{parent}");
        let (mut ca, mut cm) = (store.client().await.unwrap(), store.client().await.unwrap());
        domains::claim(&mut ca, &alice, &parent, &keys(), 100)
            .await
            .unwrap();
        let child_keys = keys();
        let (verified, claimed) = tokio::join!(
            domains::record_check(&mut ca, &alice, &parent, true),
            domains::claim(&mut cm, &mallory, &child, &child_keys, 100),
        );
        assert!(verified.unwrap().verified, "{parent}");
        // Either the claim came first and the verification ended it, or it
        // came second and was refused; never a claim under Alice's domain.
        match claimed {
            Ok(Claimed::Created(_)) | Err(StoreError::Conflict { what: "domain" }) => {}
            other => panic!("{child}: {other:?}"),
        }
        assert!(
            matches!(
                domains::get(&ca, &mallory, &child).await,
                Err(StoreError::NotFound)
            ),
            "{child} survived"
        );
    }
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
    let checked = domains::record_check(&mut c, &alice, "v.example", false)
        .await
        .unwrap();
    assert!(
        !checked.verified && checked.last_checked_at.is_some() && checked.verified_at.is_none()
    );
    let verified = domains::record_check(&mut c, &alice, "v.example", true)
        .await
        .unwrap();
    assert!(verified.verified && verified.verified_at.is_some());
    let again = domains::record_check(&mut c, &alice, "v.example", false)
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
    domains::record_check(&mut c, &alice, "busy.example", true)
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
