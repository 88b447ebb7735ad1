//! The API test harness shared by every file under `tests/`: a real server
//! on port-0 listeners, a real Postgres from the testkit, a real HTTP
//! client, and helpers for keys and error bodies.

#![allow(dead_code)] // each test binary uses a different subset

use std::{sync::Arc, time::Duration};

use e2a_api::{Config, Listeners};
use e2a_runtime::CancellationToken;
use e2a_store::{Store, StoreConfig, address::EmailAddress, api_keys, users};
use reqwest::{StatusCode, header};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};

/// A running API: base URLs, its token and its task.
pub struct Running {
    pub base: String,
    pub ops: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), e2a_runtime::BoxError>>,
    pub http: reqwest::Client,
}

impl Running {
    /// Starts [`e2a_api::run`] with `config`.
    pub async fn start(config: Config) -> Running {
        Self::spawn(config, None).await
    }

    /// Starts [`e2a_api::run_with_resolver`] with `config` and `dns`.
    pub async fn start_with_resolver(
        config: Config,
        dns: Arc<dyn e2a_api::dns::Resolver>,
    ) -> Running {
        Self::spawn(config, Some(dns)).await
    }

    async fn spawn(config: Config, dns: Option<Arc<dyn e2a_api::dns::Resolver>>) -> Running {
        e2a_runtime::install_crypto_provider();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", http_listener.local_addr().unwrap());
        let ops = format!("http://{}", ops_listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let listeners = Listeners {
            http: http_listener,
            ops: ops_listener,
        };
        let task = match dns {
            None => tokio::spawn(e2a_api::run(config, listeners, shutdown.clone())),
            Some(dns) => tokio::spawn(e2a_api::run_with_resolver(
                config,
                listeners,
                shutdown.clone(),
                dns,
            )),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Running {
            base,
            ops,
            shutdown,
            task,
            http,
        }
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.base.trim_start_matches("http://").parse().unwrap()
    }

    /// The ops listener's address.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ops.trim_start_matches("http://").parse().unwrap()
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, key);
        }
        req.send().await.unwrap()
    }

    /// A request to `path` with `Authorization: Bearer <key>`.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    /// Sends `method path` with an optional JSON body; returns status and body
    /// (`Value::Null` for an empty body).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: impl AsRef<str>,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let path = path.as_ref();
        let mut req = self.request(method, path, key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{path}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, body)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("api did not stop in time")
            .unwrap()
            .expect("api stopped with an error");
    }
}

/// Creates the user `email` and returns a fresh API key of theirs.
pub async fn key_for(db_url: &str, email: &str) -> String {
    let store = Store::new(&StoreConfig::new(db_url)).unwrap();
    let c = store.client().await.unwrap();
    let user = users::create(&c, &EmailAddress::parse(email).unwrap(), "")
        .await
        .unwrap();
    api_keys::create(&c, &user.id, "test", None)
        .await
        .unwrap()
        .plaintext
}

/// Asserts `resp` is a contract error body and returns status and body.
pub async fn error_body(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        ct.as_deref(),
        Some("application/json"),
        "error bodies are JSON"
    );
    let body: Value = resp.json().await.unwrap();
    assert_error_shape(&body);
    (status, body)
}

/// Asserts `body` is `{"error": {"code", "message", "request_id": "req_…"}}`.
pub fn assert_error_shape(body: &Value) {
    let err = &body["error"];
    assert!(
        err["code"].is_string() && err["message"].is_string(),
        "{body}"
    );
    assert!(
        err["request_id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("req_"),
        "{body}"
    );
}

/// The error code of an error body.
pub fn code(body: &Value) -> &str {
    assert_error_shape(body);
    body["error"]["code"].as_str().unwrap_or_default()
}
