//! `mailroom dlq`: list, replay and purge dead letters.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use mailroom_core::amqp::Broker;
use mailroom_core::settings::Settings;
use mailroom_core::status::StatusStore;
use mailroom_core::store::RedisStore;
use mailroom_worker::dlq::{self, DeadLetter, Selection};
use mailroom_worker::verdict::DeadReason;

use super::shown;
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

/// Runs a `dlq` subcommand. Flags are checked before connecting: a
/// malformed `--id` is the caller's mistake, whatever the broker holds.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { limit } => {
            on_broker(settings, async |broker| {
                let letters = dlq::list(broker, limit).await?;
                print!("{}", table(&letters, OffsetDateTime::now_utc()));
                Ok(())
            })
            .await
        }
        DlqCommand::Replay(args) => {
            let selection = selection(&args)?;
            on_broker(settings, async |broker| {
                replay(settings, broker, &selection).await
            })
            .await
        }
        DlqCommand::Purge { yes } => {
            if !yes {
                bail!("purge deletes every dead letter for good: run again with --yes");
            }
            on_broker(settings, async |broker| {
                let purged = dlq::purge(broker).await?;
                eprintln!("mailroom: purged {purged} dead letter(s)");
                Ok(())
            })
            .await
        }
    }
}

/// Runs `work` on a broker connection, closed whatever the outcome.
async fn on_broker(
    settings: &Settings,
    work: impl AsyncFnOnce(&Broker) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let broker = Broker::connect_as(&settings.amqp, "mailroom-dlq")
        .await
        .context("cannot reach RabbitMQ")?;
    let result = work(&broker).await;
    broker.close().await;
    result
}

/// What `args` select. An `--id` must be a job id, as `mailroom status`
/// takes it, and is compared in its canonical form.
fn selection(args: &ReplayArgs) -> anyhow::Result<Selection> {
    Ok(match (&args.id, &args.reason) {
        (Some(id), _) => Selection::Id(super::status::parse_job_id(id)?.to_string()),
        (None, Some(reason)) => Selection::Reason(reason.clone()),
        (None, None) => Selection::All,
    })
}

/// Replays `selection`; an `--id` that matched no dead letter is an error,
/// where a reason or `--all` may match none.
async fn replay(settings: &Settings, broker: &Broker, selection: &Selection) -> anyhow::Result<()> {
    // Statuses only inform: without Redis the replay goes ahead, unrecorded.
    let statuses = match RedisStore::connect_once(&settings.redis).await {
        Ok(store) => Some(StatusStore::new(store, settings.worker.status_retention)),
        Err(err) => {
            tracing::warn!(error = %err, "statuses will not show the replay");
            None
        }
    };
    let replayed = dlq::replay(broker, selection, statuses.as_ref()).await?;
    if let Selection::Id(id) = selection
        && replayed.is_empty()
    {
        bail!("no dead letter with id {id} (see `mailroom dlq list`)");
    }
    eprintln!("mailroom: replayed {} dead letter(s)", replayed.len());
    Ok(())
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
        // Every header here is the publisher's to choose.
        out.push_str(&format!(
            "{:<36}  {:<16}  {:<14}  {:>8}  {:>8}  {}\n",
            shown(&letter.id, 36),
            shown(&letter.tenant, 64),
            shown(&letter.reason, 32),
            letter.attempts,
            age,
            shown(&letter.last_error, 300)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use mailroom_core::job::JobId;
    use mailroom_core::settings::Secret;
    use mailroom_tests::rabbit::TestVhost;

    use super::*;

    fn replay_id(id: &str) -> DlqCommand {
        DlqCommand::Replay(ReplayArgs {
            id: Some(id.to_owned()),
            reason: None,
            all: false,
        })
    }

    /// Refused before connecting: no broker listens on port 1, and
    /// connecting would retry for half a minute.
    #[tokio::test]
    async fn a_malformed_id_is_refused() {
        let mut settings = Settings::default();
        settings.amqp.urls = vec![Secret::new("amqp://guest:guest@127.0.0.1:1/%2f")];
        for id in ["nope", "", "0190f5a4-0000-7000-8000"] {
            let err = run(&settings, replay_id(id)).await.expect_err(id);
            assert!(
                err.to_string().contains("is not a job id (a UUID)"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn an_id_that_matches_no_dead_letter_is_an_error() {
        let vhost = TestVhost::new("dlq-unknown-id");
        let mut settings = Settings::default();
        settings.amqp = vhost.settings();
        let broker = vhost.declared().await;
        broker.close().await;
        let id = JobId::new();
        let err = run(&settings, replay_id(&id.to_string().to_uppercase()))
            .await
            .expect_err("no such dead letter");
        assert_eq!(
            err.to_string(),
            format!("no dead letter with id {id} (see `mailroom dlq list`)")
        );
        let all = DlqCommand::Replay(ReplayArgs {
            id: None,
            reason: None,
            all: true,
        });
        run(&settings, all).await.expect("--all may replay none");
    }
}
