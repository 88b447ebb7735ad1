//! The shared `main`: parse configuration, start tracing, install the TLS
//! provider, build the Tokio runtime, wire signals to a shutdown token, run
//! the service and enforce the drain deadline. Exit code 0 on a clean stop,
//! 1 on a start-up or runtime error (printed with its causes), 2 on bad
//! configuration (clap's usage error).

use std::{future::Future, process::ExitCode};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::CommonArgs;

/// A boxed error with its source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a service binary tells the shared `main` about itself.
pub trait Service: Parser + Send + 'static {
    /// The service name used in logs and metrics (`api`, `relay`, …).
    const NAME: &'static str;
    /// The settings shared by every service.
    fn common(&self) -> &CommonArgs;
}

/// `error: outer: cause: root cause` — the whole chain on one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Runs a service binary: `serve(config, shutdown)` must bind its listeners
/// and return when `shutdown` is cancelled and its work is drained.
pub fn main<S, F, Fut>(serve: F) -> ExitCode
where
    S: Service,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), BoxError>>,
{
    let config = S::parse();
    crate::telemetry::init(config.common().log_format);
    crate::install_crypto_provider();
    let grace = config.common().shutdown_grace();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = crate::shutdown::on_signals();
        let deadline = crate::shutdown::drain_deadline(shutdown.clone(), grace);
        tokio::select! {
            r = serve(config, shutdown) => r,
            () = deadline => Err(format!("in-flight work did not drain within {}s", grace.as_secs()).into()),
        }
    });
    match result {
        Ok(()) => {
            tracing::info!(service = S::NAME, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let chain = error_chain(e.as_ref());
            tracing::error!(service = S::NAME, error = %chain, "exiting with error");
            eprintln!("error: {chain}");
            ExitCode::FAILURE
        }
    }
}
