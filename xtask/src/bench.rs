//! `cargo xtask bench NAME`: runs one benchmark in release mode. Each
//! benchmark measures its reference limit in the same run and prints JSON
//! lines (figures named with their unit, the comparison as `ratio`).

use std::process::{Command, ExitCode};

use crate::{CmdResult, workspace};

/// Known benchmarks: name → (package, bench target, what it measures).
const BENCHES: &[(&str, &str, &str)] = &[
    (
        "api",
        "e2a-api",
        "GET an agent's messages (10,000 stored, page of 50) at 32 connections vs the same SQL; p99 under a key flood",
    ),
    (
        "webhooks",
        "e2a-deliverer",
        "webhook deliveries/s (50 webhooks, 8 workers) vs the same claim/record SQL; commit-to-receiver latency",
    ),
    (
        "outbound",
        "e2a-api",
        "sends accepted/s through the API, then delivered/s with RSA-2048 DKIM to an SMTP sink, vs signing, the sink and the same SQL alone",
    ),
    (
        "smtp",
        "e2a-relay",
        "relay messages/s (20 sessions, 4 KB, durable) vs the raw-SQL limit and one message's store transaction alone; WAL per message; relay RSS; EHLO latency under 10 MiB DATA",
    ),
];

/// `cargo xtask bench` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmark to run (`api`, `outbound`, `smtp`, `webhooks`); omit to list them.
    name: Option<String>,
    /// Extra arguments passed to the benchmark binary.
    #[arg(last = true)]
    rest: Vec<String>,
}

/// Runs the named benchmark through `cargo bench`.
pub fn run(args: Args) -> CmdResult {
    let Some(name) = args.name else {
        for (name, _, what) in BENCHES {
            println!("{name:8} {what}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some((_, package, _)) = BENCHES.iter().find(|(n, _, _)| *n == name) else {
        let known: Vec<&str> = BENCHES.iter().map(|(n, _, _)| *n).collect();
        return Err(format!("unknown benchmark {name:?}; known: {}", known.join(", ")).into());
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace::root())
        // cargo sets this for xtask itself; passed on, it changes the build
        // environment and reruns build scripts (ring's) on every switch
        // between `cargo xtask bench` and a plain `cargo bench`.
        .env_remove("CARGO_MANIFEST_DIR")
        .args(["bench", "--quiet", "-p", package, "--bench", &name, "--"])
        .args(&args.rest)
        .status()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
