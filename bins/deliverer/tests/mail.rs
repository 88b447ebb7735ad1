//! Outbound mail end to end against a real SMTP server started by the test
//! (`e2a_testkit::smtp_sink`): a message goes out once, DKIM-signed with its
//! From domain's key (checked by an independent verifier against the TXT
//! record the domain publishes); a 4xx is retried on the schedule (time is
//! moved by moving the due time, never slept); a 5xx is dead-lettered;
//! `email.sent` / `email.failed` exist once each; two deliverer processes
//! racing on 1,000 messages submit each once; a deliverer killed between
//! claim and submission leads to exactly one submission after takeover; a
//! shutdown finishes and records the submission in flight (flaw 13).

use std::time::Duration;

use e2a_deliverer::{Config, Listeners, Wakeups};
use e2a_runtime::CancellationToken;
use e2a_store::{
    Store, StoreConfig,
    address::EmailAddress,
    agents::{self, AgentMode, NewAgent},
    domains,
    ids::{MessageId, UserId},
    mail_outbox::RecipientKind,
    outbound::{self, MessageType, OutboundMail},
};
use e2a_testkit::{
    TestDb,
    smtp_sink::{Reply, Script, SmtpSink},
};
use tokio::{net::TcpListener, task::JoinHandle};

const PROMPT: Duration = Duration::from_secs(30);
const DOMAIN: &str = "agents.localhost";

struct Harness {
    db: TestDb,
    store: Store,
    user: UserId,
    agent: String,
}

impl Harness {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let store = Store::new(&StoreConfig::new(db.url())).unwrap();
        let mut c = store.client().await.unwrap();
        let user = e2a_store::users::create(
            &c,
            &EmailAddress::parse("owner@example.com").unwrap(),
            "Owner",
        )
        .await
        .unwrap()
        .id;
        domains::ensure_shared(&c, DOMAIN).await.unwrap();
        let agent = agents::create(
            &mut c,
            &user,
            &NewAgent {
                address: EmailAddress::parse(&format!("alice@{DOMAIN}")).unwrap(),
                name: "Alice".into(),
                webhook_url: String::new(),
                agent_mode: AgentMode::Local,
            },
            100,
        )
        .await
        .unwrap()
        .id;
        Self {
            db,
            store,
            user,
            agent,
        }
    }

    /// Gives the shared domain a DKIM key; returns the TXT record it
    /// publishes.
    async fn dkim_key(&self) -> String {
        let pair = e2a_mail::dkim_keys::generate_rsa_2048().unwrap();
        let keys = domains::DkimKeys {
            selector: "e2a202612".into(),
            public_key_b64: pair.public_key_b64.clone(),
            private_key_der: pair.private_key_der,
        };
        let c = self.store.client().await.unwrap();
        assert!(
            domains::set_dkim_keys_if_missing(&c, DOMAIN, &keys)
                .await
                .unwrap()
        );
        e2a_mail::dkim_keys::dns_txt_value(&pair.public_key_b64)
    }

    /// Accepts one message to `to` (as the API does), composed for real.
    async fn queue(&self, to: &[&str], max_attempts: i32) -> (MessageId, String) {
        let message_id = MessageId::new();
        let rfc = e2a_mail::compose::mint_message_id(DOMAIN);
        let to: Vec<String> = to.iter().map(|s| (*s).to_owned()).collect();
        let raw = e2a_mail::compose::compose(&e2a_mail::compose::OutgoingMessage {
            from: e2a_mail::compose::Mailbox {
                name: Some("Alice".into()),
                address: self.agent.clone(),
            },
            reply_to: vec![],
            to: to.clone(),
            cc: vec![],
            subject: "Quarterly numbers".into(),
            message_id: rfc.clone(),
            date: time::OffsetDateTime::now_utc(),
            in_reply_to: None,
            references: vec![],
            conversation_id: Some("cnv_test".into()),
            text: "Here they are.".into(),
            html: None,
            attachments: vec![],
        })
        .unwrap();
        let external: Vec<(String, RecipientKind)> =
            to.iter().map(|a| (a.clone(), RecipientKind::To)).collect();
        let mail = OutboundMail {
            message_id: &message_id,
            user_id: &self.user,
            agent_id: &self.agent,
            message_type: MessageType::Send,
            rfc_message_id: &rfc,
            parent_email_message_id: "",
            subject: "Quarterly numbers",
            to: &to,
            cc: &[],
            bcc: &[],
            conversation_id: "cnv_test",
            raw: &raw,
            mail_from: &self.agent,
            dkim_domain: DOMAIN,
            external: &external,
            loopback: None,
            max_attempts,
            hold: None,
        };
        self.store
            .transaction(&mail, |tx, mail| Box::pin(outbound::accept(tx, mail)))
            .await
            .unwrap();
        (message_id, rfc)
    }

    async fn one(&self, sql: &str) -> i64 {
        self.store
            .client()
            .await
            .unwrap()
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    async fn until(&self, what: &str, sql: &str) {
        let deadline = std::time::Instant::now() + PROMPT;
        loop {
            let done: bool = self
                .store
                .client()
                .await
                .unwrap()
                .query_one(sql, &[])
                .await
                .unwrap()
                .get(0);
            if done {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// "Time passes": every waiting delivery is due now.
    async fn make_due(&self) {
        let c = self.store.client().await.unwrap();
        c.execute(
            "UPDATE mail_deliveries SET next_attempt_at = now() WHERE status IN ('pending', 'retrying')",
            &[],
        )
        .await
        .unwrap();
        c.execute("NOTIFY mail_outbox_new", &[]).await.unwrap();
    }

    fn config(&self, sink: &SmtpSink) -> Config {
        let mut config = Config::for_database(self.db.url());
        config.outbound_smtp_host = sink.host();
        config.outbound_smtp_port = sink.port();
        config.outbound_smtp_tls = "none".into();
        config.smtp_connect_timeout_secs = 5;
        config.smtp_command_timeout_secs = 5;
        config.smtp_data_timeout_secs = 10;
        config
    }

    /// An in-process deliverer submitting to `sink`.
    fn deliverer(&self, sink: &SmtpSink) -> Running {
        let shutdown = CancellationToken::new();
        let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ops.set_nonblocking(true).unwrap();
        let ops = TcpListener::from_std(ops).unwrap();
        let task = tokio::spawn(e2a_deliverer::run_with(
            self.config(sink),
            Listeners { ops },
            shutdown.clone(),
            Wakeups::new(),
        ));
        Running { shutdown, task }
    }

    /// A deliverer process submitting to `sink`.
    fn process(&self, sink: &SmtpSink) -> tokio::process::Child {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_e2a-deliverer"))
            .env("E2A_DATABASE_URL", self.db.url())
            .env("E2A_ENV", "development")
            .env("E2A_OPS_ADDR", format!("127.0.0.1:{port}"))
            .env("E2A_MIGRATION_MODE", "verify")
            .env("E2A_OUTBOUND_SMTP_HOST", sink.host())
            .env("E2A_OUTBOUND_SMTP_PORT", sink.port().to_string())
            .env("E2A_OUTBOUND_SMTP_TLS", "none")
            .env("E2A_OUTBOUND_SMTP_CONNECT_TIMEOUT_SECS", "5")
            .env("E2A_OUTBOUND_SMTP_COMMAND_TIMEOUT_SECS", "5")
            .env("E2A_OUTBOUND_SMTP_DATA_TIMEOUT_SECS", "10")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start e2a-deliverer")
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), e2a_runtime::BoxError>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("the deliverer stops")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_message_goes_out_once_dkim_signed_by_its_from_domain() {
    let h = Harness::new().await;
    let txt = h.dkim_key().await;
    let sink = SmtpSink::start(Script::new()).await.unwrap();
    let deliverer = h.deliverer(&sink);
    let (message_id, rfc) = h.queue(&["bob@example.net", "carol@example.net"], 8).await;
    assert!(sink.wait_for(1, PROMPT).await, "the message arrives");
    h.until(
        "recorded sent",
        "SELECT status = 'sent' FROM messages WHERE direction = 'outbound'",
    )
    .await;
    let received = sink.received();
    assert_eq!(received.len(), 1, "once");
    let m = &received[0];
    assert_eq!(m.mail_from, h.agent);
    assert_eq!(m.rcpt_to, ["bob@example.net", "carol@example.net"]);
    assert_eq!(m.message_id().as_deref(), Some(format!("<{rfc}>").as_str()));
    let verified = e2a_testkit::dkim::verify(&m.data, &txt).expect("the signature verifies");
    assert_eq!(verified.domain, DOMAIN, "d= is the From domain (flaw 30)");
    assert!(
        String::from_utf8_lossy(&m.data).contains(&format!("From: \"Alice\" <{}>", h.agent))
            || String::from_utf8_lossy(&m.data).contains(&format!("From: Alice <{}>", h.agent))
    );
    assert_eq!(
        h.one(&format!(
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = '{message_id}'"
        ))
        .await,
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1, "nothing more");
    deliverer.stop().await;
}

#[tokio::test]
async fn a_4xx_is_retried_on_the_schedule_and_a_5xx_is_dead_lettered() {
    let h = Harness::new().await;
    // bob: 450 twice, then accepted. dave: 550.
    let sink = SmtpSink::start(Script::new().rcpt_reply(|rcpt, attempt| {
        if rcpt.starts_with("bob@") && attempt <= 2 {
            Reply::new(450, "4.2.0 Mailbox busy")
        } else if rcpt.starts_with("dave@") {
            Reply::new(550, "5.1.1 No such user")
        } else {
            Reply::new(250, "2.1.5 OK")
        }
    }))
    .await
    .unwrap();
    let deliverer = h.deliverer(&sink);
    let (busy, _) = h.queue(&["bob@example.net"], 8).await;
    for (attempt, base) in [(1, 60.0), (2, 300.0)] {
        h.until(
            "the temporary failure is recorded",
            &format!("SELECT attempts = {attempt} AND status = 'retrying' FROM mail_deliveries"),
        )
        .await;
        let wait: f64 = h
            .store
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT EXTRACT(EPOCH FROM next_attempt_at - now())::float8 FROM mail_deliveries",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            wait >= base - 5.0 && wait <= base * 1.1 + 5.0,
            "attempt {attempt}: next try in {wait} s, expected {base} s + ≤10 %"
        );
        assert_eq!(sink.count(), 0);
        h.make_due().await;
    }
    assert!(sink.wait_for(1, PROMPT).await);
    h.until(
        "sent at the third attempt",
        "SELECT status = 'sent' AND attempts = 3 FROM mail_deliveries",
    )
    .await;
    assert_eq!(
        h.one(&format!(
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = '{busy}'"
        ))
        .await,
        1
    );

    let (refused, _) = h.queue(&["dave@example.net"], 8).await;
    h.until(
        "dead-lettered at once",
        &format!("SELECT status = 'failed' FROM messages WHERE id = '{refused}'"),
    )
    .await;
    assert_eq!(h.one("SELECT count(*) FROM mail_dead_letters").await, 1);
    let c = h.store.client().await.unwrap();
    let failed: serde_json::Value = c
        .query_one(
            "SELECT envelope FROM webhook_events WHERE type = 'email.failed' AND message_id = $1",
            &[&refused.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed["data"]["failed_recipients"][0]["smtp_code"], 550);
    assert_eq!(
        h.one("SELECT count(*) FROM webhook_events WHERE type = 'email.failed'")
            .await,
        1,
        "exactly once"
    );
    assert_eq!(
        h.one("SELECT count(*) FROM mail_attempts WHERE smtp_code = 550")
            .await,
        1,
        "the attempt keeps the SMTP code"
    );
    assert_eq!(sink.count(), 1, "the refused message was never accepted");
    deliverer.stop().await;
}

#[tokio::test]
async fn two_deliverer_processes_submit_each_of_a_thousand_messages_once() {
    const MESSAGES: usize = 1000;
    let h = Harness::new().await;
    let sink = SmtpSink::start(Script::new().keep_messages(true))
        .await
        .unwrap();
    let mut a = h.process(&sink);
    let mut b = h.process(&sink);
    let mut rfcs = Vec::with_capacity(MESSAGES);
    for _ in 0..MESSAGES {
        rfcs.push(h.queue(&["bob@example.net"], 8).await.1);
    }
    assert!(
        sink.wait_for(MESSAGES, Duration::from_secs(120)).await,
        "only {} of {MESSAGES} arrived",
        sink.count()
    );
    h.until(
        "every delivery recorded",
        &format!("SELECT count(*) FILTER (WHERE status = 'sent' AND attempts = 1) = {MESSAGES} FROM mail_deliveries"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), MESSAGES, "nothing twice");
    for rfc in &rfcs {
        assert_eq!(sink.data_attempts(&format!("<{rfc}>")), 1, "{rfc}");
    }
    for p in [&mut a, &mut b] {
        assert!(p.try_wait().unwrap().is_none(), "both deliverers still run");
        p.start_kill().unwrap();
    }
}

#[tokio::test]
async fn a_deliverer_killed_between_claim_and_submission_leads_to_one_submission() {
    let h = Harness::new().await;
    // The first connection stalls before its greeting: the deliverer has
    // claimed (lease and gate taken) but not submitted when it dies.
    let stalled = SmtpSink::start(Script::new().delay_before(
        e2a_testkit::smtp_sink::Stage::Greeting,
        Duration::from_secs(600),
    ))
    .await
    .unwrap();
    let mut doomed = h.process(&stalled);
    let (_, rfc) = h.queue(&["bob@example.net"], 8).await;
    h.until("claimed", "SELECT status = 'sending' FROM mail_deliveries")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    assert_eq!(
        h.one("SELECT count(*) FROM send_attempts WHERE status = 'attempting'")
            .await,
        1,
        "the gate is held by the dead attempt"
    );

    let sink = SmtpSink::start(Script::new()).await.unwrap();
    let survivor = h.deliverer(&sink);
    // Nobody submits while the lease and the gate hold.
    assert!(!sink.wait_for(1, Duration::from_millis(1500)).await);
    // The lease lapses (moved, not slept), but the gate is still fresh:
    // still nothing goes out; the delivery waits for the gate.
    let c = h.store.client().await.unwrap();
    c.execute(
        "UPDATE mail_deliveries SET leased_until = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    c.execute("NOTIFY mail_outbox_new", &[]).await.unwrap();
    h.until(
        "waiting for the gate",
        "SELECT status = 'retrying' AND next_attempt_at > now() FROM mail_deliveries",
    )
    .await;
    assert_eq!(sink.count(), 0);
    // The gate goes stale: the survivor takes over and submits once.
    c.execute(
        "UPDATE send_attempts SET attempted_at = now() - interval '1 day'",
        &[],
    )
    .await
    .unwrap();
    h.make_due().await;
    assert!(sink.wait_for(1, PROMPT).await);
    h.until(
        "sent by the survivor",
        "SELECT status = 'sent' FROM mail_deliveries",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 1);
    assert_eq!(sink.data_attempts(&format!("<{rfc}>")), 1);
    assert_eq!(stalled.count(), 0, "the dead deliverer never submitted");
    survivor.stop().await;
}

#[tokio::test]
async fn a_shutdown_finishes_the_submission_in_flight_and_records_it() {
    // Flaw 13: the original sent notifications in detached goroutines that
    // a shutdown dropped. Here a submission in flight when the token is
    // cancelled is finished and recorded before the deliverer returns.
    let h = Harness::new().await;
    // The sink holds its answer to the end of DATA for a while: the whole
    // message is on the wire, the outcome is not.
    let sink = SmtpSink::start(Script::new().delay_before(
        e2a_testkit::smtp_sink::Stage::DataEnd,
        Duration::from_secs(2),
    ))
    .await
    .unwrap();
    let deliverer = h.deliverer(&sink);
    let (message_id, rfc) = h.queue(&["bob@example.net"], 8).await;
    let deadline = std::time::Instant::now() + PROMPT;
    while sink.data_attempts(&format!("<{rfc}>")) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the message never reached the end of DATA"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.count(), 0, "the sink has not answered yet");

    deliverer.shutdown.cancel();
    tokio::time::timeout(PROMPT, deliverer.task)
        .await
        .expect("the deliverer stops once the submission is done")
        .unwrap()
        .unwrap();
    assert_eq!(
        sink.count(),
        1,
        "the deliverer returned only after the server accepted the message"
    );
    assert_eq!(
        h.one(&format!(
            "SELECT count(*) FROM mail_deliveries d JOIN messages m ON m.id = d.message_id \
              WHERE m.id = '{message_id}' AND d.status = 'sent' AND m.status = 'sent' \
                AND d.leased_until IS NULL"
        ))
        .await,
        1,
        "recorded sent, not left sending"
    );
    assert_eq!(
        h.one("SELECT count(*) FROM send_attempts WHERE status = 'sent'")
            .await,
        1
    );
    assert_eq!(
        h.one(&format!(
            "SELECT count(*) FROM webhook_events WHERE type = 'email.sent' AND message_id = '{message_id}'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn without_an_smtp_server_mail_waits_untouched() {
    let h = Harness::new().await;
    let shutdown = CancellationToken::new();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let task = tokio::spawn(e2a_deliverer::run_with(
        Config::for_database(h.db.url()),
        Listeners { ops },
        shutdown.clone(),
        Wakeups::new(),
    ));
    h.queue(&["bob@example.net"], 8).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.one("SELECT count(*) FROM mail_deliveries WHERE status = 'pending' AND attempts = 0")
            .await,
        1
    );
    assert_eq!(h.one("SELECT count(*) FROM send_attempts").await, 0);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[test]
fn a_lease_shorter_than_the_worst_case_submission_is_refused() {
    let mut config = Config::for_database("postgres://localhost/e2a");
    config.outbound_smtp_host = "smtp.example.net".into();
    config.mail_lease_secs = 60;
    let smtp = config.smtp_config().unwrap();
    let e = config.mail_lease(smtp.as_ref()).unwrap_err().to_string();
    assert!(e.contains("E2A_MAIL_LEASE_SECS (60)"), "{e}");
    config.mail_lease_secs = 0;
    let lease = config.mail_lease(smtp.as_ref()).unwrap();
    assert!(lease > smtp.unwrap().worst_case() + Duration::from_secs(30));
}
