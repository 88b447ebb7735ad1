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
//!    Outbound mail: unless `E2A_OUTBOUND_SMTP_HOST` is set in xtask's own
//!    environment (then the operator's `E2A_OUTBOUND_SMTP_*` reach the
//!    services unchanged), an in-process SMTP sink
//!    (`e2a_testkit::smtp_sink`) on an ephemeral 127.0.0.1 port accepts
//!    everything the services send, writes each message to
//!    `target/e2a-dev-mail/<unix-millis>-<n>.eml` and logs one line per
//!    message (from, to, subject; never the body). See [`Outbound`].
//! 4. Prints the key and URLs once every `/readyz` answers 200.
//! 5. On Ctrl-C (or SIGTERM/SIGHUP) sends SIGTERM to each service once (they run in
//!    their own process group, so the terminal's SIGINT reaches only us),
//!    waits for them to drain, stops the dev cluster if it started it, and
//!    exits 0 when every service exited 0. If a service dies on its own, the
//!    others are stopped and the exit code is 1.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::Duration,
};

use e2a_store::{address::EmailAddress, api_keys, migrate::MigrationMode};
use e2a_testkit::smtp_sink::{Received, Script, SmtpSink};
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
    // With the public URL, turns on reviewers' notification mail (its
    // magic links land in the dev mail catcher like any other mail).
    ("E2A_OUTBOUND_FROM_DOMAIN", "agents.localhost"),
    ("E2A_MIGRATION_MODE", "verify"),
    // No outside DNS on a dev machine: skip SPF/DKIM/DMARC lookups instead
    // of waiting for them to time out on every message.
    ("E2A_SMTP_AUTH_DNS", "disabled"),
    ("RUST_LOG", "info"),
];

/// The outbound relay variables the services read.
const OUTBOUND_HOST: &str = "E2A_OUTBOUND_SMTP_HOST";
const OUTBOUND_PORT: &str = "E2A_OUTBOUND_SMTP_PORT";
const OUTBOUND_TLS: &str = "E2A_OUTBOUND_SMTP_TLS";
/// Credentials meant for an operator's relay: never sent to the sink.
const OUTBOUND_CREDENTIALS: &[&str] = &["E2A_OUTBOUND_SMTP_USERNAME", "E2A_OUTBOUND_SMTP_PASSWORD"];

/// Where the services' outbound mail goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// `E2A_OUTBOUND_SMTP_HOST` is set (non-blank) in xtask's environment:
    /// the operator's relay. Every `E2A_OUTBOUND_SMTP_*` reaches the
    /// services unchanged (inherited); no sink is started.
    Operator,
    /// No relay configured: a local sink catches everything.
    CatchLocally,
}

impl Outbound {
    /// Decides from xtask's own environment (`parent` looks a variable up).
    /// A blank `E2A_OUTBOUND_SMTP_HOST` counts as unset, as it does for the
    /// services ("relay not configured").
    fn decide(parent: impl Fn(&str) -> Option<OsString>) -> Outbound {
        match parent(OUTBOUND_HOST) {
            Some(host) if !host.to_string_lossy().trim().is_empty() => Outbound::Operator,
            _ => Outbound::CatchLocally,
        }
    }

    /// The changes to every service's environment: `(name, Some(value))`
    /// sets, `(name, None)` removes. For [`Outbound::CatchLocally`] the
    /// services are pointed at the sink on `127.0.0.1:sink_port` in
    /// plaintext, and any operator credentials are withheld.
    fn service_env(self, sink_port: u16) -> Vec<(&'static str, Option<String>)> {
        match self {
            Outbound::Operator => Vec::new(),
            Outbound::CatchLocally => {
                let mut env = vec![
                    (OUTBOUND_HOST, Some("127.0.0.1".to_owned())),
                    (OUTBOUND_PORT, Some(sink_port.to_string())),
                    (OUTBOUND_TLS, Some("none".to_owned())),
                ];
                env.extend(OUTBOUND_CREDENTIALS.iter().map(|name| (*name, None)));
                env
            }
        }
    }
}

/// Where the dev sink writes caught mail.
fn mail_dir() -> PathBuf {
    workspace::target_dir().join("e2a-dev-mail")
}

/// Starts the sink that catches the services' mail: accepts everything,
/// spools to [`mail_dir`], keeps nothing in memory, logs one line per
/// message.
async fn start_sink() -> std::io::Result<SmtpSink> {
    let script = Script::new()
        .hostname("dev-sink.e2a.localhost")
        .spool_dir(Some(mail_dir()))
        .keep_messages(false)
        .on_received(|m| println!("[smtp-sink] {}", caught_line(m)));
    SmtpSink::start(script).await
}

/// `from=… to=…,… subject=…` for one caught message: the envelope and the
/// raw `Subject` header (control characters blanked, at most 200
/// characters). Never any of the body.
fn caught_line(m: &Received) -> String {
    let subject: String = m
        .subject()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let from = if m.mail_from.is_empty() {
        "<>"
    } else {
        m.mail_from.as_str()
    };
    format!(
        "caught mail from={from} to={} subject={subject:?}",
        m.rcpt_to.join(",")
    )
}

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

fn spawn(
    name: &str,
    ops_port: u16,
    url: &str,
    release: bool,
    outbound: &[(&str, Option<String>)],
) -> std::io::Result<Child> {
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
    for (k, v) in outbound {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
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
    let outbound = Outbound::decide(|name| std::env::var_os(name));
    // Kept alive until the services are stopped (they may send until then).
    let sink = match outbound {
        Outbound::Operator => None,
        Outbound::CatchLocally => Some(start_sink().await?),
    };
    let mail = match &sink {
        Some(sink) => {
            let dir = mail_dir();
            eprintln!(
                "[xtask] outbound mail is caught by a local SMTP sink on {} and written to {}/ \
                 (set {OUTBOUND_HOST} to use a real relay)",
                sink.addr(),
                dir.display()
            );
            format!("caught in {}/ (SMTP sink {})", dir.display(), sink.addr())
        }
        None => {
            let host = std::env::var(OUTBOUND_HOST).unwrap_or_default();
            let port = std::env::var(OUTBOUND_PORT).unwrap_or_default();
            eprintln!("[xtask] outbound mail goes to the relay {host}:{port} ({OUTBOUND_HOST})");
            format!("relay {host}:{port} ({OUTBOUND_HOST})")
        }
    };
    let outbound_env = outbound.service_env(sink.as_ref().map_or(0, SmtpSink::port));
    let mut children = Vec::new();
    for (name, port) in SERVICES {
        match spawn(name, *port, url, release, &outbound_env) {
            Ok(child) => children.push((*name, child)),
            Err(e) => {
                terminate(&mut children).await;
                return Err(e.into());
            }
        }
    }
    let ready = tokio::spawn(announce_when_ready(key.to_owned(), mail));
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
    drop(sink);
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
async fn announce_when_ready(key: String, mail: String) {
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
        "\n  e2a is running\n\n  API key      {key}\n  API          http://{http}   (try: curl -H \"Authorization: Bearer $KEY\" http://{http}/v1/account)\n  SMTP         {smtp}   (shared domain agents.localhost)\n  mail out     {mail}\n  ops          /healthz /readyz /metrics on 127.0.0.1:9090 (api) 9091 (relay) 9092 (deliverer) 9093 (janitor)\n\n  Ctrl-C stops everything.\n"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn without_a_relay_the_services_send_to_the_sink() {
        let outbound = Outbound::decide(env(&[("E2A_OUTBOUND_SMTP_PASSWORD", "p")]));
        assert_eq!(outbound, Outbound::CatchLocally);
        assert_eq!(
            outbound.service_env(2526),
            [
                ("E2A_OUTBOUND_SMTP_HOST", Some("127.0.0.1".to_owned())),
                ("E2A_OUTBOUND_SMTP_PORT", Some("2526".to_owned())),
                ("E2A_OUTBOUND_SMTP_TLS", Some("none".to_owned())),
                ("E2A_OUTBOUND_SMTP_USERNAME", None),
                ("E2A_OUTBOUND_SMTP_PASSWORD", None),
            ]
        );
        // Blank counts as unset.
        let blank = Outbound::decide(env(&[("E2A_OUTBOUND_SMTP_HOST", "  ")]));
        assert_eq!(blank, Outbound::CatchLocally);
    }

    #[test]
    fn an_operator_relay_is_passed_through_unchanged() {
        let outbound = Outbound::decide(env(&[
            ("E2A_OUTBOUND_SMTP_HOST", "smtp.example.com"),
            ("E2A_OUTBOUND_SMTP_PORT", "587"),
            ("E2A_OUTBOUND_SMTP_TLS", "starttls"),
        ]));
        assert_eq!(outbound, Outbound::Operator);
        assert!(outbound.service_env(2526).is_empty(), "inherited as is");
    }

    #[test]
    fn the_caught_line_has_the_envelope_and_subject_only() {
        let m = Received {
            mail_from: "agent@agents.localhost".into(),
            rcpt_to: vec!["a@x.test".into(), "b@x.test".into()],
            data: b"Subject: Hello\r\n there\r\n\r\nsecret body\r\n".to_vec(),
            auth_user: None,
        };
        let line = caught_line(&m);
        assert_eq!(
            line,
            "caught mail from=agent@agents.localhost to=a@x.test,b@x.test subject=\"Hello there\""
        );
        assert!(!line.contains("secret"));
    }
}
