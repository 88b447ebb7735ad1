//! The relay binary's responsiveness while it processes large messages:
//! a fifth session's EHLO while four others send 10 MiB messages. MIME
//! parsing and hashing run off the async executor (`e2a_mail::cpu`), so
//! with a single executor thread the probe is still answered promptly.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Raw, RelayProcess};

/// While four sessions send 10 MiB messages, a fifth session's EHLO round
/// trip stays short: the body parsing and hashing do not hold the executor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_stays_prompt_while_large_messages_are_processed() {
    const LIMIT: usize = 10 << 20;
    let relay = RelayProcess::spawn(&[
        ("E2A_SMTP_MAX_MESSAGE_BYTES", &(LIMIT + 4096).to_string()),
        ("E2A_SMTP_DATA_BUDGET_BYTES", &(64 << 20).to_string()),
        // One executor thread: any parsing on it would stall every session.
        ("TOKIO_WORKER_THREADS", "1"),
    ])
    .await;
    // A multipart message of ~10 000 small base64 parts: MIME parsing
    // decodes every one of them, real work for the parser.
    let mut body = format!(
        "From: sender@remote.test\r\nTo: {}\r\nSubject: big\r\nMessage-ID: <big@remote.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n",
        common::AGENT
    )
    .into_bytes();
    let line =
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n";
    let mut part = 0;
    while body.len() < LIMIT - 64 * 1024 {
        body.extend_from_slice(
            format!(
                "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
                 Content-Disposition: attachment; filename=\"p{part}.bin\"\r\n\r\n"
            )
            .as_bytes(),
        );
        for _ in 0..8 {
            body.extend_from_slice(line.as_bytes());
        }
        part += 1;
    }
    body.extend_from_slice(b"--b--\r\n");
    let body = Arc::new(body);
    // A stall from parsing on the executor recurs every round; a one-off
    // scheduling hiccup of the loaded test machine does not. So a second
    // round is run only when the first saw a probe over the bound, and the
    // bound must hold in one of the two.
    let mut worst = Vec::new();
    for round in 0..2 {
        let (slow, p90, max) = ehlo_round(relay.smtp, &body, round).await;
        if slow == 0 && p90 < Duration::from_millis(100) {
            assert_eq!(relay.messages().await, 4 * (round + 1) as i64);
            return;
        }
        worst.push((slow, p90, max));
    }
    panic!(
        "in both rounds EHLO round trips went over 200 ms or p90 over 100 ms \
         (slow probes, p90, max): {worst:?}"
    );
}

/// Four sessions send `body` (made distinct by `round` and sender) while a
/// fifth repeats EHLO. Returns the probes over 200 ms, p90 and max.
async fn ehlo_round(
    addr: std::net::SocketAddr,
    body: &Arc<Vec<u8>>,
    round: usize,
) -> (usize, Duration, Duration) {
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let (body, done) = (body.clone(), done.clone());
            tokio::spawn(async move {
                let mut s = Raw::greeted(addr).await;
                let mut body = (*body).clone();
                body.extend_from_slice(format!("round {round} sender {i}\r\n").as_bytes());
                let reply = s.send_message(&body).await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                reply
            })
        })
        .collect();
    let mut probe = Raw::greeted(addr).await;
    let mut rtts = Vec::new();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        let started = std::time::Instant::now();
        let reply = probe.cmd("EHLO probe.remote.test").await;
        rtts.push(started.elapsed());
        assert!(reply.starts_with("250 "), "{reply}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for sender in senders {
        let reply = sender.await.unwrap();
        assert!(reply.starts_with("250 "), "{reply}");
    }
    rtts.sort();
    let p50 = rtts[rtts.len() / 2];
    let p90 = rtts[rtts.len() * 9 / 10];
    let max = *rtts.last().unwrap();
    println!(
        "EHLO during 4 × 10 MiB: {} probes, p50 {p50:?}, p90 {p90:?}, max {max:?}",
        rtts.len()
    );
    assert!(rtts.len() >= 5, "the probe ran during the transfers");
    // Generous for a loaded 2-core CI machine (the bench prints the figure;
    // target 50 ms; here the worst probe took 45–100 ms). With parsing on
    // the one executor thread the probe waits out a whole 10 MiB parse of
    // ~10 000 small parts: over 300 ms in this debug build.
    let slow = rtts
        .iter()
        .filter(|rtt| **rtt > Duration::from_millis(200))
        .count();
    println!("probes over 200 ms: {slow}");
    (slow, p90, max)
}
