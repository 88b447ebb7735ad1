//! Users aggregate.

use e2a_store::{StoreError, address::EmailAddress, users};

#[tokio::test]
async fn create_and_get_by_id_and_normalised_email() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let email = EmailAddress::parse(" Alice@Example.COM ").unwrap();
    let u = users::create(&c, &email, "Alice").await.unwrap();
    assert!(u.id.as_str().starts_with("usr_"));
    assert_eq!(u.email, "alice@example.com");
    assert_eq!(users::get(&c, &u.id).await.unwrap(), u);
    let again = EmailAddress::parse("ALICE@example.com").unwrap();
    assert_eq!(users::get_by_email(&c, &again).await.unwrap(), u);
}

#[tokio::test]
async fn duplicate_email_is_a_conflict() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let email = EmailAddress::parse("bob@example.com").unwrap();
    users::create(&c, &email, "").await.unwrap();
    let err = users::create(&c, &email, "").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { what: "email" }),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_user_is_not_found() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let err = users::get(&c, &e2a_store::ids::UserId::new())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound));
}

#[tokio::test]
async fn invalid_names_are_rejected() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let email = EmailAddress::parse("n@example.com").unwrap();
    assert!(matches!(
        users::create(&c, &email, "bad\nname").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        users::create(&c, &email, &"x".repeat(201)).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_race_free() {
    let (_db, store) = super::store().await;
    let email = EmailAddress::parse("first@example.com").unwrap();
    let (a, b) = tokio::join!(
        async {
            let c = store.client().await.unwrap();
            users::bootstrap(&c, &email).await.unwrap()
        },
        async {
            let c = store.client().await.unwrap();
            users::bootstrap(&c, &email).await.unwrap()
        }
    );
    assert_eq!(a.user().id, b.user().id);
    let created = [&a, &b]
        .iter()
        .filter(|o| matches!(o, users::Bootstrapped::Created(_)))
        .count();
    assert_eq!(created, 1);
    let c = store.client().await.unwrap();
    assert!(
        matches!(users::bootstrap(&c, &email).await.unwrap(), users::Bootstrapped::Existing(u) if u.id == a.user().id)
    );
}
