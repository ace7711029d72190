//! `mailroom dlq`: list, replay and purge dead letters.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mailroom_core::amqp::Broker;
use mailroom_core::job::JobId;
use mailroom_core::settings::Settings;
use mailroom_core::status::StatusStore;
use mailroom_core::store::RedisStore;
use mailroom_worker::dlq::{self, DeadLetter, Selection};
use mailroom_worker::verdict::DeadReason;
use time::OffsetDateTime;

/// `mailroom dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters: id, tenant, reason, attempts, last error, age. Never bodies.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead letters back to their work queue with attempts reset.
    Replay(ReplayArgs),
    /// Delete every dead letter.
    Purge {
        /// Yes, really.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters to replay.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayArgs {
    /// The one with this job id.
    #[arg(long)]
    id: Option<String>,
    /// Those dead-lettered for this reason: mailroom's, the broker's
    /// (`delivery_limit`, `maxlen`), or `unknown` as `dlq list` shows it.
    #[arg(long, value_parser = reasons())]
    reason: Option<String>,
    /// All of them.
    #[arg(long)]
    all: bool,
}

/// The reasons a dead letter can show, so a misspelt one is refused
/// rather than replaying nothing.
fn reasons() -> clap::builder::PossibleValuesParser {
    let ours = DeadReason::ALL.map(DeadReason::as_str);
    clap::builder::PossibleValuesParser::new(ours.into_iter().chain([
        "delivery_limit",
        "maxlen",
        "unknown",
    ]))
}

/// Runs a `dlq` subcommand.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let broker = Broker::connect_as(&settings.amqp, "mailroom-dlq")
        .await
        .context("cannot reach RabbitMQ")?;
    let result = match command {
        DlqCommand::List { limit } => dlq::list(&broker, limit).await.map(|letters| {
            print!("{}", table(&letters, OffsetDateTime::now_utc()));
        }),
        DlqCommand::Replay(args) => {
            let selection = match (args.id, args.reason) {
                (Some(id), _) => Selection::Id(id),
                (None, Some(reason)) => Selection::Reason(reason),
                (None, None) => Selection::All,
            };
            match dlq::replay(&broker, &selection).await {
                Ok(replayed) => {
                    requeue_statuses(settings, &replayed).await;
                    eprintln!("mailroom: replayed {} dead letter(s)", replayed.len());
                    Ok(())
                }
                Err(err) => Err(err),
            }
        }
        DlqCommand::Purge { yes } => {
            if !yes {
                broker.close().await;
                bail!("purge deletes every dead letter for good: run again with --yes");
            }
            dlq::purge(&broker).await.map(|n| {
                eprintln!("mailroom: purged {n} dead letter(s)");
            })
        }
    };
    broker.close().await;
    Ok(result?)
}

/// Logs each replayed job and marks its status `queued` again, so the
/// worker may record what happens next. Statuses only inform: a Redis
/// problem here is a warning, the replay itself has happened.
async fn requeue_statuses(settings: &Settings, replayed: &[DeadLetter]) {
    for letter in replayed {
        tracing::info!(job_id = %letter.id, reason = %letter.reason, attempts = letter.attempts, "dead letter replayed");
    }
    let store = match RedisStore::connect(&settings.redis).await {
        Ok(store) => StatusStore::new(store, settings.worker.status_retention),
        Err(err) => {
            tracing::warn!(error = %err, "statuses not updated after the replay");
            return;
        }
    };
    for letter in replayed {
        let Ok(id) = letter.id.parse::<JobId>() else {
            continue;
        };
        if let Err(err) = store.requeue(&id).await {
            tracing::warn!(error = %err, job_id = %letter.id, "status not updated after the replay");
        }
    }
}

fn table(letters: &[DeadLetter], now: OffsetDateTime) -> String {
    let mut out = format!(
        "{:<36}  {:<16}  {:<14}  {:>8}  {:>8}  {}\n",
        "ID", "TENANT", "REASON", "ATTEMPTS", "AGE", "LAST ERROR"
    );
    for letter in letters {
        let age = letter.dead_at.map_or_else(
            || "?".to_owned(),
            |at| {
                let secs = u64::try_from((now - at).whole_seconds()).unwrap_or(0);
                humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
            },
        );
        out.push_str(&format!(
            "{:<36}  {:<16}  {:<14}  {:>8}  {:>8}  {}\n",
            letter.id, letter.tenant, letter.reason, letter.attempts, age, letter.last_error
        ));
    }
    out
}
