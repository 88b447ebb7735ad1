//! HITL decisions (V25, `e2a_store::hitl`): each guarded transition once,
//! with its event and delivery in its transaction; every illegal
//! transition refused; human approvals and the expiry racing on a
//! multi-threaded runtime, with exactly one winner; janitors' claims
//! disjoint; the held copy scrubbed and the storage counter following.

use std::{sync::Arc, time::Duration};

use e2a_store::{
    Store, StoreError,
    hitl::{self, Approval, Decided, Rejection, Via},
    ids::MessageId,
    mail_outbox::RecipientKind,
    outbound::{self, Hold, MessageType, OutboundMail},
};
use time::OffsetDateTime;
use tokio::sync::Barrier;

use super::messages::{Mailbox, mailbox};

const BODY: &str = "the held draft, which must not outlive the decision";

/// A message of `from` to bob@example.net, held until `expires_at`.
async fn hold(store: &Store, from: &Mailbox, expires_at: OffsetDateTime) -> MessageId {
    let message_id = MessageId::new();
    let to = vec!["bob@example.net".to_owned()];
    let ext = vec![("bob@example.net".to_owned(), RecipientKind::To)];
    let refs: Vec<String> = vec!["parent@example.net".into()];
    let mail = OutboundMail {
        message_id: &message_id,
        user_id: &from.user,
        agent_id: &from.agent,
        message_type: MessageType::Send,
        rfc_message_id: "held@agents.localhost",
        parent_email_message_id: "",
        subject: "for review",
        to: &to,
        cc: &[],
        bcc: &[],
        conversation_id: "cnv_held",
        raw: b"Subject: for review\r\n\r\nx\r\n",
        mail_from: &from.agent,
        dkim_domain: "agents.localhost",
        external: &ext,
        loopback: None,
        max_attempts: 3,
        hold: Some(Hold {
            expires_at,
            body_text: BODY,
            body_html: None,
            attachments_json: None,
            thread_refs: &refs,
        }),
    };
    let accepted = store
        .transaction(&mail, |tx, mail| Box::pin(outbound::accept(tx, mail)))
        .await
        .unwrap();
    assert_eq!(accepted.status, "pending_approval");
    message_id
}

/// What a decision of `id` sends (as the API would after composing it).
fn release<'a>(
    from: &'a Mailbox,
    id: &'a MessageId,
    to: &'a [String],
    ext: &'a [(String, RecipientKind)],
) -> OutboundMail<'a> {
    OutboundMail {
        message_id: id,
        user_id: &from.user,
        agent_id: &from.agent,
        message_type: MessageType::Send,
        rfc_message_id: "held@agents.localhost",
        parent_email_message_id: "",
        subject: "for review (edited)",
        to,
        cc: &[],
        bcc: &[],
        conversation_id: "cnv_held",
        raw: b"Subject: for review (edited)\r\n\r\nedited\r\n",
        mail_from: &from.agent,
        dkim_domain: "agents.localhost",
        external: ext,
        loopback: None,
        max_attempts: 3,
        hold: None,
    }
}

fn bob() -> (Vec<String>, Vec<(String, RecipientKind)>) {
    (
        vec!["bob@example.net".to_owned()],
        vec![("bob@example.net".to_owned(), RecipientKind::To)],
    )
}

async fn approve(
    store: &Store,
    from: &Mailbox,
    id: &MessageId,
    via: Via,
) -> Result<Decided<hitl::Approved>, StoreError> {
    let (to, ext) = bob();
    let mail = release(from, id, &to, &ext);
    let approval = Approval {
        mail: &mail,
        reviewer: (via != Via::Expiry).then_some(&from.user),
        via,
        edited: true,
    };
    store
        .transaction(&approval, |tx, a| Box::pin(hitl::approve(tx, a)))
        .await
}

async fn reject(
    store: &Store,
    from: &Mailbox,
    id: &MessageId,
    via: Via,
) -> Result<Decided<hitl::Rejected>, StoreError> {
    let r = Rejection {
        user_id: &from.user,
        message_id: id,
        reviewer: (via != Via::Expiry).then_some(&from.user),
        via,
        reason: "not like this",
    };
    store
        .transaction(&r, |tx, r| Box::pin(hitl::reject(tx, r)))
        .await
}

async fn one<T: tokio_postgres::types::FromSqlOwned>(
    store: &Store,
    sql: &str,
    id: &MessageId,
) -> T {
    store
        .client()
        .await
        .unwrap()
        .query_one(sql, &[id])
        .await
        .unwrap()
        .get(0)
}

async fn events(store: &Store, id: &MessageId, event_type: &str) -> i64 {
    store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM webhook_events WHERE message_id = $1 AND type = $2",
            &[&id.as_str(), &event_type],
        )
        .await
        .unwrap()
        .get(0)
}

async fn storage(store: &Store, from: &Mailbox) -> i64 {
    store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT storage_bytes FROM account_usage WHERE user_id = $1",
            &[&from.user],
        )
        .await
        .unwrap()
        .get(0)
}

fn in_an_hour() -> OffsetDateTime {
    OffsetDateTime::now_utc() + Duration::from_secs(3600)
}

#[tokio::test]
async fn approve_moves_the_draft_into_the_outbox_once_with_its_event() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let id = hold(&store, &alice, in_an_hour()).await;
    let before = storage(&store, &alice).await;

    let Decided::Done(done) = approve(&store, &alice, &id, Via::Api).await.unwrap() else {
        panic!("first approval decides");
    };
    assert_eq!(done.status, "approved");
    assert!(done.edited);
    assert!(done.accepted.delivery_id.is_some());
    let (status, subject, body, reviewer, via): (
        String,
        String,
        Option<String>,
        Option<String>,
        String,
    ) = {
        let c = store.client().await.unwrap();
        let r = c
            .query_one(
                "SELECT status, subject, body_text, reviewed_by_user_id, decided_via FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    };
    assert_eq!(status, "approved");
    assert_eq!(subject, "for review (edited)");
    assert_eq!(body, None, "the held copy is scrubbed");
    assert_eq!(reviewer.as_deref(), Some(alice.user.as_str()));
    assert_eq!(via, "api");
    assert_eq!(events(&store, &id, "email.approved").await, 1);
    assert_eq!(
        one::<i64>(
            &store,
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            &id
        )
        .await,
        1
    );
    // The storage counter gives the scrubbed body back (flaw 18).
    assert_eq!(storage(&store, &alice).await, before - BODY.len() as i64);

    // Every later decision is refused and writes nothing.
    for _ in 0..2 {
        assert_eq!(
            approve(&store, &alice, &id, Via::Api).await.unwrap(),
            Decided::NotPending {
                status: "approved".into()
            }
        );
        assert!(matches!(
            reject(&store, &alice, &id, Via::Api).await.unwrap(),
            Decided::NotPending { .. }
        ));
    }
    assert_eq!(events(&store, &id, "email.approved").await, 1);
    assert_eq!(events(&store, &id, "email.rejected").await, 0);
    assert_eq!(
        one::<i64>(
            &store,
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            &id
        )
        .await,
        1
    );
}

#[tokio::test]
async fn reject_scrubs_the_draft_and_refuses_every_later_decision() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let id = hold(&store, &alice, in_an_hour()).await;
    let Decided::Done(done) = reject(&store, &alice, &id, Via::MagicLink).await.unwrap() else {
        panic!("rejection decides");
    };
    assert_eq!(done.status, "rejected");
    assert_eq!(done.reason.as_deref(), Some("not like this"));
    let body: Option<String> =
        one(&store, "SELECT body_text FROM messages WHERE id = $1", &id).await;
    assert_eq!(body, None);
    let via: String = one(
        &store,
        "SELECT decided_via FROM messages WHERE id = $1",
        &id,
    )
    .await;
    assert_eq!(via, "magic_link");
    assert_eq!(events(&store, &id, "email.rejected").await, 1);
    assert_eq!(
        approve(&store, &alice, &id, Via::Api).await.unwrap(),
        Decided::NotPending {
            status: "rejected".into()
        }
    );
    assert!(matches!(
        reject(&store, &alice, &id, Via::Api).await.unwrap(),
        Decided::NotPending { .. }
    ));
    assert_eq!(
        one::<i64>(
            &store,
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            &id
        )
        .await,
        0
    );
    assert_eq!(events(&store, &id, "email.rejected").await, 1);
}

#[tokio::test]
async fn another_tenant_cannot_see_or_decide_a_hold() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mallory = mailbox(&store, "mallory").await;
    let id = hold(&store, &alice, in_an_hour()).await;
    let c = store.client().await.unwrap();
    assert!(matches!(
        hitl::held(&c, &mallory.user, None, &id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        hitl::held(&c, &alice.user, Some(&mallory.agent), &id).await,
        Err(StoreError::NotFound)
    ));
    drop(c);
    // Mallory's decision on Alice's message (her own user id) finds nothing.
    let forged = Mailbox {
        user: mallory.user.clone(),
        agent: alice.agent.clone(),
    };
    assert!(matches!(
        approve(&store, &forged, &id, Via::Api).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        reject(&store, &forged, &id, Via::Api).await,
        Err(StoreError::NotFound)
    ));
    let status: String = one(&store, "SELECT status FROM messages WHERE id = $1", &id).await;
    assert_eq!(status, "pending_approval");
}

#[tokio::test]
async fn a_human_cannot_decide_after_the_expiry_and_the_expiry_cannot_before_it() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let past = hold(
        &store,
        &alice,
        OffsetDateTime::now_utc() - Duration::from_secs(1),
    )
    .await;
    let future = hold(&store, &alice, in_an_hour()).await;
    assert_eq!(
        approve(&store, &alice, &past, Via::Api).await.unwrap(),
        Decided::NotPending {
            status: "expired".into()
        }
    );
    assert_eq!(
        reject(&store, &alice, &past, Via::MagicLink).await.unwrap(),
        Decided::NotPending {
            status: "expired".into()
        }
    );
    assert!(matches!(
        approve(&store, &alice, &future, Via::Expiry).await.unwrap(),
        Decided::NotPending { .. }
    ));
    // The expiry decides the expired one: status and event, no reviewer.
    let Decided::Done(done) = approve(&store, &alice, &past, Via::Expiry).await.unwrap() else {
        panic!("expiry approves");
    };
    assert_eq!(done.status, "expired_approved");
    let reviewer: Option<String> = one(
        &store,
        "SELECT reviewed_by_user_id FROM messages WHERE id = $1",
        &past,
    )
    .await;
    assert_eq!(reviewer, None);
    assert_eq!(events(&store, &past, "email.approved").await, 1);
}

#[tokio::test]
async fn a_decision_and_its_event_roll_back_together() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let id = hold(&store, &alice, in_an_hour()).await;
    let (to, ext) = bob();
    let mail = release(&alice, &id, &to, &ext);
    let approval = Approval {
        mail: &mail,
        reviewer: Some(&alice.user),
        via: Via::Api,
        edited: false,
    };
    let result: Result<(), _> = store
        .transaction(&approval, |tx, a| {
            Box::pin(async move {
                let decided = hitl::approve(tx, a).await?;
                assert!(matches!(decided, Decided::Done(_)));
                // The status update happened in this transaction…
                tx.execute("SELECT 1/0", &[]).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err());
    let rejection = Rejection {
        user_id: &alice.user,
        message_id: &id,
        reviewer: Some(&alice.user),
        via: Via::Api,
        reason: "",
    };
    let result: Result<(), _> = store
        .transaction(&rejection, |tx, r| {
            Box::pin(async move {
                hitl::reject(tx, r).await?;
                tx.execute("SELECT 1/0", &[]).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err());
    // …and neither the new status nor any event or delivery survived.
    let (status, body): (String, Option<String>) = {
        let c = store.client().await.unwrap();
        let r = c
            .query_one(
                "SELECT status, body_text FROM messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status, "pending_approval");
    assert_eq!(body.as_deref(), Some(BODY));
    assert_eq!(events(&store, &id, "email.approved").await, 0);
    assert_eq!(events(&store, &id, "email.rejected").await, 0);
    assert_eq!(
        one::<i64>(
            &store,
            "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
            &id
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_deciders_have_exactly_one_winner() {
    let (_db, store) = super::store().await;
    let alice = Arc::new(mailbox(&store, "alice").await);
    for round in 0..25 {
        let id = Arc::new(hold(&store, &alice, in_an_hour()).await);
        let barrier = Arc::new(Barrier::new(3));
        let mut tasks = Vec::new();
        for kind in 0..3 {
            let (store, alice, id, barrier) =
                (store.clone(), alice.clone(), id.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                match kind {
                    0 | 1 => matches!(
                        approve(&store, &alice, &id, Via::Api).await.unwrap(),
                        Decided::Done(_)
                    ),
                    _ => matches!(
                        reject(&store, &alice, &id, Via::MagicLink).await.unwrap(),
                        Decided::Done(_)
                    ),
                }
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}");
        let decided = events(&store, &id, "email.approved").await
            + events(&store, &id, "email.rejected").await;
        assert_eq!(decided, 1, "round {round}: one event");
        assert!(
            one::<i64>(
                &store,
                "SELECT count(*) FROM mail_deliveries WHERE message_id = $1",
                &id
            )
            .await
                <= 1
        );
    }
}

/// The expiry (a janitor's claim and approval in one transaction) against
/// a human approval at the moment the hold expires: never both, and once
/// the expiry has run again, exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_expiry_racing_a_human_approval_decides_once() {
    let (_db, store) = super::store().await;
    let alice = Arc::new(mailbox(&store, "alice").await);
    let expire = |store: Store, alice: Arc<Mailbox>| async move {
        let mut client = store.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let mut won = 0;
        for e in hitl::claim_expired(&tx, 10).await.unwrap() {
            let (to, ext) = bob();
            let mail = release(&alice, &e.held.id, &to, &ext);
            let approval = Approval {
                mail: &mail,
                reviewer: None,
                via: Via::Expiry,
                edited: false,
            };
            if matches!(
                hitl::approve(&tx, &approval).await.unwrap(),
                Decided::Done(_)
            ) {
                won += 1;
            }
        }
        tx.commit().await.unwrap();
        won
    };
    let (mut human_wins, mut expiry_wins) = (0, 0);
    for round in 0..25 {
        let expires = OffsetDateTime::now_utc() + Duration::from_millis(40);
        let id = Arc::new(hold(&store, &alice, expires).await);
        let barrier = Arc::new(Barrier::new(2));
        let human = {
            let (store, alice, id, barrier) =
                (store.clone(), alice.clone(), id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                tokio::time::sleep(Duration::from_millis(38)).await;
                matches!(
                    approve(&store, &alice, &id, Via::Api).await.unwrap(),
                    Decided::Done(_)
                )
            })
        };
        let janitor = {
            let (store, alice, barrier) = (store.clone(), alice.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut won = 0;
                // Poll across the expiry boundary.
                for _ in 0..8 {
                    won += expire(store.clone(), alice.clone()).await;
                    tokio::time::sleep(Duration::from_millis(8)).await;
                }
                won
            })
        };
        let h = human.await.unwrap();
        let j = janitor.await.unwrap();
        assert!(usize::from(h) + j <= 1, "round {round}: both decided");
        // Whatever is left pending is the expiry's now.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let late = expire(store.clone(), alice.clone()).await;
        assert_eq!(usize::from(h) + j + late, 1, "round {round}");
        assert_eq!(
            events(&store, &id, "email.approved").await,
            1,
            "round {round}"
        );
        human_wins += usize::from(h);
        expiry_wins += j + late;
    }
    assert_eq!(human_wins + expiry_wins, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn janitors_claim_disjoint_batches() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let past = OffsetDateTime::now_utc() - Duration::from_secs(1);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(hold(&store, &alice, past).await);
    }
    let mut a = store.client().await.unwrap();
    let mut b = store.client().await.unwrap();
    let ta = a.transaction().await.unwrap();
    let tb = b.transaction().await.unwrap();
    let first = hitl::claim_expired(&ta, 12).await.unwrap();
    let second = hitl::claim_expired(&tb, 12).await.unwrap();
    assert_eq!(first.len(), 12);
    assert_eq!(second.len(), 8, "the second janitor skips the locked rows");
    let mut all: Vec<_> = first
        .iter()
        .chain(second.iter())
        .map(|e| e.held.id.as_str().to_owned())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 20);
    assert!(first.iter().all(|e| !e.approve && e.domain_verified));
}
