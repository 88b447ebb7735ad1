//! `cargo xtask dev`: the whole gateway on this machine.
//!
//! 1. Uses `E2A_DATABASE_URL`/`DATABASE_URL`, else starts the local dev
//!    cluster (`target/e2a-devdb`).
//! 2. Migrates, and bootstraps the user `dev@e2a.localhost` once; its API key
//!    is kept in `target/e2a-dev/api-key` (mode 0600) and reused while it
//!    still works.
//! 3. Builds and runs `e2a-api`, `e2a-relay`, `e2a-deliverer` and
//!    `e2a-janitor` with prefixed logs, the shared domain `agents.localhost`
//!    and loopback-only listeners (any `E2A_*` already set wins, except
//!    `E2A_OPS_ADDR`, which is always 127.0.0.1:9090–9093 per service).
//! 4. Prints the key and URLs once every `/readyz` answers 200.
//! 5. On Ctrl-C (or SIGTERM/SIGHUP) sends SIGTERM to each service once (they run in
//!    their own process group, so the terminal's SIGINT reaches only us),
//!    waits for them to drain, stops the dev cluster if it started it, and
//!    exits 0 when every service exited 0. If a service dies on its own, the
//!    others are stopped and the exit code is 1.

use std::{
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::Duration,
};

use e2a_store::{address::EmailAddress, api_keys, migrate::MigrationMode};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use crate::{CmdResult, bootstrap, database, workspace};

/// The services, their ops ports and extra environment.
const SERVICES: &[(&str, u16)] = &[
    ("api", 9090),
    ("relay", 9091),
    ("deliverer", 9092),
    ("janitor", 9093),
];

/// Defaults for the services (only where the variable is not already set).
const DEV_ENV: &[(&str, &str)] = &[
    // The services default to production; a dev machine has no DNS for its
    // domains and delivers webhooks to localhost.
    ("E2A_ENV", "development"),
    ("E2A_HTTP_ADDR", "127.0.0.1:8080"),
    ("E2A_SMTP_ADDR", "127.0.0.1:2525"),
    ("E2A_SHARED_DOMAIN", "agents.localhost"),
    ("E2A_SMTP_DOMAIN", "agents.localhost"),
    ("E2A_PUBLIC_URL", "http://localhost:8080"),
    ("E2A_MIGRATION_MODE", "verify"),
    // No outside DNS on a dev machine: skip SPF/DKIM/DMARC lookups instead
    // of waiting for them to time out on every message.
    ("E2A_SMTP_AUTH_DNS", "disabled"),
    ("RUST_LOG", "info"),
];

/// `cargo xtask dev` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run release binaries.
    #[arg(long)]
    release: bool,
}

/// Runs the gateway until Ctrl-C.
pub fn run(args: Args) -> CmdResult {
    let target = database::resolve(None)?;
    let runtime = database::runtime()?;
    let key = runtime.block_on(prepare_database(&target.url))?;
    build(args.release)?;
    let code = runtime.block_on(supervise(&target.url, &key, args.release))?;
    if target.started_dev_cluster {
        match crate::db::stop() {
            Ok(()) => eprintln!("[xtask] dev database stopped (data kept in target/e2a-devdb)"),
            Err(e) => eprintln!("[xtask] could not stop the dev database: {e}"),
        }
    }
    Ok(code)
}

fn key_file() -> PathBuf {
    workspace::target_dir().join("e2a-dev").join("api-key")
}

/// Migrates and returns a working API key for the dev user, minting one the
/// first time (or when the saved one no longer authenticates).
async fn prepare_database(url: &str) -> Result<String, Box<dyn std::error::Error>> {
    let store = database::store(url)?;
    store.wait_until_ready(Duration::from_secs(15)).await?;
    let report = store.migrate(MigrationMode::Auto).await?;
    for name in &report.applied {
        eprintln!("[xtask] applied {name}");
    }
    let path = key_file();
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_owned();
        let client = store.client().await?;
        if api_keys::authenticate(&client, &saved).await.is_ok() {
            return Ok(saved);
        }
    }
    let email = EmailAddress::parse(bootstrap::DEFAULT_EMAIL)?;
    let key = bootstrap::issue_key(&store, &email, "dev").await?;
    save_key(&path, &key)?;
    Ok(key)
}

fn save_key(path: &PathBuf, key: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, key.as_bytes())
}

fn build(release: bool) -> Result<(), Box<dyn std::error::Error>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace::root()).arg("build");
    if release {
        cmd.arg("--release");
    }
    for (name, _) in SERVICES {
        cmd.args(["-p", &format!("e2a-{name}")]);
    }
    if !cmd.status()?.success() {
        return Err("building the services failed".into());
    }
    Ok(())
}

fn spawn(name: &str, ops_port: u16, url: &str, release: bool) -> std::io::Result<Child> {
    let binary = workspace::target_dir()
        .join(if release { "release" } else { "debug" })
        .join(format!("e2a-{name}"));
    let mut cmd = Command::new(&binary);
    cmd.env("E2A_DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Own process group: the terminal's Ctrl-C reaches only xtask, which
        // then sends exactly one SIGTERM (a second signal would make the
        // services exit immediately instead of draining).
        .process_group(0);
    // Always per service: one exported E2A_OPS_ADDR would make all four
    // services fight over the same port.
    cmd.env("E2A_OPS_ADDR", format!("127.0.0.1:{ops_port}"));
    for (k, v) in DEV_ENV {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", binary.display())))?;
    let label = format!("[{name:9}]");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(prefix_lines(label.clone(), out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(prefix_lines(label, err));
    }
    Ok(child)
}

async fn prefix_lines(label: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{label} {line}");
    }
}

async fn supervise(
    url: &str,
    key: &str,
    release: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    for (name, port) in SERVICES {
        match spawn(name, *port, url, release) {
            Ok(child) => children.push((*name, child)),
            Err(e) => {
                terminate(&mut children).await;
                return Err(e.into());
            }
        }
    }
    let ready = tokio::spawn(announce_when_ready(key.to_owned()));
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let mut died = None;
    tokio::select! {
        () = &mut signal => eprintln!("[xtask] stopping the services…"),
        (name, status) = first_exit(&mut children) => {
            eprintln!("[xtask] {name} exited on its own ({status}); stopping the others");
            died = Some(name);
        }
    }
    ready.abort();
    let all_clean = terminate(&mut children).await;
    Ok(if all_clean && died.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Resolves when any child exits, with its name and status.
async fn first_exit(children: &mut [(&'static str, Child)]) -> (&'static str, String) {
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return (name, status.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every running child, then wait (killing after 45 s). True
/// when every child exited with status 0.
async fn terminate(children: &mut Vec<(&'static str, Child)>) -> bool {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    let mut all_clean = true;
    for (name, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(45), child.wait()).await {
            Ok(Ok(status)) if status.success() => eprintln!("[xtask] {name} stopped"),
            Ok(Ok(status)) => {
                eprintln!("[xtask] {name} exited with {status}");
                all_clean = false;
            }
            Ok(Err(e)) => {
                eprintln!("[xtask] waiting for {name}: {e}");
                all_clean = false;
            }
            Err(_) => {
                eprintln!("[xtask] {name} did not stop in time; killing it");
                let _ = child.kill().await;
                all_clean = false;
            }
        }
    }
    children.clear();
    all_clean
}

async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (a closed terminal must stop the
/// services too, not orphan them).
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hangup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = recv(term.as_mut()) => {}
        () = recv(hangup.as_mut()) => {}
    }
}

/// Polls every `/readyz`, then prints the key and URLs.
async fn announce_when_ready(key: String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for (name, port) in SERVICES {
        while !readyz(*port).await {
            if tokio::time::Instant::now() > deadline {
                eprintln!("[xtask] {name} is not ready after 2 minutes; see its log lines above");
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let http = std::env::var("E2A_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let smtp = std::env::var("E2A_SMTP_ADDR").unwrap_or_else(|_| "127.0.0.1:2525".into());
    println!(
        "\n  e2a is running\n\n  API key      {key}\n  API          http://{http}   (try: curl -H \"Authorization: Bearer $KEY\" http://{http}/v1/account)\n  SMTP         {smtp}   (shared domain agents.localhost)\n  ops          /healthz /readyz /metrics on 127.0.0.1:9090 (api) 9091 (relay) 9092 (deliverer) 9093 (janitor)\n\n  Ctrl-C stops everything.\n"
    );
}

/// True when `GET /readyz` on the local ops port answers 200.
async fn readyz(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut status = String::new();
        BufReader::new(stream).read_line(&mut status).await?;
        Ok::<_, std::io::Error>(status.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}
