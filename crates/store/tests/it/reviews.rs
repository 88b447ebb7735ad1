//! Reviewer views (`reviews`): the pending list walks the owner's partial
//! index, summarises attachments without their data (decoded sizes from
//! the stored base64), and both views hide other tenants' and inbound
//! messages.

use e2a_store::{StoreError, ids::MessageId, reviews};

use super::messages::mailbox;

/// Walks a JSON plan and collects every `Index Name`.
fn index_names(plan: &serde_json::Value, out: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(name)) = map.get("Index Name") {
                out.push(name.clone());
            }
            map.values().for_each(|v| index_names(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| index_names(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn pending_drafts_are_summarised_from_the_owners_partial_index() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let mallory = mailbox(&store, "mallory").await;
    let c = store.client().await.unwrap();
    let held = MessageId::new();
    // Padded base64 of "", "a", "hi", "abc", "hello": 0, 1, 2, 3, 5 octets.
    let attachments = serde_json::json!([
        {"filename": "empty", "content_type": "text/plain", "data": ""},
        {"filename": "a.txt", "content_type": "text/plain", "data": "YQ=="},
        {"filename": "hi.txt", "content_type": "text/plain", "data": "aGk="},
        {"filename": "abc.bin", "content_type": "application/octet-stream", "data": "YWJj"},
        {"filename": "hello.txt", "content_type": "text/plain", "data": "aGVsbG8="},
    ]);
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, status, subject, message_type, \
           to_recipients, approval_expires_at, body_text, attachments_json) \
         VALUES ($1, $2, $3, 'outbound', 'pending_approval', 's', 'send', ARRAY['b@example.net'], \
           now() + interval '1 hour', 'draft', $4)",
        &[&held, &alice.user, &alice.agent, &attachments],
    )
    .await
    .unwrap();
    let list = reviews::pending(&c, &alice.user).await.unwrap();
    assert_eq!(list.len(), 1);
    let sizes: Vec<(&str, i64)> = list[0]
        .attachments
        .iter()
        .map(|a| (a.filename.as_str(), a.size_bytes))
        .collect();
    assert_eq!(
        sizes,
        [
            ("empty", 0),
            ("a.txt", 1),
            ("hi.txt", 2),
            ("abc.bin", 3),
            ("hello.txt", 5)
        ]
    );
    assert_eq!(
        list[0].attachments[3].content_type,
        "application/octet-stream"
    );
    assert_eq!(list[0].body_text.as_deref(), Some("draft"));

    // Another tenant sees none of it.
    assert!(
        reviews::pending(&c, &mallory.user)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        reviews::outbound(&c, &mallory.user, &held).await,
        Err(StoreError::NotFound)
    ));
    let mine = reviews::outbound(&c, &alice.user, &held).await.unwrap();
    assert_eq!(mine.attachments, Some(attachments));
    assert!(mine.parent.is_none());

    // The statement can be answered by the partial index alone (the
    // planner is made to prefer any index over a scan of the tiny table).
    c.execute("SET enable_seqscan = off", &[]).await.unwrap();
    let plan = reviews::explain_pending(&c, &alice.user).await.unwrap();
    c.execute("RESET enable_seqscan", &[]).await.unwrap();
    let mut names = Vec::new();
    index_names(&plan, &mut names);
    assert_eq!(names, ["messages_user_pending_idx"], "{plan}");
}
