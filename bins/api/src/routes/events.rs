//! `/v1/events`: the caller's event log (spec §3.10, §4.7, §5.1; contract
//! operations listEvents, getEvent, redeliverEvent).
//!
//! * `GET /v1/events` pages newest first with the contract's filters; a
//!   cursor is base64url (no padding) of `{"c": created_at, "i": id}` of the
//!   last row (spec §4.7). Each request examines a bounded number of
//!   events ([`events::SCAN_BUDGET`]); a short or empty page with a
//!   `next_cursor` is not the end, `"next_cursor": null` is. Bad filters
//!   are 400 `invalid_filter`, bad cursors 400 `invalid_cursor` — never a
//!   5xx. Pages leave `data.raw_message` out; `GET /v1/events/{id}` has it.
//! * `GET /v1/events/{id}`: the event with `delivery_status`; 404 across
//!   tenants, 410 `gone` past its 30-day retention.
//! * `POST /v1/events/{id}/redeliver`: queues replays to one matched
//!   webhook or all of them, deduplicated by a server-minted idempotency
//!   key for [`events::REDELIVER_WINDOW`] (see
//!   [`e2a_store::events::redeliver`]).

use axum::{
    Json,
    extract::{RawQuery, State},
    http::StatusCode,
};
use e2a_store::{
    address::EmailAddress,
    events::{self, Event, EventError, ListFilter, Position, Redelivery},
    ids::{EventId, MessageId, WebhookId},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJsonOrEmpty, ApiPath, invalid_filter, query_pairs, rfc3339_seconds, time_window},
};

/// Default page size.
pub const DEFAULT_LIMIT: i64 = 50;
/// Longest `conversation_id` filter.
pub const MAX_FILTER_LEN: usize = 200;

/// `DeliveryStatusJSON`.
#[derive(Debug, Serialize)]
pub struct DeliveryStatusView {
    matched_webhooks: i64,
    delivered: i64,
    pending: i64,
    failed: i64,
}

/// `EventJSON`: routing keys only when set, `delivery_status` only on
/// `GET /v1/events/{id}`.
#[derive(Debug, Serialize)]
pub struct EventView {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    schema_version: i64,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    status: &'static str,
    data: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_status: Option<DeliveryStatusView>,
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        let set = |v: Option<String>| v.filter(|s| !s.is_empty());
        Self {
            id: e.id.to_string(),
            event_type: e.event_type,
            schema_version: i64::from(e.schema_version),
            created_at: rfc3339_seconds(e.created_at),
            agent_id: set(e.agent_id),
            conversation_id: set(e.conversation_id),
            message_id: set(e.message_id),
            status: e.status.as_str(),
            // The contract's `data` is an object; every stored envelope has
            // one.
            data: match e.data {
                Value::Object(_) => e.data,
                _ => Value::Object(Default::default()),
            },
            delivery_status: None,
        }
    }
}

/// `PageEventJSON`.
#[derive(Debug, Serialize)]
pub struct EventPage {
    items: Vec<EventView>,
    next_cursor: Option<String>,
}

fn encode_cursor(p: &Position) -> String {
    super::cursor::encode(p.created_at, p.id.as_str())
}

fn decode_cursor(raw: &str) -> Result<Position, ApiError> {
    let (created_at, id) = super::cursor::decode(raw, EventId::parse)?;
    Ok(Position { created_at, id })
}

/// The list request after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Store filter.
    pub filter: ListFilter,
    /// Start after this row.
    pub after: Option<Position>,
    /// Page size, 1..=200.
    pub limit: i64,
}

const SINGLE_KEYS: &[&str] = &[
    "type",
    "agent_id",
    "conversation_id",
    "message_id",
    "since",
    "until",
    "cursor",
    "limit",
];

/// Parses and validates the `GET /v1/events` query. Unknown parameters are
/// ignored; a repeated one, or a value the route cannot serve, is 400
/// `invalid_filter` (`invalid_cursor` for the cursor).
pub fn parse_list_query(query: &str) -> Result<ListRequest, ApiError> {
    let pairs = query_pairs(query)
        .ok_or_else(|| invalid_filter("query string is not valid UTF-8 percent-encoding"))?;
    let mut single: std::collections::BTreeMap<&str, String> = Default::default();
    for (key, value) in &pairs {
        let Some(k) = SINGLE_KEYS.iter().copied().find(|k| k == key) else {
            continue;
        };
        if single.insert(k, value.clone()).is_some() {
            return Err(invalid_filter(format!("{k} may be given only once")));
        }
    }
    let get = |k: &str| single.get(k).map(String::as_str).filter(|v| !v.is_empty());

    let event_type = get("type")
        .map(|t| {
            events::CATALOG
                .iter()
                .find(|c| **c == t)
                .map(|c| (*c).to_owned())
                .ok_or_else(|| {
                    invalid_filter(format!(
                        "type must be one of {}",
                        events::CATALOG.join(", ")
                    ))
                })
        })
        .transpose()?;
    let agent_id = get("agent_id")
        .map(|a| {
            EmailAddress::parse(a)
                .map(|a| a.as_str().to_owned())
                .map_err(|_| invalid_filter("agent_id must be an agent address"))
        })
        .transpose()?;
    let conversation_id = match get("conversation_id") {
        Some(v) if v.chars().count() > MAX_FILTER_LEN => {
            return Err(invalid_filter(format!(
                "conversation_id must be at most {MAX_FILTER_LEN} characters"
            )));
        }
        Some(v) if v.chars().any(char::is_control) => {
            return Err(invalid_filter(
                "conversation_id must not contain control characters",
            ));
        }
        other => other.map(str::to_owned),
    };
    let message_id = get("message_id")
        .map(|m| {
            MessageId::parse(m)
                .map(|m| m.to_string())
                .ok_or_else(|| invalid_filter("message_id must be a message id (msg_…)"))
        })
        .transpose()?;
    let (since, until) = time_window(get("since"), get("until"))?;
    let limit = match get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=events::MAX_PAGE).contains(l))
            .ok_or_else(|| {
                invalid_filter(format!(
                    "limit must be an integer from 1 to {}",
                    events::MAX_PAGE
                ))
            })?,
    };
    let after = get("cursor").map(decode_cursor).transpose()?;
    Ok(ListRequest {
        filter: ListFilter {
            event_type,
            agent_id,
            conversation_id,
            message_id,
            since,
            until,
        },
        after,
        limit,
    })
}

/// `GET /v1/events`: 200 `{items, next_cursor}`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, ApiError> {
    let req = parse_list_query(query.as_deref().unwrap_or(""))?;
    let client = state.store.client().await?;
    let page = events::list(
        &client,
        &caller.user_id,
        &req.filter,
        req.after.as_ref(),
        req.limit,
    )
    .await?;
    Ok(Json(EventPage {
        next_cursor: page.next.as_ref().map(encode_cursor),
        items: page.items.into_iter().map(EventView::from).collect(),
    }))
}

fn event_error(e: EventError) -> ApiError {
    match e {
        EventError::NotFound => ApiError::not_found("event"),
        EventError::Gone => ApiError::new(
            StatusCode::GONE,
            "gone",
            "the event is past its 30-day retention",
        ),
        EventError::Pending => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
        EventError::WebhookNotFound => ApiError::not_found("webhook"),
        // The original answered the default code of its 409 here.
        EventError::WebhookNotMatched(_) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        EventError::WebhookDisabled(_) => {
            ApiError::new(StatusCode::CONFLICT, "webhook_disabled", e.to_string())
        }
        EventError::InFlight => ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_in_flight",
            "an identical redelivery is in progress; retry shortly",
        ),
        EventError::CorruptReplay(ref cause) => ApiError::internal(cause),
        EventError::Store(e) => e.into(),
    }
}

/// `GET /v1/events/{id}`: the event with `delivery_status`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EventView>, ApiError> {
    let client = state.store.client().await?;
    let detail = events::get(&client, &caller.user_id, &id)
        .await
        .map_err(event_error)?;
    let d = detail.delivery_status;
    let mut view = EventView::from(detail.event);
    view.delivery_status = Some(DeliveryStatusView {
        matched_webhooks: d.matched_webhooks,
        delivered: d.delivered,
        pending: d.pending,
        failed: d.failed,
    });
    Ok(Json(view))
}

/// `RedeliverEventInputBody`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeliverRequest {
    #[serde(default)]
    webhook_id: Option<String>,
}

/// `POST /v1/events/{id}/redeliver`: 200 with the contract's
/// `RedeliverView` — the same answer, and nothing queued, for a repeat
/// within [`events::REDELIVER_WINDOW`].
pub async fn redeliver(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<RedeliverRequest>,
) -> Result<Json<Redelivery>, ApiError> {
    let webhook = req.webhook_id.filter(|w| !w.is_empty());
    if let Some(w) = &webhook
        && WebhookId::parse(w).is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "webhook_id must be a webhook id (wh_…)",
        ));
    }
    let mut client = state.store.client().await?;
    let done = events::redeliver(&mut client, &caller.user_id, &id, webhook.as_deref())
        .await
        .map_err(event_error)?;
    tracing::info!(
        event.id = %done.redelivery.event_id,
        webhook.id = webhook.as_deref().unwrap_or(""),
        replayed = done.replayed,
        "event redelivered"
    );
    Ok(Json(done.redelivery))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

    #[test]
    fn queries_are_validated_and_cursors_round_trip() {
        let r = parse_list_query("type=email.sent&agent_id=Demo@Agents.Test&limit=200").unwrap();
        assert_eq!(r.filter.event_type.as_deref(), Some("email.sent"));
        assert_eq!(r.filter.agent_id.as_deref(), Some("demo@agents.test"));
        assert_eq!(r.limit, 200);
        assert_eq!(parse_list_query("").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(
            parse_list_query("unknown=1&type=").unwrap().filter,
            ListFilter::default()
        );
        for bad in [
            "type=email.bounced",
            "agent_id=not-an-address",
            "message_id=msg_x",
            "limit=0",
            "limit=201",
            "limit=ten",
            "since=yesterday",
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "type=email.sent&type=email.sent",
            "conversation_id=a%00b",
            "a=%zz",
        ] {
            assert_eq!(
                parse_list_query(bad).unwrap_err().code,
                "invalid_filter",
                "{bad}"
            );
        }
        let long = format!("conversation_id={}", "c".repeat(201));
        assert_eq!(parse_list_query(&long).unwrap_err().code, "invalid_filter");

        let p = Position {
            created_at: time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000)
                .unwrap(),
            id: EventId::new(),
        };
        let raw = encode_cursor(&p);
        assert_eq!(decode_cursor(&raw).unwrap(), p);
        let r = parse_list_query(&format!("cursor={raw}")).unwrap();
        assert_eq!(r.after, Some(p));
        for bad in [
            "!!".to_owned(),
            URL_SAFE_NO_PAD.encode(b"{}"),
            URL_SAFE_NO_PAD.encode(br#"{"c":"x","i":"evt_0"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"c":"2026-01-01T00:00:00Z","i":"msg_0","x":1}"#),
        ] {
            assert_eq!(
                parse_list_query(&format!("cursor={bad}")).unwrap_err().code,
                "invalid_cursor"
            );
        }
    }
}
