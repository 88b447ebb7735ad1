//! Account limits and usage.

use e2a_store::account_limits::{self, Limits, Usage};

#[tokio::test]
async fn defaults_apply_until_a_row_exists() {
    let (_db, store) = super::store().await;
    let user = super::user(&store, "l1@example.com").await;
    let c = store.client().await.unwrap();
    let defaults = Limits {
        plan_code: "free".into(),
        max_agents: 3,
        ..Limits::default()
    };
    assert_eq!(
        account_limits::effective(&c, &user, &defaults)
            .await
            .unwrap(),
        defaults
    );

    let pro = Limits {
        plan_code: "pro".into(),
        max_agents: 100,
        max_domains: 10,
        max_messages_month: 50_000,
        max_storage_bytes: 10 << 30,
        max_webhooks: 20,
        upgrade_url: "https://example.com/upgrade".into(),
    };
    account_limits::upsert(&c, &user, &pro).await.unwrap();
    assert_eq!(
        account_limits::effective(&c, &user, &defaults)
            .await
            .unwrap(),
        pro
    );
    let pro2 = Limits {
        max_agents: 200,
        ..pro
    };
    account_limits::upsert(&c, &user, &pro2).await.unwrap();
    assert_eq!(
        account_limits::effective(&c, &user, &defaults)
            .await
            .unwrap(),
        pro2
    );
}

#[tokio::test]
async fn usage_counts_only_the_callers_rows() {
    let (db, store) = super::store().await;
    let alice = super::user(&store, "alice@example.com").await;
    let bob = super::user(&store, "bob@example.com").await;
    let c = store.client().await.unwrap();
    assert_eq!(
        account_limits::usage(&c, &alice).await.unwrap(),
        Usage::default()
    );

    let raw = db.client().await;
    raw.batch_execute(&format!(
        "INSERT INTO domains (domain, user_id, verified) VALUES ('alice.example', '{a}', true), ('bob.example', '{b}', true);
         INSERT INTO agents (id, user_id, domain, agent_mode) VALUES ('x@alice.example', '{a}', 'alice.example', 'local'),
                                                                   ('y@alice.example', '{a}', 'alice.example', 'local');
         INSERT INTO messages (id, user_id, agent_id, direction, raw_message, body_sha256, inbox_status)
         VALUES ('msg_1', '{a}', 'x@alice.example', 'inbound', '\\x0102030405', repeat('a', 64), 'unread'),
                ('msg_2', '{a}', 'x@alice.example', 'inbound', '\\x010203', repeat('b', 64), 'unread');",
        a = alice.as_str(),
        b = bob.as_str()
    ))
    .await
    .unwrap();
    let usage = account_limits::usage(&c, &alice).await.unwrap();
    assert_eq!(
        usage,
        Usage {
            agents: 2,
            domains: 1,
            messages_month: 2,
            storage_bytes: 8
        }
    );
    assert_eq!(
        account_limits::usage(&c, &bob).await.unwrap(),
        Usage {
            domains: 1,
            ..Usage::default()
        }
    );

    // Deleting messages frees storage but the monthly count stays.
    raw.execute("DELETE FROM messages WHERE id = 'msg_1'", &[])
        .await
        .unwrap();
    let usage = account_limits::usage(&c, &alice).await.unwrap();
    assert_eq!((usage.storage_bytes, usage.messages_month), (3, 2));

    // A counter from an earlier month restarts.
    raw.execute(
        "UPDATE account_usage SET month_start = month_start - 40 WHERE user_id = $1",
        &[&alice],
    )
    .await
    .unwrap();
    assert_eq!(
        account_limits::usage(&c, &alice)
            .await
            .unwrap()
            .messages_month,
        0
    );
    raw.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, body_sha256, inbox_status)
         VALUES ('msg_3', $1, 'x@alice.example', 'inbound', repeat('c', 64), 'unread')",
        &[&alice],
    )
    .await
    .unwrap();
    assert_eq!(
        account_limits::usage(&c, &alice)
            .await
            .unwrap()
            .messages_month,
        1
    );
}
