//! Bounded queries on a real mailbox of 100,000 messages: a text search or
//! a label filter examines at most `SCAN_BUDGET` rows per call and hands
//! back where it stopped; walking the cursor finds every match exactly
//! once; the conversations list reads a page of summaries that agree with
//! a full regrouping of the mailbox; the plans walk one agent-scoped index
//! with no sort or aggregate over the mailbox. One fixture for all of it:
//! inserting the mailbox is the slow part.

use std::time::{Duration, Instant};

use e2a_store::{
    Store, conversations,
    ids::MessageId,
    messages::{self, Direction, InboxStatus, ListFilter, Page, Position, SCAN_BUDGET, Sort},
};
use serde_json::Value;
use time::OffsetDateTime;

use super::messages::{Mailbox, mailbox};

/// Messages in the big mailbox.
const N: i64 = 100_000;
/// Rows whose subject contains "Needle" (g = 1 is the newest row).
const NEEDLES: [i64; 3] = [50, 60_000, 99_999];
/// Rows labelled `rare`.
const RARE: [i64; 2] = [10, 70_000];
/// Slowest acceptable call. Generous for a loaded 2-core CI machine; a call
/// examines at most `SCAN_BUDGET` rows and takes milliseconds.
const FAST: Duration = Duration::from_secs(2);

/// The id of row `g` (as the bulk insert mints it).
pub fn id_of(g: i64) -> MessageId {
    let hex = format!("{:032x}", g);
    MessageId::from_hex(&hex).unwrap()
}

/// Fills `owner`'s mailbox with `N` inbound messages in one set-based
/// statement, then `ANALYZE`s as autovacuum would. Row `g` (1..=N):
/// created `g` seconds before `t0` (so g = 1 is the newest), sender
/// `s{g % 100}@example.org`, subject `subject {g}` (`Needle {g}` for
/// [`NEEDLES`]), labels `common` on every tenth row and `rare` on
/// [`RARE`], conversation `cnv_{g % 5000}` (5,000 threads of 20), unread
/// when `g % 3 = 0`, else read.
pub async fn big_mailbox(store: &Store, owner: &Mailbox, t0: OffsetDateTime) {
    let c = store.client().await.unwrap();
    let started = Instant::now();
    // The fixture's own statement may take longer than the pool's
    // statement timeout on a busy machine; the queries under test may not.
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, sender, recipient, subject, \
           conversation_id, inbox_status, labels, body_sha256, created_at, expires_at) \
         SELECT 'msg_' || lpad(to_hex(g), 32, '0'), $1, $2, 'inbound', \
           's' || (g % 100) || '@example.org', $2, \
           CASE WHEN g = ANY($5) THEN 'Needle ' ELSE 'subject ' END || g, \
           'cnv_' || (g % 5000), \
           CASE WHEN g % 3 = 0 THEN 'unread' ELSE 'read' END, \
           CASE WHEN g = ANY($6) THEN ARRAY['common', 'rare'] \
                WHEN g % 10 = 0 THEN ARRAY['common'] ELSE '{}' END, \
           lpad(to_hex(g), 64, '0'), $3::timestamptz - make_interval(secs => g), now() + interval '10 days' \
         FROM generate_series(1, $4::int8) AS g",
        &[
            &owner.user,
            &owner.agent,
            &t0,
            &N,
            &NEEDLES.to_vec(),
            &RARE.to_vec(),
        ],
    )
    .await
    .unwrap();
    eprintln!("inserted {N} messages in {:?}", started.elapsed());
    c.batch_execute("ANALYZE messages, conversation_summaries")
        .await
        .unwrap();
    eprintln!("analyzed after {:?}", started.elapsed());
}

fn everything() -> ListFilter {
    ListFilter {
        direction: None,
        inbox_status: None,
        ..ListFilter::default()
    }
}

/// Walks `filter` to the end with pages of `limit`; returns every item id,
/// the pages and the slowest call.
async fn walk(
    store: &Store,
    owner: &Mailbox,
    filter: &ListFilter,
    limit: i64,
) -> (Vec<MessageId>, Vec<Page>, Duration) {
    let c = store.client().await.unwrap();
    let (mut found, mut pages, mut slowest) = (Vec::new(), Vec::new(), Duration::ZERO);
    let mut after: Option<Position> = None;
    loop {
        let started = Instant::now();
        let page = messages::list(&c, &owner.user, &owner.agent, filter, after.as_ref(), limit)
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        assert!(page.items.len() as i64 <= limit);
        found.extend(page.items.iter().map(|m| m.id.clone()));
        after = page.next.clone();
        pages.push(page);
        if after.is_none() {
            return (found, pages, slowest);
        }
        assert!(pages.len() < 1000, "the walk does not end");
    }
}

/// Every plan node, depth first.
fn nodes(plan: &Value) -> Vec<&Value> {
    let mut out = vec![plan];
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            out.extend(nodes(child));
        }
    }
    out
}

/// Asserts the executed plan reads `messages` only through one of the
/// agent's indexes, examines at most `budget` rows there, and neither sorts
/// nor aggregates; returns the index it used.
pub fn assert_bounded_scan(explained: &Value, budget: i64) -> String {
    let root = &explained[0]["Plan"];
    let all = nodes(root);
    for node in &all {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        assert!(
            !matches!(kind, "Sort" | "Aggregate" | "Hash" | "Materialize"),
            "a {kind} node: {root:#}"
        );
        // An index without `id` (the conversation index) leaves ties in
        // created_at to sort: fine, as long as only ties are sorted.
        if kind == "Incremental Sort" {
            assert_eq!(
                node["Presorted Key"],
                serde_json::json!(["m.created_at"]),
                "{root:#}"
            );
        }
    }
    let scans: Vec<_> = all
        .iter()
        .filter(|n| n["Relation Name"] == "messages")
        .collect();
    assert_eq!(scans.len(), 1, "one scan of messages: {root:#}");
    let scan = scans[0];
    assert_eq!(scan["Node Type"], "Index Scan", "{root:#}");
    let index = scan["Index Name"].as_str().unwrap().to_owned();
    assert!(index.starts_with("messages_agent_"), "{index}: {root:#}");
    let rows = scan["Actual Rows"].as_f64().unwrap() * scan["Actual Loops"].as_f64().unwrap();
    let removed = scan["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
    assert!(
        rows + removed <= budget as f64 + 1.0,
        "{rows} rows (+{removed} filtered) examined: {root:#}"
    );
    index
}

#[tokio::test]
async fn a_mailbox_of_100k_messages_is_searched_and_threaded_in_bounded_calls() {
    let (_db, store) = super::store().await;
    let alice = mailbox(&store, "alice").await;
    let bob = mailbox(&store, "bob").await;
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    big_mailbox(&store, &alice, t0).await;
    let c = store.client().await.unwrap();

    // A rare subject: the first call stops after SCAN_BUDGET rows with the
    // one match among them and a cursor at the last row it examined.
    let needle = ListFilter {
        subject_contains: Some("needle".into()),
        ..everything()
    };
    let first = messages::list(&c, &alice.user, &alice.agent, &needle, None, 50)
        .await
        .unwrap();
    assert_eq!(
        first.items.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![id_of(50)]
    );
    assert_eq!(
        first.next.as_ref().map(|p| p.id.clone()),
        Some(id_of(SCAN_BUDGET)),
        "resumes after the last row examined"
    );
    // Walking the cursor finds each match once, in order, in bounded calls.
    let (found, pages, slowest) = walk(&store, &alice, &needle, 50).await;
    assert_eq!(found, NEEDLES.map(id_of).to_vec());
    // One call per budget; N is a multiple of it, so the last full scan
    // cannot know the mailbox ends there and one empty page closes the walk.
    assert_eq!(pages.len() as i64, N / SCAN_BUDGET + 1);
    assert!(pages.iter().filter(|p| p.items.is_empty()).count() > 90);
    assert!(slowest < FAST, "slowest call {slowest:?}");
    // Ascending starts at the oldest row: the same budget, the other end.
    let asc = messages::list(
        &c,
        &alice.user,
        &alice.agent,
        &ListFilter {
            sort: Sort::Asc,
            ..needle.clone()
        },
        None,
        50,
    )
    .await
    .unwrap();
    assert_eq!(
        asc.items.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![id_of(99_999)]
    );
    assert_eq!(asc.next.map(|p| p.id), Some(id_of(N - SCAN_BUDGET + 1)));

    // A rare label, with sender text and the read status on top.
    let rare = ListFilter {
        labels: vec!["rare".into()],
        ..everything()
    };
    let (found, _, slowest) = walk(&store, &alice, &rare, 100).await;
    assert_eq!(found, RARE.map(id_of).to_vec());
    assert!(slowest < FAST, "slowest call {slowest:?}");
    let narrow = ListFilter {
        labels: vec!["rare".into()],
        from: Some("S10@EXAMPLE".into()),
        direction: Some(Direction::Inbound),
        inbox_status: Some(InboxStatus::Read),
        ..everything()
    };
    let page = messages::list(&c, &alice.user, &alice.agent, &narrow, None, 100)
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![id_of(10)],
        "s10@, read (10 % 3 != 0), rare"
    );

    // A common label fills pages at once: the cursor is the last item.
    let common = ListFilter {
        labels: vec!["common".into()],
        ..everything()
    };
    let page = messages::list(&c, &alice.user, &alice.agent, &common, None, 50)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 50);
    assert_eq!(page.items[49].id, id_of(500));
    assert_eq!(page.next.map(|p| p.id), Some(id_of(500)));

    // The plans: one agent-scoped index, at most the budget examined, no
    // sort or aggregate over the mailbox — for a search in the middle of a
    // walk, a label filter, the default inbox and a conversation.
    let middle = Position {
        created_at: t0 - time::Duration::seconds(50_000),
        id: id_of(50_000),
    };
    for (what, filter, after) in [
        ("subject search", needle.clone(), Some(&middle)),
        ("label filter", rare.clone(), None),
        (
            "sender search, asc",
            ListFilter {
                from: Some("nobody".into()),
                sort: Sort::Asc,
                ..everything()
            },
            Some(&middle),
        ),
        (
            "unread inbox",
            ListFilter {
                direction: Some(Direction::Inbound),
                inbox_status: Some(InboxStatus::Unread),
                ..ListFilter::default()
            },
            None,
        ),
        (
            "conversation, unread",
            ListFilter {
                conversation_id: Some("cnv_42".into()),
                direction: Some(Direction::Inbound),
                inbox_status: Some(InboxStatus::Unread),
                ..ListFilter::default()
            },
            None,
        ),
    ] {
        let plan = messages::explain_list(&c, &alice.user, &alice.agent, &filter, after, 50)
            .await
            .unwrap();
        let index = assert_bounded_scan(&plan, SCAN_BUDGET);
        eprintln!("{what}: {index}");
    }

    check_conversations(&store, &alice, t0).await;

    // Another agent's mailbox is not scanned at all.
    let other = messages::list(&c, &bob.user, &bob.agent, &needle, None, 50)
        .await
        .unwrap();
    assert!(other.items.is_empty() && other.next.is_none());
    let foreign = messages::list(&c, &bob.user, &alice.agent, &everything(), None, 50)
        .await
        .unwrap();
    assert!(foreign.items.is_empty() && foreign.next.is_none());
}

/// The summaries of `ids` computed the old way: grouping the members.
async fn regrouped(
    store: &Store,
    owner: &Mailbox,
    ids: &[String],
) -> Vec<(String, i64, i64, bool, String, String)> {
    let c = store.client().await.unwrap();
    c.query(
        "SELECT conversation_id, count(*), count(*) FILTER (WHERE inbox_status = 'unread'), \
                bool_or(inbox_status = 'unread'), \
                (array_agg(subject ORDER BY created_at DESC, id DESC))[1], \
                (array_agg(sender ORDER BY created_at DESC, id DESC))[1] \
         FROM messages WHERE agent_id = $1 AND conversation_id = ANY($2) AND expires_at > now() \
         GROUP BY conversation_id ORDER BY max(created_at) DESC, conversation_id DESC",
        &[&owner.agent, &ids],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect()
}

/// The conversations of the big mailbox: `cnv_k` holds rows k, k + 5000, …
/// so its newest message is `t0 - k s` (`cnv_0`: `t0 - 5000 s`).
async fn check_conversations(store: &Store, alice: &Mailbox, t0: OffsetDateTime) {
    let c = store.client().await.unwrap();
    let secs = time::Duration::seconds;
    let started = Instant::now();
    let page = conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap();
    assert!(started.elapsed() < FAST, "{:?}", started.elapsed());
    let ids: Vec<String> = page.iter().map(|s| s.conversation_id.clone()).collect();
    assert_eq!(
        ids,
        (1..=100).map(|k| format!("cnv_{k}")).collect::<Vec<_>>()
    );
    let first = &page[0];
    assert_eq!(
        (first.first_message_at, first.last_message_at),
        (t0 - secs(95_001), t0 - secs(1))
    );
    assert_eq!(
        (
            first.message_count,
            first.inbound_count,
            first.outbound_count
        ),
        (20, 20, 0)
    );
    assert_eq!(page[49].latest_subject, "Needle 50");
    let expected = regrouped(store, alice, &ids).await;
    let got: Vec<_> = page
        .iter()
        .map(|s| {
            let unread = expected
                .iter()
                .find(|e| e.0 == s.conversation_id)
                .map_or(-1, |e| e.2);
            (
                s.conversation_id.clone(),
                s.message_count,
                unread,
                s.has_unread,
                s.latest_subject.clone(),
                s.latest_sender.clone(),
            )
        })
        .collect();
    assert_eq!(got, expected, "the summaries agree with a full regrouping");

    // A window deep in the mailbox is a page as well.
    let until = conversations::list(
        &c,
        &alice.user,
        &alice.agent,
        None,
        Some(t0 - secs(4000)),
        3,
    )
    .await
    .unwrap();
    assert_eq!(
        until
            .iter()
            .map(|s| s.conversation_id.as_str())
            .collect::<Vec<_>>(),
        vec!["cnv_4001", "cnv_4002", "cnv_4003"]
    );

    // Read-on-get moves the unread count; an expired member disappears at
    // once (recomputed from the visible ones) and for good once swept.
    let unread_before = page
        .iter()
        .find(|s| s.conversation_id == "cnv_3")
        .unwrap()
        .has_unread;
    assert!(unread_before, "row 3 is unread");
    c.execute(
        "UPDATE messages SET inbox_status = 'read' WHERE agent_id = $1 AND conversation_id = 'cnv_3'",
        &[&alice.agent],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = $1",
        &[&id_of(95_001)],
    )
    .await
    .unwrap();
    let check = |page: Vec<conversations::ConversationSummary>| {
        assert!(
            !page
                .iter()
                .find(|s| s.conversation_id == "cnv_3")
                .unwrap()
                .has_unread
        );
        let one = page
            .iter()
            .find(|s| s.conversation_id == "cnv_1")
            .unwrap()
            .clone();
        assert_eq!(one.message_count, 19);
        assert_eq!(one.first_message_at, t0 - secs(90_001));
    };
    check(
        conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
            .await
            .unwrap(),
    );
    let plan = conversations::explain_list(&c, &alice.user, &alice.agent, None, None, 100)
        .await
        .unwrap();
    assert_page_of_summaries(&plan, 100.0, 20.0);
    assert_eq!(messages::delete_expired(&c, 100).await.unwrap(), 1);
    check(
        conversations::list(&c, &alice.user, &alice.agent, None, None, 100)
            .await
            .unwrap(),
    );

    // The plans: a page of the summary index; messages read only for the
    // one stale summary (before the sweep) or not at all.
    for (since, until) in [(None, None), (Some(t0 - secs(3000)), Some(t0 - secs(2000)))] {
        let plan = conversations::explain_list(&c, &alice.user, &alice.agent, since, until, 100)
            .await
            .unwrap();
        assert_page_of_summaries(&plan, 100.0, 0.0);
    }
}

/// Asserts the executed plan reads at most `limit` summaries through the
/// agent's summary index, without a sort, and at most `members` messages.
fn assert_page_of_summaries(explained: &Value, limit: f64, members: f64) {
    let root = &explained[0]["Plan"];
    let all = nodes(root);
    let mut from_messages = 0.0;
    for node in &all {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        assert!(
            !matches!(kind, "Sort" | "Incremental Sort" | "Seq Scan" | "Hash"),
            "{kind}: {root:#}"
        );
        let read = node["Actual Rows"].as_f64().unwrap_or(0.0)
            * node["Actual Loops"].as_f64().unwrap_or(0.0)
            + node["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
        match node["Relation Name"].as_str() {
            Some("conversation_summaries") => {
                assert_eq!(
                    node["Index Name"], "conversation_summaries_agent_last_idx",
                    "{root:#}"
                );
                assert!(read <= limit, "{read} summaries read: {root:#}");
            }
            Some("messages") => from_messages += read,
            Some(other) => panic!("reads {other}: {root:#}"),
            None => {}
        }
    }
    assert!(
        from_messages <= members,
        "{from_messages} messages read: {root:#}"
    );
}
