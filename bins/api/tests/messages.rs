//! An agent's messages and conversations end to end: mail stored by
//! `inbound::ingest` is listed by default (flaw 14), paged with cursors,
//! read (and marked read) with its verdicts, labelled, grouped into
//! conversations — and invisible to every other tenant (flaw 27).

mod common;

use base64::Engine;
use common::{Running, code, key_for};
use e2a_api::Config;
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    ids::MessageId,
    inbound::{self, Delivery, InboundMail, Outcome},
    users,
};
use e2a_testkit::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const AGENT: &str = "demo@agents.localhost";
const AGENT_PATH: &str = "/v1/agents/Demo@Agents.LocalHost";

/// Stores one inbound message for `AGENT` (owned by `owner`).
async fn deliver(
    store: &Store,
    owner: &str,
    message_id: &str,
    subject: &str,
    refs: &[String],
) -> (String, String, Vec<u8>) {
    let c = store.client().await.unwrap();
    let user = users::get_by_email(&c, &EmailAddress::parse(owner).unwrap())
        .await
        .unwrap()
        .id;
    let raw = format!("From: Bob <bob@example.org>\r\nMessage-ID: <{message_id}>\r\nSubject: {subject}\r\n\r\nhello\r\n").into_bytes();
    let to = vec![AGENT.to_owned()];
    let sha256 = inbound::body_sha256(&raw);
    let mail = InboundMail {
        raw: &raw,
        body_sha256: &sha256,
        email_message_id: message_id,
        sender: "bob@example.org",
        subject,
        to: &to,
        cc: &[],
        reply_to: &[],
        thread_refs: refs,
        trusted_conversation_id: None,
        spf: "pass",
        dkim: "fail",
        dmarc: "none",
    };
    let delivery = Delivery {
        message_id: MessageId::new(),
        agent_id: AGENT.into(),
        agent_domain: "agents.localhost".into(),
        user_id: user,
        auth_headers: json!({"X-E2A-Auth-Verified": "true", "X-E2A-Auth-Sender": "bob@example.org"}),
        legacy_push: false,
    };
    match inbound::ingest(store, &mail, &[delivery])
        .await
        .unwrap()
        .remove(0)
    {
        Outcome::Stored {
            message_id,
            conversation_id,
        } => (message_id.to_string(), conversation_id, raw),
        other => panic!("{other:?}"),
    }
}

fn ids(page: &Value) -> Vec<&str> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn messages_and_conversations_end_to_end() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let bob = key_for(db.url(), "bob@example.com").await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    let api = Running::start(config).await;
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();

    // A cloud agent (webhook mode) by slug, and bob's own agent.
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "demo", "webhook_url": "http://127.0.0.1:9/hook"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &bob,
            Some(json!({"slug": "bob"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    let (first, conv_one, raw_first) =
        deliver(&store, "alice@example.com", "one@example.org", "plan", &[]).await;
    let (second, conv_two, _) = deliver(
        &store,
        "alice@example.com",
        "two@example.org",
        "100% other",
        &[],
    )
    .await;
    let (reply, reply_conv, _) = deliver(
        &store,
        "alice@example.com",
        "three@example.org",
        "Re: plan",
        &["one@example.org".to_owned()],
    )
    .await;
    assert_eq!(reply_conv, conv_one);
    // Make the order deterministic (ingest stores whole seconds).
    {
        let c = store.client().await.unwrap();
        for (i, id) in [&first, &second, &reply].into_iter().enumerate() {
            c.execute(
                "UPDATE messages SET created_at = now() - make_interval(mins => 10 - $2) WHERE id = $1",
                &[id, &(i as i32)],
            )
            .await
            .unwrap();
        }
    }

    // Cross-tenant: bob sees none of it, and nothing he does marks it read.
    for (method, path, body) in [
        (Method::GET, format!("{AGENT_PATH}/messages"), None),
        (Method::GET, format!("{AGENT_PATH}/messages/{first}"), None),
        (
            Method::GET,
            format!("/v1/agents/bob@agents.localhost/messages/{first}"),
            None,
        ),
        (
            Method::PATCH,
            format!("{AGENT_PATH}/messages/{first}"),
            Some(json!({"add_labels": ["x"]})),
        ),
        (
            Method::PATCH,
            format!("/api/v1/agents/{AGENT}/messages/{first}"),
            Some(json!({"add_labels": ["x"]})),
        ),
        (
            Method::PATCH,
            format!("/v1/agents/bob@agents.localhost/messages/{first}"),
            Some(json!({"add_labels": ["x"]})),
        ),
        (Method::GET, format!("{AGENT_PATH}/conversations"), None),
        (
            Method::GET,
            format!("{AGENT_PATH}/conversations/{conv_one}"),
            None,
        ),
        (
            Method::GET,
            format!("/v1/agents/bob@agents.localhost/conversations/{conv_one}"),
            None,
        ),
    ] {
        let (s, b) = api.call(method.clone(), &path, &bob, body).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {path}"
        );
    }
    for path in [
        format!("{AGENT_PATH}/messages/msg_nope"),
        format!("{AGENT_PATH}/messages/{}", MessageId::new()),
        "/v1/agents/x@nowhere.example/messages".into(),
    ] {
        let (s, b) = api.call(Method::GET, &path, &alice, None).await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }

    // Default list: inbound + unread, newest first — cloud mail included (flaw 14).
    let (s, page) = api
        .call(Method::GET, format!("{AGENT_PATH}/messages"), &alice, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), [reply.as_str(), &second, &first]);
    assert_eq!(page["next_cursor"], Value::Null);
    let item = &page["items"][2];
    assert_eq!(
        (
            &item["direction"],
            &item["from"],
            &item["to"],
            &item["recipient"],
            &item["subject"],
            &item["status"],
            &item["conversation_id"],
            &item["labels"]
        ),
        (
            &json!("inbound"),
            &json!("bob@example.org"),
            &json!([AGENT]),
            &json!(AGENT),
            &json!("plan"),
            &json!("unread"),
            &json!(conv_one),
            &json!([])
        )
    );
    assert_eq!(item["size_bytes"], raw_first.len());
    assert!(item["created_at"].as_str().unwrap().ends_with('Z'));

    // Cursor paging, ascending, two per page.
    let (_, p1) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/messages?sort=asc&limit=2"),
            &alice,
            None,
        )
        .await;
    assert_eq!(ids(&p1), [first.as_str(), &second]);
    let cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    let (_, p2) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/messages?sort=asc&limit=2&cursor={cursor}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(ids(&p2), [reply.as_str()]);
    assert_eq!(p2["next_cursor"], Value::Null);
    let (s, b) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/messages?limit=2&cursor={cursor}"),
            &alice,
            None,
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_cursor"));

    // Filters.
    let filtered = |query: &str| {
        let path = format!("{AGENT_PATH}/messages?{query}");
        let query = query.to_owned();
        let alice = alice.clone();
        let api = &api;
        async move {
            let (s, page) = api.call(Method::GET, &path, &alice, None).await;
            assert_eq!(s, StatusCode::OK, "{query}: {page}");
            ids(&page)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(filtered("subject_contains=0%25").await, [second.as_str()]);
    assert_eq!(
        filtered("subject_contains=PLAN&sort=asc").await,
        [first.clone(), reply.clone()]
    );
    assert_eq!(
        filtered(&format!("conversation_id={conv_two}")).await,
        [second.as_str()]
    );
    assert_eq!(filtered("from=BOB%40").await.len(), 3);
    assert!(filtered("from=carol").await.is_empty());
    assert!(filtered("direction=outbound").await.is_empty());
    assert_eq!(filtered("direction=all").await.len(), 3);
    for query in [
        "direction=sideways",
        "status=new",
        "direction=outbound&status=unread",
        "limit=0",
        "limit=101",
        "since=nope",
        "labels=UPPER",
        "labels=ok,UPPER",
        "sort=asc&sort=desc",
        "from=%00",
        "subject_contains=a%00b",
        "conversation_id=x%00",
        "conversation_id=a%0Ab",
    ] {
        let (s, b) = api
            .call(
                Method::GET,
                format!("{AGENT_PATH}/messages?{query}"),
                &alice,
                None,
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_filter"),
            "{query}"
        );
    }

    // Get one: content, verdicts, read-on-get.
    let (s, m) = api
        .call(
            Method::GET,
            format!("/v1/agents/demo@agents.localhost/messages/{first}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["message_id"], first);
    assert_eq!(m["status"], "read");
    assert_eq!(m["reply_to"], Value::Null);
    assert_eq!(m["conversation_id"], conv_one);
    assert_eq!(
        m["auth"],
        json!({"spf": "pass", "dkim": "fail", "dmarc": "none"})
    );
    assert_eq!(m["auth_headers"]["X-E2A-Auth-Sender"], "bob@example.org");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(m["raw_message"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, raw_first);
    assert_eq!(
        filtered("").await,
        [reply.clone(), second.clone()],
        "read mail leaves the default view"
    );
    assert_eq!(filtered("status=read").await, [first.as_str()]);

    // Labels: add then remove (remove wins), sorted; legacy path too.
    let labels_path = format!("{AGENT_PATH}/messages/{second}");
    let (s, b) = api
        .call(
            Method::PATCH,
            labels_path.clone(),
            &alice,
            Some(
                json!({"add_labels": ["urgent", "billing", "urgent", "x"], "remove_labels": ["x"]}),
            ),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::OK,
            json!({"message_id": second, "labels": ["billing", "urgent"]})
        )
    );
    let (s, b) = api
        .call(
            Method::PATCH,
            format!("/api/v1/agents/{AGENT}/messages/{second}"),
            &alice,
            Some(json!({"remove_labels": ["billing"]})),
        )
        .await;
    assert_eq!((s, &b["labels"]), (StatusCode::OK, &json!(["urgent"])));
    for body in [
        json!({}),
        json!({"add_labels": ["e2a:spam"]}),
        json!({"remove_labels": ["e2a:spam"]}),
        json!({"add_labels": ["Urgent"]}),
        json!({"add_labels": ["a".repeat(65)]}),
        json!({"add_labels": (0..51).map(|i| format!("l{i}")).collect::<Vec<_>>()}),
        json!({"add_labels": "urgent"}),
        json!({"labels": ["x"]}),
    ] {
        let (s, b) = api
            .call(
                Method::PATCH,
                labels_path.clone(),
                &alice,
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}"
        );
    }
    for batch in 0..2 {
        let add: Vec<String> = (0..50).map(|i| format!("b{batch}-{i}")).collect();
        let (s, _) = api
            .call(
                Method::PATCH,
                labels_path.clone(),
                &alice,
                Some(json!({"add_labels": add})),
            )
            .await;
        assert_eq!(
            s,
            if batch == 0 {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            },
            "cap of 100 per message"
        );
    }
    assert_eq!(
        filtered("labels=urgent&labels=b0-1&status=all").await,
        [second.as_str()]
    );
    // The contract's `explode: false` form: one comma-separated value.
    assert_eq!(
        filtered("labels=urgent,b0-1&status=all").await,
        [second.as_str()]
    );
    assert_eq!(
        filtered("labels=e2a:anything&status=all").await,
        Vec::<String>::new(),
        "e2a: allowed in filters"
    );

    // Conversations.
    let (s, list) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations"),
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list["next_cursor"], Value::Null);
    let convs = list["items"].as_array().unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(
        convs[0]["conversation_id"], conv_one,
        "the reply is the newest message"
    );
    assert_eq!(
        (
            &convs[0]["message_count"],
            &convs[0]["inbound_count"],
            &convs[0]["outbound_count"],
            &convs[0]["has_unread"],
            &convs[0]["latest_subject"],
            &convs[0]["latest_sender"]
        ),
        (
            &json!(2),
            &json!(2),
            &json!(0),
            &json!(true),
            &json!("Re: plan"),
            &json!("bob@example.org")
        )
    );
    let (_, limited) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations?limit=1"),
            &alice,
            None,
        )
        .await;
    assert_eq!(limited["items"].as_array().unwrap().len(), 1);
    for query in [
        "limit=0",
        "limit=201",
        "since=bad",
        "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
    ] {
        let (s, b) = api
            .call(
                Method::GET,
                format!("{AGENT_PATH}/conversations?{query}"),
                &alice,
                None,
            )
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::BAD_REQUEST, "invalid_filter"),
            "{query}"
        );
    }
    let (s, detail) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations/{conv_one}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{detail}");
    assert_eq!(detail["participants"], json!(["bob@example.org", AGENT]));
    assert_eq!(detail["labels"], json!([]));
    assert_eq!(
        detail["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [first.as_str(), &reply]
    );
    assert_eq!(detail["message_count"], 2);
    let (s, b) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations/cnv_unknown"),
            &alice,
            None,
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, b) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations/a%0Ab"),
            &alice,
            None,
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, b) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/conversations/a%00b"),
            &alice,
            None,
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_request"));
    api.stop().await;
}

/// A search over more messages than one call examines: pages stop at the
/// scan budget with a cursor, even when empty, and the walk finds each
/// match once; `next_cursor` is null only where the mailbox ends.
#[tokio::test]
async fn searches_page_through_a_large_mailbox_by_scan_budget() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    let api = Running::start(config).await;
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let c = store.client().await.unwrap();
    let user = users::get_by_email(&c, &EmailAddress::parse("alice@example.com").unwrap())
        .await
        .unwrap()
        .id;
    // 2.5 budgets of unread mail, newest first by g; "Needle" at g = 10
    // and 2100, labelled `rare` at g = 1500.
    let budget = e2a_store::messages::SCAN_BUDGET;
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, \
           conversation_id, inbox_status, labels, body_sha256, created_at) \
         SELECT 'msg_' || lpad(to_hex(g), 32, '0'), $1, $2, 'inbound', 'bob@example.org', $2, \
           CASE WHEN g IN (10, 2100) THEN 'Needle ' ELSE 'hay ' END || g, 'cnv_' || g, 'unread', \
           CASE WHEN g = 1500 THEN ARRAY['rare'] ELSE '{}' END, \
           lpad(to_hex(g), 64, '0'), now() - make_interval(secs => g) \
         FROM generate_series(1, $3::int8 * 5 / 2) AS g",
        &[&user, &AGENT, &budget],
    )
    .await
    .unwrap();
    let id = |g: i64| format!("msg_{g:032x}");

    let walk = |query: &'static str| {
        let api = &api;
        let alice = &alice;
        async move {
            let mut pages: Vec<Vec<String>> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    None => format!("{AGENT_PATH}/messages?{query}"),
                    Some(c) => format!("{AGENT_PATH}/messages?{query}&cursor={c}"),
                };
                let (s, page) = api.call(Method::GET, &path, alice, None).await;
                assert_eq!(s, StatusCode::OK, "{path}: {page}");
                pages.push(ids(&page).into_iter().map(str::to_owned).collect());
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => {
                        assert!(page["next_cursor"].is_null(), "{page}");
                        return pages;
                    }
                }
                assert!(pages.len() < 30, "{query}: no end");
            }
        }
    };
    assert_eq!(
        walk("subject_contains=NEEDLE&limit=10").await,
        vec![vec![id(10)], vec![], vec![id(2100)]],
        "budget, budget, end of mailbox"
    );
    assert_eq!(
        walk("labels=rare&status=all").await,
        vec![vec![], vec![id(1500)], vec![]]
    );
    assert_eq!(
        walk("sort=asc&subject_contains=needle").await,
        vec![vec![id(2100)], vec![], vec![id(10)]]
    );
    // Without a row-by-row filter pages are full: 2500 rows in 25 pages.
    let plain = walk("limit=100").await;
    assert_eq!(plain.len(), 25);
    assert!(plain.iter().all(|p| p.len() == 100));
    api.stop().await;
}

/// A statement the database cancels for time (57014) is a 503 with
/// `Retry-After` — here a read-on-get waiting on a row lock past the
/// statement timeout — and the same request succeeds once the lock goes.
#[tokio::test]
async fn a_statement_cancelled_for_time_is_503_with_retry_after() {
    let db = TestDb::new().await;
    let alice = key_for(db.url(), "alice@example.com").await;
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    config.common.db.db_statement_timeout_ms = 200;
    let api = Running::start(config).await;
    let (s, _) = api
        .call(
            Method::POST,
            "/v1/agents",
            &alice,
            Some(json!({"slug": "demo"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let store = Store::new(&StoreConfig::new(db.url())).unwrap();
    let (id, _, _) = deliver(&store, "alice@example.com", "slow@example.org", "hi", &[]).await;

    let mut holder = store.client().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .unwrap();
    let resp = api
        .request(Method::GET, &format!("{AGENT_PATH}/messages/{id}"), &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[reqwest::header::RETRY_AFTER], "5");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "service_unavailable");
    tx.rollback().await.unwrap();

    let (s, m) = api
        .call(
            Method::GET,
            format!("{AGENT_PATH}/messages/{id}"),
            &alice,
            None,
        )
        .await;
    assert_eq!((s, m["status"].as_str()), (StatusCode::OK, Some("read")));
    api.stop().await;
}
