//! A webhook's deliveries: `POST /v1/webhooks/{id}/test` (a synthetic
//! delivery) and `GET /v1/webhooks/{id}/deliveries` (the log). Contract
//! operations testWebhook and listWebhookDeliveries; spec §4.3, §5.1.
//!
//! * A test send queues a pending delivery of the envelope `{"event",
//!   "id", "created_at", "data"}` (`event` defaults to `email.received`,
//!   `data` to `{"test": true}`); the deliverer POSTs it signed like any
//!   delivery. 409 `webhook_disabled` for a disabled webhook, 400
//!   `invalid_event_type` outside the catalogue.
//! * The log is newest first, optionally one `status`; it pages with
//!   `next_cursor` (the original always answered `null`) and examines a
//!   bounded number of deliveries per request when filtered.
//! * Another account's webhook is 404, exactly like a missing one.

use axum::{
    Json,
    extract::{RawQuery, State},
};
use e2a_store::{
    StoreError,
    deliveries::{self, Delivery, Position, Status, TestSendError},
    events,
    ids::DeliveryId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    AppState,
    auth::Caller,
    error::ApiError,
    extract::{ApiJsonOrEmpty, ApiPath, invalid_filter, query_pairs, rfc3339_seconds},
};

/// Default page size.
pub const DEFAULT_LIMIT: i64 = 50;

/// `TestWebhookRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
}

/// `TestWebhookOutputBody`.
#[derive(Debug, Serialize)]
pub struct TestSent {
    delivery_id: String,
}

/// `POST /v1/webhooks/{id}/test`: 200 `{delivery_id}`.
pub async fn test(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<TestRequest>,
) -> Result<Json<TestSent>, ApiError> {
    let event = req
        .event
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| events::EMAIL_RECEIVED.to_owned());
    let data = req.data.unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("test".into(), Value::Bool(true));
        m
    });
    let client = state.store.client().await?;
    let delivery = deliveries::send_test(&client, &caller.user_id, &id, &event, data)
        .await
        .map_err(|e| match e {
            TestSendError::NotFound => ApiError::not_found("webhook"),
            TestSendError::Disabled => ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "webhook_disabled",
                e.to_string(),
            ),
            TestSendError::InvalidEventType(ref t) => {
                let details = serde_json::json!({ "event_type": t, "allowed": events::CATALOG });
                ApiError::bad_request("invalid_event_type", e.to_string()).with_details(details)
            }
            TestSendError::Store(e) => e.into(),
        })?;
    tracing::info!(webhook.id = %id, delivery.id = %delivery, "webhook test send queued");
    Ok(Json(TestSent {
        delivery_id: delivery.to_string(),
    }))
}

/// `WebhookDeliveryView`: optional fields only when set.
#[derive(Debug, Serialize)]
pub struct DeliveryView {
    id: String,
    event_type: String,
    status: &'static str,
    attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_status_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_attempt_at: Option<String>,
    next_retry_at: String,
    created_at: String,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id.to_string(),
            event_type: d.event_type,
            status: d.status.as_str(),
            attempts: i64::from(d.attempts),
            last_error: Some(d.last_error).filter(|e| !e.is_empty()),
            last_status_code: d.last_status_code.map(i64::from),
            last_attempt_at: d.last_attempt_at.map(rfc3339_seconds),
            next_retry_at: rfc3339_seconds(d.next_retry_at),
            created_at: rfc3339_seconds(d.created_at),
        }
    }
}

/// `PageWebhookDeliveryView`.
#[derive(Debug, Serialize)]
pub struct DeliveryPage {
    items: Vec<DeliveryView>,
    next_cursor: Option<String>,
}

fn encode_cursor(p: &Position) -> String {
    super::cursor::encode(p.created_at, p.id.as_str())
}

fn decode_cursor(raw: &str) -> Result<Position, ApiError> {
    let (created_at, id) = super::cursor::decode(raw, DeliveryId::parse)?;
    Ok(Position { created_at, id })
}

/// The deliveries query after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// Only this status.
    pub status: Option<Status>,
    /// Start after this row.
    pub after: Option<Position>,
    /// Page size, 1..=100.
    pub limit: i64,
}

/// Parses `status`, `limit` and `cursor`; unknown parameters are ignored,
/// a repeated or unservable one is 400 `invalid_filter` (`invalid_cursor`).
pub fn parse_list_query(query: &str) -> Result<ListRequest, ApiError> {
    let pairs = query_pairs(query)
        .ok_or_else(|| invalid_filter("query string is not valid UTF-8 percent-encoding"))?;
    let mut single: std::collections::BTreeMap<&str, String> = Default::default();
    for (key, value) in &pairs {
        let Some(k) = ["status", "limit", "cursor"].into_iter().find(|k| k == key) else {
            continue;
        };
        if single.insert(k, value.clone()).is_some() {
            return Err(invalid_filter(format!("{k} may be given only once")));
        }
    }
    let get = |k: &str| single.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let status = get("status")
        .map(|s| {
            Status::parse(s)
                .ok_or_else(|| invalid_filter("status must be pending, delivered or failed"))
        })
        .transpose()?;
    let limit = match get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=deliveries::MAX_PAGE).contains(l))
            .ok_or_else(|| {
                invalid_filter(format!(
                    "limit must be an integer from 1 to {}",
                    deliveries::MAX_PAGE
                ))
            })?,
    };
    let after = get("cursor").map(decode_cursor).transpose()?;
    Ok(ListRequest {
        status,
        after,
        limit,
    })
}

/// `GET /v1/webhooks/{id}/deliveries`: 200 `{items, next_cursor}`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeliveryPage>, ApiError> {
    let req = parse_list_query(query.as_deref().unwrap_or(""))?;
    let client = state.store.client().await?;
    let page = deliveries::list(
        &client,
        &caller.user_id,
        &id,
        req.status,
        req.after.as_ref(),
        req.limit,
    )
    .await
    .map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found("webhook"),
        other => other.into(),
    })?;
    Ok(Json(DeliveryPage {
        next_cursor: page.next.as_ref().map(encode_cursor),
        items: page.items.into_iter().map(DeliveryView::from).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_validated_and_cursors_round_trip() {
        let r = parse_list_query("status=failed&limit=100").unwrap();
        assert_eq!((r.status, r.limit), (Some(Status::Failed), 100));
        assert_eq!(parse_list_query("status=").unwrap().status, None);
        for bad in [
            "status=sent",
            "limit=0",
            "limit=101",
            "limit=1&limit=2",
            "a=%zz",
        ] {
            assert_eq!(
                parse_list_query(bad).unwrap_err().code,
                "invalid_filter",
                "{bad}"
            );
        }
        let p = Position {
            created_at: time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_000_001_000)
                .unwrap(),
            id: DeliveryId::new(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&p)).unwrap(), p);
        assert_eq!(
            parse_list_query("cursor=e30").unwrap_err().code,
            "invalid_cursor"
        );
    }
}
