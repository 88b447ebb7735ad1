//! An agent's messages: `GET /v1/agents/{address}/messages` (filters and
//! cursor pagination), `GET …/messages/{id}` (read-on-get) and
//! `PATCH …/messages/{id}` (labels; also served at the legacy
//! `/api/v1/agents/{address}/messages/{id}`).
//!
//! The default list is inbound + unread, and every inbound row has an inbox
//! status, so cloud agents' mail shows up too (the original's flaw 14).
//! A cursor is base64url (no padding) of a JSON object holding the last
//! row's `created_at` and id plus every filter (spec §4.7); a cursor used
//! with different filters is 400 `invalid_cursor`. Message bodies and
//! filter values are never logged.

use axum::{
    Json,
    extract::{RawQuery, State},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use e2a_store::{
    StoreError,
    address::EmailAddress,
    ids::MessageId,
    messages::{self, Direction, InboxStatus, ListFilter, Message, MessageSummary, Position, Sort},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{
        ApiJson, ApiPath, invalid_filter, parse_rfc3339, query_pairs, rfc3339_seconds, time_window,
    },
    routes::agents::owned_agent,
};

/// Longest `from`, `subject_contains` and `conversation_id` filter.
pub const MAX_FILTER_LEN: usize = 200;
/// Default page size.
pub const DEFAULT_LIMIT: i64 = 50;

/// The contract's `MessageSummaryView`.
#[derive(Debug, Serialize)]
pub struct MessageSummaryView {
    message_id: String,
    direction: &'static str,
    from: String,
    to: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cc: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<Vec<String>>,
    recipient: String,
    subject: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    conversation_id: String,
    /// The inbox status (`unread`/`read`), empty for outbound mail.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hitl_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size_bytes: Option<i64>,
    labels: Vec<String>,
    created_at: String,
}

impl From<MessageSummary> for MessageSummaryView {
    fn from(m: MessageSummary) -> Self {
        let outbound = m.direction == Direction::Outbound;
        Self {
            message_id: m.id.to_string(),
            direction: m.direction.as_str(),
            from: m.from,
            to: m.to,
            cc: m.cc,
            reply_to: m.reply_to,
            recipient: m.recipient,
            subject: m.subject,
            conversation_id: m.conversation_id,
            status: m.inbox_status.map_or("", InboxStatus::as_str),
            hitl_status: outbound.then_some(m.status),
            size_bytes: (m.size_bytes > 0).then_some(m.size_bytes),
            labels: m.labels,
            created_at: rfc3339_seconds(m.created_at),
        }
    }
}

/// The SPF/DKIM/DMARC verdicts recorded at receipt.
#[derive(Debug, Serialize)]
struct AuthView {
    spf: Option<String>,
    dkim: Option<String>,
    dmarc: Option<String>,
}

/// The contract's `MessageView`, plus `auth` (the recorded verdicts).
#[derive(Debug, Serialize)]
pub struct MessageView {
    message_id: String,
    from: String,
    to: Vec<String>,
    cc: Option<Vec<String>>,
    reply_to: Option<Vec<String>>,
    recipient: String,
    subject: String,
    conversation_id: String,
    status: &'static str,
    labels: Vec<String>,
    created_at: String,
    /// Always an object of strings (the contract's type): the signed
    /// `X-E2A-Auth-*` map of inbound mail, `{}` for outbound mail.
    auth_headers: serde_json::Map<String, Value>,
    /// Always a string: the standard base64 of the raw message, `""` when
    /// none is kept (outbound mail).
    raw_message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<AuthView>,
}

/// The stored header map as the contract types it (`{string: string}`): a
/// non-string value is sent as its JSON text, anything but an object as
/// `{}`. The relay only ever stores an object of strings.
fn auth_header_map(stored: Option<Value>) -> serde_json::Map<String, Value> {
    match stored {
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(_) => (k, v),
                other => (k, Value::String(other.to_string())),
            })
            .collect(),
        _ => serde_json::Map::new(),
    }
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        let s = m.summary;
        let auth = (s.direction == Direction::Inbound).then_some(AuthView {
            spf: m.spf_result,
            dkim: m.dkim_result,
            dmarc: m.dmarc_result,
        });
        Self {
            message_id: s.id.to_string(),
            from: s.from,
            to: s.to,
            cc: s.cc,
            reply_to: s.reply_to,
            recipient: s.recipient,
            subject: s.subject,
            conversation_id: s.conversation_id,
            status: s.inbox_status.map_or("", InboxStatus::as_str),
            labels: s.labels,
            created_at: rfc3339_seconds(s.created_at),
            auth_headers: auth_header_map(m.auth_headers),
            raw_message: m
                .raw_message
                .map(|raw| base64::engine::general_purpose::STANDARD.encode(raw))
                .unwrap_or_default(),
            auth,
        }
    }
}

fn invalid_cursor() -> ApiError {
    ApiError::bad_request(
        "invalid_cursor",
        "cursor is malformed or was issued for different filters",
    )
}

/// The list request after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Store filter.
    pub filter: ListFilter,
    /// Start after this row.
    pub after: Option<Position>,
    /// Page size, 1..=100.
    pub limit: i64,
}

/// The cursor's JSON (spec §4.7 key names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cursor {
    /// `created_at` of the last row (RFC 3339, full precision).
    c: String,
    /// id of the last row.
    i: String,
    /// inbox status filter (`unread`/`read`/`all`).
    s: String,
    /// direction filter (`inbound`/`outbound`/`all`).
    d: String,
    /// agent.
    a: String,
    /// sort.
    so: String,
    f: String,
    sc: String,
    cv: String,
    sn: String,
    un: String,
    lb: Vec<String>,
}

/// `t` in UTC with every digit, for the cursor; empty for `None` (every
/// timestamp that reaches here came from the database or `parse_rfc3339`,
/// so the conversion cannot fail).
fn full_precision(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.checked_to_offset(UtcOffset::UTC))
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The cursor fields that describe the filters (everything but `c`, `i`).
fn cursor_for(agent_id: &str, filter: &ListFilter, position: Option<&Position>) -> Cursor {
    Cursor {
        c: full_precision(position.map(|p| p.created_at)),
        i: position.map(|p| p.id.to_string()).unwrap_or_default(),
        s: filter
            .inbox_status
            .map_or("all", InboxStatus::as_str)
            .to_owned(),
        d: filter.direction.map_or("all", Direction::as_str).to_owned(),
        a: agent_id.to_owned(),
        so: filter.sort.as_str().to_owned(),
        f: filter.from.clone().unwrap_or_default(),
        sc: filter.subject_contains.clone().unwrap_or_default(),
        cv: filter.conversation_id.clone().unwrap_or_default(),
        sn: full_precision(filter.since),
        un: full_precision(filter.until),
        lb: filter.labels.clone(),
    }
}

fn encode_cursor(cursor: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(cursor).unwrap_or_default())
}

/// Decodes `raw` and checks it was issued for `agent_id` and `filter`.
fn decode_cursor(raw: &str, agent_id: &str, filter: &ListFilter) -> Result<Position, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(raw.trim_end_matches('='))
        .map_err(|_| invalid_cursor())?;
    let cursor: Cursor = serde_json::from_slice(&bytes).map_err(|_| invalid_cursor())?;
    let position = Position {
        created_at: parse_rfc3339(&cursor.c).ok_or_else(invalid_cursor)?,
        id: MessageId::parse(&cursor.i).ok_or_else(invalid_cursor)?,
    };
    let expected = cursor_for(agent_id, filter, Some(&position));
    if cursor != expected {
        return Err(invalid_cursor());
    }
    Ok(position)
}

/// Query parameters that may appear at most once.
const SINGLE_KEYS: &[&str] = &[
    "direction",
    "status",
    "sort",
    "from",
    "subject_contains",
    "conversation_id",
    "since",
    "until",
    "cursor",
    "limit",
];

/// Parses and validates the list query (spec §5.1) for `agent_id`.
pub fn parse_list_query(query: &str, agent_id: &str) -> Result<ListRequest, ApiError> {
    let pairs = query_pairs(query)
        .ok_or_else(|| invalid_filter("query string is not valid UTF-8 percent-encoding"))?;
    let mut single: std::collections::BTreeMap<&str, String> = Default::default();
    let mut labels = Vec::new();
    for (key, value) in &pairs {
        if matches!(key.as_str(), "labels" | "labels[]") {
            // The contract declares `labels` with `explode: false`, so
            // generated clients send `labels=a,b`; repeated keys work too.
            // A comma is never part of a valid label.
            labels.extend(value.split(',').map(str::to_owned));
            continue;
        }
        let Some(k) = SINGLE_KEYS.iter().copied().find(|k| k == key) else {
            continue; // unknown parameters are ignored
        };
        if single.insert(k, value.clone()).is_some() {
            return Err(invalid_filter(format!("{k} may be given only once")));
        }
    }
    let get = |k: &str| single.get(k).map(String::as_str).filter(|v| !v.is_empty());

    let direction = match get("direction").unwrap_or("inbound") {
        "all" => None,
        d => Some(
            Direction::parse(d)
                .ok_or_else(|| invalid_filter("direction must be inbound, outbound or all"))?,
        ),
    };
    let default_status = if direction == Some(Direction::Inbound) {
        "unread"
    } else {
        "all"
    };
    let inbox_status = match get("status").unwrap_or(default_status) {
        "all" => None,
        s => Some(
            InboxStatus::parse(s)
                .ok_or_else(|| invalid_filter("status must be unread, read or all"))?,
        ),
    };
    if direction == Some(Direction::Outbound) && inbox_status.is_some() {
        return Err(invalid_filter(
            "status applies to inbound mail only; use status=all with direction=outbound",
        ));
    }
    let sort = match get("sort").unwrap_or("desc") {
        "desc" => Sort::Desc,
        "asc" => Sort::Asc,
        _ => return Err(invalid_filter("sort must be asc or desc")),
    };
    let text = |k: &str| -> Result<Option<String>, ApiError> {
        match get(k) {
            Some(v) if v.chars().count() > MAX_FILTER_LEN => Err(invalid_filter(format!(
                "{k} must be at most {MAX_FILTER_LEN} characters"
            ))),
            // NUL cannot reach Postgres text at all, and no stored value
            // holds a control character worth searching for.
            Some(v) if v.chars().any(char::is_control) => Err(invalid_filter(format!(
                "{k} must not contain control characters"
            ))),
            other => Ok(other.map(str::to_owned)),
        }
    };
    let from = text("from")?;
    let subject_contains = text("subject_contains")?;
    let conversation_id = text("conversation_id")?;
    if labels.len() > messages::MAX_LABELS_PER_REQUEST {
        return Err(invalid_filter(format!(
            "at most {} labels may be given",
            messages::MAX_LABELS_PER_REQUEST
        )));
    }
    if let Some(bad) = labels.iter().find(|l| !messages::is_valid_label(l)) {
        return Err(invalid_filter(format!(
            "label {bad:?} is not 1-64 characters of a-z, 0-9, ':', '_' and '-'"
        )));
    }
    labels.sort();
    labels.dedup();
    let (since, until) = time_window(get("since"), get("until"))?;
    let limit = match get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=messages::MAX_PAGE).contains(l))
            .ok_or_else(|| invalid_filter("limit must be an integer from 1 to 100"))?,
    };
    let filter = ListFilter {
        direction,
        inbox_status,
        sort,
        from,
        subject_contains,
        conversation_id,
        labels,
        since,
        until,
    };
    let after = get("cursor")
        .map(|raw| decode_cursor(raw, agent_id, &filter))
        .transpose()?;
    Ok(ListRequest {
        filter,
        after,
        limit,
    })
}

/// `GET /v1/agents/{address}/messages`: 200 `{items, next_cursor}`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(address): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<MessageList>, ApiError> {
    // One statement in the common case: the page query only ever returns
    // the caller's own rows (`user_id` is part of it), so ownership of the
    // agent needs its own lookup only when the page is empty — to answer
    // 404 for an agent that is not the caller's, exactly as for one that
    // does not exist.
    let agent_id = EmailAddress::parse(&address)
        .map_err(|_| ApiError::not_found("agent"))?
        .as_str()
        .to_owned();
    let req = parse_list_query(query.as_deref().unwrap_or(""), &agent_id)?;
    let client = state.store.client().await?;
    let page = messages::list(
        &client,
        &caller.user_id,
        &agent_id,
        &req.filter,
        req.after.as_ref(),
        req.limit,
    )
    .await?;
    if page.items.is_empty() {
        owned_agent(&client, &caller, &address).await?;
    }
    let next_cursor = page
        .next
        .as_ref()
        .map(|p| encode_cursor(&cursor_for(&agent_id, &req.filter, Some(p))));
    let items: Vec<MessageSummaryView> = page
        .items
        .into_iter()
        .map(MessageSummaryView::from)
        .collect();
    Ok(Json(MessageList { items, next_cursor }))
}

/// The contract's `MessageList`, serialized straight from the views (no
/// intermediate JSON tree).
#[derive(Debug, Serialize)]
pub struct MessageList {
    items: Vec<MessageSummaryView>,
    next_cursor: Option<String>,
}

fn message_not_found() -> ApiError {
    ApiError::not_found("message")
}

fn message_store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => message_not_found(),
        other => other.into(),
    }
}

/// `GET /v1/agents/{address}/messages/{id}`: the message with its raw bytes
/// and verdicts; an unread inbound message becomes `read`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
) -> Result<Json<MessageView>, ApiError> {
    let client = state.store.client().await?;
    let agent = owned_agent(&client, &caller, &address).await?;
    let id = MessageId::parse(&id).ok_or_else(message_not_found)?;
    let message = messages::get_marking_read(&client, &caller.user_id, &agent.id, &id)
        .await
        .map_err(message_store_error)?;
    Ok(Json(message.into()))
}

/// `{add_labels?, remove_labels?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLabelsRequest {
    add_labels: Option<Vec<String>>,
    remove_labels: Option<Vec<String>>,
}

/// `PATCH /v1/agents/{address}/messages/{id}`: adds then removes labels
/// (remove wins) atomically; 200 `{message_id, labels}` (sorted, deduped).
pub async fn update_labels(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((address, id)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<UpdateLabelsRequest>,
) -> Result<Json<Value>, ApiError> {
    if req.add_labels.is_none() && req.remove_labels.is_none() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "add_labels or remove_labels is required",
        ));
    }
    let add = req.add_labels.unwrap_or_default();
    let remove = req.remove_labels.unwrap_or_default();
    messages::check_label_writes("add_labels", &add)?;
    messages::check_label_writes("remove_labels", &remove)?;
    let client = state.store.client().await?;
    let agent = owned_agent(&client, &caller, &address).await?;
    let id = MessageId::parse(&id).ok_or_else(message_not_found)?;
    let labels = messages::update_labels(&client, &caller.user_id, &agent.id, &id, &add, &remove)
        .await
        .map_err(message_store_error)?;
    Ok(Json(json!({ "message_id": id, "labels": labels })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "demo@agents.localhost";

    fn code(query: &str) -> &'static str {
        parse_list_query(query, AGENT).unwrap_err().code
    }

    #[test]
    fn defaults_are_inbound_unread_desc_50() {
        let req = parse_list_query("", AGENT).unwrap();
        assert_eq!(req.filter.direction, Some(Direction::Inbound));
        assert_eq!(req.filter.inbox_status, Some(InboxStatus::Unread));
        assert_eq!(req.filter.sort, Sort::Desc);
        assert_eq!(req.limit, 50);
        let all = parse_list_query("direction=all", AGENT).unwrap();
        assert_eq!(
            (all.filter.direction, all.filter.inbox_status),
            (None, None)
        );
        let out = parse_list_query("direction=outbound&status=all", AGENT).unwrap();
        assert_eq!(out.filter.direction, Some(Direction::Outbound));
    }

    #[test]
    fn bad_filters_are_invalid_filter() {
        for q in [
            "direction=up",
            "status=new",
            "direction=outbound&status=unread",
            "sort=random",
            "limit=0",
            "limit=101",
            "limit=ten",
            "since=yesterday",
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            // Valid RFC 3339, but year 10000 in UTC (this used to panic).
            "until=9999-12-31T23:59:59-01:00",
            "since=9999-12-31T23:59:59-01:00",
            "labels=Bad",
            "conversation_id=a%0Ab",
            "sort=asc&sort=desc",
            "a=%zz",
        ] {
            assert_eq!(code(q), "invalid_filter", "{q}");
        }
        let long = format!("from={}", "x".repeat(201));
        assert_eq!(code(&long), "invalid_filter");
        let many: Vec<String> = (0..51).map(|i| format!("labels=l{i}")).collect();
        assert_eq!(code(&many.join("&")), "invalid_filter");
    }

    #[test]
    fn cursors_round_trip_and_bind_the_filters() {
        let req = parse_list_query("labels=b&labels=a&from=x&sort=asc", AGENT).unwrap();
        assert_eq!(req.filter.labels, vec!["a", "b"]);
        let position = Position {
            created_at: parse_rfc3339("2026-05-01T12:00:00.123456Z").unwrap(),
            id: MessageId::new(),
        };
        let cursor = encode_cursor(&cursor_for(AGENT, &req.filter, Some(&position)));
        let again = parse_list_query(
            &format!("labels=a&labels=b&from=x&sort=asc&cursor={cursor}"),
            AGENT,
        )
        .unwrap();
        assert_eq!(again.after, Some(position));
        // Different filters, another agent, garbage: invalid_cursor.
        for q in [
            format!("labels=a&from=x&sort=asc&cursor={cursor}"),
            format!("labels=a&labels=b&from=y&sort=asc&cursor={cursor}"),
            format!("labels=a&labels=b&from=x&cursor={cursor}"),
            "cursor=not-base64!".to_owned(),
            format!("cursor={}", URL_SAFE_NO_PAD.encode(b"{\"c\":1}")),
        ] {
            assert_eq!(code(&q), "invalid_cursor", "{q}");
        }
        assert_eq!(
            parse_list_query(
                &format!("labels=a&labels=b&from=x&sort=asc&cursor={cursor}"),
                "other@x.com"
            )
            .unwrap_err()
            .code,
            "invalid_cursor"
        );
    }

    #[test]
    fn message_views_always_carry_auth_headers_and_raw_message() {
        let summary = MessageSummary {
            id: MessageId::new(),
            agent_id: AGENT.into(),
            direction: Direction::Outbound,
            from: AGENT.into(),
            to: vec!["bob@example.org".into()],
            cc: None,
            reply_to: None,
            recipient: "bob@example.org".into(),
            subject: "hi".into(),
            conversation_id: "cnv_x".into(),
            inbox_status: None,
            status: "sent".into(),
            size_bytes: 0,
            labels: vec![],
            created_at: parse_rfc3339("2026-05-01T12:00:00Z").unwrap(),
        };
        let outbound = Message {
            summary: summary.clone(),
            bcc: None,
            raw_message: None,
            auth_headers: None,
            spf_result: None,
            dkim_result: None,
            dmarc_result: None,
        };
        let v = serde_json::to_value(MessageView::from(outbound.clone())).unwrap();
        assert_eq!(v["auth_headers"], json!({}));
        assert_eq!(v["raw_message"], json!(""));
        assert!(v.get("auth").is_none());

        let odd = Message {
            auth_headers: Some(json!({"X-E2A-Auth-Verified": "true", "n": 1, "o": {"a": null}})),
            raw_message: Some(b"raw".to_vec()),
            ..outbound
        };
        let v = serde_json::to_value(MessageView::from(odd)).unwrap();
        assert_eq!(
            v["auth_headers"],
            json!({"X-E2A-Auth-Verified": "true", "n": "1", "o": "{\"a\":null}"})
        );
        assert_eq!(v["raw_message"], json!("cmF3"));
        let not_an_object = Message {
            summary,
            bcc: None,
            raw_message: None,
            auth_headers: Some(json!(["x"])),
            spf_result: None,
            dkim_result: None,
            dmarc_result: None,
        };
        let v = serde_json::to_value(MessageView::from(not_an_object)).unwrap();
        assert_eq!(v["auth_headers"], json!({}));
    }

    #[test]
    fn a_cursor_position_outside_utc_is_invalid_cursor() {
        let filter = parse_list_query("", AGENT).unwrap().filter;
        let position = Position {
            created_at: parse_rfc3339("2026-05-01T12:00:00Z").unwrap(),
            id: MessageId::new(),
        };
        let mut cursor = cursor_for(AGENT, &filter, Some(&position));
        cursor.c = "9999-12-31T23:59:59-01:00".into();
        assert_eq!(
            code(&format!("cursor={}", encode_cursor(&cursor))),
            "invalid_cursor"
        );
    }
}
