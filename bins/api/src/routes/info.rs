//! `GET /v1/info`: public deployment metadata (unauthenticated).

use axum::{Json, extract::State};
use serde::Serialize;

use crate::{AppState, Config};

/// The `DeploymentInfoView` of the contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeploymentInfo {
    /// Shared agent domain; empty when slug registration is off.
    pub shared_domain: String,
    /// Whether `POST /v1/agents {"slug": …}` is available.
    pub slug_registration_enabled: bool,
    /// Public base URL, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

impl DeploymentInfo {
    /// Derived from configuration once at start-up.
    pub fn from_config(config: &Config) -> Self {
        let shared_domain = config
            .shared_domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        Self {
            slug_registration_enabled: !shared_domain.is_empty(),
            shared_domain,
            public_url: config.public_url.clone().filter(|u| !u.trim().is_empty()),
        }
    }
}

/// Answers the deployment info.
pub async fn get_info(State(state): State<AppState>) -> Json<DeploymentInfo> {
    Json((*state.info).clone())
}
