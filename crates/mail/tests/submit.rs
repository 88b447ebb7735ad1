//! `submit` against a real SMTP server (the testkit sink): delivery, AUTH,
//! per-recipient and DATA classification, timeouts, refused connections.

use std::time::{Duration, Instant};

use e2a_mail::submit::{Envelope, Outcome, RecipientStatus, SmtpConfig, TlsMode, submit};
use e2a_testkit::smtp_sink::{Reply, Script, SmtpSink, Stage};

const MESSAGE: &[u8] = b"From: agent@x.test\r\nTo: b@y.test\r\nMessage-ID: <m1@x.test>\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n";

/// Short timeouts: every test finishes in well under a second.
fn config(sink: &SmtpSink) -> SmtpConfig {
    let mut cfg = SmtpConfig::new(sink.host(), sink.port(), TlsMode::None);
    cfg.helo_name = "e2a.test".into();
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.command_timeout = Duration::from_millis(300);
    cfg.data_timeout = Duration::from_secs(2);
    cfg
}

fn envelope(to: &[&str]) -> Envelope {
    Envelope {
        mail_from: "agent@x.test".into(),
        rcpt_to: to.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn a_message_arrives_once_with_its_envelope_and_bytes() {
    let sink = SmtpSink::start(Script::new()).await.expect("sink");
    let sub = submit(
        &config(&sink),
        &envelope(&["b@y.test", "c@y.test"]),
        MESSAGE,
    )
    .await;

    let Outcome::Sent {
        code,
        reply,
        queue_id,
    } = &sub.outcome
    else {
        panic!("not sent: {sub:?}")
    };
    assert_eq!(*code, 250);
    assert_eq!(reply, "2.0.0 Ok: queued as SINK1");
    assert_eq!(queue_id.as_deref(), Some("SINK1"));
    assert_eq!(sub.data.as_ref().map(|r| r.code), Some(250));
    assert!(
        sub.recipients
            .iter()
            .all(|r| r.status == RecipientStatus::Accepted)
    );
    assert_eq!(sub.recipients.len(), 2);

    let received = sink.received();
    assert_eq!(received.len(), 1, "exactly once");
    assert_eq!(received[0].mail_from, "agent@x.test");
    assert_eq!(received[0].rcpt_to, ["b@y.test", "c@y.test"]);
    assert_eq!(
        received[0].data, MESSAGE,
        "bytes as given (dot-stuffing undone)"
    );
    assert_eq!(received[0].auth_user, None);
    assert_eq!(sink.data_attempts("<m1@x.test>"), 1);
    assert_eq!(sink.connections(), 1);
}

#[tokio::test]
async fn auth_plain_is_used_and_a_wrong_password_is_permanent() {
    let sink = SmtpSink::start(Script::new().credentials("relay-user", "right-pass"))
        .await
        .expect("sink");
    let mut cfg = config(&sink);

    // No credentials: the server insists (530 to MAIL).
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    assert!(
        matches!(
            sub.outcome,
            Outcome::Permanent {
                code: Some(530),
                ..
            }
        ),
        "{sub:?}"
    );

    cfg.username = Some("relay-user".into());
    cfg.password = Some("wrong-pass".into());
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    let Outcome::Permanent { code, reason } = &sub.outcome else {
        panic!("not permanent: {sub:?}")
    };
    assert_eq!(*code, Some(535));
    assert!(!reason.contains("wrong-pass"), "{reason}");
    assert!(!format!("{sub:?}{cfg:?}").contains("wrong-pass"));
    assert_eq!(sink.count(), 0);

    cfg.password = Some("right-pass".into());
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    assert!(sub.outcome.is_sent(), "{sub:?}");
    assert_eq!(sink.received()[0].auth_user.as_deref(), Some("relay-user"));
}

#[tokio::test]
async fn recipients_are_classified_one_by_one() {
    let sink = SmtpSink::start(Script::new().rcpt_reply(|rcpt, _| match rcpt {
        "busy@y.test" => Reply::new(450, "4.2.0 Mailbox busy"),
        "gone@y.test" => Reply::new(550, "5.1.1 No such user"),
        _ => Reply::new(250, "2.1.5 OK"),
    }))
    .await
    .expect("sink");
    let cfg = config(&sink);

    let sub = submit(
        &cfg,
        &envelope(&["ok@y.test", "busy@y.test", "gone@y.test"]),
        MESSAGE,
    )
    .await;
    assert!(sub.outcome.is_sent(), "{sub:?}");
    let statuses: Vec<_> = sub
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.status.clone()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("ok@y.test", RecipientStatus::Accepted),
            (
                "busy@y.test",
                RecipientStatus::Temporary {
                    code: 450,
                    text: "4.2.0 Mailbox busy".into()
                }
            ),
            (
                "gone@y.test",
                RecipientStatus::Permanent {
                    code: 550,
                    text: "5.1.1 No such user".into()
                }
            ),
        ]
    );
    assert_eq!(sink.received()[0].rcpt_to, ["ok@y.test"]);

    // Nobody accepted: any 4xx makes it temporary…
    let sub = submit(&cfg, &envelope(&["gone@y.test", "busy@y.test"]), MESSAGE).await;
    assert!(
        matches!(
            sub.outcome,
            Outcome::Temporary {
                code: Some(450),
                ..
            }
        ),
        "{sub:?}"
    );
    assert_eq!(sub.data, None, "DATA not attempted");
    // …only 5xx makes it permanent.
    let sub = submit(&cfg, &envelope(&["gone@y.test"]), MESSAGE).await;
    assert!(
        matches!(
            sub.outcome,
            Outcome::Permanent {
                code: Some(550),
                ..
            }
        ),
        "{sub:?}"
    );
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn data_replies_decide_temporary_or_permanent() {
    let sink = SmtpSink::start(
        Script::new().data_reply(|m, _| match m.subject().as_deref() {
            Some("later") => Reply::new(451, "4.3.0 Try again later"),
            Some("never") => Reply::new(554, "5.7.1 Message rejected"),
            _ => Reply::new(250, "2.0.0 OK"),
        }),
    )
    .await
    .expect("sink");
    let cfg = config(&sink);

    let sub = submit(
        &cfg,
        &envelope(&["b@y.test"]),
        b"Subject: later\r\n\r\nx\r\n",
    )
    .await;
    let Outcome::Temporary { code, reason } = &sub.outcome else {
        panic!("not temporary: {sub:?}")
    };
    assert_eq!(*code, Some(451));
    assert!(reason.contains("451 4.3.0 Try again later"), "{reason}");
    assert_eq!(sub.data.as_ref().map(|r| r.code), Some(451));

    let sub = submit(
        &cfg,
        &envelope(&["b@y.test"]),
        b"Subject: never\r\n\r\nx\r\n",
    )
    .await;
    assert!(
        matches!(
            sub.outcome,
            Outcome::Permanent {
                code: Some(554),
                ..
            }
        ),
        "{sub:?}"
    );
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn a_stalled_server_is_temporary_within_the_command_timeout() {
    for stage in [Stage::Greeting, Stage::Mail, Stage::Rcpt] {
        let sink = SmtpSink::start(Script::new().delay_before(stage, Duration::from_secs(5)))
            .await
            .expect("sink");
        let cfg = config(&sink);
        let started = Instant::now();
        let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
        let took = started.elapsed();
        let Outcome::Temporary { code: None, reason } = &sub.outcome else {
            panic!("{stage:?}: not a temporary timeout: {sub:?}")
        };
        assert!(reason.contains("timed out"), "{stage:?}: {reason}");
        assert!(
            took >= cfg.command_timeout && took < Duration::from_millis(1500),
            "{stage:?}: took {took:?}"
        );
        assert_eq!(sink.count(), 0);
    }
}

#[tokio::test]
async fn a_stall_after_the_message_is_bounded_by_the_data_timeout() {
    let sink = SmtpSink::start(Script::new().delay_before(Stage::DataEnd, Duration::from_secs(5)))
        .await
        .expect("sink");
    let mut cfg = config(&sink);
    cfg.data_timeout = Duration::from_millis(400);
    let started = Instant::now();
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    assert!(
        matches!(sub.outcome, Outcome::Temporary { code: None, .. }),
        "{sub:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= cfg.data_timeout && took < Duration::from_millis(1500),
        "took {took:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_temporary() {
    // Bind then drop: nothing listens on that port any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut cfg = SmtpConfig::new("127.0.0.1", port, TlsMode::None);
    cfg.username = Some("u".into());
    cfg.password = Some("never-shown".into());
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    let Outcome::Temporary { code: None, reason } = &sub.outcome else {
        panic!("not temporary: {sub:?}")
    };
    assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    assert!(!reason.contains("never-shown"), "{reason}");
    assert!(sub.recipients.is_empty());
}

#[tokio::test]
async fn starttls_is_required_when_configured() {
    let sink = SmtpSink::start(Script::new()).await.expect("sink");
    let mut cfg = config(&sink);
    cfg.tls = TlsMode::StartTls;
    cfg.username = Some("u".into());
    cfg.password = Some("not-over-plaintext".into());
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    let Outcome::Temporary { reason, .. } = &sub.outcome else {
        panic!("not temporary: {sub:?}")
    };
    assert!(reason.contains("STARTTLS"), "{reason}");
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn implicit_tls_against_a_plaintext_server_is_temporary() {
    let sink = SmtpSink::start(Script::new()).await.expect("sink");
    let mut cfg = config(&sink);
    cfg.tls = TlsMode::Implicit;
    let started = Instant::now();
    let sub = submit(&cfg, &envelope(&["b@y.test"]), MESSAGE).await;
    assert!(
        matches!(sub.outcome, Outcome::Temporary { code: None, .. }),
        "{sub:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn many_submissions_in_parallel_each_arrive_once() {
    let sink = SmtpSink::start(Script::new().keep_messages(false))
        .await
        .expect("sink");
    let cfg = config(&sink);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("Message-ID: <{i}@x.test>\r\n\r\nx\r\n");
            submit(&cfg, &envelope(&["b@y.test"]), body.as_bytes()).await
        }));
    }
    for task in tasks {
        let sub = task.await.expect("task");
        assert!(sub.outcome.is_sent(), "{sub:?}");
    }
    assert_eq!(sink.count(), 50);
    assert_eq!(sink.data_attempts("<7@x.test>"), 1);
}
