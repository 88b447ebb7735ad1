//! `cargo xtask outbox list|show|dead|resend`: the operator's view of the
//! outbound mail outbox (seed 003): deliveries newest first, one delivery
//! with its recipients, attempts and send gate, the dead letters, and the
//! re-send of a delivery that was not sent. Never prints message bodies.

use std::process::ExitCode;

use clap::Subcommand;
use e2a_store::mail_outbox::{self, ResendError};
use time::format_description::well_known::Rfc3339;

use crate::{CmdResult, database};

/// `cargo xtask outbox …`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
    /// Database (default: E2A_DATABASE_URL, DATABASE_URL, else the local dev cluster).
    #[arg(long, global = true)]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// The newest deliveries (optionally of one status: pending, retrying,
    /// sending, sent, dead_lettered).
    List {
        /// Only deliveries in this status.
        #[arg(long)]
        status: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One delivery with its recipients, attempts and send gate.
    Show {
        /// The delivery id (`mdl_…`).
        delivery_id: String,
    },
    /// The newest dead letters.
    Dead {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Send a dead-lettered (or waiting) delivery again: a fresh cycle of
    /// attempts, now. Refused for a delivery that was sent.
    Resend {
        /// The delivery id (`mdl_…`).
        delivery_id: String,
    },
}

const STATUSES: [&str; 5] = ["pending", "retrying", "sending", "sent", "dead_lettered"];

fn when(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// Runs one `outbox` action.
pub fn run(args: Args) -> CmdResult {
    if let Action::List {
        status: Some(s), ..
    } = &args.action
        && !STATUSES.contains(&s.as_str())
    {
        return Err(format!("--status must be one of {}", STATUSES.join(", ")).into());
    }
    let target = database::resolve(args.database_url)?;
    database::runtime()?.block_on(async move {
        let store = database::store(&target.url)?;
        let c = store.client().await?;
        match args.action {
            Action::List { status, limit } => {
                let rows = mail_outbox::list(&c, status.as_deref(), limit.clamp(1, 1000)).await?;
                println!(
                    "{:<36}  {:<13}  {:>8}  {:<20}  {:<25}  subject",
                    "delivery", "status", "attempts", "next attempt", "created"
                );
                for r in rows {
                    println!(
                        "{:<36}  {:<13}  {:>4}/{:<3}  {:<20}  {:<25}  {}",
                        r.delivery_id,
                        r.status,
                        r.attempts,
                        r.max_attempts,
                        when(r.next_attempt_at),
                        when(Some(r.created_at)),
                        r.subject.chars().take(60).collect::<String>()
                    );
                }
                let (depth, oldest) = mail_outbox::depth(&c).await?;
                let depth: Vec<String> = depth.iter().map(|(s, n)| format!("{s}={n}")).collect();
                println!("depth: {}; oldest due: {oldest:.0} s", depth.join(" "));
            }
            Action::Show { delivery_id } => {
                let d = match mail_outbox::show(&c, &delivery_id).await {
                    Err(e2a_store::StoreError::NotFound) => {
                        return Err(format!("no delivery {delivery_id}").into());
                    }
                    other => other?,
                };
                let r = &d.delivery;
                println!("delivery     {}", r.delivery_id);
                println!("owner        {}", r.user_id);
                println!("message      {}", r.message_id.as_deref().unwrap_or("-"));
                println!("template     {}", r.template_id);
                println!("status       {}", r.status);
                println!("attempts     {}/{}", r.attempts, r.max_attempts);
                println!("next attempt {}", when(r.next_attempt_at));
                println!("send gate    {}", d.gate.as_deref().unwrap_or("-"));
                println!("subject      {}", r.subject);
                if !r.last_error.is_empty() {
                    println!("last error   {}", r.last_error);
                }
                println!("recipients:");
                for x in &d.recipients {
                    println!(
                        "  {:<3} {:<40} {:<8} {} {}",
                        x.kind,
                        x.address,
                        x.status,
                        x.smtp_code.map(|c| c.to_string()).unwrap_or_default(),
                        x.reply
                    );
                }
                println!("attempts:");
                for a in &d.attempts {
                    println!(
                        "  #{:<3} {} {:<18} {} {}{}",
                        a.attempt_no,
                        when(Some(a.started_at)),
                        a.outcome,
                        a.smtp_code.map(|c| c.to_string()).unwrap_or_default(),
                        a.error,
                        a.reply
                    );
                }
            }
            Action::Dead { limit } => {
                for d in mail_outbox::dead_letters(&c, limit.clamp(1, 1000)).await? {
                    println!(
                        "{}  {}  now {:<13}  {}",
                        when(Some(d.archived_at)),
                        d.delivery_id,
                        d.status,
                        d.reason
                    );
                }
            }
            Action::Resend { delivery_id } => match mail_outbox::resend(&store, &delivery_id).await
            {
                Ok(()) => println!("{delivery_id}: pending again; the deliverer sends it now"),
                Err(
                    e @ (ResendError::NotFound
                    | ResendError::AlreadySent
                    | ResendError::Sending
                    | ResendError::Scrubbed),
                ) => {
                    return Err(format!("{delivery_id}: {e}").into());
                }
                Err(ResendError::Store(e)) => return Err(e.into()),
            },
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
