//! Tracing set-up: human-readable lines by default, JSON lines with
//! `E2A_LOG_FORMAT=json`; `RUST_LOG` filters (default `info`).
//! Never log secrets, tokens, API keys or message bodies.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it again (tests, embedding) is a
/// no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: piped or collected logs stay plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(std::io::stdout().is_terminal())
        // A closed stdout (the reader of a pipe went away) must not turn
        // every log line into an `eprintln!` that can itself panic.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}
