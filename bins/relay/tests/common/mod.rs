//! The relay under test: `e2a_relay::run_with` on a real socket with a real
//! database (DNS checks off unless an authenticator is given), a user owning
//! the verified domain of [`AGENT`] with that agent, and a raw SMTP client
//! ([`Raw`]) so every reply code is exact. Shared by the socket-level test
//! files; each uses a part of it.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use e2a_relay::{Config, Listeners};
use e2a_runtime::{BoxError, CancellationToken};
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains::{self, DkimKeys},
    ids::UserId,
    users,
};
use e2a_testkit::TestDb;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

pub const PROMPT: Duration = Duration::from_secs(30);
pub const AGENT: &str = "demo@agents.test";

pub struct Relay {
    pub db: TestDb,
    pub smtp: SocketAddr,
    pub store: Store,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), BoxError>>,
    /// The owner of [`AGENT`].
    pub user: UserId,
}

impl Relay {
    /// The relay on a fresh database with the agent [`AGENT`].
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Relay {
        Self::start_with(tweak, None).await
    }

    /// [`Relay::start`] with an authenticator (e.g. answering from recorded
    /// DNS records); `None` turns the checks off.
    pub async fn start_with(
        tweak: impl FnOnce(&mut Config),
        authenticator: Option<e2a_mail::auth::Authenticator>,
    ) -> Relay {
        let db = TestDb::new().await;
        let mut config = Config::for_database(db.url());
        config.smtp_domain = "mx.test".into();
        config.smtp_auth_dns = e2a_relay::config::AuthDns::Disabled;
        tweak(&mut config);
        let smtp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = smtp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(e2a_relay::run_with(
            config,
            Listeners { smtp, ops },
            shutdown.clone(),
            authenticator,
        ));
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        store.wait_until_ready(PROMPT).await.unwrap();
        let user = Self::agent(&store).await;
        Relay {
            db,
            smtp: addr,
            store,
            shutdown,
            task,
            user,
        }
    }

    /// A user owning the verified domain of [`AGENT`], and the agent.
    pub async fn agent(store: &Store) -> UserId {
        owner_with_agent(store, "alice@example.com", AGENT).await
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let c = self.store.client().await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn messages(&self) -> i64 {
        self.count("SELECT count(*) FROM messages").await
    }

    /// The raw bytes stored for the message with this Message-ID.
    pub async fn raw(&self, message_id: &str) -> Vec<u8> {
        let c = self.store.client().await.unwrap();
        c.query_one(
            "SELECT raw_message FROM messages WHERE email_message_id = $1",
            &[&message_id],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// The relay is still up: a new connection is greeted and a message is
    /// accepted and stored.
    pub async fn still_serves(&self) {
        let before = self.messages().await;
        let mut c = Raw::connect(self.smtp).await;
        c.transaction(&message("after@remote.test", "still here"))
            .await;
        assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
        assert_eq!(self.messages().await, before + 1);
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("the relay drains")
            .unwrap()
            .expect("run returns Ok");
    }
}

/// A raw SMTP client.
pub struct Raw {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    /// Connects and checks the greeting.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut raw = Raw {
            reader: BufReader::new(r),
            writer: w,
        };
        assert_eq!(raw.line().await, "220 mx.test ESMTP e2a");
        raw
    }

    /// Connects and says EHLO.
    pub async fn greeted(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr).await;
        assert!(raw.cmd("EHLO client.remote.test").await.starts_with("250 "));
        raw
    }

    /// One reply line without CRLF; "" at end of stream.
    pub async fn line(&mut self) -> String {
        let mut line = Vec::new();
        tokio::time::timeout(PROMPT, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("a reply in time")
            .unwrap();
        let line = String::from_utf8(line).expect("replies are ASCII");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// The last line of one (possibly multi-line) reply.
    pub async fn reply(&mut self) -> String {
        loop {
            let line = self.line().await;
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line;
            }
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends `cmd` (CRLF appended) and returns the last line of its reply.
    pub async fn cmd(&mut self, cmd: impl AsRef<[u8]>) -> String {
        self.send([cmd.as_ref(), b"\r\n"].concat()).await;
        self.reply().await
    }

    /// MAIL, RCPT and DATA for [`AGENT`]; returns the reply to the body
    /// (`body` is sent as is, followed by `.` on a line of its own).
    pub async fn send_message(&mut self, body: &[u8]) -> String {
        assert_eq!(
            self.cmd("MAIL FROM:<sender@remote.test>").await,
            "250 2.1.0 OK"
        );
        assert_eq!(self.cmd(format!("RCPT TO:<{AGENT}>")).await, "250 2.1.5 OK");
        assert_eq!(
            self.cmd("DATA").await,
            "354 End data with <CR><LF>.<CR><LF>"
        );
        self.send(body).await;
        self.cmd(".").await
    }

    /// EHLO plus [`Self::send_message`], which must be accepted.
    pub async fn transaction(&mut self, body: &[u8]) {
        assert!(
            self.cmd("EHLO client.remote.test")
                .await
                .starts_with("250 ")
        );
        let reply = self.send_message(body).await;
        assert!(reply.starts_with("250 2.0.0 OK queued as "), "{reply}");
    }
}

/// A small well-formed message, CRLF-terminated.
pub fn message(message_id: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@remote.test>\r\nTo: {AGENT}\r\nSubject: test\r\nMessage-ID: <{message_id}>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// The real `e2a-relay` binary as a child process (so its memory is its
/// own), on a fresh database with the agent [`AGENT`]; killed when dropped.
pub struct RelayProcess {
    // Dropped first: the relay stops before its database goes away.
    child: tokio::process::Child,
    pub db: TestDb,
    pub smtp: SocketAddr,
    pub store: Store,
    pub user: UserId,
}

impl RelayProcess {
    /// Starts the relay with DNS checks off and `env` on top of the
    /// defaults, and waits until it accepts connections.
    pub async fn spawn(env: &[(&str, &str)]) -> RelayProcess {
        let db = TestDb::new().await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        store.wait_until_ready(PROMPT).await.unwrap();
        let user = Relay::agent(&store).await;
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-relay"));
        command
            .env("E2A_DATABASE_URL", db.url())
            .env("E2A_SMTP_ADDR", smtp.to_string())
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("E2A_SMTP_AUTH_DNS", "disabled")
            .env("E2A_SMTP_DOMAIN", "mx.test")
            .env("E2A_MIGRATION_MODE", "verify")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start e2a-relay");
        let deadline = std::time::Instant::now() + PROMPT;
        while TcpStream::connect(smtp).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the relay did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        RelayProcess {
            child,
            db,
            smtp,
            store,
            user,
        }
    }

    /// The process's peak resident set so far (`VmHWM`), in MiB.
    pub fn peak_rss_mb(&self) -> f64 {
        let pid = self.child.id().expect("the relay is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kb / 1024.0
    }

    /// Messages stored.
    pub async fn messages(&self) -> i64 {
        let c = self.store.client().await.unwrap();
        c.query_one("SELECT count(*) FROM messages", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// The user `email` (created unless it exists) owning the (verified) domain
/// of `address`, and a local agent at `address`.
pub async fn owner_with_agent(store: &Store, email: &str, address: &str) -> UserId {
    let mut c = store.client().await.unwrap();
    let email = EmailAddress::parse(email).unwrap();
    let user = match users::create(&c, &email, "").await {
        Ok(user) => user.id,
        Err(_) => users::get_by_email(&c, &email).await.unwrap().id,
    };
    let address = EmailAddress::parse(address).unwrap();
    let keys = DkimKeys {
        selector: "s".into(),
        public_key_b64: "cA==".into(),
        private_key_der: vec![0],
    };
    domains::claim(&mut c, &user, address.domain(), &keys, 10)
        .await
        .unwrap();
    domains::record_check(&mut c, &user, address.domain(), true)
        .await
        .unwrap();
    let new = NewAgent {
        address,
        name: String::new(),
        webhook_url: String::new(),
        agent_mode: AgentMode::Local,
    };
    agents::create(&mut c, &user, &new, 10).await.unwrap();
    user
}
