//! `GET|HEAD /api/health`: the original's liveness route, kept for existing
//! monitors. It touches no database (readiness lives on the ops port).

use axum::Json;
use serde_json::{Value, json};

/// `{"status":"ok"}`.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
