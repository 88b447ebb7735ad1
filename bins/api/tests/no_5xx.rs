//! No input is a server error: a property test over every query parameter
//! and cursor of the list routes (messages, conversations, agents,
//! domains, events, a webhook's deliveries), driving the real router in-process (`tower::ServiceExt::
//! oneshot`) against a real database holding a real mailbox. Whatever the
//! query — unknown or repeated keys, broken percent-encoding, control
//! characters, huge numbers, timestamps out of range once in UTC, forged or
//! mutated cursors — the answer is a success or a 4xx with the contract's
//! error body, never a 5xx.

mod common;

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Request, header},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use e2a_api::{AppState, Config, dns::NoResolver};
use e2a_store::{Store, address::EmailAddress, domains, users};
use e2a_testkit::TestDb;
use http_body_util::BodyExt;
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, TestCaseError, TestRunner},
};
use serde_json::{Value, json};
use tower::ServiceExt;

const AGENT: &str = "demo@agents.localhost";

/// The list routes and the query keys each one reads (plus keys none reads).
fn keys_of(route: &Route) -> &'static [&'static str] {
    match route {
        Route::Messages(_) => &[
            "direction",
            "status",
            "sort",
            "from",
            "subject_contains",
            "conversation_id",
            "labels",
            "labels[]",
            "since",
            "until",
            "cursor",
            "limit",
        ],
        Route::Conversations(_) => &["since", "until", "limit", "cursor"],
        Route::Agents | Route::Domains => &["limit", "cursor", "since"],
        Route::Events => &[
            "type",
            "agent_id",
            "conversation_id",
            "message_id",
            "since",
            "until",
            "cursor",
            "limit",
        ],
        Route::Deliveries(_) => &["status", "limit", "cursor"],
    }
}

#[derive(Debug, Clone)]
enum Route {
    /// `/v1/agents/{address}/messages`, the address as sent (encoded).
    Messages(String),
    /// `/v1/agents/{address}/conversations`.
    Conversations(String),
    Agents,
    Domains,
    /// `/v1/events`.
    Events,
    /// `/v1/webhooks/{id}/deliveries`, the id as sent.
    Deliveries(String),
}

impl Route {
    fn path(&self) -> String {
        match self {
            Route::Messages(a) => format!("/v1/agents/{a}/messages"),
            Route::Conversations(a) => format!("/v1/agents/{a}/conversations"),
            Route::Agents => "/v1/agents".into(),
            Route::Domains => "/v1/domains".into(),
            Route::Events => "/v1/events".into(),
            Route::Deliveries(id) => format!("/v1/webhooks/{id}/deliveries"),
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An RFC 3339 offset, `Z` or `±hh:mm` up to a day.
fn offset(sign: Option<bool>) -> impl Strategy<Value = String> {
    let sign = match sign {
        Some(neg) => Just(neg).boxed(),
        None => any::<bool>().boxed(),
    };
    (sign, 0u32..=23, 0u32..=59).prop_map(|(neg, h, m)| {
        if h == 0 && m == 0 && !neg {
            "Z".to_owned()
        } else {
            format!("{}{h:02}:{m:02}", if neg { '-' } else { '+' })
        }
    })
}

/// RFC 3339-shaped timestamps: valid ones at the edges of the years
/// 0000–9999, where an offset can carry the UTC instant outside them (the
/// historical 500), ordinary ones, and ones with impossible components.
fn timestamp() -> impl Strategy<Value = String> {
    let clock = (
        0u32..=23,
        0u32..=59,
        0u32..=59,
        prop::option::of(0u32..=999_999_999),
    )
        .prop_map(|(h, m, s, frac)| {
            let frac = frac.map(|f| format!(".{f:09}")).unwrap_or_default();
            format!("{h:02}:{m:02}:{s:02}{frac}")
        });
    let last_day =
        (clock.clone(), offset(Some(true))).prop_map(|(t, off)| format!("9999-12-31T{t}{off}"));
    let first_day =
        (clock.clone(), offset(Some(false))).prop_map(|(t, off)| format!("0000-01-01T{t}{off}"));
    let ordinary = (0u32..=9999, 1u32..=12, 1u32..=28, clock, offset(None))
        .prop_map(|(y, mo, d, t, off)| format!("{y:04}-{mo:02}-{d:02}T{t}{off}"));
    let impossible = (
        0u32..=10_000,
        0u32..=13,
        0u32..=32,
        0u32..=25,
        0u32..=61,
        0u32..=61,
    )
        .prop_map(|(y, mo, d, h, mi, s)| format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"));
    prop_oneof![
        3 => last_day,
        2 => first_day,
        3 => ordinary,
        1 => impossible,
        1 => prop::sample::select(vec![
            "2026-02-30T00:00:00Z",
            "2026-05-01 12:00:00Z",
            "2026-05-01T12:00:00",
            "2026-05-01T12:00:00+24:00",
        ])
        .prop_map(str::to_owned),
    ]
}

/// Values for any parameter.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "inbound", "outbound", "all", "unread", "read", "asc", "desc", "", "ALL", "Inbound",
            "e2a:spam", "0", "-1", "100", "101", "200", "201",
        ])
        .prop_map(str::to_owned),
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{19,40}",
        timestamp(),
        "[a-z0-9:_-]{0,70}(,[a-zA-Z0-9:_ -]{0,10}){0,4}",
        "cnv_[0-9a-f]{0,40}",
        any::<String>(),
        "\\PC{0,40}",
        "[%_\\\\a]{0,10}",
        "x{190,210}",
    ]
}

/// Values shaped for `key` most of the time, anything otherwise.
fn value_for(key: &str, cursors: &[String]) -> BoxedStrategy<String> {
    let shaped = match key {
        "since" | "until" => timestamp().boxed(),
        "limit" => prop_oneof![
            (-2i64..=205).prop_map(|n| n.to_string()),
            Just("1e2".to_owned()),
            Just(" 5".to_owned()),
        ]
        .boxed(),
        "direction" => prop::sample::select(vec!["inbound", "outbound", "all", "ALL"])
            .prop_map(str::to_owned)
            .boxed(),
        "status" => prop::sample::select(vec![
            "unread",
            "read",
            "all",
            "pending",
            "delivered",
            "failed",
        ])
        .prop_map(str::to_owned)
        .boxed(),
        "sort" => prop::sample::select(vec!["asc", "desc", "random"])
            .prop_map(str::to_owned)
            .boxed(),
        "type" => prop::sample::select(vec!["email.received", "email.sent", "email.bounced"])
            .prop_map(str::to_owned)
            .boxed(),
        "agent_id" => prop_oneof![Just(AGENT.to_owned()), address()].boxed(),
        "message_id" => "msg_[0-9a-f]{32}|msg_.{0,40}".boxed(),
        "labels" | "labels[]" => "[a-z0-9:_-]{0,66}(,[a-z0-9:_-]{0,8}){0,3}".boxed(),
        "cursor" if !cursors.is_empty() => prop_oneof![
            2 => prop::sample::select(cursors.to_vec()),
            3 => forged_cursor(),
        ]
        .boxed(),
        "cursor" => forged_cursor().boxed(),
        _ => value().boxed(),
    };
    prop_oneof![3 => shaped, 1 => value()].boxed()
}

/// A cursor: random bytes, a forged object with arbitrary values, or
/// garbage text.
fn forged_cursor() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        value().prop_map(Value::String),
        timestamp().prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        Just(Value::Null),
        prop::collection::vec(value(), 0..3).prop_map(|v| json!(v)),
    ];
    let keys = prop::sample::subsequence(
        vec![
            "c", "i", "s", "d", "a", "so", "f", "sc", "cv", "sn", "un", "lb", "x",
        ],
        0..=13,
    );
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        (keys, prop::collection::vec(field, 13)).prop_map(|(keys, fields)| {
            let object: serde_json::Map<String, Value> = keys
                .into_iter()
                .zip(fields)
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&object).unwrap())
        }),
        value(),
    ]
}

/// One request: a route and its query pairs, some raw suffix that may break
/// the percent-encoding.
#[derive(Debug, Clone)]
struct Input {
    route: Route,
    pairs: Vec<(String, String)>,
    raw_suffix: String,
}

impl Input {
    fn uri(&self) -> String {
        let query: Vec<String> = self
            .pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        format!(
            "{}?{}{}",
            self.route.path(),
            query.join("&"),
            self.raw_suffix
        )
    }
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(AGENT.to_owned()),
        1 => Just("Demo@Agents.LocalHost".to_owned()),
        1 => Just("nobody@agents.localhost".to_owned()),
        1 => "\\PC{0,30}".prop_map(|s| encode(&s)),
        1 => Just("%ff".to_owned()),
    ]
}

fn input(cursors: Vec<String>, webhook: String) -> impl Strategy<Value = Input> {
    let webhook = prop_oneof![
        4 => Just(webhook),
        1 => Just("wh_00000000000000000000000000000000".to_owned()),
        1 => "\\PC{0,30}".prop_map(|s| encode(&s)),
    ];
    let route = prop_oneof![
        4 => address().prop_map(Route::Messages),
        2 => address().prop_map(Route::Conversations),
        1 => Just(Route::Agents),
        1 => Just(Route::Domains),
        3 => Just(Route::Events),
        2 => webhook.prop_map(Route::Deliveries),
    ];
    let raw_suffix = prop::sample::select(vec!["", "", "", "&%zz", "&a=%", "&%ff=1", "&&=&"])
        .prop_map(str::to_owned);
    (route, raw_suffix).prop_flat_map(move |(route, raw_suffix)| {
        let keys: Vec<&'static str> = keys_of(&route).to_vec();
        let key = prop_oneof![
            8 => prop::sample::select(keys),
            1 => Just("unknown"),
            1 => Just(""),
        ];
        let cursors = cursors.clone();
        let pair = key.prop_flat_map(move |k| (Just(k.to_owned()), value_for(k, &cursors)));
        (
            Just(route),
            prop::collection::vec(pair, 0..5),
            Just(raw_suffix),
        )
            .prop_map(|(route, pairs, raw_suffix)| Input {
                route,
                pairs,
                raw_suffix,
            })
    })
}

/// Cursors that pass the filter check but point anywhere in time: the
/// default list's real cursor with its position replaced.
fn mutated_position_cursor(real: &Value) -> impl Strategy<Value = Input> {
    let real = real.clone();
    (timestamp(), "msg_[0-9a-f]{32}|.{0,40}").prop_map(move |(c, i)| {
        let mut cursor = real.clone();
        cursor["c"] = json!(c);
        cursor["i"] = json!(i);
        Input {
            route: Route::Messages(AGENT.into()),
            pairs: vec![(
                "cursor".into(),
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&cursor).unwrap()),
            )],
            raw_suffix: String::new(),
        }
    })
}

/// Sends `uri` through the router; returns the status and the body.
async fn send(app: &Router, key: &str, uri: &str) -> Option<(u16, Vec<u8>)> {
    let request = Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::empty())
        .ok()?; // not a URI a client could send
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Some((status, body.to_vec()))
}

fn check(input: &Input, status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(body);
    prop_assert!(status < 500, "{} -> {status}: {text}", input.uri());
    if status >= 400 {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| TestCaseError::fail(format!("{} -> {status}: {e}", input.uri())))?;
        prop_assert!(v["error"]["code"].is_string(), "{}: {v}", input.uri());
    }
    Ok(())
}

#[test]
fn no_list_query_or_cursor_is_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new());
    let (app, key, real_cursors, webhook) = rt.block_on(setup(&db));
    let default_cursor: Value = real_cursors
        .iter()
        .find_map(|(q, c)| {
            q.is_empty()
                .then(|| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).unwrap()).unwrap())
        })
        .unwrap();
    let cursors: Vec<String> = real_cursors.into_iter().map(|(_, c)| c).collect();

    // The regressions first, by name.
    for uri in [
        format!("/v1/agents/{AGENT}/messages?until=9999-12-31T23:59:59-01:00"),
        format!("/v1/agents/{AGENT}/messages?since=9999-12-31T23:59:59-01:00"),
        format!("/v1/agents/{AGENT}/conversations?until=9999-12-31T23:59:59-01:00"),
        format!(
            "/v1/agents/{AGENT}/conversations?since=9999-12-31T23:59:59-23:59&until=9999-12-31T23:59:59.5-23:59"
        ),
    ] {
        let (status, body) = rt.block_on(send(&app, &key, &uri)).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_filter")),
            "{uri}"
        );
    }

    let mut runner = TestRunner::new(RunnerConfig {
        cases: 384,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = prop_oneof![
        4 => input(cursors, webhook),
        1 => mutated_position_cursor(&default_cursor),
    ];
    let result = runner.run(&strategy, |input| {
        let uri = input.uri();
        match rt.block_on(send(&app, &key, &uri)) {
            Some((status, body)) => check(&input, status, &body),
            None => Ok(()),
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    drop(app);
    rt.block_on(async move { drop(db) });
}

/// A migrated database with the shared domain, a user, their key, the
/// agent `demo@agents.localhost`, 150 messages of every kind, 150 events
/// and a webhook with 150 deliveries; the router on it, real cursors (with
/// the query that produced each) and the webhook's id.
async fn setup(db: &TestDb) -> (Router, String, Vec<(String, String)>, String) {
    let mut config = Config::for_database(db.url());
    config.shared_domain = "agents.localhost".into();
    // Every generated request must reach its route, not the poll limit.
    config.rates.poll_per_minute = u32::MAX;
    let store = Store::new(&config.common.db.store_config().unwrap()).unwrap();
    let c = store.client().await.unwrap();
    domains::ensure_shared(&c, "agents.localhost")
        .await
        .unwrap();
    let key = common::key_for(db.url(), "alice@example.com").await;
    let user = users::get_by_email(&c, &EmailAddress::parse("alice@example.com").unwrap())
        .await
        .unwrap()
        .id;
    let state = AppState::new(store.clone(), &config, Arc::new(NoResolver));
    let app = e2a_api::app(state, &config);
    let created = send(&app, &key, "/v1/agents").await.unwrap();
    assert_eq!(created.0, 200);
    let request = Request::post("/v1/agents")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"slug": "demo"}"#))
        .unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), 201);
    c.execute(
        "INSERT INTO messages (id, user_id, agent_id, direction, status, sender, recipient, subject, \
           conversation_id, inbox_status, labels, body_sha256, created_at) \
         SELECT 'msg_' || lpad(to_hex(g), 32, '0'), $1, $2, \
           CASE WHEN g % 4 = 0 THEN 'outbound' ELSE 'inbound' END, \
           CASE WHEN g % 4 = 0 THEN 'queued' ELSE 'sent' END, \
           CASE WHEN g % 4 = 0 THEN '' ELSE 'bob' || (g % 7) || '@example.org' END, $2, \
           '100% subject_' || g, 'cnv_' || (g % 9), \
           CASE WHEN g % 4 = 0 THEN NULL WHEN g % 3 = 0 THEN 'read' ELSE 'unread' END, \
           CASE WHEN g % 5 = 0 THEN ARRAY['x', 'e2a:spam'] ELSE '{}' END, \
           lpad(to_hex(g), 64, '0'), now() - make_interval(secs => g % 50) \
         FROM generate_series(1, 150) AS g",
        &[&user, &AGENT],
    )
    .await
    .unwrap();
    let mut cursors = Vec::new();
    for query in [
        "",
        "limit=1",
        "direction=all&limit=2&sort=asc",
        "direction=outbound&status=all&limit=1",
        "labels=x&from=bob&limit=1",
        "subject_contains=%25&since=2000-01-01T00:00:00Z&limit=3",
    ] {
        let (status, body) = send(&app, &key, &format!("/v1/agents/{AGENT}/messages?{query}"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let page: Value = serde_json::from_slice(&body).unwrap();
        let cursor = page["next_cursor"].as_str().unwrap().to_owned();
        cursors.push((query.to_owned(), cursor));
    }

    c.execute(
        "INSERT INTO webhook_events (id, user_id, type, envelope, agent_id, conversation_id, \
           message_id, created_at) \
         SELECT 'evt_' || lpad(to_hex(g), 32, '0'), $1, \
           CASE WHEN g % 2 = 0 THEN 'email.received' ELSE 'email.sent' END, '{\"data\": {}}', \
           $2, 'cnv_' || (g % 9), 'msg_' || lpad(to_hex(g), 32, '0'), \
           now() - make_interval(secs => g % 50) \
         FROM generate_series(1, 150) AS g",
        &[&user, &AGENT],
    )
    .await
    .unwrap();
    let mut cm = store.client().await.unwrap();
    let webhook = e2a_store::webhooks::create(
        &mut cm,
        &user,
        &e2a_store::webhooks::NewWebhook {
            url: "https://hooks.example.com/h".into(),
            events: vec!["email.received".into()],
            ..Default::default()
        },
        50,
    )
    .await
    .unwrap()
    .webhook
    .id
    .to_string();
    c.execute(
        "INSERT INTO webhook_subscriber_deliveries (id, user_id, webhook_id, event_type, \
           event_payload, status, created_at) \
         SELECT 'whd_' || lpad(to_hex(g), 32, '0'), $1, $2, 'email.received', '{}', \
           (ARRAY['pending', 'delivered', 'failed'])[1 + g % 3], now() - make_interval(secs => g % 50) \
         FROM generate_series(1, 150) AS g",
        &[&user, &webhook],
    )
    .await
    .unwrap();
    for path in [
        "/v1/events?limit=1".to_owned(),
        "/v1/events?type=email.sent&limit=2".to_owned(),
        format!("/v1/webhooks/{webhook}/deliveries?limit=1"),
        format!("/v1/webhooks/{webhook}/deliveries?status=failed&limit=3"),
    ] {
        let (status, body) = send(&app, &key, &path).await.unwrap();
        assert_eq!(status, 200, "{path}");
        let page: Value = serde_json::from_slice(&body).unwrap();
        let cursor = page["next_cursor"].as_str().unwrap().to_owned();
        cursors.push((path, cursor));
    }
    (app, key, cursors, webhook)
}
