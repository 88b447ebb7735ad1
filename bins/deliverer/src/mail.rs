//! Outbound mail: the mail-outbox [`Queue`] (claim, which passes the send
//! gate → DKIM-sign → SMTP submission with no transaction open → record)
//! and its gauges.
//!
//! What each attempt's answer becomes (per recipient, then as a whole):
//!
//! * every recipient accepted (DATA `250`) → `sent`, `email.sent`;
//! * some recipients refused for good (`5xx` at RCPT) while others were
//!   accepted → `sent`, with the refused ones in `email.sent`'s
//!   `failed_recipients`;
//! * a `4xx`, a timeout or a connection/TLS error → retried after
//!   [`SCHEDULE`] (only the recipients still pending), until the
//!   delivery's last attempt, which dead-letters it;
//! * a `5xx` for the message (or every recipient) → dead-lettered at once,
//!   `email.failed` — except an authentication refusal (`530`, `534`,
//!   `535`, `538`), the operator's configuration and not the message's,
//!   which is retried like a `4xx`.
//!
//! A delivery whose gate already says `sent` (an earlier attempt submitted
//! it) is recorded sent without being submitted again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use e2a_mail::{
    cpu,
    dkim_sign::DkimKey,
    submit::{self, Envelope, SmtpConfig},
};
use e2a_store::{
    Store, StoreError, domains,
    mail_outbox::{
        self, ClaimedMail, Gate, Outcome, RecipientAnswer, RecipientState, RecordItem, Recorded,
    },
};
use e2a_webhook::RetrySchedule;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use e2a_runtime::group_commit::{Recorder, Records};

use crate::queue::Queue;

/// Base waits after the 1st, 2nd, … failed attempt; past the end the last
/// entry repeats. With the default 8 attempts a message is tried for about
/// 15 hours before it is dead-lettered.
pub const DELAYS: [Duration; 7] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(4 * 3600),
    Duration::from_secs(8 * 3600),
];

/// The mail retry schedule: [`DELAYS`], each plus up to 10 % jitter so the
/// retries of a burst do not arrive together (the same schedule type as
/// the webhook queues').
pub const SCHEDULE: RetrySchedule = RetrySchedule::new(&DELAYS, 10);

/// The wait after failed attempt number `failed` (1-based).
pub fn retry_delay(failed: i32) -> Duration {
    SCHEDULE.delay(u32::try_from(failed).unwrap_or(1), None)
}

/// Attempts at storing an outcome before giving up on it (the lease then
/// runs out and the gate decides what happens next).
const RECORD_TRIES: u32 = 3;

/// How long a domain's DKIM key is cached (a rotated key is used this much
/// later at most).
const KEY_TTL: Duration = Duration::from_secs(60);

/// The mail-outbox queue.
pub struct MailQueue {
    store: Store,
    smtp: Option<SmtpConfig>,
    lease: Duration,
    keys: Mutex<HashMap<String, CachedKey>>,
    recorder: Recorder<MailRecords>,
}

/// A domain's key as loaded at an instant (`None`: it has none).
type CachedKey = (Instant, Option<Arc<DkimKey>>);

impl MailQueue {
    /// A queue submitting to `smtp` (`None`: mail waits until an SMTP
    /// server is configured), leasing for `lease` (also the send gate's
    /// stale window). Starts its [`Recorder`] (call inside a Tokio
    /// runtime).
    pub fn new(store: Store, smtp: Option<SmtpConfig>, lease: Duration) -> Self {
        Self {
            recorder: Recorder::spawn(store.clone()),
            store,
            smtp,
            lease,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The DKIM key of `domain` (cached for [`KEY_TTL`]); `None` when the
    /// domain has none (the mail goes out unsigned).
    async fn key(&self, domain: &str) -> Option<Arc<DkimKey>> {
        if domain.is_empty() {
            return None;
        }
        if let Some((at, key)) = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(domain)
            && at.elapsed() < KEY_TTL
        {
            return key.clone();
        }
        let loaded = async {
            let c = self.store.client().await?;
            domains::signing_key(&c, domain).await
        }
        .await;
        let key = match loaded {
            Ok(Some((selector, der))) => match DkimKey::new(domain, &selector, &der) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    tracing::warn!(domain, error = %e, "the domain's DKIM key is unusable; sending unsigned");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(domain, error = %e2a_store::error::chain(&e), "loading the DKIM key failed; sending unsigned");
                return None;
            }
        };
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(domain.to_owned(), (Instant::now(), key.clone()));
        key
    }

    /// Signs `job`'s message with its From domain's key, off the executor.
    async fn signed(&self, job: &ClaimedMail) -> Vec<u8> {
        let Some(key) = self.key(&job.dkim_domain).await else {
            return job.body.clone();
        };
        let body = &job.body;
        // RSA signing costs about a millisecond whatever the size: always off
        // the executor.
        match cpu::run(|| key.sign(body, OffsetDateTime::now_utc())).await {
            Ok(signed) => signed,
            Err(e) => {
                tracing::warn!(error = %e, "DKIM signing failed; sending unsigned");
                body.clone()
            }
        }
    }

    /// Stores the attempt's outcome (through the [`Recorder`], sharing a
    /// commit with other workers' outcomes), retrying a failed database
    /// call.
    async fn record(
        &self,
        job: &Arc<ClaimedMail>,
        started: OffsetDateTime,
        outcome: Outcome,
        answers: Vec<RecipientAnswer>,
    ) {
        for try_no in 1..=RECORD_TRIES {
            let recorded = self
                .recorder
                .record(MailOutcome {
                    job: job.clone(),
                    started,
                    outcome: outcome.clone(),
                    answers: answers.clone(),
                })
                .await;
            match recorded {
                Ok(Recorded::Done(status)) => {
                    metrics::counter!("e2a_mail_attempts_total", "outcome" => status).increment(1);
                    tracing::info!(status, "mail attempt recorded");
                    return;
                }
                Ok(Recorded::LeaseLost) => {
                    metrics::counter!("e2a_mail_leases_lost_total").increment(1);
                    tracing::warn!(
                        "the lease ran out before the outcome was recorded; the send gate decides what happens next"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(try_no, error = %e2a_store::error::chain(&e), "recording the mail attempt failed");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(try_no))).await;
                }
            }
        }
        tracing::error!("mail attempt not recorded; the send gate holds it until its window ends");
    }
}

/// One submission's outcome, for the [`Recorder`].
#[derive(Debug)]
pub struct MailOutcome {
    job: Arc<ClaimedMail>,
    started: OffsetDateTime,
    outcome: Outcome,
    answers: Vec<RecipientAnswer>,
}

/// Mail outcomes are stored by [`mail_outbox::record_batch`].
#[derive(Debug)]
pub struct MailRecords;

impl Records for MailRecords {
    type Item = MailOutcome;
    type Recorded = Recorded;
    const BATCH_METRIC: &'static str = "e2a_mail_record_batch_size";

    async fn record_batch(
        store: &Store,
        items: &[MailOutcome],
    ) -> Result<Vec<Recorded>, StoreError> {
        let items: Vec<RecordItem<'_>> = items
            .iter()
            .map(|r| RecordItem {
                job: &r.job,
                started_at: r.started,
                outcome: &r.outcome,
                recipients: &r.answers,
            })
            .collect();
        mail_outbox::record_batch(store, &items).await
    }

    async fn record_one(store: &Store, r: &MailOutcome) -> Result<Recorded, StoreError> {
        mail_outbox::record(store, &r.job, r.started, &r.outcome, &r.answers).await
    }

    fn lock_order(item: &MailOutcome) -> &str {
        item.job.delivery_id.as_str()
    }
}

/// What one submission means for the delivery (see the module docs).
pub fn decide(
    job: &ClaimedMail,
    submission: &submit::Submission,
) -> (Outcome, Vec<RecipientAnswer>) {
    let attempt_no = job.attempts + 1;
    let last = attempt_no >= job.max_attempts;
    let mut answers: Vec<RecipientAnswer> = job
        .recipients
        .iter()
        .map(|address| {
            let result = submission
                .recipients
                .iter()
                .find(|r| r.address.eq_ignore_ascii_case(address));
            let (state, code, reply) = match result.map(|r| &r.status) {
                Some(submit::RecipientStatus::Accepted) => {
                    (RecipientState::Sent, None, String::new())
                }
                Some(submit::RecipientStatus::Permanent { code, text }) => {
                    (RecipientState::Failed, Some(*code), text.clone())
                }
                Some(submit::RecipientStatus::Temporary { code, text }) => {
                    (RecipientState::Pending, Some(*code), text.clone())
                }
                None => (RecipientState::Pending, None, String::new()),
            };
            RecipientAnswer {
                address: address.clone(),
                state,
                code,
                reply,
            }
        })
        .collect();
    let outcome = match &submission.outcome {
        submit::Outcome::Sent { code, reply, .. } => {
            // DATA was accepted: recipients the server accepted have it.
            for a in &mut answers {
                if a.state == RecipientState::Sent {
                    // The final reply is what this recipient's copy got.
                    a.code = Some(*code);
                    a.reply.clone_from(reply);
                    continue;
                }
                if last && a.state == RecipientState::Pending {
                    a.state = RecipientState::Failed;
                }
            }
            let pending = answers.iter().any(|a| a.state == RecipientState::Pending);
            if pending {
                Outcome::Retry {
                    at: OffsetDateTime::now_utc() + retry_delay(attempt_no),
                    code: Some(*code),
                    error: "some recipients were refused for now".into(),
                }
            } else {
                Outcome::Sent {
                    code: *code,
                    reply: reply.clone(),
                }
            }
        }
        submit::Outcome::Temporary { code, reason } => {
            // Nothing was accepted in this attempt.
            for a in &mut answers {
                if a.state == RecipientState::Sent {
                    a.state = RecipientState::Pending;
                }
            }
            retry_or_give_up(last, attempt_no, *code, reason)
        }
        // The server refused our credentials (or wants some): an operator's
        // configuration problem, not the message's. Retried, so fixing the
        // password delivers the queue instead of dead-lettering it.
        submit::Outcome::Permanent {
            code: code @ Some(530 | 534 | 535 | 538),
            reason,
        } => {
            for a in &mut answers {
                a.state = RecipientState::Pending;
            }
            retry_or_give_up(last, attempt_no, *code, reason)
        }
        submit::Outcome::Permanent { code, reason } => {
            for a in &mut answers {
                if a.state == RecipientState::Sent {
                    a.state = RecipientState::Failed;
                }
            }
            Outcome::DeadLetter {
                code: *code,
                error: reason.clone(),
            }
        }
    };
    (outcome, answers)
}

/// A temporary failure of attempt `attempt_no`: retried on the
/// [`SCHEDULE`], or dead-lettered when it was the `last` attempt.
fn retry_or_give_up(last: bool, attempt_no: i32, code: Option<u16>, reason: &str) -> Outcome {
    if last {
        Outcome::DeadLetter {
            code,
            error: format!("gave up after {attempt_no} attempts: {reason}"),
        }
    } else {
        Outcome::Retry {
            at: OffsetDateTime::now_utc() + retry_delay(attempt_no),
            code,
            error: reason.to_owned(),
        }
    }
}

impl Queue for MailQueue {
    type Job = ClaimedMail;

    fn name(&self) -> &'static str {
        "mail"
    }

    async fn claim(&self, max: usize) -> Result<Vec<ClaimedMail>, e2a_store::StoreError> {
        if self.smtp.is_none() {
            // Nothing can be sent: leave the queue alone (no lease, no gate).
            return Ok(Vec::new());
        }
        let c = self.store.client().await?;
        mail_outbox::claim(&c, max, self.lease, self.lease).await
    }

    async fn process(&self, job: ClaimedMail, _slot: crate::queue::Slot) {
        let span = tracing::info_span!(
            "mail_delivery",
            delivery_id = %job.delivery_id,
            message_id = job.message.as_ref().map_or("", |m| m.message_id.as_str()),
            attempt = job.attempts + 1,
            recipients = job.recipients.len(),
        );
        async {
            let started = OffsetDateTime::now_utc();
            let job = Arc::new(job);
            if job.gate == Gate::AlreadySent {
                let outcome = Outcome::Sent {
                    code: 250,
                    reply: "already submitted (send gate)".into(),
                };
                self.record(&job, started, outcome, Vec::new()).await;
                return;
            }
            let Some(smtp) = &self.smtp else {
                return;
            };
            let message = self.signed(&job).await;
            let envelope = Envelope {
                mail_from: job.mail_from.clone(),
                rcpt_to: job.recipients.clone(),
            };
            let clock = Instant::now();
            let submission = submit::submit(smtp, &envelope, &message).await;
            metrics::histogram!("e2a_mail_submit_seconds").record(clock.elapsed().as_secs_f64());
            let (outcome, answers) = decide(&job, &submission);
            self.record(&job, started, outcome, answers).await;
        }
        .instrument(span)
        .await;
    }
}

/// Samples the outbox depth per status and the age of the oldest due
/// delivery every `every` until `shutdown`.
pub async fn sample_gauges(store: Store, every: Duration, shutdown: CancellationToken) {
    loop {
        let sampled = async {
            let c = store.client().await?;
            mail_outbox::depth(&c).await
        }
        .await;
        match sampled {
            Ok((by_status, oldest)) => {
                for (status, n) in by_status {
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!("e2a_mail_outbox_depth", "status" => status).set(n as f64);
                }
                metrics::gauge!("e2a_mail_outbox_oldest_due_seconds").set(oldest);
            }
            Err(e) => {
                tracing::warn!(error = %e2a_store::error::chain(&e), "sampling the mail outbox failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use e2a_store::ids::{MailDeliveryId, UserId};

    use super::*;

    fn job(attempts: i32, recipients: &[&str]) -> ClaimedMail {
        ClaimedMail {
            delivery_id: MailDeliveryId::new(),
            user_id: UserId::new(),
            lease_token: "t".into(),
            gate: Gate::Acquired,
            attempts,
            max_attempts: 3,
            mail_from: "a@x.test".into(),
            dkim_domain: String::new(),
            body: Vec::new(),
            recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
            message: None,
        }
    }

    fn rcpt(address: &str, status: submit::RecipientStatus) -> submit::RecipientResult {
        submit::RecipientResult {
            address: address.into(),
            status,
        }
    }

    fn submission(
        recipients: Vec<submit::RecipientResult>,
        outcome: submit::Outcome,
    ) -> submit::Submission {
        submit::Submission {
            recipients,
            data: None,
            outcome,
        }
    }

    fn states(answers: &[RecipientAnswer]) -> Vec<RecipientState> {
        answers.iter().map(|a| a.state).collect()
    }

    #[test]
    fn accepted_refused_and_busy_recipients_decide_the_attempt() {
        use submit::RecipientStatus::{Accepted, Permanent, Temporary};
        let sent = submit::Outcome::Sent {
            code: 250,
            reply: "ok".into(),
            queue_id: None,
        };
        let mixed = || {
            vec![
                rcpt("a@y.test", Accepted),
                rcpt(
                    "b@y.test",
                    Permanent {
                        code: 550,
                        text: "no".into(),
                    },
                ),
                rcpt(
                    "c@y.test",
                    Temporary {
                        code: 450,
                        text: "busy".into(),
                    },
                ),
            ]
        };
        // One busy: retry for it only; the accepted one is done.
        let (o, a) = decide(
            &job(0, &["a@y.test", "b@y.test", "c@y.test"]),
            &submission(mixed(), sent.clone()),
        );
        assert!(matches!(o, Outcome::Retry { .. }), "{o:?}");
        assert_eq!(
            states(&a),
            [
                RecipientState::Sent,
                RecipientState::Failed,
                RecipientState::Pending
            ]
        );
        assert_eq!(
            a[0].code,
            Some(250),
            "the accepted copy records the final reply"
        );
        // The same on the last attempt: sent, the busy one given up.
        let (o, a) = decide(
            &job(2, &["a@y.test", "b@y.test", "c@y.test"]),
            &submission(mixed(), sent),
        );
        assert!(matches!(o, Outcome::Sent { code: 250, .. }), "{o:?}");
        assert_eq!(
            states(&a),
            [
                RecipientState::Sent,
                RecipientState::Failed,
                RecipientState::Failed
            ]
        );
    }

    #[test]
    fn temporary_permanent_and_credential_failures() {
        let temporary = submit::Outcome::Temporary {
            code: Some(421),
            reason: "later".into(),
        };
        let (o, _) = decide(
            &job(0, &["a@y.test"]),
            &submission(vec![], temporary.clone()),
        );
        assert!(
            matches!(
                o,
                Outcome::Retry {
                    code: Some(421),
                    ..
                }
            ),
            "{o:?}"
        );
        let (o, _) = decide(&job(2, &["a@y.test"]), &submission(vec![], temporary));
        assert!(
            matches!(
                o,
                Outcome::DeadLetter {
                    code: Some(421),
                    ..
                }
            ),
            "last attempt: {o:?}"
        );
        let refused = submit::Outcome::Permanent {
            code: Some(554),
            reason: "spam".into(),
        };
        let (o, a) = decide(&job(0, &["a@y.test"]), &submission(vec![], refused));
        assert!(
            matches!(
                o,
                Outcome::DeadLetter {
                    code: Some(554),
                    ..
                }
            ),
            "{o:?}"
        );
        assert_eq!(states(&a), [RecipientState::Pending]);
        let bad_password = submit::Outcome::Permanent {
            code: Some(535),
            reason: "auth".into(),
        };
        let (o, _) = decide(&job(0, &["a@y.test"]), &submission(vec![], bad_password));
        assert!(
            matches!(
                o,
                Outcome::Retry {
                    code: Some(535),
                    ..
                }
            ),
            "an operator's mistake waits: {o:?}"
        );
    }

    #[test]
    fn the_schedule_grows_and_jitters_by_at_most_ten_percent() {
        for (i, base) in DELAYS.iter().enumerate() {
            let failed = i32::try_from(i + 1).unwrap();
            let d = retry_delay(failed);
            assert!(d >= *base && d <= *base + *base / 10, "{failed}: {d:?}");
        }
        assert!(retry_delay(50) >= DELAYS[6]);
        assert!(retry_delay(0) >= DELAYS[0]);
    }
}
