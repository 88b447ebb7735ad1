//! Magic-link tokens (`approval_tokens`): only the hash is stored; a token
//! works once, for its own action and message, until it expires; a
//! rolled-back decision leaves it usable; peeking changes nothing; a
//! decided message's links are revoked; the janitor sweeps in batches.

use e2a_store::{
    Store, StoreError,
    approval_tokens::{self, Action, ConsumeError, Consumed, TokenState},
    ids::{MessageId, UserId},
    outbound::{self, Hold, MessageType, OutboundMail},
};
use time::{Duration, OffsetDateTime};

use super::messages::{Mailbox, mailbox};

/// Holds a message from `from` for review (as the hold path does) and
/// returns its id.
async fn held(store: &Store, from: &Mailbox) -> MessageId {
    let message_id = MessageId::new();
    let rfc = format!("{}@agents.localhost", e2a_store::secret::random_hex::<16>());
    let to = vec!["someone@example.net".to_owned()];
    let empty: Vec<String> = vec![];
    let mail = OutboundMail {
        message_id: &message_id,
        user_id: &from.user,
        agent_id: &from.agent,
        message_type: MessageType::Send,
        rfc_message_id: &rfc,
        parent_email_message_id: "",
        subject: "hello",
        to: &to,
        cc: &empty,
        bcc: &empty,
        conversation_id: "cnv_0123456789abcdef0123456789abcdef",
        raw: b"Subject: hello\r\n\r\nhi\r\n",
        mail_from: &from.agent,
        dkim_domain: "agents.localhost",
        external: &[],
        loopback: None,
        max_attempts: 3,
        hold: Some(Hold {
            expires_at: OffsetDateTime::now_utc() + Duration::hours(1),
            body_text: "hi",
            body_html: None,
            attachments_json: None,
            thread_refs: &[],
        }),
    };
    let accepted = store
        .transaction(&mail, |tx, mail| Box::pin(outbound::accept(tx, mail)))
        .await
        .unwrap();
    assert_eq!(accepted.status, "pending_approval");
    message_id
}

fn in_an_hour() -> OffsetDateTime {
    approval_tokens::expiry_for(OffsetDateTime::now_utc() + Duration::minutes(50))
}

async fn mint(store: &Store, user: &UserId, msg: &MessageId, action: Action) -> String {
    let c = store.client().await.unwrap();
    approval_tokens::mint(&c, user, msg, action, in_an_hour())
        .await
        .unwrap()
}

async fn consume(store: &Store, token: &str, action: Action) -> Result<Consumed, ConsumeError> {
    let c = store.client().await.unwrap();
    approval_tokens::consume(&c, token, action).await
}

async fn peek(store: &Store, token: &str) -> TokenState {
    let c = store.client().await.unwrap();
    approval_tokens::peek(&c, token).await.unwrap()
}

/// Every row of the table as text, to compare before and after.
async fn snapshot(store: &Store) -> Vec<String> {
    store
        .client()
        .await
        .unwrap()
        .query(
            "SELECT t::text FROM approval_tokens t ORDER BY token_hash",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn the_database_holds_the_hash_never_the_token() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv1").await;
    let msg = held(&store, &a).await;
    let token = mint(&store, &a.user, &msg, Action::Approve).await;
    let other = mint(&store, &a.user, &msg, Action::Approve).await;

    let random = token.strip_prefix(approval_tokens::TOKEN_PREFIX).unwrap();
    assert!(e2a_store::secret::is_lower_hex(random, 64), "256 bits, hex");
    assert_ne!(token, other, "every token is fresh");

    let rows = snapshot(&store).await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .any(|r| r.contains(&approval_tokens::hash(&token)))
    );
    assert!(
        rows.iter().all(|r| !r.contains(random)),
        "no column holds the plaintext: {rows:?}"
    );

    // A leaked hash is no token, with or without the prefix.
    let leaked = approval_tokens::hash(&token);
    for forged in [leaked.clone(), format!("e2a_apv_{leaked}")] {
        assert!(matches!(
            consume(&store, &forged, Action::Approve).await,
            Err(ConsumeError::Unknown)
        ));
    }
}

#[tokio::test]
async fn a_token_works_exactly_once() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv2").await;
    let msg = held(&store, &a).await;
    let token = mint(&store, &a.user, &msg, Action::Reject).await;

    let used = consume(&store, &token, Action::Reject).await.unwrap();
    assert_eq!(
        used,
        Consumed {
            user_id: a.user.clone(),
            message_id: msg
        }
    );
    assert!(matches!(
        consume(&store, &token, Action::Reject).await,
        Err(ConsumeError::Used)
    ));
    assert_eq!(peek(&store, &token).await, TokenState::Used);
}

#[tokio::test]
async fn of_two_concurrent_posts_exactly_one_wins() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv3").await;
    let msg = held(&store, &a).await;
    let token = mint(&store, &a.user, &msg, Action::Approve).await;

    let (c1, c2) = (store.client().await.unwrap(), store.client().await.unwrap());
    let (r1, r2) = tokio::join!(
        approval_tokens::consume(&c1, &token, Action::Approve),
        approval_tokens::consume(&c2, &token, Action::Approve),
    );
    let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{r1:?} {r2:?}");
    assert!(
        matches!(r1, Err(ConsumeError::Used)) || matches!(r2, Err(ConsumeError::Used)),
        "{r1:?} {r2:?}"
    );
}

#[tokio::test]
async fn the_other_action_is_refused_and_the_token_stays_usable_for_its_own() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv4").await;
    let msg = held(&store, &a).await;
    let approve = mint(&store, &a.user, &msg, Action::Approve).await;

    assert!(matches!(
        consume(&store, &approve, Action::Reject).await,
        Err(ConsumeError::WrongAction)
    ));
    assert!(matches!(
        peek(&store, &approve).await,
        TokenState::Valid { .. }
    ));
    assert!(consume(&store, &approve, Action::Approve).await.is_ok());
    // Posted to the wrong action it stays a wrong action, used or not.
    assert!(matches!(
        consume(&store, &approve, Action::Reject).await,
        Err(ConsumeError::WrongAction)
    ));
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv5").await;
    let msg = held(&store, &a).await;
    let c = store.client().await.unwrap();
    let past = OffsetDateTime::now_utc() - Duration::seconds(1);
    let token = approval_tokens::mint(&c, &a.user, &msg, Action::Approve, past)
        .await
        .unwrap();

    assert_eq!(peek(&store, &token).await, TokenState::Expired);
    assert!(matches!(
        consume(&store, &token, Action::Approve).await,
        Err(ConsumeError::Expired)
    ));
    // Refusing it did not mark it used.
    assert_eq!(peek(&store, &token).await, TokenState::Expired);
}

#[tokio::test]
async fn a_rolled_back_decision_leaves_the_token_unused() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv6").await;
    let msg = held(&store, &a).await;
    let token = mint(&store, &a.user, &msg, Action::Approve).await;

    let mut c = store.client().await.unwrap();
    let tx = c.transaction().await.unwrap();
    approval_tokens::consume(&tx, &token, Action::Approve)
        .await
        .unwrap();
    // Inside the transaction it is spent ...
    assert_eq!(
        approval_tokens::peek(&tx, &token).await.unwrap(),
        TokenState::Used
    );
    // ... and the decision fails.
    tx.rollback().await.unwrap();

    assert!(matches!(
        peek(&store, &token).await,
        TokenState::Valid { .. }
    ));
    assert!(consume(&store, &token, Action::Approve).await.is_ok());
}

#[tokio::test]
async fn unknown_and_malformed_tokens_are_refused() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv7").await;
    let msg = held(&store, &a).await;
    let real = mint(&store, &a.user, &msg, Action::Approve).await;

    let never_minted = format!(
        "{}{}",
        approval_tokens::TOKEN_PREFIX,
        e2a_store::secret::random_hex::<32>()
    );
    let hostile = [
        never_minted,
        String::new(),
        "e2a_apv_".into(),
        real.to_uppercase(),
        format!("{real}0"),
        real[..real.len() - 1].to_owned(),
        format!("{real}' OR '1'='1"),
    ];
    for token in &hostile {
        assert_eq!(peek(&store, token).await, TokenState::Unknown, "{token:?}");
        assert!(
            matches!(
                consume(&store, token, Action::Approve).await,
                Err(ConsumeError::Unknown)
            ),
            "{token:?}"
        );
    }
    // None of that touched the real one.
    assert!(matches!(
        peek(&store, &real).await,
        TokenState::Valid { .. }
    ));
}

#[tokio::test]
async fn peek_reports_and_changes_nothing() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv8").await;
    let msg = held(&store, &a).await;
    let expires_at = in_an_hour();
    let c = store.client().await.unwrap();
    let valid = approval_tokens::mint(&c, &a.user, &msg, Action::Reject, expires_at)
        .await
        .unwrap();
    let used = mint(&store, &a.user, &msg, Action::Approve).await;
    consume(&store, &used, Action::Approve).await.unwrap();
    let expired = approval_tokens::mint(
        &c,
        &a.user,
        &msg,
        Action::Approve,
        OffsetDateTime::now_utc() - Duration::minutes(1),
    )
    .await
    .unwrap();

    let before = snapshot(&store).await;
    for _ in 0..3 {
        match peek(&store, &valid).await {
            TokenState::Valid {
                user_id,
                message_id,
                action,
                expires_at: at,
            } => {
                assert_eq!(user_id, a.user);
                assert_eq!(message_id, msg);
                assert_eq!(action, Action::Reject);
                assert!((at - expires_at).abs() < Duration::milliseconds(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(peek(&store, &used).await, TokenState::Used);
        assert_eq!(peek(&store, &expired).await, TokenState::Expired);
    }
    assert_eq!(snapshot(&store).await, before);
}

#[tokio::test]
async fn a_token_cannot_be_minted_for_another_users_message() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv9").await;
    let b = mailbox(&store, "apv10").await;
    let msg = held(&store, &a).await;
    let c = store.client().await.unwrap();
    assert!(matches!(
        approval_tokens::mint(&c, &b.user, &msg, Action::Approve, in_an_hour()).await,
        Err(StoreError::NotFound)
    ));
    assert!(snapshot(&store).await.is_empty());
}

#[tokio::test]
async fn deciding_a_message_revokes_its_links_and_only_its_links() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv11").await;
    let b = mailbox(&store, "apv12").await;
    let decided = held(&store, &a).await;
    let pending = held(&store, &a).await;
    let approve = mint(&store, &a.user, &decided, Action::Approve).await;
    let reject = mint(&store, &a.user, &decided, Action::Reject).await;
    let other = mint(&store, &a.user, &pending, Action::Approve).await;

    let c = store.client().await.unwrap();
    // Another tenant cannot revoke them.
    assert_eq!(
        approval_tokens::revoke_for_message(&c, &b.user, &decided)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        approval_tokens::revoke_for_message(&c, &a.user, &decided)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        approval_tokens::revoke_for_message(&c, &a.user, &decided)
            .await
            .unwrap(),
        0,
        "idempotent"
    );
    assert!(matches!(
        consume(&store, &approve, Action::Approve).await,
        Err(ConsumeError::Used)
    ));
    assert!(matches!(
        consume(&store, &reject, Action::Reject).await,
        Err(ConsumeError::Used)
    ));
    assert!(matches!(
        peek(&store, &other).await,
        TokenState::Valid { .. }
    ));
}

#[tokio::test]
async fn the_janitor_sweeps_long_expired_tokens_in_batches() {
    let (_db, store) = super::store().await;
    let a = mailbox(&store, "apv13").await;
    let msg = held(&store, &a).await;
    let c = store.client().await.unwrap();
    let long_ago = OffsetDateTime::now_utc() - Duration::hours(2);
    for _ in 0..3 {
        approval_tokens::mint(&c, &a.user, &msg, Action::Approve, long_ago)
            .await
            .unwrap();
    }
    let recent = approval_tokens::mint(
        &c,
        &a.user,
        &msg,
        Action::Approve,
        OffsetDateTime::now_utc() - Duration::minutes(1),
    )
    .await
    .unwrap();
    let live = mint(&store, &a.user, &msg, Action::Reject).await;

    let sweep = || approval_tokens::delete_expired(&c, Duration::hours(1), 2);
    assert_eq!(sweep().await.unwrap(), 2);
    assert_eq!(sweep().await.unwrap(), 1);
    assert_eq!(sweep().await.unwrap(), 0);
    // A link that expired a minute ago still says so.
    assert_eq!(peek(&store, &recent).await, TokenState::Expired);
    assert!(matches!(
        peek(&store, &live).await,
        TokenState::Valid { .. }
    ));
    assert_eq!(snapshot(&store).await.len(), 2);
}
